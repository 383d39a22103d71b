//! Global settings (`configuration`) and cluster metadata (`cloud_meta`).

use crate::{Ctx, DbError, Sql, get_i64, get_str, sql};

#[derive(Debug, Clone)]
pub struct ConfigRow {
    pub name: String,
    pub value: String,
    pub updated_ms: i64,
}

pub async fn config_list(c: &mut dyn Sql) -> Result<Vec<ConfigRow>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query("SELECT name, value, updated_ms FROM configuration ORDER BY name")
        .fetch_all(conn)
        .await
        .ctx("list settings")?;
    rows.iter()
        .map(|r| {
            Ok(ConfigRow {
                name: get_str(r, "name")?,
                value: get_str(r, "value")?,
                updated_ms: get_i64(r, "updated_ms")?,
            })
        })
        .collect()
}

/// Set a setting (insert or update) and bump the settings sequence, which every server polls.
pub async fn config_set(c: &mut dyn Sql, name: &str, value: &str) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query("UPDATE config_seq SET seq = seq + 1 WHERE id = 1")
        .execute(&mut *conn)
        .await
        .ctx("bump settings sequence")?;
    let n = sqlx::query(&sql(dl, "UPDATE configuration SET value = ?, updated_ms = {now} WHERE name = ?"))
        .bind(value)
        .bind(name)
        .execute(&mut *conn)
        .await
        .ctx("update setting")?
        .rows_affected();
    if n == 0 {
        sqlx::query(&sql(dl, "INSERT INTO configuration (name, value, updated_ms) VALUES (?, ?, {now})"))
            .bind(name)
            .bind(value)
            .execute(conn)
            .await
            .ctx("insert setting")?;
    }
    Ok(())
}

/// The settings sequence: grows with every change (a counter, not a time, so two changes in the
/// same millisecond or from skewed clocks are both seen). Cheap to poll.
pub async fn config_version(c: &mut dyn Sql) -> Result<i64, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS s FROM config_seq")
        .fetch_one(conn)
        .await
        .ctx("read settings version")?;
    get_i64(&r, "s")
}

pub async fn meta_get(c: &mut dyn Sql, name: &str) -> Result<Option<String>, DbError> {
    let (conn, _) = c.parts();
    let r = sqlx::query("SELECT value FROM cloud_meta WHERE name = ?")
        .bind(name)
        .fetch_optional(conn)
        .await
        .ctx("read cluster metadata")?;
    r.map(|r| crate::get_str(&r, "value")).transpose()
}

/// Set `name` to `value` unless it already holds it; true if it changed. Row-locked (`FOR UPDATE`)
/// so that, among servers racing to record the same change, exactly one sees it change.
pub async fn meta_swap(c: &mut dyn Sql, name: &str, value: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let r = sqlx::query(&crate::sql(dl, "SELECT value FROM cloud_meta WHERE name = ? {for_update}"))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .ctx("read cluster metadata")?;
    let old = r.map(|r| crate::get_str(&r, "value")).transpose()?;
    if old.as_deref() == Some(value) {
        return Ok(false);
    }
    meta_set(c, name, value).await?;
    Ok(true)
}

pub async fn meta_set(c: &mut dyn Sql, name: &str, value: &str) -> Result<(), DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE cloud_meta SET value = ? WHERE name = ?")
        .bind(value)
        .bind(name)
        .execute(&mut *conn)
        .await
        .ctx("update cluster metadata")?
        .rows_affected();
    if n == 0 {
        sqlx::query("INSERT INTO cloud_meta (name, value) VALUES (?, ?)")
            .bind(name)
            .bind(value)
            .execute(conn)
            .await
            .ctx("insert cluster metadata")?;
    }
    Ok(())
}
