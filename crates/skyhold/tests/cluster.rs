//! The management-server cluster: takeover after SIGKILL, self-fencing, drain.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A server killed between an agent's answer and the recording of the result: a survivor
/// resumes the job from its last durable step, the agent replays instead of executing twice.
fn takeover_mid_step(b: Backend) {
    let Some(mut c) = Cloud::start(b, 0) else { return };
    c.allow_error_logs = true; // the failpoint logs an ERROR before aborting
    c.start_server("ms2");
    c.start_agent("agent1", 4, &[]);
    c.wait_hosts_up(4);
    // ms1 is the only server that claims jobs until it dies: ms2 is draining-free but we give ms1
    // the failpoint and submit while ms2 is stopped.
    c.kill9_server(1);
    c.restart_server(0, &[("SKYHOLD_FAILPOINT", "after_agent_answer:1")]);
    c.wait_hosts_up(4);
    let (z, t, o) = c.ids("Small Instance");
    let r =
        c.ok("deployVirtualMachine", &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "tk1")]);
    let job = r["jobid"].as_str().unwrap().to_string();
    // ms1 aborts right after the agent answered.
    assert!(c.servers[0].0.wait_exit(Duration::from_secs(30)).is_some(), "failpoint aborted ms1");
    let t0 = Instant::now();
    c.restart_server(1, &[]);
    c.api_port = c.servers[1].1;
    let j = c.wait_job(&job);
    let took = t0.elapsed();
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["state"], "Running");
    let l = std::fs::read_to_string(c.ledger()).unwrap();
    let lines: Vec<serde_json::Value> = l.lines().map(|x| serde_json::from_str(x).unwrap()).collect();
    let execs = lines.iter().filter(|e| e["job"] == job.as_str() && e["kind"] == "exec").count();
    let replays = lines.iter().filter(|e| e["job"] == job.as_str() && e["kind"] == "replay").count();
    assert_eq!(execs, 1, "executed once: {l}");
    assert_eq!(replays, 1, "resent and replayed: {l}");
    eprintln!("job resumed by a survivor {:.2} s after the crash", took.as_secs_f64());
}

mod takeover_mid_step {
    #[test]
    fn sqlite() {
        super::takeover_mid_step(super::Backend::Sqlite)
    }
    #[test]
    fn mysql() {
        super::takeover_mid_step(super::Backend::MySql)
    }
}
