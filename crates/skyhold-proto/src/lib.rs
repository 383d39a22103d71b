//! The agent protocol: what a Skyhold agent and a management server say to each other on port 8250.
//!
//! Framing is JSON lines: one message per line, UTF-8, at most [`MAX_LINE`] bytes. The agent always
//! connects *out* to a management server (MS) and speaks first with [`AgentMsg::Hello`].
//!
//! Fencing: every [`MsMsg::Command`] carries the host's ownership `generation` (bumped in the database
//! each time an MS takes the host's connection) and a `(job_id, step)` pair. An agent refuses a
//! command whose generation is older than the newest it has seen for that host, and answers a
//! repeated `(job_id, step)` with the result it already produced, without executing it again. That is
//! what lets a resumed job resend a step safely (ARCHITECTURE.md, invariant 5).
//!
//! **Architecture Invariant:** this crate knows no SQL and no HTTP; it is shared by the agent and
//! the management server and depends on nothing of either.

use serde::{Deserialize, Serialize};

/// Longest accepted line, in bytes. Longer lines are a protocol error and close the connection.
pub const MAX_LINE: usize = 1 << 20;

/// Protocol version spoken by this build.
pub const PROTO_VERSION: u32 = 1;

/// What a host reports about itself when its agent registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Stable identity of the host across agent restarts (the agent derives it from its agent id).
    pub guid: String,
    pub name: String,
    pub ip: String,
    pub cpu_cores: u32,
    pub cpu_mhz: u32,
    pub mem_mb: u64,
    /// "Simulator" for the simulator driver.
    pub hypervisor: String,
    /// VMs the host is running right now (so the MS can reconcile after a reconnect).
    pub vms: Vec<VmReport>,
    /// `host:port` that neighbours TCP-connect to when the MS asks them to check this host
    /// ([`Command::CheckHost`]); stands for the host's management network. `None` from older agents.
    #[serde(default)]
    pub check_addr: Option<String>,
    /// Identity of the primary storage the host mounts (the agent sends the canonical path of its
    /// `--storage` directory, so hosts of one cluster report the same value). Informational; `None`
    /// when the agent runs without shared storage.
    #[serde(default)]
    pub storage: Option<String>,
    /// Where a host seen for the first time belongs (CloudStack's `zone`, `pod` and `cluster` of
    /// agent.properties; each a UUID or a name). Empty: the first cluster. A host already known
    /// stays where it is.
    #[serde(default, skip_serializing_if = "HostPlace::is_empty")]
    pub place: HostPlace,
}

/// A host's configured zone, pod and cluster (each optional: UUID or name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

impl HostPlace {
    pub fn is_empty(&self) -> bool {
        self.zone.is_none() && self.pod.is_none() && self.cluster.is_none()
    }
}

/// Power state of one VM as the hypervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerState {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    pub vm_id: String,
    pub state: PowerState,
}

/// Per-host part of a ping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPing {
    pub guid: String,
    pub vms: Vec<VmReport>,
    /// This host's storage heartbeat counter as last successfully written to the shared primary
    /// storage; `None` if the last write failed (or the agent runs without shared storage).
    #[serde(default)]
    pub heartbeat: Option<u64>,
    /// Whether the host's last storage heartbeat write succeeded (`true` without shared storage and
    /// when absent on the wire).
    #[serde(default = "default_true")]
    pub storage_ok: bool,
    /// The agent self-fenced (stopped every VM of its hosts) because it had neither a management
    /// server nor its storage for its self-fence period. Reported from the fence on, through the whole
    /// first connection registered after it, and cleared by the `Welcome` of a later connection once
    /// a ping carrying it was answered with a `Pong`.
    #[serde(default)]
    pub fenced: bool,
}

fn default_true() -> bool {
    true
}

/// The MS's grant of one host to this connection, with the ownership generation to expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGrant {
    pub guid: String,
    pub host_id: String,
    pub generation: u64,
}

/// A hypervisor command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Start (define and power on) a VM. Starting a VM that already runs on this host succeeds.
    StartVm { vm_id: String, name: String, cpu: u32, mem_mb: u64 },
    /// Stop a VM. Stopping a VM that does not run succeeds (idempotent).
    StopVm { vm_id: String, force: bool },
    /// Reboot a running VM.
    RebootVm { vm_id: String },
    /// Stop if running and forget the VM's definition.
    DestroyVm { vm_id: String },
    /// Report what the host runs (no side effect).
    CheckVm { vm_id: String },
    /// Investigate *another* host `guid` on behalf of the MS (a neighbour check; no VM, no side
    /// effect): TCP-connect to its `check_addr` (if given, within 1 s) and read its storage heartbeat
    /// through this host's own storage mount. Answered with [`CommandResult::HostCheck`].
    CheckHost {
        guid: String,
        #[serde(default)]
        check_addr: Option<String>,
    },
    /// Live migration, on the source: pause the VM for migration. It stops running here (answer
    /// `Ok { state: Stopped }`) but the host keeps its definition and capacity until
    /// [`Command::MigrateDone`] or [`Command::MigrateAbort`]. The MS then sends `StartVm` to the
    /// destination, so a VM never runs on two hosts at once.
    MigrateOut { vm_id: String },
    /// Live migration finished: the source forgets the paused VM (answer `Ok { state: Stopped }`).
    MigrateDone { vm_id: String },
    /// Live migration abandoned: the source resumes the paused VM (answer `Ok { state: Running }`).
    MigrateAbort { vm_id: String },
}

impl Command {
    pub fn vm_id(&self) -> &str {
        match self {
            Command::StartVm { vm_id, .. }
            | Command::StopVm { vm_id, .. }
            | Command::RebootVm { vm_id }
            | Command::DestroyVm { vm_id }
            | Command::CheckVm { vm_id }
            | Command::MigrateOut { vm_id }
            | Command::MigrateDone { vm_id }
            | Command::MigrateAbort { vm_id } => vm_id,
            Command::CheckHost { .. } => "",
        }
    }
    /// Short name used in ledgers and logs ("start", "stop", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::StartVm { .. } => "start",
            Command::StopVm { .. } => "stop",
            Command::RebootVm { .. } => "reboot",
            Command::DestroyVm { .. } => "destroy",
            Command::CheckVm { .. } => "check",
            Command::CheckHost { .. } => "check_host",
            Command::MigrateOut { .. } => "migrate_out",
            Command::MigrateDone { .. } => "migrate_done",
            Command::MigrateAbort { .. } => "migrate_abort",
        }
    }
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandResult {
    /// Done; the VM's power state afterwards.
    Ok { state: PowerState },
    /// The hypervisor refused or failed; `message` says why (shown to the user in the job result).
    Failed { message: String },
    /// The command carried an ownership generation older than one the agent has already seen.
    StaleGeneration { current: u64 },
    /// The agent does not serve that host.
    UnknownHost,
    /// Answer to [`Command::CheckHost`].
    HostCheck {
        /// A TCP connect to the checked host's `check_addr` succeeded within 1 s (`None`: no address
        /// was given).
        reachable: Option<bool>,
        /// The checked host's heartbeat counter as read from the shared storage (`None`: its file is
        /// missing or unreadable). Meaningless when `storage_ok` is false.
        heartbeat: Option<u64>,
        /// Whether the *checking* host could read the shared storage at all.
        storage_ok: bool,
    },
}

/// Messages from an agent to a management server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message on every connection.
    Hello { proto: u32, token: String, agent_id: String, version: String, hosts: Vec<HostReport> },
    /// Answer to [`MsMsg::Command`] with the same `req`.
    Answer { req: u64, result: CommandResult },
    /// Periodic liveness report, every `ping_interval_ms`.
    Ping { hosts: Vec<HostPing> },
}

/// Messages from a management server to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MsMsg {
    /// Registration accepted.
    Welcome {
        ms_id: String,
        hosts: Vec<HostGrant>,
        ping_interval_ms: u64,
        /// Every management server address the agent may use (the `host` setting plus peers).
        mgmt_addrs: Vec<String>,
    },
    /// Registration refused (bad token, unsupported protocol); the agent logs `reason`.
    Refused { reason: String },
    /// Execute `cmd` on host `host_guid`.
    Command { req: u64, host_guid: String, generation: u64, job_id: String, step: u32, cmd: Command },
    /// Answer to a ping.
    Pong,
    /// A new list of management server addresses.
    MgmtList { addrs: Vec<String> },
    /// Leave this server now and connect to `addr` (draining, or rebalancing agents onto a server
    /// that joined). The agent closes the connection and connects to `addr` without back-off.
    Reconnect { addr: String, reason: String },
}

/// Errors while reading or writing protocol lines.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed")]
    Closed,
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one message from a buffered reader. Enforces [`MAX_LINE`].
pub async fn read_msg<R, T>(r: &mut R, buf: &mut Vec<u8>) -> Result<T, ProtoError>
where
    R: tokio::io::AsyncBufRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    use tokio::io::AsyncBufReadExt;
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Err(ProtoError::Closed);
        }
        if let Some(pos) = avail.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&avail[..pos]);
            r.consume(pos + 1);
            break;
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > MAX_LINE {
            return Err(ProtoError::LineTooLong);
        }
    }
    if buf.len() > MAX_LINE {
        return Err(ProtoError::LineTooLong);
    }
    Ok(serde_json::from_slice(buf)?)
}

/// Write one message as a line and flush.
pub async fn write_msg<W, T>(w: &mut W, msg: &T) -> Result<(), ProtoError>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    use tokio::io::AsyncWriteExt;
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_limits() {
        let msg = MsMsg::Command {
            req: 7,
            host_guid: "h".into(),
            generation: 3,
            job_id: "j".into(),
            step: 2,
            cmd: Command::StopVm { vm_id: "v".into(), force: true },
        };
        let mut out = Vec::new();
        write_msg(&mut out, &msg).await.unwrap();
        let mut r = tokio::io::BufReader::new(&out[..]);
        let mut buf = Vec::new();
        let back: MsMsg = read_msg(&mut r, &mut buf).await.unwrap();
        assert_eq!(back, msg);
        let end: Result<MsMsg, _> = read_msg(&mut r, &mut buf).await;
        assert!(matches!(end, Err(ProtoError::Closed)));

        let bad = b"{not json}\n".to_vec();
        let mut r = tokio::io::BufReader::new(&bad[..]);
        let res: Result<MsMsg, _> = read_msg(&mut r, &mut buf).await;
        assert!(matches!(res, Err(ProtoError::Malformed(_))));

        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = tokio::io::BufReader::new(&long[..]);
        let res: Result<MsMsg, _> = read_msg(&mut r, &mut buf).await;
        assert!(matches!(res, Err(ProtoError::LineTooLong)));
    }

    #[test]
    fn new_fields_are_backward_compatible() {
        // A ping and a host report from an agent that predates storage heartbeats.
        let old_ping = r#"{"type":"ping","hosts":[{"guid":"g","vms":[{"vm_id":"v","state":"Running"}]}]}"#;
        let AgentMsg::Ping { hosts } = serde_json::from_str(old_ping).unwrap() else { panic!("not a ping") };
        assert_eq!((hosts[0].heartbeat, hosts[0].storage_ok, hosts[0].fenced), (None, true, false));
        let old_report = r#"{"guid":"g","name":"n","ip":"1.2.3.4","cpu_cores":1,"cpu_mhz":1,"mem_mb":1,
            "hypervisor":"Simulator","vms":[]}"#;
        let r: HostReport = serde_json::from_str(old_report).unwrap();
        assert_eq!((r.check_addr, r.storage), (None, None));
        // A check without an address.
        let c: Command = serde_json::from_str(r#"{"op":"check_host","guid":"g"}"#).unwrap();
        assert_eq!(c, Command::CheckHost { guid: "g".into(), check_addr: None });
        assert_eq!((c.vm_id(), c.name()), ("", "check_host"));
    }

    #[test]
    fn new_commands_and_results_on_the_wire() {
        let cmds = [
            (Command::MigrateOut { vm_id: "v".into() }, "migrate_out"),
            (Command::MigrateDone { vm_id: "v".into() }, "migrate_done"),
            (Command::MigrateAbort { vm_id: "v".into() }, "migrate_abort"),
        ];
        for (cmd, name) in cmds {
            let v = serde_json::to_value(&cmd).unwrap();
            assert_eq!(v["op"], name);
            assert_eq!(v["vm_id"], "v");
            assert_eq!((cmd.name(), cmd.vm_id()), (name, "v"));
            assert_eq!(serde_json::from_value::<Command>(v).unwrap(), cmd);
        }
        let r = CommandResult::HostCheck { reachable: Some(true), heartbeat: Some(7), storage_ok: true };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v, serde_json::json!({"outcome":"host_check","reachable":true,"heartbeat":7,"storage_ok":true}));
        assert_eq!(serde_json::from_value::<CommandResult>(v).unwrap(), r);
        let p = HostPing { guid: "g".into(), vms: vec![], heartbeat: Some(3), storage_ok: false, fenced: true };
        let back: HostPing = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
