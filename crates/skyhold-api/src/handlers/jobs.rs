//! `queryAsyncJobResult` (kept to one indexed read: clients poll it every 1-2 s) and
//! `listAsyncJobs`.

use super::{Ctx, HResult, cs};
use crate::reply::Reply;
use serde_json::{Map, Value, json};
use skyhold_db::job::{Job, job_fetch, job_list};
use skyhold_types::CsError;
use skyhold_types::time::cs_date;

/// A job as CloudStack shows it: `jobresult` only once finished.
pub fn job_json(j: &Job) -> Value {
    let mut m = Map::new();
    m.insert("jobid".into(), json!(j.id));
    m.insert("accountid".into(), json!(j.account_id));
    m.insert("userid".into(), json!(j.user_id));
    m.insert("cmd".into(), json!(j.cmd));
    m.insert("jobstatus".into(), json!(j.status));
    m.insert("jobprocstatus".into(), json!(j.proc_status));
    m.insert("jobresultcode".into(), json!(j.result_code));
    m.insert("created".into(), json!(cs_date(j.created_ms)));
    if let Some(t) = &j.instance_type {
        m.insert("jobinstancetype".into(), json!(t));
    }
    if let Some(i) = &j.instance_id {
        m.insert("jobinstanceid".into(), json!(i));
    }
    if j.status != 0 {
        m.insert("jobresulttype".into(), json!("object"));
        let result =
            j.result.as_deref().and_then(|r| serde_json::from_str::<Value>(r).ok()).unwrap_or_else(|| json!({}));
        m.insert("jobresult".into(), result);
        if let Some(c) = j.completed_ms {
            m.insert("completed".into(), json!(cs_date(c)));
        }
    }
    Value::Object(m)
}

pub async fn query(ctx: &Ctx<'_>) -> HResult {
    let id = ctx.p.req_uuid("jobid")?;
    let job = {
        let mut c = ctx.core.db().conn().await.map_err(|e| cs(e.into()))?;
        job_fetch(&mut c, &id).await.map_err(|e| cs(e.into()))?
    };
    match job {
        Some(j) if ctx.caller.is_admin() || j.account_id == ctx.caller.account_id => Ok(Reply::Obj(job_json(&j))),
        _ => Err(CsError::param(format!("Unable to find job by id {id}"))),
    }
}

pub async fn list(ctx: &Ctx<'_>) -> HResult {
    let page = ctx.p.page(ctx.default_page_size())?;
    let account = if ctx.caller.is_admin() && ctx.p.bool("listall")?.unwrap_or(false) {
        None
    } else {
        Some(ctx.caller.account_id.clone())
    };
    let (jobs, total) = {
        let mut c = ctx.core.db().conn().await.map_err(|e| cs(e.into()))?;
        job_list(&mut c, account.as_deref(), page).await.map_err(|e| cs(e.into()))?
    };
    Ok(Reply::list("asyncjobs", jobs.iter().map(job_json).collect(), total))
}
