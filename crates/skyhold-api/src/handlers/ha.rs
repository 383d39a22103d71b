//! Host HA: alerts and out-of-band management (IPMI) configuration.

use super::{Ctx, HResult, cs};
use crate::reply::Reply;
use serde_json::{Value, json};
use skyhold_db::DbError;
use skyhold_db::hostha::{self, Oob};
use skyhold_types::time::cs_date;
use skyhold_types::{CsError, ErrorCode};

fn db(e: DbError) -> CsError {
    cs(e.into())
}

pub async fn list_alerts(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let alert_type = p.int("type")?;
    let name = p.text("name", 64)?;
    let id = p.uuid("id")?;
    let page = p.page(ctx.default_page_size())?;
    let (rows, total) = {
        let mut c = ctx.core.db().conn().await.map_err(db)?;
        hostha::alert_list(&mut c, alert_type, name.as_deref(), id.as_deref(), page).await.map_err(db)?
    };
    let items = rows
        .iter()
        .map(|a| {
            json!({
                "id": a.id,
                "type": a.alert_type,
                "name": a.name,
                "subject": a.subject,
                "description": a.description,
                "sent": cs_date(a.created_ms),
                "zoneid": a.zone_id,
                "podid": a.pod_id,
                "clusterid": a.cluster_id,
                "hostid": a.host_id,
            })
        })
        .collect();
    Ok(Reply::list("alert", items, total))
}

/// CloudStack's `outofbandmanagement` object of a host.
pub fn oob_json(host_id: &str, o: Option<&Oob>) -> Value {
    match o {
        None => json!({ "hostid": host_id, "enabled": false, "powerstate": "Disabled" }),
        Some(o) => json!({
            "hostid": host_id,
            "driver": o.driver,
            "address": o.address,
            "port": o.port.to_string(),
            "username": o.username,
            "enabled": o.enabled,
            "powerstate": if o.enabled { o.power_state.as_str() } else { "Disabled" },
        }),
    }
}

async fn host_or_error(ctx: &Ctx<'_>, id: &str) -> Result<skyhold_db::infra::Host, CsError> {
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    skyhold_db::infra::host_fetch(&mut c, id)
        .await
        .map_err(db)?
        .ok_or_else(|| CsError::param(format!("Unable to find host with specified id {id}")))
}

/// `configureOutOfBandManagement hostid driver=ipmitool address port username password`.
pub async fn configure_oob(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let host_id = p.req_uuid("hostid")?;
    let driver = p.text("driver", 32)?.ok_or_else(|| p.missing("driver"))?;
    if driver != "ipmitool" {
        return Err(p.invalid("driver", "the supported out-of-band management driver is ipmitool"));
    }
    let address = p.text("address", 255)?.ok_or_else(|| p.missing("address"))?;
    if address.is_empty() || address.chars().any(|ch| ch.is_whitespace() || ch == '\'' || ch == '"') {
        return Err(p.invalid("address", "not a host name or IP address"));
    }
    let port = match p.int("port")? {
        None => 623,
        Some(v) if (1..=65535).contains(&v) => v,
        Some(_) => return Err(p.invalid("port", "must be between 1 and 65535")),
    };
    let username = p.text("username", 64)?.ok_or_else(|| p.missing("username"))?;
    let password = p.text("password", 128)?.ok_or_else(|| p.missing("password"))?;
    let host = host_or_error(ctx, &host_id).await?;
    let password_enc = ctx.core.key().encrypt(&password).map_err(|e| cs(e.into()))?;
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let prev = hostha::oob_fetch(&mut c, &host_id).await.map_err(db)?;
    let o = Oob {
        host_id: host_id.clone(),
        driver,
        address,
        port,
        username,
        password_enc,
        enabled: prev.as_ref().is_some_and(|o| o.enabled),
        power_state: prev.map(|o| o.power_state).unwrap_or_else(|| "Unknown".into()),
    };
    hostha::oob_upsert(&mut c, &o).await.map_err(db)?;
    record(
        ctx,
        &mut c,
        &host.id,
        format!("Out-of-band management of host {} configured ({}:{})", host.name, o.address, o.port),
    )
    .await?;
    Ok(Reply::Obj(json!({ "outofbandmanagement": oob_json(&host_id, Some(&o)) })))
}

/// `enableOutOfBandManagementForHost` / `disableOutOfBandManagementForHost`.
pub async fn enable_oob(ctx: &Ctx<'_>, enable: bool) -> HResult {
    let host_id = ctx.p.req_uuid("hostid")?;
    let host = host_or_error(ctx, &host_id).await?;
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    if !hostha::oob_set_enabled(&mut c, &host_id, enable).await.map_err(db)? {
        return Err(CsError::new(
            ErrorCode::ParamError,
            format!(
                "Out-of-band management is not configured for host {}: run configureOutOfBandManagement first",
                host.name
            ),
        ));
    }
    let word = if enable { "enabled" } else { "disabled" };
    record(ctx, &mut c, &host.id, format!("Out-of-band management of host {} {word}", host.name)).await?;
    let o = hostha::oob_fetch(&mut c, &host_id).await.map_err(db)?;
    Ok(Reply::Obj(json!({ "outofbandmanagement": oob_json(&host_id, o.as_ref()) })))
}

async fn record(ctx: &Ctx<'_>, c: &mut skyhold_db::Conn, host_id: &str, text: String) -> Result<(), CsError> {
    let owner = ctx.caller.owner();
    skyhold_core::events::record(c, &owner, "HOST.OOBM.CONFIGURE", "INFO", text, Some(("Host", host_id)))
        .await
        .map_err(cs)
}

/// `migrateVirtualMachine virtualmachineid [hostid]` (admin): live migration within the VM's
/// cluster.
pub async fn migrate(ctx: &Ctx<'_>) -> HResult {
    let vm = ctx.p.req_uuid("virtualmachineid")?;
    let host = ctx.p.uuid("hostid")?;
    let params = json!({ "hostid": host });
    let job_id = ctx.core.vm_queue_job(ctx.caller, &vm, skyhold_core::vm::cmd::MIGRATE, params).await.map_err(cs)?;
    Ok(Reply::Async { job_id, id: None })
}

/// `prepareHostForMaintenance id` / `cancelHostMaintenance id` (admin).
pub async fn host_job(ctx: &Ctx<'_>, cmd: &'static str) -> HResult {
    let id = ctx.p.req_uuid("id")?;
    let job_id = ctx.core.host_queue_job(ctx.caller, &id, cmd).await.map_err(cs)?;
    Ok(Reply::Async { job_id, id: None })
}
