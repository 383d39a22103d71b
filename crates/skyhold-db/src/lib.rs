//! Storage: the schema, its migrations and every SQL query Skyhold runs, for SQLite (the embedded
//! default, WAL mode) and MariaDB/MySQL, behind one API.
//!
//! Query functions are named resource first, then verb (`vm_fetch`, `host_list`, `job_claim`), take
//! a `&mut dyn Sql` (a pooled connection or a transaction) and return plain row structs.
//!
//! Times are epoch milliseconds read from the **database clock** (`{now}` in the SQL below), never
//! from a management server's clock.
//!
//! **Architecture Invariant:** only this crate speaks SQL. Every multi-row change goes through
//! [`retry_tx!`], which runs the body in one transaction and reruns it on deadlocks, lock-wait
//! timeouts, Galera certification failures and SQLite busy errors.

pub mod account;
pub mod config;
pub mod crypto;
pub mod event;
pub mod ha;
pub mod hostha;
pub mod infra;
pub mod job;
pub mod migrate;
pub mod ms;
pub mod props;
pub mod secrets;
pub mod vm;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Row};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

pub use sqlx::any::AnyRow;

/// Which SQL dialect the database speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
}

/// Storage errors. `is_retryable` tells the transaction helper whether rerunning may succeed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    // The cause is part of the message (the seed's debugging string names it) and deliberately
    // not a `#[source]`, so error chains do not print it twice.
    #[error("Unable to get a connection from the database pool ({endpoint}): {cause}")]
    Connect {
        endpoint: String,
        cause: sqlx::Error,
        /// Another endpoint may take over (several endpoints): worth retrying the transaction.
        failover: bool,
    },
    #[error("database error while trying to {what}: {source}")]
    Sql {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("unsupported database URL '{0}': use sqlite://PATH or mysql://USER:PASS@HOST:PORT/DB")]
    BadUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    Crypto(String),
    #[error("transaction did not finish within {0:?} (database endpoint hung?)")]
    TxTimeout(Duration),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl DbError {
    /// What an operator should check, for the errors that stop a server from starting.
    pub fn hint(&self) -> Option<&'static str> {
        let DbError::Connect { cause, .. } = self else { return None };
        match cause {
            sqlx::Error::Database(d) => match d.code().as_deref() {
                Some("28000") => Some(
                    "check the database user and password (db.cloud.username / db.cloud.password, or the --db URL) \
                     and that the user may connect from this host",
                ),
                Some("42000") if d.message().contains("Unknown database") => {
                    Some("check the database name (db.cloud.name, or the --db URL), or run `skyhold db init`")
                }
                _ => None,
            },
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => Some(
                "check that the database server runs and listens at that address (db.cloud.host / db.cloud.port, \
                 or the --db URL), and that no firewall is in the way",
            ),
            _ => None,
        }
    }

    /// Transient conflicts that a rerun of the whole transaction may resolve.
    pub fn is_retryable(&self) -> bool {
        let src = match self {
            DbError::TxTimeout(_) => return true,
            DbError::Sql { source, .. } => source,
            // A lost or refused connection: the transaction may succeed on a retry (after the
            // connector failed over, or once the node is back). Bounded by TX_ATTEMPTS.
            DbError::Connect { cause: source, failover, .. } => {
                return *failover
                    && matches!(source, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed);
            }
            _ => return false,
        };
        match src {
            sqlx::Error::Database(e) => {
                let code = e.code().map(|c| c.to_string()).unwrap_or_default();
                let msg = e.message();
                // MySQL: 1213 deadlock, 1205 lock wait timeout, 1180/1317 interrupted, 1047 wsrep not ready
                // (Galera certification failures surface as 1213). sqlx reports SQLSTATE for MySQL.
                // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED, 517 SQLITE_BUSY_SNAPSHOT.
                matches!(code.as_str(), "40001" | "5" | "6" | "517" | "261" | "262")
                    || msg.contains("Deadlock found")
                    || msg.contains("Lock wait timeout")
                    || msg.contains("database is locked")
                    || msg.contains("database table is locked")
                    || msg.contains("WSREP")
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
            _ => false,
        }
    }

    /// Did the statement fail on a UNIQUE constraint?
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sql { source: sqlx::Error::Database(e), .. } => {
                matches!(e.kind(), sqlx::error::ErrorKind::UniqueViolation)
                    || e.message().contains("Duplicate entry")
                    || e.message().contains("UNIQUE constraint failed")
            }
            _ => false,
        }
    }
}

/// Attach a verb phrase to a sqlx error.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, DbError>;
}

impl<T> Ctx<T> for Result<T, sqlx::Error> {
    fn ctx(self, what: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Sql { what, source })
    }
}

/// A handle queries run on: a pooled connection or an open transaction, with its dialect.
pub trait Sql: Send {
    fn parts(&mut self) -> (&mut AnyConnection, Dialect);
}

/// A pooled connection.
pub struct Conn {
    inner: sqlx::pool::PoolConnection<Any>,
    dialect: Dialect,
}

impl Sql for Conn {
    fn parts(&mut self) -> (&mut AnyConnection, Dialect) {
        (&mut self.inner, self.dialect)
    }
}

/// An open transaction. Dropped without [`Tx::commit`] it rolls back.
pub struct Tx {
    inner: sqlx::Transaction<'static, Any>,
    dialect: Dialect,
}

impl Sql for Tx {
    fn parts(&mut self) -> (&mut AnyConnection, Dialect) {
        (&mut self.inner, self.dialect)
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), DbError> {
        self.inner.commit().await.ctx("commit transaction")
    }
    pub async fn rollback(self) -> Result<(), DbError> {
        self.inner.rollback().await.ctx("roll back transaction")
    }
}

/// Rewrite dialect placeholders: `{now}` is the database clock in epoch milliseconds.
pub(crate) fn sql(d: Dialect, s: &str) -> Cow<'_, str> {
    if !s.contains('{') {
        return Cow::Borrowed(s);
    }
    let now = match d {
        Dialect::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
        Dialect::MySql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    };
    let for_update = match d {
        Dialect::Sqlite => "",
        Dialect::MySql => "FOR UPDATE",
    };
    let int = match d {
        Dialect::Sqlite => "INTEGER",
        Dialect::MySql => "SIGNED",
    };
    Cow::Owned(s.replace("{now}", now).replace("{for_update}", for_update).replace("{int}", int))
}

/// The connection pools (one per database endpoint) and the dialect. Cheap to clone.
///
/// With one endpoint (the default) every call uses it. With several (`Db::connect_many`, the
/// database-HA topologies) every call uses the *active* one, which `ha::monitor` chooses from
/// health checks; see `ha.rs`.
#[derive(Clone)]
pub struct Db {
    inner: std::sync::Arc<ha::Endpoints>,
    dialect: Dialect,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `sqlite://PATH` or `mysql://USER:PASS@HOST:PORT/DB`.
    pub url: String,
    pub max_connections: u32,
    /// Create the database (MySQL) or the file (SQLite) if it does not exist.
    pub create: bool,
}

/// The URL with its password hidden, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Db {
    /// Open the pool. For SQLite this switches the file to WAL mode.
    pub async fn connect(cfg: &DbConfig) -> Result<Db, DbError> {
        let (pool, dialect, endpoint) = Self::open_pool(cfg, false, false).await?;
        Ok(Db { inner: std::sync::Arc::new(ha::Endpoints::single(endpoint, pool)), dialect })
    }

    /// Open one pool per endpoint URL (MariaDB/MySQL), for a Galera cluster or a replicated pair.
    /// Pools connect lazily; the first healthy endpoint (in the given order) becomes active.
    pub async fn connect_many(
        urls: &[String],
        max_connections: u32,
        create: bool,
        policy: ha::Policy,
    ) -> Result<Db, DbError> {
        let mut eps = Vec::new();
        for (i, u) in urls.iter().enumerate() {
            let cfg = DbConfig { url: u.clone(), max_connections, create: create && i == 0 };
            let (pool, dialect, endpoint) =
                Self::open_pool(&cfg, policy.topology == ha::Topology::Galera, true).await?;
            if dialect != Dialect::MySql {
                return Err(DbError::BadUrl(format!("{endpoint}: several endpoints need MariaDB/MySQL URLs")));
            }
            eps.push((endpoint, pool));
        }
        let db = Db { inner: std::sync::Arc::new(ha::Endpoints::many(eps, policy)), dialect: Dialect::MySql };
        db.inner.check_all().await;
        if db.inner.healthy_count() == 0 {
            return Err(DbError::Schema(format!(
                "no database endpoint is usable ({}): check that the servers run and, for Galera, that a node \
                 is Synced in the Primary component",
                db.inner.describe()
            )));
        }
        Ok(db)
    }

    /// `galera`: causal reads. `several`: one of several endpoints (short acquire timeout, so a
    /// dead endpoint fails fast and the transaction is retried on the next one).
    async fn open_pool(cfg: &DbConfig, galera: bool, several: bool) -> Result<(AnyPool, Dialect, String), DbError> {
        sqlx::any::install_default_drivers();
        let endpoint = redact_url(&cfg.url);
        let (dialect, url) = if let Some(path) = cfg.url.strip_prefix("sqlite://") {
            let mode = if cfg.create { "rwc" } else { "rw" };
            (Dialect::Sqlite, format!("sqlite://{path}?mode={mode}"))
        } else if cfg.url.starts_with("mysql://") || cfg.url.starts_with("mariadb://") {
            let url = cfg.url.replacen("mariadb://", "mysql://", 1);
            if cfg.create {
                Self::mysql_create_database(&url, &endpoint).await?;
            }
            (Dialect::MySql, url)
        } else {
            return Err(DbError::BadUrl(endpoint));
        };
        let opts = AnyConnectOptions::from_str(&url).map_err(|source| DbError::Connect {
            endpoint: endpoint.clone(),
            cause: source,
            failover: false,
        })?;
        let max = match dialect {
            Dialect::Sqlite => cfg.max_connections.clamp(1, 8),
            Dialect::MySql => cfg.max_connections.max(1),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .min_connections(0)
            .acquire_timeout(if several { Duration::from_millis(1500) } else { Duration::from_secs(10) })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if galera {
                        // Causal reads: a read waits until this node has applied every write the
                        // cluster committed before it (read-your-writes across nodes).
                        sqlx::query("SET SESSION wsrep_sync_wait = 1").execute(&mut *conn).await?;
                    }
                    let stmts: &[&str] = match dialect {
                        Dialect::Sqlite => {
                            &["PRAGMA busy_timeout = 10000", "PRAGMA synchronous = NORMAL", "PRAGMA foreign_keys = OFF"]
                        }
                        Dialect::MySql => &[
                            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                            "SET time_zone = '+00:00'",
                            "SET SESSION sql_mode = 'STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION'",
                        ],
                    };
                    for s in stmts {
                        sqlx::query(s).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(opts);
        if dialect == Dialect::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_optional(&pool)
                .await
                .map_err(|source| DbError::Connect { endpoint: endpoint.clone(), cause: source, failover: false })?;
        } else if !several {
            // Fail fast on a wrong URL, credentials or address, with the real cause (a pool would
            // keep retrying the connect until its acquire timeout and only say "timed out").
            use sqlx::ConnectOptions;
            let c = tokio::time::timeout(Duration::from_secs(10), pool.connect_options().connect())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
                .map_err(|source| DbError::Connect { endpoint: endpoint.clone(), cause: source, failover: false })?;
            let _ = c.close().await;
        }
        Ok((pool, dialect, endpoint))
    }

    async fn mysql_create_database(url: &str, endpoint: &str) -> Result<(), DbError> {
        // Split off the database name: mysql://user:pass@host:port/NAME?opts
        let after = url.find("://").map(|i| i + 3).unwrap_or(0);
        let Some(slash) = url[after..].find('/').map(|i| i + after) else {
            return Err(DbError::BadUrl(endpoint.to_string()));
        };
        let rest = &url[slash + 1..];
        let name = rest.split('?').next().unwrap_or("");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::BadUrl(format!("{endpoint} (the database name must be letters, digits and _)")));
        }
        let server_url = &url[..slash];
        let mut conn = AnyConnection::connect(server_url).await.map_err(|source| DbError::Connect {
            endpoint: endpoint.to_string(),
            cause: source,
            failover: false,
        })?;
        sqlx::query(&format!("CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
            .execute(&mut conn)
            .await
            .ctx("create database")?;
        let _ = conn.close().await;
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// How long one transaction attempt may take before `retry_tx!` abandons it: short with
    /// several endpoints (a hung node must not hold work), generous with one.
    pub fn tx_timeout(&self) -> Duration {
        if self.inner.several() { Duration::from_secs(5) } else { Duration::from_secs(120) }
    }

    /// Are there several endpoints to fail over between?
    pub fn has_failover(&self) -> bool {
        self.inner.several()
    }

    /// The active endpoint with its password hidden.
    pub fn endpoint(&self) -> String {
        self.inner.active_name()
    }

    /// Every endpoint with its role and health (for `db status` / `cluster status`).
    pub fn endpoints_status(&self) -> Vec<ha::EndpointStatus> {
        self.inner.status()
    }

    /// Failovers and replication changes seen since the last call, for the event log.
    pub fn take_notices(&self) -> Vec<ha::DbNotice> {
        self.inner.take_notices()
    }

    /// Watch the endpoints' health and fail over (several endpoints only; returns at once otherwise).
    pub async fn monitor(&self) {
        ha::monitor(self.inner.clone()).await
    }

    /// A pooled connection for reads and single-statement writes. With several endpoints, a
    /// failed acquire waits (bounded by [`FAILOVER_WAIT`]) while the monitor moves to a healthy
    /// endpoint, so callers arriving during a failover wait instead of failing.
    pub async fn conn(&self) -> Result<Conn, DbError> {
        let deadline = std::time::Instant::now() + FAILOVER_WAIT;
        loop {
            let (name, pool) = self.inner.active();
            match pool.acquire().await {
                Ok(inner) => return Ok(Conn { inner, dialect: self.dialect }),
                Err(source) => {
                    if let Some(e) = self.acquire_failed(name, source, deadline).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Begin a transaction (waiting through a failover like [`Db::conn`]). Use [`retry_tx!`]
    /// rather than calling this directly.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let deadline = std::time::Instant::now() + FAILOVER_WAIT;
        loop {
            let (name, pool) = self.inner.active();
            match pool.begin().await {
                Ok(inner) => return Ok(Tx { inner, dialect: self.dialect }),
                Err(source) => {
                    if let Some(e) = self.acquire_failed(name, source, deadline).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// A connection could not be had: wake the monitor, and either wait a little and let the
    /// caller try again (None: several endpoints, before the deadline) or give the error.
    async fn acquire_failed(
        &self,
        endpoint: String,
        cause: sqlx::Error,
        deadline: std::time::Instant,
    ) -> Option<DbError> {
        self.inner.suspect();
        let several = self.inner.several();
        let transient = matches!(cause, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_));
        let e = DbError::Connect { endpoint, cause, failover: several };
        if several && transient && std::time::Instant::now() < deadline {
            tracing::debug!(error = %e, "database connection failed; waiting for the failover");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return None;
        }
        tracing::warn!(error = %e, "database connection failed");
        Some(e)
    }

    /// Current time on the database clock, epoch milliseconds.
    pub async fn now_ms(&self) -> Result<i64, DbError> {
        let mut c = self.conn().await?;
        now_ms(&mut c).await
    }

    /// Is the database reachable right now?
    pub async fn ping(&self) -> bool {
        self.now_ms().await.is_ok()
    }

    pub async fn close(&self) {
        self.inner.close().await;
    }
}

/// The database clock, epoch milliseconds.
pub async fn now_ms(c: &mut dyn Sql) -> Result<i64, DbError> {
    let (conn, d) = c.parts();
    let q = sql(d, "SELECT {now}");
    let row = sqlx::query(&q).fetch_one(conn).await.ctx("read database clock")?;
    row.try_get::<i64, _>(0).ctx("read database clock")
}

/// Errors that may ask for their transaction to be rerun.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

impl Retryable for DbError {
    fn is_retryable(&self) -> bool {
        DbError::is_retryable(self)
    }
}

/// How long [`Db::conn`] and [`Db::begin`] wait for a usable endpoint during a failover (several
/// endpoints only; with one endpoint an error is returned at once).
pub const FAILOVER_WAIT: Duration = Duration::from_secs(6);

/// Upper bound on attempts of one transaction in [`retry_tx!`].
pub const TX_ATTEMPTS: u32 = 8;

/// Back-off before attempt `n` (1-based) of a retried transaction: 5, 10, 20 ... ms, capped, jittered.
pub fn tx_backoff(n: u32) -> Duration {
    let base = 5u64 << n.min(7);
    let jitter = rand::random::<u64>() % (base / 2 + 1);
    Duration::from_millis(base.min(400) + jitter)
}

/// Run `$body` inside one transaction on `$db`, binding the transaction to `$tx`, and commit.
/// `$body` evaluates to `Result<T, E>` where `E: From<DbError> + Retryable`. On a retryable error
/// (from the body or the commit) the transaction is rolled back and the body rerun, up to
/// [`TX_ATTEMPTS`] times. The body must therefore be safe to rerun: it only touches the database
/// through `$tx`.
#[macro_export]
macro_rules! retry_tx {
    ($db:expr, |$tx:ident| $body:expr) => {{
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let limit = $db.tx_timeout();
            let res = match ::tokio::time::timeout(limit, async {
                #[allow(unused_mut)]
                let mut $tx = $db.begin().await?;
                let v = { $body };
                match v {
                    Ok(v) => {
                        $tx.commit().await?;
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = $tx.rollback().await;
                        Err(e)
                    }
                }
            })
            .await
            {
                Ok(r) => r,
                // A hung endpoint: drop the transaction (its connection with it) and rerun it,
                // by then on the endpoint the monitor moved to.
                Err(_) => Err($crate::DbError::TxTimeout(limit).into()),
            };
            match res {
                Err(e) if $crate::Retryable::is_retryable(&e) && attempt < $crate::TX_ATTEMPTS => {
                    ::tracing::debug!(attempt, "retrying transaction after a transient conflict");
                    ::tokio::time::sleep($crate::tx_backoff(attempt)).await;
                    continue;
                }
                other => break other,
            }
        }
    }};
}

/// Integer column helpers (all integers are BIGINT in the schema, decoded as i64).
pub(crate) fn get_i64(r: &AnyRow, col: &str) -> Result<i64, DbError> {
    r.try_get::<i64, _>(col).ctx("decode integer column")
}
pub(crate) fn get_opt_i64(r: &AnyRow, col: &str) -> Result<Option<i64>, DbError> {
    r.try_get::<Option<i64>, _>(col).ctx("decode integer column")
}
/// Text columns. MySQL reports `TEXT` as a BLOB type through the Any driver, so bytes are
/// accepted too (and must be UTF-8).
pub(crate) fn get_str(r: &AnyRow, col: &str) -> Result<String, DbError> {
    get_opt_str(r, col)?.ok_or_else(|| DbError::Corrupt(format!("column {col} is NULL")))
}
pub(crate) fn get_opt_str(r: &AnyRow, col: &str) -> Result<Option<String>, DbError> {
    match r.try_get::<Option<String>, _>(col) {
        Ok(v) => Ok(v),
        Err(sqlx::Error::ColumnDecode { .. }) => {
            let b = r.try_get::<Option<Vec<u8>>, _>(col).ctx("decode text column")?;
            b.map(|b| String::from_utf8(b).map_err(|_| DbError::Corrupt(format!("column {col} is not UTF-8"))))
                .transpose()
        }
        Err(e) => Err(DbError::Sql { what: "decode text column", source: e }),
    }
}
pub(crate) fn get_bool(r: &AnyRow, col: &str) -> Result<bool, DbError> {
    Ok(get_i64(r, col)? != 0)
}

/// A value bound into a dynamically built query.
#[derive(Debug, Clone)]
pub enum Bind {
    I(i64),
    S(String),
}

pub(crate) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::I(i) => q.bind(*i),
            Bind::S(s) => q.bind(s.as_str()),
        };
    }
    q
}

/// Paging for list queries: 1-based `page`, `size` rows.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub page: u64,
    pub size: u64,
}

impl Page {
    pub fn limit_clause(&self) -> String {
        let offset = self.page.saturating_sub(1).saturating_mul(self.size);
        format!(" LIMIT {} OFFSET {}", self.size, offset)
    }
}

/// Escape `%`, `_` and `!` for a LIKE pattern used with `ESCAPE '!'` (not a backslash: MySQL
/// and SQLite disagree on backslashes in string literals).
pub fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '!') {
            out.push('!');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("mysql://u:secret@h:3306/db"), "mysql://u:***@h:3306/db");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    #[test]
    fn like_escaping() {
        assert_eq!(like_escape("a%b_c!"), "a!%b!_c!!");
    }
}
