//! Creating a database (`skyhold db init`, the seed's cloudstack-setup-databases), accounts, and
//! the demo's zone/pod/cluster, offerings and templates.

use crate::CoreError;
use skyhold_db::account::{Account, Domain, NewUser, account_insert, domain_insert, user_insert};
use skyhold_db::config::{meta_get, meta_set};
use skyhold_db::crypto::{KeyRing, password_hash, random_token, sha256_hex};
use skyhold_db::infra::{Cluster, Offering, Pod, Template, Zone};
use skyhold_db::{Db, retry_tx};
use skyhold_types::{CsError, ErrorCode};

pub const ROOT_DOMAIN_PATH: &str = "/";

/// Credentials created for a new account's first user.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub api_key: String,
    pub secret_key: String,
    pub user_id: String,
    pub account_id: String,
}

/// What `db init` created.
#[derive(Debug, Clone)]
pub struct InitResult {
    pub admin: Credentials,
    pub agent_token: String,
}

/// Is the database initialised (a ROOT domain and key fingerprint exist)?
pub async fn is_initialized(db: &Db) -> Result<bool, CoreError> {
    let st = skyhold_db::migrate::status(db).await?;
    if st.current.is_none() {
        return Ok(false);
    }
    let mut c = db.conn().await?;
    Ok(meta_get(&mut c, "key_fingerprint").await?.is_some())
}

/// Refuse to run with a key file whose ring does not hold the cluster's key (the seed's silent
/// secondary-node failure, made loud). Servers use `keys::check_at_start`, which also adopts a
/// staged key and promotes the cluster's key.
pub async fn check_key(db: &Db, key: &KeyRing, key_path: &str) -> Result<(), CoreError> {
    crate::keys::check_ring(db, key, key_path).await.map(|_| ())
}

/// Create schema, ROOT domain, the admin account and user, the agent join token.
/// `admin_password`: use this password, or generate one. The ring's primary becomes the cluster key.
pub async fn init(db: &Db, key: &KeyRing, admin_password: Option<String>) -> Result<InitResult, CoreError> {
    skyhold_db::migrate::migrate(db).await?;
    if is_initialized(db).await? {
        return Err(CoreError::Cs(CsError::new(
            ErrorCode::Internal,
            "the database is already initialised; pass --force to erase it and start again",
        )));
    }
    let root = Domain {
        id: uuid::Uuid::new_v4().to_string(),
        name: "ROOT".into(),
        path: ROOT_DOMAIN_PATH.into(),
        parent_id: None,
    };
    // Hex, so a token never starts with `-` (it is passed on command lines).
    let agent_token = hex_token();
    let fp = key.primary().fingerprint();
    let token_hash = sha256_hex(agent_token.as_bytes());
    let cluster_secret = key.encrypt(&random_token(32))?;
    retry_tx!(db, |tx| {
        async {
            domain_insert(&mut tx, &root).await?;
            meta_set(&mut tx, "agent_token_hash", &token_hash).await?;
            meta_set(&mut tx, "cluster_secret", &cluster_secret).await?;
            Ok::<(), CoreError>(())
        }
        .await
    })?;
    let admin = create_account(db, key, &root.id, "admin", 1, admin_password).await?;
    // Written last: its presence means "initialised".
    let mut c = db.conn().await?;
    meta_set(&mut c, "key_fingerprint", &fp).await?;
    Ok(InitResult { admin, agent_token })
}

/// Replace the agent join token; returns the new one.
pub async fn rotate_agent_token(db: &Db) -> Result<String, CoreError> {
    let token = hex_token();
    let mut c = db.conn().await?;
    meta_set(&mut c, "agent_token_hash", &sha256_hex(token.as_bytes())).await?;
    Ok(token)
}

/// Create an account with one user (same name) holding an API key pair. `account_type` 1 is an
/// administrator, 0 an ordinary user. The secret is encrypted under the cluster's key, read (and
/// locked) in the same transaction, so a concurrent key rotation cannot leave it under the old key.
pub async fn create_account(
    db: &Db,
    key: &KeyRing,
    domain_id: &str,
    name: &str,
    account_type: i64,
    password: Option<String>,
) -> Result<Credentials, CoreError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(CoreError::param("Invalid value for parameter username"));
    }
    let password = password.unwrap_or_else(|| random_token(12));
    let api_key = random_token(48);
    let secret_key = random_token(48);
    let account = Account {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        domain_id: domain_id.into(),
        account_type,
        state: "enabled".into(),
    };
    let mut user = NewUser {
        id: uuid::Uuid::new_v4().to_string(),
        account_id: account.id.clone(),
        username: name.into(),
        password_hash: password_hash(&password),
        api_key: Some(api_key.clone()),
        secret_enc: None,
        firstname: name.into(),
        lastname: "".into(),
        email: "".into(),
    };
    retry_tx!(db, |tx| {
        async {
            let k = crate::keys::cluster_key_locked(&mut tx, key).await?;
            user.secret_enc = Some(k.encrypt(&secret_key)?);
            account_insert(&mut tx, &account).await.map_err(|e| {
                if e.is_unique_violation() {
                    CoreError::cs(ErrorCode::ParamError, format!("an account named {name} already exists"))
                } else {
                    e.into()
                }
            })?;
            user_insert(&mut tx, &user).await?;
            Ok::<(), CoreError>(())
        }
        .await
    })?;
    Ok(Credentials { username: name.into(), password, api_key, secret_key, user_id: user.id, account_id: account.id })
}

/// The ROOT domain's id.
pub async fn root_domain_id(db: &Db) -> Result<String, CoreError> {
    let mut c = db.conn().await?;
    skyhold_db::account::domain_list(&mut c)
        .await?
        .into_iter()
        .find(|d| d.path == ROOT_DOMAIN_PATH)
        .map(|d| d.id)
        .ok_or_else(|| CoreError::Cs(CsError::internal("no ROOT domain: run `skyhold db init`")))
}

/// Seed a zone, pod, cluster, offerings and templates, once. Returns false if a zone exists.
pub async fn seed_demo(db: &Db) -> Result<bool, CoreError> {
    let mut c = db.conn().await?;
    if !skyhold_db::infra::zone_list(&mut c).await?.is_empty() {
        return Ok(false);
    }
    drop(c);
    let admin_account = {
        let mut c = db.conn().await?;
        skyhold_db::account::user_list(&mut c)
            .await?
            .into_iter()
            .find(|u| u.account_type == 1)
            .map(|u| u.account_id)
            .unwrap_or_default()
    };
    let id = || uuid::Uuid::new_v4().to_string();
    let zone = Zone {
        id: id(),
        name: "Sim-Zone1".into(),
        description: "Simulator zone".into(),
        network_type: "Basic".into(),
        dns1: "8.8.8.8".into(),
        internal_dns1: "10.1.0.1".into(),
        allocation_state: "Enabled".into(),
        created_ms: 0,
    };
    let pod = Pod {
        id: id(),
        zone_id: zone.id.clone(),
        name: "Sim-Pod1".into(),
        gateway: "10.1.0.1".into(),
        netmask: "255.255.192.0".into(),
        start_ip: "10.1.0.10".into(),
        end_ip: "10.1.63.250".into(),
        allocation_state: "Enabled".into(),
        created_ms: 0,
    };
    let cluster = Cluster {
        id: id(),
        zone_id: zone.id.clone(),
        pod_id: pod.id.clone(),
        name: "Sim-Cluster1".into(),
        hypervisor: "Simulator".into(),
        allocation_state: "Enabled".into(),
        created_ms: 0,
    };
    let offerings = [
        ("Small Instance", "Small Instance, 1 vCPU, 512 MB", 1, 500, 512, false, "shared"),
        ("Medium Instance", "Medium Instance, 2 vCPU, 2 GB", 2, 1000, 2048, false, "shared"),
        ("HA Instance", "HA-enabled, 1 vCPU, 1 GB", 1, 1000, 1024, true, "shared"),
        ("Local Small Instance", "Local storage, 1 vCPU, 512 MB", 1, 500, 512, false, "local"),
    ];
    let templates = [
        ("CentOS 5.6(64-bit) no GUI (Simulator)", "CentOS 5.6 (64-bit)", 2_147_483_648i64),
        ("Ubuntu 22.04 (Simulator)", "Ubuntu 22.04 LTS", 10_737_418_240),
    ];
    retry_tx!(db, |tx| {
        async {
            skyhold_db::infra::zone_insert(&mut tx, &zone).await?;
            skyhold_db::infra::pod_insert(&mut tx, &pod).await?;
            skyhold_db::infra::cluster_insert(&mut tx, &cluster).await?;
            for (name, text, cpu, mhz, mem, ha, st) in offerings {
                skyhold_db::infra::offering_insert(
                    &mut tx,
                    &Offering {
                        id: id(),
                        name: name.into(),
                        display_text: text.into(),
                        cpu,
                        cpu_mhz: mhz,
                        mem_mb: mem,
                        offer_ha: ha,
                        storage_type: st.into(),
                        created_ms: 0,
                    },
                )
                .await?;
            }
            for (name, os, size) in templates {
                skyhold_db::infra::template_insert(
                    &mut tx,
                    &Template {
                        id: id(),
                        name: name.into(),
                        display_text: name.into(),
                        os_type: os.into(),
                        hypervisor: "Simulator".into(),
                        format: "VHD".into(),
                        size_bytes: size,
                        zone_id: None,
                        is_public: true,
                        featured: true,
                        account_id: admin_account.clone(),
                        created_ms: 0,
                    },
                )
                .await?;
            }
            Ok::<(), CoreError>(())
        }
        .await
    })?;
    Ok(true)
}

/// A 192-bit random token in hex.
fn hex_token() -> String {
    (0..24).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}
