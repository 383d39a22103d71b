//! The peer channel (port 9090): management servers asking each other to do things.
//!
//! One request per TCP connection, as two JSON lines (request, response). Every request is
//! authenticated with an HMAC-SHA256 over `from|ts|nonce|body` under the cluster secret (created by
//! `db init`, stored encrypted in `cloud_meta`, so only nodes holding the cluster's key can speak),
//! and refused when its timestamp is more than [`MAX_SKEW_MS`] away.
//!
//! Requests: `Forward` an agent command to the server that holds the host's connection; `Wake` a
//! server because work was queued. The database stays the source of truth: a lost `Wake` only
//! delays work until the next poll, and a failed `Forward` is retried by the job like any other
//! unreachable host.

use crate::Core;
use crate::agents::SendError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use skyhold_proto::{Command, CommandResult};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest accepted clock difference between peers for request timestamps.
pub const MAX_SKEW_MS: i64 = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerReq {
    /// New work was queued: claim now instead of at the next poll.
    Wake,
    /// Send this command to a host connected to you.
    Forward { host_id: String, job_id: String, step: u32, cmd: Command, timeout_ms: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PeerResp {
    Ok,
    Result { result: CommandResult },
    NotConnected,
    Refused { reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    ts_ms: i64,
    nonce: String,
    mac: String,
    body: PeerReq,
}

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("i/o: {0}")]
    Io(String),
    #[error("timed out")]
    Timeout,
    #[error("refused: {0}")]
    Refused(String),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn mac(secret: &str, from: &str, ts: i64, nonce: &str, body: &str) -> String {
    let mut m = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    m.update(format!("{from}|{ts}|{nonce}|{body}").as_bytes());
    B64.encode(m.finalize().into_bytes())
}

fn verify(secret: &str, env: &Envelope) -> Result<(), String> {
    if (now_ms() - env.ts_ms).abs() > MAX_SKEW_MS {
        return Err(format!("timestamp {} ms away from ours", now_ms() - env.ts_ms));
    }
    let body = serde_json::to_string(&env.body).map_err(|e| e.to_string())?;
    let want = mac(secret, &env.from, env.ts_ms, &env.nonce, &body);
    let ok = want.len() == env.mac.len() && want.bytes().zip(env.mac.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    if ok { Ok(()) } else { Err("bad signature (different cluster secret?)".into()) }
}

/// Serve peer requests until the process ends.
pub async fn serve(core: Core, listener: TcpListener) {
    crate::accept_loop(core, listener, "peer", handle).await
}

async fn handle(core: Core, sock: TcpStream) -> Result<(), skyhold_proto::ProtoError> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let env: Envelope =
        match tokio::time::timeout(Duration::from_secs(5), skyhold_proto::read_msg(&mut rd, &mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
    let resp = match verify(core.cluster_secret(), &env) {
        Err(reason) => {
            tracing::warn!(from = %env.from, %reason, "refused a peer request");
            PeerResp::Refused { reason }
        }
        Ok(()) => match env.body {
            PeerReq::Wake => {
                core.wake_jobs();
                PeerResp::Ok
            }
            PeerReq::Forward { host_id, job_id, step, cmd, timeout_ms } => {
                let t = Duration::from_millis(timeout_ms.clamp(100, 120_000));
                match core.agent_send(&host_id, &job_id, step, cmd, t).await {
                    Ok(result) => PeerResp::Result { result },
                    Err(SendError::NotConnected(_)) | Err(SendError::Closed(_)) => PeerResp::NotConnected,
                    Err(SendError::Timeout(_)) => PeerResp::NotConnected,
                    Err(SendError::Fenced) => PeerResp::Refused { reason: "this server is fenced".into() },
                }
            }
        },
    };
    skyhold_proto::write_msg(&mut wr, &resp).await?;
    let _ = wr.shutdown().await;
    Ok(())
}

/// Call a peer at `addr`. Failures are logged as "Cluster sync failed" with the peer and cause.
pub async fn call(
    core: &Core,
    peer_id: &str,
    addr: &str,
    body: PeerReq,
    timeout: Duration,
) -> Result<PeerResp, PeerError> {
    let res = tokio::time::timeout(timeout, call_inner(core, addr, body)).await.unwrap_or(Err(PeerError::Timeout));
    if let Err(e) = &res {
        tracing::warn!(peer = %peer_id, %addr, cause = %e, "Cluster sync failed");
    }
    res
}

async fn call_inner(core: &Core, addr: &str, body: PeerReq) -> Result<PeerResp, PeerError> {
    let sock = TcpStream::connect(addr).await.map_err(|e| PeerError::Connect(e.to_string()))?;
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let from = core.ms().id.clone();
    let ts = now_ms();
    let nonce: String = (0..12).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let body_s = serde_json::to_string(&body).map_err(|e| PeerError::Io(e.to_string()))?;
    let env = Envelope { mac: mac(core.cluster_secret(), &from, ts, &nonce, &body_s), from, ts_ms: ts, nonce, body };
    skyhold_proto::write_msg(&mut wr, &env).await.map_err(|e| PeerError::Io(e.to_string()))?;
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let resp: PeerResp = skyhold_proto::read_msg(&mut rd, &mut buf).await.map_err(|e| PeerError::Io(e.to_string()))?;
    if let PeerResp::Refused { reason } = &resp {
        return Err(PeerError::Refused(reason.clone()));
    }
    Ok(resp)
}

/// Tell every live peer that work was queued (fire and forget).
pub fn wake_peers(core: &Core) {
    for p in core.peers() {
        let core = core.clone();
        tokio::spawn(async move {
            let _ = call(&core, &p.id, &p.peer_addr, PeerReq::Wake, Duration::from_secs(2)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_authentication() {
        let body = PeerReq::Wake;
        let b = serde_json::to_string(&body).unwrap();
        let ts = now_ms();
        let env =
            Envelope { from: "a".into(), ts_ms: ts, nonce: "n".into(), mac: mac("s3cret", "a", ts, "n", &b), body };
        assert!(verify("s3cret", &env).is_ok());
        assert!(verify("other", &env).is_err());
        let old = Envelope { ts_ms: ts - MAX_SKEW_MS - 1, ..env };
        assert!(verify("s3cret", &old).is_err());
    }
}
