//! Database failovers and replication changes as events (`listEvents`).
//!
//! The connector (`skyhold_db::ha`) queues what it saw; this loop records it once the database
//! answers again. A failover is this server's own fact (each server records its move). A
//! replication change is the cluster's fact: every server sees it, so the event is written by the
//! one whose row-locked compare-and-set on `cloud_meta` (`repl.<endpoint hash>`) changes the
//! stored condition; the others find it already recorded.

use crate::{Core, CoreError};
use skyhold_db::ha::{DbNotice, ReplCondition};
use std::time::Duration;

/// Record queued notices every second until the process ends.
pub async fn run(core: Core) {
    let mut pending: Vec<DbNotice> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pending.extend(core.db().take_notices());
        if pending.is_empty() {
            continue;
        }
        let mut left = Vec::new();
        for n in pending.drain(..) {
            if let Err(e) = record(&core, &n).await {
                tracing::debug!(error = %e, "database event not recorded yet; will retry");
                left.push(n);
            }
        }
        // Keep a bounded backlog while the database is unusable.
        left.truncate(1000);
        pending = left;
    }
}

async fn record(core: &Core, n: &DbNotice) -> Result<(), CoreError> {
    let owner = core.system_owner().await?;
    let ms = core.ms().id.clone();
    match n {
        DbNotice::Failover { from, to, topology, reason } => {
            let text = format!(
                "Management server {ms} moved its database writes from {from} to {to} ({topology:?}): {reason}"
            );
            skyhold_db::retry_tx!(core.db(), |tx| {
                async { crate::events::record(&mut tx, &owner, "DATABASE.FAILOVER", "WARN", text.clone(), None).await }
                    .await
            })?;
        }
        DbNotice::Replication { endpoint, condition } => {
            let key = format!("repl.{}", &skyhold_db::crypto::sha256_hex(endpoint.as_bytes())[..16]);
            let (kind, level) = match condition {
                ReplCondition::Ok => ("DATABASE.REPLICATION.OK", "INFO"),
                ReplCondition::Lagging(_) => ("DATABASE.REPLICATION.LAGGING", "WARN"),
                ReplCondition::Broken(_) => ("DATABASE.REPLICATION.BROKEN", "ERROR"),
            };
            let text = format!("Database endpoint {endpoint}: {condition}");
            let label = condition.label();
            skyhold_db::retry_tx!(core.db(), |tx| {
                async {
                    // The first "ok" of a replica is not news; every change after it is.
                    let first = skyhold_db::config::meta_get(&mut tx, &key).await?.is_none();
                    if skyhold_db::config::meta_swap(&mut tx, &key, label).await?
                        && !(first && *condition == ReplCondition::Ok)
                    {
                        crate::events::record(&mut tx, &owner, kind, level, text.clone(), None).await?;
                    }
                    Ok::<_, CoreError>(())
                }
                .await
            })?;
        }
    }
    Ok(())
}
