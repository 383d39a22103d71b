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

/// Renew the heartbeat of this run. False if the row now belongs to another run or says Down.
pub async fn ms_heartbeat(c: &mut dyn Sql, id: &str, run_id: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE management_server SET last_heartbeat_ms = {now} WHERE id = ? AND run_id = ? AND state <> 'Down'",
    ))
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
         last_heartbeat_ms, started_ms, created_ms, {now} - last_heartbeat_ms AS age FROM management_server ORDER BY created_ms, id",
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
            })
        })
        .collect()
}
