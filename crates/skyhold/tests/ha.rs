//! Host HA and VM HA against the real binary: simulator agents (one host each) sharing a primary
//! storage directory (their storage heartbeats), TCP proxies that cut a host off the management
//! servers, a real IPMI LAN simulator (`ipmi_sim`) as a host's BMC.
//!
//! Ground truth afterwards: the agents' ledger (no VM ever running on two hosts; a killed agent's
//! VMs are dead from the moment of the kill, recorded by the test) and the API's view.

#[macro_use]
mod common;
use common::*;
use serde_json::{Value, json};
use skyhold_testkit::{Bmc, have_ipmi};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A cloud whose hosts are one agent each, on shared primary storage.
struct Ha {
    c: Cloud,
    storage: PathBuf,
    /// Host deaths the test caused: (host guid, epoch ms).
    deaths: Vec<(String, u64)>,
}

impl Ha {
    fn start(backend: Backend) -> Option<Ha> {
        let c = Cloud::start(backend, 0)?;
        let storage = c.path("primary");
        std::fs::create_dir_all(&storage).unwrap();
        Some(Ha { c, storage, deaths: Vec::new() })
    }

    /// Start agent `name` (one host, guid `NAME-h0`) mounting the storage through its own
    /// symlink (so the test can cut this host off its storage), with its own control directory,
    /// reaching the management servers at `mgmt` (default: directly).
    fn agent(&mut self, name: &str, mgmt: Option<&str>, extra: &[&str]) -> usize {
        let mount = self.c.path(&format!("{name}-mnt"));
        let _ = std::fs::remove_file(&mount);
        std::os::unix::fs::symlink(&self.storage, &mount).unwrap();
        let ctl = self.c.path(&format!("{name}-ctl"));
        std::fs::create_dir_all(&ctl).unwrap();
        let mut args: Vec<String> =
            vec!["--storage".into(), mount.display().to_string(), "--control-dir".into(), ctl.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        if mgmt.is_some() {
            // Only through the proxy: the test cuts this host off by cutting the proxy.
            args.push("--static-mgmt".into());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mgmt = mgmt.map(str::to_string).unwrap_or_else(|| self.c.agent_addrs());
        self.c.start_agent_at(name, 1, &mgmt, &a);
        self.c.agents.len() - 1
    }

    fn host(&self, name: &str) -> Value {
        let hs = self.c.ok("listHosts", &[("name", &format!("{name}-h0"))]);
        hs["host"][0].clone()
    }

    fn host_id(&self, name: &str) -> String {
        let id = wait_for(Duration::from_secs(20), || self.host(name)["id"].as_str().map(str::to_string));
        id.unwrap_or_else(|| panic!("host of agent {name} registered"))
    }

    fn wait_up(&self, names: &[&str]) {
        for n in names {
            let up = wait_for(Duration::from_secs(20), || (self.host(n)["state"] == "Up").then_some(()));
            assert!(up.is_some(), "host {n} Up");
        }
    }

    /// Deploy on a given host; returns the VM id.
    fn deploy_on(&self, name: &str, offering: &str, host_id: &str) -> String {
        let (id, job) = self.c.deploy(name, offering, &[("hostid", host_id)]);
        assert_eq!(job["jobstatus"], 1, "deploy {name}: {job}");
        id
    }

    /// SIGKILL agent `i` (its host and its VMs die with it) and record the death for the ledger.
    fn kill_host(&mut self, i: usize) {
        let name = self.c.agents[i].name.clone();
        self.c.agents[i].kill9();
        self.deaths.push((format!("{name}-h0"), now_ms()));
    }

    /// Invariant 7 from the ledger plus the recorded deaths: returns where each VM runs.
    fn check_ledger(&self) -> std::collections::HashMap<String, String> {
        let mut l = self.c.ledger_entries();
        for (guid, at) in &self.deaths {
            l.push(json!({ "kind": "host_dead", "host": guid, "vm": "", "state": "Stopped", "ts_ms": at }));
        }
        l.sort_by_key(|e| e["ts_ms"].as_u64().unwrap_or(0));
        check_ledger(&l)
    }

    /// Cut host `name` off from everything: its management link (through `proxy`), its storage
    /// mount, and its neighbours (the check listener closes).
    fn isolate(&self, name: &str, proxy: &TcpProxy) {
        proxy.cut(Cut::Refuse);
        std::fs::remove_file(self.c.path(&format!("{name}-mnt"))).unwrap();
        std::fs::write(self.c.path(&format!("{name}-ctl")).join("isolate"), b"").unwrap();
    }

    fn events(&self, t: &str) -> Vec<Value> {
        self.c.ok("listEvents", &[("type", t), ("pagesize", "500")])["event"].as_array().cloned().unwrap_or_default()
    }

    fn wait_event(&self, t: &str, within: Duration) -> Value {
        wait_for(within, || self.events(t).into_iter().next()).unwrap_or_else(|| panic!("no {t} event"))
    }

    fn set(&self, name: &str, value: &str) {
        self.c.ok("updateConfiguration", &[("name", name), ("value", value)]);
    }

    fn ha_status(&self) -> Value {
        let d = self.c.dir.path().to_str().unwrap().to_string();
        serde_json::from_str(&run_ok(&["ha", "status", "--data-dir", &d, "--db", &self.c.db_url])).unwrap()
    }
}

fn backend() -> Backend {
    if std::env::var_os("SKYHOLD_TEST_MYSQL_URL").is_some() { Backend::MySql } else { Backend::Sqlite }
}

/// A host and everything on it dies (agent SIGKILLed, no BMC; the host was Disabled, which does
/// not matter to HA): its HA VMs run again on the other hosts of the cluster, on the `ha.tag` host; its other VMs stay Stopped; an HA VM that no host
/// will start is given up after `max.retries`; the ledger never shows a VM on two hosts.
#[test]
fn dead_host_ha_vms_restart_elsewhere() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    ha.set("max.retries", "2");
    ha.set("restart.retry.interval", "1");
    let a = ha.agent("a", None, &[]);
    // b refuses to start the VM named "doomed" (its hypervisor keeps failing it).
    ha.agent("b", None, &["--fail", "start=doomed"]);
    ha.agent("c", None, &["--fail", "start=doomed"]);
    ha.wait_up(&["a", "b", "c"]);
    let (ha_a, hc) = (ha.host_id("a"), ha.host_id("c"));
    // An ha.tag no host carries is refused (HA would otherwise fail silently).
    let (st, v) = ha.c.api("updateConfiguration", &[("name", "ha.tag"), ("value", "hapool")]);
    assert_eq!(st, 431, "{v}");
    assert!(v.to_string().contains("no host carries the tag 'hapool'"), "{v}");
    ha.c.ok("updateHost", &[("id", &hc), ("hosttags", "hapool")]);
    ha.set("ha.tag", "hapool");
    // Ordinary deployments avoid the HA host.
    let ordinary = ha.c.deploy("ordinary", "Small Instance", &[]).0;
    assert_ne!(ha.c.vm(&ordinary)["hostid"], hc.as_str(), "a VM not pinned avoids the ha.tag host");
    let ha_vms: Vec<String> = (0..3).map(|i| ha.deploy_on(&format!("havm{i}"), "HA Instance", &ha_a)).collect();
    let plain = ha.deploy_on("plain", "Small Instance", &ha_a);
    let doomed = ha.deploy_on("doomed", "HA Instance", &ha_a);
    assert_eq!(ha.c.vm(&ha_vms[0])["haenable"], true);
    // A Disabled host takes no new VMs, but the ones it runs are still protected by HA.
    ha.c.ok("updateHost", &[("id", &ha_a), ("allocationstate", "Disable")]);
    assert_eq!(ha.host("a")["resourcestate"], "Disabled");

    let t0 = Instant::now();
    ha.kill_host(a);
    // Every HA VM runs again, on the ha.tag host c (never on b, never twice).
    let back = wait_for(Duration::from_secs(90), || {
        ha_vms
            .iter()
            .all(|id| {
                let v = ha.c.vm(id);
                v["state"] == "Running" && v["hostid"] != ha_a.as_str()
            })
            .then_some(())
    });
    assert!(back.is_some(), "HA VMs restarted: {:?}", ha_vms.iter().map(|i| ha.c.vm(i)).collect::<Vec<_>>());
    let took = t0.elapsed();
    eprintln!("dead host: {} HA VMs Running elsewhere {:.1} s after the host died", ha_vms.len(), took.as_secs_f64());
    for id in &ha_vms {
        assert_eq!(ha.c.vm(id)["hostid"], hc.as_str(), "HA restarts go to the ha.tag host");
    }
    let host = ha.host("a");
    assert_eq!(host["state"], "Down", "{host}");
    assert_eq!(host["hostha"]["hastate"], "Fenced", "{host}");
    let p = ha.c.vm(&plain);
    assert_eq!(p["state"], "Stopped", "a VM without HA stays Stopped: {p}");
    let fenced = ha.wait_event("HOST.HA.FENCED", Duration::from_secs(5));
    let text = fenced["description"].as_str().unwrap();
    assert!(text.contains("lease expired"), "the proof is named: {text}");
    assert!(!ha.events("HOST.HA.SUSPECT").is_empty());
    assert!(ha.events("HOST.HA.DEGRADED").is_empty(), "a dead host is never judged alive");
    // Each neighbour's answers are recorded, once per change of meaning (not every round).
    let answers = ha.events("HOST.HA.ANSWER");
    for n in ["b-h0", "c-h0"] {
        let said: Vec<&str> = answers
            .iter()
            .filter_map(|e| e["description"].as_str())
            .filter(|d| d.starts_with(&format!("{n} checked host a-h0: unreachable")))
            .collect();
        assert!(!said.is_empty() && said.len() <= 4, "{n}'s answers: {answers:?}");
        assert!(said.iter().any(|d| d.contains("storage heartbeat still at")), "{said:?}");
    }
    let restarts = wait_for(Duration::from_secs(10), || {
        let e = ha.events("VM.HA.RESTART");
        (e.len() >= 3).then_some(e)
    });
    assert_eq!(restarts.map(|e| e.len()), Some(3), "one VM.HA.RESTART event per HA VM");
    // The VM no host will start is given up after max.retries, with an alert.
    let gave_up = ha.wait_event("VM.HA.FAILED", Duration::from_secs(60));
    assert!(gave_up["description"].as_str().unwrap().contains("doomed"), "{gave_up}");
    assert_eq!(ha.c.vm(&doomed)["state"], "Stopped");
    let alerts = ha.c.ok("listAlerts", &[])["alert"].as_array().cloned().unwrap_or_default();
    assert!(
        alerts.iter().any(|a| a["type"] == 7 && a["subject"].as_str().unwrap_or("").contains("FENCED")),
        "{alerts:?}"
    );
    assert!(alerts.iter().any(|a| a["type"] == 8 && a["description"].as_str().unwrap_or("").contains("doomed")));
    let restarted = alerts
        .iter()
        .filter(|a| a["type"] == 8 && a["description"].as_str().unwrap_or("").contains("restarted by HA on host c-h0"))
        .count();
    assert_eq!(restarted, 3, "one alert per HA restart: {alerts:?}");
    let st = ha.ha_status();
    assert_eq!(st["work_by_state"]["Done"], 3, "{st}");
    assert_eq!(st["work_by_state"]["Failed"], 1, "{st}");
    assert!(st["hosts"].as_array().unwrap().iter().any(|h| h["hastate"] == "Fenced"), "{st}");
    let running = ha.check_ledger();
    for id in &ha_vms {
        assert_eq!(running.get(id).map(String::as_str), Some("c-h0"), "ledger: {id} runs on c");
    }
    // Taking the tag off the last ha.tag host raises an alert at once.
    ha.c.ok("updateHost", &[("id", &hc), ("hosttags", "")]);
    let alerts = ha.c.ok("listAlerts", &[])["alert"].as_array().cloned().unwrap_or_default();
    assert!(alerts.iter().any(|a| a["subject"].as_str().unwrap_or("").contains("HA.TAG.UNUSED")), "{alerts:?}");
}

/// A host cut off from the management servers but alive (its neighbours reach it, its storage
/// heartbeat advances): nothing is restarted, the host is reported Degraded, and when the link
/// returns it is Up with its VMs still running there, never anywhere else.
#[test]
fn cut_off_but_alive_host_is_left_alone() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    let proxy = TcpProxy::start(&ha.c.agent_addrs()).expect("start TCP proxy");
    ha.agent("a", Some(&format!("127.0.0.1:{}", proxy.port)), &[]);
    ha.agent("b", None, &[]);
    ha.wait_up(&["a", "b"]);
    let host_a = ha.host_id("a");
    let vms: Vec<String> = (0..2).map(|i| ha.deploy_on(&format!("alive{i}"), "HA Instance", &host_a)).collect();
    proxy.cut(Cut::Refuse);
    let deg = ha.wait_event("HOST.HA.DEGRADED", Duration::from_secs(30));
    assert!(deg["description"].as_str().unwrap().contains("alive"), "{deg}");
    let said = ha.events("HOST.HA.ANSWER");
    assert!(
        said.iter().any(|e| e["description"].as_str().unwrap_or("").starts_with("b-h0 checked host a-h0: reachable")),
        "{said:?}"
    );
    // Longer than the lease (20 s) after the cut: still not fenced, nothing restarted.
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(26) {
        let h = ha.host("a");
        assert_ne!(h["hostha"]["hastate"], "Fenced", "an alive host must not be fenced: {h}");
        for id in &vms {
            assert_eq!(ha.c.vm(id)["hostid"], host_a.as_str());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(ha.events("HOST.HA.FENCED").is_empty());
    assert!(ha.events("VM.HA.RESTART").is_empty());
    assert_eq!(ha.host("a")["state"], "Alert");
    proxy.heal();
    ha.wait_up(&["a"]);
    for id in &vms {
        let v = ha.c.vm(id);
        assert_eq!((v["state"].as_str(), v["hostid"].as_str()), (Some("Running"), Some(host_a.as_str())), "{v}");
    }
    let running = ha.check_ledger();
    for id in &vms {
        assert_eq!(running.get(id).map(String::as_str), Some("a-h0"));
    }
}

/// A host isolated from everything (management servers, neighbours, storage): it self-fences
/// (stops its VMs) before its lease expires, then the servers restart its HA VMs elsewhere. The
/// ledger proves the order. No BMC involved.
#[test]
fn isolated_host_self_fences_then_vms_restart() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    let proxy = TcpProxy::start(&ha.c.agent_addrs()).expect("start TCP proxy");
    ha.agent("a", Some(&format!("127.0.0.1:{}", proxy.port)), &[]);
    ha.agent("b", None, &[]);
    ha.wait_up(&["a", "b"]);
    let host_a = ha.host_id("a");
    let vms: Vec<String> = (0..2).map(|i| ha.deploy_on(&format!("iso{i}"), "HA Instance", &host_a)).collect();
    let t0 = Instant::now();
    ha.isolate("a", &proxy);
    let back = wait_for(Duration::from_secs(90), || {
        vms.iter().all(|id| ha.c.vm(id)["state"] == "Running" && ha.c.vm(id)["hostid"] != host_a.as_str()).then_some(())
    });
    assert!(back.is_some(), "VMs restarted after the isolated host self-fenced");
    eprintln!("isolated host: HA VMs Running elsewhere {:.1} s after isolation", t0.elapsed().as_secs_f64());
    let l = ha.c.ledger_entries();
    for id in &vms {
        let fenced = l
            .iter()
            .find(|e| e["vm"] == id.as_str() && (e["kind"] == "self_fence" || e["kind"] == "storage_lost"))
            .unwrap_or_else(|| panic!("{id} stopped by the isolated host itself"));
        let restarted = l
            .iter()
            .find(|e| e["vm"] == id.as_str() && e["host"] == "b-h0" && e["state"] == "Running")
            .expect("restart on b");
        assert!(
            fenced["ts_ms"].as_u64() < restarted["ts_ms"].as_u64(),
            "self-fence before restart: {fenced} {restarted}"
        );
    }
    ha.check_ledger();
    let f = ha.wait_event("HOST.HA.FENCED", Duration::from_secs(5));
    assert!(f["description"].as_str().unwrap().contains("lease"), "{f}");
}

/// IPMI fencing: a host cut off from everything with a working BMC is powered off through it
/// (the BMC's hook really kills the simulated host) and its VMs restart at once, without waiting
/// for the lease. With a BMC that does not answer, there is no restart on the BMC's word: the
/// failure is recorded and only the storage lease (after the host self-fenced) proves it dead.
#[test]
fn ipmi_fencing_and_a_dead_bmc() {
    if !have_ipmi() {
        assert!(std::env::var_os("CI").is_none(), "ipmitool and ipmi_sim must be installed under CI");
        eprintln!("skipping: ipmitool/ipmi_sim not installed");
        return;
    }
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    let proxy_a = TcpProxy::start(&ha.c.agent_addrs()).expect("start TCP proxy");
    let proxy_c = TcpProxy::start(&ha.c.agent_addrs()).expect("start TCP proxy");
    let a = ha.agent("a", Some(&format!("127.0.0.1:{}", proxy_a.port)), &[]);
    ha.agent("b", None, &[]);
    let c = ha.agent("c", Some(&format!("127.0.0.1:{}", proxy_c.port)), &[]);
    ha.wait_up(&["a", "b", "c"]);
    let (host_a, host_c) = (ha.host_id("a"), ha.host_id("c"));
    let bmc_dir = ha.c.path("bmc-a");
    let bmc_a = Bmc::start(&bmc_dir, "bmc-secret").expect("BMC of host a");
    bmc_a.set_host_pid(ha.c.agents[a].child.id()).unwrap();
    let mut bmc_c = Bmc::start(&ha.c.path("bmc-c"), "bmc-secret").expect("BMC of host c");
    bmc_c.set_host_pid(ha.c.agents[c].child.id()).unwrap();
    for (h, bmc) in [(&host_a, &bmc_a), (&host_c, &bmc_c)] {
        let port = bmc.port.to_string();
        let o = ha.c.ok(
            "configureOutOfBandManagement",
            &[
                ("hostid", h),
                ("driver", "ipmitool"),
                ("address", "127.0.0.1"),
                ("port", &port),
                ("username", "admin"),
                ("password", "bmc-secret"),
            ],
        );
        assert_eq!(o["outofbandmanagement"]["address"], "127.0.0.1");
        ha.c.ok("enableOutOfBandManagementForHost", &[("hostid", h)]);
    }
    let listed = ha.host("a");
    assert_eq!(listed["outofbandmanagement"]["enabled"], true, "{listed}");
    assert!(!listed.to_string().contains("bmc-secret"), "the BMC password is never shown");
    let vm_a = ha.deploy_on("ipmi-a", "HA Instance", &host_a);
    let vm_c = ha.deploy_on("ipmi-c", "HA Instance", &host_c);

    // 1. Host a isolated from everything, its BMC works: fenced through IPMI, no lease wait.
    let t0 = Instant::now();
    ha.isolate("a", &proxy_a);
    let back = wait_for(Duration::from_secs(60), || {
        let v = ha.c.vm(&vm_a);
        (v["state"] == "Running" && v["hostid"] != host_a.as_str()).then_some(())
    });
    assert!(back.is_some(), "VM of the IPMI-fenced host restarted");
    eprintln!("ipmi: VM Running elsewhere {:.1} s after its host was isolated", t0.elapsed().as_secs_f64());
    let f = ha.wait_event("HOST.HA.FENCED", Duration::from_secs(5));
    assert!(f["description"].as_str().unwrap().contains("IPMI"), "{f}");
    assert!(!bmc_a.power(), "the BMC reports the host powered off");
    assert!(bmc_a.calls().iter().any(|l| l.contains("set power 0")), "{:?}", bmc_a.calls());
    // The BMC's power-off killed the simulated host.
    let died = wait_for(Duration::from_secs(5), || ha.c.agents[a].child.try_wait().ok().flatten());
    assert!(died.is_some(), "power-off killed host a");
    // Its death is when the BMC's hook powered it off (the hook's log, time of day in UTC).
    let off = bmc_power_off_ms(&bmc_a).expect("power-off time in the BMC log");
    assert!(off <= restart_ts(&ha, &vm_a), "the host was powered off before its VM restarted elsewhere");
    ha.deaths.push(("a-h0".into(), off));

    // 2. Host c isolated and its BMC dead with it: the BMC cannot prove anything; the host
    // self-fences and the lease proves it dead later.
    bmc_c.stop();
    let t1 = Instant::now();
    ha.isolate("c", &proxy_c);
    let failed = ha.wait_event("HOST.HA.FENCE.FAILED", Duration::from_secs(60));
    assert!(failed["description"].as_str().unwrap().contains("no proof from the BMC"), "{failed}");
    assert_eq!(ha.c.vm(&vm_c)["hostid"], host_c.as_str(), "no restart on a BMC failure alone");
    let back = wait_for(Duration::from_secs(90), || {
        let v = ha.c.vm(&vm_c);
        (v["state"] == "Running" && v["hostid"] != host_c.as_str()).then_some(())
    });
    assert!(back.is_some(), "VM restarted after the lease proved host c dead");
    let fenced: Vec<Value> = ha.events("HOST.HA.FENCED");
    assert!(fenced.iter().any(|e| e["description"].as_str().unwrap_or("").contains("lease")), "{fenced:?}");
    eprintln!("dead BMC: VM Running elsewhere {:.1} s after isolation (lease)", t1.elapsed().as_secs_f64());
    let l = ha.c.ledger_entries();
    let stopped = l.iter().find(|e| e["vm"] == vm_c.as_str() && e["host"] == "c-h0" && e["state"] == "Stopped");
    assert!(stopped.is_some(), "host c stopped its VM itself (self-fence) before the restart");
    ha.check_ledger();
}

/// Epoch ms of the BMC hook's first `set power 0` (its log says `HH:MM:SS.nnnnnnnnn set power 0`,
/// local time; the machines this runs on are on UTC).
fn bmc_power_off_ms(bmc: &Bmc) -> Option<u64> {
    let line = bmc.calls().into_iter().find(|l| l.contains("set power 0"))?;
    let tod = line.split_whitespace().next()?;
    let (hms, frac) = tod.split_once('.').unwrap_or((tod, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let ms = format!("{frac:0<3}")[..3].parse::<u64>().ok()?;
    let day = now_ms() - now_ms() % 86_400_000;
    Some(day + ((h * 60 + m) * 60 + s) * 1000 + ms)
}

/// Epoch ms of the ledger entry that started `vm` on a host other than the one it ran on first.
fn restart_ts(ha: &Ha, vm: &str) -> u64 {
    let l = ha.c.ledger_entries();
    let runs: Vec<&Value> =
        l.iter().filter(|e| e["vm"] == vm && e["kind"] == "exec" && e["state"] == "Running").collect();
    runs.get(1).and_then(|e| e["ts_ms"].as_u64()).unwrap_or(u64::MAX)
}

/// A VM that crashes on a healthy host restarts, on the same host first; a primary storage
/// outage stops every VM of the cluster and the HA ones come back when the storage does.
fn crashed_vm_and_storage_outage(b: Backend) {
    let Some(mut ha) = Ha::start(b) else { return };
    ha.c.allow_error_logs = true;
    ha.set("restart.retry.interval", "2");
    ha.set("max.retries", "20");
    ha.agent("a", None, &["--storage-timeout-ms", "3000"]);
    ha.agent("b", None, &["--storage-timeout-ms", "3000"]);
    ha.wait_up(&["a", "b"]);
    let host_a = ha.host_id("a");
    let hvm = ha.deploy_on("crashy", "HA Instance", &host_a);
    let plain = ha.deploy_on("plain-crashy", "Small Instance", &host_a);
    // Crash both VMs on their healthy host.
    let crash = ha.c.path("a-ctl").join("crash");
    std::fs::create_dir_all(&crash).unwrap();
    std::fs::write(crash.join(&hvm), b"").unwrap();
    std::fs::write(crash.join(&plain), b"").unwrap();
    let again = wait_for(Duration::from_secs(30), || {
        let l = ha.c.ledger_entries();
        let crashed = l.iter().position(|e| e["vm"] == hvm.as_str() && e["kind"] == "crash")?;
        l[crashed..].iter().find(|e| e["vm"] == hvm.as_str() && e["kind"] == "exec" && e["state"] == "Running").cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "the crashed HA VM started again: vm {} ha status {} events {:?}\n{}",
            ha.c.vm(&hvm),
            ha.ha_status(),
            ha.events("VM.STOP"),
            std::fs::read_to_string(ha.c.path("ms1.log")).unwrap_or_default()
        )
    });
    assert_eq!(again["host"], "a-h0", "same host first");
    let v = wait_for(Duration::from_secs(10), || {
        let v = ha.c.vm(&hvm);
        (v["state"] == "Running").then_some(v)
    });
    assert!(v.is_some());
    let p = wait_for(Duration::from_secs(10), || {
        let v = ha.c.vm(&plain);
        (v["state"] == "Stopped").then_some(v)
    });
    assert!(p.is_some(), "a crashed VM without HA is Stopped, not restarted");

    // The cluster's primary storage goes away: every VM stops; HA VMs return with the storage.
    let moved = ha.c.path("primary-offline");
    std::fs::rename(&ha.storage, &moved).unwrap();
    let stopped = wait_for(Duration::from_secs(30), || (ha.c.vm(&hvm)["state"] == "Stopped").then_some(()));
    assert!(stopped.is_some(), "a storage outage stops the VM");
    assert!(ha.c.ledger_entries().iter().any(|e| e["vm"] == hvm.as_str() && e["kind"] == "storage_lost"));
    // While the storage is away, restarts fail and are retried.
    let retry = ha.wait_event("VM.HA.RETRY", Duration::from_secs(30));
    assert!(retry["description"].as_str().unwrap().contains("storage"), "{retry}");
    assert_eq!(ha.c.vm(&hvm)["state"], "Stopped");
    std::fs::rename(&moved, &ha.storage).unwrap();
    let back = wait_for(Duration::from_secs(60), || (ha.c.vm(&hvm)["state"] == "Running").then_some(()));
    assert!(back.is_some(), "the HA VM runs again once the storage is back");
    ha.check_ledger();
}

/// Maintenance: `prepareHostForMaintenance` live-migrates the host's VMs away; a VM whose
/// migration fails keeps running where it was (ErrorInMaintenance, with an event);
/// `cancelHostMaintenance` returns the host; `migrateVirtualMachine` moves a VM back. The ledger
/// never shows a VM on two hosts.
fn maintenance_migrates_vms_away(b: Backend) {
    let Some(mut ha) = Ha::start(b) else { return };
    ha.c.allow_error_logs = true;
    ha.agent("a", None, &[]);
    ha.agent("b", None, &["--fail", "start=stuck"]);
    ha.wait_up(&["a", "b"]);
    let (host_a, host_b) = (ha.host_id("a"), ha.host_id("b"));
    let mover = ha.deploy_on("mover", "Small Instance", &host_a);
    let stuck = ha.deploy_on("stuck", "Small Instance", &host_a);
    let job = ha.c.ok("prepareHostForMaintenance", &[("id", &host_a)])["jobid"].as_str().unwrap().to_string();
    let r = ha.c.wait_job(&job);
    assert_eq!(r["jobstatus"], 1, "{r}");
    assert_eq!(r["jobresult"]["host"]["resourcestate"], "ErrorInMaintenance", "{r}");
    let m = ha.c.vm(&mover);
    assert_eq!((m["state"].as_str(), m["hostid"].as_str()), (Some("Running"), Some(host_b.as_str())), "{m}");
    let s = ha.c.vm(&stuck);
    assert_eq!((s["state"].as_str(), s["hostid"].as_str()), (Some("Running"), Some(host_a.as_str())), "{s}");
    let ev = ha.events("VM.MIGRATE");
    assert!(
        ev.iter().any(|e| e["level"] == "WARN" && e["description"].as_str().unwrap_or("").contains("keeps running")),
        "{ev:?}"
    );
    // Placement avoids a host in maintenance.
    let (z, t, o) = ha.c.ids("Small Instance");
    let (st, v) = ha.c.api(
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "x"), ("hostid", &host_a)],
    );
    let refused =
        if st == 200 { ha.c.wait_job(v["deployvirtualmachineresponse"]["jobid"].as_str().unwrap()) } else { v };
    assert!(refused.to_string().contains("not Up and Enabled"), "{refused}");
    // Back from maintenance, then the stuck VM goes (it is destroyed) and maintenance completes.
    let job = ha.c.ok("cancelHostMaintenance", &[("id", &host_a)])["jobid"].as_str().unwrap().to_string();
    assert_eq!(ha.c.wait_job(&job)["jobresult"]["host"]["resourcestate"], "Enabled");
    let job =
        ha.c.ok("destroyVirtualMachine", &[("id", &stuck), ("expunge", "true")])["jobid"].as_str().unwrap().to_string();
    assert_eq!(ha.c.wait_job(&job)["jobstatus"], 1);
    let job = ha.c.ok("migrateVirtualMachine", &[("virtualmachineid", &mover), ("hostid", &host_a)])["jobid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ha.c.wait_job(&job);
    assert_eq!(r["jobstatus"], 1, "{r}");
    assert_eq!(ha.c.vm(&mover)["hostid"], host_a.as_str());
    let job = ha.c.ok("prepareHostForMaintenance", &[("id", &host_a)])["jobid"].as_str().unwrap().to_string();
    let r = ha.c.wait_job(&job);
    assert_eq!(r["jobresult"]["host"]["resourcestate"], "Maintenance", "{r}");
    assert_eq!(ha.c.vm(&mover)["hostid"], host_b.as_str());
    // Bad input: a migration to the VM's own host is refused with a reason.
    let job = ha.c.ok("migrateVirtualMachine", &[("virtualmachineid", &mover), ("hostid", &host_b)])["jobid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ha.c.wait_job(&job);
    assert_eq!(r["jobstatus"], 2, "{r}");
    assert!(r["jobresult"]["errortext"].as_str().unwrap().contains("other than its own"), "{r}");
    let (st, v) = ha.c.api("migrateVirtualMachine", &[("virtualmachineid", "not-a-uuid")]);
    assert_eq!(st, 431, "{v}");
    let running = ha.check_ledger();
    assert_eq!(running.get(&mover).map(String::as_str), Some("b-h0"));
}

/// The management server coordinating HA dies in the middle of the restarts: the other server
/// takes the coordinator role and the durable work and jobs over; every HA VM of the dead host
/// runs again exactly once.
#[test]
fn coordinator_killed_during_ha_restarts() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    ha.c.start_server("ms2");
    let a = ha.agent("a", None, &[]);
    // Slow hypervisors: the restarts are still running when the coordinator dies.
    ha.agent("b", None, &["--command-delay-ms", "1500"]);
    ha.agent("c", None, &["--command-delay-ms", "1500"]);
    ha.wait_up(&["a", "b", "c"]);
    let host_a = ha.host_id("a");
    let vms: Vec<String> = (0..6).map(|i| ha.deploy_on(&format!("coord{i}"), "HA Instance", &host_a)).collect();
    ha.kill_host(a);
    ha.wait_event("HOST.HA.FENCED", Duration::from_secs(60));
    let st = ha.ha_status();
    let coord = st["coordinator"]["ms_id"].as_str().expect("a coordinator").to_string();
    let i = ha.c.servers.iter().position(|(p, _, _)| p.name == coord).expect("coordinator is one of ours");
    ha.c.kill9_server(i);
    let other = 1 - i;
    ha.c.api_port = ha.c.servers[other].1;
    eprintln!("coordinator {coord} killed with work {}", st["work_by_state"]);
    let back = wait_for(Duration::from_secs(90), || {
        vms.iter()
            .all(|id| {
                let v = ha.c.vm(id);
                v["state"] == "Running" && v["hostid"] != host_a.as_str()
            })
            .then_some(())
    });
    assert!(back.is_some(), "every HA VM restarted after the coordinator died: {}", ha.ha_status());
    let st = wait_for(Duration::from_secs(20), || {
        let st = ha.ha_status();
        (st["work_by_state"]["Done"] == 6).then_some(st)
    })
    .unwrap_or_else(|| panic!("work done: {}", ha.ha_status()));
    assert_ne!(st["coordinator"]["ms_id"], coord.as_str(), "{st}");
    // The hosts whose agents moved from the dead server were never suspected.
    for e in ha.events("HOST.HA.SUSPECT") {
        assert!(e["description"].as_str().unwrap_or("").contains("a-h0"), "only the dead host is suspect: {e}");
    }
    // Exactly one start per VM outside the dead host.
    let l = ha.c.ledger_entries();
    for id in &vms {
        let starts = l
            .iter()
            .filter(|e| e["vm"] == id.as_str() && e["kind"] == "exec" && e["state"] == "Running" && e["host"] != "a-h0")
            .count();
        assert_eq!(starts, 1, "VM {id} started {starts} times after the failure");
    }
    ha.check_ledger();
}

both!(crashed_vm_and_storage_outage);
both!(maintenance_migrates_vms_away);

/// A hand-driven agent on a real TCP connection, speaking the agent protocol line by line.
struct RawAgent {
    rd: std::io::BufReader<std::net::TcpStream>,
    wr: std::net::TcpStream,
}

impl RawAgent {
    fn send(&mut self, v: Value) {
        use std::io::Write;
        let mut line = v.to_string();
        line.push('\n');
        self.wr.write_all(line.as_bytes()).unwrap();
    }

    /// The next message of `kind` from the server (others, e.g. Pong, are skipped).
    fn next(&mut self, kind: &str) -> Value {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            assert!(self.rd.read_line(&mut line).unwrap() > 0, "server closed the connection");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// A host is Connecting from its agent's registration until its first report of its VMs (only
/// then is its state reconciled): nothing is placed on it meanwhile, a deployment waits for it
/// rather than fail, and it is Up, and used, from the first report on.
#[test]
fn host_is_connecting_until_its_first_report() {
    let Some(c) = Cloud::start(backend(), 0) else { return };
    let addr = c.agent_addrs();
    let s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut a = RawAgent { rd: std::io::BufReader::new(s.try_clone().unwrap()), wr: s };
    a.send(json!({
        "type": "hello", "proto": 1, "token": c.agent_token, "agent_id": "raw", "version": "test",
        "hosts": [{ "guid": "raw-h0", "name": "raw-h0", "ip": "127.0.0.1", "cpu_cores": 4, "cpu_mhz": 2000,
                    "mem_mb": 8192, "hypervisor": "Simulator", "vms": [] }]
    }));
    let welcome = a.next("welcome");
    let generation = welcome["hosts"][0]["generation"].as_u64().unwrap();
    let host = c.ok("listHosts", &[("name", "raw-h0")])["host"][0].clone();
    assert_eq!(host["state"], "Connecting", "registered, not yet reported: {host}");
    let listed = c.ok("listHosts", &[("state", "Connecting")])["count"].clone();
    assert_eq!(listed, 1);
    // A deployment now waits for the host instead of failing for lack of capacity.
    let (z, t, o) = c.ids("Small Instance");
    let r = c.ok(
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "waits")],
    );
    let job = r["jobid"].as_str().unwrap().to_string();
    assert_eq!(c.ok("queryAsyncJobResult", &[("jobid", &job)])["jobstatus"], 0);
    assert_eq!(c.ok("listHosts", &[("name", "raw-h0")])["host"][0]["state"], "Connecting");
    // The first report: Up, and the waiting deployment lands on it.
    a.send(json!({ "type": "ping", "hosts": [{ "guid": "raw-h0", "vms": [] }] }));
    let cmd = a.next("command");
    assert_eq!(cmd["cmd"]["op"], "start_vm", "{cmd}");
    assert_eq!(cmd["generation"], generation);
    assert_eq!(c.ok("listHosts", &[("name", "raw-h0")])["host"][0]["state"], "Up");
    a.send(json!({ "type": "answer", "req": cmd["req"], "result": { "outcome": "ok", "state": "Running" } }));
    let done = c.wait_job(&job);
    assert_eq!(done["jobstatus"], 1, "{done}");
    assert_eq!(c.vm(r["id"].as_str().unwrap())["hostname"], "raw-h0");
    // The connection closes: Disconnected.
    drop(a);
    let gone = wait_for(Duration::from_secs(10), || {
        (c.ok("listHosts", &[("name", "raw-h0")])["host"][0]["state"] == "Disconnected").then_some(())
    });
    assert!(gone.is_some(), "Disconnected once the connection closed");
}

/// HA restarts stay in the failed host's cluster and never cross zones: the dead host's only
/// neighbour in its cluster has no room for its VMs, a host of a second zone (built through the
/// API, its agent placed there with `--zone`/`--cluster`) has room for all of them, and gets none:
/// the VMs are given up after `max.retries`, Stopped, with an alert.
#[test]
fn ha_restarts_never_cross_zones() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    ha.set("max.retries", "1");
    ha.set("restart.retry.interval", "1");
    let zone = ha.c.ok(
        "createZone",
        &[
            ("name", "west"),
            ("networktype", "Basic"),
            ("dns1", "192.0.2.53"),
            ("internaldns1", "192.0.2.54"),
            ("allocationstate", "Enabled"),
        ],
    )["zone"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pod = ha.c.ok(
        "createPod",
        &[
            ("zoneid", &zone),
            ("name", "west-pod"),
            ("gateway", "10.20.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.20.0.10"),
            ("endip", "10.20.0.250"),
        ],
    )["pod"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let added = ha.c.ok(
        "addCluster",
        &[
            ("zoneid", &zone),
            ("podid", &pod),
            ("clustername", "west-cluster"),
            ("clustertype", "CloudManaged"),
            ("hypervisor", "Simulator"),
        ],
    );
    let cluster = added["cluster"][0]["id"].as_str().unwrap().to_string();
    let a = ha.agent("a", None, &[]);
    ha.agent("a2", None, &["--host-mem-mb", "512"]);
    ha.agent("w", None, &["--zone", "west", "--cluster", "west-cluster"]);
    ha.wait_up(&["a", "a2", "w"]);
    let w = ha.host("w");
    assert_eq!((w["zoneid"].as_str(), w["clusterid"].as_str()), (Some(zone.as_str()), Some(cluster.as_str())), "{w}");
    assert_ne!(ha.host("a")["zoneid"], zone.as_str());
    // A VM deployed in the west zone runs on its host, with an address of its pod.
    let (_, t, o) = ha.c.ids("Small Instance");
    let r = ha.c.ok(
        "deployVirtualMachine",
        &[("zoneid", &zone), ("templateid", &t), ("serviceofferingid", &o), ("name", "west1")],
    );
    let j = ha.c.wait_job(r["jobid"].as_str().unwrap());
    assert_eq!(j["jobstatus"], 1, "{j}");
    let v = ha.c.vm(r["id"].as_str().unwrap());
    assert_eq!(v["hostname"], "w-h0", "{v}");
    assert!(v["nic"][0]["ipaddress"].as_str().unwrap_or("").starts_with("10.20.0."), "{v}");
    // An agent naming a place that does not exist is refused with the reason (its host never
    // appears).
    ha.agent("lost", None, &["--zone", "north"]);
    let refused = wait_for(Duration::from_secs(20), || {
        let log = std::fs::read_to_string(ha.c.path("lost.log")).unwrap_or_default();
        log.contains("zone 'north' does not exist").then_some(())
    });
    assert!(refused.is_some(), "the agent logs the refusal");
    assert!(ha.c.ok("listHosts", &[("name", "lost-h0")])["host"].as_array().is_none_or(|h| h.is_empty()));

    let host_a = ha.host_id("a");
    let vms: Vec<String> = (0..2).map(|i| ha.deploy_on(&format!("zoned{i}"), "HA Instance", &host_a)).collect();
    ha.kill_host(a);
    ha.wait_event("HOST.HA.FENCED", Duration::from_secs(60));
    let gave_up = wait_for(Duration::from_secs(60), || {
        let e = ha.events("VM.HA.FAILED");
        (e.len() >= vms.len()).then_some(e)
    });
    let gave_up = gave_up.expect("both VMs given up");
    for e in &gave_up {
        let d = e["description"].as_str().unwrap_or("");
        assert!(d.contains("HA gave up restarting VM zoned"), "{d}");
    }
    for id in &vms {
        let v = ha.c.vm(id);
        assert_eq!(v["state"], "Stopped", "{v}");
    }
    assert!(ha.events("VM.HA.RESTART").is_empty(), "no restart anywhere");
    // Ground truth: the west host never started them.
    let running = ha.check_ledger();
    for id in &vms {
        assert_eq!(running.get(id), None, "{id} runs nowhere");
    }
    let w_starts: Vec<Value> =
        ha.c.ledger_entries()
            .into_iter()
            .filter(|e| e["host"] == "w-h0" && vms.iter().any(|v| e["vm"] == v.as_str()))
            .collect();
    assert!(w_starts.is_empty(), "the other zone's host never saw them: {w_starts:?}");
}

/// A host dies while a migration of its HA VM is in flight: the fence (the lease, about 20 s)
/// comes while the VM is Migrating, so the fence leaves it to its job; the migration gives up on
/// its dead source later (`wait`, 30 s) and puts the VM back there as Running. The coordinator
/// then treats it as dead with its fenced host and restarts it elsewhere, exactly once.
#[test]
fn migration_in_flight_when_the_source_dies() {
    let Some(mut ha) = Ha::start(backend()) else { return };
    ha.c.allow_error_logs = true;
    let a = ha.agent("a", None, &[]);
    ha.agent("b", None, &[]);
    ha.wait_up(&["a", "b"]);
    let host_a = ha.host_id("a");
    let vm = ha.deploy_on("mover", "HA Instance", &host_a);
    ha.kill_host(a);
    let r = ha.c.ok("migrateVirtualMachine", &[("virtualmachineid", &vm)]);
    let job = r["jobid"].as_str().unwrap().to_string();
    let fenced = ha.wait_event("HOST.HA.FENCED", Duration::from_secs(40));
    let text = fenced["description"].as_str().unwrap_or("");
    assert!(text.contains("0 HA VM(s) queued"), "the migrating VM is left to its job at the fence: {text}");
    let j = ha.c.wait_job(&job);
    assert_eq!(j["jobstatus"], 2, "the migration failed: {j}");
    let back = wait_for(Duration::from_secs(60), || {
        let v = ha.c.vm(&vm);
        (v["state"] == "Running" && v["hostid"] != host_a.as_str()).then_some(v)
    });
    assert!(back.is_some(), "the VM runs elsewhere: {}", ha.c.vm(&vm));
    // The coordinator records the restart when it sees the job done.
    let restarts = wait_for(Duration::from_secs(10), || {
        let e = ha.events("VM.HA.RESTART");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(restarts.map(|e| e.len()), Some(1), "one VM.HA.RESTART");
    let st = ha.ha_status();
    assert_eq!(st["work_by_state"]["Done"], 1, "{st}");
    let running = ha.check_ledger();
    assert_eq!(running.get(&vm).map(String::as_str), Some("b-h0"));
}
