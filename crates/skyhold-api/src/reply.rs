//! The response envelope: `{"<command>response": ...}` with CloudStack's error shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use skyhold_types::{CsError, ErrorCode};

/// What a handler produced.
pub enum Reply {
    /// The object under the response key.
    Obj(Value),
    /// A list: item key, this page's items, total across pages.
    List { key: &'static str, items: Vec<Value>, count: i64 },
    /// An async command's answer: the job id and, for create commands, the new object's id.
    Async { job_id: String, id: Option<String> },
}

impl Reply {
    pub fn list(key: &'static str, items: Vec<Value>, count: i64) -> Reply {
        Reply::List { key, items, count }
    }
}

const JSON_CT: &str = "application/json; charset=UTF-8";

fn with_json(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
    r
}

/// Render a successful reply for command `cmd_lc` (lower-case command name).
pub fn ok(cmd_lc: &str, reply: Reply) -> Response {
    let inner = match reply {
        Reply::Obj(v) => v,
        Reply::List { key, items, count } => {
            let mut m = Map::new();
            if count > 0 || !items.is_empty() {
                m.insert("count".into(), json!(count));
            }
            if !items.is_empty() {
                m.insert(key.into(), Value::Array(items));
            }
            Value::Object(m)
        }
        Reply::Async { job_id, id } => {
            let mut m = Map::new();
            if let Some(id) = id {
                m.insert("id".into(), json!(id));
            }
            m.insert("jobid".into(), json!(job_id));
            Value::Object(m)
        }
    };
    let mut top = Map::new();
    top.insert(format!("{cmd_lc}response"), inner);
    with_json(StatusCode::OK, Value::Object(top))
}

/// Render an error. `key` is `<cmd>response`, or `errorresponse` for an unknown command.
pub fn error(key: &str, err: &CsError) -> Response {
    let code = err.code.code();
    let body = json!({
        key: {
            "uuidList": [],
            "errorcode": code,
            "cserrorcode": err.code.cs_code(),
            "errortext": err.text,
        }
    });
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = with_json(status, body);
    let desc: String =
        err.text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(1024).collect();
    if let Ok(v) = HeaderValue::from_str(&desc) {
        r.headers_mut().insert("X-Description", v);
    }
    r
}

/// The error key for a command (`lowercase + "response"`), or `errorresponse` if none.
pub fn error_key(cmd_lc: &str) -> String {
    if cmd_lc.is_empty() { "errorresponse".into() } else { format!("{cmd_lc}response") }
}

/// The standard 401 for bad credentials.
pub fn bad_credentials() -> CsError {
    CsError::new(ErrorCode::Unauthorized, "unable to verify user credentials and/or request signature")
}
