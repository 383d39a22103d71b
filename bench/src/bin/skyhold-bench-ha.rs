//! `skyhold-bench-ha`: how long after a host dies its HA VMs run again elsewhere.
//!
//! Each run builds a fresh cloud: `skyhold db init --seed` on a new database, one management
//! server (the real binary), a *victim* agent with one host and `--others` agents with one host
//! each, all on one shared primary storage directory (their storage heartbeats), each with its own
//! control directory and ledger. It deploys N "HA Instance" VMs (1 vCPU, 1 GB, HA) on the victim's
//! host, then kills the host in one of two ways:
//!
//! - **lease**: SIGKILL of the victim agent (the host and its VMs die with it). No BMC: the only
//!   proof of death is the storage heartbeat lease (20 s, longer than the agent's 10 s self-fence).
//! - **ipmi**: the victim has an IPMI BMC (a real `ipmi_sim`, `skyhold-testkit::bmc`) configured
//!   with `configureOutOfBandManagement`. The bench cuts the host off everything instead of
//!   killing it: its management connection (it reaches the server only through a TCP proxy of the
//!   bench, `--static-mgmt`), its neighbours (`<control-dir>/isolate` closes its check listener)
//!   and its storage (its mount is a symlink the bench removes). The server powers it off through
//!   the BMC, whose hook SIGKILLs the agent, and restarts the VMs without waiting for the lease.
//!
//! From the kill (or the cut) it polls the database until every one of the N VMs is Running on
//! another host and records, per VM, when it was first seen so; it reads the HOST.HA.SUSPECT and
//! HOST.HA.FENCED events' times. Afterwards it checks the agents' ledgers (ground truth): no
//! `(job, step)` executed twice, no VM ever running on two hosts (the victim's VMs count as dead
//! from its death: the kill, or the BMC's power-off), and each of the N VMs started exactly once
//! elsewhere and running there, where the database says it runs.
//!
//! Default HA settings throughout; nothing is tuned. See `bench/README.md`.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use skyhold_bench::backend::Backend;
use skyhold_bench::cli::{BackendArgs, OutputArgs, SkyholdArgs};
use skyhold_bench::server::{self, DbSource, Server, ServerOpts};
use skyhold_bench::sign::{self, Creds};
use skyhold_bench::stats::Summary;
use skyhold_bench::util::{database_version, log_tail, machine_info, print_machine, report_head, terminate};
use skyhold_db::{Db, DbConfig, Sql};
use skyhold_testkit::proxy::{Cut, TcpProxy};
use skyhold_testkit::{Bmc, have_ipmi};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The seeded offering every VM uses: 1 vCPU, 1 GB, HA-enabled.
const OFFERING: &str = "HA Instance";
const VM_CPUS: u64 = 1;
const VM_MEM_MB: u64 = 1024;
/// The victim agent's id; its host's guid is `victim-h0`.
const VICTIM: &str = "victim";
/// The BMC's administrator password.
const BMC_PASSWORD: &str = "bench-bmc-pw";

/// How the victim host dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum FencePath {
    /// SIGKILL, no BMC: fenced when its storage heartbeat lease expires.
    Lease,
    /// Cut off from everything, fenced by an IPMI power-off through its BMC.
    Ipmi,
}

impl FencePath {
    fn name(self) -> &'static str {
        match self {
            FencePath::Lease => "lease",
            FencePath::Ipmi => "ipmi",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "skyhold-bench-ha",
    about = "Time from a host's death to all its HA VMs Running elsewhere (storage-lease and IPMI fencing)",
    mut_arg("mysql_url", |a| a.help(
        "MariaDB/MySQL server URL without a database (mysql://USER:PASS@HOST:PORT); the bench creates a \
         database per run there and drops it afterwards"
    ))
)]
struct Args {
    #[command(flatten)]
    bin: SkyholdArgs,
    #[command(flatten)]
    db: BackendArgs,
    /// Numbers of HA VMs on the victim host.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    vms: Vec<usize>,
    /// Runs per number of VMs and fencing path.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Fencing paths to measure (ipmi is skipped when ipmi_sim or ipmitool is missing).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lease,ipmi")]
    paths: Vec<FencePath>,
    /// Agents (one host each) besides the victim: where the VMs restart.
    #[arg(long, default_value_t = 3)]
    others: usize,
    /// Deployments in flight while filling the victim.
    #[arg(long, default_value_t = 16)]
    deploy_concurrency: usize,
    /// Database polling interval while waiting for the restarts.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Give up a run this long after the kill.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    #[command(flatten)]
    out: OutputArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    skyhold_bench::exit_code(run(args))
}

fn epoch_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The whole benchmark
// ---------------------------------------------------------------------------------------------

fn run(args: Args) -> Result<bool> {
    if args.vms.is_empty() || args.vms.contains(&0) || args.runs == 0 || args.others == 0 {
        bail!("--vms must list positive numbers; --runs and --others must be at least 1");
    }
    let backends = args.db.backends()?;
    let skyhold = args.bin.binary()?;
    let mut paths = args.paths.clone();
    paths.sort();
    paths.dedup();
    let mut skipped = Vec::new();
    if paths.contains(&FencePath::Ipmi) && !have_ipmi() {
        eprintln!("ipmi_sim or ipmitool not found (Debian: openipmi, ipmitool): skipping the IPMI path");
        paths.retain(|p| *p != FencePath::Ipmi);
        skipped.push("ipmi: ipmi_sim/ipmitool not installed");
    }
    if paths.is_empty() {
        bail!("no fencing path to measure");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    skyhold_bench::util::stop_on_ctrl_c(&rt);
    let machine = machine_info();
    println!(
        "skyhold-bench-ha: VMs {:?} on the victim host, {} run(s) each, paths {:?}, {} other host(s), default HA \
         settings",
        args.vms,
        args.runs,
        paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
        args.others
    );
    print_machine(&machine, &skyhold);
    let dir = args.out.temp_dir("skyhold-bench-ha-")?;

    let mut results: Vec<RunResult> = Vec::new();
    let mut versions: BTreeMap<&'static str, String> = BTreeMap::new();
    'all: for &b in &backends {
        println!("\n== {} ==", b.name());
        for &n in &args.vms {
            for r in 0..args.runs {
                for &p in &paths {
                    if skyhold_bench::stopped() {
                        break 'all;
                    }
                    let run_dir = dir.path().join(format!("{}-n{n}-{}-r{r}", b.name(), p.name()));
                    let case = Case { backend: b, n, path: p, run: r };
                    let res = run_one(&rt, &args, &skyhold, &run_dir, case);
                    let res = match res {
                        Ok((version, res)) => {
                            versions.entry(b.name()).or_insert(version);
                            res
                        }
                        Err(e) => {
                            eprintln!("  {} N={n} {} run {}: {e:#}", b.name(), p.name(), r + 1);
                            RunResult::failed(b, n, p, r, format!("{e:#}"))
                        }
                    };
                    print_run(&res);
                    results.push(res);
                }
            }
            for &p in &paths {
                print_summary(b, n, p, &results);
            }
        }
    }

    let ok = results.iter().all(|r| r.error.is_none() && r.ledger_problems.is_empty())
        && results.len() == backends.len() * args.vms.len() * args.runs * paths.len();
    print_table(&backends, &args.vms, &paths, &results);
    args.out.write_json(|| {
        let mut groups = Vec::new();
        for &b in &backends {
            for &n in &args.vms {
                for &p in &paths {
                    let rs: Vec<&RunResult> =
                        results.iter().filter(|r| r.backend == b && r.n == n && r.path == p).collect();
                    if !rs.is_empty() {
                        groups.push(json!({
                            "backend": b.name(),
                            "vms": n,
                            "path": p.name(),
                            "summary": summaries(&rs).iter().map(|s| s.to_json_as("samples")).collect::<Vec<_>>(),
                        }));
                    }
                }
            }
        }
        let mut out = report_head(machine, &skyhold);
        out["database_versions"] = json!(versions);
        out["config"] = json!({
            "vms": args.vms,
            "runs": args.runs,
            "paths": paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "skipped": skipped,
            "others": args.others,
            "deploy_concurrency": args.deploy_concurrency,
            "poll_ms": args.poll_ms,
            "timeout_secs": args.timeout_secs,
        });
        out["groups"] = json!(groups);
        out["runs"] = results.iter().map(RunResult::to_json).collect();
        out
    })?;
    if args.out.keep {
        let kept = dir.keep();
        println!("kept (--keep): {}", kept.display());
    }
    if !ok {
        eprintln!("some runs failed or broke an invariant (see above)");
    }
    Ok(ok)
}

// ---------------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------------

/// What one run measured. Times are milliseconds from the kill (or the cut, on the IPMI path).
#[derive(Debug, Clone)]
struct RunResult {
    backend: Backend,
    n: usize,
    path: FencePath,
    run: usize,
    error: Option<String>,
    deploy_secs: f64,
    /// API calls answered 530 and retried while deploying (SQLite busy).
    retried_530: usize,
    /// HOST.HA.SUSPECT (the ping timeout passed).
    suspect_ms: Option<f64>,
    /// HOST.HA.FENCED (proof of death): the detection.
    fenced_ms: Option<f64>,
    fence_text: String,
    /// IPMI path: the BMC's power-off (its hook's log).
    power_off_ms: Option<f64>,
    /// The victim's storage heartbeat counter at the kill: in its file on the shared storage, and
    /// as the servers recorded it (from its pings).
    hb_file: Option<i64>,
    hb_recorded: Option<i64>,
    /// HOST.HA.DEGRADED / HOST.HA.FENCE.FAILED events about the victim (should be none).
    degraded_events: usize,
    /// The first HOST.HA.DEGRADED event's text (why a dead host looked alive).
    degraded_text: String,
    fence_failed_events: usize,
    /// VM.HA.RETRY and VM.HA.FAILED events (failed restart attempts).
    retry_events: usize,
    failed_events: usize,
    /// Per VM: first seen Running on another host (database poll), sorted.
    per_vm_ms: Vec<f64>,
    /// VMs never seen Running elsewhere before the timeout.
    missing: usize,
    /// The agents' start of each restart (ledger): first and last.
    ledger_first_ms: Option<f64>,
    ledger_last_ms: Option<f64>,
    /// Where the VMs run at the end (host name -> VMs).
    placement: BTreeMap<String, usize>,
    /// Victim VMs it stopped itself (self-fence / storage loss) before dying.
    victim_self_stops: usize,
    ledger_problems: Vec<String>,
}

impl RunResult {
    fn failed(backend: Backend, n: usize, path: FencePath, run: usize, error: String) -> RunResult {
        RunResult {
            backend,
            n,
            path,
            run,
            error: Some(error),
            deploy_secs: f64::NAN,
            retried_530: 0,
            suspect_ms: None,
            fenced_ms: None,
            fence_text: String::new(),
            power_off_ms: None,
            hb_file: None,
            hb_recorded: None,
            degraded_events: 0,
            degraded_text: String::new(),
            fence_failed_events: 0,
            retry_events: 0,
            failed_events: 0,
            per_vm_ms: Vec::new(),
            missing: n,
            ledger_first_ms: None,
            ledger_last_ms: None,
            placement: BTreeMap::new(),
            victim_self_stops: 0,
            ledger_problems: Vec::new(),
        }
    }

    fn first_ms(&self) -> Option<f64> {
        self.per_vm_ms.first().copied()
    }

    /// All N VMs Running elsewhere (None if some never were).
    fn all_ms(&self) -> Option<f64> {
        if self.missing == 0 && self.per_vm_ms.len() == self.n { self.per_vm_ms.last().copied() } else { None }
    }

    /// From the fence to the last VM Running: the restart phase.
    fn restart_phase_ms(&self) -> Option<f64> {
        Some(self.all_ms()? - self.fenced_ms?)
    }

    fn to_json(&self) -> Value {
        let r = |v: Option<f64>| v.filter(|x| x.is_finite()).map(|x| json!((x * 10.0).round() / 10.0));
        json!({
            "backend": self.backend.name(),
            "vms": self.n,
            "path": self.path.name(),
            "run": self.run + 1,
            "error": self.error,
            "deploy_secs": r(Some(self.deploy_secs)),
            "api_530_retried": self.retried_530,
            "suspect_ms": r(self.suspect_ms),
            "fenced_ms": r(self.fenced_ms),
            "fence_event": self.fence_text,
            "power_off_ms": r(self.power_off_ms),
            "heartbeat_file_at_kill": self.hb_file,
            "heartbeat_recorded_at_kill": self.hb_recorded,
            "first_running_ms": r(self.first_ms()),
            "all_running_ms": r(self.all_ms()),
            "restart_phase_ms": r(self.restart_phase_ms()),
            "ledger_first_start_ms": r(self.ledger_first_ms),
            "ledger_last_start_ms": r(self.ledger_last_ms),
            "per_vm_running_ms": self.per_vm_ms.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "missing": self.missing,
            "placement": self.placement,
            "degraded_events": self.degraded_events,
            "degraded_event": self.degraded_text,
            "fence_failed_events": self.fence_failed_events,
            "vm_ha_retry_events": self.retry_events,
            "vm_ha_failed_events": self.failed_events,
            "victim_self_stops": self.victim_self_stops,
            "ledger_problems": self.ledger_problems,
        })
    }
}

/// Everything a run started; dropping it stops it all (agents, server, BMC, proxy), even when
/// the run fails.
#[derive(Default)]
struct Rig {
    agents: Vec<Agent>,
    server: Option<Server>,
    bmc: Option<Bmc>,
    /// The victim's management network on the IPMI path (cut to isolate it).
    proxy: Option<TcpProxy>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.stop();
        }
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        if let Some(mut b) = self.bmc.take() {
            b.stop();
        }
        self.proxy.take();
    }
}

/// One simulator agent process (one host).
struct Agent {
    child: Option<Child>,
    pid: u32,
    ledger: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// SIGKILL by PID and reap. Returns once the process is gone.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Whether it has exited (reaps it if so).
    fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            None => true,
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            _ => false,
        }
    }

    /// SIGTERM by PID, SIGKILL after 10 s.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
    }
}

/// What every agent of a run shares: the binary, the run's directory, the join token, and the
/// capacity of each host in VMs.
struct Site<'a> {
    bin: &'a Path,
    dir: &'a Path,
    token: &'a str,
    capacity_vms: u64,
}

impl Site<'_> {
    /// Start agent `id` with one host on the shared storage (through `mount`), with its own
    /// control directory and ledger, reaching the server at `mgmt` (only there if `static_mgmt`).
    fn agent(&self, id: &str, mgmt: &str, static_mgmt: bool, mount: &Path) -> Result<Agent> {
        let ctl = self.dir.join(format!("{id}-ctl"));
        std::fs::create_dir_all(&ctl)?;
        let log = self.dir.join(format!("{id}.log"));
        let ledger = self.dir.join(format!("{id}.ledger.jsonl"));
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(self.bin);
        skyhold_testkit::die_with_parent(&mut cmd);
        cmd.args(["agent", "--mgmt", mgmt, &format!("--token={}", self.token), "--simulator"])
            .args(["--hosts", "1", "--agent-id", id])
            .args(["--host-cpus", &(self.capacity_vms * VM_CPUS).to_string()])
            .args(["--host-mem-mb", &(self.capacity_vms * VM_MEM_MB).to_string()])
            .arg("--storage")
            .arg(mount)
            .arg("--control-dir")
            .arg(&ctl)
            .arg("--ledger")
            .arg(&ledger);
        if static_mgmt {
            cmd.arg("--static-mgmt");
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start agent {id}"))?;
        let pid = child.id();
        Ok(Agent { child: Some(child), pid, ledger, log })
    }
}

/// The signed API of one server, as admin.
struct Api {
    base: String,
    admin: Creds,
    /// Calls answered 530 (a storage error: nothing was done) and retried, as a client may.
    retried_530: AtomicUsize,
}

impl Api {
    /// `cmd` with `params`; returns the `<cmd>response` object, or the error's text. A 530 is
    /// retried (up to 50 times, 100 ms apart): the server wrote nothing and asks the client to.
    fn call(&self, cmd: &str, params: &[(&str, &str)]) -> Result<Value> {
        let mut attempt = 0;
        loop {
            let url = format!("{}?{}", self.base, sign::signed_query(&self.admin, cmd, params, 600));
            let v: Value = match ureq::get(&url).timeout(Duration::from_secs(60)).call() {
                Ok(r) => r.into_json()?,
                Err(ureq::Error::Status(530, _)) if attempt < 50 && !skyhold_bench::stopped() => {
                    attempt += 1;
                    self.retried_530.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(ureq::Error::Status(code, r)) => {
                    let mut body = String::new();
                    let _ = r.into_reader().take(4096).read_to_string(&mut body);
                    bail!("{cmd}: HTTP {code}: {body}")
                }
                Err(e) => bail!("{cmd}: {e}"),
            };
            return Ok(v[format!("{}response", cmd.to_lowercase())].clone());
        }
    }
}

/// Which run: database, number of VMs, fencing path, run index.
#[derive(Debug, Clone, Copy)]
struct Case {
    backend: Backend,
    n: usize,
    path: FencePath,
    run: usize,
}

/// One run on a fresh database of its own (dropped afterwards on MariaDB). Returns the database
/// version and what was measured.
fn run_one(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    bin: &Path,
    dir: &Path,
    case: Case,
) -> Result<(String, RunResult)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let db = args.db.database(case.backend, dir, "skyhold_bench_ha_")?;
    let mut rig = Rig::default();
    let res = measure(rt, args, bin, &db.url, dir, case, &mut rig);
    if res.is_err() {
        eprintln!("{}", log_tails(dir, &rig, 15));
    }
    drop(rig);
    db.drop_unless_kept(rt, args.out.keep);
    res
}

/// Build the cloud into `rig`, fill the victim, kill it, wait for the restarts, check the ledgers.
fn measure(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    bin: &Path,
    db_url: &str,
    dir: &Path,
    case: Case,
    rig: &mut Rig,
) -> Result<(String, RunResult)> {
    let Case { backend, n, path, run } = case;
    let source = DbSource::Url(db_url.to_string());
    let init = server::db_init(bin, dir, &source)?;
    let db = rt
        .block_on(Db::connect(&DbConfig { url: db_url.to_string(), max_connections: 4, create: false }))
        .context("connect to the database")?;
    let version = rt.block_on(database_version(&db)).unwrap_or_else(|e| format!("unknown ({e})"));
    let srv = rig.server.insert(Server::start(bin, dir, &source, &ServerOpts::default())?);
    let api = Api { base: srv.base(), admin: init.admin.clone(), retried_530: AtomicUsize::new(0) };
    let agent_addr = format!("127.0.0.1:{}", srv.agent_port);

    // Shared primary storage; every host mounts it through its own symlink (the IPMI path
    // removes the victim's to cut it off its storage).
    let storage = dir.join("primary");
    std::fs::create_dir_all(&storage)?;
    // Room for all N VMs on any one host.
    let site = Site { bin, dir, token: &init.agent_token, capacity_vms: n as u64 + 16 };
    let mount = |id: &str| -> Result<PathBuf> {
        let m = dir.join(format!("{id}-mnt"));
        let _ = std::fs::remove_file(&m);
        std::os::unix::fs::symlink(&storage, &m)?;
        Ok(m)
    };
    let victim_mgmt = match path {
        FencePath::Lease => agent_addr.clone(),
        FencePath::Ipmi => {
            let p = TcpProxy::start(&agent_addr)?;
            let a = format!("127.0.0.1:{}", p.port);
            rig.proxy = Some(p);
            a
        }
    };
    rig.agents.push(site.agent(VICTIM, &victim_mgmt, path == FencePath::Ipmi, &mount(VICTIM)?)?);
    for i in 1..=args.others {
        let id = format!("other{i}");
        rig.agents.push(site.agent(&id, &agent_addr, false, &mount(&id)?)?);
    }
    let hosts = rt.block_on(wait_hosts_up(&db, 1 + args.others, Duration::from_secs(60)))?;
    let victim = hosts.iter().find(|h| h.agent_id == VICTIM).context("no victim host")?.clone();
    let guid_of: HashMap<String, String> = hosts.iter().map(|h| (h.id.clone(), h.guid.clone())).collect();
    let name_of_guid: HashMap<String, String> = hosts.iter().map(|h| (h.guid.clone(), h.name.clone())).collect();

    if path == FencePath::Ipmi {
        // From this (the main) thread: the simulator dies with the thread that started it.
        let bmc = Bmc::start(&dir.join("bmc"), BMC_PASSWORD)?;
        bmc.set_host_pid(rig.agents[0].pid)?;
        let port = bmc.port.to_string();
        rig.bmc = Some(bmc);
        api.call(
            "configureOutOfBandManagement",
            &[
                ("hostid", &victim.id),
                ("driver", "ipmitool"),
                ("address", skyhold_testkit::bmc::BMC_ADDRESS),
                ("port", &port),
                ("username", skyhold_testkit::bmc::BMC_USER),
                ("password", BMC_PASSWORD),
            ],
        )?;
        api.call("enableOutOfBandManagementForHost", &[("hostid", &victim.id)])?;
    }

    // Fill the victim.
    let t_deploy = Instant::now();
    let vm_ids = deploy_all(&api, &victim.id, n, run, args.deploy_concurrency)?;
    let deploy_secs = t_deploy.elapsed().as_secs_f64();
    let vm_set: HashSet<String> = vm_ids.iter().cloned().collect();
    rt.block_on(async {
        let mut c = db.conn().await?;
        let (conn, _) = c.parts();
        let on_victim: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM vm_instance WHERE host_id = ? AND state = 'Running' AND removed_ms IS NULL",
        )
        .bind(&victim.id)
        .fetch_one(conn)
        .await?;
        if on_victim != n as i64 {
            bail!("{on_victim} VMs Running on the victim after deploying {n}");
        }
        Ok(())
    })?;
    // The servers must have seen the victim's storage heartbeat (it is what the lease counts
    // from), then a random point in the ping cycle (2 s).
    rt.block_on(wait_heartbeat_seen(&db, &victim.id, Duration::from_secs(30)))?;
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 2000));

    // Kill.
    let t_kill = epoch_ms();
    let mut death_ms = t_kill;
    match path {
        FencePath::Lease => {
            rig.agents[0].kill9();
            death_ms = epoch_ms();
        }
        FencePath::Ipmi => {
            std::fs::write(dir.join(format!("{VICTIM}-ctl")).join("isolate"), b"")?;
            std::fs::remove_file(dir.join(format!("{VICTIM}-mnt")))?;
            rig.proxy.as_ref().expect("ipmi path has a proxy").cut(Cut::Refuse);
        }
    }
    // What the neighbours will read, and what the servers compare it with.
    let hb_file = std::fs::read_to_string(storage.join("heartbeat").join(&victim.guid))
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok());
    let hb_recorded = rt.block_on(async {
        let mut c = db.conn().await?;
        let (conn, _) = c.parts();
        let v: i64 =
            sqlx::query_scalar("SELECT hb_counter FROM host WHERE id = ?").bind(&victim.id).fetch_one(conn).await?;
        anyhow::Ok(v)
    });
    let hb_recorded = hb_recorded.ok();
    println!(
        "  {} N={n} {} run {}: {n} VMs deployed on {} in {deploy_secs:.1} s; host {} at {t_kill}",
        backend.name(),
        path.name(),
        run + 1,
        victim.name,
        if path == FencePath::Lease { "killed" } else { "cut off" },
    );

    // Wait for every VM to be Running elsewhere.
    let poll = Duration::from_millis(args.poll_ms.max(10));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut seen: HashMap<String, i64> = HashMap::new();
    let mut exited_seen_ms: Option<i64> = None;
    while seen.len() < n && Instant::now() < deadline && !skyhold_bench::stopped() {
        let rows = rt.block_on(vm_states(&db))?;
        let now = epoch_ms();
        for (id, state, host) in rows {
            if state == "Running"
                && host.as_deref().is_some_and(|h| h != victim.id)
                && vm_set.contains(&id)
                && !seen.contains_key(&id)
            {
                seen.insert(id, now - t_kill);
            }
        }
        if path == FencePath::Ipmi && exited_seen_ms.is_none() && rig.agents[0].exited() {
            exited_seen_ms = Some(now);
        }
        std::thread::sleep(poll);
    }
    if skyhold_bench::stopped() {
        bail!("interrupted");
    }
    let missing = n - seen.len();
    let mut per_vm_ms: Vec<f64> = seen.values().map(|&v| v as f64).collect();
    per_vm_ms.sort_by(f64::total_cmp);

    // Events about the victim and the VMs.
    let events = rt.block_on(events(&db))?;
    let ev_time = |t: &str| {
        events
            .iter()
            .filter(|e| e.0 == t && e.1.as_deref() == Some(victim.id.as_str()))
            .map(|e| e.2)
            .min()
            .map(|at| (at - t_kill) as f64)
    };
    let count = |t: &str| events.iter().filter(|e| e.0 == t).count();
    let text_of = |t: &str| {
        events
            .iter()
            .find(|e| e.0 == t && e.1.as_deref() == Some(victim.id.as_str()))
            .map(|e| e.3.chars().take(400).collect::<String>())
            .unwrap_or_default()
    };
    let fence_text = text_of("HOST.HA.FENCED");

    // IPMI: the victim dies when its BMC powers it off.
    let mut power_off_ms = None;
    if path == FencePath::Ipmi {
        let bmc = rig.bmc.as_ref().expect("ipmi path has a BMC");
        match bmc_power_off_ms(bmc) {
            Some(off) => {
                death_ms = off;
                power_off_ms = Some((off - t_kill) as f64);
            }
            None => {
                // Not powered off (the host is still alive, or was fenced otherwise): wait for
                // its death no longer; the ledger check uses the time its exit was seen, or now.
                let _ = rig.agents[0].exited();
                death_ms = exited_seen_ms.unwrap_or_else(epoch_ms);
            }
        }
    }

    // Ground truth: the ledgers.
    let victim_guid = victim.guid.clone();
    let mut entries: Vec<Value> = Vec::new();
    for a in &rig.agents {
        entries.extend(skyhold_testkit::ledger::read_ledger(&a.ledger)?);
    }
    let db_now = rt.block_on(vm_states(&db))?;
    let check = check_ledger(&entries, &victim_guid, death_ms, &vm_ids, &db_now, &guid_of);
    let mut placement: BTreeMap<String, usize> = BTreeMap::new();
    for g in check.final_host.values() {
        *placement.entry(name_of_guid.get(g).cloned().unwrap_or_else(|| g.clone())).or_default() += 1;
    }
    let res = RunResult {
        backend,
        n,
        path,
        run,
        error: (missing > 0)
            .then(|| format!("{missing} of {n} VMs not Running elsewhere {} s after the kill", args.timeout_secs)),
        deploy_secs,
        retried_530: api.retried_530.load(Ordering::Relaxed),
        suspect_ms: ev_time("HOST.HA.SUSPECT"),
        fenced_ms: ev_time("HOST.HA.FENCED"),
        fence_text,
        power_off_ms,
        hb_file,
        hb_recorded,
        degraded_events: count("HOST.HA.DEGRADED"),
        degraded_text: text_of("HOST.HA.DEGRADED"),
        fence_failed_events: count("HOST.HA.FENCE.FAILED"),
        retry_events: count("VM.HA.RETRY"),
        failed_events: count("VM.HA.FAILED"),
        per_vm_ms,
        missing,
        ledger_first_ms: check.restart_ts.iter().min().map(|&t| (t - t_kill) as f64),
        ledger_last_ms: check.restart_ts.iter().max().map(|&t| (t - t_kill) as f64),
        placement,
        victim_self_stops: check.victim_self_stops,
        ledger_problems: check.problems,
    };
    if res.error.is_some() {
        eprintln!("{}", log_tails(dir, rig, 15));
    }
    rt.block_on(db.close());
    Ok((version, res))
}

/// Deploy `n` HA VMs on `host_id`, `concurrency` at a time, each waited for through
/// `queryAsyncJobResult`. Returns their ids.
fn deploy_all(api: &Api, host_id: &str, n: usize, run: usize, concurrency: usize) -> Result<Vec<String>> {
    let zone = api.call("listZones", &[])?["zone"][0]["id"].as_str().context("no zone")?.to_string();
    let template = api.call("listTemplates", &[("templatefilter", "featured")])?["template"][0]["id"]
        .as_str()
        .context("no featured template")?
        .to_string();
    let offering = api.call("listServiceOfferings", &[])?["serviceoffering"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["name"] == OFFERING))
        .and_then(|o| o["id"].as_str())
        .with_context(|| format!("no {OFFERING:?} offering"))?
        .to_string();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let ids = Mutex::new(Vec::with_capacity(n));
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, n) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || failed.load(Ordering::Relaxed) || skyhold_bench::stopped() {
                        return;
                    }
                    let name = format!("ha-r{}-{i:04}", run + 1);
                    match deploy_one(api, &zone, &template, &offering, host_id, &name) {
                        Ok(id) => ids.lock().expect("ids").push(id),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().expect("error").get_or_insert(format!("{e:#}"));
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error") {
        bail!("deploying {n} VMs: {e}");
    }
    if skyhold_bench::stopped() {
        bail!("interrupted while deploying");
    }
    Ok(ids.into_inner().expect("ids"))
}

fn deploy_one(api: &Api, zone: &str, template: &str, offering: &str, host: &str, name: &str) -> Result<String> {
    let r = api.call(
        "deployVirtualMachine",
        &[
            ("zoneid", zone),
            ("templateid", template),
            ("serviceofferingid", offering),
            ("hostid", host),
            ("name", name),
        ],
    )?;
    let id = r["id"].as_str().with_context(|| format!("no VM id in {r}"))?.to_string();
    let job = r["jobid"].as_str().with_context(|| format!("no jobid in {r}"))?.to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let j = api.call("queryAsyncJobResult", &[("jobid", &job)])?;
        match j["jobstatus"].as_i64() {
            Some(0) => {}
            Some(1) => return Ok(id),
            _ => bail!("deploy {name}: {j}"),
        }
        if Instant::now() > deadline || skyhold_bench::stopped() {
            bail!("deploy {name}: job {job} did not finish within 300 s");
        }
    }
}

/// Wait until `n` hosts are Up; returns every host.
async fn wait_hosts_up(db: &Db, n: usize, within: Duration) -> Result<Vec<skyhold_db::infra::Host>> {
    let end = Instant::now() + within;
    loop {
        let hosts = {
            let mut c = db.conn().await?;
            skyhold_db::infra::host_list(&mut c).await?
        };
        let up = hosts.iter().filter(|h| h.status == "Up").count();
        if up >= n {
            return Ok(hosts);
        }
        if Instant::now() > end || skyhold_bench::stopped() {
            bail!("only {up} of {n} hosts came up within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the servers have recorded a storage heartbeat of the host.
async fn wait_heartbeat_seen(db: &Db, host_id: &str, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    loop {
        let seen: i64 = {
            let mut c = db.conn().await?;
            let (conn, _) = c.parts();
            sqlx::query_scalar("SELECT hb_seen_ms FROM host WHERE id = ?").bind(host_id).fetch_one(conn).await?
        };
        if seen > 0 {
            return Ok(());
        }
        if Instant::now() > end || skyhold_bench::stopped() {
            bail!("no storage heartbeat of the victim recorded within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (id, state, host id) of every VM.
async fn vm_states(db: &Db) -> Result<Vec<(String, String, Option<String>)>> {
    let mut c = db.conn().await?;
    let (conn, _) = c.parts();
    Ok(sqlx::query_as("SELECT id, state, host_id FROM vm_instance WHERE removed_ms IS NULL").fetch_all(conn).await?)
}

/// (type, resource id, created ms, description) of the HA events.
async fn events(db: &Db) -> Result<Vec<(String, Option<String>, i64, String)>> {
    use sqlx::Row;
    let mut c = db.conn().await?;
    let (conn, _) = c.parts();
    let rows = sqlx::query(
        "SELECT type, resource_id, created_ms, description FROM event WHERE type LIKE 'HOST.HA.%' \
         OR type IN ('VM.HA.RETRY', 'VM.HA.FAILED') ORDER BY seq",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            // A TEXT column reaches the Any driver as a BLOB on MariaDB.
            let description = match r.try_get::<String, _>(3) {
                Ok(s) => s,
                Err(_) => String::from_utf8_lossy(&r.try_get::<Vec<u8>, _>(3)?).into_owned(),
            };
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, description))
        })
        .collect()
}

/// Epoch ms of the BMC hook's first `set power 0` (its log has the local time of day,
/// `HH:MM:SS.nnnnnnnnn set power 0`; the bench and the BMC share the machine's clock and zone).
fn bmc_power_off_ms(bmc: &Bmc) -> Option<i64> {
    let line = bmc.calls().into_iter().find(|l| l.contains("set power 0"))?;
    let tod = line.split_whitespace().next()?;
    let (hms, frac) = tod.split_once('.').unwrap_or((tod, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let ms = format!("{frac:0<3}")[..3].parse::<i64>().ok()?;
    // The local offset, from `date +%z` (the hook's clock is `date` too).
    let z = Command::new("date").arg("+%z").output().ok()?;
    let z = String::from_utf8_lossy(&z.stdout).trim().to_string();
    let sign = if z.starts_with('-') { -1 } else { 1 };
    let digits: String = z.chars().filter(char::is_ascii_digit).collect();
    let off_min = sign * (digits.get(0..2)?.parse::<i64>().ok()? * 60 + digits.get(2..4)?.parse::<i64>().ok()?);
    let now = epoch_ms();
    let local_now = now + off_min * 60_000;
    let local_day = local_now - local_now.rem_euclid(86_400_000);
    let mut t = local_day + ((h * 60 + m) * 60 + s) * 1000 + ms - off_min * 60_000;
    if t > now + 3_600_000 {
        t -= 86_400_000; // logged before midnight
    }
    Some(t)
}

// ---------------------------------------------------------------------------------------------
// Ground truth
// ---------------------------------------------------------------------------------------------

struct LedgerCheck {
    problems: Vec<String>,
    /// Where each of the N VMs runs at the end (host guid).
    final_host: HashMap<String, String>,
    /// Per VM of the N: its (first) restart's start on another host.
    restart_ts: Vec<i64>,
    victim_self_stops: usize,
}

/// Replay the ledgers in `ts_ms` order, with the victim dead from `death_ms`
/// (`skyhold_testkit::ledger::replay_ledger`, as the tests do):
/// every `(job, step)` executed at most once; a VM never running on two hosts; and each of the
/// N VMs started exactly once on another host, running there at the end, where the database says
/// it runs.
fn check_ledger(
    entries: &[Value],
    victim_guid: &str,
    death_ms: i64,
    vm_ids: &[String],
    db_vms: &[(String, String, Option<String>)],
    guid_of: &HashMap<String, String>,
) -> LedgerCheck {
    let mut problems = Vec::new();
    let mut l: Vec<Value> = entries.to_vec();
    l.push(json!({ "kind": "host_dead", "host": victim_guid, "vm": "", "state": "Stopped", "ts_ms": death_ms }));
    // Stable: entries of one ledger keep their order.
    l.sort_by_key(|e| e["ts_ms"].as_i64().unwrap_or(0));
    let replay = skyhold_testkit::ledger::replay_ledger(&l);
    problems.extend(replay.problems);
    let running = replay.running;
    let victim_self_stops = l
        .iter()
        .filter(|e| {
            e["host"].as_str() == Some(victim_guid)
                && matches!(e["kind"].as_str(), Some("self_fence" | "storage_lost"))
                && e["vm"].as_str().is_some_and(|v| !v.is_empty())
        })
        .count();
    // Each VM: exactly one start elsewhere, running there, and the database agrees.
    let mut starts: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in &l {
        if e["kind"] == "exec"
            && e["outcome"] == "ok"
            && e["op"] == "start"
            && e["state"] == "Running"
            && e["host"].as_str() != Some(victim_guid)
            && let Some(vm) = e["vm"].as_str()
        {
            starts.entry(vm).or_default().push(e["ts_ms"].as_i64().unwrap_or(0));
        }
    }
    let db: HashMap<&str, (&str, Option<&str>)> =
        db_vms.iter().map(|(id, st, h)| (id.as_str(), (st.as_str(), h.as_deref()))).collect();
    let mut final_host = HashMap::new();
    let mut restart_ts = Vec::new();
    let mut bad = 0usize;
    for id in vm_ids {
        let s = starts.get(id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(&t) = s.first() {
            restart_ts.push(t);
        }
        let ledger_host = running.get(id);
        let db_host = db.get(id.as_str()).and_then(|(st, h)| (*st == "Running").then_some(*h).flatten());
        let db_guid = db_host.and_then(|h| guid_of.get(h));
        let ok = s.len() == 1 && ledger_host.is_some_and(|h| h != victim_guid) && ledger_host == db_guid;
        if !ok {
            bad += 1;
            if bad <= 5 {
                problems.push(format!(
                    "VM {id}: {} start(s) elsewhere in the ledger, running on {ledger_host:?} by the ledger, on {db_guid:?} \
                     by the database",
                    s.len()
                ));
            }
        }
        if let Some(h) = ledger_host {
            final_host.insert(id.clone(), h.clone());
        }
    }
    if bad > 5 {
        problems.push(format!("... {bad} VMs in all not started exactly once elsewhere"));
    }
    LedgerCheck { problems, final_host, restart_ts, victim_self_stops }
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

fn log_tails(dir: &Path, rig: &Rig, n: usize) -> String {
    let mut out = String::new();
    let files = std::iter::once(dir.join("server.log")).chain(rig.agents.iter().map(|a| a.log.clone()));
    for p in files {
        out.push_str(&log_tail(&p, n));
        out.push('\n');
    }
    out
}

fn summaries(rs: &[&RunResult]) -> Vec<Summary> {
    vec![
        Summary::of("suspect (ping timeout)", rs.iter().map(|r| r.suspect_ms)),
        Summary::of("detection (HOST.HA.FENCED)", rs.iter().map(|r| r.fenced_ms)),
        Summary::of("first VM Running elsewhere", rs.iter().map(|r| r.first_ms())),
        Summary::of("all VMs Running elsewhere", rs.iter().map(|r| r.all_ms())),
        Summary::of("restart phase (fenced -> all Running)", rs.iter().map(|r| r.restart_phase_ms())),
        Summary::of("per VM (every VM of every run)", rs.iter().flat_map(|r| r.per_vm_ms.iter().map(|&v| Some(v)))),
    ]
}

fn secs(v: f64) -> String {
    if v.is_finite() { format!("{:.1}", v / 1000.0) } else { "-".into() }
}

fn opt_secs(v: Option<f64>) -> String {
    v.map(secs).unwrap_or_else(|| "-".into())
}

fn print_run(r: &RunResult) {
    let rate = r.restart_phase_ms().filter(|&ms| ms > 0.0).map(|ms| r.n as f64 / (ms / 1000.0));
    println!(
        "    suspect {} s, fenced {} s{}, first {} s, all {} s (restart phase {} s, {}); ledger: starts {}..{} s, {}{}",
        opt_secs(r.suspect_ms),
        opt_secs(r.fenced_ms),
        r.power_off_ms.map(|v| format!(" (BMC power-off {} s)", secs(v))).unwrap_or_default(),
        opt_secs(r.first_ms()),
        opt_secs(r.all_ms()),
        opt_secs(r.restart_phase_ms()),
        rate.map(|v| format!("{v:.1} VMs/s")).unwrap_or_else(|| "-".into()),
        opt_secs(r.ledger_first_ms),
        opt_secs(r.ledger_last_ms),
        if r.ledger_problems.is_empty() { "ok".to_string() } else { r.ledger_problems.join("; ") },
        if r.victim_self_stops > 0 {
            format!(", victim stopped {} VMs itself first", r.victim_self_stops)
        } else {
            String::new()
        },
    );
    let mut odd = Vec::new();
    if r.degraded_events > 0 {
        odd.push(format!("{} HOST.HA.DEGRADED", r.degraded_events));
    }
    if r.fence_failed_events > 0 {
        odd.push(format!("{} HOST.HA.FENCE.FAILED", r.fence_failed_events));
    }
    if r.retry_events > 0 {
        odd.push(format!("{} VM.HA.RETRY", r.retry_events));
    }
    if r.failed_events > 0 {
        odd.push(format!("{} VM.HA.FAILED", r.failed_events));
    }
    if r.retried_530 > 0 {
        odd.push(format!("{} API calls answered 530 while deploying (retried)", r.retried_530));
    }
    if !odd.is_empty() {
        println!("    notes: {}", odd.join(", "));
    }
    if !r.fence_text.is_empty() {
        println!("    fence: {}", r.fence_text.chars().take(160).collect::<String>());
    }
    if r.hb_file != r.hb_recorded {
        println!(
            "    heartbeat at the kill: {} in the file, {} recorded from the pings",
            r.hb_file.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            r.hb_recorded.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    if !r.degraded_text.is_empty() {
        println!("    degraded: {}", r.degraded_text.chars().take(240).collect::<String>());
    }
    println!("    placement: {:?}", r.placement);
    if let Some(e) = &r.error {
        println!("    FAILED: {}", e.lines().next().unwrap_or(""));
    }
}

fn print_summary(b: Backend, n: usize, p: FencePath, results: &[RunResult]) {
    let rs: Vec<&RunResult> = results.iter().filter(|r| r.backend == b && r.n == n && r.path == p).collect();
    if rs.is_empty() {
        return;
    }
    println!("\n  {} N={n} {}: {} run(s)  [seconds from the {}]", b.name(), p.name(), rs.len(), kill_word(p));
    println!("    {:<40} {:>8} {:>8} {:>8} {:>8}  samples", "", "min", "p50", "p99", "max");
    for s in summaries(&rs) {
        println!(
            "    {:<40} {:>8} {:>8} {:>8} {:>8}  {}{}",
            s.what,
            secs(s.min),
            secs(s.p50),
            secs(s.p99),
            secs(s.max),
            s.n,
            if s.missing > 0 { format!(" ({} missing)", s.missing) } else { String::new() }
        );
    }
    let bad = rs.iter().filter(|r| !r.ledger_problems.is_empty()).count();
    println!("    ledger check: {} of {} run(s) clean", rs.len() - bad, rs.len());
    println!();
}

fn kill_word(p: FencePath) -> &'static str {
    match p {
        FencePath::Lease => "SIGKILL",
        FencePath::Ipmi => "cut",
    }
}

/// The README table: one line per backend, N and path.
fn print_table(backends: &[Backend], vms: &[usize], paths: &[FencePath], results: &[RunResult]) {
    println!(
        "\n| backend | VMs | path | runs | detection p50 / p99 | first VM p50 / p99 | all VMs p50 / p99 (min-max) | ledger |"
    );
    println!("|---|---:|---|---:|---|---|---|---|");
    for &b in backends {
        for &n in vms {
            for &p in paths {
                let rs: Vec<&RunResult> =
                    results.iter().filter(|r| r.backend == b && r.n == n && r.path == p).collect();
                if rs.is_empty() {
                    continue;
                }
                let s = summaries(&rs);
                let clean = rs.iter().filter(|r| r.ledger_problems.is_empty() && r.error.is_none()).count();
                println!(
                    "| {} | {n} | {} | {} | {} / {} s | {} / {} s | {} / {} s ({}-{}) | {clean}/{} clean |",
                    b.name(),
                    p.name(),
                    rs.len(),
                    secs(s[1].p50),
                    secs(s[1].p99),
                    secs(s[2].p50),
                    secs(s[2].p99),
                    secs(s[3].p50),
                    secs(s[3].p99),
                    secs(s[3].min),
                    secs(s[3].max),
                    rs.len()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(ts: i64, host: &str, vm: &str, job: &str) -> Value {
        json!({ "ts_ms": ts, "kind": "exec", "op": "start", "outcome": "ok", "state": "Running",
                "host": host, "vm": vm, "job": job, "step": 1 })
    }

    #[test]
    fn ledger_check_needs_the_victim_dead_before_a_restart() {
        let guid_of: HashMap<String, String> =
            [("H-v".to_string(), "victim-h0".to_string()), ("H-o".to_string(), "other1-h0".to_string())].into();
        let db = vec![("vm1".to_string(), "Running".to_string(), Some("H-o".to_string()))];
        let vms = vec!["vm1".to_string()];
        let l = vec![start(100, "victim-h0", "vm1", "j1"), start(300, "other1-h0", "vm1", "j2")];
        // Dead at 200, restarted at 300: clean.
        let ok = check_ledger(&l, "victim-h0", 200, &vms, &db, &guid_of);
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!(ok.final_host.get("vm1").map(String::as_str), Some("other1-h0"));
        assert_eq!(ok.restart_ts, vec![300]);
        // Dead only at 400: the VM ran on two hosts.
        let bad = check_ledger(&l, "victim-h0", 400, &vms, &db, &guid_of);
        assert!(bad.problems.iter().any(|p| p.contains("two hosts")), "{:?}", bad.problems);
        // Started twice elsewhere, or the same (job, step) executed twice.
        let mut twice = l.clone();
        twice.push(start(350, "other1-h0", "vm1", "j2"));
        let bad = check_ledger(&twice, "victim-h0", 200, &vms, &db, &guid_of);
        assert!(bad.problems.iter().any(|p| p.contains("executed twice")), "{:?}", bad.problems);
        assert!(bad.problems.iter().any(|p| p.contains("2 start(s)")), "{:?}", bad.problems);
        // The database disagrees with the ledger.
        let db_elsewhere = vec![("vm1".to_string(), "Running".to_string(), Some("H-v".to_string()))];
        let bad = check_ledger(&l, "victim-h0", 200, &vms, &db_elsewhere, &guid_of);
        assert!(!bad.problems.is_empty());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Summary::of("x", (1..=5).map(|v| Some(v as f64)).chain([None]));
        assert_eq!((s.n, s.missing, s.min, s.p50, s.p99, s.max), (5, 1, 1.0, 3.0, 5.0, 5.0));
    }
}
