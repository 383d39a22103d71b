//! Database endpoints and failover (db.properties `db.cloud.host` + `db.cloud.slaves`,
//! `db.ha.topology`).
//!
//! Every endpoint has its own pool (connected lazily). A monitor probes each endpoint every
//! 500 ms, and at once when a call on the active endpoint fails:
//! - **galera**: healthy = `wsrep_ready` ON, `wsrep_local_state_comment` Synced and
//!   `wsrep_cluster_status` Primary. Every server writes to the *first healthy endpoint in the
//!   configured order*, so all servers agree on one node (no certification conflicts between
//!   them) and return to the preferred node when it is Synced again. Sessions use
//!   `wsrep_sync_wait = 1` (causal reads).
//! - **replication**: healthy = reachable and writable (`@@read_only` = 0): writes never go to a
//!   read-only replica. The active endpoint is kept while it stays healthy; after a failover the
//!   primary (the first endpoint) is tried again once `db.cloud.secondsBeforeRetryMaster` passed.
//!   Promoting a replica is the operator's (or orchestrator's) act; Skyhold follows whichever node
//!   is writable.
//!
//!   Every replica is also watched: `SHOW SLAVE STATUS` (the I/O and SQL threads, their last
//!   errors and `Seconds_Behind_Master`) gives each endpoint a replication condition (ok, lagging
//!   past `db.ha.replicaLagAlertSeconds`, broken); changes are logged and become events, so a
//!   replica that silently stopped replicating is seen before it is needed.
//!
//! Failovers and replication changes are queued as [`DbNotice`]s for the management server to
//! record as events (the database is reachable again by then).
//!
//! A transaction that fails on a lost connection is rerun by `retry_tx!` (bounded), by then on the
//! new active endpoint: API calls arriving during a failover wait instead of failing.

use sqlx::{AnyPool, Row};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use crate::props::Topology;

/// How to choose among several endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub topology: Topology,
    /// Replication: how long after a failover the primary is tried again.
    pub retry_master_after: Duration,
    /// Replication: a replica further behind than this is reported as lagging.
    pub lag_alert: Duration,
}

/// What a replica reports about itself (`SHOW SLAVE STATUS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// The node it replicates from (`Master_Host:Master_Port`).
    pub source: String,
    /// `Slave_IO_Running`: Yes, No or Connecting.
    pub io_running: String,
    /// `Slave_SQL_Running`: Yes or No.
    pub sql_running: String,
    /// `Seconds_Behind_Master` (None when a thread is stopped).
    pub lag_s: Option<i64>,
    /// The last I/O or SQL error, if any.
    pub last_error: String,
}

/// How replication into one endpoint stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplCondition {
    Ok,
    Lagging(i64),
    Broken(String),
}

impl ReplCondition {
    /// Short name, as shown by `db status` and stored for de-duplicating events.
    pub fn label(&self) -> &'static str {
        match self {
            ReplCondition::Ok => "ok",
            ReplCondition::Lagging(_) => "lagging",
            ReplCondition::Broken(_) => "broken",
        }
    }
}

impl std::fmt::Display for ReplCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplCondition::Ok => write!(f, "replicating"),
            ReplCondition::Lagging(s) => write!(f, "replicating {s} s behind its source"),
            ReplCondition::Broken(why) => write!(f, "replication broken: {why}"),
        }
    }
}

impl ReplicaState {
    /// Judge a replica (pure; tested).
    pub fn condition(&self, lag_alert: Duration) -> ReplCondition {
        let err = if self.last_error.is_empty() { String::new() } else { format!(" ({})", self.last_error) };
        if self.io_running != "Yes" {
            return ReplCondition::Broken(format!(
                "I/O thread {} from {}{err}",
                match self.io_running.as_str() {
                    "" | "No" => "stopped",
                    other => other,
                },
                self.source
            ));
        }
        if self.sql_running != "Yes" {
            return ReplCondition::Broken(format!("SQL thread stopped{err}"));
        }
        match self.lag_s {
            Some(s) if s as u128 > lag_alert.as_secs() as u128 => ReplCondition::Lagging(s),
            _ => ReplCondition::Ok,
        }
    }
}

/// Something the connector saw that the management server records as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbNotice {
    /// Writes moved from one endpoint to another.
    Failover { from: String, to: String, topology: Topology, reason: String },
    /// Replication into `endpoint` changed condition.
    Replication { endpoint: String, condition: ReplCondition },
}

/// One endpoint as the last probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub name: String,
    pub active: bool,
    pub healthy: bool,
    /// "primary", "replica", "galera", or "unreachable".
    pub role: String,
    /// What the probe read (Galera state, read_only, or the error).
    pub detail: String,
    /// Galera: nodes in this node's component (`wsrep_cluster_size`).
    pub cluster_size: Option<i64>,
    /// Replication: this node's state as a replica, if it is one.
    pub replica: Option<ReplicaState>,
    /// Replication: the condition judged from `replica` (None: not a replica, or not readable).
    pub replication: Option<ReplCondition>,
    /// Replication, writable nodes: the newest management-server heartbeat stored on this node
    /// (epoch ms). Where servers write, it is fresh; on a stale old primary it is old.
    pub freshness: Option<i64>,
}

pub struct Endpoints {
    eps: Vec<(String, AnyPool)>,
    active: AtomicUsize,
    policy: Option<Policy>,
    health: Mutex<Vec<EndpointStatus>>,
    wake: tokio::sync::Notify,
    failed_over_at: Mutex<Option<Instant>>,
    notices: Mutex<Vec<DbNotice>>,
    /// Set once the first probe round chose an endpoint.
    chosen: std::sync::atomic::AtomicBool,
    /// One monitoring connection per endpoint, outside the pools: a probe must fail at once on a
    /// dead node (a pool keeps retrying the connect until its acquire timeout).
    probe_conns: Vec<tokio::sync::Mutex<Option<sqlx::AnyConnection>>>,
}

impl Endpoints {
    pub(crate) fn single(name: String, pool: AnyPool) -> Endpoints {
        Self::build(vec![(name, pool)], None)
    }

    pub(crate) fn many(eps: Vec<(String, AnyPool)>, policy: Policy) -> Endpoints {
        Self::build(eps, Some(policy))
    }

    fn build(eps: Vec<(String, AnyPool)>, policy: Option<Policy>) -> Endpoints {
        let n = eps.len();
        let health = eps
            .iter()
            .enumerate()
            .map(|(i, (n, _))| EndpointStatus {
                name: n.clone(),
                active: i == 0,
                healthy: true,
                role: "unknown".into(),
                detail: String::new(),
                cluster_size: None,
                replica: None,
                replication: None,
                freshness: None,
            })
            .collect();
        Endpoints {
            eps,
            active: AtomicUsize::new(0),
            policy,
            health: Mutex::new(health),
            wake: tokio::sync::Notify::new(),
            failed_over_at: Mutex::new(None),
            notices: Mutex::new(Vec::new()),
            chosen: std::sync::atomic::AtomicBool::new(false),
            probe_conns: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
        }
    }

    /// Take the notices queued since the last call (at most 1000 are kept).
    pub(crate) fn take_notices(&self) -> Vec<DbNotice> {
        self.notices.lock().map(|mut n| std::mem::take(&mut *n)).unwrap_or_default()
    }

    fn notify(&self, n: DbNotice) {
        if let Ok(mut q) = self.notices.lock()
            && q.len() < 1000
        {
            q.push(n);
        }
    }

    pub(crate) fn active(&self) -> (String, AnyPool) {
        let i = self.active.load(Ordering::SeqCst).min(self.eps.len() - 1);
        (self.eps[i].0.clone(), self.eps[i].1.clone())
    }

    pub(crate) fn active_name(&self) -> String {
        self.active().0
    }

    /// Are there several endpoints to fail over between?
    pub(crate) fn several(&self) -> bool {
        self.eps.len() > 1
    }

    /// A call on the active endpoint failed: probe now.
    pub(crate) fn suspect(&self) {
        if self.eps.len() > 1 {
            self.wake.notify_one();
        }
    }

    pub(crate) fn healthy_count(&self) -> usize {
        self.health.lock().map(|h| h.iter().filter(|e| e.healthy).count()).unwrap_or(0)
    }

    pub(crate) fn describe(&self) -> String {
        self.status().iter().map(|e| format!("{}: {} {}", e.name, e.role, e.detail)).collect::<Vec<_>>().join("; ")
    }

    pub(crate) fn status(&self) -> Vec<EndpointStatus> {
        let active = self.active.load(Ordering::SeqCst);
        let mut v = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        for (i, e) in v.iter_mut().enumerate() {
            e.active = i == active;
        }
        v
    }

    pub(crate) async fn close(&self) {
        for (_, p) in &self.eps {
            p.close().await;
        }
    }

    /// Probe every endpoint and choose the active one.
    pub(crate) async fn check_all(&self) {
        let Some(policy) = self.policy else { return };
        let probes = futures::future::join_all(
            self.eps.iter().zip(&self.probe_conns).map(|((_, p), c)| probe(p, c, policy.topology)),
        )
        .await;
        let statuses: Vec<EndpointStatus> = self
            .eps
            .iter()
            .zip(probes)
            .map(|((n, _), p)| EndpointStatus {
                name: n.clone(),
                active: false,
                healthy: p.healthy,
                role: p.role,
                detail: p.detail,
                cluster_size: p.cluster_size,
                replication: p.replica.as_ref().map(|r| r.condition(policy.lag_alert)),
                replica: p.replica,
                freshness: p.freshness,
            })
            .collect();
        let healthy: Vec<bool> = statuses.iter().map(|s| s.healthy).collect();
        let before = self.health.lock().map(|mut h| std::mem::replace(&mut *h, statuses.clone())).unwrap_or_default();
        for (old, new) in before.iter().zip(&statuses) {
            // A replica that cannot be read right now (unreachable) keeps its last condition.
            if let Some(cond) = &new.replication
                && old.replication.as_ref().map(ReplCondition::label) != Some(cond.label())
            {
                match cond {
                    ReplCondition::Ok => tracing::info!(endpoint = %new.name, "{cond}"),
                    _ => tracing::warn!(endpoint = %new.name, "{cond}"),
                }
                self.notify(DbNotice::Replication { endpoint: new.name.clone(), condition: cond.clone() });
            }
        }
        if !self.chosen.swap(true, Ordering::SeqCst) && policy.topology == Topology::Replication {
            // First choice of this process: several writable nodes may be a healthy two-way pair
            // (same data: keep the configured order) or a stale old primary next to the promoted
            // node. Start where the cluster's newest state is.
            if let Some(i) = freshest(&statuses)
                && i != self.active.load(Ordering::SeqCst)
            {
                tracing::warn!(
                    endpoint = %self.eps[i].0,
                    "starting on this endpoint: several are writable and it holds the newest cluster state"
                );
                self.active.store(i, Ordering::SeqCst);
                if let Ok(mut t) = self.failed_over_at.lock() {
                    *t = Some(Instant::now());
                }
            }
        }
        let cur = self.active.load(Ordering::SeqCst);
        let since = self.failed_over_at.lock().ok().and_then(|t| *t).map(|t| t.elapsed());
        let caught_up: Vec<bool> =
            statuses.iter().map(|s| s.replication.as_ref() == Some(&ReplCondition::Ok)).collect();
        let next = choose(policy, &healthy, &caught_up, cur, since);
        if next != cur {
            let from = self.eps[cur].0.clone();
            let to = self.eps[next].0.clone();
            self.active.store(next, Ordering::SeqCst);
            if let Ok(mut t) = self.failed_over_at.lock() {
                *t = if next == 0 { None } else { Some(Instant::now()) };
            }
            let reason = match statuses.get(cur) {
                Some(s) if !s.healthy => format!("{} is {}: {}", from, s.role, s.detail),
                _ => format!("{to} is preferred again"),
            };
            tracing::warn!(%from, %to, topology = ?policy.topology, %reason, "database failover: writing to another endpoint");
            self.notify(DbNotice::Failover { from, to, topology: policy.topology, reason });
        } else if !healthy.iter().any(|h| *h) {
            tracing::error!(endpoints = %self.describe(), "Unable to get a connection from the database pool: no endpoint is usable");
        }
    }
}

/// Which endpoint to use (pure; tested). `since_failover` is the time since the last move away
/// from the primary (replication failback). `caught_up[i]`: endpoint `i` replicates, and is not
/// broken or lagging. Replication fails back to the primary only when it has caught up with what
/// was written elsewhere meanwhile (a two-way pair); a returning old primary that replicates from
/// nobody (a one-way pair after a promotion) holds stale data and is not written to while the
/// current node is healthy.
pub fn choose(
    policy: Policy,
    healthy: &[bool],
    caught_up: &[bool],
    cur: usize,
    since_failover: Option<Duration>,
) -> usize {
    let first = healthy.iter().position(|h| *h);
    match policy.topology {
        // Everyone on the same node: the first healthy one in the configured order.
        Topology::Galera => first.unwrap_or(cur),
        Topology::Replication | Topology::Single => {
            let cur_ok = healthy.get(cur).copied().unwrap_or(false);
            if cur != 0
                && healthy.first().copied().unwrap_or(false)
                && (!cur_ok || caught_up.first().copied().unwrap_or(false))
                && since_failover.is_none_or(|d| d >= policy.retry_master_after)
            {
                return 0;
            }
            if cur_ok { cur } else { first.unwrap_or(cur) }
        }
    }
}

/// Among healthy endpoints, the one whose stored management-server heartbeats are the newest, if
/// it is strictly newer than every other healthy one (pure; tested).
pub fn freshest(statuses: &[EndpointStatus]) -> Option<usize> {
    let healthy: Vec<(usize, i64)> =
        statuses.iter().enumerate().filter(|(_, s)| s.healthy).map(|(i, s)| (i, s.freshness.unwrap_or(0))).collect();
    let best = healthy.iter().map(|(_, f)| *f).max()?;
    let mut at_best = healthy.iter().filter(|(_, f)| *f == best);
    let first = at_best.next()?;
    if at_best.next().is_some() || healthy.len() < 2 { None } else { Some(first.0) }
}

/// What one probe of one endpoint found.
struct Probe {
    healthy: bool,
    role: String,
    detail: String,
    cluster_size: Option<i64>,
    replica: Option<ReplicaState>,
    freshness: Option<i64>,
}

async fn probe(pool: &AnyPool, slot: &tokio::sync::Mutex<Option<sqlx::AnyConnection>>, topology: Topology) -> Probe {
    use sqlx::ConnectOptions;
    let mut guard = slot.lock().await;
    let res = tokio::time::timeout(Duration::from_millis(1500), async {
        if guard.is_none() {
            *guard = Some(pool.connect_options().connect().await?);
        }
        let Some(c) = guard.as_mut() else { return Err(sqlx::Error::PoolClosed) };
        match topology {
            Topology::Galera => {
                let rows = sqlx::query("SHOW GLOBAL STATUS LIKE 'wsrep_%'").fetch_all(&mut *c).await?;
                let mut ready = String::new();
                let mut state = String::new();
                let mut comp = String::new();
                let mut size = None;
                for r in &rows {
                    let k: String = r.try_get(0).unwrap_or_default();
                    let v: String = r.try_get(1).unwrap_or_default();
                    match k.as_str() {
                        "wsrep_ready" => ready = v,
                        "wsrep_local_state_comment" => state = v,
                        "wsrep_cluster_status" => comp = v,
                        "wsrep_cluster_size" => size = v.parse().ok(),
                        _ => {}
                    }
                }
                let healthy = ready == "ON" && state == "Synced" && comp == "Primary";
                Ok::<_, sqlx::Error>(Probe {
                    freshness: None,
                    healthy,
                    role: "galera".to_string(),
                    detail: format!(
                        "ready={ready} state={state} component={comp} size={}",
                        size.map(|s: i64| s.to_string()).unwrap_or_else(|| "?".into())
                    ),
                    cluster_size: size,
                    replica: None,
                })
            }
            _ => {
                let ro: i64 = sqlx::query("SELECT CAST(@@read_only AS SIGNED)").fetch_one(&mut *c).await?.try_get(0)?;
                let role = if ro == 0 { "primary" } else { "replica" };
                let mut detail = format!("read_only={ro}");
                if ro == 0
                    && let Some(semi) = semi_sync(c).await
                {
                    detail.push_str(&format!("; {semi}"));
                }
                let replica = match replica_state(c).await {
                    Ok(r) => r,
                    Err(e) => {
                        detail.push_str(&format!(
                            "; replication state not readable ({e}): grant SLAVE MONITOR to Skyhold's database user"
                        ));
                        None
                    }
                };
                if let Some(r) = &replica {
                    detail.push_str(&format!(
                        "; replicating from {} io={} sql={} lag={}",
                        r.source,
                        r.io_running,
                        r.sql_running,
                        r.lag_s.map(|s| format!("{s}s")).unwrap_or_else(|| "-".into())
                    ));
                }
                // A fresh database has no such table yet: no freshness, no preference.
                let freshness = if ro == 0 {
                    sqlx::query("SELECT CAST(COALESCE(MAX(last_heartbeat_ms), 0) AS SIGNED) FROM management_server")
                        .fetch_one(&mut *c)
                        .await
                        .ok()
                        .and_then(|r| r.try_get::<i64, _>(0).ok())
                } else {
                    None
                };
                Ok(Probe { healthy: ro == 0, role: role.to_string(), detail, cluster_size: None, replica, freshness })
            }
        }
    })
    .await;
    if !matches!(res, Ok(Ok(_))) {
        // A failed or hung monitoring connection is replaced by a fresh one next time.
        *guard = None;
    }
    let down = |detail: String| Probe {
        healthy: false,
        role: "unreachable".into(),
        detail,
        cluster_size: None,
        replica: None,
        freshness: None,
    };
    match res {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => down(e.to_string()),
        Err(_) => down("no answer within 1.5 s".into()),
    }
}

/// A primary's semi-synchronous replication state, if it is enabled: `semi_sync=ON`, or
/// `semi_sync=OFF (...)` when it fell back to asynchronous (no replica acknowledged in time).
async fn semi_sync(c: &mut sqlx::AnyConnection) -> Option<String> {
    let rows =
        sqlx::query("SHOW GLOBAL VARIABLES LIKE 'rpl_semi_sync_master_enabled'").fetch_all(&mut *c).await.ok()?;
    let enabled: String = rows.first()?.try_get(1).ok()?;
    if enabled != "ON" {
        return None;
    }
    let rows = sqlx::query("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_status'").fetch_all(&mut *c).await.ok()?;
    let status: String = rows.first()?.try_get(1).ok()?;
    Some(if status == "ON" {
        "semi_sync=ON".to_string()
    } else {
        "semi_sync=OFF (enabled, but fell back to asynchronous: no replica acknowledged in time)".to_string()
    })
}

/// This node's state as a replica (None when it replicates from nobody). MariaDB's
/// `SHOW ALL SLAVES STATUS` covers every (multi-source) connection, MySQL's `SHOW SLAVE STATUS`
/// the default one; with several connections the worst one is reported.
async fn replica_state(c: &mut sqlx::AnyConnection) -> Result<Option<ReplicaState>, sqlx::Error> {
    let rows = match sqlx::query("SHOW ALL SLAVES STATUS").fetch_all(&mut *c).await {
        Ok(r) => r,
        Err(_) => sqlx::query("SHOW SLAVE STATUS").fetch_all(&mut *c).await?,
    };
    let states = rows.iter().map(|r| {
        let text = |col: &str| -> String {
            r.try_get::<Option<String>, _>(col).ok().flatten().unwrap_or_else(|| {
                r.try_get::<Option<i64>, _>(col).ok().flatten().map(|v| v.to_string()).unwrap_or_default()
            })
        };
        let lag_s = r
            .try_get::<Option<i64>, _>("Seconds_Behind_Master")
            .ok()
            .flatten()
            .or_else(|| text("Seconds_Behind_Master").parse().ok());
        let last_error =
            [text("Last_IO_Error"), text("Last_SQL_Error")].into_iter().filter(|e| !e.is_empty()).collect::<Vec<_>>();
        ReplicaState {
            source: format!("{}:{}", text("Master_Host"), text("Master_Port")),
            io_running: text("Slave_IO_Running"),
            sql_running: text("Slave_SQL_Running"),
            lag_s,
            last_error: last_error.join("; "),
        }
    });
    let rank = |r: &ReplicaState| match r.condition(Duration::ZERO) {
        ReplCondition::Broken(_) => i64::MAX,
        _ => r.lag_s.unwrap_or(0),
    };
    Ok(states.max_by_key(rank))
}

/// Watch the endpoints until the process ends (returns at once with a single endpoint).
pub async fn monitor(eps: std::sync::Arc<Endpoints>) {
    if eps.policy.is_none() || eps.eps.len() < 2 {
        return;
    }
    loop {
        tokio::select! {
            _ = eps.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        eps.check_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: Topology, retry_s: u64) -> Policy {
        Policy { topology: t, retry_master_after: Duration::from_secs(retry_s), lag_alert: Duration::from_secs(10) }
    }

    fn rs(io: &str, sql: &str, lag: Option<i64>, err: &str) -> ReplicaState {
        ReplicaState {
            source: "10.0.0.1:3306".into(),
            io_running: io.into(),
            sql_running: sql.into(),
            lag_s: lag,
            last_error: err.into(),
        }
    }

    #[test]
    fn first_choice_prefers_the_node_with_the_newest_cluster_state() {
        let st = |healthy: bool, f: Option<i64>| EndpointStatus {
            name: String::new(),
            active: false,
            healthy,
            role: String::new(),
            detail: String::new(),
            cluster_size: None,
            replica: None,
            replication: None,
            freshness: f,
        };
        // A stale old primary next to the promoted node: start on the promoted one.
        assert_eq!(freshest(&[st(true, Some(1_000)), st(true, Some(9_000))]), Some(1));
        // A two-way pair holds the same rows: no preference (the configured order).
        assert_eq!(freshest(&[st(true, Some(9_000)), st(true, Some(9_000))]), None);
        // Only one writable node, or none: nothing to prefer here.
        assert_eq!(freshest(&[st(true, Some(1_000)), st(false, None)]), None);
        assert_eq!(freshest(&[st(false, None), st(false, None)]), None);
    }

    #[test]
    fn replica_conditions() {
        let alert = Duration::from_secs(10);
        assert_eq!(rs("Yes", "Yes", Some(0), "").condition(alert), ReplCondition::Ok);
        assert_eq!(rs("Yes", "Yes", Some(10), "").condition(alert), ReplCondition::Ok);
        assert_eq!(rs("Yes", "Yes", Some(11), "").condition(alert), ReplCondition::Lagging(11));
        assert_eq!(rs("Yes", "Yes", None, "").condition(alert), ReplCondition::Ok);
        let c = rs("Connecting", "Yes", None, "error reconnecting to master").condition(alert);
        assert_eq!(c.label(), "broken");
        assert!(c.to_string().contains("I/O thread Connecting from 10.0.0.1:3306 (error reconnecting"), "{c}");
        let c = rs("Yes", "No", None, "Duplicate entry '1' for key 'PRIMARY'").condition(alert);
        assert!(c.to_string().contains("SQL thread stopped (Duplicate entry"), "{c}");
        assert_eq!(rs("No", "No", None, "").condition(alert).label(), "broken");
    }

    #[test]
    fn galera_everyone_on_the_first_healthy_node() {
        let g = p(Topology::Galera, 0);
        assert_eq!(choose(g, &[true, true, true], &[true, true, true], 2, None), 0);
        assert_eq!(choose(g, &[false, true, true], &[true, true, true], 0, None), 1);
        assert_eq!(choose(g, &[false, false, true], &[true, true, true], 1, None), 2);
        // Nothing healthy: stay (and keep failing until something is).
        assert_eq!(choose(g, &[false, false, false], &[true, true, true], 1, None), 1);
    }

    #[test]
    fn replication_follows_the_writable_node_and_fails_back_late() {
        let r = p(Topology::Replication, 60);
        assert_eq!(choose(r, &[true, false], &[true, true], 0, None), 0);
        assert_eq!(choose(r, &[false, true], &[true, true], 0, None), 1, "primary lost: the writable replica");
        assert_eq!(choose(r, &[false, false], &[true, true], 0, None), 0, "never to a read-only node");
        // The old primary is back, but the retry period has not passed: stay.
        assert_eq!(choose(r, &[true, true], &[true, true], 1, Some(Duration::from_secs(10))), 1);
        assert_eq!(choose(r, &[true, true], &[true, true], 1, Some(Duration::from_secs(61))), 0);
        // The replica died meanwhile: back to the primary at once.
        assert_eq!(choose(r, &[true, false], &[true, true], 1, Some(Duration::from_secs(1))), 0);
        // A one-way pair after a promotion: the old primary came back writable but replicates from
        // nobody (stale): never fail back to it while the promoted node is healthy.
        assert_eq!(choose(r, &[true, true], &[false, false], 1, Some(Duration::from_secs(7200))), 1);
        // ... unless the promoted node is lost too.
        assert_eq!(choose(r, &[true, false], &[false, false], 1, Some(Duration::from_secs(7200))), 0);
    }
}
