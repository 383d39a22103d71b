//! Agent connections (port 8250): registration, pings, and sending fenced commands.
//!
//! An agent connects out and says `Hello` with a join token and its hosts. For each host this
//! server takes ownership in the database (`host_take_connection`), which bumps the host's
//! ownership generation; the agent learns the generation in `Welcome` and from then on refuses
//! commands carrying an older one. So once another server takes a host over, nothing this server
//! still sends to it is executed.
//!
//! A command is sent with `(job_id, step)`; the agent answers a repeat of the same pair with the
//! stored result, so a job resuming after a crash may resend a step safely.

use crate::Core;
use sha2_lite::sha256_hex;
use skyhold_db::infra::{HostConnect, host_disconnect, host_ping, host_take_connection};
use skyhold_proto::{AgentMsg, Command, CommandResult, HostGrant, MsMsg, PowerState, read_msg, write_msg};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Why a command could not be delivered or answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("host {0} is not connected to this management server")]
    NotConnected(String),
    #[error("host {0} did not answer in time")]
    Timeout(String),
    #[error("connection to host {0} closed before it answered")]
    Closed(String),
    #[error("this management server is fenced and may not send commands")]
    Fenced,
}

struct AgentConn {
    tx: mpsc::Sender<MsMsg>,
    pending: Mutex<HashMap<u64, oneshot::Sender<CommandResult>>>,
    agent_id: String,
    /// Notified to close the connection from outside (self-fencing).
    close: tokio::sync::Notify,
    /// This server asked the agent to move: its hosts stay Up while it reconnects elsewhere.
    moving: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct HostConn {
    guid: String,
    generation: i64,
    conn: Arc<AgentConn>,
}

/// Hosts whose agents are connected to this server.
#[derive(Default)]
pub struct AgentRegistry {
    hosts: Mutex<HashMap<String, HostConn>>,
    next_req: AtomicU64,
}

impl AgentRegistry {
    /// Number of hosts connected here.
    pub fn host_count(&self) -> usize {
        self.hosts.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Distinct agent processes connected here.
    pub fn agent_count(&self) -> usize {
        self.hosts
            .lock()
            .map(|h| {
                let mut ids: Vec<&str> = h.values().map(|c| c.conn.agent_id.as_str()).collect();
                ids.sort_unstable();
                ids.dedup();
                ids.len()
            })
            .unwrap_or(0)
    }

    pub fn is_connected(&self, host_id: &str) -> bool {
        self.hosts.lock().map(|h| h.contains_key(host_id)).unwrap_or(false)
    }

    /// Ask every connected agent to move: agent i goes to `addrs[i % len]`. Returns how many.
    pub fn reconnect_all(&self, addrs: &[String], reason: &str) -> usize {
        if addrs.is_empty() {
            return 0;
        }
        let conns = self.connections();
        for (i, c) in conns.iter().enumerate() {
            let msg = MsMsg::Reconnect { addr: addrs[i % addrs.len()].clone(), reason: reason.to_string() };
            c.moving.store(true, Ordering::SeqCst);
            let _ = c.tx.try_send(msg);
        }
        conns.len()
    }

    /// Send every connected agent its (re-ordered) list of management server addresses, after the
    /// `host` setting or the set of live servers changed.
    pub fn push_mgmt_lists(&self, core: &Core) -> usize {
        let conns = self.connections();
        for c in &conns {
            let _ = c.tx.try_send(MsMsg::MgmtList { addrs: mgmt_addrs(core, &c.agent_id) });
        }
        conns.len()
    }

    /// Ask one agent (the one with the fewest hosts) to move to `addr`. Returns its id.
    pub fn reconnect_one(&self, addr: &str, reason: &str) -> Option<String> {
        // Never an agent with commands in flight: moving it would bump its hosts' generation
        // and make it refuse those commands' resends as stale.
        let c = self
            .connections()
            .into_iter()
            .filter(|c| c.pending.lock().map(|p| p.is_empty()).unwrap_or(false))
            .min_by_key(|c| self.hosts_of(c))?;
        c.moving.store(true, Ordering::SeqCst);
        let _ = c.tx.try_send(MsMsg::Reconnect { addr: addr.to_string(), reason: reason.to_string() });
        Some(c.agent_id.clone())
    }

    /// Drop every agent connection (a fenced server must not keep agents it may not command:
    /// they reconnect to the next server on their list).
    pub fn close_all(&self) -> usize {
        let conns = self.connections();
        if let Ok(mut h) = self.hosts.lock() {
            h.clear();
        }
        for c in &conns {
            c.close.notify_one();
        }
        conns.len()
    }

    fn connections(&self) -> Vec<Arc<AgentConn>> {
        let mut out: Vec<Arc<AgentConn>> = Vec::new();
        if let Ok(h) = self.hosts.lock() {
            for hc in h.values() {
                if !out.iter().any(|c| Arc::ptr_eq(c, &hc.conn)) {
                    out.push(hc.conn.clone());
                }
            }
        }
        out
    }

    fn hosts_of(&self, c: &Arc<AgentConn>) -> usize {
        self.hosts.lock().map(|h| h.values().filter(|hc| Arc::ptr_eq(&hc.conn, c)).count()).unwrap_or(0)
    }

    fn get(&self, host_id: &str) -> Option<HostConn> {
        self.hosts.lock().ok().and_then(|h| h.get(host_id).cloned())
    }

    fn insert(&self, host_id: String, hc: HostConn) {
        if let Ok(mut h) = self.hosts.lock() {
            h.insert(host_id, hc);
        }
    }

    /// Remove `host_id` if it still belongs to `conn`; returns the generation it had.
    fn remove_if(&self, host_id: &str, conn: &Arc<AgentConn>) -> Option<i64> {
        let mut h = self.hosts.lock().ok()?;
        match h.get(host_id) {
            Some(hc) if Arc::ptr_eq(&hc.conn, conn) => h.remove(host_id).map(|hc| hc.generation),
            _ => None,
        }
    }
}

impl Core {
    /// Send a command to a host connected to this server and wait for its answer.
    pub async fn agent_send(
        &self,
        host_id: &str,
        job_id: &str,
        step: u32,
        cmd: Command,
        timeout: Duration,
    ) -> Result<CommandResult, SendError> {
        if self.is_fenced() {
            return Err(SendError::Fenced);
        }
        let hc = self.agents().get(host_id).ok_or_else(|| SendError::NotConnected(host_id.to_string()))?;
        let req = self.agents().next_req.fetch_add(1, Ordering::Relaxed) + 1;
        let (otx, orx) = oneshot::channel();
        if let Ok(mut p) = hc.conn.pending.lock() {
            p.insert(req, otx);
        }
        let msg = MsMsg::Command {
            req,
            host_guid: hc.guid.clone(),
            generation: hc.generation as u64,
            job_id: job_id.to_string(),
            step,
            cmd,
        };
        if hc.conn.tx.send(msg).await.is_err() {
            return Err(SendError::Closed(host_id.to_string()));
        }
        match tokio::time::timeout(timeout, orx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(SendError::Closed(host_id.to_string())),
            Err(_) => {
                if let Ok(mut p) = hc.conn.pending.lock() {
                    p.remove(&req);
                }
                Err(SendError::Timeout(host_id.to_string()))
            }
        }
    }
}

impl Core {
    /// Send a command to a host wherever its agent is connected: here, or through the peer
    /// holding it (peer channel). `Ok(None)` when nobody holds the host right now.
    pub async fn agent_send_anywhere(
        &self,
        host_id: &str,
        job_id: &str,
        step: u32,
        cmd: Command,
        timeout: Duration,
    ) -> Result<Option<CommandResult>, SendError> {
        match self.agent_send(host_id, job_id, step, cmd.clone(), timeout).await {
            Err(SendError::NotConnected(_)) => self.agent_forward(host_id, job_id, step, &cmd, timeout).await,
            other => other.map(Some),
        }
    }

    /// The host is connected to another server: ask that server (peer channel) to send it.
    /// `Ok(None)` when nobody holds the host right now (its agent is reconnecting).
    pub async fn agent_forward(
        &self,
        host_id: &str,
        job_id: &str,
        step: u32,
        cmd: &Command,
        left: Duration,
    ) -> Result<Option<CommandResult>, SendError> {
        if self.is_fenced() {
            return Err(SendError::Fenced);
        }
        let owner = async {
            let mut c = self.db().conn().await?;
            skyhold_db::infra::host_fetch(&mut c, host_id).await
        }
        .await
        .ok()
        .flatten()
        .and_then(|h| h.mgmt_server_id);
        let Some(owner) = owner.filter(|o| o != &self.ms().id) else { return Ok(None) };
        let Some(peer) = self.peers().into_iter().find(|p| p.id == owner) else { return Ok(None) };
        let req = crate::peer::PeerReq::Forward {
            host_id: host_id.to_string(),
            job_id: job_id.to_string(),
            step,
            cmd: cmd.clone(),
            timeout_ms: left.as_millis() as u64,
        };
        match crate::peer::call(self, &peer.id, &peer.peer_addr, req, left + Duration::from_secs(1)).await {
            Ok(crate::peer::PeerResp::Result { result }) => {
                tracing::info!(job = %job_id, host = %host_id, peer = %peer.id, step, "forwarded agent command through the peer holding the host");
                Ok(Some(result))
            }
            _ => Ok(None),
        }
    }
}

/// Accept agent connections until the process ends.
pub async fn serve(core: Core, listener: TcpListener) {
    crate::accept_loop(core, listener, "agent", handle).await
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("protocol: {0}")]
    Proto(#[from] skyhold_proto::ProtoError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("storage: {0}")]
    Db(#[from] skyhold_db::DbError),
    #[error("no message for {0:?}")]
    Silent(Duration),
}

/// Hash of a join token as stored in `cloud_meta`.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

async fn handle(core: Core, sock: TcpStream) -> Result<(), ConnError> {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut buf = Vec::new();
    let hello: AgentMsg = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut rd, &mut buf))
        .await
        .map_err(|_| ConnError::Silent(Duration::from_secs(10)))??;
    let AgentMsg::Hello { proto, token, agent_id, version, hosts } = hello else {
        return Err(ConnError::Refused("first message was not hello".into()));
    };
    macro_rules! refuse {
        ($reason:expr) => {{
            let reason: String = $reason;
            let _ = write_msg(&mut wr, &MsMsg::Refused { reason: reason.clone() }).await;
            return Err(ConnError::Refused(reason));
        }};
    }
    if proto != skyhold_proto::PROTO_VERSION {
        refuse!(format!("unsupported protocol version {proto}"));
    }
    if core.is_shutting_down() || core.is_fenced() {
        refuse!("management server is shutting down; try another".into());
    }
    let expected = {
        let mut c = core.db().conn().await?;
        skyhold_db::config::meta_get(&mut c, "agent_token_hash").await?
    };
    let ok = expected.map(|h| constant_eq(h.as_bytes(), token_hash(&token).as_bytes())).unwrap_or(false);
    if !ok {
        tracing::warn!(%agent_id, "agent refused: bad join token");
        refuse!("invalid join token".into());
    }
    if hosts.is_empty() || hosts.len() > 10_000 {
        refuse!("an agent must report between 1 and 10000 hosts".into());
    }

    // Where new hosts go: the zone, pod and cluster their agent names, or the first cluster.
    // Hosts already known keep their place, so a placement that cannot be resolved only refuses
    // an agent that brings a new host.
    let (cluster, unknown_guid) = {
        let mut c = core.db().conn().await?;
        let wanted = hosts.first().map(|h| h.place.clone()).unwrap_or_default();
        // Zones and pods only when the agent names them (most agents name nothing).
        let zones = if wanted.zone.is_some() { skyhold_db::infra::zone_list(&mut c).await? } else { Vec::new() };
        let pods = if wanted.pod.is_some() { skyhold_db::infra::pod_list(&mut c).await? } else { Vec::new() };
        let clusters = skyhold_db::infra::cluster_list(&mut c).await?;
        let resolved = resolve_place(&wanted, &zones, &pods, &clusters);
        let unknown = if resolved.is_err() {
            let mut first_new = None;
            for h in &hosts {
                if !skyhold_db::infra::host_guid_known(&mut c, &h.guid).await? {
                    first_new = Some(h.guid.clone());
                    break;
                }
            }
            first_new
        } else {
            None
        };
        (resolved, unknown)
    };
    let cluster = match (cluster, unknown_guid) {
        (Ok(cl), _) => Some(cl),
        (Err(why), Some(guid)) => refuse!(format!("cannot place new host {guid}: {why}")),
        (Err(_), None) => None,
    };
    let ms_id = core.ms().id.clone();
    let mut grants = Vec::with_capacity(hosts.len());
    for h in &hosts {
        let hc = HostConnect {
            guid: h.guid.clone(),
            name: h.name.clone(),
            ip: h.ip.clone(),
            hypervisor: h.hypervisor.clone(),
            cpu_cores: h.cpu_cores as i64,
            cpu_mhz: h.cpu_mhz as i64,
            mem_mb: h.mem_mb as i64,
            agent_id: agent_id.clone(),
            version: version.clone(),
            check_addr: h.check_addr.clone().unwrap_or_default(),
            zone_id: cluster.as_ref().map(|cl| cl.zone_id.clone()).unwrap_or_default(),
            pod_id: cluster.as_ref().map(|cl| cl.pod_id.clone()).unwrap_or_default(),
            cluster_id: cluster.as_ref().map(|cl| cl.id.clone()).unwrap_or_default(),
        };
        let (host_id, generation) =
            skyhold_db::retry_tx!(core.db(), |tx| host_take_connection(&mut tx, &hc, &ms_id).await)?;
        grants.push(HostGrant { guid: h.guid.clone(), host_id, generation: generation as u64 });
    }

    let ping_ms = (core.settings().get_i64(skyhold_types::settings::PING_INTERVAL).max(1) * 1000) as u64;
    let welcome = MsMsg::Welcome {
        ms_id: ms_id.clone(),
        hosts: grants.clone(),
        ping_interval_ms: ping_ms,
        mgmt_addrs: mgmt_addrs(&core, &agent_id),
    };
    write_msg(&mut wr, &welcome).await?;

    let (tx, mut rx) = mpsc::channel::<MsMsg>(1024);
    let conn = Arc::new(AgentConn {
        tx,
        pending: Mutex::new(HashMap::new()),
        agent_id: agent_id.clone(),
        close: tokio::sync::Notify::new(),
        moving: std::sync::atomic::AtomicBool::new(false),
    });
    let by_guid: HashMap<String, (String, i64)> =
        grants.iter().map(|g| (g.guid.clone(), (g.host_id.clone(), g.generation as i64))).collect();
    for g in &grants {
        core.agents().insert(
            g.host_id.clone(),
            HostConn { guid: g.guid.clone(), generation: g.generation as i64, conn: conn.clone() },
        );
    }
    tracing::info!(%agent_id, hosts = grants.len(), "agent connected");
    core.wake_jobs();

    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut wr, &m).await.is_err() {
                break;
            }
        }
    });

    let silence = Duration::from_millis(ping_ms * 3 + 2000);
    // VMs of this connection's hosts being checked after a report left them out.
    let checking: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let res: Result<(), ConnError> = async {
        loop {
            let msg: AgentMsg = tokio::select! {
                r = tokio::time::timeout(silence, read_msg(&mut rd, &mut buf)) => r.map_err(|_| ConnError::Silent(silence))??,
                _ = conn.close.notified() => return Err(ConnError::Refused("closed by this server (self-fenced)".into())),
            };
            match msg {
                AgentMsg::Answer { req, result } => {
                    let waiter = conn.pending.lock().ok().and_then(|mut p| p.remove(&req));
                    if let Some(w) = waiter {
                        let _ = w.send(result);
                    }
                }
                AgentMsg::Ping { hosts } => {
                    let mut c = core.db().conn().await?;
                    for hp in &hosts {
                        let Some((hid, generation)) = by_guid.get(&hp.guid) else { continue };
                        if !host_ping(&mut c, hid, &ms_id, *generation).await? {
                            if conn_owns(&core, hid, &conn) {
                                // Another server took the host over: stop speaking for it.
                                tracing::info!(host = %hid, "host taken over by another server; dropping it here");
                                core.agents().remove_if(hid, &conn);
                            }
                            continue;
                        }
                        if let Some(hb) = hp.heartbeat {
                            skyhold_db::hostha::host_hb_observe(&mut c, hid, hb.min(i64::MAX as u64) as i64).await?;
                        }
                        // VMs that stopped without a command: Running on this host in the
                        // database and missing from the report. A VM started after the agent
                        // composed this report is missing too: `vm_stopped_on_host` asks the host
                        // (CheckVm) before believing it, so that costs a check, never a VM.
                        let now_running: std::collections::HashSet<&str> = hp
                            .vms
                            .iter()
                            .filter(|v| v.state == PowerState::Running)
                            .map(|v| v.vm_id.as_str())
                            .collect();
                        let gone: Vec<String> = skyhold_db::vm::vm_running_ids_on_host(&mut c, hid)
                            .await?
                            .into_iter()
                            .filter(|id| !now_running.contains(id.as_str()))
                            .collect();
                        for vid in gone {
                            // One check per VM at a time (the next reports may come before it ends).
                            if !lock_set(&checking).insert(vid.clone()) {
                                continue;
                            }
                            let (core, hid, checking) = (core.clone(), hid.clone(), checking.clone());
                            tokio::spawn(async move {
                                if let Err(e) = crate::ha::vm_stopped_on_host(&core, &hid, &vid).await {
                                    tracing::warn!(vm = %vid, error = %e, "could not handle a VM reported stopped");
                                }
                                lock_set(&checking).remove(&vid);
                            });
                        }
                    }
                    let _ = conn.tx.send(MsMsg::Pong).await;
                }
                AgentMsg::Hello { .. } => return Err(ConnError::Refused("hello sent twice".into())),
            }
        }
    }
    .await;

    writer.abort();
    let moving = conn.moving.load(Ordering::SeqCst);
    for g in &grants {
        if let Some(generation) = core.agents().remove_if(&g.host_id, &conn) {
            if moving {
                // We sent the agent elsewhere: its hosts stay Up while the next server takes
                // their connections (bumping the generation); nothing to record here.
                continue;
            }
            let db = core.db().clone();
            let r = async {
                let mut c = db.conn().await?;
                host_disconnect(&mut c, &g.host_id, &ms_id, generation).await
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(host = %g.host_id, error = %e, "could not record host disconnect");
            }
        }
    }
    if let Ok(mut p) = conn.pending.lock() {
        p.clear();
    }
    tracing::info!(%agent_id, "agent disconnected");
    res
}

/// The cluster for a new host: the one its agent names (`place`: zone, pod and cluster, each a
/// UUID or a name, each narrowing the next), or the first cluster when it names none. The error
/// says what could not be found.
fn resolve_place(
    place: &skyhold_proto::HostPlace,
    zones: &[skyhold_db::infra::Zone],
    pods: &[skyhold_db::infra::Pod],
    clusters: &[skyhold_db::infra::Cluster],
) -> Result<skyhold_db::infra::Cluster, String> {
    fn one<'a, T>(kind: &str, want: &str, found: Vec<&'a T>) -> Result<&'a T, String> {
        match found.len() {
            0 => Err(format!("{kind} '{want}' does not exist")),
            1 => Ok(found[0]),
            n => Err(format!("{n} {kind}s are named '{want}': name it by its UUID")),
        }
    }
    let zone = match &place.zone {
        Some(z) => Some(one("zone", z, zones.iter().filter(|x| &x.id == z || &x.name == z).collect())?),
        None => None,
    };
    let pod = match &place.pod {
        Some(p) => {
            let found = pods
                .iter()
                .filter(|x| (&x.id == p || &x.name == p) && zone.is_none_or(|z| x.zone_id == z.id))
                .collect();
            Some(one("pod", p, found).map_err(|e| match zone {
                Some(z) => format!("{e} in zone {}", z.name),
                None => e,
            })?)
        }
        None => None,
    };
    let fits = |x: &&skyhold_db::infra::Cluster| {
        zone.is_none_or(|z| x.zone_id == z.id) && pod.is_none_or(|p| x.pod_id == p.id)
    };
    let within = match (pod, zone) {
        (Some(p), _) => format!(" in pod {}", p.name),
        (None, Some(z)) => format!(" in zone {}", z.name),
        (None, None) => String::new(),
    };
    match &place.cluster {
        Some(cl) => {
            let found = clusters.iter().filter(|x| &x.id == cl || &x.name == cl).filter(fits).collect();
            one("cluster", cl, found).cloned().map_err(|e| format!("{e}{within}"))
        }
        None => {
            clusters.iter().find(fits).cloned().ok_or_else(|| format!("no cluster exists{within} to place hosts in"))
        }
    }
}

fn lock_set(
    m: &Mutex<std::collections::HashSet<String>>,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn conn_owns(core: &Core, host_id: &str, conn: &Arc<AgentConn>) -> bool {
    core.agents().get(host_id).is_some_and(|hc| Arc::ptr_eq(&hc.conn, conn))
}

/// Addresses handed to agents: the `host` setting, this server and every live peer, ordered by
/// `indirect.agent.lb.algorithm` (static: as listed; roundrobin: rotated by the agent's id so the
/// agents of a failed server spread over the survivors; shuffle: a random order per agent).
fn mgmt_addrs(core: &Core, agent_id: &str) -> Vec<String> {
    let mut out: Vec<String> = core
        .settings()
        .get(skyhold_types::settings::HOST)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .map(|s| if s.contains(':') { s } else { format!("{s}:{}", core.ms().agent_port) })
        .collect();
    let me = format!("{}:{}", core.ms().service_ip, core.ms().agent_port);
    let mut servers = vec![me];
    servers.extend(core.peers().into_iter().map(|p| p.agent_addr));
    servers.sort();
    for s in servers {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    order_addrs(&core.settings().get(skyhold_types::settings::AGENT_LB_ALGORITHM), agent_id, out)
}

/// Order an address list for one agent (pure; tested).
pub fn order_addrs(algorithm: &str, agent_id: &str, mut addrs: Vec<String>) -> Vec<String> {
    match algorithm {
        "roundrobin" if !addrs.is_empty() => {
            let h = agent_id.bytes().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
            let k = h % addrs.len();
            addrs.rotate_left(k);
            addrs
        }
        "shuffle" => {
            use rand::seq::SliceRandom;
            addrs.shuffle(&mut rand::thread_rng());
            addrs
        }
        _ => addrs,
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 without another dependency in this crate's public surface.
mod sha2_lite {
    pub fn sha256_hex(data: &[u8]) -> String {
        skyhold_db::crypto::sha256_hex(data)
    }
}

#[cfg(test)]
mod tests {
    use super::{order_addrs, resolve_place};
    use skyhold_db::infra::{Cluster, Pod, Zone};
    use skyhold_proto::HostPlace;

    #[test]
    fn new_hosts_go_where_their_agent_says() {
        let zone = |id: &str, name: &str| Zone {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            network_type: "Basic".into(),
            dns1: String::new(),
            internal_dns1: String::new(),
            allocation_state: "Enabled".into(),
            created_ms: 0,
        };
        let pod = |id: &str, zone: &str, name: &str| Pod {
            id: id.into(),
            zone_id: zone.into(),
            name: name.into(),
            gateway: String::new(),
            netmask: String::new(),
            start_ip: String::new(),
            end_ip: String::new(),
            allocation_state: "Enabled".into(),
            created_ms: 0,
        };
        let cl = |id: &str, zone: &str, pod: &str, name: &str| Cluster {
            id: id.into(),
            zone_id: zone.into(),
            pod_id: pod.into(),
            name: name.into(),
            hypervisor: "Simulator".into(),
            allocation_state: "Enabled".into(),
            created_ms: 0,
        };
        let zones = [zone("z1", "east"), zone("z2", "west")];
        let pods = [pod("p1", "z1", "pod1"), pod("p2", "z2", "pod1")];
        let clusters = [cl("c1", "z1", "p1", "c"), cl("c2", "z2", "p2", "c"), cl("c3", "z2", "p2", "d")];
        let at = |zone: Option<&str>, pod: Option<&str>, cluster: Option<&str>| {
            let p =
                HostPlace { zone: zone.map(Into::into), pod: pod.map(Into::into), cluster: cluster.map(Into::into) };
            resolve_place(&p, &zones, &pods, &clusters).map(|c| c.id)
        };
        assert_eq!(at(None, None, None), Ok("c1".into()), "nothing named: the first cluster");
        assert_eq!(at(Some("west"), None, None), Ok("c2".into()));
        assert_eq!(at(Some("z2"), Some("pod1"), Some("d")), Ok("c3".into()));
        assert_eq!(at(None, None, Some("c3")), Ok("c3".into()), "by UUID");
        assert_eq!(at(Some("east"), None, Some("c")), Ok("c1".into()), "a name made unique by its zone");
        let e = at(None, None, Some("c")).unwrap_err();
        assert!(e.contains("2 clusters are named 'c'"), "{e}");
        let e = at(None, Some("pod1"), None).unwrap_err();
        assert!(e.contains("2 pods are named 'pod1'"), "{e}");
        let e = at(Some("north"), None, None).unwrap_err();
        assert_eq!(e, "zone 'north' does not exist");
        let e = at(Some("east"), None, Some("d")).unwrap_err();
        assert_eq!(e, "cluster 'd' does not exist in zone east");
        assert!(resolve_place(&HostPlace::default(), &zones, &pods, &[]).is_err());
    }

    #[test]
    fn address_ordering() {
        let l: Vec<String> = ["a:1", "b:1", "c:1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(order_addrs("static", "x", l.clone()), l);
        let rr: Vec<Vec<String>> =
            (0..30).map(|i| order_addrs("roundrobin", &format!("agent-{i}"), l.clone())).collect();
        // Round robin is stable per agent and spreads first choices over all servers.
        assert_eq!(rr[3], order_addrs("roundrobin", "agent-3", l.clone()));
        for a in &l {
            assert!(rr.iter().any(|o| &o[0] == a), "{a} never first");
        }
        let mut s = order_addrs("shuffle", "x", l.clone());
        s.sort();
        assert_eq!(s, l);
    }
}
