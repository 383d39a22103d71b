//! Domains, accounts, users and login sessions.

use crate::{Ctx, DbError, Sql, get_i64, get_opt_str, get_str, sql};

#[derive(Debug, Clone)]
pub struct Domain {
    pub id: String,
    pub name: String,
    pub path: String,
    pub parent_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub account_type: i64,
    pub state: String,
}

/// A user joined with its account and domain: everything authentication needs.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub account_id: String,
    pub account_name: String,
    pub account_type: i64,
    pub domain_id: String,
    pub domain_name: String,
    pub domain_path: String,
    pub password_hash: String,
    pub api_key: Option<String>,
    pub secret_enc: Option<String>,
    pub firstname: String,
    pub lastname: String,
    pub email: String,
    pub state: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub csrf_key: String,
    pub last_used_ms: i64,
    pub timeout_s: i64,
}

pub async fn domain_insert(c: &mut dyn Sql, d: &Domain) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(dl, "INSERT INTO domain (id, name, path, parent_id, created_ms) VALUES (?, ?, ?, ?, {now})"))
        .bind(&d.id)
        .bind(&d.name)
        .bind(&d.path)
        .bind(d.parent_id.clone())
        .execute(conn)
        .await
        .ctx("insert domain")?;
    Ok(())
}

pub async fn domain_list(c: &mut dyn Sql) -> Result<Vec<Domain>, DbError> {
    let (conn, _) = c.parts();
    let rows = sqlx::query("SELECT id, name, path, parent_id FROM domain ORDER BY path")
        .fetch_all(conn)
        .await
        .ctx("list domains")?;
    rows.iter()
        .map(|r| {
            Ok(Domain {
                id: get_str(r, "id")?,
                name: get_str(r, "name")?,
                path: get_str(r, "path")?,
                parent_id: get_opt_str(r, "parent_id")?,
            })
        })
        .collect()
}

pub async fn account_insert(c: &mut dyn Sql, a: &Account) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO account (id, name, domain_id, type, state, created_ms) VALUES (?, ?, ?, ?, ?, {now})",
    ))
    .bind(&a.id)
    .bind(&a.name)
    .bind(&a.domain_id)
    .bind(a.account_type)
    .bind(&a.state)
    .execute(conn)
    .await
    .ctx("insert account")?;
    Ok(())
}

/// Fields of a new user.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: String,
    pub account_id: String,
    pub username: String,
    pub password_hash: String,
    pub api_key: Option<String>,
    pub secret_enc: Option<String>,
    pub firstname: String,
    pub lastname: String,
    pub email: String,
}

pub async fn user_insert(c: &mut dyn Sql, u: &NewUser) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO users (id, account_id, username, password_hash, api_key, secret_enc, firstname, \
         lastname, email, state, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'enabled', {now})",
    ))
    .bind(&u.id)
    .bind(&u.account_id)
    .bind(&u.username)
    .bind(&u.password_hash)
    .bind(u.api_key.clone())
    .bind(u.secret_enc.clone())
    .bind(&u.firstname)
    .bind(&u.lastname)
    .bind(&u.email)
    .execute(conn)
    .await
    .ctx("insert user")?;
    Ok(())
}

const USER_SELECT: &str = "SELECT u.id, u.username, u.account_id, a.name AS account_name, \
     a.type AS account_type, a.domain_id, d.name AS domain_name, d.path AS domain_path, \
     u.password_hash, u.api_key, u.secret_enc, u.firstname, u.lastname, u.email, u.state, u.created_ms \
     FROM users u JOIN account a ON a.id = u.account_id JOIN domain d ON d.id = a.domain_id \
     WHERE u.removed_ms IS NULL AND a.removed_ms IS NULL";

fn user_from_row(r: &crate::AnyRow) -> Result<User, DbError> {
    Ok(User {
        id: get_str(r, "id")?,
        username: get_str(r, "username")?,
        account_id: get_str(r, "account_id")?,
        account_name: get_str(r, "account_name")?,
        account_type: get_i64(r, "account_type")?,
        domain_id: get_str(r, "domain_id")?,
        domain_name: get_str(r, "domain_name")?,
        domain_path: get_str(r, "domain_path")?,
        password_hash: get_str(r, "password_hash")?,
        api_key: get_opt_str(r, "api_key")?,
        secret_enc: get_opt_str(r, "secret_enc")?,
        firstname: get_str(r, "firstname")?,
        lastname: get_str(r, "lastname")?,
        email: get_str(r, "email")?,
        state: get_str(r, "state")?,
        created_ms: get_i64(r, "created_ms")?,
    })
}

pub async fn user_fetch_by_api_key(c: &mut dyn Sql, key: &str) -> Result<Option<User>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("{USER_SELECT} AND u.api_key = ?");
    let row = sqlx::query(&q).bind(key).fetch_optional(conn).await.ctx("fetch user by key")?;
    row.as_ref().map(user_from_row).transpose()
}

pub async fn user_fetch(c: &mut dyn Sql, id: &str) -> Result<Option<User>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("{USER_SELECT} AND u.id = ?");
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch user")?;
    row.as_ref().map(user_from_row).transpose()
}

/// Users with this name in the domain with this path (`ROOT` is `/`).
pub async fn user_fetch_by_name(c: &mut dyn Sql, username: &str, domain_path: &str) -> Result<Option<User>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("{USER_SELECT} AND u.username = ? AND d.path = ?");
    let row = sqlx::query(&q).bind(username).bind(domain_path).fetch_optional(conn).await.ctx("fetch user by name")?;
    row.as_ref().map(user_from_row).transpose()
}

pub async fn user_list(c: &mut dyn Sql) -> Result<Vec<User>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("{USER_SELECT} ORDER BY u.created_ms");
    let rows = sqlx::query(&q).fetch_all(conn).await.ctx("list users")?;
    rows.iter().map(user_from_row).collect()
}

pub async fn session_insert(c: &mut dyn Sql, s: &Session) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO session (id, user_id, csrf_key, created_ms, last_used_ms, timeout_s) \
         VALUES (?, ?, ?, {now}, {now}, ?)",
    ))
    .bind(&s.id)
    .bind(&s.user_id)
    .bind(&s.csrf_key)
    .bind(s.timeout_s)
    .execute(conn)
    .await
    .ctx("insert session")?;
    Ok(())
}

/// Fetch a session that has not timed out, refreshing its last use; `None` if unknown or stale.
pub async fn session_touch(c: &mut dyn Sql, id: &str) -> Result<Option<Session>, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE session SET last_used_ms = {now} WHERE id = ? AND last_used_ms + timeout_s * 1000 > {now}",
    ))
    .bind(id)
    .execute(&mut *conn)
    .await
    .ctx("refresh session")?
    .rows_affected();
    if n == 0 {
        return Ok(None);
    }
    let row = sqlx::query("SELECT id, user_id, csrf_key, last_used_ms, timeout_s FROM session WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await
        .ctx("fetch session")?;
    row.map(|r| {
        Ok(Session {
            id: get_str(&r, "id")?,
            user_id: get_str(&r, "user_id")?,
            csrf_key: get_str(&r, "csrf_key")?,
            last_used_ms: get_i64(&r, "last_used_ms")?,
            timeout_s: get_i64(&r, "timeout_s")?,
        })
    })
    .transpose()
}

pub async fn session_delete(c: &mut dyn Sql, id: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("DELETE FROM session WHERE id = ?")
        .bind(id)
        .execute(conn)
        .await
        .ctx("delete session")?
        .rows_affected();
    Ok(n > 0)
}

/// Remove sessions idle past their timeout. Returns how many.
pub async fn session_purge(c: &mut dyn Sql) -> Result<u64, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(dl, "DELETE FROM session WHERE last_used_ms + timeout_s * 1000 <= {now}"))
        .execute(conn)
        .await
        .ctx("purge sessions")?
        .rows_affected();
    Ok(n)
}
