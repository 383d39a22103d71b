//! Storage tests of `skyhold-db`, run identically against SQLite and MariaDB/MySQL.
//!
//! Every test is one `async fn(Db)`; [`backends!`] generates a `sqlite_*` and a `mysql_*`
//! `#[tokio::test]` for it. The SQLite variant runs on a fresh file in a temporary directory. The
//! MySQL variant needs `SKYHOLD_TEST_MYSQL_URL` (`mysql://USER:PASS@HOST:PORT`): it creates a fresh
//! database with a random name and drops it afterwards. Without that variable it is skipped with
//! a message, unless `CI` is set, where it fails.

use futures::FutureExt;
use skyhold_db::account::{self, Account, Domain, NewUser, Session};
use skyhold_db::config::{config_list, config_set, config_version, meta_get, meta_set};
use skyhold_db::crypto::{self, Key};
use skyhold_db::event::{self, Event, EventFilter};
use skyhold_db::hostha::{self, Alert, Oob, Work, WorkMove};
use skyhold_db::infra::{self, Cluster, HostConnect, Offering, Pod, Template, Zone};
use skyhold_db::job::{self, NewJob};
use skyhold_db::migrate::{self, LATEST};
use skyhold_db::ms::{self, MgmtServer};
use skyhold_db::vm::{self, HostChange, NewVm, NewVolume, Nic, VmFilter, VolumeFilter};
use skyhold_db::{Db, DbConfig, DbError, Dialect, Page, Retryable, Sql, TX_ATTEMPTS, Tx, retry_tx};
use sqlx::Connection;
use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// Run `test` on a fresh SQLite file.
async fn with_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("create temporary directory");
    let url = format!("sqlite://{}/t.db", dir.path().display());
    let db = Db::connect(&DbConfig { url, max_connections: 8, create: true }).await.expect("open SQLite database");
    assert_eq!(db.dialect(), Dialect::Sqlite);
    let res = AssertUnwindSafe(test(db.clone())).catch_unwind().await;
    db.close().await;
    drop(dir);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// Run `test` on a fresh MySQL/MariaDB database, dropped afterwards (also when the test fails).
async fn with_mysql<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    let base = match std::env::var("SKYHOLD_TEST_MYSQL_URL") {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("SKYHOLD_TEST_MYSQL_URL is not set: the MySQL storage tests must run in CI");
            }
            eprintln!("skipping the MySQL variant: set SKYHOLD_TEST_MYSQL_URL=mysql://USER:PASS@HOST:PORT");
            return;
        }
    };
    let (server, query) = match base.split_once('?') {
        Some((s, q)) => (s.trim_end_matches('/').to_string(), format!("?{q}")),
        None => (base.trim_end_matches('/').to_string(), String::new()),
    };
    let name = format!("skyhold_test_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{server}/{name}{query}");
    let db = Db::connect(&DbConfig { url, max_connections: 24, create: true })
        .await
        .expect("create and open the MySQL test database");
    assert_eq!(db.dialect(), Dialect::MySql);
    let res = AssertUnwindSafe(test(db.clone())).catch_unwind().await;
    db.close().await;
    let server_url = format!("{}{query}", server.replacen("mariadb://", "mysql://", 1));
    match sqlx::AnyConnection::connect(&server_url).await {
        Ok(mut conn) => {
            if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`")).execute(&mut conn).await {
                eprintln!("could not drop test database {name}: {e}");
            }
            let _ = conn.close().await;
        }
        Err(e) => eprintln!("could not connect to drop test database {name}: {e}"),
    }
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// `test_fn => sqlite_name, mysql_name;` generates one `#[tokio::test]` per backend.
macro_rules! backends {
    ($($test:ident => $sqlite:ident, $mysql:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $sqlite() {
                with_sqlite($test).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $mysql() {
                with_mysql($test).await
            }
        )*
    };
}

backends! {
    migrations => sqlite_migrations, mysql_migrations;
    database_clock => sqlite_database_clock, mysql_database_clock;
    jobs_claim_and_fencing => sqlite_jobs_claim_and_fencing, mysql_jobs_claim_and_fencing;
    jobs_list_and_purge => sqlite_jobs_list_and_purge, mysql_jobs_list_and_purge;
    jobs_concurrent_claims => sqlite_jobs_concurrent_claims, mysql_jobs_concurrent_claims;
    vm_transitions => sqlite_vm_transitions, mysql_vm_transitions;
    vm_list_filters_and_paging => sqlite_vm_list_filters_and_paging, mysql_vm_list_filters_and_paging;
    vm_list_keyword_is_literal => sqlite_vm_list_keyword_is_literal, mysql_vm_list_keyword_is_literal;
    vm_list_keyword_ignores_case => sqlite_vm_list_keyword_ignores_case, mysql_vm_list_keyword_ignores_case;
    vm_expunge_frees_addresses => sqlite_vm_expunge_frees_addresses, mysql_vm_expunge_frees_addresses;
    pod_ip_concurrent_allocation => sqlite_pod_ip_concurrent_allocation, mysql_pod_ip_concurrent_allocation;
    pod_ip_exhaustion => sqlite_pod_ip_exhaustion, mysql_pod_ip_exhaustion;
    hosts_ownership => sqlite_hosts_ownership, mysql_hosts_ownership;
    hosts_used_capacity => sqlite_hosts_used_capacity, mysql_hosts_used_capacity;
    hosts_concurrent_takeover => sqlite_hosts_concurrent_takeover, mysql_hosts_concurrent_takeover;
    sessions => sqlite_sessions, mysql_sessions;
    config_and_meta => sqlite_config_and_meta, mysql_config_and_meta;
    config_version_sees_every_change => sqlite_config_version_sees_every_change, mysql_config_version_sees_every_change;
    management_servers => sqlite_management_servers, mysql_management_servers;
    events => sqlite_events, mysql_events;
    retry_tx_custom_errors => sqlite_retry_tx_custom_errors, mysql_retry_tx_custom_errors;
    retry_tx_real_lock_conflict => sqlite_retry_tx_real_lock_conflict, mysql_retry_tx_real_lock_conflict;
    retry_tx_non_retryable_db_error => sqlite_retry_tx_non_retryable_db_error, mysql_retry_tx_non_retryable_db_error;
    crypto_secrets_in_users => sqlite_crypto_secrets_in_users, mysql_crypto_secrets_in_users;
    cluster_locks => sqlite_cluster_locks, mysql_cluster_locks;
    membership_down_and_takeover => sqlite_membership_down_and_takeover, mysql_membership_down_and_takeover;
    host_ha_rows => sqlite_host_ha_rows, mysql_host_ha_rows;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn migrated(db: &Db) {
    assert_eq!(migrate::migrate(db).await.expect("migrate"), (1..=LATEST).collect::<Vec<_>>());
}

async fn exec(db: &Db, q: &str) {
    let mut c = db.conn().await.unwrap();
    let (conn, _) = c.parts();
    sqlx::query(q).execute(conn).await.unwrap_or_else(|e| panic!("{q}: {e}"));
}

async fn count(db: &Db, q: &str, binds: &[&str]) -> i64 {
    let mut c = db.conn().await.unwrap();
    let (conn, _) = c.parts();
    let mut qq = sqlx::query_scalar::<_, i64>(q);
    for b in binds {
        qq = qq.bind(b.to_string());
    }
    qq.fetch_one(conn).await.unwrap_or_else(|e| panic!("{q}: {e}"))
}

fn local_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Wait until the database clock is strictly past `t`.
async fn wait_db_past(db: &Db, t: i64) {
    for _ in 0..2000 {
        if db.now_ms().await.unwrap() > t {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the database clock never passed {t}");
}

fn page(page: u64, size: u64) -> Page {
    Page { page, size }
}

/// Zone, pods, cluster, offering, template, domains, accounts and a user for VM tests.
struct Fx {
    zone: String,
    pod: String,
    cluster: String,
    offering: String,
    template: String,
    domain: String,
    account: String,
    account2: String,
    user: String,
}

async fn fixture(db: &Db) -> Fx {
    migrated(db).await;
    let fx = Fx {
        zone: "zone-1".into(),
        pod: "pod-1".into(),
        cluster: "cluster-1".into(),
        offering: "offering-1".into(),
        template: "template-1".into(),
        domain: "domain-root".into(),
        account: "account-1".into(),
        account2: "account-2".into(),
        user: "user-1".into(),
    };
    let res: Result<(), DbError> = retry_tx!(db, |tx| {
        account::domain_insert(
            &mut tx,
            &Domain { id: fx.domain.clone(), name: "ROOT".into(), path: "/".into(), parent_id: None },
        )
        .await?;
        account::account_insert(
            &mut tx,
            &Account {
                id: fx.account.clone(),
                name: "alice".into(),
                domain_id: fx.domain.clone(),
                account_type: 0,
                state: "enabled".into(),
            },
        )
        .await?;
        account::account_insert(
            &mut tx,
            &Account {
                id: fx.account2.clone(),
                name: "bob".into(),
                domain_id: fx.domain.clone(),
                account_type: 0,
                state: "enabled".into(),
            },
        )
        .await?;
        account::user_insert(
            &mut tx,
            &NewUser {
                id: fx.user.clone(),
                account_id: fx.account.clone(),
                username: "alice".into(),
                password_hash: crypto::password_hash("pw"),
                api_key: None,
                secret_enc: None,
                firstname: "Alice".into(),
                lastname: "A".into(),
                email: "alice@example.org".into(),
            },
        )
        .await?;
        infra::zone_insert(
            &mut tx,
            &Zone {
                id: fx.zone.clone(),
                name: "Zone One".into(),
                description: "test zone".into(),
                network_type: "Basic".into(),
                dns1: "8.8.8.8".into(),
                internal_dns1: "10.0.0.2".into(),
                allocation_state: "Enabled".into(),
                created_ms: 0,
            },
        )
        .await?;
        infra::pod_insert(&mut tx, &new_pod(&fx.pod, &fx.zone, "10.0.0.10", "10.0.0.39")).await?;
        infra::cluster_insert(
            &mut tx,
            &Cluster {
                id: fx.cluster.clone(),
                zone_id: fx.zone.clone(),
                pod_id: fx.pod.clone(),
                name: "Cluster One".into(),
                hypervisor: "Simulator".into(),
                allocation_state: "Enabled".into(),
                created_ms: 0,
            },
        )
        .await?;
        infra::offering_insert(
            &mut tx,
            &Offering {
                id: fx.offering.clone(),
                name: "Small".into(),
                display_text: "Small instance".into(),
                cpu: 1,
                cpu_mhz: 1000,
                mem_mb: 512,
                offer_ha: false,
                storage_type: "shared".into(),
                created_ms: 0,
            },
        )
        .await?;
        infra::template_insert(
            &mut tx,
            &Template {
                id: fx.template.clone(),
                name: "Tiny Linux".into(),
                display_text: "Tiny Linux".into(),
                os_type: "Other Linux".into(),
                hypervisor: "Simulator".into(),
                format: "QCOW2".into(),
                size_bytes: 1 << 30,
                zone_id: None,
                is_public: true,
                featured: true,
                account_id: fx.account.clone(),
                created_ms: 0,
            },
        )
        .await?;
        Ok(())
    });
    res.expect("insert fixture rows");
    fx
}

fn new_pod(id: &str, zone: &str, start: &str, end: &str) -> Pod {
    Pod {
        id: id.into(),
        zone_id: zone.into(),
        name: format!("pod {id}"),
        gateway: "10.0.0.1".into(),
        netmask: "255.255.0.0".into(),
        start_ip: start.into(),
        end_ip: end.into(),
        allocation_state: "Enabled".into(),
        created_ms: 0,
    }
}

fn new_vm(fx: &Fx, id: &str, name: &str, state: &str, account: &str) -> NewVm {
    NewVm {
        id: id.into(),
        name: name.into(),
        display_name: format!("display {name}"),
        instance_name: format!("i-{id}"),
        state: state.into(),
        account_id: account.into(),
        domain_id: fx.domain.clone(),
        user_id: fx.user.clone(),
        zone_id: fx.zone.clone(),
        pod_id: Some(fx.pod.clone()),
        template_id: fx.template.clone(),
        offering_id: fx.offering.clone(),
        cpu: 1,
        cpu_mhz: 1000,
        mem_mb: 512,
        ha_enabled: false,
    }
}

async fn insert_vm(db: &Db, v: &NewVm) {
    let mut c = db.conn().await.unwrap();
    vm::vm_insert(&mut c, v).await.expect("insert vm");
}

fn host_connect(fx: &Fx, guid: &str) -> HostConnect {
    HostConnect {
        guid: guid.into(),
        name: format!("host {guid}"),
        ip: "192.0.2.10".into(),
        hypervisor: "Simulator".into(),
        cpu_cores: 8,
        cpu_mhz: 2000,
        mem_mb: 16384,
        agent_id: format!("agent-{guid}"),
        version: "1.0".into(),
        check_addr: format!("192.0.2.10:{}", guid.len()),
        zone_id: fx.zone.clone(),
        pod_id: fx.pod.clone(),
        cluster_id: fx.cluster.clone(),
    }
}

async fn take_host(db: &Db, h: &HostConnect, ms: &str) -> (String, i64) {
    let r: Result<(String, i64), DbError> = retry_tx!(db, |tx| infra::host_take_connection(&mut tx, h, ms).await);
    r.expect("take host connection")
}

async fn transition(db: &Db, id: &str, from: &[&str], to: &str, host: HostChange, reason: Option<&str>) -> bool {
    let mut c = db.conn().await.unwrap();
    vm::vm_transition(&mut c, id, from, to, host, reason).await.expect("vm transition")
}

async fn fetch_vm(db: &Db, id: &str) -> vm::Vm {
    let mut c = db.conn().await.unwrap();
    vm::vm_fetch(&mut c, id).await.unwrap().unwrap_or_else(|| panic!("vm {id} not found"))
}

async fn list_vms(db: &Db, f: &VmFilter, p: Page) -> (Vec<String>, i64) {
    let mut c = db.conn().await.unwrap();
    let (vms, total) = vm::vm_list(&mut c, f, p).await.expect("list vms");
    (vms.into_iter().map(|v| v.name).collect(), total)
}

fn new_job(id: &str, account: &str, instance: Option<&str>) -> NewJob {
    NewJob {
        id: id.into(),
        cmd: "org.apache.cloudstack.api.command.user.vm.StartVMCmd".into(),
        user_id: "user-1".into(),
        account_id: account.into(),
        domain_id: "domain-root".into(),
        instance_type: instance.map(|_| "VirtualMachine".to_string()),
        instance_id: instance.map(str::to_string),
        params: "{\"id\":\"x\"}".into(),
    }
}

async fn fetch_job(db: &Db, id: &str) -> job::Job {
    let mut c = db.conn().await.unwrap();
    job::job_fetch(&mut c, id).await.unwrap().unwrap_or_else(|| panic!("job {id} not found"))
}

async fn claim(db: &Db, ms: &str, lease_ms: i64) -> Vec<(String, i64)> {
    let r: Result<Vec<job::Claimed>, DbError> = retry_tx!(db, |tx| job::job_claim(&mut tx, ms, lease_ms, 10).await);
    r.expect("claim jobs").into_iter().map(|c| (c.job.id, c.gen_)).collect()
}

fn ids(v: &[(String, i64)]) -> Vec<&str> {
    v.iter().map(|(id, _)| id.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// Migrations
// ---------------------------------------------------------------------------------------------

async fn migrations(db: Db) {
    let st = migrate::status(&db).await.unwrap();
    assert_eq!(st, migrate::SchemaStatus { current: None, latest: LATEST });
    match migrate::check_current(&db).await {
        Err(DbError::Schema(m)) => assert!(m.contains("no Skyhold schema"), "{m}"),
        other => panic!("check_current on an empty database: {other:?}"),
    }

    assert_eq!(migrate::migrate(&db).await.unwrap(), (1..=LATEST).collect::<Vec<_>>());
    assert_eq!(migrate::status(&db).await.unwrap().current, Some(LATEST));
    assert_eq!(migrate::migrate(&db).await.unwrap(), Vec::<i64>::new(), "second migrate applies nothing");
    assert_eq!(migrate::status(&db).await.unwrap().current, Some(LATEST));
    migrate::check_current(&db).await.expect("schema is current");

    // A database written by a newer Skyhold is refused.
    exec(&db, "INSERT INTO schema_version (version, name, applied_ms) VALUES (999, 'from the future', 0)").await;
    assert_eq!(migrate::status(&db).await.unwrap().current, Some(999));
    match migrate::migrate(&db).await {
        Err(DbError::Schema(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("migrate on a newer schema: {other:?}"),
    }
    match migrate::check_current(&db).await {
        Err(DbError::Schema(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("check_current on a newer schema: {other:?}"),
    }
    // Refusing changed nothing.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM schema_version", &[]).await, LATEST + 1);

    migrate::drop_everything(&db).await.unwrap();
    assert_eq!(migrate::status(&db).await.unwrap().current, None);
    assert!(migrate::check_current(&db).await.is_err());

    // A fresh migration after dropping works again.
    assert_eq!(migrate::migrate(&db).await.unwrap(), (1..=LATEST).collect::<Vec<_>>());
    migrate::check_current(&db).await.unwrap();

    // Tables without a schema_version row: an interrupted migration, reported rather than guessed.
    exec(&db, "DROP TABLE schema_version").await;
    assert_eq!(migrate::status(&db).await.unwrap().current, None);
    match migrate::migrate(&db).await {
        Err(DbError::Schema(m)) => assert!(m.contains("interrupted"), "{m}"),
        other => panic!("migrate over an interrupted migration: {other:?}"),
    }
    migrate::drop_everything(&db).await.unwrap();
    assert_eq!(migrate::status(&db).await.unwrap().current, None);
}

// ---------------------------------------------------------------------------------------------
// Database clock
// ---------------------------------------------------------------------------------------------

async fn database_clock(db: Db) {
    assert!(db.ping().await);
    let before = local_ms();
    let t = db.now_ms().await.unwrap();
    let after = local_ms();
    assert!(t >= before - 5_000 && t <= after + 5_000, "db clock {t} vs local {before}..{after}");

    let mut prev = t;
    for _ in 0..50 {
        let n = db.now_ms().await.unwrap();
        assert!(n >= prev, "database clock went back from {prev} to {n}");
        prev = n;
    }
    // The free function, inside a transaction, reads the same clock.
    let mut tx = db.begin().await.unwrap();
    let in_tx = skyhold_db::now_ms(&mut tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(in_tx >= prev && in_tx <= local_ms() + 5_000);
    wait_db_past(&db, in_tx).await;
    assert!(db.now_ms().await.unwrap() > in_tx);
}

// ---------------------------------------------------------------------------------------------
// Jobs and fencing
// ---------------------------------------------------------------------------------------------

async fn jobs_claim_and_fencing(db: Db) {
    migrated(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        job::job_insert(&mut c, &new_job("j1", "acct", Some("vm-a"))).await.unwrap();
        job::job_insert(&mut c, &new_job("j2", "acct", Some("vm-a"))).await.unwrap();
        job::job_insert(&mut c, &new_job("j3", "acct", Some("vm-b"))).await.unwrap();
        job::job_insert(&mut c, &new_job("j4", "acct", None)).await.unwrap();
        job::job_insert(&mut c, &new_job("j5", "acct", None)).await.unwrap();
    }
    let fresh = fetch_job(&db, "j1").await;
    assert_eq!((fresh.status, fresh.lease_gen, fresh.attempts, fresh.step), (0, 0, 0, 0));
    assert_eq!(fresh.owner_ms, None);
    assert_eq!(fresh.step_state, "{}");
    assert_eq!(fresh.instance_id.as_deref(), Some("vm-a"));

    // Only the first job per object is claimable; jobs without an object never block each other.
    let now = db.now_ms().await.unwrap();
    let a = claim(&db, "ms-a", 60_000).await;
    assert_eq!(ids(&a), vec!["j1", "j3", "j4", "j5"]);
    assert!(a.iter().all(|(_, g)| *g == 1), "{a:?}");
    let j1 = fetch_job(&db, "j1").await;
    assert_eq!(j1.owner_ms.as_deref(), Some("ms-a"));
    assert_eq!((j1.lease_gen, j1.attempts), (1, 1));
    assert!(j1.lease_until_ms >= now + 60_000, "{} vs {now}", j1.lease_until_ms);
    let j2 = fetch_job(&db, "j2").await;
    assert_eq!((j2.owner_ms, j2.lease_gen), (None, 0));

    // Another server gets nothing while the leases hold.
    assert!(claim(&db, "ms-b", 60_000).await.is_empty());
    {
        let mut c = db.conn().await.unwrap();
        assert_eq!(job::job_count_running(&mut c, "ms-a").await.unwrap(), 4);
        assert_eq!(job::job_count_running(&mut c, "ms-b").await.unwrap(), 0);
    }

    // Writes with a stale generation change nothing.
    {
        let mut c = db.conn().await.unwrap();
        assert!(!job::job_save_step(&mut c, "j1", 0, 3, "{\"stale\":true}").await.unwrap());
        assert!(!job::job_complete(&mut c, "j1", 0, 1, 0, "stale").await.unwrap());
        assert!(!job::job_complete(&mut c, "j1", 2, 1, 0, "future").await.unwrap());
        assert!(!job::job_renew(&mut c, "j1", "ms-b", 1, 60_000).await.unwrap());
        assert!(!job::job_renew(&mut c, "j1", "ms-a", 0, 60_000).await.unwrap());
    }
    let j1b = fetch_job(&db, "j1").await;
    assert_eq!((j1b.status, j1b.step, j1b.proc_status, j1b.lease_gen), (0, 0, 0, 1));
    assert_eq!(j1b.step_state, "{}");
    assert_eq!(j1b.result, None);
    assert_eq!(j1b.owner_ms.as_deref(), Some("ms-a"));
    assert_eq!(j1b.lease_until_ms, j1.lease_until_ms);

    // The right generation works.
    {
        let mut c = db.conn().await.unwrap();
        assert!(job::job_save_step(&mut c, "j1", 1, 2, "{\"disk\":\"ok\"}").await.unwrap());
        assert!(job::job_renew(&mut c, "j1", "ms-a", 1, 120_000).await.unwrap());
    }
    let j1c = fetch_job(&db, "j1").await;
    assert_eq!((j1c.step, j1c.proc_status, j1c.status), (2, 2, 0));
    assert_eq!(j1c.step_state, "{\"disk\":\"ok\"}");
    assert!(j1c.lease_until_ms > j1.lease_until_ms);

    // Release j3 and reclaim it with a 1 ms lease; once that expires on the database clock another
    // server takes it over with the next generation and the old owner is fenced off.
    {
        let mut c = db.conn().await.unwrap();
        assert!(!job::job_release(&mut c, "j3", 0).await.unwrap());
        assert!(job::job_release(&mut c, "j3", 1).await.unwrap());
    }
    let j3 = fetch_job(&db, "j3").await;
    assert_eq!((j3.owner_ms, j3.lease_until_ms, j3.lease_gen), (None, 0, 1));
    let a2 = claim(&db, "ms-a", 1).await;
    assert_eq!(a2, vec![("j3".to_string(), 2)]);
    let j3 = fetch_job(&db, "j3").await;
    wait_db_past(&db, j3.lease_until_ms).await;
    let b = claim(&db, "ms-b", 60_000).await;
    assert_eq!(b, vec![("j3".to_string(), 3)]);
    let j3 = fetch_job(&db, "j3").await;
    assert_eq!(j3.owner_ms.as_deref(), Some("ms-b"));
    assert_eq!((j3.lease_gen, j3.attempts), (3, 3));
    {
        let mut c = db.conn().await.unwrap();
        assert!(!job::job_save_step(&mut c, "j3", 2, 1, "{\"late\":1}").await.unwrap());
        assert!(!job::job_renew(&mut c, "j3", "ms-a", 2, 60_000).await.unwrap());
        assert!(!job::job_complete(&mut c, "j3", 2, 2, 530, "late failure").await.unwrap());
        let j3 = job::job_fetch(&mut c, "j3").await.unwrap().unwrap();
        assert_eq!((j3.status, j3.step, j3.result.as_deref()), (0, 0, None));
        assert!(job::job_complete(&mut c, "j3", 3, 1, 0, "{\"ok\":true}").await.unwrap());
        assert!(!job::job_complete(&mut c, "j3", 3, 2, 530, "twice").await.unwrap(), "completed jobs are final");
        assert!(!job::job_release(&mut c, "j3", 3).await.unwrap());
    }
    let j3 = fetch_job(&db, "j3").await;
    assert_eq!((j3.status, j3.result_code, j3.result.as_deref()), (1, 0, Some("{\"ok\":true}")));
    assert_eq!(j3.owner_ms, None);
    assert!(j3.completed_ms.is_some());

    // j2 waits for j1 (same object) until j1 completes.
    assert!(claim(&db, "ms-b", 60_000).await.is_empty());
    {
        let mut c = db.conn().await.unwrap();
        assert!(job::job_complete(&mut c, "j1", 1, 2, 530, "failed").await.unwrap());
    }
    let b2 = claim(&db, "ms-b", 60_000).await;
    assert_eq!(b2, vec![("j2".to_string(), 1)]);

    // A successor of ms-a expires every lease ms-a held (j4, j5) and they become claimable.
    {
        let mut c = db.conn().await.unwrap();
        assert_eq!(job::job_count_running(&mut c, "ms-a").await.unwrap(), 2);
        assert_eq!(job::job_count_running(&mut c, "ms-b").await.unwrap(), 1);
        assert_eq!(job::job_release_all_of(&mut c, "ms-a").await.unwrap(), 2);
        assert_eq!(job::job_count_running(&mut c, "ms-a").await.unwrap(), 0);
        assert_eq!(job::job_release_all_of(&mut c, "ms-a").await.unwrap(), 0);
    }
    let j4 = fetch_job(&db, "j4").await;
    assert_eq!((j4.owner_ms, j4.lease_until_ms, j4.lease_gen), (None, 0, 1));
    let c3 = claim(&db, "ms-c", 60_000).await;
    assert_eq!(c3, vec![("j4".to_string(), 2), ("j5".to_string(), 2)]);
    {
        let mut c = db.conn().await.unwrap();
        // ms-a's old generation no longer writes.
        assert!(!job::job_complete(&mut c, "j4", 1, 1, 0, "old").await.unwrap());
        // The job released by its owner is claimable at once.
        assert!(job::job_release(&mut c, "j2", 1).await.unwrap());
    }
    let c4 = claim(&db, "ms-c", 60_000).await;
    assert_eq!(c4, vec![("j2".to_string(), 2)]);
}

async fn jobs_list_and_purge(db: Db) {
    migrated(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        for i in 1..=5 {
            job::job_insert(&mut c, &new_job(&format!("a{i}"), "acct-a", None)).await.unwrap();
        }
        for i in 1..=2 {
            job::job_insert(&mut c, &new_job(&format!("b{i}"), "acct-b", None)).await.unwrap();
        }
    }
    let list = |acct: Option<&'static str>, p: Page| {
        let db = db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            let (jobs, total) = job::job_list(&mut c, acct, p).await.unwrap();
            (jobs.into_iter().map(|j| j.id).collect::<Vec<_>>(), total)
        }
    };
    assert_eq!(list(None, page(1, 3)).await, (vec!["b2".into(), "b1".into(), "a5".into()], 7));
    assert_eq!(list(None, page(2, 3)).await, (vec!["a4".into(), "a3".into(), "a2".into()], 7));
    assert_eq!(list(None, page(3, 3)).await, (vec!["a1".into()], 7));
    assert_eq!(list(None, page(4, 3)).await, (vec![], 7));
    assert_eq!(list(Some("acct-b"), page(1, 10)).await, (vec!["b2".into(), "b1".into()], 2));
    assert_eq!(list(Some("acct-a"), page(2, 2)).await, (vec!["a3".into(), "a2".into()], 5));
    assert_eq!(list(Some("nobody"), page(1, 10)).await, (vec![], 0));

    // Complete a1 and b1, then purge.
    let claimed = claim(&db, "ms-a", 60_000).await;
    assert_eq!(claimed.len(), 7);
    let gen_of = |id: &str| claimed.iter().find(|(j, _)| j == id).unwrap().1;
    let mut last_completed = 0;
    {
        let mut c = db.conn().await.unwrap();
        for id in ["a1", "b1"] {
            assert!(job::job_complete(&mut c, id, gen_of(id), 1, 0, "done").await.unwrap());
            let j = job::job_fetch(&mut c, id).await.unwrap().unwrap();
            last_completed = last_completed.max(j.completed_ms.unwrap());
        }
        assert_eq!(job::job_purge(&mut c, 3_600_000).await.unwrap(), 0, "too young to purge");
    }
    wait_db_past(&db, last_completed).await;
    {
        let mut c = db.conn().await.unwrap();
        assert_eq!(job::job_purge(&mut c, 0).await.unwrap(), 2);
        assert!(job::job_fetch(&mut c, "a1").await.unwrap().is_none());
        assert!(job::job_fetch(&mut c, "b1").await.unwrap().is_none());
        assert!(job::job_fetch(&mut c, "a2").await.unwrap().is_some(), "unfinished jobs stay");
        assert_eq!(job::job_purge(&mut c, 0).await.unwrap(), 0);
    }
    assert_eq!(list(None, page(1, 100)).await.1, 5);
    assert_eq!(list(Some("acct-b"), page(1, 100)).await, (vec!["b2".into()], 1));
}

async fn jobs_concurrent_claims(db: Db) {
    migrated(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        for i in 0..12 {
            job::job_insert(&mut c, &new_job(&format!("free-{i:02}"), "acct", None)).await.unwrap();
        }
        for i in 1..=3 {
            job::job_insert(&mut c, &new_job(&format!("obj-{i}"), "acct", Some("vm-x"))).await.unwrap();
        }
    }
    // Four servers claim at once until nothing is left: every job is claimed exactly once.
    let mut set = tokio::task::JoinSet::new();
    for k in 0..4 {
        let db = db.clone();
        set.spawn(async move {
            let ms = format!("ms-{k}");
            let mut mine = Vec::new();
            loop {
                let got = claim(&db, &ms, 60_000).await;
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|(id, g)| (id, g, ms.clone())));
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("claim task"));
    }
    let mut claimed: Vec<&str> = all.iter().map(|(id, _, _)| id.as_str()).collect();
    claimed.sort();
    let mut expected: Vec<String> = (0..12).map(|i| format!("free-{i:02}")).collect();
    expected.push("obj-1".into());
    assert_eq!(claimed, expected, "each runnable job claimed exactly once: {all:?}");
    assert!(all.iter().all(|(_, g, _)| *g == 1), "{all:?}");
    for (id, _, ms) in &all {
        let j = fetch_job(&db, id).await;
        assert_eq!((j.owner_ms.as_deref(), j.lease_gen, j.attempts), (Some(ms.as_str()), 1, 1), "{id}");
    }
    assert!(claim(&db, "ms-late", 60_000).await.is_empty());
    assert_eq!(fetch_job(&db, "obj-2").await.lease_gen, 0);
}

// ---------------------------------------------------------------------------------------------
// VMs
// ---------------------------------------------------------------------------------------------

async fn vm_transitions(db: Db) {
    let fx = fixture(&db).await;
    let (h1, _) = take_host(&db, &host_connect(&fx, "guid-1"), "ms-a").await;
    let (h2, _) = take_host(&db, &host_connect(&fx, "guid-2"), "ms-a").await;
    insert_vm(&db, &new_vm(&fx, "vm-1", "web", "Stopped", &fx.account)).await;

    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count), ("Stopped", 0));
    assert_eq!((v.host_id, v.last_host_id, v.state_reason), (None, None, None));
    assert_eq!((v.account_name.as_str(), v.domain_name.as_str(), v.zone_name.as_str()), ("alice", "ROOT", "Zone One"));
    assert_eq!((v.template_name.as_str(), v.offering_name.as_str()), ("Tiny Linux", "Small"));

    // Not from the expected state: nothing changes.
    assert!(!transition(&db, "vm-1", &["Running"], "Stopping", HostChange::Keep, None).await);
    assert!(!transition(&db, "vm-1", &["Running", "Starting"], "Stopped", HostChange::Clear, None).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count), ("Stopped", 0));

    // Set: place on h1, remembered as last host.
    assert!(transition(&db, "vm-1", &["Stopped"], "Starting", HostChange::Set(h1.clone()), Some("start")).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count), ("Starting", 1));
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (Some(h1.as_str()), Some(h1.as_str())));
    assert_eq!(v.host_name.as_deref(), Some("host guid-1"));
    assert_eq!(v.state_reason.as_deref(), Some("start"));

    // The same transition again loses (someone else already moved it).
    assert!(!transition(&db, "vm-1", &["Stopped"], "Starting", HostChange::Set(h2.clone()), None).await);
    assert_eq!(fetch_vm(&db, "vm-1").await.update_count, 1);

    // Keep: host untouched.
    assert!(transition(&db, "vm-1", &["Starting"], "Running", HostChange::Keep, None).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count, v.state_reason), ("Running", 2, None));
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (Some(h1.as_str()), Some(h1.as_str())));

    // Any of several source states.
    assert!(transition(&db, "vm-1", &["Stopping", "Running"], "Stopping", HostChange::Keep, None).await);
    assert_eq!(fetch_vm(&db, "vm-1").await.update_count, 3);

    // Clear: off the host, which becomes the last host.
    assert!(transition(&db, "vm-1", &["Stopping"], "Stopped", HostChange::Clear, Some("stopped")).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count), ("Stopped", 4));
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (None, Some(h1.as_str())));
    assert_eq!(v.host_name, None);

    // Clear without a host keeps the last host.
    assert!(transition(&db, "vm-1", &["Stopped"], "Stopped", HostChange::Clear, None).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!(v.update_count, 5);
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (None, Some(h1.as_str())));

    // Set on another host, then Clear: the last host follows.
    assert!(transition(&db, "vm-1", &["Stopped"], "Starting", HostChange::Set(h2.clone()), None).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (Some(h2.as_str()), Some(h2.as_str())));
    assert!(transition(&db, "vm-1", &["Starting"], "Error", HostChange::Clear, Some("boom")).await);
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.state.as_str(), v.update_count), ("Error", 7));
    assert_eq!((v.host_id.as_deref(), v.last_host_id.as_deref()), (None, Some(h2.as_str())));
    assert_eq!(v.state_reason.as_deref(), Some("boom"));

    // Attribute updates bump the counter too.
    {
        let mut c = db.conn().await.unwrap();
        assert!(vm::vm_update_attrs(&mut c, "vm-1", Some("renamed"), None).await.unwrap());
        assert!(!vm::vm_update_attrs(&mut c, "nope", Some("x"), None).await.unwrap());
    }
    let v = fetch_vm(&db, "vm-1").await;
    assert_eq!((v.display_name.as_str(), v.ha_enabled, v.update_count), ("renamed", false, 8));

    // Unknown and expunged VMs never transition.
    assert!(!transition(&db, "nope", &["Stopped"], "Starting", HostChange::Keep, None).await);
    {
        let mut c = db.conn().await.unwrap();
        assert!(vm::vm_expunge(&mut c, "vm-1").await.unwrap());
    }
    assert!(!transition(&db, "vm-1", &["Expunging"], "Expunged", HostChange::Keep, None).await);
}

async fn vm_list_filters_and_paging(db: Db) {
    let fx = fixture(&db).await;
    let vms = [
        ("v1", "web-1", "Running", &fx.account),
        ("v2", "web-2", "Stopped", &fx.account),
        ("v3", "db-1", "Running", &fx.account),
        ("v4", "db-2", "Stopped", &fx.account),
        ("v5", "cache", "Stopped", &fx.account),
        ("v6", "other", "Running", &fx.account2),
    ];
    for (id, name, state, acct) in vms {
        insert_vm(&db, &new_vm(&fx, id, name, state, acct)).await;
    }
    let all = VmFilter::default();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    assert_eq!(
        list_vms(&db, &all, page(1, 100)).await,
        (names(&["web-1", "web-2", "db-1", "db-2", "cache", "other"]), 6)
    );
    // Paging keeps the total.
    assert_eq!(list_vms(&db, &all, page(1, 4)).await, (names(&["web-1", "web-2", "db-1", "db-2"]), 6));
    assert_eq!(list_vms(&db, &all, page(2, 4)).await, (names(&["cache", "other"]), 6));
    assert_eq!(list_vms(&db, &all, page(3, 4)).await, (vec![], 6));

    let f = VmFilter { ids: vec!["v3".into(), "v1".into(), "missing".into()], ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["web-1", "db-1"]), 2));

    let f = VmFilter { name: Some("db-2".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["db-2"]), 1));
    let f = VmFilter { name: Some("db".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (vec![], 0), "name is an exact match");

    let f = VmFilter { state: Some("Stopped".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["web-2", "db-2", "cache"]), 3));
    assert_eq!(list_vms(&db, &f, page(2, 2)).await, (names(&["cache"]), 3));

    let f = VmFilter { account_id: Some(fx.account2.clone()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["other"]), 1));
    let f = VmFilter { account_id: Some(fx.account.clone()), state: Some("Running".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["web-1", "db-1"]), 2));

    let f = VmFilter { zone_id: Some(fx.zone.clone()), domain_id: Some(fx.domain.clone()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 1)).await, (names(&["web-1"]), 6));
    let f = VmFilter { zone_id: Some("zone-x".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (vec![], 0));

    // Host filter.
    let (h1, _) = take_host(&db, &host_connect(&fx, "guid-1"), "ms-a").await;
    assert!(transition(&db, "v3", &["Running"], "Running", HostChange::Set(h1.clone()), None).await);
    let f = VmFilter { host_id: Some(h1), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["db-1"]), 1));

    let mut c = db.conn().await.unwrap();
    assert_eq!(vm::vm_count(&mut c).await.unwrap(), 6);
    assert!(vm::vm_name_taken(&mut c, &fx.account, "web-1").await.unwrap());
    assert!(!vm::vm_name_taken(&mut c, &fx.account2, "web-1").await.unwrap());
}

async fn vm_list_keyword_is_literal(db: Db) {
    let fx = fixture(&db).await;
    let vms = [
        ("k1", "web_1", "Running"),
        ("k2", "web%2", "Stopped"),
        ("k3", "webx1", "Stopped"),
        ("k4", "webby2", "Stopped"),
        ("k5", "back\\slash", "Stopped"),
        ("k6", "db", "Running"),
        ("k7", "wow!", "Stopped"),
        ("k8", "o!_k", "Stopped"),
    ];
    for (id, name, state) in vms {
        insert_vm(&db, &new_vm(&fx, id, name, state, &fx.account)).await;
    }
    let kw = |k: &str| VmFilter { keyword: Some(k.into()), ..Default::default() };
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    assert_eq!(list_vms(&db, &kw("web"), page(1, 100)).await, (names(&["web_1", "web%2", "webx1", "webby2"]), 4));
    // `_` and `%` are literal characters, not wildcards.
    assert_eq!(list_vms(&db, &kw("_"), page(1, 100)).await, (names(&["web_1", "o!_k"]), 2));
    assert_eq!(list_vms(&db, &kw("b_"), page(1, 100)).await, (names(&["web_1"]), 1));
    assert_eq!(list_vms(&db, &kw("%"), page(1, 100)).await, (names(&["web%2"]), 1));
    assert_eq!(list_vms(&db, &kw("b%2"), page(1, 100)).await, (names(&["web%2"]), 1));
    assert_eq!(list_vms(&db, &kw("web%1"), page(1, 100)).await, (vec![], 0));
    assert_eq!(list_vms(&db, &kw("\\"), page(1, 100)).await, (names(&["back\\slash"]), 1));
    // `!` (the escape character the queries use) is literal too.
    assert_eq!(list_vms(&db, &kw("!"), page(1, 100)).await, (names(&["wow!", "o!_k"]), 2));
    assert_eq!(list_vms(&db, &kw("!_"), page(1, 100)).await, (names(&["o!_k"]), 1));
    assert_eq!(list_vms(&db, &kw("w!"), page(1, 100)).await, (names(&["wow!"]), 1));
    assert_eq!(list_vms(&db, &kw("!%"), page(1, 100)).await, (vec![], 0));
    assert_eq!(list_vms(&db, &kw("!!"), page(1, 100)).await, (vec![], 0));
    // The keyword also matches the display name and the state.
    assert_eq!(list_vms(&db, &kw("display db"), page(1, 100)).await, (names(&["db"]), 1));
    assert_eq!(list_vms(&db, &kw("unnin"), page(1, 100)).await, (names(&["web_1", "db"]), 2));
    // With paging and another filter.
    assert_eq!(list_vms(&db, &kw("web"), page(2, 3)).await, (names(&["webby2"]), 4));
    let f = VmFilter { keyword: Some("web".into()), state: Some("Stopped".into()), ..Default::default() };
    assert_eq!(list_vms(&db, &f, page(1, 100)).await, (names(&["web%2", "webx1", "webby2"]), 3));
}

/// CloudStack's `keyword` search is case-insensitive (MySQL's default collation). The same call must
/// give the same answer on both backends.
async fn vm_list_keyword_ignores_case(db: Db) {
    let fx = fixture(&db).await;
    insert_vm(&db, &new_vm(&fx, "c1", "WebServer", "Running", &fx.account)).await;
    insert_vm(&db, &new_vm(&fx, "c2", "database", "Stopped", &fx.account)).await;
    let kw = |k: &str| VmFilter { keyword: Some(k.into()), ..Default::default() };
    assert_eq!(list_vms(&db, &kw("Server"), page(1, 10)).await, (vec!["WebServer".to_string()], 1));
    assert_eq!(
        list_vms(&db, &kw("webserver"), page(1, 10)).await,
        (vec!["WebServer".to_string()], 1),
        "keyword search is case-insensitive ({:?})",
        db.dialect()
    );
    assert_eq!(
        list_vms(&db, &kw("DATA"), page(1, 10)).await,
        (vec!["database".to_string()], 1),
        "keyword search is case-insensitive ({:?})",
        db.dialect()
    );
}

async fn vm_expunge_frees_addresses(db: Db) {
    let fx = fixture(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        infra::pod_insert(&mut c, &new_pod("pod-one", &fx.zone, "10.9.0.5", "10.9.0.5")).await.unwrap();
    }
    let mut v = new_vm(&fx, "vm-x", "doomed", "Running", &fx.account);
    v.pod_id = Some("pod-one".into());
    insert_vm(&db, &v).await;
    insert_vm(&db, &new_vm(&fx, "vm-y", "keeper", "Running", &fx.account)).await;

    let r: Result<Option<String>, DbError> = retry_tx!(db, |tx| {
        let ip = infra::pod_ip_allocate(&mut tx, "pod-one", "nic-x").await?;
        if let Some(ip) = &ip {
            vm::nic_insert(
                &mut tx,
                &Nic {
                    id: "nic-x".into(),
                    vm_id: "vm-x".into(),
                    pod_id: "pod-one".into(),
                    ip: ip.clone(),
                    netmask: "255.255.0.0".into(),
                    gateway: "10.9.0.1".into(),
                    mac: "02:00:00:00:00:01".into(),
                    is_default: true,
                },
            )
            .await?;
            vm::volume_insert_root(
                &mut tx,
                &NewVolume {
                    id: "vol-x".into(),
                    vm_id: "vm-x".into(),
                    name: "ROOT-x".into(),
                    size_bytes: 1 << 30,
                    zone_id: fx.zone.clone(),
                    account_id: fx.account.clone(),
                    domain_id: fx.domain.clone(),
                    template_id: fx.template.clone(),
                    storage_type: "shared".into(),
                },
            )
            .await?;
        }
        Ok(ip)
    });
    assert_eq!(r.unwrap().as_deref(), Some("10.9.0.5"));
    let taken = "SELECT COUNT(*) FROM pod_ip WHERE pod_id = ? AND nic_id IS NOT NULL";
    assert_eq!(count(&db, taken, &["pod-one"]).await, 1);
    {
        let mut c = db.conn().await.unwrap();
        assert_eq!(infra::pod_ip_allocate(&mut c, "pod-one", "nic-other").await.unwrap(), None, "pod is full");
        assert_eq!(vm::nic_list_for_vms(&mut c, &["vm-x".into()]).await.unwrap().len(), 1);
        let (vols, n) =
            vm::volume_list(&mut c, &VolumeFilter { vm_id: Some("vm-x".into()), ..Default::default() }, page(1, 10))
                .await
                .unwrap();
        assert_eq!((n, vols[0].vm_name.as_deref()), (1, Some("doomed")));
        assert_eq!(vm::vm_count(&mut c).await.unwrap(), 2);
    }

    let r: Result<bool, DbError> = retry_tx!(db, |tx| vm::vm_expunge(&mut tx, "vm-x").await);
    assert!(r.unwrap());

    assert_eq!(count(&db, taken, &["pod-one"]).await, 0, "the address is free again");
    let mut c = db.conn().await.unwrap();
    assert!(vm::vm_fetch(&mut c, "vm-x").await.unwrap().is_none());
    let (vms, total) = vm::vm_list(&mut c, &VmFilter::default(), page(1, 100)).await.unwrap();
    assert_eq!((vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), total), (vec!["vm-y"], 1));
    let f = VmFilter { ids: vec!["vm-x".into()], ..Default::default() };
    assert_eq!(vm::vm_list(&mut c, &f, page(1, 10)).await.unwrap().1, 0);
    assert_eq!(vm::vm_count(&mut c).await.unwrap(), 1);
    assert!(!vm::vm_name_taken(&mut c, &fx.account, "doomed").await.unwrap());
    assert!(vm::nic_list_for_vms(&mut c, &["vm-x".into()]).await.unwrap().is_empty());
    let (_, n) =
        vm::volume_list(&mut c, &VolumeFilter { vm_id: Some("vm-x".into()), ..Default::default() }, page(1, 10))
            .await
            .unwrap();
    assert_eq!(n, 0, "the root volume is expunged with the VM");
    assert!(!vm::vm_expunge(&mut c, "vm-x").await.unwrap(), "expunge twice");
    assert_eq!(infra::pod_ip_allocate(&mut c, "pod-one", "nic-new").await.unwrap().as_deref(), Some("10.9.0.5"));
}

// ---------------------------------------------------------------------------------------------
// Pod addresses
// ---------------------------------------------------------------------------------------------

async fn pod_ip_concurrent_allocation(db: Db) {
    let fx = fixture(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        infra::pod_insert(&mut c, &new_pod("pod-c", &fx.zone, "10.2.0.1", "10.2.0.20")).await.unwrap();
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM pod_ip WHERE pod_id = ?", &["pod-c"]).await, 20);

    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let db = db.clone();
        set.spawn(async move {
            let nic = format!("nic-{i}");
            let r: Result<Option<String>, DbError> =
                retry_tx!(db, |tx| infra::pod_ip_allocate(&mut tx, "pod-c", &nic).await);
            (nic, r)
        });
    }
    let mut got = Vec::new();
    while let Some(res) = set.join_next().await {
        let (nic, r) = res.expect("allocation task");
        let ip = r.unwrap_or_else(|e| panic!("{nic}: {e}")).unwrap_or_else(|| panic!("{nic} got no address"));
        got.push((nic, ip));
    }
    let distinct: HashSet<&str> = got.iter().map(|(_, ip)| ip.as_str()).collect();
    assert_eq!(distinct.len(), 20, "{got:?}");
    let expected: HashSet<String> = (1..=20).map(|i| format!("10.2.0.{i}")).collect();
    assert_eq!(distinct, expected.iter().map(String::as_str).collect::<HashSet<_>>());
    for (nic, ip) in &got {
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM pod_ip WHERE nic_id = ? AND ip = ?", &[nic.as_str(), ip.as_str()]).await,
            1
        );
    }
    // The range is used up.
    let mut c = db.conn().await.unwrap();
    assert_eq!(infra::pod_ip_allocate(&mut c, "pod-c", "nic-late").await.unwrap(), None);
    // Other pods are unaffected.
    assert!(infra::pod_ip_allocate(&mut c, &fx.pod, "nic-late").await.unwrap().is_some());
}

async fn pod_ip_exhaustion(db: Db) {
    let fx = fixture(&db).await;
    let mut c = db.conn().await.unwrap();
    // Bad ranges are refused.
    assert!(infra::pod_insert(&mut c, &new_pod("pod-bad", &fx.zone, "10.5.0.9", "10.5.0.1")).await.is_err());
    assert!(infra::pod_insert(&mut c, &new_pod("pod-bad", &fx.zone, "10.5.0.1", "nonsense")).await.is_err());

    infra::pod_insert(&mut c, &new_pod("pod-t", &fx.zone, "192.168.5.1", "192.168.5.3")).await.unwrap();
    let mut got = HashSet::new();
    for i in 0..3 {
        let ip = infra::pod_ip_allocate(&mut c, "pod-t", &format!("n{i}")).await.unwrap();
        got.insert(ip.expect("a free address"));
    }
    let expected: HashSet<String> = ["192.168.5.1", "192.168.5.2", "192.168.5.3"].map(String::from).into();
    assert_eq!(got, expected);
    assert_eq!(infra::pod_ip_allocate(&mut c, "pod-t", "n3").await.unwrap(), None);
    assert_eq!(infra::pod_ip_allocate(&mut c, "pod-t", "n4").await.unwrap(), None);
    assert_eq!(infra::pod_ip_allocate(&mut c, "no-such-pod", "n5").await.unwrap(), None);
    let pods = infra::pod_list(&mut c).await.unwrap();
    assert!(pods.iter().any(|p| p.id == "pod-t" && p.start_ip == "192.168.5.1" && p.end_ip == "192.168.5.3"));
    assert!(!pods.iter().any(|p| p.id == "pod-bad"));
}

// ---------------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------------

async fn hosts_ownership(db: Db) {
    let fx = fixture(&db).await;
    let hc = host_connect(&fx, "guid-own");
    let (id, g1) = take_host(&db, &hc, "ms-a").await;
    assert_eq!(g1, 1);
    let mut c = db.conn().await.unwrap();
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    // Connecting until the first report of its VMs (a ping), then Up.
    assert_eq!((h.status.as_str(), h.mgmt_server_id.as_deref(), h.owner_gen), ("Connecting", Some("ms-a"), 1));
    assert!(infra::host_guid_known(&mut c, "guid-own").await.unwrap());
    assert!(!infra::host_guid_known(&mut c, "guid-never").await.unwrap());
    assert!(infra::host_ping(&mut c, &id, "ms-a", 1).await.unwrap());
    assert_eq!(infra::host_fetch(&mut c, &id).await.unwrap().unwrap().status, "Up");
    assert_eq!((h.zone_id.as_str(), h.pod_id.as_str(), h.cluster_id.as_str()), ("zone-1", "pod-1", "cluster-1"));
    assert_eq!((h.resource_state.as_str(), h.mem_mb, h.guid.as_str()), ("Enabled", 16384, "guid-own"));
    assert!(h.last_ping_ms.is_some());
    drop(c);

    // Each take bumps the generation by one, whoever takes it; the row is updated, not duplicated.
    let mut hc2 = hc.clone();
    hc2.ip = "192.0.2.99".into();
    hc2.mem_mb = 32768;
    hc2.zone_id = "elsewhere".into();
    let (id2, g2) = take_host(&db, &hc2, "ms-b").await;
    assert_eq!((id2.as_str(), g2), (id.as_str(), 2));
    let (id3, g3) = take_host(&db, &hc2, "ms-a").await;
    assert_eq!((id3.as_str(), g3), (id.as_str(), 3));
    let mut c = db.conn().await.unwrap();
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.owner_gen, h.mgmt_server_id.as_deref()), (3, Some("ms-a")));
    assert_eq!((h.ip.as_str(), h.mem_mb, h.zone_id.as_str()), ("192.0.2.99", 32768, "zone-1"));
    assert_eq!(infra::host_list(&mut c).await.unwrap().len(), 1);

    // Pings: only the current owner at the current generation.
    assert!(!infra::host_ping(&mut c, &id, "ms-a", 2).await.unwrap(), "old generation");
    assert!(!infra::host_ping(&mut c, &id, "ms-b", 3).await.unwrap(), "other server");
    assert!(!infra::host_ping(&mut c, &id, "ms-b", 2).await.unwrap(), "old owner at its old generation");
    let before = h.last_ping_ms.unwrap();
    drop(c);
    wait_db_past(&db, before).await;
    let mut c = db.conn().await.unwrap();
    assert!(infra::host_ping(&mut c, &id, "ms-a", 3).await.unwrap());
    assert!(infra::host_ping(&mut c, &id, "ms-a", 3).await.unwrap(), "pinging twice is fine");
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert!(h.last_ping_ms.unwrap() > before);

    // Disconnect: only the current owner.
    assert!(!infra::host_disconnect(&mut c, &id, "ms-b", 3).await.unwrap());
    assert!(!infra::host_disconnect(&mut c, &id, "ms-a", 2).await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.mgmt_server_id.as_deref()), ("Up", Some("ms-a")));
    assert!(infra::host_disconnect(&mut c, &id, "ms-a", 3).await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.mgmt_server_id, h.owner_gen), ("Disconnected", None, 3));
    assert!(!infra::host_ping(&mut c, &id, "ms-a", 3).await.unwrap(), "no pings after disconnect");
    assert!(!infra::host_disconnect(&mut c, &id, "ms-a", 3).await.unwrap());
    drop(c);

    // Reconnecting takes it again at the next generation.
    let (_, g4) = take_host(&db, &hc, "ms-b").await;
    assert_eq!(g4, 4);
    let mut c = db.conn().await.unwrap();
    assert!(infra::host_ping(&mut c, &id, "ms-b", 4).await.unwrap());
    assert!(infra::host_set_resource_state(&mut c, &id, "Maintenance").await.unwrap());
    assert!(!infra::host_set_resource_state(&mut c, "nope", "Maintenance").await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.resource_state.as_str()), ("Up", "Maintenance"));
}

async fn hosts_used_capacity(db: Db) {
    let fx = fixture(&db).await;
    let (h1, _) = take_host(&db, &host_connect(&fx, "guid-1"), "ms-a").await;
    let (h2, _) = take_host(&db, &host_connect(&fx, "guid-2"), "ms-a").await;
    let (h3, _) = take_host(&db, &host_connect(&fx, "guid-3"), "ms-a").await;
    let spec = [
        // id, cpu, mem, final state, host
        ("c1", 2, 1024, "Running", Some(&h1)),
        ("c2", 1, 512, "Starting", Some(&h1)),
        ("c3", 4, 4096, "Stopping", Some(&h1)),
        ("c4", 8, 8192, "Error", Some(&h1)), // on h1 but not holding capacity
        ("c5", 4, 2048, "Migrating", Some(&h2)),
        ("c6", 16, 9999, "Stopped", None),
    ];
    for (id, cpu, mem, state, host) in spec {
        let mut v = new_vm(&fx, id, id, "Stopped", &fx.account);
        v.cpu = cpu;
        v.mem_mb = mem;
        insert_vm(&db, &v).await;
        if let Some(h) = host {
            assert!(transition(&db, id, &["Stopped"], state, HostChange::Set(h.clone()), None).await);
        }
    }
    let mut c = db.conn().await.unwrap();
    let hosts = infra::host_list(&mut c).await.unwrap();
    let used = |id: &str| {
        let h = hosts.iter().find(|h| h.id == id).unwrap();
        (h.used_cpu, h.used_mem_mb, h.vm_count)
    };
    assert_eq!(hosts.len(), 3);
    assert_eq!(used(&h1), (7, 5632, 3));
    assert_eq!(used(&h2), (4, 2048, 1));
    assert_eq!(used(&h3), (0, 0, 0));
    drop(c);

    let r: Result<(i64, i64), DbError> = retry_tx!(db, |tx| infra::host_used_capacity_locked(&mut tx, &h1).await);
    assert_eq!(r.unwrap(), (7, 5632));
    let r: Result<(i64, i64), DbError> = retry_tx!(db, |tx| infra::host_used_capacity_locked(&mut tx, &h3).await);
    assert_eq!(r.unwrap(), (0, 0));

    // Stopping a VM off its host and expunging another release their capacity.
    assert!(transition(&db, "c1", &["Running"], "Stopped", HostChange::Clear, None).await);
    let mut c = db.conn().await.unwrap();
    assert!(vm::vm_expunge(&mut c, "c5").await.unwrap());
    let hosts = infra::host_list(&mut c).await.unwrap();
    let used = |id: &str| {
        let h = hosts.iter().find(|h| h.id == id).unwrap();
        (h.used_cpu, h.used_mem_mb, h.vm_count)
    };
    assert_eq!(used(&h1), (5, 4608, 2));
    assert_eq!(used(&h2), (0, 0, 0));
}

async fn hosts_concurrent_takeover(db: Db) {
    let fx = fixture(&db).await;
    let hc = host_connect(&fx, "guid-race");
    let (id, g) = take_host(&db, &hc, "ms-0").await;
    assert_eq!(g, 1);
    // Six servers take the connection at once: each gets its own generation.
    let mut set = tokio::task::JoinSet::new();
    for k in 1..=6 {
        let db = db.clone();
        let hc = hc.clone();
        set.spawn(async move {
            let ms = format!("ms-{k}");
            let (hid, g) = take_host(&db, &hc, &ms).await;
            (hid, g, ms)
        });
    }
    let mut got = Vec::new();
    while let Some(r) = set.join_next().await {
        got.push(r.expect("takeover task"));
    }
    assert!(got.iter().all(|(hid, _, _)| *hid == id));
    let mut gens: Vec<i64> = got.iter().map(|(_, g, _)| *g).collect();
    gens.sort();
    assert_eq!(gens, vec![2, 3, 4, 5, 6, 7], "{got:?}");
    let last = got.iter().find(|(_, g, _)| *g == 7).unwrap().2.clone();
    let mut c = db.conn().await.unwrap();
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.owner_gen, h.mgmt_server_id.as_deref()), (7, Some(last.as_str())));
    // Only the newest owner may ping.
    for (_, g, ms) in &got {
        assert_eq!(infra::host_ping(&mut c, &id, ms, *g).await.unwrap(), *g == 7, "{ms} gen {g}");
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

async fn sessions(db: Db) {
    let fx = fixture(&db).await;
    let mut c = db.conn().await.unwrap();
    let sess = |id: &str, timeout_s: i64| Session {
        id: id.into(),
        user_id: fx.user.clone(),
        csrf_key: format!("csrf-{id}"),
        last_used_ms: 0,
        timeout_s,
    };
    account::session_insert(&mut c, &sess("s-live", 1800)).await.unwrap();
    account::session_insert(&mut c, &sess("s-stale", 0)).await.unwrap();

    let s1 = account::session_touch(&mut c, "s-live").await.unwrap().expect("live session");
    assert_eq!((s1.user_id.as_str(), s1.csrf_key.as_str(), s1.timeout_s), ("user-1", "csrf-s-live", 1800));
    drop(c);
    wait_db_past(&db, s1.last_used_ms).await;
    let mut c = db.conn().await.unwrap();
    let s2 = account::session_touch(&mut c, "s-live").await.unwrap().expect("still live");
    assert!(s2.last_used_ms > s1.last_used_ms, "touch refreshes last use");

    assert!(account::session_touch(&mut c, "s-stale").await.unwrap().is_none(), "timeout 0 is stale");
    assert!(account::session_touch(&mut c, "s-unknown").await.unwrap().is_none());

    // Purge removes only the stale one.
    assert_eq!(account::session_purge(&mut c).await.unwrap(), 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM session WHERE id = ?", &["s-stale"]).await, 0);

    assert!(account::session_delete(&mut c, "s-live").await.unwrap());
    assert!(account::session_touch(&mut c, "s-live").await.unwrap().is_none());
    assert!(!account::session_delete(&mut c, "s-live").await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Settings and metadata
// ---------------------------------------------------------------------------------------------

async fn config_and_meta(db: Db) {
    migrated(&db).await;
    let mut c = db.conn().await.unwrap();
    assert_eq!(config_version(&mut c).await.unwrap(), 0);
    assert!(config_list(&mut c).await.unwrap().is_empty());

    config_set(&mut c, "expunge.delay", "60").await.unwrap();
    let v1 = config_version(&mut c).await.unwrap();
    assert_eq!(v1, 1);
    config_set(&mut c, "expunge.delay", "120").await.unwrap();
    let v2 = config_version(&mut c).await.unwrap();
    assert_eq!(config_list(&mut c).await.unwrap().len(), 1, "an update, not a second row");
    assert!(v2 > v1, "the version moves on update: {v1} -> {v2}");
    // Setting the same value again is an update too.
    config_set(&mut c, "expunge.delay", "120").await.unwrap();
    config_set(&mut c, "alpha", "a").await.unwrap();
    let v3 = config_version(&mut c).await.unwrap();
    assert_eq!(v3, v2 + 2, "every set moves the sequence, even to the same value");
    let rows = config_list(&mut c).await.unwrap();
    let pairs: Vec<(&str, &str)> = rows.iter().map(|r| (r.name.as_str(), r.value.as_str())).collect();
    assert_eq!(pairs, vec![("alpha", "a"), ("expunge.delay", "120")]);
    assert!(rows.iter().all(|r| r.updated_ms > 0));

    assert_eq!(meta_get(&mut c, "key_fingerprint").await.unwrap(), None);
    meta_set(&mut c, "key_fingerprint", "abc").await.unwrap();
    assert_eq!(meta_get(&mut c, "key_fingerprint").await.unwrap().as_deref(), Some("abc"));
    meta_set(&mut c, "key_fingerprint", "def").await.unwrap();
    assert_eq!(meta_get(&mut c, "key_fingerprint").await.unwrap().as_deref(), Some("def"));
    meta_set(&mut c, "key_fingerprint", "def").await.unwrap();
    assert_eq!(meta_get(&mut c, "key_fingerprint").await.unwrap().as_deref(), Some("def"));
    meta_set(&mut c, "cluster_id", "").await.unwrap();
    assert_eq!(meta_get(&mut c, "cluster_id").await.unwrap().as_deref(), Some(""));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM cloud_meta", &[]).await, 2);
}

/// Servers reload their settings only when `config_version` changes, so every change must move
/// it, including two changes in the same millisecond of the database clock.
async fn config_version_sees_every_change(db: Db) {
    migrated(&db).await;
    let mut c = db.conn().await.unwrap();
    config_set(&mut c, "x", "initial").await.unwrap();
    let mut missed = Vec::new();
    for i in 0..50 {
        config_set(&mut c, "x", &format!("a{i}")).await.unwrap();
        let seen = config_version(&mut c).await.unwrap();
        config_set(&mut c, "x", &format!("b{i}")).await.unwrap();
        let after = config_version(&mut c).await.unwrap();
        if after == seen {
            missed.push(after);
        }
    }
    assert!(
        missed.is_empty(),
        "{} of 50 changes left config_version unchanged (a poller that read the version in between \
         never reloads): {:?}",
        missed.len(),
        &missed[..missed.len().min(3)]
    );
}

async fn management_servers(db: Db) {
    migrated(&db).await;
    let server = |id: &str, run: &str| MgmtServer {
        id: id.into(),
        run_id: run.into(),
        name: format!("node {id}"),
        version: "0.1.0".into(),
        service_ip: "192.0.2.1".into(),
        api_port: 8080,
        agent_port: 8250,
        cluster_port: 9090,
        state: "ignored".into(),
        last_heartbeat_ms: 0,
        started_ms: 0,
        created_ms: 0,
        heartbeat_age_ms: 0,
        db_endpoint: String::new(),
    };
    let mut c = db.conn().await.unwrap();
    ms::ms_register(&mut c, &server("ms-1", "run-1")).await.unwrap();
    let l = ms::ms_list(&mut c).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].id.as_str(), l[0].run_id.as_str(), l[0].state.as_str()), ("ms-1", "run-1", "Up"));
    assert_eq!((l[0].api_port, l[0].agent_port, l[0].cluster_port), (8080, 8250, 9090));
    assert!((0..5_000).contains(&l[0].heartbeat_age_ms), "{}", l[0].heartbeat_age_ms);
    let hb1 = l[0].last_heartbeat_ms;
    drop(c);

    wait_db_past(&db, hb1 + 30).await;
    let mut c = db.conn().await.unwrap();
    let l = ms::ms_list(&mut c).await.unwrap();
    assert!(l[0].heartbeat_age_ms >= 30, "age on the database clock: {}", l[0].heartbeat_age_ms);
    assert!(ms::ms_heartbeat(&mut c, "ms-1", "run-1", "ep-1").await.unwrap());
    let listed = ms::ms_list(&mut c).await.unwrap();
    assert_eq!(listed.iter().find(|m| m.id == "ms-1").map(|m| m.db_endpoint.as_str()), Some("ep-1"));
    assert!(!ms::ms_heartbeat(&mut c, "ms-1", "run-x", "ep-1").await.unwrap());
    assert!(!ms::ms_heartbeat(&mut c, "ms-9", "run-1", "ep-1").await.unwrap());
    let l = ms::ms_list(&mut c).await.unwrap();
    assert!(l[0].last_heartbeat_ms > hb1);

    // A new run of the same server takes the row over; the old run is fenced off.
    let mut s2 = server("ms-1", "run-2");
    s2.api_port = 8081;
    ms::ms_register(&mut c, &s2).await.unwrap();
    let l = ms::ms_list(&mut c).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].run_id.as_str(), l[0].api_port), ("run-2", 8081));
    assert!(!ms::ms_heartbeat(&mut c, "ms-1", "run-1", "ep-1").await.unwrap());
    assert!(!ms::ms_set_state(&mut c, "ms-1", "run-1", "Down").await.unwrap());
    assert!(ms::ms_heartbeat(&mut c, "ms-1", "run-2", "ep-1").await.unwrap());

    // Down: heartbeats stop counting until the server registers again.
    assert!(ms::ms_set_state(&mut c, "ms-1", "run-2", "Down").await.unwrap());
    assert!(!ms::ms_heartbeat(&mut c, "ms-1", "run-2", "ep-1").await.unwrap());
    assert_eq!(ms::ms_list(&mut c).await.unwrap()[0].state, "Down");
    ms::ms_register(&mut c, &server("ms-1", "run-3")).await.unwrap();
    assert!(ms::ms_heartbeat(&mut c, "ms-1", "run-3", "ep-1").await.unwrap());

    ms::ms_register(&mut c, &server("ms-2", "run-a")).await.unwrap();
    let ids: Vec<String> = ms::ms_list(&mut c).await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec!["ms-1", "ms-2"]);
}

async fn events(db: Db) {
    let fx = fixture(&db).await;
    let ev = |id: &str, ty: &str, level: &str, desc: &str, account: &str, user: Option<&str>| Event {
        id: id.into(),
        event_type: ty.into(),
        level: level.into(),
        state: "Completed".into(),
        description: desc.into(),
        resource_type: Some("VirtualMachine".into()),
        resource_id: Some("vm-1".into()),
        account_id: account.into(),
        domain_id: fx.domain.clone(),
        user_id: user.map(str::to_string),
        created_ms: 0,
    };
    let mut c = db.conn().await.unwrap();
    let rows = [
        ev("e1", "VM.CREATE", "INFO", "created vm web_1", &fx.account, Some(&fx.user)),
        ev("e2", "VM.START", "INFO", "started vm webx1 at 100% speed", &fx.account, Some(&fx.user)),
        ev("e3", "VM.STOP", "WARN", "stopped vm web_1", &fx.account, None),
        ev("e4", "VM.CREATE", "INFO", "created vm other!", &fx.account2, None),
        ev("e5", "USER.LOGIN", "INFO", "login", "gone-account", None),
    ];
    for e in &rows {
        event::event_insert(&mut c, e).await.unwrap();
    }
    let list = |f: EventFilter, p: Page| {
        let db = db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            let (rows, total) = event::event_list(&mut c, &f, p).await.unwrap();
            (rows.into_iter().map(|r| r.event.id).collect::<Vec<_>>(), total)
        }
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(list(EventFilter::default(), page(1, 10)).await, (s(&["e5", "e4", "e3", "e2", "e1"]), 5));
    assert_eq!(list(EventFilter::default(), page(2, 2)).await, (s(&["e3", "e2"]), 5));
    let f = EventFilter { account_id: Some(fx.account.clone()), ..Default::default() };
    assert_eq!(list(f, page(1, 10)).await, (s(&["e3", "e2", "e1"]), 3));
    let f = EventFilter { event_type: Some("VM.CREATE".into()), ..Default::default() };
    assert_eq!(list(f, page(1, 10)).await, (s(&["e4", "e1"]), 2));
    let f = EventFilter { level: Some("WARN".into()), ..Default::default() };
    assert_eq!(list(f, page(1, 10)).await, (s(&["e3"]), 1));
    let f = EventFilter { id: Some("e2".into()), ..Default::default() };
    assert_eq!(list(f, page(1, 10)).await, (s(&["e2"]), 1));
    let kw = |k: &str| EventFilter { keyword: Some(k.into()), ..Default::default() };
    assert_eq!(list(kw("web_1"), page(1, 10)).await, (s(&["e3", "e1"]), 2));
    assert_eq!(list(kw("b_"), page(1, 10)).await, (s(&["e3", "e1"]), 2), "`_` is literal");
    assert_eq!(list(kw("%"), page(1, 10)).await, (s(&["e2"]), 1), "`%` is literal");
    assert_eq!(list(kw("LOGIN"), page(1, 10)).await, (s(&["e5"]), 1), "matches the type");
    assert_eq!(list(kw("100%"), page(1, 10)).await, (s(&["e2"]), 1));
    assert_eq!(list(kw("!"), page(1, 10)).await, (s(&["e4"]), 1), "`!` is literal");

    let (full, _) = event::event_list(&mut c, &EventFilter::default(), page(1, 10)).await.unwrap();
    let by_id = |id: &str| full.iter().find(|r| r.event.id == id).unwrap();
    let e1 = by_id("e1");
    assert_eq!((e1.account_name.as_str(), e1.domain_name.as_str()), ("alice", "ROOT"));
    assert_eq!(e1.username.as_deref(), Some("alice"));
    assert_eq!(e1.event.description, "created vm web_1");
    assert_eq!(e1.event.resource_id.as_deref(), Some("vm-1"));
    assert!(e1.event.created_ms > 0);
    assert_eq!(by_id("e3").username, None);
    assert_eq!(by_id("e5").account_name, "", "unknown account: empty name");
    // Event ids are unique.
    let dup = event::event_insert(&mut c, &rows[0]).await.expect_err("duplicate event id");
    assert!(dup.is_unique_violation(), "{dup}");
}

// ---------------------------------------------------------------------------------------------
// retry_tx!
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum TestErr {
    Db(DbError),
    Transient(u32),
    Fatal,
}

impl From<DbError> for TestErr {
    fn from(e: DbError) -> Self {
        TestErr::Db(e)
    }
}

impl Retryable for TestErr {
    fn is_retryable(&self) -> bool {
        match self {
            TestErr::Db(e) => e.is_retryable(),
            TestErr::Transient(_) => true,
            TestErr::Fatal => false,
        }
    }
}

async fn meta(db: &Db, name: &str) -> Option<String> {
    let mut c = db.conn().await.unwrap();
    meta_get(&mut c, name).await.unwrap()
}

async fn retry_tx_custom_errors(db: Db) {
    migrated(&db).await;

    // Retryable for the first two attempts: rerun, and only the last attempt's writes remain.
    let attempts = AtomicU32::new(0);
    let r: Result<u32, TestErr> = retry_tx!(db, |tx| {
        let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
        meta_set(&mut tx, &format!("attempt-{n}"), "x").await?;
        meta_set(&mut tx, "counter", &n.to_string()).await?;
        if n <= 2 { Err(TestErr::Transient(n)) } else { Ok(n) }
    });
    assert!(matches!(r, Ok(3)), "{r:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(meta(&db, "counter").await.as_deref(), Some("3"));
    assert_eq!(meta(&db, "attempt-1").await, None, "attempt 1 rolled back");
    assert_eq!(meta(&db, "attempt-2").await, None, "attempt 2 rolled back");
    assert_eq!(meta(&db, "attempt-3").await.as_deref(), Some("x"));

    // A non-retryable error is returned at once, its writes rolled back.
    let attempts = AtomicU32::new(0);
    let r: Result<(), TestErr> = retry_tx!(db, |tx| {
        attempts.fetch_add(1, Ordering::SeqCst);
        meta_set(&mut tx, "fatal-write", "x").await?;
        meta_set(&mut tx, "counter", "fatal").await?;
        Err(TestErr::Fatal)
    });
    assert!(matches!(r, Err(TestErr::Fatal)), "{r:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(meta(&db, "fatal-write").await, None);
    assert_eq!(meta(&db, "counter").await.as_deref(), Some("3"));

    // Always retryable: gives up after TX_ATTEMPTS and returns the last error.
    let attempts = AtomicU32::new(0);
    let r: Result<(), TestErr> = retry_tx!(db, |tx| {
        let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
        meta_set(&mut tx, "counter", "never").await?;
        Err(TestErr::Transient(n))
    });
    assert!(matches!(r, Err(TestErr::Transient(n)) if n == TX_ATTEMPTS), "{r:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), TX_ATTEMPTS);
    assert_eq!(meta(&db, "counter").await.as_deref(), Some("3"));
}

/// Shorten (or restore) how long this connection waits for a lock held by another one.
async fn set_lock_wait(tx: &mut Tx, short: bool) -> Result<(), DbError> {
    let (conn, d) = tx.parts();
    let q = match (d, short) {
        (Dialect::Sqlite, true) => "PRAGMA busy_timeout = 200",
        (Dialect::Sqlite, false) => "PRAGMA busy_timeout = 10000",
        (Dialect::MySql, true) => "SET SESSION innodb_lock_wait_timeout = 1",
        (Dialect::MySql, false) => "SET SESSION innodb_lock_wait_timeout = 50",
    };
    sqlx::query(q).execute(conn).await.map(|_| ()).map_err(|source| DbError::Sql { what: "set lock wait", source })
}

async fn retry_tx_real_lock_conflict(db: Db) {
    migrated(&db).await;
    {
        let mut c = db.conn().await.unwrap();
        config_set(&mut c, "hot", "initial").await.unwrap();
    }
    // Another transaction holds the row (MySQL) / the write lock (SQLite).
    let mut holder = db.begin().await.unwrap();
    config_set(&mut holder, "hot", "holder").await.unwrap();
    let holder = Mutex::new(Some(holder));

    let attempts = AtomicU32::new(0);
    let errors = Mutex::new(Vec::<(String, bool)>::new());
    let r: Result<u32, DbError> = retry_tx!(db, |tx| {
        let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= 2 {
            // The conflicting transaction goes away before the rerun.
            let h = holder.lock().unwrap().take();
            if let Some(h) = h {
                h.rollback().await?;
            }
        }
        set_lock_wait(&mut tx, n == 1).await?;
        let res = config_set(&mut tx, "hot", &format!("attempt {n}")).await;
        if let Err(e) = &res {
            errors.lock().unwrap().push((e.to_string(), e.is_retryable()));
        }
        res.map(|_| n)
    });
    let errors = errors.into_inner().unwrap();
    assert!(matches!(r, Ok(2)), "{r:?}, errors {errors:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].1, "the lock conflict must be retryable: {}", errors[0].0);
    let mut c = db.conn().await.unwrap();
    let rows = config_list(&mut c).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].value, "attempt 2");
}

async fn retry_tx_non_retryable_db_error(db: Db) {
    let fx = fixture(&db).await;
    let attempts = AtomicU32::new(0);
    let r: Result<(), DbError> = retry_tx!(db, |tx| {
        attempts.fetch_add(1, Ordering::SeqCst);
        meta_set(&mut tx, "before-conflict", "x").await?;
        // The zone exists already: a unique violation, which no rerun can fix.
        infra::zone_insert(
            &mut tx,
            &Zone {
                id: fx.zone.clone(),
                name: "dup".into(),
                description: String::new(),
                network_type: "Basic".into(),
                dns1: String::new(),
                internal_dns1: String::new(),
                allocation_state: "Enabled".into(),
                created_ms: 0,
            },
        )
        .await
    });
    let e = r.expect_err("duplicate zone");
    assert!(e.is_unique_violation(), "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(meta(&db, "before-conflict").await, None, "rolled back");
    let mut c = db.conn().await.unwrap();
    assert_eq!(infra::zone_list(&mut c).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Crypto
// ---------------------------------------------------------------------------------------------

async fn crypto_secrets_in_users(db: Db) {
    let fx = fixture(&db).await;
    let key = Key::generate();
    let secrets = [("u-a", "api-a", "s3cret-A"), ("u-b", "api-b", "ünïcödé secret with spaces / + =")];
    let mut c = db.conn().await.unwrap();
    for (id, api, secret) in secrets {
        let enc = key.encrypt(secret).unwrap();
        account::user_insert(
            &mut c,
            &NewUser {
                id: id.into(),
                account_id: fx.account.clone(),
                username: id.into(),
                password_hash: crypto::password_hash("hunter2"),
                api_key: Some(api.into()),
                secret_enc: Some(enc),
                firstname: "F".into(),
                lastname: "L".into(),
                email: format!("{id}@example.org"),
            },
        )
        .await
        .unwrap();
    }
    meta_set(&mut c, "key_fingerprint", &key.fingerprint()).await.unwrap();

    for (id, api, secret) in secrets {
        let u = account::user_fetch(&mut c, id).await.unwrap().expect("user");
        let stored = u.secret_enc.clone().expect("secret stored");
        assert_ne!(stored, secret);
        assert!(!stored.contains(secret));
        assert!(stored.starts_with(&format!("v2:{}:", key.fingerprint())), "{stored}");
        assert_eq!(key.decrypt(&stored).unwrap(), secret);
        assert!(Key::generate().decrypt(&stored).is_err(), "another key cannot decrypt");
        assert!(crypto::password_verify("hunter2", &u.password_hash));
        assert!(!crypto::password_verify("hunter3", &u.password_hash));
        assert_eq!((u.account_name.as_str(), u.domain_path.as_str()), ("alice", "/"));

        let by_key = account::user_fetch_by_api_key(&mut c, api).await.unwrap().expect("by api key");
        assert_eq!(by_key.id, id);
        assert_eq!(key.decrypt(by_key.secret_enc.as_deref().unwrap()).unwrap(), secret);
    }
    // Two encryptions of one secret differ (random nonce).
    assert_ne!(key.encrypt("same").unwrap(), key.encrypt("same").unwrap());
    assert_eq!(meta_get(&mut c, "key_fingerprint").await.unwrap(), Some(key.fingerprint()));
    let by_name = account::user_fetch_by_name(&mut c, "u-a", "/").await.unwrap().expect("by name");
    assert_eq!(by_name.id, "u-a");
    assert!(account::user_fetch_by_api_key(&mut c, "api-none").await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Named locks and the Down declaration
// ---------------------------------------------------------------------------------------------

async fn cluster_locks(db: Db) {
    migrated(&db).await;
    let mut c = db.conn().await.unwrap();
    let g1 = ms::lock_acquire(&mut c, "gc", "ms-1", "r1", 60_000).await.unwrap().expect("free lock taken");
    assert_eq!(g1.gen_, 1);
    // Renewal by the holder keeps the generation; another server is refused while it is held.
    assert_eq!(ms::lock_acquire(&mut c, "gc", "ms-1", "r1", 60_000).await.unwrap().unwrap().gen_, 1);
    assert!(ms::lock_acquire(&mut c, "gc", "ms-2", "r9", 60_000).await.unwrap().is_none());
    // A new run of the same server is another holder.
    assert!(ms::lock_acquire(&mut c, "gc", "ms-1", "r2", 60_000).await.unwrap().is_none());
    // Other names are independent.
    assert_eq!(ms::lock_acquire(&mut c, "scanner", "ms-2", "r9", 60_000).await.unwrap().unwrap().gen_, 1);
    // Released: the next holder gets a higher generation (a fencing token).
    assert!(ms::lock_release(&mut c, "gc", "ms-1", "r1").await.unwrap());
    assert!(!ms::lock_release(&mut c, "gc", "ms-1", "r1").await.unwrap());
    assert_eq!(ms::lock_acquire(&mut c, "gc", "ms-2", "r9", 1).await.unwrap().unwrap().gen_, 2);
    // An expired lease is taken over, bumping the generation again.
    let t = skyhold_db::now_ms(&mut c).await.unwrap();
    drop(c);
    wait_db_past(&db, t + 5).await;
    let mut c = db.conn().await.unwrap();
    assert_eq!(ms::lock_acquire(&mut c, "gc", "ms-3", "r3", 60_000).await.unwrap().unwrap().gen_, 3);
    // A dead holder's locks are freed by the takeover.
    assert_eq!(ms::lock_release_all_of(&mut c, "ms-3").await.unwrap(), 1);
    assert_eq!(ms::lock_acquire(&mut c, "gc", "ms-1", "r1", 60_000).await.unwrap().unwrap().gen_, 4);
}

async fn membership_down_and_takeover(db: Db) {
    migrated(&db).await;
    let server = |id: &str, run: &str| MgmtServer {
        id: id.into(),
        run_id: run.into(),
        name: id.into(),
        version: "0.1.0".into(),
        service_ip: "192.0.2.1".into(),
        api_port: 8080,
        agent_port: 8250,
        cluster_port: 9090,
        state: "Up".into(),
        last_heartbeat_ms: 0,
        started_ms: 0,
        created_ms: 0,
        heartbeat_age_ms: 0,
        db_endpoint: String::new(),
    };
    let mut c = db.conn().await.unwrap();
    ms::ms_register(&mut c, &server("ms-a", "run-a")).await.unwrap();
    // Fresh heartbeat: not declared down.
    assert!(!ms::ms_declare_down(&mut c, "ms-a", "run-a", 60_000).await.unwrap());
    let hb = ms::ms_fetch(&mut c, "ms-a").await.unwrap().unwrap().last_heartbeat_ms;
    drop(c);
    wait_db_past(&db, hb + 20).await;
    // Several survivors race: exactly one wins.
    let mut wins = 0;
    for _ in 0..4 {
        let mut c = db.conn().await.unwrap();
        if ms::ms_declare_down(&mut c, "ms-a", "run-a", 10).await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    let mut c = db.conn().await.unwrap();
    assert!(ms::ms_is_down_run(&mut c, "ms-a", "run-a").await.unwrap());
    // The dead run cannot heartbeat any more.
    assert!(!ms::ms_heartbeat(&mut c, "ms-a", "run-a", "ep-1").await.unwrap());
    // A new run of the same id replaces the row: the old run's takeover must no longer apply.
    ms::ms_register(&mut c, &server("ms-a", "run-b")).await.unwrap();
    assert!(!ms::ms_is_down_run(&mut c, "ms-a", "run-a").await.unwrap());
    assert!(ms::ms_heartbeat(&mut c, "ms-a", "run-b", "ep-1").await.unwrap());
    // Drain requests and cancels are conditional on the state.
    assert!(ms::ms_request_drain(&mut c, "ms-a").await.unwrap());
    assert!(!ms::ms_request_drain(&mut c, "ms-a").await.unwrap());
    assert!(ms::ms_transition(&mut c, "ms-a", "run-b", "PreparingForShutdown", "ReadyForShutdown").await.unwrap());
    assert!(ms::ms_cancel_drain(&mut c, "ms-a").await.unwrap());
    assert!(!ms::ms_transition(&mut c, "ms-a", "run-b", "PreparingForShutdown", "ReadyForShutdown").await.unwrap());
    assert_eq!(ms::ms_fetch(&mut c, "ms-a").await.unwrap().unwrap().state, "Up");
}

/// Host HA rows: heartbeat observations only move forward, the fence mark refuses a connected
/// host, HA moves are conditional, out-of-band settings upsert, work items move conditionally,
/// alerts page newest first with their total.
async fn host_ha_rows(db: Db) {
    let fx = fixture(&db).await;
    let (id, g) = take_host(&db, &host_connect(&fx, "guid-ha"), "ms-a").await;
    let mut c = db.conn().await.unwrap();
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.ha_state.as_str(), h.hb_counter, h.hb_seen_ms, h.disconnected_ms), ("Available", 0, 0, 0));
    assert_eq!(h.check_addr, "192.0.2.10:7");
    assert!(hostha::host_hb_observe(&mut c, &id, 5).await.unwrap());
    assert!(!hostha::host_hb_observe(&mut c, &id, 5).await.unwrap(), "not advancing");
    assert!(!hostha::host_hb_observe(&mut c, &id, 3).await.unwrap(), "never backwards");
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!(h.hb_counter, 5);
    assert!(h.hb_seen_ms > 0);
    // Connected: never fenced.
    assert!(!hostha::host_mark_fenced(&mut c, &id).await.unwrap());
    assert!(infra::host_disconnect(&mut c, &id, "ms-a", g).await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!(h.status, "Disconnected");
    assert!(h.disconnected_ms > 0);
    assert!(!hostha::host_ha_move(&mut c, &id, &["Suspect"], "Fencing", None).await.unwrap());
    assert!(hostha::host_ha_move(&mut c, &id, &["Available"], "Suspect", Some("Alert")).await.unwrap());
    assert!(hostha::host_mark_fenced(&mut c, &id).await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.ha_state.as_str()), ("Down", "Fenced"));
    // The agent comes back: Connecting (never fenced while connected), then Up, and Available.
    drop(c);
    let (_, g) = take_host(&db, &host_connect(&fx, "guid-ha"), "ms-b").await;
    let mut c = db.conn().await.unwrap();
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.ha_state.as_str(), h.disconnected_ms), ("Connecting", "Available", 0));
    assert!(!hostha::host_mark_fenced(&mut c, &id).await.unwrap(), "a connecting host is not fenced");
    assert!(infra::host_ping(&mut c, &id, "ms-b", g).await.unwrap());
    let h = infra::host_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((h.status.as_str(), h.ha_state.as_str(), h.disconnected_ms), ("Up", "Available", 0));
    assert!(!hostha::host_mark_fenced(&mut c, &id).await.unwrap(), "an Up host is not fenced");

    let mut o = Oob {
        host_id: id.clone(),
        driver: "ipmitool".into(),
        address: "10.0.0.9".into(),
        port: 623,
        username: "admin".into(),
        password_enc: "v2:x".into(),
        enabled: false,
        power_state: "Unknown".into(),
    };
    hostha::oob_upsert(&mut c, &o).await.unwrap();
    o.address = "10.0.0.10".into();
    hostha::oob_upsert(&mut c, &o).await.unwrap();
    assert!(hostha::oob_set_enabled(&mut c, &id, true).await.unwrap());
    assert!(!hostha::oob_set_enabled(&mut c, "no-such-host", true).await.unwrap());
    let got = hostha::oob_fetch(&mut c, &id).await.unwrap().unwrap();
    assert_eq!((got.address.as_str(), got.enabled), ("10.0.0.10", true));
    assert_eq!(hostha::oob_list(&mut c).await.unwrap().len(), 1);

    let w = Work {
        id: "w1".into(),
        vm_id: "vm-1".into(),
        host_id: id.clone(),
        zone_id: fx.zone.clone(),
        cluster_id: fx.cluster.clone(),
        kind: "Restart".into(),
        reason: "host fenced".into(),
        state: "Pending".into(),
        attempts: 0,
        job_id: None,
        next_try_ms: 0,
        last_error: None,
        created_ms: 0,
        updated_ms: 0,
        completed_ms: None,
    };
    hostha::work_insert(&mut c, &w).await.unwrap();
    let run = WorkMove { to: "Running", attempts: 0, job_id: Some("job-1"), next_try_ms: 0, last_error: None };
    assert!(hostha::work_update(&mut c, "w1", "Pending", run).await.unwrap());
    assert!(!hostha::work_update(&mut c, "w1", "Pending", run).await.unwrap(), "one winner");
    let done = WorkMove { to: "Done", attempts: 1, job_id: Some("job-1"), next_try_ms: 0, last_error: None };
    assert!(hostha::work_update(&mut c, "w1", "Running", done).await.unwrap());
    let all = hostha::work_of_vm(&mut c, "vm-1").await.unwrap();
    assert_eq!((all[0].state.as_str(), all[0].attempts, all[0].job_id.as_deref()), ("Done", 1, Some("job-1")));
    assert!(all[0].completed_ms.is_some());
    assert!(hostha::work_list(&mut c, hostha::WORK_ACTIVE, 10).await.unwrap().is_empty());
    assert_eq!(hostha::work_counts(&mut c).await.unwrap(), vec![("Done".to_string(), 1)]);

    for i in 0..3 {
        let a = Alert {
            id: format!("alert-{i}"),
            alert_type: if i == 2 { 8 } else { 7 },
            name: "ALERT.COMPUTE.HOST".into(),
            subject: format!("subject {i}"),
            description: "d".into(),
            zone_id: Some(fx.zone.clone()),
            pod_id: None,
            cluster_id: None,
            host_id: Some(id.clone()),
            created_ms: 0,
        };
        hostha::alert_insert(&mut c, &a).await.unwrap();
    }
    let (page, total) = hostha::alert_list(&mut c, None, None, None, Page { page: 1, size: 2 }).await.unwrap();
    assert_eq!((page.len(), total, page[0].id.as_str()), (2, 3, "alert-2"), "newest first");
    let (only, total) = hostha::alert_list(&mut c, Some(7), None, None, Page { page: 1, size: 10 }).await.unwrap();
    assert_eq!((only.len(), total), (2, 2));
    let (one, _) = hostha::alert_list(&mut c, None, None, Some("alert-1"), Page { page: 1, size: 10 }).await.unwrap();
    assert_eq!(one[0].subject, "subject 1");
}
