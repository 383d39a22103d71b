//! The agent's ledger: one JSON line per executed, replayed or refused command, appended to a file.
//!
//! Each line is written with a single `write_all` on a file opened in append mode, under one mutex,
//! before the answer goes to the management server. Lines therefore never interleave, and a line is
//! in the OS's hands even if the agent process dies right after answering (no fsync: a crash of the
//! whole machine may lose the tail).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use skyhold_proto::{CommandResult, PowerState};

use crate::AgentError;

/// Why a ledger line was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerKind {
    /// The command was executed by the simulator.
    Exec,
    /// A repeated `(job, step)`: the stored result was returned, nothing was executed.
    Replay,
    /// Refused: the command's generation is older than the host's newest; nothing was executed.
    Stale,
    /// Refused: this agent does not serve the host; nothing was executed.
    UnknownHost,
    /// Not a command: the agent fenced itself (no management server and no storage heartbeat for its
    /// self-fence period) and stopped this VM. `state` is `Stopped`.
    SelfFence,
    /// Not a command: the host could not write its storage heartbeat for the storage timeout and
    /// stopped this VM. `state` is `Stopped`.
    StorageLost,
    /// Not a command: the VM crashed (crash injection through the control directory). `state` is
    /// `Stopped`.
    Crash,
}

impl LedgerKind {
    /// The name used on the wire and as the `op` of event entries ("self_fence", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Exec => "exec",
            LedgerKind::Replay => "replay",
            LedgerKind::Stale => "stale",
            LedgerKind::UnknownHost => "unknown_host",
            LedgerKind::SelfFence => "self_fence",
            LedgerKind::StorageLost => "storage_lost",
            LedgerKind::Crash => "crash",
        }
    }
}

/// One ledger line: a command (executed, replayed or refused) or an event of the host that changed
/// a VM without a command (`self_fence`, `storage_lost`, `crash`: `op` is the kind, `job` is empty,
/// `step` 0, `generation` the host's newest, `outcome` "ok", `state` Stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub agent: String,
    /// Host guid.
    pub host: String,
    pub vm: String,
    /// [`skyhold_proto::Command::name`] ("start", "stop", "reboot", "destroy", "check", "check_host",
    /// "migrate_out", "migrate_done", "migrate_abort"), or the event's kind.
    pub op: String,
    pub job: String,
    pub step: u32,
    pub generation: u64,
    pub kind: LedgerKind,
    /// The result's tag: "ok", "failed", "stale_generation", "unknown_host" or "host_check".
    pub outcome: String,
    /// Power state after the command, for "ok" outcomes.
    pub state: Option<PowerState>,
    pub message: Option<String>,
}

impl LedgerEntry {
    /// Fill `outcome`, `state` and `message` from a result.
    pub(crate) fn set_result(&mut self, result: &CommandResult) {
        let (outcome, state, message) = match result {
            CommandResult::Ok { state } => ("ok", Some(*state), None),
            CommandResult::Failed { message } => ("failed", None, Some(message.clone())),
            CommandResult::StaleGeneration { current } => (
                "stale_generation",
                None,
                Some(format!("generation {} is older than current generation {current}", self.generation)),
            ),
            CommandResult::UnknownHost => {
                ("unknown_host", None, Some(format!("host {} is not served by this agent", self.host)))
            }
            CommandResult::HostCheck { reachable, heartbeat, storage_ok } => {
                let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
                (
                    "host_check",
                    None,
                    Some(format!(
                        "reachable={} heartbeat={} storage_ok={storage_ok}",
                        show(reachable.map(|r| r.to_string())),
                        show(heartbeat.map(|h| h.to_string())),
                    )),
                )
            }
        };
        self.outcome = outcome.to_owned();
        self.state = state;
        self.message = message;
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The single writer of a ledger file.
#[derive(Debug)]
pub(crate) struct Ledger {
    path: PathBuf,
    file: Mutex<File>,
}

impl Ledger {
    /// Open (create) `path` for appending.
    pub(crate) fn open(path: &Path) -> Result<Ledger, AgentError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AgentError::LedgerIo { path: path.to_owned(), source })?;
        Ok(Ledger { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// Append one line and flush it. Failures are logged, never returned: the agent keeps serving.
    pub(crate) fn append(&self, entry: &LedgerEntry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot encode ledger entry");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.write_all(&line).and_then(|()| file.flush()) {
            tracing::error!(
                path = %self.path.display(),
                error = %e,
                job = %entry.job,
                step = entry.step,
                "cannot write ledger entry"
            );
        }
    }
}

/// Read every entry of a ledger file, in order.
///
/// A last line without its newline (the agent died while writing it) is ignored if it does not
/// parse; any other malformed line is an error.
pub fn ledger_read(path: impl AsRef<Path>) -> Result<Vec<LedgerEntry>, AgentError> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).map_err(|source| AgentError::LedgerIo { path: path.to_owned(), source })?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(entry) => out.push(entry),
            Err(_) if !complete && i + 1 == lines.len() => {
                tracing::warn!(path = %path.display(), line = i + 1, "ignoring truncated last ledger line");
            }
            Err(source) => {
                return Err(AgentError::LedgerParse { path: path.to_owned(), line: i + 1, source });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u32) -> LedgerEntry {
        let mut e = LedgerEntry {
            ts_ms: now_ms(),
            agent: "a".into(),
            host: "a-h0".into(),
            vm: "v".into(),
            op: "start".into(),
            job: "j".into(),
            step,
            generation: 1,
            kind: LedgerKind::Exec,
            outcome: String::new(),
            state: None,
            message: None,
        };
        e.set_result(&CommandResult::Ok { state: PowerState::Running });
        e
    }

    #[test]
    fn append_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let l = Ledger::open(&path).unwrap();
        l.append(&entry(1));
        l.append(&entry(2));
        drop(l);
        // Reopening appends.
        Ledger::open(&path).unwrap().append(&entry(3));
        let got = ledger_read(&path).unwrap();
        assert_eq!(got.iter().map(|e| e.step).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(got[0].outcome, "ok");
        assert_eq!(got[0].state, Some(PowerState::Running));

        let raw = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(raw.lines().next().unwrap()).unwrap();
        assert_eq!(v["kind"], "exec");
        assert_eq!(v["state"], "Running");
        assert!(v["message"].is_null());

        // A truncated tail is tolerated; a broken middle line is not.
        std::fs::write(&path, format!("{}{{\"ts_ms\":1", raw)).unwrap();
        assert_eq!(ledger_read(&path).unwrap().len(), 3);
        std::fs::write(&path, format!("garbage\n{raw}")).unwrap();
        let e = ledger_read(&path).unwrap_err();
        assert!(matches!(e, AgentError::LedgerParse { line: 1, .. }), "{e}");
    }

    #[test]
    fn result_mapping() {
        let mut e = entry(1);
        e.generation = 2;
        e.set_result(&CommandResult::StaleGeneration { current: 5 });
        assert_eq!(e.outcome, "stale_generation");
        assert_eq!(e.message.as_deref(), Some("generation 2 is older than current generation 5"));
        e.set_result(&CommandResult::Failed { message: "boom".into() });
        assert_eq!((e.outcome.as_str(), e.message.as_deref()), ("failed", Some("boom")));
        assert_eq!(e.state, None);
    }
}
