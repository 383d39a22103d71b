//! Times. Durable times are milliseconds since the Unix epoch as read from the *database* clock
//! (never a management server's clock: skew between servers is a known CloudStack failure).

/// Format epoch milliseconds as CloudStack does: `yyyy-MM-dd'T'HH:mm:ssZ`, e.g.
/// `2026-11-22T01:41:15+0000`.
pub fn cs_date(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S+0000").to_string(),
        None => "1970-01-01T00:00:00+0000".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_cloudstack() {
        assert_eq!(super::cs_date(1_795_311_675_000), "2026-11-22T01:41:15+0000");
    }
}
