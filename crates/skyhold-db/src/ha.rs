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
}

pub struct Endpoints {
    eps: Vec<(String, AnyPool)>,
    active: AtomicUsize,
    policy: Option<Policy>,
    health: Mutex<Vec<EndpointStatus>>,
    wake: tokio::sync::Notify,
    failed_over_at: Mutex<Option<Instant>>,
}

impl Endpoints {
    pub(crate) fn single(name: String, pool: AnyPool) -> Endpoints {
        Self::build(vec![(name, pool)], None)
    }

    pub(crate) fn many(eps: Vec<(String, AnyPool)>, policy: Policy) -> Endpoints {
        Self::build(eps, Some(policy))
    }

    fn build(eps: Vec<(String, AnyPool)>, policy: Option<Policy>) -> Endpoints {
        let health = eps
            .iter()
            .enumerate()
            .map(|(i, (n, _))| EndpointStatus {
                name: n.clone(),
                active: i == 0,
                healthy: true,
                role: "unknown".into(),
                detail: String::new(),
            })
            .collect();
        Endpoints {
            eps,
            active: AtomicUsize::new(0),
            policy,
            health: Mutex::new(health),
            wake: tokio::sync::Notify::new(),
            failed_over_at: Mutex::new(None),
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
        let probes = futures::future::join_all(self.eps.iter().map(|(_, p)| probe(p, policy.topology))).await;
        let statuses: Vec<EndpointStatus> = self
            .eps
            .iter()
            .zip(probes)
            .map(|((n, _), (healthy, role, detail))| EndpointStatus {
                name: n.clone(),
                active: false,
                healthy,
                role,
                detail,
            })
            .collect();
        let healthy: Vec<bool> = statuses.iter().map(|s| s.healthy).collect();
        if let Ok(mut h) = self.health.lock() {
            *h = statuses;
        }
        let cur = self.active.load(Ordering::SeqCst);
        let since = self.failed_over_at.lock().ok().and_then(|t| *t).map(|t| t.elapsed());
        let next = choose(policy, &healthy, cur, since);
        if next != cur {
            let from = self.eps[cur].0.clone();
            let to = self.eps[next].0.clone();
            self.active.store(next, Ordering::SeqCst);
            if let Ok(mut t) = self.failed_over_at.lock() {
                *t = if next == 0 { None } else { Some(Instant::now()) };
            }
            tracing::warn!(%from, %to, topology = ?policy.topology, "database failover: writing to another endpoint");
        } else if !healthy.iter().any(|h| *h) {
            tracing::error!(endpoints = %self.describe(), "Unable to get a connection from the database pool: no endpoint is usable");
        }
    }
}

/// Which endpoint to use (pure; tested). `since_failover` is the time since the last move away
/// from the primary (replication failback).
pub fn choose(policy: Policy, healthy: &[bool], cur: usize, since_failover: Option<Duration>) -> usize {
    let first = healthy.iter().position(|h| *h);
    match policy.topology {
        // Everyone on the same node: the first healthy one in the configured order.
        Topology::Galera => first.unwrap_or(cur),
        Topology::Replication | Topology::Single => {
            let cur_ok = healthy.get(cur).copied().unwrap_or(false);
            if cur != 0
                && healthy.first().copied().unwrap_or(false)
                && since_failover.is_none_or(|d| d >= policy.retry_master_after)
            {
                return 0;
            }
            if cur_ok { cur } else { first.unwrap_or(cur) }
        }
    }
}

async fn probe(pool: &AnyPool, topology: Topology) -> (bool, String, String) {
    let res = tokio::time::timeout(Duration::from_millis(1500), async {
        let mut c = pool.acquire().await?;
        match topology {
            Topology::Galera => {
                let rows = sqlx::query("SHOW GLOBAL STATUS LIKE 'wsrep_%'").fetch_all(&mut *c).await?;
                let mut ready = String::new();
                let mut state = String::new();
                let mut comp = String::new();
                for r in &rows {
                    let k: String = r.try_get(0).unwrap_or_default();
                    let v: String = r.try_get(1).unwrap_or_default();
                    match k.as_str() {
                        "wsrep_ready" => ready = v,
                        "wsrep_local_state_comment" => state = v,
                        "wsrep_cluster_status" => comp = v,
                        _ => {}
                    }
                }
                let ok = ready == "ON" && state == "Synced" && comp == "Primary";
                Ok::<_, sqlx::Error>((
                    ok,
                    "galera".to_string(),
                    format!("ready={ready} state={state} component={comp}"),
                ))
            }
            _ => {
                let ro: i64 = sqlx::query("SELECT CAST(@@read_only AS SIGNED)").fetch_one(&mut *c).await?.try_get(0)?;
                let role = if ro == 0 { "primary" } else { "replica" };
                Ok((ro == 0, role.to_string(), format!("read_only={ro}")))
            }
        }
    })
    .await;
    match res {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => (false, "unreachable".into(), e.to_string()),
        Err(_) => (false, "unreachable".into(), "no answer within 1.5 s".into()),
    }
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
        Policy { topology: t, retry_master_after: Duration::from_secs(retry_s) }
    }

    #[test]
    fn galera_everyone_on_the_first_healthy_node() {
        let g = p(Topology::Galera, 0);
        assert_eq!(choose(g, &[true, true, true], 2, None), 0);
        assert_eq!(choose(g, &[false, true, true], 0, None), 1);
        assert_eq!(choose(g, &[false, false, true], 1, None), 2);
        // Nothing healthy: stay (and keep failing until something is).
        assert_eq!(choose(g, &[false, false, false], 1, None), 1);
    }

    #[test]
    fn replication_follows_the_writable_node_and_fails_back_late() {
        let r = p(Topology::Replication, 60);
        assert_eq!(choose(r, &[true, false], 0, None), 0);
        assert_eq!(choose(r, &[false, true], 0, None), 1, "primary lost: the writable replica");
        assert_eq!(choose(r, &[false, false], 0, None), 0, "never to a read-only node");
        // The old primary is back, but the retry period has not passed: stay.
        assert_eq!(choose(r, &[true, true], 1, Some(Duration::from_secs(10))), 1);
        assert_eq!(choose(r, &[true, true], 1, Some(Duration::from_secs(61))), 0);
        // The replica died meanwhile: back to the primary at once.
        assert_eq!(choose(r, &[true, false], 1, Some(Duration::from_secs(1))), 0);
    }
}
