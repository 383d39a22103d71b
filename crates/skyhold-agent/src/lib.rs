//! The Skyhold agent, with a *simulator* hypervisor driver (like Apache CloudStack's Simulator).
//!
//! One agent process serves `hosts` simulated hosts. It connects out to a management server (MS) on
//! the agent port, registers with [`skyhold_proto::AgentMsg::Hello`], pings, and executes commands
//! against an in-memory [`Simulator`] per host. No real VM is ever created; every host reports the
//! hypervisor type `"Simulator"`.
//!
//! Layers, from the wire inwards:
//! - [`run`]: the connection loop (address rotation, backoff, handshake, pings, dead-peer detection,
//!   one writer task per connection, commands executed concurrently).
//! - [`Agent`]: transport-independent core: generation fencing, `(job_id, step)` replay, ledger.
//! - [`Simulator`]: one simulated host's VMs and capacity, plus fault injection ([`FailRule`]).
//! - [`ledger_read`] / [`LedgerEntry`]: the append-only JSON-lines ledger, written and flushed before
//!   an answer is sent, so it is the ground truth of what the agent did.
//!
//! Host health (for the management servers' host HA), all optional:
//! - `storage`: the shared primary storage mount. Every `heartbeat_interval_ms` each host writes its
//!   counter to `STORAGE/heartbeat/<guid>`; a host that cannot write for `storage_timeout_ms` stops
//!   its VMs (ledger `storage_lost`) and refuses starts until a write succeeds again.
//! - self-fencing (`health`): no management server *and* no storage write for `self_fence_after_ms`
//!   stops every VM (ledger `self_fence`), as a watchdog would.
//! - `check_listen`: the listener neighbours connect to in `CheckHost` (`checknet`).
//! - `control_dir`: test controls: `isolate` closes the check listener, `crash/<vm_id>` crashes a VM.
//!
//! **Architecture Invariant:** this crate talks to the MS only through `skyhold-proto`; it knows no
//! SQL and no HTTP.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod agent;
mod checknet;
mod conn;
mod health;
mod ledger;
mod simulator;
mod storage;

use std::path::PathBuf;

pub use agent::{Agent, SELF_FENCED, STORAGE_UNAVAILABLE};
pub use checknet::{CHECK_CONNECT_TIMEOUT, ISOLATE_FILE};
pub use conn::run;
pub use ledger::{LedgerEntry, LedgerKind, ledger_read};
pub use simulator::Simulator;
pub use storage::HEARTBEAT_DIR;

/// Default of [`AgentConfig::heartbeat_interval_ms`].
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// Default of [`AgentConfig::storage_timeout_ms`].
pub const DEFAULT_STORAGE_TIMEOUT_MS: u64 = 10_000;
/// Default of [`AgentConfig::self_fence_after_ms`]. A management server must not declare a host dead
/// on lease expiry (and restart its VMs elsewhere) sooner than this plus a margin.
pub const DEFAULT_SELF_FENCE_AFTER_MS: u64 = 10_000;
/// Default of [`AgentConfig::check_listen`].
pub const DEFAULT_CHECK_LISTEN: &str = "127.0.0.1:0";
/// Subdirectory of the control directory whose files `<vm_id>` crash that VM.
pub const CRASH_DIR: &str = "crash";

/// Configuration of one agent process (built by the `skyhold` binary from its command line).
#[derive(Clone)]
pub struct AgentConfig {
    /// `host:port` of the management servers' agent port (8250 by default).
    pub mgmt_addrs: Vec<String>,
    /// Join token sent in `Hello`.
    pub token: String,
    /// Stable id of this agent; host guids are `format!("{agent_id}-h{i}")` for `i` in `0..hosts`.
    pub agent_id: String,
    /// Number of simulated hosts this process runs.
    pub hosts: u32,
    /// CPU cores per simulated host.
    pub host_cpu_cores: u32,
    /// CPU speed per core, in MHz.
    pub host_cpu_mhz: u32,
    /// Memory per simulated host, in MiB.
    pub host_mem_mb: u64,
    /// JSON-lines ledger file, appended to (created if missing).
    pub ledger_path: Option<PathBuf>,
    /// Fault injection rules.
    pub fail_rules: Vec<FailRule>,
    /// Simulated hypervisor latency: each command waits this long before it executes (benchmarks
    /// and chaos tests use it to keep jobs in flight).
    pub command_delay_ms: u64,
    /// The hosts' mount of their cluster's shared primary storage (a directory, or a symlink to one).
    /// `None`: no storage heartbeat, no storage-loss stop, no self-fencing.
    pub storage: Option<PathBuf>,
    /// Period of the storage heartbeat writes (and of crash-file checks).
    pub heartbeat_interval_ms: u64,
    /// A host that could not write its heartbeat for this long stops its VMs.
    pub storage_timeout_ms: u64,
    /// No management server and no storage write for this long: the agent stops every VM.
    pub self_fence_after_ms: u64,
    /// Address of the check listener neighbours connect to (`host:port`; port 0 picks one).
    pub check_listen: String,
    /// Test controls: `DIR/isolate` closes the check listener, `DIR/crash/<vm_id>` crashes a VM.
    pub control_dir: Option<PathBuf>,
    /// Use only `mgmt_addrs`, ignoring the address lists management servers push (an agent that
    /// must reach them through a load balancer's virtual address, or a fixed path).
    pub static_mgmt: bool,
    /// Zone, pod and cluster (UUID or name) for hosts the servers have not seen before.
    pub place: skyhold_proto::HostPlace,
}

impl Default for AgentConfig {
    /// The `skyhold agent` defaults, with no management server address and an empty token.
    fn default() -> AgentConfig {
        AgentConfig {
            mgmt_addrs: Vec::new(),
            token: String::new(),
            agent_id: "agent".to_owned(),
            hosts: 1,
            host_cpu_cores: 32,
            host_cpu_mhz: 2000,
            host_mem_mb: 131_072,
            ledger_path: None,
            fail_rules: Vec::new(),
            command_delay_ms: 0,
            storage: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            storage_timeout_ms: DEFAULT_STORAGE_TIMEOUT_MS,
            self_fence_after_ms: DEFAULT_SELF_FENCE_AFTER_MS,
            check_listen: DEFAULT_CHECK_LISTEN.to_owned(),
            control_dir: None,
            static_mgmt: false,
            place: skyhold_proto::HostPlace::default(),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("mgmt_addrs", &self.mgmt_addrs)
            .field("token", &"<redacted>")
            .field("agent_id", &self.agent_id)
            .field("hosts", &self.hosts)
            .field("host_cpu_cores", &self.host_cpu_cores)
            .field("host_cpu_mhz", &self.host_cpu_mhz)
            .field("host_mem_mb", &self.host_mem_mb)
            .field("ledger_path", &self.ledger_path)
            .field("fail_rules", &self.fail_rules)
            .field("command_delay_ms", &self.command_delay_ms)
            .field("storage", &self.storage)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("storage_timeout_ms", &self.storage_timeout_ms)
            .field("self_fence_after_ms", &self.self_fence_after_ms)
            .field("check_listen", &self.check_listen)
            .field("control_dir", &self.control_dir)
            .field("static_mgmt", &self.static_mgmt)
            .field("place", &self.place)
            .finish()
    }
}

impl AgentConfig {
    /// Guid of simulated host number `i` (0-based).
    pub fn host_guid(&self, i: u32) -> String {
        format!("{}-h{i}", self.agent_id)
    }
}

/// Fault injection: make commands `op` fail for VMs whose name contains `vm_name_contains`.
///
/// `op` is one of `"start"`, `"stop"`, `"reboot"`, `"destroy"`, `"migrate_out"`, `"migrate_done"`,
/// `"migrate_abort"`, or `"*"` for any of those. (`check` and `check_host` have no side effect and
/// are never failed by a rule.) An empty `vm_name_contains` matches every VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailRule {
    pub op: String,
    pub vm_name_contains: String,
}

/// Operations a [`FailRule`] may name.
const FAIL_OPS: [&str; 8] = ["start", "stop", "reboot", "destroy", "migrate_out", "migrate_done", "migrate_abort", "*"];
const FAIL_OPS_TEXT: &str = "start, stop, reboot, destroy, migrate_out, migrate_done, migrate_abort or *";

impl FailRule {
    /// Parse the `op=substring` form, e.g. `start=db-` or `*=flaky`.
    pub fn parse(s: &str) -> Result<FailRule, AgentError> {
        let bad = |reason: String| AgentError::InvalidFailRule { rule: s.to_owned(), reason };
        let Some((op, substr)) = s.split_once('=') else {
            return Err(bad(format!("expected OP=SUBSTRING, e.g. start=db- (OP is {FAIL_OPS_TEXT})")));
        };
        let op = op.trim().to_ascii_lowercase();
        if !FAIL_OPS.contains(&op.as_str()) {
            return Err(bad(format!("unknown operation {op:?}; expected one of {FAIL_OPS_TEXT}")));
        }
        Ok(FailRule { op, vm_name_contains: substr.to_owned() })
    }

    /// Whether this rule fails command `op` (a [`skyhold_proto::Command::name`]) on VM `vm_name`.
    pub fn matches(&self, op: &str, vm_name: &str) -> bool {
        let op_matches = if self.op == "*" { op != "check" && op != "check_host" } else { self.op == op };
        op_matches && vm_name.contains(&self.vm_name_contains)
    }
}

impl std::str::FromStr for FailRule {
    type Err = AgentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FailRule::parse(s)
    }
}

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid fail rule {rule:?}: {reason}")]
    InvalidFailRule { rule: String, reason: String },
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error("ledger {}: {source}", path.display())]
    LedgerIo { path: PathBuf, source: std::io::Error },
    #[error("ledger {} line {line}: {source}", path.display())]
    LedgerParse { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("cannot listen for neighbour checks on {addr}: {source}")]
    CheckListen { addr: String, source: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_rule_parse_ok() {
        let r = FailRule::parse("start=db-").unwrap();
        assert_eq!(r.op, "start");
        assert_eq!(r.vm_name_contains, "db-");
        let r: FailRule = " STOP =x=y".parse().unwrap();
        assert_eq!(r.op, "stop");
        assert_eq!(r.vm_name_contains, "x=y");
        let r = FailRule::parse("*=").unwrap();
        assert!(r.matches("destroy", "anything"));
        assert!(!r.matches("check", "anything"));
        assert!(!r.matches("check_host", ""));
        assert!(r.matches("migrate_out", "anything"));
        let r = FailRule::parse("migrate_abort=web").unwrap();
        assert!(r.matches("migrate_abort", "web-1"));
        assert!(!r.matches("migrate_out", "web-1"));
    }

    #[test]
    fn fail_rule_parse_errors() {
        let e = FailRule::parse("start").unwrap_err();
        assert!(matches!(e, AgentError::InvalidFailRule { .. }));
        assert!(e.to_string().contains("expected OP=SUBSTRING"), "{e}");
        let e = FailRule::parse("migrate=web").unwrap_err();
        assert!(e.to_string().contains("unknown operation \"migrate\""), "{e}");
        let e = FailRule::parse("check=web").unwrap_err();
        assert!(e.to_string().contains("unknown operation"), "{e}");
        assert!(FailRule::parse("").is_err());
        assert!(FailRule::parse("=web").is_err());
    }

    #[test]
    fn fail_rule_matching() {
        let r = FailRule::parse("reboot=web").unwrap();
        assert!(r.matches("reboot", "my-web-1"));
        assert!(!r.matches("start", "my-web-1"));
        assert!(!r.matches("reboot", "db-1"));
    }

    #[test]
    fn config_debug_redacts_token() {
        let cfg = AgentConfig {
            mgmt_addrs: vec!["ms:8250".into()],
            token: "s3cret".into(),
            agent_id: "a".into(),
            ..AgentConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert_eq!(cfg.host_guid(3), "a-h3");
    }
}
