//! `skyhold cluster status|drain|cancel`: the seed's `SELECT * FROM management_server`, made
//! friendly, and drain control.

use crate::cli::{ClusterAction, ClusterArgs};
use crate::config::{FileConfig, Node};
use anyhow::{Result, bail};
use serde_json::json;

pub async fn run(a: ClusterArgs) -> Result<u8> {
    match a.action {
        ClusterAction::Status { node, json } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let db = Node::resolve(&node, &file)?.open_db(false).await?;
            let mut c = db.conn().await?;
            let servers = skyhold_db::ms::ms_list(&mut c).await?;
            let per = skyhold_db::infra::host_agents_per_ms(&mut c).await?;
            let mut rows = Vec::new();
            for m in &servers {
                let (agents, hosts) =
                    per.iter().find(|(id, _, _)| id == &m.id).map(|(_, a, h)| (*a, *h)).unwrap_or((0, 0));
                let jobs = skyhold_db::job::job_count_running(&mut c, &m.id).await?;
                rows.push(json!({
                    "id": m.id, "name": m.name, "state": m.state, "heartbeat_age_ms": m.heartbeat_age_ms,
                    "run_id": m.run_id, "service_ip": m.service_ip, "api_port": m.api_port,
                    "agent_port": m.agent_port, "cluster_port": m.cluster_port, "agents": agents,
                    "hosts": hosts, "running_jobs": jobs, "version": m.version, "db_endpoint": m.db_endpoint,
                }));
            }
            let waiting = skyhold_db::job::job_count_unowned(&mut c).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "servers": rows, "waiting_jobs": waiting, "database": db.endpoint(),
                        "endpoints": endpoints_json(&db),
                    }))?
                );
            } else {
                println!("database: {}", db.endpoint());
                for e in db.endpoints_status() {
                    println!(
                        "  {} {:<10} {:<8} {}{}",
                        if e.healthy { "ok  " } else { "DOWN" },
                        e.role,
                        e.replication.as_ref().map(|c| c.label()).unwrap_or(""),
                        e.name,
                        if e.detail.is_empty() { String::new() } else { format!(" ({})", e.detail) }
                    );
                }
                println!(
                    "{:<38} {:<22} {:>10} {:<36} {:<21} {:>6} {:>6} {:>5}  DB",
                    "ID", "STATE", "HEARTBEAT", "RUN", "ADDRESS", "AGENTS", "HOSTS", "JOBS"
                );
                for r in &rows {
                    println!(
                        "{:<38} {:<22} {:>8}ms {:<36} {:<21} {:>6} {:>6} {:>5}  {}",
                        r["id"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["heartbeat_age_ms"],
                        r["run_id"].as_str().unwrap_or(""),
                        format!("{}:{}", r["service_ip"].as_str().unwrap_or(""), r["api_port"]),
                        r["agents"],
                        r["hosts"],
                        r["running_jobs"],
                        r["db_endpoint"].as_str().unwrap_or(""),
                    );
                }
                println!("jobs waiting to be claimed: {waiting}");
            }
            Ok(0)
        }
        ClusterAction::Drain { node, id } | ClusterAction::Cancel { node, id } if id.is_empty() => {
            let _ = node;
            bail!("a management server id is required")
        }
        ClusterAction::Drain { node, id } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let db = Node::resolve(&node, &file)?.open_db(false).await?;
            let mut c = db.conn().await?;
            if skyhold_db::ms::ms_fetch(&mut c, &id).await?.is_none() {
                bail!("Unable to find management server with specified id {id} (see `skyhold cluster status`)");
            }
            if !skyhold_db::ms::ms_request_drain(&mut c, &id).await? {
                bail!("management server {id} is not Up (see `skyhold cluster status`)");
            }
            println!("drain requested for {id}; it stops taking jobs within one heartbeat interval");
            Ok(0)
        }
        ClusterAction::Cancel { node, id } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let db = Node::resolve(&node, &file)?.open_db(false).await?;
            let mut c = db.conn().await?;
            if skyhold_db::ms::ms_fetch(&mut c, &id).await?.is_none() {
                bail!("Unable to find management server with specified id {id} (see `skyhold cluster status`)");
            }
            if !skyhold_db::ms::ms_cancel_drain(&mut c, &id).await? {
                bail!("management server {id} is not draining");
            }
            println!("drain of {id} cancelled");
            Ok(0)
        }
    }
}

/// Every database endpoint as this process's connector sees it: role, health, Galera state and
/// size, replication threads, lag and condition.
pub fn endpoints_json(db: &skyhold_db::Db) -> Vec<serde_json::Value> {
    db.endpoints_status()
        .iter()
        .map(|e| {
            json!({
                "endpoint": e.name, "active": e.active, "healthy": e.healthy, "role": e.role, "detail": e.detail,
                "cluster_size": e.cluster_size,
                "replication": e.replication.as_ref().map(|c| json!({
                    "condition": c.label(),
                    "text": c.to_string(),
                    "source": e.replica.as_ref().map(|r| r.source.clone()),
                    "io_running": e.replica.as_ref().map(|r| r.io_running.clone()),
                    "sql_running": e.replica.as_ref().map(|r| r.sql_running.clone()),
                    "lag_seconds": e.replica.as_ref().and_then(|r| r.lag_s),
                    "last_error": e.replica.as_ref().map(|r| r.last_error.clone()),
                })),
            })
        })
        .collect()
}
