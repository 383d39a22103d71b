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

/// A CloudStack error answer: HTTP status = errorcode, one `<cmd>response` key, the text names `needle`.
fn assert_cs_error(st: u16, v: &Value, code: u16, needle: &str) {
    assert_eq!(st, code, "{v}");
    let (k, body) = v.as_object().and_then(|o| o.iter().next()).expect("one key");
    assert!(k.ends_with("response"), "{k}");
    assert_eq!(body["errorcode"], code, "{v}");
    assert!(body["errortext"].as_str().unwrap_or("").contains(needle), "{needle} not in {v}");
}

fn create_zone_pod_cluster(b: Backend) {
    let Some(c) = Cloud::start(b, 1) else { return };
    let zone1 = c.ok("listZones", &[])["zone"][0].clone();
    let pod1 = c.ok("listPods", &[])["pod"][0].clone();
    let z1 = zone1["id"].as_str().unwrap().to_string();

    // The new commands are in the catalogue cloudmonkey syncs, for admins only.
    let names = |v: &Value, key: &str| -> Vec<String> {
        v[key]["api"]
            .as_array()
            .map(|a| a.iter().map(|x| x["name"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let (_, apis) = c.api("listApis", &[]);
    for n in ["createZone", "createPod", "addCluster"] {
        assert!(names(&apis, "listapisresponse").iter().any(|x| x == n), "{n} in listApis");
    }
    let user = c.create_user("bob");
    let (_, apis) = c.api_as(&user, "listApis", &[]);
    assert!(!names(&apis, "listapisresponse").iter().any(|x| x == "createZone"), "admin-only");

    // Zone, pod, cluster: created synchronously, shown as the list commands show them.
    let z = c.ok(
        "createZone",
        &[
            ("name", "Zone2"),
            ("networktype", "advanced"),
            ("dns1", "8.8.4.4"),
            ("internaldns1", "10.2.0.1"),
            ("dns2", "1.1.1.1"),
            ("allocationstate", "Enabled"),
        ],
    )["zone"]
        .clone();
    assert_eq!(z["name"], "Zone2");
    assert_eq!(z["networktype"], "Advanced");
    assert_eq!(z["dns1"], "8.8.4.4");
    assert_eq!(z["internaldns1"], "10.2.0.1");
    assert_eq!(z["allocationstate"], "Enabled");
    let z2 = z["id"].as_str().unwrap().to_string();
    let l = c.ok("listZones", &[]);
    assert_eq!(l["count"], 2);
    assert_eq!(c.ok("listZones", &[("id", &z2)])["zone"][0], z, "createZone answers what listZones shows");

    let pod = c.ok(
        "createPod",
        &[
            ("name", "Pod2"),
            ("zoneid", &z2),
            ("gateway", "10.2.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.2.0.10"),
            ("endip", "10.2.0.20"),
        ],
    )["pod"]
        .clone();
    assert_eq!(pod["zoneid"], z2.as_str());
    assert_eq!(pod["zonename"], "Zone2");
    assert_eq!(pod["startip"][0], "10.2.0.10");
    assert_eq!(pod["endip"][0], "10.2.0.20");
    assert_eq!(pod["allocationstate"], "Enabled");
    let p2 = pod["id"].as_str().unwrap().to_string();
    let l = c.ok("listPods", &[("zoneid", &z2)]);
    assert_eq!(l["count"], 1);
    assert_eq!(l["pod"][0], pod);

    let (st, v) = c.api(
        "addCluster",
        &[
            ("clustername", "Cluster2"),
            ("clustertype", "CloudManaged"),
            ("hypervisor", "Simulator"),
            ("podid", &p2),
            ("zoneid", &z2),
        ],
    );
    assert_eq!(st, 200, "{v}");
    // CloudStack's addCluster answers a list.
    let r = &v["addclusterresponse"];
    assert_eq!(r["count"], 1, "{v}");
    let cl = r["cluster"][0].clone();
    assert_eq!(cl["name"], "Cluster2");
    assert_eq!(cl["podid"], p2.as_str());
    assert_eq!(cl["podname"], "Pod2");
    assert_eq!(cl["zoneid"], z2.as_str());
    assert_eq!(cl["zonename"], "Zone2");
    assert_eq!(cl["hypervisortype"], "Simulator");
    assert_eq!(cl["allocationstate"], "Enabled");
    let l = c.ok("listClusters", &[("podid", &p2)]);
    assert_eq!(l["count"], 1);
    assert_eq!(l["cluster"][0], cl);
    assert_eq!(c.ok("listClusters", &[])["count"], 2);

    // Pod names are unique per zone only; ranges may not overlap within a zone only.
    let pod_in_zone1 = c.ok(
        "createPod",
        &[
            ("name", "Pod2"),
            ("zoneid", &z1),
            ("gateway", "10.2.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.2.0.30"),
            ("endip", "10.2.0.40"),
            ("allocationstate", "Disabled"),
        ],
    )["pod"]
        .clone();
    assert_eq!(pod_in_zone1["allocationstate"], "Disabled");
    // Cluster names are unique per pod only.
    let (st, v) = c.api(
        "addCluster",
        &[
            ("clustername", "Cluster2"),
            ("clustertype", "CloudManaged"),
            ("hypervisor", "simulator"),
            ("podid", pod_in_zone1["id"].as_str().unwrap()),
            ("zoneid", &z1),
        ],
    );
    assert_eq!(st, 200, "{v}");

    let events = c.ok("listEvents", &[]);
    let count_of = |t: &str| events["event"].as_array().unwrap().iter().filter(|e| e["type"] == t).count();
    assert_eq!((count_of("ZONE.CREATE"), count_of("POD.CREATE"), count_of("CLUSTER.CREATE")), (1, 2, 2));

    // Refusals: clear 431s naming the parameter or the name, nothing written.
    let zone = |extra: &[(&str, &str)]| {
        let mut p =
            vec![("name", "Zone9"), ("networktype", "Basic"), ("dns1", "8.8.8.8"), ("internaldns1", "10.9.0.1")];
        overridden(&mut p, extra);
        c.api("createZone", &p)
    };
    let (st, v) = zone(&[("name", "")]);
    assert_cs_error(st, &v, 431, "missing parameter name");
    let (st, v) = zone(&[("internaldns1", "")]);
    assert_cs_error(st, &v, 431, "missing parameter internaldns1");
    let (st, v) = zone(&[("networktype", "Sideways")]);
    assert_cs_error(st, &v, 431, "networktype");
    let (st, v) = zone(&[("dns1", "8.8.8")]);
    assert_cs_error(st, &v, 431, "dns1");
    let (st, v) = zone(&[("dns2", "not-an-ip")]);
    assert_cs_error(st, &v, 431, "dns2");
    let (st, v) = zone(&[("allocationstate", "Maybe")]);
    assert_cs_error(st, &v, 431, "allocationstate");
    let (st, v) = zone(&[("name", "zone2")]);
    assert_cs_error(st, &v, 431, "zone2 already exists");
    let (st, v) = zone(&[("name", "   ")]);
    assert_cs_error(st, &v, 431, "name");
    let (st, v) = zone(&[("domainid", &z1)]);
    assert_cs_error(st, &v, 432, "domainid");

    let pod = |extra: &[(&str, &str)]| {
        let mut p = vec![
            ("name", "Pod9"),
            ("zoneid", z2.as_str()),
            ("gateway", "10.2.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.2.0.100"),
            ("endip", "10.2.0.110"),
        ];
        overridden(&mut p, extra);
        c.api("createPod", &p)
    };
    let (st, v) = pod(&[("netmask", "")]);
    assert_cs_error(st, &v, 431, "missing parameter netmask");
    let unknown = "3f1e0000-0000-4000-8000-000000000000";
    let (st, v) = pod(&[("zoneid", unknown)]);
    assert_cs_error(st, &v, 431, unknown);
    let (st, v) = pod(&[("zoneid", "zone-two")]);
    assert_cs_error(st, &v, 431, "zoneid");
    let (st, v) = pod(&[("name", "pod2")]);
    assert_cs_error(st, &v, 431, "pod2 already exists in zone Zone2");
    let (st, v) = pod(&[("gateway", "10.2.0.300")]);
    assert_cs_error(st, &v, 431, "gateway");
    let (st, v) = pod(&[("netmask", "255.0.255.0")]);
    assert_cs_error(st, &v, 431, "netmask");
    let (st, v) = pod(&[("startip", "10.2.0.120")]);
    assert_cs_error(st, &v, 431, "endip");
    let (st, v) = pod(&[("startip", "10.3.0.100")]);
    assert_cs_error(st, &v, 431, "startip");
    let (st, v) = pod(&[("gateway", "10.2.0.105")]);
    assert_cs_error(st, &v, 431, "gateway");
    let (st, v) = pod(&[("startip", "10.2.0.15"), ("endip", "10.2.0.25")]);
    assert_cs_error(st, &v, 431, "overlaps the range 10.2.0.10-10.2.0.20 of pod Pod2");
    let (st, v) = pod(&[("gateway", "10.0.0.1"), ("netmask", "255.0.0.0"), ("startip", "10.0.0.2"), ("endip", "")]);
    assert_cs_error(st, &v, 431, "at most 65536");

    let cluster = |extra: &[(&str, &str)]| {
        let mut p = vec![
            ("clustername", "Cluster9"),
            ("clustertype", "CloudManaged"),
            ("hypervisor", "Simulator"),
            ("podid", p2.as_str()),
            ("zoneid", z2.as_str()),
        ];
        overridden(&mut p, extra);
        c.api("addCluster", &p)
    };
    let (st, v) = cluster(&[("clustername", "")]);
    assert_cs_error(st, &v, 431, "missing parameter clustername");
    let (st, v) = cluster(&[("podid", "")]);
    assert_cs_error(st, &v, 431, "missing parameter podid");
    let (st, v) = cluster(&[("hypervisor", "KVM")]);
    assert_cs_error(st, &v, 431, "hypervisor");
    let (st, v) = cluster(&[("clustertype", "ExternalManaged")]);
    assert_cs_error(st, &v, 431, "clustertype");
    let (st, v) = cluster(&[("podid", pod1["id"].as_str().unwrap())]);
    assert_cs_error(st, &v, 431, "does not belong to zone Zone2");
    let (st, v) = cluster(&[("podid", unknown)]);
    assert_cs_error(st, &v, 431, unknown);
    let (st, v) = cluster(&[("clustername", "CLUSTER2")]);
    assert_cs_error(st, &v, 431, "CLUSTER2 already exists in pod Pod2");

    // Ordinary users get CloudStack's answer for an admin command.
    for (cmd, params) in [
        (
            "createZone",
            vec![("name", "Zone8"), ("networktype", "Basic"), ("dns1", "8.8.8.8"), ("internaldns1", "10.8.0.1")],
        ),
        (
            "createPod",
            vec![
                ("name", "Pod8"),
                ("zoneid", &z2),
                ("gateway", "10.2.1.1"),
                ("netmask", "255.255.255.0"),
                ("startip", "10.2.1.10"),
            ],
        ),
        (
            "addCluster",
            vec![
                ("clustername", "C8"),
                ("clustertype", "CloudManaged"),
                ("hypervisor", "Simulator"),
                ("podid", &p2),
                ("zoneid", &z2),
            ],
        ),
    ] {
        let (st, v) = c.api_as(&user, cmd, &params);
        assert_cs_error(st, &v, 401, "not available for user");
    }

    // Nothing was written by a refusal.
    assert_eq!(c.ok("listZones", &[])["count"], 2);
    assert_eq!(c.ok("listPods", &[])["count"], 3);
    assert_eq!(c.ok("listClusters", &[])["count"], 3);
    let events = c.ok("listEvents", &[]);
    let count_of = |t: &str| events["event"].as_array().unwrap().iter().filter(|e| e["type"] == t).count();
    assert_eq!((count_of("ZONE.CREATE"), count_of("POD.CREATE"), count_of("CLUSTER.CREATE")), (1, 2, 2));

    // A zone is Disabled unless asked (CloudStack's default): users do not see it.
    let z3 = c.ok(
        "createZone",
        &[("name", "Zone3"), ("networktype", "Basic"), ("dns1", "8.8.8.8"), ("internaldns1", "10.3.0.1")],
    )["zone"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(c.ok("listZones", &[("id", &z3)])["zone"][0]["allocationstate"], "Disabled");
    let (_, v) = c.api_as(&user, "listZones", &[]);
    let seen: Vec<&str> =
        v["listzonesresponse"]["zone"].as_array().unwrap().iter().map(|z| z["name"].as_str().unwrap()).collect();
    assert!(seen.contains(&"Zone2") && !seen.contains(&"Zone3"), "{seen:?}");
    // A pod without endip runs to the end of its subnet.
    let p3 = c.ok(
        "createPod",
        &[
            ("name", "Pod3"),
            ("zoneid", &z3),
            ("gateway", "10.3.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.3.0.10"),
        ],
    );
    assert_eq!(p3["pod"]["endip"][0], "10.3.0.254");

    // Deploying into the new zone: the cross-zone templates are offered there, the VM gets an
    // address of the new pod, and with no host there the job fails for capacity (533), not 530.
    let (_, t, o) = c.ids("Small Instance");
    let l = c.ok("listTemplates", &[("templatefilter", "featured"), ("zoneid", &z2)]);
    assert!(
        l["template"].as_array().unwrap().iter().any(|x| x["id"] == t.as_str() && x["zoneid"] == z2.as_str()),
        "{l}"
    );
    let r = c.ok(
        "deployVirtualMachine",
        &[("zoneid", &z2), ("templateid", &t), ("serviceofferingid", &o), ("name", "far1")],
    );
    let j = c.wait_job(r["jobid"].as_str().unwrap());
    assert_eq!(j["jobstatus"], 2, "{j}");
    assert_eq!(j["jobresultcode"], 533, "{j}");
    assert!(j["jobresult"]["errortext"].as_str().unwrap().contains("Zone2"), "{j}");
    let vm = c.vm(r["id"].as_str().unwrap());
    assert_eq!(vm["state"], "Error");
    assert_eq!(vm["zoneid"], z2.as_str());
    let ip = vm["nic"][0]["ipaddress"].as_str().unwrap_or("");
    assert!(ip.starts_with("10.2.0.") && ip != "10.2.0.1", "an address of Pod2: {ip}");
    // A zone without any pod has no address to give: refused at once, for capacity.
    let z4 = c.ok(
        "createZone",
        &[("name", "Zone4"), ("networktype", "Basic"), ("dns1", "8.8.8.8"), ("internaldns1", "10.4.0.1")],
    )["zone"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, v) = c.api(
        "deployVirtualMachine",
        &[("zoneid", &z4), ("templateid", &t), ("serviceofferingid", &o), ("name", "far2")],
    );
    assert_cs_error(st, &v, 533, "zone Zone4 has no Enabled pod with a guest IP range");
    // The seeded zone still works as before.
    let (_, j) = c.deploy("near1", "Small Instance", &[]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["zoneid"], z1.as_str());
}
both!(create_zone_pod_cluster);

fn update_zone_pod_cluster(b: Backend) {
    let Some(c) = Cloud::start(b, 1) else { return };
    let zone1 = c.ok("listZones", &[])["zone"][0].clone();
    let pod1 = c.ok("listPods", &[])["pod"][0].clone();
    let user = c.create_user("carol");

    // In the catalogue cloudmonkey syncs, for admins only.
    let names = |v: &Value| -> Vec<String> {
        v["listapisresponse"]["api"]
            .as_array()
            .map(|a| a.iter().map(|x| x["name"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let (_, apis) = c.api("listApis", &[]);
    let (_, user_apis) = c.api_as(&user, "listApis", &[]);
    for n in ["updateZone", "updatePod", "updateCluster"] {
        assert!(names(&apis).iter().any(|x| x == n), "{n} in listApis");
        assert!(!names(&user_apis).iter().any(|x| x == n), "{n} is admin-only");
    }

    // A zone created without allocationstate is Disabled (hidden from users) until updateZone
    // enables it: the operator has a way out.
    let z = c.ok(
        "createZone",
        &[("name", "ZoneU"), ("networktype", "Advanced"), ("dns1", "8.8.8.8"), ("internaldns1", "10.5.0.1")],
    )["zone"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let user_zones = || -> Vec<String> {
        let (_, v) = c.api_as(&user, "listZones", &[]);
        v["listzonesresponse"]["zone"]
            .as_array()
            .map(|a| a.iter().map(|z| z["name"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    assert!(!user_zones().contains(&"ZoneU".to_string()));
    let updated = c.ok("updateZone", &[("id", &z), ("allocationstate", "Enabled")])["zone"].clone();
    assert_eq!(updated["allocationstate"], "Enabled", "{updated}");
    assert_eq!(updated["name"], "ZoneU");
    assert_eq!(c.ok("listZones", &[("id", &z)])["zone"][0], updated, "updateZone answers what listZones shows");
    assert!(user_zones().contains(&"ZoneU".to_string()), "{:?}", user_zones());
    // Rename (a change of case of its own name is no collision) and new DNS servers.
    let updated = c
        .ok("updateZone", &[("id", &z), ("name", "ZONEU"), ("dns1", "1.1.1.1"), ("internaldns1", "10.5.0.2")])["zone"]
        .clone();
    assert_eq!(
        (&updated["name"], &updated["dns1"], &updated["internaldns1"]),
        (&"ZONEU".into(), &"1.1.1.1".into(), &"10.5.0.2".into())
    );
    let updated = c.ok("updateZone", &[("id", &z), ("name", "ZoneV")])["zone"].clone();
    assert_eq!(c.ok("listZones", &[("id", &z)])["zone"][0], updated);

    let unknown = "3f1e0000-0000-4000-8000-000000000000";
    let (st, v) = c.api("updateZone", &[("name", "ZoneX")]);
    assert_cs_error(st, &v, 431, "missing parameter id");
    let (st, v) = c.api("updateZone", &[("id", unknown), ("name", "ZoneX")]);
    assert_cs_error(st, &v, 431, unknown);
    let (st, v) = c.api("updateZone", &[("id", &z), ("allocationstate", "Maybe")]);
    assert_cs_error(st, &v, 431, "allocationstate");
    let zone1_name = zone1["name"].as_str().unwrap().to_uppercase();
    let (st, v) = c.api("updateZone", &[("id", &z), ("name", &zone1_name)]);
    assert_cs_error(st, &v, 431, "already exists");
    let (st, v) = c.api("updateZone", &[("id", &z), ("name", " padded ")]);
    assert_cs_error(st, &v, 431, "name");
    let (st, v) = c.api("updateZone", &[("id", &z), ("dns1", "8.8.8")]);
    assert_cs_error(st, &v, 431, "dns1");
    let (st, v) = c.api("updateZone", &[("id", &z), ("dns2", "8.8.4.4"), ("name", "ZoneX")]);
    assert_cs_error(st, &v, 432, "dns2");
    let (st, v) = c.api("updateZone", &[("id", &z), ("localstorageenabled", "false")]);
    assert_cs_error(st, &v, 432, "localstorageenabled");

    // Pods: names unique within their zone only; the address range cannot change.
    let mk_pod = |name: &str, start: &str, end: &str| -> String {
        c.ok(
            "createPod",
            &[
                ("name", name),
                ("zoneid", &z),
                ("gateway", "10.5.0.1"),
                ("netmask", "255.255.255.0"),
                ("startip", start),
                ("endip", end),
            ],
        )["pod"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let p = mk_pod("PodU", "10.5.0.10", "10.5.0.20");
    let pw = mk_pod("PodW", "10.5.0.30", "10.5.0.40");
    let updated = c.ok("updatePod", &[("id", &p), ("name", "PodV"), ("allocationstate", "Disabled")])["pod"].clone();
    assert_eq!((&updated["name"], &updated["allocationstate"]), (&"PodV".into(), &"Disabled".into()), "{updated}");
    assert_eq!(updated["zonename"], "ZoneV");
    assert_eq!(c.ok("listPods", &[("id", &p)])["pod"][0], updated, "updatePod answers what listPods shows");
    // The current range given back is no change.
    let same = c.ok(
        "updatePod",
        &[("id", &p), ("gateway", "10.5.0.1"), ("startip", "10.5.0.10"), ("allocationstate", "Enabled")],
    );
    assert_eq!(same["pod"]["allocationstate"], "Enabled");
    let (st, v) = c.api("updatePod", &[("id", &p), ("endip", "10.5.0.25")]);
    assert_cs_error(st, &v, 432, "endip");
    let (st, v) = c.api("updatePod", &[("id", &p), ("startip", "ten")]);
    assert_cs_error(st, &v, 431, "startip");
    let (st, v) = c.api("updatePod", &[("id", &pw), ("name", "podv")]);
    assert_cs_error(st, &v, 431, "podv already exists in zone ZoneV");
    let (st, v) = c.api("updatePod", &[("id", &pw), ("allocationstate", "Off")]);
    assert_cs_error(st, &v, 431, "allocationstate");
    let (st, v) = c.api("updatePod", &[("id", unknown), ("name", "PodX")]);
    assert_cs_error(st, &v, 431, unknown);
    // Another zone's pod name is free here.
    let pod1_name = pod1["name"].as_str().unwrap();
    assert_eq!(c.ok("updatePod", &[("id", &pw), ("name", pod1_name)])["pod"]["name"], pod1_name);

    // Clusters: names unique within their pod only; only what a Skyhold cluster is.
    let mk_cluster = |name: &str, pod: &str| -> String {
        c.ok(
            "addCluster",
            &[
                ("clustername", name),
                ("clustertype", "CloudManaged"),
                ("hypervisor", "Simulator"),
                ("podid", pod),
                ("zoneid", &z),
            ],
        )["cluster"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let cl = mk_cluster("ClusterU", &p);
    let cw = mk_cluster("ClusterW", &p);
    mk_cluster("ClusterV2", &pw);
    let updated =
        c.ok("updateCluster", &[("id", &cl), ("clustername", "ClusterV"), ("allocationstate", "Disabled")])["cluster"]
            .clone();
    assert_eq!((&updated["name"], &updated["allocationstate"]), (&"ClusterV".into(), &"Disabled".into()), "{updated}");
    assert_eq!((&updated["podname"], &updated["zonename"]), (&"PodV".into(), &"ZoneV".into()));
    assert_eq!(
        c.ok("listClusters", &[("id", &cl)])["cluster"][0],
        updated,
        "updateCluster answers what listClusters shows"
    );
    let same = c.ok(
        "updateCluster",
        &[("id", &cl), ("hypervisor", "simulator"), ("clustertype", "CloudManaged"), ("managedstate", "Managed")],
    );
    assert_eq!(same["cluster"], updated, "values a Skyhold cluster already has change nothing");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("clustername", "CLUSTERV")]);
    assert_cs_error(st, &v, 431, "CLUSTERV already exists in pod PodV");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("hypervisor", "KVM")]);
    assert_cs_error(st, &v, 431, "hypervisor");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("clustertype", "ExternalManaged")]);
    assert_cs_error(st, &v, 431, "clustertype");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("managedstate", "Unmanaged")]);
    assert_cs_error(st, &v, 432, "managedstate");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("managedstate", "Sometimes")]);
    assert_cs_error(st, &v, 431, "managedstate");
    let (st, v) = c.api("updateCluster", &[("id", &cw), ("allocationstate", "enable-ish")]);
    assert_cs_error(st, &v, 431, "allocationstate");
    let (st, v) = c.api("updateCluster", &[("id", unknown), ("allocationstate", "Enabled")]);
    assert_cs_error(st, &v, 431, unknown);
    // The name of a cluster of another pod is free here.
    assert_eq!(c.ok("updateCluster", &[("id", &cw), ("clustername", "ClusterV2")])["cluster"]["name"], "ClusterV2");

    // Ordinary users get CloudStack's answer for an admin command.
    for (cmd, id) in [("updateZone", &z), ("updatePod", &p), ("updateCluster", &cl)] {
        let (st, v) = c.api_as(&user, cmd, &[("id", id), ("allocationstate", "Enabled")]);
        assert_cs_error(st, &v, 401, "not available for user");
    }

    // Nothing was written by a refusal; one event per change, none for an update that changes nothing.
    assert_eq!(c.ok("listZones", &[("id", &z)])["zone"][0]["name"], "ZoneV");
    assert_eq!(c.ok("listPods", &[("id", &p)])["pod"][0]["endip"][0], "10.5.0.20");
    assert_eq!(c.ok("listClusters", &[("id", &cl)])["cluster"][0]["allocationstate"], "Disabled");
    assert_eq!(c.ok("listClusters", &[("id", &cw)])["cluster"][0]["name"], "ClusterV2");
    let events = c.ok("listEvents", &[]);
    let count_of = |t: &str| events["event"].as_array().unwrap().iter().filter(|e| e["type"] == t).count();
    assert_eq!((count_of("ZONE.EDIT"), count_of("POD.EDIT"), count_of("CLUSTER.EDIT")), (3, 3, 2));
}
both!(update_zone_pod_cluster);

fn disabled_cluster_takes_no_new_vms(b: Backend) {
    let Some(mut c) = Cloud::start(b, 1) else { return };
    // A second zone with a pod and a cluster, and an agent whose host joins that cluster.
    let z2 = c.ok(
        "createZone",
        &[
            ("name", "Zone2"),
            ("networktype", "Advanced"),
            ("dns1", "8.8.8.8"),
            ("internaldns1", "10.2.0.1"),
            ("allocationstate", "Enabled"),
        ],
    )["zone"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p2 = c.ok(
        "createPod",
        &[
            ("name", "Pod2"),
            ("zoneid", &z2),
            ("gateway", "10.2.0.1"),
            ("netmask", "255.255.255.0"),
            ("startip", "10.2.0.10"),
            ("endip", "10.2.0.60"),
        ],
    )["pod"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cl2 = c.ok(
        "addCluster",
        &[
            ("clustername", "Cluster2"),
            ("clustertype", "CloudManaged"),
            ("hypervisor", "Simulator"),
            ("podid", &p2),
            ("zoneid", &z2),
        ],
    )["cluster"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    c.start_agent("agent2", 1, &["--zone", "Zone2", "--cluster", "Cluster2"]);
    c.wait_hosts_up(2);
    let h2 = c.ok("listHosts", &[("clusterid", &cl2)])["host"][0]["id"].as_str().expect("host in Cluster2").to_string();

    let (_, t, o) = c.ids("Small Instance");
    let deploy = |name: &str, extra: &[(&str, &str)]| -> (String, Value) {
        let mut p = vec![
            ("zoneid", z2.as_str()),
            ("templateid", t.as_str()),
            ("serviceofferingid", o.as_str()),
            ("name", name),
        ];
        p.extend_from_slice(extra);
        let r = c.ok("deployVirtualMachine", &p);
        let j = c.wait_job(r["jobid"].as_str().unwrap());
        (r["id"].as_str().unwrap().to_string(), j)
    };
    let job = |cmd: &str, id: &str| c.wait_job(c.ok(cmd, &[("id", id)])["jobid"].as_str().unwrap());

    // Cluster2 Disabled: its only host takes no new VM; the job fails for capacity (533).
    c.ok("updateCluster", &[("id", &cl2), ("allocationstate", "Disabled")]);
    let (vm1, j) = deploy("dis1", &[]);
    assert_eq!(j["jobstatus"], 2, "{j}");
    assert_eq!(j["jobresultcode"], 533, "{j}");
    assert_eq!(c.vm(&vm1)["state"], "Error");
    // An administrator's explicit host is still honoured (as CloudStack lets root admins do).
    let (vm2, j) = deploy("pinned", &[("hostid", &h2)]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["hostid"], h2.as_str());
    // A running VM is left alone; once stopped, starting it again (without a host) is refused.
    assert_eq!(job("stopVirtualMachine", &vm2)["jobstatus"], 1);
    let j = job("startVirtualMachine", &vm2);
    assert_eq!((j["jobstatus"].clone(), j["jobresultcode"].clone()), (2.into(), 533.into()), "{j}");
    assert_eq!(c.vm(&vm2)["state"], "Stopped");

    // Enabled again: deployments and starts land there.
    let r = c.ok("updateCluster", &[("id", &cl2), ("allocationstate", "Enabled")]);
    assert_eq!(r["cluster"]["allocationstate"], "Enabled");
    let (_, j) = deploy("en1", &[]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["hostid"], h2.as_str());
    let j = job("startVirtualMachine", &vm2);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["hostid"], h2.as_str());

    // A Disabled pod counts as its clusters being Disabled.
    assert_eq!(job("stopVirtualMachine", &vm2)["jobstatus"], 1);
    c.ok("updatePod", &[("id", &p2), ("allocationstate", "Disabled")]);
    let j = job("startVirtualMachine", &vm2);
    assert_eq!((j["jobstatus"].clone(), j["jobresultcode"].clone()), (2.into(), 533.into()), "{j}");
    // An admin's explicit host in the Disabled pod: allowed, with an address of that pod.
    let (_, j) = deploy("pinned-disabled-pod", &[("hostid", &h2)]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    assert_eq!(j["jobresult"]["virtualmachine"]["hostid"], h2.as_str());
    c.ok("updatePod", &[("id", &p2), ("allocationstate", "Enabled")]);
    assert_eq!(job("startVirtualMachine", &vm2)["jobstatus"], 1);

    // The first zone was never affected.
    let (_, j) = c.deploy("near1", "Small Instance", &[]);
    assert_eq!(j["jobstatus"], 1, "{j}");
    c.assert_ledger_invariants();
}
both!(disabled_cluster_takes_no_new_vms);

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

/// Replace the parameters of `p` named in `extra` by theirs; an empty value removes the parameter.
fn overridden<'a>(p: &mut Vec<(&'a str, &'a str)>, extra: &[(&'a str, &'a str)]) {
    p.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    p.extend(extra.iter().filter(|(_, v)| !v.is_empty()));
}
