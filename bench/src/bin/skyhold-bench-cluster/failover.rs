//! Failover rounds: SIGKILL the server holding the most agents while it runs K jobs, and time
//! (from the kill) its `Down` declaration, the survivors claiming its jobs, the jobs finishing,
//! and its hosts reconnecting to a survivor. Then restart it and go again.

use crate::cloud::{Cloud, DeployIds};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use skyhold_bench::stats::ms;
use skyhold_db::job::job_fetch;
use skyhold_db::{Db, Page};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Settings of the failover part.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub servers: usize,
    pub agents: usize,
    pub jobs: usize,
    pub command_delay_ms: u64,
    pub rounds: usize,
    pub fill_timeout: Duration,
    pub round_timeout: Duration,
    pub settle_timeout: Duration,
    pub poll: Duration,
}

/// What one round measured. Times are milliseconds from the SIGKILL.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub n: usize,
    pub target: String,
    pub agents_held: usize,
    pub hosts_held: usize,
    pub jobs_submitted: usize,
    pub jobs_held: usize,
    pub fill_ms: f64,
    pub detect_ms: Option<f64>,
    pub jobs_resumed_ms: Option<f64>,
    pub jobs_finished_ms: Option<f64>,
    pub jobs_ok: usize,
    pub jobs_failed: usize,
    pub agents_ms: Option<f64>,
    /// From the MANAGEMENT.SERVER.DOWN event: who declared it, and the heartbeat age it saw.
    pub declared_by: Option<String>,
    pub heartbeat_age_at_declare_ms: Option<i64>,
    /// From the start of the restarted process until it is ready (registered, API up).
    pub restart_ms: f64,
    /// Until every job had finished and the agents were balanced again (max - min <= 1).
    pub settle_ms: f64,
    pub balanced: bool,
    /// A measure did not complete within the round timeout.
    pub incomplete: bool,
    pub notes: Vec<String>,
}

impl Round {
    pub fn to_json(&self) -> Value {
        json!({
            "round": self.n,
            "target": self.target,
            "agents_held": self.agents_held,
            "hosts_held": self.hosts_held,
            "jobs_submitted": self.jobs_submitted,
            "jobs_held": self.jobs_held,
            "fill_ms": r1(self.fill_ms),
            "detect_ms": self.detect_ms.map(r1),
            "jobs_resumed_ms": self.jobs_resumed_ms.map(r1),
            "jobs_finished_ms": self.jobs_finished_ms.map(r1),
            "jobs_succeeded": self.jobs_ok,
            "jobs_failed": self.jobs_failed,
            "agents_reconnected_ms": self.agents_ms.map(r1),
            "declared_by": self.declared_by,
            "heartbeat_age_at_declare_ms": self.heartbeat_age_at_declare_ms,
            "restart_ms": r1(self.restart_ms),
            "settle_ms": r1(self.settle_ms),
            "balanced": self.balanced,
            "incomplete": self.incomplete,
            "notes": self.notes,
        })
    }
}

fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The agents' ledgers after all rounds: did any command run twice?
#[derive(Debug, Clone, Default)]
pub struct LedgerCheck {
    pub exec: usize,
    pub replay: usize,
    pub stale: usize,
    pub other: usize,
    /// VMs started (exec, outcome ok) more than once.
    pub vms_started_twice: usize,
    /// `(job, step)` pairs executed more than once.
    pub steps_executed_twice: usize,
}

impl LedgerCheck {
    pub fn to_json(&self) -> Value {
        json!({
            "exec": self.exec,
            "replay": self.replay,
            "stale_generation_refused": self.stale,
            "other": self.other,
            "vms_started_twice": self.vms_started_twice,
            "steps_executed_twice": self.steps_executed_twice,
        })
    }
}

pub struct Report {
    pub rounds: Vec<Round>,
    pub ledger: LedgerCheck,
    pub hosts: usize,
    pub warmup_job_ms: f64,
}

/// Start the cluster and its agents, then run the rounds.
pub fn run(rt: &tokio::runtime::Runtime, cloud: &mut Cloud, cfg: &Cfg) -> Result<Report> {
    for i in 0..cfg.servers {
        cloud.add_node(&format!("ms{}", i + 1), true, None)?;
    }
    let all: Vec<usize> = (0..cfg.servers).collect();
    cloud.start_nodes(&all)?;
    let mut hosts = 0;
    for a in 0..cfg.agents {
        let h = 1 + (a as u32 % 2);
        cloud.start_agent(&format!("agent{:02}", a + 1), h, cfg.command_delay_ms)?;
        hosts += h as usize;
    }
    rt.block_on(cloud.wait_hosts_up(hosts, Duration::from_secs(60)))?;
    let (_, balanced) = rt.block_on(settle(cloud, cfg.settle_timeout))?;
    println!(
        "  {} servers, {} agents with {hosts} hosts up{}",
        cfg.servers,
        cfg.agents,
        if balanced { ", agents balanced" } else { "" }
    );
    let ids = cloud.deploy_ids(0)?;

    // One job through the whole pipeline before timing anything.
    let t = Instant::now();
    let job = cloud.deploy(0, &ids, "fo-warmup")?;
    let warm = rt.block_on(wait_job(&cloud.db, &job, Duration::from_secs(60)))?;
    let warmup_job_ms = ms(t.elapsed());
    if warm != 1 {
        bail!("the warm-up deployment ended with job status {warm}\n{}", cloud.log_tails(30));
    }
    println!(
        "  warm-up deployment finished in {warmup_job_ms:.0} ms (agent command delay {} ms)",
        cfg.command_delay_ms
    );
    println!(
        "  {:>5} {:<5} {:>6} {:>5} {:>4} {:>9} {:>11} {:>12} {:>10} {:>8} {:>10}  declared by (hb age)",
        "round",
        "kill",
        "agents",
        "hosts",
        "jobs",
        "detect ms",
        "resumed ms",
        "finished ms",
        "agents ms",
        "ok/fail",
        "restart ms"
    );

    let mut rounds = Vec::new();
    for n in 1..=cfg.rounds {
        if skyhold_bench::stopped() {
            break;
        }
        let r = round(rt, cloud, cfg, &ids, n)?;
        let f = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "  {:>5} {:<5} {:>6} {:>5} {:>4} {:>9} {:>11} {:>12} {:>10} {:>8} {:>10.0}  {} ({})",
            r.n,
            r.target,
            r.agents_held,
            r.hosts_held,
            r.jobs_held,
            f(r.detect_ms),
            f(r.jobs_resumed_ms),
            f(r.jobs_finished_ms),
            f(r.agents_ms),
            format!("{}/{}", r.jobs_ok, r.jobs_failed),
            r.restart_ms,
            r.declared_by.as_deref().unwrap_or("-"),
            r.heartbeat_age_at_declare_ms.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into()),
        );
        for note in &r.notes {
            println!("        note: {note}");
        }
        rounds.push(r);
    }
    cloud.stop_agents();
    let ledger = check_ledgers(cloud);
    Ok(Report { rounds, ledger, hosts, warmup_job_ms })
}

fn round(rt: &tokio::runtime::Runtime, cloud: &mut Cloud, cfg: &Cfg, ids: &DeployIds, n: usize) -> Result<Round> {
    let mut r = Round { n, ..Round::default() };
    // The server holding the most agents (then hosts; then the first).
    let by_ms = rt.block_on(cloud.hosts_by_ms())?;
    let running: Vec<usize> = (0..cloud.nodes.len()).filter(|&i| cloud.nodes[i].srv.is_some()).collect();
    let load = |i: usize| by_ms.get(&cloud.nodes[i].ms_id).map(|(a, h)| (a.len(), h.len())).unwrap_or((0, 0));
    let ti = *running.iter().max_by_key(|&&i| (load(i), std::cmp::Reverse(i))).context("no server is running")?;
    let target = cloud.nodes[ti].ms_id.clone();
    r.target = target.clone();

    // Make it hold K running jobs: submit deployments through its API until it does.
    let t_fill = Instant::now();
    let mut submitted = 0usize;
    loop {
        let (held, waiting) = rt.block_on(async {
            let mut c = cloud.db.conn().await?;
            let held = skyhold_db::job::job_count_running(&mut c, &target).await?;
            let waiting = skyhold_db::job::job_count_unowned(&mut c).await?;
            Ok::<_, anyhow::Error>((held as usize, waiting as usize))
        })?;
        if held >= cfg.jobs || t_fill.elapsed() >= cfg.fill_timeout || skyhold_bench::stopped() {
            break;
        }
        // Jobs queued but not claimed yet will be claimed soon: count them in. Never more than
        // 4 K submissions in a round.
        let need = cfg.jobs.saturating_sub(held + waiting);
        for _ in 0..need.min((cfg.jobs * 4).saturating_sub(submitted)) {
            submitted += 1;
            cloud.deploy(ti, ids, &format!("fo-r{n:02}-{submitted:03}"))?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r.jobs_submitted = submitted;
    r.fill_ms = ms(t_fill.elapsed());

    // Its hosts right before the kill (agents move at once when its sockets close).
    let by_ms = rt.block_on(cloud.hosts_by_ms())?;
    let (agents, hosts) = by_ms.get(&target).cloned().unwrap_or_default();
    r.agents_held = agents.len();
    r.hosts_held = hosts.len();

    let t0 = Instant::now();
    cloud.kill9(ti);
    // Its jobs: nobody may claim them before it is declared Down (>= 2.5 s from now).
    let jobs = rt.block_on(cloud.jobs_held_by(&target))?;
    r.jobs_held = jobs.len();
    if jobs.len() < cfg.jobs {
        r.notes.push(format!("held {} of {} jobs at the kill ({} submitted)", jobs.len(), cfg.jobs, submitted));
    }

    let end = t0 + cfg.round_timeout;
    let db = &cloud.db;
    let (detect, jw, agents_back) = rt.block_on(async {
        tokio::try_join!(
            watch_detect(db, &target, t0, end, cfg.poll),
            watch_jobs(db, &target, &jobs, t0, end, cfg.poll),
            watch_hosts(db, &target, &hosts, t0, end, cfg.poll),
        )
    })?;
    r.detect_ms = detect.map(ms);
    r.jobs_resumed_ms = jw.resumed.map(ms);
    r.jobs_finished_ms = jw.finished.map(ms);
    r.jobs_ok = jw.ok;
    r.jobs_failed = jw.failed;
    if let Some(e) = jw.first_failure {
        r.notes.push(format!("failed job: {e}"));
    }
    r.agents_ms = agents_back.map(ms);
    r.incomplete =
        detect.is_none() || (!jobs.is_empty() && jw.finished.is_none()) || (!hosts.is_empty() && agents_back.is_none());
    if detect.is_none() {
        r.notes.push(format!("{target} was not declared Down within {} s", cfg.round_timeout.as_secs()));
    }
    if !jobs.is_empty() && (jw.resumed.is_none() || jw.finished.is_none()) {
        r.notes.push(format!("jobs of {target} not all resumed/finished within {} s", cfg.round_timeout.as_secs()));
    }
    if !hosts.is_empty() && agents_back.is_none() {
        r.notes.push(format!("hosts of {target} not all reconnected within {} s", cfg.round_timeout.as_secs()));
    }
    if let Ok(Some((by, age))) = rt.block_on(down_event(db, &target)) {
        r.declared_by = Some(by);
        r.heartbeat_age_at_declare_ms = Some(age);
    }

    // Back with the same id and ports; then wait for the jobs to end and the agents to spread.
    let t = Instant::now();
    cloud.start_nodes(&[ti]).with_context(|| format!("restart {target}"))?;
    r.restart_ms = ms(t.elapsed());
    let t = Instant::now();
    let (_, balanced) = rt.block_on(settle(cloud, cfg.settle_timeout))?;
    r.settle_ms = ms(t.elapsed());
    r.balanced = balanced;
    Ok(r)
}

/// Until `target`'s row says Down.
async fn watch_detect(db: &Db, target: &str, t0: Instant, end: Instant, poll: Duration) -> Result<Option<Duration>> {
    loop {
        let list = {
            let mut c = db.conn().await?;
            skyhold_db::ms::ms_list(&mut c).await?
        };
        if list.iter().any(|m| m.id == target && m.state == "Down") {
            return Ok(Some(t0.elapsed()));
        }
        if Instant::now() >= end || skyhold_bench::stopped() {
            return Ok(None);
        }
        tokio::time::sleep(poll).await;
    }
}

#[derive(Debug, Default)]
struct JobsWatch {
    /// Every job claimed by another server (or already finished).
    resumed: Option<Duration>,
    /// Every job finished.
    finished: Option<Duration>,
    ok: usize,
    failed: usize,
    first_failure: Option<String>,
}

async fn watch_jobs(
    db: &Db,
    target: &str,
    ids: &[String],
    t0: Instant,
    end: Instant,
    poll: Duration,
) -> Result<JobsWatch> {
    let mut w = JobsWatch::default();
    if ids.is_empty() {
        return Ok(w);
    }
    // id -> (resumed, finished)
    let mut seen: HashMap<&str, (bool, bool)> = ids.iter().map(|i| (i.as_str(), (false, false))).collect();
    loop {
        for id in ids {
            let st = seen.get(id.as_str()).copied().unwrap_or_default();
            if st.1 {
                continue;
            }
            let j = {
                let mut c = db.conn().await?;
                job_fetch(&mut c, id).await?
            };
            let Some(j) = j else { bail!("job {id} disappeared") };
            let e = seen.entry(id.as_str()).or_default();
            if j.status != 0 {
                *e = (true, true);
                if j.status == 1 {
                    w.ok += 1;
                } else {
                    w.failed += 1;
                    if w.first_failure.is_none() {
                        w.first_failure = Some(format!("{id}: {}", j.result.unwrap_or_default()));
                    }
                }
            } else if j.owner_ms.as_deref().is_some_and(|o| o != target) {
                e.0 = true;
            }
        }
        let now = t0.elapsed();
        if w.resumed.is_none() && seen.values().all(|s| s.0) {
            w.resumed = Some(now);
        }
        if seen.values().all(|s| s.1) {
            w.finished = Some(now);
            return Ok(w);
        }
        if Instant::now() >= end || skyhold_bench::stopped() {
            return Ok(w);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Until every host `target` held is Up on another server.
async fn watch_hosts(
    db: &Db,
    target: &str,
    ids: &[String],
    t0: Instant,
    end: Instant,
    poll: Duration,
) -> Result<Option<Duration>> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut back: Vec<bool> = vec![false; ids.len()];
    loop {
        for (i, id) in ids.iter().enumerate() {
            if back[i] {
                continue;
            }
            let h = {
                let mut c = db.conn().await?;
                skyhold_db::infra::host_fetch(&mut c, id).await?
            };
            back[i] = h.is_some_and(|h| h.status == "Up" && h.mgmt_server_id.as_deref().is_some_and(|m| m != target));
        }
        if back.iter().all(|&b| b) {
            return Ok(Some(t0.elapsed()));
        }
        if Instant::now() >= end || skyhold_bench::stopped() {
            return Ok(None);
        }
        tokio::time::sleep(poll).await;
    }
}

/// The newest MANAGEMENT.SERVER.DOWN event about `target`: (declared by, heartbeat age in ms).
async fn down_event(db: &Db, target: &str) -> Result<Option<(String, i64)>> {
    let mut c = db.conn().await?;
    let f = skyhold_db::event::EventFilter { event_type: Some("MANAGEMENT.SERVER.DOWN".into()), ..Default::default() };
    let (rows, _) = skyhold_db::event::event_list(&mut c, &f, Page { page: 1, size: 1 }).await?;
    let Some(e) = rows.into_iter().next().map(|r| r.event) else { return Ok(None) };
    if e.resource_id.as_deref() != Some(target) {
        return Ok(None);
    }
    // "... declared Down by ms2 after 2741 ms without heartbeat; ..."
    let d = &e.description;
    let parsed = d.split_once(" declared Down by ").and_then(|(_, rest)| {
        let (by, rest) = rest.split_once(" after ")?;
        let (age, _) = rest.split_once(" ms")?;
        Some((by.to_string(), age.trim().parse().ok()?))
    });
    Ok(parsed)
}

/// Wait for the status of one job (non-zero) and return it.
async fn wait_job(db: &Db, id: &str, within: Duration) -> Result<i64> {
    let end = Instant::now() + within;
    loop {
        let j = {
            let mut c = db.conn().await?;
            job_fetch(&mut c, id).await?
        };
        if let Some(j) = j
            && j.status != 0
        {
            return Ok(j.status);
        }
        if Instant::now() >= end || skyhold_bench::stopped() {
            bail!("job {id} did not finish within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (bounded) until no job is unfinished and the agents are spread over the running servers
/// within one of each other. Returns (all jobs finished, balanced).
async fn settle(cloud: &Cloud, within: Duration) -> Result<(bool, bool)> {
    let end = Instant::now() + within;
    let running: Vec<String> = cloud.nodes.iter().filter(|n| n.srv.is_some()).map(|n| n.ms_id.clone()).collect();
    loop {
        let idle = cloud.unfinished_jobs().await? == 0;
        let by_ms: BTreeMap<String, (Vec<String>, Vec<String>)> = cloud.hosts_by_ms().await?;
        let counts: Vec<usize> = running.iter().map(|m| by_ms.get(m).map(|(a, _)| a.len()).unwrap_or(0)).collect();
        let balanced = counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1;
        if (idle && balanced) || Instant::now() >= end || skyhold_bench::stopped() {
            return Ok((idle, balanced));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Read every agent's ledger: commands executed, replayed, refused, and any that ran twice.
fn check_ledgers(cloud: &Cloud) -> LedgerCheck {
    let mut c = LedgerCheck::default();
    let mut starts: HashMap<String, usize> = HashMap::new();
    let mut steps: HashMap<(String, u64), usize> = HashMap::new();
    for a in &cloud.agents {
        let text = std::fs::read_to_string(&a.ledger).unwrap_or_default();
        for line in text.lines() {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                c.other += 1;
                continue;
            };
            match e["kind"].as_str() {
                Some("exec") => {
                    c.exec += 1;
                    let job = e["job"].as_str().unwrap_or_default().to_string();
                    *steps.entry((job, e["step"].as_u64().unwrap_or(0))).or_default() += 1;
                    if e["op"] == "start" && e["outcome"] == "ok" {
                        *starts.entry(e["vm"].as_str().unwrap_or_default().to_string()).or_default() += 1;
                    }
                }
                Some("replay") => c.replay += 1,
                Some("stale") => c.stale += 1,
                _ => c.other += 1,
            }
        }
    }
    c.vms_started_twice = starts.values().filter(|&&n| n > 1).count();
    c.steps_executed_twice = steps.values().filter(|&&n| n > 1).count();
    c
}
