//! Zones, pods (with their IP ranges), clusters, hosts, service offerings and templates.

use crate::{Ctx, DbError, Sql, get_bool, get_i64, get_opt_i64, get_opt_str, get_str, sql};
use std::net::Ipv4Addr;

#[derive(Debug, Clone)]
pub struct Zone {
    pub id: String,
    pub name: String,
    pub description: String,
    pub network_type: String,
    pub dns1: String,
    pub internal_dns1: String,
    pub allocation_state: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub gateway: String,
    pub netmask: String,
    pub start_ip: String,
    pub end_ip: String,
    pub allocation_state: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub id: String,
    pub zone_id: String,
    pub pod_id: String,
    pub name: String,
    pub hypervisor: String,
    pub allocation_state: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub id: String,
    pub guid: String,
    pub name: String,
    pub zone_id: String,
    pub pod_id: String,
    pub cluster_id: String,
    pub ip: String,
    pub hypervisor: String,
    pub cpu_cores: i64,
    pub cpu_mhz: i64,
    pub mem_mb: i64,
    pub status: String,
    pub resource_state: String,
    pub mgmt_server_id: Option<String>,
    pub owner_gen: i64,
    pub agent_id: String,
    pub version: String,
    pub tags: String,
    pub last_ping_ms: Option<i64>,
    pub created_ms: i64,
    /// Host HA state (see `hostha`), since when (database time).
    pub ha_state: String,
    pub ha_since_ms: i64,
    /// Where neighbours check this host's network (from its agent).
    pub check_addr: String,
    /// Last storage heartbeat counter seen, and the database time it last advanced (0: never).
    pub hb_counter: i64,
    pub hb_seen_ms: i64,
    /// Database time its agent's connection was lost (0 while connected).
    pub disconnected_ms: i64,
    /// Capacity in use by VMs placed on the host (filled by [`host_list`]).
    pub used_cpu: i64,
    pub used_mem_mb: i64,
    pub vm_count: i64,
    /// Allocation state of the host's pod and cluster (`Enabled`/`Disabled`), read with the host.
    pub pod_state: String,
    pub cluster_state: String,
}

#[derive(Debug, Clone)]
pub struct Offering {
    pub id: String,
    pub name: String,
    pub display_text: String,
    pub cpu: i64,
    pub cpu_mhz: i64,
    pub mem_mb: i64,
    pub offer_ha: bool,
    pub storage_type: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub display_text: String,
    pub os_type: String,
    pub hypervisor: String,
    pub format: String,
    pub size_bytes: i64,
    pub zone_id: Option<String>,
    pub is_public: bool,
    pub featured: bool,
    pub account_id: String,
    pub created_ms: i64,
}

pub async fn zone_insert(c: &mut dyn Sql, z: &Zone) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO zone (id, name, description, network_type, dns1, internal_dns1, allocation_state, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&z.id)
    .bind(&z.name)
    .bind(&z.description)
    .bind(&z.network_type)
    .bind(&z.dns1)
    .bind(&z.internal_dns1)
    .bind(&z.allocation_state)
    .execute(conn)
    .await
    .ctx("insert zone")?;
    Ok(())
}

pub async fn zone_list(c: &mut dyn Sql) -> Result<Vec<Zone>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT id, name, description, network_type, dns1, internal_dns1, allocation_state, created_ms \
         FROM zone ORDER BY created_ms, name",
    )
    .fetch_all(conn)
    .await
    .ctx("list zones")?;
    rows.iter().map(zone_from_row).collect()
}

const ZONE_COLS: &str = "id, name, description, network_type, dns1, internal_dns1, allocation_state, created_ms";

fn zone_from_row(r: &crate::AnyRow) -> Result<Zone, DbError> {
    Ok(Zone {
        id: get_str(r, "id")?,
        name: get_str(r, "name")?,
        description: get_str(r, "description")?,
        network_type: get_str(r, "network_type")?,
        dns1: get_str(r, "dns1")?,
        internal_dns1: get_str(r, "internal_dns1")?,
        allocation_state: get_str(r, "allocation_state")?,
        created_ms: get_i64(r, "created_ms")?,
    })
}

/// One zone, its row locked (MySQL) for the rest of the transaction, so pods created in it
/// concurrently are checked (unique name, no overlapping range) one after the other.
pub async fn zone_fetch_for_update(c: &mut dyn Sql, id: &str) -> Result<Option<Zone>, DbError> {
    let (conn, dl) = c.parts();
    let q = sql(dl, &format!("SELECT {ZONE_COLS} FROM zone WHERE id = ? {{for_update}}")).into_owned();
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch zone")?;
    row.as_ref().map(zone_from_row).transpose()
}

/// The zone with this name, compared case-insensitively (zone names are unique).
pub async fn zone_find_by_name(c: &mut dyn Sql, name: &str) -> Result<Option<Zone>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("SELECT {ZONE_COLS} FROM zone WHERE LOWER(name) = LOWER(?) LIMIT 1");
    let row = sqlx::query(&q).bind(name).fetch_optional(conn).await.ctx("find zone by name")?;
    row.as_ref().map(zone_from_row).transpose()
}

/// Write a zone's editable fields (`updateZone`): name, DNS, allocation state. False if no row changed.
pub async fn zone_update(c: &mut dyn Sql, z: &Zone) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE zone SET name = ?, dns1 = ?, internal_dns1 = ?, allocation_state = ? WHERE id = ?")
        .bind(&z.name)
        .bind(&z.dns1)
        .bind(&z.internal_dns1)
        .bind(&z.allocation_state)
        .bind(&z.id)
        .execute(conn)
        .await
        .ctx("update zone")?
        .rows_affected();
    Ok(n == 1)
}

/// Insert a pod and its IP range (one `pod_ip` row per address), in the caller's transaction.
pub async fn pod_insert(c: &mut dyn Sql, p: &Pod) -> Result<(), DbError> {
    let start: Ipv4Addr =
        p.start_ip.parse().map_err(|_| DbError::Corrupt(format!("bad pod start ip {}", p.start_ip)))?;
    let end: Ipv4Addr = p.end_ip.parse().map_err(|_| DbError::Corrupt(format!("bad pod end ip {}", p.end_ip)))?;
    let (s, e) = (u32::from(start) as i64, u32::from(end) as i64);
    if e < s || e - s > 65_535 {
        return Err(DbError::Corrupt("pod IP range must hold 1 to 65536 addresses".into()));
    }
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO pod (id, zone_id, name, gateway, netmask, start_ip, end_ip, allocation_state, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&p.id)
    .bind(&p.zone_id)
    .bind(&p.name)
    .bind(&p.gateway)
    .bind(&p.netmask)
    .bind(&p.start_ip)
    .bind(&p.end_ip)
    .bind(&p.allocation_state)
    .execute(&mut *conn)
    .await
    .ctx("insert pod")?;
    let mut n = s;
    while n <= e {
        let chunk_end = (n + 299).min(e);
        let q = format!(
            "INSERT INTO pod_ip (pod_id, ip_num, ip) VALUES {}",
            vec!["(?, ?, ?)"; (chunk_end - n + 1) as usize].join(",")
        );
        let mut qq = sqlx::query(&q);
        for i in n..=chunk_end {
            qq = qq.bind(p.id.as_str()).bind(i).bind(Ipv4Addr::from(i as u32).to_string());
        }
        qq.execute(&mut *conn).await.ctx("insert pod addresses")?;
        n = chunk_end + 1;
    }
    Ok(())
}

pub async fn pod_list(c: &mut dyn Sql) -> Result<Vec<Pod>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT id, zone_id, name, gateway, netmask, start_ip, end_ip, allocation_state, created_ms \
         FROM pod ORDER BY created_ms, name",
    )
    .fetch_all(conn)
    .await
    .ctx("list pods")?;
    rows.iter().map(pod_from_row).collect()
}

const POD_COLS: &str = "id, zone_id, name, gateway, netmask, start_ip, end_ip, allocation_state, created_ms";

fn pod_from_row(r: &crate::AnyRow) -> Result<Pod, DbError> {
    Ok(Pod {
        id: get_str(r, "id")?,
        zone_id: get_str(r, "zone_id")?,
        name: get_str(r, "name")?,
        gateway: get_str(r, "gateway")?,
        netmask: get_str(r, "netmask")?,
        start_ip: get_str(r, "start_ip")?,
        end_ip: get_str(r, "end_ip")?,
        allocation_state: get_str(r, "allocation_state")?,
        created_ms: get_i64(r, "created_ms")?,
    })
}

/// The pods of one zone.
pub async fn pod_list_by_zone(c: &mut dyn Sql, zone_id: &str) -> Result<Vec<Pod>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("SELECT {POD_COLS} FROM pod WHERE zone_id = ? ORDER BY created_ms, name");
    let rows = sqlx::query(&q).bind(zone_id).fetch_all(conn).await.ctx("list pods of a zone")?;
    rows.iter().map(pod_from_row).collect()
}

/// One pod, its row locked (MySQL) for the rest of the transaction, so clusters created in it
/// concurrently are checked for a unique name one after the other.
pub async fn pod_fetch_for_update(c: &mut dyn Sql, id: &str) -> Result<Option<Pod>, DbError> {
    let (conn, dl) = c.parts();
    let q = sql(dl, &format!("SELECT {POD_COLS} FROM pod WHERE id = ? {{for_update}}")).into_owned();
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch pod")?;
    row.as_ref().map(pod_from_row).transpose()
}

/// Write a pod's editable fields (`updatePod`): name and allocation state. False if no row changed.
pub async fn pod_update(c: &mut dyn Sql, p: &Pod) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE pod SET name = ?, allocation_state = ? WHERE id = ?")
        .bind(&p.name)
        .bind(&p.allocation_state)
        .bind(&p.id)
        .execute(conn)
        .await
        .ctx("update pod")?
        .rows_affected();
    Ok(n == 1)
}

/// Take a free address of the pod for `nic_id`; `None` when the range is exhausted.
/// Conditional update, so two transactions never get the same address.
pub async fn pod_ip_allocate(c: &mut dyn Sql, pod_id: &str, nic_id: &str) -> Result<Option<String>, DbError> {
    for _ in 0..16 {
        let (conn, _) = c.parts();
        // Start at a random offset so concurrent allocations rarely collide.
        let skip = rand::random::<u32>() % 8;
        let row = sqlx::query(
            "SELECT ip_num, ip FROM pod_ip WHERE pod_id = ? AND nic_id IS NULL ORDER BY ip_num LIMIT 1 OFFSET ?",
        )
        .bind(pod_id)
        .bind(skip as i64)
        .fetch_optional(&mut *conn)
        .await
        .ctx("find free address")?;
        let row = match row {
            Some(r) => r,
            None => {
                let first = sqlx::query(
                    "SELECT ip_num, ip FROM pod_ip WHERE pod_id = ? AND nic_id IS NULL ORDER BY ip_num LIMIT 1",
                )
                .bind(pod_id)
                .fetch_optional(&mut *conn)
                .await
                .ctx("find free address")?;
                match first {
                    Some(r) => r,
                    None => return Ok(None),
                }
            }
        };
        let num = get_i64(&row, "ip_num")?;
        let ip = get_str(&row, "ip")?;
        let n = sqlx::query("UPDATE pod_ip SET nic_id = ? WHERE pod_id = ? AND ip_num = ? AND nic_id IS NULL")
            .bind(nic_id)
            .bind(pod_id)
            .bind(num)
            .execute(&mut *conn)
            .await
            .ctx("take address")?
            .rows_affected();
        if n == 1 {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

/// Return the addresses held by a VM's NICs to the pod.
pub async fn pod_ip_release_for_vm(c: &mut dyn Sql, vm_id: &str) -> Result<(), DbError> {
    let (conn, _) = c.parts();
    sqlx::query("UPDATE pod_ip SET nic_id = NULL WHERE nic_id IN (SELECT id FROM nic WHERE vm_id = ?)")
        .bind(vm_id)
        .execute(conn)
        .await
        .ctx("release addresses")?;
    Ok(())
}

pub async fn cluster_insert(c: &mut dyn Sql, cl: &Cluster) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO cluster (id, zone_id, pod_id, name, hypervisor, allocation_state, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&cl.id)
    .bind(&cl.zone_id)
    .bind(&cl.pod_id)
    .bind(&cl.name)
    .bind(&cl.hypervisor)
    .bind(&cl.allocation_state)
    .execute(conn)
    .await
    .ctx("insert cluster")?;
    Ok(())
}

pub async fn cluster_list(c: &mut dyn Sql) -> Result<Vec<Cluster>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT id, zone_id, pod_id, name, hypervisor, allocation_state, created_ms FROM cluster ORDER BY created_ms, name",
    )
    .fetch_all(conn)
    .await
    .ctx("list clusters")?;
    rows.iter().map(cluster_from_row).collect()
}

fn cluster_from_row(r: &crate::AnyRow) -> Result<Cluster, DbError> {
    Ok(Cluster {
        id: get_str(r, "id")?,
        zone_id: get_str(r, "zone_id")?,
        pod_id: get_str(r, "pod_id")?,
        name: get_str(r, "name")?,
        hypervisor: get_str(r, "hypervisor")?,
        allocation_state: get_str(r, "allocation_state")?,
        created_ms: get_i64(r, "created_ms")?,
    })
}

const CLUSTER_COLS: &str = "id, zone_id, pod_id, name, hypervisor, allocation_state, created_ms";

/// One cluster, its row locked (MySQL) for the rest of the transaction.
pub async fn cluster_fetch_for_update(c: &mut dyn Sql, id: &str) -> Result<Option<Cluster>, DbError> {
    let (conn, dl) = c.parts();
    let q = sql(dl, &format!("SELECT {CLUSTER_COLS} FROM cluster WHERE id = ? {{for_update}}")).into_owned();
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch cluster")?;
    row.as_ref().map(cluster_from_row).transpose()
}

/// Write a cluster's editable fields (`updateCluster`): name and allocation state. False if no row changed.
pub async fn cluster_update(c: &mut dyn Sql, cl: &Cluster) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE cluster SET name = ?, allocation_state = ? WHERE id = ?")
        .bind(&cl.name)
        .bind(&cl.allocation_state)
        .bind(&cl.id)
        .execute(conn)
        .await
        .ctx("update cluster")?
        .rows_affected();
    Ok(n == 1)
}

/// The cluster of the pod with this name, compared case-insensitively (unique within a pod).
pub async fn cluster_find_by_name(c: &mut dyn Sql, pod_id: &str, name: &str) -> Result<Option<Cluster>, DbError> {
    let (conn, _) = c.parts();
    let row = sqlx::query(
        "SELECT id, zone_id, pod_id, name, hypervisor, allocation_state, created_ms FROM cluster \
         WHERE pod_id = ? AND LOWER(name) = LOWER(?) LIMIT 1",
    )
    .bind(pod_id)
    .bind(name)
    .fetch_optional(conn)
    .await
    .ctx("find cluster by name")?;
    row.as_ref().map(cluster_from_row).transpose()
}

const HOST_COLS: &str = "h.id, h.guid, h.name, h.zone_id, h.pod_id, h.cluster_id, h.ip, h.hypervisor, \
     h.cpu_cores, h.cpu_mhz, h.mem_mb, h.status, h.resource_state, h.mgmt_server_id, h.owner_gen, \
     h.agent_id, h.version, h.tags, h.last_ping_ms, h.created_ms, h.ha_state, h.ha_since_ms, h.check_addr, \
     h.hb_counter, h.hb_seen_ms, h.disconnected_ms, \
     COALESCE(hp.allocation_state, 'Enabled') AS pod_state, COALESCE(hc.allocation_state, 'Enabled') AS cluster_state";

/// The host table with its pod's and cluster's rows (for their allocation states).
const HOST_FROM: &str = "host h LEFT JOIN pod hp ON hp.id = h.pod_id LEFT JOIN cluster hc ON hc.id = h.cluster_id";

fn host_from_row(r: &crate::AnyRow) -> Result<Host, DbError> {
    Ok(Host {
        id: get_str(r, "id")?,
        guid: get_str(r, "guid")?,
        name: get_str(r, "name")?,
        zone_id: get_str(r, "zone_id")?,
        pod_id: get_str(r, "pod_id")?,
        cluster_id: get_str(r, "cluster_id")?,
        ip: get_str(r, "ip")?,
        hypervisor: get_str(r, "hypervisor")?,
        cpu_cores: get_i64(r, "cpu_cores")?,
        cpu_mhz: get_i64(r, "cpu_mhz")?,
        mem_mb: get_i64(r, "mem_mb")?,
        status: get_str(r, "status")?,
        resource_state: get_str(r, "resource_state")?,
        mgmt_server_id: get_opt_str(r, "mgmt_server_id")?,
        owner_gen: get_i64(r, "owner_gen")?,
        agent_id: get_str(r, "agent_id")?,
        version: get_str(r, "version")?,
        tags: get_str(r, "tags")?,
        last_ping_ms: get_opt_i64(r, "last_ping_ms")?,
        created_ms: get_i64(r, "created_ms")?,
        ha_state: get_str(r, "ha_state")?,
        ha_since_ms: get_i64(r, "ha_since_ms")?,
        check_addr: get_str(r, "check_addr")?,
        hb_counter: get_i64(r, "hb_counter")?,
        hb_seen_ms: get_i64(r, "hb_seen_ms")?,
        disconnected_ms: get_i64(r, "disconnected_ms")?,
        used_cpu: 0,
        used_mem_mb: 0,
        vm_count: 0,
        pod_state: get_str(r, "pod_state")?,
        cluster_state: get_str(r, "cluster_state")?,
    })
}

/// States in which a VM holds capacity on its host.
pub const CAPACITY_STATES: &str = "('Starting', 'Running', 'Stopping', 'Migrating')";

/// All hosts (not removed), with the capacity their VMs use.
pub async fn host_list(c: &mut dyn Sql) -> Result<Vec<Host>, DbError> {
    let (conn, dl) = c.parts();
    let q = format!("SELECT {HOST_COLS} FROM {HOST_FROM} WHERE h.removed_ms IS NULL ORDER BY h.created_ms, h.name");
    let rows = sqlx::query(&q).fetch_all(&mut *conn).await.ctx("list hosts")?;
    let mut hosts = rows.iter().map(host_from_row).collect::<Result<Vec<_>, _>>()?;
    let q = sql(
        dl,
        &format!(
            "SELECT host_id, CAST(SUM(cpu) AS {{int}}) AS cpu, CAST(SUM(mem_mb) AS {{int}}) AS mem, COUNT(*) AS n \
             FROM vm_instance WHERE host_id IS NOT NULL AND state IN {CAPACITY_STATES} GROUP BY host_id"
        ),
    )
    .into_owned();
    let used = sqlx::query(&q).fetch_all(conn).await.ctx("sum host capacity")?;
    let mut map = std::collections::HashMap::new();
    for r in &used {
        map.insert(get_str(r, "host_id")?, (get_i64(r, "cpu")?, get_i64(r, "mem")?, get_i64(r, "n")?));
    }
    for h in &mut hosts {
        if let Some((cpu, mem, n)) = map.get(&h.id) {
            h.used_cpu = *cpu;
            h.used_mem_mb = *mem;
            h.vm_count = *n;
        }
    }
    Ok(hosts)
}

pub async fn host_fetch(c: &mut dyn Sql, id: &str) -> Result<Option<Host>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("SELECT {HOST_COLS} FROM {HOST_FROM} WHERE h.id = ? AND h.removed_ms IS NULL");
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch host")?;
    row.as_ref().map(host_from_row).transpose()
}

/// Capacity used on one host, read with the host row locked (MySQL) so two placements on the
/// same host serialise. Returns (cpu, mem_mb).
pub async fn host_used_capacity_locked(c: &mut dyn Sql, host_id: &str) -> Result<(i64, i64), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(dl, "SELECT id FROM host WHERE id = ? {for_update}"))
        .bind(host_id)
        .fetch_optional(&mut *conn)
        .await
        .ctx("lock host")?;
    let q = sql(
        dl,
        &format!(
            "SELECT CAST(COALESCE(SUM(cpu), 0) AS {{int}}) AS cpu, CAST(COALESCE(SUM(mem_mb), 0) AS {{int}}) AS mem \
             FROM vm_instance WHERE host_id = ? AND state IN {CAPACITY_STATES}"
        ),
    )
    .into_owned();
    let r = sqlx::query(&q).bind(host_id).fetch_one(conn).await.ctx("sum host capacity")?;
    Ok((get_i64(&r, "cpu")?, get_i64(&r, "mem")?))
}

/// What an agent reports when it (re)connects.
#[derive(Debug, Clone)]
pub struct HostConnect {
    pub guid: String,
    pub name: String,
    pub ip: String,
    pub hypervisor: String,
    pub cpu_cores: i64,
    pub cpu_mhz: i64,
    pub mem_mb: i64,
    pub agent_id: String,
    pub version: String,
    /// Where neighbours check this host's network ("" if the agent gives none).
    pub check_addr: String,
    /// Where a host seen for the first time is placed.
    pub zone_id: String,
    pub pod_id: String,
    pub cluster_id: String,
}

/// Take ownership of a host's connection for management server `ms_id`: create the host if new,
/// mark it Connecting and bump its ownership generation. Returns (host id, new generation).
/// The host becomes Up with the first report of its VMs on this connection ([`host_ping`]): until
/// then nothing is placed on it (CloudStack's Connecting: registered, state not yet reconciled).
pub async fn host_take_connection(c: &mut dyn Sql, h: &HostConnect, ms_id: &str) -> Result<(String, i64), DbError> {
    let (conn, dl) = c.parts();
    let existing = sqlx::query(&sql(dl, "SELECT id, owner_gen FROM host WHERE guid = ? {for_update}"))
        .bind(&h.guid)
        .fetch_optional(&mut *conn)
        .await
        .ctx("fetch host by guid")?;
    match existing {
        Some(r) => {
            let id = get_str(&r, "id")?;
            let gen_ = get_i64(&r, "owner_gen")? + 1;
            sqlx::query(&sql(
                dl,
                "UPDATE host SET status = 'Connecting', mgmt_server_id = ?, owner_gen = ?, last_ping_ms = {now}, \
                 name = ?, ip = ?, cpu_cores = ?, cpu_mhz = ?, mem_mb = ?, agent_id = ?, version = ?, \
                 check_addr = ?, disconnected_ms = 0, ha_state = 'Available', ha_since_ms = {now}, \
                 removed_ms = NULL WHERE id = ?",
            ))
            .bind(ms_id)
            .bind(gen_)
            .bind(&h.name)
            .bind(&h.ip)
            .bind(h.cpu_cores)
            .bind(h.cpu_mhz)
            .bind(h.mem_mb)
            .bind(&h.agent_id)
            .bind(&h.version)
            .bind(&h.check_addr)
            .bind(&id)
            .execute(conn)
            .await
            .ctx("take host connection")?;
            Ok((id, gen_))
        }
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            sqlx::query(&sql(
                dl,
                "INSERT INTO host (id, guid, name, zone_id, pod_id, cluster_id, ip, hypervisor, cpu_cores, \
                 cpu_mhz, mem_mb, status, resource_state, mgmt_server_id, owner_gen, agent_id, version, tags, \
                 last_ping_ms, created_ms, check_addr, ha_since_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'Connecting', 'Enabled', ?, 1, ?, ?, '', {now}, {now}, ?, {now})",
            ))
            .bind(&id)
            .bind(&h.guid)
            .bind(&h.name)
            .bind(&h.zone_id)
            .bind(&h.pod_id)
            .bind(&h.cluster_id)
            .bind(&h.ip)
            .bind(&h.hypervisor)
            .bind(h.cpu_cores)
            .bind(h.cpu_mhz)
            .bind(h.mem_mb)
            .bind(ms_id)
            .bind(&h.agent_id)
            .bind(&h.version)
            .bind(&h.check_addr)
            .execute(conn)
            .await
            .ctx("insert host")?;
            Ok((id, 1))
        }
    }
}

/// Is a host with this guid registered (removed or not)?
pub async fn host_guid_known(c: &mut dyn Sql, guid: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query("SELECT id FROM host WHERE guid = ?").bind(guid).fetch_optional(conn).await.ctx("find host")?;
    Ok(r.is_some())
}

/// Record a ping (the host is Up from its first one on a connection); false if this server no
/// longer owns the host at this generation.
pub async fn host_ping(c: &mut dyn Sql, host_id: &str, ms_id: &str, gen_: i64) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE host SET last_ping_ms = {now}, status = 'Up' WHERE id = ? AND mgmt_server_id = ? AND owner_gen = ?",
    ))
    .bind(host_id)
    .bind(ms_id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("record host ping")?
    .rows_affected();
    Ok(n == 1)
}

/// Mark a host Disconnected when its agent's connection closes, if this server still owns it.
pub async fn host_disconnect(c: &mut dyn Sql, host_id: &str, ms_id: &str, gen_: i64) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE host SET status = 'Disconnected', mgmt_server_id = NULL, disconnected_ms = {now} \
         WHERE id = ? AND mgmt_server_id = ? AND owner_gen = ?",
    ))
    .bind(host_id)
    .bind(ms_id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("record host disconnect")?
    .rows_affected();
    Ok(n == 1)
}

/// Replace a host's tags (comma-separated).
pub async fn host_set_tags(c: &mut dyn Sql, id: &str, tags: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE host SET tags = ? WHERE id = ? AND removed_ms IS NULL")
        .bind(tags)
        .bind(id)
        .execute(conn)
        .await
        .ctx("update host tags")?
        .rows_affected();
    Ok(n == 1)
}

pub async fn host_set_resource_state(c: &mut dyn Sql, id: &str, state: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE host SET resource_state = ? WHERE id = ? AND removed_ms IS NULL")
        .bind(state)
        .bind(id)
        .execute(conn)
        .await
        .ctx("update host resource state")?
        .rows_affected();
    Ok(n == 1)
}

pub async fn offering_insert(c: &mut dyn Sql, o: &Offering) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO service_offering (id, name, display_text, cpu, cpu_mhz, mem_mb, offer_ha, storage_type, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&o.id)
    .bind(&o.name)
    .bind(&o.display_text)
    .bind(o.cpu)
    .bind(o.cpu_mhz)
    .bind(o.mem_mb)
    .bind(o.offer_ha as i64)
    .bind(&o.storage_type)
    .execute(conn)
    .await
    .ctx("insert service offering")?;
    Ok(())
}

pub async fn offering_list(c: &mut dyn Sql) -> Result<Vec<Offering>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT id, name, display_text, cpu, cpu_mhz, mem_mb, offer_ha, storage_type, created_ms \
         FROM service_offering WHERE removed_ms IS NULL ORDER BY created_ms, name",
    )
    .fetch_all(conn)
    .await
    .ctx("list service offerings")?;
    rows.iter()
        .map(|r| {
            Ok(Offering {
                id: get_str(r, "id")?,
                name: get_str(r, "name")?,
                display_text: get_str(r, "display_text")?,
                cpu: get_i64(r, "cpu")?,
                cpu_mhz: get_i64(r, "cpu_mhz")?,
                mem_mb: get_i64(r, "mem_mb")?,
                offer_ha: get_bool(r, "offer_ha")?,
                storage_type: get_str(r, "storage_type")?,
                created_ms: get_i64(r, "created_ms")?,
            })
        })
        .collect()
}

pub async fn template_insert(c: &mut dyn Sql, t: &Template) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO template (id, name, display_text, os_type, hypervisor, format, size_bytes, zone_id, \
         is_public, featured, account_id, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&t.id)
    .bind(&t.name)
    .bind(&t.display_text)
    .bind(&t.os_type)
    .bind(&t.hypervisor)
    .bind(&t.format)
    .bind(t.size_bytes)
    .bind(t.zone_id.clone())
    .bind(t.is_public as i64)
    .bind(t.featured as i64)
    .bind(&t.account_id)
    .execute(conn)
    .await
    .ctx("insert template")?;
    Ok(())
}

pub async fn template_list(c: &mut dyn Sql) -> Result<Vec<Template>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT id, name, display_text, os_type, hypervisor, format, size_bytes, zone_id, is_public, \
         featured, account_id, created_ms FROM template WHERE removed_ms IS NULL ORDER BY created_ms, name",
    )
    .fetch_all(conn)
    .await
    .ctx("list templates")?;
    rows.iter()
        .map(|r| {
            Ok(Template {
                id: get_str(r, "id")?,
                name: get_str(r, "name")?,
                display_text: get_str(r, "display_text")?,
                os_type: get_str(r, "os_type")?,
                hypervisor: get_str(r, "hypervisor")?,
                format: get_str(r, "format")?,
                size_bytes: get_i64(r, "size_bytes")?,
                zone_id: get_opt_str(r, "zone_id")?,
                is_public: get_bool(r, "is_public")?,
                featured: get_bool(r, "featured")?,
                account_id: get_str(r, "account_id")?,
                created_ms: get_i64(r, "created_ms")?,
            })
        })
        .collect()
}

/// Hosts whose connection a dead server held: Disconnected (not Down: their agents are
/// reconnecting elsewhere), owner cleared. Returns how many.
pub async fn host_release_of(c: &mut dyn Sql, ms_id: &str) -> Result<u64, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE host SET status = 'Disconnected', mgmt_server_id = NULL, disconnected_ms = {now} \
         WHERE mgmt_server_id = ? AND removed_ms IS NULL",
    ))
    .bind(ms_id)
    .execute(conn)
    .await
    .ctx("release hosts of a dead server")?
    .rows_affected();
    Ok(n)
}

/// Connected agents per management server: (ms id, distinct agents, hosts).
pub async fn host_agents_per_ms(c: &mut dyn Sql) -> Result<Vec<(String, i64, i64)>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT mgmt_server_id, COUNT(DISTINCT agent_id) AS agents, COUNT(*) AS hosts FROM host \
         WHERE mgmt_server_id IS NOT NULL AND removed_ms IS NULL AND status IN ('Up', 'Connecting') GROUP BY mgmt_server_id",
    )
    .fetch_all(conn)
    .await
    .ctx("count agents per server")?;
    rows.iter().map(|r| Ok((get_str(r, "mgmt_server_id")?, get_i64(r, "agents")?, get_i64(r, "hosts")?))).collect()
}
