//! Shared parts of the Skyhold benchmarks: their common command-line options, request signing,
//! the `skyhold` binary as a child process, seeding through `skyhold-db`, closed-loop load, and
//! machine facts and JSON for the reports.
//!
//! The binaries use them: `skyhold-bench` (API throughput and latency against the database's raw
//! rate), `skyhold-bench-cluster` (management-server failover and membership load),
//! `skyhold-bench-db` (database failover and throughput per backend) and `skyhold-bench-ha` (HA
//! restart time).

pub mod backend;
pub mod cli;
pub mod load;
pub mod seed;
pub mod server;
pub mod sign;
pub mod stats;
pub mod util;

use std::sync::atomic::AtomicBool;

/// Set on Ctrl-C: measurements end early, then everything is cleaned up.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed.
pub fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// The process exit code of a benchmark: 0 when it completed, 1 when a round did not (`Ok(false)`)
/// or it could not run (the error is printed).
pub fn exit_code(r: anyhow::Result<bool>) -> std::process::ExitCode {
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
