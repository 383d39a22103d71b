//! Resolving settings from flags, environment and the TOML config file, and opening the node's
//! database and key.

use crate::cli::NodeArgs;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use skyhold_db::crypto::{Key, KeyRing};
use skyhold_db::{Db, DbConfig};
use std::path::{Path, PathBuf};

/// The TOML config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub db: Option<String>,
    pub key_file: Option<PathBuf>,
    pub ms_id: Option<String>,
    pub bind: Option<String>,
    pub service_ip: Option<String>,
    pub api_port: Option<u16>,
    pub agent_port: Option<u16>,
    pub cluster_port: Option<u16>,
    pub db_max_connections: Option<u32>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<FileConfig> {
        let Some(path) = path else { return Ok(FileConfig::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
    }
}

/// Where a node's things are.
#[derive(Debug, Clone)]
pub struct Node {
    pub data_dir: PathBuf,
    pub db_url: String,
    pub key_file: PathBuf,
    pub max_connections: u32,
    /// Several database endpoints (db.properties with replicas): all URLs, first = primary.
    pub endpoints: Vec<String>,
    pub policy: Option<skyhold_db::ha::Policy>,
}

impl Node {
    pub fn resolve(args: &NodeArgs, file: &FileConfig) -> Result<Node> {
        let data_dir = args
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/var/lib/skyhold"));
        let key_file = args.key_file.clone().or_else(|| file.key_file.clone()).unwrap_or_else(|| data_dir.join("key"));
        let mut max_connections = file.db_max_connections.unwrap_or(32);
        let mut endpoints = Vec::new();
        let mut policy = None;
        let db_url = match (args.db.clone().or_else(|| file.db.clone()), &args.db_properties) {
            (Some(u), _) => u,
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("read db.properties {}", path.display()))?;
                let key = if key_file.exists() { Some(KeyRing::load(&key_file)?) } else { None };
                let props = skyhold_db::props::DbProperties::parse(&text, key.as_ref())?;
                max_connections = props.max_active;
                if props.endpoints.len() > 1 {
                    endpoints = (0..props.endpoints.len()).map(|i| props.url(i)).collect();
                    policy = Some(skyhold_db::ha::Policy {
                        topology: props.topology,
                        retry_master_after: std::time::Duration::from_secs(props.seconds_before_retry_master),
                        lag_alert: std::time::Duration::from_secs(props.replica_lag_alert_s),
                    });
                }
                props.url(0)
            }
            (None, None) => format!("sqlite://{}", absolute(&data_dir.join("skyhold.db")).display()),
        };
        Ok(Node { data_dir, db_url, key_file, max_connections, endpoints, policy })
    }

    pub fn ensure_data_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("create data directory {}", self.data_dir.display()))
    }

    pub async fn open_db(&self, create: bool) -> Result<Db> {
        if create {
            self.ensure_data_dir()?;
        }
        if let Some(policy) = self.policy
            && self.endpoints.len() > 1
        {
            let names: Vec<String> = self.endpoints.iter().map(|u| skyhold_db::redact_url(u)).collect();
            return Db::connect_many(&self.endpoints, self.max_connections, create, policy)
                .await
                .map_err(|e| with_hint(e, format!("connect to the database endpoints {}", names.join(", "))));
        }
        let db = Db::connect(&DbConfig { url: self.db_url.clone(), max_connections: self.max_connections, create })
            .await
            .map_err(|e| with_hint(e, format!("connect to database {}", skyhold_db::redact_url(&self.db_url))))?;
        Ok(db)
    }

    /// Load the node's key ring, or explain how to get one.
    pub fn load_key(&self) -> Result<KeyRing> {
        if !self.key_file.exists() {
            bail!(
                "key file {} is missing: run `skyhold db init` on the first node, or copy the key file from an existing node",
                self.key_file.display()
            );
        }
        Ok(KeyRing::load(&self.key_file)?)
    }

    /// Load the key, or create it (first `db init`).
    pub fn load_or_create_key(&self) -> Result<KeyRing> {
        if self.key_file.exists() {
            return self.load_key();
        }
        if let Some(dir) = self.key_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let k = Key::generate();
        k.save_new(&self.key_file)?;
        Ok(KeyRing::new(k))
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Write a file with mode 0600.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("write {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// A database error for the operator: what failed, why, and what to check.
fn with_hint(e: skyhold_db::DbError, what: String) -> anyhow::Error {
    match e.hint() {
        Some(h) => anyhow::anyhow!("{what}: {e}\n  hint: {h}"),
        None => anyhow::Error::new(e).context(what),
    }
}
