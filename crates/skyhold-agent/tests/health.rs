//! Host health through the real agent loop: a fake management server over real TCP (it welcomes
//! every agent, answers pings, routes commands by host guid, and can "go away"), real files for the
//! shared storage and the control directory. Waits are on messages, pings, heartbeat files and ledger
//! lines, each with a deadline; nothing sleeps for a fixed time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use skyhold_agent::{AgentConfig, CRASH_DIR, FailRule, ISOLATE_FILE, LedgerEntry, LedgerKind, ledger_read, run};
use skyhold_proto::{
    AgentMsg, Command, CommandResult, HostGrant, HostPing, HostReport, MsMsg, PowerState, read_msg, write_msg,
};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);
const PING_MS: u64 = 100;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Poll `f` until it returns `Some`, at most [`WAIT`].
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- fake management server

#[derive(Default)]
struct State {
    /// Writer of the connection that registered each host guid.
    conns: HashMap<String, mpsc::UnboundedSender<MsMsg>>,
    /// Latest ping of each host.
    pings: HashMap<String, HostPing>,
    answers: HashMap<u64, CommandResult>,
    /// Every Hello: (wall clock ms, agent id, hosts).
    hellos: Vec<(u64, String, Vec<HostReport>)>,
    /// Wall clock ms of every Welcome sent.
    welcomes: Vec<u64>,
}

struct FakeMs {
    addr: String,
    state: Arc<Mutex<State>>,
    /// Bumped on every change of `state`.
    changed: watch::Receiver<u64>,
    /// `false`: the server is "gone" (connections are dropped, new ones closed at once).
    open: watch::Sender<bool>,
    _task: JoinHandle<()>,
    next_req: u64,
}

impl FakeMs {
    async fn start() -> FakeMs {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let (bump, changed) = watch::channel(0u64);
        let (open, open_rx) = watch::channel(true);
        let bump = Arc::new(bump);
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else { continue };
                if !*open_rx.borrow() {
                    drop(sock);
                    continue;
                }
                conns.spawn(serve_conn(sock, Arc::clone(&st), Arc::clone(&bump), open_rx.clone()));
            }
        });
        FakeMs { addr, state, changed, open, _task: task, next_req: 1 }
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    /// Wait until `f` over the state returns `Some`.
    async fn until<T>(&mut self, what: &str, mut f: impl FnMut(&State) -> Option<T>) -> T {
        let res = timeout(WAIT, async {
            loop {
                if let Some(v) = f(&self.state.lock().unwrap()) {
                    return v;
                }
                self.changed.changed().await.unwrap();
            }
        })
        .await;
        res.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    /// A ping of `guid` received after this call that satisfies `pred`.
    async fn ping_where(&mut self, guid: &str, pred: impl Fn(&HostPing) -> bool) -> HostPing {
        self.state.lock().unwrap().pings.remove(guid);
        let guid = guid.to_owned();
        self.until(&format!("a ping of {guid}"), |s| s.pings.get(&guid).filter(|p| pred(p)).cloned()).await
    }

    async fn command(&mut self, host: &str, cmd: Command) -> CommandResult {
        let req = self.next_req;
        self.next_req += 1;
        let job = format!("job-{req}");
        self.command_as(host, &job, 1, req, cmd).await
    }

    async fn command_as(&mut self, host: &str, job: &str, step: u32, req: u64, cmd: Command) -> CommandResult {
        let tx = self.until(&format!("a connection of {host}"), |s| s.conns.get(host).cloned()).await;
        let msg =
            MsMsg::Command { req, host_guid: host.into(), generation: 1, job_id: job.into(), step, cmd: cmd.clone() };
        tx.send(msg).unwrap();
        self.until(&format!("the answer to {cmd:?}"), |s| s.answers.get(&req).cloned()).await
    }

    /// Hellos received so far.
    fn hellos(&self) -> usize {
        self.state.lock().unwrap().hellos.len()
    }

    /// The next Hello after the first `seen`.
    async fn hello_after(&mut self, seen: usize) -> (u64, String, Vec<HostReport>) {
        self.until("a Hello", |s| s.hellos.get(seen).cloned()).await
    }
}

async fn serve_conn(
    sock: TcpStream,
    st: Arc<Mutex<State>>,
    bump: Arc<watch::Sender<u64>>,
    mut open: watch::Receiver<bool>,
) {
    let changed = || bump.send_modify(|v| *v += 1);
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let Ok(Ok(AgentMsg::Hello { agent_id, hosts, .. })) = timeout(WAIT, read_msg(&mut rd, &mut buf)).await else {
        return;
    };
    let guids: Vec<String> = hosts.iter().map(|h| h.guid.clone()).collect();
    st.lock().unwrap().hellos.push((now_ms(), agent_id, hosts));
    changed();
    if !*open.borrow() {
        return;
    }
    let grants =
        guids.iter().map(|g| HostGrant { guid: g.clone(), host_id: format!("id-{g}"), generation: 1 }).collect();
    let welcome = MsMsg::Welcome { ms_id: "fake".into(), hosts: grants, ping_interval_ms: PING_MS, mgmt_addrs: vec![] };
    st.lock().unwrap().welcomes.push(now_ms());
    if write_msg(&mut wr, &welcome).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<MsMsg>();
    {
        let mut s = st.lock().unwrap();
        for g in &guids {
            s.conns.insert(g.clone(), tx.clone());
        }
    }
    changed();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut wr, &m).await.is_err() {
                return;
            }
        }
    });
    let reader_st = Arc::clone(&st);
    let reader_bump = Arc::clone(&bump);
    tasks.spawn(async move {
        while let Ok(msg) = read_msg::<_, AgentMsg>(&mut rd, &mut buf).await {
            let mut s = reader_st.lock().unwrap();
            match msg {
                AgentMsg::Ping { hosts } => {
                    for p in hosts {
                        s.pings.insert(p.guid.clone(), p);
                    }
                    let _ = tx.send(MsMsg::Pong);
                }
                AgentMsg::Answer { req, result } => {
                    s.answers.insert(req, result);
                }
                AgentMsg::Hello { .. } => return,
            }
            drop(s);
            reader_bump.send_modify(|v| *v += 1);
        }
    });
    tokio::select! {
        _ = tasks.join_next() => {}
        _ = open.wait_for(|o| !*o) => {}
    }
    {
        let mut s = st.lock().unwrap();
        for g in &guids {
            s.conns.remove(g);
        }
    }
    changed();
}

// ---------------------------------------------------------------- agents and files

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("primary")).unwrap();
        Files { dir }
    }
    fn primary(&self) -> PathBuf {
        self.dir.path().join("primary")
    }
    /// A host's mount of the primary storage: a symlink to it.
    fn mount(&self, name: &str) -> PathBuf {
        let link = self.dir.path().join(format!("mnt-{name}"));
        if !link.exists() {
            std::os::unix::fs::symlink(self.primary(), &link).unwrap();
        }
        link
    }
    fn cut(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(format!("mnt-{name}"))).unwrap();
    }
    fn control(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(format!("control-{name}"));
        std::fs::create_dir_all(d.join(CRASH_DIR)).unwrap();
        d
    }
    fn ledger(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("ledger-{name}.jsonl"))
    }
    fn counter(&self, guid: &str) -> Option<u64> {
        std::fs::read_to_string(self.primary().join("heartbeat").join(guid)).ok()?.trim().parse().ok()
    }
    fn entries(&self, name: &str) -> Vec<LedgerEntry> {
        ledger_read(self.ledger(name)).unwrap_or_default()
    }
}

/// Agent `name` with 2 hosts, its own mount, control directory and ledger. Heartbeat every 50 ms.
fn config(ms: &FakeMs, files: &Files, name: &str) -> AgentConfig {
    AgentConfig {
        mgmt_addrs: vec![ms.addr.clone()],
        token: "t".into(),
        agent_id: name.into(),
        hosts: 2,
        host_cpu_cores: 8,
        host_mem_mb: 8192,
        ledger_path: Some(files.ledger(name)),
        storage: Some(files.mount(name)),
        heartbeat_interval_ms: 50,
        storage_timeout_ms: 400,
        self_fence_after_ms: 5000,
        control_dir: Some(files.control(name)),
        ..AgentConfig::default()
    }
}

struct RunningAgent {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), skyhold_agent::AgentError>>,
}

fn spawn_agent(cfg: AgentConfig) -> RunningAgent {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    RunningAgent { stop, task }
}

impl RunningAgent {
    async fn shutdown(self) {
        self.stop.send(()).unwrap();
        timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn start(vm: &str) -> Command {
    Command::StartVm { vm_id: vm.into(), name: format!("name-{vm}"), cpu: 1, mem_mb: 256 }
}

const RUNNING: CommandResult = CommandResult::Ok { state: PowerState::Running };
const STOPPED: CommandResult = CommandResult::Ok { state: PowerState::Stopped };

fn vm_ids(p: &HostPing) -> Vec<&str> {
    p.vms.iter().map(|v| v.vm_id.as_str()).collect()
}

fn events(entries: &[LedgerEntry], kind: LedgerKind) -> Vec<(String, String)> {
    entries.iter().filter(|e| e.kind == kind).map(|e| (e.host.clone(), e.vm.clone())).collect()
}

/// The invariant `check_ledger` (skyhold crate tests) enforces: no VM runs on two hosts at once, and
/// every (job, step) is executed at most once.
fn check_ledger(entries: &[LedgerEntry]) {
    let mut seen = std::collections::HashSet::new();
    let mut running: HashMap<&str, &str> = HashMap::new();
    for e in entries {
        if e.kind == LedgerKind::Exec {
            assert!(seen.insert((&e.job, e.step)), "executed twice: {e:?}");
        }
        let effective = match e.kind {
            LedgerKind::Exec => e.outcome == "ok",
            LedgerKind::Replay | LedgerKind::Stale | LedgerKind::UnknownHost => false,
            _ => true,
        };
        match (effective, e.state) {
            (true, Some(PowerState::Running)) => {
                if let Some(h) = running.insert(&e.vm, &e.host) {
                    assert_eq!(h, e.host, "{} runs on two hosts: {e:?}", e.vm);
                }
            }
            (true, Some(PowerState::Stopped)) if running.get(e.vm.as_str()) == Some(&e.host.as_str()) => {
                running.remove(e.vm.as_str());
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn heartbeat_files_advance_and_reach_pings() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let agent = spawn_agent(config(&ms, &files, "ag1"));

    let (_, _, hosts) = ms.hello_after(0).await;
    // The first heartbeat is written before the first Hello.
    let first = files.counter("ag1-h1").expect("heartbeat written before registering");
    assert!(first >= 1);
    let canonical = std::fs::canonicalize(files.primary()).unwrap().display().to_string();
    for h in &hosts {
        assert_eq!(h.storage.as_deref(), Some(canonical.as_str()));
        let addr = h.check_addr.clone().expect("check address");
        assert!(TcpStream::connect(&addr).await.is_ok(), "check listener at {addr}");
    }
    let later = wait_for("the heartbeat to advance", || files.counter("ag1-h1").filter(|c| *c >= first + 3)).await;
    let p = ms.ping_where("ag1-h1", |p| p.heartbeat.is_some_and(|h| h >= later)).await;
    assert!(p.storage_ok && !p.fenced, "{p:?}");
    agent.shutdown().await;
}

#[tokio::test]
async fn storage_cut_stops_vms_refuses_starts_and_recovers() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let agent = spawn_agent(config(&ms, &files, "ag1"));
    for (host, vm) in [("ag1-h0", "vm-1"), ("ag1-h0", "vm-2"), ("ag1-h1", "vm-3")] {
        assert_eq!(ms.command(host, start(vm)).await, RUNNING);
    }

    let cut_at = now_ms();
    files.cut("ag1");
    let p = ms.ping_where("ag1-h0", |p| !p.storage_ok).await;
    assert_eq!(p.heartbeat, None);
    let lost = wait_for("storage_lost entries", || {
        let l = events(&files.entries("ag1"), LedgerKind::StorageLost);
        (l.len() == 3).then_some(l)
    })
    .await;
    let want: Vec<(String, String)> =
        [("ag1-h0", "vm-1"), ("ag1-h0", "vm-2"), ("ag1-h1", "vm-3")].map(|(h, v)| (h.into(), v.into())).to_vec();
    assert_eq!(lost, want);
    // Not before the timeout (counted from the last successful write, at most one interval before the cut).
    let entries = files.entries("ag1");
    for e in entries.iter().filter(|e| e.kind == LedgerKind::StorageLost) {
        // (Slack for a late tick: the timeout counts from the start of the last successful write.)
        assert!(e.ts_ms + 200 >= cut_at + 400, "stopped {} ms after the cut", e.ts_ms.saturating_sub(cut_at));
        assert_eq!((e.op.as_str(), e.state, e.outcome.as_str()), ("storage_lost", Some(PowerState::Stopped), "ok"));
    }
    let p = ms.ping_where("ag1-h0", |_| true).await;
    assert!(p.vms.is_empty(), "{p:?}");
    let refused = CommandResult::Failed { message: "primary storage unavailable".into() };
    assert_eq!(skyhold_agent::STORAGE_UNAVAILABLE, "primary storage unavailable");
    assert_eq!(ms.command("ag1-h0", start("vm-1")).await, refused);
    assert_eq!(ms.command("ag1-h1", start("vm-4")).await, refused);

    // The link returns: the next write succeeds, starts are accepted again.
    files.mount("ag1");
    let p = ms.ping_where("ag1-h0", |p| p.storage_ok).await;
    assert!(p.heartbeat.is_some());
    assert_eq!(ms.command("ag1-h0", start("vm-1")).await, RUNNING);
    let entries = files.entries("ag1");
    assert!(events(&entries, LedgerKind::SelfFence).is_empty(), "the management server was there all along");
    check_ledger(&entries);
    agent.shutdown().await;
}

#[tokio::test]
async fn self_fence_when_management_server_and_storage_are_gone() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let mut cfg = config(&ms, &files, "ag1");
    cfg.storage_timeout_ms = 60_000; // only the self-fence acts here
    cfg.self_fence_after_ms = 600;
    let agent = spawn_agent(cfg);
    for (host, vm) in [("ag1-h0", "vm-1"), ("ag1-h1", "vm-2")] {
        assert_eq!(ms.command(host, start(vm)).await, RUNNING);
    }

    let gone_at = now_ms();
    ms.set_open(false);
    files.cut("ag1");
    let fenced = wait_for("self_fence entries", || {
        let l = events(&files.entries("ag1"), LedgerKind::SelfFence);
        (l.len() == 2).then_some(l)
    })
    .await;
    assert_eq!(fenced, [("ag1-h0".to_owned(), "vm-1".to_owned()), ("ag1-h1".to_owned(), "vm-2".to_owned())]);
    let entries = files.entries("ag1");
    for e in entries.iter().filter(|e| e.kind == LedgerKind::SelfFence) {
        // Not before the period (both clocks were fresh, within a ping interval, when it went away).
        // (Slack: the last Pong and write came up to a ping interval or a tick before, plus scheduling.)
        assert!(e.ts_ms + 300 >= gone_at + 600, "fenced {} ms after", e.ts_ms.saturating_sub(gone_at));
    }

    // The management server comes back: the fence precedes the reconnection.
    let seen = ms.hellos();
    ms.set_open(true);
    let (_, _, hosts) = ms.hello_after(seen).await;
    assert!(hosts.iter().all(|h| h.vms.is_empty()), "{hosts:?}");
    let welcome_at = ms.until("a Welcome", |s| s.welcomes.last().copied()).await;
    let last_fence = files.entries("ag1").iter().filter(|e| e.kind == LedgerKind::SelfFence).map(|e| e.ts_ms).max();
    assert!(last_fence.unwrap() <= welcome_at);
    let p = ms.ping_where("ag1-h1", |_| true).await;
    assert!(p.fenced && p.vms.is_empty() && !p.storage_ok, "{p:?}");
    // Commands work again (the storage is still cut, but its timeout has not run out).
    assert_eq!(ms.command("ag1-h0", start("vm-1")).await, RUNNING);
    // Still reported on this connection (acknowledged by Pongs meanwhile)...
    let p = ms.ping_where("ag1-h0", |_| true).await;
    assert!(p.fenced);
    // ... and cleared by the next connection's Welcome.
    ms.set_open(false);
    ms.until("the connection to drop", |s| (!s.conns.contains_key("ag1-h0")).then_some(())).await;
    let seen = ms.hellos();
    ms.set_open(true);
    ms.hello_after(seen).await;
    ms.ping_where("ag1-h0", |p| !p.fenced).await;
    let entries = files.entries("ag1");
    assert_eq!(events(&entries, LedgerKind::SelfFence).len(), 2, "fenced once");
    check_ledger(&entries);
    agent.shutdown().await;
}

#[tokio::test]
async fn no_self_fence_when_only_the_management_server_is_gone() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let mut cfg = config(&ms, &files, "ag1");
    cfg.self_fence_after_ms = 300;
    let agent = spawn_agent(cfg);
    assert_eq!(ms.command("ag1-h0", start("vm-1")).await, RUNNING);

    ms.set_open(false);
    // Heartbeats keep being written for well over three self-fence periods.
    let c0 = files.counter("ag1-h0").unwrap();
    wait_for("20 more heartbeats", || files.counter("ag1-h0").filter(|c| *c >= c0 + 20)).await;
    let seen = ms.hellos();
    ms.set_open(true);
    let (_, _, hosts) = ms.hello_after(seen).await;
    assert_eq!(hosts[0].vms.len(), 1, "still running: {hosts:?}");
    let p = ms.ping_where("ag1-h0", |_| true).await;
    assert_eq!((vm_ids(&p), p.fenced, p.storage_ok), (vec!["vm-1"], false, true));
    let entries = files.entries("ag1");
    assert!(events(&entries, LedgerKind::SelfFence).is_empty());
    assert!(events(&entries, LedgerKind::StorageLost).is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn check_host_answers() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let a1 = spawn_agent(config(&ms, &files, "ag1"));
    let a2 = spawn_agent(config(&ms, &files, "ag2"));
    let addr_of = |ms: &FakeMs, agent: &str| -> Option<String> {
        let s = ms.state.lock().unwrap();
        s.hellos.iter().find(|(_, a, _)| a == agent).and_then(|(_, _, h)| h[0].check_addr.clone())
    };
    ms.until("both agents", |s| (s.conns.contains_key("ag1-h0") && s.conns.contains_key("ag2-h0")).then_some(())).await;
    let ag2_addr = addr_of(&ms, "ag2").unwrap();
    let check = |addr: Option<&str>| Command::CheckHost { guid: "ag2-h0".into(), check_addr: addr.map(Into::into) };

    let CommandResult::HostCheck { reachable, heartbeat, storage_ok } =
        ms.command("ag1-h0", check(Some(&ag2_addr))).await
    else {
        panic!("not a host check")
    };
    assert_eq!((reachable, storage_ok), (Some(true), true));
    assert!(heartbeat.unwrap() >= 1);
    // No address: reachability unknown.
    let r = ms.command("ag1-h0", check(None)).await;
    assert!(matches!(r, CommandResult::HostCheck { reachable: None, heartbeat: Some(_), storage_ok: true }), "{r:?}");
    // A host that never wrote a heartbeat.
    let r = ms.command("ag1-h1", Command::CheckHost { guid: "nobody".into(), check_addr: None }).await;
    assert_eq!(r, CommandResult::HostCheck { reachable: None, heartbeat: None, storage_ok: true });

    // Isolate ag2 from its neighbours: its check listener closes; its heartbeat still advances.
    let control = files.control("ag2");
    std::fs::write(control.join(ISOLATE_FILE), "").unwrap();
    // (The listener looks at the file every 100 ms; between tries, wait for a ping of ag2.)
    let mut tries = 0;
    let before = loop {
        match ms.command("ag1-h0", check(Some(&ag2_addr))).await {
            CommandResult::HostCheck { reachable: Some(false), heartbeat, storage_ok: true } => {
                break heartbeat.unwrap();
            }
            CommandResult::HostCheck { reachable: Some(true), .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        tries += 1;
        assert!(tries < 100, "isolation never took effect");
        ms.ping_where("ag2-h0", |_| true).await;
    };
    wait_for("ag2's heartbeat to advance", || files.counter("ag2-h0").filter(|c| *c > before)).await;
    let r = ms.command("ag1-h0", check(Some(&ag2_addr))).await;
    assert!(
        matches!(r, CommandResult::HostCheck { reachable: Some(false), heartbeat: Some(h), storage_ok: true } if h > before),
        "{r:?}"
    );
    std::fs::remove_file(control.join(ISOLATE_FILE)).unwrap();
    let mut tries = 0;
    while !matches!(
        ms.command("ag1-h0", check(Some(&ag2_addr))).await,
        CommandResult::HostCheck { reachable: Some(true), .. }
    ) {
        tries += 1;
        assert!(tries < 100, "listener never reopened");
        ms.ping_where("ag2-h0", |_| true).await;
    }

    // A checker cut off from the storage says so; its answer about the heartbeat means nothing.
    files.cut("ag1");
    let r = ms.command("ag1-h0", check(None)).await;
    assert_eq!(r, CommandResult::HostCheck { reachable: None, heartbeat: None, storage_ok: false });
    // A repeated (job, step) is replayed, not probed again.
    let again = ms.command_as("ag1-h0", "job-1", 1, 9999, check(None)).await;
    assert!(matches!(again, CommandResult::HostCheck { reachable: Some(true), storage_ok: true, .. }), "{again:?}");
    let entries = files.entries("ag1");
    let first = entries.iter().find(|e| e.op == "check_host").unwrap();
    assert_eq!((first.kind, first.vm.as_str(), first.outcome.as_str()), (LedgerKind::Exec, "", "host_check"));
    assert!(entries.iter().any(|e| e.op == "check_host" && e.kind == LedgerKind::Replay));
    check_ledger(&entries);
    a1.shutdown().await;
    a2.shutdown().await;
}

#[tokio::test]
async fn live_migration_and_fail_rules() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let mut cfg = config(&ms, &files, "ag1");
    cfg.host_cpu_cores = 2;
    cfg.fail_rules =
        vec![FailRule::parse("migrate_out=pinned").unwrap(), FailRule::parse("migrate_abort=sticky").unwrap()];
    let agent = spawn_agent(cfg);
    let out = |vm: &str| Command::MigrateOut { vm_id: vm.into() };
    let done = |vm: &str| Command::MigrateDone { vm_id: vm.into() };
    let abort = |vm: &str| Command::MigrateAbort { vm_id: vm.into() };
    let big = |vm: &str, name: &str| Command::StartVm { vm_id: vm.into(), name: name.into(), cpu: 2, mem_mb: 512 };

    // h0 -> h1, completed.
    assert_eq!(ms.command("ag1-h0", big("vm-1", "web-1")).await, RUNNING);
    assert_eq!(ms.command("ag1-h0", out("vm-1")).await, STOPPED);
    let p = ms.ping_where("ag1-h0", |_| true).await;
    assert!(p.vms.is_empty(), "paused VMs do not run: {p:?}");
    let full = ms.command("ag1-h0", big("vm-x", "other")).await;
    assert!(
        matches!(&full, CommandResult::Failed { message } if message.contains("insufficient capacity")),
        "{full:?}"
    );
    assert_eq!(ms.command("ag1-h1", big("vm-1", "web-1")).await, RUNNING);
    assert_eq!(ms.command("ag1-h0", done("vm-1")).await, STOPPED);
    assert_eq!(ms.command("ag1-h0", big("vm-x", "other")).await, RUNNING, "capacity freed by migrate_done");

    // h1 -> (destination refused) -> aborted: resumes on h1.
    assert_eq!(ms.command("ag1-h1", out("vm-1")).await, STOPPED);
    assert_eq!(ms.command("ag1-h1", abort("vm-1")).await, RUNNING);
    let p = ms.ping_where("ag1-h1", |_| true).await;
    assert_eq!(vm_ids(&p), ["vm-1"]);

    // Fail rules.
    assert_eq!(ms.command("ag1-h1", Command::StopVm { vm_id: "vm-1".into(), force: false }).await, STOPPED);
    assert_eq!(ms.command("ag1-h1", big("vm-p", "pinned-1")).await, RUNNING);
    let r = ms.command("ag1-h1", out("vm-p")).await;
    assert_eq!(r, CommandResult::Failed { message: "simulated failure injected for migrate_out of pinned-1".into() });
    assert_eq!(vm_ids(&ms.ping_where("ag1-h1", |_| true).await), ["vm-p"]);
    assert_eq!(ms.command("ag1-h1", Command::DestroyVm { vm_id: "vm-p".into() }).await, STOPPED);
    assert_eq!(ms.command("ag1-h1", big("vm-s", "sticky-1")).await, RUNNING);
    assert_eq!(ms.command("ag1-h1", out("vm-s")).await, STOPPED);
    let r = ms.command("ag1-h1", abort("vm-s")).await;
    assert_eq!(r, CommandResult::Failed { message: "simulated failure injected for migrate_abort of sticky-1".into() });
    assert_eq!(ms.command("ag1-h1", done("vm-s")).await, STOPPED);

    let entries = files.entries("ag1");
    let ops: Vec<&str> = entries.iter().filter(|e| e.vm == "vm-1").map(|e| e.op.as_str()).collect();
    assert_eq!(ops, ["start", "migrate_out", "start", "migrate_done", "migrate_out", "migrate_abort", "stop"]);
    check_ledger(&entries);
    agent.shutdown().await;
}

#[tokio::test]
async fn crash_file_stops_the_vm() {
    let files = Files::new();
    let mut ms = FakeMs::start().await;
    let agent = spawn_agent(config(&ms, &files, "ag1"));
    assert_eq!(ms.command("ag1-h1", start("vm-1")).await, RUNNING);
    assert_eq!(ms.command("ag1-h1", start("vm-2")).await, RUNNING);
    let crash: &Path = &files.control("ag1").join(CRASH_DIR);
    std::fs::write(crash.join("vm-1"), "").unwrap();
    std::fs::write(crash.join("vm-elsewhere"), "").unwrap();

    let p = ms.ping_where("ag1-h1", |p| p.vms.len() == 1).await;
    assert_eq!(vm_ids(&p), ["vm-2"]);
    let entries = files.entries("ag1");
    let crashed: Vec<&LedgerEntry> = entries.iter().filter(|e| e.kind == LedgerKind::Crash).collect();
    assert_eq!(crashed.len(), 1);
    let e = crashed[0];
    assert_eq!((e.host.as_str(), e.vm.as_str(), e.op.as_str()), ("ag1-h1", "vm-1", "crash"));
    assert_eq!(e.state, Some(PowerState::Stopped));
    assert!(!crash.join("vm-1").exists(), "the crash file is consumed");
    assert!(crash.join("vm-elsewhere").exists(), "a VM this agent does not run is left alone");
    // The crashed VM can be started again.
    assert_eq!(ms.command("ag1-h1", start("vm-1")).await, RUNNING);
    check_ledger(&files.entries("ag1"));
    agent.shutdown().await;
}
