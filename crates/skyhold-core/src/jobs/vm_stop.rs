//! Stop a VM. Step 0: Running -> Stopping (recording the host). Step 1: `StopVm` as `(job, 1)`,
//! then Stopping -> Stopped and the host released, in one transaction with the job's completion.
//! A refusal puts the VM back to Running; no answer within `wait` also leaves it Running (its
//! state is unknown, so capacity stays held) and fails the job.

use super::{AgentOutcome, JobCtx, Outcome};
use crate::CoreError;
use serde_json::json;
use skyhold_db::retry_tx;
use skyhold_db::vm::{HostChange, vm_fetch, vm_transition};
use skyhold_proto::Command;
use skyhold_types::ErrorCode;

pub async fn run(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let forced = ctx.params.get("forced").and_then(|v| v.as_bool()).unwrap_or(false);
    let mut step = ctx.job.step;
    let mut host = ctx.step_state().get("host").and_then(|v| v.as_str()).map(str::to_string);
    if step == 0 {
        let r = retry_tx!(ctx.core.db(), |tx| {
            async {
                if let Some(h) = ctx.committed_host(&mut tx).await? {
                    // An earlier attempt of this transaction committed (its answer was lost).
                    return Ok(Some(h));
                }
                let Some(vm) = vm_fetch(&mut tx, ctx.vm_id()).await? else {
                    ctx.fail(&mut tx, ErrorCode::ParamError, "the VM no longer exists").await?;
                    return Ok(None);
                };
                match (vm.state.as_str(), &vm.host_id) {
                    ("Stopped", _) => {
                        let r = ctx.vm_result(&mut tx).await?;
                        ctx.succeed(&mut tx, r).await?;
                        Ok(None)
                    }
                    ("Running", Some(h)) => {
                        if !vm_transition(&mut tx, &vm.id, &["Running"], "Stopping", HostChange::Keep, None).await? {
                            return Err(CoreError::LeaseLost);
                        }
                        ctx.save_step(&mut tx, 1, json!({ "host": h })).await?;
                        Ok(Some(h.clone()))
                    }
                    (other, _) => {
                        let text = format!("VM {} is in state {other} and cannot be stopped", vm.name);
                        ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                        Ok(None)
                    }
                }
            }
            .await
        })?;
        match r {
            None => return Ok(Outcome::Done),
            Some(h) => {
                host = Some(h);
                step = 1;
            }
        }
    }
    if step != 1 {
        return super::fail_job(ctx, ErrorCode::Internal, "stop job in an unknown step").await;
    }
    let host = host.unwrap_or_default();
    let outcome = ctx.agent(&host, 1, Command::StopVm { vm_id: ctx.vm_id().to_string(), force: forced }).await?;
    let owner = ctx.owner();
    retry_tx!(ctx.core.db(), |tx| {
        async {
            match &outcome {
                AgentOutcome::Done(_) => {
                    if !vm_transition(&mut tx, ctx.vm_id(), &["Stopping"], "Stopped", HostChange::Clear, None).await? {
                        return Err(CoreError::LeaseLost);
                    }
                    crate::events::record(
                        &mut tx,
                        &owner,
                        "VM.STOP",
                        "INFO",
                        "Stopped VM",
                        Some(("VirtualMachine", ctx.vm_id())),
                    )
                    .await?;
                    let r = ctx.vm_result(&mut tx).await?;
                    ctx.succeed(&mut tx, r).await?;
                }
                AgentOutcome::Failed(m) => {
                    vm_transition(&mut tx, ctx.vm_id(), &["Stopping"], "Running", HostChange::Keep, None).await?;
                    ctx.fail(&mut tx, ErrorCode::Internal, &format!("Unable to stop VM: {m}")).await?;
                }
                AgentOutcome::Unreachable => {
                    let text =
                        format!("Unable to stop VM: host {host} did not answer; the VM is still considered Running");
                    vm_transition(&mut tx, ctx.vm_id(), &["Stopping"], "Running", HostChange::Keep, Some(&text))
                        .await?;
                    ctx.fail(&mut tx, ErrorCode::ResourceUnavailable, &text).await?;
                }
            }
            Ok::<_, CoreError>(Outcome::Done)
        }
        .await
    })
}
