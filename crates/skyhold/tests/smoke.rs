mod common;
use common::*;

#[test]
fn sqlite_deploy_reaches_running() {
    let Some(c) = Cloud::start(Backend::Sqlite, 2) else { return };
    let (id, job) = c.deploy("smoke1", "Small Instance", &[]);
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobresult"]["virtualmachine"]["state"], "Running");
    assert_eq!(c.vm(&id)["state"], "Running");
}

#[test]
fn mysql_deploy_reaches_running() {
    let Some(c) = Cloud::start(Backend::MySql, 2) else { return };
    let (id, job) = c.deploy("smoke1", "Small Instance", &[]);
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(c.vm(&id)["state"], "Running");
}
