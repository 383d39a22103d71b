//! The management-server cluster: takeover after SIGKILL, self-fencing, drain.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A server killed between an agent's answer and the recording of the result: a survivor
/// resumes the job from its last durable step, the agent replays instead of executing twice.
fn takeover_mid_step(b: Backend) {
    let Some(mut c) = Cloud::start(b, 0) else { return };
    c.allow_error_logs = true; // the failpoint logs an ERROR before aborting
    c.start_server("ms2");
    c.start_agent("agent1", 4, &[]);
    c.wait_hosts_up(4);
    // ms1 is the only server that claims jobs until it dies: ms2 is draining-free but we give ms1
    // the failpoint and submit while ms2 is stopped.
    c.kill9_server(1);
    c.restart_server(0, &[("SKYHOLD_FAILPOINT", "after_agent_answer:1")]);
    c.wait_hosts_up(4);
    let (z, t, o) = c.ids("Small Instance");
    let r =
        c.ok("deployVirtualMachine", &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "tk1")]);
    let job = r["jobid"].as_str().unwrap().to_string();
    // ms1 aborts right after the agent answered.
    assert!(c.servers[0].0.wait_exit(Duration::from_secs(30)).is_some(), "failpoint aborted ms1");
    let t0 = Instant::now();
    c.restart_server(1, &[]);
    c.api_port = c.servers[1].1;
    let j = c.wait_job(&job);
    let took = t0.elapsed();
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["state"], "Running");
    let l = std::fs::read_to_string(c.ledger()).unwrap();
    let lines: Vec<serde_json::Value> = l.lines().map(|x| serde_json::from_str(x).unwrap()).collect();
    let execs = lines.iter().filter(|e| e["job"] == job.as_str() && e["kind"] == "exec").count();
    let replays = lines.iter().filter(|e| e["job"] == job.as_str() && e["kind"] == "replay").count();
    assert_eq!(execs, 1, "executed once: {l}");
    assert_eq!(replays, 1, "resent and replayed: {l}");
    eprintln!("job resumed by a survivor {:.2} s after the crash", took.as_secs_f64());
}

mod takeover_mid_step {
    #[test]
    fn sqlite() {
        super::takeover_mid_step(super::Backend::Sqlite)
    }
    #[test]
    fn mysql() {
        super::takeover_mid_step(super::Backend::MySql)
    }
}

/// A job claimed by a server that does not hold the host's agent connection sends its command
/// through the peer channel to the server that does.
#[test]
fn commands_are_forwarded_to_the_server_holding_the_host() {
    let Some(mut c) = Cloud::start(Backend::Sqlite, 0) else { return };
    c.start_server("ms2");
    // The agent knows ms2 only: its hosts are held by ms2.
    let ms2_agent = format!("127.0.0.1:{}", c.servers[1].2);
    let log = c.path("agent-fw.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(BIN)
        .args(["agent", "--mgmt", &ms2_agent, &format!("--token={}", c.agent_token), "--simulator", "--hosts", "2"])
        .args(["--agent-id", "fw"])
        .arg("--ledger")
        .arg(c.ledger())
        .stdin(std::process::Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    c.agents.push(Proc { name: "agent-fw".into(), child, log });
    c.wait_hosts_up(2);
    let hosts = c.ok("listHosts", &[]);
    assert!(hosts["host"].as_array().unwrap().iter().all(|h| h["managementserverid"] == "ms2"), "{hosts}");
    // Submit through ms1: it is woken first and claims the jobs.
    for i in 0..6 {
        let (_, j) = c.deploy(&format!("fw{i}"), "Small Instance", &[]);
        assert_eq!(j["jobstatus"], 1, "{j}");
    }
    let ms1_log = std::fs::read_to_string(&c.servers[0].0.log).unwrap();
    let forwarded = ms1_log.lines().filter(|l| l.contains("forwarded agent command through the peer")).count();
    assert!(forwarded >= 1, "ms1 ran some jobs by forwarding through ms2:\n{ms1_log}");
    eprintln!("{forwarded} of 6 deploys were run by ms1 through ms2");
    // A forged peer request is refused: the channel is authenticated.
    use std::io::{BufRead, BufReader, Write};
    let peer_port: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.path("ms2.ports")).unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", peer_port["cluster"].as_u64().unwrap() as u16)).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    writeln!(s, r#"{{"from":"evil","ts_ms":{now},"nonce":"n","mac":"AAAA","body":{{"op":"wake"}}}}"#).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("refused"), "{line}");
}

/// The `host` setting (the addresses handed to agents, e.g. a load balancer VIP) reaches the
/// connected agents at once, ordered by `indirect.agent.lb.algorithm`.
#[test]
fn host_setting_is_pushed_to_agents() {
    let Some(c) = Cloud::start(Backend::Sqlite, 1) else { return };
    c.ok("updateConfiguration", &[("name", "host"), ("value", "192.0.2.10:8250,192.0.2.11")]);
    let log = c.path("agent1.log");
    let pushed = common::wait_for(Duration::from_secs(10), || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.lines()
            .find(|l| l.contains("management server list updated") && l.contains("192.0.2.10:8250"))
            .map(str::to_string)
    })
    .expect("the agent received the new list");
    // A bare address gets the agent port of the server that pushed it.
    let port = c.servers[0].2;
    assert!(pushed.contains(&format!("192.0.2.11:{port}")), "{pushed}");
    // static keeps the setting's order: the VIP first.
    let first = pushed.split('[').nth(1).and_then(|x| x.split(',').next()).unwrap_or("");
    assert!(first.contains("192.0.2.10:8250"), "{pushed}");
    // An unknown algorithm is refused.
    let (st, _) = c.api("updateConfiguration", &[("name", "indirect.agent.lb.algorithm"), ("value", "random")]);
    assert_eq!(st, 431);
}
