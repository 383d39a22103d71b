//! Crash points for the chaos tests: `SKYHOLD_FAILPOINT=NAME:N` makes the process abort (as a
//! SIGKILL would, without any clean-up) the N-th time execution passes the point NAME. Unset in
//! production; read once.
//!
//! Points: `after_agent_answer` (a step's command was executed by the agent and answered, its
//! result not yet recorded), `after_step_saved` (a step was recorded, the next not started).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn config() -> &'static Option<Point> {
    static CFG: OnceLock<Option<Point>> = OnceLock::new();
    CFG.get_or_init(|| {
        let v = std::env::var("SKYHOLD_FAILPOINT").ok()?;
        let (name, n) = v.split_once(':').unwrap_or((v.as_str(), "1"));
        Some(Point { name: name.to_string(), at: n.parse().unwrap_or(1).max(1), seen: AtomicU64::new(0) })
    })
}

/// Abort here if this point is armed and its count is reached.
pub fn hit(name: &str) {
    if let Some(p) = config()
        && p.name == name
        && p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.at
    {
        tracing::error!(point = name, "failpoint reached: aborting the process (test crash)");
        std::process::abort();
    }
}
