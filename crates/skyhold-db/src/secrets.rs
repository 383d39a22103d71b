//! Encrypted values at rest and the key-rotation state in `cloud_meta`: what a key rotation reads
//! and rewrites in its one transaction.
//!
//! Every value encrypted with the node key lives in `users.secret_enc` (API secret keys) or in
//! `cloud_meta` (`cluster_secret`, and `key_staged` while a rotation is staged). A new encrypted
//! column must be added to the rotation (`skyhold_core::keys::rotate_commit`).

use crate::{Ctx, DbError, Sql, get_opt_str, get_str, sql};

/// Read a `cloud_meta` value and lock its row until the transaction ends (`FOR UPDATE`; SQLite
/// serialises writers anyway). Writers of encrypted values lock `key_fingerprint` this way, so a
/// rotation and a writer never interleave.
pub async fn meta_get_locked(c: &mut dyn Sql, name: &str) -> Result<Option<String>, DbError> {
    let (conn, dl) = c.parts();
    let r = sqlx::query(&sql(dl, "SELECT value FROM cloud_meta WHERE name = ? {for_update}"))
        .bind(name)
        .fetch_optional(conn)
        .await
        .ctx("read cluster metadata")?;
    r.map(|r| get_str(&r, "value")).transpose()
}

/// Every `cloud_meta` entry whose name starts with `prefix`, by name.
pub async fn meta_list_prefix(c: &mut dyn Sql, prefix: &str) -> Result<Vec<(String, String)>, DbError> {
    let (conn, _) = c.parts();
    let pattern = format!("{}%", crate::like_escape(prefix));
    let rows = sqlx::query("SELECT name, value FROM cloud_meta WHERE name LIKE ? ESCAPE '!' ORDER BY name")
        .bind(pattern)
        .fetch_all(conn)
        .await
        .ctx("list cluster metadata")?;
    rows.iter().map(|r| Ok((get_str(r, "name")?, get_str(r, "value")?))).collect()
}

/// Insert a `cloud_meta` entry; false (and nothing changed) if the name exists.
pub async fn meta_insert_new(c: &mut dyn Sql, name: &str, value: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let q = match dl {
        crate::Dialect::Sqlite => "INSERT OR IGNORE INTO cloud_meta (name, value) VALUES (?, ?)",
        crate::Dialect::MySql => "INSERT IGNORE INTO cloud_meta (name, value) VALUES (?, ?)",
    };
    let n = sqlx::query(q).bind(name).bind(value).execute(conn).await.ctx("insert cluster metadata")?.rows_affected();
    Ok(n == 1)
}

/// Delete every `cloud_meta` entry whose name starts with `prefix`; returns how many.
pub async fn meta_delete_prefix(c: &mut dyn Sql, prefix: &str) -> Result<u64, DbError> {
    let (conn, _) = c.parts();
    let pattern = format!("{}%", crate::like_escape(prefix));
    Ok(sqlx::query("DELETE FROM cloud_meta WHERE name LIKE ? ESCAPE '!'")
        .bind(pattern)
        .execute(conn)
        .await
        .ctx("delete cluster metadata")?
        .rows_affected())
}

/// `(user id, secret_enc)` of every user holding an encrypted API secret, rows locked.
pub async fn user_secret_list(c: &mut dyn Sql) -> Result<Vec<(String, String)>, DbError> {
    let (conn, dl) = c.parts();
    let rows =
        sqlx::query(&sql(dl, "SELECT id, secret_enc FROM users WHERE secret_enc IS NOT NULL ORDER BY id {for_update}"))
            .fetch_all(conn)
            .await
            .ctx("list encrypted API secrets")?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(enc) = get_opt_str(r, "secret_enc")? {
            out.push((get_str(r, "id")?, enc));
        }
    }
    Ok(out)
}

/// Replace a user's encrypted API secret (same secret, new ciphertext).
pub async fn user_secret_set(c: &mut dyn Sql, user_id: &str, secret_enc: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE users SET secret_enc = ? WHERE id = ?")
        .bind(secret_enc)
        .bind(user_id)
        .execute(conn)
        .await
        .ctx("re-encrypt an API secret")?
        .rows_affected();
    Ok(n == 1)
}
