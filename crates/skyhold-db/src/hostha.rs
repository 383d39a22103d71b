//! Host HA: the hosts' HA state and storage heartbeat, out-of-band management (IPMI) settings,
//! durable HA work (`op_ha_work`) and alerts (`listAlerts`).
//!
//! HA states (CloudStack's host-HA names): `Available` (nothing suspected), `Suspect` (silent
//! longer than the ping timeout), `Checking` (neighbours being asked), `Degraded` (cut off from
//! the management servers but alive: reachable or writing its storage heartbeat), `Fencing`
//! (waiting for a proof: IPMI power-off or the heartbeat lease), `Fenced` (proved dead; its VMs
//! were handled), `Ineligible` (no proof is possible: no storage heartbeat, no out-of-band
//! management).

use crate::{Ctx, DbError, Page, Sql, get_i64, get_opt_str, get_str, sql};

/// Record a host's storage heartbeat counter if it advanced; true if it did. `hb_seen_ms` is the
/// database time the counter last advanced, whoever saw it (the host's own ping or a neighbour).
pub async fn host_hb_observe(c: &mut dyn Sql, host_id: &str, counter: i64) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(dl, "UPDATE host SET hb_counter = ?, hb_seen_ms = {now} WHERE id = ? AND hb_counter < ?"))
        .bind(counter)
        .bind(host_id)
        .bind(counter)
        .execute(conn)
        .await
        .ctx("record storage heartbeat")?
        .rows_affected();
    Ok(n == 1)
}

/// Move a host's HA state from one of `from` to `to` (and its status to `status` if given);
/// false if it was not in one of `from`.
pub async fn host_ha_move(
    c: &mut dyn Sql,
    host_id: &str,
    from: &[&str],
    to: &str,
    status: Option<&str>,
) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let marks = vec!["?"; from.len().max(1)].join(", ");
    let q = sql(
        dl,
        &format!(
            "UPDATE host SET ha_state = ?, ha_since_ms = {{now}}, status = COALESCE(?, status) \
             WHERE id = ? AND ha_state IN ({marks}) AND removed_ms IS NULL"
        ),
    )
    .into_owned();
    let mut qq = sqlx::query(&q).bind(to).bind(status.map(str::to_string)).bind(host_id);
    for f in from {
        qq = qq.bind(*f);
    }
    let n = qq.execute(conn).await.ctx("move host HA state")?.rows_affected();
    Ok(n == 1)
}

/// Mark a host Down and Fenced, unless its agent is connected again (status Up or Connecting).
/// True if done.
pub async fn host_mark_fenced(c: &mut dyn Sql, host_id: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE host SET status = 'Down', ha_state = 'Fenced', ha_since_ms = {now}, mgmt_server_id = NULL \
         WHERE id = ? AND status NOT IN ('Up', 'Connecting') AND removed_ms IS NULL",
    ))
    .bind(host_id)
    .execute(conn)
    .await
    .ctx("mark host fenced")?
    .rows_affected();
    Ok(n == 1)
}

/// A host's out-of-band management (`configureOutOfBandManagement`); the password is encrypted.
#[derive(Debug, Clone)]
pub struct Oob {
    pub host_id: String,
    pub driver: String,
    pub address: String,
    pub port: i64,
    pub username: String,
    pub password_enc: String,
    pub enabled: bool,
    pub power_state: String,
}

pub async fn oob_upsert(c: &mut dyn Sql, o: &Oob) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE host_oob SET driver = ?, address = ?, port = ?, username = ?, password_enc = ?, updated_ms = {now} \
         WHERE host_id = ?",
    ))
    .bind(&o.driver)
    .bind(&o.address)
    .bind(o.port)
    .bind(&o.username)
    .bind(&o.password_enc)
    .bind(&o.host_id)
    .execute(&mut *conn)
    .await
    .ctx("update out-of-band management")?
    .rows_affected();
    if n == 0 {
        sqlx::query(&sql(
            dl,
            "INSERT INTO host_oob (host_id, driver, address, port, username, password_enc, enabled, power_state, \
             updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, {now})",
        ))
        .bind(&o.host_id)
        .bind(&o.driver)
        .bind(&o.address)
        .bind(o.port)
        .bind(&o.username)
        .bind(&o.password_enc)
        .bind(o.enabled as i64)
        .bind(&o.power_state)
        .execute(conn)
        .await
        .ctx("insert out-of-band management")?;
    }
    Ok(())
}

pub async fn oob_set_enabled(c: &mut dyn Sql, host_id: &str, enabled: bool) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(dl, "UPDATE host_oob SET enabled = ?, updated_ms = {now} WHERE host_id = ?"))
        .bind(enabled as i64)
        .bind(host_id)
        .execute(conn)
        .await
        .ctx("enable out-of-band management")?
        .rows_affected();
    Ok(n == 1)
}

pub async fn oob_set_power(c: &mut dyn Sql, host_id: &str, power: &str) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(dl, "UPDATE host_oob SET power_state = ?, updated_ms = {now} WHERE host_id = ?"))
        .bind(power)
        .bind(host_id)
        .execute(conn)
        .await
        .ctx("record power state")?;
    Ok(())
}

fn oob_from_row(r: &crate::AnyRow) -> Result<Oob, DbError> {
    Ok(Oob {
        host_id: get_str(r, "host_id")?,
        driver: get_str(r, "driver")?,
        address: get_str(r, "address")?,
        port: get_i64(r, "port")?,
        username: get_str(r, "username")?,
        password_enc: get_str(r, "password_enc")?,
        enabled: get_i64(r, "enabled")? != 0,
        power_state: get_str(r, "power_state")?,
    })
}

pub async fn oob_fetch(c: &mut dyn Sql, host_id: &str) -> Result<Option<Oob>, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query("SELECT * FROM host_oob WHERE host_id = ?")
        .bind(host_id)
        .fetch_optional(conn)
        .await
        .ctx("fetch out-of-band management")?;
    r.as_ref().map(oob_from_row).transpose()
}

pub async fn oob_list(c: &mut dyn Sql) -> Result<Vec<Oob>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query("SELECT * FROM host_oob").fetch_all(conn).await.ctx("list out-of-band management")?;
    rows.iter().map(oob_from_row).collect()
}

/// One unit of durable HA work: restart `vm_id`, which ran on `host_id`.
#[derive(Debug, Clone)]
pub struct Work {
    pub id: String,
    pub vm_id: String,
    pub host_id: String,
    pub zone_id: String,
    pub cluster_id: String,
    /// `Restart` (the host was fenced) or `CrashRestart` (the VM stopped on a healthy host).
    pub kind: String,
    pub reason: String,
    /// `Pending` (waiting for `next_try_ms`), `Running` (its start job runs), `Done`, `Failed`
    /// (gave up after `max.retries`), `Cancelled`.
    pub state: String,
    pub attempts: i64,
    pub job_id: Option<String>,
    pub next_try_ms: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub completed_ms: Option<i64>,
}

/// Active work states.
pub const WORK_ACTIVE: &[&str] = &["Pending", "Running"];

pub async fn work_insert(c: &mut dyn Sql, w: &Work) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO op_ha_work (id, vm_id, host_id, zone_id, cluster_id, kind, reason, state, attempts, job_id, \
         next_try_ms, last_error, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {now}, {now})",
    ))
    .bind(&w.id)
    .bind(&w.vm_id)
    .bind(&w.host_id)
    .bind(&w.zone_id)
    .bind(&w.cluster_id)
    .bind(&w.kind)
    .bind(&w.reason)
    .bind(&w.state)
    .bind(w.attempts)
    .bind(w.job_id.clone())
    .bind(w.next_try_ms)
    .bind(w.last_error.clone())
    .execute(conn)
    .await
    .ctx("insert HA work")?;
    Ok(())
}

fn work_from_row(r: &crate::AnyRow) -> Result<Work, DbError> {
    Ok(Work {
        id: get_str(r, "id")?,
        vm_id: get_str(r, "vm_id")?,
        host_id: get_str(r, "host_id")?,
        zone_id: get_str(r, "zone_id")?,
        cluster_id: get_str(r, "cluster_id")?,
        kind: get_str(r, "kind")?,
        reason: get_str(r, "reason")?,
        state: get_str(r, "state")?,
        attempts: get_i64(r, "attempts")?,
        job_id: get_opt_str(r, "job_id")?,
        next_try_ms: get_i64(r, "next_try_ms")?,
        last_error: get_opt_str(r, "last_error")?,
        created_ms: get_i64(r, "created_ms")?,
        updated_ms: get_i64(r, "updated_ms")?,
        completed_ms: crate::get_opt_i64(r, "completed_ms")?,
    })
}

const WORK_COLS: &str = "id, vm_id, host_id, zone_id, cluster_id, kind, reason, state, attempts, job_id, next_try_ms, \
     last_error, created_ms, updated_ms, completed_ms";

/// Work in the given states, oldest first (at most `limit`).
pub async fn work_list(c: &mut dyn Sql, states: &[&str], limit: i64) -> Result<Vec<Work>, DbError> {
    let (conn, _) = c.parts();
    let marks = vec!["?"; states.len().max(1)].join(", ");
    let q = format!("SELECT {WORK_COLS} FROM op_ha_work WHERE state IN ({marks}) ORDER BY seq LIMIT {}", limit.max(1));
    let mut qq = sqlx::query(&q);
    for s in states {
        qq = qq.bind(*s);
    }
    let rows = qq.fetch_all(conn).await.ctx("list HA work")?;
    rows.iter().map(work_from_row).collect()
}

/// Every work item of one VM, newest first.
pub async fn work_of_vm(c: &mut dyn Sql, vm_id: &str) -> Result<Vec<Work>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("SELECT {WORK_COLS} FROM op_ha_work WHERE vm_id = ? ORDER BY seq DESC");
    let rows = sqlx::query(&q).bind(vm_id).fetch_all(conn).await.ctx("list HA work of a VM")?;
    rows.iter().map(work_from_row).collect()
}

/// Where a work item moves to (see [`work_update`]).
#[derive(Debug, Clone, Copy)]
pub struct WorkMove<'a> {
    pub to: &'a str,
    pub attempts: i64,
    pub job_id: Option<&'a str>,
    pub next_try_ms: i64,
    pub last_error: Option<&'a str>,
}

/// Move a work item on, conditional on its current state. False if it was not in `from`.
pub async fn work_update(c: &mut dyn Sql, id: &str, from: &str, m: WorkMove<'_>) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let done = matches!(m.to, "Done" | "Failed" | "Cancelled");
    let q = sql(
        dl,
        &format!(
            "UPDATE op_ha_work SET state = ?, attempts = ?, job_id = ?, next_try_ms = ?, last_error = ?, \
             updated_ms = {{now}}{} WHERE id = ? AND state = ?",
            if done { ", completed_ms = {now}" } else { "" }
        ),
    )
    .into_owned();
    let n = sqlx::query(&q)
        .bind(m.to)
        .bind(m.attempts)
        .bind(m.job_id.map(str::to_string))
        .bind(m.next_try_ms)
        .bind(m.last_error.map(str::to_string))
        .bind(id)
        .bind(from)
        .execute(conn)
        .await
        .ctx("update HA work")?
        .rows_affected();
    Ok(n == 1)
}

/// Counts of work per state (for `skyhold ha status`).
pub async fn work_counts(c: &mut dyn Sql) -> Result<Vec<(String, i64)>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM op_ha_work GROUP BY state ORDER BY state")
        .fetch_all(conn)
        .await
        .ctx("count HA work")?;
    rows.iter().map(|r| Ok((get_str(r, "state")?, get_i64(r, "n")?))).collect()
}

/// An alert (`listAlerts`). `alert_type` is CloudStack's numeric alert type.
#[derive(Debug, Clone)]
pub struct Alert {
    pub id: String,
    pub alert_type: i64,
    pub name: String,
    pub subject: String,
    pub description: String,
    pub zone_id: Option<String>,
    pub pod_id: Option<String>,
    pub cluster_id: Option<String>,
    pub host_id: Option<String>,
    pub created_ms: i64,
}

pub async fn alert_insert(c: &mut dyn Sql, a: &Alert) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO alert (id, type, name, subject, description, zone_id, pod_id, cluster_id, host_id, archived, \
         created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, {now})",
    ))
    .bind(&a.id)
    .bind(a.alert_type)
    .bind(&a.name)
    .bind(&a.subject)
    .bind(&a.description)
    .bind(a.zone_id.clone())
    .bind(a.pod_id.clone())
    .bind(a.cluster_id.clone())
    .bind(a.host_id.clone())
    .execute(conn)
    .await
    .ctx("insert alert")?;
    Ok(())
}

/// Alerts, newest first, optionally of one type / one name; with the total count.
pub async fn alert_list(
    c: &mut dyn Sql,
    alert_type: Option<i64>,
    name: Option<&str>,
    id: Option<&str>,
    page: Page,
) -> Result<(Vec<Alert>, i64), DbError> {
    let (conn, _) = c.parts();
    let mut wh = vec!["archived = 0".to_string()];
    if alert_type.is_some() {
        wh.push("type = ?".into());
    }
    if name.is_some() {
        wh.push("name = ?".into());
    }
    if id.is_some() {
        wh.push("id = ?".into());
    }
    let cond = wh.join(" AND ");
    let total_q = format!("SELECT COUNT(*) AS n FROM alert WHERE {cond}");
    let mut tq = sqlx::query(&total_q);
    if let Some(t) = alert_type {
        tq = tq.bind(t);
    }
    if let Some(n) = name {
        tq = tq.bind(n.to_string());
    }
    if let Some(i) = id {
        tq = tq.bind(i.to_string());
    }
    let total = get_i64(&tq.fetch_one(&mut *conn).await.ctx("count alerts")?, "n")?;
    let q = format!(
        "SELECT id, type, name, subject, description, zone_id, pod_id, cluster_id, host_id, created_ms FROM alert \
         WHERE {cond} ORDER BY seq DESC{}",
        page.limit_clause()
    );
    let mut qq = sqlx::query(&q);
    if let Some(t) = alert_type {
        qq = qq.bind(t);
    }
    if let Some(n) = name {
        qq = qq.bind(n.to_string());
    }
    if let Some(i) = id {
        qq = qq.bind(i.to_string());
    }
    let rows = qq.fetch_all(conn).await.ctx("list alerts")?;
    let list = rows
        .iter()
        .map(|r| {
            Ok(Alert {
                id: get_str(r, "id")?,
                alert_type: get_i64(r, "type")?,
                name: get_str(r, "name")?,
                subject: get_str(r, "subject")?,
                description: get_str(r, "description")?,
                zone_id: get_opt_str(r, "zone_id")?,
                pod_id: get_opt_str(r, "pod_id")?,
                cluster_id: get_opt_str(r, "cluster_id")?,
                host_id: get_opt_str(r, "host_id")?,
                created_ms: get_i64(r, "created_ms")?,
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    Ok((list, total))
}
