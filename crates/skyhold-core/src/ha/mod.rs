//! Host HA and VM HA.
//!
//! One server at a time is the **HA coordinator** (the holder of the named lock
//! `ha-coordinator`, lease 5 s, renewed every second; a dead holder's lock is freed when it is
//! declared Down, so a survivor carries on within seconds). Every second it:
//!
//! 1. marks hosts (of any resource state but Maintenance) whose agent has been disconnected
//!    longer than the ping timeout (`ping.interval` x `ping.timeout`) **Suspect** (status Alert). A host whose management server
//!    died is Disconnected from the takeover on and gets the same grace to reconnect elsewhere;
//! 2. **investigates** suspects: up to three Up hosts of the same cluster run `CheckHost` (can
//!    they reach it; what does its storage heartbeat counter say), and [`decide::decide`] turns
//!    the answers into a verdict;
//! 3. **fences** with a proof ([`crate::fence::FenceProof`]): an IPMI power-off read back as off,
//!    or the storage heartbeat lease expired as read by a neighbour. Without proof the host stays
//!    in Alert with an alert raised, and its VMs are left alone (invariant 7);
//! 4. a fenced host is Down; in the same transaction its VMs are Stopped and each HA-enabled one
//!    gets a durable work item (`op_ha_work`);
//! 5. runs the work: up to `ha.workers` restarts at once, each a durable start job (any server
//!    executes it, and takes it over if its server dies) placed in the failed host's cluster, on
//!    `ha.tag` hosts if that setting is set; a failed restart is retried after
//!    `restart.retry.interval` up to `max.retries` times, counting failures within
//!    `time.between.failures` together.
//!
//! A VM that stops on a healthy host without a command (its agent reports it Stopped) is handled
//! by [`vm_stopped_on_host`]: Stopped in the database, and restarted (same host first) if HA.

pub mod decide;

use crate::events::EventOwner;
use crate::fence::FenceProof;
use crate::{Core, CoreError};
use decide::{Answer, Evidence, Verdict, decide};
use serde_json::json;
use skyhold_db::hostha::{self, Alert, Work};
use skyhold_db::infra::Host;
use skyhold_db::retry_tx;
use skyhold_db::vm::{HostChange, VmFilter, vm_transition};
use skyhold_proto::{Command, CommandResult};
use skyhold_types::settings as keys;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const COORDINATOR_LOCK: &str = "ha-coordinator";
const LOCK_LEASE_MS: i64 = 5_000;
/// CloudStack's alert types.
pub const ALERT_HOST: i64 = 7;
pub const ALERT_USERVM: i64 = 8;

/// The coordinator's memory of the current suspicions (rebuilt by a new coordinator).
#[derive(Default)]
struct State {
    /// Per host: when it was last investigated.
    checked: HashMap<String, Instant>,
    /// Hosts whose IPMI power-off failed during this suspicion.
    oob_failed: HashMap<String, String>,
    /// Per host: the last verdict recorded as an event (so events mark changes, not rounds).
    said: HashMap<String, String>,
    /// Per host: the highest heartbeat counter neighbours read in earlier rounds of this suspicion.
    read: HashMap<String, i64>,
    /// Per host, per neighbour: the meaning of its last recorded answer (HOST.HA.ANSWER events
    /// record each answer that says something new).
    answered: HashMap<String, HashMap<String, String>>,
    /// When the hosts were last scanned (once a second; the fast rounds only run HA work).
    scanned: Option<Instant>,
    /// Whom system events belong to (the admin account), read on each scan.
    owner: Option<EventOwner>,
}

/// Run the coordinator role (when this server holds the lock) until the process ends.
pub async fn run(core: Core) {
    let mut st = State::default();
    let mut active = false;
    loop {
        // Every second; every 100 ms while HA work runs, so a finished restart frees its worker
        // slot for the next one at once.
        tokio::time::sleep(Duration::from_millis(if active { 100 } else { 1000 })).await;
        active = false;
        if !core.is_registered() || core.is_fenced() || core.is_shutting_down() {
            continue;
        }
        let held = async {
            let mut c = core.db().conn().await?;
            skyhold_db::ms::lock_acquire(&mut c, COORDINATOR_LOCK, &core.ms().id, &core.ms().run_id, LOCK_LEASE_MS)
                .await
        }
        .await;
        match held {
            Ok(Some(_)) => {}
            Ok(None) => {
                st = State::default();
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not take the HA coordinator lock");
                continue;
            }
        }
        match tick(&core, &mut st).await {
            Ok(busy) => active = busy,
            Err(e) => tracing::warn!(error = %e, "HA round failed; will retry"),
        }
    }
}

fn ping_timeout_ms(core: &Core) -> i64 {
    let interval = core.settings().get_f64(keys::PING_INTERVAL).max(0.1);
    let mult = core.settings().get_f64(keys::PING_TIMEOUT).max(1.0);
    (interval * mult * 1000.0) as i64
}

/// One round; true while HA work is pending or running.
async fn tick(core: &Core, st: &mut State) -> Result<bool, CoreError> {
    if let (Some(t), Some(owner)) = (st.scanned, st.owner.clone())
        && t.elapsed() < Duration::from_millis(1000)
    {
        // A fast round while restarts run: only the work.
        let now = core.db().now_ms().await?;
        return run_work(core, &owner, now).await;
    }
    st.scanned = Some(Instant::now());
    let owner = core.system_owner().await?;
    st.owner = Some(owner.clone());
    let (hosts, now) = {
        let mut c = core.db().conn().await?;
        (skyhold_db::infra::host_list(&mut c).await?, skyhold_db::now_ms(&mut c).await?)
    };
    let grace = ping_timeout_ms(core);
    let mut suspects = Vec::new();
    for h in &hosts {
        // Every host but one in Maintenance (emptied by migrations, and often powered off on
        // purpose): a Disabled host takes no new VMs but its running ones are still protected, and
        // a host dying during PrepareForMaintenance or in ErrorInMaintenance still has VMs.
        if h.resource_state == "Maintenance" {
            continue;
        }
        match (h.status.as_str(), h.ha_state.as_str()) {
            ("Up" | "Connecting", _) => {
                st.checked.remove(&h.id);
                st.oob_failed.remove(&h.id);
                st.said.remove(&h.id);
                st.read.remove(&h.id);
                st.answered.remove(&h.id);
            }
            ("Disconnected", "Available") | ("Alert", "Available") if now - h.disconnected_ms >= grace => {
                let moved = retry_tx!(core.db(), |tx| {
                    async {
                        if !hostha::host_ha_move(&mut tx, &h.id, &["Available"], "Suspect", Some("Alert")).await? {
                            return Ok::<_, CoreError>(false);
                        }
                        let text = format!(
                            "Host {} ({}) has not answered for {} ms (ping timeout {} ms): investigating",
                            h.name,
                            h.id,
                            now - h.disconnected_ms,
                            grace
                        );
                        record(&mut tx, &owner, h, "HOST.HA.SUSPECT", "WARN", &text, true).await?;
                        Ok(true)
                    }
                    .await
                })?;
                if moved {
                    tracing::warn!(host = %h.name, "host suspect: investigating");
                    suspects.push(h.clone());
                }
            }
            ("Disconnected" | "Alert", "Suspect" | "Checking" | "Degraded" | "Fencing" | "Ineligible") => {
                suspects.push(h.clone())
            }
            _ => {}
        }
    }
    // VMs left Running on a fenced host by a job that was in flight at the fence (a migration
    // giving up on its dead source puts the VM back there): the fence proves them dead too.
    let left = {
        let mut c = core.db().conn().await?;
        skyhold_db::vm::vm_running_on_fenced_hosts(&mut c).await?
    };
    for h in hosts.iter().filter(|h| left.iter().any(|(_, hid)| hid == &h.id)) {
        let vms: Vec<String> = left.iter().filter(|(_, hid)| hid == &h.id).map(|(v, _)| v.clone()).collect();
        if let Err(e) = sweep_fenced(core, &owner, h, &vms).await {
            tracing::warn!(host = %h.name, error = %e, "could not handle VMs left on a fenced host");
        }
    }
    // Investigate the suspects concurrently, each at most every 2 s.
    let due: Vec<Host> = suspects
        .into_iter()
        .filter(|h| st.checked.get(&h.id).is_none_or(|t| t.elapsed() >= Duration::from_millis(2000)))
        .collect();
    for h in &due {
        st.checked.insert(h.id.clone(), Instant::now());
    }
    let rounds = futures::future::join_all(due.iter().map(|h| investigate(core, &hosts, h))).await;
    for (h, answers) in due.iter().zip(rounds) {
        if let Err(e) = judge(core, st, &owner, h, answers, now).await {
            tracing::warn!(host = %h.name, error = %e, "could not judge a suspect host");
        }
    }
    run_work(core, &owner, now).await
}

/// Ask up to three Up hosts of the suspect's cluster to check it: each neighbour's name and its
/// answer (None: it did not answer in time, which says nothing about the host).
async fn investigate(core: &Core, hosts: &[Host], h: &Host) -> Vec<(String, Option<Answer>)> {
    let neighbours: Vec<&Host> = hosts
        .iter()
        .filter(|n| {
            n.id != h.id && n.cluster_id == h.cluster_id && n.status == "Up" && n.resource_state != "Maintenance"
        })
        .take(3)
        .collect();
    let check_addr = (!h.check_addr.is_empty()).then(|| h.check_addr.clone());
    let asks = neighbours.iter().map(|n| {
        let cmd = Command::CheckHost { guid: h.guid.clone(), check_addr: check_addr.clone() };
        let job = format!("ha-check-{}", uuid::Uuid::new_v4());
        async move {
            let answer = match core.agent_send_anywhere(&n.id, &job, 0, cmd, Duration::from_secs(3)).await {
                Ok(Some(CommandResult::HostCheck { reachable, heartbeat, storage_ok })) => Some(Answer {
                    neighbour: n.name.clone(),
                    reachable,
                    heartbeat: heartbeat.map(|v| v.min(i64::MAX as u64) as i64),
                    storage_ok,
                }),
                _ => None,
            };
            (n.name.clone(), answer)
        }
    });
    futures::future::join_all(asks).await
}

async fn judge(
    core: &Core,
    st: &mut State,
    owner: &EventOwner,
    h: &Host,
    asked: Vec<(String, Option<Answer>)>,
    now: i64,
) -> Result<(), CoreError> {
    let answers: Vec<Answer> = asked.iter().filter_map(|(_, a)| a.clone()).collect();
    // What to compare this round's readings with: the counter the host's own pings recorded, or
    // what neighbours read in an earlier round.
    // "Still writing" needs two readings by neighbours during this suspicion: the file may be a
    // write or two ahead of the counter the host's last ping carried (it writes every second,
    // pings every two), which proves nothing about now.
    let earlier = st.read.get(&h.id).copied();
    let baseline = earlier;
    record_answers(core, st, owner, h, &asked, baseline).await?;
    let max_read = answers.iter().filter(|a| a.storage_ok).filter_map(|a| a.heartbeat).max();
    if let Some(max) = max_read {
        st.read.insert(h.id.clone(), earlier.map_or(max, |e| e.max(max)));
        // The lease counts from the last moment the counter was *seen* to move: a move between
        // two neighbour readings, or the first reading of a host never recorded before. A
        // first reading a little ahead of the recorded counter is within the lease margin
        // (a heartbeat and a ping interval) and does not restart the lease.
        let moved = earlier.is_some_and(|e| max > e) || (h.hb_seen_ms == 0 && max > h.hb_counter);
        if moved {
            let mut c = core.db().conn().await?;
            hostha::host_hb_observe(&mut c, &h.id, max).await?;
        }
    }
    let oob = {
        let mut c = core.db().conn().await?;
        hostha::oob_fetch(&mut c, &h.id).await?
    };
    let lease_ms = crate::fence::HOST_LEASE_MS as i64;
    let mut ev = Evidence {
        connected: false,
        answers: answers.clone(),
        baseline,
        hb_silent_ms: (h.hb_seen_ms > 0).then_some(now - h.hb_seen_ms),
        oob_enabled: oob.as_ref().is_some_and(|o| o.enabled),
        oob_failed: st.oob_failed.contains_key(&h.id),
        lease_ms,
    };
    let told = answers
        .iter()
        .map(|a| {
            format!(
                "{}: reachable={} heartbeat={} storage={}",
                a.neighbour,
                a.reachable.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into()),
                a.heartbeat.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
                if a.storage_ok { "ok" } else { "unreadable" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let told = if told.is_empty() { "no neighbour answered".to_string() } else { told };
    let mut verdict = decide(&ev);
    if verdict == Verdict::FenceIpmi {
        let Some(o) = oob.as_ref() else { return Ok(()) };
        let password = core.key().decrypt(&o.password_enc)?;
        let target = crate::fence::ipmi::IpmiTarget {
            address: o.address.clone(),
            port: u16::try_from(o.port).unwrap_or(623),
            username: o.username.clone(),
            password,
        };
        tracing::warn!(host = %h.name, bmc = %o.address, "fencing host through its BMC (IPMI power off)");
        match crate::fence::ipmi::power_off(&target, Duration::from_secs(10)).await {
            Ok(proof) => {
                let mut c = core.db().conn().await?;
                hostha::oob_set_power(&mut c, &h.id, "Off").await?;
                drop(c);
                return fence_host(core, owner, h, proof, &told).await;
            }
            Err(e) => {
                let text = format!(
                    "IPMI power-off of host {} through {} failed: {e}; no proof from the BMC (its VMs stay untouched \
                     unless the storage heartbeat lease proves the host dead)",
                    h.name, o.address
                );
                retry_tx!(core.db(), |tx| {
                    async { record(&mut tx, owner, h, "HOST.HA.FENCE.FAILED", "ERROR", &text, true).await }.await
                })?;
                st.oob_failed.insert(h.id.clone(), e.to_string());
                ev.oob_failed = true;
                verdict = decide(&ev);
            }
        }
    }
    let (label, to, level, kind, text, alert) = match &verdict {
        Verdict::Recovered | Verdict::FenceIpmi => return Ok(()),
        Verdict::LeaseExpired { silent_ms } => {
            let Some(proof) = crate::fence::lease_expired(
                *silent_ms as u64,
                crate::fence::HOST_LEASE_MS,
                crate::fence::SELF_FENCE_MS,
                crate::fence::LEASE_MARGIN_MS,
            ) else {
                return Ok(());
            };
            return fence_host(core, owner, h, proof, &told).await;
        }
        Verdict::Alive(why) => (
            "alive",
            "Degraded",
            "WARN",
            "HOST.HA.DEGRADED",
            format!(
                "Host {} is cut off from the management servers but alive ({why}); its VMs are left running. \
                 Neighbours: {told}",
                h.name
            ),
            true,
        ),
        Verdict::Wait(why) => (
            "wait",
            "Fencing",
            "WARN",
            "HOST.HA.CHECK",
            format!("Host {} is unreachable and silent: {why}. Neighbours: {told}", h.name),
            false,
        ),
        Verdict::Unknown(why) => (
            "unknown",
            "Ineligible",
            "ERROR",
            "HOST.HA.NOPROOF",
            format!(
                "Host {} is unreachable, but there is no proof that it is dead: {why}. Its VMs are left alone \
                 until it returns or is proved dead. Neighbours: {told}",
                h.name
            ),
            true,
        ),
    };
    if st.said.get(&h.id).map(String::as_str) == Some(label) {
        return Ok(());
    }
    st.said.insert(h.id.clone(), label.to_string());
    tracing::warn!(host = %h.name, verdict = label, "{text}");
    retry_tx!(core.db(), |tx| {
        async {
            hostha::host_ha_move(
                &mut tx,
                &h.id,
                &["Suspect", "Checking", "Degraded", "Fencing", "Ineligible"],
                to,
                Some("Alert"),
            )
            .await?;
            record(&mut tx, owner, h, kind, level, &text, alert).await
        }
        .await
    })
}

/// One HOST.HA.ANSWER event per neighbour whose answer says something new in this suspicion
/// (the first answer, and every change of meaning: reachable, storage readable, heartbeat
/// advancing or still), all in one transaction.
async fn record_answers(
    core: &Core,
    st: &mut State,
    owner: &EventOwner,
    h: &Host,
    asked: &[(String, Option<Answer>)],
    baseline: Option<i64>,
) -> Result<(), CoreError> {
    let seen = st.answered.entry(h.id.clone()).or_default();
    let mut fresh = Vec::new();
    for (neighbour, a) in asked {
        let (key, text) = decide::describe_answer(neighbour, &h.name, a.as_ref(), baseline);
        if seen.get(neighbour) != Some(&key) {
            fresh.push((neighbour.clone(), key, text));
        }
    }
    if fresh.is_empty() {
        return Ok(());
    }
    retry_tx!(core.db(), |tx| {
        async {
            for (_, _, text) in &fresh {
                record(&mut tx, owner, h, "HOST.HA.ANSWER", "INFO", text, false).await?;
            }
            Ok::<_, CoreError>(())
        }
        .await
    })?;
    for (neighbour, key, _) in fresh {
        seen.insert(neighbour, key);
    }
    Ok(())
}

/// Record an event (and an alert if asked) about a host, in the caller's transaction.
async fn record(
    tx: &mut skyhold_db::Tx,
    owner: &EventOwner,
    h: &Host,
    kind: &str,
    level: &str,
    text: &str,
    alert: bool,
) -> Result<(), CoreError> {
    crate::events::record(tx, owner, kind, level, text, Some(("Host", &h.id))).await?;
    if alert {
        hostha::alert_insert(tx, &host_alert(h, kind, text)).await?;
    }
    Ok(())
}

/// A host alert (CloudStack's ALERT.COMPUTE.HOST).
fn host_alert(h: &Host, kind: &str, text: &str) -> Alert {
    Alert {
        id: uuid::Uuid::new_v4().to_string(),
        alert_type: ALERT_HOST,
        name: "ALERT.COMPUTE.HOST".into(),
        subject: format!("{kind}: host {}", h.name),
        description: text.to_string(),
        zone_id: Some(h.zone_id.clone()),
        pod_id: Some(h.pod_id.clone()),
        cluster_id: Some(h.cluster_id.clone()),
        host_id: Some(h.id.clone()),
        created_ms: 0,
    }
}

/// Raise a host alert with an event (outside the coordinator: e.g. the last `ha.tag` host lost
/// its tag).
pub async fn raise_host_alert(c: &mut dyn skyhold_db::Sql, h: &Host, kind: &str, text: &str) -> Result<(), CoreError> {
    let owner = EventOwner { account_id: String::new(), domain_id: String::new(), user_id: None };
    crate::events::record(c, &owner, kind, "WARN", text, Some(("Host", &h.id))).await?;
    hostha::alert_insert(c, &host_alert(h, kind, text)).await?;
    tracing::warn!(host = %h.name, "{text}");
    Ok(())
}

/// May this VM be restarted by HA? (HA-enabled or `force.ha`, and not on local storage.)
pub fn ha_eligible(core: &Core, vm_ha: bool, storage_type: &str) -> bool {
    (vm_ha || core.settings().get(keys::FORCE_HA) == "true") && storage_type != "local"
}

/// The host is proved dead: mark it Down, stop its VMs in the database and queue the restarts of
/// the HA ones, in one transaction.
async fn fence_host(core: &Core, owner: &EventOwner, h: &Host, proof: FenceProof, told: &str) -> Result<(), CoreError> {
    let offerings: HashMap<String, String> = {
        let mut c = core.db().conn().await?;
        skyhold_db::infra::offering_list(&mut c).await?.into_iter().map(|o| (o.id, o.storage_type)).collect()
    };
    let proof_text = proof.describe();
    let (restart, stopped) = retry_tx!(core.db(), |tx| {
        async {
            if !hostha::host_mark_fenced(&mut tx, &h.id).await? {
                return Ok::<_, CoreError>((0usize, 0usize));
            }
            let f = VmFilter { host_id: Some(h.id.clone()), ..Default::default() };
            let (vms, _) = skyhold_db::vm::vm_list(&mut tx, &f, skyhold_db::Page { page: 1, size: 1_000_000 }).await?;
            let reason = format!("host {} fenced: {proof_text}", h.name);
            let (mut restart, mut stopped) = (0, 0);
            for vm in vms.iter().filter(|v| matches!(v.state.as_str(), "Running" | "Stopping")) {
                if !vm_transition(
                    &mut tx,
                    &vm.id,
                    &["Running", "Stopping"],
                    "Stopped",
                    HostChange::Clear,
                    Some(&reason),
                )
                .await?
                {
                    continue;
                }
                if after_fence(&mut tx, core, owner, vm, h, &offerings, &reason).await? {
                    restart += 1;
                } else {
                    stopped += 1;
                }
            }
            let text = format!(
                "Host {} fenced ({proof_text}); {restart} HA VM(s) queued for restart, {stopped} other VM(s) left \
                 Stopped. Neighbours: {told}",
                h.name
            );
            record(&mut tx, owner, h, "HOST.HA.FENCED", "WARN", &text, true).await?;
            Ok((restart, stopped))
        }
        .await
    })?;
    tracing::warn!(host = %h.name, proof = %proof_text, restart, stopped, "host fenced");
    core.wake_jobs();
    Ok(())
}

/// Stop (in the database) the VMs still Running on a host that is Down and Fenced, and queue the
/// HA ones for a restart, as [`fence_host`] does, once no job works on them. Nothing happens when
/// the host is connected again (its reports reconcile its VMs).
async fn sweep_fenced(core: &Core, owner: &EventOwner, h: &Host, left: &[String]) -> Result<(), CoreError> {
    let offerings: HashMap<String, String> = {
        let mut c = core.db().conn().await?;
        skyhold_db::infra::offering_list(&mut c).await?.into_iter().map(|o| (o.id, o.storage_type)).collect()
    };
    let n = retry_tx!(core.db(), |tx| {
        async {
            let still = skyhold_db::infra::host_fetch(&mut tx, &h.id).await?;
            if !still.is_some_and(|x| x.status == "Down" && x.ha_state == "Fenced") {
                return Ok::<_, CoreError>(0usize);
            }
            let reason = format!("host {} was fenced while a job was working on the VM", h.name);
            let mut n = 0;
            for id in left {
                if skyhold_db::job::job_unfinished_for(&mut tx, id).await? {
                    continue;
                }
                let Some(vm) = skyhold_db::vm::vm_fetch(&mut tx, id).await? else { continue };
                if vm.host_id.as_deref() != Some(h.id.as_str())
                    || !vm_transition(&mut tx, id, &["Running"], "Stopped", HostChange::Clear, Some(&reason)).await?
                {
                    continue;
                }
                n += 1;
                after_fence(&mut tx, core, owner, &vm, h, &offerings, &reason).await?;
            }
            Ok(n)
        }
        .await
    })?;
    if n > 0 {
        tracing::warn!(host = %h.name, vms = n, "VMs left on a fenced host handled");
        core.wake_jobs();
    }
    Ok(())
}

/// A VM of a fenced host, just moved to Stopped in the caller's transaction: queue its HA restart
/// if it is eligible (true), else record that it stays Stopped (false).
async fn after_fence(
    tx: &mut skyhold_db::Tx,
    core: &Core,
    owner: &EventOwner,
    vm: &skyhold_db::vm::Vm,
    h: &Host,
    storage_of: &HashMap<String, String>,
    reason: &str,
) -> Result<bool, CoreError> {
    let storage = storage_of.get(&vm.offering_id).map(String::as_str).unwrap_or("shared");
    if ha_eligible(core, vm.ha_enabled, storage) {
        queue_restart(tx, core, vm, h, "Restart", reason).await?;
        return Ok(true);
    }
    crate::events::record(
        tx,
        owner,
        "VM.STOP",
        "WARN",
        format!("VM {} stopped: {reason}; not HA-enabled, so it stays Stopped", vm.name),
        Some(("VirtualMachine", &vm.id)),
    )
    .await?;
    Ok(false)
}

/// Queue an HA restart of `vm` (in the caller's transaction). Failures within
/// `time.between.failures` of the previous one continue its retry count.
async fn queue_restart(
    tx: &mut skyhold_db::Tx,
    core: &Core,
    vm: &skyhold_db::vm::Vm,
    h: &Host,
    kind: &str,
    reason: &str,
) -> Result<(), CoreError> {
    let window_ms = core.settings().get_i64(keys::TIME_BETWEEN_FAILURES).max(0) * 1000;
    let max = core.settings().get_i64(keys::MAX_RETRIES).max(1);
    let now = skyhold_db::now_ms(tx).await?;
    let prev = hostha::work_of_vm(tx, &vm.id).await?.into_iter().next();
    let attempts = prev.filter(|p| now - p.created_ms < window_ms).map(|p| p.attempts).unwrap_or(0);
    let give_up = attempts >= max;
    hostha::work_insert(
        tx,
        &Work {
            id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.id.clone(),
            host_id: h.id.clone(),
            zone_id: vm.zone_id.clone(),
            cluster_id: h.cluster_id.clone(),
            kind: kind.into(),
            reason: reason.into(),
            state: if give_up { "Failed".into() } else { "Pending".into() },
            attempts,
            job_id: None,
            next_try_ms: 0,
            last_error: give_up.then(|| format!("{attempts} restarts within time.between.failures")),
            created_ms: 0,
            updated_ms: 0,
            completed_ms: None,
        },
    )
    .await?;
    let owner = EventOwner { account_id: vm.account_id.clone(), domain_id: vm.domain_id.clone(), user_id: None };
    let text = if give_up {
        format!(
            "VM {} failed again ({reason}) after {attempts} HA restart(s) within {} s: not restarting (max.retries)",
            vm.name,
            window_ms / 1000
        )
    } else {
        format!("VM {}: HA restart queued ({reason})", vm.name)
    };
    crate::events::record(tx, &owner, "VM.HA.SCHEDULED", "WARN", text.clone(), Some(("VirtualMachine", &vm.id)))
        .await?;
    if give_up {
        vm_alert(tx, vm, &text).await?;
    }
    Ok(())
}

async fn vm_alert(tx: &mut skyhold_db::Tx, vm: &skyhold_db::vm::Vm, text: &str) -> Result<(), CoreError> {
    hostha::alert_insert(
        tx,
        &Alert {
            id: uuid::Uuid::new_v4().to_string(),
            alert_type: ALERT_USERVM,
            name: "ALERT.USERVM".into(),
            subject: format!("HA: VM {}", vm.name),
            description: text.to_string(),
            zone_id: Some(vm.zone_id.clone()),
            pod_id: vm.pod_id.clone(),
            cluster_id: None,
            host_id: vm.host_id.clone().or(vm.last_host_id.clone()),
            created_ms: 0,
        },
    )
    .await?;
    Ok(())
}

/// Follow the running restarts and start pending ones, at most `ha.workers` at once.
/// Follow and start HA restarts; true while work is pending or running.
async fn run_work(core: &Core, owner: &EventOwner, now: i64) -> Result<bool, CoreError> {
    let workers = core.settings().get_i64(keys::HA_WORKERS).clamp(1, 10_000);
    let max = core.settings().get_i64(keys::MAX_RETRIES).max(1);
    let retry_ms = core.settings().get_i64(keys::RESTART_RETRY_INTERVAL).max(0) * 1000;
    let running = {
        let mut c = core.db().conn().await?;
        hostha::work_list(&mut c, &["Running"], 100_000).await?
    };
    let mut busy = running.len() as i64;
    for w in &running {
        let Some(job_id) = w.job_id.as_deref() else { continue };
        let job = {
            let mut c = core.db().conn().await?;
            skyhold_db::job::job_fetch(&mut c, job_id).await?
        };
        let (status, error) = match &job {
            Some(j) if j.status == 0 => continue,
            Some(j) => (j.status, j.result.clone().unwrap_or_default()),
            None => (2, "the restart job disappeared".to_string()),
        };
        busy -= 1;
        let attempts = w.attempts + 1;
        retry_tx!(core.db(), |tx| {
            async {
                let vm = skyhold_db::vm::vm_fetch(&mut tx, &w.vm_id).await?;
                let vm_owner = vm.as_ref().map(|v| EventOwner {
                    account_id: v.account_id.clone(),
                    domain_id: v.domain_id.clone(),
                    user_id: None,
                });
                let vm_owner = vm_owner.unwrap_or_else(|| owner.clone());
                let name = vm.as_ref().map(|v| v.name.clone()).unwrap_or_else(|| w.vm_id.clone());
                if status == 1 {
                    if hostha::work_update(
                        &mut tx,
                        &w.id,
                        "Running",
                        hostha::WorkMove {
                            to: "Done",
                            attempts,
                            job_id: Some(job_id),
                            next_try_ms: 0,
                            last_error: None,
                        },
                    )
                    .await?
                    {
                        let on = vm.as_ref().and_then(|v| v.host_name.clone()).unwrap_or_default();
                        let text = format!("VM {name} restarted by HA on host {on} (attempt {attempts}; {})", w.reason);
                        crate::events::record(
                            &mut tx,
                            &vm_owner,
                            "VM.HA.RESTART",
                            "INFO",
                            text.clone(),
                            Some(("VirtualMachine", &w.vm_id)),
                        )
                        .await?;
                        // An alert too, as CloudStack raises for every VM its HA restarts.
                        if let Some(v) = &vm {
                            vm_alert(&mut tx, v, &text).await?;
                        }
                    }
                } else if attempts >= max {
                    if hostha::work_update(
                        &mut tx,
                        &w.id,
                        "Running",
                        hostha::WorkMove {
                            to: "Failed",
                            attempts,
                            job_id: Some(job_id),
                            next_try_ms: 0,
                            last_error: Some(&error),
                        },
                    )
                    .await?
                    {
                        let text = format!("HA gave up restarting VM {name} after {attempts} attempt(s): {error}");
                        crate::events::record(
                            &mut tx,
                            &vm_owner,
                            "VM.HA.FAILED",
                            "ERROR",
                            text.clone(),
                            Some(("VirtualMachine", &w.vm_id)),
                        )
                        .await?;
                        if let Some(v) = &vm {
                            vm_alert(&mut tx, v, &text).await?;
                        }
                    }
                } else {
                    hostha::work_update(
                        &mut tx,
                        &w.id,
                        "Running",
                        hostha::WorkMove {
                            to: "Pending",
                            attempts,
                            job_id: Some(job_id),
                            next_try_ms: now + retry_ms,
                            last_error: Some(&error),
                        },
                    )
                    .await?;
                    let text = format!(
                        "HA restart of VM {name} failed (attempt {attempts} of {max}): {error}; retrying in {} s",
                        retry_ms / 1000
                    );
                    crate::events::record(
                        &mut tx,
                        &vm_owner,
                        "VM.HA.RETRY",
                        "WARN",
                        text,
                        Some(("VirtualMachine", &w.vm_id)),
                    )
                    .await?;
                }
                Ok::<_, CoreError>(())
            }
            .await
        })?;
    }
    if busy >= workers {
        return Ok(true);
    }
    let pending = {
        let mut c = core.db().conn().await?;
        hostha::work_list(&mut c, &["Pending"], (workers - busy).max(0) * 4 + 16).await?
    };
    let mut started = 0;
    for w in pending.iter().filter(|w| w.next_try_ms <= now) {
        if busy >= workers {
            break;
        }
        if submit_restart(core, w).await? {
            busy += 1;
            started += 1;
        }
    }
    if started > 0 {
        core.wake_jobs();
        core.wake_cluster();
    }
    Ok(busy > 0 || !pending.is_empty())
}

/// End a pending work item without a restart (the VM is gone, started meanwhile, or busy).
async fn close_pending(tx: &mut skyhold_db::Tx, w: &Work, to: &str, why: &str) -> Result<bool, CoreError> {
    let m = hostha::WorkMove { to, attempts: w.attempts, job_id: None, next_try_ms: 0, last_error: Some(why) };
    Ok(hostha::work_update(tx, &w.id, "Pending", m).await?)
}

/// Turn a pending work item into a start job (one transaction; true if a job was queued).
async fn submit_restart(core: &Core, w: &Work) -> Result<bool, CoreError> {
    let ha_tag = core.settings().get(keys::HA_TAG);
    retry_tx!(core.db(), |tx| {
        async {
            let Some(vm) = skyhold_db::vm::vm_fetch(&mut tx, &w.vm_id).await? else {
                close_pending(&mut tx, w, "Cancelled", "VM expunged").await?;
                return Ok::<_, CoreError>(false);
            };
            match vm.state.as_str() {
                "Stopped" | "Error" => {}
                "Running" | "Starting" => {
                    close_pending(&mut tx, w, "Done", "started meanwhile").await?;
                    return Ok(false);
                }
                other => {
                    let why = format!("VM is {other}");
                    close_pending(&mut tx, w, "Cancelled", &why).await?;
                    return Ok(false);
                }
            }
            if skyhold_db::job::job_unfinished_for(&mut tx, &vm.id).await? {
                // Someone (a user) acts on the VM: wait for that first.
                return Ok(false);
            }
            let job_id = uuid::Uuid::new_v4().to_string();
            let params = json!({
                "ha": true,
                "work_id": w.id,
                "cluster_id": w.cluster_id,
                "ha_tag": ha_tag,
            });
            skyhold_db::job::job_insert(
                &mut tx,
                &skyhold_db::job::NewJob {
                    id: job_id.clone(),
                    cmd: crate::vm::cmd::START.to_string(),
                    user_id: vm.user_id.clone(),
                    account_id: vm.account_id.clone(),
                    domain_id: vm.domain_id.clone(),
                    instance_type: Some("VirtualMachine".into()),
                    instance_id: Some(vm.id.clone()),
                    params: params.to_string(),
                },
            )
            .await?;
            Ok(hostha::work_update(
                &mut tx,
                &w.id,
                "Pending",
                hostha::WorkMove {
                    to: "Running",
                    attempts: w.attempts,
                    job_id: Some(&job_id),
                    next_try_ms: 0,
                    last_error: None,
                },
            )
            .await?)
        }
        .await
    })
}

/// The agent of `host_id` reports `vm_id` Stopped. If the database says it runs there and no
/// job acts on it, it stopped without a command (crashed, or its host's storage failed): record
/// that, and restart it if it is HA-enabled (on the same host first: its last host).
pub async fn vm_stopped_on_host(core: &Core, host_id: &str, vm_id: &str) -> Result<(), CoreError> {
    let host = {
        let mut c = core.db().conn().await?;
        skyhold_db::infra::host_fetch(&mut c, host_id).await?
    };
    let Some(h) = host else { return Ok(()) };
    let storage = {
        let mut c = core.db().conn().await?;
        let vm = skyhold_db::vm::vm_fetch(&mut c, vm_id).await?;
        let Some(vm) = vm else { return Ok(()) };
        if vm.state != "Running"
            || vm.host_id.as_deref() != Some(host_id)
            || skyhold_db::job::job_unfinished_for(&mut c, vm_id).await?
        {
            return Ok(());
        }
        skyhold_db::infra::offering_list(&mut c)
            .await?
            .into_iter()
            .find(|o| o.id == vm.offering_id)
            .map(|o| o.storage_type)
            .unwrap_or_else(|| "shared".into())
    };
    // A ping is a snapshot: ask the host itself before believing the VM stopped (the agent
    // saying the VM is stopped is the proof invariant 7 asks for).
    let asked = core
        .agent_send_anywhere(
            host_id,
            &format!("ha-checkvm-{}", uuid::Uuid::new_v4()),
            0,
            Command::CheckVm { vm_id: vm_id.to_string() },
            Duration::from_secs(5),
        )
        .await;
    if !matches!(asked, Ok(Some(CommandResult::Ok { state: skyhold_proto::PowerState::Stopped }))) {
        return Ok(());
    }
    let proof = crate::fence::agent_reported_stopped().describe();
    let restarted = retry_tx!(core.db(), |tx| {
        async {
            let Some(vm) = skyhold_db::vm::vm_fetch(&mut tx, vm_id).await? else { return Ok::<_, CoreError>(None) };
            if vm.state != "Running" || vm.host_id.as_deref() != Some(host_id) {
                return Ok(None);
            }
            if skyhold_db::job::job_unfinished_for(&mut tx, vm_id).await? {
                return Ok(None);
            }
            let reason = format!("VM stopped on host {} without a command from Skyhold ({proof})", h.name);
            if !vm_transition(&mut tx, vm_id, &["Running"], "Stopped", HostChange::Clear, Some(&reason)).await? {
                return Ok(None);
            }
            let owner =
                EventOwner { account_id: vm.account_id.clone(), domain_id: vm.domain_id.clone(), user_id: None };
            crate::events::record(
                &mut tx,
                &owner,
                "VM.STOP",
                "WARN",
                format!("VM {}: {reason}", vm.name),
                Some(("VirtualMachine", vm_id)),
            )
            .await?;
            let eligible = ha_eligible(core, vm.ha_enabled, &storage);
            if eligible {
                queue_restart(&mut tx, core, &vm, &h, "CrashRestart", &reason).await?;
            }
            Ok(Some(eligible))
        }
        .await
    })?;
    if let Some(ha) = restarted {
        tracing::warn!(vm = %vm_id, host = %h.name, ha, "VM stopped without a command");
    }
    Ok(())
}

/// `skyhold ha status`: the hosts not Available and the HA work not finished.
pub async fn status(db: &skyhold_db::Db) -> Result<serde_json::Value, CoreError> {
    let mut c = db.conn().await?;
    let hosts = skyhold_db::infra::host_list(&mut c).await?;
    let work = hostha::work_list(&mut c, hostha::WORK_ACTIVE, 10_000).await?;
    let counts = hostha::work_counts(&mut c).await?;
    let now = skyhold_db::now_ms(&mut c).await?;
    let coordinator = skyhold_db::ms::lock_holder(&mut c, COORDINATOR_LOCK).await?;
    Ok(json!({
        "coordinator": coordinator.map(|(ms, left)| json!({ "ms_id": ms, "lease_left_ms": left })),
        "hosts": hosts.iter().filter(|h| h.ha_state != "Available" || h.status != "Up").map(|h| json!({
            "id": h.id, "name": h.name, "status": h.status, "hastate": h.ha_state,
            "since_ms_ago": if h.ha_since_ms > 0 { now - h.ha_since_ms } else { 0 },
            "heartbeat_silent_ms": if h.hb_seen_ms > 0 { Some(now - h.hb_seen_ms) } else { None },
        })).collect::<Vec<_>>(),
        "work": work.iter().map(|w| json!({
            "id": w.id, "vm": w.vm_id, "failed_host": w.host_id, "kind": w.kind, "state": w.state,
            "attempts": w.attempts, "job": w.job_id, "next_try_in_ms": (w.next_try_ms - now).max(0),
            "last_error": w.last_error, "reason": w.reason,
        })).collect::<Vec<_>>(),
        "work_by_state": counts.into_iter().collect::<HashMap<_, _>>(),
    }))
}
