//! Percentiles of a handful of samples (nearest rank, like the API bench).

use serde_json::{Value, json};
use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and max of one measure, over the rounds that produced it.
#[derive(Debug, Clone)]
pub struct Summary {
    pub what: &'static str,
    pub n: usize,
    /// Rounds where the measure did not complete (timeout) or had nothing to measure.
    pub missing: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(what: &'static str, values: impl IntoIterator<Item = Option<f64>>) -> Summary {
        let mut missing = 0;
        let mut v: Vec<f64> = Vec::new();
        for x in values {
            match x {
                Some(x) if x.is_finite() => v.push(x),
                _ => missing += 1,
            }
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
            v[rank.min(n) - 1]
        };
        Summary {
            what,
            n,
            missing,
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(50.0),
            p99: pct(99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub fn to_json(&self) -> Value {
        self.to_json_as("rounds")
    }

    /// As JSON, naming the sample count `count_key` ("rounds", "samples").
    pub fn to_json_as(&self, count_key: &str) -> Value {
        let r = |v: f64| if v.is_finite() { json!((v * 10.0).round() / 10.0) } else { Value::Null };
        json!({
            "measure": self.what,
            count_key: self.n,
            "missing": self.missing,
            "min_ms": r(self.min),
            "p50_ms": r(self.p50),
            "p99_ms": r(self.p99),
            "max_ms": r(self.max),
        })
    }
}
