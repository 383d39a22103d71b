//! Start a VM (also the second half of `deployVirtualMachine`).
//!
//! Step 0 (plan): choose a host with capacity, and in one transaction move the VM Stopped ->
//! Starting on that host and record step 1 with the host. Step 1 (execute): send `StartVm` as
//! `(job, 1)`; then in one transaction move the VM Starting -> Running and complete the job. A
//! host that refuses puts the VM back to Stopped and planning runs again without that host (up to
//! three hosts). A host that never answers leaves the VM in Error with the reason, holding its
//! host: its real state is unknown, and invariant 7 forbids guessing.

use super::{AgentOutcome, JobCtx, Outcome};
use crate::CoreError;
use crate::placement::{NoHost, Request, choose_host};
use serde_json::json;
use skyhold_db::infra::{host_list, host_used_capacity_locked};
use skyhold_db::retry_tx;
use skyhold_db::vm::{HostChange, vm_fetch, vm_transition};
use skyhold_proto::{Command, PowerState};
use skyhold_types::ErrorCode;

const MAX_HOSTS_TRIED: usize = 3;

pub async fn run(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let deploy = ctx.job.cmd == crate::vm::cmd::DEPLOY;
    if deploy && ctx.params.get("start").and_then(|v| v.as_bool()) == Some(false) {
        return retry_tx!(ctx.core.db(), |tx| {
            async {
                let r = ctx.vm_result(&mut tx).await?;
                ctx.succeed(&mut tx, r).await?;
                Ok::<_, CoreError>(Outcome::Done)
            }
            .await
        });
    }
    let required_host = ctx.params.get("hostid").and_then(|v| v.as_str()).map(str::to_string);
    let mut step = ctx.job.step;
    let mut state = ctx.step_state();
    let mut replans = 0;
    loop {
        match step {
            0 => {
                let exclude: Vec<String> = state
                    .get("exclude")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                let last_error = state.get("last_error").and_then(|v| v.as_str()).map(str::to_string);
                match plan(ctx, deploy, required_host.as_deref(), &exclude, last_error.as_deref(), replans).await? {
                    Planned::Host(h) => {
                        step = 1;
                        state = json!({ "host": h, "exclude": exclude });
                    }
                    Planned::Finished => return Ok(Outcome::Done),
                    Planned::Replan => {
                        replans += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        if replans > 60 {
                            return super::fail_job(
                                ctx,
                                ErrorCode::InsufficientCapacity,
                                "Insufficient capacity: hosts kept filling up while placing the VM",
                            )
                            .await;
                        }
                    }
                }
            }
            1 => {
                let host = state.get("host").and_then(|v| v.as_str()).unwrap_or_default().to_string();
                let vm = {
                    let mut c = ctx.core.db().conn().await?;
                    vm_fetch(&mut c, ctx.vm_id()).await?
                };
                let Some(vm) = vm else {
                    return super::fail_job(ctx, ErrorCode::Internal, "the VM disappeared while starting").await;
                };
                let cmd = Command::StartVm {
                    vm_id: vm.id.clone(),
                    name: vm.name.clone(),
                    cpu: vm.cpu as u32,
                    mem_mb: vm.mem_mb as u64,
                };
                // A distinct (job, step) per host attempt: one agent process may serve several
                // hosts and answers a repeated pair from its replay cache.
                let attempt = state.get("exclude").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0);
                let outcome = ctx.agent(&host, 1 + 10 * attempt as u32, cmd).await?;
                let Some(why) = finish(ctx, &host, &state, outcome).await? else {
                    return Ok(Outcome::Done);
                };
                // The host refused: plan again without it.
                let mut exclude: Vec<String> = state
                    .get("exclude")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                exclude.push(host);
                state = json!({ "exclude": exclude, "last_error": why });
                step = 0;
            }
            _ => return super::fail_job(ctx, ErrorCode::Internal, "start job in an unknown step").await,
        }
    }
}

enum Planned {
    Host(String),
    Finished,
    /// Lost a capacity race: plan again.
    Replan,
}

async fn plan(
    ctx: &JobCtx,
    deploy: bool,
    required: Option<&str>,
    exclude: &[String],
    last_error: Option<&str>,
    replans: u32,
) -> Result<Planned, CoreError> {
    let ha_tag = ctx.core.settings().get(skyhold_types::settings::HA_TAG);
    // An HA restart (queued by `ha`): stay in the failed host's cluster, and use only `ha.tag`
    // hosts when that setting is set; ordinary starts avoid those hosts.
    let ha = ctx.params.get("ha").and_then(|v| v.as_bool()) == Some(true);
    let ha_cluster = ctx.params.get("cluster_id").and_then(|v| v.as_str()).map(str::to_string);
    retry_tx!(ctx.core.db(), |tx| {
        async {
            if let Some(h) = ctx.committed_host(&mut tx).await? {
                // An earlier attempt of this very transaction committed (its answer was lost).
                return Ok(Planned::Host(h));
            }
            let Some(vm) = vm_fetch(&mut tx, ctx.vm_id()).await? else {
                ctx.fail(&mut tx, ErrorCode::ParamError, "the VM no longer exists").await?;
                return Ok(Planned::Finished);
            };
            match vm.state.as_str() {
                "Running" => {
                    let r = ctx.vm_result(&mut tx).await?;
                    ctx.succeed(&mut tx, r).await?;
                    return Ok(Planned::Finished);
                }
                "Stopped" | "Error" => {}
                other => {
                    let text = format!("VM {} is in state {other} and cannot be started", vm.name);
                    ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                    return Ok(Planned::Finished);
                }
            }
            let hosts = host_list(&mut tx).await?;
            let caps = crate::placement::caps_of(&hosts);
            let req = Request {
                zone_id: &vm.zone_id,
                cpu: vm.cpu,
                mem_mb: vm.mem_mb,
                required_host: required,
                preferred_host: vm.last_host_id.as_deref(),
                avoid_tag: if ha { None } else { Some(ha_tag.as_str()) },
                require_tag: if ha { Some(ha_tag.as_str()) } else { None },
                pod_id: vm.pod_id.as_deref(),
                cluster_id: if ha { ha_cluster.as_deref() } else { None },
                exclude,
                // A Disabled pod or cluster takes no new VMs, but an HA restart may use it:
                // restoring a VM that was running beats an allocation policy. An administrator's
                // explicit hostid may too, as CloudStack lets root admins choose the host.
                ignore_allocation: ha || required.is_some(),
            };
            let host = match choose_host(&caps, &req) {
                Ok(h) => {
                    // Re-check under the host lock: a concurrent placement may have used the room.
                    let (cpu, mem) = host_used_capacity_locked(&mut tx, &h.id).await?;
                    if h.cpu_total - cpu < vm.cpu || h.mem_total_mb - mem < vm.mem_mb {
                        return Ok(Planned::Replan);
                    }
                    h.id.clone()
                }
                Err(NoHost::NoCapacity)
                    if replans < 40
                        && reconnecting_in_zone(&mut tx, &hosts, &vm.zone_id).await? =>
                {
                    // Some hosts of the zone are between two servers (their agents reconnecting):
                    // wait for them rather than fail for lack of capacity.
                    return Ok(Planned::Replan);
                }
                Err(NoHost::NoCapacity) if !exclude.is_empty() => {
                    // Hosts were tried and refused; no other host remains: report why they refused.
                    let text = format!(
                        "Unable to start VM {}: {} (tried {} host(s))",
                        vm.name,
                        last_error.unwrap_or("the host refused"),
                        exclude.len()
                    );
                    let to = if deploy { "Error" } else { vm.state.as_str() };
                    vm_transition(&mut tx, &vm.id, &[vm.state.as_str()], to, HostChange::Keep, Some(&text)).await?;
                    ctx.fail(&mut tx, ErrorCode::Internal, &text).await?;
                    return Ok(Planned::Finished);
                }
                Err(why) => {
                    let text = match why {
                        NoHost::RequiredHostUnusable => format!(
                            "Unable to start VM {}: host {} is not Up and Enabled in zone {}",
                            vm.name,
                            required.unwrap_or(""),
                            vm.zone_name
                        ),
                        NoHost::RequiredHostFull => format!(
                            "Insufficient capacity to start VM {} on host {}: it needs {} CPU cores and {} MB of memory",
                            vm.name,
                            required.unwrap_or(""),
                            vm.cpu,
                            vm.mem_mb
                        ),
                        NoHost::NoCapacity => format!(
                            "Insufficient capacity to start VM {}: no Up and Enabled host {} has {} free CPU cores and {} MB of free memory",
                            vm.name,
                            if ha {
                                format!("of its failed host's cluster in zone {}", vm.zone_name)
                            } else {
                                format!("of an Enabled pod and cluster in zone {}", vm.zone_name)
                            },
                            vm.cpu,
                            vm.mem_mb
                        ),
                    };
                    let code = if why == NoHost::RequiredHostUnusable {
                        ErrorCode::ResourceUnavailable
                    } else {
                        ErrorCode::InsufficientCapacity
                    };
                    let to = if deploy { "Error" } else { vm.state.as_str() };
                    vm_transition(&mut tx, &vm.id, &[vm.state.as_str()], to, HostChange::Keep, Some(&text)).await?;
                    ctx.fail(&mut tx, code, &text).await?;
                    return Ok(Planned::Finished);
                }
            };
            let moved =
                vm_transition(&mut tx, &vm.id, &["Stopped", "Error"], "Starting", HostChange::Set(host.clone()), None)
                    .await?;
            if !moved {
                return Err(CoreError::cs(ErrorCode::ResourceInUse, "VM changed state concurrently; replanning"));
            }
            ctx.save_step(&mut tx, 1, json!({ "host": host, "exclude": exclude })).await?;
            Ok(Planned::Host(host))
        }
        .await
    })
}

/// Step 1's answer, recorded with the VM's new state in one transaction. `Some(why)` when the
/// host refused and another host should be tried.
async fn finish(
    ctx: &JobCtx,
    host: &str,
    state: &serde_json::Value,
    outcome: AgentOutcome,
) -> Result<Option<String>, CoreError> {
    let owner = ctx.owner();
    retry_tx!(ctx.core.db(), |tx| {
        async {
            match &outcome {
                AgentOutcome::Done(PowerState::Running) => {
                    if !vm_transition(&mut tx, ctx.vm_id(), &["Starting"], "Running", HostChange::Keep, None).await? {
                        return Err(CoreError::LeaseLost);
                    }
                    crate::events::record(
                        &mut tx,
                        &owner,
                        "VM.START",
                        "INFO",
                        format!("Started VM on host {host}"),
                        Some(("VirtualMachine", ctx.vm_id())),
                    )
                    .await?;
                    let r = ctx.vm_result(&mut tx).await?;
                    ctx.succeed(&mut tx, r).await?;
                }
                AgentOutcome::Done(PowerState::Stopped) | AgentOutcome::Failed(_) => {
                    let why = match &outcome {
                        AgentOutcome::Failed(m) => m.clone(),
                        _ => "the host reported the VM stopped after starting it".to_string(),
                    };
                    vm_transition(&mut tx, ctx.vm_id(), &["Starting"], "Stopped", HostChange::Clear, Some(&why))
                        .await?;
                    let mut exclude: Vec<String> = state
                        .get("exclude")
                        .and_then(|v| v.as_array())
                        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                        .unwrap_or_default();
                    exclude.push(host.to_string());
                    let required = ctx.params.get("hostid").and_then(|v| v.as_str()).is_some();
                    if exclude.len() >= MAX_HOSTS_TRIED || required {
                        let text = format!("Unable to start VM: {why}");
                        if ctx.job.cmd == crate::vm::cmd::DEPLOY {
                            vm_transition(&mut tx, ctx.vm_id(), &["Stopped"], "Error", HostChange::Keep, Some(&text))
                                .await?;
                        }
                        crate::events::record(
                            &mut tx,
                            &owner,
                            "VM.START",
                            "ERROR",
                            text.clone(),
                            Some(("VirtualMachine", ctx.vm_id())),
                        )
                        .await?;
                        ctx.fail(&mut tx, ErrorCode::Internal, &text).await?;
                    } else {
                        // Try another host: back to planning, remembering this one.
                        ctx.save_step(&mut tx, 0, json!({ "exclude": exclude, "last_error": why })).await?;
                        return Ok(Some(why));
                    }
                }
                AgentOutcome::Unreachable => {
                    let text =
                        format!("Unable to start VM: host {host} did not answer; the VM's state on it is unknown");
                    vm_transition(&mut tx, ctx.vm_id(), &["Starting"], "Error", HostChange::Keep, Some(&text)).await?;
                    crate::events::record(
                        &mut tx,
                        &owner,
                        "VM.START",
                        "ERROR",
                        text.clone(),
                        Some(("VirtualMachine", ctx.vm_id())),
                    )
                    .await?;
                    ctx.fail(&mut tx, ErrorCode::ResourceUnavailable, &text).await?;
                }
            }
            Ok::<Option<String>, CoreError>(None)
        }
        .await
    })
}

/// Are some Enabled hosts of the zone Disconnected but pinged within the last 30 s (their agents
/// moving between servers), or Connecting (registered, about to be Up)?
async fn reconnecting_in_zone(
    tx: &mut skyhold_db::Tx,
    hosts: &[skyhold_db::infra::Host],
    zone: &str,
) -> Result<bool, CoreError> {
    let now = skyhold_db::now_ms(tx).await?;
    Ok(hosts.iter().any(|h| {
        h.zone_id == zone
            && h.resource_state == "Enabled"
            && (h.status == "Connecting"
                || (h.status == "Disconnected" && h.last_ping_ms.is_some_and(|t| now - t < 30_000)))
    }))
}
