//! Zones, pods, clusters, hosts, offerings, templates: small tables, filtered and paged in memory.

use super::{Ctx, HResult, cs};
use crate::params::page_slice;
use crate::reply::Reply;
use serde_json::{Value, json};
use skyhold_db::DbError;
use skyhold_db::infra::{Host, cluster_list, host_list, offering_list, pod_list, template_list, zone_list};
use skyhold_types::time::cs_date;
use skyhold_types::{CsError, ErrorCode, HostStatus};

fn db(e: DbError) -> CsError {
    cs(e.into())
}

fn matches_kw(kw: &Option<String>, fields: &[&str]) -> bool {
    match kw {
        None => true,
        Some(k) => {
            let k = k.to_lowercase();
            fields.iter().any(|f| f.to_lowercase().contains(&k))
        }
    }
}

/// Return the requested page of `items`, rendered, and the total.
fn paged<T>(ctx: &Ctx<'_>, key: &'static str, items: Vec<T>, render: impl Fn(&T) -> Value) -> HResult {
    let page = ctx.p.page(ctx.default_page_size())?;
    let total = items.len() as i64;
    let items: Vec<Value> = page_slice(items, page).iter().map(render).collect();
    Ok(Reply::list(key, items, total))
}

pub async fn list_zones(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name, kw) = (p.uuid("id")?, p.text("name", 255)?, p.keyword()?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let zones: Vec<_> = zone_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|z| id.as_ref().is_none_or(|i| &z.id == i))
        .filter(|z| name.as_ref().is_none_or(|n| &z.name == n))
        .filter(|z| matches_kw(&kw, &[&z.name, &z.description]))
        .filter(|z| ctx.caller.is_admin() || z.allocation_state == "Enabled")
        .collect();
    paged(ctx, "zone", zones, |z| {
        json!({
            "id": z.id,
            "name": z.name,
            "description": z.description,
            "dns1": z.dns1,
            "internaldns1": z.internal_dns1,
            "networktype": z.network_type,
            "allocationstate": z.allocation_state,
            "securitygroupsenabled": false,
            "localstorageenabled": true,
            "zonetoken": "",
            "dhcpprovider": "VirtualRouter",
            "tags": [],
        })
    })
}

pub async fn list_pods(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name, zone, kw) = (p.uuid("id")?, p.text("name", 255)?, p.uuid("zoneid")?, p.keyword()?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let zones = zone_list(&mut c).await.map_err(db)?;
    let pods: Vec<_> = pod_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|x| id.as_ref().is_none_or(|i| &x.id == i))
        .filter(|x| name.as_ref().is_none_or(|n| &x.name == n))
        .filter(|x| zone.as_ref().is_none_or(|z| &x.zone_id == z))
        .filter(|x| matches_kw(&kw, &[&x.name]))
        .collect();
    paged(ctx, "pod", pods, |x| {
        let zname = zones.iter().find(|z| z.id == x.zone_id).map(|z| z.name.as_str()).unwrap_or("");
        json!({
            "id": x.id,
            "name": x.name,
            "zoneid": x.zone_id,
            "zonename": zname,
            "gateway": x.gateway,
            "netmask": x.netmask,
            "startip": [x.start_ip],
            "endip": [x.end_ip],
            "allocationstate": x.allocation_state,
        })
    })
}

pub async fn list_clusters(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name, zone, pod, kw) =
        (p.uuid("id")?, p.text("name", 255)?, p.uuid("zoneid")?, p.uuid("podid")?, p.keyword()?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let zones = zone_list(&mut c).await.map_err(db)?;
    let pods = pod_list(&mut c).await.map_err(db)?;
    let clusters: Vec<_> = cluster_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|x| id.as_ref().is_none_or(|i| &x.id == i))
        .filter(|x| name.as_ref().is_none_or(|n| &x.name == n))
        .filter(|x| zone.as_ref().is_none_or(|z| &x.zone_id == z))
        .filter(|x| pod.as_ref().is_none_or(|z| &x.pod_id == z))
        .filter(|x| matches_kw(&kw, &[&x.name]))
        .collect();
    paged(ctx, "cluster", clusters, |x| {
        json!({
            "id": x.id,
            "name": x.name,
            "zoneid": x.zone_id,
            "zonename": zones.iter().find(|z| z.id == x.zone_id).map(|z| z.name.as_str()).unwrap_or(""),
            "podid": x.pod_id,
            "podname": pods.iter().find(|z| z.id == x.pod_id).map(|z| z.name.as_str()).unwrap_or(""),
            "hypervisortype": x.hypervisor,
            "clustertype": "CloudManaged",
            "allocationstate": x.allocation_state,
            "managedstate": "Managed",
        })
    })
}

/// A host as CloudStack shows it.
pub fn host_json(h: &Host, names: &Names) -> Value {
    let cpu_pct = if h.cpu_cores > 0 { h.used_cpu as f64 * 100.0 / h.cpu_cores as f64 } else { 0.0 };
    json!({
        "id": h.id,
        "name": h.name,
        "state": h.status,
        "type": "Routing",
        "ipaddress": h.ip,
        "zoneid": h.zone_id,
        "zonename": names.zone(&h.zone_id),
        "podid": h.pod_id,
        "podname": names.pod(&h.pod_id),
        "clusterid": h.cluster_id,
        "clustername": names.cluster(&h.cluster_id),
        "clustertype": "CloudManaged",
        "hypervisor": h.hypervisor,
        "cpunumber": h.cpu_cores,
        "cpuspeed": h.cpu_mhz,
        "cpuallocated": format!("{cpu_pct:.2}%"),
        "memorytotal": h.mem_mb * 1024 * 1024,
        "memoryallocated": h.used_mem_mb * 1024 * 1024,
        "resourcestate": h.resource_state,
        "managementserverid": h.mgmt_server_id,
        "lastpinged": h.last_ping_ms.map(cs_date),
        "created": cs_date(h.created_ms),
        "version": h.version,
        "hosttags": h.tags,
        "hahost": false,
        "hostha": { "haenable": true, "hastate": h.ha_state, "haprovider": "skyhold" },
        "islocalstorageactive": false,
        "events": "AgentConnected; AgentDisconnected; HostDown; Ping; PingTimeout; ShutdownRequested; StartAgentRebalance; ManagementServerDown",
    })
}

/// Names of zones, pods and clusters for rendering.
pub struct Names {
    zones: Vec<(String, String)>,
    pods: Vec<(String, String)>,
    clusters: Vec<(String, String)>,
}

impl Names {
    pub async fn load(ctx: &Ctx<'_>) -> Result<Names, CsError> {
        let mut c = ctx.core.db().conn().await.map_err(db)?;
        Ok(Names {
            zones: zone_list(&mut c).await.map_err(db)?.into_iter().map(|z| (z.id, z.name)).collect(),
            pods: pod_list(&mut c).await.map_err(db)?.into_iter().map(|z| (z.id, z.name)).collect(),
            clusters: cluster_list(&mut c).await.map_err(db)?.into_iter().map(|z| (z.id, z.name)).collect(),
        })
    }
    fn find<'a>(v: &'a [(String, String)], id: &str) -> &'a str {
        v.iter().find(|(i, _)| i == id).map(|(_, n)| n.as_str()).unwrap_or("")
    }
    fn zone(&self, id: &str) -> &str {
        Self::find(&self.zones, id)
    }
    fn pod(&self, id: &str) -> &str {
        Self::find(&self.pods, id)
    }
    fn cluster(&self, id: &str) -> &str {
        Self::find(&self.clusters, id)
    }
}

pub async fn list_hosts(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name, zone, pod, cluster, kw) =
        (p.uuid("id")?, p.text("name", 255)?, p.uuid("zoneid")?, p.uuid("podid")?, p.uuid("clusterid")?, p.keyword()?);
    let state = match p.get("state") {
        None => None,
        Some(s) => Some(s.parse::<HostStatus>().map_err(|_| p.invalid("state", "not a host state"))?),
    };
    if let Some(t) = p.get("type")
        && !t.eq_ignore_ascii_case("routing")
    {
        // Skyhold manages hypervisor ("Routing") hosts only: no other type exists.
        return Ok(Reply::list("host", Vec::new(), 0));
    }
    let names = Names::load(ctx).await?;
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let hosts: Vec<_> = host_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|x| id.as_ref().is_none_or(|i| &x.id == i))
        .filter(|x| name.as_ref().is_none_or(|n| &x.name == n))
        .filter(|x| zone.as_ref().is_none_or(|z| &x.zone_id == z))
        .filter(|x| pod.as_ref().is_none_or(|z| &x.pod_id == z))
        .filter(|x| cluster.as_ref().is_none_or(|z| &x.cluster_id == z))
        .filter(|x| state.is_none_or(|s| x.status == s.as_str()))
        .filter(|x| matches_kw(&kw, &[&x.name, &x.ip]))
        .collect();
    let oob = skyhold_db::hostha::oob_list(&mut c).await.map_err(db)?;
    paged(ctx, "host", hosts, |h| {
        let mut v = host_json(h, &names);
        v["outofbandmanagement"] = super::ha::oob_json(&h.id, oob.iter().find(|o| o.host_id == h.id));
        v
    })
}

pub async fn update_host(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let id = p.req_uuid("id")?;
    let state = match p.get("allocationstate") {
        None => None,
        Some(s) if s.eq_ignore_ascii_case("enable") || s.eq_ignore_ascii_case("enabled") => Some("Enabled"),
        Some(s) if s.eq_ignore_ascii_case("disable") || s.eq_ignore_ascii_case("disabled") => Some("Disabled"),
        Some(_) => return Err(p.invalid("allocationstate", "must be Enable or Disable")),
    };
    let tags = match p.text("hosttags", 255)? {
        None if p.given_empty("hosttags") => Some(String::new()),
        None => None,
        Some(t) => {
            let list: Vec<&str> = t.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
            if list
                .iter()
                .any(|x| x.len() > 64 || !x.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)))
            {
                return Err(p.invalid("hosttags", "tags are letters, digits, '-', '_' and '.', at most 64 each"));
            }
            Some(list.join(","))
        }
    };
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let Some(host) = skyhold_db::infra::host_fetch(&mut c, &id).await.map_err(db)? else {
        return Err(CsError::param(format!("Unable to find host with specified id {id}")));
    };
    if let Some(t) = &tags {
        skyhold_db::infra::host_set_tags(&mut c, &id, t).await.map_err(db)?;
        let owner = ctx.caller.owner();
        skyhold_core::events::record(
            &mut c,
            &owner,
            "HOST.UPDATE",
            "INFO",
            format!("Host {} tags set to '{t}'", host.name),
            Some(("Host", &id)),
        )
        .await
        .map_err(cs)?;
        // The seed's warning: an ha.tag no host carries makes HA fail silently. Say it loudly.
        let ha_tag = ctx.core.settings().get(skyhold_types::settings::HA_TAG);
        if !ha_tag.is_empty() {
            let carriers =
                host_list(&mut c).await.map_err(db)?.iter().filter(|h| h.tags.split(',').any(|x| x == ha_tag)).count();
            if carriers == 0 {
                skyhold_core::ha::raise_host_alert(
                    &mut c,
                    &host,
                    "HA.TAG.UNUSED",
                    &format!(
                        "No host carries the ha.tag '{ha_tag}' any more (host {} was the last): HA restarts have \
                         nowhere to go until a host is tagged or ha.tag is cleared",
                        host.name
                    ),
                )
                .await
                .map_err(cs)?;
            }
        }
    }
    if let Some(st) = state {
        if !matches!(host.resource_state.as_str(), "Enabled" | "Disabled") {
            return Err(CsError::new(
                ErrorCode::ParamError,
                format!(
                    "host {} is in resource state {}; its allocation state cannot change now",
                    host.name, host.resource_state
                ),
            ));
        }
        skyhold_db::infra::host_set_resource_state(&mut c, &id, st).await.map_err(db)?;
        let owner = ctx.caller.owner();
        skyhold_core::events::record(
            &mut c,
            &owner,
            "HOST.UPDATE",
            "INFO",
            format!("Host {} allocation state set to {st}", host.name),
            Some(("Host", &id)),
        )
        .await
        .map_err(cs)?;
    }
    drop(c);
    let names = Names::load(ctx).await?;
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let host = host_list(&mut c).await.map_err(db)?.into_iter().find(|h| h.id == id);
    let Some(host) = host else {
        return Err(CsError::param(format!("Unable to find host with specified id {id}")));
    };
    Ok(Reply::Obj(json!({ "host": host_json(&host, &names) })))
}

pub async fn list_service_offerings(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let (id, name, kw) = (p.uuid("id")?, p.text("name", 255)?, p.keyword()?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let offs: Vec<_> = offering_list(&mut c)
        .await
        .map_err(db)?
        .into_iter()
        .filter(|x| id.as_ref().is_none_or(|i| &x.id == i))
        .filter(|x| name.as_ref().is_none_or(|n| &x.name == n))
        .filter(|x| matches_kw(&kw, &[&x.name, &x.display_text]))
        .collect();
    paged(ctx, "serviceoffering", offs, |o| {
        json!({
            "id": o.id,
            "name": o.name,
            "displaytext": o.display_text,
            "cpunumber": o.cpu,
            "cpuspeed": o.cpu_mhz,
            "memory": o.mem_mb,
            "offerha": o.offer_ha,
            "storagetype": o.storage_type,
            "created": cs_date(o.created_ms),
            "limitcpuuse": false,
            "isvolatile": false,
            "issystem": false,
            "defaultuse": false,
            "iscustomized": false,
            "provisioningtype": "thin",
        })
    })
}

pub async fn list_templates(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let filter = p.req("templatefilter")?.to_lowercase();
    if !["featured", "self", "selfexecutable", "sharedexecutable", "executable", "community", "all"]
        .contains(&filter.as_str())
    {
        return Err(p.invalid(
            "templatefilter",
            "must be one of featured, self, selfexecutable, sharedexecutable, executable, community, all",
        ));
    }
    let (id, name, zone, kw) = (p.uuid("id")?, p.text("name", 255)?, p.uuid("zoneid")?, p.keyword()?);
    let mut c = ctx.core.db().conn().await.map_err(db)?;
    let zones = zone_list(&mut c).await.map_err(db)?;
    let caller = ctx.caller;
    let mut rows = Vec::new();
    for t in template_list(&mut c).await.map_err(db)? {
        let mine = t.account_id == caller.account_id;
        let keep = match filter.as_str() {
            "featured" => t.featured && t.is_public,
            "self" | "selfexecutable" => mine,
            "sharedexecutable" => false,
            "community" => t.is_public && !t.featured,
            "executable" => t.is_public || mine,
            _ => caller.is_admin() || t.is_public || mine,
        };
        if !keep
            || id.as_ref().is_some_and(|i| &t.id != i)
            || name.as_ref().is_some_and(|n| &t.name != n)
            || !matches_kw(&kw, &[&t.name])
        {
            continue;
        }
        // A cross-zone template is listed once per zone, as CloudStack does.
        for z in zones.iter().filter(|z| t.zone_id.as_ref().is_none_or(|tz| tz == &z.id)) {
            if zone.as_ref().is_some_and(|q| q != &z.id) {
                continue;
            }
            rows.push((t.clone(), z.id.clone(), z.name.clone()));
        }
    }
    paged(ctx, "template", rows, |(t, zid, zname)| {
        json!({
            "id": t.id,
            "name": t.name,
            "displaytext": t.display_text,
            "ispublic": t.is_public,
            "isfeatured": t.featured,
            "isready": true,
            "status": "Download Complete",
            "format": t.format,
            "hypervisor": t.hypervisor,
            "ostypename": t.os_type,
            "ostypeid": "",
            "zoneid": zid,
            "zonename": zname,
            "size": t.size_bytes,
            "created": cs_date(t.created_ms),
            "templatetype": "BUILTIN",
            "crossZones": t.zone_id.is_none(),
            "passwordenabled": false,
            "isextractable": false,
            "sshkeyenabled": false,
            "isdynamicallyscalable": false,
            "account": "system",
            "domain": "ROOT",
        })
    })
}

pub async fn list_hypervisors(_ctx: &Ctx<'_>) -> HResult {
    Ok(Reply::list("hypervisor", vec![json!({ "name": "Simulator" })], 1))
}
