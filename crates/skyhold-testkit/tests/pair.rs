//! The replication helpers on real MariaDB nodes: a failover with lost transactions, then the
//! old primary rejoins as a replica (rebuilt, since it holds what the new primary never got), then
//! a clean switch back (resumed from its own position).

use skyhold_testkit::{Rejoin, fast_tmp, have_mariadb, promote, reattach_as_replica, sql, start_pair, wait_caught_up};
use std::time::Duration;

#[test]
fn failover_rebuild_and_resume() {
    if !have_mariadb() {
        assert!(std::env::var_os("CI").is_none(), "mariadbd must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: mariadbd not installed");
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let mut pair = start_pair(base.path(), "app", "apppw").unwrap();
    let (p, r) = (pair.primary.port, pair.replica.port);
    sql(p, "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY); INSERT INTO d.t VALUES (1);").unwrap();
    wait_caught_up(p, r, Duration::from_secs(10)).unwrap();
    // The replica stops receiving: the next write exists only on the primary, which then dies.
    sql(r, "STOP SLAVE IO_THREAD").unwrap();
    sql(p, "INSERT INTO d.t VALUES (2)").unwrap();
    pair.primary.kill9();
    assert!(promote(r, Duration::from_secs(1)).unwrap());
    assert_eq!(sql(r, "SELECT @@read_only").unwrap(), "0");
    sql(r, "INSERT INTO d.t VALUES (3)").unwrap();
    // The old primary cannot resume (it has row 2): rebuilt from the new primary.
    let how = reattach_as_replica(&mut pair.primary, r, Duration::from_secs(20)).unwrap();
    assert_eq!(how, Rejoin::Rebuilt);
    assert_eq!(sql(p, "SELECT GROUP_CONCAT(id ORDER BY id) FROM d.t").unwrap(), "1,3");
    assert_eq!(sql(p, "SELECT COUNT(*) FROM mysql.user WHERE user='app'").unwrap(), "1");
    sql(r, "INSERT INTO d.t VALUES (4)").unwrap();
    wait_caught_up(r, p, Duration::from_secs(10)).unwrap();
    assert_eq!(sql(p, "SELECT GROUP_CONCAT(id ORDER BY id) FROM d.t").unwrap(), "1,3,4");
    // A clean switch back: nothing lost, so the other node resumes from its own position.
    pair.replica.kill9();
    promote(p, Duration::from_secs(1)).unwrap();
    sql(p, "INSERT INTO d.t VALUES (5)").unwrap();
    let how = reattach_as_replica(&mut pair.replica, p, Duration::from_secs(20)).unwrap();
    assert_eq!(how, Rejoin::Resumed);
    assert_eq!(sql(r, "SELECT GROUP_CONCAT(id ORDER BY id) FROM d.t").unwrap(), "1,3,4,5");
    assert_eq!(sql(r, "SELECT @@read_only").unwrap(), "1");
}
