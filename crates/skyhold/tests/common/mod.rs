//! Test harness: starts the real `skyhold` binary (database init, management server, simulator
//! agent) on its own database and free ports, and talks to it like a client does: signed
//! CloudStack API requests over HTTP.
//!
//! Backends: SQLite (a file in the test's temp dir) and MariaDB (a database of its own on the
//! throwaway server that `scripts/test.sh` starts and names in `SKYHOLD_TEST_MYSQL_URL`). Without
//! that variable MariaDB tests are skipped locally and fail under CI (`CI` set).
#![allow(dead_code)]

/// `both!(test_fn)`: one `#[test]` per backend (`test_fn::sqlite`, `test_fn::mysql`), each calling
/// `test_fn(Backend)`. Use with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Backend::Sqlite)
            }
            #[test]
            fn mysql() {
                super::$name(super::Backend::MySql)
            }
        }
    };
}

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_skyhold");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

/// The database URL for a fresh test database, or `None` to skip (MySQL not configured locally).
pub fn db_url(backend: Backend, dir: &Path) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}", dir.join("skyhold.db").display())),
        Backend::MySql => match std::env::var("SKYHOLD_TEST_MYSQL_URL") {
            Ok(base) if !base.is_empty() => {
                let name = format!("t_{}", uuid::Uuid::new_v4().simple());
                Some(format!("{}/{}", base.trim_end_matches('/'), &name[..20]))
            }
            _ => {
                if std::env::var_os("CI").is_some() {
                    panic!("SKYHOLD_TEST_MYSQL_URL is not set under CI: scripts/test.sh must start MariaDB");
                }
                eprintln!("skipping MariaDB test: SKYHOLD_TEST_MYSQL_URL is not set (scripts/test.sh sets it)");
                None
            }
        },
    }
}

#[derive(Debug, Clone)]
pub struct Creds {
    pub api_key: String,
    pub secret: String,
    pub username: String,
    pub password: String,
}

pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn term(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM);
    }
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A running cloud: one database, management servers, agents.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub db_url: String,
    pub admin: Creds,
    pub agent_token: String,
    pub servers: Vec<(Proc, u16, u16)>,
    pub agents: Vec<Proc>,
    pub api_port: u16,
    /// Set by tests that provoke errors on purpose.
    pub allow_error_logs: bool,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        // A test fails on unexpected ERROR lines in a server's log (neon's rule): an error that
        // nobody asserted on is a bug that would otherwise go unnoticed.
        if !std::thread::panicking() && !self.allow_error_logs {
            let mut found = Vec::new();
            for (s, _, _) in &self.servers {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                found.extend(log.lines().filter(|l| l.contains(" ERROR ")).map(|l| format!("{}: {l}", s.name)));
            }
            if !found.is_empty() {
                for a in &mut self.agents {
                    a.kill9();
                }
                for (s, _, _) in &mut self.servers {
                    s.kill9();
                }
                panic!("unexpected ERROR lines in server logs:\n{}", found.join("\n"));
            }
        }
        for a in &mut self.agents {
            a.kill9();
        }
        for (s, _, _) in &mut self.servers {
            s.kill9();
        }
        if std::thread::panicking() {
            for p in self.servers.iter().map(|s| &s.0).chain(self.agents.iter()) {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- last lines of {} ----", p.name);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run skyhold");
    assert!(out.status.success(), "skyhold {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Cloud {
    /// Initialise a database and start one server and one agent with `hosts` simulated hosts.
    /// `None` when the backend is not available locally.
    pub fn start(backend: Backend, hosts: u32) -> Option<Cloud> {
        Self::start_with(backend, hosts, &[])
    }

    pub fn start_with(backend: Backend, hosts: u32, agent_args: &[&str]) -> Option<Cloud> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_url = db_url(backend, dir.path())?;
        let d = dir.path().to_str().expect("utf8 path").to_string();
        let out = run_ok(&["db", "init", "--seed", "--data-dir", &d, "--db", &db_url, "--admin-password", "password"]);
        let v: Value = serde_json::from_str(&out).expect("db init prints JSON");
        let admin = Creds {
            api_key: v["admin"]["apikey"].as_str().expect("apikey").into(),
            secret: v["admin"]["secretkey"].as_str().expect("secret").into(),
            username: "admin".into(),
            password: "password".into(),
        };
        let mut cloud = Cloud {
            dir,
            backend,
            db_url,
            admin,
            agent_token: v["agent_token"].as_str().expect("token").into(),
            servers: Vec::new(),
            agents: Vec::new(),
            api_port: 0,
            allow_error_logs: false,
        };
        cloud.start_server("ms1");
        if hosts > 0 {
            cloud.start_agent("agent1", hosts, agent_args);
            cloud.wait_hosts_up(hosts as usize);
        }
        Some(cloud)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Start a management server with its own id; returns its index.
    pub fn start_server(&mut self, name: &str) -> usize {
        self.start_server_env(name, &[])
    }

    /// SIGKILL server `i` (it stays in `servers`, dead; `restart_server` brings it back).
    pub fn kill9_server(&mut self, i: usize) {
        self.servers[i].0.kill9();
    }

    /// Kill server `i` if it still runs, then start it again with the same id (a new run), in
    /// place. Its ports change. The new run waits until the old run's heartbeat is stale.
    pub fn restart_server(&mut self, i: usize, env: &[(&str, &str)]) {
        self.servers[i].0.kill9();
        let name = self.servers[i].0.name.clone();
        // Same ports as before (as a real node restarts), so agents find it again.
        let old: serde_json::Value = std::fs::read_to_string(self.path(&format!("{name}.ports")))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .expect("ports of the previous run");
        let ports = [old["api"].to_string(), old["agent"].to_string(), old["cluster"].to_string()];
        let idx = self.start_server_ports(&name, env, &ports);
        let new = self.servers.remove(idx);
        self.servers[i] = new;
        if i == 0 {
            self.api_port = self.servers[i].1;
        }
    }

    /// API base URL of server `i`.
    pub fn base_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/client/api", self.servers[i].1)
    }

    /// Start a management server with extra environment (e.g. `SKYHOLD_FAILPOINT`).
    pub fn start_server_env(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        self.start_server_ports(name, env, &["0".into(), "0".into(), "0".into()])
    }

    /// Start a server on given ports (api, agent, cluster; "0" picks free ones).
    pub fn start_server_ports(&mut self, name: &str, env: &[(&str, &str)], ports_: &[String; 3]) -> usize {
        let db = self.db_url.clone();
        self.start_server_on(name, env, ports_, &db)
    }

    /// Start a server on free ports with its own database URL (e.g. through a proxy the test
    /// controls).
    pub fn start_server_with_db(&mut self, name: &str, db: &str) -> usize {
        self.start_server_on(name, &[], &["0".into(), "0".into(), "0".into()], db)
    }

    fn start_server_on(&mut self, name: &str, env: &[(&str, &str)], ports_: &[String; 3], db: &str) -> usize {
        let ports = self.path(&format!("{name}.ports"));
        let _ = std::fs::remove_file(&ports);
        // Append: a restarted server keeps the earlier runs' log lines.
        let log = self.path(&format!("{name}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let d = self.dir.path().to_str().expect("utf8").to_string();
        let child = Command::new(BIN)
            .args(["server", "--data-dir", &d, "--db", db, "--bind", "127.0.0.1"])
            .args(["--api-port", &ports_[0], "--agent-port", &ports_[1], "--cluster-port", &ports_[2], "--ms-id", name])
            .arg("--ports-file")
            .arg(&ports)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn server");
        let mut proc = Proc { name: name.into(), child, log };
        let v = wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(&ports).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok())
        });
        let Some(v) = v else {
            proc.kill9();
            panic!("server {name} did not start: {}", std::fs::read_to_string(&proc.log).unwrap_or_default());
        };
        let api = v["api"].as_u64().expect("api port") as u16;
        let agent = v["agent"].as_u64().expect("agent port") as u16;
        self.servers.push((proc, api, agent));
        if self.api_port == 0 {
            self.api_port = api;
        }
        let url = format!("http://127.0.0.1:{api}/ready");
        wait_for(Duration::from_secs(20), || ureq::get(&url).call().ok().filter(|r| r.status() == 200))
            .expect("server ready");
        self.servers.len() - 1
    }

    pub fn agent_addrs(&self) -> String {
        self.servers.iter().map(|(_, _, a)| format!("127.0.0.1:{a}")).collect::<Vec<_>>().join(",")
    }

    pub fn ledger(&self) -> PathBuf {
        self.path("ledger.jsonl")
    }

    /// Every entry of the agents' ledger (the ground truth of what hypervisors executed).
    pub fn ledger_entries(&self) -> Vec<Value> {
        read_ledger(&self.ledger())
    }

    /// Invariants 5 and 7 from the ledger (see [`check_ledger`]).
    pub fn assert_ledger_invariants(&self) {
        check_ledger(&self.ledger_entries());
    }

    pub fn start_agent(&mut self, name: &str, hosts: u32, extra: &[&str]) {
        let mgmt = self.agent_addrs();
        self.start_agent_at(name, hosts, &mgmt, extra);
    }

    /// Start an agent with its own management server list (e.g. through a [`TcpProxy`]).
    pub fn start_agent_at(&mut self, name: &str, hosts: u32, mgmt: &str, extra: &[&str]) {
        let log = self.path(&format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args([
                "agent",
                "--mgmt",
                mgmt,
                // `=` form: a token is data, even if it looked like a flag.
                &format!("--token={}", self.agent_token),
                "--simulator",
            ])
            .args(["--hosts", &hosts.to_string(), "--agent-id", name])
            .arg("--ledger")
            .arg(self.ledger())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn agent");
        self.agents.push(Proc { name: name.into(), child, log });
    }

    pub fn wait_hosts_up(&self, n: usize) {
        let ok = wait_for(Duration::from_secs(20), || {
            let v = self.ok("listHosts", &[]);
            let up = v["host"].as_array().map(|a| a.iter().filter(|h| h["state"] == "Up").count()).unwrap_or(0);
            (up >= n).then_some(())
        });
        assert!(ok.is_some(), "{n} hosts did not come up");
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/client/api", self.api_port)
    }

    /// Signed GET as admin. Returns (HTTP status, body).
    pub fn api(&self, cmd: &str, params: &[(&str, &str)]) -> (u16, Value) {
        self.api_as(&self.admin, cmd, params)
    }

    pub fn api_as(&self, who: &Creds, cmd: &str, params: &[(&str, &str)]) -> (u16, Value) {
        let q = signed_query(who, cmd, params);
        get(&format!("{}?{q}", self.base()))
    }

    /// Signed POST with every parameter in the form body.
    pub fn api_post(&self, cmd: &str, params: &[(&str, &str)]) -> (u16, Value) {
        let q = signed_query(&self.admin, cmd, params);
        let r = ureq::post(&self.base()).set("Content-Type", "application/x-www-form-urlencoded").send_string(&q);
        into(r)
    }

    /// The object under `<cmd>response`, asserting success.
    pub fn ok(&self, cmd: &str, params: &[(&str, &str)]) -> Value {
        let (st, v) = self.api(cmd, params);
        assert_eq!(st, 200, "{cmd} failed: {v}");
        v[format!("{}response", cmd.to_lowercase())].clone()
    }

    /// Zone, template and the first offering with this name.
    pub fn ids(&self, offering: &str) -> (String, String, String) {
        let z = self.ok("listZones", &[])["zone"][0]["id"].as_str().expect("zone").to_string();
        let t = self.ok("listTemplates", &[("templatefilter", "featured")])["template"][0]["id"]
            .as_str()
            .expect("template")
            .to_string();
        let offs = self.ok("listServiceOfferings", &[]);
        let o = offs["serviceoffering"]
            .as_array()
            .expect("offerings")
            .iter()
            .find(|o| o["name"] == offering)
            .expect("offering")["id"]
            .as_str()
            .expect("id")
            .to_string();
        (z, t, o)
    }

    /// Poll `queryAsyncJobResult` until the job is finished; returns the job object.
    pub fn wait_job_as(&self, who: &Creds, job: &str) -> Value {
        let v = wait_for(Duration::from_secs(60), || {
            let (st, v) = self.api_as(who, "queryAsyncJobResult", &[("jobid", job)]);
            assert_eq!(st, 200, "{v}");
            let j = v["queryasyncjobresultresponse"].clone();
            (j["jobstatus"] != 0).then_some(j)
        });
        v.unwrap_or_else(|| panic!("job {job} did not finish"))
    }

    pub fn wait_job(&self, job: &str) -> Value {
        self.wait_job_as(&self.admin, job)
    }

    /// Deploy and wait; returns (vm id, job result).
    pub fn deploy(&self, name: &str, offering: &str, extra: &[(&str, &str)]) -> (String, Value) {
        let (z, t, o) = self.ids(offering);
        let mut p =
            vec![("zoneid", z.as_str()), ("templateid", t.as_str()), ("serviceofferingid", o.as_str()), ("name", name)];
        p.extend_from_slice(extra);
        let r = self.ok("deployVirtualMachine", &p);
        let id = r["id"].as_str().expect("vm id").to_string();
        let job = self.wait_job(r["jobid"].as_str().expect("jobid"));
        (id, job)
    }

    pub fn vm(&self, id: &str) -> Value {
        self.ok("listVirtualMachines", &[("id", id)])["virtualmachine"][0].clone()
    }

    pub fn create_user(&self, name: &str) -> Creds {
        let d = self.dir.path().to_str().expect("utf8").to_string();
        let out = run_ok(&[
            "account",
            "create",
            "--data-dir",
            &d,
            "--db",
            &self.db_url,
            "--name",
            name,
            "--password",
            "pw-of-user",
        ]);
        let v: Value = serde_json::from_str(&out).expect("json");
        Creds {
            api_key: v["apikey"].as_str().expect("k").into(),
            secret: v["secretkey"].as_str().expect("s").into(),
            username: name.into(),
            password: "pw-of-user".into(),
        }
    }
}

pub fn into(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(resp) => {
            let st = resp.status();
            (st, resp.into_json().unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(st, resp)) => (st, resp.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn get(url: &str) -> (u16, Value) {
    into(ureq::get(url).call())
}

/// Java URLEncoder, `%20` for spaces (what CloudStack signs).
pub fn enc(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A signed query string (signature v3, expiring in 10 minutes).
pub fn signed_query(who: &Creds, cmd: &str, params: &[(&str, &str)]) -> String {
    let expires = (chrono_like_now_plus(600)).to_string();
    let mut all: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    all.push(("command".into(), cmd.into()));
    all.push(("response".into(), "json".into()));
    all.push(("apiKey".into(), who.api_key.clone()));
    all.push(("signatureVersion".into(), "3".into()));
    all.push(("expires".into(), expires));
    sign_pairs(&mut all, &who.secret);
    all.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

/// Append `signature` to the pairs.
pub fn sign_pairs(all: &mut Vec<(String, String)>, secret: &str) {
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let s = sorted.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&").to_lowercase();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(s.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    all.push(("signature".into(), sig));
}

/// `yyyy-MM-ddTHH:mm:ss+0000`, `secs` from now (UTC), without a date library.
pub fn chrono_like_now_plus(secs: i64) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64 + secs;
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}+0000")
}

/// Call `f` every 20 ms until it returns `Some`, for at most `within` (the test-support crate's).
pub use skyhold_testkit::wait_for;

/// Every entry of an agent ledger file (JSON lines).
pub fn read_ledger(path: &Path) -> Vec<Value> {
    skyhold_testkit::ledger::read_ledger(path).expect("ledger")
}

/// Invariants 5 and 7 from a ledger (`skyhold_testkit::ledger::replay_ledger`, which states the
/// rule): panics on a violation; returns where each VM runs at the end (VM id -> host guid).
pub fn check_ledger(l: &[Value]) -> std::collections::HashMap<String, String> {
    let r = skyhold_testkit::ledger::replay_ledger(l);
    assert!(r.problems.is_empty(), "ledger: {}", r.problems.join("; "));
    r.running
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that cuts links
// ---------------------------------------------------------------------------------------------

#[allow(unused_imports)] // not every test binary cuts links
pub use skyhold_testkit::proxy::{Cut, TcpProxy};
