//! The domain: what a management server does, independent of how it is asked (HTTP API) or how it
//! is started (binary). VM operations, durable jobs, agent connections, placement, settings,
//! membership and the initial data.
//!
//! **Architecture Invariant:** this crate holds no SQL (it calls `skyhold-db`) and no HTTP (the
//! API crate calls it). Decisions are pure functions (`placement`) that are table-tested; the
//! executors around them do the I/O.

pub mod agents;
pub mod bootstrap;
pub mod dbwatch;
pub mod error;
pub mod events;
pub mod failpoint;
pub mod fence;
pub mod ha;
pub mod housekeeping;
pub mod jobs;
pub mod keys;
pub mod membership;
pub mod peer;
pub mod placement;
pub mod rebalance;
pub mod settings;
pub mod view;
pub mod vm;

use skyhold_db::Db;
use skyhold_db::crypto::KeyRing;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use error::CoreError;

/// Identity of this management server process.
#[derive(Debug, Clone)]
pub struct MsIdentity {
    /// Stable id (kept in the node's data dir or configured).
    pub id: String,
    /// Fresh for every process start.
    pub run_id: String,
    pub name: String,
    pub service_ip: String,
    pub api_port: u16,
    pub agent_port: u16,
    pub cluster_port: u16,
}

/// Everything a management server shares between its tasks. Cheap to clone (`Arc`).
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    keys: keys::NodeKeys,
    cluster_secret: String,
    ms: MsIdentity,
    settings: settings::Settings,
    agents: agents::AgentRegistry,
    jobs_wakeup: tokio::sync::Notify,
    shutting_down: AtomicBool,
    exiting: AtomicBool,
    registered: AtomicBool,
    fenced: AtomicBool,
    /// Live peers (id, peer address, agent address), refreshed by the membership monitor.
    peers: std::sync::RwLock<Vec<PeerInfo>>,
    /// When this server last lifted a self-fence (it does not judge peers for a while after).
    unfenced_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// When the set of live peers last changed (rebalancing waits for it to settle).
    peers_changed: std::sync::Mutex<std::time::Instant>,
}

/// A live peer as the membership monitor last saw it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub id: String,
    pub peer_addr: String,
    pub agent_addr: String,
    /// Heartbeat age on the database clock when last seen.
    pub heartbeat_age_ms: i64,
}

impl Core {
    /// `cluster_secret` authenticates the peer channel (decrypted from `cloud_meta`).
    pub fn new(db: Db, keys: keys::NodeKeys, cluster_secret: String, ms: MsIdentity) -> Core {
        Core {
            inner: Arc::new(Inner {
                db,
                keys,
                cluster_secret,
                ms,
                settings: settings::Settings::default(),
                agents: agents::AgentRegistry::default(),
                jobs_wakeup: tokio::sync::Notify::new(),
                shutting_down: AtomicBool::new(false),
                exiting: AtomicBool::new(false),
                registered: AtomicBool::new(false),
                fenced: AtomicBool::new(false),
                peers: std::sync::RwLock::new(Vec::new()),
                peers_changed: std::sync::Mutex::new(std::time::Instant::now()),
                unfenced_at: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }
    /// The node's key ring as it is now (a rotation may swap it).
    pub fn key(&self) -> Arc<KeyRing> {
        self.inner.keys.current()
    }
    pub fn node_keys(&self) -> &keys::NodeKeys {
        &self.inner.keys
    }
    pub fn cluster_secret(&self) -> &str {
        &self.inner.cluster_secret
    }
    pub fn ms(&self) -> &MsIdentity {
        &self.inner.ms
    }
    pub fn settings(&self) -> &settings::Settings {
        &self.inner.settings
    }
    pub fn agents(&self) -> &agents::AgentRegistry {
        &self.inner.agents
    }

    /// Wake the job executor (new work was queued).
    pub fn wake_jobs(&self) {
        self.inner.jobs_wakeup.notify_one();
    }

    /// Wake this server's executor and every live peer's (work was queued).
    pub fn wake_cluster(&self) {
        self.wake_jobs();
        peer::wake_peers(self);
    }
    pub(crate) async fn jobs_woken(&self) {
        self.inner.jobs_wakeup.notified().await
    }

    /// This server stops taking new work (graceful shutdown, drain).
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.wake_jobs();
    }

    /// The process is on its way out (SIGTERM): a drain can no longer be cancelled.
    pub fn set_exiting(&self) {
        self.inner.exiting.store(true, Ordering::SeqCst);
        self.begin_shutdown();
    }
    pub fn is_exiting(&self) -> bool {
        self.inner.exiting.load(Ordering::SeqCst)
    }

    /// Take new work again (`cancelShutdown`).
    pub fn cancel_shutdown(&self) {
        self.inner.shutting_down.store(false, Ordering::SeqCst);
        self.wake_jobs();
    }
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Who system events (membership, takeovers) belong to: the first administrator account.
    pub async fn system_owner(&self) -> Result<events::EventOwner, CoreError> {
        let mut c = self.db().conn().await?;
        events::system_owner(&mut c).await
    }

    /// Live peers as last seen by the membership monitor.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.inner.peers.read().map(|p| p.clone()).unwrap_or_default()
    }
    pub(crate) fn set_peers(&self, p: Vec<PeerInfo>) {
        if let Ok(mut w) = self.inner.peers.write() {
            let mut old: Vec<&str> = w.iter().map(|x| x.id.as_str()).collect();
            let mut new: Vec<&str> = p.iter().map(|x| x.id.as_str()).collect();
            old.sort_unstable();
            new.sort_unstable();
            if old != new
                && let Ok(mut t) = self.inner.peers_changed.lock()
            {
                *t = std::time::Instant::now();
            }
            *w = p;
        }
    }

    /// Time since the set of live peers last changed.
    pub fn peers_stable_for(&self) -> std::time::Duration {
        self.inner.peers_changed.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Registered in `management_server` with a live heartbeat.
    pub fn is_registered(&self) -> bool {
        self.inner.registered.load(Ordering::SeqCst) && !self.is_fenced()
    }
    pub(crate) fn set_registered(&self, v: bool) {
        self.inner.registered.store(v, Ordering::SeqCst);
    }

    /// Self-fenced: the heartbeat could not be renewed in time; claim no work, send no commands.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::SeqCst)
    }
    pub(crate) fn set_fenced(&self, v: bool) {
        let was = self.inner.fenced.swap(v, Ordering::SeqCst);
        if was
            && !v
            && let Ok(mut t) = self.inner.unfenced_at.lock()
        {
            *t = Some(std::time::Instant::now());
        }
    }

    /// Time since this server last lifted a self-fence (`None`: never fenced).
    pub fn since_unfenced(&self) -> Option<std::time::Duration> {
        self.inner.unfenced_at.lock().ok().and_then(|t| *t).map(|t| t.elapsed())
    }
}

/// Accept connections on `listener` forever, handling each in its own task. `what` names the port
/// in logs.
pub(crate) async fn accept_loop<F, Fut, E>(core: Core, listener: tokio::net::TcpListener, what: &'static str, handle: F)
where
    F: Fn(Core, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let fut = handle(core.clone(), sock);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(%peer, port = what, error = %e, "connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(port = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
