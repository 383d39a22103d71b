//! Membership load: what idle servers (no agents, no jobs) cost the database, at 3 and 10 servers.
//!
//! Two measures of the same windows:
//! - MariaDB's global `Questions` counter (statements from clients), minus the rate seen with no
//!   server running. The counter is server-wide: anything else using that MariaDB server at the
//!   same time shows up as noise, which the before/after baselines make visible.
//! - The servers' own statement log (`RUST_LOG=...,sqlx::query=debug`: one line per statement
//!   sqlx runs), counted per server. It is exact for this cluster, works on SQLite too, and says
//!   which statements the load is made of.

use crate::cloud::Cloud;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The servers' log filter: the default plus one line per SQL statement.
pub const STATEMENT_LOG: &str = "info,sqlx=warn,sqlx::query=debug";

#[derive(Debug, Clone)]
pub struct Cfg {
    pub servers: Vec<usize>,
    pub window: Duration,
    pub warmup: Duration,
}

/// One measured window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub servers: usize,
    pub secs: f64,
    /// `Questions` delta over the window (MariaDB only).
    pub questions: Option<u64>,
    /// Lowest and highest one-second `Questions` delta in the window.
    pub q_min_per_sec: Option<u64>,
    pub q_max_per_sec: Option<u64>,
    /// Statements in the servers' logs over the window, per server.
    pub logged: BTreeMap<String, u64>,
    /// Statements by their first four words (sqlx's summary), all servers together.
    pub by_statement: BTreeMap<String, u64>,
}

impl Window {
    pub fn questions_per_sec(&self) -> Option<f64> {
        self.questions.map(|q| q as f64 / self.secs)
    }

    pub fn logged_per_sec(&self) -> f64 {
        self.logged.values().sum::<u64>() as f64 / self.secs
    }
}

pub struct Report {
    pub baseline_before: Window,
    pub baseline_after: Window,
    pub loaded: Vec<Window>,
}

impl Report {
    /// Background `Questions` per second: the mean of the two idle baselines.
    pub fn background(&self) -> Option<f64> {
        Some((self.baseline_before.questions_per_sec()? + self.baseline_after.questions_per_sec()?) / 2.0)
    }

    /// (servers, Questions/s per server after subtracting the background, logged statements/s per server)
    pub fn per_server(&self) -> Vec<(usize, Option<f64>, f64)> {
        self.loaded
            .iter()
            .map(|w| {
                let n = w.servers.max(1) as f64;
                let q = match (w.questions_per_sec(), self.background()) {
                    (Some(q), Some(bg)) => Some((q - bg) / n),
                    _ => None,
                };
                (w.servers, q, w.logged_per_sec() / n)
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let win = |w: &Window| {
            json!({
                "servers": w.servers,
                "seconds": (w.secs * 1000.0).round() / 1000.0,
                "questions": w.questions,
                "questions_per_sec": w.questions_per_sec().map(|v| (v * 10.0).round() / 10.0),
                "questions_min_per_sec": w.q_min_per_sec,
                "questions_max_per_sec": w.q_max_per_sec,
                "logged_statements": w.logged,
                "logged_per_sec": (w.logged_per_sec() * 10.0).round() / 10.0,
                "by_statement": w.by_statement,
            })
        };
        json!({
            "baseline_before": win(&self.baseline_before),
            "baseline_after": win(&self.baseline_after),
            "background_questions_per_sec": self.background().map(|v| (v * 10.0).round() / 10.0),
            "windows": self.loaded.iter().map(win).collect::<Vec<_>>(),
            "per_server": self.per_server().iter().map(|(n, q, l)| json!({
                "servers": n,
                "questions_per_sec_per_server": q.map(|v| (v * 100.0).round() / 100.0),
                "logged_statements_per_sec_per_server": (l * 100.0).round() / 100.0,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `mysql_server`: the MariaDB server URL (no database) to read `Questions` from; `None` on SQLite.
pub fn run(rt: &tokio::runtime::Runtime, cloud: &mut Cloud, mysql_server: Option<&str>, cfg: &Cfg) -> Result<Report> {
    let mut q = match mysql_server {
        Some(u) => Some(rt.block_on(Questions::connect(u))?),
        None => None,
    };
    // The baselines only matter for the server-wide counter.
    let baseline = |rt: &tokio::runtime::Runtime, q: &mut Option<Questions>, cloud: &Cloud, when: &str| {
        if q.is_none() {
            return Ok(Window::default());
        }
        println!("  baseline: {when}, {} s", cfg.window.as_secs());
        window(rt, q, cloud, cfg.window)
    };
    let baseline_before = baseline(rt, &mut q, cloud, "no server running")?;
    let mut loaded = Vec::new();
    for &n in &cfg.servers {
        if skyhold_bench::stopped() {
            break;
        }
        while cloud.nodes.len() < n {
            let id = format!("idle{:02}", cloud.nodes.len() + 1);
            cloud.add_node(&id, false, Some(STATEMENT_LOG.into()))?;
        }
        let start: Vec<usize> = (0..n).filter(|&i| cloud.nodes[i].srv.is_none()).collect();
        cloud.start_nodes(&start)?;
        println!("  {n} servers up; {} s warm-up, then {} s measured", cfg.warmup.as_secs(), cfg.window.as_secs());
        sleep(cfg.warmup);
        let w = window(rt, &mut q, cloud, cfg.window)?;
        loaded.push(w);
    }
    cloud.stop_nodes();
    let baseline_after = baseline(rt, &mut q, cloud, "servers stopped")?;
    if let Some(q) = q {
        rt.block_on(q.close());
    }
    Ok(Report { baseline_before, baseline_after, loaded })
}

fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !skyhold_bench::stopped() {
        std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())));
    }
}

/// Measure one window over the servers running now.
fn window(rt: &tokio::runtime::Runtime, q: &mut Option<Questions>, cloud: &Cloud, len: Duration) -> Result<Window> {
    let logs: Vec<(String, std::path::PathBuf)> = cloud
        .nodes
        .iter()
        .filter(|n| n.srv.is_some())
        .map(|n| (n.ms_id.clone(), cloud.dir.join(format!("{}.log", n.opts.name))))
        .collect();
    let offsets: Vec<u64> = logs.iter().map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).collect();
    let t0 = Instant::now();
    let mut samples: Vec<u64> = Vec::new();
    if let Some(q) = q.as_mut() {
        samples.push(rt.block_on(q.read())?);
    }
    let end = t0 + len;
    let mut next = t0 + Duration::from_secs(1);
    while next <= end && !skyhold_bench::stopped() {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        if let Some(q) = q.as_mut() {
            samples.push(rt.block_on(q.read())?);
        }
        next += Duration::from_secs(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut w = Window { servers: logs.len(), secs, ..Window::default() };
    if samples.len() >= 2 {
        w.questions = Some(samples[samples.len() - 1] - samples[0]);
        let deltas: Vec<u64> = samples.windows(2).map(|p| p[1] - p[0]).collect();
        w.q_min_per_sec = deltas.iter().min().copied();
        w.q_max_per_sec = deltas.iter().max().copied();
    }
    for ((ms, path), off) in logs.iter().zip(offsets) {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes[(off as usize).min(bytes.len())..]);
        let mut n = 0;
        for line in text.lines().filter(|l| l.contains(" sqlx::query: ")) {
            n += 1;
            *w.by_statement.entry(statement_summary(line)).or_default() += 1;
        }
        w.logged.insert(ms.clone(), n);
    }
    Ok(w)
}

/// sqlx's `summary="..."` field (the statement's first four words), without the trailing ellipsis.
fn statement_summary(line: &str) -> String {
    line.split_once("summary=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(s, _)| s.trim_end_matches('…').trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// A connection of its own that reads MariaDB's global `Questions` counter.
struct Questions {
    conn: sqlx::AnyConnection,
}

impl Questions {
    async fn connect(server_url: &str) -> Result<Questions> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let url = server_url.trim_end_matches('/').replacen("mariadb://", "mysql://", 1);
        let conn = sqlx::AnyConnection::connect(&url).await.context("connect to the MariaDB server")?;
        Ok(Questions { conn })
    }

    async fn read(&mut self) -> Result<u64> {
        use sqlx::{Executor, Row};
        // A plain-text statement (no prepare): one question per read.
        let row = (&mut self.conn).fetch_one("SHOW GLOBAL STATUS LIKE 'Questions'").await?;
        let v: String = row.try_get(1)?;
        match v.trim().parse() {
            Ok(n) => Ok(n),
            Err(_) => bail!("unexpected Questions value {v:?}"),
        }
    }

    async fn close(self) {
        use sqlx::Connection;
        let _ = self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_of_a_statement_line() {
        let l = r#"2026-11-22T03:00:00.000Z DEBUG sqlx::query: summary="UPDATE management_server SET last_heartbeat_ms …" db.statement="\n\nUPDATE ..." rows_affected=1"#;
        assert_eq!(super::statement_summary(l), "UPDATE management_server SET last_heartbeat_ms");
        assert_eq!(super::statement_summary("x"), "?");
    }
}
