//! Versioned schema migrations, one list for both dialects.
//!
//! DDL uses three placeholders: `{pk}` (an auto-increment BIGINT primary key), `{engine}` (the
//! MySQL table options) and `{text_key}` (a text column usable in a unique key). Each migration's
//! version is recorded in `schema_version`; a database whose newest version is above
//! [`LATEST`] belongs to a newer Skyhold and is refused.
//!
//! MySQL commits DDL implicitly, so a migration is not atomic there: a crash mid-migration leaves
//! tables without the version row, and `db migrate` reports it instead of guessing.

use crate::{Ctx, Db, DbError, Dialect, Sql};
use sqlx::Row;

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: r#"
CREATE TABLE cloud_meta (
  name VARCHAR(64) NOT NULL PRIMARY KEY,
  value TEXT NOT NULL
){engine};

CREATE TABLE domain (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  path VARCHAR(255) NOT NULL,
  parent_id VARCHAR(64),
  created_ms BIGINT NOT NULL
){engine};

CREATE TABLE account (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  domain_id VARCHAR(64) NOT NULL,
  type BIGINT NOT NULL,
  state VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};
CREATE UNIQUE INDEX account_name ON account (domain_id, name);

CREATE TABLE users (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  account_id VARCHAR(64) NOT NULL,
  username VARCHAR(255) NOT NULL,
  password_hash TEXT NOT NULL,
  api_key VARCHAR(128),
  secret_enc TEXT,
  firstname VARCHAR(255) NOT NULL,
  lastname VARCHAR(255) NOT NULL,
  email VARCHAR(255) NOT NULL,
  state VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};
CREATE UNIQUE INDEX users_api_key ON users (api_key);
CREATE INDEX users_username ON users (username);

CREATE TABLE session (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  user_id VARCHAR(64) NOT NULL,
  csrf_key VARCHAR(64) NOT NULL,
  created_ms BIGINT NOT NULL,
  last_used_ms BIGINT NOT NULL,
  timeout_s BIGINT NOT NULL
){engine};

CREATE TABLE zone (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  description VARCHAR(255) NOT NULL,
  network_type VARCHAR(32) NOT NULL,
  dns1 VARCHAR(64) NOT NULL,
  internal_dns1 VARCHAR(64) NOT NULL,
  allocation_state VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL
){engine};
CREATE UNIQUE INDEX zone_name ON zone (name);

CREATE TABLE pod (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  zone_id VARCHAR(64) NOT NULL,
  name VARCHAR(255) NOT NULL,
  gateway VARCHAR(64) NOT NULL,
  netmask VARCHAR(64) NOT NULL,
  start_ip VARCHAR(64) NOT NULL,
  end_ip VARCHAR(64) NOT NULL,
  allocation_state VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL
){engine};

CREATE TABLE pod_ip (
  pod_id VARCHAR(64) NOT NULL,
  ip_num BIGINT NOT NULL,
  ip VARCHAR(64) NOT NULL,
  nic_id VARCHAR(64),
  PRIMARY KEY (pod_id, ip_num)
){engine};
CREATE INDEX pod_ip_free ON pod_ip (pod_id, nic_id);

CREATE TABLE cluster (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  zone_id VARCHAR(64) NOT NULL,
  pod_id VARCHAR(64) NOT NULL,
  name VARCHAR(255) NOT NULL,
  hypervisor VARCHAR(32) NOT NULL,
  allocation_state VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL
){engine};

CREATE TABLE host (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  guid VARCHAR(255) NOT NULL,
  name VARCHAR(255) NOT NULL,
  zone_id VARCHAR(64) NOT NULL,
  pod_id VARCHAR(64) NOT NULL,
  cluster_id VARCHAR(64) NOT NULL,
  ip VARCHAR(64) NOT NULL,
  hypervisor VARCHAR(32) NOT NULL,
  cpu_cores BIGINT NOT NULL,
  cpu_mhz BIGINT NOT NULL,
  mem_mb BIGINT NOT NULL,
  status VARCHAR(32) NOT NULL,
  resource_state VARCHAR(32) NOT NULL,
  mgmt_server_id VARCHAR(64),
  owner_gen BIGINT NOT NULL,
  agent_id VARCHAR(255) NOT NULL,
  version VARCHAR(64) NOT NULL,
  tags VARCHAR(255) NOT NULL,
  last_ping_ms BIGINT,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};
CREATE UNIQUE INDEX host_guid ON host (guid);
CREATE INDEX host_cluster ON host (cluster_id);
CREATE INDEX host_ms ON host (mgmt_server_id);

CREATE TABLE service_offering (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  display_text VARCHAR(255) NOT NULL,
  cpu BIGINT NOT NULL,
  cpu_mhz BIGINT NOT NULL,
  mem_mb BIGINT NOT NULL,
  offer_ha BIGINT NOT NULL,
  storage_type VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};

CREATE TABLE template (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  display_text VARCHAR(255) NOT NULL,
  os_type VARCHAR(255) NOT NULL,
  hypervisor VARCHAR(32) NOT NULL,
  format VARCHAR(32) NOT NULL,
  size_bytes BIGINT NOT NULL,
  zone_id VARCHAR(64),
  is_public BIGINT NOT NULL,
  featured BIGINT NOT NULL,
  account_id VARCHAR(64) NOT NULL,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};

CREATE TABLE vm_instance (
  seq {pk_col},
  id VARCHAR(64) NOT NULL,
  name VARCHAR(255) NOT NULL,
  display_name VARCHAR(255) NOT NULL,
  instance_name VARCHAR(255) NOT NULL,
  state VARCHAR(32) NOT NULL,
  account_id VARCHAR(64) NOT NULL,
  domain_id VARCHAR(64) NOT NULL,
  user_id VARCHAR(64) NOT NULL,
  zone_id VARCHAR(64) NOT NULL,
  pod_id VARCHAR(64),
  host_id VARCHAR(64),
  last_host_id VARCHAR(64),
  template_id VARCHAR(64) NOT NULL,
  offering_id VARCHAR(64) NOT NULL,
  cpu BIGINT NOT NULL,
  cpu_mhz BIGINT NOT NULL,
  mem_mb BIGINT NOT NULL,
  ha_enabled BIGINT NOT NULL,
  update_count BIGINT NOT NULL,
  state_reason TEXT,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};
CREATE UNIQUE INDEX vm_id ON vm_instance (id);
CREATE INDEX vm_account ON vm_instance (account_id);
CREATE INDEX vm_host ON vm_instance (host_id);
CREATE INDEX vm_state ON vm_instance (state);
CREATE INDEX vm_name ON vm_instance (name);

CREATE TABLE volume (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  vm_id VARCHAR(64),
  name VARCHAR(255) NOT NULL,
  vol_type VARCHAR(32) NOT NULL,
  size_bytes BIGINT NOT NULL,
  state VARCHAR(32) NOT NULL,
  zone_id VARCHAR(64) NOT NULL,
  account_id VARCHAR(64) NOT NULL,
  domain_id VARCHAR(64) NOT NULL,
  template_id VARCHAR(64),
  storage_type VARCHAR(32) NOT NULL,
  created_ms BIGINT NOT NULL,
  removed_ms BIGINT
){engine};
CREATE INDEX volume_vm ON volume (vm_id);

CREATE TABLE nic (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  vm_id VARCHAR(64) NOT NULL,
  pod_id VARCHAR(64) NOT NULL,
  ip VARCHAR(64) NOT NULL,
  netmask VARCHAR(64) NOT NULL,
  gateway VARCHAR(64) NOT NULL,
  mac VARCHAR(64) NOT NULL,
  is_default BIGINT NOT NULL,
  created_ms BIGINT NOT NULL
){engine};
CREATE INDEX nic_vm ON nic (vm_id);

CREATE TABLE async_job (
  seq {pk_col},
  id VARCHAR(64) NOT NULL,
  cmd VARCHAR(255) NOT NULL,
  user_id VARCHAR(64) NOT NULL,
  account_id VARCHAR(64) NOT NULL,
  domain_id VARCHAR(64) NOT NULL,
  instance_type VARCHAR(64),
  instance_id VARCHAR(64),
  params TEXT NOT NULL,
  status BIGINT NOT NULL,
  proc_status BIGINT NOT NULL,
  result_code BIGINT NOT NULL,
  result TEXT,
  step BIGINT NOT NULL,
  step_state TEXT NOT NULL,
  owner_ms VARCHAR(64),
  lease_gen BIGINT NOT NULL,
  lease_until_ms BIGINT NOT NULL,
  attempts BIGINT NOT NULL,
  created_ms BIGINT NOT NULL,
  updated_ms BIGINT NOT NULL,
  completed_ms BIGINT
){engine};
CREATE UNIQUE INDEX async_job_id ON async_job (id);
CREATE INDEX async_job_pending ON async_job (status, seq);
CREATE INDEX async_job_instance ON async_job (instance_id, status);
CREATE INDEX async_job_account ON async_job (account_id);

CREATE TABLE configuration (
  name VARCHAR(255) NOT NULL PRIMARY KEY,
  value TEXT NOT NULL,
  updated_ms BIGINT NOT NULL
){engine};

CREATE TABLE config_seq (
  id BIGINT NOT NULL PRIMARY KEY,
  seq BIGINT NOT NULL
){engine};
INSERT INTO config_seq (id, seq) VALUES (1, 0);

CREATE TABLE event (
  seq {pk_col},
  id VARCHAR(64) NOT NULL UNIQUE,
  type VARCHAR(64) NOT NULL,
  level VARCHAR(16) NOT NULL,
  state VARCHAR(32) NOT NULL,
  description TEXT NOT NULL,
  resource_type VARCHAR(64),
  resource_id VARCHAR(64),
  account_id VARCHAR(64) NOT NULL,
  domain_id VARCHAR(64) NOT NULL,
  user_id VARCHAR(64),
  created_ms BIGINT NOT NULL
){engine};
CREATE INDEX event_account ON event (account_id, seq);

CREATE TABLE cluster_lock (
  name VARCHAR(128) NOT NULL PRIMARY KEY,
  holder_ms VARCHAR(64),
  holder_run VARCHAR(64),
  gen BIGINT NOT NULL,
  lease_until_ms BIGINT NOT NULL
){engine};

CREATE TABLE management_server (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  run_id VARCHAR(64) NOT NULL,
  name VARCHAR(255) NOT NULL,
  version VARCHAR(64) NOT NULL,
  service_ip VARCHAR(64) NOT NULL,
  api_port BIGINT NOT NULL,
  agent_port BIGINT NOT NULL,
  cluster_port BIGINT NOT NULL,
  state VARCHAR(32) NOT NULL,
  last_heartbeat_ms BIGINT NOT NULL,
  started_ms BIGINT NOT NULL,
  created_ms BIGINT NOT NULL
){engine};
"#,
    },
    Migration {
        version: 2,
        name: "management_server.db_endpoint: the database endpoint each server writes to",
        sql: r#"
ALTER TABLE management_server ADD COLUMN db_endpoint VARCHAR(255) NOT NULL DEFAULT '';
"#,
    },
    Migration {
        version: 3,
        name: "host HA: HA state, storage heartbeat, out-of-band management, op_ha_work, alerts",
        sql: r#"
ALTER TABLE host ADD COLUMN ha_state VARCHAR(32) NOT NULL DEFAULT 'Available';
ALTER TABLE host ADD COLUMN ha_since_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN check_addr VARCHAR(255) NOT NULL DEFAULT '';
ALTER TABLE host ADD COLUMN hb_counter BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN hb_seen_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN disconnected_ms BIGINT NOT NULL DEFAULT 0;

CREATE TABLE host_oob (
  host_id VARCHAR(64) NOT NULL PRIMARY KEY,
  driver VARCHAR(32) NOT NULL,
  address VARCHAR(255) NOT NULL,
  port BIGINT NOT NULL,
  username VARCHAR(255) NOT NULL,
  password_enc TEXT NOT NULL,
  enabled BIGINT NOT NULL,
  power_state VARCHAR(32) NOT NULL,
  updated_ms BIGINT NOT NULL
){engine};

CREATE TABLE op_ha_work (
  seq {pk_col},
  id VARCHAR(64) NOT NULL,
  vm_id VARCHAR(64) NOT NULL,
  host_id VARCHAR(64) NOT NULL,
  zone_id VARCHAR(64) NOT NULL,
  cluster_id VARCHAR(64) NOT NULL,
  kind VARCHAR(32) NOT NULL,
  reason TEXT NOT NULL,
  state VARCHAR(32) NOT NULL,
  attempts BIGINT NOT NULL,
  job_id VARCHAR(64),
  next_try_ms BIGINT NOT NULL,
  last_error TEXT,
  created_ms BIGINT NOT NULL,
  updated_ms BIGINT NOT NULL,
  completed_ms BIGINT
){engine};
CREATE UNIQUE INDEX op_ha_work_id ON op_ha_work (id);
CREATE INDEX op_ha_work_state ON op_ha_work (state, next_try_ms);
CREATE INDEX op_ha_work_vm ON op_ha_work (vm_id, created_ms);

CREATE TABLE alert (
  seq {pk_col},
  id VARCHAR(64) NOT NULL,
  type BIGINT NOT NULL,
  name VARCHAR(64) NOT NULL,
  subject VARCHAR(255) NOT NULL,
  description TEXT NOT NULL,
  zone_id VARCHAR(64),
  pod_id VARCHAR(64),
  cluster_id VARCHAR(64),
  host_id VARCHAR(64),
  archived BIGINT NOT NULL,
  created_ms BIGINT NOT NULL
){engine};
CREATE UNIQUE INDEX alert_id ON alert (id);
CREATE INDEX alert_created ON alert (created_ms);
"#,
    },
];

/// Newest schema version this binary knows.
pub const LATEST: i64 = 3;

fn render(d: Dialect, s: &str) -> String {
    let (pk_col, engine) = match d {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", ""),
        Dialect::MySql => {
            ("BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY", " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
        }
    };
    s.replace("{pk_col}", pk_col).replace("{engine}", engine)
}

/// Where the schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Newest applied version, or `None` if the database is empty.
    pub current: Option<i64>,
    pub latest: i64,
}

async fn table_exists(c: &mut dyn Sql, name: &str) -> Result<bool, DbError> {
    let (conn, d) = c.parts();
    let q = match d {
        Dialect::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
        Dialect::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?"
        }
    };
    let row = sqlx::query(q).bind(name).fetch_one(conn).await.ctx("inspect schema")?;
    Ok(row.try_get::<i64, _>(0).ctx("inspect schema")? > 0)
}

pub async fn status(db: &Db) -> Result<SchemaStatus, DbError> {
    let mut c = db.conn().await?;
    if !table_exists(&mut c, "schema_version").await? {
        return Ok(SchemaStatus { current: None, latest: LATEST });
    }
    let (conn, _) = c.parts();
    let row =
        sqlx::query("SELECT MAX(version) FROM schema_version").fetch_one(conn).await.ctx("read schema version")?;
    let current = row.try_get::<Option<i64>, _>(0).ctx("read schema version")?;
    Ok(SchemaStatus { current, latest: LATEST })
}

/// Apply every missing migration. Refuses a database newer than this binary.
/// Returns the versions applied.
pub async fn migrate(db: &Db) -> Result<Vec<i64>, DbError> {
    let st = status(db).await?;
    if let Some(cur) = st.current
        && cur > LATEST
    {
        return Err(DbError::Schema(format!(
            "the database schema is version {cur}, newer than this Skyhold binary knows ({LATEST}): \
             upgrade Skyhold on this node instead of migrating"
        )));
    }
    let mut c = db.conn().await?;
    if st.current.is_none() {
        if table_exists(&mut c, "async_job").await? {
            return Err(DbError::Schema(
                "the database holds Skyhold tables but no schema_version: a migration was \
                 interrupted; restore the backup or drop the database and run `skyhold db init`"
                    .into(),
            ));
        }
        let (conn, d) = c.parts();
        let ddl = render(
            d,
            "CREATE TABLE schema_version (version BIGINT NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL, applied_ms BIGINT NOT NULL){engine}",
        );
        sqlx::query(&ddl).execute(&mut *conn).await.ctx("create schema_version")?;
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| Some(m.version) > st.current) {
        let (conn, d) = c.parts();
        let text = render(d, m.sql);
        for stmt in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(stmt).execute(&mut *conn).await.ctx("apply migration")?;
        }
        let q = crate::sql(d, "INSERT INTO schema_version (version, name, applied_ms) VALUES (?, ?, {now})");
        sqlx::query(&q).bind(m.version).bind(m.name).execute(&mut *conn).await.ctx("record migration")?;
        tracing::info!(version = m.version, name = m.name, "applied schema migration");
        applied.push(m.version);
    }
    Ok(applied)
}

/// Refuse to run against a schema this binary does not match.
pub async fn check_current(db: &Db) -> Result<(), DbError> {
    let st = status(db).await?;
    match st.current {
        None => Err(DbError::Schema("the database has no Skyhold schema: run `skyhold db init` first".into())),
        Some(v) if v > LATEST => Err(DbError::Schema(format!(
            "the database schema is version {v}, newer than this binary ({LATEST}): upgrade Skyhold"
        ))),
        Some(v) if v < LATEST => Err(DbError::Schema(format!(
            "the database schema is version {v}, older than this binary ({LATEST}): run `skyhold db migrate`"
        ))),
        Some(_) => Ok(()),
    }
}

/// Drop every table (`db init --force`).
pub async fn drop_everything(db: &Db) -> Result<(), DbError> {
    let mut c = db.conn().await?;
    let (conn, d) = c.parts();
    let q = match d {
        Dialect::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        Dialect::MySql => "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
    };
    let names: Vec<String> = sqlx::query_scalar(q).fetch_all(&mut *conn).await.ctx("list tables")?;
    for n in names {
        if !n.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            continue;
        }
        let quoted = match d {
            Dialect::Sqlite => format!("\"{n}\""),
            Dialect::MySql => format!("`{n}`"),
        };
        sqlx::query(&format!("DROP TABLE {quoted}")).execute(&mut *conn).await.ctx("drop table")?;
    }
    Ok(())
}

/// Copy a SQLite database to `path` as one consistent snapshot (`VACUUM INTO`).
pub async fn sqlite_backup(db: &Db, path: &str) -> Result<(), DbError> {
    let mut c = db.conn().await?;
    let (conn, d) = c.parts();
    if d != Dialect::Sqlite {
        return Err(DbError::Schema("VACUUM INTO is for SQLite databases".into()));
    }
    sqlx::query("VACUUM INTO ?").bind(path).execute(conn).await.ctx("back up the database")?;
    Ok(())
}
