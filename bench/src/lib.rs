//! Shared parts of the Skyhold benchmarks: request signing, the `skyhold` binary as a child
//! process, seeding through `skyhold-db`, closed-loop load, and machine facts for the reports.
//!
//! The binaries use them: `skyhold-bench` (API throughput and latency against the database's raw
//! rate), `skyhold-bench-cluster` (management-server failover and membership load),
//! `skyhold-bench-db` (database failover and throughput per backend) and `skyhold-bench-ha` (HA
//! restart time).

pub mod backend;
pub mod load;
pub mod seed;
pub mod server;
pub mod sign;
pub mod util;

use std::sync::atomic::AtomicBool;

/// Set on Ctrl-C: measurements end early, then everything is cleaned up.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed.
pub fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}
