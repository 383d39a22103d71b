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
}

impl Command {
    pub fn vm_id(&self) -> &str {
        match self {
            Command::StartVm { vm_id, .. }
            | Command::StopVm { vm_id, .. }
            | Command::RebootVm { vm_id }
            | Command::DestroyVm { vm_id }
            | Command::CheckVm { vm_id } => vm_id,
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
}
