//! CloudStack's `db.properties`, read as CloudStack writes it, plus Skyhold's `db.ha.topology`.
//!
//! Keys: `db.cloud.host`, `db.cloud.port`, `db.cloud.username`, `db.cloud.password`,
//! `db.cloud.name`, `db.ha.enabled`, `db.cloud.slaves` / `db.cloud.replicas`,
//! `db.cloud.secondsBeforeRetryMaster`, `db.cloud.queriesBeforeRetryMaster`,
//! `db.cloud.initialTimeout`, `db.cloud.maxActive`, `db.cloud.maxIdle`, `db.ha.topology`
//! (`single`, `galera`, `replication`), `db.ha.replicaLagAlertSeconds` (Skyhold; default 10). Host lists may carry `host:port` entries. A value written
//! `ENC(...)` is decrypted with any key of the node's key ring. Unknown keys are ignored (CloudStack's file holds
//! many more), malformed values are refused with the key's name.

use crate::DbError;
use crate::crypto::KeyRing;
use std::collections::HashMap;

/// How the database endpoints relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    /// Every node writable, synchronous (MariaDB Galera).
    Galera,
    /// A writable primary with replicas (or a two-way pair).
    Replication,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// The database settings of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbProperties {
    /// The primary (`db.cloud.host`) first, then `db.cloud.slaves` / `db.cloud.replicas`.
    pub endpoints: Vec<Endpoint>,
    pub username: String,
    pub password: String,
    pub name: String,
    pub topology: Topology,
    pub ha_enabled: bool,
    pub max_active: u32,
    pub max_idle: u32,
    pub seconds_before_retry_master: u64,
    pub queries_before_retry_master: u64,
    pub initial_timeout_s: u64,
    /// `db.ha.replicaLagAlertSeconds` (Skyhold): a replica further behind is reported lagging.
    pub replica_lag_alert_s: u64,
}

impl DbProperties {
    /// Parse the text of a db.properties file.
    pub fn parse(text: &str, key: Option<&KeyRing>) -> Result<DbProperties, DbError> {
        let mut m: HashMap<String, String> = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(':')) else { continue };
            m.insert(k.trim().to_string(), v.trim().to_string());
        }
        let bad = |k: &str, why: &str| DbError::Schema(format!("db.properties: {k}: {why}"));
        let get = |k: &str| -> Result<Option<String>, DbError> {
            match m.get(k) {
                None => Ok(None),
                Some(v) if v.starts_with("ENC(") && v.ends_with(')') => {
                    let inner = &v[4..v.len() - 1];
                    let key = key.ok_or_else(|| bad(k, "is encrypted (ENC(...)) but no key file was given"))?;
                    Ok(Some(key.decrypt(inner).map_err(|e| bad(k, &e.to_string()))?))
                }
                Some(v) => Ok(Some(v.clone())),
            }
        };
        let num = |k: &str, default: u64| -> Result<u64, DbError> {
            match get(k)? {
                None => Ok(default),
                Some(v) if v.is_empty() => Ok(default),
                Some(v) => v.parse().map_err(|_| bad(k, &format!("'{v}' is not a number"))),
            }
        };
        let port = num("db.cloud.port", 3306)?;
        let port = u16::try_from(port).map_err(|_| bad("db.cloud.port", "out of range"))?;
        let mut endpoints = Vec::new();
        let host = get("db.cloud.host")?.unwrap_or_else(|| "localhost".into());
        let replicas = get("db.cloud.slaves")?.or(get("db.cloud.replicas")?).unwrap_or_default();
        for (k, list) in [("db.cloud.host", host.as_str()), ("db.cloud.slaves", replicas.as_str())] {
            for h in list.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                let ep = match h.rsplit_once(':') {
                    Some((hh, p)) => Endpoint {
                        host: hh.to_string(),
                        port: p.parse().map_err(|_| bad(k, &format!("'{h}' has a bad port")))?,
                    },
                    None => Endpoint { host: h.to_string(), port },
                };
                if !endpoints.contains(&ep) {
                    endpoints.push(ep);
                }
            }
        }
        if endpoints.is_empty() {
            return Err(bad("db.cloud.host", "no database host"));
        }
        let ha_enabled = match get("db.ha.enabled")?.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("false") => false,
            Some("true") => true,
            Some(v) => return Err(bad("db.ha.enabled", &format!("'{v}' must be true or false"))),
        };
        let topology = match get("db.ha.topology")?.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("galera") => Topology::Galera,
            Some("replication") => Topology::Replication,
            Some("single") => Topology::Single,
            None | Some("") => {
                if ha_enabled && endpoints.len() > 1 {
                    Topology::Replication
                } else {
                    Topology::Single
                }
            }
            Some(v) => return Err(bad("db.ha.topology", &format!("'{v}' must be single, galera or replication"))),
        };
        Ok(DbProperties {
            endpoints,
            username: get("db.cloud.username")?.unwrap_or_else(|| "cloud".into()),
            password: get("db.cloud.password")?.unwrap_or_default(),
            name: get("db.cloud.name")?.unwrap_or_else(|| "cloud".into()),
            topology,
            ha_enabled,
            max_active: num("db.cloud.maxActive", 32)?.clamp(1, 10_000) as u32,
            max_idle: num("db.cloud.maxIdle", 8)?.clamp(0, 10_000) as u32,
            seconds_before_retry_master: num("db.cloud.secondsBeforeRetryMaster", 3600)?,
            queries_before_retry_master: num("db.cloud.queriesBeforeRetryMaster", 5000)?,
            initial_timeout_s: num("db.cloud.initialTimeout", 3600)?,
            replica_lag_alert_s: num("db.ha.replicaLagAlertSeconds", 10)?,
        })
    }

    /// The URL of endpoint `i` (user and password URL-encoded).
    pub fn url(&self, i: usize) -> String {
        let ep = &self.endpoints[i.min(self.endpoints.len() - 1)];
        format!("mysql://{}:{}@{}:{}/{}", url_enc(&self.username), url_enc(&self.password), ep.host, ep.port, self.name)
    }
}

fn url_enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudstack_file() {
        let key = KeyRing::new(crate::crypto::Key::generate());
        let enc = key.encrypt("s3cr:et@").unwrap();
        let text = format!(
            "# written by cloudstack-setup-databases\n\
             db.cloud.username=cloud\n\
             db.cloud.password=ENC({enc})\n\
             db.cloud.host=db1\n\
             db.cloud.port=3307\n\
             db.cloud.name=cloud\n\
             db.cloud.maxActive=250\n\
             db.ha.enabled=true\n\
             db.cloud.slaves=db2,db3:3310\n\
             db.cloud.secondsBeforeRetryMaster=60\n\
             cluster.node.IP=10.0.0.1\n"
        );
        let p = DbProperties::parse(&text, Some(&key)).unwrap();
        assert_eq!(p.password, "s3cr:et@");
        assert_eq!(
            p.endpoints,
            vec![
                Endpoint { host: "db1".into(), port: 3307 },
                Endpoint { host: "db2".into(), port: 3307 },
                Endpoint { host: "db3".into(), port: 3310 }
            ]
        );
        assert_eq!(p.topology, Topology::Replication);
        assert_eq!(p.max_active, 250);
        assert_eq!(p.seconds_before_retry_master, 60);
        assert_eq!(p.queries_before_retry_master, 5000);
        assert_eq!(p.url(0), "mysql://cloud:s3cr%3Aet%40@db1:3307/cloud");
        assert_eq!(p.url(2), "mysql://cloud:s3cr%3Aet%40@db3:3310/cloud");
    }

    #[test]
    fn topology_and_errors() {
        let p = DbProperties::parse("db.cloud.host=a:1,b:2\ndb.ha.topology=galera\n", None).unwrap();
        assert_eq!(p.topology, Topology::Galera);
        assert_eq!(p.endpoints.len(), 2);
        for (text, needle) in [
            ("db.cloud.port=abc", "db.cloud.port"),
            ("db.ha.topology=raft", "db.ha.topology"),
            ("db.ha.enabled=maybe", "db.ha.enabled"),
            ("db.cloud.password=ENC(v1:xx)", "no key file"),
            ("db.cloud.host=a:notaport", "db.cloud.host"),
        ] {
            let e = DbProperties::parse(text, None).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e =
            DbProperties::parse("db.cloud.password=ENC(v1:xx)", Some(&KeyRing::new(crate::crypto::Key::generate())))
                .unwrap_err();
        assert!(e.to_string().contains("db.cloud.password"), "{e}");
    }
}
