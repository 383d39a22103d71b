//! Reboot a running VM: one agent step, `(job, 1)`. The VM stays Running throughout.

use super::{AgentOutcome, JobCtx, Outcome};
use crate::CoreError;
use skyhold_db::retry_tx;
use skyhold_db::vm::vm_fetch;
use skyhold_proto::Command;
use skyhold_types::ErrorCode;

pub async fn run(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let vm = {
        let mut c = ctx.core.db().conn().await?;
        vm_fetch(&mut c, ctx.vm_id()).await?
    };
    let host = match vm {
        Some(vm) if vm.state == "Running" && vm.host_id.is_some() => vm.host_id.unwrap_or_default(),
        Some(vm) => {
            let text = format!("VM {} is in state {} and cannot be rebooted; it must be Running", vm.name, vm.state);
            return super::fail_job(ctx, ErrorCode::ParamError, &text).await;
        }
        None => return super::fail_job(ctx, ErrorCode::ParamError, "the VM no longer exists").await,
    };
    let outcome = ctx.agent(&host, 1, Command::RebootVm { vm_id: ctx.vm_id().to_string() }).await?;
    let owner = ctx.owner();
    retry_tx!(ctx.core.db(), |tx| {
        async {
            match &outcome {
                AgentOutcome::Done(_) => {
                    crate::events::record(
                        &mut tx,
                        &owner,
                        "VM.REBOOT",
                        "INFO",
                        "Rebooted VM",
                        Some(("VirtualMachine", ctx.vm_id())),
                    )
                    .await?;
                    let r = ctx.vm_result(&mut tx).await?;
                    ctx.succeed(&mut tx, r).await?;
                }
                AgentOutcome::Failed(m) => {
                    ctx.fail(&mut tx, ErrorCode::Internal, &format!("Unable to reboot VM: {m}")).await?
                }
                AgentOutcome::Unreachable => {
                    ctx.fail(
                        &mut tx,
                        ErrorCode::ResourceUnavailable,
                        &format!("Unable to reboot VM: host {host} did not answer"),
                    )
                    .await?
                }
            }
            Ok::<_, CoreError>(Outcome::Done)
        }
        .await
    })
}
