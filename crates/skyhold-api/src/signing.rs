//! CloudStack request signing, exactly as CloudStack checks it (see the notes in
//! shared/notes/cloudstack-api.md): sort the decoded parameters (without `signature`) by name,
//! join `name=urlencode(value)` with `&`, lower-case everything, HMAC-SHA1 with the secret key,
//! Base64. `urlencode` is Java's URLEncoder with `%20` for spaces.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Java's `URLEncoder.encode(v, "UTF-8")` with `+` turned into `%20`. When `raw_tilde` is set,
/// `~` is left as is (the `cs` client signs it that way).
pub fn java_urlencode(v: &str, raw_tilde: bool) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        let keep = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_') || (raw_tilde && b == b'~');
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The string that is signed.
pub fn string_to_sign(params: &[(String, String)], raw_tilde: bool) -> String {
    let mut ps: Vec<&(String, String)> = params.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("signature")).collect();
    ps.sort_by(|a, b| a.0.cmp(&b.0));
    let joined: Vec<String> = ps.iter().map(|(k, v)| format!("{k}={}", java_urlencode(v, raw_tilde))).collect();
    joined.join("&").to_lowercase()
}

/// Base64 HMAC-SHA1 of `data` under `secret`.
pub fn sign(data: &str, secret: &str) -> String {
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(data.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// Check a request's signature in constant time; tries the `~`-left-raw variant only if the
/// standard one fails.
pub fn verify(params: &[(String, String)], secret: &str, signature: &str) -> bool {
    use subtle::ConstantTimeEq;
    let want = signature.trim().as_bytes();
    let a = sign(&string_to_sign(params, false), secret);
    if bool::from(a.as_bytes().ct_eq(want)) {
        return true;
    }
    if params.iter().any(|(_, v)| v.contains('~')) {
        let b = sign(&string_to_sign(params, true), secret);
        return bool::from(b.as_bytes().ct_eq(want));
    }
    false
}

/// Parse a signature-v3 `expires` value: `yyyy-MM-ddTHH:mm:ss` with an optional fraction and a
/// zone of `+0000`, `+00:00` or `Z`. Returns epoch milliseconds.
pub fn parse_expires(s: &str) -> Option<i64> {
    let s = s.trim();
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f%:z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(s, fmt) {
            return Some(t.timestamp_millis());
        }
    }
    if let Some(base) = s.strip_suffix('Z')
        && let Ok(t) = chrono::NaiveDateTime::parse_from_str(base, "%Y-%m-%dT%H:%M:%S%.f")
    {
        return Some(t.and_utc().timestamp_millis());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Vec<(String, String)> {
        [
            ("command", "deployVirtualMachine"),
            ("zoneid", "b7e5b4a4-0000-4000-8000-00000000z001"),
            ("templateid", "c0ffee00-0000-4000-8000-00000000t001"),
            ("serviceofferingid", "5e1f0000-0000-4000-8000-00000000s001"),
            ("displayname", "Web Server *1"),
            ("apiKey", "EXAMPLEKEY-abc123_XYZ"),
            ("response", "json"),
            ("signatureVersion", "3"),
            ("expires", "2026-01-01T12:00:00+0000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn worked_example_from_the_notes() {
        let p = example();
        let s = string_to_sign(&p, false);
        assert_eq!(
            s,
            "apikey=examplekey-abc123_xyz&command=deployvirtualmachine&displayname=web%20server%20*1&expires=2026-01-01t12%3a00%3a00%2b0000&response=json&serviceofferingid=5e1f0000-0000-4000-8000-00000000s001&signatureversion=3&templateid=c0ffee00-0000-4000-8000-00000000t001&zoneid=b7e5b4a4-0000-4000-8000-00000000z001"
        );
        assert_eq!(sign(&s, "EXAMPLESECRET-9f8e7d_QRS"), "TKVctwNtPJVv7p5Qy55DLRUoF6Y=");
        let mut with_sig = p.clone();
        with_sig.push(("signature".into(), "TKVctwNtPJVv7p5Qy55DLRUoF6Y=".into()));
        assert!(verify(&with_sig, "EXAMPLESECRET-9f8e7d_QRS", "TKVctwNtPJVv7p5Qy55DLRUoF6Y="));
        assert!(!verify(&with_sig, "wrong", "TKVctwNtPJVv7p5Qy55DLRUoF6Y="));
    }

    #[test]
    fn encoding() {
        assert_eq!(java_urlencode("Zürich a+b/c:d", false).to_lowercase(), "z%c3%bcrich%20a%2bb%2fc%3ad");
        assert_eq!(java_urlencode("a~b", false), "a%7Eb");
        assert_eq!(java_urlencode("a~b", true), "a~b");
    }

    #[test]
    fn raw_tilde_fallback() {
        let p = vec![("command".to_string(), "listZones".to_string()), ("name".to_string(), "a~b".to_string())];
        let sig = sign(&string_to_sign(&p, true), "s");
        assert!(verify(&p, "s", &sig));
    }

    #[test]
    fn expires_formats() {
        let base = parse_expires("2026-01-01T12:00:00+0000").unwrap();
        assert_eq!(parse_expires("2026-01-01T12:00:00+00:00"), Some(base));
        assert_eq!(parse_expires("2026-01-01T12:00:00Z"), Some(base));
        assert_eq!(parse_expires("2026-01-01T12:00:00.500Z"), Some(base + 500));
        assert_eq!(parse_expires("2026-01-01T13:00:00+0100"), Some(base));
        assert_eq!(parse_expires("yesterday"), None);
    }
}
