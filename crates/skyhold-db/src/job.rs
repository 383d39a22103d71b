//! Async jobs: durable, step-wise, leased with a fencing generation.
//!
//! A job is claimed by one management server at a time through a lease (`owner_ms`,
//! `lease_until_ms` on the database clock) and a generation (`lease_gen`) that grows on every
//! claim. Every write on behalf of a job (`job_save_step`, `job_complete`) is conditional on the
//! generation it was claimed with, inside the same transaction as the domain change it records, so
//! a stale owner's late writes change nothing. Jobs on one object (`instance_id`) run one at a time
//! in submission order: a job is claimable only when no older unfinished job on its object exists.

use crate::{Ctx, DbError, Page, Sql, get_i64, get_opt_i64, get_opt_str, get_str, sql};

#[derive(Debug, Clone)]
pub struct Job {
    pub seq: i64,
    pub id: String,
    pub cmd: String,
    pub user_id: String,
    pub account_id: String,
    pub domain_id: String,
    pub instance_type: Option<String>,
    pub instance_id: Option<String>,
    pub params: String,
    pub status: i64,
    pub proc_status: i64,
    pub result_code: i64,
    pub result: Option<String>,
    pub step: i64,
    pub step_state: String,
    pub owner_ms: Option<String>,
    pub lease_gen: i64,
    pub lease_until_ms: i64,
    pub attempts: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub completed_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub cmd: String,
    pub user_id: String,
    pub account_id: String,
    pub domain_id: String,
    pub instance_type: Option<String>,
    pub instance_id: Option<String>,
    pub params: String,
}

const JOB_COLS: &str = "seq, id, cmd, user_id, account_id, domain_id, instance_type, instance_id, params, status, \
     proc_status, result_code, result, step, step_state, owner_ms, lease_gen, lease_until_ms, attempts, \
     created_ms, updated_ms, completed_ms";

fn job_from_row(r: &crate::AnyRow) -> Result<Job, DbError> {
    Ok(Job {
        seq: get_i64(r, "seq")?,
        id: get_str(r, "id")?,
        cmd: get_str(r, "cmd")?,
        user_id: get_str(r, "user_id")?,
        account_id: get_str(r, "account_id")?,
        domain_id: get_str(r, "domain_id")?,
        instance_type: get_opt_str(r, "instance_type")?,
        instance_id: get_opt_str(r, "instance_id")?,
        params: get_str(r, "params")?,
        status: get_i64(r, "status")?,
        proc_status: get_i64(r, "proc_status")?,
        result_code: get_i64(r, "result_code")?,
        result: get_opt_str(r, "result")?,
        step: get_i64(r, "step")?,
        step_state: get_str(r, "step_state")?,
        owner_ms: get_opt_str(r, "owner_ms")?,
        lease_gen: get_i64(r, "lease_gen")?,
        lease_until_ms: get_i64(r, "lease_until_ms")?,
        attempts: get_i64(r, "attempts")?,
        created_ms: get_i64(r, "created_ms")?,
        updated_ms: get_i64(r, "updated_ms")?,
        completed_ms: get_opt_i64(r, "completed_ms")?,
    })
}

pub async fn job_insert(c: &mut dyn Sql, j: &NewJob) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO async_job (id, cmd, user_id, account_id, domain_id, instance_type, instance_id, params, \
         status, proc_status, result_code, result, step, step_state, owner_ms, lease_gen, lease_until_ms, \
         attempts, created_ms, updated_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, NULL, 0, '{}', NULL, 0, 0, 0, {now}, {now})",
    ))
    .bind(&j.id)
    .bind(&j.cmd)
    .bind(&j.user_id)
    .bind(&j.account_id)
    .bind(&j.domain_id)
    .bind(j.instance_type.clone())
    .bind(j.instance_id.clone())
    .bind(&j.params)
    .execute(conn)
    .await
    .ctx("insert job")?;
    Ok(())
}

pub async fn job_fetch(c: &mut dyn Sql, id: &str) -> Result<Option<Job>, DbError> {
    let (conn, _) = c.parts();
    let q = format!("SELECT {JOB_COLS} FROM async_job WHERE id = ?");
    let row = sqlx::query(&q).bind(id).fetch_optional(conn).await.ctx("fetch job")?;
    row.as_ref().map(job_from_row).transpose()
}

/// Jobs, newest first, optionally of one account.
pub async fn job_list(c: &mut dyn Sql, account_id: Option<&str>, page: Page) -> Result<(Vec<Job>, i64), DbError> {
    let (conn, _) = c.parts();
    let (where_, bind) = match account_id {
        Some(a) => ("WHERE account_id = ?", Some(a.to_string())),
        None => ("", None),
    };
    let mut cq = sqlx::query_scalar::<_, i64>(sql_static_count(where_));
    if let Some(b) = &bind {
        cq = cq.bind(b.clone());
    }
    let total = cq.fetch_one(&mut *conn).await.ctx("count jobs")?;
    let q = format!("SELECT {JOB_COLS} FROM async_job {where_} ORDER BY seq DESC{}", page.limit_clause());
    let mut qq = sqlx::query(&q);
    if let Some(b) = bind {
        qq = qq.bind(b);
    }
    let rows = qq.fetch_all(conn).await.ctx("list jobs")?;
    let jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok((jobs, total))
}

fn sql_static_count(where_: &str) -> &'static str {
    if where_.is_empty() {
        "SELECT COUNT(*) FROM async_job"
    } else {
        "SELECT COUNT(*) FROM async_job WHERE account_id = ?"
    }
}

/// A claimed job: the row and the generation every later write must carry.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub gen_: i64,
}

/// Claim up to `limit` runnable jobs for `ms_id` with a lease of `lease_ms`: unfinished, unowned
/// or with an expired lease, and first in line on their object.
pub async fn job_claim(c: &mut dyn Sql, ms_id: &str, lease_ms: i64, limit: i64) -> Result<Vec<Claimed>, DbError> {
    let (conn, dl) = c.parts();
    let q = sql(
        dl,
        "SELECT j.id, j.lease_gen FROM async_job j WHERE j.status = 0 \
         AND (j.owner_ms IS NULL OR j.lease_until_ms < {now}) \
         AND NOT EXISTS (SELECT 1 FROM async_job p WHERE p.instance_id = j.instance_id AND p.status = 0 AND p.seq < j.seq) \
         ORDER BY j.seq LIMIT ?",
    );
    let cands = sqlx::query(&q).bind(limit).fetch_all(&mut *conn).await.ctx("find runnable jobs")?;
    let mut out = Vec::new();
    for r in &cands {
        let id = get_str(r, "id")?;
        let old_gen = get_i64(r, "lease_gen")?;
        let n = sqlx::query(&sql(
            dl,
            "UPDATE async_job SET owner_ms = ?, lease_gen = lease_gen + 1, lease_until_ms = {now} + ?, \
             attempts = attempts + 1, updated_ms = {now} \
             WHERE id = ? AND lease_gen = ? AND status = 0 AND (owner_ms IS NULL OR lease_until_ms < {now})",
        ))
        .bind(ms_id)
        .bind(lease_ms)
        .bind(&id)
        .bind(old_gen)
        .execute(&mut *conn)
        .await
        .ctx("claim job")?
        .rows_affected();
        if n == 1 {
            let q = format!("SELECT {JOB_COLS} FROM async_job WHERE id = ?");
            let row = sqlx::query(&q).bind(&id).fetch_one(&mut *conn).await.ctx("fetch claimed job")?;
            let job = job_from_row(&row)?;
            out.push(Claimed { gen_: job.lease_gen, job });
        }
    }
    Ok(out)
}

/// Extend the lease of a job this server runs. False if the lease was lost.
pub async fn job_renew(c: &mut dyn Sql, id: &str, ms_id: &str, gen_: i64, lease_ms: i64) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE async_job SET lease_until_ms = {now} + ? WHERE id = ? AND owner_ms = ? AND lease_gen = ? AND status = 0",
    ))
    .bind(lease_ms)
    .bind(id)
    .bind(ms_id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("renew job lease")?
    .rows_affected();
    Ok(n == 1)
}

/// Record that `step` is done with `step_state`; conditional on the generation. False if the
/// lease was lost (the caller must roll its transaction back).
pub async fn job_save_step(c: &mut dyn Sql, id: &str, gen_: i64, step: i64, step_state: &str) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE async_job SET step = ?, step_state = ?, proc_status = ?, updated_ms = {now} \
         WHERE id = ? AND lease_gen = ? AND status = 0",
    ))
    .bind(step)
    .bind(step_state)
    .bind(step)
    .bind(id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("save job step")?
    .rows_affected();
    Ok(n == 1)
}

/// Finish a job (status 1 success, 2 failure); conditional on the generation.
pub async fn job_complete(
    c: &mut dyn Sql,
    id: &str,
    gen_: i64,
    status: i64,
    result_code: i64,
    result: &str,
) -> Result<bool, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(
        dl,
        "UPDATE async_job SET status = ?, result_code = ?, result = ?, completed_ms = {now}, updated_ms = {now}, \
         owner_ms = NULL WHERE id = ? AND lease_gen = ? AND status = 0",
    ))
    .bind(status)
    .bind(result_code)
    .bind(result)
    .bind(id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("complete job")?
    .rows_affected();
    Ok(n == 1)
}

/// Give up the lease of a job (graceful handover): another server may claim it at once.
pub async fn job_release(c: &mut dyn Sql, id: &str, gen_: i64) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE async_job SET owner_ms = NULL, lease_until_ms = 0 WHERE id = ? AND lease_gen = ? AND status = 0",
    )
    .bind(id)
    .bind(gen_)
    .execute(conn)
    .await
    .ctx("release job")?
    .rows_affected();
    Ok(n == 1)
}

/// Expire the leases a previous run of this server held (it is gone: we are its successor).
pub async fn job_release_all_of(c: &mut dyn Sql, ms_id: &str) -> Result<u64, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query("UPDATE async_job SET owner_ms = NULL, lease_until_ms = 0 WHERE owner_ms = ? AND status = 0")
        .bind(ms_id)
        .execute(conn)
        .await
        .ctx("release jobs")?
        .rows_affected();
    Ok(n)
}

/// Number of unfinished jobs owned by each server.
pub async fn job_count_running(c: &mut dyn Sql, ms_id: &str) -> Result<i64, DbError> {
    let (conn, _) = c.parts();
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM async_job WHERE owner_ms = ? AND status = 0")
        .bind(ms_id)
        .fetch_one(conn)
        .await
        .ctx("count running jobs")
}

/// Delete finished jobs completed more than `age_ms` ago. Returns how many.
pub async fn job_purge(c: &mut dyn Sql, age_ms: i64) -> Result<u64, DbError> {
    let (conn, dl) = c.parts();
    let n = sqlx::query(&sql(dl, "DELETE FROM async_job WHERE status <> 0 AND completed_ms < {now} - ?"))
        .bind(age_ms)
        .execute(conn)
        .await
        .ctx("purge jobs")?
        .rows_affected();
    Ok(n)
}

/// Take over the unfinished jobs of a server declared down: bump each job's generation (so the
/// dead owner's late writes change nothing) and free its lease for immediate claiming.
pub async fn job_takeover_of(c: &mut dyn Sql, ms_id: &str) -> Result<u64, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query(
        "UPDATE async_job SET owner_ms = NULL, lease_until_ms = 0, lease_gen = lease_gen + 1 WHERE owner_ms = ? AND status = 0",
    )
    .bind(ms_id)
    .execute(conn)
    .await
    .ctx("take over jobs")?
    .rows_affected();
    Ok(n)
}

/// Unfinished jobs waiting to be claimed (not owned).
pub async fn job_count_unowned(c: &mut dyn Sql) -> Result<i64, DbError> {
    let (conn, _) = c.parts();
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM async_job WHERE status = 0 AND owner_ms IS NULL")
        .fetch_one(conn)
        .await
        .ctx("count waiting jobs")
}

/// Does the object have an unfinished job (queued or running)?
pub async fn job_unfinished_for(c: &mut dyn Sql, instance_id: &str) -> Result<bool, DbError> {
    let (conn, _) = c.parts();
    let n = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM async_job WHERE instance_id = ? AND status = 0")
        .bind(instance_id)
        .fetch_one(conn)
        .await
        .ctx("look for unfinished jobs")?;
    Ok(n > 0)
}
