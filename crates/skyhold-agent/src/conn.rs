//! The connection loop: connect out to a management server, register, ping, execute commands,
//! and reconnect (to the next address, with jittered exponential backoff) whenever anything fails.
//! Beside it, for the agent's whole life: the heartbeat loop (storage heartbeat, storage timeout,
//! self-fence deadline, crash files) and the check listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use skyhold_proto::{AgentMsg, CommandResult, MAX_LINE, MsMsg, PROTO_VERSION, ProtoError, read_msg, write_msg};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout};

use crate::health::Contact;
use crate::{Agent, AgentConfig, AgentError};

/// Timeout of one TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for Hello -> Welcome/Refused.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Floor of the ping interval, whatever the MS asks for.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(20);
/// The connection is dead after this many ping intervals without any message from the MS.
const DEAD_AFTER_INTERVALS: u32 = 3;
/// Outgoing messages queued for the writer task.
const OUTBOX: usize = 1024;

/// Run the agent until `shutdown` completes (then return `Ok(())`).
///
/// Returns an error only for a bad configuration (no address, no host, unopenable ledger, ...);
/// connection problems are logged and retried forever.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    let mut book = AddrBook::new(&cfg.mgmt_addrs)?;
    book.fixed = cfg.static_mgmt;
    let agent = Arc::new(Agent::new(&cfg)?);
    let check = tokio::net::TcpListener::bind(&cfg.check_listen)
        .await
        .map_err(|source| AgentError::CheckListen { addr: cfg.check_listen.clone(), source })?;
    let check_addr =
        check.local_addr().map_err(|source| AgentError::CheckListen { addr: cfg.check_listen.clone(), source })?;
    agent.set_check_addr(check_addr);
    check_hello_fits(&agent, &cfg)?;
    tracing::info!(
        agent_id = %cfg.agent_id,
        hosts = cfg.hosts,
        mgmt_addrs = ?book.list,
        fail_rules = cfg.fail_rules.len(),
        check_addr = %check_addr,
        storage = ?cfg.storage,
        heartbeat_interval_ms = cfg.heartbeat_interval_ms,
        storage_timeout_ms = cfg.storage_timeout_ms,
        self_fence_after_ms = cfg.self_fence_after_ms,
        control_dir = ?cfg.control_dir,
        "simulator agent starting"
    );
    // Aborted when this function returns.
    let mut background = JoinSet::new();
    background.spawn(crate::checknet::serve(check, cfg.control_dir.clone()));
    if agent.needs_ticks() {
        // The first heartbeat is written before the first Hello, so pings carry it from the start.
        let first = Arc::clone(&agent);
        let now = std::time::Instant::now();
        if let Err(e) = tokio::task::spawn_blocking(move || first.heartbeat_tick(now)).await {
            tracing::error!(error = %e, "first heartbeat tick failed");
        }
        background.spawn(heartbeat_loop(Arc::clone(&agent)));
    }

    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::new();
    let mut addr = book.random();
    loop {
        let end = tokio::select! {
            () = &mut shutdown => break,
            end = session(&agent, &cfg, &addr, &mut book, &mut backoff) => end,
        };
        match &end {
            SessionEnd::ConnectFailed(cause) => {
                tracing::warn!(addr = %addr, %cause, "cannot connect to management server");
            }
            SessionEnd::Refused(reason) => {
                tracing::error!(addr = %addr, %reason, "management server refused registration");
            }
            SessionEnd::Lost(cause) => {
                tracing::warn!(addr = %addr, %cause, "disconnected from management server");
            }
            SessionEnd::Moved { to, reason } => {
                tracing::info!(from = %addr, %to, %reason, "management server asked us to move");
                addr = to.clone();
                backoff.reset();
                continue;
            }
        }
        addr = book.next_after(&addr);
        let delay = backoff.next_delay();
        tracing::debug!(next = %addr, delay_ms = delay.as_millis(), "reconnecting");
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    background.abort_all();
    tracing::info!(agent_id = %cfg.agent_id, "simulator agent stopped");
    Ok(())
}

/// Heartbeat ticks every interval; in between, wake exactly at the next deadline (storage timeout,
/// self-fence), so a fence is never late by up to an interval.
async fn heartbeat_loop(agent: Arc<Agent>) {
    let interval = agent.heartbeat_interval();
    let mut next_tick = Instant::now() + interval;
    loop {
        let deadline = agent.next_deadline().map(Instant::from_std);
        let wake = deadline.map_or(next_tick, |d| d.min(next_tick));
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        let a = Arc::clone(&agent);
        let is_tick = now >= next_tick;
        let work = tokio::task::spawn_blocking(move || {
            if is_tick {
                a.heartbeat_tick(now.into_std());
            } else {
                a.check_deadlines(now.into_std());
            }
        });
        if let Err(e) = work.await {
            tracing::error!(error = %e, "heartbeat tick failed");
        }
        if is_tick {
            next_tick += interval;
            if next_tick <= Instant::now() {
                // Writes took longer than an interval: skip the missed ticks.
                next_tick = Instant::now() + interval;
            }
        }
    }
}

/// Refuse configurations whose Hello alone would exceed the protocol's line limit.
fn check_hello_fits(agent: &Agent, cfg: &AgentConfig) -> Result<(), AgentError> {
    let len = serde_json::to_vec(&hello(agent, cfg, "255.255.255.255")).map(|v| v.len()).unwrap_or(usize::MAX);
    if len > MAX_LINE {
        return Err(AgentError::Config(format!(
            "{} hosts do not fit in one Hello message ({len} > {MAX_LINE} bytes); run several agents",
            cfg.hosts
        )));
    }
    Ok(())
}

fn hello(agent: &Agent, cfg: &AgentConfig, ip: &str) -> AgentMsg {
    AgentMsg::Hello {
        proto: PROTO_VERSION,
        token: cfg.token.clone(),
        agent_id: cfg.agent_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hosts: agent.host_reports(ip),
    }
}

/// How one connection ended.
#[derive(Debug)]
enum SessionEnd {
    ConnectFailed(String),
    Refused(String),
    Lost(String),
    /// The MS asked us to connect to another server.
    Moved {
        to: String,
        reason: String,
    },
}

/// One connection: connect, register, then serve until something breaks.
async fn session(
    agent: &Arc<Agent>,
    cfg: &AgentConfig,
    addr: &str,
    book: &mut AddrBook,
    backoff: &mut Backoff,
) -> SessionEnd {
    // A self-fence that is due happens before anything of a new connection.
    agent.check_deadlines(std::time::Instant::now());
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return SessionEnd::ConnectFailed(e.to_string()),
        Err(_) => {
            return SessionEnd::ConnectFailed(format!("timed out after {} ms", CONNECT_TIMEOUT.as_millis()));
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let ip = stream.local_addr().map_or_else(|_| "127.0.0.1".to_owned(), |a| a.ip().to_string());
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();

    let handshake = async {
        write_msg(&mut wr, &hello(agent, cfg, &ip)).await?;
        read_msg::<_, MsMsg>(&mut rd, &mut buf).await
    };
    let first = match timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return SessionEnd::Lost(format!("during registration: {e}")),
        Err(_) => {
            return SessionEnd::Lost(format!("no answer to Hello within {} ms", HANDSHAKE_TIMEOUT.as_millis()));
        }
    };
    let (ms_id, grants, ping_ms, mgmt_addrs) = match first {
        MsMsg::Welcome { ms_id, hosts, ping_interval_ms, mgmt_addrs } => (ms_id, hosts, ping_interval_ms, mgmt_addrs),
        MsMsg::Refused { reason } => return SessionEnd::Refused(reason),
        other => {
            return SessionEnd::Lost(format!("expected Welcome or Refused, got {}", msg_kind(&other)));
        }
    };
    backoff.reset();
    agent.ms_contact(std::time::Instant::now(), Contact::Welcome);
    agent.apply_grants(&grants);
    book.replace(&mgmt_addrs);
    let interval = Duration::from_millis(ping_ms).max(MIN_PING_INTERVAL);
    let dead_after = interval * DEAD_AFTER_INTERVALS;
    tracing::info!(
        addr = %addr,
        ms_id = %ms_id,
        hosts = ?grants.iter().map(|g| format!("{}={}@{}", g.guid, g.host_id, g.generation)).collect::<Vec<_>>(),
        ping_interval_ms = interval.as_millis(),
        mgmt_addrs = ?book.list,
        "connected to management server"
    );

    let (tx, rx) = mpsc::channel::<AgentMsg>(OUTBOX);
    // Aborted when this function returns (or is dropped on shutdown).
    let mut tasks = JoinSet::new();
    tasks.spawn(writer(wr, rx));
    tasks.spawn(pinger(Arc::clone(agent), tx.clone(), interval));

    loop {
        tokio::select! {
            ended = tasks.join_next() => {
                let cause = match ended {
                    Some(Ok(cause)) => cause,
                    Some(Err(e)) => format!("connection task failed: {e}"),
                    None => "connection tasks ended".to_owned(),
                };
                return SessionEnd::Lost(cause);
            }
            read = timeout(dead_after, read_msg::<_, MsMsg>(&mut rd, &mut buf)) => {
                let msg = match read {
                    Ok(Ok(msg)) => msg,
                    Ok(Err(ProtoError::Closed)) => {
                        return SessionEnd::Lost("connection closed by management server".into());
                    }
                    Ok(Err(e)) => return SessionEnd::Lost(e.to_string()),
                    Err(_) => {
                        return SessionEnd::Lost(format!(
                            "no message from management server for {} ms",
                            dead_after.as_millis()
                        ));
                    }
                };
                if let Some(end) = on_message(agent, book, &tx, msg, cfg.command_delay_ms) {
                    return end;
                }
            }
        }
    }
}

/// Handle one message from the MS after registration. `Some` ends the session.
fn on_message(
    agent: &Arc<Agent>,
    book: &mut AddrBook,
    tx: &mpsc::Sender<AgentMsg>,
    msg: MsMsg,
    delay_ms: u64,
) -> Option<SessionEnd> {
    match msg {
        MsMsg::Command { req, host_guid, generation, job_id, step, cmd } => {
            let agent = Arc::clone(agent);
            let tx = tx.clone();
            // Detached on purpose: a command that started runs to completion (and reaches the ledger
            // and the replay cache) even if the connection drops meanwhile.
            tokio::spawn(async move {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                let exec =
                    tokio::task::spawn_blocking(move || agent.handle(&host_guid, generation, &job_id, step, &cmd));
                let result = match exec.await {
                    Ok(result) => result,
                    Err(e) => {
                        tracing::error!(req, error = %e, "command execution task failed");
                        CommandResult::Failed { message: format!("agent internal error: {e}") }
                    }
                };
                if tx.send(AgentMsg::Answer { req, result }).await.is_err() {
                    tracing::warn!(
                        req,
                        "connection lost before the answer could be sent; a resent command will be replayed"
                    );
                }
            });
            None
        }
        MsMsg::Pong => {
            agent.ms_contact(std::time::Instant::now(), Contact::Pong);
            None
        }
        MsMsg::MgmtList { addrs } => {
            book.replace(&addrs);
            tracing::info!(mgmt_addrs = ?book.list, "management server list updated");
            None
        }
        MsMsg::Welcome { hosts, .. } => {
            tracing::warn!("unexpected Welcome on a registered connection; applying its grants");
            agent.apply_grants(&hosts);
            None
        }
        MsMsg::Refused { reason } => Some(SessionEnd::Refused(reason)),
        MsMsg::Reconnect { addr, reason } => Some(SessionEnd::Moved { to: addr, reason }),
    }
}

fn msg_kind(m: &MsMsg) -> &'static str {
    match m {
        MsMsg::Welcome { .. } => "Welcome",
        MsMsg::Refused { .. } => "Refused",
        MsMsg::Command { .. } => "Command",
        MsMsg::Pong => "Pong",
        MsMsg::MgmtList { .. } => "MgmtList",
        MsMsg::Reconnect { .. } => "Reconnect",
    }
}

/// The only writer of a connection's socket. Returns why it stopped.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<AgentMsg>) -> String {
    while let Some(msg) = rx.recv().await {
        if let Err(e) = write_msg(&mut wr, &msg).await {
            return format!("write failed: {e}");
        }
    }
    let _ = wr.shutdown().await;
    "outgoing queue closed".to_owned()
}

/// Sends a Ping at once (the first report of the hosts' VMs, which takes them from Connecting to
/// Up) and then every `interval`. Returns when the writer is gone.
async fn pinger(agent: Arc<Agent>, tx: mpsc::Sender<AgentMsg>, interval: Duration) -> String {
    let mut ticks = tokio::time::interval_at(Instant::now(), interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ping = AgentMsg::Ping { hosts: agent.pings() };
        if tx.send(ping).await.is_err() {
            return "outgoing queue closed".to_owned();
        }
    }
}

/// The management server addresses: the configured ones plus those the MS told us about.
#[derive(Debug)]
struct AddrBook {
    configured: Vec<String>,
    list: Vec<String>,
    /// Keep the configured list whatever the servers push.
    fixed: bool,
}

impl AddrBook {
    fn new(configured: &[String]) -> Result<AddrBook, AgentError> {
        let configured = dedup(configured.iter());
        if configured.is_empty() {
            return Err(AgentError::Config("no management server address configured".into()));
        }
        Ok(AddrBook { list: configured.clone(), configured, fixed: false })
    }

    /// The list becomes `received` followed by the configured addresses it lacks.
    fn replace(&mut self, received: &[String]) {
        if self.fixed {
            return;
        }
        self.list = dedup(received.iter().chain(self.configured.iter()));
    }

    fn random(&self) -> String {
        let i = rand::thread_rng().gen_range(0..self.list.len());
        self.list[i].clone()
    }

    /// The address to try after `addr` (the first one if `addr` is no longer listed).
    fn next_after(&self, addr: &str) -> String {
        let i = self.list.iter().position(|a| a == addr).map_or(0, |i| (i + 1) % self.list.len());
        self.list[i].clone()
    }
}

fn dedup<'a>(addrs: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        let a = a.trim();
        if !a.is_empty() && !out.iter().any(|o| o == a) {
            out.push(a.to_owned());
        }
    }
    out
}

/// Jittered exponential backoff: ~100 ms doubling up to ~2 s, each delay drawn from [d/2, d].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_START }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_CAP);
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn addr_book_union_and_rotation() {
        assert!(AddrBook::new(&s(&[" ", ""])).is_err());
        let mut b = AddrBook::new(&s(&["a:1", "b:1", "a:1"])).unwrap();
        assert_eq!(b.list, s(&["a:1", "b:1"]));
        assert_eq!(b.next_after("a:1"), "b:1");
        assert_eq!(b.next_after("b:1"), "a:1");
        assert!(b.list.contains(&b.random()));
        b.replace(&s(&["c:1", "b:1"]));
        assert_eq!(b.list, s(&["c:1", "b:1", "a:1"]));
        assert_eq!(b.next_after("b:1"), "a:1");
        assert_eq!(b.next_after("a:1"), "c:1");
        assert_eq!(b.next_after("gone:1"), "c:1");
        b.replace(&[]);
        assert_eq!(b.list, s(&["a:1", "b:1"]));
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= BACKOFF_START);
        for _ in 0..10 {
            assert!(b.next_delay() <= BACKOFF_CAP);
        }
        assert_eq!(b.next, BACKOFF_CAP);
        assert!(b.next_delay() >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }
}
