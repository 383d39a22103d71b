//! Database HA: a real MariaDB primary/replica pair (GTID replication) started by the test, a
//! Skyhold server configured through a CloudStack db.properties listing both, and a failover.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Mdb {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Drop for Mdb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sql(port: u16, q: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", &format!("-P{port}"), "-uroot", "-N", "-B", "-e", q])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn start_mdb(base: &Path, name: &str, server_id: u32, read_only: bool) -> Option<Mdb> {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new("mariadb-install-db")
        .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
        .arg(format!("--datadir={}", dir.join("data").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    assert!(st.success(), "mariadb-install-db");
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new("mariadbd")
            .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-name-resolve"])
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("err.log").display()))
            .args(["--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2", "--max-connections=500"])
            .args(["--log-bin=mysql-bin", "--binlog-format=ROW", "--log-slave-updates=1", "--gtid-strict-mode=1"])
            .arg(format!("--server-id={server_id}"))
            .arg(format!("--read-only={}", if read_only { 1 } else { 0 }))
            .args(["--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let up = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            sql(port, "select 1").ok().map(|_| true)
        });
        if up == Some(true) {
            return Some(Mdb { child, port, _dir: dir });
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

#[test]
fn replication_pair_failover() {
    if Command::new("mariadbd").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "mariadbd must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: mariadbd not installed");
        return;
    }
    let base = tempfile::tempdir_in(if Path::new("/dev/shm").exists() { "/dev/shm" } else { "/tmp" }).unwrap();
    let primary = start_mdb(base.path(), "p1", 1, false).expect("primary");
    let replica = start_mdb(base.path(), "r1", 2, true).expect("replica");
    sql(primary.port, "CREATE USER repl@'%' IDENTIFIED BY 'replpw'; GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO repl@'%'; CREATE USER skyhold@'%' IDENTIFIED BY 'sky'; GRANT ALL ON *.* TO skyhold@'%';").unwrap();
    sql(
        replica.port,
        &format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='repl', MASTER_PASSWORD='replpw', \
             MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE;",
            primary.port
        ),
    )
    .unwrap();
    // The user reaches the replica through replication.
    wait_for(Duration::from_secs(20), || {
        sql(replica.port, "SELECT COUNT(*) FROM mysql.user WHERE user='skyhold'").ok().filter(|n| n == "1")
    })
    .expect("replication running");

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
    let mut server = Command::new(BIN)
        .args(["server", "--data-dir", &d, "--db-properties", &p, "--bind", "127.0.0.1", "--ms-id", "ms1"])
        .args(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0", "--ports-file", ports.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("ms1.err")).unwrap())
        .spawn()
        .unwrap();
    let pv: serde_json::Value = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str(&s).ok())
    })
    .expect("server up");
    let api = pv["api"].as_u64().unwrap();
    let agent_port = pv["agent"].as_u64().unwrap();
    let mut agent = Command::new(BIN)
        .args(["agent", "--mgmt", &format!("127.0.0.1:{agent_port}")])
        .arg(format!("--token={}", init["agent_token"].as_str().unwrap()))
        .args(["--simulator", "--hosts", "2", "--agent-id", "ha"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    let gtid = sql(primary.port, "SELECT @@gtid_binlog_pos").unwrap();
    wait_for(Duration::from_secs(20), || {
        sql(replica.port, &format!("SELECT MASTER_GTID_WAIT('{gtid}', 1)")).ok().filter(|r| r == "0")
    })
    .expect("replica caught up");
    let mut primary = primary;
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    let t0 = Instant::now();
    sql(replica.port, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;").unwrap();
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
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = server.kill();
    let _ = server.wait();
    drop(replica);
}
