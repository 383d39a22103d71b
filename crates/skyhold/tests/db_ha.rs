//! Database HA against real MariaDB started by the test: a GTID primary/replica pair
//! (asynchronous, then semi-synchronous under load) and a 3-node Galera cluster, each behind
//! Skyhold servers configured through a CloudStack db.properties listing every node.
//!
//! Ground truth afterwards: the agents' ledger (no (job, step) twice, no VM on two hosts) and the
//! database (every VM the ledger says runs is Running on that host, and nothing else is).

mod common;
use common::*;
use serde_json::Value;
use skyhold_testkit::{
    Galera, Kids, fast_tmp, have_galera, have_mariadb, promote, reattach_as_replica, sql, start_pair, wait_caught_up,
};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Skyhold servers and one simulator agent (with a ledger) on a database given by db.properties.
struct Stack {
    dir: tempfile::TempDir,
    d: String,
    p: String,
    apis: Vec<String>,
    admin: Creds,
    /// zone, template, offering ids for deployVirtualMachine.
    zto: [String; 3],
    ledger: PathBuf,
    _servers: Kids,
    _agent: Kids,
}

impl Stack {
    fn start(props: &str, servers: usize, hosts: u32) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let pp = dir.path().join("db.properties");
        std::fs::write(&pp, props).unwrap();
        let p = pp.to_str().unwrap().to_string();
        let init: Value = serde_json::from_str(&run_ok(&[
            "db",
            "init",
            "--seed",
            "--data-dir",
            &d,
            "--db-properties",
            &p,
            "--admin-password",
            "password",
        ]))
        .unwrap();
        let mut kids = Kids(Vec::new());
        let mut apis = Vec::new();
        let mut agent_addrs = Vec::new();
        for i in 1..=servers {
            let name = format!("ms{i}");
            let ports = dir.path().join(format!("{name}.ports"));
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            kids.0.push(
                Command::new(BIN)
                    .args(["server", "--data-dir", &d, "--db-properties", &p, "--bind", "127.0.0.1", "--ms-id", &name])
                    .args(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0", "--ports-file"])
                    .arg(&ports)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
            let pv: Value = wait_for(Duration::from_secs(30), || {
                std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str(&s).ok())
            })
            .expect("server up");
            apis.push(format!("http://127.0.0.1:{}/client/api", pv["api"]));
            agent_addrs.push(format!("127.0.0.1:{}", pv["agent"]));
        }
        let ledger = dir.path().join("ledger.jsonl");
        let agent = Kids(vec![
            Command::new(BIN)
                .args(["agent", "--mgmt", &agent_addrs.join(",")])
                .arg(format!("--token={}", init["agent_token"].as_str().unwrap()))
                .args(["--simulator", "--hosts", &hosts.to_string(), "--agent-id", "dbha", "--ledger"])
                .arg(&ledger)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ]);
        let admin = Creds {
            api_key: init["admin"]["apikey"].as_str().unwrap().into(),
            secret: init["admin"]["secretkey"].as_str().unwrap().into(),
            username: "admin".into(),
            password: "password".into(),
        };
        let mut s = Stack { dir, d, p, apis, admin, zto: Default::default(), ledger, _servers: kids, _agent: agent };
        wait_for(Duration::from_secs(30), || {
            s.call(0, "listHosts", &[]).filter(|(_, v)| v["listhostsresponse"]["count"] == hosts).map(|_| ())
        })
        .expect("hosts up");
        let first_id = |cmd: &str, params: &[(&str, &str)], key: &str| -> String {
            let (_, v) = s.call(0, cmd, params).expect("answer");
            v[format!("{}response", cmd.to_lowercase())][key][0]["id"].as_str().expect("id").to_string()
        };
        s.zto = [
            first_id("listZones", &[], "zone"),
            first_id("listTemplates", &[("templatefilter", "featured")], "template"),
            first_id("listServiceOfferings", &[], "serviceoffering"),
        ];
        s
    }

    /// One signed call to server `i` (round robin); None if the connection failed.
    fn call(&self, i: usize, cmd: &str, params: &[(&str, &str)]) -> Option<(u16, Value)> {
        let url = format!("{}?{}", self.apis[i % self.apis.len()], signed_query(&self.admin, cmd, params));
        match ureq::get(&url).timeout(Duration::from_secs(30)).call() {
            Ok(resp) => Some((resp.status(), resp.into_json().unwrap_or_default())),
            Err(ureq::Error::Status(st, resp)) => Some((st, resp.into_json().unwrap_or_default())),
            Err(_) => None,
        }
    }

    /// Deploy through server `i`, retrying on the next one when a call fails outright; the job id
    /// the client was given (None: an earlier attempt was accepted, or nothing within `within`).
    fn submit(&self, i: usize, name: &str, within: Duration) -> Option<String> {
        let [z, t, o] = &self.zto;
        let params =
            [("zoneid", z.as_str()), ("templateid", t.as_str()), ("serviceofferingid", o.as_str()), ("name", name)];
        wait_for(within, || {
            let (st, v) = self
                .call(i, "deployVirtualMachine", &params)
                .or_else(|| self.call(i + 1, "deployVirtualMachine", &params))?;
            if st == 200 {
                return v["deployvirtualmachineresponse"]["jobid"].as_str().map(str::to_string);
            }
            // A refused duplicate name means an earlier attempt was accepted.
            assert!(st == 530 || st == 503 || (st == 431 && v.to_string().contains("already exists")), "{st} {v}");
            None
        })
    }

    /// Wait for a job's final state, asking any server.
    fn finished(&self, j: &str) -> Value {
        wait_for(Duration::from_secs(60), || {
            (0..self.apis.len()).find_map(|i| self.call(i, "queryAsyncJobResult", &[("jobid", j)])).and_then(
                |(_, v)| {
                    let q = v["queryasyncjobresultresponse"].clone();
                    (q["jobstatus"] != 0 && !q["jobstatus"].is_null()).then_some(q)
                },
            )
        })
        .unwrap_or_else(|| panic!("job {j} finished"))
    }

    fn run(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &self.d, "--db-properties", &self.p]);
        serde_json::from_str(&run_ok(&all)).unwrap()
    }

    fn db_status(&self) -> Value {
        self.run(&["db", "status"])
    }

    /// Events of one type, newest first.
    fn events(&self, event_type: &str) -> Vec<Value> {
        (0..self.apis.len())
            .find_map(|i| self.call(i, "listEvents", &[("type", event_type)]))
            .and_then(|(_, v)| v["listeventsresponse"]["event"].as_array().cloned())
            .unwrap_or_default()
    }

    fn wait_event(&self, event_type: &str, within: Duration) -> Value {
        wait_for(within, || self.events(event_type).into_iter().next())
            .unwrap_or_else(|| panic!("no {event_type} event within {within:?}"))
    }

    fn logs(&self) -> String {
        (1..=self.apis.len())
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("ms{i}.log"))).unwrap_or_default())
            .collect()
    }

    /// The ledger's invariants, and the database (read on the node at `port`) agreeing with it on
    /// where every VM runs.
    fn check_ground_truth(&self, port: u16, galera: bool) {
        let running = check_ledger(&read_ledger(&self.ledger));
        let q = format!(
            "{}SELECT v.id, h.guid FROM cloud.vm_instance v JOIN cloud.host h ON h.id = v.host_id \
             WHERE v.state = 'Running' ORDER BY v.id",
            if galera { "SET SESSION wsrep_sync_wait = 1; " } else { "" }
        );
        let db: std::collections::HashMap<String, String> = sql(port, &q)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(db, running, "database and ledger disagree on where VMs run");
    }
}

fn skip(what: &str) -> bool {
    let have = if what == "galera" { have_galera() } else { have_mariadb() };
    if !have {
        assert!(std::env::var_os("CI").is_none(), "{what} must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: {what} not installed");
    }
    !have
}

fn pair_props(primary: u16, replica: u16, extra: &str) -> String {
    format!(
        "db.cloud.username=skyhold\ndb.cloud.password=sky\ndb.cloud.host=127.0.0.1:{primary}\n\
         db.cloud.slaves=127.0.0.1:{replica}\ndb.cloud.name=cloud\ndb.ha.enabled=true\ndb.ha.topology=replication\n\
         db.cloud.secondsBeforeRetryMaster=3600\n{extra}"
    )
}

/// The replica's condition as `db status` reports it.
fn replica_condition(st: &Value) -> String {
    st["endpoints"][1]["replication"]["condition"].as_str().unwrap_or("").to_string()
}

#[test]
fn replication_pair_monitoring_and_failover() {
    if skip("mariadb") {
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let skyhold_testkit::Pair { primary, replica } =
        start_pair(base.path(), "skyhold", "sky").expect("replication running");
    let s = Stack::start(&pair_props(primary.port, replica.port, "db.ha.replicaLagAlertSeconds=1\n"), 1, 2);
    let st = s.db_status();
    let eps = st["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "{st}");
    assert_eq!(eps[0]["role"], "primary", "{st}");
    assert_eq!(eps[1]["role"], "replica", "writes never go to a read-only replica: {st}");
    assert_eq!(eps[0]["active"], true);
    assert_eq!(replica_condition(&st), "ok", "{st}");
    assert_eq!(eps[1]["replication"]["io_running"], "Yes", "{st}");
    assert!(eps[0]["replication"].is_null(), "the primary replicates from nobody: {st}");
    let j = s.submit(0, "before", Duration::from_secs(20)).unwrap();
    assert_eq!(s.finished(&j)["jobstatus"], 1);

    // Broken replication (the SQL thread stopped) is seen, logged and an event; so is the repair.
    sql(replica.port, "STOP SLAVE SQL_THREAD").unwrap();
    let ev = s.wait_event("DATABASE.REPLICATION.BROKEN", Duration::from_secs(15));
    assert!(ev["description"].as_str().unwrap().contains("SQL thread stopped"), "{ev}");
    assert_eq!(ev["level"], "ERROR", "{ev}");
    assert_eq!(replica_condition(&s.db_status()), "broken");
    sql(replica.port, "START SLAVE SQL_THREAD").unwrap();
    s.wait_event("DATABASE.REPLICATION.OK", Duration::from_secs(15));

    // A lagging replica (applying 3 s late) is reported past db.ha.replicaLagAlertSeconds.
    sql(replica.port, "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 3; START SLAVE;").unwrap();
    let ok_events = s.events("DATABASE.REPLICATION.OK").len();
    let lag = wait_for(Duration::from_secs(20), || {
        sql(primary.port, "CREATE TABLE IF NOT EXISTS cloud.lag_probe (n INT); INSERT INTO cloud.lag_probe VALUES (1)")
            .unwrap();
        s.events("DATABASE.REPLICATION.LAGGING").into_iter().next()
    })
    .expect("lag reported");
    assert!(lag["description"].as_str().unwrap().contains("behind its source"), "{lag}");
    sql(replica.port, "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 0; START SLAVE;").unwrap();
    wait_for(Duration::from_secs(20), || (s.events("DATABASE.REPLICATION.OK").len() > ok_events).then_some(()))
        .expect("recovery from lag reported");

    // Lose the primary once the replica has everything; promote the replica (the operator's or
    // orchestrator's act). Skyhold follows the writable node and nothing acknowledged is lost.
    wait_caught_up(primary.port, replica.port, Duration::from_secs(20)).expect("replica caught up");
    let mut primary = primary;
    primary.kill9();
    let t0 = Instant::now();
    promote(replica.port, Duration::from_secs(1)).unwrap();
    let back = wait_for(Duration::from_secs(30), || {
        s.call(0, "listVirtualMachines", &[("name", "before")]).filter(|(st, _)| *st == 200).map(|(_, v)| v)
    })
    .expect("API answers after the failover");
    assert_eq!(back["listvirtualmachinesresponse"]["count"], 1, "the VM written before the failover survived");
    let j = s.submit(0, "after", Duration::from_secs(30)).unwrap();
    assert_eq!(s.finished(&j)["jobstatus"], 1, "writes work on the new primary");
    eprintln!("replication failover: writes resumed {:.2} s after the primary died", t0.elapsed().as_secs_f64());
    assert!(s.logs().contains("database failover"), "the failover is logged");
    let ev = s.wait_event("DATABASE.FAILOVER", Duration::from_secs(10));
    let text = ev["description"].as_str().unwrap();
    assert!(
        text.contains(&format!(":{}/cloud to ", primary.port)) && text.contains(&format!(":{}/cloud", replica.port)),
        "{ev}"
    );
    let cs = s.run(&["cluster", "status", "--json"]);
    let ep = cs["servers"][0]["db_endpoint"].as_str().unwrap().to_string();
    assert!(ep.contains(&format!(":{}/", replica.port)), "cluster status shows where ms1 writes: {cs}");
    s.check_ground_truth(replica.port, false);
}

/// Semi-synchronous replication (`AFTER_SYNC`): a commit is acknowledged only once the replica
/// has it, so killing the primary under load through two servers loses no acknowledged job.
#[test]
fn replication_semisync_primary_killed_under_load() {
    if skip("mariadb") {
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let skyhold_testkit::Pair { primary, replica } =
        start_pair(base.path(), "skyhold", "sky").expect("replication running");
    sql(
        primary.port,
        "SET GLOBAL rpl_semi_sync_master_enabled = ON; SET GLOBAL rpl_semi_sync_master_wait_point = 'AFTER_SYNC'; \
         SET GLOBAL rpl_semi_sync_master_timeout = 60000;",
    )
    .unwrap();
    sql(replica.port, "SET GLOBAL rpl_semi_sync_slave_enabled = ON; STOP SLAVE IO_THREAD; START SLAVE IO_THREAD;")
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        sql(primary.port, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_status'").ok().filter(|s| s.ends_with("ON"))
    })
    .expect("semi-synchronous replication on");
    let s = Stack::start(&pair_props(primary.port, replica.port, ""), 2, 3);
    let st = s.db_status();
    assert!(st["endpoints"][0]["detail"].as_str().unwrap().contains("semi_sync=ON"), "{st}");

    let mut jobs = Vec::new();
    let mut primary = primary;
    let mut killed_at = None;
    for i in 0..16 {
        if i == 8 {
            primary.kill9();
            killed_at = Some(Instant::now());
            // The orchestrator promotes at once, after applying what the replica received.
            assert!(promote(replica.port, Duration::from_secs(5)).unwrap(), "relay log applied");
        }
        jobs.extend(s.submit(i, &format!("s{i}"), Duration::from_secs(30)));
    }
    // Nothing acknowledged was lost: every job id the client was given is on the new primary...
    let ids = jobs.iter().map(|j| format!("'{j}'")).collect::<Vec<_>>().join(",");
    let present = sql(replica.port, &format!("SELECT COUNT(*) FROM cloud.async_job WHERE id IN ({ids})")).unwrap();
    assert_eq!(present, jobs.len().to_string(), "acknowledged jobs lost at the failover");
    // ...and ends exactly once.
    for j in &jobs {
        let fin = s.finished(j);
        assert_eq!(fin["jobstatus"], 1, "{fin}");
    }
    eprintln!(
        "semi-sync replication: {} acknowledged jobs, 0 lost, last finished {:.2} s after the primary was killed",
        jobs.len(),
        killed_at.map(|k| k.elapsed().as_secs_f64()).unwrap_or_default()
    );
    s.check_ground_truth(replica.port, false);
    // The old primary returns as a replica of the new one.
    let how =
        reattach_as_replica(&mut primary, replica.port, Duration::from_secs(60)).expect("old primary re-attached");
    eprintln!("semi-sync replication: old primary back as a replica ({how:?})");
    let st = s.db_status();
    assert_eq!(st["endpoints"][0]["role"], "replica", "{st}");
    assert_eq!(st["endpoints"][1]["active"], true, "{st}");
    assert_eq!(st["endpoints"][0]["replication"]["condition"], "ok", "{st}");
}

#[test]
fn galera_failover_under_load() {
    if skip("galera") {
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let t0 = Instant::now();
    let mut galera = Galera::start(base.path(), 3).expect("3 Galera nodes Synced");
    sql(galera.nodes[0].port, "CREATE USER skyhold@'%' IDENTIFIED BY 'sky'; GRANT ALL ON *.* TO skyhold@'%';").unwrap();
    eprintln!("galera: 3 nodes Synced after {:.1} s", t0.elapsed().as_secs_f64());
    let hosts = galera.hosts();
    let s = Stack::start(
        &format!(
            "db.cloud.username=skyhold\ndb.cloud.password=sky\ndb.cloud.host={}\ndb.cloud.slaves={}\n\
             db.cloud.name=cloud\ndb.ha.enabled=true\ndb.ha.topology=galera\n",
            hosts[0],
            hosts[1..].join(",")
        ),
        2,
        3,
    );
    let st = s.db_status();
    let eps = st["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3, "{st}");
    assert!(eps.iter().all(|e| e["healthy"] == true && e["role"] == "galera" && e["cluster_size"] == 3), "{st}");
    assert_eq!(eps[0]["active"], true);

    // Load through both servers; the active node dies in the middle.
    let mut jobs = Vec::new();
    let mut killed_at = None;
    for i in 0..16 {
        if i == 8 {
            galera.nodes[0].kill9();
            killed_at = Some(Instant::now());
        }
        jobs.extend(s.submit(i, &format!("g{i}"), Duration::from_secs(30)));
    }
    // Every job the client was given ends exactly once.
    for j in &jobs {
        let fin = s.finished(j);
        assert_eq!(fin["jobstatus"], 1, "{fin}");
    }
    eprintln!(
        "galera: {} jobs all succeeded; last finished {:.2} s after the active node was killed",
        jobs.len(),
        killed_at.map(|k| k.elapsed().as_secs_f64()).unwrap_or_default()
    );
    let st = s.db_status();
    assert_eq!(st["endpoints"][0]["healthy"], false, "{st}");
    assert_eq!(st["endpoints"][1]["active"], true, "{st}");
    assert_eq!(st["endpoints"][1]["cluster_size"], 2, "{st}");
    assert!(s.logs().contains("database failover"), "the failover is logged");
    // Both servers recorded their move, and cluster status shows where each writes.
    let moved = wait_for(Duration::from_secs(10), || {
        let evs = s.events("DATABASE.FAILOVER");
        let by =
            |ms: &str| evs.iter().any(|e| e["description"].as_str().unwrap_or("").contains(&format!("server {ms} ")));
        (by("ms1") && by("ms2")).then_some(evs)
    })
    .expect("both servers' failovers are events");
    assert!(moved[0]["description"].as_str().unwrap().contains(&hosts[1]), "{}", moved[0]);
    let cs = s.run(&["cluster", "status", "--json"]);
    for srv in cs["servers"].as_array().unwrap() {
        assert!(srv["db_endpoint"].as_str().unwrap().contains(&hosts[1]), "{cs}");
    }
    s.check_ground_truth(galera.nodes[1].port, true);

    // The killed node rejoins (state transfer) and becomes the preferred node again.
    galera.rejoin(0, Duration::from_secs(90)).expect("node 1 rejoins");
    let back = wait_for(Duration::from_secs(20), || (s.db_status()["endpoints"][0]["active"] == true).then_some(()));
    assert!(back.is_some(), "node 1 healthy and preferred again");
    let count =
        sql(galera.nodes[0].port, "SET SESSION wsrep_sync_wait=1; SELECT COUNT(*) FROM cloud.vm_instance").unwrap();
    assert_eq!(count, jobs.len().to_string(), "the rejoined node has every VM");

    // A hung node (SIGSTOP), not a dead one: the servers move off it, work goes on, no server
    // declares another Down because of the shared stall.
    galera.nodes[0].sigstop().unwrap();
    let stopped = Instant::now();
    let mut hung_jobs = Vec::new();
    for i in 0..6 {
        hung_jobs.extend(s.submit(i, &format!("h{i}"), Duration::from_secs(40)));
    }
    for j in &hung_jobs {
        let fin = s.finished(j);
        assert_eq!(fin["jobstatus"], 1, "{fin}");
    }
    eprintln!(
        "galera: node hung (SIGSTOP): {} deploys accepted and finished within {:.2} s",
        hung_jobs.len(),
        stopped.elapsed().as_secs_f64()
    );
    let (_, ms) = s.call(0, "listManagementServers", &[]).or_else(|| s.call(1, "listManagementServers", &[])).unwrap();
    let states: Vec<String> = ms["listmanagementserversresponse"]["managementserver"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(states.iter().all(|s| s == "Up"), "no server declared another Down over a database stall: {states:?}");
    galera.nodes[0].sigcont().unwrap();
    s.check_ground_truth(galera.nodes[1].port, true);

    // Quorum lost: two of three nodes die at once, the survivor leaves the Primary component.
    // Skyhold must not write to it: a new server refuses to start and says why.
    galera.nodes[0].wait_synced(Duration::from_secs(60)).expect("node 1 back after the stall");
    galera.nodes[1].kill9();
    galera.nodes[2].kill9();
    wait_for(Duration::from_secs(30), || {
        sql(galera.nodes[0].port, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_status'")
            .ok()
            .filter(|v| v.ends_with("non-Primary"))
    })
    .expect("the survivor is non-Primary");
    let out = Command::new(BIN)
        .args(["server", "--data-dir", &s.d, "--db-properties", &s.p, "--bind", "127.0.0.1", "--ms-id", "ms9"])
        .args(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a server must not start on a non-Primary node: {err}");
    assert!(err.contains("no database endpoint is usable") && err.contains("component=non-Primary"), "{err}");
    assert!(err.contains("Synced in the Primary component"), "the message says what to do: {err}");
}

/// A hung replication primary (SIGSTOP, not dead) under load through two servers: the operator
/// promotes the replica, the servers move to it and every acknowledged job ends once. When the old
/// primary wakes up it is still writable but replicates from nobody (stale): Skyhold does not fail
/// back to it even after `secondsBeforeRetryMaster`, and nothing acknowledged is lost.
#[test]
fn replication_hung_primary_no_failback_to_stale_node() {
    if skip("mariadb") {
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let skyhold_testkit::Pair { primary, replica } =
        start_pair(base.path(), "skyhold", "sky").expect("replication running");
    let props = pair_props(primary.port, replica.port, "")
        .replace("db.cloud.secondsBeforeRetryMaster=3600", "db.cloud.secondsBeforeRetryMaster=1");
    let s = Stack::start(&props, 2, 2);
    let mut jobs = Vec::new();
    for i in 0..4 {
        jobs.extend(s.submit(i, &format!("before{i}"), Duration::from_secs(20)));
    }
    for j in &jobs {
        assert_eq!(s.finished(j)["jobstatus"], 1);
    }
    wait_caught_up(primary.port, replica.port, Duration::from_secs(20)).expect("replica caught up");
    let pid = nix::unistd::Pid::from_raw(primary.pid().expect("primary runs") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    assert!(promote(replica.port, Duration::from_secs(2)).unwrap(), "relay log applied");
    for i in 0..6 {
        jobs.extend(s.submit(i, &format!("after{i}"), Duration::from_secs(40)));
    }
    for j in &jobs {
        assert_eq!(s.finished(j)["jobstatus"], 1);
    }
    eprintln!("hung primary: {} jobs done, {:.1} s after the primary hung", jobs.len(), t0.elapsed().as_secs_f64());
    // The old primary wakes up: writable, replicating from nobody.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let woke = wait_for(Duration::from_secs(20), || {
        let st = s.db_status();
        (st["endpoints"][0]["healthy"] == true).then_some(st)
    })
    .expect("old primary answers again");
    assert_eq!(woke["endpoints"][0]["role"], "primary", "{woke}");
    // Several monitor rounds past secondsBeforeRetryMaster: the servers stay on the promoted node.
    let more = s.submit(0, "late", Duration::from_secs(20)).unwrap();
    assert_eq!(s.finished(&more)["jobstatus"], 1);
    let cs = s.run(&["cluster", "status", "--json"]);
    for srv in cs["servers"].as_array().unwrap() {
        assert!(
            srv["db_endpoint"].as_str().unwrap().contains(&format!(":{}/", replica.port)),
            "{cs}\n{}",
            s.logs().lines().filter(|l| l.contains("failover")).collect::<Vec<_>>().join("\n")
        );
    }
    let ids = jobs.iter().map(|j| format!("'{j}'")).collect::<Vec<_>>().join(",");
    let n = sql(replica.port, &format!("SELECT COUNT(*) FROM cloud.async_job WHERE id IN ({ids})")).unwrap();
    assert_eq!(n, jobs.len().to_string(), "every acknowledged job is on the node Skyhold writes to");
    assert_eq!(sql(primary.port, "SELECT COUNT(*) FROM cloud.vm_instance WHERE name='late'").unwrap(), "0");
    s.check_ground_truth(replica.port, false);
}
