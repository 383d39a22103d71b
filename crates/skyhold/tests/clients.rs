//! The real CloudStack clients against the real `skyhold` binary: `cs` (PyPI, Python 3) and
//! `cloudmonkey` 5.3.3.1 (Python 2.7), both unchanged. `scripts/test.sh` installs them and names
//! them in `SKYHOLD_TEST_CS` and `SKYHOLD_TEST_CLOUDMONKEY`. Without those variables the tests are
//! skipped locally and fail under CI (`CI` set). See `docs/client-notes.md` for the client
//! behaviours these tests rely on.
//!
//! Every client runs with a cleared environment, `HOME` and the working directory in a temp dir of
//! the test's own cloud, so nothing is read from or written to the user's `~/.cloudstack.ini` or
//! `~/.cloudmonkey`. A client that runs longer than [`CLIENT_TIMEOUT`] is killed and the test fails.
//! With `SKYHOLD_TEST_CLIENT_TRACE` set, every client run (exit code, stdout, stderr) is printed.
mod common;
use common::*;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for one client invocation (a hang fails the test instead of blocking CI).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

const OFFERING: &str = "Small Instance";

/// The client named by `var`, or `None` (skip) when it is not set outside CI.
fn client_path(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(p.exists(), "{var}={} does not exist", p.display());
            Some(p)
        }
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("{var} is not set under CI: scripts/test.sh must install the clients");
            }
            eprintln!("skipping client test: {var} is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// The outcome of one client invocation.
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics (with the whole output) unless the client exited 0.
    fn assert_ok(&self) -> &Self {
        assert!(self.success(), "{} failed: {self}", self.what);
        self
    }

    /// The first JSON object printed on stdout (output before the first `{`, such as
    /// cloudmonkey's spinner, and after the object is ignored).
    fn json(&self) -> Value {
        first_json(&self.stdout).unwrap_or_else(|| panic!("{}: no JSON object on stdout: {self}", self.what))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }
}

fn first_json(s: &str) -> Option<Value> {
    let start = s.find('{')?;
    serde_json::Deserializer::from_str(&s[start..]).into_iter::<Value>().next()?.ok()
}

/// Run a client with a clean environment (only `PATH`, `HOME`, locale and `extra_env`), `HOME`
/// as working directory, no stdin, and a hard time limit.
fn run_client(bin: &Path, home: &Path, extra_env: &[(&str, String)], args: &[&str]) -> Run {
    let what = format!("{} {}", bin.file_name().and_then(|n| n.to_str()).unwrap_or("client"), args.join(" "));
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("PYTHONIOENCODING", "utf-8")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout pipe")));
    let err = drain(Box::new(child.stderr.take().expect("stderr pipe")));
    let end = Instant::now() + CLIENT_TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait().expect("wait for client") {
            break (Some(st), false);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            break (child.wait().ok(), true);
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let run = Run {
        what,
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    assert!(!timed_out, "{} did not finish within {CLIENT_TIMEOUT:?}: {run}", run.what);
    if std::env::var_os("SKYHOLD_TEST_CLIENT_TRACE").is_some() {
        eprintln!("==== {}: {run}", run.what);
    }
    run
}

/// Remove ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// cs
// ------------------------------------------------------------------------------------------------

/// `cs` with its own HOME and a `cloudstack.ini` in the format `skyhold demo` writes, named by
/// `CLOUDSTACK_CONFIG`.
struct Cs {
    bin: PathBuf,
    home: PathBuf,
    ini: PathBuf,
}

impl Cs {
    fn new(c: &Cloud, name: &str, key: &str, secret: &str) -> Option<Cs> {
        let bin = client_path("SKYHOLD_TEST_CS")?;
        let home = c.path(name);
        std::fs::create_dir_all(&home).expect("cs home");
        let ini = home.join("cloudstack.ini");
        // Exactly what `skyhold demo` writes (crates/skyhold/src/demo.rs).
        let text = format!("[cloudstack]\nendpoint = {}\nkey = {key}\nsecret = {secret}\n", c.base());
        std::fs::write(&ini, text).expect("write cloudstack.ini");
        Some(Cs { bin, home, ini })
    }

    /// `cs [--post] COMMAND k=v ...`. Polling: every 0.2 s (instead of 2 s), at most 90 s per job;
    /// both come from the environment, which `cs` uses as defaults under the ini values.
    fn run(&self, post: bool, command: &str, params: &[(&str, &str)]) -> Run {
        let kv: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args: Vec<&str> = Vec::new();
        if post {
            args.push("--post");
        }
        args.push(command);
        args.extend(kv.iter().map(String::as_str));
        let env = [
            ("CLOUDSTACK_CONFIG", self.ini.display().to_string()),
            ("CLOUDSTACK_POLL_INTERVAL", "0.2".to_string()),
            ("CLOUDSTACK_JOB_TIMEOUT", "90".to_string()),
            ("CLOUDSTACK_TIMEOUT", "30".to_string()),
        ];
        run_client(&self.bin, &self.home, &env, &args)
    }

    /// Run, assert exit 0 and return the printed JSON.
    fn ok(&self, post: bool, command: &str, params: &[(&str, &str)]) -> Value {
        self.run(post, command, params).assert_ok().json()
    }
}

/// The VMs that `cs listVirtualMachines [id=..]` prints (an empty answer prints nothing).
fn cs_list_vms(cs: &Cs, post: bool, params: &[(&str, &str)]) -> Vec<Value> {
    let r = cs.run(post, "listVirtualMachines", params);
    r.assert_ok();
    if r.stdout.trim().is_empty() {
        return Vec::new();
    }
    let v = r.json();
    match &v["virtualmachine"] {
        Value::Array(a) => a.clone(),
        Value::Null => Vec::new(),
        other => panic!("listVirtualMachines: virtualmachine is not a list: {other}"),
    }
}

fn cs_vm(cs: &Cs, post: bool, id: &str) -> Value {
    let vms = cs_list_vms(cs, post, &[("id", id)]);
    assert_eq!(vms.len(), 1, "listVirtualMachines id={id}: {vms:?}");
    assert_eq!(vms[0]["id"], id);
    vms[0].clone()
}

/// Deploy, stop, start, reboot and expunge one VM with `cs`, checking every state.
fn cs_lifecycle(c: &Cloud, post: bool) {
    let Some(cs) = Cs::new(c, "cs-home", &c.admin.api_key, &c.admin.secret) else {
        return;
    };
    let (z, t, o) = c.ids(OFFERING);
    let name = if post { "cs-post-1" } else { "cs-get-1" };

    // cs polls queryAsyncJobResult itself and prints only the job result.
    let deployed = cs.ok(
        post,
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", name)],
    );
    let vm = &deployed["virtualmachine"];
    assert_eq!(vm["state"], "Running", "deploy result: {deployed}");
    assert_eq!(vm["name"], name, "deploy result: {deployed}");
    let id = vm["id"].as_str().expect("vm id").to_string();

    let listed = cs_vm(&cs, post, &id);
    assert_eq!(listed["state"], "Running", "{listed}");
    assert_eq!(listed["name"], name, "{listed}");
    assert_eq!(listed["zoneid"], z.as_str(), "{listed}");
    assert_eq!(listed["templateid"], t.as_str(), "{listed}");
    assert_eq!(listed["serviceofferingid"], o.as_str(), "{listed}");
    let ip = listed["nic"][0]["ipaddress"].as_str().unwrap_or_default();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "no NIC IP address: {listed}");

    let stopped = cs.ok(post, "stopVirtualMachine", &[("id", &id)]);
    assert_eq!(stopped["virtualmachine"]["state"], "Stopped", "stop result: {stopped}");
    assert_eq!(cs_vm(&cs, post, &id)["state"], "Stopped");

    let started = cs.ok(post, "startVirtualMachine", &[("id", &id)]);
    assert_eq!(started["virtualmachine"]["state"], "Running", "start result: {started}");
    assert_eq!(cs_vm(&cs, post, &id)["state"], "Running");

    let rebooted = cs.ok(post, "rebootVirtualMachine", &[("id", &id)]);
    assert_eq!(rebooted["virtualmachine"]["state"], "Running", "reboot result: {rebooted}");
    assert_eq!(cs_vm(&cs, post, &id)["state"], "Running");

    // The job must succeed (cs exits 1 on a failed job); what it returns varies by version.
    cs.run(post, "destroyVirtualMachine", &[("id", &id), ("expunge", "true")]).assert_ok();
    let all = cs_list_vms(&cs, post, &[("listall", "true")]);
    assert!(all.iter().all(|v| v["id"] != id.as_str()), "expunged VM {id} is still listed: {all:?}");
    let by_id = cs_list_vms(&cs, post, &[("id", &id)]);
    assert!(by_id.is_empty(), "expunged VM {id} is still listed by id: {by_id:?}");
}

#[test]
fn cs_lifecycle_get_sqlite() {
    let Some(c) = Cloud::start(Backend::Sqlite, 2) else {
        return;
    };
    cs_lifecycle(&c, false);
}

#[test]
fn cs_lifecycle_post_sqlite() {
    let Some(c) = Cloud::start(Backend::Sqlite, 2) else {
        return;
    };
    cs_lifecycle(&c, true);
}

#[test]
fn cs_lifecycle_get_mysql() {
    if client_path("SKYHOLD_TEST_CS").is_none() {
        return;
    }
    let Some(c) = Cloud::start(Backend::MySql, 2) else {
        return;
    };
    cs_lifecycle(&c, false);
}

/// The top-level object `cs` prints for an error (it prints the whole body, key included).
fn error_body(r: &Run, key: &str) -> Value {
    let v = r.json();
    let obj = v.as_object().unwrap_or_else(|| panic!("{}: not an object: {r}", r.what));
    assert_eq!(obj.len(), 1, "{}: one top-level key expected: {r}", r.what);
    let inner = v[key].clone();
    assert!(inner.is_object(), "{}: no `{key}` in the error body: {r}", r.what);
    inner
}

#[test]
fn cs_errors() {
    let Some(c) = Cloud::start(Backend::Sqlite, 1) else {
        return;
    };
    let Some(cs) = Cs::new(&c, "cs-home", &c.admin.api_key, &c.admin.secret) else {
        return;
    };
    let (z, _t, o) = c.ids(OFFERING);

    // A missing required parameter: 431 naming it, and no VM is created.
    for post in [false, true] {
        let r = cs.run(post, "deployVirtualMachine", &[("zoneid", &z), ("serviceofferingid", &o), ("name", "nope")]);
        assert_eq!(r.code, Some(1), "deploy without templateid (post={post}) must fail: {r}");
        assert!(r.stderr.contains("HTTP 431"), "post={post}: {r}");
        let e = error_body(&r, "deployvirtualmachineresponse");
        assert_eq!(e["errorcode"], 431, "post={post}: {r}");
        let text = e["errortext"].as_str().unwrap_or_default();
        assert!(text.contains("templateid"), "errortext does not name templateid (post={post}): {r}");
    }
    assert!(cs_list_vms(&cs, false, &[("listall", "true")]).is_empty(), "a VM was created");

    // The same client with a wrong secret: 401 and no data. Like CloudStack, the error body is
    // keyed by the command's response name.
    let bad = Cs::new(&c, "cs-bad-home", &c.admin.api_key, "not-the-secret").expect("cs");
    for post in [false, true] {
        let r = bad.run(post, "listZones", &[]);
        assert_eq!(r.code, Some(1), "a wrong secret must fail (post={post}): {r}");
        assert!(r.stderr.contains("HTTP 401"), "post={post}: {r}");
        let e = error_body(&r, "listzonesresponse");
        assert_eq!(e["errorcode"], 401, "post={post}: {r}");
        assert!(!r.stdout.contains("\"zone\""), "zones leaked with a wrong secret: {r}");
    }
    // An unknown API key is refused the same way.
    let wrong_key = Cs::new(&c, "cs-badkey-home", "no-such-key", &c.admin.secret).expect("cs");
    let r = wrong_key.run(false, "listZones", &[]);
    assert_eq!(r.code, Some(1), "an unknown api key must fail: {r}");
    assert_eq!(error_body(&r, "listzonesresponse")["errorcode"], 401, "{r}");
}

#[test]
fn cs_tilde_in_values() {
    let Some(c) = Cloud::start(Backend::Sqlite, 1) else {
        return;
    };
    let Some(cs) = Cs::new(&c, "cs-home", &c.admin.api_key, &c.admin.secret) else {
        return;
    };
    let (z, t, o) = c.ids(OFFERING);

    // Python 3 `quote` leaves `~` raw in the string cs signs; the server must accept that.
    let display = "web~1 test";
    let deployed = cs.ok(
        false,
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "tilde1"), ("displayname", display)],
    );
    let id = deployed["virtualmachine"]["id"].as_str().expect("vm id").to_string();
    assert_eq!(deployed["virtualmachine"]["displayname"], display, "{deployed}");
    assert_eq!(cs_vm(&cs, false, &id)["displayname"], display);

    // The same in a POST body, and for a synchronous command.
    let display2 = "~db~2~";
    let updated = cs.ok(true, "updateVirtualMachine", &[("id", &id), ("displayname", display2)]);
    assert_eq!(updated["virtualmachine"]["displayname"], display2, "{updated}");
    assert_eq!(cs_vm(&cs, true, &id)["displayname"], display2);
    assert_eq!(c.vm(&id)["displayname"], display2);
}

// ------------------------------------------------------------------------------------------------
// cloudmonkey
// ------------------------------------------------------------------------------------------------

/// cloudmonkey with its own HOME and a complete config file (every key `config.py` knows, so it
/// neither prints `Welcome!` nor rewrites the file).
struct Monkey {
    bin: PathBuf,
    home: PathBuf,
    config: PathBuf,
}

impl Monkey {
    /// `apikey`/`secretkey` empty means username/password (session) mode.
    fn new(c: &Cloud, name: &str, apikey: &str, secretkey: &str, username: &str, password: &str) -> Option<Monkey> {
        let bin = client_path("SKYHOLD_TEST_CLOUDMONKEY")?;
        let home = c.path(name);
        std::fs::create_dir_all(&home).expect("cloudmonkey home");
        let config = home.join("config");
        let h = home.display();
        let text = format!(
            "[core]\n\
             profile = skyhold\n\
             asyncblock = true\n\
             paramcompletion = false\n\
             cache_file = {h}/cache\n\
             history_file = {h}/history\n\
             log_file = {h}/log\n\
             \n\
             [ui]\n\
             color = false\n\
             prompt = >\n\
             display = json\n\
             \n\
             [skyhold]\n\
             url = {url}\n\
             username = {username}\n\
             password = {password}\n\
             domain = /\n\
             apikey = {apikey}\n\
             secretkey = {secretkey}\n\
             timeout = 90\n\
             expires = 600\n\
             verifysslcert = false\n\
             signatureversion = 3\n",
            url = c.base()
        );
        std::fs::write(&config, text).expect("write cloudmonkey config");
        Some(Monkey { bin, home, config })
    }

    fn run(&self, args: &[&str]) -> Run {
        let cfg = self.config.display().to_string();
        let mut all = vec!["-c", cfg.as_str()];
        all.extend_from_slice(args);
        let r = run_client(&self.bin, &self.home, &[], &all);
        // A complete config is used as is: no first-run or missing-key messages.
        assert!(!r.stdout.contains("Welcome!") && !r.stdout.contains("Missing configuration"), "{r}");
        r
    }
}

fn cm_zone_and_deploy(c: &Cloud, cm: &Monkey, name: &str) {
    let (z, t, o) = c.ids(OFFERING);
    let zone_name = c.ok("listZones", &[])["zone"][0]["name"].as_str().expect("zone name").to_string();

    let zones = cm.run(&["list", "zones"]);
    zones.assert_ok();
    let v = zones.json();
    assert_eq!(v["count"], 1, "{zones}");
    assert_eq!(v["zone"][0]["name"], zone_name.as_str(), "{zones}");
    assert_eq!(v["zone"][0]["id"], z.as_str(), "{zones}");

    // Blocks on the async job (spinner first), then prints the queryAsyncJobResult object.
    let zid = format!("zoneid={z}");
    let tid = format!("templateid={t}");
    let oid = format!("serviceofferingid={o}");
    let nm = format!("name={name}");
    let dep = cm.run(&["deploy", "virtualmachine", &zid, &tid, &oid, &nm]);
    dep.assert_ok();
    let job = dep.json();
    assert_eq!(job["jobstatus"], 1, "{dep}");
    let vm = &job["jobresult"]["virtualmachine"];
    assert_eq!(vm["state"], "Running", "{dep}");
    assert_eq!(vm["name"], name, "{dep}");
    let id = vm["id"].as_str().expect("vm id");
    assert_eq!(c.vm(id)["state"], "Running");

    let list = cm.run(&["list", "virtualmachines"]);
    list.assert_ok();
    let v = list.json();
    let vms = v["virtualmachine"].as_array().unwrap_or_else(|| panic!("no VMs listed: {list}"));
    let found = vms.iter().find(|x| x["id"] == id).unwrap_or_else(|| panic!("{name} not listed: {list}"));
    assert_eq!(found["name"], name, "{list}");
    assert_eq!(found["state"], "Running", "{list}");
}

#[test]
fn cloudmonkey_api_keys() {
    let Some(c) = Cloud::start(Backend::Sqlite, 1) else {
        return;
    };
    let Some(cm) = Monkey::new(&c, "cm-home", &c.admin.api_key, &c.admin.secret, "admin", "password") else {
        return;
    };

    // sync: listApis -> "<n> APIs discovered and cached" and the cache file.
    let sync = cm.run(&["sync"]);
    sync.assert_ok();
    let text = strip_ansi(&sync.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("APIs discovered and cached"))
        .unwrap_or_else(|| panic!("sync did not report: {sync}"));
    let n: u64 = line
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no API count in {line:?}"));
    let expected = c.ok("listApis", &[]);
    let api_count = expected["api"].as_array().expect("listApis api").len() as u64;
    assert!(n > 0, "{sync}");
    assert_eq!(n, api_count, "sync count vs listApis: {sync}");
    assert_eq!(expected["count"], api_count, "listApis count vs its api list");
    let cache: Value = serde_json::from_str(&std::fs::read_to_string(cm.home.join("cache")).expect("cache file"))
        .expect("cache file is JSON");
    assert_eq!(cache["list"]["zones"]["name"], "listZones");
    assert_eq!(cache["list"]["virtualmachines"]["name"], "listVirtualMachines");
    let deploy = &cache["deploy"]["virtualmachine"];
    assert_eq!(deploy["name"], "deployVirtualMachine");
    assert_eq!(deploy["isasync"], true);
    let required: Vec<&str> =
        deploy["requiredparams"].as_array().expect("requiredparams").iter().filter_map(Value::as_str).collect();
    for p in ["zoneid", "templateid", "serviceofferingid"] {
        assert!(required.contains(&p), "{p} not required in the cache: {deploy}");
    }
    let asyncapis = cache["asyncapis"].as_array().expect("asyncapis");
    assert!(asyncapis.iter().any(|a| a == "deployVirtualMachine"));
    assert!(!asyncapis.iter().any(|a| a == "listZones"));

    // With the synced cache: a missing required parameter is caught client-side (no request).
    let miss = cm.run(&["deploy", "virtualmachine", "name=x"]);
    assert!(miss.stdout.contains("Missing arguments"), "{miss}");

    cm_zone_and_deploy(&c, &cm, "cm1");

    // A wrong secret is refused.
    let bad = Monkey::new(&c, "cm-bad-home", &c.admin.api_key, "not-the-secret", "admin", "password").expect("cm");
    let r = bad.run(&["list", "zones"]);
    assert_eq!(r.code, Some(1), "a wrong secret must fail: {r}");
    assert!(r.stderr.contains("Error 401"), "{r}");
    assert!(!r.stdout.contains("\"zone\""), "zones leaked with a wrong secret: {r}");
}

#[test]
fn cloudmonkey_password_login() {
    if client_path("SKYHOLD_TEST_CLOUDMONKEY").is_none() {
        return;
    }
    // cloudmonkey treats any url containing "8096" (the integration port) as unauthenticated and
    // never logs in: take another port in the (rare) case the API port contains it.
    let mut c = Cloud::start(Backend::Sqlite, 1).expect("sqlite");
    for _ in 0..5 {
        if !c.base().contains("8096") {
            break;
        }
        drop(c);
        c = Cloud::start(Backend::Sqlite, 1).expect("sqlite");
    }
    assert!(!c.base().contains("8096"), "{}", c.base());
    let cm = Monkey::new(&c, "cm-home", "", "", "admin", "password").expect("cloudmonkey");
    // No sync: the built-in API cache of cloudmonkey is used.
    cm_zone_and_deploy(&c, &cm, "cm2");

    let bad = Monkey::new(&c, "cm-bad-home", "", "", "admin", "wrong-password").expect("cm");
    let r = bad.run(&["list", "zones"]);
    assert_eq!(r.code, Some(1), "a wrong password must fail: {r}");
    assert!(r.stderr.contains("Authentication failed") || r.stdout.contains("Authentication failed"), "{r}");
    assert!(!r.stdout.contains("\"zone\""), "zones listed with a wrong password: {r}");
    let r = bad.run(&["list", "virtualmachines"]);
    assert_eq!(r.code, Some(1), "a wrong password must fail: {r}");
    assert!(!r.stdout.contains("cm2"), "VMs listed with a wrong password: {r}");
}
