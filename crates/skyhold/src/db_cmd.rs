//! `skyhold db init|migrate|status` and `skyhold account create`.

use crate::cli::{AccountAction, AccountArgs, DbAction, DbArgs};
use crate::config::{FileConfig, Node, write_private};
use anyhow::{Context, Result, bail};
use serde_json::json;
use skyhold_core::bootstrap;

pub async fn run(a: DbArgs) -> Result<u8> {
    match a.action {
        DbAction::Init { node, force, admin_password, seed } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let out = init(&n, force, admin_password, seed).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        DbAction::Migrate { node } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let db = n.open_db(false).await?;
            let applied = skyhold_db::migrate::migrate(&db).await?;
            let st = skyhold_db::migrate::status(&db).await?;
            println!("{}", json!({ "applied": applied, "version": st.current, "latest": st.latest }));
            Ok(0)
        }
        DbAction::Backup { node, out } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            backup(&n, &out).await?;
            println!(
                "{}",
                json!({ "backup": out.display().to_string(), "database": skyhold_db::redact_url(&n.db_url) })
            );
            Ok(0)
        }
        DbAction::Status { node } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let db = n.open_db(false).await?;
            let st = skyhold_db::migrate::status(&db).await?;
            let init = bootstrap::is_initialized(&db).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "database": db.endpoint(),
                    "schema_version": st.current,
                    "binary_schema_version": st.latest,
                    "initialized": init,
                    "up_to_date": st.current == Some(st.latest),
                    "endpoints": crate::cluster_cmd::endpoints_json(&db),
                }))?
            );
            Ok(0)
        }
    }
}

/// Initialise the database; with `force`, erase it first.
pub async fn init(n: &Node, force: bool, admin_password: Option<String>, seed: bool) -> Result<serde_json::Value> {
    n.ensure_data_dir()?;
    let key = n.load_or_create_key()?;
    let db = n.open_db(true).await?;
    if bootstrap::is_initialized(&db).await? {
        if !force {
            bail!("the database {} is already initialised; pass --force to erase it and start again", db.endpoint());
        }
        skyhold_db::migrate::drop_everything(&db).await.context("erase the database")?;
    }
    let res = bootstrap::init(&db, &key, admin_password).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if seed {
        bootstrap::seed_demo(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_private(&n.data_dir.join("agent.token"), &format!("{}\n", res.agent_token))?;
    db.close().await;
    Ok(json!({
        "database": skyhold_db::redact_url(&n.db_url),
        "key_file": n.key_file.display().to_string(),
        "key_fingerprint": key.primary().fingerprint(),
        "admin": {
            "username": res.admin.username,
            "password": res.admin.password,
            "apikey": res.admin.api_key,
            "secretkey": res.admin.secret_key,
        },
        "agent_token": res.agent_token,
        "agent_token_file": n.data_dir.join("agent.token").display().to_string(),
    }))
}

pub async fn account(a: AccountArgs) -> Result<u8> {
    match a.action {
        AccountAction::Create { node, name, admin, password } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let key = n.load_key()?;
            let db = n.open_db(false).await?;
            bootstrap::check_key(&db, &key, &n.key_file.display().to_string())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let domain = bootstrap::root_domain_id(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let c = bootstrap::create_account(&db, &key, &domain, &name, if admin { 1 } else { 0 }, password)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{}",
                json!({ "username": c.username, "password": c.password, "apikey": c.api_key, "secretkey": c.secret_key, "userid": c.user_id, "accountid": c.account_id })
            );
            Ok(0)
        }
    }
}

/// A consistent copy of the database: `VACUUM INTO` for SQLite (a snapshot, safe while servers
/// run), `mariadb-dump --single-transaction` for MariaDB/MySQL.
async fn backup(n: &Node, out: &std::path::Path) -> Result<()> {
    if out.exists() {
        bail!("{} exists: choose a new file for the backup", out.display());
    }
    if let Some(path) = n.db_url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).exists() {
            bail!("no SQLite database at {path}");
        }
        let db = n.open_db(false).await?;
        skyhold_db::migrate::sqlite_backup(&db, &out.display().to_string()).await?;
        return Ok(());
    }
    // mysql://user:pass@host:port/name
    let rest = n.db_url.split_once("://").map(|(_, r)| r).unwrap_or("");
    let (cred, hostpart) = rest.rsplit_once('@').context("the database URL has no user@host part")?;
    let (user, pass) = cred.split_once(':').unwrap_or((cred, ""));
    let (hostport, name) = hostpart.split_once('/').context("the database URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "3306"));
    let decode = |s: &str| -> String {
        let mut outb = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                outb.push(v);
                i += 3;
                continue;
            }
            outb.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&outb).to_string()
    };
    let dump = ["mariadb-dump", "mysqldump"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok())
        .context("neither mariadb-dump nor mysqldump is installed (apt-get install mariadb-client)")?;
    let file = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let st = std::process::Command::new(dump)
        .args(["--single-transaction", "--routines", "--triggers", "--protocol=TCP"])
        .arg(format!("--host={host}"))
        .arg(format!("--port={port}"))
        .arg(format!("--user={}", decode(user)))
        .arg("--databases")
        .arg(name)
        .env("MYSQL_PWD", decode(pass))
        .stdout(file)
        .status()
        .with_context(|| format!("run {dump}"))?;
    if !st.success() {
        let _ = std::fs::remove_file(out);
        bail!("{dump} failed ({st})");
    }
    Ok(())
}
