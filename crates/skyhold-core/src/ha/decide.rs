//! "May this host be declared dead?": a pure function over what is known, table-tested.
//!
//! Invariant 7: a VM is restarted elsewhere only with proof that the old copy is dead.
//! "Unreachable" is unknown, not dead. The proofs: an IPMI power-off read back as off, or the
//! host's storage heartbeat silent for the lease period (longer than the agent's self-fence
//! period plus a margin, so a host that is alive but isolated has stopped its VMs by then), seen
//! by a neighbour that can read the storage.

/// One neighbour's answer to "check this host".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub neighbour: String,
    /// TCP connect to the host's check address (None: no address to try).
    pub reachable: Option<bool>,
    /// The host's heartbeat counter read from the shared storage (None: missing or unreadable).
    pub heartbeat: Option<i64>,
    /// Could the neighbour read the storage at all? (If not, `heartbeat` means nothing.)
    pub storage_ok: bool,
}

/// What is known about a suspect host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// Its agent is connected again.
    pub connected: bool,
    /// This round's answers (neighbours that did not answer are absent).
    pub answers: Vec<Answer>,
    /// The heartbeat counter known before this round: recorded from the host's own pings, or read
    /// by neighbours in an earlier round of this suspicion (None: no reading to compare with yet,
    /// so no reading can show that the counter *advances*).
    pub baseline: Option<i64>,
    /// Database time since the counter last advanced (None: never saw a heartbeat).
    pub hb_silent_ms: Option<i64>,
    /// Out-of-band management configured and enabled.
    pub oob_enabled: bool,
    /// An IPMI power-off was tried during this suspicion and did not give a proof.
    pub oob_failed: bool,
    pub lease_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The agent is back.
    Recovered,
    /// Alive but cut off from the management servers: never restart its VMs.
    Alive(String),
    /// Power it off through its BMC (a proof if it reads back off).
    FenceIpmi,
    /// The heartbeat lease expired, as read by a neighbour after the lease period: proof.
    LeaseExpired { silent_ms: i64 },
    /// A proof may still come (the lease is running): wait.
    Wait(String),
    /// No proof is possible now: alert, leave its VMs alone.
    Unknown(String),
}

pub fn decide(e: &Evidence) -> Verdict {
    if e.connected {
        return Verdict::Recovered;
    }
    if let Some(a) = e.answers.iter().find(|a| a.reachable == Some(true)) {
        return Verdict::Alive(format!("reachable from {}", a.neighbour));
    }
    if let Some(b) = e.baseline
        && let Some(a) = e.answers.iter().find(|a| a.storage_ok && a.heartbeat.is_some_and(|h| h > b))
    {
        return Verdict::Alive(format!("still writing its storage heartbeat (seen by {})", a.neighbour));
    }
    if e.oob_enabled && !e.oob_failed {
        return Verdict::FenceIpmi;
    }
    let readers = e.answers.iter().filter(|a| a.storage_ok).count();
    match e.hb_silent_ms {
        Some(silent) if silent >= e.lease_ms && readers > 0 => Verdict::LeaseExpired { silent_ms: silent },
        Some(silent) if readers > 0 => {
            Verdict::Wait(format!("storage heartbeat silent for {silent} ms; the lease is {} ms", e.lease_ms))
        }
        Some(_) => Verdict::Unknown(
            "no neighbour could read the primary storage to check its heartbeat (storage outage?)".into(),
        ),
        None if e.oob_failed => Verdict::Unknown(
            "its BMC did not power it off and it never wrote a storage heartbeat: no proof that it is dead".into(),
        ),
        None => Verdict::Unknown(
            "it never wrote a storage heartbeat and has no out-of-band management: no proof is possible".into(),
        ),
    }
}

/// How one neighbour's answer (None: it did not answer) reads for the record: a key that changes
/// only when the answer means something different (so an answer repeated round after round is
/// recorded once), and the event text. `baseline` is the counter known before this round.
pub fn describe_answer(neighbour: &str, host: &str, a: Option<&Answer>, baseline: Option<i64>) -> (String, String) {
    let Some(a) = a else {
        return ("silent".into(), format!("{neighbour} did not answer the check of host {host} (unknown)"));
    };
    let (reach, net) = match a.reachable {
        Some(true) => ("reachable", "reachable on its check address"),
        Some(false) => ("unreachable", "unreachable on its check address"),
        None => ("untested", "network not tested (no check address)"),
    };
    let (hb, storage) = match (a.storage_ok, a.heartbeat, baseline) {
        (false, _, _) => ("unreadable", "primary storage unreadable from there".to_string()),
        (true, None, _) => ("none", "no storage heartbeat of the host".to_string()),
        (true, Some(v), None) => ("first", format!("storage heartbeat {v} (first reading)")),
        (true, Some(v), Some(b)) if v > b => ("moving", format!("storage heartbeat {v}, advancing (was {b})")),
        (true, Some(v), Some(_)) => ("still", format!("storage heartbeat still at {v}")),
    };
    (format!("{reach}/{hb}"), format!("{neighbour} checked host {host}: {net}; {storage}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_as_their_meaning() {
        let d = |a: Option<&Answer>, b| describe_answer("n1", "h", a, b);
        assert_eq!(d(None, None).0, "silent");
        let a = ans(Some(false), Some(12), true);
        assert_eq!(
            d(Some(&a), None),
            (
                "unreachable/first".into(),
                "n1 checked host h: unreachable on its check address; storage heartbeat 12 (first reading)".into()
            )
        );
        assert_eq!(d(Some(&a), Some(10)).0, "unreachable/moving");
        assert_eq!(d(Some(&a), Some(12)).0, "unreachable/still");
        // A new counter value that still advances means the same: the key does not change.
        assert_eq!(d(Some(&ans(Some(false), Some(13), true)), Some(12)).0, "unreachable/moving");
        assert_eq!(d(Some(&ans(None, Some(3), false)), Some(1)).0, "untested/unreadable");
        assert_eq!(d(Some(&ans(Some(true), None, true)), None).0, "reachable/none");
    }

    fn ans(reach: Option<bool>, hb: Option<i64>, ok: bool) -> Answer {
        Answer { neighbour: "n1".into(), reachable: reach, heartbeat: hb, storage_ok: ok }
    }

    fn ev(answers: Vec<Answer>, silent: Option<i64>, oob: bool, oob_failed: bool) -> Evidence {
        Evidence {
            connected: false,
            answers,
            baseline: Some(10),
            hb_silent_ms: silent,
            oob_enabled: oob,
            oob_failed,
            lease_ms: 20_000,
        }
    }

    #[test]
    fn table() {
        use Verdict::*;
        let dead_net = ans(Some(false), Some(10), true);
        let cases: Vec<(Evidence, &str)> = vec![
            (Evidence { connected: true, ..ev(vec![], None, false, false) }, "recovered"),
            // Reachable on the network: alive, whatever else.
            (ev(vec![ans(Some(true), Some(10), true)], Some(60_000), true, false), "alive"),
            // Heartbeat advancing: alive (cut off from the management servers only).
            (ev(vec![ans(Some(false), Some(11), true)], Some(1_000), true, false), "alive"),
            // Silent and unreachable with a BMC: power it off first.
            (ev(vec![dead_net.clone()], Some(1_000), true, false), "ipmi"),
            // BMC failed, lease not yet expired: wait.
            (ev(vec![dead_net.clone()], Some(5_000), true, true), "wait"),
            // BMC failed (it lost power with the host), lease expired: proof.
            (ev(vec![dead_net.clone()], Some(20_000), true, true), "lease"),
            // No BMC: the lease decides.
            (ev(vec![dead_net.clone()], Some(19_999), false, false), "wait"),
            (ev(vec![dead_net.clone()], Some(25_000), false, false), "lease"),
            // Lease expired but nobody could read the storage: no proof.
            (ev(vec![ans(Some(false), None, false)], Some(60_000), false, false), "unknown"),
            // Lease expired but no neighbour answered at all: no proof.
            (ev(vec![], Some(60_000), false, false), "unknown"),
            // Never a heartbeat, no BMC: no proof possible.
            (ev(vec![dead_net.clone()], None, false, false), "unknown"),
            (ev(vec![dead_net.clone()], None, true, true), "unknown"),
            // Unreachable is not dead: an unknown network answer alone proves nothing.
            (ev(vec![ans(None, Some(10), true)], Some(1_000), false, false), "wait"),
            // A first look at a counter never recorded before is not "advancing": wait.
            (Evidence { baseline: None, ..ev(vec![ans(Some(false), Some(7), true)], Some(0), false, false) }, "wait"),
        ];
        for (e, want) in cases {
            let got = decide(&e);
            let kind = match got {
                Recovered => "recovered",
                Alive(_) => "alive",
                FenceIpmi => "ipmi",
                LeaseExpired { .. } => "lease",
                Wait(_) => "wait",
                Unknown(_) => "unknown",
            };
            assert_eq!(kind, want, "{e:?} -> {got:?}");
        }
    }
}
