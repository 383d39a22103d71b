//! The `skyhold` binary as a child process: `db init` and one management server.

use crate::sign::Creds;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `skyhold db init --seed`: schema, admin account and the demo zone/pod/offerings/templates.
/// Returns the admin's API key pair.
pub fn db_init(bin: &Path, data_dir: &Path, db_url: &str) -> Result<Creds> {
    let out = Command::new(bin)
        .args(["db", "init", "--seed", "--admin-password", "password", "--db", db_url])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!("skyhold db init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("skyhold db init did not print JSON")?;
    let field = |k: &str| -> Result<String> {
        v["admin"][k].as_str().map(str::to_string).with_context(|| format!("no admin.{k} in the output of db init"))
    };
    Ok(Creds { api_key: field("apikey")?, secret: field("secretkey")? })
}

/// A running management server. Dropping it stops it.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    pub api_port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Start `skyhold server` on free ports and wait until `/ready` answers 200.
    pub fn start(bin: &Path, data_dir: &Path, db_url: &str) -> Result<Server> {
        let ports = data_dir.join("server.ports");
        let log = data_dir.join("server.log");
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into());
        let child = Command::new(bin)
            .args(["server", "--db", db_url, "--bind", "127.0.0.1"])
            .args(["--api-port", "0", "--agent-port", "0", "--cluster-port", "0"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ports-file")
            .arg(&ports)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start {} server", bin.display()))?;
        let pid = child.id();
        let mut s = Server { child: Some(child), pid, api_port: 0, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = std::fs::read_to_string(&ports).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                s.api_port = v["api"].as_u64().context("no api port in the ports file")? as u16;
                break;
            }
            s.check_alive()?;
            if Instant::now() > deadline || crate::STOP.load(std::sync::atomic::Ordering::Relaxed) {
                bail!("the server did not write its ports file within 60 s\n{}", s.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ready = format!("http://127.0.0.1:{}/ready", s.api_port);
        loop {
            match ureq::get(&ready).timeout(Duration::from_secs(5)).call() {
                Ok(r) if r.status() == 200 => return Ok(s),
                _ => {}
            }
            s.check_alive()?;
            if Instant::now() > deadline || crate::STOP.load(std::sync::atomic::Ordering::Relaxed) {
                bail!("the server was not ready within 60 s\n{}", s.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/client/api", self.api_port)
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
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!("---- last lines of {} ----\n{}", self.log.display(), lines[from..].join("\n"))
    }

    /// SIGTERM by PID (graceful shutdown), then SIGKILL if it has not exited within 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("server (pid {}) did not stop within 30 s of SIGTERM: killing it", self.pid);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
