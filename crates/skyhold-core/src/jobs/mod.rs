//! The job executor: claims runnable jobs, runs them step by step, keeps their leases alive.
//!
//! Durability protocol (every job kind follows it):
//! - A job's progress is `(step, step_state)` in `async_job`. A step's domain change and the
//!   record that the step is done are written in **one transaction**, conditional on the lease
//!   generation (`job_save_step`/`job_complete` return false for a stale owner, and the whole
//!   transaction is rolled back).
//! - A step that talks to an agent sends `(job_id, step)` with the command. If this server dies
//!   after the agent executed the command but before the result was recorded, the next owner
//!   resends the same `(job_id, step)` and the agent answers with the stored result instead of
//!   executing again.
//! - Jobs on one VM run one at a time in submission order (`job_claim` only returns the oldest
//!   unfinished job of each object).

mod host_maintenance;
mod vm_destroy;
mod vm_migrate;
mod vm_reboot;
mod vm_start;
mod vm_stop;

use crate::agents::SendError;
use crate::vm::cmd;
use crate::{Core, CoreError};
use serde_json::{Value, json};
use skyhold_db::job::{Claimed, Job, job_claim, job_complete, job_renew, job_save_step};
use skyhold_db::{Sql, Tx, retry_tx};
use skyhold_proto::{Command, CommandResult};
use skyhold_types::ErrorCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Lease of a claimed job; renewed every third of it while the job runs.
pub const JOB_LEASE_MS: i64 = 15_000;
/// Jobs one server runs at once.
pub const MAX_CONCURRENT_JOBS: usize = 64;
/// Jobs claimed per round.
pub const CLAIM_BATCH: usize = 8;

/// A job being run by this server, with the generation its writes must carry.
pub struct JobCtx {
    pub core: Core,
    pub job: Job,
    pub gen_: i64,
    pub params: Value,
    lost: Arc<AtomicBool>,
}

/// How a job ended (already written to the database).
#[derive(Debug)]
pub enum Outcome {
    Done,
}

impl JobCtx {
    pub fn vm_id(&self) -> &str {
        self.job.instance_id.as_deref().unwrap_or("")
    }

    /// Whom the job's events belong to.
    pub fn owner(&self) -> crate::events::EventOwner {
        crate::events::EventOwner {
            account_id: self.job.account_id.clone(),
            domain_id: self.job.domain_id.clone(),
            user_id: Some(self.job.user_id.clone()),
        }
    }

    pub fn step_state(&self) -> Value {
        serde_json::from_str(&self.job.step_state).unwrap_or(Value::Null)
    }

    /// The step recorded in the database for this job, read in the caller's transaction. A step
    /// transaction whose COMMIT answer was lost (the database node died after committing) is
    /// rerun by `retry_tx!`; the rerun must see that its first attempt did commit and carry on
    /// from there instead of applying the step again.
    pub async fn recorded_step(&self, tx: &mut Tx) -> Result<(i64, Value), CoreError> {
        let j = skyhold_db::job::job_fetch(tx, &self.job.id).await?.ok_or(CoreError::LeaseLost)?;
        if j.lease_gen != self.gen_ || j.status != 0 {
            return Err(CoreError::LeaseLost);
        }
        Ok((j.step, serde_json::from_str(&j.step_state).unwrap_or(Value::Null)))
    }

    /// The host recorded by a step-0 transaction of this job that already committed (see
    /// [`JobCtx::recorded_step`]), if any.
    pub async fn committed_host(&self, tx: &mut Tx) -> Result<Option<String>, CoreError> {
        let (step, state) = self.recorded_step(tx).await?;
        Ok(if step >= 1 { state.get("host").and_then(|v| v.as_str()).map(str::to_string) } else { None })
    }

    /// Record step completion in the caller's transaction; rolls back via `LeaseLost` if stale.
    pub async fn save_step(&self, tx: &mut Tx, step: i64, state: Value) -> Result<(), CoreError> {
        let s = state.to_string();
        if !job_save_step(tx, &self.job.id, self.gen_, step, &s).await? {
            return Err(CoreError::LeaseLost);
        }
        crate::failpoint::hit("after_step_saved");
        Ok(())
    }

    /// Finish successfully with `result` (the `jobresult` object).
    pub async fn succeed(&self, tx: &mut Tx, result: Value) -> Result<(), CoreError> {
        if !job_complete(tx, &self.job.id, self.gen_, 1, 0, &result.to_string()).await? {
            return Err(CoreError::LeaseLost);
        }
        Ok(())
    }

    /// Finish with a failure visible to the user.
    pub async fn fail(&self, tx: &mut Tx, code: ErrorCode, text: &str) -> Result<(), CoreError> {
        let result = json!({ "errorcode": code.code(), "errortext": text });
        if !job_complete(tx, &self.job.id, self.gen_, 2, code.code() as i64, &result.to_string()).await? {
            return Err(CoreError::LeaseLost);
        }
        Ok(())
    }

    /// The VM rendered for the job result (admin view if the job's account is an admin).
    pub async fn vm_result(&self, c: &mut dyn Sql) -> Result<Value, CoreError> {
        let vm = skyhold_db::vm::vm_fetch(c, self.vm_id()).await?;
        let Some(vm) = vm else {
            return Ok(json!({ "success": true }));
        };
        let nics = skyhold_db::vm::nic_list_for_vms(c, std::slice::from_ref(&vm.id)).await?;
        let admin = skyhold_db::account::user_fetch(c, &self.job.user_id).await?.is_some_and(|u| u.account_type == 1);
        Ok(json!({ "virtualmachine": crate::view::vm_json(&vm, &nics, admin) }))
    }

    /// Send a command for step `step` and wait for the answer, resending (same `(job, step)`, so
    /// the agent never executes twice) while the host is unreachable, up to the `wait` setting.
    pub async fn agent(&self, host_id: &str, step: u32, cmd: Command) -> Result<AgentOutcome, CoreError> {
        let wait_s = self.core.settings().get_i64(skyhold_types::settings::AGENT_COMMAND_TIMEOUT).max(1);
        let deadline = Instant::now() + Duration::from_secs(wait_s as u64);
        let mut delay = Duration::from_millis(50);
        loop {
            if self.lost.load(Ordering::SeqCst) {
                return Err(CoreError::LeaseLost);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(AgentOutcome::Unreachable);
            }
            let sent = match self.core.agent_send(host_id, &self.job.id, step, cmd.clone(), left).await {
                Err(SendError::NotConnected(_)) => self.forward(host_id, step, &cmd, left).await,
                other => other.map(Some),
            };
            if matches!(sent, Ok(Some(CommandResult::Ok { .. } | CommandResult::Failed { .. }))) {
                crate::failpoint::hit("after_agent_answer");
            }
            match sent {
                Ok(Some(CommandResult::Ok { state })) => return Ok(AgentOutcome::Done(state)),
                Ok(Some(CommandResult::Failed { message })) => return Ok(AgentOutcome::Failed(message)),
                Ok(Some(CommandResult::HostCheck { .. })) => {
                    return Ok(AgentOutcome::Failed("the agent answered a VM command with a host check".into()));
                }
                Ok(Some(CommandResult::StaleGeneration { .. } | CommandResult::UnknownHost)) | Ok(None) => {}
                Err(SendError::Fenced) => return Err(CoreError::LeaseLost),
                Err(_) => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

impl JobCtx {
    /// The host is connected to another server: ask that server (peer channel) to send it.
    /// `Ok(None)` when nobody holds the host right now (its agent is reconnecting).
    async fn forward(
        &self,
        host_id: &str,
        step: u32,
        cmd: &Command,
        left: Duration,
    ) -> Result<Option<CommandResult>, SendError> {
        self.core.agent_forward(host_id, &self.job.id, step, cmd, left).await
    }
}

/// What an agent step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentOutcome {
    Done(skyhold_proto::PowerState),
    Failed(String),
    /// No answer within the `wait` setting: the command's effect is unknown.
    Unreachable,
}

/// Run jobs until the process ends.
pub async fn run_executor(core: Core) {
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_JOBS));
    loop {
        if core.is_registered() && !core.is_shutting_down() {
            // Claim a bounded batch per round, so that after a takeover the survivors share the
            // dead server's jobs instead of the fastest one taking them all.
            let take = sem.available_permits().min(CLAIM_BATCH);
            if take > 0 {
                let ms_id = core.ms().id.clone();
                let claimed: Result<Vec<Claimed>, CoreError> = retry_tx!(core.db(), |tx| {
                    async { Ok::<_, CoreError>(job_claim(&mut tx, &ms_id, JOB_LEASE_MS, take as i64).await?) }.await
                });
                match claimed {
                    Ok(list) => {
                        if list.len() == take {
                            // Possibly more waiting: come back soon, after the peers had a turn.
                            let core = core.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                core.wake_jobs();
                            });
                        }
                        for c in list {
                            let Ok(permit) = sem.clone().acquire_owned().await else { break };
                            let core = core.clone();
                            tokio::spawn(async move {
                                run_one(core.clone(), c).await;
                                drop(permit);
                                core.wake_jobs();
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not claim jobs"),
                }
            }
        }
        tokio::select! {
            _ = core.jobs_woken() => {}
            // A fallback poll: queued work normally arrives with a wake-up (local or peer).
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
}

async fn run_one(core: Core, claimed: Claimed) {
    let lost = Arc::new(AtomicBool::new(false));
    let params = serde_json::from_str(&claimed.job.params).unwrap_or(Value::Null);
    let job_id = claimed.job.id.clone();
    let gen_ = claimed.gen_;
    let mut ctx = JobCtx { core: core.clone(), gen_: claimed.gen_, job: claimed.job, params, lost: lost.clone() };
    tracing::info!(job = %job_id, cmd = %ctx.job.cmd, step = ctx.job.step, attempt = ctx.job.attempts, "running job");

    let renew = {
        let core = core.clone();
        let lost = lost.clone();
        let job_id = job_id.clone();
        let gen_ = ctx.gen_;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis((JOB_LEASE_MS / 3) as u64)).await;
                let ok = async {
                    let mut c = core.db().conn().await?;
                    job_renew(&mut c, &job_id, &core.ms().id, gen_, JOB_LEASE_MS).await
                }
                .await;
                match ok {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(job = %job_id, error = %e, "could not renew job lease"),
                }
            }
        })
    };

    let res = match ctx.job.cmd.as_str() {
        cmd::DEPLOY | cmd::START => vm_start::run(&mut ctx).await,
        cmd::STOP => vm_stop::run(&mut ctx).await,
        cmd::REBOOT => vm_reboot::run(&mut ctx).await,
        cmd::DESTROY | cmd::EXPUNGE => vm_destroy::run(&mut ctx).await,
        cmd::MIGRATE => vm_migrate::run(&mut ctx).await,
        cmd::HOST_PREPARE_MAINTENANCE => host_maintenance::prepare(&mut ctx).await,
        cmd::HOST_CANCEL_MAINTENANCE => host_maintenance::cancel(&mut ctx).await,
        other => {
            let text = format!("unknown job command {other}");
            fail_job(&ctx, ErrorCode::Internal, &text).await
        }
    };
    renew.abort();
    match res {
        Ok(Outcome::Done) => tracing::info!(job = %job_id, "job finished"),
        Err(e) => {
            // Infrastructure failure (database unreachable, a transaction that kept failing), or
            // this server stopped the job because it self-fenced: hand the job back so it resumes
            // from its last durable step without waiting for its lease to expire. The release is
            // conditional on our lease generation, so a job really taken over is left alone.
            // During a database failover the first attempts fail too: keep trying until the
            // lease would have expired anyway.
            if matches!(e, CoreError::LeaseLost) {
                tracing::warn!(job = %job_id, "job stopped: lease lost or server self-fenced; handing it back if still ours");
            } else {
                tracing::warn!(job = %job_id, error = %e, "job step failed; handing the job back to be resumed");
            }
            let give_up = tokio::time::Instant::now() + Duration::from_millis(JOB_LEASE_MS as u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let limit = core.db().tx_timeout();
                let released = tokio::time::timeout(limit, async {
                    let mut c = core.db().conn().await?;
                    skyhold_db::job::job_release(&mut c, &job_id, gen_).await
                })
                .await
                .unwrap_or(Err(skyhold_db::DbError::TxTimeout(limit)));
                match released {
                    Ok(true) => {
                        core.wake_cluster();
                        break;
                    }
                    // Taken over or finished meanwhile: nothing to hand back.
                    Ok(false) => break,
                    Err(e) if tokio::time::Instant::now() < give_up => {
                        tracing::debug!(job = %job_id, error = %e, "could not hand the job back yet");
                    }
                    Err(e) => {
                        tracing::warn!(job = %job_id, error = %e, "could not hand the job back; its lease expires");
                        break;
                    }
                }
            }
        }
    }
}

/// Fail a job outright (no domain change).
pub async fn fail_job(ctx: &JobCtx, code: ErrorCode, text: &str) -> Result<Outcome, CoreError> {
    retry_tx!(ctx.core.db(), |tx| {
        async {
            ctx.fail(&mut tx, code, text).await?;
            Ok::<_, CoreError>(Outcome::Done)
        }
        .await
    })
}
