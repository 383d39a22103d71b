//! The command line: `db init` refusals, key and id checks at server start, and the demo.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run skyhold")
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["demo", "--help"],
        &["server", "--help"],
        &["agent", "--help"],
        &["db", "init", "--help"],
        &["db", "migrate", "--help"],
        &["db", "status", "--help"],
        &["account", "create", "--help"],
    ] {
        let out = run(sub);
        assert!(out.status.success(), "{sub:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{sub:?}");
    }
}

#[test]
fn db_init_refuses_to_overwrite_and_status_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let first: Value = serde_json::from_str(&run_ok(&["db", "init", "--data-dir", d])).unwrap();
    assert!(first["admin"]["secretkey"].is_string());
    assert!(dir.path().join("key").exists());
    let again = run(&["db", "init", "--data-dir", d]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"), "{}", String::from_utf8_lossy(&again.stderr));
    let st: Value = serde_json::from_str(&run_ok(&["db", "status", "--data-dir", d])).unwrap();
    assert_eq!(st["initialized"], true);
    assert_eq!(st["up_to_date"], true);
    let second: Value = serde_json::from_str(&run_ok(&["db", "init", "--data-dir", d, "--force"])).unwrap();
    assert_ne!(first["admin"]["apikey"], second["admin"]["apikey"], "--force starts again");
    let m: Value = serde_json::from_str(&run_ok(&["db", "migrate", "--data-dir", d])).unwrap();
    assert_eq!(m["applied"], serde_json::json!([]));
    // Secrets are not stored in clear.
    let raw = std::fs::read(dir.path().join("skyhold.db")).unwrap();
    let secret = second["admin"]["secretkey"].as_str().unwrap();
    assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()), "API secret stored in clear");
    assert!(!raw.windows(8).any(|w| w == &second["admin"]["password"].as_str().unwrap().as_bytes()[..8]));
}

#[test]
fn server_refuses_wrong_key_missing_schema_and_duplicate_id() {
    let Some(c) = Cloud::start(Backend::Sqlite, 0) else { return };
    let d = c.dir.path().to_str().unwrap().to_string();
    // A second node with a different key file.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = run(&[
        "server",
        "--data-dir",
        other.path().to_str().unwrap(),
        "--db",
        &c.db_url,
        "--api-port",
        "0",
        "--agent-port",
        "0",
        "--cluster-port",
        "0",
        "--bind",
        "127.0.0.1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encryption key does not match the cluster's key: copy"), "{err}");
    // No key at all.
    let empty = tempfile::tempdir().unwrap();
    let out = run(&["server", "--data-dir", empty.path().to_str().unwrap(), "--db", &c.db_url]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("key file"), "{}", String::from_utf8_lossy(&out.stderr));
    // A database without schema.
    let out =
        run(&["server", "--data-dir", &d, "--db", &format!("sqlite://{}", empty.path().join("none.db").display())]);
    assert!(!out.status.success());
    // The same server id twice while the first is alive.
    let out = run(&[
        "server",
        "--data-dir",
        &d,
        "--db",
        &c.db_url,
        "--ms-id",
        "ms1",
        "--api-port",
        "0",
        "--agent-port",
        "0",
        "--cluster-port",
        "0",
        "--bind",
        "127.0.0.1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Management server id is not unique"), "{err}");
}

#[test]
fn demo_starts_serves_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let start = || {
        Command::new(BIN)
            .args([
                "demo",
                "--data-dir",
                d.to_str().unwrap(),
                "--hosts",
                "2",
                "--api-port",
                "0",
                "--agent-port",
                "0",
                "--cluster-port",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo")
    };
    let mut demo = start();
    let t0 = std::time::Instant::now();
    let info: Value = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(d.join("demo.json")).ok().and_then(|s| serde_json::from_str(&s).ok())
    })
    .expect("demo.json written");
    let ready_after = t0.elapsed();
    let procs = info["processes"].as_array().unwrap();
    assert_eq!(procs.iter().filter(|p| p["role"] == "server").count(), 1);
    assert_eq!(procs.iter().filter(|p| p["role"] == "agent").count(), 1);
    assert!(procs.iter().all(|p| p["pid"].as_u64().unwrap_or(0) > 0));
    assert!(d.join("agent.token").exists());
    let ini = std::fs::read_to_string(d.join("cloudstack.ini")).unwrap();
    assert!(ini.starts_with("[cloudstack]\nendpoint = http://127.0.0.1:"), "{ini}");
    let field = |k: &str| ini.lines().find_map(|l| l.strip_prefix(&format!("{k} = "))).unwrap().to_string();
    let who =
        Creds { api_key: field("key"), secret: field("secret"), username: "admin".into(), password: String::new() };
    let endpoint = field("endpoint");
    let call = |cmd: &str, p: &[(&str, &str)]| get(&format!("{endpoint}?{}", signed_query(&who, cmd, p)));
    let hosts = wait_for(Duration::from_secs(20), || {
        let (_, v) = call("listHosts", &[]);
        (v["listhostsresponse"]["count"] == 2).then_some(v)
    });
    assert!(hosts.is_some(), "the demo's 2 simulated hosts register");
    let (_, z) = call("listZones", &[]);
    let zone = z["listzonesresponse"]["zone"][0]["id"].as_str().unwrap().to_string();
    let (_, t) = call("listTemplates", &[("templatefilter", "featured")]);
    let tpl = t["listtemplatesresponse"]["template"][0]["id"].as_str().unwrap().to_string();
    let (_, o) = call("listServiceOfferings", &[]);
    let off = o["listserviceofferingsresponse"]["serviceoffering"][0]["id"].as_str().unwrap().to_string();
    let (st, r) = call(
        "deployVirtualMachine",
        &[("zoneid", &zone), ("templateid", &tpl), ("serviceofferingid", &off), ("name", "demo1")],
    );
    assert_eq!(st, 200, "{r}");
    let job = r["deployvirtualmachineresponse"]["jobid"].as_str().unwrap().to_string();
    let done = wait_for(Duration::from_secs(30), || {
        let (_, v) = call("queryAsyncJobResult", &[("jobid", &job)]);
        (v["queryasyncjobresultresponse"]["jobstatus"] != 0).then_some(v)
    })
    .expect("deploy finishes");
    assert_eq!(done["queryasyncjobresultresponse"]["jobresult"]["virtualmachine"]["state"], "Running");

    // Ctrl-C stops everything it started.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let st = wait_for(Duration::from_secs(40), || demo.try_wait().ok().flatten()).expect("demo stops on Ctrl-C");
    assert!(st.success());
    for p in procs {
        let pid = p["pid"].as_i64().unwrap() as i32;
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ");
        assert!(!alive, "child {pid} still running after the demo stopped");
    }

    // Started again on the same directory: same keys, the VM is still there.
    let mut demo = start();
    let again = wait_for(Duration::from_secs(30), || {
        let ini = std::fs::read_to_string(d.join("cloudstack.ini")).ok()?;
        let ep = ini.lines().find_map(|l| l.strip_prefix("endpoint = "))?;
        // The old endpoint may still be in the file for a moment: a refused connection is "not yet".
        let resp = ureq::get(&format!("{ep}?{}", signed_query(&who, "listVirtualMachines", &[]))).call().ok()?;
        resp.into_json::<Value>().ok()
    })
    .expect("demo restarts with the same keys");
    assert_eq!(again["listvirtualmachinesresponse"]["virtualmachine"][0]["name"], "demo1");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.id() as i32), nix::sys::signal::Signal::SIGINT);
    let _ = wait_for(Duration::from_secs(40), || demo.try_wait().ok().flatten());
    eprintln!("demo ready (demo.json written) after {:.2} s", ready_after.as_secs_f64());
}

#[test]
fn server_reads_its_config_file_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run_ok(&["db", "init", "--data-dir", d]);
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = \"{d}\"\nbind = \"127.0.0.1\"\napi_port = 0\nagent_port = 0\ncluster_port = 0\nms_id = \"from-file\"\n"),
    )
    .unwrap();
    let ports = dir.path().join("ports.json");
    let mut child = Command::new(BIN)
        .args(["server", "--config", cfg.to_str().unwrap(), "--ports-file", ports.to_str().unwrap()])
        .env("SKYHOLD_MS_ID", "from-env")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let v: Option<Value> = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str(&s).ok())
    });
    let _ = child.kill();
    let _ = child.wait();
    let v = v.expect("server started from its config file");
    assert_eq!(v["msid"], "from-env", "the environment wins over the file");
    assert!(v["api"].as_u64().unwrap() > 0);
    // A config file with an unknown key is refused with a clear message.
    std::fs::write(&cfg, "colour = \"blue\"\n").unwrap();
    let out = run(&["server", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn db_properties_keys_and_backup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // SQLite: backup is a consistent copy that opens as a Skyhold database.
    run_ok(&["db", "init", "--data-dir", d]);
    let out = dir.path().join("backup.db");
    run_ok(&["db", "backup", "--data-dir", d, "--out", out.to_str().unwrap()]);
    let st: Value = serde_json::from_str(&run_ok(&[
        "db",
        "status",
        "--data-dir",
        d,
        "--db",
        &format!("sqlite://{}", out.display()),
    ]))
    .unwrap();
    assert_eq!(st["initialized"], true, "{st}");
    let again = run(&["db", "backup", "--data-dir", d, "--out", out.to_str().unwrap()]);
    assert!(!again.status.success(), "never overwrite a backup");
    // keys show / encrypt.
    let k: Value = serde_json::from_str(&run_ok(&["keys", "show", "--data-dir", d])).unwrap();
    assert_eq!(k["matches_cluster"], true, "{k}");
    let enc = run_ok(&["keys", "encrypt", "--data-dir", d, "skyhold"]);
    assert!(enc.trim().starts_with("ENC(") && !enc.contains("skyhold"), "{enc}");

    // MariaDB through a CloudStack db.properties file with an ENC() password.
    let Ok(base) = std::env::var("SKYHOLD_TEST_MYSQL_URL") else {
        assert!(std::env::var_os("CI").is_none(), "SKYHOLD_TEST_MYSQL_URL must be set under CI");
        return;
    };
    let rest = base.trim_start_matches("mysql://");
    let (cred, hostport) = rest.rsplit_once('@').unwrap();
    let (user, pass) = cred.split_once(':').unwrap();
    let (host, port) = hostport.trim_end_matches('/').rsplit_once(':').unwrap();
    let enc_pass = run_ok(&["keys", "encrypt", "--data-dir", d, pass]).trim().to_string();
    let name = format!("p_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let props = dir.path().join("db.properties");
    std::fs::write(
        &props,
        format!(
            "db.cloud.username={user}\ndb.cloud.password={enc_pass}\ndb.cloud.host={host}\ndb.cloud.port={port}\n\
             db.cloud.name={name}\ndb.cloud.maxActive=20\ndb.ha.enabled=false\n"
        ),
    )
    .unwrap();
    // A second node directory with the same key (copied, as the seed says).
    let node2 = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("key"), node2.path().join("key")).unwrap();
    let n2 = node2.path().to_str().unwrap();
    let init: Value =
        serde_json::from_str(&run_ok(&["db", "init", "--data-dir", n2, "--db-properties", props.to_str().unwrap()]))
            .unwrap();
    assert!(init["database"].as_str().unwrap().starts_with("mysql://"), "{init}");
    let st: Value =
        serde_json::from_str(&run_ok(&["db", "status", "--data-dir", n2, "--db-properties", props.to_str().unwrap()]))
            .unwrap();
    assert_eq!(st["initialized"], true);
    let dump = node2.path().join("dump.sql");
    run_ok(&[
        "db",
        "backup",
        "--data-dir",
        n2,
        "--db-properties",
        props.to_str().unwrap(),
        "--out",
        dump.to_str().unwrap(),
    ]);
    let sql = std::fs::read_to_string(&dump).unwrap();
    assert!(sql.contains("CREATE TABLE `async_job`") && sql.contains("INSERT INTO `schema_version`"), "dump content");
    // A malformed file is refused, naming the key.
    std::fs::write(&props, "db.cloud.port=many\n").unwrap();
    let bad = run(&["db", "status", "--data-dir", n2, "--db-properties", props.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("db.cloud.port"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn demo_runs_on_mariadb() {
    let Ok(base) = std::env::var("SKYHOLD_TEST_MYSQL_URL") else {
        assert!(std::env::var_os("CI").is_none(), "SKYHOLD_TEST_MYSQL_URL must be set under CI");
        return;
    };
    let url = format!("{}/demo_{}", base.trim_end_matches('/'), &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let mut demo = Command::new(BIN)
        .args(["demo", "--data-dir", d.to_str().unwrap(), "--db", &url, "--hosts", "1"])
        .args(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ini = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(d.join("demo.json")).ok()?;
        std::fs::read_to_string(d.join("cloudstack.ini")).ok()
    })
    .expect("demo started on MariaDB");
    let field = |k: &str| ini.lines().find_map(|l| l.strip_prefix(&format!("{k} = "))).unwrap().to_string();
    let who =
        Creds { api_key: field("key"), secret: field("secret"), username: "admin".into(), password: String::new() };
    let endpoint = field("endpoint");
    let up = wait_for(Duration::from_secs(20), || {
        let (_, v) = get(&format!("{endpoint}?{}", signed_query(&who, "listHosts", &[])));
        (v["listhostsresponse"]["count"] == 1).then_some(())
    });
    assert!(up.is_some(), "the demo's host registered");
    let st: Value =
        serde_json::from_str(&run_ok(&["db", "status", "--data-dir", d.to_str().unwrap(), "--db", &url])).unwrap();
    assert_eq!(st["initialized"], true, "{st}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    assert!(wait_for(Duration::from_secs(40), || demo.try_wait().ok().flatten()).is_some(), "demo stops");
}

/// Start-up refusals on MariaDB, each with its message and what to check: a wrong password, an
/// unknown database, unreachable endpoints (one URL, or every endpoint of a db.properties), and a
/// schema newer than the binary (server and `db migrate`).
#[test]
fn server_refuses_bad_database_settings() {
    let Ok(base) = std::env::var("SKYHOLD_TEST_MYSQL_URL") else {
        assert!(std::env::var_os("CI").is_none(), "SKYHOLD_TEST_MYSQL_URL must be set under CI");
        return;
    };
    let base = base.trim_end_matches('/').to_string();
    let name = format!("refuse_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let url = format!("{base}/{name}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    run_ok(&["db", "init", "--data-dir", &d, "--db", &url]);
    let server = |db_args: &[&str]| -> String {
        let mut args = vec!["server", "--data-dir", &d, "--bind", "127.0.0.1"];
        args.extend(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0"]);
        args.extend(db_args);
        let out = run(&args);
        assert!(!out.status.success(), "the server must refuse to start: {args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // mysql://user:pass@host:port
    let (userpass, hostport) = base.trim_start_matches("mysql://").split_once('@').unwrap();
    let user = userpass.split(':').next().unwrap();
    let err = server(&["--db", &format!("mysql://{user}:wrong-password@{hostport}/{name}")]);
    assert!(err.contains("Access denied") && err.contains("hint: check the database user and password"), "{err}");
    assert_eq!(err.matches("Access denied").count(), 1, "the cause is said once: {err}");
    let err = server(&["--db", &format!("{base}/{name}_missing")]);
    assert!(err.contains("Unknown database") && err.contains("hint: check the database name"), "{err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let t0 = std::time::Instant::now();
    let err = server(&["--db", &format!("mysql://{userpass}@127.0.0.1:{dead_port}/{name}")]);
    assert!(err.contains("Connection refused") && err.contains("hint: check that the database server runs"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "refused at once, not after a pool timeout");
    let props = dir.path().join("db.properties");
    let (u, p) = userpass.split_once(':').unwrap();
    std::fs::write(
        &props,
        format!(
            "db.cloud.host=127.0.0.1:{dead_port}\ndb.cloud.slaves=127.0.0.1:{}\ndb.cloud.username={u}\n\
             db.cloud.password={p}\ndb.cloud.name={name}\ndb.ha.enabled=true\ndb.ha.topology=replication\n",
            dead_port.wrapping_add(1).max(1024)
        ),
    )
    .unwrap();
    let err = server(&["--db-properties", props.to_str().unwrap()]);
    assert!(err.contains("no database endpoint is usable") && err.contains("check that the servers run"), "{err}");
    // A schema written by a newer Skyhold.
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h", hostport.split(':').next().unwrap()])
        .arg(format!("-P{}", hostport.split(':').nth(1).unwrap_or("3306")))
        .arg(format!("-u{u}"))
        .arg(format!("-p{p}"))
        .arg("-e")
        .arg(format!("INSERT INTO {name}.schema_version (version, name, applied_ms) VALUES (999, 'future', 0)"))
        .output();
    let Ok(out) = out else {
        assert!(std::env::var_os("CI").is_none(), "the mariadb client must be installed under CI");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = server(&["--db", &url]);
    assert!(err.contains("schema is version 999, newer than this binary") && err.contains("upgrade Skyhold"), "{err}");
    let out = run(&["db", "migrate", "--data-dir", &d, "--db", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer than this Skyhold binary"), "{err}");
}
