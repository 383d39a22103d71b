//! VM commands.

use super::{Ctx, HResult, cs};
use crate::reply::Reply;
use serde_json::{Value, json};
use skyhold_core::vm::{DeployRequest, cmd};
use skyhold_db::vm::{VmFilter, VolumeFilter};
use skyhold_types::VmState;
use skyhold_types::time::cs_date;

pub async fn deploy(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let req = DeployRequest {
        zone_id: p.req_uuid("zoneid")?,
        template_id: p.req_uuid("templateid")?,
        offering_id: p.req_uuid("serviceofferingid")?,
        name: p.text("name", 63)?,
        display_name: p.text("displayname", 255)?,
        host_id: p.uuid("hostid")?,
        start: p.bool("startvm")?.unwrap_or(true),
        ha_enable: None,
    };
    let (vm_id, job_id) = ctx.core.vm_deploy(ctx.caller, req).await.map_err(cs)?;
    Ok(Reply::Async { job_id, id: Some(vm_id) })
}

async fn queue(ctx: &Ctx<'_>, command: &'static str, params: Value) -> HResult {
    let id = ctx.p.req_uuid("id")?;
    let job_id = ctx.core.vm_queue_job(ctx.caller, &id, command, params).await.map_err(cs)?;
    Ok(Reply::Async { job_id, id: None })
}

pub async fn start(ctx: &Ctx<'_>) -> HResult {
    let host = ctx.p.uuid("hostid")?;
    if host.is_some() && !ctx.caller.is_admin() {
        return Err(skyhold_types::CsError::new(
            skyhold_types::ErrorCode::AccountError,
            "only an administrator may choose the host",
        ));
    }
    queue(ctx, cmd::START, json!({ "hostid": host })).await
}

pub async fn stop(ctx: &Ctx<'_>) -> HResult {
    let forced = ctx.p.bool("forced")?.unwrap_or(false);
    queue(ctx, cmd::STOP, json!({ "forced": forced })).await
}

pub async fn reboot(ctx: &Ctx<'_>) -> HResult {
    queue(ctx, cmd::REBOOT, json!({})).await
}

pub async fn destroy(ctx: &Ctx<'_>) -> HResult {
    let expunge = ctx.p.bool("expunge")?.unwrap_or(false);
    queue(ctx, cmd::DESTROY, json!({ "expunge": expunge })).await
}

pub async fn expunge(ctx: &Ctx<'_>) -> HResult {
    queue(ctx, cmd::EXPUNGE, json!({})).await
}

pub async fn recover(ctx: &Ctx<'_>) -> HResult {
    let id = ctx.p.req_uuid("id")?;
    ctx.core.vm_recover(ctx.caller, &id).await.map_err(cs)?;
    let v = ctx.core.vm_render(ctx.caller, &id).await.map_err(cs)?;
    Ok(Reply::Obj(json!({ "virtualmachine": v })))
}

pub async fn update(ctx: &Ctx<'_>) -> HResult {
    let id = ctx.p.req_uuid("id")?;
    let display = ctx.p.text("displayname", 255)?;
    let ha = ctx.p.bool("haenable")?;
    ctx.core.vm_update(ctx.caller, &id, display.as_deref(), ha).await.map_err(cs)?;
    let v = ctx.core.vm_render(ctx.caller, &id).await.map_err(cs)?;
    Ok(Reply::Obj(json!({ "virtualmachine": v })))
}

pub async fn list(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let mut ids = p.uuid_list("ids")?;
    if let Some(id) = p.uuid("id")? {
        ids.push(id);
    }
    let state = match p.get("state") {
        None => None,
        Some(s) => Some(s.parse::<VmState>().map_err(|_| p.invalid("state", "not a VM state"))?.as_str().to_string()),
    };
    let account_id = match (p.get("account"), ctx.caller.is_admin()) {
        (Some(name), true) => {
            let accounts = admin_accounts(ctx).await?;
            Some(
                accounts
                    .into_iter()
                    .find(|(_, n)| n == name)
                    .map(|(id, _)| id)
                    .ok_or_else(|| p.invalid("account", "no such account"))?,
            )
        }
        _ => None,
    };
    let filter = VmFilter {
        ids,
        name: p.text("name", 255)?,
        state,
        zone_id: p.uuid("zoneid")?,
        host_id: p.uuid("hostid")?,
        keyword: p.keyword()?,
        account_id,
        domain_id: p.uuid("domainid")?,
    };
    let page = p.page(ctx.default_page_size())?;
    let (items, total) = ctx.core.vm_list(ctx.caller, filter, page).await.map_err(cs)?;
    Ok(Reply::list("virtualmachine", items, total))
}

async fn admin_accounts(ctx: &Ctx<'_>) -> Result<Vec<(String, String)>, skyhold_types::CsError> {
    let mut c = ctx.core.db().conn().await.map_err(|e| cs(e.into()))?;
    let users = skyhold_db::account::user_list(&mut c).await.map_err(|e| cs(e.into()))?;
    Ok(users.into_iter().map(|u| (u.account_id, u.account_name)).collect())
}

pub async fn list_volumes(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let f = VolumeFilter {
        id: p.uuid("id")?,
        vm_id: p.uuid("virtualmachineid")?,
        account_id: if ctx.caller.is_admin() { None } else { Some(ctx.caller.account_id.clone()) },
        zone_id: p.uuid("zoneid")?,
        vol_type: p.get("type").map(|t| t.to_uppercase()),
        keyword: p.keyword()?,
    };
    let page = p.page(ctx.default_page_size())?;
    let (vols, total) = {
        let mut c = ctx.core.db().conn().await.map_err(|e| cs(e.into()))?;
        skyhold_db::vm::volume_list(&mut c, &f, page).await.map_err(|e| cs(e.into()))?
    };
    let items = vols
        .iter()
        .map(|v| {
            json!({
                "id": v.id,
                "name": v.name,
                "zoneid": v.zone_id,
                "zonename": v.zone_name,
                "type": v.vol_type,
                "deviceid": 0,
                "virtualmachineid": v.vm_id,
                "vmname": v.vm_name,
                "vmdisplayname": v.vm_display_name,
                "vmstate": v.vm_state,
                "size": v.size_bytes,
                "created": cs_date(v.created_ms),
                "state": v.state,
                "account": v.account_name,
                "domainid": v.domain_id,
                "domain": v.domain_name,
                "storagetype": v.storage_type,
                "hypervisor": "Simulator",
                "templateid": v.template_id,
                "destroyed": false,
                "isextractable": false,
                "provisioningtype": "thin",
            })
        })
        .collect();
    Ok(Reply::list("volume", items, total))
}
