//! Small helpers shared by the benchmark binaries: machine facts, database housekeeping, Ctrl-C.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use skyhold_db::Db;
use std::sync::atomic::Ordering;

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
