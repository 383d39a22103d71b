//! VMs (`vm_instance`), their root volumes and NICs.
//!
//! Every state change is a conditional update on the expected current state that also bumps
//! `update_count`, so two writers can never both move a VM (CloudStack's optimistic VM state
//! transition, kept).

use crate::{Bind, Ctx, DbError, Page, Sql, bind_all, get_bool, get_i64, get_opt_str, get_str, like_escape, sql};

/// A VM joined with the names the API shows.
#[derive(Debug, Clone)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub instance_name: String,
    pub state: String,
    pub account_id: String,
    pub account_name: String,
    pub domain_id: String,
    pub domain_name: String,
    pub user_id: String,
    pub zone_id: String,
    pub zone_name: String,
    pub pod_id: Option<String>,
    pub host_id: Option<String>,
    pub host_name: Option<String>,
    pub last_host_id: Option<String>,
    pub template_id: String,
    pub template_name: String,
    pub offering_id: String,
    pub offering_name: String,
    pub cpu: i64,
    pub cpu_mhz: i64,
    pub mem_mb: i64,
    pub ha_enabled: bool,
    pub update_count: i64,
    pub state_reason: Option<String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewVm {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub instance_name: String,
    pub state: String,
    pub account_id: String,
    pub domain_id: String,
    pub user_id: String,
    pub zone_id: String,
    pub pod_id: Option<String>,
    pub template_id: String,
    pub offering_id: String,
    pub cpu: i64,
    pub cpu_mhz: i64,
    pub mem_mb: i64,
    pub ha_enabled: bool,
}

#[derive(Debug, Clone)]
pub struct Nic {
    pub id: String,
    pub vm_id: String,
    pub pod_id: String,
    pub ip: String,
    pub netmask: String,
    pub gateway: String,
    pub mac: String,
    pub is_default: bool,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: String,
    pub vm_id: Option<String>,
    pub vm_name: Option<String>,
    pub vm_display_name: Option<String>,
    pub vm_state: Option<String>,
    pub name: String,
    pub vol_type: String,
    pub size_bytes: i64,
    pub state: String,
    pub zone_id: String,
    pub zone_name: String,
    pub account_id: String,
    pub account_name: String,
    pub domain_id: String,
    pub domain_name: String,
    pub template_id: Option<String>,
    pub storage_type: String,
    pub created_ms: i64,
}

pub async fn vm_insert(c: &mut dyn Sql, v: &NewVm) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO vm_instance (id, name, display_name, instance_name, state, account_id, domain_id, user_id, \
         zone_id, pod_id, host_id, last_host_id, template_id, offering_id, cpu, cpu_mhz, mem_mb, ha_enabled, \
         update_count, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, ?, 0, {now})",
    ))
    .bind(&v.id)
    .bind(&v.name)
    .bind(&v.display_name)
    .bind(&v.instance_name)
    .bind(&v.state)
    .bind(&v.account_id)
    .bind(&v.domain_id)
    .bind(&v.user_id)
    .bind(&v.zone_id)
    .bind(v.pod_id.clone())
    .bind(&v.template_id)
    .bind(&v.offering_id)
    .bind(v.cpu)
    .bind(v.cpu_mhz)
    .bind(v.mem_mb)
    .bind(v.ha_enabled as i64)
    .execute(conn)
    .await
    .ctx("insert vm")?;
    Ok(())
}

const VM_COLS: &str = "SELECT v.id, v.name, v.display_name, v.instance_name, v.state, v.account_id, \
     a.name AS account_name, v.domain_id, d.name AS domain_name, v.user_id, v.zone_id, z.name AS zone_name, \
     v.pod_id, v.host_id, h.name AS host_name, v.last_host_id, v.template_id, t.name AS template_name, \
     v.offering_id, o.name AS offering_name, v.cpu, v.cpu_mhz, v.mem_mb, v.ha_enabled, v.update_count, \
     v.state_reason, v.created_ms";

const VM_JOINS: &str = "JOIN account a ON a.id = v.account_id \
     JOIN domain d ON d.id = v.domain_id \
     JOIN zone z ON z.id = v.zone_id \
     JOIN template t ON t.id = v.template_id \
     JOIN service_offering o ON o.id = v.offering_id \
     LEFT JOIN host h ON h.id = v.host_id";

fn vm_from_row(r: &crate::AnyRow) -> Result<Vm, DbError> {
    Ok(Vm {
        id: get_str(r, "id")?,
        name: get_str(r, "name")?,
        display_name: get_str(r, "display_name")?,
        instance_name: get_str(r, "instance_name")?,
        state: get_str(r, "state")?,
        account_id: get_str(r, "account_id")?,
        account_name: get_str(r, "account_name")?,
        domain_id: get_str(r, "domain_id")?,
        domain_name: get_str(r, "domain_name")?,
        user_id: get_str(r, "user_id")?,
        zone_id: get_str(r, "zone_id")?,
        zone_name: get_str(r, "zone_name")?,
        pod_id: get_opt_str(r, "pod_id")?,
        host_id: get_opt_str(r, "host_id")?,
        host_name: get_opt_str(r, "host_name")?,
        last_host_id: get_opt_str(r, "last_host_id")?,
        template_id: get_str(r, "template_id")?,
        template_name: get_str(r, "template_name")?,
        offering_id: get_str(r, "offering_id")?,
        offering_name: get_str(r, "offering_name")?,
        cpu: get_i64(r, "cpu")?,
        cpu_mhz: get_i64(r, "cpu_mhz")?,
        mem_mb: get_i64(r, "mem_mb")?,
        ha_enabled: get_bool(r, "ha_enabled")?,
        update_count: get_i64(r, "update_count")?,
        state_reason: get_opt_str(r, "state_reason")?,
        created_ms: get_i64(r, "created_ms")?,
    })
}

/// A VM that has not been expunged.
pub async fn vm_fetch(c: &mut dyn Sql, id: &str) -> Result<Option<Vm>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("{VM_COLS} FROM vm_instance v {VM_JOINS} WHERE v.id = ? AND v.removed_ms IS NULL");
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch vm")?;
    row.as_ref().map(vm_from_row).transpose()
}

/// Filters of `listVirtualMachines`.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub ids: Vec<String>,
    pub name: Option<String>,
    pub state: Option<String>,
    pub zone_id: Option<String>,
    pub host_id: Option<String>,
    pub keyword: Option<String>,
    /// Restrict to one account (ordinary users, or `account=` for admins).
    pub account_id: Option<String>,
    /// Restrict to a domain.
    pub domain_id: Option<String>,
}

/// One page of VMs and the total number matching.
pub async fn vm_list(c: &mut dyn Sql, f: &VmFilter, page: Page) -> Result<(Vec<Vm>, i64), DbError> {
    let mut wh = vec!["v.removed_ms IS NULL".to_string()];
    let mut binds = Vec::new();
    if !f.ids.is_empty() {
        wh.push(format!("v.id IN ({})", vec!["?"; f.ids.len()].join(",")));
        binds.extend(f.ids.iter().cloned().map(Bind::S));
    }
    if let Some(n) = &f.name {
        wh.push("v.name = ?".into());
        binds.push(Bind::S(n.clone()));
    }
    if let Some(s) = &f.state {
        wh.push("v.state = ?".into());
        binds.push(Bind::S(s.clone()));
    }
    if let Some(z) = &f.zone_id {
        wh.push("v.zone_id = ?".into());
        binds.push(Bind::S(z.clone()));
    }
    if let Some(h) = &f.host_id {
        wh.push("v.host_id = ?".into());
        binds.push(Bind::S(h.clone()));
    }
    if let Some(a) = &f.account_id {
        wh.push("v.account_id = ?".into());
        binds.push(Bind::S(a.clone()));
    }
    if let Some(d) = &f.domain_id {
        wh.push("v.domain_id = ?".into());
        binds.push(Bind::S(d.clone()));
    }
    if let Some(k) = &f.keyword {
        let pat = format!("%{}%", like_escape(k));
        wh.push("(LOWER(v.name) LIKE LOWER(?) ESCAPE '!' OR LOWER(v.display_name) LIKE LOWER(?) ESCAPE '!' OR LOWER(v.state) LIKE LOWER(?) ESCAPE '!')".into());
        binds.push(Bind::S(pat.clone()));
        binds.push(Bind::S(pat.clone()));
        binds.push(Bind::S(pat));
    }
    let where_ = wh.join(" AND ");
    let (conn, _) = c.parts();
    let count_q = format!("SELECT COUNT(*) AS n FROM vm_instance v WHERE {where_}");
    let total = {
        let r = bind_all(sqlx::query(&count_q), &binds).fetch_one(&mut *conn).await.ctx("count vms")?;
        get_i64(&r, "n")?
    };
    // Page first on vm_instance alone (an index walk on seq), then join only that page: joining
    // every matching row and sorting it all made MariaDB pay for 10,000 rows to return 500.
    let q = format!(
        "{VM_COLS} FROM (SELECT v.seq AS pseq FROM vm_instance v WHERE {where_} ORDER BY v.seq{}) pg \
         JOIN vm_instance v ON v.seq = pg.pseq {VM_JOINS} ORDER BY v.seq",
        page.limit_clause()
    );
    let rows = bind_all(sqlx::query(&q), &binds).fetch_all(conn).await.ctx("list vms")?;
    let vms = rows.iter().map(vm_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok((vms, total))
}

/// Is a VM name already used by a live VM of this account?
pub async fn vm_name_taken(c: &mut dyn Sql, account_id: &str, name: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query(
        "SELECT COUNT(*) AS n FROM vm_instance WHERE account_id = ? AND name = ? AND removed_ms IS NULL AND state <> 'Destroyed'",
    )
    .bind(account_id)
    .bind(name)
    .fetch_one(conn)
    .await
    .ctx("check vm name")?;
    Ok(get_i64(&r, "n")? > 0)
}

/// Where the VM's host pointer goes in a state change.
#[derive(Debug, Clone)]
pub enum HostChange {
    Keep,
    /// Place on this host (and remember it as the last host).
    Set(String),
    /// Clear the host (the VM no longer holds capacity anywhere); the old one becomes `last_host_id`.
    Clear,
}

/// Move a VM from one of `from` states to `to`, bumping `update_count`. Returns false (and changes
/// nothing) if the VM is not in one of `from` (someone else moved it).
pub async fn vm_transition(
    c: &mut dyn Sql,
    id: &str,
    from: &[&str],
    to: &str,
    host: HostChange,
    reason: Option<&str>,
) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let host_sql = match &host {
        HostChange::Keep => "",
        HostChange::Set(_) => ", host_id = ?, last_host_id = ?",
        HostChange::Clear => ", last_host_id = COALESCE(host_id, last_host_id), host_id = NULL",
    };
    let q = format!(
        "UPDATE vm_instance SET state = ?, update_count = update_count + 1, state_reason = ?{host_sql} \
         WHERE id = ? AND removed_ms IS NULL AND state IN ({})",
        vec!["?"; from.len()].join(",")
    );
    let mut qq = sqlx::query(&q).bind(to).bind(reason.map(str::to_string));
    if let HostChange::Set(h) = &host {
        qq = qq.bind(h.clone()).bind(h.clone());
    }
    qq = qq.bind(id);
    for s in from {
        qq = qq.bind(*s);
    }
    let n = qq.execute(conn).await.ctx("change vm state")?.rows_affected();
    Ok(n == 1)
}

/// Change the user-editable attributes.
pub async fn vm_update_attrs(
    c: &mut dyn Sql,
    id: &str,
    display_name: Option<&str>,
    ha_enabled: Option<bool>,
) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE vm_instance SET display_name = COALESCE(?, display_name), ha_enabled = COALESCE(?, ha_enabled), \
         update_count = update_count + 1 WHERE id = ? AND removed_ms IS NULL",
    )
    .bind(display_name.map(str::to_string))
    .bind(ha_enabled.map(|b| b as i64))
    .bind(id)
    .execute(conn)
    .await
    .ctx("update vm")?
    .rows_affected();
    Ok(n == 1)
}

/// Expunge: the VM disappears from every list; its volumes are removed, its addresses freed.
pub async fn vm_expunge(c: &mut dyn Sql, id: &str) -> Result<bool, DbError> {
    crate::infra::pod_ip_release_for_vm(c, id).await?;
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE vm_instance SET state = 'Expunging', host_id = NULL, removed_ms = {now}, update_count = update_count + 1 \
         WHERE id = ? AND removed_ms IS NULL",
    ))
    .bind(id)
    .execute(&mut *conn)
    .await
    .ctx("expunge vm")?
    .rows_affected();
    sqlx::query(&sql(
        dl,
        "UPDATE volume SET state = 'Expunged', removed_ms = {now} WHERE vm_id = ? AND removed_ms IS NULL",
    ))
    .bind(id)
    .execute(&mut *conn)
    .await
    .ctx("expunge volumes")?;
    sqlx::query("DELETE FROM nic WHERE vm_id = ?").bind(id).execute(conn).await.ctx("delete nics")?;
    Ok(n == 1)
}

/// Count VMs per state (for capability and status summaries).
/// Ids of the VMs the database has Running on a host (compared with each report of its agent).
pub async fn vm_running_ids_on_host(c: &mut dyn Sql, host_id: &str) -> Result<Vec<String>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query("SELECT id FROM vm_instance WHERE host_id = ? AND state = 'Running' AND removed_ms IS NULL")
        .bind(host_id)
        .fetch_all(conn)
        .await
        .ctx("list running VMs of a host")?;
    rows.iter().map(|r| get_str(r, "id")).collect()
}

/// (VM id, host id) of the VMs the database has Running on hosts that are Down and Fenced (left
/// there by a job in flight at the fence), in one query.
pub async fn vm_running_on_fenced_hosts(c: &mut dyn Sql) -> Result<Vec<(String, String)>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT v.id, v.host_id FROM vm_instance v JOIN host h ON h.id = v.host_id \
         WHERE v.state = 'Running' AND v.removed_ms IS NULL AND h.status = 'Down' AND h.ha_state = 'Fenced'",
    )
    .fetch_all(conn)
    .await
    .ctx("list VMs left on fenced hosts")?;
    rows.iter().map(|r| Ok((get_str(r, "id")?, get_str(r, "host_id")?))).collect()
}

pub async fn vm_count(c: &mut dyn Sql) -> Result<i64, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query("SELECT COUNT(*) AS n FROM vm_instance WHERE removed_ms IS NULL")
        .fetch_one(conn)
        .await
        .ctx("count vms")?;
    get_i64(&r, "n")
}

pub async fn nic_insert(c: &mut dyn Sql, n: &Nic) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO nic (id, vm_id, pod_id, ip, netmask, gateway, mac, is_default, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&n.id)
    .bind(&n.vm_id)
    .bind(&n.pod_id)
    .bind(&n.ip)
    .bind(&n.netmask)
    .bind(&n.gateway)
    .bind(&n.mac)
    .bind(n.is_default as i64)
    .execute(conn)
    .await
    .ctx("insert nic")?;
    Ok(())
}

/// NICs of the given VMs.
pub async fn nic_list_for_vms(c: &mut dyn Sql, vm_ids: &[String]) -> Result<Vec<Nic>, DbError> {
    if vm_ids.is_empty() {
        return Ok(Vec::new());
    }
    let (conn, _) = c.parts();
    let mut out = Vec::new();
    for chunk in vm_ids.chunks(500) {
        let q = format!(
            "SELECT id, vm_id, pod_id, ip, netmask, gateway, mac, is_default FROM nic WHERE vm_id IN ({}) ORDER BY created_ms",
            vec!["?"; chunk.len()].join(",")
        );
        let mut qq = sqlx::query(&q);
        for id in chunk {
            qq = qq.bind(id.as_str());
        }
        let rows = qq.fetch_all(&mut *conn).await.ctx("list nics")?;
        for r in &rows {
            out.push(Nic {
                id: get_str(r, "id")?,
                vm_id: get_str(r, "vm_id")?,
                pod_id: get_str(r, "pod_id")?,
                ip: get_str(r, "ip")?,
                netmask: get_str(r, "netmask")?,
                gateway: get_str(r, "gateway")?,
                mac: get_str(r, "mac")?,
                is_default: get_bool(r, "is_default")?,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct NewVolume {
    pub id: String,
    pub vm_id: String,
    pub name: String,
    pub size_bytes: i64,
    pub zone_id: String,
    pub account_id: String,
    pub domain_id: String,
    pub template_id: String,
    pub storage_type: String,
}

pub async fn volume_insert_root(c: &mut dyn Sql, v: &NewVolume) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO volume (id, vm_id, name, vol_type, size_bytes, state, zone_id, account_id, domain_id, \
         template_id, storage_type, created_ms) VALUES (?, ?, ?, 'ROOT', ?, 'Ready', ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&v.id)
    .bind(&v.vm_id)
    .bind(&v.name)
    .bind(v.size_bytes)
    .bind(&v.zone_id)
    .bind(&v.account_id)
    .bind(&v.domain_id)
    .bind(&v.template_id)
    .bind(&v.storage_type)
    .execute(conn)
    .await
    .ctx("insert volume")?;
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct VolumeFilter {
    pub id: Option<String>,
    pub vm_id: Option<String>,
    pub account_id: Option<String>,
    pub zone_id: Option<String>,
    pub vol_type: Option<String>,
    pub keyword: Option<String>,
}

pub async fn volume_list(c: &mut dyn Sql, f: &VolumeFilter, page: Page) -> Result<(Vec<Volume>, i64), DbError> {
    let mut wh = vec!["vo.removed_ms IS NULL".to_string()];
    let mut binds = Vec::new();
    for (col, val) in [
        ("vo.id", &f.id),
        ("vo.vm_id", &f.vm_id),
        ("vo.account_id", &f.account_id),
        ("vo.zone_id", &f.zone_id),
        ("vo.vol_type", &f.vol_type),
    ] {
        if let Some(v) = val {
            wh.push(format!("{col} = ?"));
            binds.push(Bind::S(v.clone()));
        }
    }
    if let Some(k) = &f.keyword {
        wh.push("LOWER(vo.name) LIKE LOWER(?) ESCAPE '!'".into());
        binds.push(Bind::S(format!("%{}%", like_escape(k))));
    }
    let where_ = wh.join(" AND ");
    let (conn, _) = c.parts();
    let r = bind_all(sqlx::query(&format!("SELECT COUNT(*) AS n FROM volume vo WHERE {where_}")), &binds)
        .fetch_one(&mut *conn)
        .await
        .ctx("count volumes")?;
    let total = get_i64(&r, "n")?;
    let q = format!(
        "SELECT vo.id, vo.vm_id, v.name AS vm_name, v.display_name AS vm_display_name, v.state AS vm_state, \
         vo.name, vo.vol_type, vo.size_bytes, vo.state, vo.zone_id, z.name AS zone_name, vo.account_id, \
         a.name AS account_name, vo.domain_id, d.name AS domain_name, vo.template_id, vo.storage_type, vo.created_ms \
         FROM volume vo JOIN zone z ON z.id = vo.zone_id JOIN account a ON a.id = vo.account_id \
         JOIN domain d ON d.id = vo.domain_id LEFT JOIN vm_instance v ON v.id = vo.vm_id \
         WHERE {where_} ORDER BY vo.created_ms, vo.id{}",
        page.limit_clause()
    );
    let rows = bind_all(sqlx::query(&q), &binds).fetch_all(conn).await.ctx("list volumes")?;
    let vols = rows
        .iter()
        .map(|r| {
            Ok(Volume {
                id: get_str(r, "id")?,
                vm_id: get_opt_str(r, "vm_id")?,
                vm_name: get_opt_str(r, "vm_name")?,
                vm_display_name: get_opt_str(r, "vm_display_name")?,
                vm_state: get_opt_str(r, "vm_state")?,
                name: get_str(r, "name")?,
                vol_type: get_str(r, "vol_type")?,
                size_bytes: get_i64(r, "size_bytes")?,
                state: get_str(r, "state")?,
                zone_id: get_str(r, "zone_id")?,
                zone_name: get_str(r, "zone_name")?,
                account_id: get_str(r, "account_id")?,
                account_name: get_str(r, "account_name")?,
                domain_id: get_str(r, "domain_id")?,
                domain_name: get_str(r, "domain_name")?,
                template_id: get_opt_str(r, "template_id")?,
                storage_type: get_str(r, "storage_type")?,
                created_ms: get_i64(r, "created_ms")?,
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    Ok((vols, total))
}
