//! The agent against a tiny fake management server on 127.0.0.1 (test scaffolding for this crate
//! only: the real MS is tested elsewhere). All waits are on messages, each with a timeout.

use std::path::PathBuf;
use std::time::Duration;

use skyhold_agent::{AgentConfig, LedgerKind, ledger_read, run};
use skyhold_proto::{
    AgentMsg, Command, CommandResult, HostGrant, HostPing, HostReport, MsMsg, PROTO_VERSION, PowerState, ProtoError,
    VmReport, read_msg, write_msg,
};
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(3);

fn config(addrs: Vec<String>, ledger: Option<PathBuf>) -> AgentConfig {
    AgentConfig {
        mgmt_addrs: addrs,
        token: "join-token".into(),
        agent_id: "ag1".into(),
        hosts: 2,
        host_cpu_cores: 4,
        host_cpu_mhz: 2000,
        host_mem_mb: 8192,
        ledger_path: ledger,
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

/// The MS side of one agent connection.
struct MsConn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    buf: Vec<u8>,
    pings: Vec<Vec<HostPing>>,
    pong: bool,
}

impl MsConn {
    async fn accept(l: &TcpListener) -> MsConn {
        let (sock, _) = timeout(WAIT, l.accept()).await.unwrap().unwrap();
        let (rd, wr) = sock.into_split();
        MsConn { rd: BufReader::new(rd), wr, buf: Vec::new(), pings: Vec::new(), pong: true }
    }

    async fn send(&mut self, m: &MsMsg) {
        write_msg(&mut self.wr, m).await.unwrap();
    }

    async fn recv(&mut self) -> Result<AgentMsg, ProtoError> {
        timeout(WAIT, read_msg(&mut self.rd, &mut self.buf)).await.expect("timed out waiting for the agent")
    }

    /// Next non-ping message; pings are recorded (and answered with Pong if `self.pong`).
    async fn recv_skip_pings(&mut self) -> AgentMsg {
        loop {
            match self.recv().await.unwrap() {
                AgentMsg::Ping { hosts } => self.on_ping(hosts).await,
                other => return other,
            }
        }
    }

    async fn on_ping(&mut self, hosts: Vec<HostPing>) {
        self.pings.push(hosts);
        if self.pong {
            self.send(&MsMsg::Pong).await;
        }
    }

    async fn hello(&mut self) -> Vec<HostReport> {
        match self.recv().await.unwrap() {
            AgentMsg::Hello { proto, token, agent_id, version, hosts } => {
                assert_eq!(proto, PROTO_VERSION);
                assert_eq!(token, "join-token");
                assert_eq!(agent_id, "ag1");
                assert!(!version.is_empty());
                hosts
            }
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    async fn welcome(&mut self, generation: u64, ping_interval_ms: u64, mgmt_addrs: Vec<String>) {
        let hosts = ["ag1-h0", "ag1-h1"]
            .iter()
            .map(|g| HostGrant { guid: (*g).into(), host_id: format!("id-{g}"), generation })
            .collect();
        self.send(&MsMsg::Welcome { ms_id: "ms-test".into(), hosts, ping_interval_ms, mgmt_addrs }).await;
    }

    async fn command(&mut self, req: u64, generation: u64, job: &str, cmd: Command) -> CommandResult {
        self.send(&MsMsg::Command { req, host_guid: "ag1-h0".into(), generation, job_id: job.into(), step: 1, cmd })
            .await;
        match self.recv_skip_pings().await {
            AgentMsg::Answer { req: r, result } => {
                assert_eq!(r, req);
                result
            }
            other => panic!("expected Answer, got {other:?}"),
        }
    }

    /// Wait for the next message, which must be a ping; return it.
    async fn next_ping(&mut self) -> Vec<HostPing> {
        match self.recv().await.unwrap() {
            AgentMsg::Ping { hosts } => {
                self.on_ping(hosts.clone()).await;
                hosts
            }
            other => panic!("expected Ping, got {other:?}"),
        }
    }
}

fn start_web1() -> Command {
    Command::StartVm { vm_id: "vm-1".into(), name: "web-1".into(), cpu: 2, mem_mb: 1024 }
}

const RUNNING: CommandResult = CommandResult::Ok { state: PowerState::Running };

fn vm1_running() -> Vec<VmReport> {
    vec![VmReport { vm_id: "vm-1".into(), state: PowerState::Running }]
}

#[tokio::test]
async fn register_command_replay_fence_ping_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let agent = spawn_agent(config(vec![addr.clone()], Some(ledger.clone())));

    let mut ms = MsConn::accept(&listener).await;
    let hosts = ms.hello().await;
    let guids: Vec<&str> = hosts.iter().map(|h| h.guid.as_str()).collect();
    assert_eq!(guids, ["ag1-h0", "ag1-h1"]);
    assert!(hosts.iter().all(|h| h.vms.is_empty() && h.hypervisor == "Simulator"));
    assert_eq!((hosts[0].cpu_cores, hosts[0].mem_mb), (4, 8192));
    ms.welcome(5, 500, vec![addr.clone()]).await;
    // The first message after Welcome is a report of the hosts' VMs (it takes them from
    // Connecting to Up), sent at once rather than after a ping interval.
    let first = tokio::time::timeout(Duration::from_millis(400), ms.next_ping()).await.unwrap();
    assert_eq!(first.len(), 2);

    // Execute, then the same (job, step) again: replayed, not executed twice.
    assert_eq!(ms.command(1, 5, "job-1", start_web1()).await, RUNNING);
    assert_eq!(ms.command(2, 5, "job-1", start_web1()).await, RUNNING);
    // A deposed MS (older generation) is refused; the VM keeps running.
    let stop = Command::StopVm { vm_id: "vm-1".into(), force: true };
    assert_eq!(ms.command(3, 4, "job-2", stop).await, CommandResult::StaleGeneration { current: 5 });
    // Unknown host.
    ms.send(&MsMsg::Command {
        req: 4,
        host_guid: "someone-else".into(),
        generation: 5,
        job_id: "job-3".into(),
        step: 1,
        cmd: Command::CheckVm { vm_id: "vm-1".into() },
    })
    .await;
    assert_eq!(ms.recv_skip_pings().await, AgentMsg::Answer { req: 4, result: CommandResult::UnknownHost });

    // Pings arrive and report the running VM.
    let ping = ms.next_ping().await;
    assert_eq!(ping.len(), 2);
    assert_eq!(ping[0].guid, "ag1-h0");
    assert_eq!(ping[0].vms, vm1_running());
    assert!(ping[1].vms.is_empty());

    // The ledger is ground truth: one exec, one replay, one stale refusal.
    let entries = ledger_read(&ledger).unwrap();
    let kinds: Vec<(&str, LedgerKind)> = entries.iter().map(|e| (e.job.as_str(), e.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("job-1", LedgerKind::Exec),
            ("job-1", LedgerKind::Replay),
            ("job-2", LedgerKind::Stale),
            ("job-3", LedgerKind::UnknownHost),
        ]
    );
    let e = &entries[0];
    assert_eq!((e.agent.as_str(), e.host.as_str(), e.vm.as_str(), e.op.as_str()), ("ag1", "ag1-h0", "vm-1", "start"));
    assert_eq!((e.step, e.generation, e.outcome.as_str()), (1, 5, "ok"));
    assert_eq!(e.state, Some(PowerState::Running));
    assert_eq!(entries[2].outcome, "stale_generation");

    // The MS goes away: the agent reconnects and reports what it runs.
    drop(ms);
    let mut ms = MsConn::accept(&listener).await;
    let hosts = ms.hello().await;
    assert_eq!(hosts[0].vms, vm1_running());
    assert!(hosts[1].vms.is_empty());
    // A new owner (generation 6) fences the old generation out.
    ms.welcome(6, 500, vec![addr.clone()]).await;
    let check = Command::CheckVm { vm_id: "vm-1".into() };
    assert_eq!(ms.command(10, 6, "job-4", check.clone()).await, RUNNING);
    assert_eq!(ms.command(11, 5, "job-5", check).await, CommandResult::StaleGeneration { current: 6 });

    agent.shutdown().await;
}

#[tokio::test]
async fn refused_registration_is_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let agent = spawn_agent(config(vec![addr.clone()], None));

    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;
    ms.send(&MsMsg::Refused { reason: "bad token".into() }).await;
    // The agent closes that connection and comes back with a new Hello.
    assert!(matches!(ms.recv().await, Err(ProtoError::Closed)));
    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;
    ms.welcome(1, 200, vec![]).await;
    ms.next_ping().await;

    agent.shutdown().await;
}

#[tokio::test]
async fn silent_ms_is_treated_as_dead() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let agent = spawn_agent(config(vec![addr.clone()], None));

    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;
    ms.pong = false;
    ms.welcome(1, 50, vec![]).await;
    // Pings keep coming, nothing goes back; after 3 intervals the agent hangs up.
    let mut pings = 0;
    loop {
        match ms.recv().await {
            Ok(AgentMsg::Ping { .. }) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(ProtoError::Closed) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(pings >= 1, "expected pings before the agent gave up");
    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;

    agent.shutdown().await;
}

#[tokio::test]
async fn fails_over_to_address_learned_from_welcome() {
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = a.local_addr().unwrap().to_string();
    let b_addr = b.local_addr().unwrap().to_string();
    let agent = spawn_agent(config(vec![a_addr.clone()], None));

    let mut ms = MsConn::accept(&a).await;
    ms.hello().await;
    ms.welcome(1, 200, vec![a_addr.clone(), b_addr.clone()]).await;
    ms.next_ping().await;
    drop(ms);
    // Next address after A is B (A still listens, but must not be chosen).
    let mut ms = MsConn::accept(&b).await;
    ms.hello().await;

    agent.shutdown().await;
}

#[tokio::test]
async fn skips_unreachable_address() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap().to_string();
    let agent = spawn_agent(config(vec![dead_addr, live_addr], None));

    let mut ms = MsConn::accept(&live).await;
    ms.hello().await;

    agent.shutdown().await;
}

#[tokio::test]
async fn bad_config_is_an_error() {
    let res = run(config(vec![], None), std::future::pending()).await;
    assert!(res.is_err());
    let mut cfg = config(vec!["127.0.0.1:1".into()], None);
    cfg.hosts = 0;
    assert!(run(cfg, std::future::pending()).await.is_err());
}

#[tokio::test]
async fn shutdown_while_connecting() {
    // Nothing listens: the agent keeps retrying until told to stop.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let agent = spawn_agent(config(vec![dead_addr], None));
    agent.shutdown().await;
    // Also while connected and idle.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = spawn_agent(config(vec![listener.local_addr().unwrap().to_string()], None));
    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;
    agent.shutdown().await;
    assert!(matches!(ms.recv().await, Err(ProtoError::Closed)));
}

#[tokio::test]
async fn pipelined_commands_all_answered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = config(vec![addr], None);
    cfg.fail_rules = vec![skyhold_agent::FailRule::parse("start=bad").unwrap()];
    let agent = spawn_agent(cfg);

    let mut ms = MsConn::accept(&listener).await;
    ms.hello().await;
    ms.welcome(1, 500, vec![]).await;
    for req in 0..20u64 {
        let name = if req == 7 { "bad-7".to_owned() } else { format!("vm-{req}") };
        ms.send(&MsMsg::Command {
            req,
            host_guid: "ag1-h1".into(),
            generation: 1,
            job_id: format!("job-{req}"),
            step: 1,
            cmd: Command::StartVm { vm_id: format!("id-{req}"), name, cpu: 0, mem_mb: 64 },
        })
        .await;
    }
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 20 {
        match ms.recv_skip_pings().await {
            AgentMsg::Answer { req, result } => assert!(answers.insert(req, result).is_none()),
            other => panic!("expected Answer, got {other:?}"),
        }
    }
    for (req, result) in &answers {
        if *req == 7 {
            assert_eq!(
                *result,
                CommandResult::Failed { message: "simulated failure injected for start of bad-7".into() }
            );
        } else {
            assert_eq!(*result, RUNNING, "req {req}");
        }
    }
    let ping = ms.next_ping().await;
    assert_eq!(ping[1].vms.len(), 19);

    agent.shutdown().await;
}
