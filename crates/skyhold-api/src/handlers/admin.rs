//! Capabilities, API discovery, settings, events, management servers, domains/accounts/users.

use super::{Ctx, HResult, cs};
use crate::params::page_slice;
use crate::reply::Reply;
use serde_json::json;
use skyhold_db::DbError;
use skyhold_types::CsError;
use skyhold_types::settings::{setting_def, validate};
use skyhold_types::time::cs_date;

fn db(e: DbError) -> CsError {
    cs(e.into())
}

pub async fn list_capabilities(_ctx: &Ctx<'_>) -> HResult {
    Ok(Reply::Obj(json!({
        "capability": {
            "cloudstackversion": concat!("4.19.0-skyhold-", env!("CARGO_PKG_VERSION")),
            "securitygroupsenabled": false,
            "userpublictemplateenabled": true,
            "supportELB": "false",
            "projectinviterequired": false,
            "allowusercreateprojects": true,
            "customdiskofffering maxsize": 1024,
            "kvmsnapshotenabled": false,
            "allowuserviewdestroyedvm": true,
            "allowuserexpungerecovervm": false,
            "apilimitinterval": 1,
            "apilimitmax": -1,
            "dynamicrolesenabled": false,
            "defaultuipagesize": 20,
        }
    })))
}

pub async fn list_apis(ctx: &Ctx<'_>) -> HResult {
    let only = ctx.p.text("name", 255)?;
    let apis = crate::commands::list_apis(ctx.caller.is_admin(), only.as_deref());
    if only.is_some() && apis.is_empty() {
        return Err(ctx.p.invalid("name", "no such API"));
    }
    let n = apis.len() as i64;
    Ok(Reply::list("api", apis, n))
}

pub async fn list_configurations(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (name, category, kw) = (p.text("name", 255)?, p.text("category", 255)?, p.keyword()?);
    let items: Vec<_> = ctx
        .core
        .settings()
        .snapshot()
        .into_iter()
        .filter(|(d, _)| name.as_ref().is_none_or(|n| d.name == n))
        .filter(|(d, _)| category.as_ref().is_none_or(|c| d.category.eq_ignore_ascii_case(c)))
        .filter(|(d, _)| kw.as_ref().is_none_or(|k| d.name.contains(k.as_str())))
        .collect();
    let page = p.page(ctx.default_page_size())?;
    let total = items.len() as i64;
    let items = page_slice(items, page)
        .into_iter()
        .map(|(d, v)| {
            json!({
                "name": d.name,
                "value": v,
                "defaultvalue": d.default,
                "category": d.category,
                "description": d.description,
                "type": d.kind.type_name(),
                "isdynamic": true,
                "component": "management-server",
            })
        })
        .collect();
    Ok(Reply::list("configuration", items, total))
}

pub async fn update_configuration(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let name = p.req("name")?;
    let Some(def) = setting_def(name) else {
        return Err(CsError::param(format!("Configuration name {name} does not exist or is not a global setting")));
    };
    let raw = p.get("value").unwrap_or("");
    let value = if raw.is_empty() {
        def.default.to_string()
    } else {
        validate(def, raw).map_err(|e| p.invalid("value", &e))?
    };
    // The seed's warning: an ha.tag that no host carries makes HA fail silently at the worst
    // moment. Refuse it.
    if def.name == skyhold_types::settings::HA_TAG && !value.is_empty() {
        let mut c = ctx.core.db().conn().await.map_err(db)?;
        let hosts = skyhold_db::infra::host_list(&mut c).await.map_err(db)?;
        if !hosts.iter().any(|h| h.tags.split(',').any(|t| t == value)) {
            return Err(p.invalid(
                "value",
                &format!(
                    "no host carries the tag '{value}': HA restarts would have nowhere to go. Tag the HA hosts first \
                     (updateHost id=... hosttags={value})"
                ),
            ));
        }
    }
    // The heartbeat pair must keep self-fencing ahead of takeover.
    {
        use skyhold_types::settings::{CLUSTER_HEARTBEAT_INTERVAL as I, CLUSTER_HEARTBEAT_THRESHOLD as T};
        if def.name == I || def.name == T {
            let st = ctx.core.settings();
            let (mut interval, mut threshold) = (st.get_i64(I), st.get_i64(T));
            let v: i64 = value.parse().unwrap_or(0);
            if def.name == I {
                interval = v;
            } else {
                threshold = v;
            }
            skyhold_core::membership::validate_heartbeat(interval, threshold).map_err(|e| p.invalid("value", &e))?;
        }
    }
    let owner = ctx.caller.owner();
    let core = ctx.core;
    skyhold_db::retry_tx!(core.db(), |tx| {
        async {
            skyhold_db::config::config_set(&mut tx, def.name, &value).await?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "CONFIGURATION.VALUE.EDIT",
                "INFO",
                format!("Value of {} changed to {}", def.name, value),
                None,
            )
            .await?;
            Ok::<(), skyhold_core::CoreError>(())
        }
        .await
    })
    .map_err(cs)?;
    // This server applies it now; the others within their next settings poll.
    core.settings().refresh(core.db()).await.map_err(db)?;
    tracing::info!(setting = def.name, value = %value, "setting changed");
    Ok(Reply::Obj(json!({
        "configuration": {
            "name": def.name,
            "value": value,
            "defaultvalue": def.default,
            "category": def.category,
            "description": def.description,
            "type": def.kind.type_name(),
            "isdynamic": true,
        }
    })))
}

pub async fn list_events(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let f = skyhold_db::event::EventFilter {
        account_id: if ctx.caller.is_admin() { None } else { Some(ctx.caller.account_id.clone()) },
        event_type: p.text("type", 255)?,
        level: p.text("level", 32)?.map(|l| l.to_uppercase()),
        id: p.uuid("id")?,
        keyword: p.keyword()?,
    };
    let page = p.page(ctx.default_page_size())?;
    let (rows, total) = {
        let mut c = ctx.core.db().conn().await.map_err(db)?;
        skyhold_db::event::event_list(&mut c, &f, page).await.map_err(db)?
    };
    let items = rows
        .iter()
        .map(|r| {
            let e = &r.event;
            json!({
                "id": e.id,
                "username": r.username.clone().unwrap_or_else(|| "system".into()),
                "type": e.event_type,
                "level": e.level,
                "description": e.description,
                "account": r.account_name,
                "domainid": e.domain_id,
                "domain": r.domain_name,
                "created": cs_date(e.created_ms),
                "state": e.state,
                "resourceid": e.resource_id,
                "resourcetype": e.resource_type,
                "parentid": null,
            })
        })
        .collect();
    Ok(Reply::list("event", items, total))
}

pub async fn list_management_servers(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name) = (p.text("id", 64)?, p.text("name", 255)?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let list: Vec<_> = skyhold_db::ms::ms_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|m| id.as_ref().is_none_or(|i| &m.id == i))
        .filter(|m| name.as_ref().is_none_or(|n| &m.name == n))
        .collect();
    let mut items = Vec::new();
    for m in &list {
        let jobs = skyhold_db::job::job_count_running(&mut c, &m.id).await.map_err(db)?;
        let hosts = skyhold_db::infra::host_list(&mut c)
            .await
            .map_err(db)?
            .iter()
            .filter(|h| h.mgmt_server_id.as_deref() == Some(m.id.as_str()))
            .count();
        items.push(json!({
            "id": m.id,
            "name": m.name,
            "state": m.state,
            "version": m.version,
            "serviceip": m.service_ip,
            "ipaddress": m.service_ip,
            "runid": m.run_id,
            "lastserverstart": cs_date(m.started_ms),
            "lastheartbeat": cs_date(m.last_heartbeat_ms),
            "heartbeatagems": m.heartbeat_age_ms,
            "apiport": m.api_port,
            "agentport": m.agent_port,
            "clusterport": m.cluster_port,
            "agentcount": hosts,
            "runningjobs": jobs,
        }));
    }
    let page = p.page(ctx.default_page_size())?;
    let total = items.len() as i64;
    Ok(Reply::list("managementserver", page_slice(items, page), total))
}

pub async fn list_domains(ctx: &Ctx<'_>) -> HResult {
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let items: Vec<_> = skyhold_db::account::domain_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|d| ctx.caller.is_admin() || d.id == ctx.caller.domain_id)
        .map(|d| json!({ "id": d.id, "name": d.name, "path": if d.path == "/" { "ROOT".to_string() } else { d.path.clone() }, "level": 0, "haschild": false, "parentdomainid": d.parent_id }))
        .collect();
    let n = items.len() as i64;
    Ok(Reply::list("domain", items, n))
}

pub async fn list_accounts(ctx: &Ctx<'_>) -> HResult {
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let mut seen = std::collections::HashSet::new();
    let items: Vec<_> = skyhold_db::account::user_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|u| ctx.caller.is_admin() || u.account_id == ctx.caller.account_id)
        .filter(|u| seen.insert(u.account_id.clone()))
        .map(|u| {
            json!({
                "id": u.account_id,
                "name": u.account_name,
                "accounttype": u.account_type,
                "roletype": skyhold_types::AccountType::from_i64(u.account_type).role_name(),
                "domainid": u.domain_id,
                "domain": u.domain_name,
                "state": "enabled",
            })
        })
        .collect();
    let n = items.len() as i64;
    Ok(Reply::list("account", items, n))
}

pub async fn list_users(ctx: &Ctx<'_>) -> HResult {
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let items: Vec<_> = skyhold_db::account::user_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|u| ctx.caller.is_admin() || u.account_id == ctx.caller.account_id)
        .map(|u| {
            // The secret key is never listed; the API key identifies the user.
            json!({
                "id": u.id,
                "username": u.username,
                "firstname": u.firstname,
                "lastname": u.lastname,
                "email": u.email,
                "account": u.account_name,
                "accountid": u.account_id,
                "accounttype": u.account_type,
                "roletype": skyhold_types::AccountType::from_i64(u.account_type).role_name(),
                "domainid": u.domain_id,
                "domain": u.domain_name,
                "state": u.state,
                "created": cs_date(u.created_ms),
                "apikey": u.api_key,
            })
        })
        .collect();
    let n = items.len() as i64;
    Ok(Reply::list("user", items, n))
}

pub async fn list_regions(ctx: &Ctx<'_>) -> HResult {
    let ep = format!("http://{}:{}/client/", ctx.core.ms().service_ip, ctx.core.ms().api_port);
    Ok(Reply::list("region", vec![json!({ "id": 1, "name": "Local", "endpoint": ep })], 1))
}

/// `prepareForShutdown`, `cancelShutdown`, `readyForShutdown`: the target server follows its row
/// within one heartbeat interval (whichever server receives the call).
pub async fn shutdown(ctx: &Ctx<'_>) -> HResult {
    let id = ctx.p.req("managementserverid")?.to_string();
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let Some(ms) = skyhold_db::ms::ms_fetch(&mut c, &id).await.map_err(db)? else {
        return Err(CsError::param(format!("Unable to find management server with specified id {id}")));
    };
    match ctx.name {
        "prepareForShutdown" => {
            if ms.state == "Down" {
                return Err(CsError::param(format!("management server {id} is Down")));
            }
            skyhold_db::ms::ms_request_drain(&mut c, &id).await.map_err(db)?;
        }
        "cancelShutdown" => {
            skyhold_db::ms::ms_cancel_drain(&mut c, &id).await.map_err(db)?;
        }
        _ => {}
    }
    let ms = skyhold_db::ms::ms_fetch(&mut c, &id).await.map_err(db)?.unwrap_or(ms);
    let pending = skyhold_db::job::job_count_running(&mut c, &id).await.map_err(db)?;
    Ok(Reply::Obj(json!({
        "readyforshutdown": {
            "managementserverid": ms.id,
            "state": ms.state,
            "shutdowntriggered": matches!(ms.state.as_str(), "PreparingForShutdown" | "ReadyForShutdown"),
            "readyforshutdown": ms.state == "ReadyForShutdown",
            "pendingjobscount": pending,
        }
    })))
}
