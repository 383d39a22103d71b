//! Destroy a VM (optionally expunging it) and expunge a destroyed VM.
//!
//! Destroy of a VM on a host: step 0 moves it to Stopping (recording the host), step 1 sends
//! `DestroyVm` as `(job, 1)` and then marks it Destroyed (and expunges it if asked) in one
//! transaction with the job's completion. A VM on no host is destroyed in step 0 directly.
//! Expunge frees the VM's addresses and removes its volumes; the VM disappears from every list.

use super::{AgentOutcome, JobCtx, Outcome};
use crate::CoreError;
use crate::events::record;
use serde_json::{Value, json};
use skyhold_db::Tx;
use skyhold_db::retry_tx;
use skyhold_db::vm::{HostChange, vm_expunge, vm_fetch, vm_transition};
use skyhold_proto::Command;
use skyhold_types::ErrorCode;

/// Mark destroyed (from `from`), expunge if asked, and complete the job, in the caller's transaction.
async fn destroyed(ctx: &JobCtx, tx: &mut Tx, from: &str, expunge: bool) -> Result<(), CoreError> {
    if from != "Destroyed" && !vm_transition(tx, ctx.vm_id(), &[from], "Destroyed", HostChange::Clear, None).await? {
        return Err(CoreError::LeaseLost);
    }
    let result: Value = ctx.vm_result(tx).await?;
    let o = ctx.owner();
    if from != "Destroyed" {
        record(tx, &o, "VM.DESTROY", "INFO", "Destroyed VM", Some(("VirtualMachine", ctx.vm_id()))).await?;
    }
    if expunge {
        vm_expunge(tx, ctx.vm_id()).await?;
        record(tx, &o, "VM.EXPUNGE", "INFO", "Expunged VM", Some(("VirtualMachine", ctx.vm_id()))).await?;
    }
    if ctx.job.cmd == crate::vm::cmd::EXPUNGE {
        ctx.succeed(tx, json!({ "success": true })).await
    } else {
        ctx.succeed(tx, result).await
    }
}

pub async fn run(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let only_expunge = ctx.job.cmd == crate::vm::cmd::EXPUNGE;
    let expunge = only_expunge || ctx.params.get("expunge").and_then(|v| v.as_bool()).unwrap_or(false);
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
                if only_expunge && !matches!(vm.state.as_str(), "Destroyed" | "Error") {
                    let text = format!("VM {} is in state {}; destroy it before expunging it", vm.name, vm.state);
                    ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                    return Ok(None);
                }
                match (vm.state.as_str(), vm.host_id.clone()) {
                    ("Running" | "Error", Some(h)) => {
                        if !vm_transition(&mut tx, &vm.id, &[vm.state.as_str()], "Stopping", HostChange::Keep, None)
                            .await?
                        {
                            return Err(CoreError::LeaseLost);
                        }
                        ctx.save_step(&mut tx, 1, json!({ "host": h })).await?;
                        Ok(Some(h))
                    }
                    (s @ ("Stopped" | "Error" | "Destroyed"), _) => {
                        destroyed(ctx, &mut tx, s, expunge).await?;
                        Ok(None)
                    }
                    (other, _) => {
                        let text = format!("VM {} is in state {other} and cannot be destroyed now", vm.name);
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
        return super::fail_job(ctx, ErrorCode::Internal, "destroy job in an unknown step").await;
    }
    let host = host.unwrap_or_default();
    let outcome = ctx.agent(&host, 1, Command::DestroyVm { vm_id: ctx.vm_id().to_string() }).await?;
    retry_tx!(ctx.core.db(), |tx| {
        async {
            match &outcome {
                AgentOutcome::Done(_) => destroyed(ctx, &mut tx, "Stopping", expunge).await?,
                AgentOutcome::Failed(m) => {
                    vm_transition(&mut tx, ctx.vm_id(), &["Stopping"], "Running", HostChange::Keep, None).await?;
                    ctx.fail(&mut tx, ErrorCode::Internal, &format!("Unable to destroy VM: {m}")).await?;
                }
                AgentOutcome::Unreachable => {
                    let text =
                        format!("Unable to destroy VM: host {host} did not answer; the VM is still considered Running");
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
