//! Skyhold's vocabulary: typed ids, fencing generations, CloudStack states, error codes and the
//! catalogue of global settings. Every other crate depends on this one; it depends on none of them.
//!
//! **Architecture Invariant:** no I/O here (no SQL, no sockets, no files).

pub mod error;
pub mod ids;
pub mod settings;
pub mod state;
pub mod time;

pub use error::{CsError, ErrorCode};
pub use ids::*;
pub use state::*;
