//! Live-migrate a running VM to another host of its cluster (`migrateVirtualMachine`, and each
//! VM of a host entering maintenance).
//!
//! The VM never runs on two hosts at once:
//! - step 0 (plan): choose the destination (the given `hostid`, or the Up and Enabled host of the
//!   same cluster with the most free memory), move the VM Running -> Migrating, record step 1;
//! - step 1: `MigrateOut` on the source (the source pauses it). Refused: the VM is Running where
//!   it was, the job fails, an event says why;
//! - step 2: `StartVm` on the destination. Refused or no answer: step 4;
//! - step 3: `MigrateDone` on the source (it forgets the VM), then Migrating -> Running on the
//!   destination with the job's completion, in one transaction;
//! - step 4: `MigrateAbort` on the source (it resumes the VM): Migrating -> Running on the
//!   source, the job fails with the destination's reason and a VM.MIGRATE event.

use super::{AgentOutcome, JobCtx, Outcome};
use crate::CoreError;
use crate::placement::{Request, choose_host};
use serde_json::{Value, json};
use skyhold_db::retry_tx;
use skyhold_db::vm::{HostChange, vm_fetch, vm_transition};
use skyhold_proto::{Command, PowerState};
use skyhold_types::ErrorCode;

pub async fn run(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let mut step = ctx.job.step;
    let mut state = ctx.step_state();
    if step == 0 {
        match plan(ctx).await? {
            None => return Ok(Outcome::Done),
            Some(s) => {
                state = s;
                step = 1;
            }
        }
    }
    let src = state.get("src").and_then(Value::as_str).unwrap_or_default().to_string();
    let dst = state.get("dst").and_then(Value::as_str).unwrap_or_default().to_string();
    let vm_id = ctx.vm_id().to_string();
    loop {
        match step {
            1 => match ctx.agent(&src, 1, Command::MigrateOut { vm_id: vm_id.clone() }).await? {
                AgentOutcome::Done(_) => step = save(ctx, 2, &state).await?,
                AgentOutcome::Failed(m) => return give_up(ctx, &src, &dst, &format!("the source refused: {m}")).await,
                AgentOutcome::Unreachable => {
                    return give_up(ctx, &src, &dst, "the source host did not answer").await;
                }
            },
            2 => {
                let vm = {
                    let mut c = ctx.core.db().conn().await?;
                    vm_fetch(&mut c, &vm_id).await?
                };
                let Some(vm) = vm else {
                    return super::fail_job(ctx, ErrorCode::Internal, "the VM disappeared while migrating").await;
                };
                let cmd = Command::StartVm {
                    vm_id: vm.id.clone(),
                    name: vm.name.clone(),
                    cpu: vm.cpu as u32,
                    mem_mb: vm.mem_mb as u64,
                };
                match ctx.agent(&dst, 2, cmd).await? {
                    AgentOutcome::Done(PowerState::Running) => step = save(ctx, 3, &state).await?,
                    AgentOutcome::Done(_) => {
                        let s = json!({ "src": src, "dst": dst, "why": "the destination did not run the VM" });
                        step = save(ctx, 4, &s).await?;
                        state = s;
                    }
                    AgentOutcome::Failed(m) => {
                        let s = json!({ "src": src, "dst": dst, "why": format!("the destination refused: {m}") });
                        step = save(ctx, 4, &s).await?;
                        state = s;
                    }
                    AgentOutcome::Unreachable => {
                        // The destination's state is unknown: it may run the VM. Resuming on the
                        // source could run it twice, so the VM is left in Error for an operator.
                        let text = format!(
                            "Migration of VM {} to host {dst} failed: the destination did not answer; the VM is \
                             paused on {src} and its state on {dst} is unknown",
                            vm.name
                        );
                        return retry_tx!(ctx.core.db(), |tx| {
                            async {
                                vm_transition(&mut tx, &vm_id, &["Migrating"], "Error", HostChange::Keep, Some(&text))
                                    .await?;
                                ctx.fail(&mut tx, ErrorCode::ResourceUnavailable, &text).await?;
                                Ok::<_, CoreError>(Outcome::Done)
                            }
                            .await
                        });
                    }
                }
            }
            3 => {
                // The source forgets the VM (its answer does not matter for where the VM runs now).
                let _ = ctx.agent(&src, 3, Command::MigrateDone { vm_id: vm_id.clone() }).await?;
                let owner = ctx.owner();
                return retry_tx!(ctx.core.db(), |tx| {
                    async {
                        if !vm_transition(
                            &mut tx,
                            &vm_id,
                            &["Migrating"],
                            "Running",
                            HostChange::Set(dst.clone()),
                            None,
                        )
                        .await?
                        {
                            return Err(CoreError::LeaseLost);
                        }
                        crate::events::record(
                            &mut tx,
                            &owner,
                            "VM.MIGRATE",
                            "INFO",
                            format!("Migrated VM from host {src} to host {dst}"),
                            Some(("VirtualMachine", &vm_id)),
                        )
                        .await?;
                        let r = ctx.vm_result(&mut tx).await?;
                        ctx.succeed(&mut tx, r).await?;
                        Ok::<_, CoreError>(Outcome::Done)
                    }
                    .await
                });
            }
            4 => {
                let why = state.get("why").and_then(Value::as_str).unwrap_or("the destination refused").to_string();
                let outcome = ctx.agent(&src, 4, Command::MigrateAbort { vm_id: vm_id.clone() }).await?;
                if matches!(outcome, AgentOutcome::Done(PowerState::Running)) {
                    return give_up(ctx, &src, &dst, &why).await;
                }
                let text = format!(
                    "Migration to host {dst} failed ({why}) and the source host {src} could not resume the VM: {outcome:?}"
                );
                return retry_tx!(ctx.core.db(), |tx| {
                    async {
                        vm_transition(&mut tx, &vm_id, &["Migrating"], "Error", HostChange::Keep, Some(&text)).await?;
                        ctx.fail(&mut tx, ErrorCode::Internal, &text).await?;
                        Ok::<_, CoreError>(Outcome::Done)
                    }
                    .await
                });
            }
            _ => return super::fail_job(ctx, ErrorCode::Internal, "migration job in an unknown step").await,
        }
    }
}

/// Record the next step (fenced by the job lease).
async fn save(ctx: &JobCtx, step: i64, state: &Value) -> Result<i64, CoreError> {
    retry_tx!(ctx.core.db(), |tx| {
        async {
            ctx.save_step(&mut tx, step, state.clone()).await?;
            Ok::<_, CoreError>(step)
        }
        .await
    })
}

/// The VM stays (or is again) Running on the source; the job fails with `why` and an event.
async fn give_up(ctx: &JobCtx, src: &str, dst: &str, why: &str) -> Result<Outcome, CoreError> {
    let owner = ctx.owner();
    let vm_id = ctx.vm_id().to_string();
    let text = format!("Unable to migrate VM to host {dst}: {why}; the VM keeps running on host {src}");
    retry_tx!(ctx.core.db(), |tx| {
        async {
            vm_transition(&mut tx, &vm_id, &["Migrating"], "Running", HostChange::Keep, None).await?;
            crate::events::record(
                &mut tx,
                &owner,
                "VM.MIGRATE",
                "WARN",
                text.clone(),
                Some(("VirtualMachine", &vm_id)),
            )
            .await?;
            ctx.fail(&mut tx, ErrorCode::Internal, &text).await?;
            Ok::<_, CoreError>(Outcome::Done)
        }
        .await
    })
}

/// Step 0: choose the destination and move the VM to Migrating. `None` when the job ended here.
async fn plan(ctx: &JobCtx) -> Result<Option<Value>, CoreError> {
    let wanted = ctx.params.get("hostid").and_then(Value::as_str).map(str::to_string);
    retry_tx!(ctx.core.db(), |tx| {
        async {
            let (recorded, st) = ctx.recorded_step(&mut tx).await?;
            if recorded >= 1 {
                // An earlier attempt of this transaction committed (its answer was lost).
                return Ok(Some(st));
            }
            let Some(vm) = vm_fetch(&mut tx, ctx.vm_id()).await? else {
                ctx.fail(&mut tx, ErrorCode::ParamError, "the VM no longer exists").await?;
                return Ok(None);
            };
            let (Some(src), "Running") = (vm.host_id.clone(), vm.state.as_str()) else {
                let text = format!("VM {} is in state {}; only a Running VM can be migrated", vm.name, vm.state);
                ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                return Ok(None);
            };
            let hosts = skyhold_db::infra::host_list(&mut tx).await?;
            let Some(source) = hosts.iter().find(|h| h.id == src) else {
                ctx.fail(&mut tx, ErrorCode::Internal, "the VM's host no longer exists").await?;
                return Ok(None);
            };
            let caps = crate::placement::caps_of(&hosts);
            let ha_tag = ctx.core.settings().get(skyhold_types::settings::HA_TAG);
            let exclude = vec![src.clone()];
            let req = Request {
                zone_id: &vm.zone_id,
                cpu: vm.cpu,
                mem_mb: vm.mem_mb,
                required_host: wanted.as_deref(),
                preferred_host: None,
                avoid_tag: Some(ha_tag.as_str()),
                require_tag: None,
                pod_id: None,
                cluster_id: Some(&source.cluster_id),
                exclude: &exclude,
                // Only an administrator's explicit hostid may land in a Disabled pod or cluster.
                ignore_allocation: wanted.is_some(),
            };
            let dst = match choose_host(&caps, &req) {
                Ok(h) => h.id.clone(),
                Err(why) => {
                    let text = format!(
                        "Unable to migrate VM {}: {}",
                        vm.name,
                        match why {
                            crate::placement::NoHost::RequiredHostUnusable => format!(
                                "host {} is not an Up and Enabled host of the VM's cluster, other than its own",
                                wanted.as_deref().unwrap_or("")
                            ),
                            crate::placement::NoHost::RequiredHostFull => format!(
                                "host {} lacks {} free CPU cores and {} MB of free memory",
                                wanted.as_deref().unwrap_or(""),
                                vm.cpu,
                                vm.mem_mb
                            ),
                            crate::placement::NoHost::NoCapacity =>
                                "no other Up and Enabled host of its cluster has room for it".to_string(),
                        }
                    );
                    crate::events::record(
                        &mut tx,
                        &ctx.owner(),
                        "VM.MIGRATE",
                        "WARN",
                        text.clone(),
                        Some(("VirtualMachine", &vm.id)),
                    )
                    .await?;
                    ctx.fail(&mut tx, ErrorCode::InsufficientCapacity, &text).await?;
                    return Ok(None);
                }
            };
            if !vm_transition(&mut tx, &vm.id, &["Running"], "Migrating", HostChange::Keep, None).await? {
                return Err(CoreError::cs(ErrorCode::ResourceInUse, "VM changed state concurrently; retry"));
            }
            let st = json!({ "src": src, "dst": dst });
            ctx.save_step(&mut tx, 1, st.clone()).await?;
            Ok(Some(st))
        }
        .await
    })
}
