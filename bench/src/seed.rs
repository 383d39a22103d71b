//! Fast seeding straight through `skyhold-db`: VMs with a root volume and a NIC each, and
//! finished async jobs, in transactions of [`BATCH`] objects.

use anyhow::{Context, Result, bail};
use serde_json::json;
use skyhold_db::job::{NewJob, job_complete, job_insert};
use skyhold_db::vm::{NewVm, NewVolume, Nic, Vm, nic_insert, vm_insert, volume_insert_root};
use skyhold_db::{Db, DbError, Dialect, Sql, account, infra, retry_tx};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Objects per transaction.
pub const BATCH: usize = 500;

/// The `cmd` CloudStack records for a deployment (what `deployVirtualMachine` stores).
const DEPLOY_CMD: &str = "org.apache.cloudstack.api.command.admin.vm.DeployVMCmdByAdmin";

/// What was seeded.
pub struct Seeded {
    pub vm_ids: Vec<String>,
    pub job_ids: Vec<String>,
    pub secs: f64,
}

/// Insert `vms` VMs (root volume + default NIC each, distinct addresses from the seeded pod) and
/// `jobs` finished deploy jobs on the first of them, owned by the admin account.
pub async fn seed(db: &Db, vms: usize, jobs: usize) -> Result<Seeded> {
    let t0 = Instant::now();
    let mut c = db.conn().await?;
    let zone = infra::zone_list(&mut c)
        .await?
        .into_iter()
        .next()
        .context("no zone in the database: `skyhold db init` must run with --seed")?;
    let pod = infra::pod_list(&mut c)
        .await?
        .into_iter()
        .find(|p| p.zone_id == zone.id)
        .context("the seeded zone has no pod")?;
    let template = infra::template_list(&mut c).await?.into_iter().next().context("no template")?;
    let offerings = infra::offering_list(&mut c).await?;
    let offering = offerings
        .iter()
        .find(|o| o.name == "Small Instance")
        .or(offerings.first())
        .context("no service offering")?
        .clone();
    let admin = account::user_list(&mut c).await?.into_iter().find(|u| u.account_type == 1).context("no admin user")?;
    let now = skyhold_db::now_ms(&mut c).await?;
    drop(c);

    let first_ip: Ipv4Addr = pod.start_ip.parse().with_context(|| format!("pod start IP {}", pod.start_ip))?;
    let first_ip = u32::from(first_ip);

    struct Row {
        vm: NewVm,
        vol: NewVolume,
        nic: Nic,
    }
    let make = |i: usize| -> Row {
        let id = uuid::Uuid::new_v4().to_string();
        let name = format!("bench-{i:06}");
        let vm = NewVm {
            id: id.clone(),
            name: name.clone(),
            display_name: name,
            instance_name: format!("i-{}", &id[..8]),
            state: "Stopped".into(),
            account_id: admin.account_id.clone(),
            domain_id: admin.domain_id.clone(),
            user_id: admin.id.clone(),
            zone_id: zone.id.clone(),
            pod_id: None,
            template_id: template.id.clone(),
            offering_id: offering.id.clone(),
            cpu: offering.cpu,
            cpu_mhz: offering.cpu_mhz,
            mem_mb: offering.mem_mb,
            ha_enabled: offering.offer_ha,
        };
        let vol = NewVolume {
            id: uuid::Uuid::new_v4().to_string(),
            vm_id: id.clone(),
            name: format!("ROOT-{}", &id[..8]),
            size_bytes: template.size_bytes,
            zone_id: zone.id.clone(),
            account_id: admin.account_id.clone(),
            domain_id: admin.domain_id.clone(),
            template_id: template.id.clone(),
            storage_type: offering.storage_type.clone(),
        };
        let n = i as u32;
        let nic = Nic {
            id: uuid::Uuid::new_v4().to_string(),
            vm_id: id,
            pod_id: pod.id.clone(),
            ip: Ipv4Addr::from(first_ip.wrapping_add(n)).to_string(),
            netmask: pod.netmask.clone(),
            gateway: pod.gateway.clone(),
            mac: format!(
                "1e:00:{:02x}:{:02x}:{:02x}:{:02x}",
                (n >> 24) & 0x7f,
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ),
            is_default: true,
        };
        Row { vm, vol, nic }
    };

    let mut vm_ids = Vec::with_capacity(vms);
    // The first VMs, kept to render realistic job results.
    let mut sample: Vec<(NewVm, Nic)> = Vec::new();
    let mut start = 0;
    while start < vms {
        if crate::STOP.load(Ordering::Relaxed) {
            bail!("interrupted while seeding");
        }
        let end = (start + BATCH).min(vms);
        let rows: Vec<Row> = (start..end).map(make).collect();
        retry_tx!(db, |tx| {
            async {
                for r in &rows {
                    vm_insert(&mut tx, &r.vm).await?;
                    volume_insert_root(&mut tx, &r.vol).await?;
                    nic_insert(&mut tx, &r.nic).await?;
                }
                Ok::<(), DbError>(())
            }
            .await
        })
        .context("insert VMs")?;
        for r in rows {
            if sample.len() < jobs.min(BATCH) {
                sample.push((r.vm.clone(), r.nic.clone()));
            }
            vm_ids.push(r.vm.id);
        }
        start = end;
    }

    // Finished deploy jobs whose results hold the rendered VM, as the executor stores them.
    let mut job_ids = Vec::with_capacity(jobs);
    let mut start = 0;
    while start < jobs {
        if crate::STOP.load(Ordering::Relaxed) {
            bail!("interrupted while seeding");
        }
        let end = (start + BATCH).min(jobs);
        let batch: Vec<(NewJob, String)> = (start..end)
            .map(|i| {
                let (v, nic) = &sample[i % sample.len().max(1)];
                let vm = Vm {
                    id: v.id.clone(),
                    name: v.name.clone(),
                    display_name: v.display_name.clone(),
                    instance_name: v.instance_name.clone(),
                    state: "Running".into(),
                    account_id: admin.account_id.clone(),
                    account_name: admin.account_name.clone(),
                    domain_id: admin.domain_id.clone(),
                    domain_name: admin.domain_name.clone(),
                    user_id: admin.id.clone(),
                    zone_id: zone.id.clone(),
                    zone_name: zone.name.clone(),
                    pod_id: Some(pod.id.clone()),
                    host_id: None,
                    host_name: None,
                    last_host_id: None,
                    template_id: template.id.clone(),
                    template_name: template.name.clone(),
                    offering_id: offering.id.clone(),
                    offering_name: offering.name.clone(),
                    cpu: v.cpu,
                    cpu_mhz: v.cpu_mhz,
                    mem_mb: v.mem_mb,
                    ha_enabled: v.ha_enabled,
                    update_count: 2,
                    state_reason: None,
                    created_ms: now,
                };
                let result = json!({
                    "virtualmachine": skyhold_core::view::vm_json(&vm, std::slice::from_ref(nic), true)
                });
                let job = NewJob {
                    id: uuid::Uuid::new_v4().to_string(),
                    cmd: DEPLOY_CMD.into(),
                    user_id: admin.id.clone(),
                    account_id: admin.account_id.clone(),
                    domain_id: admin.domain_id.clone(),
                    instance_type: Some("VirtualMachine".into()),
                    instance_id: Some(v.id.clone()),
                    params: json!({
                        "zoneid": zone.id,
                        "templateid": template.id,
                        "serviceofferingid": offering.id,
                        "name": v.name,
                    })
                    .to_string(),
                };
                (job, result.to_string())
            })
            .collect();
        retry_tx!(db, |tx| {
            async {
                for (j, result) in &batch {
                    job_insert(&mut tx, j).await?;
                    // A fresh job has generation 0: complete it without claiming.
                    if !job_complete(&mut tx, &j.id, 0, 1, 0, result).await? {
                        return Err(DbError::Corrupt(format!("job {} could not be completed", j.id)));
                    }
                }
                Ok::<(), DbError>(())
            }
            .await
        })
        .context("insert jobs")?;
        job_ids.extend(batch.into_iter().map(|(j, _)| j.id));
        start = end;
    }
    Ok(Seeded { vm_ids, job_ids, secs: t0.elapsed().as_secs_f64() })
}

/// MariaDB: refresh the optimizer statistics of the seeded tables, as InnoDB's automatic
/// recalculation eventually does on a long-lived database (right after a bulk load they can be
/// stale enough to change plans). SQLite is left alone: Skyhold never runs `ANALYZE` there.
/// Returns whether anything was analysed.
pub async fn analyze(db: &Db) -> Result<bool> {
    let mut c = db.conn().await?;
    let (conn, d) = c.parts();
    if d != Dialect::MySql {
        return Ok(false);
    }
    sqlx::query(
        "ANALYZE TABLE vm_instance, volume, nic, async_job, account, domain, users, zone, pod, \
         template, service_offering, host",
    )
    .fetch_all(conn)
    .await
    .context("ANALYZE TABLE")?;
    Ok(true)
}
