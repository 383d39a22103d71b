//! Who is calling: a signed request (API key + HMAC signature, v1 or v3 with `expires`), or a
//! login session. Sessions live in the database, so any server accepts any session (no sticky
//! load balancing needed) and a server's death logs nobody out.

use crate::params::Params;
use crate::reply::bad_credentials;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use skyhold_core::Core;
use skyhold_core::vm::Caller;
use skyhold_db::account::{
    Session, User, session_delete, session_insert, session_touch, user_fetch, user_fetch_by_api_key, user_fetch_by_name,
};
use skyhold_db::crypto::{password_verify, random_token};
use skyhold_types::{CsError, ErrorCode};

/// Name of the session cookie (CloudStack's).
pub const SESSION_COOKIE: &str = "JSESSIONID";

fn caller_of(u: &User) -> Caller {
    Caller {
        user_id: u.id.clone(),
        username: u.username.clone(),
        account_id: u.account_id.clone(),
        account_name: u.account_name.clone(),
        domain_id: u.domain_id.clone(),
        account_type: u.account_type,
    }
}

fn internal(e: impl std::fmt::Display) -> CsError {
    tracing::warn!(error = %e, "authentication lookup failed");
    CsError::new(ErrorCode::Internal, "Internal error while checking credentials: database unavailable")
}

/// The session id from the `Cookie` header, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    for v in headers.get_all(axum::http::header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for part in s.split(';') {
            if let Some((k, val)) = part.trim().split_once('=')
                && k.trim() == SESSION_COOKIE
                && !val.trim().is_empty()
            {
                return Some(val.trim().trim_matches('"').to_string());
            }
        }
    }
    None
}

/// Authenticate a request. `allow_cookie_only` lets `logout` through without a `sessionkey`.
pub async fn authenticate(
    core: &Core,
    headers: &HeaderMap,
    p: &Params,
    allow_cookie_only: bool,
) -> Result<(Caller, Option<String>), CsError> {
    if let (Some(key), Some(sig)) = (p.get("apikey"), p.get("signature")) {
        let user = {
            let mut c = core.db().conn().await.map_err(internal)?;
            user_fetch_by_api_key(&mut c, key).await.map_err(internal)?
        };
        let Some(user) = user else { return Err(bad_credentials()) };
        if user.state != "enabled" {
            return Err(bad_credentials());
        }
        let Some(enc) = &user.secret_enc else { return Err(bad_credentials()) };
        let secret = core.key().decrypt(enc).map_err(|e| {
            tracing::error!(error = %e, "cannot decrypt an API secret: this node's key file differs from the cluster's");
            CsError::internal("Internal error: this server cannot decrypt API secrets (key file mismatch)")
        })?;
        // The signature covers the parameters exactly as the client sent them (names included).
        if !crate::signing::verify(&p.pairs, &secret, sig) {
            return Err(bad_credentials());
        }
        if p.get("signatureversion") == Some("3") {
            let Some(exp) = p.get("expires") else {
                return Err(CsError::new(
                    ErrorCode::Unauthorized,
                    "signature version 3 requires the expires parameter",
                ));
            };
            let Some(exp_ms) = crate::signing::parse_expires(exp) else {
                return Err(CsError::new(
                    ErrorCode::Unauthorized,
                    format!("expires value {exp} is not a valid date (yyyy-MM-ddTHH:mm:ssZ)"),
                ));
            };
            if exp_ms <= chrono::Utc::now().timestamp_millis() {
                return Err(CsError::new(ErrorCode::Unauthorized, "the request has expired"));
            }
        }
        return Ok((caller_of(&user), None));
    }
    if let Some(sid) = session_cookie(headers) {
        let session = {
            let mut c = core.db().conn().await.map_err(internal)?;
            session_touch(&mut c, &sid).await.map_err(internal)?
        };
        let Some(s) = session else { return Err(bad_credentials()) };
        let csrf_ok = match p.get("sessionkey") {
            Some(k) => constant_eq(k.as_bytes(), s.csrf_key.as_bytes()),
            None => allow_cookie_only,
        };
        if !csrf_ok {
            return Err(bad_credentials());
        }
        let user = {
            let mut c = core.db().conn().await.map_err(internal)?;
            user_fetch(&mut c, &s.user_id).await.map_err(internal)?
        };
        return match user {
            Some(u) if u.state == "enabled" => Ok((caller_of(&u), Some(sid))),
            _ => Err(bad_credentials()),
        };
    }
    Err(bad_credentials())
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `login`: check the password, create a session. Returns the response object and the session
/// id for the cookie.
pub async fn login(core: &Core, p: &Params) -> Result<(Value, String), CsError> {
    let username = p.req("username")?;
    let password = p.req("password")?;
    let domain_path = match p.get("domain").map(str::trim) {
        None | Some("") | Some("/") | Some("ROOT") | Some("ROOT/") | Some("/ROOT") | Some("/ROOT/") => "/".to_string(),
        Some(d) => {
            let d = d.trim_matches('/');
            let d = d.strip_prefix("ROOT/").unwrap_or(d);
            format!("/{d}/")
        }
    };
    let fail =
        || CsError::new(ErrorCode::AccountError, "Failed to authenticate user; please provide valid credentials");
    let user = {
        let mut c = core.db().conn().await.map_err(internal)?;
        user_fetch_by_name(&mut c, username, &domain_path).await.map_err(internal)?
    };
    let Some(user) = user else {
        // Same work as a real check, so timing does not tell which usernames exist.
        let _ = password_verify(
            password,
            "pbkdf2-sha256$60000$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        return Err(fail());
    };
    let hash = user.password_hash.clone();
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || password_verify(&pw, &hash)).await.unwrap_or(false);
    if !ok || user.state != "enabled" {
        return Err(fail());
    }
    let timeout_s = core.settings().get_i64(skyhold_types::settings::SESSION_TIMEOUT).max(60);
    let s = Session {
        id: random_token(24),
        user_id: user.id.clone(),
        csrf_key: random_token(18),
        last_used_ms: 0,
        timeout_s,
    };
    {
        let mut c = core.db().conn().await.map_err(internal)?;
        session_insert(&mut c, &s).await.map_err(internal)?;
    }
    let body = json!({
        "username": user.username,
        "userid": user.id,
        "domainid": user.domain_id,
        "timeout": timeout_s.to_string(),
        "account": user.account_name,
        "firstname": user.firstname,
        "lastname": user.lastname,
        "type": user.account_type.to_string(),
        "registered": "false",
        "sessionkey": s.csrf_key,
    });
    Ok((body, s.id))
}

/// `logout`: end the session.
pub async fn logout(core: &Core, sid: Option<&str>) -> Result<Value, CsError> {
    if let Some(sid) = sid {
        let mut c = core.db().conn().await.map_err(internal)?;
        session_delete(&mut c, sid).await.map_err(internal)?;
    }
    Ok(json!({ "description": "success" }))
}
