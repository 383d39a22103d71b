//! HTTP plumbing: the router, body limits, and the request pipeline of `/client/api`.

use crate::commands;
use crate::handlers::{self, Ctx};
use crate::params::Params;
use crate::reply::{self, Reply};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use skyhold_core::Core;
use skyhold_types::{CsError, ErrorCode};

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest accepted query string.
/// (hyper itself answers 414 above 64 KiB, before this code runs.)
pub const MAX_QUERY: usize = 32 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub core: Core,
}

pub fn router(core: Core) -> Router {
    Router::new()
        .route("/client/api", any(api))
        .route("/client/api/", any(api))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(ApiState { core })
}

async fn health() -> Response {
    json_status(StatusCode::OK, json!({ "status": "alive" }))
}

/// Ready = database reachable, this server registered and not fenced or draining.
async fn ready(State(st): State<ApiState>) -> Response {
    let core = &st.core;
    let db_ok = core.db().ping().await;
    let registered = core.is_registered();
    let draining = core.is_shutting_down();
    let ok = db_ok && registered && !draining;
    let body = json!({
        "ready": ok,
        "database": db_ok,
        "registered": registered,
        "shuttingdown": draining,
        "msid": core.ms().id,
    });
    json_status(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

fn json_status(status: StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=UTF-8"));
    r
}

async fn api(State(st): State<ApiState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().unwrap_or("").to_string();
    if parts.method != Method::GET && parts.method != Method::POST {
        let cmd = Params::parse(&[query.as_bytes()]).map(|p| p.cmd_lc).unwrap_or_default();
        return reply::error(
            &reply::error_key(&cmd),
            &CsError::new(
                ErrorCode::MethodNotAllowed,
                format!("method {} is not allowed: use GET or POST", parts.method),
            ),
        );
    }
    if query.len() > MAX_QUERY {
        return reply::error(
            "errorresponse",
            &CsError::new(ErrorCode::MalformedParameter, format!("query string longer than {MAX_QUERY} bytes")),
        );
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return reply::error("errorresponse", &e),
    };
    // Only form bodies carry parameters; any other body is ignored, as CloudStack does.
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let sources: Vec<&[u8]> = if form { vec![query.as_bytes(), &body] } else { vec![query.as_bytes()] };
    let p = match Params::parse(&sources) {
        Ok(p) => p,
        Err(e) => return reply::error("errorresponse", &e),
    };
    handle(&st.core, &parts.headers, p).await
}

async fn read_body(body: Body) -> Result<Vec<u8>, CsError> {
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => Ok(b.to_vec()),
        Err(_) => {
            Err(CsError::new(ErrorCode::MalformedParameter, format!("request body larger than {MAX_BODY} bytes")))
        }
    }
}

async fn handle(core: &Core, headers: &axum::http::HeaderMap, p: Params) -> Response {
    let Some(name) = p.get("command").map(str::to_string) else {
        return reply::error("errorresponse", &CsError::new(ErrorCode::Unauthorized, "no command given"));
    };
    let key = reply::error_key(&p.cmd_lc);
    if let Some(fmt) = p.get("response")
        && !fmt.eq_ignore_ascii_case("json")
    {
        return reply::error(
            &key,
            &CsError::new(
                ErrorCode::Unsupported,
                format!("response format {fmt} is not supported: Skyhold answers JSON only (use response=json)"),
            ),
        );
    }
    let spec = commands::find(&name);
    if spec.is_none() && !commands::is_empty_list(&name) {
        return reply::error(
            "errorresponse",
            &CsError::new(ErrorCode::Unauthorized, "The given command does not exist or it is not available for user"),
        );
    }
    if name == "login" {
        return match crate::auth::login(core, &p).await {
            Ok((body, sid)) => {
                let mut r = reply::ok(&p.cmd_lc, Reply::Obj(body));
                let cookie = format!("{}={sid}; Path=/client; HttpOnly", crate::auth::SESSION_COOKIE);
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
                r
            }
            Err(e) => reply::error(&key, &e),
        };
    }
    // During a database failover, reads wait (bounded) instead of failing: the credential check,
    // and read-only commands (a rerun of a read changes nothing).
    let failover_deadline = std::time::Instant::now() + FAILOVER_RETRY;
    let (caller, sid) = loop {
        match crate::auth::authenticate(core, headers, &p, name == "logout").await {
            Ok(c) => break c,
            Err(e) if db_unavailable(core, &e) && std::time::Instant::now() < failover_deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return reply::error(&key, &e),
        }
    };
    if name == "logout" {
        return match crate::auth::logout(core, sid.as_deref()).await {
            Ok(v) => {
                let mut r = reply::ok(&p.cmd_lc, Reply::Obj(v));
                let cookie = format!("{}=; Path=/client; Max-Age=0", crate::auth::SESSION_COOKIE);
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
                r
            }
            Err(e) => reply::error(&key, &e),
        };
    }
    if spec.is_some_and(|s| s.admin_only) && !caller.is_admin() {
        return reply::error(
            &key,
            &CsError::new(ErrorCode::Unauthorized, "The given command does not exist or it is not available for user"),
        );
    }
    let ctx = Ctx { core, caller: &caller, p: &p, name: &name };
    let read_only = spec.is_none_or(|s| !s.is_async && is_read_only(s.name));
    let res = loop {
        let res = if spec.is_none() { Ok(Reply::list("item", Vec::new(), 0)) } else { handlers::dispatch(&ctx).await };
        match res {
            Err(e) if read_only && db_unavailable(core, &e) && std::time::Instant::now() < failover_deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    match res {
        Ok(r) => reply::ok(&p.cmd_lc, r),
        Err(e) => {
            if e.code == ErrorCode::Internal {
                tracing::warn!(command = %name, error = %e.text, "command failed");
            }
            reply::error(&key, &e)
        }
    }
}

/// How long a request may wait through a database failover (several endpoints only).
const FAILOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// A storage-unavailable error while the database has other endpoints to fail over to.
fn db_unavailable(core: &Core, e: &CsError) -> bool {
    core.db().has_failover() && e.code == ErrorCode::Internal && e.text.contains("database unavailable")
}

/// Commands that only read (rerunning them during a failover changes nothing).
fn is_read_only(name: &str) -> bool {
    name.starts_with("list") || matches!(name, "queryAsyncJobResult" | "readyForShutdown")
}
