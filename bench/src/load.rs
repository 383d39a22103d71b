//! Closed-loop load: `concurrency` clients each issue one request after another, for a warm-up
//! and then a measured window. Only requests that complete inside the window count.

use rand::Rng;
use serde_json::{Value, json};
use skyhold_db::vm::{VmFilter, nic_list_for_vms, vm_list};
use skyhold_db::{Db, Page};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Timing of a run: warm-up, then the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Figures of one measured operation.
#[derive(Debug, Clone)]
pub struct Stats {
    pub op: String,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    pub rate: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    fn new(op: &str, mut lat_ns: Vec<u64>, errors: u64, first_error: Option<String>, secs: f64) -> Stats {
        lat_ns.sort_unstable();
        let n = lat_ns.len();
        // Nearest-rank percentile.
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
            lat_ns[rank.min(n) - 1] as f64 / 1e6
        };
        let mean_ms = if n == 0 { f64::NAN } else { lat_ns.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1e6 };
        Stats {
            op: op.to_string(),
            requests: n as u64,
            errors,
            first_error,
            secs,
            rate: if secs > 0.0 { n as f64 / secs } else { f64::NAN },
            mean_ms,
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: lat_ns.last().map(|&v| v as f64 / 1e6).unwrap_or(f64::NAN),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "operation": self.op,
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": round3(self.secs),
            "per_second": round3(self.rate),
            "mean_ms": round3(self.mean_ms),
            "p50_ms": round3(self.p50_ms),
            "p90_ms": round3(self.p90_ms),
            "p99_ms": round3(self.p99_ms),
            "max_ms": round3(self.max_ms),
        })
    }
}

/// Three decimals; NaN becomes null in JSON.
pub fn round3(v: f64) -> Value {
    if v.is_finite() { json!((v * 1000.0).round() / 1000.0) } else { Value::Null }
}

/// What each client thread or task hands back.
#[derive(Default)]
struct Part {
    lat_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Part {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

fn merge(op: &str, parts: Vec<Part>, secs: f64) -> Stats {
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for p in parts {
        lat.extend(p.lat_ns);
        errors += p.errors;
        if first_error.is_none() {
            first_error = p.first_error;
        }
    }
    Stats::new(op, lat, errors, first_error, secs)
}

/// The measured window actually covered (shorter when interrupted).
fn covered(start: Instant, end: Instant) -> f64 {
    Instant::now().min(end).saturating_duration_since(start).as_secs_f64()
}

/// GET one of `urls` (picked at random) in a loop from `concurrency` threads, each with its own
/// keep-alive connection. A request succeeds on HTTP 200 with a body that starts with `expect`.
pub fn http(op: &str, urls: Arc<Vec<String>>, expect: &str, w: Window) -> Stats {
    let start = Instant::now() + w.warmup;
    let end = start + w.duration;
    let expect = Arc::new(expect.as_bytes().to_vec());
    let handles: Vec<_> = (0..w.concurrency)
        .map(|_| {
            let urls = urls.clone();
            let expect = expect.clone();
            std::thread::spawn(move || {
                let agent =
                    ureq::AgentBuilder::new().max_idle_connections_per_host(1).timeout(Duration::from_secs(60)).build();
                let mut part = Part::default();
                let mut body = Vec::with_capacity(1 << 20);
                let mut rng = rand::thread_rng();
                loop {
                    let t0 = Instant::now();
                    if t0 >= end || crate::STOP.load(Ordering::Relaxed) {
                        break;
                    }
                    let url = &urls[if urls.len() > 1 { rng.gen_range(0..urls.len()) } else { 0 }];
                    body.clear();
                    let outcome = match agent.get(url).call() {
                        Ok(resp) => match resp.into_reader().read_to_end(&mut body) {
                            Ok(_) if body.starts_with(&expect) => Ok(()),
                            Ok(_) => Err(format!(
                                "unexpected body: {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            )),
                            Err(e) => Err(format!("reading the body: {e}")),
                        },
                        Err(ureq::Error::Status(code, resp)) => {
                            let text = resp.into_string().unwrap_or_default();
                            Err(format!("HTTP {code}: {}", &text[..text.len().min(300)]))
                        }
                        Err(e) => {
                            // Connection trouble: do not spin.
                            std::thread::sleep(Duration::from_millis(10));
                            Err(format!("transport: {e}"))
                        }
                    };
                    let t1 = Instant::now();
                    if t1 < start || t1 > end {
                        continue;
                    }
                    match outcome {
                        Ok(()) => part.lat_ns.push((t1 - t0).as_nanos() as u64),
                        Err(e) => part.error(e),
                    }
                }
                part
            })
        })
        .collect();
    let parts: Vec<Part> = handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| {
                let mut p = Part::default();
                p.error("client thread panicked".into());
                p
            })
        })
        .collect();
    merge(op, parts, covered(start, end))
}

/// A query run directly on the database through `skyhold-db` (the same sqlx driver stack, pool
/// and SQL the server uses).
#[derive(Clone)]
pub enum DbOp {
    /// `job::job_fetch`: the single-row `SELECT ... FROM async_job WHERE id = ?` on the unique
    /// key that `queryAsyncJobResult` runs.
    JobFetch(Arc<Vec<String>>),
    /// `vm::vm_list` (COUNT + joined page) and `vm::nic_list_for_vms` for one default page: the
    /// database part of `listVirtualMachines`.
    VmPage { size: u64, expect: usize },
}

async fn db_once(db: &Db, op: &DbOp) -> Result<(), String> {
    let mut c = db.conn().await.map_err(|e| e.to_string())?;
    match op {
        DbOp::JobFetch(ids) => {
            let id = &ids[rand::thread_rng().gen_range(0..ids.len())];
            match skyhold_db::job::job_fetch(&mut c, id).await {
                Ok(Some(j)) if j.status == 1 => Ok(()),
                Ok(Some(j)) => Err(format!("job {id} has status {}", j.status)),
                Ok(None) => Err(format!("job {id} not found")),
                Err(e) => Err(e.to_string()),
            }
        }
        DbOp::VmPage { size, expect } => {
            let (vms, _total) = vm_list(&mut c, &VmFilter::default(), Page { page: 1, size: *size })
                .await
                .map_err(|e| e.to_string())?;
            if vms.len() != *expect {
                return Err(format!("{} VMs in the page, expected {expect}", vms.len()));
            }
            let ids: Vec<String> = vms.into_iter().map(|v| v.id).collect();
            nic_list_for_vms(&mut c, &ids).await.map_err(|e| e.to_string())?;
            Ok(())
        }
    }
}

/// Run `op` in a loop from `concurrency` tasks, each taking a pooled connection per query.
pub async fn db(name: &str, db: &Db, op: DbOp, w: Window) -> Stats {
    let start = Instant::now() + w.warmup;
    let end = start + w.duration;
    let tasks: Vec<_> = (0..w.concurrency)
        .map(|_| {
            let db = db.clone();
            let op = op.clone();
            tokio::spawn(async move {
                let mut part = Part::default();
                loop {
                    let t0 = Instant::now();
                    if t0 >= end || crate::STOP.load(Ordering::Relaxed) {
                        break;
                    }
                    let outcome = db_once(&db, &op).await;
                    let t1 = Instant::now();
                    if t1 < start || t1 > end {
                        continue;
                    }
                    match outcome {
                        Ok(()) => part.lat_ns.push((t1 - t0).as_nanos() as u64),
                        Err(e) => part.error(e),
                    }
                }
                part
            })
        })
        .collect();
    let mut parts = Vec::new();
    for t in tasks {
        parts.push(t.await.unwrap_or_else(|e| {
            let mut p = Part::default();
            p.error(format!("task failed: {e}"));
            p
        }));
    }
    merge(name, parts, covered(start, end))
}
