//! The CloudStack API on `/client/api` (port 8080), plus `/health` and `/ready` for load
//! balancers.
//!
//! A request goes: parameters merged and decoded (`params`) -> command looked up in the catalogue
//! (`commands`) -> caller authenticated by signature or session (`auth`) -> handler
//! (`handlers/`) -> envelope (`reply`). Handlers never retry: a failed database call becomes a 530
//! and the client may retry on any server.
//!
//! **Architecture Invariant:** no SQL here; handlers call `skyhold-core` (and read-only list
//! helpers of `skyhold-db` through it). Every answer, errors included, is CloudStack-shaped JSON
//! with exactly one top-level key.

pub mod auth;
pub mod commands;
pub mod handlers;
pub mod params;
pub mod reply;
pub mod server;
pub mod signing;

pub use server::{ApiState, router};
