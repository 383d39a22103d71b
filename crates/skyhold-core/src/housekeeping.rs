//! Periodic clean-up: finished jobs older than `job.expire.minutes` and idle login sessions.
//! A cluster-wide singleton: only the holder of the named lock `housekeeping` runs it; the lock's
//! lease outlives a round, and a dead holder's lock is freed when it is declared Down.

use crate::Core;
use std::time::Duration;

pub async fn run(core: Core) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        if core.is_fenced() || !core.is_registered() {
            continue;
        }
        let held = async {
            let mut c = core.db().conn().await?;
            skyhold_db::ms::lock_acquire(&mut c, "housekeeping", &core.ms().id, &core.ms().run_id, 120_000).await
        }
        .await;
        match held {
            Ok(Some(_)) => {}
            Ok(None) => continue, // another server holds it
            Err(e) => {
                tracing::warn!(error = %e, "could not take the housekeeping lock");
                continue;
            }
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
