//! A cloud under test: one database, management servers on fixed ports (so a restarted server
//! comes back where its agents and peers expect it), and simulator agents that know every server.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use skyhold_bench::server::{self, DbSource, Server, ServerOpts};
use skyhold_bench::sign::{self, Creds};
pub use skyhold_bench::util::DeployIds;
use skyhold_db::{Db, DbConfig, Sql};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Capacity of every simulated host: large enough that hundreds of deployments never run out.
const HOST_CPUS: u32 = 4096;
const HOST_MEM_MB: u64 = 4 << 20;

/// One management server slot: its id, fixed ports and the current process (if running).
pub struct Node {
    pub ms_id: String,
    pub opts: ServerOpts,
    pub srv: Option<Server>,
}

/// One simulator agent process.
pub struct AgentProc {
    pub ledger: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// SIGTERM by PID, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            skyhold_bench::util::terminate(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Cloud {
    pub bin: PathBuf,
    pub dir: PathBuf,
    /// The servers' database.
    pub source: DbSource,
    /// The bench's own pool on it.
    pub db: Db,
    pub admin: Creds,
    pub agent_token: String,
    pub nodes: Vec<Node>,
    pub agents: Vec<AgentProc>,
}

impl Cloud {
    /// `skyhold db init --seed` on `db_url` and a pool of `pool` connections for the bench's reads.
    pub fn init(rt: &tokio::runtime::Runtime, bin: &Path, dir: &Path, db_url: &str, pool: u32) -> Result<Cloud> {
        let source = DbSource::Url(db_url.to_string());
        let init = server::db_init(bin, dir, &source)?;
        let db = rt
            .block_on(Db::connect(&DbConfig { url: db_url.to_string(), max_connections: pool, create: false }))
            .context("connect to the database")?;
        Ok(Cloud {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
            db,
            admin: init.admin,
            agent_token: init.agent_token,
            nodes: Vec::new(),
            agents: Vec::new(),
        })
    }

    /// Add a server slot. `fixed_ports`: pick three free ports now and keep them across restarts;
    /// otherwise the server picks free ports at each start.
    pub fn add_node(&mut self, ms_id: &str, fixed_ports: bool, rust_log: Option<String>) -> Result<usize> {
        let ports = if fixed_ports {
            let p = free_ports(3)?;
            [p[0], p[1], p[2]]
        } else {
            [0; 3]
        };
        let opts = ServerOpts {
            name: ms_id.to_string(),
            ms_id: Some(ms_id.to_string()),
            ports,
            rust_log,
            append_log: true,
            ..ServerOpts::default()
        };
        self.nodes.push(Node { ms_id: ms_id.to_string(), opts, srv: None });
        Ok(self.nodes.len() - 1)
    }

    /// Start the given (stopped) servers at once and wait until each is ready.
    pub fn start_nodes(&mut self, which: &[usize]) -> Result<()> {
        for &i in which {
            let n = &mut self.nodes[i];
            if n.srv.is_some() {
                bail!("server {} is already running", n.ms_id);
            }
            n.srv = Some(Server::spawn(&self.bin, &self.dir, &self.source, &n.opts)?);
        }
        for &i in which {
            let n = &mut self.nodes[i];
            if let Some(s) = n.srv.as_mut() {
                s.wait_ready(Duration::from_secs(60)).with_context(|| format!("server {}", n.ms_id))?;
            }
        }
        Ok(())
    }

    /// SIGKILL server `i` (returns once the process is gone).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut s) = self.nodes[i].srv.take() {
            s.kill9();
        }
    }

    /// SIGTERM every running server (they drain and leave), one after another.
    pub fn stop_nodes(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut s) = n.srv.take() {
                s.stop();
            }
        }
    }

    pub fn base(&self, i: usize) -> Result<String> {
        Ok(self.nodes[i].srv.as_ref().with_context(|| format!("server {} is not running", self.nodes[i].ms_id))?.base())
    }

    pub fn agent_addrs(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.opts.ports[1])).collect::<Vec<_>>().join(",")
    }

    /// Start one simulator agent that knows every server.
    pub fn start_agent(&mut self, id: &str, hosts: u32, command_delay_ms: u64) -> Result<()> {
        let log = self.dir.join(format!("{id}.log"));
        let ledger = self.dir.join(format!("{id}.ledger.jsonl"));
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(&self.bin)
            .args(["agent", "--mgmt", &self.agent_addrs(), &format!("--token={}", self.agent_token), "--simulator"])
            .args(["--hosts", &hosts.to_string(), "--agent-id", id])
            .args(["--command-delay-ms", &command_delay_ms.to_string()])
            .args(["--host-cpus", &HOST_CPUS.to_string(), "--host-mem-mb", &HOST_MEM_MB.to_string()])
            .arg("--ledger")
            .arg(&ledger)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start agent {id}"))?;
        self.agents.push(AgentProc { ledger, log, child: Some(child) });
        Ok(())
    }

    pub fn stop_agents(&mut self) {
        for a in &mut self.agents {
            a.stop();
        }
    }

    /// Zone, featured template and "Small Instance" offering, through the API of server `i`.
    pub fn deploy_ids(&self, i: usize) -> Result<DeployIds> {
        let base = self.base(i)?;
        let get = |cmd: &str, params: &[(&str, &str)]| -> Result<Value> {
            let url = format!("{base}?{}", sign::signed_query(&self.admin, cmd, params, 600));
            let v: Value = ureq::get(&url).call().with_context(|| cmd.to_string())?.into_json()?;
            Ok(v[format!("{}response", cmd.to_lowercase())].clone())
        };
        DeployIds::lookup(get)
    }

    /// `deployVirtualMachine` through server `i`'s API. Returns the job id.
    pub fn deploy(&self, i: usize, ids: &DeployIds, name: &str) -> Result<String> {
        let base = self.base(i)?;
        let q = sign::signed_query(
            &self.admin,
            "deployVirtualMachine",
            &[
                ("zoneid", &ids.zone),
                ("templateid", &ids.template),
                ("serviceofferingid", &ids.offering),
                ("name", name),
            ],
            600,
        );
        let resp = ureq::get(&format!("{base}?{q}")).timeout(Duration::from_secs(30)).call();
        let v: Value = match resp {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(code, r)) => bail!("deployVirtualMachine: HTTP {code}: {}", r.into_string()?),
            Err(e) => bail!("deployVirtualMachine: {e}"),
        };
        v["deployvirtualmachineresponse"]["jobid"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no jobid in {v}"))
    }

    /// Hosts per management server (Up, with an owner): ms id -> (agent ids, host ids).
    pub async fn hosts_by_ms(&self) -> Result<BTreeMap<String, (Vec<String>, Vec<String>)>> {
        let mut c = self.db.conn().await?;
        let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for h in skyhold_db::infra::host_list(&mut c).await? {
            if let (Some(ms), "Up") = (h.mgmt_server_id, h.status.as_str()) {
                let e = out.entry(ms).or_default();
                if !e.0.contains(&h.agent_id) {
                    e.0.push(h.agent_id);
                }
                e.1.push(h.id);
            }
        }
        Ok(out)
    }

    /// Wait until `n` hosts are Up with an owner.
    pub async fn wait_hosts_up(&self, n: usize, within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        loop {
            let up: usize = self.hosts_by_ms().await?.values().map(|(_, h)| h.len()).sum();
            if up >= n {
                return Ok(());
            }
            if Instant::now() > end || skyhold_bench::stopped() {
                bail!("only {up} of {n} hosts came up within {} s", within.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Unfinished jobs (status 0), owned or not.
    pub async fn unfinished_jobs(&self) -> Result<i64> {
        let mut c = self.db.conn().await?;
        let (conn, _) = c.parts();
        Ok(sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM async_job WHERE status = 0").fetch_one(conn).await?)
    }

    /// Ids of the unfinished jobs `ms` holds.
    pub async fn jobs_held_by(&self, ms: &str) -> Result<Vec<String>> {
        let mut c = self.db.conn().await?;
        let (conn, _) = c.parts();
        Ok(sqlx::query_scalar::<_, String>("SELECT id FROM async_job WHERE owner_ms = ? AND status = 0 ORDER BY seq")
            .bind(ms)
            .fetch_all(conn)
            .await?)
    }

    /// The last lines of every server's and agent's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for p in self
            .nodes
            .iter()
            .map(|n| self.dir.join(format!("{}.log", n.opts.name)))
            .chain(self.agents.iter().map(|a| a.log.clone()))
        {
            out.push_str(&skyhold_bench::util::log_tail(&p, n));
            out.push('\n');
        }
        out
    }

    /// Stop agents, then servers, then close the pool.
    pub fn shutdown(&mut self, rt: &tokio::runtime::Runtime) {
        self.stop_agents();
        self.stop_nodes();
        rt.block_on(self.db.close());
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop_agents();
        self.stop_nodes();
    }
}

/// `n` distinct ports that are free right now on 127.0.0.1.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("find free ports")?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}
