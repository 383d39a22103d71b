//! Ground truth for tests and benchmarks: the agents' ledgers (JSON lines, one entry per command
//! an agent executed, replayed or refused, and per event such as a self-fence or a crash).

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Every entry of a ledger file (none if the file does not exist yet).
pub fn read_ledger(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("ledger line of {}: {l}", path.display())))
        .collect()
}

/// What replaying a ledger found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Violations of invariants 5 and 7, one line each (empty when the ledger is clean).
    pub problems: Vec<String>,
    /// Where each VM runs at the end (VM id -> host guid).
    pub running: HashMap<String, String>,
}

/// Replay `entries` in their order (sort them by `ts_ms` first when they come from several
/// ledgers) and check invariants 5 and 7: every `(job, step)` executed at most once, and no VM
/// running on two hosts at once.
///
/// A run starts with an executed, ok command leaving the VM `Running` (start, migrate_abort; a
/// check or reboot of a running VM changes nothing). It ends on *that* host with any entry that
/// leaves the VM `Stopped` there: an executed, ok command (stop, destroy, migrate_out, ...) or an
/// event (`self_fence`, `storage_lost`, `crash`, or any other non-command kind, such as a host's
/// death recorded by the caller); an event with an empty `vm` ends every run of its host.
/// Replays and refusals change nothing, and a `Stopped` on another host (an idempotent stop, the
/// source's migrate_done) does not end the run.
pub fn replay_ledger(entries: &[Value]) -> Replay {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for e in entries.iter().filter(|e| e["kind"] == "exec") {
        let k = (e["job"].to_string(), e["step"].to_string());
        if !seen.insert(k.clone()) {
            problems.push(format!("(job, step) {k:?} executed twice: {e}"));
        }
    }
    let mut running: HashMap<String, String> = HashMap::new();
    for e in entries {
        let kind = e["kind"].as_str().unwrap_or("");
        let effective = match kind {
            "exec" => e["outcome"] == "ok",
            "replay" | "stale" | "unknown_host" => false,
            _ => true,
        };
        if !effective {
            continue;
        }
        let vm = e["vm"].as_str().unwrap_or("").to_string();
        let host = e["host"].as_str().unwrap_or("").to_string();
        match e["state"].as_str() {
            Some("Running") if kind == "exec" && !vm.is_empty() => {
                if let Some(h) = running.get(&vm)
                    && h != &host
                {
                    problems.push(format!("VM {vm} running on two hosts ({h} and {host}): {e}"));
                }
                running.insert(vm, host);
            }
            Some("Stopped") if vm.is_empty() && kind != "exec" => running.retain(|_, h| *h != host),
            Some("Stopped") if running.get(&vm) == Some(&host) => {
                running.remove(&vm);
            }
            _ => {}
        }
    }
    Replay { problems, running }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exec(job: &str, step: u32, vm: &str, host: &str, state: &str) -> Value {
        json!({ "kind": "exec", "outcome": "ok", "job": job, "step": step, "vm": vm, "host": host, "state": state })
    }

    #[test]
    fn clean_and_broken_ledgers() {
        let clean = vec![
            exec("j1", 1, "vm1", "a", "Running"),
            json!({ "kind": "host_dead", "host": "a", "vm": "", "state": "Stopped" }),
            exec("j2", 1, "vm1", "b", "Running"),
        ];
        let r = replay_ledger(&clean);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.running.get("vm1").map(String::as_str), Some("b"));
        // Started elsewhere while the first copy still runs; a (job, step) executed twice.
        let twice = vec![exec("j1", 1, "vm1", "a", "Running"), exec("j1", 1, "vm1", "b", "Running")];
        let r = replay_ledger(&twice);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        // A replay changes nothing; an idempotent stop on another host does not end the run.
        let benign = vec![
            exec("j1", 1, "vm1", "a", "Running"),
            json!({ "kind": "replay", "job": "j1", "step": 1, "vm": "vm1", "host": "a", "state": "Running" }),
            exec("j3", 1, "vm1", "b", "Stopped"),
        ];
        let r = replay_ledger(&benign);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.running.get("vm1").map(String::as_str), Some("a"));
    }
}
