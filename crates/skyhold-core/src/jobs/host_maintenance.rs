//! `prepareHostForMaintenance` and `cancelHostMaintenance`.
//!
//! Prepare: step 0, in one transaction, moves the host's resource state Enabled (or
//! ErrorInMaintenance) -> PrepareForMaintenance (placement then avoids it) and queues one
//! migration job per running VM; step 1 waits for those jobs: all migrated -> Maintenance; any
//! failed -> ErrorInMaintenance (the VMs that could not move keep running where they were; each
//! failure is a VM.MIGRATE event). Cancel: back to Enabled from any maintenance state.

use super::{JobCtx, Outcome};
use crate::CoreError;
use serde_json::{Value, json};
use skyhold_db::retry_tx;
use skyhold_types::ErrorCode;
use std::time::Duration;

const MAINTENANCE_STATES: &[&str] = &["PrepareForMaintenance", "Maintenance", "ErrorInMaintenance"];

fn host_result(id: &str, name: &str, state: &str) -> Value {
    json!({ "host": { "id": id, "name": name, "resourcestate": state } })
}

pub async fn prepare(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let host_id = ctx.vm_id().to_string();
    let mut step = ctx.job.step;
    let mut state = ctx.step_state();
    if step == 0 {
        let planned = retry_tx!(ctx.core.db(), |tx| {
            async {
                let (recorded, st) = ctx.recorded_step(&mut tx).await?;
                if recorded >= 1 {
                    return Ok(Some(st));
                }
                let Some(host) = skyhold_db::infra::host_fetch(&mut tx, &host_id).await? else {
                    ctx.fail(&mut tx, ErrorCode::ParamError, "the host no longer exists").await?;
                    return Ok(None);
                };
                if !matches!(host.resource_state.as_str(), "Enabled" | "Disabled" | "ErrorInMaintenance") {
                    let text = format!("host {} is in resource state {}", host.name, host.resource_state);
                    ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                    return Ok(None);
                }
                skyhold_db::infra::host_set_resource_state(&mut tx, &host_id, "PrepareForMaintenance").await?;
                let f = skyhold_db::vm::VmFilter {
                    host_id: Some(host_id.clone()),
                    state: Some("Running".into()),
                    ..Default::default()
                };
                let (vms, _) =
                    skyhold_db::vm::vm_list(&mut tx, &f, skyhold_db::Page { page: 1, size: 100_000 }).await?;
                let mut jobs = Vec::new();
                for vm in &vms {
                    let id = uuid::Uuid::new_v4().to_string();
                    skyhold_db::job::job_insert(
                        &mut tx,
                        &skyhold_db::job::NewJob {
                            id: id.clone(),
                            cmd: crate::vm::cmd::MIGRATE.into(),
                            user_id: ctx.job.user_id.clone(),
                            account_id: ctx.job.account_id.clone(),
                            domain_id: ctx.job.domain_id.clone(),
                            instance_type: Some("VirtualMachine".into()),
                            instance_id: Some(vm.id.clone()),
                            params: json!({ "maintenance_of": host_id }).to_string(),
                        },
                    )
                    .await?;
                    jobs.push(id);
                }
                crate::events::record(
                    &mut tx,
                    &ctx.owner(),
                    "MAINT.PREPARE",
                    "INFO",
                    format!("Host {} entering maintenance: migrating {} VM(s) away", host.name, vms.len()),
                    Some(("Host", &host_id)),
                )
                .await?;
                let st = json!({ "jobs": jobs, "name": host.name });
                ctx.save_step(&mut tx, 1, st.clone()).await?;
                Ok::<_, CoreError>(Some(st))
            }
            .await
        })?;
        match planned {
            None => return Ok(Outcome::Done),
            Some(st) => {
                state = st;
                step = 1;
            }
        }
    }
    if step != 1 {
        return super::fail_job(ctx, ErrorCode::Internal, "maintenance job in an unknown step").await;
    }
    ctx.core.wake_jobs();
    ctx.core.wake_cluster();
    let jobs: Vec<String> = state
        .get("jobs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let name = state.get("name").and_then(Value::as_str).unwrap_or(&host_id).to_string();
    // Wait for the migrations (each is its own durable job, run by any server).
    let failed = loop {
        let mut pending = 0;
        let mut failed = Vec::new();
        {
            let mut c = ctx.core.db().conn().await?;
            for j in &jobs {
                match skyhold_db::job::job_fetch(&mut c, j).await? {
                    Some(job) if job.status == 0 => pending += 1,
                    Some(job) if job.status == 2 => failed.push(job.result.unwrap_or_default()),
                    _ => {}
                }
            }
        }
        if pending == 0 {
            break failed;
        }
        if ctx.lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CoreError::LeaseLost);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let owner = ctx.owner();
    retry_tx!(ctx.core.db(), |tx| {
        async {
            let host = skyhold_db::infra::host_fetch(&mut tx, &host_id).await?;
            if host.as_ref().map(|h| h.resource_state.as_str()) != Some("PrepareForMaintenance") {
                // Cancelled meanwhile.
                let now = host.map(|h| h.resource_state).unwrap_or_else(|| "Removed".into());
                ctx.succeed(&mut tx, host_result(&host_id, &name, &now)).await?;
                return Ok::<_, CoreError>(Outcome::Done);
            }
            let (to, level, text) = if failed.is_empty() {
                ("Maintenance", "INFO", format!("Host {name} is in maintenance: {} VM(s) migrated away", jobs.len()))
            } else {
                (
                    "ErrorInMaintenance",
                    "WARN",
                    format!(
                        "Host {name}: {} of {} VM migration(s) failed; those VMs keep running on it: {}",
                        failed.len(),
                        jobs.len(),
                        failed.join("; ")
                    ),
                )
            };
            skyhold_db::infra::host_set_resource_state(&mut tx, &host_id, to).await?;
            crate::events::record(&mut tx, &owner, "MAINT.PREPARE", level, text, Some(("Host", &host_id))).await?;
            ctx.succeed(&mut tx, host_result(&host_id, &name, to)).await?;
            Ok(Outcome::Done)
        }
        .await
    })
}

pub async fn cancel(ctx: &mut JobCtx) -> Result<Outcome, CoreError> {
    let host_id = ctx.vm_id().to_string();
    let owner = ctx.owner();
    retry_tx!(ctx.core.db(), |tx| {
        async {
            let Some(host) = skyhold_db::infra::host_fetch(&mut tx, &host_id).await? else {
                ctx.fail(&mut tx, ErrorCode::ParamError, "the host no longer exists").await?;
                return Ok::<_, CoreError>(Outcome::Done);
            };
            if !MAINTENANCE_STATES.contains(&host.resource_state.as_str()) {
                let text = format!("host {} is not in maintenance (resource state {})", host.name, host.resource_state);
                ctx.fail(&mut tx, ErrorCode::ParamError, &text).await?;
                return Ok(Outcome::Done);
            }
            skyhold_db::infra::host_set_resource_state(&mut tx, &host_id, "Enabled").await?;
            crate::events::record(
                &mut tx,
                &owner,
                "MAINT.CANCEL",
                "INFO",
                format!("Host {} back from maintenance", host.name),
                Some(("Host", &host_id)),
            )
            .await?;
            ctx.succeed(&mut tx, host_result(&host_id, &host.name, "Enabled")).await?;
            Ok(Outcome::Done)
        }
        .await
    })
}
