//! The domain's error type: either a CloudStack error for the caller, or a storage failure.

use skyhold_db::{DbError, Retryable};
use skyhold_types::{CsError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The caller's problem (or a capacity/resource state), with its CloudStack code.
    #[error(transparent)]
    Cs(#[from] CsError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A job's lease moved to another generation: this server must stop working on it.
    #[error("job lease lost (a newer owner holds it)")]
    LeaseLost,
}

impl Retryable for CoreError {
    fn is_retryable(&self) -> bool {
        matches!(self, CoreError::Db(e) if e.is_retryable())
    }
}

impl CoreError {
    pub fn param(text: impl Into<String>) -> CoreError {
        CoreError::Cs(CsError::param(text))
    }
    pub fn cs(code: ErrorCode, text: impl Into<String>) -> CoreError {
        CoreError::Cs(CsError::new(code, text))
    }

    /// What an API caller sees. Storage failures become 530 without internals.
    pub fn to_cs(&self) -> CsError {
        match self {
            CoreError::Cs(e) => e.clone(),
            CoreError::Db(e) => {
                CsError::internal(format!("Internal error executing command: database unavailable ({})", short(e)))
            }
            CoreError::LeaseLost => CsError::internal("job was taken over by another management server"),
        }
    }
}

fn short(e: &DbError) -> &'static str {
    match e {
        DbError::Connect { .. } => "no connection",
        DbError::Sql { what, .. } => what,
        _ => "storage error",
    }
}
