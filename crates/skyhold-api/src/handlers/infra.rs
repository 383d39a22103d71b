//! Zones, pods, clusters, hosts, offerings, templates: small tables, filtered and paged in memory;
//! and the admin commands that build and edit zones, pods and clusters (`createZone`, `createPod`,
//! `addCluster`, `updateZone`, `updatePod`, `updateCluster`).

use super::{Ctx, HResult, cs};
use crate::params::{Params, page_slice};
use crate::reply::Reply;
use serde_json::{Value, json};
use skyhold_core::CoreError;
use skyhold_db::DbError;
use skyhold_db::infra::{
    Cluster, Host, Pod, Zone, cluster_list, host_list, offering_list, pod_list, template_list, zone_list,
};
use skyhold_types::time::cs_date;
use skyhold_types::{CsError, ErrorCode, HostStatus};
use std::net::Ipv4Addr;

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
    paged(ctx, "zone", zones, zone_json)
}

/// A zone as CloudStack shows it (`listZones`, `createZone`).
fn zone_json(z: &Zone) -> Value {
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
}

/// A pod as CloudStack shows it (`listPods`, `createPod`).
fn pod_json(x: &Pod, zone_name: &str) -> Value {
    json!({
        "id": x.id,
        "name": x.name,
        "zoneid": x.zone_id,
        "zonename": zone_name,
        "gateway": x.gateway,
        "netmask": x.netmask,
        "startip": [x.start_ip],
        "endip": [x.end_ip],
        "allocationstate": x.allocation_state,
    })
}

/// A cluster as CloudStack shows it (`listClusters`, `addCluster`).
fn cluster_json(x: &Cluster, zone_name: &str, pod_name: &str) -> Value {
    json!({
        "id": x.id,
        "name": x.name,
        "zoneid": x.zone_id,
        "zonename": zone_name,
        "podid": x.pod_id,
        "podname": pod_name,
        "hypervisortype": x.hypervisor,
        "clustertype": "CloudManaged",
        "allocationstate": x.allocation_state,
        "managedstate": "Managed",
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
        pod_json(x, zones.iter().find(|z| z.id == x.zone_id).map(|z| z.name.as_str()).unwrap_or(""))
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
        cluster_json(
            x,
            zones.iter().find(|z| z.id == x.zone_id).map(|z| z.name.as_str()).unwrap_or(""),
            pods.iter().find(|z| z.id == x.pod_id).map(|z| z.name.as_str()).unwrap_or(""),
        )
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

// ---- Creating zones, pods and clusters (admin) ----

/// Most addresses one pod may hold (one `pod_ip` row each; `pod_insert` enforces it too).
const POD_MAX_ADDRESSES: u64 = 65_536;

/// `allocationstate` of a new zone, pod or cluster (CloudStack's `Enabled` / `Disabled`).
fn allocation_state(p: &Params, default: &'static str) -> Result<&'static str, CsError> {
    Ok(given_allocation_state(p)?.unwrap_or(default))
}

/// `allocationstate` if given (the update commands).
fn given_allocation_state(p: &Params) -> Result<Option<&'static str>, CsError> {
    match p.get("allocationstate") {
        None => Ok(None),
        Some(s) if s.eq_ignore_ascii_case("enabled") => Ok(Some("Enabled")),
        Some(s) if s.eq_ignore_ascii_case("disabled") => Ok(Some("Disabled")),
        Some(_) => Err(p.invalid("allocationstate", "must be Enabled or Disabled")),
    }
}

/// A required name: 1-255 characters, no control characters, no surrounding spaces.
fn req_name(p: &Params, name: &str) -> Result<String, CsError> {
    let v = p.text(name, 255)?.ok_or_else(|| p.missing(name))?;
    if v.trim().is_empty() || v.trim() != v {
        return Err(p.invalid(name, "must not be blank or start or end with spaces"));
    }
    Ok(v)
}

/// An optional new name, checked as [`req_name`] checks a required one.
fn opt_name(p: &Params, name: &str) -> Result<Option<String>, CsError> {
    if p.get(name).is_none() {
        return Ok(None);
    }
    req_name(p, name).map(Some)
}

fn ipv4(p: &Params, name: &str) -> Result<Option<Ipv4Addr>, CsError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| p.invalid(name, "not an IPv4 address")),
    }
}

fn req_ipv4(p: &Params, name: &str) -> Result<Ipv4Addr, CsError> {
    ipv4(p, name)?.ok_or_else(|| p.missing(name))
}

/// A pod's checked addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PodRange {
    start: Ipv4Addr,
    end: Ipv4Addr,
}

/// Check a pod's network as CloudStack does: the netmask is a subnet mask, the range lies in the
/// gateway's subnet, start <= end, the gateway is outside the range; plus Skyhold's limits: no
/// network or broadcast address in the range, at most [`POD_MAX_ADDRESSES`] addresses. Without
/// `end`, the range runs to the subnet's last usable address (CloudStack's default).
/// Err: the parameter at fault and why.
fn pod_range(
    gateway: Ipv4Addr,
    netmask: Ipv4Addr,
    start: Ipv4Addr,
    end: Option<Ipv4Addr>,
) -> Result<PodRange, (&'static str, String)> {
    let mask = u32::from(netmask);
    let prefix = mask.leading_ones();
    if prefix + mask.trailing_zeros() != 32 {
        return Err(("netmask", "not a subnet mask (its one bits must be contiguous)".into()));
    }
    if !(1..=30).contains(&prefix) {
        return Err(("netmask", format!("a /{prefix} subnet has no room for a pod (use /1 to /30)")));
    }
    let net = u32::from(gateway) & mask;
    let bcast = net | !mask;
    let subnet = format!("{}/{prefix}", Ipv4Addr::from(net));
    let usable = |ip: u32| ip != net && ip != bcast;
    if !usable(u32::from(gateway)) {
        return Err(("gateway", format!("is the network or broadcast address of its subnet {subnet}")));
    }
    let (s, e) = (u32::from(start), end.map(u32::from).unwrap_or(bcast - 1));
    for (param, ip) in [("startip", s), ("endip", e)] {
        if ip & mask != net {
            return Err((param, format!("{} is not in the gateway's subnet {subnet}", Ipv4Addr::from(ip))));
        }
        if !usable(ip) {
            return Err((param, format!("{} is the network or broadcast address of {subnet}", Ipv4Addr::from(ip))));
        }
    }
    if s > e {
        return Err(("endip", format!("the range {start}-{} ends before it starts", Ipv4Addr::from(e))));
    }
    let count = u64::from(e - s) + 1;
    if count > POD_MAX_ADDRESSES {
        return Err((
            "endip",
            format!(
                "the range {start}-{} holds {count} addresses; a pod holds at most {POD_MAX_ADDRESSES}",
                Ipv4Addr::from(e)
            ),
        ));
    }
    if (s..=e).contains(&u32::from(gateway)) {
        return Err(("gateway", format!("{gateway} is inside the range {start}-{}", Ipv4Addr::from(e))));
    }
    Ok(PodRange { start, end: Ipv4Addr::from(e) })
}

/// The stored range of an existing pod, if it reads as one.
fn stored_range(p: &Pod) -> Option<(u32, u32)> {
    let s: Ipv4Addr = p.start_ip.parse().ok()?;
    let e: Ipv4Addr = p.end_ip.parse().ok()?;
    Some((u32::from(s), u32::from(e)))
}

pub async fn create_zone(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let name = req_name(p, "name")?;
    let network_type = match p.req("networktype")? {
        t if t.eq_ignore_ascii_case("basic") => "Basic",
        t if t.eq_ignore_ascii_case("advanced") => "Advanced",
        _ => return Err(p.invalid("networktype", "must be Basic or Advanced")),
    };
    let dns1 = req_ipv4(p, "dns1")?;
    let internal_dns1 = req_ipv4(p, "internaldns1")?;
    // CloudStack's optional extras: checked, but a Skyhold zone keeps one DNS of each kind and
    // no network domain.
    ipv4(p, "dns2")?;
    ipv4(p, "internaldns2")?;
    p.text("domain", 255)?;
    if p.get("domainid").is_some() {
        return Err(CsError::new(
            ErrorCode::Unsupported,
            "zones dedicated to a domain (domainid) are not supported: every zone is public",
        ));
    }
    if p.bool("securitygroupenabled")? == Some(true) {
        return Err(CsError::new(ErrorCode::Unsupported, "security groups are not supported (securitygroupenabled)"));
    }
    // CloudStack creates zones Disabled unless told otherwise: users see them once enabled.
    let state = allocation_state(p, "Disabled")?;
    let zone = Zone {
        id: uuid::Uuid::new_v4().to_string(),
        name,
        description: String::new(),
        network_type: network_type.into(),
        dns1: dns1.to_string(),
        internal_dns1: internal_dns1.to_string(),
        allocation_state: state.into(),
        created_ms: 0,
    };
    let taken =
        || CsError::param(format!("A zone with name {} already exists. Please specify a unique zone name.", zone.name));
    let owner = ctx.caller.owner();
    skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            match skyhold_db::infra::zone_find_by_name(&mut tx, &zone.name).await? {
                // A rerun after a lost COMMIT answer: the first attempt did commit.
                Some(z) if z.id == zone.id => return Ok(()),
                Some(_) => return Err(CoreError::Cs(taken())),
                None => {}
            }
            skyhold_db::infra::zone_insert(&mut tx, &zone)
                .await
                .map_err(|e| if e.is_unique_violation() { CoreError::Cs(taken()) } else { e.into() })?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "ZONE.CREATE",
                "INFO",
                format!("Zone {} created ({network_type}, {state})", zone.name),
                Some(("Zone", &zone.id)),
            )
            .await?;
            Ok::<(), CoreError>(())
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(zone = %zone.name, id = %zone.id, "zone created");
    Ok(Reply::Obj(json!({ "zone": zone_json(&zone) })))
}

pub async fn create_pod(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let name = req_name(p, "name")?;
    let zone_id = p.req_uuid("zoneid")?;
    let gateway = req_ipv4(p, "gateway")?;
    let netmask = req_ipv4(p, "netmask")?;
    let start = req_ipv4(p, "startip")?;
    let end = ipv4(p, "endip")?;
    let state = allocation_state(p, "Enabled")?;
    let range = pod_range(gateway, netmask, start, end).map_err(|(param, why)| {
        if p.get(param).is_some() {
            p.invalid(param, &why)
        } else {
            // endip left out: the range runs to the end of the subnet.
            CsError::param(format!(
                "Unable to execute API command {} due to invalid value: {why} (give endip to end it sooner)",
                p.cmd_lc
            ))
        }
    })?;
    let pod = Pod {
        id: uuid::Uuid::new_v4().to_string(),
        zone_id,
        name,
        gateway: gateway.to_string(),
        netmask: netmask.to_string(),
        start_ip: range.start.to_string(),
        end_ip: range.end.to_string(),
        allocation_state: state.into(),
        created_ms: 0,
    };
    let (s, e) = (u32::from(range.start), u32::from(range.end));
    let owner = ctx.caller.owner();
    let zone_name = skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            // The zone's row lock orders concurrent pod creations in it (name and range checks).
            let Some(zone) = skyhold_db::infra::zone_fetch_for_update(&mut tx, &pod.zone_id).await? else {
                return Err(CoreError::param(format!("Unable to find zone with specified id {}", pod.zone_id)));
            };
            let pods = skyhold_db::infra::pod_list_by_zone(&mut tx, &zone.id).await?;
            if pods.iter().any(|x| x.id == pod.id) {
                // A rerun after a lost COMMIT answer: the first attempt did commit.
                return Ok(zone.name);
            }
            if pods.iter().any(|x| x.name.to_lowercase() == pod.name.to_lowercase()) {
                return Err(CoreError::param(format!(
                    "A pod with name {} already exists in zone {}. Please specify a different pod name.",
                    pod.name, zone.name
                )));
            }
            if let Some(o) = pods.iter().find(|x| stored_range(x).is_some_and(|(os, oe)| s <= oe && os <= e)) {
                return Err(CoreError::param(format!(
                    "The range {}-{} overlaps the range {}-{} of pod {} in zone {}",
                    pod.start_ip, pod.end_ip, o.start_ip, o.end_ip, o.name, zone.name
                )));
            }
            skyhold_db::infra::pod_insert(&mut tx, &pod).await?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "POD.CREATE",
                "INFO",
                format!(
                    "Pod {} created in zone {} with addresses {}-{} ({state})",
                    pod.name, zone.name, pod.start_ip, pod.end_ip
                ),
                Some(("Pod", &pod.id)),
            )
            .await?;
            Ok::<String, CoreError>(zone.name)
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(pod = %pod.name, id = %pod.id, zone = %zone_name, "pod created");
    Ok(Reply::Obj(json!({ "pod": pod_json(&pod, &zone_name) })))
}

/// CloudStack's `addCluster` (there is no `createCluster`): answers a list of one cluster.
pub async fn add_cluster(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let name = req_name(p, "clustername")?;
    match p.req("clustertype")? {
        t if t.eq_ignore_ascii_case("cloudmanaged") => {}
        t if t.eq_ignore_ascii_case("externalmanaged") => {
            return Err(
                p.invalid("clustertype", "ExternalManaged (vCenter) clusters are not supported; use CloudManaged")
            );
        }
        _ => return Err(p.invalid("clustertype", "must be CloudManaged or ExternalManaged")),
    }
    let hypervisor = p.req("hypervisor")?;
    if !hypervisor.eq_ignore_ascii_case("simulator") {
        return Err(p.invalid("hypervisor", "Skyhold manages Simulator hosts only"));
    }
    let pod_id = p.req_uuid("podid")?;
    let zone_id = p.req_uuid("zoneid")?;
    let state = allocation_state(p, "Enabled")?;
    let cluster = Cluster {
        id: uuid::Uuid::new_v4().to_string(),
        zone_id,
        pod_id,
        name,
        hypervisor: "Simulator".into(),
        allocation_state: state.into(),
        created_ms: 0,
    };
    let owner = ctx.caller.owner();
    let (zone_name, pod_name) = skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            let zones = zone_list(&mut tx).await?;
            let Some(zone) = zones.iter().find(|z| z.id == cluster.zone_id) else {
                return Err(CoreError::param(format!("Unable to find zone with specified id {}", cluster.zone_id)));
            };
            // The pod's row lock orders concurrent cluster creations in it (name check).
            let Some(pod) = skyhold_db::infra::pod_fetch_for_update(&mut tx, &cluster.pod_id).await? else {
                return Err(CoreError::param(format!("Unable to find pod with specified id {}", cluster.pod_id)));
            };
            if pod.zone_id != zone.id {
                return Err(CoreError::param(format!(
                    "Pod {} ({}) does not belong to zone {} ({})",
                    pod.name, pod.id, zone.name, zone.id
                )));
            }
            match skyhold_db::infra::cluster_find_by_name(&mut tx, &pod.id, &cluster.name).await? {
                // A rerun after a lost COMMIT answer: the first attempt did commit.
                Some(c) if c.id == cluster.id => return Ok((zone.name.clone(), pod.name)),
                Some(_) => {
                    return Err(CoreError::param(format!(
                        "A cluster with name {} already exists in pod {}",
                        cluster.name, pod.name
                    )));
                }
                None => {}
            }
            skyhold_db::infra::cluster_insert(&mut tx, &cluster).await?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "CLUSTER.CREATE",
                "INFO",
                format!("Cluster {} created in pod {} of zone {} ({state})", cluster.name, pod.name, zone.name),
                Some(("Cluster", &cluster.id)),
            )
            .await?;
            Ok::<(String, String), CoreError>((zone.name.clone(), pod.name))
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(cluster = %cluster.name, id = %cluster.id, pod = %pod_name, "cluster created");
    Ok(Reply::list("cluster", vec![cluster_json(&cluster, &zone_name, &pod_name)], 1))
}

// ---- Editing zones, pods and clusters (admin) ----

/// What an update changed, for its event ("name Zone2 -> Zone5, allocation state Disabled -> Enabled").
fn changes(fields: &[(&str, &str, &str)]) -> Vec<String> {
    fields.iter().filter(|(_, a, b)| a != b).map(|(what, a, b)| format!("{what} {a} -> {b}")).collect()
}

/// Refuse, with a 432, a parameter of CloudStack's update commands that Skyhold cannot honour.
fn unsupported(p: &Params, params: &[(&str, &str)]) -> Result<(), CsError> {
    match params.iter().find(|(name, _)| p.get(name).is_some()) {
        Some((name, why)) => Err(CsError::new(ErrorCode::Unsupported, format!("{name} is not supported: {why}"))),
        None => Ok(()),
    }
}

/// CloudStack's `updateZone`: name, allocation state (a zone created Disabled is enabled here),
/// `dns1`, `internaldns1`. One transaction with a ZONE.EDIT event when something changed.
pub async fn update_zone(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let id = p.req_uuid("id")?;
    let name = opt_name(p, "name")?;
    let state = given_allocation_state(p)?;
    let dns1 = ipv4(p, "dns1")?;
    let internal_dns1 = ipv4(p, "internaldns1")?;
    // What a Skyhold zone does not hold is refused, not silently dropped.
    const ONE_DNS: &str = "a Skyhold zone has one DNS server and one internal DNS server (dns1, internaldns1)";
    unsupported(
        p,
        &[
            ("dns2", ONE_DNS),
            ("internaldns2", ONE_DNS),
            ("ip6dns1", "zones have no IPv6 DNS servers"),
            ("ip6dns2", "zones have no IPv6 DNS servers"),
            ("domain", "zones have no network domain"),
            ("dnssearchorder", "zones have no DNS search order"),
            ("guestcidraddress", "zones have no guest CIDR (guest addresses come from the pods' ranges)"),
        ],
    )?;
    if let Some(d) = p.get("dhcpprovider")
        && !d.eq_ignore_ascii_case("virtualrouter")
    {
        return Err(CsError::new(ErrorCode::Unsupported, "dhcpprovider is not supported: it is always VirtualRouter"));
    }
    if p.bool("localstorageenabled")? == Some(false) {
        return Err(CsError::new(
            ErrorCode::Unsupported,
            "localstorageenabled=false is not supported: local storage is always enabled",
        ));
    }
    // Every zone is public already (CloudStack's ispublic only turns a private zone public).
    p.bool("ispublic")?;
    let owner = ctx.caller.owner();
    let zone = skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            let Some(mut zone) = skyhold_db::infra::zone_fetch_for_update(&mut tx, &id).await? else {
                return Err(CoreError::param(format!("Unable to find zone with specified id {id}")));
            };
            let taken = |n: &str| {
                CoreError::param(format!("A zone with name {n} already exists. Please specify a unique zone name."))
            };
            if let Some(n) = &name
                && let Some(other) = skyhold_db::infra::zone_find_by_name(&mut tx, n).await?
                && other.id != zone.id
            {
                return Err(taken(n));
            }
            let before = zone.clone();
            if let Some(n) = &name {
                zone.name = n.clone();
            }
            if let Some(s) = state {
                zone.allocation_state = s.into();
            }
            if let Some(d) = dns1 {
                zone.dns1 = d.to_string();
            }
            if let Some(d) = internal_dns1 {
                zone.internal_dns1 = d.to_string();
            }
            let changed = changes(&[
                ("name", &before.name, &zone.name),
                ("allocation state", &before.allocation_state, &zone.allocation_state),
                ("dns1", &before.dns1, &zone.dns1),
                ("internaldns1", &before.internal_dns1, &zone.internal_dns1),
            ]);
            // Nothing to change (or a rerun after a lost COMMIT answer): no write, no event.
            if changed.is_empty() {
                return Ok(zone);
            }
            skyhold_db::infra::zone_update(&mut tx, &zone)
                .await
                .map_err(|e| if e.is_unique_violation() { taken(&zone.name) } else { e.into() })?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "ZONE.EDIT",
                "INFO",
                format!("Zone {} updated: {}", zone.name, changed.join(", ")),
                Some(("Zone", &zone.id)),
            )
            .await?;
            Ok::<Zone, CoreError>(zone)
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(zone = %zone.name, id = %zone.id, state = %zone.allocation_state, "zone updated");
    Ok(Reply::Obj(json!({ "zone": zone_json(&zone) })))
}

/// CloudStack's `updatePod`: name and allocation state. The address range cannot change (VMs
/// hold addresses from it): `gateway`, `netmask`, `startip`, `endip` are accepted only with the
/// pod's current values. One transaction with a POD.EDIT event when something changed.
pub async fn update_pod(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let id = p.req_uuid("id")?;
    let name = opt_name(p, "name")?;
    let state = given_allocation_state(p)?;
    let mut network = Vec::new();
    for param in ["gateway", "netmask", "startip", "endip"] {
        if let Some(ip) = ipv4(p, param)? {
            network.push((param, ip.to_string()));
        }
    }
    let owner = ctx.caller.owner();
    let (pod, zone_name) = skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            let not_found = || CoreError::param(format!("Unable to find pod with specified id {id}"));
            let Some(mut pod) = skyhold_db::infra::pod_fetch_for_update(&mut tx, &id).await? else {
                return Err(not_found());
            };
            // The zone's row lock orders this rename with pod creations and renames in the zone
            // (the lock `createPod` takes; nothing holds it while waiting for a pod row).
            let Some(zone) = skyhold_db::infra::zone_fetch_for_update(&mut tx, &pod.zone_id).await? else {
                return Err(not_found());
            };
            for (param, ip) in &network {
                let current = match *param {
                    "gateway" => &pod.gateway,
                    "netmask" => &pod.netmask,
                    "startip" => &pod.start_ip,
                    _ => &pod.end_ip,
                };
                if ip != current {
                    return Err(CoreError::Cs(CsError::new(
                        ErrorCode::Unsupported,
                        format!(
                            "{param} is not supported: the address range of pod {} ({} to {}, gateway {}, netmask {}) \
                             cannot change; create another pod",
                            pod.name, pod.start_ip, pod.end_ip, pod.gateway, pod.netmask
                        ),
                    )));
                }
            }
            if let Some(n) = &name {
                let siblings = skyhold_db::infra::pod_list_by_zone(&mut tx, &zone.id).await?;
                if siblings.iter().any(|x| x.id != pod.id && x.name.to_lowercase() == n.to_lowercase()) {
                    return Err(CoreError::param(format!(
                        "A pod with name {n} already exists in zone {}. Please specify a different pod name.",
                        zone.name
                    )));
                }
            }
            let before = pod.clone();
            if let Some(n) = &name {
                pod.name = n.clone();
            }
            if let Some(s) = state {
                pod.allocation_state = s.into();
            }
            let changed = changes(&[
                ("name", &before.name, &pod.name),
                ("allocation state", &before.allocation_state, &pod.allocation_state),
            ]);
            // Nothing to change (or a rerun after a lost COMMIT answer): no write, no event.
            if changed.is_empty() {
                return Ok((pod, zone.name));
            }
            skyhold_db::infra::pod_update(&mut tx, &pod).await?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "POD.EDIT",
                "INFO",
                format!("Pod {} of zone {} updated: {}", pod.name, zone.name, changed.join(", ")),
                Some(("Pod", &pod.id)),
            )
            .await?;
            Ok::<(Pod, String), CoreError>((pod, zone.name))
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(pod = %pod.name, id = %pod.id, state = %pod.allocation_state, "pod updated");
    Ok(Reply::Obj(json!({ "pod": pod_json(&pod, &zone_name) })))
}

/// CloudStack's `updateCluster`: `clustername` and allocation state; `hypervisor`, `clustertype`
/// and `managedstate` are accepted with the only values a Skyhold cluster has (Simulator,
/// CloudManaged, Managed). One transaction with a CLUSTER.EDIT event when something changed
/// (CloudStack records no event here; Skyhold's pairs with its CLUSTER.CREATE).
pub async fn update_cluster(ctx: &Ctx<'_>) -> HResult {
    let p = ctx.p;
    let id = p.req_uuid("id")?;
    let name = opt_name(p, "clustername")?;
    let state = given_allocation_state(p)?;
    if let Some(h) = p.get("hypervisor")
        && !h.eq_ignore_ascii_case("simulator")
    {
        return Err(p.invalid("hypervisor", "Skyhold manages Simulator hosts only"));
    }
    match p.get("clustertype") {
        None => {}
        Some(t) if t.eq_ignore_ascii_case("cloudmanaged") => {}
        Some(t) if t.eq_ignore_ascii_case("externalmanaged") => {
            return Err(
                p.invalid("clustertype", "ExternalManaged (vCenter) clusters are not supported; use CloudManaged")
            );
        }
        Some(_) => return Err(p.invalid("clustertype", "must be CloudManaged or ExternalManaged")),
    }
    match p.get("managedstate") {
        None => {}
        Some(m) if m.eq_ignore_ascii_case("managed") => {}
        Some(m) if m.eq_ignore_ascii_case("unmanaged") => {
            return Err(CsError::new(
                ErrorCode::Unsupported,
                "managedstate=Unmanaged is not supported: a Skyhold cluster is always Managed (to keep VMs off it, \
                 set allocationstate=Disabled)",
            ));
        }
        Some(_) => return Err(p.invalid("managedstate", "must be Managed or Unmanaged")),
    }
    let owner = ctx.caller.owner();
    let (cluster, zone_name, pod_name) = skyhold_db::retry_tx!(ctx.core.db(), |tx| {
        async {
            let not_found = || CoreError::param(format!("Unable to find cluster with specified id {id}"));
            let Some(mut cluster) = skyhold_db::infra::cluster_fetch_for_update(&mut tx, &id).await? else {
                return Err(not_found());
            };
            // The pod's row lock orders this rename with cluster creations and renames in the pod
            // (the lock `addCluster` takes; nothing holds it while waiting for a cluster row).
            let Some(pod) = skyhold_db::infra::pod_fetch_for_update(&mut tx, &cluster.pod_id).await? else {
                return Err(not_found());
            };
            if let Some(n) = &name
                && let Some(other) = skyhold_db::infra::cluster_find_by_name(&mut tx, &pod.id, n).await?
                && other.id != cluster.id
            {
                return Err(CoreError::param(format!("A cluster with name {n} already exists in pod {}", pod.name)));
            }
            let zone_name = zone_list(&mut tx)
                .await?
                .into_iter()
                .find(|z| z.id == cluster.zone_id)
                .map(|z| z.name)
                .unwrap_or_default();
            let before = cluster.clone();
            if let Some(n) = &name {
                cluster.name = n.clone();
            }
            if let Some(s) = state {
                cluster.allocation_state = s.into();
            }
            let changed = changes(&[
                ("name", &before.name, &cluster.name),
                ("allocation state", &before.allocation_state, &cluster.allocation_state),
            ]);
            // Nothing to change (or a rerun after a lost COMMIT answer): no write, no event.
            if changed.is_empty() {
                return Ok((cluster, zone_name, pod.name));
            }
            skyhold_db::infra::cluster_update(&mut tx, &cluster).await?;
            skyhold_core::events::record(
                &mut tx,
                &owner,
                "CLUSTER.EDIT",
                "INFO",
                format!(
                    "Cluster {} in pod {} of zone {} updated: {}",
                    cluster.name,
                    pod.name,
                    zone_name,
                    changed.join(", ")
                ),
                Some(("Cluster", &cluster.id)),
            )
            .await?;
            Ok::<(Cluster, String, String), CoreError>((cluster, zone_name, pod.name))
        }
        .await
    })
    .map_err(cs)?;
    tracing::info!(cluster = %cluster.name, id = %cluster.id, state = %cluster.allocation_state, "cluster updated");
    Ok(Reply::Obj(json!({ "cluster": cluster_json(&cluster, &zone_name, &pod_name) })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn range(gw: &str, mask: &str, start: &str, end: Option<&str>) -> Result<(String, String), &'static str> {
        pod_range(ip(gw), ip(mask), ip(start), end.map(ip))
            .map(|r| (r.start.to_string(), r.end.to_string()))
            .map_err(|(param, _)| param)
    }

    #[test]
    fn pod_ranges() {
        let ok = |s: &str, e: &str| Ok((s.to_string(), e.to_string()));
        // Given, and defaulted to the subnet's last usable address.
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.10", Some("10.2.0.20")), ok("10.2.0.10", "10.2.0.20"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.10", None), ok("10.2.0.10", "10.2.0.254"));
        assert_eq!(range("10.1.0.1", "255.255.192.0", "10.1.0.10", None), ok("10.1.0.10", "10.1.63.254"));
        // A single address.
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.9", Some("10.2.0.9")), ok("10.2.0.9", "10.2.0.9"));
        // Refusals name the parameter.
        assert_eq!(range("10.2.0.1", "255.0.255.0", "10.2.0.10", None), Err("netmask"));
        assert_eq!(range("10.2.0.1", "255.255.255.255", "10.2.0.1", None), Err("netmask"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.3.0.10", None), Err("startip"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.10", Some("10.2.1.10")), Err("endip"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.20", Some("10.2.0.10")), Err("endip"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.0", Some("10.2.0.10")), Err("startip"));
        assert_eq!(range("10.2.0.1", "255.255.255.0", "10.2.0.10", Some("10.2.0.255")), Err("endip"));
        assert_eq!(range("10.2.0.5", "255.255.255.0", "10.2.0.1", Some("10.2.0.10")), Err("gateway"));
        assert_eq!(range("10.2.0.0", "255.255.255.0", "10.2.0.10", None), Err("gateway"));
        // At most 65536 addresses: a /16 fits, a /15 by default does not.
        assert!(range("10.0.0.1", "255.254.0.0", "10.0.0.2", Some("10.0.255.255")).is_ok());
        assert_eq!(range("10.0.0.1", "255.254.0.0", "10.0.0.2", None), Err("endip"));
        assert_eq!(range("10.0.0.1", "255.0.0.0", "10.0.0.2", Some("10.1.0.2")), Err("endip"));
    }
}
