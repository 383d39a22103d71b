//! `skyhold demo`: a whole cloud on one machine, with nothing to install. It creates (once) an
//! SQLite database with a zone, pod, cluster, offerings and templates, then starts management
//! server processes and a simulator agent process as children, writes `cloudstack.ini`,
//! `agent.token` and `demo.json` into the data dir, and stops its children on Ctrl-C.

use crate::cli::DemoArgs;
use crate::config::{Node, write_private};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

struct Proc {
    role: &'static str,
    name: String,
    child: Child,
    info: Value,
}

pub async fn run(a: DemoArgs) -> Result<u8> {
    let t0 = std::time::Instant::now();
    if a.servers == 0 {
        bail!("--servers must be at least 1");
    }
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("create {}", a.data_dir.display()))?;
    let dir = a.data_dir.canonicalize().with_context(|| format!("resolve {}", a.data_dir.display()))?;
    for sub in ["logs", "run"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let node = if a.db.is_some() || a.db_properties.is_some() {
        let args = crate::cli::NodeArgs {
            config: None,
            data_dir: Some(dir.clone()),
            db: a.db.clone(),
            key_file: None,
            db_properties: a.db_properties.clone(),
        };
        Node::resolve(&args, &crate::config::FileConfig::default())?
    } else {
        Node {
            data_dir: dir.clone(),
            db_url: format!("sqlite://{}", dir.join("skyhold.db").display()),
            key_file: dir.join("key"),
            max_connections: 8,
            endpoints: Vec::new(),
            policy: None,
        }
    };
    let admin_file = dir.join("admin.json");
    let db_exists = {
        let db = node.open_db(true).await?;
        let init = skyhold_core::bootstrap::is_initialized(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        db.close().await;
        init
    };
    if !db_exists {
        let out = crate::db_cmd::init(&node, false, None, true).await?;
        write_private(&admin_file, &serde_json::to_string_pretty(&out["admin"])?)?;
    } else {
        // Keep the data; bring the schema up to date.
        let db = node.open_db(false).await?;
        skyhold_db::migrate::migrate(&db).await?;
        skyhold_core::bootstrap::seed_demo(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        db.close().await;
    }
    let admin: Value =
        std::fs::read_to_string(&admin_file).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null);

    let exe = std::env::current_exe().context("find the skyhold executable")?;
    let mut procs: Vec<Proc> = Vec::new();
    let port = |base: u16, i: u32| if base == 0 { 0 } else { base.saturating_add(i as u16) };
    let mut agent_addrs = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..a.servers {
        let name = format!("ms{}", i + 1);
        let ports_file = dir.join("run").join(format!("{name}.json"));
        let _ = std::fs::remove_file(&ports_file);
        let log = std::fs::File::create(dir.join("logs").join(format!("{name}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("server").arg("--data-dir").arg(&dir);
        if let Some(db) = &a.db {
            cmd.arg("--db").arg(db);
        }
        if let Some(p) = &a.db_properties {
            cmd.arg("--db-properties").arg(p);
        }
        cmd.arg("--ms-id")
            .arg(format!("demo-{name}"))
            .arg("--bind")
            .arg(&a.bind)
            .arg("--api-port")
            .arg(port(a.api_port, i).to_string())
            .arg("--agent-port")
            .arg(port(a.agent_port, i).to_string())
            .arg("--cluster-port")
            .arg(port(a.cluster_port, i).to_string())
            .arg("--ports-file")
            .arg(&ports_file)
            .env_remove("SKYHOLD_CONFIG")
            .env_remove("SKYHOLD_DB")
            .env_remove("SKYHOLD_DB_PROPERTIES")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("start a management server process")?;
        let ports = wait_ports(&ports_file, &dir.join("logs").join(format!("{name}.log"))).await?;
        let api = ports["api"].as_u64().unwrap_or(0);
        let agent = ports["agent"].as_u64().unwrap_or(0);
        wait_ready(&a.bind, api as u16).await?;
        agent_addrs.push(format!("{}:{agent}", a.bind));
        endpoints.push(format!("http://{}:{api}/client/api", a.bind));
        let pid = child.id().unwrap_or(0);
        procs.push(Proc {
            role: "server",
            name: name.clone(),
            child,
            info: json!({ "role": "server", "name": name, "pid": pid, "api_port": api, "agent_port": agent, "cluster_port": ports["cluster"], "msid": ports["msid"], "log": format!("logs/{name}.log") }),
        });
    }
    if a.hosts > 0 {
        let log = std::fs::File::create(dir.join("logs").join("agent.log"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("agent")
            .arg("--mgmt")
            .arg(agent_addrs.join(","))
            .arg("--token-file")
            .arg(dir.join("agent.token"))
            .arg("--simulator")
            .arg("--hosts")
            .arg(a.hosts.to_string())
            .arg("--agent-id")
            .arg("demo-agent")
            .arg("--ledger")
            .arg(dir.join("ledger.jsonl"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("start the simulator agent")?;
        let pid = child.id().unwrap_or(0);
        procs.push(Proc {
            role: "agent",
            name: "agent".into(),
            child,
            info: json!({ "role": "agent", "name": "agent", "pid": pid, "hosts": a.hosts, "mgmt": agent_addrs, "ledger": "ledger.jsonl", "log": "logs/agent.log" }),
        });
    }
    let endpoint = endpoints.first().cloned().unwrap_or_default();
    let key = admin["apikey"].as_str().unwrap_or("");
    let secret = admin["secretkey"].as_str().unwrap_or("");
    write_private(
        &dir.join("cloudstack.ini"),
        &format!("[cloudstack]\nendpoint = {endpoint}\nkey = {key}\nsecret = {secret}\n"),
    )?;
    let demo = json!({
        "endpoint": endpoint,
        "endpoints": endpoints,
        "data_dir": dir,
        "processes": procs.iter().map(|p| p.info.clone()).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("demo.json"), serde_json::to_string_pretty(&demo)?)?;

    println!("Skyhold demo is running (started in {:.1} s).", t0.elapsed().as_secs_f64());
    println!("  API endpoint:  {endpoint}");
    println!("  admin login:   admin / {}", admin["password"].as_str().unwrap_or("(see admin.json)"));
    println!("  admin API key: {key}");
    println!("  admin secret:  {secret}");
    println!("  data dir:      {}", dir.display());
    println!("Try it:");
    println!("  CLOUDSTACK_CONFIG={} cs listZones", dir.join("cloudstack.ini").display());
    println!("Processes are listed in {}; logs in {}.", dir.join("demo.json").display(), dir.join("logs").display());
    if a.servers > 1 {
        println!("Kill one server (kill -9 <pid from demo.json>) and watch the others take over its work.");
    }
    println!("Press Ctrl-C to stop.");

    supervise(&mut procs).await;
    stop_all(&mut procs).await;
    Ok(0)
}

async fn wait_ports(path: &Path, log: &Path) -> Result<Value> {
    for _ in 0..300 {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&s)
        {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    let tail: String = tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    bail!("the management server did not start within 15 s; its log ends with:\n{tail}")
}

async fn wait_ready(host: &str, port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..200 {
        if let Ok(mut s) = tokio::net::TcpStream::connect((host, port)).await {
            let req = format!("GET /ready HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                if buf.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the management server on port {port} did not become ready")
}

/// Run until Ctrl-C or SIGTERM. A child that dies is reported, not fatal: the demo carries on.
async fn supervise(procs: &mut [Proc]) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return,
    };
    let mut reported: Vec<bool> = vec![false; procs.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, p) in procs.iter_mut().enumerate() {
                    if !reported[i]
                        && let Ok(Some(st)) = p.child.try_wait()
                    {
                        reported[i] = true;
                        eprintln!("demo: {} {} exited ({st}); the rest of the demo carries on", p.role, p.name);
                    }
                }
            }
        }
    }
}

async fn stop_all(procs: &mut [Proc]) {
    // Agents first, so servers do not see them as lost mid-shutdown.
    for p in procs.iter_mut().rev() {
        if let Some(pid) = p.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }
    for p in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(25), p.child.wait()).await.is_err() {
            let _ = p.child.kill().await;
        }
    }
    eprintln!("demo stopped");
}
