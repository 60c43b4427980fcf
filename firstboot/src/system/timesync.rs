//! Waiting, for a bounded time, until the node's clock is synchronised before MicroK8s work.
//!
//! Raspberry Pis have no battery-backed clock: at first boot the wall clock can be years
//! behind, and it jumps when NTP first answers. MicroK8s' install creates the node's CA and
//! certificates with the clock's "now" as their start date, and a join signs this node's
//! certificates on the seed; TLS between nodes whose clocks are years apart can refuse
//! certificates that are "not yet valid". So the agent does not start the MicroK8s install or a
//! `microk8s join` until the clock is synchronised, as a unit ordered after `time-sync.target`
//! would; but only for a bounded time, so a cluster on a LAN without any NTP server still forms.
//!
//! How "synchronised" is known (checked in systemd's `systemd-timesyncd.service(8)` manual,
//! systemd 239 and later, the FILES section): systemd-timesyncd, Ubuntu's default NTP client,
//! touches `/run/systemd/timesync/synchronized` on each successful synchronisation; the same
//! file is what `systemd-time-wait-sync.service` waits for before `time-sync.target` is reached.
//! The daemon is `/usr/lib/systemd/systemd-timesyncd` (the manual's SYNOPSIS; `/lib` on
//! non-merged-/usr systems). So:
//! - the flag file exists under `--root`: synchronised, go ahead;
//! - no systemd-timesyncd binary under `--root`: nothing on this node will ever synchronise
//!   the clock (or another NTP client that does not write the flag does); waiting would only
//!   delay formation, so go ahead at once and say so in the log;
//! - otherwise wait, polling every second, with the status line "waiting for time
//!   synchronisation", until the flag appears or [`DEFAULT_WAIT`] (or `--time-sync-wait`) has
//!   passed **since the agent started**: a later wait (the join after the install) never adds
//!   to it, so the bound delays formation once, not once per step.
//!
//! Why 120 s: timesyncd asks its first server as soon as the network is up and retries every
//! 30 s (`ConnectionRetrySec=` in `timesyncd.conf(5)`, default 30 s), so a node that can reach
//! NTP is synchronised after at most a few attempts (DHCP, DNS and three tries fit in 2
//! minutes); an offline cluster pays those 2 minutes once, beside a MicroK8s install that takes
//! several minutes on a Pi.
//!
//! Nothing here is a safety rule: the formation core never reads the wall clock (its `now` is
//! the agent's monotonic time since start), and this wait only delays work. A node whose clock
//! jumps after synchronising (backward or forward) goes on as before; the agent's timers use
//! the monotonic clock, which a wall-clock step does not move.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest wait for synchronisation, counted from the agent's start (see the module docs).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);
/// systemd-timesyncd's flag, relative to the root.
pub const SYNCHRONIZED_FLAG: &str = "run/systemd/timesync/synchronized";
/// Where systemd-timesyncd's daemon lives, relative to the root.
pub const TIMESYNCD_BINARIES: [&str; 2] = [
    "usr/lib/systemd/systemd-timesyncd",
    "lib/systemd/systemd-timesyncd",
];
/// How often the flag is looked for while waiting.
const POLL: Duration = Duration::from_secs(1);

/// What the node's clock looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockState {
    /// systemd-timesyncd synchronised the clock at least once since boot.
    Synchronized,
    /// No systemd-timesyncd on this node: nothing to wait for.
    NoTimeService,
    /// systemd-timesyncd is there but has not synchronised yet.
    NotYet,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Synchronized {
        waited: Duration,
    },
    NoTimeService,
    /// The bound passed without synchronisation: the work goes ahead anyway.
    GaveUp {
        waited: Duration,
    },
}

/// The bounded wait for time synchronisation (see the module docs).
#[derive(Debug, Clone)]
pub struct TimeSyncWait {
    root: PathBuf,
    bound: Duration,
    started: Instant,
}

impl TimeSyncWait {
    /// A wait for the node under `root`, at most `bound` after now (the agent's start).
    pub fn new(root: &Path, bound: Duration) -> TimeSyncWait {
        TimeSyncWait {
            root: root.to_path_buf(),
            bound,
            started: Instant::now(),
        }
    }

    pub fn bound(&self) -> Duration {
        self.bound
    }

    pub fn state(&self) -> ClockState {
        if self.root.join(SYNCHRONIZED_FLAG).exists() {
            ClockState::Synchronized
        } else if TIMESYNCD_BINARIES
            .iter()
            .any(|b| self.root.join(b).exists())
        {
            ClockState::NotYet
        } else {
            ClockState::NoTimeService
        }
    }

    /// What is left of the bound now.
    pub fn remaining(&self) -> Duration {
        self.bound.saturating_sub(self.started.elapsed())
    }

    /// Waits until the clock is synchronised, there is nothing to wait for, or the bound has
    /// passed. `waiting` is called once, with a status line, if the wait has to wait at all.
    pub async fn wait(&self, before: &str, mut waiting: impl FnMut(String)) -> Outcome {
        let t0 = Instant::now();
        let mut told = false;
        loop {
            match self.state() {
                ClockState::Synchronized => {
                    return Outcome::Synchronized {
                        waited: t0.elapsed(),
                    }
                }
                ClockState::NoTimeService => return Outcome::NoTimeService,
                ClockState::NotYet => {}
            }
            let left = self.remaining();
            if left.is_zero() {
                return Outcome::GaveUp {
                    waited: t0.elapsed(),
                };
            }
            if !told {
                told = true;
                waiting(format!(
                    "waiting for time synchronisation before {before} (systemd-timesyncd has not \
                     synchronised the clock yet; going ahead in at most {} s)",
                    left.as_secs().max(1)
                ));
            }
            tokio::time::sleep(POLL.min(left)).await;
        }
    }
}

/// The log and status line for a wait's outcome, if it is worth one.
pub fn describe(outcome: Outcome, before: &str) -> Option<String> {
    match outcome {
        Outcome::Synchronized { waited } if waited >= POLL => Some(format!(
            "clock synchronised after {:.0} s; {before}",
            waited.as_secs_f64()
        )),
        Outcome::Synchronized { .. } | Outcome::NoTimeService => None,
        Outcome::GaveUp { waited } => Some(format!(
            "clock still not synchronised (no NTP server reachable?) after waiting {:.0} s: \
             {before} anyway; certificates made now carry this clock's date",
            waited.as_secs_f64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with_timesyncd() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join(TIMESYNCD_BINARIES[0]);
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"").unwrap();
        d
    }

    fn sync(root: &Path) {
        let flag = root.join(SYNCHRONIZED_FLAG);
        std::fs::create_dir_all(flag.parent().unwrap()).unwrap();
        std::fs::write(flag, b"").unwrap();
    }

    #[test]
    fn states_follow_the_flag_and_the_daemon() {
        let bare = tempfile::tempdir().unwrap();
        let w = TimeSyncWait::new(bare.path(), DEFAULT_WAIT);
        assert_eq!(w.state(), ClockState::NoTimeService);
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), DEFAULT_WAIT);
        assert_eq!(w.state(), ClockState::NotYet);
        sync(d.path());
        assert_eq!(w.state(), ClockState::Synchronized);
        // The flag alone (another client touching it) also counts.
        sync(bare.path());
        assert_eq!(
            TimeSyncWait::new(bare.path(), DEFAULT_WAIT).state(),
            ClockState::Synchronized
        );
    }

    #[tokio::test]
    async fn no_time_service_means_no_wait() {
        let bare = tempfile::tempdir().unwrap();
        let w = TimeSyncWait::new(bare.path(), Duration::from_secs(60));
        let mut lines = Vec::new();
        let t = Instant::now();
        assert_eq!(
            w.wait("installing", |l| lines.push(l)).await,
            Outcome::NoTimeService
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn waits_until_synchronised_with_a_status_line() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::from_secs(30));
        let root = d.path().to_path_buf();
        let syncer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sync(&root);
        });
        let mut lines = Vec::new();
        let out = w.wait("installing MicroK8s", |l| lines.push(l)).await;
        syncer.await.unwrap();
        let Outcome::Synchronized { waited } = out else {
            panic!("expected synchronised, got {out:?}");
        };
        assert!(waited >= Duration::from_millis(1400), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("waiting for time synchronisation before installing MicroK8s"));
        assert!(describe(out, "installing")
            .unwrap()
            .contains("synchronised after"));
    }

    #[tokio::test]
    async fn the_bound_counts_from_the_start_and_is_paid_once() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::from_millis(1200));
        let t = Instant::now();
        let out = w.wait("installing", |_| {}).await;
        assert!(matches!(out, Outcome::GaveUp { .. }), "{out:?}");
        assert!(t.elapsed() >= Duration::from_millis(1100));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(describe(out, "installing").unwrap().contains("anyway"));
        // A second step (the join) does not wait again.
        let t = Instant::now();
        let mut lines = Vec::new();
        let again = w.wait("joining", |l| lines.push(l)).await;
        assert!(matches!(again, Outcome::GaveUp { .. }));
        assert!(t.elapsed() < Duration::from_millis(200));
        assert!(
            lines.is_empty(),
            "no 'waiting' line once the bound has passed"
        );
    }

    #[tokio::test]
    async fn a_zero_bound_never_waits() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::ZERO);
        let t = Instant::now();
        assert!(matches!(
            w.wait("installing", |_| {}).await,
            Outcome::GaveUp { .. }
        ));
        assert!(t.elapsed() < Duration::from_millis(200));
    }
}
