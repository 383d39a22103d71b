//! Chaos and partition tests of the management-server cluster: SIGKILLs under load, repeated
//! kill/restart cycles while a client keeps working, and a database partition of one server.
//!
//! The ground truth is the simulator agent's ledger (every command executed, replayed or refused,
//! with its generation): whatever the servers say, no `(job, step, host)` may be executed twice,
//! no VM may run on two hosts, and the database's view of every VM must match the agent's.

#[macro_use]
mod common;
use common::*;
use rand::Rng;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Where each VM runs according to the ledger (replaying every successful execution in order;
/// asserts invariants 5 and 7 on the way).
fn ledger_running(c: &Cloud) -> HashMap<String, String> {
    check_ledger(&c.ledger_entries())
}

/// One signed GET that never panics: a transport failure (refused, reset, timeout) is `Err`.
fn try_call(base: &str, who: &Creds, cmd: &str, params: &[(&str, &str)]) -> Result<(u16, Value), String> {
    let q = signed_query(who, cmd, params);
    match ureq::get(&format!("{base}?{q}")).timeout(Duration::from_secs(10)).call() {
        Ok(r) => {
            let st = r.status();
            Ok((st, r.into_json().unwrap_or(Value::Null)))
        }
        Err(ureq::Error::Status(st, r)) => Ok((st, r.into_json().unwrap_or(Value::Null))),
        Err(e) => Err(e.to_string()),
    }
}

fn inner(cmd: &str, v: &Value) -> Value {
    v[format!("{}response", cmd.to_lowercase())].clone()
}

/// A client that talks to every server round robin and retries what may be retried on the next
/// one: transport failures (the server is dead or restarting), 503 (draining) and 530 (storage).
struct RrClient {
    bases: Vec<String>,
    who: Creds,
    next: usize,
    retries: u64,
}

/// What a call came to after retries.
struct CallResult {
    status: u16,
    /// The object under `<cmd>response`.
    body: Value,
    /// An earlier attempt failed in a way that may have taken effect (reset mid-request, 530).
    ambiguous: bool,
}

impl RrClient {
    fn new(bases: Vec<String>, who: Creds) -> RrClient {
        RrClient { bases, who, next: 0, retries: 0 }
    }

    fn call(&mut self, cmd: &str, params: &[(&str, &str)]) -> CallResult {
        let end = Instant::now() + Duration::from_secs(30);
        let mut ambiguous = false;
        loop {
            let base = self.bases[self.next % self.bases.len()].clone();
            self.next += 1;
            let last = match try_call(&base, &self.who, cmd, params) {
                Ok((st, v)) if st != 503 && st != 530 => {
                    return CallResult { status: st, body: inner(cmd, &v), ambiguous };
                }
                Ok((st, v)) => {
                    if st == 530 {
                        ambiguous = true;
                    }
                    format!("{st} {v}")
                }
                Err(e) => {
                    if !e.to_lowercase().contains("refused") {
                        ambiguous = true;
                    }
                    e
                }
            };
            self.retries += 1;
            assert!(Instant::now() < end, "{cmd} failed on every server for 30 s; last: {last}");
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

/// A cloud with an initialised database and no server yet (so that a test may start its first
/// server its own way, e.g. behind a database proxy). `None` when the backend is not available.
fn init_cloud(backend: Backend) -> Option<Cloud> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = db_url(backend, dir.path())?;
    let d = dir.path().to_str().expect("utf8 path").to_string();
    let out = run_ok(&["db", "init", "--seed", "--data-dir", &d, "--db", &db_url, "--admin-password", "password"]);
    let v: Value = serde_json::from_str(&out).expect("db init prints JSON");
    let admin = Creds {
        api_key: v["admin"]["apikey"].as_str().expect("apikey").into(),
        secret: v["admin"]["secretkey"].as_str().expect("secret").into(),
        username: "admin".into(),
        password: "password".into(),
    };
    Some(Cloud {
        dir,
        backend,
        db_url,
        admin,
        agent_token: v["agent_token"].as_str().expect("token").into(),
        servers: Vec::new(),
        agents: Vec::new(),
        api_port: 0,
        allow_error_logs: false,
    })
}

/// Start a simulator agent with an explicit `--mgmt` list (the harness gives it every server).
fn hosts(c: &Cloud) -> Vec<Value> {
    c.ok("listHosts", &[])["host"].as_array().cloned().unwrap_or_default()
}

fn ms_list(c: &Cloud) -> Vec<Value> {
    c.ok("listManagementServers", &[])["managementserver"].as_array().cloned().unwrap_or_default()
}

fn ms_state(c: &Cloud, id: &str) -> Option<String> {
    ms_list(c).iter().find(|m| m["id"] == id).and_then(|m| m["state"].as_str().map(str::to_string))
}

/// A server's last heartbeat on the database clock (epoch ms): its age, read through `c.api_port`.
fn last_heartbeat_ms(c: &Cloud, id: &str) -> i64 {
    let before = now_ms();
    let m = ms_list(c).into_iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id} not listed"));
    let after = now_ms();
    (before + after) / 2 - m["heartbeatagems"].as_i64().expect("heartbeatagems")
}

/// Wait until `id` renews its heartbeat; returns the new heartbeat time.
fn wait_renewal(c: &Cloud, id: &str) -> i64 {
    let first = last_heartbeat_ms(c, id);
    wait_for(Duration::from_secs(10), || {
        let h = last_heartbeat_ms(c, id);
        (h > first + 100).then_some(h)
    })
    .unwrap_or_else(|| panic!("{id} did not renew its heartbeat"))
}

/// Index of the server called `name` in `c.servers`.
fn server_index(c: &Cloud, name: &str) -> usize {
    c.servers.iter().position(|(p, _, _)| p.name == name).unwrap_or_else(|| panic!("no server {name}"))
}

fn log_of(p: &Proc) -> String {
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The timestamp of a log line (`2025-01-02T03:04:05.678901Z  INFO ...`) in epoch milliseconds.
fn log_ts_ms(line: &str) -> Option<i64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    Some(days_from_civil(y, m, dd) * 86_400_000 + h * 3_600_000 + mi * 60_000 + (s * 1000.0) as i64)
}

/// The value of `key=` in a log line (up to the next space, or the whole `[...]` list).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if rest.starts_with('[') {
        let end = rest.find(']')?;
        Some(&rest[..=end])
    } else {
        Some(rest.split_whitespace().next().unwrap_or(""))
    }
}

/// One registration of the agent as its log tells it: when, with whom, and the generation granted
/// for each host guid.
#[derive(Debug)]
struct AgentSession {
    ts_ms: i64,
    ms_id: String,
    grants: HashMap<String, u64>,
    mgmt_addrs: String,
}

fn agent_sessions(c: &Cloud) -> Vec<AgentSession> {
    let log = c.agents.iter().map(log_of).collect::<Vec<_>>().join("\n");
    let mut out = Vec::new();
    for l in log.lines().filter(|l| l.contains("connected to management server")) {
        let (Some(ts), Some(ms), Some(hosts)) = (log_ts_ms(l), log_field(l, "ms_id"), log_field(l, "hosts")) else {
            continue;
        };
        let mut grants = HashMap::new();
        // ["agent1-h0=<host id>@3", ...]
        for g in hosts.trim_matches(|c| c == '[' || c == ']').split(',') {
            let g = g.trim().trim_matches('"');
            if let (Some((guid, _)), Some((_, generation))) = (g.split_once('='), g.rsplit_once('@')) {
                grants.insert(guid.to_string(), generation.parse().unwrap_or(0));
            }
        }
        let mgmt_addrs = log_field(l, "mgmt_addrs").unwrap_or("").to_string();
        out.push(AgentSession { ts_ms: ts, ms_id: ms.to_string(), grants, mgmt_addrs });
    }
    out
}

/// Poll a job on any server until it is finished; `None` if it is still pending after `within`.
fn wait_final(cl: &mut RrClient, job: &str, within: Duration) -> Option<Value> {
    wait_for(within, || {
        let r = cl.call("queryAsyncJobResult", &[("jobid", job)]);
        assert_eq!(r.status, 200, "queryAsyncJobResult {job}: {}", r.body);
        (r.body["jobstatus"] != 0).then_some(r.body)
    })
}

/// Every job in the database (all accounts), following pages.
fn all_jobs(cl: &mut RrClient) -> Vec<Value> {
    let mut out = Vec::new();
    for page in 1.. {
        let p = page.to_string();
        let r = cl.call("listAsyncJobs", &[("listall", "true"), ("page", &p), ("pagesize", "500")]);
        assert_eq!(r.status, 200, "listAsyncJobs: {}", r.body);
        let items = r.body["asyncjobs"].as_array().cloned().unwrap_or_default();
        let n = items.len();
        out.extend(items);
        if n < 500 {
            break;
        }
    }
    out
}

/// A finished job must carry a clear outcome: success, or a failure with an error text.
fn assert_final_shape(j: &Value) {
    let st = j["jobstatus"].as_i64().unwrap_or(-1);
    assert!(st == 1 || st == 2, "job ended in no final state: {j}");
    if st == 2 {
        let text = j["jobresult"]["errortext"].as_str().unwrap_or("");
        assert!(!text.trim().is_empty(), "failed job without an error text: {j}");
        assert!(j["jobresultcode"].as_i64().unwrap_or(0) >= 400, "failed job without an error code: {j}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Takeover under load
// ---------------------------------------------------------------------------------------------

/// Three servers, one agent with 20 hosts, 30 deploys spread over the three APIs; the server that
/// holds the agent's hosts is SIGKILLed while the jobs are in flight. Every job ends exactly once,
/// no command runs twice, the survivors declare the dead server Down, take over its jobs and
/// hosts, and the times it took are printed.
fn takeover_under_load(b: Backend) {
    let Some(mut c) = Cloud::start(b, 0) else { return };
    c.allow_error_logs = true; // the kill makes the survivors log errors on purpose
    c.start_server("ms2");
    c.start_server("ms3");
    // 300 ms of simulated hypervisor latency: commands are in flight when the kill comes.
    c.start_agent("agent1", 20, &["--command-delay-ms", "300"]);
    c.wait_hosts_up(20);
    let (z, t, o) = c.ids("Small Instance");

    // The victim: the server holding the agent's hosts (its death moves hosts and jobs).
    let hs = hosts(&c);
    let holder = hs[0]["managementserverid"].as_str().expect("hosts are held").to_string();
    assert!(hs.iter().all(|h| h["managementserverid"] == holder.as_str()), "one agent, one server: {hs:?}");
    let victim = server_index(&c, &holder);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    eprintln!("victim: {holder} (holds the 20 hosts)");

    // 24 deploys, 8 per server, submitted in parallel so that the executors are busy.
    let submit = |base: String, who: Creds, names: Vec<String>| {
        let (z, t, o) = (z.clone(), t.clone(), o.clone());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            for n in &names {
                let p = [("zoneid", z.as_str()), ("templateid", &t), ("serviceofferingid", &o), ("name", n)];
                // The victim may die under this thread: stop there (the final check covers a job
                // whose id the kill swallowed).
                let Ok((st, v)) = try_call(&base, &who, "deployVirtualMachine", &p) else { break };
                assert_eq!(st, 200, "deploy {n}: {v}");
                let r = inner("deployVirtualMachine", &v);
                out.push((r["jobid"].as_str().expect("jobid").to_string(), r["id"].as_str().expect("id").to_string()));
            }
            out
        })
    };
    let threads: Vec<_> = (0..3)
        .map(|i| submit(c.base_of(i), c.admin.clone(), (0..8).map(|k| format!("load-{i}-{k}")).collect()))
        .collect();
    // Kill the victim while it runs jobs: as soon as the database shows it owning unfinished
    // ones. The submitters may be done before that (submitting is quick; each job takes 300 ms
    // per command), so wait on the ownership itself, not on them.
    c.api_port = c.servers[survivors[0]].1;
    let owned = wait_for(Duration::from_secs(10), || {
        let n = ms_list(&c)
            .iter()
            .find(|m| m["id"] == holder.as_str())
            .and_then(|m| m["runningjobs"].as_i64())
            .unwrap_or(0);
        (n > 0).then_some(n)
    })
    .unwrap_or(0);
    let killed = Instant::now();
    c.kill9_server(victim);
    eprintln!("killed {holder} while it owned {owned} unfinished job(s)");
    let mut jobs: Vec<(String, String)> = threads.into_iter().flat_map(|h| h.join().expect("submitter")).collect();
    // Keep using the survivors: more deploys, up to 30 in all.
    for k in 0..(30 - jobs.len()) {
        let i = survivors[k % 2];
        let n = format!("after-{k}");
        let p = [("zoneid", z.as_str()), ("templateid", &t), ("serviceofferingid", &o), ("name", &n)];
        let (st, v) = try_call(&c.base_of(i), &c.admin, "deployVirtualMachine", &p).expect("survivor alive");
        assert_eq!(st, 200, "deploy {n} on a survivor: {v}");
        let r = inner("deployVirtualMachine", &v);
        jobs.push((r["jobid"].as_str().unwrap().to_string(), r["id"].as_str().unwrap().to_string()));
    }
    assert_eq!(jobs.len(), 30);

    // Watch: every job final, all hosts Up on survivors, the victim Down.
    let mut cl = RrClient::new(survivors.iter().map(|&i| c.base_of(i)).collect(), c.admin.clone());
    let mut finals: HashMap<String, Value> = HashMap::new();
    let (mut t_jobs, mut t_hosts, mut t_down) = (None, None, None);
    let deadline = killed + Duration::from_secs(30);
    while Instant::now() < deadline && (t_jobs.is_none() || t_hosts.is_none() || t_down.is_none()) {
        for (job, _) in &jobs {
            if finals.contains_key(job) {
                continue;
            }
            let r = cl.call("queryAsyncJobResult", &[("jobid", job)]);
            assert_eq!(r.status, 200, "{}", r.body);
            if r.body["jobstatus"] != 0 {
                finals.insert(job.clone(), r.body);
            }
        }
        if t_jobs.is_none() && finals.len() == jobs.len() {
            t_jobs = Some(killed.elapsed());
        }
        if t_hosts.is_none() {
            let hs = hosts(&c);
            let up = hs
                .iter()
                .filter(|h| h["state"] == "Up" && h["managementserverid"].as_str().is_some_and(|m| m != holder))
                .count();
            if up == 20 {
                t_hosts = Some(killed.elapsed());
            }
        }
        if t_down.is_none() && ms_state(&c, &holder).as_deref() == Some("Down") {
            t_down = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pending: Vec<&String> = jobs.iter().map(|(j, _)| j).filter(|j| !finals.contains_key(*j)).collect();
    assert!(pending.is_empty(), "jobs still pending 30 s after the kill: {pending:?}");
    let t_jobs = t_jobs.expect("all jobs final");
    let t_hosts =
        t_hosts.unwrap_or_else(|| panic!("20 hosts not Up on survivors 30 s after the kill: {:?}", hosts(&c)));
    let t_down = t_down.unwrap_or_else(|| panic!("{holder} not declared Down: {:?}", ms_list(&c)));

    // Exactly one final state each, with a clear outcome; succeeded deploys left Running VMs.
    let mut ok = 0;
    for (job, vm) in &jobs {
        let j = &finals[job];
        assert_final_shape(j);
        let again = wait_final(&mut cl, job, Duration::from_secs(1)).expect("still final");
        assert_eq!(again["jobstatus"], j["jobstatus"], "job {job} changed its final state: {j} then {again}");
        assert_eq!(again["jobresult"], j["jobresult"], "job {job} changed its result: {j} then {again}");
        if j["jobstatus"] == 1 {
            ok += 1;
            assert_eq!(c.vm(vm)["state"], "Running", "VM of succeeded job {job}");
        }
    }
    assert_eq!(ok, 30, "every deploy fits easily on 20 hosts and should succeed: {finals:?}");
    let stuck: Vec<Value> = all_jobs(&mut cl).into_iter().filter(|j| j["jobstatus"] == 0).collect();
    assert!(stuck.is_empty(), "jobs pending in the database: {stuck:?}");
    c.assert_ledger_invariants();
    // The database agrees with the agent: each Running VM runs where the database says.
    let running = ledger_running(&c);
    let names: HashMap<String, String> = hosts(&c)
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), h["name"].as_str().unwrap().to_string()))
        .collect();
    for (_, vm) in &jobs {
        let v = c.vm(vm);
        let host = names[v["hostid"].as_str().expect("Running VM has a host")].clone();
        assert_eq!(running.get(vm), Some(&host), "ledger vs database for VM {vm}: {v}");
    }

    // Membership: the victim is Down, the event says so and names what was taken over.
    assert_eq!(ms_state(&c, &holder).as_deref(), Some("Down"));
    // The state changes first (one conditional UPDATE); the takeover and its event follow.
    let down = wait_for(Duration::from_secs(10), || {
        let ev = c.ok("listEvents", &[("type", "MANAGEMENT.SERVER.DOWN")]);
        ev["event"].as_array().and_then(|a| {
            a.iter()
                .find(|e| {
                    e["description"].as_str().is_some_and(|d| d.contains(&format!("Management server {holder} ")))
                })
                .cloned()
        })
    })
    .unwrap_or_else(|| panic!("no MANAGEMENT.SERVER.DOWN event for {holder}: {}", c.ok("listEvents", &[])));
    eprintln!("event: {}", down["description"]);
    let desc = down["description"].as_str().unwrap_or("");
    let taken: i64 = desc
        .split_once(" job(s) taken over")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the Down event says how many jobs were taken over: {desc}"));
    assert!(owned > 0, "the victim owned no job when killed: the test did not exercise a takeover");
    assert!(taken >= owned, "{owned} unfinished job(s) of {holder} at the kill, {taken} taken over: {desc}");
    eprintln!(
        "takeover under load ({b:?}): kill -> {holder} Down {:.2} s; kill -> last of 30 jobs finished {:.2} s; \
         kill -> 20 hosts Up on survivors {:.2} s",
        t_down.as_secs_f64(),
        t_jobs.as_secs_f64(),
        t_hosts.as_secs_f64()
    );
}
both!(takeover_under_load);

// ---------------------------------------------------------------------------------------------
// 2. Chaos: kill and restart servers at random while a client keeps working
// ---------------------------------------------------------------------------------------------

/// How long the client works while servers are killed.
const CHAOS_FOR: Duration = Duration::from_secs(42);
/// Jobs the client keeps in flight at most.
const MAX_INFLIGHT: usize = 10;
/// VMs (not destroyed) the client keeps at most.
const MAX_VMS: usize = 40;

#[derive(Debug, Clone)]
struct JobRec {
    id: String,
    cmd: &'static str,
    vm: String,
    /// First final answer seen (status, code, result).
    final_: Option<Value>,
}

#[derive(Debug, Clone)]
struct VmRec {
    id: String,
    /// Last state a finished job reported.
    state: String,
    /// Unfinished jobs of this VM the client knows.
    pending: usize,
}

#[derive(Debug, Default)]
struct ChaosLog {
    jobs: Vec<JobRec>,
    vms: Vec<VmRec>,
    /// (command, status, text) of calls refused with a 4xx.
    refused: Vec<(String, u16, String)>,
    /// Deploys whose first attempt failed ambiguously and turned out to have been accepted.
    ambiguous_deploys: u64,
    retries: u64,
    calls: u64,
}

/// The client: deploys, stops, starts and destroys VMs through every server, round robin.
fn chaos_client(mut cl: RrClient, ids: (String, String, String), stop: Arc<AtomicBool>) -> ChaosLog {
    let (z, t, o) = ids;
    let mut rng = rand::thread_rng();
    let mut log = ChaosLog::default();
    let mut seq = 0u32;
    let mut poll_at = 0usize;
    while !stop.load(Ordering::SeqCst) {
        // Poll a few unfinished jobs.
        let open: Vec<usize> = (0..log.jobs.len()).filter(|&i| log.jobs[i].final_.is_none()).collect();
        for k in 0..open.len().min(4) {
            let i = open[(poll_at + k) % open.len()];
            let r = cl.call("queryAsyncJobResult", &[("jobid", &log.jobs[i].id)]);
            log.calls += 1;
            assert_eq!(r.status, 200, "queryAsyncJobResult: {}", r.body);
            if r.body["jobstatus"] != 0 {
                let j = &mut log.jobs[i];
                j.final_ = Some(r.body.clone());
                if let Some(v) = log.vms.iter_mut().find(|v| v.id == j.vm) {
                    v.pending = v.pending.saturating_sub(1);
                    if let Some(s) = r.body["jobresult"]["virtualmachine"]["state"].as_str() {
                        v.state = s.to_string();
                    } else if r.body["jobstatus"] == 1 && j.cmd == "destroyVirtualMachine" {
                        v.state = "Destroyed".into();
                    }
                }
            }
        }
        poll_at += 4;
        let inflight = log.jobs.iter().filter(|j| j.final_.is_none()).count();
        if inflight < MAX_INFLIGHT {
            let live = log.vms.iter().filter(|v| v.state != "Destroyed").count();
            let idle: Vec<usize> =
                (0..log.vms.len()).filter(|&i| log.vms[i].pending == 0 && log.vms[i].state != "Destroyed").collect();
            let blind = rng.gen_bool(0.1) && !log.vms.is_empty();
            if blind {
                // Any VM, whatever its state or queue: may be refused (431) or fail in its job.
                let i = rng.gen_range(0..log.vms.len());
                let cmd = ["startVirtualMachine", "stopVirtualMachine"][rng.gen_range(0..2)];
                vm_op(&mut cl, &mut log, i, cmd);
            } else if idle.is_empty() || (live < MAX_VMS && rng.gen_bool(0.4)) {
                seq += 1;
                let name = format!("chaos-{seq}");
                let p = [("zoneid", z.as_str()), ("templateid", &t), ("serviceofferingid", &o), ("name", &name)];
                let r = cl.call("deployVirtualMachine", &p);
                log.calls += 1;
                if r.status == 200 {
                    let vm = r.body["id"].as_str().expect("vm id").to_string();
                    let job = r.body["jobid"].as_str().expect("jobid").to_string();
                    log.jobs.push(JobRec { id: job, cmd: "deployVirtualMachine", vm: vm.clone(), final_: None });
                    log.vms.push(VmRec { id: vm, state: "Starting".into(), pending: 1 });
                } else if r.ambiguous && r.body["errortext"].as_str().is_some_and(|e| e.contains("already exists")) {
                    // The first attempt was accepted before the server died; its job id is lost
                    // to us (the final check covers every job in the database).
                    log.ambiguous_deploys += 1;
                    let l = cl.call("listVirtualMachines", &[("name", &name)]);
                    let vm = l.body["virtualmachine"][0]["id"].as_str().expect("the accepted VM").to_string();
                    log.vms.push(VmRec { id: vm, state: "Starting".into(), pending: 0 });
                } else {
                    panic!("deploy {name} refused: {} {}", r.status, r.body);
                }
            } else {
                let i = idle[rng.gen_range(0..idle.len())];
                let cmd = match (log.vms[i].state.as_str(), rng.gen_range(0..10)) {
                    (_, 0 | 1) => "destroyVirtualMachine",
                    ("Running", _) => "stopVirtualMachine",
                    _ => "startVirtualMachine",
                };
                vm_op(&mut cl, &mut log, i, cmd);
            }
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    log.retries = cl.retries;
    log
}

fn vm_op(cl: &mut RrClient, log: &mut ChaosLog, i: usize, cmd: &'static str) {
    let id = log.vms[i].id.clone();
    let r = cl.call(cmd, &[("id", &id)]);
    log.calls += 1;
    match r.status {
        200 => {
            let job = r.body["jobid"].as_str().expect("jobid").to_string();
            log.jobs.push(JobRec { id: job, cmd, vm: id, final_: None });
            log.vms[i].pending += 1;
        }
        431 => {
            // A VM destroyed meanwhile (or in a state that refuses the operation): fine, recorded.
            let text = r.body["errortext"].as_str().unwrap_or("").to_string();
            log.refused.push((cmd.to_string(), r.status, text));
        }
        st => panic!("{cmd} {id}: unexpected {st}: {}", r.body),
    }
}

fn chaos(b: Backend) {
    let started = Instant::now();
    let Some(mut c) = Cloud::start(b, 0) else { return };
    c.allow_error_logs = true; // kills make the survivors log errors on purpose
    c.start_server("ms2");
    c.start_server("ms3");
    // 100 ms of simulated hypervisor latency: kills land while commands are in flight.
    c.start_agent("agent1", 50, &["--command-delay-ms", "100"]);
    c.wait_hosts_up(50);
    let ids = c.ids("Small Instance");
    let bases: Vec<String> = (0..3).map(|i| c.base_of(i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let cl = RrClient::new(bases.clone(), c.admin.clone());
        let stop = stop.clone();
        std::thread::spawn(move || chaos_client(cl, ids, stop))
    };

    // Every ~10 s a random server is SIGKILLed and restarted (same ports, new run).
    let mut rng = rand::thread_rng();
    let end = Instant::now() + CHAOS_FOR;
    let mut next_kill = Instant::now() + Duration::from_millis(rng.gen_range(6000..9000));
    let mut kills = Vec::new();
    while Instant::now() < end && !client.is_finished() {
        if Instant::now() >= next_kill && end.saturating_duration_since(Instant::now()) > Duration::from_secs(4) {
            let i = rng.gen_range(0..3);
            let t0 = Instant::now();
            c.kill9_server(i);
            // Dead for a moment (its ports refuse connections), then a new run on the same ports.
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
            c.restart_server(i, &[]);
            eprintln!(
                "chaos: killed {} at +{:.1} s, restarted and ready after {:.2} s",
                c.servers[i].0.name,
                t0.duration_since(started).as_secs_f64(),
                t0.elapsed().as_secs_f64()
            );
            kills.push(c.servers[i].0.name.clone());
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(8000..11000));
        }
        std::thread::sleep(Duration::from_millis(50)); // pacing only
    }
    stop.store(true, Ordering::SeqCst);
    let mut log = match client.join() {
        Ok(l) => l,
        Err(e) => std::panic::resume_unwind(e),
    };
    eprintln!("chaos: client stopped at +{:.1} s; settling", started.elapsed().as_secs_f64());

    // Settle: every job the client was given reaches a final state.
    let mut cl = RrClient::new(bases, c.admin.clone());
    let settle = Instant::now();
    for j in log.jobs.iter_mut() {
        let left = Duration::from_secs(25).saturating_sub(settle.elapsed()).max(Duration::from_millis(100));
        let f = wait_final(&mut cl, &j.id, left)
            .unwrap_or_else(|| panic!("job {} ({} of VM {}) still pending after settling", j.id, j.cmd, j.vm));
        assert_final_shape(&f);
        match &j.final_ {
            // Ended exactly once: the final answer never changes.
            Some(first) => {
                assert_eq!(
                    first["jobstatus"], f["jobstatus"],
                    "job {} changed its final state: {first} then {f}",
                    j.id
                );
                assert_eq!(first["jobresult"], f["jobresult"], "job {} changed its result: {first} then {f}", j.id);
            }
            None => j.final_ = Some(f),
        }
    }
    // No job at all (including those whose id an ambiguous failure hid) is left pending.
    let all = wait_for(Duration::from_secs(15), || {
        let all = all_jobs(&mut cl);
        all.iter().all(|j| j["jobstatus"] != 0).then_some(all)
    })
    .unwrap_or_else(|| {
        let pending: Vec<Value> = all_jobs(&mut cl).into_iter().filter(|j| j["jobstatus"] == 0).collect();
        panic!("jobs still pending in the database: {pending:?}")
    });
    let mut seen = HashSet::new();
    for j in &all {
        assert!(seen.insert(j["jobid"].to_string()), "job listed twice: {j}");
        assert_final_shape(j);
    }
    for j in &log.jobs {
        assert!(seen.contains(&Value::String(j.id.clone()).to_string()), "job {} given to the client is gone", j.id);
    }

    // All 50 hosts Up, each held by a live server; all servers Up again.
    let live = wait_for(Duration::from_secs(15), || {
        let ms = ms_list(&c);
        let up: HashSet<String> =
            ms.iter().filter(|m| m["state"] == "Up").map(|m| m["id"].as_str().unwrap().to_string()).collect();
        let hs = hosts(&c);
        let ok = up.len() == 3
            && hs.len() == 50
            && hs
                .iter()
                .all(|h| h["state"] == "Up" && h["managementserverid"].as_str().is_some_and(|m| up.contains(m)));
        ok.then_some(ms)
    })
    .unwrap_or_else(|| panic!("cluster did not settle: servers {:?}\nhosts {:?}", ms_list(&c), hosts(&c)));
    let agentcount: i64 = live.iter().map(|m| m["agentcount"].as_i64().unwrap_or(0)).sum();
    assert_eq!(agentcount, 50, "every host connected to exactly one server: {live:?}");

    // The agent's ground truth.
    c.assert_ledger_invariants();
    let running = ledger_running(&c);
    let names: HashMap<String, String> = hosts(&c)
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), h["name"].as_str().unwrap().to_string()))
        .collect();
    let vms = c.ok("listVirtualMachines", &[("listall", "true")]);
    let vms: Vec<Value> = vms["virtualmachine"].as_array().cloned().unwrap_or_default();
    let mut by_state: HashMap<String, usize> = HashMap::new();
    for v in &vms {
        let id = v["id"].as_str().unwrap();
        let state = v["state"].as_str().unwrap_or("");
        *by_state.entry(state.to_string()).or_default() += 1;
        match state {
            "Running" => {
                let host = v["hostid"].as_str().and_then(|h| names.get(h)).cloned();
                assert!(host.is_some(), "Running VM without a host: {v}");
                assert_eq!(running.get(id), host.as_ref(), "database says Running on {host:?}, ledger disagrees: {v}");
            }
            "Stopped" | "Destroyed" => {
                assert!(
                    !running.contains_key(id),
                    "database says {state}, ledger has it Running on {:?}: {v}",
                    running.get(id)
                );
            }
            "Error" => {}
            other => panic!("VM left in transitional state {other} after all jobs finished: {v}"),
        }
    }
    // VMs the database no longer knows (expunged) must not run anywhere either.
    let known: HashSet<&str> = vms.iter().filter_map(|v| v["id"].as_str()).collect();
    for (vm, host) in &running {
        assert!(known.contains(vm.as_str()), "VM {vm} runs on {host} but the database does not know it");
    }

    // What the crashes cost, as the agent saw it, and what the servers complained about.
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for e in c.ledger_entries() {
        *kinds.entry(e["kind"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    let mut errors: HashMap<String, usize> = HashMap::new();
    for (p, _, _) in &c.servers {
        for l in log_of(p).lines().filter(|l| l.contains(" ERROR ")) {
            // The message without timestamp and fields.
            let msg = l.split_once(": ").map(|(_, m)| m).unwrap_or(l);
            let msg: String = msg.split(" error=").next().unwrap_or(msg).chars().take(90).collect();
            *errors.entry(msg).or_default() += 1;
        }
    }
    eprintln!("chaos ({b:?}): ledger {kinds:?}");
    eprintln!("chaos ({b:?}): ERROR lines in server logs {errors:#?}");
    let ok = log.jobs.iter().filter(|j| j.final_.as_ref().is_some_and(|f| f["jobstatus"] == 1)).count();
    let failed = log.jobs.len() - ok;
    let mut fail_texts: HashMap<String, usize> = HashMap::new();
    for j in log.jobs.iter().filter_map(|j| j.final_.as_ref()).filter(|f| f["jobstatus"] == 2) {
        let t = j["jobresult"]["errortext"].as_str().unwrap_or("").to_string();
        let key: String = t.split(':').next().unwrap_or("").chars().take(60).collect();
        *fail_texts.entry(key).or_default() += 1;
    }
    eprintln!(
        "chaos ({b:?}): {} jobs submitted, {ok} succeeded, {failed} failed; {} kills ({}); {} API calls, {} retried \
         on another server; {} refused (431); {} ambiguous deploys; {} jobs in the database; VMs by state {by_state:?}; \
         failures {fail_texts:?}; total {:.1} s",
        log.jobs.len(),
        kills.len(),
        kills.join(", "),
        log.calls,
        log.retries,
        log.refused.len(),
        log.ambiguous_deploys,
        all.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(!kills.is_empty(), "the chaos loop killed nothing");
    assert!(log.jobs.len() >= 20, "the client did too little work: {} jobs", log.jobs.len());
}
both!(chaos);

// ---------------------------------------------------------------------------------------------
// 3. Database partition of one server
// ---------------------------------------------------------------------------------------------

/// `host:port` of a `mysql://user:pass@host:port/db` URL, and the URL with `host:port` replaced
/// by `127.0.0.1:port`.
fn split_db_url(url: &str, port: u16) -> (String, String) {
    let at = url.rfind('@').expect("credentials in the MariaDB URL") + 1;
    let slash = url[at..].find('/').map(|i| i + at).expect("database name in the URL");
    (url[at..slash].to_string(), format!("{}127.0.0.1:{port}{}", &url[..at], &url[slash..]))
}

/// ms1 reaches MariaDB through a proxy, ms2 directly; an agent with 4 hosts is held by ms1. The
/// proxy is cut: ms1 must fence itself (before ms2 may act), ms2 declares it Down, the agent moves
/// to ms2 within seconds, VM operations work through ms2, and nothing runs with ms1's generation
/// after ms2 took the hosts. Healed, ms1 finds itself marked Down and exits (219) instead of acting.
///
/// `interval`: a `cluster.heartbeat.interval` to set first (the default threshold stays). Whatever
/// the (accepted) settings, ms1 must be fenced before the takeover deadline: its last renewal on
/// the database clock plus the threshold.
fn partition_self_fences(how: Cut, interval: Option<&str>) {
    let Some(mut c) = init_cloud(Backend::MySql) else { return };
    c.allow_error_logs = true; // fencing and the lost database log errors on purpose
    let (upstream, _) = split_db_url(&c.db_url, 0);
    let proxy = TcpProxy::start(&upstream).expect("start TCP proxy");
    let (_, proxied_url) = split_db_url(&c.db_url, proxy.port);
    // ms2 first, so that ms1 knows its peer from its first monitor round and tells the agent.
    let i2 = c.start_server("ms2");
    let i1 = c.start_server_with_db("ms1", &proxied_url);
    c.api_port = c.servers[i2].1;
    let ms1_agent = format!("127.0.0.1:{}", c.servers[i1].2);
    let ms2_agent = format!("127.0.0.1:{}", c.servers[i2].2);
    // 3 s of simulated hypervisor latency: a command ms1 sends just before the partition is
    // still waiting in the agent when ms2 takes the hosts over.
    c.start_agent_at("agent1", 4, &ms1_agent, &["--command-delay-ms", "3000"]);
    wait_for(Duration::from_secs(20), || {
        let hs = hosts(&c);
        (hs.len() == 4 && hs.iter().all(|h| h["state"] == "Up" && h["managementserverid"] == "ms1")).then_some(())
    })
    .unwrap_or_else(|| panic!("4 hosts not Up on ms1: {:?}", hosts(&c)));
    let s = agent_sessions(&c);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].mgmt_addrs.contains(&ms2_agent), "ms1 told the agent about ms2: {s:?}");
    let setting = |c: &Cloud, port: u16, name: &str| {
        let (st, v) =
            try_call(&format!("http://127.0.0.1:{port}/client/api"), &c.admin, "listConfigurations", &[("name", name)])
                .expect("server up");
        assert_eq!(st, 200, "{v}");
        inner("listConfigurations", &v)["configuration"][0]["value"].as_str().expect("value").to_string()
    };
    if let Some(iv) = interval {
        let (st, v) = c.api("updateConfiguration", &[("name", "cluster.heartbeat.interval"), ("value", iv)]);
        if st != 200 {
            // Refusing a heartbeat interval that would put the self-fence after the takeover
            // deadline is a fine answer too.
            assert_eq!(st, 431, "{v}");
            eprintln!("partition ({how:?}): cluster.heartbeat.interval={iv} refused: {v}");
            return;
        }
        // Both servers use it (their settings caches), and ms1 renews at that pace.
        for port in [c.servers[i1].1, c.servers[i2].1] {
            wait_for(Duration::from_secs(10), || (setting(&c, port, "cluster.heartbeat.interval") == iv).then_some(()))
                .unwrap_or_else(|| panic!("server on {port} did not apply cluster.heartbeat.interval={iv}"));
        }
        let want: i64 = iv.parse().expect("interval");
        wait_for(Duration::from_secs(20), || {
            let a = wait_renewal(&c, "ms1");
            let b = wait_renewal(&c, "ms1");
            (b - a >= want - 150).then_some(())
        })
        .unwrap_or_else(|| panic!("ms1 does not renew every {iv} ms"));
    }
    let threshold: i64 = setting(&c, c.servers[i2].1, "cluster.heartbeat.threshold").parse().expect("threshold");

    // Work through ms1 before the cut: commands with ms1's generations in the ledger.
    let (z, t, o) = c.ids("Small Instance");
    let deploy = |c: &Cloud, name: &str| {
        let r = c.ok(
            "deployVirtualMachine",
            &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", name)],
        );
        (r["id"].as_str().unwrap().to_string(), r["jobid"].as_str().unwrap().to_string())
    };
    c.api_port = c.servers[i1].1;
    let (pre_vm, pre_job) = deploy(&c, "pre1");
    assert_eq!(c.wait_job(&pre_job)["jobstatus"], 1);
    // A job accepted by ms1 just before the partition: it must still end exactly once. Cut once
    // its StartVm is on its way to the agent (the VM is Starting: planned, command sent).
    let (inflight_vm, inflight_job) = deploy(&c, "inflight1");
    c.api_port = c.servers[i2].1;
    wait_for(Duration::from_secs(10), || (c.vm(&inflight_vm)["state"] == "Starting").then_some(()))
        .unwrap_or_else(|| panic!("inflight1 never got to Starting: {}", c.vm(&inflight_vm)));
    // Cut right after one of ms1's renewals: the longest way to its self-fence.
    wait_renewal(&c, "ms1");
    let cut_ms = now_ms();
    let cut = Instant::now();
    proxy.cut(how);
    c.api_port = c.servers[i2].1;
    eprintln!("partition ({how:?}): ms1 cut off the database");

    // ms1 fences itself.
    let fence_line = wait_for(Duration::from_secs(10), || {
        log_of(&c.servers[i1].0).lines().find(|l| l.contains("self-fencing")).map(str::to_string)
    })
    .unwrap_or_else(|| panic!("ms1 did not log its self-fence:\n{}", log_of(&c.servers[i1].0)));
    let t_fence_seen = cut.elapsed();
    // ms2 declares it Down; the agent reconnects to ms2.
    let (mut t_down, mut t_hosts) = (None, None);
    wait_for(Duration::from_secs(15), || {
        if t_down.is_none() && ms_state(&c, "ms1").as_deref() == Some("Down") {
            t_down = Some(cut.elapsed());
        }
        if t_hosts.is_none() {
            let hs = hosts(&c);
            if hs.len() == 4 && hs.iter().all(|h| h["state"] == "Up" && h["managementserverid"] == "ms2") {
                t_hosts = Some(cut.elapsed());
            }
        }
        (t_down.is_some() && t_hosts.is_some()).then_some(())
    });
    let t_down = t_down.unwrap_or_else(|| panic!("ms2 did not declare ms1 Down: {:?}", ms_list(&c)));
    let t_hosts = t_hosts.unwrap_or_else(|| panic!("hosts not Up on ms2: {:?}", hosts(&c)));
    let fence_ms = log_ts_ms(&fence_line).expect("timestamp") - cut_ms;
    // The state changes first (one conditional UPDATE), the takeover and its log line follow.
    let down_line = wait_for(Duration::from_secs(10), || {
        log_of(&c.servers[i2].0)
            .lines()
            .find(|l| l.contains("declared Down") && l.contains("peer=ms1"))
            .map(str::to_string)
    })
    .expect("ms2 logs the Down declaration");
    let down_ms = log_ts_ms(&down_line).expect("timestamp") - cut_ms;
    eprintln!(
        "partition ({how:?}): ms1 self-fenced {fence_ms} ms after the cut (seen after {:.2} s); ms2 declared it Down \
         {down_ms} ms after the cut (seen after {:.2} s); 4 hosts Up on ms2 after {:.2} s",
        t_fence_seen.as_secs_f64(),
        t_down.as_secs_f64(),
        t_hosts.as_secs_f64()
    );
    // Invariant 3: fenced before the takeover deadline (its last renewal, on the database clock,
    // plus the threshold), whenever a peer actually looked.
    let last_hb = last_heartbeat_ms(&c, "ms1");
    let fence_after_renewal = fence_ms + cut_ms - last_hb;
    eprintln!(
        "partition ({how:?}): ms1's last renewal {} ms before the cut; self-fence {fence_after_renewal} ms after \
         it; takeover deadline {threshold} ms after it",
        cut_ms - last_hb
    );
    assert!(
        fence_after_renewal < threshold,
        "ms1 self-fenced {fence_after_renewal} ms after its last heartbeat renewal, after the takeover deadline \
         ({threshold} ms): peers may take its work while it still acts"
    );
    assert!(fence_ms < down_ms, "ms1 fenced ({fence_ms} ms) before ms2 took over ({down_ms} ms)");
    assert!(t_hosts < Duration::from_secs(5), "agents back on a live server within 5 s: took {t_hosts:?}");
    wait_for(Duration::from_secs(10), || {
        let ev = c.ok("listEvents", &[("type", "MANAGEMENT.SERVER.DOWN")]);
        ev["event"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["description"].as_str().unwrap_or("").contains("server ms1 ")))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no MANAGEMENT.SERVER.DOWN event for ms1: {}", c.ok("listEvents", &[])));

    // VM operations through ms2 work: a new VM, and a stop of a VM started by ms1.
    let (post_vm, post_job) = deploy(&c, "post1");
    let j = c.wait_job(&post_job);
    assert_eq!(j["jobstatus"], 1, "deploy through ms2 after the partition: {j}");
    assert_eq!(c.vm(&post_vm)["state"], "Running");
    let r = c.ok("stopVirtualMachine", &[("id", &pre_vm)]);
    let j = c.wait_job(r["jobid"].as_str().unwrap());
    assert_eq!(j["jobstatus"], 1, "stop through ms2 of a VM started by ms1: {j}");
    let j = c.wait_job(&inflight_job);
    assert_final_shape(&j);
    assert_eq!(j["jobstatus"], 1, "the deploy ms1 accepted before the partition: {j}");
    assert_eq!(c.vm(&inflight_vm)["state"], "Running");

    // Fencing by generation: nothing executed with ms1's generation once ms2 held the hosts.
    let check_generations = |c: &Cloud| -> (usize, Value) {
        let sessions = agent_sessions(c);
        let first_ms2 = sessions.iter().find(|s| s.ms_id == "ms2").expect("the agent registered with ms2");
        let mut old: HashMap<String, u64> = HashMap::new();
        for s in sessions.iter().filter(|s| s.ms_id == "ms1") {
            for (h, g) in &s.grants {
                let e = old.entry(h.clone()).or_default();
                *e = (*e).max(*g);
            }
        }
        assert_eq!(first_ms2.grants.len(), 4, "{first_ms2:?}");
        let mut stale = 0;
        let mut inflight_old = Value::Null;
        for e in c.ledger_entries() {
            let host = e["host"].as_str().unwrap_or("");
            let generation = e["generation"].as_u64().unwrap_or(0);
            let (g1, g2) = (old.get(host).copied().unwrap_or(0), first_ms2.grants[host]);
            assert!(g2 > g1, "ms2's generation for {host} ({g2}) is above ms1's ({g1})");
            if e["kind"] == "stale" {
                stale += 1;
            }
            if e["kind"] == "exec" && e["ts_ms"].as_i64().unwrap_or(0) >= first_ms2.ts_ms {
                assert!(generation >= g2, "executed with an old generation after ms2 took the host over: {e}");
            }
            if e["job"] == inflight_job.as_str() && generation <= g1 {
                inflight_old = e.clone();
            }
        }
        // ms1's StartVm for inflight1 (sent before the cut) reached the agent: executed before
        // ms2's grant, or refused as stale after it.
        let ts = inflight_old["ts_ms"].as_i64().unwrap_or(0);
        match inflight_old["kind"].as_str() {
            Some("exec") => assert!(ts < first_ms2.ts_ms, "{inflight_old}"),
            Some("stale") => assert!(ts >= first_ms2.ts_ms, "{inflight_old}"),
            _ => panic!("ms1's command for {inflight_job} is not in the ledger: {inflight_old}"),
        }
        (stale, inflight_old)
    };
    let (stale, inflight_old) = check_generations(&c);
    c.assert_ledger_invariants();

    // Heal: ms1 sees it was marked Down and exits (219) rather than acting again.
    let healed = Instant::now();
    proxy.heal();
    let st = c.servers[i1].0.wait_exit(Duration::from_secs(15));
    let log1 = log_of(&c.servers[i1].0);
    let st = st.unwrap_or_else(|| panic!("ms1 kept running after the partition healed:\n{log1}"));
    assert_eq!(st.code(), Some(219), "ms1 exits with 219 (replaced/marked Down): {st:?}\n{log1}");
    assert!(log1.contains("marked Down"), "ms1 says why it stops:\n{log1}");
    eprintln!("partition ({how:?}): healed; ms1 exited with 219 after {:.2} s", healed.elapsed().as_secs_f64());
    // Nothing changed hands while ms1 was on its way out.
    let hs = hosts(&c);
    assert!(hs.iter().all(|h| h["state"] == "Up" && h["managementserverid"] == "ms2"), "{hs:?}");
    assert_eq!(agent_sessions(&c).iter().filter(|s| s.ms_id == "ms1").count(), 1, "the agent never went back to ms1");
    check_generations(&c);
    c.assert_ledger_invariants();
    eprintln!(
        "partition ({how:?}): {stale} stale-generation refusal(s) in the ledger; ms1's in-flight StartVm: {} {} ms \
         after the cut",
        inflight_old["kind"],
        inflight_old["ts_ms"].as_i64().unwrap_or(0) - cut_ms
    );
}

mod partition_self_fences {
    #[test]
    fn mysql_blackhole() {
        super::partition_self_fences(super::Cut::Blackhole, None)
    }
    #[test]
    fn mysql_refuse() {
        super::partition_self_fences(super::Cut::Refuse, None)
    }
    /// CloudStack's own default heartbeat interval (1500 ms) with Skyhold's threshold (2500 ms):
    /// refused (it would leave no room to renew before the self-fence), or fenced in time.
    #[test]
    fn mysql_heartbeat_interval_1500() {
        super::partition_self_fences(super::Cut::Blackhole, Some("1500"))
    }
    /// The slowest accepted interval for the default threshold: the self-fence still comes first.
    #[test]
    fn mysql_heartbeat_interval_600() {
        super::partition_self_fences(super::Cut::Blackhole, Some("600"))
    }
}
