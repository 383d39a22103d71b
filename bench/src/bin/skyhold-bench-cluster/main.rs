//! `skyhold-bench-cluster`: management-server failover and membership load.
//!
//! 1. Failover: a cluster of 3 servers and H simulator agents. Each round SIGKILLs the server
//!    holding the most agents while it runs K jobs, and times, from the kill: its `Down`
//!    declaration, all its jobs claimed by survivors (and finished), and all its hosts Up on
//!    another server. Then it restarts the server (same id and ports) and goes again.
//! 2. Membership load: statements per second per idle server, at 3 and 10 servers.
//!
//! It prints figures; it asserts nothing about them. See `bench/README.md`.

mod cloud;
mod failover;
mod idle;

use anyhow::{Result, bail};
use clap::Parser;
use cloud::Cloud;
use serde_json::{Value, json};
use skyhold_bench::backend::Backend;
use skyhold_bench::cli::{BackendArgs, OutputArgs, SkyholdArgs};
use skyhold_bench::stats::Summary;
use skyhold_bench::util::{database_version, machine_info, print_machine, report_head};
use std::path::Path;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "skyhold-bench-cluster",
    about = "Management-server failover (kill -9 under load) and membership load of a Skyhold cluster",
    mut_arg("backend", |a| a.default_value("mariadb"))
)]
struct Args {
    #[command(flatten)]
    bin: SkyholdArgs,
    #[command(flatten)]
    db: BackendArgs,
    /// Failover rounds (kills).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Management servers in the failover cluster.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Simulator agent processes (1 or 2 hosts each, alternately).
    #[arg(long, default_value_t = 6)]
    agents: usize,
    /// Running jobs the killed server should hold (K).
    #[arg(long, default_value_t = 10)]
    jobs: usize,
    /// Simulated hypervisor latency of each agent command, so jobs are in flight at the kill.
    #[arg(long, default_value_t = 3000)]
    command_delay_ms: u64,
    /// Give up making the target hold K jobs after this long (the round records what it held).
    #[arg(long, default_value_t = 5)]
    fill_timeout_secs: u64,
    /// Give up waiting for a round's measures after this long.
    #[arg(long, default_value_t = 60)]
    round_timeout_secs: u64,
    /// After a restart, wait at most this long for the jobs to end and the agents to spread.
    #[arg(long, default_value_t = 30)]
    settle_timeout_secs: u64,
    /// Database polling interval of the measurements.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    /// Idle cluster sizes for the membership load.
    #[arg(long, value_delimiter = ',', default_value = "3,10")]
    load_servers: Vec<usize>,
    /// Measured seconds per membership-load window.
    #[arg(long, default_value_t = 10)]
    load_secs: u64,
    /// Seconds between starting servers and measuring them.
    #[arg(long, default_value_t = 5)]
    load_warmup_secs: u64,
    /// Skip the failover rounds.
    #[arg(long)]
    skip_failover: bool,
    /// Skip the membership load.
    #[arg(long)]
    skip_load: bool,
    #[command(flatten)]
    out: OutputArgs,
}

struct BackendReport {
    backend: Backend,
    db_version: String,
    failover: Option<failover::Report>,
    idle: Option<idle::Report>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    skyhold_bench::exit_code(run(args))
}

fn run(args: Args) -> Result<bool> {
    if args.servers < 2 || args.agents == 0 || args.jobs == 0 || args.load_secs == 0 {
        bail!("--servers must be at least 2; --agents, --jobs and --load-secs at least 1");
    }
    let backends = args.db.backends()?;
    let skyhold = args.bin.binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    skyhold_bench::util::stop_on_ctrl_c(&rt);
    let machine = machine_info();
    println!(
        "skyhold-bench-cluster: {} rounds, {} servers, {} agents, K = {} jobs, agent command delay {} ms; \
         membership load at {:?} servers",
        args.rounds, args.servers, args.agents, args.jobs, args.command_delay_ms, args.load_servers
    );
    print_machine(&machine, &skyhold);
    let dir = args.out.temp_dir("skyhold-bench-cluster-")?;

    let mut reports = Vec::new();
    let mut ok = true;
    for b in backends {
        if skyhold_bench::stopped() {
            ok = false;
            break;
        }
        println!("\n== {} ==", b.name());
        let mut rep = BackendReport { backend: b, db_version: String::new(), failover: None, idle: None };
        if !args.skip_failover {
            println!("failover rounds:");
            match part(&rt, &args, &skyhold, b, dir.path(), "failover", |rt, cloud| {
                failover::run(rt, cloud, &failover_cfg(&args))
            }) {
                Ok((v, r)) => {
                    rep.db_version = v;
                    print_failover(b, &args, &r);
                    if r.rounds.iter().any(|x| x.incomplete) || r.rounds.len() < args.rounds {
                        ok = false;
                    }
                    rep.failover = Some(r);
                }
                Err(e) => {
                    eprintln!("{} failover: {e:#}", b.name());
                    ok = false;
                }
            }
        }
        if !args.skip_load && !skyhold_bench::stopped() {
            println!("\nmembership load:");
            let cfg = idle::Cfg {
                servers: args.load_servers.clone(),
                window: Duration::from_secs(args.load_secs),
                warmup: Duration::from_secs(args.load_warmup_secs),
            };
            let server = match b {
                Backend::MySql => args.db.mysql_url.clone(),
                Backend::Sqlite => None,
            };
            match part(&rt, &args, &skyhold, b, dir.path(), "idle", |rt, cloud| {
                idle::run(rt, cloud, server.as_deref(), &cfg)
            }) {
                Ok((v, r)) => {
                    rep.db_version = v;
                    print_idle(b, &args, &r);
                    rep.idle = Some(r);
                }
                Err(e) => {
                    eprintln!("{} membership load: {e:#}", b.name());
                    ok = false;
                }
            }
        }
        reports.push(rep);
    }

    args.out.write_json(|| {
        let mut out = report_head(machine, &skyhold);
        out["config"] = json!({
            "rounds": args.rounds,
            "servers": args.servers,
            "agents": args.agents,
            "jobs": args.jobs,
            "command_delay_ms": args.command_delay_ms,
            "fill_timeout_secs": args.fill_timeout_secs,
            "round_timeout_secs": args.round_timeout_secs,
            "poll_ms": args.poll_ms,
            "load_servers": args.load_servers,
            "load_secs": args.load_secs,
            "load_warmup_secs": args.load_warmup_secs,
        });
        out["backends"] = reports.iter().map(report_json).collect();
        out
    })?;
    if args.out.keep {
        println!("kept (--keep): data directory {}", dir.keep().display());
    } else if let Err(e) = dir.close() {
        eprintln!("could not remove the temporary directory: {e}");
    }
    Ok(ok)
}

fn failover_cfg(args: &Args) -> failover::Cfg {
    failover::Cfg {
        servers: args.servers,
        agents: args.agents,
        jobs: args.jobs,
        command_delay_ms: args.command_delay_ms,
        rounds: args.rounds,
        fill_timeout: Duration::from_secs(args.fill_timeout_secs),
        round_timeout: Duration::from_secs(args.round_timeout_secs),
        settle_timeout: Duration::from_secs(args.settle_timeout_secs),
        poll: Duration::from_millis(args.poll_ms.max(1)),
    }
}

/// One part on a fresh database of its own: init, run `f`, stop everything, drop the database.
/// Returns the database version and what `f` returned.
fn part<T>(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    skyhold: &Path,
    b: Backend,
    parent: &Path,
    what: &str,
    f: impl FnOnce(&tokio::runtime::Runtime, &mut Cloud) -> Result<T>,
) -> Result<(String, T)> {
    let dir = parent.join(format!("{}-{what}", b.name()));
    std::fs::create_dir_all(&dir)?;
    let db = args.db.database(b, &dir, "skyhold_bench_")?;
    println!("  database: {}; files in {}", skyhold_db::redact_url(&db.url), dir.display());
    let res = (|| {
        let mut cloud = Cloud::init(rt, skyhold, &dir, &db.url, 8)?;
        let version = rt.block_on(database_version(&cloud.db)).unwrap_or_else(|e| format!("unknown ({e})"));
        let r = f(rt, &mut cloud);
        if r.is_err() {
            eprintln!("{}", cloud.log_tails(20));
        }
        cloud.shutdown(rt);
        Ok((version, r?))
    })();
    db.drop_unless_kept(rt, args.out.keep);
    res
}

fn failover_summaries(r: &failover::Report) -> Vec<Summary> {
    let rs = &r.rounds;
    vec![
        Summary::of("detection (row Down)", rs.iter().map(|x| x.detect_ms)),
        Summary::of("jobs resumed (all claimed by survivors)", rs.iter().map(|x| x.jobs_resumed_ms)),
        Summary::of("jobs finished (all)", rs.iter().map(|x| x.jobs_finished_ms)),
        Summary::of("agents reconnected (all hosts Up elsewhere)", rs.iter().map(|x| x.agents_ms)),
        Summary::of("restart until ready (not from the kill)", rs.iter().map(|x| Some(x.restart_ms))),
    ]
}

fn print_failover(b: Backend, args: &Args, r: &failover::Report) {
    let rs = &r.rounds;
    println!();
    println!(
        "{} failover: {} rounds, {} servers, {} agents ({} hosts), K = {}, agent command delay {} ms",
        b.name(),
        rs.len(),
        args.servers,
        args.agents,
        r.hosts,
        args.jobs,
        args.command_delay_ms
    );
    println!("{:<46} {:>6} {:>9} {:>9} {:>9} {:>9}", "measure (ms from SIGKILL)", "rounds", "min", "p50", "p99", "max");
    for s in failover_summaries(r) {
        println!(
            "{:<46} {:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0}{}",
            s.what,
            s.n,
            s.min,
            s.p50,
            s.p99,
            s.max,
            if s.missing > 0 { format!("  ({} missing)", s.missing) } else { String::new() }
        );
    }
    let mut held: Vec<usize> = rs.iter().map(|x| x.jobs_held).collect();
    held.sort_unstable();
    let ok: usize = rs.iter().map(|x| x.jobs_ok).sum();
    let failed: usize = rs.iter().map(|x| x.jobs_failed).sum();
    let hosts: usize = rs.iter().map(|x| x.hosts_held).sum();
    let agents: usize = rs.iter().map(|x| x.agents_held).sum();
    println!(
        "jobs held at the kill: min {}, median {}, max {} (total {}; {} succeeded, {} failed); agents held {} ({} hosts) in all",
        held.first().unwrap_or(&0),
        held.get(held.len() / 2).unwrap_or(&0),
        held.last().unwrap_or(&0),
        held.iter().sum::<usize>(),
        ok,
        failed,
        agents,
        hosts
    );
    let l = &r.ledger;
    println!(
        "agent ledgers: {} executed, {} replayed, {} refused (stale generation); VMs started twice: {}, (job, step) executed twice: {}",
        l.exec, l.replay, l.stale, l.vms_started_twice, l.steps_executed_twice
    );
    let unbalanced = rs.iter().filter(|x| !x.balanced).count();
    if unbalanced > 0 {
        println!("{unbalanced} round(s) started before the agents were balanced again (settle timeout)");
    }
}

fn print_idle(b: Backend, args: &Args, r: &idle::Report) {
    println!();
    println!(
        "{} membership load: idle servers (no agents, no jobs), {} s windows after {} s warm-up",
        b.name(),
        args.load_secs,
        args.load_warmup_secs
    );
    let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
    let range = |w: &idle::Window| match (w.q_min_per_sec, w.q_max_per_sec) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "n/a".into(),
    };
    println!(
        "{:<22} {:>12} {:>12} {:>16} {:>22}",
        "window", "Questions/s", "1 s range", "per server/s", "logged stmts/s/server"
    );
    let per = r.per_server();
    let mysql = b == Backend::MySql;
    if mysql {
        println!(
            "{:<22} {:>12} {:>12} {:>16} {:>22}",
            "no server (before)",
            f(r.baseline_before.questions_per_sec()),
            range(&r.baseline_before),
            "",
            ""
        );
    }
    for (w, (_, q, l)) in r.loaded.iter().zip(&per) {
        println!(
            "{:<22} {:>12} {:>12} {:>16} {:>22.2}",
            format!("{} servers", w.servers),
            f(w.questions_per_sec()),
            range(w),
            q.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into()),
            l
        );
    }
    if mysql {
        println!(
            "{:<22} {:>12} {:>12} {:>16} {:>22}",
            "no server (after)",
            f(r.baseline_after.questions_per_sec()),
            range(&r.baseline_after),
            "",
            ""
        );
        println!(
            "per server/s = (Questions/s - background {}/s) / servers; Questions counts the whole MariaDB server",
            f(r.background())
        );
    } else {
        println!("SQLite has no server-side counter: only the servers' own statement logs are counted");
    }
    if let Some(w) = r.loaded.last() {
        let n = w.servers.max(1) as f64;
        println!("statements per server per second at {} servers, by kind (from the servers' logs):", w.servers);
        let mut kinds: Vec<(&String, &u64)> = w.by_statement.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        for (k, c) in kinds {
            println!("  {:>7.2}  {k}", *c as f64 / w.secs / n);
        }
    }
}

fn report_json(r: &BackendReport) -> Value {
    json!({
        "backend": r.backend.name(),
        "database_version": r.db_version,
        "failover": r.failover.as_ref().map(|f| json!({
            "hosts": f.hosts,
            "warmup_job_ms": (f.warmup_job_ms * 10.0).round() / 10.0,
            "summary": failover_summaries(f).iter().map(Summary::to_json).collect::<Vec<_>>(),
            "ledger": f.ledger.to_json(),
            "rounds": f.rounds.iter().map(failover::Round::to_json).collect::<Vec<_>>(),
        })),
        "membership_load": r.idle.as_ref().map(idle::Report::to_json),
    })
}
