//! Database HA: a real MariaDB primary/replica pair (GTID replication) started by the test, a
//! Skyhold server configured through a CloudStack db.properties listing both, and a failover.

mod common;
use common::*;
use skyhold_testkit::{Galera, Kids, fast_tmp, have_galera, have_mariadb, promote, sql, start_pair, wait_caught_up};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn replication_pair_failover() {
    if !have_mariadb() {
        assert!(std::env::var_os("CI").is_none(), "mariadbd must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: mariadbd not installed");
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    // The user reaches the replica through replication.
    let skyhold_testkit::Pair { primary, replica } =
        start_pair(base.path(), "skyhold", "sky").expect("replication running");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let props = dir.path().join("db.properties");
    std::fs::write(
        &props,
        format!(
            "db.cloud.username=skyhold\ndb.cloud.password=sky\ndb.cloud.host=127.0.0.1:{}\ndb.cloud.slaves=127.0.0.1:{}\n\
             db.cloud.name=cloud\ndb.ha.enabled=true\ndb.ha.topology=replication\ndb.cloud.secondsBeforeRetryMaster=3600\n",
            primary.port, replica.port
        ),
    )
    .unwrap();
    let p = props.to_str().unwrap().to_string();
    let init: serde_json::Value = serde_json::from_str(&run_ok(&[
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
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["db", "status", "--data-dir", &d, "--db-properties", &p])).unwrap();
    let eps = st["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "{st}");
    assert_eq!(eps[0]["role"], "primary", "{st}");
    assert_eq!(eps[1]["role"], "replica", "writes never go to a read-only replica: {st}");
    assert_eq!(eps[0]["active"], true);

    // A server and an agent on this database.
    let ports = dir.path().join("ms1.ports");
    let log = dir.path().join("ms1.log");
    let _server = Kids(vec![
        Command::new(BIN)
            .args(["server", "--data-dir", &d, "--db-properties", &p, "--bind", "127.0.0.1", "--ms-id", "ms1"])
            .args([
                "--api-port",
                "0",
                "--agent-port",
                "0",
                "--cluster-port",
                "0",
                "--ports-file",
                ports.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("ms1.err")).unwrap())
            .spawn()
            .unwrap(),
    ]);
    let pv: serde_json::Value = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str(&s).ok())
    })
    .expect("server up");
    let api = pv["api"].as_u64().unwrap();
    let agent_port = pv["agent"].as_u64().unwrap();
    let _agent = Kids(vec![
        Command::new(BIN)
            .args(["agent", "--mgmt", &format!("127.0.0.1:{agent_port}")])
            .arg(format!("--token={}", init["agent_token"].as_str().unwrap()))
            .args(["--simulator", "--hosts", "2", "--agent-id", "ha"])
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
    let base_url = format!("http://127.0.0.1:{api}/client/api");
    let call = |cmd: &str, params: &[(&str, &str)]| -> Option<(u16, serde_json::Value)> {
        let r = ureq::get(&format!("{base_url}?{}", signed_query(&admin, cmd, params))).call();
        match r {
            Ok(resp) => Some((resp.status(), resp.into_json().unwrap_or_default())),
            Err(ureq::Error::Status(st, resp)) => Some((st, resp.into_json().unwrap_or_default())),
            Err(_) => None,
        }
    };
    wait_for(Duration::from_secs(20), || {
        call("listHosts", &[]).filter(|(_, v)| v["listhostsresponse"]["count"] == 2).map(|_| ())
    })
    .expect("hosts up");
    let first_id = |cmd: &str, params: &[(&str, &str)], key: &str| -> String {
        let (_, v) = call(cmd, params).expect("answer");
        v[format!("{}response", cmd.to_lowercase())][key][0]["id"].as_str().expect("id").to_string()
    };
    let z = first_id("listZones", &[], "zone");
    let t = first_id("listTemplates", &[("templatefilter", "featured")], "template");
    let o = first_id("listServiceOfferings", &[], "serviceoffering");
    let deploy = |name: &str| -> String {
        let (st, v) = call(
            "deployVirtualMachine",
            &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", name)],
        )
        .unwrap();
        assert_eq!(st, 200, "{v}");
        let job = v["deployvirtualmachineresponse"]["jobid"].as_str().unwrap().to_string();
        wait_for(Duration::from_secs(30), || {
            call("queryAsyncJobResult", &[("jobid", &job)]).and_then(|(_, v)| {
                let j = v["queryasyncjobresultresponse"].clone();
                (j["jobstatus"] != 0).then_some(j)
            })
        })
        .map(|j| j["jobstatus"].to_string())
        .unwrap_or_default()
    };
    assert_eq!(deploy("before"), "1");
    // Wait until the replica has applied everything, then lose the primary and promote the replica.
    wait_caught_up(primary.port, replica.port, Duration::from_secs(20)).expect("replica caught up");
    let mut primary = primary;
    primary.kill9();
    let t0 = Instant::now();
    promote(replica.port, Duration::from_secs(1)).unwrap();
    // Skyhold follows the writable node: API calls work again, nothing acknowledged was lost.
    let back = wait_for(Duration::from_secs(30), || {
        call("listVirtualMachines", &[("name", "before")]).filter(|(st, _)| *st == 200).map(|(_, v)| v)
    })
    .expect("API answers after the failover");
    assert_eq!(back["listvirtualmachinesresponse"]["count"], 1, "the VM written before the failover survived");
    assert_eq!(deploy("after"), "1", "writes work on the new primary");
    eprintln!("replication failover: writes resumed {:.2} s after the primary died", t0.elapsed().as_secs_f64());
    let log_text = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("ms1.err")).unwrap_or_default();
    assert!(log_text.contains("database failover"), "the failover is logged");
    assert!(sql(replica.port, "SELECT COUNT(*) FROM cloud.vm_instance WHERE name='after'").unwrap() == "1");
    drop(replica);
}

#[test]
fn galera_failover_under_load() {
    if !have_galera() {
        assert!(std::env::var_os("CI").is_none(), "galera-4 and rsync must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: galera-4 or rsync not installed");
        return;
    }
    let base = tempfile::tempdir_in(fast_tmp()).unwrap();
    let t0 = Instant::now();
    let mut galera = Galera::start(base.path(), 3).expect("3 Galera nodes Synced");
    sql(galera.nodes[0].port, "CREATE USER skyhold@'%' IDENTIFIED BY 'sky'; GRANT ALL ON *.* TO skyhold@'%';").unwrap();
    eprintln!("galera: 3 nodes Synced after {:.1} s", t0.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let props = dir.path().join("db.properties");
    let hosts = galera.hosts();
    std::fs::write(
        &props,
        format!(
            "db.cloud.username=skyhold\ndb.cloud.password=sky\ndb.cloud.host={}\ndb.cloud.slaves={}\n\
             db.cloud.name=cloud\ndb.ha.enabled=true\ndb.ha.topology=galera\n",
            hosts[0],
            hosts[1..].join(",")
        ),
    )
    .unwrap();
    let p = props.to_str().unwrap().to_string();
    let init: serde_json::Value =
        serde_json::from_str(&run_ok(&["db", "init", "--seed", "--data-dir", &d, "--db-properties", &p])).unwrap();
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["db", "status", "--data-dir", &d, "--db-properties", &p])).unwrap();
    let eps = st["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3, "{st}");
    assert!(eps.iter().all(|e| e["healthy"] == true && e["role"] == "galera"), "{st}");
    assert_eq!(eps[0]["active"], true);

    // Two servers and an agent.
    let mut servers = Kids(Vec::new());
    let mut apis = Vec::new();
    let mut agent_addrs = Vec::new();
    for name in ["ms1", "ms2"] {
        let ports = dir.path().join(format!("{name}.ports"));
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["server", "--data-dir", &d, "--db-properties", &p, "--bind", "127.0.0.1", "--ms-id", name])
            .args([
                "--api-port",
                "0",
                "--agent-port",
                "0",
                "--cluster-port",
                "0",
                "--ports-file",
                ports.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        servers.0.push(child);
        let pv: serde_json::Value = wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str(&s).ok())
        })
        .expect("server up");
        apis.push(format!("http://127.0.0.1:{}/client/api", pv["api"]));
        agent_addrs.push(format!("127.0.0.1:{}", pv["agent"]));
    }
    let _agent = Kids(vec![
        Command::new(BIN)
            .args(["agent", "--mgmt", &agent_addrs.join(",")])
            .arg(format!("--token={}", init["agent_token"].as_str().unwrap()))
            .args(["--simulator", "--hosts", "3", "--agent-id", "gal"])
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
        password: String::new(),
    };
    let call = |i: usize, cmd: &str, params: &[(&str, &str)]| -> Option<(u16, serde_json::Value)> {
        let r = ureq::get(&format!("{}?{}", apis[i % 2], signed_query(&admin, cmd, params))).call();
        match r {
            Ok(resp) => Some((resp.status(), resp.into_json().unwrap_or_default())),
            Err(ureq::Error::Status(st, resp)) => Some((st, resp.into_json().unwrap_or_default())),
            Err(_) => None,
        }
    };
    wait_for(Duration::from_secs(30), || {
        call(0, "listHosts", &[]).filter(|(_, v)| v["listhostsresponse"]["count"] == 3).map(|_| ())
    })
    .expect("hosts up");
    let first_id = |cmd: &str, params: &[(&str, &str)], key: &str| -> String {
        let (_, v) = call(0, cmd, params).expect("answer");
        v[format!("{}response", cmd.to_lowercase())][key][0]["id"].as_str().expect("id").to_string()
    };
    let z = first_id("listZones", &[], "zone");
    let t = first_id("listTemplates", &[("templatefilter", "featured")], "template");
    let o = first_id("listServiceOfferings", &[], "serviceoffering");
    // Deploy through server `i`, retrying on the other one when a call fails outright; the job id.
    let submit = |i: usize, name: &str, within: Duration| -> Option<String> {
        let params =
            [("zoneid", z.as_str()), ("templateid", t.as_str()), ("serviceofferingid", o.as_str()), ("name", name)];
        wait_for(within, || {
            let (st, v) =
                call(i, "deployVirtualMachine", &params).or_else(|| call(i + 1, "deployVirtualMachine", &params))?;
            if st == 200 {
                return v["deployvirtualmachineresponse"]["jobid"].as_str().map(str::to_string);
            }
            // A refused duplicate name means an earlier attempt was accepted.
            assert!(st == 530 || st == 503 || (st == 431 && v.to_string().contains("already exists")), "{st} {v}");
            None
        })
    };
    // Wait for a job's final state, asking either server.
    let finished = |j: &str| -> serde_json::Value {
        wait_for(Duration::from_secs(60), || {
            call(0, "queryAsyncJobResult", &[("jobid", j)])
                .or_else(|| call(1, "queryAsyncJobResult", &[("jobid", j)]))
                .and_then(|(_, v)| {
                    let q = v["queryasyncjobresultresponse"].clone();
                    (q["jobstatus"] != 0 && !q["jobstatus"].is_null()).then_some(q)
                })
        })
        .unwrap_or_else(|| panic!("job {j} finished"))
    };
    // Load through both servers; the active node dies in the middle.
    let mut jobs = Vec::new();
    let mut killed_at = None;
    for i in 0..16 {
        if i == 8 {
            galera.nodes[0].kill9();
            killed_at = Some(Instant::now());
        }
        let name = format!("g{i}");
        let r = submit(i, &name, Duration::from_secs(30));
        if let Some(j) = r {
            jobs.push(j);
        }
    }
    // Every job the client was given ends exactly once.
    for j in &jobs {
        let fin = finished(j);
        assert_eq!(fin["jobstatus"], 1, "{fin}");
    }
    eprintln!(
        "galera: {} jobs all succeeded; last finished {:.2} s after the active node was killed",
        jobs.len(),
        killed_at.map(|k| k.elapsed().as_secs_f64()).unwrap_or_default()
    );
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["db", "status", "--data-dir", &d, "--db-properties", &p])).unwrap();
    assert_eq!(st["endpoints"][0]["healthy"], false, "{st}");
    assert_eq!(st["endpoints"][1]["active"], true, "{st}");
    let logs = std::fs::read_to_string(dir.path().join("ms1.log")).unwrap_or_default();
    assert!(logs.contains("database failover"), "ms1 logged its failover");
    // The killed node rejoins (state transfer) and becomes the preferred node again.
    galera.rejoin(0, Duration::from_secs(90)).expect("node 1 rejoins");
    let n0 = &galera.nodes[0];
    let back = wait_for(Duration::from_secs(20), || {
        let st: serde_json::Value =
            serde_json::from_str(&run_ok(&["db", "status", "--data-dir", &d, "--db-properties", &p])).ok()?;
        (st["endpoints"][0]["healthy"] == true).then_some(())
    });
    assert!(back.is_some(), "node 1 healthy again");
    let count = sql(n0.port, "SET SESSION wsrep_sync_wait=1; SELECT COUNT(*) FROM cloud.vm_instance").unwrap();
    assert_eq!(count, jobs.len().to_string(), "the rejoined node has every VM");

    // A hung node (SIGSTOP), not a dead one: the servers move off it, work goes on, no server
    // declares another Down because of the shared stall.
    let ms_active_first = wait_for(Duration::from_secs(20), || {
        let st: serde_json::Value =
            serde_json::from_str(&run_ok(&["db", "status", "--data-dir", &d, "--db-properties", &p])).ok()?;
        (st["endpoints"][0]["active"] == true).then_some(())
    });
    assert!(ms_active_first.is_some(), "the preferred node is active again");
    galera.nodes[0].sigstop().unwrap();
    let stopped = Instant::now();
    let mut hung_jobs = Vec::new();
    for i in 0..6 {
        let name = format!("h{i}");
        let j = submit(i, &name, Duration::from_secs(40));
        hung_jobs.extend(j);
    }
    for j in &hung_jobs {
        let fin = finished(j);
        assert_eq!(fin["jobstatus"], 1, "{fin}");
    }
    eprintln!(
        "galera: node hung (SIGSTOP): {} deploys accepted and finished within {:.2} s",
        hung_jobs.len(),
        stopped.elapsed().as_secs_f64()
    );
    let (_, ms) = call(0, "listManagementServers", &[]).or_else(|| call(1, "listManagementServers", &[])).unwrap();
    let states: Vec<String> = ms["listmanagementserversresponse"]["managementserver"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(states.iter().all(|s| s == "Up"), "no server declared another Down over a database stall: {states:?}");
    galera.nodes[0].sigcont().unwrap();
}
