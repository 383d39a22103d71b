//! Management server membership (`management_server`): registration and heartbeats on the
//! database clock.

use crate::{Ctx, DbError, Sql, get_i64, get_str, sql};

#[derive(Debug, Clone)]
pub struct MgmtServer {
    pub id: String,
    pub run_id: String,
    pub name: String,
    pub version: String,
    pub service_ip: String,
    pub api_port: i64,
    pub agent_port: i64,
    pub cluster_port: i64,
    pub state: String,
    pub last_heartbeat_ms: i64,
    pub started_ms: i64,
    pub created_ms: i64,
    /// Age of the heartbeat on the database clock at read time.
    pub heartbeat_age_ms: i64,
    /// The database endpoint this server wrote its last heartbeat to (redacted URL).
    pub db_endpoint: String,
}

/// Register (or re-register) this server for a new run: state Up, fresh heartbeat.
pub async fn ms_register(c: &mut dyn Sql, m: &MgmtServer) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE management_server SET run_id = ?, name = ?, version = ?, service_ip = ?, api_port = ?, \
         agent_port = ?, cluster_port = ?, state = 'Up', last_heartbeat_ms = {now}, started_ms = {now} WHERE id = ?",
    ))
    .bind(&m.run_id)
    .bind(&m.name)
    .bind(&m.version)
    .bind(&m.service_ip)
    .bind(m.api_port)
    .bind(m.agent_port)
    .bind(m.cluster_port)
    .bind(&m.id)
    .execute(&mut *conn)
    .await
    .ctx("register management server")?
    .rows_affected();
    if n == 0 {
        sqlx::query(&sql(
            dl,
            "INSERT INTO management_server (id, run_id, name, version, service_ip, api_port, agent_port, \
             cluster_port, state, last_heartbeat_ms, started_ms, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'Up', {now}, {now}, {now})",
        ))
        .bind(&m.id)
        .bind(&m.run_id)
        .bind(&m.name)
        .bind(&m.version)
        .bind(&m.service_ip)
        .bind(m.api_port)
        .bind(m.agent_port)
        .bind(m.cluster_port)
        .execute(conn)
        .await
        .ctx("insert management server")?;
    }
    Ok(())
}

/// Renew the heartbeat of this run, recording the database endpoint it went to. False if the row
/// now belongs to another run or says Down.
pub async fn ms_heartbeat(c: &mut dyn Sql, id: &str, run_id: &str, db_endpoint: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE management_server SET last_heartbeat_ms = {now}, db_endpoint = ? WHERE id = ? AND run_id = ? \
         AND state <> 'Down'",
    ))
    .bind(db_endpoint)
    .bind(id)
    .bind(run_id)
    .execute(conn)
    .await
    .ctx("renew heartbeat")?
    .rows_affected();
    Ok(n == 1)
}

pub async fn ms_set_state(c: &mut dyn Sql, id: &str, run_id: &str, state: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE management_server SET state = ? WHERE id = ? AND run_id = ?")
        .bind(state)
        .bind(id)
        .bind(run_id)
        .execute(conn)
        .await
        .ctx("set management server state")?
        .rows_affected();
    Ok(n == 1)
}

pub async fn ms_list(c: &mut dyn Sql) -> Result<Vec<MgmtServer>, DbError> {
    let (conn, dl) = c.parts();
    let rows = sqlx::query(&sql(
        dl,
        "SELECT id, run_id, name, version, service_ip, api_port, agent_port, cluster_port, state, \
         last_heartbeat_ms, started_ms, created_ms, {now} - last_heartbeat_ms AS age, db_endpoint FROM management_server \
         ORDER BY created_ms, id",
    ))
    .fetch_all(conn)
    .await
    .ctx("list management servers")?;
    rows.iter()
        .map(|r| {
            Ok(MgmtServer {
                id: get_str(r, "id")?,
                run_id: get_str(r, "run_id")?,
                name: get_str(r, "name")?,
                version: get_str(r, "version")?,
                service_ip: get_str(r, "service_ip")?,
                api_port: get_i64(r, "api_port")?,
                agent_port: get_i64(r, "agent_port")?,
                cluster_port: get_i64(r, "cluster_port")?,
                state: get_str(r, "state")?,
                last_heartbeat_ms: get_i64(r, "last_heartbeat_ms")?,
                started_ms: get_i64(r, "started_ms")?,
                created_ms: get_i64(r, "created_ms")?,
                heartbeat_age_ms: get_i64(r, "age")?,
                db_endpoint: get_str(r, "db_endpoint")?,
            })
        })
        .collect()
}

/// Declare a peer Down if its heartbeat is older than `threshold_ms` on the database clock. One
/// conditional update: among all survivors trying at once, exactly one wins (returns true) and
/// runs the takeover.
pub async fn ms_declare_down(c: &mut dyn Sql, id: &str, run_id: &str, threshold_ms: i64) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE management_server SET state = 'Down' WHERE id = ? AND run_id = ? AND state <> 'Down' \
         AND last_heartbeat_ms < {now} - ?",
    ))
    .bind(id)
    .bind(run_id)
    .bind(threshold_ms)
    .execute(conn)
    .await
    .ctx("declare management server down")?
    .rows_affected();
    Ok(n == 1)
}

/// This run's row as the database has it (state, run id).
pub async fn ms_fetch(c: &mut dyn Sql, id: &str) -> Result<Option<MgmtServer>, DbError> {
    Ok(ms_list(c).await?.into_iter().find(|m| m.id == id))
}

/// A named cluster-wide lock with a lease and a generation (fencing token).
#[derive(Debug, Clone)]
pub struct LockGrant {
    pub name: String,
    pub gen_: i64,
}

/// Take or renew the lock `name` for this run for `lease_ms`. Succeeds if the lock is free,
/// expired, or already ours; a takeover from another holder bumps the generation.
pub async fn lock_acquire(
    c: &mut dyn Sql,
    name: &str,
    ms_id: &str,
    run_id: &str,
    lease_ms: i64,
) -> Result<Option<LockGrant>, DbError> {
    let (conn, dl) = c.parts();
    let renewed = sqlx::query(&sql(
        dl,
        "UPDATE cluster_lock SET lease_until_ms = {now} + ? WHERE name = ? AND holder_ms = ? AND holder_run = ? \
         AND lease_until_ms >= {now}",
    ))
    .bind(lease_ms)
    .bind(name)
    .bind(ms_id)
    .bind(run_id)
    .execute(&mut *conn)
    .await
    .ctx("renew cluster lock")?
    .rows_affected();
    if renewed == 0 {
        let taken = sqlx::query(&sql(
            dl,
            "UPDATE cluster_lock SET holder_ms = ?, holder_run = ?, gen = gen + 1, lease_until_ms = {now} + ? \
             WHERE name = ? AND (lease_until_ms < {now} OR holder_ms IS NULL)",
        ))
        .bind(ms_id)
        .bind(run_id)
        .bind(lease_ms)
        .bind(name)
        .execute(&mut *conn)
        .await
        .ctx("take cluster lock")?
        .rows_affected();
        if taken == 0 {
            let exists = sqlx::query("SELECT COUNT(*) AS n FROM cluster_lock WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *conn)
                .await
                .ctx("inspect cluster lock")?;
            if get_i64(&exists, "n")? > 0 {
                return Ok(None);
            }
            let ins = sqlx::query(&sql(
                dl,
                "INSERT INTO cluster_lock (name, holder_ms, holder_run, gen, lease_until_ms) VALUES (?, ?, ?, 1, {now} + ?)",
            ))
            .bind(name)
            .bind(ms_id)
            .bind(run_id)
            .bind(lease_ms)
            .execute(&mut *conn)
            .await;
            match ins {
                Ok(_) => {}
                Err(e) => {
                    let e = DbError::Sql { what: "create cluster lock", source: e };
                    if e.is_unique_violation() {
                        return Ok(None);
                    }
                    return Err(e);
                }
            }
        }
    }
    let r = sqlx::query("SELECT gen FROM cluster_lock WHERE name = ? AND holder_ms = ? AND holder_run = ?")
        .bind(name)
        .bind(ms_id)
        .bind(run_id)
        .fetch_optional(conn)
        .await
        .ctx("read cluster lock")?;
    r.map(|r| Ok(LockGrant { name: name.to_string(), gen_: get_i64(&r, "gen")? })).transpose()
}

/// Release a lock held by this run (no-op otherwise).
pub async fn lock_release(c: &mut dyn Sql, name: &str, ms_id: &str, run_id: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE cluster_lock SET holder_ms = NULL, holder_run = NULL, lease_until_ms = 0 WHERE name = ? AND holder_ms = ? AND holder_run = ?",
    )
    .bind(name)
    .bind(ms_id)
    .bind(run_id)
    .execute(conn)
    .await
    .ctx("release cluster lock")?
    .rows_affected();
    Ok(n == 1)
}

/// Release every lock a server holds (it was declared down).
pub async fn lock_release_all_of(c: &mut dyn Sql, ms_id: &str) -> Result<u64, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE cluster_lock SET holder_ms = NULL, holder_run = NULL, lease_until_ms = 0 WHERE holder_ms = ?",
    )
    .bind(ms_id)
    .execute(conn)
    .await
    .ctx("release cluster locks")?
    .rows_affected();
    Ok(n)
}

/// Ask a server to drain (`prepareForShutdown`, `skyhold cluster drain`): Up -> PreparingForShutdown.
/// The server notices within one heartbeat interval.
pub async fn ms_request_drain(c: &mut dyn Sql, id: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE management_server SET state = 'PreparingForShutdown' WHERE id = ? AND state = 'Up'")
        .bind(id)
        .execute(conn)
        .await
        .ctx("request drain")?
        .rows_affected();
    Ok(n == 1)
}

/// Cancel a drain (`cancelShutdown`): PreparingForShutdown/ReadyForShutdown -> Up.
pub async fn ms_cancel_drain(c: &mut dyn Sql, id: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE management_server SET state = 'Up' WHERE id = ? AND state IN ('PreparingForShutdown', 'ReadyForShutdown')",
    )
    .bind(id)
    .execute(conn)
    .await
    .ctx("cancel drain")?
    .rows_affected();
    Ok(n == 1)
}

/// Move this run's row from `from` to `to` (false if it is not in `from`: e.g. a cancelled drain).
pub async fn ms_transition(c: &mut dyn Sql, id: &str, run_id: &str, from: &str, to: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE management_server SET state = ? WHERE id = ? AND run_id = ? AND state = ?")
        .bind(to)
        .bind(id)
        .bind(run_id)
        .bind(from)
        .execute(conn)
        .await
        .ctx("change management server state")?
        .rows_affected();
    Ok(n == 1)
}

/// Is the row of `id` still Down with run `run_id`? Locks the row (MySQL) so a concurrent
/// re-registration of the same id waits for the caller's transaction.
pub async fn ms_is_down_run(c: &mut dyn Sql, id: &str, run_id: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let r = sqlx::query(&sql(dl, "SELECT state, run_id FROM management_server WHERE id = ? {for_update}"))
        .bind(id)
        .fetch_optional(conn)
        .await
        .ctx("read management server")?;
    match r {
        Some(r) => Ok(get_str(&r, "state")? == "Down" && get_str(&r, "run_id")? == run_id),
        None => Ok(false),
    }
}

/// Who holds a named lock now (holder id, lease left in ms on the database clock), if anyone
/// holds it with a live lease.
pub async fn lock_holder(c: &mut dyn Sql, name: &str) -> Result<Option<(String, i64)>, DbError> {
    let (conn, dl) = c.parts();
    let r = sqlx::query(&sql(
        dl,
        "SELECT holder_ms, lease_until_ms - {now} AS left_ms FROM cluster_lock WHERE name = ? \
         AND holder_ms IS NOT NULL AND lease_until_ms >= {now}",
    ))
    .bind(name)
    .fetch_optional(conn)
    .await
    .ctx("read cluster lock")?;
    r.map(|r| Ok((get_str(&r, "holder_ms")?, get_i64(&r, "left_ms")?))).transpose()
}
