//! `skyhold server`: one management server process.

use crate::cli::ServerArgs;
use crate::config::{FileConfig, Node};
use anyhow::{Context, Result, anyhow};
use serde_json::json;
use skyhold_core::{Core, MsIdentity, membership};
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Exit code when this server's membership was taken over (CloudStack exits 219 likewise).
pub const EXIT_REPLACED: u8 = 219;

async fn bind(ip: &str, port: u16, what: &str) -> Result<TcpListener> {
    let addr: SocketAddr =
        format!("{ip}:{port}").parse().with_context(|| format!("parse {what} address {ip}:{port}"))?;
    TcpListener::bind(addr).await.with_context(|| format!("listen on {what} address {addr}"))
}

fn ms_id(node: &Node, configured: Option<String>) -> Result<String> {
    if let Some(id) = configured {
        return Ok(id);
    }
    let path = node.data_dir.join("ms-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    node.ensure_data_dir()?;
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(&path, format!("{id}\n")).with_context(|| format!("write {}", path.display()))?;
    Ok(id)
}

pub async fn run(a: ServerArgs) -> Result<u8> {
    let file = FileConfig::load(a.node.config.as_deref())?;
    let node = Node::resolve(&a.node, &file)?;
    let keys = skyhold_core::keys::NodeKeys::new(node.load_key()?, Some(node.key_file.clone()));
    let db = node.open_db(false).await?;
    skyhold_db::migrate::check_current(&db).await?;
    skyhold_core::keys::check_at_start(&db, &keys).await.map_err(|e| anyhow!("{e}"))?;

    let bind_ip = a.bind.clone().or(file.bind.clone()).unwrap_or_else(|| "0.0.0.0".into());
    let api_l = bind(&bind_ip, a.api_port.or(file.api_port).unwrap_or(8080), "API").await?;
    let agent_l = bind(&bind_ip, a.agent_port.or(file.agent_port).unwrap_or(8250), "agent").await?;
    let cluster_l = bind(&bind_ip, a.cluster_port.or(file.cluster_port).unwrap_or(9090), "cluster").await?;
    let ports = (api_l.local_addr()?.port(), agent_l.local_addr()?.port(), cluster_l.local_addr()?.port());
    let service_ip = a
        .service_ip
        .clone()
        .or(file.service_ip.clone())
        .unwrap_or_else(|| if bind_ip == "0.0.0.0" { "127.0.0.1".to_string() } else { bind_ip.clone() });
    let ident = MsIdentity {
        id: ms_id(&node, a.ms_id.clone().or(file.ms_id.clone()))?,
        run_id: uuid::Uuid::new_v4().to_string(),
        name: hostname(),
        service_ip,
        api_port: ports.0,
        agent_port: ports.1,
        cluster_port: ports.2,
    };
    let cluster_secret = {
        let mut c = db.conn().await?;
        let enc = skyhold_db::config::meta_get(&mut c, "cluster_secret")
            .await?
            .ok_or_else(|| anyhow!("the database has no cluster secret: run `skyhold db init`"))?;
        keys.current().decrypt(&enc)?
    };
    let core = Core::new(db, keys, cluster_secret, ident);
    core.settings().refresh(core.db()).await?;
    membership::register(&core).await.map_err(|e| anyhow!("{e}"))?;
    if let Err(e) = skyhold_core::keys::check_after_register(&core).await {
        let _ = membership::set_state(&core, "Down").await;
        return Err(anyhow!("{e}"));
    }

    {
        let db = core.db().clone();
        tokio::spawn(async move { db.monitor().await });
    }
    tokio::spawn(skyhold_core::settings::watch(core.clone()));
    tokio::spawn(skyhold_core::keys::run(core.clone()));
    tokio::spawn(skyhold_core::dbwatch::run(core.clone()));
    tokio::spawn(skyhold_core::ha::run(core.clone()));
    tokio::spawn(skyhold_core::jobs::run_executor(core.clone()));
    tokio::spawn(skyhold_core::housekeeping::run(core.clone()));
    tokio::spawn(skyhold_core::agents::serve(core.clone(), agent_l));
    tokio::spawn(skyhold_core::peer::serve(core.clone(), cluster_l));
    tokio::spawn(membership::monitor_loop(core.clone()));
    tokio::spawn(skyhold_core::rebalance::run(core.clone()));
    let app = skyhold_api::router(core.clone());
    let api_task = tokio::spawn(async move { axum::serve(api_l, app).await });
    let mut hb = tokio::spawn(membership::heartbeat_loop(core.clone()));

    if let Some(pf) = &a.ports_file {
        let body = json!({ "api": ports.0, "agent": ports.1, "cluster": ports.2, "pid": std::process::id(), "msid": core.ms().id });
        let tmp = pf.with_extension("tmp");
        std::fs::write(&tmp, body.to_string()).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, pf).with_context(|| format!("write {}", pf.display()))?;
    }
    tracing::info!(api = ports.0, agent = ports.1, cluster = ports.2, ms_id = %core.ms().id, "management server listening");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let code = tokio::select! {
        end = &mut hb => {
            tracing::error!(reason = ?end.ok(), "stopping: this server may no longer act");
            EXIT_REPLACED
        }
        _ = tokio::signal::ctrl_c() => { graceful(&core).await; 0 }
        _ = term.recv() => { graceful(&core).await; 0 }
        r = api_task => {
            tracing::error!(result = ?r, "API server stopped");
            1
        }
    };
    Ok(code)
}

/// SIGTERM: drain (no new jobs, agents to peers, running jobs finish or are handed over), then
/// leave the cluster.
async fn graceful(core: &Core) {
    tracing::info!("SIGTERM: draining before exit");
    core.set_exiting();
    membership::drain(core).await;
    let _ = membership::set_state(core, "Down").await;
    tracing::info!("management server stopped");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
