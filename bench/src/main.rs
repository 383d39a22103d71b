//! `skyhold-bench`: API throughput and p50/p99 latency of `listVirtualMachines` (default page
//! of N VMs) and `queryAsyncJobResult` on a real `skyhold server`, on SQLite and on MariaDB, next
//! to the raw rate of the same database queries issued directly through `skyhold-db` in the same
//! run, so the API's cost reads as a ratio to the database's.
//!
//! It prints figures; it asserts nothing about them. See `bench/README.md`.

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use skyhold_bench::backend::Backend;
use skyhold_bench::cli::{BackendArgs, OutputArgs, SkyholdArgs};
use skyhold_bench::load::{self, DbOp, Stats, Window, round3};
use skyhold_bench::server::{self, DbSource, Server, ServerOpts};
use skyhold_bench::sign::{self, Creds};
use skyhold_bench::util::{database_version, machine_info, print_machine, report_head};
use skyhold_bench::{STOP, seed};
use skyhold_db::{Db, DbConfig};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The server's default page size (`default.page.size`, 500 unless changed in the database).
const DEFAULT_PAGE: usize = 500;

#[derive(Parser, Debug)]
#[command(
    name = "skyhold-bench",
    about = "API throughput and latency of a Skyhold management server, against its database's raw rate",
    mut_arg("mysql_url", |a| a.help(
        "MariaDB/MySQL server URL without a database (mysql://USER:PASS@HOST:PORT); the bench creates a \
         database of its own there and drops it at the end"
    )),
    mut_arg("tmp_dir", |a| a.help("Parent directory of the temporary data directory (SQLite file, key, server log)")),
    mut_arg("keep", |a| a.help(
        "Keep the data directory and the MariaDB database afterwards (to inspect them); the server is \
         stopped all the same"
    ))
)]
struct Args {
    #[command(flatten)]
    bin: SkyholdArgs,
    #[command(flatten)]
    db: BackendArgs,
    /// Number of VMs to seed (each with a root volume and a NIC).
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    /// Number of finished async jobs to seed (queryAsyncJobResult picks one at random).
    #[arg(long, default_value_t = 1_000)]
    jobs: usize,
    /// Measured seconds per operation.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Unmeasured warm-up seconds before each operation.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Concurrent clients (HTTP client threads, or database tasks with a pool of this size).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[command(flatten)]
    out: OutputArgs,
    /// MariaDB: do not run ANALYZE TABLE after seeding (measure the plans of a just-loaded
    /// database instead of settled statistics).
    #[arg(long)]
    no_analyze: bool,
}

/// The results of one backend.
struct BackendReport {
    backend: Backend,
    database: String,
    db_version: String,
    seed_secs: f64,
    analyzed: bool,
    list_api: Stats,
    list_db: Stats,
    job_api: Stats,
    job_db: Stats,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    skyhold_bench::exit_code(run(args))
}

fn run(args: Args) -> Result<bool> {
    if args.vms == 0 || args.jobs == 0 || args.concurrency == 0 || args.duration_secs == 0 {
        bail!("--vms, --jobs, --concurrency and --duration-secs must be at least 1");
    }
    let backends = args.db.backends()?;
    let skyhold = args.bin.binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    skyhold_bench::util::stop_on_ctrl_c(&rt);

    let machine = machine_info();
    let window = Window {
        concurrency: args.concurrency,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
    };
    println!(
        "skyhold-bench: {} VMs, {} jobs, concurrency {}, {} s per operation (+{} s warm-up)",
        args.vms, args.jobs, args.concurrency, args.duration_secs, args.warmup_secs
    );
    print_machine(&machine, &skyhold);

    let mut reports = Vec::new();
    let mut ok = true;
    for b in backends {
        if STOP.load(Ordering::Relaxed) {
            ok = false;
            break;
        }
        println!("\n== {} ==", b.name());
        match run_backend(&rt, &args, &skyhold, b, window) {
            Ok(r) => {
                print_report(&r, &args);
                if [&r.list_api, &r.list_db, &r.job_api, &r.job_db].iter().any(|s| s.errors > 0 || s.requests == 0) {
                    ok = false;
                }
                reports.push(r);
            }
            Err(e) => {
                eprintln!("{}: {e:#}", b.name());
                ok = false;
            }
        }
    }

    args.out.write_json(|| {
        let mut out = report_head(machine, &skyhold);
        out["config"] = json!({
            "vms": args.vms,
            "jobs": args.jobs,
            "concurrency": args.concurrency,
            "duration_secs": args.duration_secs,
            "warmup_secs": args.warmup_secs,
            "default_page": DEFAULT_PAGE,
        });
        out["backends"] = reports.iter().map(report_json).collect();
        out
    })?;
    Ok(ok)
}

/// One backend: fresh database, seed, server, four measurements, cleanup.
fn run_backend(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    skyhold: &Path,
    b: Backend,
    w: Window,
) -> Result<BackendReport> {
    let dir = args.out.temp_dir("skyhold-bench-")?;
    let db = args.db.database(b, dir.path(), "skyhold_bench_")?;
    println!("database: {}", skyhold_db::redact_url(&db.url));
    let res = measure_backend(rt, args, skyhold, b, w, dir.path(), &db.url);
    if args.out.keep {
        println!(
            "kept (--keep): data directory {}, database {}",
            dir.keep().display(),
            skyhold_db::redact_url(&db.url)
        );
        return res;
    }
    if let Some(name) = db.mysql_name() {
        match rt.block_on(db.drop_database()) {
            Ok(()) => println!("dropped database {name}"),
            Err(e) => eprintln!("could not drop database {name}: {e:#}"),
        }
    }
    if let Err(e) = dir.close() {
        eprintln!("could not remove the temporary directory: {e}");
    }
    res
}

fn measure_backend(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    skyhold: &Path,
    b: Backend,
    w: Window,
    dir: &Path,
    db_url: &str,
) -> Result<BackendReport> {
    let source = DbSource::Url(db_url.to_string());
    let admin = server::db_init(skyhold, dir, &source)?.admin;
    let db = rt
        .block_on(Db::connect(&DbConfig {
            url: db_url.to_string(),
            max_connections: w.concurrency as u32,
            create: false,
        }))
        .context("connect to the database")?;
    let res = (|| {
        let db_version = rt.block_on(database_version(&db)).unwrap_or_else(|e| format!("unknown ({e})"));
        println!("database version: {db_version}");
        let seeded = rt.block_on(seed::seed(&db, args.vms, args.jobs))?;
        println!(
            "seeded {} VMs (+{} volumes, {} NICs) and {} finished jobs in {:.1} s",
            seeded.vm_ids.len(),
            seeded.vm_ids.len(),
            seeded.vm_ids.len(),
            seeded.job_ids.len(),
            seeded.secs
        );
        let analyzed = !args.no_analyze && rt.block_on(seed::analyze(&db))?;
        if analyzed {
            println!("ran ANALYZE TABLE on the seeded tables (--no-analyze to skip)");
        }
        let mut srv = Server::start(skyhold, dir, &source, &ServerOpts::default())?;
        println!("server pid {} on API port {}", srv.pid, srv.api_port);
        let res = measure(rt, &db, &srv, &admin, &seeded, args, w);
        if res.is_err() {
            eprintln!("{}", srv.log_tail(20));
        }
        srv.stop();
        let (list_api, list_db, job_api, job_db) = res?;
        Ok(BackendReport {
            backend: b,
            database: skyhold_db::redact_url(db_url),
            db_version,
            seed_secs: seeded.secs,
            analyzed,
            list_api,
            list_db,
            job_api,
            job_db,
        })
    })();
    rt.block_on(db.close());
    res
}

fn measure(
    rt: &tokio::runtime::Runtime,
    db: &Db,
    srv: &Server,
    admin: &Creds,
    seeded: &seed::Seeded,
    args: &Args,
    w: Window,
) -> Result<(Stats, Stats, Stats, Stats)> {
    let page = DEFAULT_PAGE.min(args.vms);
    // Signatures stay valid for the whole measurement and then some.
    let valid = (w.warmup + w.duration).as_secs() as i64 + 600;
    let base = srv.base();

    // Check the answers once before timing them.
    let list_url = format!("{base}?{}", sign::signed_query(admin, "listVirtualMachines", &[], valid));
    let v: Value = ureq::get(&list_url).call().context("listVirtualMachines")?.into_json()?;
    let r = &v["listvirtualmachinesresponse"];
    let count = r["count"].as_u64().unwrap_or(0) as usize;
    let items = r["virtualmachine"].as_array().map(Vec::len).unwrap_or(0);
    if count != args.vms || items != page {
        bail!("listVirtualMachines returned count {count} with {items} items; expected {} and {page}: {v}", args.vms);
    }
    let job_urls: Vec<String> = seeded
        .job_ids
        .iter()
        .map(|id| format!("{base}?{}", sign::signed_query(admin, "queryAsyncJobResult", &[("jobid", id)], valid)))
        .collect();
    let v: Value = ureq::get(&job_urls[0]).call().context("queryAsyncJobResult")?.into_json()?;
    let j = &v["queryasyncjobresultresponse"];
    if j["jobid"] != json!(seeded.job_ids[0])
        || j["jobstatus"] != json!(1)
        || !j["jobresult"]["virtualmachine"].is_object()
    {
        bail!("unexpected queryAsyncJobResult answer: {v}");
    }

    let ids = Arc::new(seeded.job_ids.clone());
    let step = |what: &str| println!("  measuring {what} ...");

    step("raw database point select (job_fetch)");
    let job_db = rt.block_on(load::db("db job_fetch (SELECT async_job by id)", db, DbOp::JobFetch(ids), w));
    step("API queryAsyncJobResult");
    let job_api = load::http("api queryAsyncJobResult", Arc::new(job_urls), "{\"queryasyncjobresultresponse\"", w);
    step("database part of listVirtualMachines (vm_list + nic_list_for_vms)");
    let list_db = rt.block_on(load::db(
        &format!("db vm_list+nics (page {page})"),
        db,
        DbOp::VmPage { size: DEFAULT_PAGE as u64, expect: page },
        w,
    ));
    step("API listVirtualMachines");
    let list_api = load::http(
        &format!("api listVirtualMachines (page {page}/{})", args.vms),
        Arc::new(vec![list_url]),
        "{\"listvirtualmachinesresponse\"",
        w,
    );
    Ok((list_api, list_db, job_api, job_db))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn print_report(r: &BackendReport, args: &Args) {
    println!();
    println!(
        "{} ({}), {} VMs, concurrency {}, {} s each:",
        r.backend.name(),
        r.db_version,
        args.vms,
        args.concurrency,
        args.duration_secs
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "operation", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    );
    for s in [&r.list_api, &r.list_db, &r.job_api, &r.job_db] {
        println!(
            "{:<44} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            s.op, s.rate, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.errors
        );
        if let Some(e) = &s.first_error {
            println!("    first error: {e}");
        }
    }
    for (what, api, dbs) in
        [("queryAsyncJobResult", &r.job_api, &r.job_db), ("listVirtualMachines", &r.list_api, &r.list_db)]
    {
        println!(
            "{what} API/DB: latency p50 x{:.1}, p99 x{:.1}; throughput DB/API x{:.1}",
            ratio(api.p50_ms, dbs.p50_ms),
            ratio(api.p99_ms, dbs.p99_ms),
            ratio(dbs.rate, api.rate)
        );
    }
}

fn report_json(r: &BackendReport) -> Value {
    let ratios = |api: &Stats, dbs: &Stats| {
        json!({
            "latency_p50_api_over_db": round3(ratio(api.p50_ms, dbs.p50_ms)),
            "latency_p99_api_over_db": round3(ratio(api.p99_ms, dbs.p99_ms)),
            "throughput_db_over_api": round3(ratio(dbs.rate, api.rate)),
        })
    };
    json!({
        "backend": r.backend.name(),
        "database": r.database,
        "database_version": r.db_version,
        "seed_secs": round3(r.seed_secs),
        "analyzed": r.analyzed,
        "results": [r.list_api.to_json(), r.list_db.to_json(), r.job_api.to_json(), r.job_db.to_json()],
        "ratios": {
            "queryAsyncJobResult": ratios(&r.job_api, &r.job_db),
            "listVirtualMachines": ratios(&r.list_api, &r.list_db),
        },
    })
}
