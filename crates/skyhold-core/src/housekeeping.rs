//! Periodic clean-up: finished jobs older than `job.expire.minutes` and idle login sessions.
//! Every server runs it; the deletes are idempotent, so concurrent runs are harmless (a named
//! cluster lock will make it a singleton with the cluster work).

use crate::Core;
use std::time::Duration;

pub async fn run(core: Core) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        if core.is_fenced() {
            continue;
        }
        let minutes = core.settings().get_i64(skyhold_types::settings::JOB_EXPIRE_MINUTES).max(1);
        let res = async {
            let mut c = core.db().conn().await?;
            let jobs = skyhold_db::job::job_purge(&mut c, minutes * 60_000).await?;
            let sessions = skyhold_db::account::session_purge(&mut c).await?;
            Ok::<_, skyhold_db::DbError>((jobs, sessions))
        }
        .await;
        match res {
            Ok((j, s)) if j + s > 0 => tracing::info!(jobs = j, sessions = s, "purged expired jobs and sessions"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "housekeeping failed; will retry"),
        }
    }
}
