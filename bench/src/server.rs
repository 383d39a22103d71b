//! The `skyhold` binary as a child process: `db init` and one management server, started the
//! same way by every benchmark (free or fixed ports, `--ports-file`, then `GET /ready`).

use crate::sign::Creds;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How `skyhold` finds its database.
#[derive(Debug, Clone)]
pub enum DbSource {
    /// `--db URL`.
    Url(String),
    /// `--db-properties FILE`: a CloudStack `db.properties` (HA topologies).
    Properties(PathBuf),
}

impl DbSource {
    fn add_to(&self, cmd: &mut Command) {
        match self {
            DbSource::Url(u) => cmd.args(["--db", u]),
            DbSource::Properties(p) => cmd.arg("--db-properties").arg(p),
        };
    }
}

/// What `skyhold db init` hands out.
pub struct Init {
    pub admin: Creds,
    /// The join token agents present (`skyhold agent --token`).
    pub agent_token: String,
}

/// `skyhold db init --seed` with `data_dir` (created if missing): schema, admin account and the
/// demo zone/pod/offerings/templates. Returns the admin's API keys and the agents' join token.
pub fn db_init(bin: &Path, data_dir: &Path, db: &DbSource) -> Result<Init> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(["db", "init", "--seed", "--admin-password", "password"]).arg("--data-dir").arg(data_dir);
    db.add_to(&mut cmd);
    let out =
        cmd.env("RUST_LOG", "warn").stdin(Stdio::null()).output().with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!("skyhold db init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("skyhold db init did not print JSON")?;
    let field = |k: &str| -> Result<String> {
        v["admin"][k].as_str().map(str::to_string).with_context(|| format!("no admin.{k} in the output of db init"))
    };
    let admin = Creds { api_key: field("apikey")?, secret: field("secretkey")? };
    let agent_token = v["agent_token"].as_str().context("no agent_token in the output of db init")?.to_string();
    Ok(Init { admin, agent_token })
}

/// How to start one server.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// Prefix of its files in the data directory: `NAME.log`, `NAME.ports`.
    pub name: String,
    /// `--ms-id` (default: the id kept in the data directory).
    pub ms_id: Option<String>,
    /// API, agent and cluster ports; 0 picks a free one.
    pub ports: [u16; 3],
    /// `RUST_LOG` of the server (default: `$RUST_LOG`, else `info,sqlx=warn`).
    pub rust_log: Option<String>,
    /// Append to the log (a restarted server keeps its earlier runs' lines).
    pub append_log: bool,
    /// SIGKILL the server when the thread that starts it exits
    /// ([`skyhold_testkit::die_with_parent`]), so that a bench killed outright leaves none behind.
    /// Start it from a thread that outlives it.
    pub die_with_parent: bool,
    /// How long [`Server::stop`] waits after SIGTERM before it sends SIGKILL.
    pub stop_grace: Duration,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            name: "server".into(),
            ms_id: None,
            ports: [0; 3],
            rust_log: None,
            append_log: false,
            die_with_parent: false,
            stop_grace: Duration::from_secs(30),
        }
    }
}

/// A running management server. Dropping it stops it.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    pub api_port: u16,
    pub agent_port: u16,
    pub cluster_port: u16,
    pub log: PathBuf,
    ports_file: PathBuf,
    stop_grace: Duration,
}

impl Server {
    /// Start `skyhold server` and wait (up to 60 s) until `/ready` answers 200.
    pub fn start(bin: &Path, data_dir: &Path, db: &DbSource, o: &ServerOpts) -> Result<Server> {
        let mut s = Server::spawn(bin, data_dir, db, o)?;
        s.wait_ready(Duration::from_secs(60))?;
        Ok(s)
    }

    /// Start `skyhold server` (with `$RUST_LOG`, else `info,sqlx=warn`, unless `o` says) without
    /// waiting for it (see [`Server::wait_ready`]).
    pub fn spawn(bin: &Path, data_dir: &Path, db: &DbSource, o: &ServerOpts) -> Result<Server> {
        let ports_file = data_dir.join(format!("{}.ports", o.name));
        let _ = std::fs::remove_file(&ports_file);
        let log = data_dir.join(format!("{}.log", o.name));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(o.append_log)
            .truncate(!o.append_log)
            .open(&log)
            .with_context(|| format!("create {}", log.display()))?;
        let rust_log =
            o.rust_log.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info,sqlx=warn".into());
        let [api, agent, cluster] = o.ports.map(|p| p.to_string());
        let mut cmd = Command::new(bin);
        cmd.args(["server", "--bind", "127.0.0.1"])
            .args(["--api-port", &api, "--agent-port", &agent, "--cluster-port", &cluster])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ports-file")
            .arg(&ports_file);
        db.add_to(&mut cmd);
        if let Some(id) = &o.ms_id {
            cmd.args(["--ms-id", id]);
        }
        if o.die_with_parent {
            skyhold_testkit::die_with_parent(&mut cmd);
        }
        let child = cmd
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start {} server", bin.display()))?;
        let pid = child.id();
        Ok(Server {
            child: Some(child),
            pid,
            api_port: 0,
            agent_port: 0,
            cluster_port: 0,
            log,
            ports_file,
            stop_grace: o.stop_grace,
        })
    }

    /// Wait for the ports file, then until `/ready` answers 200.
    pub fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) =
                std::fs::read_to_string(&self.ports_file).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                let port = |k: &str| -> Result<u16> {
                    Ok(v[k].as_u64().with_context(|| format!("no {k} port in the ports file"))? as u16)
                };
                self.api_port = port("api")?;
                self.agent_port = port("agent")?;
                self.cluster_port = port("cluster")?;
                break;
            }
            self.check_alive()?;
            if Instant::now() > deadline || crate::stopped() {
                bail!("the server did not write its ports file within {} s\n{}", within.as_secs(), self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ready = format!("http://127.0.0.1:{}/ready", self.api_port);
        loop {
            match ureq::get(&ready).timeout(Duration::from_secs(5)).call() {
                Ok(r) if r.status() == 200 => return Ok(()),
                _ => {}
            }
            self.check_alive()?;
            if Instant::now() > deadline || crate::stopped() {
                bail!("the server was not ready within {} s\n{}", within.as_secs(), self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/client/api", self.api_port)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL by PID, then reap it. Returns once the process is gone.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.child = None;
            bail!("the server exited early ({st})\n{}", self.log_tail(30));
        }
        Ok(())
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::util::log_tail(&self.log, n)
    }

    /// SIGTERM by PID (graceful shutdown), then SIGKILL if it has not exited within
    /// [`ServerOpts::stop_grace`] (30 s unless set).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !crate::util::terminate(&mut child, self.stop_grace) {
            eprintln!(
                "server (pid {}) did not stop within {} s of SIGTERM: killed it",
                self.pid,
                self.stop_grace.as_secs()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
