//! Membership: this server's row in `management_server`, its heartbeat on the database clock,
//! and self-fencing.
//!
//! Deadlines (defaults): heartbeat every `cluster.heartbeat.interval` (500 ms); a peer may declare
//! this server down once its heartbeat is older than `cluster.heartbeat.threshold` (2500 ms). This
//! server fences itself (stops claiming jobs and sending agent commands) when it has not renewed
//! its heartbeat for [`self_fence_after`] = threshold / 2, measured on its own monotonic clock from
//! the start of the last successful renewal, so it is always fenced before a peer can act.

use crate::{Core, CoreError};
use skyhold_db::ms::{MgmtServer, ms_heartbeat, ms_list, ms_register, ms_set_state};
use skyhold_types::settings::{CLUSTER_HEARTBEAT_INTERVAL, CLUSTER_HEARTBEAT_THRESHOLD};
use skyhold_types::{CsError, ErrorCode};
use std::time::{Duration, Instant};

/// How long without a renewed heartbeat before this server fences itself.
pub fn self_fence_after(threshold_ms: i64) -> Duration {
    Duration::from_millis((threshold_ms.max(2) / 2) as u64)
}

/// Why the heartbeat loop ended: the process must stop acting.
#[derive(Debug, thiserror::Error)]
pub enum MembershipEnd {
    #[error("this server's row now belongs to another run (run id replaced) or was marked Down")]
    Replaced,
}

/// Register this run. Refuses if a live process already holds the same id.
pub async fn register(core: &Core) -> Result<(), CoreError> {
    let ms = core.ms();
    let threshold = core.settings().get_i64(CLUSTER_HEARTBEAT_THRESHOLD);
    let mut c = core.db().conn().await?;
    if let Some(other) = ms_list(&mut c).await?.into_iter().find(|m| m.id == ms.id)
        && other.run_id != ms.run_id
        && other.state != "Down"
        && other.heartbeat_age_ms < threshold
    {
        tracing::error!(
            ms_id = %ms.id,
            "Management server id is not unique: another live process (run {}) heartbeats as {} from {}; \
             give this node its own id (--ms-id or a separate --data-dir)",
            other.run_id, ms.id, other.service_ip
        );
        return Err(CoreError::Cs(CsError::new(
            ErrorCode::Internal,
            format!(
                "Management server id is not unique: {} is already running (run {}, heartbeat {} ms ago); \
                 give this node its own id (--ms-id or a separate --data-dir)",
                ms.id, other.run_id, other.heartbeat_age_ms
            ),
        )));
    }
    let row = MgmtServer {
        id: ms.id.clone(),
        run_id: ms.run_id.clone(),
        name: ms.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        service_ip: ms.service_ip.clone(),
        api_port: ms.api_port as i64,
        agent_port: ms.agent_port as i64,
        cluster_port: ms.cluster_port as i64,
        state: "Up".into(),
        last_heartbeat_ms: 0,
        started_ms: 0,
        created_ms: 0,
        heartbeat_age_ms: 0,
    };
    ms_register(&mut c, &row).await?;
    // Jobs our previous run held are ours to resume now.
    let n = skyhold_db::job::job_release_all_of(&mut c, &ms.id).await?;
    if n > 0 {
        tracing::info!(jobs = n, "resuming jobs left by this server's previous run");
    }
    core.set_registered(true);
    tracing::info!(ms_id = %ms.id, run_id = %ms.run_id, "management server registered");
    Ok(())
}

/// Renew the heartbeat until the row is taken from us. Fences on missed renewals.
pub async fn heartbeat_loop(core: Core) -> MembershipEnd {
    let mut last_ok = Instant::now();
    loop {
        let interval = core.settings().get_i64(CLUSTER_HEARTBEAT_INTERVAL).clamp(50, 60_000) as u64;
        let threshold = core.settings().get_i64(CLUSTER_HEARTBEAT_THRESHOLD);
        let started = Instant::now();
        let res = tokio::time::timeout(self_fence_after(threshold), async {
            let mut c = core.db().conn().await?;
            ms_heartbeat(&mut c, &core.ms().id, &core.ms().run_id).await
        })
        .await;
        match res {
            Ok(Ok(true)) => {
                last_ok = started;
                if core.is_fenced() {
                    tracing::warn!("heartbeat renewed; lifting self-fence");
                    core.set_fenced(false);
                }
            }
            Ok(Ok(false)) => {
                core.set_fenced(true);
                core.set_registered(false);
                tracing::error!(ms_id = %core.ms().id, "this server's membership row was taken over or marked Down; stopping all work");
                return MembershipEnd::Replaced;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not renew heartbeat"),
            Err(_) => tracing::warn!("heartbeat renewal timed out"),
        }
        if last_ok.elapsed() >= self_fence_after(threshold) && !core.is_fenced() {
            tracing::error!(
                since_ms = last_ok.elapsed().as_millis() as u64,
                "heartbeat not renewed in time: self-fencing (no new jobs, no agent commands)"
            );
            core.set_fenced(true);
        }
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}

/// Mark this server's row with a new state (shutdown transitions).
pub async fn set_state(core: &Core, state: &str) -> Result<(), CoreError> {
    let mut c = core.db().conn().await?;
    ms_set_state(&mut c, &core.ms().id, &core.ms().run_id, state).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_fence_precedes_takeover() {
        for threshold in [100i64, 2500, 10_000, 150_000] {
            assert!((super::self_fence_after(threshold).as_millis() as i64) < threshold);
        }
    }
}
