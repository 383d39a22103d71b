//! The agent's self-fence clock, as a pure state machine over instants the caller passes in (so the
//! failure timelines are table-tested without waiting).
//!
//! **Self-fencing.** An agent that has had no successful exchange with any management server (a
//! `Pong` or a `Welcome`) *and* no successful storage heartbeat write for its self-fence period
//! stops every VM of its hosts: from then on nobody can tell it is alive, so the management servers
//! may restart its VMs elsewhere once their own (longer) host lease expires. In a real deployment
//! this is a hardware watchdog that resets the host. The deadline is checked whenever something
//! would reset it (a `Pong`, a `Welcome`, a successful heartbeat write): a contact that arrives
//! after the deadline fences first and counts afterwards, so the fence always happens before the
//! agent does anything on a new connection. Without shared storage there is no self-fencing (the
//! condition needs the storage heartbeat).
//!
//! **The `fenced` flag in pings.** Set by a fence; reported in every ping from then on, through the
//! whole first connection registered after the fence; cleared by the `Welcome` of a later connection,
//! once some ping on a post-fence connection was answered with a `Pong` (so the server has seen it).

use std::time::{Duration, Instant};

/// How far the `fenced` flag has been delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceReport {
    /// Nothing to report.
    None,
    /// Fenced; no `Welcome` since.
    Pending,
    /// Fenced, a connection registered since; `acked` once a `Pong` answered one of its pings.
    Reporting { acked: bool },
}

/// A successful exchange with a management server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Contact {
    Welcome,
    Pong,
}

/// The self-fence clock of one agent.
#[derive(Debug)]
pub(crate) struct Watch {
    /// `None`: self-fencing disabled (no shared storage).
    period: Option<Duration>,
    last_contact: Instant,
    last_storage_ok: Instant,
    /// A fence happened and neither clock was reset since (fence once per silence).
    fenced: bool,
    report: FenceReport,
}

impl Watch {
    /// A clock started at `now` (the agent's start counts as its last contact and last write).
    pub(crate) fn new(now: Instant, period: Option<Duration>) -> Watch {
        Watch { period, last_contact: now, last_storage_ok: now, fenced: false, report: FenceReport::None }
    }

    /// When the agent must fence itself if nothing resets a clock before (`None`: disabled, or
    /// already fenced for this silence).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let period = self.period?;
        if self.fenced {
            return None;
        }
        Some(self.last_contact.max(self.last_storage_ok) + period)
    }

    /// Whether the fence is due at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// Record that the fence was carried out.
    pub(crate) fn fenced(&mut self) {
        self.fenced = true;
        self.report = FenceReport::Pending;
    }

    /// Record a successful exchange with a management server at `now`. The caller fences first if
    /// [`Watch::due`].
    pub(crate) fn contact(&mut self, now: Instant, what: Contact) {
        self.last_contact = self.last_contact.max(now);
        self.fenced = false;
        self.report = match (what, self.report) {
            (Contact::Welcome, FenceReport::Pending) => FenceReport::Reporting { acked: false },
            (Contact::Welcome, FenceReport::Reporting { acked: true }) => FenceReport::None,
            (Contact::Pong, FenceReport::Reporting { .. }) => FenceReport::Reporting { acked: true },
            (_, other) => other,
        };
    }

    /// Record a successful storage heartbeat write started at `now`. The caller fences first if
    /// [`Watch::due`].
    pub(crate) fn storage_ok(&mut self, now: Instant) {
        self.last_storage_ok = self.last_storage_ok.max(now);
        self.fenced = false;
    }

    /// The `fenced` flag of pings.
    pub(crate) fn report_fenced(&self) -> bool {
        self.report != FenceReport::None
    }

    /// How long since the last contact and the last storage write, for logs.
    pub(crate) fn silence(&self, now: Instant) -> (Duration, Duration) {
        (now.saturating_duration_since(self.last_contact), now.saturating_duration_since(self.last_storage_ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(1000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Replay a timeline of (time in ms, event) and return at which times the fence fired (checked at
    /// every event, the way the agent does: before counting a contact or a write).
    fn fences(events: &[(u64, &str)]) -> Vec<u64> {
        let t0 = Instant::now();
        let mut w = Watch::new(t0, Some(P));
        let mut fired = Vec::new();
        for &(at, what) in events {
            let now = t0 + ms(at);
            if w.due(now) {
                w.fenced();
                fired.push(at);
            }
            match what {
                "pong" => w.contact(now, Contact::Pong),
                "welcome" => w.contact(now, Contact::Welcome),
                "write" => w.storage_ok(now),
                "tick" => {}
                other => panic!("unknown event {other}"),
            }
        }
        fired
    }

    #[test]
    fn fence_needs_both_silences() {
        // Storage keeps working: never fenced, whatever the management servers do.
        assert_eq!(fences(&[(900, "write"), (1800, "write"), (2700, "write"), (3600, "tick")]), Vec::<u64>::new());
        // Management server keeps answering: never fenced.
        assert_eq!(fences(&[(900, "pong"), (1800, "pong"), (2700, "pong"), (3600, "tick")]), Vec::<u64>::new());
        // Both silent: fenced at the first check at or after the period, once.
        assert_eq!(fences(&[(999, "tick"), (1000, "tick"), (1500, "tick"), (2500, "tick")]), [1000]);
        // The later of the two clocks counts.
        assert_eq!(fences(&[(600, "write"), (1200, "tick"), (1599, "tick"), (1600, "tick")]), [1600]);
        assert_eq!(fences(&[(300, "pong"), (700, "write"), (1300, "tick"), (1700, "tick")]), [1700]);
    }

    #[test]
    fn late_contact_fences_first_then_resets() {
        // A Welcome arriving after the deadline: the fence fires at that moment, before it counts.
        assert_eq!(fences(&[(1400, "welcome"), (2000, "tick"), (2399, "tick"), (2400, "tick")]), [1400, 2400]);
        // A write arriving after the deadline likewise.
        assert_eq!(fences(&[(1100, "write"), (1200, "tick")]), [1100]);
        // After a fence, nothing more until a clock is reset and runs out again.
        assert_eq!(fences(&[(1000, "tick"), (5000, "tick"), (9000, "tick")]), [1000]);
    }

    #[test]
    fn deadline_and_disabled() {
        let t0 = Instant::now();
        let mut w = Watch::new(t0, Some(P));
        assert_eq!(w.deadline(), Some(t0 + P));
        w.storage_ok(t0 + ms(400));
        w.contact(t0 + ms(200), Contact::Pong);
        assert_eq!(w.deadline(), Some(t0 + ms(1400)));
        // Clocks never go back.
        w.storage_ok(t0 + ms(100));
        assert_eq!(w.deadline(), Some(t0 + ms(1400)));
        assert_eq!(w.silence(t0 + ms(1000)), (ms(800), ms(600)));
        w.fenced();
        assert_eq!(w.deadline(), None);
        let off = Watch::new(t0, None);
        assert_eq!(off.deadline(), None);
        assert!(!off.due(t0 + ms(1_000_000)));
    }

    #[test]
    fn fenced_flag_lifecycle() {
        let t0 = Instant::now();
        let mut w = Watch::new(t0, Some(P));
        assert!(!w.report_fenced());
        w.fenced();
        assert!(w.report_fenced());
        // Pongs of the old connection do not deliver it.
        w.contact(t0, Contact::Pong);
        assert!(w.report_fenced());
        // First connection after the fence: reported on it, even after Pongs.
        w.contact(t0, Contact::Welcome);
        assert!(w.report_fenced());
        // Its connection broke before any Pong: the next connection reports it again.
        w.contact(t0, Contact::Welcome);
        assert!(w.report_fenced());
        w.contact(t0, Contact::Pong);
        assert!(w.report_fenced());
        // A later connection's Welcome clears it.
        w.contact(t0, Contact::Welcome);
        assert!(!w.report_fenced());
        w.contact(t0, Contact::Welcome);
        assert!(!w.report_fenced());
    }
}
