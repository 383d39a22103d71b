//! CloudStack request signing, signature version 3 (the same scheme as the integration tests'
//! `signed_query` in `crates/skyhold/tests/common/mod.rs`).

use base64::Engine;
use hmac::{Hmac, Mac};

/// An API key pair.
#[derive(Debug, Clone)]
pub struct Creds {
    pub api_key: String,
    pub secret: String,
}

/// Java URLEncoder, `%20` for spaces (what CloudStack signs).
pub fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A signed query string for `cmd` that stays valid for `valid_secs` seconds.
pub fn signed_query(who: &Creds, cmd: &str, params: &[(&str, &str)], valid_secs: i64) -> String {
    let mut all: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    all.push(("command".into(), cmd.into()));
    all.push(("response".into(), "json".into()));
    all.push(("apiKey".into(), who.api_key.clone()));
    all.push(("signatureVersion".into(), "3".into()));
    all.push(("expires".into(), utc_plus(valid_secs)));
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let to_sign = sorted.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&").to_lowercase();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(who.secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    all.push(("signature".into(), sig));
    all.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

/// `yyyy-MM-ddTHH:mm:ss+0000`, `secs` from now (UTC).
fn utc_plus(secs: i64) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
        + secs;
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}+0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_java() {
        assert_eq!(enc("a b+c/d=e"), "a%20b%2Bc%2Fd%3De");
        assert_eq!(enc("x.y-z*_"), "x.y-z*_");
    }

    #[test]
    fn expiry_format() {
        let s = utc_plus(0);
        assert_eq!(s.len(), "2024-01-01T00:00:00+0000".len());
        assert!(s.ends_with("+0000"));
    }
}
