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
    // A previous run of this id whose heartbeat is still fresh may be a crashed process (stale
    // soon) or a live one (heartbeat advancing): watch it until the threshold has passed.
    let mut seen: Option<i64> = None;
    loop {
        let Some(other) = ms_list(&mut c).await?.into_iter().find(|m| m.id == ms.id) else { break };
        if other.run_id == ms.run_id || other.state == "Down" || other.heartbeat_age_ms >= threshold {
            break;
        }
        if seen.is_some_and(|t| t != other.last_heartbeat_ms) {
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
        seen = Some(other.last_heartbeat_ms);
        let wait = (threshold - other.heartbeat_age_ms).clamp(50, 1000) as u64;
        tracing::info!(ms_id = %ms.id, wait_ms = wait, "a previous run of this id heartbeated recently; checking whether it is alive");
        tokio::time::sleep(Duration::from_millis(wait)).await;
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
        db_endpoint: String::new(),
    };
    ms_register(&mut c, &row).await?;
    // Jobs our previous run held are ours to resume now (generation bumped: that run is gone).
    let n = skyhold_db::job::job_takeover_of(&mut c, &ms.id).await?;
    if n > 0 {
        tracing::info!(jobs = n, "resuming jobs left by this server's previous run");
    }
    core.set_registered(true);
    drop(c);
    let owner = core.system_owner().await?;
    let mut c = core.db().conn().await?;
    crate::events::record(
        &mut c,
        &owner,
        "MANAGEMENT.SERVER.START",
        "INFO",
        format!("Management server {} started (run {}) at {}:{}", ms.id, ms.run_id, ms.service_ip, ms.api_port),
        Some(("ManagementServer", &ms.id)),
    )
    .await?;
    tracing::info!(ms_id = %ms.id, run_id = %ms.run_id, "management server registered");
    Ok(())
}

/// Renew the heartbeat until the row is taken from us. Fences on missed renewals.
///
/// The self-fence deadline is `last successful renewal start + threshold / 2`, enforced as a
/// deadline: a renewal attempt never runs past it and the loop never sleeps past it, so the fence
/// happens on time however slow the database is.
pub async fn heartbeat_loop(core: Core) -> MembershipEnd {
    let mut last_ok = Instant::now();
    loop {
        let threshold = core.settings().get_i64(CLUSTER_HEARTBEAT_THRESHOLD);
        let fence_after = self_fence_after(threshold);
        // Renew at least twice per fence period whatever the setting says (validation refuses
        // such settings; this guards against a value written behind the API's back).
        let interval =
            Duration::from_millis(core.settings().get_i64(CLUSTER_HEARTBEAT_INTERVAL).clamp(50, 60_000) as u64)
                .min(fence_after / 2);
        let started = Instant::now();
        let deadline = last_ok + fence_after;
        if started >= deadline && !core.is_fenced() {
            fence(&core, last_ok.elapsed());
        }
        let budget = if core.is_fenced() { fence_after } else { deadline.saturating_duration_since(started) };
        let res = tokio::time::timeout(budget.max(Duration::from_millis(1)), async {
            let mut c = core.db().conn().await?;
            ms_heartbeat(&mut c, &core.ms().id, &core.ms().run_id, &core.db().endpoint()).await
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
        if !core.is_fenced() && Instant::now() >= last_ok + fence_after {
            fence(&core, last_ok.elapsed());
        }
        let next = started + interval;
        let wake = if core.is_fenced() { next } else { next.min(last_ok + fence_after) };
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
    }
}

fn fence(core: &Core, since: Duration) {
    tracing::error!(
        since_ms = since.as_millis() as u64,
        "heartbeat not renewed in time: self-fencing (no new jobs, no agent commands)"
    );
    core.set_fenced(true);
    // Agents must not wait on a server that may not command them: send them to a peer, or drop
    // them so they try the next address on their list.
    let peers: Vec<String> = core.peers().into_iter().map(|p| p.agent_addr).collect();
    let moved = core.agents().reconnect_all(&peers, "management server self-fenced");
    let closed = core.agents().close_all();
    tracing::error!(moved, closed, "self-fenced: released agent connections");
}

/// Check a pair of heartbeat settings: the interval must be below half the threshold, so that a
/// server renews at least twice before it must fence itself.
pub fn validate_heartbeat(interval_ms: i64, threshold_ms: i64) -> Result<(), String> {
    if interval_ms < 50 {
        return Err("cluster.heartbeat.interval must be at least 50 ms".into());
    }
    if threshold_ms < 500 {
        return Err("cluster.heartbeat.threshold must be at least 500 ms".into());
    }
    if interval_ms * 4 > threshold_ms {
        return Err(format!(
            "cluster.heartbeat.interval ({interval_ms} ms) must be at most a quarter of cluster.heartbeat.threshold \
             ({threshold_ms} ms): a server fences itself after half the threshold and must renew at least twice before"
        ));
    }
    Ok(())
}

/// Move this server's row from one state to another (false if it was not in `from`).
pub async fn transition(core: &Core, from: &str, to: &str) -> Result<bool, CoreError> {
    let mut c = core.db().conn().await?;
    Ok(skyhold_db::ms::ms_transition(&mut c, &core.ms().id, &core.ms().run_id, from, to).await?)
}

/// Mark this server's row with a new state (shutdown transitions).
pub async fn set_state(core: &Core, state: &str) -> Result<(), CoreError> {
    let mut c = core.db().conn().await?;
    ms_set_state(&mut c, &core.ms().id, &core.ms().run_id, state).await?;
    Ok(())
}

/// The cluster monitor: every heartbeat interval, refresh the peer list, declare dead peers Down
/// (a conditional update only one survivor wins) and take over their work, and follow this
/// server's own row (a drain requested through the API or `skyhold cluster drain`).
pub async fn monitor_loop(core: Core) {
    loop {
        let interval = core.settings().get_i64(CLUSTER_HEARTBEAT_INTERVAL).clamp(50, 60_000) as u64;
        if core.is_registered()
            && let Err(e) = monitor_once(&core).await
        {
            tracing::warn!(error = %e, "cluster monitor round failed");
        }
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}

async fn monitor_once(core: &Core) -> Result<(), CoreError> {
    let threshold = core.settings().get_i64(CLUSTER_HEARTBEAT_THRESHOLD);
    let list = {
        let mut c = core.db().conn().await?;
        ms_list(&mut c).await?
    };
    let peers: Vec<crate::PeerInfo> = list
        .iter()
        .filter(|m| m.id != core.ms().id && m.state == "Up" && m.heartbeat_age_ms < threshold)
        .map(|m| crate::PeerInfo {
            id: m.id.clone(),
            peer_addr: format!("{}:{}", m.service_ip, m.cluster_port),
            agent_addr: format!("{}:{}", m.service_ip, m.agent_port),
            heartbeat_age_ms: m.heartbeat_age_ms,
        })
        .collect();
    let changed = {
        let mut old: Vec<String> = core.peers().into_iter().map(|p| p.agent_addr).collect();
        let mut new: Vec<String> = peers.iter().map(|p| p.agent_addr.clone()).collect();
        old.sort();
        new.sort();
        old != new
    };
    core.set_peers(peers);
    if changed {
        // Agents learn about servers that joined or left.
        core.agents().push_mgmt_lists(core);
    }
    // A server that was itself unable to renew recently has no business declaring others dead:
    // when the database stalls (a Galera node hangs, a failover), every server's heartbeat stalls
    // together, and the first to recover must not take over the rest.
    if core.is_fenced() || core.since_unfenced().is_some_and(|d| d.as_millis() < threshold as u128) {
        return Ok(());
    }
    for m in list.iter().filter(|m| m.id != core.ms().id && m.state != "Down" && m.heartbeat_age_ms >= threshold) {
        let won = {
            let mut c = core.db().conn().await?;
            skyhold_db::ms::ms_declare_down(&mut c, &m.id, &m.run_id, threshold).await?
        };
        if won {
            takeover(core, m).await?;
        }
    }
    if let Some(me) = list.iter().find(|m| m.id == core.ms().id) {
        match me.state.as_str() {
            "PreparingForShutdown" if !core.is_shutting_down() => {
                tracing::info!("drain requested for this server");
                let core = core.clone();
                tokio::spawn(async move { drain(&core).await });
            }
            "Up" if core.is_shutting_down() && !core.is_exiting() => {
                tracing::info!("drain cancelled; taking work again");
                core.cancel_shutdown();
            }
            _ => {}
        }
    }
    Ok(())
}

/// Take over a peer just declared Down: its unfinished jobs (generation bumped, so its late
/// writes change nothing) become claimable at once, its hosts are Disconnected while their agents
/// reconnect elsewhere (not Down), its locks are freed.
async fn takeover(core: &Core, dead: &skyhold_db::ms::MgmtServer) -> Result<(), CoreError> {
    let owner = core.system_owner().await?;
    let taken = skyhold_db::retry_tx!(core.db(), |tx| {
        async {
            // The dead run may have been replaced by a new run of the same id meanwhile: its
            // work is then that run's, not ours to take.
            if !skyhold_db::ms::ms_is_down_run(&mut tx, &dead.id, &dead.run_id).await? {
                return Ok::<_, CoreError>(None);
            }
            let jobs = skyhold_db::job::job_takeover_of(&mut tx, &dead.id).await?;
            let hosts = skyhold_db::infra::host_release_of(&mut tx, &dead.id).await?;
            skyhold_db::ms::lock_release_all_of(&mut tx, &dead.id).await?;
            crate::events::record(
                &mut tx,
                &owner,
                "MANAGEMENT.SERVER.DOWN",
                "WARN",
                format!(
                    "Management server {} (run {}) declared Down by {} after {} ms without heartbeat; \
                     {jobs} job(s) taken over, {hosts} host(s) awaiting their agents",
                    dead.id,
                    dead.run_id,
                    core.ms().id,
                    dead.heartbeat_age_ms
                ),
                Some(("ManagementServer", &dead.id)),
            )
            .await?;
            Ok::<_, CoreError>(Some((jobs, hosts)))
        }
        .await
    })?;
    let Some((jobs, hosts)) = taken else {
        tracing::info!(peer = %dead.id, "a new run of the server registered before the takeover; nothing to take");
        return Ok(());
    };
    tracing::warn!(
        peer = %dead.id,
        run_id = %dead.run_id,
        heartbeat_age_ms = dead.heartbeat_age_ms,
        jobs,
        hosts,
        "management server declared Down; took over its work"
    );
    core.wake_cluster();
    Ok(())
}

/// Drain this server: stop taking jobs (readiness answers 503), hand its agents to peers, let
/// running jobs finish (bounded), hand the rest back, and end in ReadyForShutdown.
pub async fn drain(core: &Core) {
    core.begin_shutdown();
    // Up -> PreparingForShutdown (already so when requested through the API or the CLI).
    let _ = transition(core, "Up", "PreparingForShutdown").await;
    if let Ok(owner) = core.system_owner().await
        && let Ok(mut c) = core.db().conn().await
    {
        let _ = crate::events::record(
            &mut c,
            &owner,
            "MANAGEMENT.SERVER.DRAIN",
            "INFO",
            format!("Management server {} is draining", core.ms().id),
            Some(("ManagementServer", &core.ms().id)),
        )
        .await;
    }
    let peers: Vec<String> = core.peers().into_iter().map(|p| p.agent_addr).collect();
    let moved = core.agents().reconnect_all(&peers, "management server is shutting down");
    tracing::info!(agents = moved, peers = peers.len(), "draining: handed agents to peers; finishing running jobs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let running = async {
            let mut c = core.db().conn().await?;
            skyhold_db::job::job_count_running(&mut c, &core.ms().id).await
        }
        .await
        .unwrap_or(0);
        if running == 0 || tokio::time::Instant::now() >= deadline || !core.is_shutting_down() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !core.is_shutting_down() {
        return; // cancelled meanwhile
    }
    if let Ok(mut c) = core.db().conn().await {
        match skyhold_db::job::job_takeover_of(&mut c, &core.ms().id).await {
            Ok(n) if n > 0 => tracing::info!(jobs = n, "handed unfinished jobs to the other servers"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not hand jobs back"),
        }
        let _ = skyhold_db::ms::lock_release_all_of(&mut c, &core.ms().id).await;
    }
    core.wake_cluster();
    // Conditional: a cancelShutdown that landed meanwhile (state back to Up) wins.
    match transition(core, "PreparingForShutdown", "ReadyForShutdown").await {
        Ok(true) => tracing::info!("drained: ready for shutdown"),
        _ => tracing::info!("drain finished but the row is no longer PreparingForShutdown (cancelled?)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn heartbeat_settings_keep_fencing_first() {
        assert!(super::validate_heartbeat(500, 2500).is_ok());
        assert!(super::validate_heartbeat(1500, 2500).is_err());
        assert!(super::validate_heartbeat(700, 2500).is_err());
        assert!(super::validate_heartbeat(10, 2500).is_err());
        assert!(super::validate_heartbeat(100, 400).is_err());
    }

    #[test]
    fn self_fence_precedes_takeover() {
        for threshold in [100i64, 2500, 10_000, 150_000] {
            assert!((super::self_fence_after(threshold).as_millis() as i64) < threshold);
        }
    }
}
