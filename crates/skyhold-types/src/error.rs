//! CloudStack error codes. HTTP status = `errorcode`; `cserrorcode` is CloudStack's finer code.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 401: authentication failure or unknown command.
    Unauthorized,
    /// 405: method not allowed.
    MethodNotAllowed,
    /// 429: rate limited.
    TooManyRequests,
    /// 430: malformed parameter.
    MalformedParameter,
    /// 431: parameter error (missing, invalid, unknown id).
    ParamError,
    /// 432: unsupported action.
    Unsupported,
    /// 503: this server is shutting down.
    Unavailable,
    /// 530: internal error.
    Internal,
    /// 531: account / permission / login error.
    AccountError,
    /// 532: resource limit.
    ResourceLimit,
    /// 533: insufficient capacity.
    InsufficientCapacity,
    /// 534: resource unavailable.
    ResourceUnavailable,
    /// 535: resource allocation.
    ResourceAllocation,
    /// 536: resource in use.
    ResourceInUse,
    /// 537: network rule conflict.
    RuleConflict,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::MalformedParameter => 430,
            ErrorCode::ParamError => 431,
            ErrorCode::Unsupported => 432,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 530,
            ErrorCode::AccountError => 531,
            ErrorCode::ResourceLimit => 532,
            ErrorCode::InsufficientCapacity => 533,
            ErrorCode::ResourceUnavailable => 534,
            ErrorCode::ResourceAllocation => 535,
            ErrorCode::ResourceInUse => 536,
            ErrorCode::RuleConflict => 537,
        }
    }

    /// CloudStack's `cserrorcode` (the exception class number) for this kind of error.
    pub fn cs_code(self) -> u16 {
        match self {
            ErrorCode::ParamError | ErrorCode::MalformedParameter => 4350,
            ErrorCode::Unauthorized | ErrorCode::AccountError => 4365,
            ErrorCode::InsufficientCapacity => 4315,
            ErrorCode::ResourceUnavailable => 4520,
            ErrorCode::ResourceInUse => 4525,
            ErrorCode::ResourceAllocation => 4530,
            ErrorCode::ResourceLimit => 4370,
            ErrorCode::Unsupported => 4375,
            _ => 4250,
        }
    }

    pub fn from_code(c: i64) -> ErrorCode {
        match c {
            401 => ErrorCode::Unauthorized,
            405 => ErrorCode::MethodNotAllowed,
            429 => ErrorCode::TooManyRequests,
            430 => ErrorCode::MalformedParameter,
            431 => ErrorCode::ParamError,
            432 => ErrorCode::Unsupported,
            503 => ErrorCode::Unavailable,
            531 => ErrorCode::AccountError,
            532 => ErrorCode::ResourceLimit,
            533 => ErrorCode::InsufficientCapacity,
            534 => ErrorCode::ResourceUnavailable,
            535 => ErrorCode::ResourceAllocation,
            536 => ErrorCode::ResourceInUse,
            537 => ErrorCode::RuleConflict,
            _ => ErrorCode::Internal,
        }
    }
}

/// An error a user sees: a code and a text. Domain operations return it for everything that is
/// the caller's problem (bad parameter, no capacity); infrastructure failures map to 530.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CsError {
    pub code: ErrorCode,
    pub text: String,
}

impl fmt::Display for CsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.code.code())
    }
}

impl CsError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> CsError {
        CsError { code, text: text.into() }
    }
    pub fn param(text: impl Into<String>) -> CsError {
        CsError::new(ErrorCode::ParamError, text)
    }
    pub fn internal(text: impl Into<String>) -> CsError {
        CsError::new(ErrorCode::Internal, text)
    }
}
