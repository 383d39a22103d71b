//! Fencing: proof that a host (and so every VM copy on it) is dead, the only thing that lets HA
//! restart a VM elsewhere (design invariant 7: "unreachable" is *unknown*, not *dead*).
//!
//! A [`FenceProof`] has private fields: code outside this module and its submodules cannot make
//! one, it can only receive one from the constructors here, each of which stands for an
//! observation:
//!
//! - [`ipmi::power_off`]: the host's BMC powered it off, and a read-back said the power is off;
//! - [`agent_reported_stopped`]: the host's own agent says the VM is stopped;
//! - [`lease_expired`]: the host has not renewed its lease for a whole lease period, and the lease
//!   is longer than the host's self-fence period plus a margin, so a host that honours its
//!   self-fence has stopped its VMs by then.
//!
//! **Architecture Invariant:** no SQL, no HTTP. Callers bring the observations (lease ages from
//! the database clock) and record the proof's [`FenceProof::describe`] as an event.

pub mod ipmi;

use skyhold_types::time::cs_date;

/// The agent's default self-fence period: a host that cannot renew its lease for this long stops
/// its VMs.
pub const SELF_FENCE_MS: u64 = 10_000;
/// Slack between the end of the host's self-fence period and the end of its lease (clock rate
/// differences, a slow kill of the VM processes).
pub const LEASE_MARGIN_MS: u64 = 5_000;
/// The default host lease: a host silent this long counts as dead ([`lease_expired`]). Must
/// exceed [`SELF_FENCE_MS`] + [`LEASE_MARGIN_MS`].
pub const HOST_LEASE_MS: u64 = 20_000;

/// Evidence that a host is dead. Only this module and its submodules create one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceProof {
    kind: ProofKind,
    /// This server's wall clock when the proof was obtained (epoch milliseconds).
    at_ms: i64,
    /// How it was obtained, for [`FenceProof::describe`].
    detail: String,
}

/// What proved the host dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofKind {
    /// The BMC at `address` (`host:port`) acknowledged `chassis power off` and then read back off.
    Ipmi { address: String },
    /// The host's own agent reported the VM stopped.
    AgentReportedStopped,
    /// The host has been silent for `silent_ms` >= its lease `lease_ms`, which exceeds its
    /// self-fence period `self_fence_ms` plus the margin.
    LeaseExpired { silent_ms: u64, lease_ms: u64, self_fence_ms: u64 },
}

impl FenceProof {
    /// Private: visible to this module and its submodules only.
    fn new(kind: ProofKind, detail: String) -> FenceProof {
        FenceProof { kind, at_ms: now_ms(), detail }
    }

    /// What proved the host dead.
    pub fn kind(&self) -> &ProofKind {
        &self.kind
    }

    /// When the proof was obtained: this server's wall clock, epoch milliseconds.
    pub fn at_ms(&self) -> i64 {
        self.at_ms
    }

    /// One line for events and logs: what proved the host dead, and when.
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            ProofKind::Ipmi { address } => format!("IPMI power-off through BMC {address}"),
            ProofKind::AgentReportedStopped => "the host's agent reported the VM stopped".to_string(),
            ProofKind::LeaseExpired { silent_ms, lease_ms, self_fence_ms } => format!(
                "host lease expired: silent for {silent_ms} ms, lease {lease_ms} ms > self-fence {self_fence_ms} ms \
                 + margin"
            ),
        };
        if self.detail.is_empty() {
            format!("{what} at {}", cs_date(self.at_ms))
        } else {
            format!("{what} ({}) at {}", self.detail, cs_date(self.at_ms))
        }
    }
}

/// Whether a lease of `lease_ms` is safe against a host whose self-fence period is
/// `self_fence_ms`: the lease must outlast the self-fence by more than `margin_ms`
/// (`lease_ms > self_fence_ms + margin_ms`).
pub fn lease_is_safe(lease_ms: u64, self_fence_ms: u64, margin_ms: u64) -> bool {
    self_fence_ms.checked_add(margin_ms).is_some_and(|bound| lease_ms > bound)
}

/// A proof from an expired host lease: the host has been silent for `silent_ms` (database clock)
/// and `silent_ms >= lease_ms`, and the lease is safe ([`lease_is_safe`]). `None` otherwise: the
/// host may still be running its VMs.
pub fn lease_expired(silent_ms: u64, lease_ms: u64, self_fence_ms: u64, margin_ms: u64) -> Option<FenceProof> {
    if !lease_is_safe(lease_ms, self_fence_ms, margin_ms) {
        tracing::warn!(
            lease_ms,
            self_fence_ms,
            margin_ms,
            "host lease is not longer than the self-fence period plus the margin: an expired lease proves nothing"
        );
        return None;
    }
    if silent_ms < lease_ms {
        return None;
    }
    Some(FenceProof::new(
        ProofKind::LeaseExpired { silent_ms, lease_ms, self_fence_ms },
        format!("margin {margin_ms} ms"),
    ))
}

/// A proof from the host's own agent: it reports the VM stopped.
pub fn agent_reported_stopped() -> FenceProof {
    FenceProof::new(ProofKind::AgentReportedStopped, String::new())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lease_exceeds_self_fence_plus_margin() {
        const { assert!(HOST_LEASE_MS > SELF_FENCE_MS + LEASE_MARGIN_MS) };
        assert!(lease_is_safe(HOST_LEASE_MS, SELF_FENCE_MS, LEASE_MARGIN_MS));
    }

    #[test]
    fn lease_inequality_table() {
        // (lease, self-fence, margin, safe)
        let cases = [
            (20_000, 10_000, 5_000, true),
            (15_001, 10_000, 5_000, true),
            (15_000, 10_000, 5_000, false), // equal is not enough
            (14_999, 10_000, 5_000, false),
            (10_000, 10_000, 0, false),
            (10_001, 10_000, 0, true),
            (1, 0, 0, true),
            (0, 0, 0, false),
            (u64::MAX, u64::MAX, 1, false), // overflow is never safe
            (u64::MAX, u64::MAX - 1, 0, true),
        ];
        for (lease, sf, margin, safe) in cases {
            assert_eq!(lease_is_safe(lease, sf, margin), safe, "lease {lease} self-fence {sf} margin {margin}");
        }
    }

    #[test]
    fn lease_expired_table() {
        // (silent, lease, self-fence, margin, proof?)
        let cases = [
            (20_000, 20_000, 10_000, 5_000, true), // silent for exactly the lease
            (60_000, 20_000, 10_000, 5_000, true),
            (19_999, 20_000, 10_000, 5_000, false), // lease not over yet
            (0, 20_000, 10_000, 5_000, false),
            (60_000, 15_000, 10_000, 5_000, false), // lease == self-fence + margin: unsafe
            (60_000, 12_000, 10_000, 5_000, false), // lease inside the margin
            (60_000, 8_000, 10_000, 5_000, false),  // lease shorter than the self-fence
            (15_001, 15_001, 10_000, 5_000, true),
            (u64::MAX, u64::MAX, u64::MAX, 1, false),
        ];
        for (silent, lease, sf, margin, want) in cases {
            let got = lease_expired(silent, lease, sf, margin);
            assert_eq!(got.is_some(), want, "silent {silent} lease {lease} self-fence {sf} margin {margin}");
            if let Some(p) = got {
                assert_eq!(
                    p.kind(),
                    &ProofKind::LeaseExpired { silent_ms: silent, lease_ms: lease, self_fence_ms: sf }
                );
            }
        }
    }

    #[test]
    fn describe_says_what_and_when() {
        let p = lease_expired(25_000, HOST_LEASE_MS, SELF_FENCE_MS, LEASE_MARGIN_MS).expect("expired");
        let d = p.describe();
        assert!(
            d.contains("silent for 25000 ms") && d.contains("lease 20000 ms") && d.contains("self-fence 10000"),
            "{d}"
        );
        assert!(d.contains(" at 20") && d.ends_with("+0000"), "{d}");
        let a = agent_reported_stopped();
        assert_eq!(a.kind(), &ProofKind::AgentReportedStopped);
        assert!(a.describe().starts_with("the host's agent reported the VM stopped at "), "{}", a.describe());
        assert!(a.at_ms() > 1_600_000_000_000);
    }
}
