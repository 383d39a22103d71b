//! `skyhold-bench-db`: what database HA costs and how long it takes, on a real `skyhold server`.
//!
//! 1. **Galera**: a 3-node MariaDB Galera cluster, one server (`--db-properties`, topology
//!    `galera`, the three nodes in `db.cloud.host`) and a simulator agent. Writers keep calling
//!    `deployVirtualMachine`; each round SIGKILLs the node the server writes to and measures the
//!    write-unavailability window, then restarts the node and waits until it is Synced.
//! 2. **Replication**: a GTID primary/replica pair (`db.cloud.host` = primary, `db.cloud.slaves` =
//!    replica, topology `replication`). Each round SIGKILLs the primary, promotes the replica at
//!    once (the operator's act), measures the window and counts acknowledged writes missing from
//!    the new primary, then makes the old primary a replica of the new one.
//! 3. **Async-job throughput** (`deployVirtualMachine` jobs submitted and completed per second)
//!    on SQLite, a single MariaDB and a 3-node Galera cluster, each beside that database's raw
//!    commit rate (single-row INSERT + COMMIT) measured in the same run.
//!
//! It prints figures; it asserts nothing about them. See `bench/README.md`.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use skyhold_bench::backend::BenchDb;
use skyhold_bench::cli::{OutputArgs, SkyholdArgs};
use skyhold_bench::load::round3;
use skyhold_bench::server::{self, DbSource, Init, Server, ServerOpts};
use skyhold_bench::sign::{self, Creds};
use skyhold_bench::util::{DeployIds, machine_info, print_machine, report_head};
use skyhold_db::{Db, DbConfig, DbError, Dialect, Sql, retry_tx};
use skyhold_testkit::{Galera, Mdb, Rejoin, die_with_parent, fast_tmp, promote, reattach_as_replica, sql};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Capacity of every simulated host: thousands of deployments never run out.
const HOST_CPUS: &str = "4096";
const HOST_MEM_MB: &str = "4194304";
/// The application account the bench creates on its MariaDB nodes.
const DB_USER: &str = "skyhold";
const DB_PASSWORD: &str = "sky";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Backend {
    Sqlite,
    Mariadb,
    Galera,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Mariadb => "mariadb",
            Backend::Galera => "galera",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "skyhold-bench-db",
    about = "Database failover window (Galera node, replication primary) and async-job throughput per backend",
    mut_arg("json_out", |a| a.help("Also write every round and figure as JSON to this file")),
    mut_arg("tmp_dir", |a| a.help(
        "Parent directory of the temporary directory (database nodes, data directories, logs). Default: \
         /dev/shm when it exists"
    )),
    mut_arg("keep", |a| a.help("Keep the temporary directory (and the MariaDB database of --mysql-url) afterwards"))
)]
struct Args {
    #[command(flatten)]
    bin: SkyholdArgs,
    /// Kills per topology.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Concurrent writers during the failover rounds.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Each writer starts one deployVirtualMachine every this many ms (or as soon as the previous
    /// call returns, if it took longer).
    #[arg(long, default_value_t = 40)]
    write_interval_ms: u64,
    /// Failover writers deploy with startvm=false (the write is the VM and its job; no agent work).
    #[arg(long)]
    stopped_vms: bool,
    /// Writes run this long before each kill.
    #[arg(long, default_value_t = 2000)]
    pre_kill_ms: u64,
    /// Writes go on this long after the first success following a kill.
    #[arg(long, default_value_t = 1000)]
    post_ms: u64,
    /// Give up waiting for a successful write after a kill after this long.
    #[arg(long, default_value_t = 120)]
    window_timeout_secs: u64,
    /// Wait at most this long for a killed node to be back (Synced, or replicating and caught up).
    #[arg(long, default_value_t = 180)]
    restore_timeout_secs: u64,
    /// Replication: how long the promotion lets the replica apply what it had received.
    #[arg(long, default_value_t = 1000)]
    promote_drain_ms: u64,
    /// Galera cluster size.
    #[arg(long, default_value_t = 3)]
    galera_nodes: usize,
    /// Backends of the throughput part.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sqlite,mariadb,galera")]
    backends: Vec<Backend>,
    /// Single MariaDB of the throughput part: this server (mysql://USER:PASS@HOST:PORT, a database
    /// of its own is created and dropped). Default: a private node the bench starts.
    #[arg(long, env = "SKYHOLD_BENCH_MYSQL_URL")]
    mysql_url: Option<String>,
    /// Concurrent API clients (throughput) and connections (raw commit rate).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Throughput: at most this many unfinished jobs; clients wait while the backlog is full
    /// (default 4 x concurrency).
    #[arg(long)]
    max_backlog: Option<usize>,
    /// Measured seconds of each throughput and raw commit measurement.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Unmeasured seconds before each.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Simulator agents (throughput part; the failover parts run one).
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Hosts per agent.
    #[arg(long, default_value_t = 2)]
    hosts: u32,
    /// Skip the Galera failover rounds.
    #[arg(long)]
    skip_galera: bool,
    /// Skip the replication failover rounds.
    #[arg(long)]
    skip_replication: bool,
    /// Skip the throughput part.
    #[arg(long)]
    skip_throughput: bool,
    #[command(flatten)]
    out: OutputArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    skyhold_bench::exit_code(run(args))
}

fn run(args: Args) -> Result<bool> {
    if args.kills == 0 || args.writers == 0 || args.concurrency == 0 || args.duration_secs == 0 {
        bail!("--kills, --writers, --concurrency and --duration-secs must be at least 1");
    }
    if args.galera_nodes < 3 {
        bail!("--galera-nodes must be at least 3 (a killed node must leave a quorum)");
    }
    let skyhold = args.bin.binary()?;
    if !skyhold_testkit::have_mariadb() {
        bail!("mariadbd not found: apt-get install mariadb-server mariadb-client (scripts/test.sh installs them)");
    }
    let galera_needed = !args.skip_galera || (!args.skip_throughput && args.backends.contains(&Backend::Galera));
    if galera_needed && !skyhold_testkit::have_galera() {
        bail!("Galera needs galera-4 and rsync: apt-get install galera-4 rsync (or --skip-galera, --backends)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    skyhold_bench::util::stop_on_ctrl_c(&rt);
    let machine = machine_info();
    println!(
        "skyhold-bench-db: {} kills per topology, {} writers every {} ms ({}); throughput on {:?}, concurrency {}, {} s",
        args.kills,
        args.writers,
        args.write_interval_ms,
        if args.stopped_vms { "startvm=false" } else { "VMs started" },
        args.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        args.concurrency,
        args.duration_secs
    );
    print_machine(&machine, &skyhold);
    let dir = args.out.temp_dir_or("skyhold-bench-db-", fast_tmp())?;
    // Galera nodes run as the mysql user: it must reach their directories.
    let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
    println!("working directory: {}", dir.path().display());
    let bench = Bench { args: &args, bin: &skyhold, dir: dir.path(), rt: &rt };

    let mut ok = true;
    let mut out = report_head(machine, &skyhold);
    // One Galera cluster serves the failover rounds and the throughput part (a database each).
    let mut galera: Option<Galera> = None;
    if !args.skip_galera && !skyhold_bench::stopped() {
        println!("\n== Galera: kill the node the server writes to ==");
        match bench.galera_cluster(&mut galera).and_then(|g| bench.failover(Topo::Galera(g))) {
            Ok(r) => {
                ok &= r.complete(args.kills);
                print_failover(&r);
                out["galera_failover"] = r.to_json();
            }
            Err(e) => {
                eprintln!("galera failover: {e:#}");
                ok = false;
            }
        }
    }
    if !args.skip_replication && !skyhold_bench::stopped() {
        println!("\n== Replication: kill the primary, promote the replica ==");
        let res = skyhold_testkit::start_pair(&dir.path().join("pair"), DB_USER, DB_PASSWORD)
            .context("start a primary/replica pair")
            .and_then(|p| bench.failover(Topo::Pair { nodes: [p.primary, p.replica], primary: 0 }));
        match res {
            Ok(r) => {
                ok &= r.complete(args.kills);
                print_failover(&r);
                out["replication_failover"] = r.to_json();
            }
            Err(e) => {
                eprintln!("replication failover: {e:#}");
                ok = false;
            }
        }
    }
    if !args.skip_throughput && !skyhold_bench::stopped() {
        println!("\n== Async-job throughput beside the raw commit rate ==");
        let mut rows = Vec::new();
        let mut backends = args.backends.clone();
        backends.sort();
        backends.dedup();
        for b in backends {
            if skyhold_bench::stopped() {
                ok = false;
                break;
            }
            println!("\n-- {} --", b.name());
            match bench.throughput(b, &mut galera) {
                Ok(t) => {
                    ok &= t.errors == 0 && t.completed > 0;
                    rows.push(t);
                }
                Err(e) => {
                    eprintln!("{} throughput: {e:#}", b.name());
                    ok = false;
                }
            }
        }
        print_throughput(&args, &rows);
        out["throughput"] = Value::Array(rows.iter().map(Tput::to_json).collect());
    }
    drop(galera);

    args.out.write_json(|| out)?;
    if args.out.keep {
        println!("kept (--keep): {}", dir.keep().display());
    } else if let Err(e) = dir.close() {
        eprintln!("could not remove the temporary directory: {e}");
    }
    Ok(ok && !skyhold_bench::stopped())
}

// ------------------------------------------------------------------------------------------
// Skyhold processes
// ------------------------------------------------------------------------------------------

/// A CloudStack db.properties for `hosts` (first = `db.cloud.host`), Skyhold defaults otherwise.
fn write_properties(path: &Path, topology: &str, host: &str, slaves: &str, db_name: &str) -> Result<()> {
    let mut text = format!(
        "db.cloud.username={DB_USER}\ndb.cloud.password={DB_PASSWORD}\ndb.cloud.name={db_name}\n\
         db.cloud.host={host}\ndb.ha.enabled=true\ndb.ha.topology={topology}\n"
    );
    if !slaves.is_empty() {
        text.push_str(&format!("db.cloud.slaves={slaves}\n"));
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Zone, template and offering for `deployVirtualMachine`.
/// Signed CloudStack calls to one server.
#[derive(Clone)]
struct Api {
    base: String,
    admin: Creds,
}

impl Api {
    /// Call `cmd`; Ok with the body on HTTP 200, else the status and CloudStack's `errortext`.
    fn call(&self, agent: &ureq::Agent, cmd: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("{}?{}", self.base, sign::signed_query(&self.admin, cmd, params, 600));
        match agent.get(&url).call() {
            Ok(r) => r.into_json::<Value>().map_err(|e| format!("reading the answer: {e}")),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or_default();
                let text = body
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(|v| v["errortext"].as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| body.to_string());
                Err(format!("HTTP {code}: {text}"))
            }
            Err(ureq::Error::Transport(t)) => Err(format!("transport: {}", t.kind())),
        }
    }

    /// `deployVirtualMachine`; the VM id on success.
    fn deploy(&self, agent: &ureq::Agent, ids: &DeployIds, name: &str, start: bool) -> Result<String, String> {
        let params = [
            ("zoneid", ids.zone.as_str()),
            ("templateid", ids.template.as_str()),
            ("serviceofferingid", ids.offering.as_str()),
            ("name", name),
            ("startvm", if start { "true" } else { "false" }),
        ];
        let v = self.call(agent, "deployVirtualMachine", &params)?;
        let r = &v["deployvirtualmachineresponse"];
        match (r["id"].as_str(), r["jobid"].as_str()) {
            (Some(id), Some(_)) => Ok(id.to_string()),
            _ => Err(format!("unexpected answer: {v}")),
        }
    }

    fn deploy_ids(&self) -> Result<DeployIds> {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
        let get = |cmd: &str, params: &[(&str, &str)]| -> Result<Value> {
            let v = self.call(&agent, cmd, params).map_err(anyhow::Error::msg).context(cmd.to_string())?;
            Ok(v[format!("{}response", cmd.to_lowercase())].clone())
        };
        DeployIds::lookup(get)
    }

    /// Wait until `n` hosts are Up.
    fn wait_hosts(&self, n: usize, within: Duration) -> Result<()> {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        let end = Instant::now() + within;
        loop {
            let up = self
                .call(&agent, "listHosts", &[])
                .ok()
                .and_then(|v| v["listhostsresponse"]["host"].as_array().cloned())
                .map(|a| a.iter().filter(|h| h["state"] == "Up").count())
                .unwrap_or(0);
            if up >= n {
                return Ok(());
            }
            if Instant::now() > end || skyhold_bench::stopped() {
                bail!("only {up} of {n} hosts came up within {} s", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Child processes stopped when dropped: SIGTERM, SIGKILL after 5 s.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A server and its agents on one database. Dropping it stops the agents, then the server.
struct Stack {
    /// Dropped first: the agents stop before their server.
    _agents: Agents,
    ms: Server,
    api: Api,
    ids: DeployIds,
}

impl Stack {
    /// Start a server on an initialised database (`server::db_init`) and `agents` agents of
    /// `hosts` hosts each; wait until every host is Up.
    fn start(bin: &Path, dir: &Path, db: &DbSource, init: Init, agents: usize, hosts: u32) -> Result<Stack> {
        let Init { admin, agent_token: token } = init;
        // Stopped within 15 s of SIGTERM: after a failover round its database may be gone.
        let opts = ServerOpts {
            name: "ms1".into(),
            ms_id: Some("ms1".into()),
            die_with_parent: true,
            stop_grace: Duration::from_secs(15),
            ..ServerOpts::default()
        };
        let ms = Server::start(bin, dir, db, &opts)?;
        let api = Api { base: ms.base(), admin };
        let mut kids = Agents(Vec::new());
        for i in 0..agents {
            let log = dir.join(format!("agent{i}.log"));
            let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
            let mut cmd = Command::new(bin);
            cmd.args(["agent", "--mgmt", &format!("127.0.0.1:{}", ms.agent_port), &format!("--token={token}")])
                .args(["--simulator", "--hosts", &hosts.to_string(), "--agent-id", &format!("bench{i}")])
                .args(["--host-cpus", HOST_CPUS, "--host-mem-mb", HOST_MEM_MB])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(f.try_clone()?)
                .stderr(f);
            kids.0.push(die_with_parent(&mut cmd).spawn().context("start an agent")?);
        }
        // On failure from here, `kids` and `ms` are dropped: agents stopped, then the server.
        api.wait_hosts(agents * hosts as usize, Duration::from_secs(60))?;
        let ids = api.deploy_ids()?;
        Ok(Stack { _agents: kids, ms, api, ids })
    }
}

// ------------------------------------------------------------------------------------------
// Writers: deployVirtualMachine in a loop, every call timed
// ------------------------------------------------------------------------------------------

/// One API write.
#[derive(Debug, Clone)]
struct Rec {
    start: Instant,
    end: Instant,
    name: String,
    /// The VM id, or the error text the client got.
    result: Result<String, String>,
}

impl Rec {
    fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Most calls the writers keep in flight at once (calls held by a failing-over server pile up).
const MAX_IN_FLIGHT: usize = 1000;

/// `n` open-loop writers: each starts a `deployVirtualMachine` every `interval` in a thread of
/// its own, whether or not its earlier calls have returned, so that a call held by the server
/// does not hide when new calls would succeed. Paused until [`Writers::set_active`]; dropping
/// them stops the writers and waits (up to 70 s) for their calls.
struct Writers {
    active: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    /// Calls in flight.
    busy: Arc<AtomicUsize>,
    /// Ticks skipped because [`MAX_IN_FLIGHT`] calls were in flight.
    skipped: Arc<AtomicUsize>,
    recs: Arc<Mutex<Vec<Rec>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(api: &Api, ids: &DeployIds, n: usize, interval: Duration, start_vm: bool, prefix: &str) -> Writers {
        let mut w = Writers {
            active: Arc::new(AtomicBool::new(false)),
            quit: Arc::new(AtomicBool::new(false)),
            busy: Arc::new(AtomicUsize::new(0)),
            skipped: Arc::new(AtomicUsize::new(0)),
            recs: Arc::new(Mutex::new(Vec::new())),
            handles: Vec::new(),
        };
        w.handles = (0..n)
            .map(|i| {
                let (api, ids, prefix) = (api.clone(), ids.clone(), prefix.to_string());
                let (active, quit, busy, skipped, recs) =
                    (w.active.clone(), w.quit.clone(), w.busy.clone(), w.skipped.clone(), w.recs.clone());
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
                    // Spread the writers over the interval.
                    std::thread::sleep(interval * i as u32 / n as u32);
                    let mut seq = 0u64;
                    let mut next = Instant::now();
                    while !quit.load(Ordering::Relaxed) {
                        while Instant::now() < next && !quit.load(Ordering::Relaxed) {
                            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(10)));
                        }
                        next = (next + interval).max(Instant::now());
                        // Counted before `active` is read: `pause` then sees every call that starts.
                        busy.fetch_add(1, Ordering::SeqCst);
                        if !active.load(Ordering::SeqCst) || quit.load(Ordering::Relaxed) {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            next = Instant::now() + Duration::from_millis(5);
                            continue;
                        }
                        if busy.load(Ordering::SeqCst) > MAX_IN_FLIGHT {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let name = format!("{prefix}-w{i}-{seq}");
                        seq += 1;
                        let (api, ids, agent, call_busy, recs) =
                            (api.clone(), ids.clone(), agent.clone(), busy.clone(), recs.clone());
                        let spawned = std::thread::Builder::new().spawn(move || {
                            let start = Instant::now();
                            let result = api.deploy(&agent, &ids, &name, start_vm);
                            let end = Instant::now();
                            if let Ok(mut r) = recs.lock() {
                                r.push(Rec { start, end, name, result });
                            }
                            call_busy.fetch_sub(1, Ordering::SeqCst);
                        });
                        if spawned.is_err() {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        w
    }

    fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
    }

    /// Pause and wait until no call is in flight.
    fn pause(&self, within: Duration) -> bool {
        self.set_active(false);
        let end = Instant::now() + within;
        while self.busy.load(Ordering::SeqCst) > 0 {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Take every record so far.
    fn take(&self) -> Vec<Rec> {
        self.recs.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default()
    }

    /// The first success of a call that started at or after `t`, if any yet.
    fn first_success_since(&self, t: Instant) -> Option<Instant> {
        let r = self.recs.lock().ok()?;
        r.iter().filter(|x| x.ok() && x.start >= t).map(|x| x.end).min()
    }

    /// Whether some call succeeded after `t`.
    fn success_after(&self, t: Instant) -> bool {
        self.recs.lock().map(|r| r.iter().any(|x| x.ok() && x.end >= t)).unwrap_or(false)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        self.pause(Duration::from_secs(70));
    }
}

// ------------------------------------------------------------------------------------------
// Failover rounds
// ------------------------------------------------------------------------------------------

struct Bench<'a> {
    args: &'a Args,
    bin: &'a Path,
    dir: &'a Path,
    rt: &'a tokio::runtime::Runtime,
}

/// The database under the failover rounds.
enum Topo<'g> {
    Galera(&'g mut Galera),
    Pair { nodes: [Mdb; 2], primary: usize },
}

/// One kind of error the client got after a kill.
#[derive(Debug, Clone, Default)]
struct ErrStat {
    count: usize,
    /// When the first and the last of them came back, in ms after the kill.
    first_ms: f64,
    last_ms: f64,
    /// The longest such call, in ms.
    max_call_ms: f64,
}

impl ErrStat {
    fn add(&mut self, at_ms: f64, call_ms: f64) {
        if self.count == 0 || at_ms < self.first_ms {
            self.first_ms = at_ms;
        }
        self.last_ms = self.last_ms.max(at_ms);
        self.max_call_ms = self.max_call_ms.max(call_ms);
        self.count += 1;
    }

    fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "first_ms": round3(self.first_ms),
            "last_ms": round3(self.last_ms),
            "max_call_ms": round3(self.max_call_ms),
        })
    }
}

/// What one kill measured.
#[derive(Debug, Clone, Default)]
struct Round {
    /// The killed node (`node N (port P)`).
    target: String,
    /// Replication: ms from the kill until the replica was writable.
    promote_ms: Option<f64>,
    /// ms from the kill to the first success of a call started after the kill.
    window_ms: Option<f64>,
    /// ms between the last success completed before the kill and that first success.
    gap_ms: Option<f64>,
    /// ms from the kill to the first success of any call (also one in flight at the kill).
    first_any_ms: Option<f64>,
    /// Calls in flight at the kill, and how many of them succeeded (held, then answered).
    in_flight: usize,
    in_flight_ok: usize,
    /// The slowest successful call that overlapped the kill, in ms.
    slowest_ok_ms: f64,
    calls: usize,
    acked: usize,
    /// Acknowledged writes missing from the surviving database.
    lost: Option<usize>,
    /// Calls that returned an error but whose VM is in the database.
    committed_despite_error: Option<usize>,
    /// Error texts the client got after the kill.
    errors: BTreeMap<String, ErrStat>,
    /// Errors before the kill (the previous restore's aftermath).
    errors_before: usize,
    /// Writer ticks skipped because too many calls were in flight.
    skipped: usize,
    /// "database failover" lines the server logged during the round.
    failover_logs: usize,
    /// ms to bring the killed node back, and how (IST/SST/resumed/rebuilt).
    restore_ms: Option<f64>,
    restore: String,
    note: String,
}

struct FailoverReport {
    topology: &'static str,
    nodes: usize,
    writers: usize,
    interval_ms: u64,
    rounds: Vec<Round>,
}

impl FailoverReport {
    fn complete(&self, kills: usize) -> bool {
        self.rounds.len() >= kills && self.rounds.iter().all(|r| r.window_ms.is_some() && r.restore_ms.is_some())
    }

    fn summaries(&self) -> Vec<Summary> {
        let rs = &self.rounds;
        let mut v = vec![
            Summary::of("write window (kill -> first success of a new call)", rs.iter().map(|r| r.window_ms)),
            Summary::of("gap between successes around the kill", rs.iter().map(|r| r.gap_ms)),
            Summary::of("kill -> first success of any call", rs.iter().map(|r| r.first_any_ms)),
        ];
        if self.topology == "replication" {
            v.insert(0, Summary::of("promotion done (after the kill)", rs.iter().map(|r| r.promote_ms)));
        }
        v.push(Summary::of("slowest successful call across the kill", rs.iter().map(|r| Some(r.slowest_ok_ms))));
        v.push(Summary::of("restore (rejoin / reattach)", rs.iter().map(|r| r.restore_ms)));
        v
    }

    fn to_json(&self) -> Value {
        json!({
            "topology": self.topology,
            "nodes": self.nodes,
            "writers": self.writers,
            "write_interval_ms": self.interval_ms,
            "summaries": self.summaries().iter().map(Summary::to_json).collect::<Vec<_>>(),
            "rounds": self.rounds.iter().map(|r| json!({
                "target": r.target,
                "promote_ms": r.promote_ms.map(round3),
                "window_ms": r.window_ms.map(round3),
                "gap_ms": r.gap_ms.map(round3),
                "first_any_ms": r.first_any_ms.map(round3),
                "in_flight": r.in_flight,
                "in_flight_ok": r.in_flight_ok,
                "slowest_ok_ms": round3(r.slowest_ok_ms),
                "calls": r.calls,
                "acked": r.acked,
                "lost": r.lost,
                "committed_despite_error": r.committed_despite_error,
                "errors": r.errors.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<serde_json::Map<_, _>>(),
                "errors_before_kill": r.errors_before,
                "writer_ticks_skipped": r.skipped,
                "failover_log_lines": r.failover_logs,
                "restore_ms": r.restore_ms.map(round3),
                "restore": r.restore,
                "note": r.note,
            })).collect::<Vec<_>>(),
        })
    }
}

impl Bench<'_> {
    /// The shared Galera cluster, started on first use with the application account.
    fn galera_cluster<'g>(&self, g: &'g mut Option<Galera>) -> Result<&'g mut Galera> {
        if g.is_none() {
            let t0 = Instant::now();
            let base = self.dir.join("galera");
            std::fs::create_dir_all(&base)?;
            let c = Galera::start(&base, self.args.galera_nodes)?;
            sql(
                c.nodes[0].port,
                &format!("CREATE USER {DB_USER}@'%' IDENTIFIED BY '{DB_PASSWORD}'; GRANT ALL ON *.* TO {DB_USER}@'%';"),
            )
            .map_err(anyhow::Error::msg)?;
            println!(
                "galera: {} nodes Synced in {:.1} s (ports {:?})",
                c.nodes.len(),
                t0.elapsed().as_secs_f64(),
                c.nodes.iter().map(|n| n.port).collect::<Vec<_>>()
            );
            *g = Some(c);
        }
        g.as_mut().context("no Galera cluster")
    }

    fn failover(&self, mut topo: Topo<'_>) -> Result<FailoverReport> {
        let a = self.args;
        let (name, nodes, dir) = match &topo {
            Topo::Galera(g) => ("galera", g.nodes.len(), self.dir.join("galera-ms")),
            Topo::Pair { .. } => ("replication", 2, self.dir.join("replication-ms")),
        };
        let props = self.dir.join(format!("{name}.properties"));
        match &topo {
            Topo::Galera(g) => write_properties(&props, "galera", &g.hosts().join(","), "", "cloud")?,
            Topo::Pair { nodes, .. } => write_properties(
                &props,
                "replication",
                &format!("127.0.0.1:{}", nodes[0].port),
                &format!("127.0.0.1:{}", nodes[1].port),
                "cloud",
            )?,
        }
        let db = DbSource::Properties(props.clone());
        let init = server::db_init(self.bin, &dir, &db)?;
        let stack = Stack::start(self.bin, &dir, &db, init, 1, a.hosts)?;
        println!("server on API port {} ({}), 1 agent with {} hosts", stack.ms.api_port, props.display(), a.hosts);
        let writers = Writers::start(
            &stack.api,
            &stack.ids,
            a.writers,
            Duration::from_millis(a.write_interval_ms),
            !a.stopped_vms,
            &name[..1],
        );
        let mut report = FailoverReport {
            topology: name,
            nodes,
            writers: a.writers,
            interval_ms: a.write_interval_ms,
            rounds: Vec::new(),
        };
        let mut log_lines = 0;
        for n in 1..=a.kills {
            if skyhold_bench::stopped() {
                break;
            }
            let r = self.round(&mut topo, &stack, &writers, &mut log_lines);
            match r {
                Ok(r) => {
                    print_round(n, &r);
                    report.rounds.push(r);
                }
                Err(e) => {
                    writers.pause(Duration::from_secs(60));
                    eprintln!("{}", stack.ms.log_tail(30));
                    return Err(e.context(format!("round {n}")));
                }
            }
        }
        drop(writers);
        drop(stack);
        Ok(report)
    }

    fn round(&self, topo: &mut Topo<'_>, stack: &Stack, w: &Writers, log_lines: &mut usize) -> Result<Round> {
        let a = self.args;
        let mut r = Round::default();
        w.take();
        w.set_active(true);
        // Writes must work before the kill.
        let warm = Instant::now();
        let end = warm + Duration::from_secs(60);
        while !w.success_after(warm) {
            if Instant::now() > end || skyhold_bench::stopped() {
                w.pause(Duration::from_secs(60));
                bail!("no write succeeded within 60 s before the kill\n{}", stack.ms.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(a.pre_kill_ms.saturating_sub(1000)));
        // The node the server writes to (Galera: whose local commits grow; replication: the primary).
        let target = match topo {
            Topo::Galera(g) => galera_active(g)?,
            Topo::Pair { nodes, primary } => {
                std::thread::sleep(Duration::from_millis(1000));
                let ro = sql(nodes[*primary].port, "SELECT @@read_only").map_err(anyhow::Error::msg)?;
                if ro != "0" {
                    bail!("the primary (port {}) is read-only", nodes[*primary].port);
                }
                *primary
            }
        };
        let kill_at;
        match topo {
            Topo::Galera(g) => {
                r.target = format!("node {} (port {})", target + 1, g.nodes[target].port);
                kill_at = Instant::now();
                g.nodes[target].kill9();
            }
            Topo::Pair { nodes, primary } => {
                let other = 1 - *primary;
                r.target = format!("{} (port {})", if target == 0 { "p1" } else { "r1" }, nodes[target].port);
                kill_at = Instant::now();
                nodes[target].kill9();
                // The operator's act, at once: the replica applies what it received and becomes
                // writable.
                let drained = promote(nodes[other].port, Duration::from_millis(a.promote_drain_ms))?;
                r.promote_ms = Some(ms(kill_at.elapsed()));
                if !drained {
                    r.note.push_str("relay log not fully applied at promotion; ");
                }
                *primary = other;
            }
        }
        // The first success of a call started after the kill.
        let deadline = kill_at + Duration::from_secs(a.window_timeout_secs);
        let first = loop {
            if let Some(t) = w.first_success_since(kill_at) {
                break Some(t);
            }
            if Instant::now() > deadline || skyhold_bench::stopped() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_millis(a.post_ms));
        if !w.pause(Duration::from_secs(90)) {
            r.note.push_str("a call was still in flight 90 s after the pause; ");
        }
        let recs = w.take();
        r.skipped = w.skipped.swap(0, Ordering::Relaxed);
        r.window_ms = first.map(|t| ms(t - kill_at));
        let last_before = recs.iter().filter(|x| x.ok() && x.end <= kill_at).map(|x| x.end).max();
        r.gap_ms = match (first, last_before) {
            (Some(f), Some(l)) => Some(ms(f - l)),
            _ => None,
        };
        r.first_any_ms =
            recs.iter().filter(|x| x.ok() && x.end > kill_at).map(|x| ms(x.end - kill_at)).reduce(f64::min);
        let across: Vec<&Rec> = recs.iter().filter(|x| x.start < kill_at && x.end > kill_at).collect();
        r.in_flight = across.len();
        r.in_flight_ok = across.iter().filter(|x| x.ok()).count();
        r.slowest_ok_ms = recs
            .iter()
            .filter(|x| x.ok() && x.end > kill_at && first.is_none_or(|f| x.start <= f))
            .map(|x| ms(x.end - x.start))
            .fold(0.0, f64::max);
        r.calls = recs.len();
        r.acked = recs.iter().filter(|x| x.ok()).count();
        for x in &recs {
            if let Err(e) = &x.result {
                if x.end > kill_at {
                    let e: String = e.chars().take(240).collect();
                    r.errors.entry(e).or_default().add(ms(x.end - kill_at), ms(x.end - x.start));
                } else {
                    r.errors_before += 1;
                }
            }
        }
        let text = std::fs::read_to_string(&stack.ms.log).unwrap_or_default();
        let lines = text.matches("database failover").count();
        r.failover_logs = lines.saturating_sub(*log_lines);
        *log_lines = lines;

        // Lost writes: acknowledged VMs missing from the database that survived.
        let survivor = match topo {
            Topo::Galera(g) => g.nodes.iter().position(|n| n.synced()).map(|i| g.nodes[i].port),
            Topo::Pair { nodes, primary } => Some(nodes[*primary].port),
        };
        if let Some(port) = survivor {
            match sql(port, "SET SESSION wsrep_sync_wait = 1; SELECT id, name FROM cloud.vm_instance")
                .or_else(|_| sql(port, "SELECT id, name FROM cloud.vm_instance"))
            {
                Ok(rows) => {
                    let mut ids = HashSet::new();
                    let mut names = HashSet::new();
                    for l in rows.lines() {
                        if let Some((id, name)) = l.split_once('\t') {
                            ids.insert(id.to_string());
                            names.insert(name.to_string());
                        }
                    }
                    r.lost = Some(recs.iter().filter(|x| x.result.as_ref().is_ok_and(|id| !ids.contains(id))).count());
                    r.committed_despite_error =
                        Some(recs.iter().filter(|x| x.result.is_err() && names.contains(&x.name)).count());
                }
                Err(e) => r.note.push_str(&format!("could not read the surviving database: {e}; ")),
            }
        }

        // Bring the killed node back.
        let t0 = Instant::now();
        let within = Duration::from_secs(a.restore_timeout_secs);
        match topo {
            Topo::Galera(g) => {
                g.rejoin(target, within)?;
                r.restore = galera_transfer(&g.nodes[target].dir.join("err.log"));
                // Let every server's monitor see the node Synced (it probes every 500 ms).
                std::thread::sleep(Duration::from_millis(1500));
            }
            Topo::Pair { nodes, primary } => {
                let p = nodes[*primary].port;
                let how = reattach_as_replica(&mut nodes[target], p, within)?;
                r.restore = match how {
                    Rejoin::Resumed => "resumed".into(),
                    Rejoin::Rebuilt => "rebuilt from a dump (it had diverged)".into(),
                };
            }
        }
        r.restore_ms = Some(ms(t0.elapsed()));
        Ok(r)
    }
}

/// The Galera node the server writes to: the one whose `wsrep_local_commits` grows (transactions
/// that originate on that node) while the writers run.
fn galera_active(g: &Galera) -> Result<usize> {
    let read = || -> Vec<Option<i64>> {
        g.nodes
            .iter()
            .map(|n| {
                sql(n.port, "SHOW GLOBAL STATUS LIKE 'wsrep_local_commits'")
                    .ok()
                    .and_then(|s| s.split('\t').nth(1).and_then(|v| v.trim().parse().ok()))
            })
            .collect()
    };
    let before = read();
    std::thread::sleep(Duration::from_millis(1000));
    let after = read();
    let deltas: Vec<i64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| match (b, a) {
            (Some(b), Some(a)) => a - b,
            _ => -1,
        })
        .collect();
    let (i, d) = deltas.iter().enumerate().max_by_key(|(_, d)| **d).context("no Galera node")?;
    if *d <= 0 {
        bail!("no Galera node committed local transactions in 1 s (deltas {deltas:?})");
    }
    Ok(i)
}

/// How the last rejoin got its state, from the node's error log: `SST` (a full rsync copy from a
/// donor, what a SIGKILLed node needs: its position is lost), `IST` (only the missing
/// write-sets from a donor's gcache) or neither.
fn galera_transfer(err_log: &Path) -> String {
    let text = std::fs::read_to_string(err_log).unwrap_or_default();
    let run = &text[text.rfind("Starting MariaDB").unwrap_or(0)..];
    if run.contains("SST received") {
        "SST".into()
    } else if run.contains("Receiving IST") || run.contains("IST received") {
        "IST".into()
    } else {
        "rejoined".into()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_round(n: usize, r: &Round) {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    let errors: usize = r.errors.values().map(|e| e.count).sum();
    println!(
        "  kill {n:>2}: {}{}; window {} ms (gap {} ms, any call {} ms); in flight {} ({} ok), slowest ok {:.0} ms; \
         {} calls, {} errors after the kill ({} before); lost {} of {} acked; restore {} ms ({}){}",
        r.target,
        r.promote_ms.map(|p| format!(", promoted after {p:.0} ms")).unwrap_or_default(),
        f(r.window_ms),
        f(r.gap_ms),
        f(r.first_any_ms),
        r.in_flight,
        r.in_flight_ok,
        r.slowest_ok_ms,
        r.calls,
        errors,
        r.errors_before,
        r.lost.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
        r.acked,
        f(r.restore_ms),
        r.restore,
        if r.note.is_empty() && r.skipped == 0 {
            String::new()
        } else {
            format!(
                " [{}{}]",
                r.note,
                if r.skipped > 0 { format!("{} writes skipped: too many in flight", r.skipped) } else { String::new() }
            )
        }
    );
    for (e, c) in &r.errors {
        println!(
            "           {} x {e} (back {:.0}..{:.0} ms after the kill, longest call {:.0} ms)",
            c.count, c.first_ms, c.last_ms, c.max_call_ms
        );
    }
}

fn print_failover(r: &FailoverReport) {
    println!();
    println!(
        "{} ({} nodes): {} kills, {} writers every {} ms; times in ms from the SIGKILL",
        r.topology,
        r.nodes,
        r.rounds.len(),
        r.writers,
        r.interval_ms
    );
    print_summaries(&r.summaries());
    let acked: usize = r.rounds.iter().map(|x| x.acked).sum();
    let lost: usize = r.rounds.iter().filter_map(|x| x.lost).sum();
    let lost_rounds = r.rounds.iter().filter(|x| x.lost.unwrap_or(0) > 0).count();
    let unknown = r.rounds.iter().filter(|x| x.lost.is_none()).count();
    let phantom: usize = r.rounds.iter().filter_map(|x| x.committed_despite_error).sum();
    let mut errors: BTreeMap<&str, ErrStat> = BTreeMap::new();
    for x in &r.rounds {
        for (e, c) in &x.errors {
            let s = errors.entry(e).or_default();
            if s.count == 0 || c.first_ms < s.first_ms {
                s.first_ms = c.first_ms;
            }
            s.last_ms = s.last_ms.max(c.last_ms);
            s.max_call_ms = s.max_call_ms.max(c.max_call_ms);
            s.count += c.count;
        }
    }
    println!(
        "acknowledged writes: {acked}; lost: {lost} (in {lost_rounds} of {} rounds{}); committed although the client got an error: {phantom}",
        r.rounds.len(),
        if unknown > 0 { format!(", {unknown} rounds unchecked") } else { String::new() }
    );
    println!(
        "errors returned to the client after the kills: {}{}",
        errors.values().map(|e| e.count).sum::<usize>(),
        if errors.is_empty() { "" } else { ":" }
    );
    for (e, c) in errors {
        println!(
            "  {} x {e} (back {:.0}..{:.0} ms after a kill, longest call {:.0} ms)",
            c.count, c.first_ms, c.last_ms, c.max_call_ms
        );
    }
    let before: usize = r.rounds.iter().map(|x| x.errors_before).sum();
    if before > 0 {
        println!("errors before the kills (after a restore): {before}");
    }
    let restores: BTreeMap<&str, usize> = r.rounds.iter().fold(BTreeMap::new(), |mut m, x| {
        *m.entry(x.restore.as_str()).or_default() += 1;
        m
    });
    println!("restores: {restores:?}");
}

// ------------------------------------------------------------------------------------------
// Throughput
// ------------------------------------------------------------------------------------------

/// Figures of one backend.
#[derive(Debug, Clone, Default)]
struct Tput {
    backend: String,
    db_version: String,
    raw_commits_per_s: f64,
    raw_p50_ms: f64,
    raw_p99_ms: f64,
    raw_errors: u64,
    submitted_per_s: f64,
    completed_per_s: f64,
    completed: u64,
    failed: u64,
    errors: u64,
    first_error: Option<String>,
    api_p50_ms: f64,
    api_p99_ms: f64,
    job_p50_ms: f64,
    job_p99_ms: f64,
    max_backlog: usize,
    /// CPU used during the window, in cores: the server, the agents, the database processes.
    server_cores: Option<f64>,
    agent_cores: Option<f64>,
    db_cores: Option<f64>,
    /// MariaDB `Questions` and `Com_commit` per second during the window (the node the bench
    /// connects to; includes the bench's own backlog poll, about 50 statements/s).
    db_questions_per_s: Option<f64>,
    db_commits_per_s: Option<f64>,
}

impl Tput {
    fn to_json(&self) -> Value {
        json!({
            "backend": self.backend,
            "database_version": self.db_version,
            "raw_commits_per_s": round3(self.raw_commits_per_s),
            "raw_commit_p50_ms": round3(self.raw_p50_ms),
            "raw_commit_p99_ms": round3(self.raw_p99_ms),
            "raw_errors": self.raw_errors,
            "jobs_submitted_per_s": round3(self.submitted_per_s),
            "jobs_completed_per_s": round3(self.completed_per_s),
            "jobs_completed": self.completed,
            "jobs_failed": self.failed,
            "api_errors": self.errors,
            "first_error": self.first_error,
            "deploy_call_p50_ms": round3(self.api_p50_ms),
            "deploy_call_p99_ms": round3(self.api_p99_ms),
            "job_p50_ms": round3(self.job_p50_ms),
            "job_p99_ms": round3(self.job_p99_ms),
            "max_backlog": self.max_backlog,
            "server_cpu_cores": self.server_cores.map(round3),
            "agents_cpu_cores": self.agent_cores.map(round3),
            "database_cpu_cores": self.db_cores.map(round3),
            "database_statements_per_s": self.db_questions_per_s.map(round3),
            "database_commits_per_s": self.db_commits_per_s.map(round3),
            "raw_commit_rate_over_job_rate": round3(self.raw_commits_per_s / self.completed_per_s),
        })
    }
}

impl Bench<'_> {
    fn throughput(&self, b: Backend, galera: &mut Option<Galera>) -> Result<Tput> {
        let dir = self.dir.join(format!("tput-{}", b.name()));
        std::fs::create_dir_all(&dir)?;
        // Where the database is, for the server and for the bench's own connection.
        let mut single: Option<Mdb> = None;
        let mut external: Option<BenchDb> = None;
        // The database processes, for their CPU time (none for SQLite, in the server's process,
        // nor for an external server).
        let mut db_pids: Vec<u32> = Vec::new();
        let (db_args, url) = match b {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.join("skyhold.db").display());
                (DbSource::Url(url.clone()), url)
            }
            Backend::Mariadb => match &self.args.mysql_url {
                Some(server) => {
                    let db = BenchDb::mysql(server, "skyhold_bench_");
                    let url = db.url.clone();
                    external = Some(db);
                    (DbSource::Url(url.clone()), url)
                }
                None => {
                    let m = skyhold_testkit::start_mdb(&self.dir.join("single"), "m1", 1, false)?;
                    sql(
                        m.port,
                        &format!(
                            "CREATE USER {DB_USER}@'%' IDENTIFIED BY '{DB_PASSWORD}'; GRANT ALL ON *.* TO {DB_USER}@'%';"
                        ),
                    )
                    .map_err(anyhow::Error::msg)?;
                    let url = format!("mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{}/skyhold_tput", m.port);
                    db_pids.extend(m.pid());
                    single = Some(m);
                    (DbSource::Url(url.clone()), url)
                }
            },
            Backend::Galera => {
                let g = self.galera_cluster(galera)?;
                let props = dir.join("db.properties");
                write_properties(&props, "galera", &g.hosts().join(","), "", "skyhold_tput")?;
                // Raw commits on the node the server writes to (the first Synced one).
                let url = format!("mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{}/skyhold_tput", g.nodes[0].port);
                db_pids.extend(g.nodes.iter().filter_map(|n| n.pid()));
                (DbSource::Properties(props), url)
            }
        };
        println!("database: {}", skyhold_db::redact_url(&url));
        let res = self.throughput_on(b, &dir, &db_args, &url, &db_pids);
        if let Some(db) = &external
            && let Some(name) = db.mysql_name()
            && !self.args.out.keep
            && let Err(e) = self.rt.block_on(db.drop_database())
        {
            eprintln!("could not drop database {name}: {e:#}");
        }
        drop(single);
        res
    }

    fn throughput_on(&self, b: Backend, dir: &Path, db_args: &DbSource, url: &str, db_pids: &[u32]) -> Result<Tput> {
        let a = self.args;
        // db init creates the database; the raw measurement runs before the server starts.
        let init = server::db_init(self.bin, dir, db_args)?;
        let db = self
            .rt
            .block_on(Db::connect(&DbConfig {
                url: url.to_string(),
                max_connections: a.concurrency as u32 + 2,
                create: false,
            }))
            .context("connect to the database")?;
        let res = (|| {
            let mut t = Tput { backend: b.name().into(), ..Default::default() };
            t.db_version = self
                .rt
                .block_on(skyhold_bench::util::database_version(&db))
                .unwrap_or_else(|e| format!("unknown ({e})"));
            println!("  raw commit rate: {} connections, single-row INSERT + COMMIT ...", a.concurrency);
            let raw = self.rt.block_on(raw_commits(&db, a.concurrency, a.warmup_secs, a.duration_secs))?;
            t.raw_commits_per_s = raw.0;
            t.raw_p50_ms = raw.1;
            t.raw_p99_ms = raw.2;
            t.raw_errors = raw.3;
            println!("    {:.0} commits/s (p50 {:.2} ms, p99 {:.2} ms)", raw.0, raw.1, raw.2);
            let stack = Stack::start(self.bin, dir, db_args, init, a.agents, a.hosts)?;
            println!(
                "  deployVirtualMachine jobs: {} clients, backlog at most {}, {} agents x {} hosts ...",
                a.concurrency,
                a.max_backlog.unwrap_or(4 * a.concurrency),
                a.agents,
                a.hosts
            );
            self.jobs(&db, &stack, db_pids, &mut t)?;
            println!(
                "    {:.1} submitted/s, {:.1} completed/s ({} failed, {} API errors); job p50 {:.0} ms, p99 {:.0} ms",
                t.submitted_per_s, t.completed_per_s, t.failed, t.errors, t.job_p50_ms, t.job_p99_ms
            );
            if let Some(e) = &t.first_error {
                println!("    first error: {e}");
            }
            drop(stack);
            Ok(t)
        })();
        self.rt.block_on(db.close());
        res
    }

    /// Closed-loop deployments with a bounded backlog; counts from the database clock.
    fn jobs(&self, db: &Db, stack: &Stack, db_pids: &[u32], t: &mut Tput) -> Result<()> {
        let a = self.args;
        let cap = a.max_backlog.unwrap_or(4 * a.concurrency) as i64;
        let backlog = Arc::new(AtomicI64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let max_seen = Arc::new(AtomicI64::new(0));
        // The backlog, polled every 20 ms on the bench's own connection.
        let poller = {
            let (db, backlog, done, max_seen) = (db.clone(), backlog.clone(), done.clone(), max_seen.clone());
            self.rt.spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    if let Ok(n) = count(&db, "SELECT COUNT(*) FROM async_job WHERE status = 0", &[]).await {
                        backlog.store(n, Ordering::Relaxed);
                        max_seen.fetch_max(n, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let start = Instant::now() + Duration::from_secs(a.warmup_secs);
        let end = start + Duration::from_secs(a.duration_secs);
        let clients: Vec<_> = (0..a.concurrency)
            .map(|i| {
                let (api, ids, backlog) = (stack.api.clone(), stack.ids.clone(), backlog.clone());
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
                    let mut lat = Vec::new();
                    let mut errors = Vec::new();
                    let mut seq = 0;
                    while Instant::now() < end && !skyhold_bench::stopped() {
                        if backlog.load(Ordering::Relaxed) >= cap {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        // Count it at once, so that clients do not overshoot between polls.
                        backlog.fetch_add(1, Ordering::Relaxed);
                        let t0 = Instant::now();
                        let r = api.deploy(&agent, &ids, &format!("t-c{i}-{seq}"), true);
                        let t1 = Instant::now();
                        seq += 1;
                        if t1 < start || t1 > end {
                            continue;
                        }
                        match r {
                            Ok(_) => lat.push(ms(t1 - t0)),
                            Err(e) => errors.push(e),
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        while Instant::now() < start {
            std::thread::sleep(Duration::from_millis(5));
        }
        let server_pids = [stack.ms.pid];
        let agent_pids: Vec<u32> = stack._agents.0.iter().map(Child::id).collect();
        let cpu0 = [cpu_ticks(&server_pids), cpu_ticks(&agent_pids), cpu_ticks(db_pids)];
        let status0 = self.rt.block_on(mysql_status(db));
        let t0 = Instant::now();
        let w0 = self.rt.block_on(db.now_ms())?;
        while Instant::now() < end && !skyhold_bench::stopped() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let w1 = self.rt.block_on(db.now_ms())?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu1 = [cpu_ticks(&server_pids), cpu_ticks(&agent_pids), cpu_ticks(db_pids)];
        let status1 = self.rt.block_on(mysql_status(db));
        let cores = |i: usize| -> Option<f64> {
            match (cpu0[i], cpu1[i]) {
                (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / clock_ticks() / wall),
                _ => None,
            }
        };
        t.server_cores = cores(0);
        t.agent_cores = cores(1);
        t.db_cores = if db_pids.is_empty() { None } else { cores(2) };
        if let (Some(a), Some(b)) = (status0, status1) {
            t.db_questions_per_s = Some((b.0 - a.0) as f64 / wall);
            t.db_commits_per_s = Some((b.1 - a.1) as f64 / wall);
        }
        let secs = (w1 - w0) as f64 / 1000.0;
        let mut lat = Vec::new();
        for c in clients {
            match c.join() {
                Ok((l, e)) => {
                    lat.extend(l);
                    t.errors += e.len() as u64;
                    if t.first_error.is_none() {
                        t.first_error = e.into_iter().next();
                    }
                }
                Err(_) => {
                    t.errors += 1;
                    t.first_error.get_or_insert_with(|| "client thread panicked".into());
                }
            }
        }
        done.store(true, Ordering::Relaxed);
        let _ = self.rt.block_on(poller);
        t.max_backlog = max_seen.load(Ordering::Relaxed) as usize;
        // Let the jobs submitted in the window finish (for their latency), at most 60 s.
        let end = Instant::now() + Duration::from_secs(60);
        while self.rt.block_on(count(
            db,
            "SELECT COUNT(*) FROM async_job WHERE status = 0 AND created_ms >= ? AND created_ms < ?",
            &[w0, w1],
        ))? > 0
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let submitted = self.rt.block_on(count(
            db,
            "SELECT COUNT(*) FROM async_job WHERE created_ms >= ? AND created_ms < ?",
            &[w0, w1],
        ))?;
        let completed = self.rt.block_on(count(
            db,
            "SELECT COUNT(*) FROM async_job WHERE status <> 0 AND completed_ms >= ? AND completed_ms < ?",
            &[w0, w1],
        ))?;
        let failed = self.rt.block_on(count(
            db,
            "SELECT COUNT(*) FROM async_job WHERE status = 2 AND completed_ms >= ? AND completed_ms < ?",
            &[w0, w1],
        ))?;
        let mut job_lat = self.rt.block_on(async {
            let mut c = db.conn().await?;
            let (conn, _) = c.parts();
            sqlx::query_scalar::<_, i64>(
                "SELECT completed_ms - created_ms FROM async_job \
                 WHERE status <> 0 AND created_ms >= ? AND created_ms < ?",
            )
            .bind(w0)
            .bind(w1)
            .fetch_all(conn)
            .await
            .context("job latencies")
        })?;
        job_lat.sort_unstable();
        let job_lat: Vec<f64> = job_lat.into_iter().map(|v| v as f64).collect();
        lat.sort_by(f64::total_cmp);
        t.submitted_per_s = submitted as f64 / secs;
        t.completed_per_s = completed as f64 / secs;
        t.completed = completed as u64;
        t.failed = failed as u64;
        t.api_p50_ms = pct(&lat, 50.0);
        t.api_p99_ms = pct(&lat, 99.0);
        t.job_p50_ms = pct(&job_lat, 50.0);
        t.job_p99_ms = pct(&job_lat, 99.0);
        Ok(())
    }
}

/// MariaDB's `Questions` and `Com_commit` counters (None on SQLite).
async fn mysql_status(db: &Db) -> Option<(i64, i64)> {
    if db.dialect() != Dialect::MySql {
        return None;
    }
    let mut c = db.conn().await.ok()?;
    let (conn, _) = c.parts();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(VARIABLE_NAME AS CHAR), CAST(VARIABLE_VALUE AS CHAR) FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME IN ('QUESTIONS', 'COM_COMMIT')",
    )
    .fetch_all(conn)
    .await
    .ok()?;
    let get = |k: &str| rows.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).and_then(|(_, v)| v.parse().ok());
    Some((get("QUESTIONS")?, get("COM_COMMIT")?))
}

/// Clock ticks per second of /proc/PID/stat times.
fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU ticks of these processes and their reaped children (None if one is gone).
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    let mut sum = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime, stime, cutime, cstime are fields 14-17 of the line: 11-14 after the name.
        for i in 11..=14 {
            sum += f.get(i)?.parse::<u64>().ok()?;
        }
    }
    Some(sum)
}

async fn count(db: &Db, q: &str, binds: &[i64]) -> Result<i64> {
    let mut c = db.conn().await?;
    let (conn, _) = c.parts();
    let mut query = sqlx::query_scalar::<_, i64>(q);
    for b in binds {
        query = query.bind(*b);
    }
    Ok(query.fetch_one(conn).await?)
}

/// Single-row INSERT + COMMIT into a scratch table from `conc` tasks, through `retry_tx!` (the
/// transactions Skyhold runs): commits per second, p50 and p99 in ms, errors.
async fn raw_commits(db: &Db, conc: usize, warmup: u64, secs: u64) -> Result<(f64, f64, f64, u64)> {
    let ddl = match db.dialect() {
        Dialect::Sqlite => {
            "CREATE TABLE bench_commit (seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(64) NOT NULL, \
             created_ms BIGINT NOT NULL)"
        }
        Dialect::MySql => {
            "CREATE TABLE bench_commit (seq BIGINT AUTO_INCREMENT PRIMARY KEY, id VARCHAR(64) NOT NULL, \
             created_ms BIGINT NOT NULL) ENGINE=InnoDB"
        }
    };
    {
        let mut c = db.conn().await?;
        let (conn, _) = c.parts();
        sqlx::query("DROP TABLE IF EXISTS bench_commit").execute(&mut *conn).await?;
        sqlx::query(ddl).execute(&mut *conn).await.context("create the scratch table")?;
    }
    let start = Instant::now() + Duration::from_secs(warmup);
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < end && !skyhold_bench::stopped() {
                    let t0 = Instant::now();
                    let id = uuid::Uuid::new_v4().to_string();
                    let r = retry_tx!(db, |tx| {
                        async {
                            let (conn, _) = tx.parts();
                            sqlx::query("INSERT INTO bench_commit (id, created_ms) VALUES (?, ?)")
                                .bind(&id)
                                .bind(0i64)
                                .execute(conn)
                                .await
                                .map_err(|source| DbError::Sql { what: "insert a row", source })?;
                            Ok::<(), DbError>(())
                        }
                        .await
                    });
                    let t1 = Instant::now();
                    if t1 < start || t1 > end {
                        continue;
                    }
                    match r {
                        Ok(()) => lat.push(ms(t1 - t0)),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    {
        let mut c = db.conn().await?;
        let (conn, _) = c.parts();
        sqlx::query("DROP TABLE IF EXISTS bench_commit").execute(conn).await?;
    }
    lat.sort_by(f64::total_cmp);
    let covered = Instant::now().min(end).saturating_duration_since(start).as_secs_f64();
    Ok((lat.len() as f64 / covered.max(0.001), pct(&lat, 50.0), pct(&lat, 99.0), errors))
}

fn print_throughput(a: &Args, rows: &[Tput]) {
    println!();
    println!(
        "async-job throughput: deployVirtualMachine (VM started on a simulated host), {} clients, {} s; raw commit rate: \
         {} connections",
        a.concurrency, a.duration_secs, a.concurrency
    );
    println!(
        "{:<8} {:>12} {:>11} {:>11} {:>11} {:>12} {:>10} {:>10} {:>9}",
        "backend",
        "raw commit/s",
        "submitted/s",
        "completed/s",
        "raw/jobs",
        "deploy p50ms",
        "job p50ms",
        "job p99ms",
        "failed"
    );
    for t in rows {
        println!(
            "{:<8} {:>12.0} {:>11.1} {:>11.1} {:>11.1} {:>12.1} {:>10.0} {:>10.0} {:>9}",
            t.backend,
            t.raw_commits_per_s,
            t.submitted_per_s,
            t.completed_per_s,
            t.raw_commits_per_s / t.completed_per_s,
            t.api_p50_ms,
            t.job_p50_ms,
            t.job_p99_ms,
            t.failed + t.errors
        );
    }
    let f = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<8} {:>11} {:>11} {:>11} {:>14} {:>14} {:>11} {:>11}",
        "backend", "server CPU", "agents CPU", "DB CPU", "DB stmts/s", "DB commits/s", "stmts/job", "commits/job"
    );
    for t in rows {
        println!(
            "{:<8} {:>11} {:>11} {:>11} {:>14} {:>14} {:>11} {:>11}",
            t.backend,
            f(t.server_cores, 2),
            f(t.agent_cores, 2),
            f(t.db_cores, 2),
            f(t.db_questions_per_s, 0),
            f(t.db_commits_per_s, 0),
            f(t.db_questions_per_s.map(|q| q / t.completed_per_s), 1),
            f(t.db_commits_per_s.map(|c| c / t.completed_per_s), 1)
        );
    }
    println!("(CPU in cores over the measured window; this machine has {} cores)", machine_cores());
    for t in rows {
        println!(
            "  {}: {}; raw commit p50 {:.2} ms, p99 {:.2} ms",
            t.backend, t.db_version, t.raw_p50_ms, t.raw_p99_ms
        );
    }
}

// ------------------------------------------------------------------------------------------
// Percentiles
// ------------------------------------------------------------------------------------------

fn machine_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// min, p50, p99, max of one measure over the rounds that produced it.
struct Summary {
    what: &'static str,
    n: usize,
    missing: usize,
    min: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(what: &'static str, values: impl IntoIterator<Item = Option<f64>>) -> Summary {
        let mut missing = 0;
        let mut v = Vec::new();
        for x in values {
            match x {
                Some(x) => v.push(x),
                None => missing += 1,
            }
        }
        v.sort_by(f64::total_cmp);
        Summary {
            what,
            n: v.len(),
            missing,
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(&v, 50.0),
            p99: pct(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "measure": self.what,
            "rounds": self.n,
            "missing": self.missing,
            "min_ms": round3(self.min),
            "p50_ms": round3(self.p50),
            "p99_ms": round3(self.p99),
            "max_ms": round3(self.max),
        })
    }
}

fn print_summaries(s: &[Summary]) {
    println!("{:<52} {:>6} {:>9} {:>9} {:>9} {:>9}", "measure (ms)", "rounds", "min", "p50", "p99", "max");
    for x in s {
        println!(
            "{:<52} {:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0}{}",
            x.what,
            x.n,
            x.min,
            x.p50,
            x.p99,
            x.max,
            if x.missing > 0 { format!("  ({} missing)", x.missing) } else { String::new() }
        );
    }
}
