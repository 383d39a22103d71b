//! The CloudStack API end to end: the real binary, a real simulator agent, SQLite and MariaDB.

#[macro_use]
mod common;
use common::*;
use serde_json::Value;

fn vm_lifecycle(b: Backend) {
    let Some(c) = Cloud::start(b, 2) else { return };
    let (id, job) = c.deploy("web1", "Small Instance", &[("displayname", "Web Server *1")]);
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(job["jobresultcode"], 0);
    assert_eq!(job["jobresulttype"], "object");
    assert_eq!(job["jobinstanceid"], id.as_str());
    let vm = &job["jobresult"]["virtualmachine"];
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["displayname"], "Web Server *1");
    assert_eq!(vm["cpunumber"], 1);
    assert_eq!(vm["memory"], 512);
    assert!(vm["hostid"].is_string(), "admin sees hostid");
    let ip = vm["nic"][0]["ipaddress"].as_str().expect("ip");
    assert!(ip.starts_with("10.1."), "{ip}");
    assert_eq!(vm["nic"][0]["isdefault"], true);

    // Filters.
    for (k, v) in [("name", "web1"), ("state", "running"), ("keyword", "Web Serv"), ("ids", id.as_str())] {
        let l = c.ok("listVirtualMachines", &[(k, v)]);
        assert_eq!(l["count"], 1, "filter {k}={v}: {l}");
    }
    let host = vm["hostid"].as_str().unwrap();
    assert_eq!(c.ok("listVirtualMachines", &[("hostid", host)])["count"], 1);
    assert_eq!(c.ok("listVirtualMachines", &[("state", "Stopped")])["count"].as_i64().unwrap_or(0), 0);
    let vols = c.ok("listVolumes", &[("virtualmachineid", &id)]);
    assert_eq!(vols["count"], 1);
    assert_eq!(vols["volume"][0]["type"], "ROOT");

    let job = |cmd: &str, extra: &[(&str, &str)]| {
        let mut p = vec![("id", id.as_str())];
        p.extend_from_slice(extra);
        let r = c.ok(cmd, &p);
        assert!(r["jobid"].is_string(), "{cmd}: {r}");
        c.wait_job(r["jobid"].as_str().unwrap())
    };
    let j = job("stopVirtualMachine", &[]);
    assert_eq!(j["jobresult"]["virtualmachine"]["state"], "Stopped", "{j}");
    assert!(j["jobresult"]["virtualmachine"].get("hostid").is_none());
    // Stop of a stopped VM is a no-op success.
    assert_eq!(job("stopVirtualMachine", &[])["jobstatus"], 1);
    assert_eq!(job("startVirtualMachine", &[])["jobresult"]["virtualmachine"]["state"], "Running");
    // The start went back to the last host.
    assert_eq!(c.vm(&id)["hostid"], host);
    assert_eq!(job("rebootVirtualMachine", &[])["jobresult"]["virtualmachine"]["state"], "Running");
    let j = job("stopVirtualMachine", &[("forced", "true")]);
    assert_eq!(j["jobstatus"], 1);
    let j = job("rebootVirtualMachine", &[]);
    assert_eq!(j["jobstatus"], 2, "reboot of a stopped VM fails");
    assert_eq!(j["jobresult"]["errorcode"], 431);
    assert!(j["jobresult"]["errortext"].as_str().unwrap().contains("Running"));
    assert_eq!(job("startVirtualMachine", &[])["jobstatus"], 1);
    assert_eq!(job("destroyVirtualMachine", &[])["jobresult"]["virtualmachine"]["state"], "Destroyed");
    assert_eq!(c.vm(&id)["state"], "Destroyed");
    let r = c.ok("recoverVirtualMachine", &[("id", &id)]);
    assert_eq!(r["virtualmachine"]["state"], "Stopped");
    let j = job("destroyVirtualMachine", &[("expunge", "true")]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(c.ok("listVirtualMachines", &[("id", &id)])["count"].as_i64().unwrap_or(0), 0);
    assert_eq!(c.ok("listVolumes", &[("virtualmachineid", &id)])["count"].as_i64().unwrap_or(0), 0);

    let events = c.ok("listEvents", &[]);
    let types: Vec<&str> = events["event"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for t in ["VM.CREATE", "VM.START", "VM.STOP", "VM.REBOOT", "VM.DESTROY", "VM.RECOVER", "VM.EXPUNGE"] {
        assert!(types.contains(&t), "missing event {t}: {types:?}");
    }
    // Ground truth: the agent executed start, stop, start, reboot, stop, start, destroy.
    let ops: Vec<String> = c
        .ledger_entries()
        .iter()
        .filter(|e| e["kind"] == "exec" && e["vm"] == id.as_str())
        .map(|e| e["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["start", "stop", "start", "reboot", "stop", "start", "destroy"]);
    c.assert_ledger_invariants();
}
both!(vm_lifecycle);

fn deploy_stopped_and_paging(b: Backend) {
    let Some(c) = Cloud::start(b, 1) else { return };
    let mut ids = Vec::new();
    for i in 0..7 {
        let (id, j) = c.deploy(&format!("p{i}"), "Small Instance", &[("startvm", "false")]);
        assert_eq!(j["jobresult"]["virtualmachine"]["state"], "Stopped");
        ids.push(id);
    }
    assert!(c.ledger_entries().is_empty(), "startvm=false must not touch a host");
    let l = c.ok("listVirtualMachines", &[("page", "3"), ("pagesize", "3")]);
    assert_eq!(l["count"], 7, "count is the total across pages");
    assert_eq!(l["virtualmachine"].as_array().unwrap().len(), 1);
    assert_eq!(l["virtualmachine"][0]["id"], ids[6].as_str());
    let l = c.ok("listVirtualMachines", &[("page", "9"), ("pagesize", "3")]);
    assert!(l.get("virtualmachine").is_none());
    // Duplicate name in the same account is refused.
    let (z, t, o) = c.ids("Small Instance");
    let (st, v) =
        c.api("deployVirtualMachine", &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "p1")]);
    assert_eq!(st, 431, "{v}");
}
both!(deploy_stopped_and_paging);

fn capacity_and_failures(b: Backend) {
    // One small host (2 cores, 2 GB) and a fault rule for VMs named *bad*.
    let Some(c) = Cloud::start_with(b, 1, &["--host-cpus", "2", "--host-mem-mb", "2048", "--fail", "start=bad"]) else {
        return;
    };
    let before = c.ok("listVirtualMachines", &[])["count"].as_i64().unwrap_or(0);
    let (id, j) = c.deploy("big1", "Medium Instance", &[]);
    assert_eq!(j["jobstatus"], 1, "2 cores / 2 GB fit exactly: {j}");
    assert_eq!(c.vm(&id)["state"], "Running");
    let (id2, j) = c.deploy("big2", "Small Instance", &[]);
    assert_eq!(j["jobstatus"], 2);
    assert_eq!(j["jobresultcode"], 533, "{j}");
    assert_eq!(j["jobresult"]["errorcode"], 533);
    assert!(j["jobresult"]["errortext"].as_str().unwrap().contains("Insufficient capacity"), "{j}");
    assert_eq!(c.vm(&id2)["state"], "Error", "a deploy that cannot be placed leaves the VM in Error");
    // Stop big1, start big2 from Error: it fits now.
    let r = c.ok("stopVirtualMachine", &[("id", &id)]);
    assert_eq!(c.wait_job(r["jobid"].as_str().unwrap())["jobstatus"], 1);
    let r = c.ok("startVirtualMachine", &[("id", &id2)]);
    assert_eq!(c.wait_job(r["jobid"].as_str().unwrap())["jobstatus"], 1);
    assert_eq!(c.vm(&id2)["state"], "Running");
    // A start the hypervisor refuses: the VM is never left half-started.
    let r = c.ok("stopVirtualMachine", &[("id", &id2)]);
    c.wait_job(r["jobid"].as_str().unwrap());
    let (bad, j) = c.deploy("bad1", "Small Instance", &[]);
    assert_eq!(j["jobstatus"], 2, "{j}");
    assert!(j["jobresult"]["errortext"].as_str().unwrap().contains("simulated failure"), "{j}");
    let vm = c.vm(&bad);
    assert_eq!(vm["state"], "Error");
    assert!(vm.get("hostid").is_none() || vm["hostid"].is_null(), "no host held: {vm}");
    let after = c.ok("listVirtualMachines", &[])["count"].as_i64().unwrap_or(0);
    assert_eq!(after, before + 3);
    c.assert_ledger_invariants();
}
both!(capacity_and_failures);

fn bad_input(b: Backend) {
    let Some(c) = Cloud::start(b, 1) else { return };
    let (z, t, o) = c.ids("Small Instance");
    let count = || c.ok("listVirtualMachines", &[])["count"].as_i64().unwrap_or(0);
    let jobs = || c.ok("listAsyncJobs", &[])["count"].as_i64().unwrap_or(0);
    let (vms0, jobs0) = (count(), jobs());

    let err = |st: u16, v: &Value, code: u16, needle: &str| {
        assert_eq!(st, code, "{v}");
        let (k, body) = v.as_object().and_then(|o| o.iter().next()).expect("one key");
        assert!(k.ends_with("response"), "{k}");
        assert_eq!(body["errorcode"], code, "{v}");
        assert!(body["cserrorcode"].is_number());
        assert!(body["errortext"].as_str().unwrap().contains(needle), "{needle} not in {v}");
    };
    let (st, v) = c.api("deployVirtualMachine", &[("zoneid", &z), ("serviceofferingid", &o)]);
    err(st, &v, 431, "missing parameter templateid");
    let (st, v) =
        c.api("deployVirtualMachine", &[("zoneid", "not-a-uuid"), ("templateid", &t), ("serviceofferingid", &o)]);
    err(st, &v, 431, "zoneid");
    let unknown = "3f1e0000-0000-4000-8000-000000000000";
    let (st, v) = c.api("deployVirtualMachine", &[("zoneid", &z), ("templateid", unknown), ("serviceofferingid", &o)]);
    err(st, &v, 431, unknown);
    let (st, v) = c.api(
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "bad name!")],
    );
    err(st, &v, 431, "name");
    let (st, v) = c.api(
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("startvm", "maybe")],
    );
    err(st, &v, 431, "startvm");
    let (st, v) = c.api("stopVirtualMachine", &[("id", unknown)]);
    err(st, &v, 431, unknown);
    let (st, v) = c.api("listVirtualMachines", &[("pagesize", "501")]);
    err(st, &v, 431, "500");
    let (st, v) = c.api("listVirtualMachines", &[("state", "Exploded")]);
    err(st, &v, 431, "state");
    let (st, v) = c.api("updateConfiguration", &[("name", "ping.interval"), ("value", "soon")]);
    err(st, &v, 431, "ping.interval");
    let (st, v) = c.api("updateConfiguration", &[("name", "no.such.setting"), ("value", "1")]);
    err(st, &v, 431, "no.such.setting");
    let (st, v) = c.api("listTemplates", &[]);
    err(st, &v, 431, "templatefilter");
    let (st, v) = c.api("queryAsyncJobResult", &[("jobid", unknown)]);
    err(st, &v, 431, unknown);
    let (st, v) = c.api("noSuchCommand", &[]);
    assert_eq!(st, 401);
    assert!(v["errorresponse"]["errortext"].as_str().unwrap().contains("does not exist"));
    let (st, v) = c.api("listZones", &[("response", "xml")]);
    err(st, &v, 432, "JSON");

    // Authentication failures.
    let wrong = Creds { secret: "wrong".into(), ..c.admin.clone() };
    let (st, v) = c.api_as(&wrong, "listZones", &[]);
    err(st, &v, 401, "unable to verify user credentials");
    let nobody = Creds { api_key: "nobody".into(), ..c.admin.clone() };
    assert_eq!(c.api_as(&nobody, "listZones", &[]).0, 401);
    let mut expired: Vec<(String, String)> = vec![
        ("command".into(), "listZones".into()),
        ("response".into(), "json".into()),
        ("apiKey".into(), c.admin.api_key.clone()),
        ("signatureVersion".into(), "3".into()),
        ("expires".into(), chrono_like_now_plus(-60)),
    ];
    sign_pairs(&mut expired, &c.admin.secret);
    let q: String = expired.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&");
    let (st, v) = get(&format!("{}?{q}", c.base()));
    err(st, &v, 401, "expired");
    // v3 without expires.
    let mut noexp: Vec<(String, String)> = vec![
        ("command".into(), "listZones".into()),
        ("response".into(), "json".into()),
        ("apiKey".into(), c.admin.api_key.clone()),
        ("signatureVersion".into(), "3".into()),
    ];
    sign_pairs(&mut noexp, &c.admin.secret);
    let q: String = noexp.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&");
    assert_eq!(get(&format!("{}?{q}", c.base())).0, 401);
    // Signature v1 (no signatureVersion, no expiry) is accepted.
    let mut v1: Vec<(String, String)> = vec![
        ("command".into(), "listZones".into()),
        ("response".into(), "json".into()),
        ("apiKey".into(), c.admin.api_key.clone()),
    ];
    sign_pairs(&mut v1, &c.admin.secret);
    let q: String = v1.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&");
    assert_eq!(get(&format!("{}?{q}", c.base())).0, 200);
    // No credentials at all.
    assert_eq!(get(&format!("{}?command=listZones&response=json", c.base())).0, 401);

    // Oversized and hostile input: clear errors, never 500.
    let huge = "x".repeat(2 * 1024 * 1024);
    let r = ureq::post(&c.base())
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string(&format!("command=listZones&name={huge}"));
    match r {
        // The server answers as soon as the limit is crossed and closes: the client may still be
        // writing the body and see the connection close instead of reading the answer.
        Err(ureq::Error::Transport(t)) => eprintln!("oversized body: connection closed early ({t})"),
        other => {
            let (st, v) = into(other);
            assert!(st == 430 || st == 431, "{st} {v}");
        }
    }
    assert_eq!(c.api("listZones", &[]).0, 200, "the server is fine after an oversized body");
    let (st, v) = get(&format!("{}?command=listZones&name={}", c.base(), "y".repeat(40 * 1024)));
    assert!(st == 430 || st == 431, "{st} {v}");
    let (st, _) = get(&format!("{}?command=listZones&%ZZ=%FF%FE&response=json", c.base()));
    assert_eq!(st, 401, "garbage encoding is just an unauthenticated request");
    let r = ureq::request("PUT", &c.base()).call();
    assert_eq!(into(r).0, 405);
    let (st, v) = c.api("listVirtualMachines", &[("keyword", "%_'\";--")]);
    assert_eq!(st, 200, "{v}");
    assert_eq!(count(), vms0, "no half-written VM");
    assert_eq!(jobs(), jobs0, "no job row for a refused request");
}
both!(bad_input);

fn sessions_and_visibility(b: Backend) {
    let Some(c) = Cloud::start(b, 1) else { return };
    let user = c.create_user("alice");
    let (admin_vm, _) = c.deploy("adminvm", "Small Instance", &[("startvm", "false")]);
    // An ordinary user deploys and sees only her own VM.
    let (z, t, o) = c.ids("Small Instance");
    let (st, v) = c.api_as(
        &user,
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("name", "alicevm")],
    );
    assert_eq!(st, 200, "{v}");
    let job = v["deployvirtualmachineresponse"]["jobid"].as_str().unwrap().to_string();
    let j = c.wait_job_as(&user, &job);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert!(j["jobresult"]["virtualmachine"].get("hostid").is_none(), "users do not see hosts");
    let (_, l) = c.api_as(&user, "listVirtualMachines", &[]);
    assert_eq!(l["listvirtualmachinesresponse"]["count"], 1);
    assert_eq!(l["listvirtualmachinesresponse"]["virtualmachine"][0]["name"], "alicevm");
    assert_eq!(c.ok("listVirtualMachines", &[])["count"], 2, "admin sees all");
    let (st, _) = c.api_as(&user, "stopVirtualMachine", &[("id", &admin_vm)]);
    assert_eq!(st, 431, "another account's VM does not exist for her");
    let (st, v) = c.api_as(&user, "listHosts", &[]);
    assert_eq!(st, 401, "admin-only: {v}");
    let (st, _) = c.api_as(&user, "updateConfiguration", &[("name", "ping.interval"), ("value", "3")]);
    assert_eq!(st, 401);
    let (st, _) = c.api_as(
        &user,
        "deployVirtualMachine",
        &[("zoneid", &z), ("templateid", &t), ("serviceofferingid", &o), ("hostid", &z)],
    );
    assert_eq!(st, 531, "only admins choose hosts");
    let (_, jq) = c.api_as(&user, "queryAsyncJobResult", &[("jobid", &job)]);
    assert_eq!(jq["queryasyncjobresultresponse"]["jobstatus"], 1);

    // Login with a password: cookie + sessionkey, then logout.
    let agent = ureq::AgentBuilder::new().build();
    let login = |pw: &str| {
        into(
            agent
                .post(&format!("{}?command=login&username=alice&password={pw}&domain=%2F&response=json", c.base()))
                .send_string(""),
        )
    };
    let (st, v) = login("nope");
    assert_eq!(st, 531, "{v}");
    let (st, v) = login("pw-of-user");
    assert_eq!(st, 200, "{v}");
    let key = v["loginresponse"]["sessionkey"].as_str().unwrap().to_string();
    assert_eq!(v["loginresponse"]["username"], "alice");
    let list = |k: &str| {
        into(agent.get(&format!("{}?command=listVirtualMachines&response=json&sessionkey={k}", c.base())).call())
    };
    let (st, v) = list(&key);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["listvirtualmachinesresponse"]["count"], 1);
    assert_eq!(list("forged").0, 401, "the sessionkey must match the session");
    // The cookie alone (no sessionkey) is not enough for a command.
    assert_eq!(into(agent.get(&format!("{}?command=listZones&response=json", c.base())).call()).0, 401);
    let (st, _) = into(agent.get(&format!("{}?command=logout&response=json&sessionkey={key}", c.base())).call());
    assert_eq!(st, 200);
    assert_eq!(list(&key).0, 401, "logged out");
}
both!(sessions_and_visibility);

fn admin_views_and_settings(b: Backend) {
    let Some(mut c) = Cloud::start(b, 3) else { return };
    let caps = c.ok("listCapabilities", &[]);
    assert!(caps["capability"]["cloudstackversion"].is_string());
    let apis = c.ok("listApis", &[]);
    let names: Vec<&str> = apis["api"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    for n in ["deployVirtualMachine", "queryAsyncJobResult", "listZones", "listNetworks"] {
        assert!(names.contains(&n), "{n}");
    }
    assert_eq!(apis["count"].as_u64().unwrap() as usize, names.len());
    let empty = c.ok("listNetworks", &[]);
    assert_eq!(empty, serde_json::json!({}), "unmodelled lists are valid and empty");
    assert_eq!(c.ok("listPods", &[])["count"], 1);
    assert_eq!(c.ok("listClusters", &[])["count"], 1);
    let hosts = c.ok("listHosts", &[]);
    assert_eq!(hosts["count"], 3);
    let ms = c.ok("listManagementServers", &[]);
    assert_eq!(ms["count"], 1);
    assert_eq!(ms["managementserver"][0]["state"], "Up");
    assert_eq!(ms["managementserver"][0]["agentcount"], 3);

    // Disable two hosts: new VMs go to the third; an admin's explicit hostid on a disabled host fails.
    let ids: Vec<String> =
        hosts["host"].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap().to_string()).collect();
    for h in &ids[..2] {
        let r = c.ok("updateHost", &[("id", h), ("allocationstate", "Disable")]);
        assert_eq!(r["host"]["resourcestate"], "Disabled");
    }
    for i in 0..3 {
        let (_, j) = c.deploy(&format!("d{i}"), "Small Instance", &[]);
        assert_eq!(j["jobresult"]["virtualmachine"]["hostid"], ids[2].as_str(), "{j}");
    }
    let (_, j) = c.deploy("pinned", "Small Instance", &[("hostid", &ids[0])]);
    assert_eq!(j["jobstatus"], 2);
    assert_eq!(j["jobresultcode"], 534, "{j}");
    let (st, _) = c.api("updateHost", &[("id", &ids[0]), ("allocationstate", "Sideways")]);
    assert_eq!(st, 431);

    // Settings: change, read back, applied without restart, validated.
    let r = c.ok("updateConfiguration", &[("name", "indirect.agent.lb.algorithm"), ("value", "RoundRobin")]);
    assert_eq!(r["configuration"]["value"], "roundrobin");
    let l = c.ok("listConfigurations", &[("name", "indirect.agent.lb.algorithm")]);
    assert_eq!(l["configuration"][0]["value"], "roundrobin");
    let l = c.ok("listConfigurations", &[("keyword", "ping")]);
    assert!(l["count"].as_i64().unwrap() >= 2);
    // A second server on the same database sees the change without restart.
    let second = c.start_server("ms2");
    let port = c.servers[second].1;
    c.api_port = port;
    let l = c.ok("listConfigurations", &[("name", "indirect.agent.lb.algorithm")]);
    assert_eq!(l["configuration"][0]["value"], "roundrobin");
    c.ok("updateConfiguration", &[("name", "default.page.size"), ("value", "2")]);
    c.api_port = c.servers[0].1;
    let got = wait_for(std::time::Duration::from_secs(10), || {
        let (st, v) = c.api("listVirtualMachines", &[]);
        (st == 200 && v["listvirtualmachinesresponse"]["virtualmachine"].as_array().map(|a| a.len()) == Some(2))
            .then_some(())
    });
    assert!(got.is_some(), "default.page.size changed on ms2 applies on ms1 without restart");
    let (st, _) = c.api("listVirtualMachines", &[("pagesize", "3")]);
    assert_eq!(st, 431);
    assert_eq!(c.ok("listManagementServers", &[])["count"], 2);
}
both!(admin_views_and_settings);

fn jobs_on_one_vm_run_in_order(b: Backend) {
    let Some(c) = Cloud::start(b, 2) else { return };
    let (id, _) = c.deploy("ordered", "Small Instance", &[]);
    // Queue five jobs at once; they run one at a time in submission order.
    let mut jobs = Vec::new();
    for cmd in [
        "stopVirtualMachine",
        "startVirtualMachine",
        "rebootVirtualMachine",
        "stopVirtualMachine",
        "startVirtualMachine",
    ] {
        let r = c.ok(cmd, &[("id", &id)]);
        jobs.push(r["jobid"].as_str().unwrap().to_string());
    }
    for j in &jobs {
        assert_eq!(c.wait_job(j)["jobstatus"], 1);
    }
    let ops: Vec<String> = c
        .ledger_entries()
        .iter()
        .filter(|e| e["kind"] == "exec" && e["vm"] == id.as_str())
        .map(|e| e["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["start", "stop", "start", "reboot", "stop", "start"]);
    let all = c.ok("listAsyncJobs", &[]);
    assert!(all["count"].as_i64().unwrap() >= 6);
    c.assert_ledger_invariants();
}
both!(jobs_on_one_vm_run_in_order);

#[test]
fn health_and_readiness() {
    let Some(mut c) = Cloud::start(Backend::Sqlite, 0) else { return };
    let (st, v) = get(&format!("http://127.0.0.1:{}/health", c.api_port));
    assert_eq!(st, 200, "{v}");
    let (st, v) = get(&format!("http://127.0.0.1:{}/ready", c.api_port));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["database"], true);
    // SIGTERM: the server drains and leaves the cluster.
    c.servers[0].0.term();
    let st = c.servers[0].0.wait_exit(std::time::Duration::from_secs(30)).expect("server exits on SIGTERM");
    assert!(st.success(), "{st}");
}
