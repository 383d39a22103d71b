//! Small helpers shared by the benchmark binaries: machine facts, JSON reports, database
//! housekeeping, child processes, Ctrl-C.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use skyhold_db::Db;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `debug` or `release`: how this benchmark binary was built.
pub fn bench_profile() -> &'static str {
    if cfg!(debug_assertions) { "debug" } else { "release" }
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU count and model, OS, architecture, load average now.
pub fn machine_info() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    json!({
        "nproc": nproc,
        "cpu": cpu,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "loadavg_start": loadavg(),
    })
}

/// The line every benchmark prints after its own: the machine ([`machine_info`]), this build's
/// profile and the server binary under test.
pub fn print_machine(machine: &Value, skyhold: &Path) {
    println!(
        "machine: {} CPUs ({}), load average {}; bench build: {}; server: {}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["loadavg_start"].as_str().unwrap_or("?"),
        bench_profile(),
        skyhold.display()
    );
}

/// The head of every JSON report: the command line, the machine ([`machine_info`]), this
/// build's profile and the server binary. [`write_json`] adds the load average at the end.
pub fn report_head(machine: Value, skyhold: &Path) -> Value {
    json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine,
        "bench_profile": bench_profile(),
        "skyhold": skyhold.display().to_string(),
    })
}

/// Write a report (headed by [`report_head`]) to `path` as pretty JSON, with the load average
/// now as `machine.loadavg_end`.
pub fn write_json(path: &Path, mut report: Value) -> Result<()> {
    if let Some(m) = report.get_mut("machine").and_then(Value::as_object_mut) {
        m.insert("loadavg_end".into(), json!(loadavg()));
    }
    std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    println!("\nJSON written to {}", path.display());
    Ok(())
}

/// `SQLite 3.x` or the MariaDB/MySQL version string.
pub async fn database_version(db: &Db) -> Result<String> {
    let mut c = db.conn().await?;
    let (conn, d) = skyhold_db::Sql::parts(&mut c);
    let q = match d {
        skyhold_db::Dialect::Sqlite => "SELECT 'SQLite ' || sqlite_version()",
        skyhold_db::Dialect::MySql => "SELECT CAST(VERSION() AS CHAR)",
    };
    let v: String = sqlx::query_scalar(q).fetch_one(conn).await?;
    Ok(v)
}

/// `mysql://USER:PASS@HOST:PORT/skyhold_bench_XXXXXXXX`: a fresh database name on `server_url`
/// (not created here: `skyhold db init` creates it). Returns (database URL, database name).
pub fn new_mysql_database(server_url: &str, prefix: &str) -> (String, String) {
    let server = server_url.trim_end_matches('/');
    let name = format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    (format!("{server}/{name}"), name)
}

/// `DROP DATABASE IF EXISTS name` on the MariaDB/MySQL server at `server_url`.
pub async fn drop_mysql_database(server_url: &str, name: &str) -> Result<()> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let url = server_url.trim_end_matches('/').replacen("mariadb://", "mysql://", 1);
    let mut conn = sqlx::AnyConnection::connect(&url).await.context("connect to the MariaDB server")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`")).execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// On Ctrl-C, set [`crate::STOP`] (measurements end early and everything is cleaned up).
pub fn stop_on_ctrl_c(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: ending the measurement and cleaning up");
            crate::STOP.store(true, Ordering::Relaxed);
        }
    });
}

/// SIGTERM `child` by PID (a graceful stop), then SIGKILL if it has not exited within `grace`;
/// reaps it. Returns false when it had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The last `n` lines of a log file, under a heading that names it.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("---- last lines of {} ----\n{}", path.display(), lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// Zone, template and offering ids for `deployVirtualMachine`.
#[derive(Debug, Clone)]
pub struct DeployIds {
    pub zone: String,
    pub template: String,
    pub offering: String,
}

impl DeployIds {
    /// The first zone, the first featured template and the "Small Instance" offering (or the
    /// first one), read through `get(command, params)`, which returns the command's response
    /// object (`<command>response`).
    pub fn lookup(get: impl Fn(&str, &[(&str, &str)]) -> Result<Value>) -> Result<DeployIds> {
        let zone = get("listZones", &[])?["zone"][0]["id"].as_str().context("no zone")?.to_string();
        let template = get("listTemplates", &[("templatefilter", "featured")])?["template"][0]["id"]
            .as_str()
            .context("no featured template")?
            .to_string();
        let offs = get("listServiceOfferings", &[])?;
        let offering = offs["serviceoffering"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["name"] == "Small Instance").or(a.first()))
            .and_then(|o| o["id"].as_str())
            .context("no service offering")?
            .to_string();
        Ok(DeployIds { zone, template, offering })
    }
}
