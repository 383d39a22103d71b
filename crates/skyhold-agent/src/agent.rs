//! The transport-independent core of the agent: generation fencing, `(job_id, step)` replay, the
//! simulated hosts and the ledger.
//!
//! Locking: each host has its own mutex, held for the whole of one command (fencing check, replay
//! lookup, execution, ledger line), so per host the ledger order is the execution order. The replay
//! cache and the ledger file have their own short-lived mutexes, always taken after a host's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use skyhold_proto::{Command, CommandResult, HostGrant, HostPing, HostReport};

use crate::ledger::{Ledger, LedgerEntry, LedgerKind, now_ms};
use crate::{AgentConfig, AgentError, Simulator};

/// How many `(job_id, step)` results the agent remembers for replay.
pub const REPLAY_CAPACITY: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these structures half-updated in a way that matters
    // more than stopping the agent would; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
struct HostState {
    sim: Simulator,
    /// Newest ownership generation seen for this host (from a Welcome grant or a command).
    max_generation: u64,
    /// The MS's id for the host, from the last Welcome (for logs).
    host_id: Option<String>,
}

type ReplayKey = (String, u32);

/// Bounded map `(job_id, step) -> result`, forgetting the oldest entries first.
#[derive(Debug)]
struct ReplayCache {
    cap: usize,
    map: HashMap<ReplayKey, CommandResult>,
    order: VecDeque<ReplayKey>,
}

impl ReplayCache {
    fn new(cap: usize) -> ReplayCache {
        ReplayCache { cap: cap.max(1), map: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&self, job_id: &str, step: u32) -> Option<CommandResult> {
        self.map.get(&(job_id.to_owned(), step)).cloned()
    }

    fn insert(&mut self, job_id: &str, step: u32, result: CommandResult) {
        let key = (job_id.to_owned(), step);
        if self.map.insert(key.clone(), result).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The agent's state: its simulated hosts, fencing generations, replay cache and ledger.
#[derive(Debug)]
pub struct Agent {
    agent_id: String,
    hosts: Vec<(String, Mutex<HostState>)>,
    by_guid: HashMap<String, usize>,
    replay: Mutex<ReplayCache>,
    ledger: Option<Ledger>,
}

impl Agent {
    /// Build the hosts described by `cfg` (all empty, generation 0) and open the ledger.
    pub fn new(cfg: &AgentConfig) -> Result<Agent, AgentError> {
        Agent::with_replay_capacity(cfg, REPLAY_CAPACITY)
    }

    /// Like [`Agent::new`] with a different replay-cache bound.
    pub fn with_replay_capacity(cfg: &AgentConfig, replay_cap: usize) -> Result<Agent, AgentError> {
        if cfg.agent_id.trim().is_empty() {
            return Err(AgentError::Config("agent id must not be empty".into()));
        }
        if cfg.hosts == 0 {
            return Err(AgentError::Config("the agent must simulate at least one host".into()));
        }
        let ledger = cfg.ledger_path.as_deref().map(Ledger::open).transpose()?;
        let mut hosts = Vec::new();
        let mut by_guid = HashMap::new();
        for i in 0..cfg.hosts {
            let guid = cfg.host_guid(i);
            let sim = Simulator::new(guid.clone(), guid.clone(), cfg.host_cpu_cores, cfg.host_cpu_mhz, cfg.host_mem_mb)
                .with_fail_rules(cfg.fail_rules.clone());
            by_guid.insert(guid.clone(), hosts.len());
            hosts.push((guid, Mutex::new(HostState { sim, max_generation: 0, host_id: None })));
        }
        Ok(Agent {
            agent_id: cfg.agent_id.clone(),
            hosts,
            by_guid,
            replay: Mutex::new(ReplayCache::new(replay_cap)),
            ledger,
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Guids of the simulated hosts, in order.
    pub fn host_guids(&self) -> Vec<String> {
        self.hosts.iter().map(|(g, _)| g.clone()).collect()
    }

    fn host(&self, guid: &str) -> Option<&Mutex<HostState>> {
        self.by_guid.get(guid).and_then(|&i| self.hosts.get(i)).map(|(_, h)| h)
    }

    /// Newest generation seen for a host (`None` for a host this agent does not serve).
    pub fn max_generation(&self, guid: &str) -> Option<u64> {
        self.host(guid).map(|h| lock(h).max_generation)
    }

    /// Apply the grants of a `Welcome`: raise each host's generation to at least the granted one.
    /// (Never lowers it: a grant older than a generation already seen comes from a deposed MS.)
    pub fn apply_grants(&self, grants: &[HostGrant]) {
        for g in grants {
            let Some(h) = self.host(&g.guid) else {
                tracing::warn!(guid = %g.guid, host_id = %g.host_id, "welcome grants a host this agent does not serve");
                continue;
            };
            let mut h = lock(h);
            if g.generation < h.max_generation {
                tracing::warn!(
                    guid = %g.guid,
                    granted = g.generation,
                    current = h.max_generation,
                    "welcome grants an older generation than already seen; keeping the newer one"
                );
            } else {
                h.max_generation = g.generation;
            }
            h.host_id = Some(g.host_id.clone());
        }
    }

    /// Registration reports of every host, with the VMs each runs now.
    pub fn host_reports(&self, ip: &str) -> Vec<HostReport> {
        self.hosts.iter().map(|(_, h)| lock(h).sim.report(ip)).collect()
    }

    /// Ping reports of every host.
    pub fn pings(&self) -> Vec<HostPing> {
        self.hosts.iter().map(|(_, h)| lock(h).sim.ping()).collect()
    }

    /// Handle one command: fence on generation, replay a known `(job_id, step)`, else execute.
    /// The ledger line is written before this returns.
    ///
    /// Blocking (host mutex, ledger file): call from a blocking-capable thread in async code.
    pub fn handle(&self, host_guid: &str, generation: u64, job_id: &str, step: u32, cmd: &Command) -> CommandResult {
        let mut entry = LedgerEntry {
            ts_ms: 0,
            agent: self.agent_id.clone(),
            host: host_guid.to_owned(),
            vm: cmd.vm_id().to_owned(),
            op: cmd.name().to_owned(),
            job: job_id.to_owned(),
            step,
            generation,
            kind: LedgerKind::Exec,
            outcome: String::new(),
            state: None,
            message: None,
        };
        let Some(host) = self.host(host_guid) else {
            tracing::warn!(host = %host_guid, job = %job_id, step, op = cmd.name(), vm = %cmd.vm_id(), "refused command for unknown host");
            let result = CommandResult::UnknownHost;
            self.record(&mut entry, LedgerKind::UnknownHost, &result);
            return result;
        };
        let mut host = lock(host);
        if generation < host.max_generation {
            tracing::warn!(
                host = %host_guid,
                host_id = host.host_id.as_deref().unwrap_or("-"),
                generation,
                current = host.max_generation,
                job = %job_id,
                step,
                op = cmd.name(),
                vm = %cmd.vm_id(),
                "refused command with stale generation"
            );
            let result = CommandResult::StaleGeneration { current: host.max_generation };
            self.record(&mut entry, LedgerKind::Stale, &result);
            return result;
        }
        if generation > host.max_generation {
            tracing::info!(host = %host_guid, generation, previous = host.max_generation, "host generation raised by command");
            host.max_generation = generation;
        }
        let cached = lock(&self.replay).get(job_id, step);
        if let Some(result) = cached {
            tracing::info!(host = %host_guid, job = %job_id, step, op = cmd.name(), vm = %cmd.vm_id(), "replayed command result");
            self.record(&mut entry, LedgerKind::Replay, &result);
            return result;
        }
        let result = host.sim.execute(cmd);
        lock(&self.replay).insert(job_id, step, result.clone());
        self.record(&mut entry, LedgerKind::Exec, &result);
        match &result {
            CommandResult::Failed { message } => tracing::warn!(
                host = %host_guid, job = %job_id, step, op = cmd.name(), vm = %cmd.vm_id(), %message,
                "command failed"
            ),
            _ => {
                tracing::debug!(host = %host_guid, job = %job_id, step, op = cmd.name(), vm = %cmd.vm_id(), ?result, "command executed")
            }
        }
        result
    }

    fn record(&self, entry: &mut LedgerEntry, kind: LedgerKind, result: &CommandResult) {
        if let Some(ledger) = &self.ledger {
            entry.ts_ms = now_ms();
            entry.kind = kind;
            entry.set_result(result);
            ledger.append(entry);
        }
    }

    /// Number of results currently remembered for replay.
    pub fn replay_len(&self) -> usize {
        lock(&self.replay).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger_read;
    use skyhold_proto::PowerState;

    fn cfg(ledger: Option<std::path::PathBuf>) -> AgentConfig {
        AgentConfig {
            mgmt_addrs: vec!["127.0.0.1:1".into()],
            token: "t".into(),
            agent_id: "ag".into(),
            hosts: 2,
            host_cpu_cores: 8,
            host_cpu_mhz: 2000,
            host_mem_mb: 8192,
            ledger_path: ledger,
            fail_rules: vec![],
            command_delay_ms: 0,
        }
    }

    fn start(vm: &str) -> Command {
        Command::StartVm { vm_id: vm.into(), name: vm.into(), cpu: 1, mem_mb: 512 }
    }

    fn stop(vm: &str) -> Command {
        Command::StopVm { vm_id: vm.into(), force: false }
    }

    const RUNNING: CommandResult = CommandResult::Ok { state: PowerState::Running };
    const STOPPED: CommandResult = CommandResult::Ok { state: PowerState::Stopped };

    fn grant(guid: &str, generation: u64) -> HostGrant {
        HostGrant { guid: guid.into(), host_id: format!("id-{guid}"), generation }
    }

    #[test]
    fn config_validation() {
        let mut c = cfg(None);
        c.hosts = 0;
        assert!(matches!(Agent::new(&c), Err(AgentError::Config(_))));
        let mut c = cfg(None);
        c.agent_id = " ".into();
        assert!(matches!(Agent::new(&c), Err(AgentError::Config(_))));
        let mut c = cfg(Some("/nonexistent-dir/x/ledger".into()));
        c.hosts = 1;
        assert!(matches!(Agent::new(&c), Err(AgentError::LedgerIo { .. })));
        let a = Agent::new(&cfg(None)).unwrap();
        assert_eq!(a.host_guids(), ["ag-h0", "ag-h1"]);
    }

    #[test]
    fn generation_fencing() {
        let a = Agent::new(&cfg(None)).unwrap();
        a.apply_grants(&[grant("ag-h0", 5), grant("ag-h1", 2), grant("other", 9)]);
        assert_eq!(a.max_generation("ag-h0"), Some(5));
        assert_eq!(a.max_generation("ag-h1"), Some(2));
        assert_eq!(a.max_generation("other"), None);

        // Older than the grant: refused and not executed.
        assert_eq!(a.handle("ag-h0", 4, "j1", 1, &start("v1")), CommandResult::StaleGeneration { current: 5 });
        assert!(a.pings()[0].vms.is_empty());
        // Equal: executed.
        assert_eq!(a.handle("ag-h0", 5, "j2", 1, &start("v1")), RUNNING);
        // Newer: executed and raises the bar; the previous generation is now stale.
        assert_eq!(a.handle("ag-h0", 7, "j3", 1, &start("v2")), RUNNING);
        assert_eq!(a.max_generation("ag-h0"), Some(7));
        assert_eq!(a.handle("ag-h0", 5, "j4", 1, &stop("v1")), CommandResult::StaleGeneration { current: 7 });
        assert_eq!(a.pings()[0].vms.len(), 2);
        // Generations are per host.
        assert_eq!(a.handle("ag-h1", 2, "j5", 1, &start("v3")), RUNNING);
        // A Welcome never lowers a generation.
        a.apply_grants(&[grant("ag-h0", 6)]);
        assert_eq!(a.max_generation("ag-h0"), Some(7));
        // Unknown host.
        assert_eq!(a.handle("nope", 100, "j6", 1, &start("v4")), CommandResult::UnknownHost);
    }

    #[test]
    fn replay_returns_stored_result_without_executing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let a = Agent::new(&cfg(Some(path.clone()))).unwrap();
        a.apply_grants(&[grant("ag-h0", 1)]);
        assert_eq!(a.handle("ag-h0", 1, "job-a", 1, &start("v1")), RUNNING);
        assert_eq!(a.handle("ag-h0", 1, "job-b", 1, &stop("v1")), STOPPED);
        // Replaying (job-a, 1) answers Running but does not start v1 again.
        assert_eq!(a.handle("ag-h0", 1, "job-a", 1, &start("v1")), RUNNING);
        assert!(a.pings()[0].vms.is_empty());
        // Same job, next step is a new command.
        assert_eq!(a.handle("ag-h0", 1, "job-a", 2, &start("v1")), RUNNING);
        assert_eq!(a.pings()[0].vms.len(), 1);
        // A stale replay is refused, not replayed.
        a.apply_grants(&[grant("ag-h0", 2)]);
        assert_eq!(a.handle("ag-h0", 1, "job-a", 2, &start("v1")), CommandResult::StaleGeneration { current: 2 });
        // Failures are remembered too.
        let big = Command::StartVm { vm_id: "big".into(), name: "big".into(), cpu: 64, mem_mb: 1 };
        let r1 = a.handle("ag-h0", 2, "job-c", 1, &big);
        assert!(matches!(r1, CommandResult::Failed { .. }));
        assert_eq!(a.handle("ag-h0", 2, "job-c", 1, &big), r1);
        assert_eq!(a.handle("zz", 2, "job-d", 1, &big), CommandResult::UnknownHost);

        let kinds: Vec<(String, u32, LedgerKind, String)> =
            ledger_read(&path).unwrap().into_iter().map(|e| (e.job, e.step, e.kind, e.outcome)).collect();
        let want = [
            ("job-a", 1, LedgerKind::Exec, "ok"),
            ("job-b", 1, LedgerKind::Exec, "ok"),
            ("job-a", 1, LedgerKind::Replay, "ok"),
            ("job-a", 2, LedgerKind::Exec, "ok"),
            ("job-a", 2, LedgerKind::Stale, "stale_generation"),
            ("job-c", 1, LedgerKind::Exec, "failed"),
            ("job-c", 1, LedgerKind::Replay, "failed"),
            ("job-d", 1, LedgerKind::UnknownHost, "unknown_host"),
        ]
        .map(|(j, s, k, o)| (j.to_owned(), s, k, o.to_owned()));
        assert_eq!(kinds, want);
    }

    #[test]
    fn replay_cache_is_bounded() {
        let a = Agent::with_replay_capacity(&cfg(None), 3).unwrap();
        for step in 0..5 {
            a.handle("ag-h0", 0, "j", step, &start(&format!("v{step}")));
        }
        assert_eq!(a.replay_len(), 3);
        // (j, 1) was evicted: a command with that key executes.
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &stop("v0")), STOPPED);
        assert!(!a.pings()[0].vms.iter().any(|v| v.vm_id == "v0"));
        // (j,4) is remembered: replay, v4 keeps running even though the command says start.
        assert_eq!(a.handle("ag-h0", 0, "j", 4, &stop("v4")), RUNNING);
        assert!(a.pings()[0].vms.iter().any(|v| v.vm_id == "v4"));
    }

    #[test]
    fn replay_cache_eviction_order() {
        let mut c = ReplayCache::new(2);
        c.insert("a", 1, RUNNING);
        c.insert("a", 1, STOPPED); // overwrite does not grow the order list
        c.insert("b", 1, RUNNING);
        c.insert("c", 1, RUNNING);
        assert_eq!(c.get("a", 1), None);
        assert_eq!(c.get("b", 1), Some(RUNNING));
        assert_eq!(c.get("c", 1), Some(RUNNING));
        assert_eq!(c.len(), 2);
        assert_eq!(c.order.len(), 2);
    }
}
