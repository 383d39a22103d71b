//! `skyhold agent`.

use crate::cli::AgentArgs;
use anyhow::{Context, Result, bail};
use skyhold_agent::{AgentConfig, FailRule};

pub async fn run(a: AgentArgs) -> Result<u8> {
    if !a.simulator {
        bail!("this build has only the simulator hypervisor driver: pass --simulator");
    }
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("read token file {}", f.display()))?.trim().to_string()
        }
        (None, None) => bail!("a join token is required: --token T or --token-file FILE"),
    };
    let fail_rules = a.fail.iter().map(|r| FailRule::parse(r)).collect::<Result<Vec<_>, _>>()?;
    let agent_id = a.agent_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "agent".into())
    });
    let cfg = AgentConfig {
        mgmt_addrs: a.mgmt.clone(),
        token,
        agent_id,
        hosts: a.hosts,
        host_cpu_cores: a.host_cpus,
        host_cpu_mhz: a.host_cpu_mhz,
        host_mem_mb: a.host_mem_mb,
        ledger_path: a.ledger.clone(),
        fail_rules,
        command_delay_ms: a.command_delay_ms,
        storage: a.storage.clone(),
        heartbeat_interval_ms: a.heartbeat_interval_ms,
        storage_timeout_ms: a.storage_timeout_ms,
        self_fence_after_ms: a.self_fence_after_ms,
        check_listen: a.check_listen.clone(),
        control_dir: a.control_dir.clone(),
        static_mgmt: a.static_mgmt,
        place: skyhold_proto::HostPlace { zone: a.zone.clone(), pod: a.pod.clone(), cluster: a.cluster.clone() },
    };
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    skyhold_agent::run(cfg, shutdown).await?;
    Ok(0)
}
