//! Cluster-wide encryption key rotation (`skyhold keys rotate`) while the servers keep serving.
//! Both backends: SQLite (a file shared by two local servers) and MariaDB.

mod common;

use common::*;
use serde_json::Value;
use skyhold_db::crypto::KeyRing;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().expect("run skyhold")
}

fn ring(p: &Path) -> KeyRing {
    KeyRing::load(p).unwrap_or_else(|e| panic!("load {}: {e}", p.display()))
}

/// What the database holds: the cluster key's fingerprint, every user's encrypted API secret
/// (user id, ciphertext), the encrypted cluster secret.
struct Stored {
    fingerprint: Option<String>,
    secrets: Vec<(String, String)>,
    cluster_secret: String,
}

fn stored(url: &str) -> Stored {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let db = skyhold_db::Db::connect(&skyhold_db::DbConfig { url: url.into(), max_connections: 1, create: false })
            .await
            .expect("connect");
        let mut c = db.conn().await.expect("conn");
        let s = Stored {
            fingerprint: skyhold_db::config::meta_get(&mut c, "key_fingerprint").await.expect("fp"),
            secrets: skyhold_db::secrets::user_secret_list(&mut c).await.expect("secrets"),
            cluster_secret: skyhold_db::config::meta_get(&mut c, "cluster_secret").await.expect("cs").expect("cs"),
        };
        drop(c);
        db.close().await;
        s
    })
}

/// A signed call that never panics: `Err` for a transport failure or a non-200 answer.
fn call(base: &str, who: &Creds, cmd: &str) -> Result<(), String> {
    let q = signed_query(who, cmd, &[]);
    match ureq::get(&format!("{base}?{q}")).timeout(Duration::from_secs(10)).call() {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("{cmd} on {base}: HTTP {}", r.status())),
        Err(ureq::Error::Status(st, r)) => {
            Err(format!("{cmd} on {base}: HTTP {st}: {}", r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(format!("{cmd} on {base}: {e}")),
    }
}

/// Clients that keep calling every server until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(bases: Vec<String>, who: Vec<Creds>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = bases
            .into_iter()
            .map(|base| {
                let (stop, calls, failures, who) = (stop.clone(), calls.clone(), failures.clone(), who.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        for (w, cmd) in who.iter().zip(["listZones", "listVirtualMachines"].iter().cycle()) {
                            if let Err(e) = call(&base, w, cmd) {
                                failures.lock().expect("lock").push(e);
                            }
                            calls.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load { stop, calls, failures, threads }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let f = self.failures.lock().expect("lock").clone();
        (self.calls.load(Ordering::SeqCst), f)
    }
}

fn keys_cmd(dir: &str, url: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["keys"];
    a.extend_from_slice(&args[..1]);
    a.extend_from_slice(&["--data-dir", dir, "--db", url]);
    a.extend_from_slice(&args[1..]);
    run(&a)
}

fn keys_ok(dir: &str, url: &str, args: &[&str]) -> Value {
    let out = keys_cmd(dir, url, args);
    assert!(out.status.success(), "skyhold keys {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("keys prints JSON")
}

/// Two servers (each with its own key file: ms1 shares the CLI's DATA_DIR/key, ms2 has
/// ms2.key), clients calling both all along; `keys rotate` must not fail a single call.
fn rotation_under_load(backend: Backend) {
    let Some(mut c) = Cloud::start(backend, 1) else { return };
    let d = c.dir.path().to_path_buf();
    let ds = d.to_str().expect("utf8").to_string();
    let (key1, key_ms2, old) = (d.join("key"), d.join("ms2.key"), d.join("old.key"));
    std::fs::copy(&key1, &key_ms2).expect("copy key");
    std::fs::copy(&key1, &old).expect("copy key");
    let ms2_env = [("SKYHOLD_KEY_FILE", key_ms2.to_str().expect("utf8"))];
    c.start_server_env("ms2", &ms2_env);
    let alice = c.create_user("alice");
    let k1 = ring(&key1).primary().clone();
    let before = stored(&c.db_url);
    assert_eq!(before.fingerprint.as_deref(), Some(k1.fingerprint().as_str()));

    let load = Load::start(vec![c.base_of(0), c.base_of(1)], vec![alice.clone(), c.admin.clone()]);
    wait_for(Duration::from_secs(20), || (load.calls() >= 20).then_some(())).expect("clients are calling");
    let calls_before = load.calls();
    let t0 = Instant::now();
    let v = keys_ok(&ds, &c.db_url, &["rotate", "--wait", "60"]);
    let took = t0.elapsed();
    let calls_during = load.calls() - calls_before;
    let k2fp = v["fingerprint"].as_str().expect("fingerprint").to_string();
    assert_ne!(k2fp, k1.fingerprint());
    assert_eq!(v["previous_fingerprint"], k1.fingerprint(), "{v}");
    let acked: Vec<&str> = v["acknowledged_by"].as_array().expect("acks").iter().filter_map(|x| x.as_str()).collect();
    assert!(acked.contains(&"ms1") && acked.contains(&"ms2"), "{v}");
    assert_eq!(v["reencrypted_api_secrets"], 2, "admin and alice: {v}");

    // Every server makes the new key its primary and keeps the old one: [K2, K1].
    let want = vec![k2fp.clone(), k1.fingerprint()];
    let promoted = wait_for(Duration::from_secs(15), || {
        (ring(&key1).fingerprints() == want && ring(&key_ms2).fingerprints() == want).then_some(())
    });
    let (calls, failures) = load.finish();
    eprintln!(
        "rotation with 2 servers took {} ms; {calls_during} signed calls during it, {calls} in all, {} failures",
        took.as_millis(),
        failures.len()
    );
    assert!(failures.is_empty(), "calls failed during the rotation: {failures:?}");
    assert!(calls_during > 0, "no call ran during the rotation");
    promoted.unwrap_or_else(|| {
        panic!("key files not [K2, K1]: {:?} {:?}", ring(&key1).fingerprints(), ring(&key_ms2).fingerprints())
    });

    // The database: fingerprint K2; every secret is v2 under K2, opens with K2 only.
    let k2 = ring(&key1).primary().clone();
    assert_eq!(k2.fingerprint(), k2fp);
    let after = stored(&c.db_url);
    assert_eq!(after.fingerprint.as_deref(), Some(k2fp.as_str()));
    let only_k2 = KeyRing::new(k2.clone());
    let only_k1 = KeyRing::new(k1.clone());
    let prefix = format!("v2:{k2fp}:");
    assert_eq!(after.secrets.len(), 2);
    for (_, enc) in after.secrets.iter().chain([(String::new(), after.cluster_secret.clone())].iter()) {
        assert!(enc.starts_with(&prefix), "{enc}");
        assert!(only_k2.decrypt(enc).is_ok() && only_k1.decrypt(enc).is_err(), "{enc}");
    }
    let plain: Vec<String> = after.secrets.iter().map(|(_, e)| only_k2.decrypt(e).expect("decrypt")).collect();
    assert!(plain.contains(&alice.secret) && plain.contains(&c.admin.secret), "same secrets, new ciphertexts");
    let old_plain = KeyRing::new(k1.clone()).decrypt(&before.cluster_secret).expect("old cluster secret");
    assert_eq!(only_k2.decrypt(&after.cluster_secret).expect("cluster secret"), old_plain);

    // Events and `keys show`.
    for ty in ["KEY.ROTATE.STAGED", "KEY.ROTATE.DONE"] {
        let ev = c.ok("listEvents", &[("type", ty)]);
        assert!(ev["count"].as_i64().unwrap_or(0) >= 1, "{ty}: {ev}");
    }
    let show = keys_ok(&ds, &c.db_url, &["show"]);
    assert_eq!(show["matches_cluster"], true, "{show}");
    assert_eq!(show["keys"][0]["fingerprint"], k2fp.as_str());
    assert_eq!(show["keys"][0]["role"], "primary");
    assert_eq!(show["keys"][1]["fingerprint"], k1.fingerprint());
    assert_eq!(show["keys"][1]["role"], "retired");
    assert_eq!(show["rotation"]["previous_fingerprint"], k1.fingerprint());
    assert_eq!(show["rotation"]["staged"], Value::Null);

    // Work goes on: a deploy, and calls on both servers.
    let (_, job) = c.deploy("after-rotation", "Small Instance", &[]);
    assert_eq!(job["jobstatus"], 1, "{job}");
    for i in 0..2 {
        call(&c.base_of(i), &alice, "listVirtualMachines").expect("call after rotation");
    }

    // A server restarted with its new key file starts; after forget-retired it holds K2 only
    // and still starts.
    c.restart_server(1, &ms2_env);
    call(&c.base_of(1), &alice, "listZones").expect("restarted server serves");
    // A ring holding the cluster's key as a retired key: promoted at start, not refused.
    c.kill9_server(1);
    KeyRing::from_keys(vec![k1.clone(), k2.clone()]).expect("ring").save(&key_ms2).expect("save");
    c.restart_server(1, &ms2_env);
    assert_eq!(ring(&key_ms2).fingerprints(), want, "promoted at start");
    call(&c.base_of(1), &alice, "listZones").expect("server with [K1, K2] serves");
    let out = keys_ok(&ds, &c.db_url, &["forget-retired", "--key-file", key_ms2.to_str().expect("utf8")]);
    assert_eq!(out["dropped"][0], k1.fingerprint(), "{out}");
    assert_eq!(ring(&key_ms2).fingerprints(), vec![k2fp.clone()]);
    c.restart_server(1, &ms2_env);
    call(&c.base_of(1), &alice, "listZones").expect("server with K2 only serves");

    // A server with a copy of the old key file is refused, and told when the key was rotated.
    let other = tempfile::tempdir().expect("tempdir");
    let out = run(&[
        "server",
        "--data-dir",
        other.path().to_str().expect("utf8"),
        "--key-file",
        old.to_str().expect("utf8"),
        "--db",
        &c.db_url,
        "--ms-id",
        "ms3",
        "--bind",
        "127.0.0.1",
        "--api-port",
        "0",
        "--agent-port",
        "0",
        "--cluster-port",
        "0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encryption key does not match the cluster's key: copy"), "{err}");
    assert!(err.contains("rotated at"), "{err}");
}

/// A server that does not acknowledge (SIGSTOPped) holds the rotation: `rotate` names it and
/// leaves the key staged, nothing re-encrypted; once it runs again, `rotate` continues.
fn rotation_waits_for_every_server(backend: Backend) {
    let Some(mut c) = Cloud::start(backend, 0) else { return };
    let d = c.dir.path().to_path_buf();
    let ds = d.to_str().expect("utf8").to_string();
    // ms2 starts with this threshold, so it will not declare the stopped ms1 Down meanwhile.
    c.ok("updateConfiguration", &[("name", "cluster.heartbeat.threshold"), ("value", "120000")]);
    let key_ms2: PathBuf = d.join("ms2.key");
    std::fs::copy(d.join("key"), &key_ms2).expect("copy key");
    let ms2_env = [("SKYHOLD_KEY_FILE", key_ms2.to_str().expect("utf8"))];
    c.start_server_env("ms2", &ms2_env);
    let k1 = ring(&d.join("key")).primary().fingerprint();
    // A stopped process may self-fence when it resumes (an ERROR line, expected here).
    c.allow_error_logs = true;
    let ms1 = nix::unistd::Pid::from_raw(c.servers[0].0.pid());
    nix::sys::signal::kill(ms1, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");

    let t0 = Instant::now();
    let out = keys_cmd(&ds, &c.db_url, &["rotate", "--wait", "5"]);
    if out.status.success() {
        let _ = nix::sys::signal::kill(ms1, nix::sys::signal::Signal::SIGCONT);
        panic!("rotate must not finish without ms1");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not acknowledge") && err.contains("ms1 (Up"), "{err}");
    assert!(!err.contains("ms2 ("), "ms2 acknowledged: {err}");
    assert!(err.contains("stays staged"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "bounded by --wait");
    let st = stored(&c.db_url);
    assert_eq!(st.fingerprint.as_deref(), Some(k1.as_str()), "nothing committed");
    assert!(st.secrets.iter().all(|(_, e)| e.starts_with(&format!("v2:{k1}:"))), "nothing re-encrypted");
    let show = keys_ok(&ds, &c.db_url, &["show"]);
    let staged = show["rotation"]["staged"].as_str().expect("staged").to_string();
    assert_eq!(show["rotation"]["acknowledged_by"], serde_json::json!(["ms2"]), "{show}");
    // ms2 already holds the staged key, still as a decrypt-only key.
    assert_eq!(ring(&key_ms2).fingerprints(), vec![k1.clone(), staged.clone()]);
    nix::sys::signal::kill(ms1, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");

    // ms1 runs again: the same rotation continues and completes.
    let v = keys_ok(&ds, &c.db_url, &["rotate", "--wait", "60"]);
    assert_eq!(v["fingerprint"], staged.as_str(), "continued, not restarted: {v}");
    assert_eq!(stored(&c.db_url).fingerprint.as_deref(), Some(staged.as_str()));
    call(&c.base_of(0), &c.admin, "listZones").expect("ms1 serves after the rotation");
    call(&c.base_of(1), &c.admin, "listZones").expect("ms2 serves after the rotation");
    let log = std::fs::read_to_string(&c.servers[1].0.log).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ms2 logged errors: {errors:?}");
}

#[test]
fn rotation_under_load_sqlite() {
    rotation_under_load(Backend::Sqlite);
}

#[test]
fn rotation_under_load_mariadb() {
    rotation_under_load(Backend::MySql);
}

#[test]
fn rotation_waits_for_every_server_sqlite() {
    rotation_waits_for_every_server(Backend::Sqlite);
}

#[test]
fn rotation_waits_for_every_server_mariadb() {
    rotation_waits_for_every_server(Backend::MySql);
}
