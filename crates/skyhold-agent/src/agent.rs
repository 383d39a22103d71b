//! The transport-independent core of the agent: generation fencing, `(job_id, step)` replay, the
//! simulated hosts, the ledger, and host health (storage heartbeat, storage loss, self-fencing,
//! crash injection, neighbour checks).
//!
//! Locking: each host has its own mutex, held for the whole of one command (fencing check, replay
//! lookup, execution, ledger line), so per host the ledger order is the execution order. The replay
//! cache and the ledger file have their own short-lived mutexes, always taken after a host's. The
//! self-fence clock (`watch`) is taken before any host's, and held through a whole fence, so a
//! contact that arrives after the deadline waits until every `self_fence` line is written.
//!
//! Time comes in as an argument (`now`) wherever a deadline is involved, so unit tests replay
//! timelines without waiting.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use skyhold_proto::{Command, CommandResult, HostGrant, HostPing, HostReport, PowerState};

use crate::health::{Contact, Watch};
use crate::ledger::{Ledger, LedgerEntry, LedgerKind, now_ms};
use crate::storage::{Storage, safe_file_name};
use crate::{AgentConfig, AgentError, CRASH_DIR, Simulator};

/// Answer to a start while the host's storage is lost.
pub const STORAGE_UNAVAILABLE: &str = "primary storage unavailable";
/// Answer to a start between a self-fence and the next contact with a management server (a command
/// that was in flight when the agent gave up).
pub const SELF_FENCED: &str = "host self-fenced: no management server and no storage heartbeat";

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
    hb: Heartbeat,
}

/// One host's storage heartbeat.
#[derive(Debug)]
struct Heartbeat {
    /// Last counter written successfully (the next write is this plus one).
    counter: u64,
    /// Whether the last write succeeded.
    ok: bool,
    /// Start of the last successful write (or the agent's start).
    last_ok: Instant,
    /// The storage timeout ran out: VMs were stopped, starts are refused until a write succeeds.
    lost: bool,
}

/// Whether a command makes a VM run (refused while storage is lost or after a self-fence).
fn starts_vm(cmd: &Command) -> bool {
    matches!(cmd, Command::StartVm { .. } | Command::MigrateAbort { .. })
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

/// The agent's state: its simulated hosts, fencing generations, replay cache, ledger and health.
#[derive(Debug)]
pub struct Agent {
    agent_id: String,
    hosts: Vec<(String, Mutex<HostState>)>,
    by_guid: HashMap<String, usize>,
    replay: Mutex<ReplayCache>,
    ledger: Option<Ledger>,
    storage: Option<Storage>,
    control_dir: Option<PathBuf>,
    heartbeat_interval: Duration,
    storage_timeout: Duration,
    /// The self-fence clock.
    watch: Mutex<Watch>,
    /// From the start of a self-fence until the next `Welcome` or `Pong`: starts are refused.
    fence_hold: AtomicBool,
    /// The check listener's address, once bound.
    check_addr: Mutex<Option<SocketAddr>>,
    /// The configured zone, pod and cluster, reported with every host.
    place: skyhold_proto::HostPlace,
}

/// Refuse timing settings that cannot work.
fn check_timing(cfg: &AgentConfig) -> Result<(), AgentError> {
    if cfg.heartbeat_interval_ms == 0 {
        return Err(AgentError::Config("the heartbeat interval must be at least 1 ms".into()));
    }
    for (name, v) in [("storage timeout", cfg.storage_timeout_ms), ("self-fence period", cfg.self_fence_after_ms)] {
        if v <= cfg.heartbeat_interval_ms {
            return Err(AgentError::Config(format!(
                "the {name} ({v} ms) must be longer than the heartbeat interval ({} ms)",
                cfg.heartbeat_interval_ms
            )));
        }
    }
    Ok(())
}

impl Agent {
    /// Build the hosts described by `cfg` (all empty, generation 0) and open the ledger.
    pub fn new(cfg: &AgentConfig) -> Result<Agent, AgentError> {
        Agent::with_replay_capacity(cfg, REPLAY_CAPACITY)
    }

    /// Like [`Agent::new`] with a different replay-cache bound.
    pub fn with_replay_capacity(cfg: &AgentConfig, replay_cap: usize) -> Result<Agent, AgentError> {
        Agent::build(cfg, replay_cap, Instant::now())
    }

    /// Build the agent as if started at `now` (the health clocks start there).
    pub(crate) fn build(cfg: &AgentConfig, replay_cap: usize, now: Instant) -> Result<Agent, AgentError> {
        if cfg.agent_id.trim().is_empty() {
            return Err(AgentError::Config("agent id must not be empty".into()));
        }
        if cfg.hosts == 0 {
            return Err(AgentError::Config("the agent must simulate at least one host".into()));
        }
        check_timing(cfg)?;
        let storage = cfg.storage.clone().map(Storage::new);
        if storage.is_some() && !safe_file_name(&cfg.host_guid(0)) {
            return Err(AgentError::Config(format!(
                "agent id {:?} cannot name a heartbeat file (no '/', no leading '.')",
                cfg.agent_id
            )));
        }
        let ledger = cfg.ledger_path.as_deref().map(Ledger::open).transpose()?;
        let mut hosts = Vec::new();
        let mut by_guid = HashMap::new();
        for i in 0..cfg.hosts {
            let guid = cfg.host_guid(i);
            let sim = Simulator::new(guid.clone(), guid.clone(), cfg.host_cpu_cores, cfg.host_cpu_mhz, cfg.host_mem_mb)
                .with_fail_rules(cfg.fail_rules.clone());
            // Continue the counter of a previous run, so neighbours never see it go backwards.
            let counter = storage.as_ref().and_then(|s| s.read_heartbeat(&guid).heartbeat).unwrap_or(0);
            let hb = Heartbeat { counter, ok: true, last_ok: now, lost: false };
            by_guid.insert(guid.clone(), hosts.len());
            hosts.push((guid, Mutex::new(HostState { sim, max_generation: 0, host_id: None, hb })));
        }
        let fence_period = storage.as_ref().map(|_| Duration::from_millis(cfg.self_fence_after_ms));
        Ok(Agent {
            agent_id: cfg.agent_id.clone(),
            hosts,
            by_guid,
            replay: Mutex::new(ReplayCache::new(replay_cap)),
            ledger,
            storage,
            control_dir: cfg.control_dir.clone(),
            heartbeat_interval: Duration::from_millis(cfg.heartbeat_interval_ms),
            storage_timeout: Duration::from_millis(cfg.storage_timeout_ms),
            watch: Mutex::new(Watch::new(now, fence_period)),
            fence_hold: AtomicBool::new(false),
            check_addr: Mutex::new(None),
            place: cfg.place.clone(),
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

    /// Registration reports of every host, with the VMs each runs now, its check address and its
    /// storage.
    pub fn host_reports(&self, ip: &str) -> Vec<HostReport> {
        let check_addr = lock(&self.check_addr).map(|a| crate::checknet::advertised(a, ip));
        let storage = self.storage.as_ref().map(Storage::identity);
        self.hosts
            .iter()
            .map(|(_, h)| {
                let mut r = lock(h).sim.report(ip);
                r.check_addr.clone_from(&check_addr);
                r.storage.clone_from(&storage);
                r.place.clone_from(&self.place);
                r
            })
            .collect()
    }

    /// Ping reports of every host, with its storage heartbeat and the self-fence flag.
    pub fn pings(&self) -> Vec<HostPing> {
        let fenced = lock(&self.watch).report_fenced();
        self.hosts
            .iter()
            .map(|(_, h)| {
                let h = lock(h);
                let mut p = h.sim.ping();
                if self.storage.is_some() {
                    p.heartbeat = h.hb.ok.then_some(h.hb.counter);
                    p.storage_ok = h.hb.ok;
                }
                p.fenced = fenced;
                p
            })
            .collect()
    }

    /// Record the check listener's bound address (reported as every host's `check_addr`).
    pub fn set_check_addr(&self, addr: SocketAddr) {
        *lock(&self.check_addr) = Some(addr);
    }

    /// Whether the agent has shared storage or a control directory (and so needs heartbeat ticks).
    pub fn needs_ticks(&self) -> bool {
        self.storage.is_some() || self.control_dir.is_some()
    }

    /// Period of [`Agent::heartbeat_tick`].
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// A successful exchange with a management server (`Welcome` or `Pong`) at `now`. Fences first
    /// if the self-fence deadline has passed. Blocking (ledger) only in that case.
    pub(crate) fn ms_contact(&self, now: Instant, what: Contact) {
        let mut watch = lock(&self.watch);
        self.fence_if_due(&mut watch, now);
        watch.contact(now, what);
        // A management server is there again: what it sends now is meant.
        self.fence_hold.store(false, Ordering::SeqCst);
    }

    /// One heartbeat tick at `now`: write every host's storage heartbeat, then apply the storage
    /// timeout and the self-fence deadline, then crash the VMs named in the control directory.
    /// Blocking (files).
    pub fn heartbeat_tick(&self, now: Instant) {
        if let Some(storage) = &self.storage {
            // Whatever this tick writes counts from `now`: a fence that was due before counts first.
            self.check_deadlines(now);
            let mut any_ok = false;
            for (guid, h) in &self.hosts {
                let next = lock(h).hb.counter.saturating_add(1);
                let res = storage.write_heartbeat(guid, next);
                let mut h = lock(h);
                match res {
                    Ok(()) => {
                        any_ok = true;
                        h.hb.counter = next;
                        h.hb.last_ok = h.hb.last_ok.max(now);
                        if !h.hb.ok {
                            tracing::info!(host = %guid, counter = next, "storage heartbeat written again");
                        }
                        h.hb.ok = true;
                        if h.hb.lost {
                            h.hb.lost = false;
                            tracing::warn!(host = %guid, "primary storage is back: starts accepted again");
                        }
                    }
                    Err(e) => {
                        if h.hb.ok {
                            tracing::warn!(
                                host = %guid,
                                storage = %storage.root().display(),
                                error = %e,
                                "cannot write the storage heartbeat"
                            );
                        }
                        h.hb.ok = false;
                    }
                }
            }
            if any_ok {
                let mut watch = lock(&self.watch);
                self.fence_if_due(&mut watch, now);
                watch.storage_ok(now);
            }
        }
        self.check_deadlines(now);
        self.crash_tick();
    }

    /// Apply the deadlines due at `now`: the storage timeout of each host, and the self-fence.
    pub fn check_deadlines(&self, now: Instant) {
        {
            let mut watch = lock(&self.watch);
            self.fence_if_due(&mut watch, now);
        }
        if self.storage.is_none() {
            return;
        }
        for (guid, h) in &self.hosts {
            let mut h = lock(h);
            if h.hb.lost || now < h.hb.last_ok + self.storage_timeout {
                continue;
            }
            h.hb.lost = true;
            let stopped = h.sim.stop_all();
            tracing::error!(
                host = %guid,
                silent_ms = now.saturating_duration_since(h.hb.last_ok).as_millis(),
                timeout_ms = self.storage_timeout.as_millis(),
                vms = ?stopped,
                "PRIMARY STORAGE LOST: cannot write the heartbeat; stopping every VM of the host and refusing starts"
            );
            for vm in stopped {
                self.record_event(guid, &h, &vm, LedgerKind::StorageLost, "primary storage unavailable".into());
            }
        }
    }

    /// When the next deadline (storage timeout of a host, self-fence) falls, if any is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let fence = lock(&self.watch).deadline();
        let storage = if self.storage.is_some() {
            self.hosts
                .iter()
                .filter_map(|(_, h)| {
                    let h = lock(h);
                    (!h.hb.lost).then_some(h.hb.last_ok + self.storage_timeout)
                })
                .min()
        } else {
            None
        };
        [fence, storage].into_iter().flatten().min()
    }

    /// The self-fence, if due: stop every VM of every host, one `self_fence` ledger line each, before
    /// the caller goes on (it holds `watch`, so no contact is counted meanwhile).
    fn fence_if_due(&self, watch: &mut Watch, now: Instant) {
        if !watch.due(now) {
            return;
        }
        self.fence_hold.store(true, Ordering::SeqCst);
        watch.fenced();
        let (no_ms, no_storage) = watch.silence(now);
        let mut count = 0;
        for (guid, h) in &self.hosts {
            let mut h = lock(h);
            for vm in h.sim.stop_all() {
                count += 1;
                let message = format!(
                    "self-fence: no management server for {} ms, no storage heartbeat for {} ms",
                    no_ms.as_millis(),
                    no_storage.as_millis()
                );
                self.record_event(guid, &h, &vm, LedgerKind::SelfFence, message);
            }
        }
        tracing::error!(
            agent = %self.agent_id,
            no_management_server_ms = no_ms.as_millis(),
            no_storage_heartbeat_ms = no_storage.as_millis(),
            stopped_vms = count,
            "SELF-FENCE: no management server and no storage heartbeat for the self-fence period; \
             stopped every VM of every host (a watchdog would reset the host here)"
        );
    }

    /// Crash the VMs named by files in `CONTROL_DIR/crash/` that run on one of this agent's hosts,
    /// and delete those files. Blocking (files).
    fn crash_tick(&self) {
        let Some(dir) = self.control_dir.as_ref().map(|d| d.join(CRASH_DIR)) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(vm) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            for (guid, h) in &self.hosts {
                let mut h = lock(h);
                if !h.sim.crash(&vm) {
                    continue;
                }
                tracing::warn!(host = %guid, vm = %vm, "simulated VM crash");
                self.record_event(guid, &h, &vm, LedgerKind::Crash, "simulated crash (control file)".into());
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove crash file");
                }
                break;
            }
        }
    }

    /// A ledger line for a VM stopped without a command.
    fn record_event(&self, guid: &str, h: &HostState, vm: &str, kind: LedgerKind, message: String) {
        if let Some(ledger) = &self.ledger {
            ledger.append(&LedgerEntry {
                ts_ms: now_ms(),
                agent: self.agent_id.clone(),
                host: guid.to_owned(),
                vm: vm.to_owned(),
                op: kind.as_str().to_owned(),
                job: String::new(),
                step: 0,
                generation: h.max_generation,
                kind,
                outcome: "ok".to_owned(),
                state: Some(PowerState::Stopped),
                message: Some(message),
            });
        }
    }

    /// Probe another host for `CheckHost`: connect to its check address, read its heartbeat through
    /// this agent's storage mount. Blocking (up to the connect timeout).
    fn check_host(&self, guid: &str, check_addr: Option<&str>) -> CommandResult {
        let reachable = check_addr.map(crate::checknet::reachable);
        let read = match &self.storage {
            Some(s) => s.read_heartbeat(guid),
            None => crate::storage::HeartbeatRead { heartbeat: None, storage_ok: false },
        };
        CommandResult::HostCheck { reachable, heartbeat: read.heartbeat, storage_ok: read.storage_ok }
    }

    /// Handle one command: fence on generation, replay a known `(job_id, step)`, else execute.
    /// The ledger line is written before this returns.
    ///
    /// Blocking (host mutex, ledger file, `CheckHost` probes): call from a blocking-capable thread in
    /// async code.
    pub fn handle(&self, host_guid: &str, generation: u64, job_id: &str, step: u32, cmd: &Command) -> CommandResult {
        // A neighbour check may take up to a second: probe before taking the host's lock (it has no
        // effect, so probing for a command that turns out stale or replayed costs nothing).
        let probe = match cmd {
            Command::CheckHost { guid, check_addr } => Some(self.check_host(guid, check_addr.as_deref())),
            _ => None,
        };
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
        let result = if let Some(probe) = probe {
            probe
        } else if starts_vm(cmd) && host.hb.lost {
            CommandResult::Failed { message: STORAGE_UNAVAILABLE.to_owned() }
        } else if starts_vm(cmd) && self.fence_hold.load(Ordering::SeqCst) {
            CommandResult::Failed { message: SELF_FENCED.to_owned() }
        } else {
            host.sim.execute(cmd)
        };
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
            ..AgentConfig::default()
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

    // ---- host health, with synthetic time ----

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A storage directory reached through a symlink (removing the link cuts the host off).
    struct Mount {
        _dir: tempfile::TempDir,
        real: std::path::PathBuf,
        link: std::path::PathBuf,
        ledger: std::path::PathBuf,
        control: std::path::PathBuf,
    }

    impl Mount {
        fn new() -> Mount {
            let dir = tempfile::tempdir().unwrap();
            let real = dir.path().join("primary");
            std::fs::create_dir(&real).unwrap();
            let link = dir.path().join("mount");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            let control = dir.path().join("control");
            std::fs::create_dir_all(control.join(CRASH_DIR)).unwrap();
            let ledger = dir.path().join("ledger.jsonl");
            Mount { _dir: dir, real, link, ledger, control }
        }
        fn cut(&self) {
            std::fs::remove_file(&self.link).unwrap();
        }
        fn restore(&self) {
            std::os::unix::fs::symlink(&self.real, &self.link).unwrap();
        }
        fn counter(&self, guid: &str) -> u64 {
            std::fs::read_to_string(self.real.join("heartbeat").join(guid)).unwrap().trim().parse().unwrap()
        }
        fn events(&self, kind: LedgerKind) -> Vec<(String, String)> {
            ledger_read(&self.ledger).unwrap().into_iter().filter(|e| e.kind == kind).map(|e| (e.host, e.vm)).collect()
        }
    }

    /// Heartbeat every 100 ms, storage timeout 1 s, self-fence 2 s.
    fn health_agent(m: &Mount, t0: Instant) -> Agent {
        let mut c = cfg(Some(m.ledger.clone()));
        c.storage = Some(m.link.clone());
        c.control_dir = Some(m.control.clone());
        c.heartbeat_interval_ms = 100;
        c.storage_timeout_ms = 1000;
        c.self_fence_after_ms = 2000;
        Agent::build(&c, 100, t0).unwrap()
    }

    fn vms_of(a: &Agent, host: usize) -> Vec<String> {
        a.pings()[host].vms.iter().map(|v| v.vm_id.clone()).collect()
    }

    fn failed(message: &str) -> CommandResult {
        CommandResult::Failed { message: message.into() }
    }

    #[test]
    fn timing_validation() {
        let mut c = cfg(None);
        c.heartbeat_interval_ms = 0;
        assert!(matches!(Agent::new(&c), Err(AgentError::Config(_))));
        let mut c = cfg(None);
        c.storage_timeout_ms = c.heartbeat_interval_ms;
        assert!(Agent::new(&c).unwrap_err().to_string().contains("storage timeout"));
        let mut c = cfg(None);
        c.self_fence_after_ms = 10;
        assert!(Agent::new(&c).unwrap_err().to_string().contains("self-fence period"));
        let mut c = cfg(None);
        c.agent_id = "a/b".into();
        assert!(Agent::new(&c).is_ok(), "no storage: any id");
        c.storage = Some("/tmp".into());
        assert!(Agent::new(&c).unwrap_err().to_string().contains("heartbeat file"));
    }

    #[test]
    fn heartbeat_pings_and_reports() {
        let m = Mount::new();
        let t0 = Instant::now();
        let a = health_agent(&m, t0);
        a.set_check_addr("0.0.0.0:4567".parse().unwrap());
        a.heartbeat_tick(t0);
        a.heartbeat_tick(t0 + MS(100));
        assert_eq!((m.counter("ag-h0"), m.counter("ag-h1")), (2, 2));
        let p = &a.pings()[1];
        assert_eq!((p.heartbeat, p.storage_ok, p.fenced), (Some(2), true, false));
        let r = &a.host_reports("10.0.0.5")[0];
        assert_eq!(r.check_addr.as_deref(), Some("10.0.0.5:4567"));
        assert_eq!(r.storage, Some(std::fs::canonicalize(&m.real).unwrap().display().to_string()));
        // A restarted agent continues the counter.
        drop(a);
        let a = health_agent(&m, t0);
        a.heartbeat_tick(t0);
        assert_eq!(m.counter("ag-h0"), 3);
        // Without storage: no heartbeat, storage ok, no storage identity.
        let plain = Agent::new(&cfg(None)).unwrap();
        let p = &plain.pings()[0];
        assert_eq!((p.heartbeat, p.storage_ok, p.fenced), (None, true, false));
        assert_eq!(plain.host_reports("1.2.3.4")[0].storage, None);
        assert_eq!(plain.host_reports("1.2.3.4")[0].check_addr, None);
        assert_eq!(plain.next_deadline(), None);
    }

    #[test]
    fn storage_loss_stops_vms_refuses_starts_and_recovers() {
        let m = Mount::new();
        let t0 = Instant::now();
        let a = health_agent(&m, t0);
        a.heartbeat_tick(t0);
        // Keep the management server "present" so only the storage rule acts.
        a.ms_contact(t0, Contact::Welcome);
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &start("v1")), RUNNING);
        assert_eq!(a.handle("ag-h0", 0, "j", 2, &start("v2")), RUNNING);
        assert_eq!(a.handle("ag-h1", 0, "j", 3, &start("v3")), RUNNING);
        m.cut();
        a.heartbeat_tick(t0 + MS(100));
        let p = &a.pings()[0];
        assert_eq!((p.heartbeat, p.storage_ok), (None, false));
        assert_eq!(vms_of(&a, 0), ["v1", "v2"], "nothing stops before the timeout");
        assert_eq!(a.next_deadline(), Some(t0 + MS(1000)));
        for t in (200..1000).step_by(100) {
            a.ms_contact(t0 + MS(t), Contact::Pong);
            a.heartbeat_tick(t0 + MS(t));
        }
        a.check_deadlines(t0 + MS(999));
        assert!(m.events(LedgerKind::StorageLost).is_empty());
        // Starts are still accepted before the timeout.
        assert_eq!(a.handle("ag-h1", 0, "j", 4, &start("v4")), RUNNING);
        a.check_deadlines(t0 + MS(1000));
        let lost = m.events(LedgerKind::StorageLost);
        let want =
            [("ag-h0", "v1"), ("ag-h0", "v2"), ("ag-h1", "v3"), ("ag-h1", "v4")].map(|(h, v)| (h.into(), v.into()));
        assert_eq!(lost, want);
        assert!(vms_of(&a, 0).is_empty() && vms_of(&a, 1).is_empty());
        assert_eq!(a.handle("ag-h0", 0, "j", 5, &start("v1")), failed(STORAGE_UNAVAILABLE));
        // Stops still work (nothing runs), and a check answers.
        assert_eq!(a.handle("ag-h0", 0, "j", 6, &stop("v1")), STOPPED);
        // Only once.
        a.check_deadlines(t0 + MS(1500));
        assert_eq!(m.events(LedgerKind::StorageLost).len(), 4);
        // The storage comes back: the next write succeeds and starts are accepted again.
        m.restore();
        a.ms_contact(t0 + MS(1600), Contact::Pong);
        a.heartbeat_tick(t0 + MS(1600));
        let p = &a.pings()[0];
        assert_eq!((p.heartbeat, p.storage_ok), (Some(2), true));
        assert_eq!(a.handle("ag-h0", 0, "j", 7, &start("v1")), RUNNING);
        assert!(m.events(LedgerKind::SelfFence).is_empty());
        no_double_runs(&ledger_read(&m.ledger).unwrap());
    }

    #[test]
    fn self_fence_needs_both_silences() {
        let m = Mount::new();
        let t0 = Instant::now();
        // Management servers gone, storage fine: never fenced.
        let a = health_agent(&m, t0);
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &start("v1")), RUNNING);
        for t in (0..10_000).step_by(100) {
            a.heartbeat_tick(t0 + MS(t));
        }
        assert_eq!(vms_of(&a, 0), ["v1"]);
        // Storage gone, management server answering: storage loss, but no self-fence.
        let m = Mount::new();
        let a = health_agent(&m, t0);
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &start("v1")), RUNNING);
        m.cut();
        for t in (0..10_000).step_by(100) {
            a.ms_contact(t0 + MS(t), Contact::Pong);
            a.heartbeat_tick(t0 + MS(t));
        }
        assert_eq!(m.events(LedgerKind::StorageLost).len(), 1);
        assert!(m.events(LedgerKind::SelfFence).is_empty());
        assert!(!a.pings()[0].fenced);
        // No storage configured: no self-fence however long the silence.
        let mut c = cfg(None);
        c.self_fence_after_ms = 2000;
        let a = Agent::build(&c, 10, t0).unwrap();
        a.handle("ag-h0", 0, "j", 1, &start("v1"));
        a.heartbeat_tick(t0 + MS(100_000));
        a.check_deadlines(t0 + MS(100_000));
        assert_eq!(vms_of(&a, 0), ["v1"]);
    }

    #[test]
    fn self_fence_stops_everything_then_reports_until_acknowledged() {
        let m = Mount::new();
        let t0 = Instant::now();
        let mut c = cfg(Some(m.ledger.clone()));
        c.storage = Some(m.link.clone());
        c.heartbeat_interval_ms = 100;
        c.storage_timeout_ms = 60_000;
        c.self_fence_after_ms = 2000;
        let a = Agent::build(&c, 100, t0).unwrap();
        a.ms_contact(t0, Contact::Welcome);
        a.heartbeat_tick(t0);
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &start("v1")), RUNNING);
        assert_eq!(a.handle("ag-h1", 0, "j", 2, &start("v2")), RUNNING);
        assert_eq!(a.handle("ag-h1", 0, "j", 3, &start("v3")), RUNNING);
        assert_eq!(a.handle("ag-h1", 0, "j", 4, &Command::MigrateOut { vm_id: "v3".into() }), STOPPED);
        // Last contact at 500, last write at 400: the fence is due at 2500.
        a.ms_contact(t0 + MS(500), Contact::Pong);
        a.heartbeat_tick(t0 + MS(400));
        m.cut();
        a.heartbeat_tick(t0 + MS(500));
        assert_eq!(a.next_deadline(), Some(t0 + MS(2500)));
        a.check_deadlines(t0 + MS(2499));
        assert!(m.events(LedgerKind::SelfFence).is_empty());
        a.check_deadlines(t0 + MS(2500));
        let fenced = m.events(LedgerKind::SelfFence);
        // Running VMs and the VM paused for migration.
        let want = [("ag-h0", "v1"), ("ag-h1", "v2"), ("ag-h1", "v3")].map(|(h, v)| (h.into(), v.into()));
        assert_eq!(fenced, want);
        assert!(a.pings().iter().all(|p| p.fenced && p.vms.is_empty()));
        // A start that was in flight on the abandoned connection is refused.
        assert_eq!(a.handle("ag-h0", 0, "j", 5, &start("v1")), failed(SELF_FENCED));
        assert_eq!(a.handle("ag-h1", 0, "j", 6, &Command::MigrateAbort { vm_id: "v3".into() }), failed(SELF_FENCED));
        // A Pong on the old connection: the server is back, starts are meant again.
        a.ms_contact(t0 + MS(2900), Contact::Pong);
        assert_eq!(a.handle("ag-h1", 0, "j", 8, &start("v2")), RUNNING);
        // Reconnected: starts work; the flag is reported on this connection.
        a.ms_contact(t0 + MS(3000), Contact::Welcome);
        assert!(a.pings()[0].fenced);
        assert_eq!(a.handle("ag-h0", 0, "j", 7, &start("v1")), RUNNING);
        a.ms_contact(t0 + MS(3100), Contact::Pong);
        assert!(a.pings()[0].fenced);
        // Cleared by the next connection's Welcome.
        a.ms_contact(t0 + MS(4000), Contact::Welcome);
        assert!(!a.pings()[0].fenced);
        assert_eq!(m.events(LedgerKind::SelfFence).len(), 3, "fenced once");
        no_double_runs(&ledger_read(&m.ledger).unwrap());
    }

    #[test]
    fn late_welcome_fences_before_it_counts() {
        let m = Mount::new();
        let t0 = Instant::now();
        let a = health_agent(&m, t0);
        a.heartbeat_tick(t0);
        assert_eq!(a.handle("ag-h0", 0, "j", 1, &start("v1")), RUNNING);
        m.cut();
        // Nobody checked the deadline (2000) in time; the Welcome at 2300 fences first.
        a.ms_contact(t0 + MS(2300), Contact::Welcome);
        let entries = ledger_read(&m.ledger).unwrap();
        let kinds: Vec<LedgerKind> = entries.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [LedgerKind::Exec, LedgerKind::SelfFence]);
        let e = &entries[1];
        assert_eq!(
            (e.op.as_str(), e.outcome.as_str(), e.state, e.job.as_str()),
            ("self_fence", "ok", Some(PowerState::Stopped), "")
        );
        assert!(e.message.as_deref().unwrap().contains("self-fence"), "{e:?}");
        // The Welcome counted after the fence: starts are accepted.
        assert_eq!(a.handle("ag-h0", 0, "j", 2, &start("v1")), RUNNING);
    }

    #[test]
    fn crash_files() {
        let m = Mount::new();
        let t0 = Instant::now();
        let a = health_agent(&m, t0);
        a.handle("ag-h1", 0, "j", 1, &start("v1"));
        a.handle("ag-h1", 0, "j", 2, &start("v2"));
        let crash = m.control.join(CRASH_DIR);
        std::fs::write(crash.join("v1"), "").unwrap();
        std::fs::write(crash.join("elsewhere"), "").unwrap();
        a.heartbeat_tick(t0);
        assert_eq!(vms_of(&a, 1), ["v2"]);
        assert_eq!(m.events(LedgerKind::Crash), [("ag-h1".to_owned(), "v1".to_owned())]);
        assert!(!crash.join("v1").exists());
        assert!(crash.join("elsewhere").exists(), "a VM of another agent keeps its file");
        // A stopped VM does not crash again.
        std::fs::write(crash.join("v1"), "").unwrap();
        a.heartbeat_tick(t0 + MS(100));
        assert_eq!(m.events(LedgerKind::Crash).len(), 1);
        // It can be started again.
        assert_eq!(a.handle("ag-h1", 0, "j", 3, &start("v1")), RUNNING);
    }

    #[test]
    fn check_host_probes_address_and_storage() {
        let m = Mount::new();
        let t0 = Instant::now();
        let a = health_agent(&m, t0);
        a.heartbeat_tick(t0);
        a.heartbeat_tick(t0);
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let check =
            |guid: &str, addr: Option<&str>| Command::CheckHost { guid: guid.into(), check_addr: addr.map(Into::into) };
        let hc = |reachable, heartbeat, storage_ok| CommandResult::HostCheck { reachable, heartbeat, storage_ok };
        assert_eq!(a.handle("ag-h0", 0, "c", 1, &check("ag-h1", Some(&live_addr))), hc(Some(true), Some(2), true));
        assert_eq!(a.handle("ag-h0", 0, "c", 2, &check("ag-h1", Some(&dead_addr))), hc(Some(false), Some(2), true));
        assert_eq!(a.handle("ag-h0", 0, "c", 3, &check("nobody", None)), hc(None, None, true));
        // Replayed, not probed again.
        assert_eq!(a.handle("ag-h0", 0, "c", 1, &check("ag-h1", Some(&dead_addr))), hc(Some(true), Some(2), true));
        m.cut();
        assert_eq!(a.handle("ag-h0", 0, "c", 4, &check("ag-h1", None)), hc(None, None, false));
        // Fenced by generation like every command.
        a.apply_grants(&[grant("ag-h0", 3)]);
        assert_eq!(a.handle("ag-h0", 2, "c", 5, &check("ag-h1", None)), CommandResult::StaleGeneration { current: 3 });
        let entries = ledger_read(&m.ledger).unwrap();
        assert_eq!(entries[0].op, "check_host");
        assert_eq!(entries[0].vm, "");
        assert_eq!(entries[0].outcome, "host_check");
        assert_eq!(entries[0].message.as_deref(), Some("reachable=true heartbeat=2 storage_ok=true"));
        assert_eq!(entries[3].kind, LedgerKind::Replay);
        // Without storage, the storage cannot be read.
        let plain = Agent::new(&cfg(None)).unwrap();
        assert_eq!(plain.handle("ag-h0", 0, "c", 1, &check("x", None)), hc(None, None, false));
    }

    #[test]
    fn live_migration_keeps_one_copy_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut c = cfg(Some(path.clone()));
        c.fail_rules = vec![crate::FailRule::parse("migrate_out=pinned").unwrap()];
        let a = Agent::new(&c).unwrap();
        let out = |vm: &str| Command::MigrateOut { vm_id: vm.into() };
        let done = |vm: &str| Command::MigrateDone { vm_id: vm.into() };
        let abort = |vm: &str| Command::MigrateAbort { vm_id: vm.into() };
        let big = |vm: &str| Command::StartVm { vm_id: vm.into(), name: vm.into(), cpu: 8, mem_mb: 512 };
        assert_eq!(a.handle("ag-h0", 0, "m", 1, &big("v1")), RUNNING);
        // Out, start on the destination, done.
        assert_eq!(a.handle("ag-h0", 0, "m", 2, &out("v1")), STOPPED);
        assert!(vms_of(&a, 0).is_empty());
        // The source keeps the capacity while paused.
        assert!(matches!(a.handle("ag-h0", 0, "m", 3, &big("other")), CommandResult::Failed { .. }));
        assert_eq!(a.handle("ag-h1", 0, "m", 4, &big("v1")), RUNNING);
        assert_eq!(a.handle("ag-h0", 0, "m", 5, &done("v1")), STOPPED);
        assert_eq!(a.handle("ag-h0", 0, "m", 6, &big("other")), RUNNING);
        // Out then abort: resumes on the source.
        assert_eq!(a.handle("ag-h1", 0, "m", 7, &out("v1")), STOPPED);
        assert_eq!(a.handle("ag-h1", 0, "m", 8, &out("v1")), STOPPED, "idempotent");
        assert_eq!(a.handle("ag-h1", 0, "m", 9, &abort("v1")), RUNNING);
        assert_eq!(vms_of(&a, 1), ["v1"]);
        // Refusals: nothing to migrate, nothing to abort, done of a running VM, rule.
        assert!(matches!(a.handle("ag-h0", 0, "m", 10, &out("ghost")), CommandResult::Failed { .. }));
        assert!(matches!(a.handle("ag-h0", 0, "m", 11, &abort("ghost")), CommandResult::Failed { .. }));
        assert!(matches!(a.handle("ag-h1", 0, "m", 12, &done("v1")), CommandResult::Failed { .. }));
        assert_eq!(vms_of(&a, 1), ["v1"]);
        assert_eq!(a.handle("ag-h0", 0, "m", 13, &done("ghost")), STOPPED, "done is idempotent");
        let pinned = Command::StartVm { vm_id: "p".into(), name: "pinned-1".into(), cpu: 0, mem_mb: 1 };
        assert_eq!(a.handle("ag-h1", 0, "m", 14, &pinned), RUNNING);
        assert_eq!(
            a.handle("ag-h1", 0, "m", 15, &out("p")),
            failed("simulated failure injected for migrate_out of pinned-1")
        );
        assert!(vms_of(&a, 1).contains(&"p".to_owned()));
        // A start of a VM paused here is refused (it would silently resume it).
        assert_eq!(a.handle("ag-h1", 0, "m", 16, &out("v1")), STOPPED);
        assert!(matches!(a.handle("ag-h1", 0, "m", 17, &big("v1")), CommandResult::Failed { .. }));
        let entries = ledger_read(&path).unwrap();
        assert_eq!(entries[1].op, "migrate_out");
        assert_eq!(entries[1].state, Some(PowerState::Stopped));
        no_double_runs(&entries);
    }

    /// The ledger invariant the integration tests check (see `check_ledger` in the skyhold crate's
    /// tests): a VM never runs on two hosts at once.
    fn no_double_runs(entries: &[LedgerEntry]) {
        let mut running: HashMap<&str, &str> = HashMap::new();
        for e in entries {
            let effective = match e.kind {
                LedgerKind::Exec => e.outcome == "ok",
                LedgerKind::Replay | LedgerKind::Stale | LedgerKind::UnknownHost => false,
                _ => true,
            };
            match (effective, e.state) {
                (true, Some(PowerState::Running)) => {
                    if let Some(h) = running.insert(&e.vm, &e.host) {
                        assert_eq!(h, e.host, "{} runs on two hosts: {e:?}", e.vm);
                    }
                }
                (true, Some(PowerState::Stopped)) if running.get(e.vm.as_str()) == Some(&e.host.as_str()) => {
                    running.remove(e.vm.as_str());
                }
                _ => {}
            }
        }
    }
}
