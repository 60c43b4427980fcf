//! How often a formed agent reads MicroK8s' status: fast while anything changes, seldom once
//! nothing does.
//!
//! The loop's poll timer fires every 5 s (`MICROK8S_POLL` in [`super`]); each poll runs
//! `microk8s status` (a child process: on a real node a Python script that asks the API
//! server, far costlier than anything the agent does in-process), re-learns the join point and
//! keeps the floating API address. Once this node is a member and MicroK8s runs, the answer
//! rarely changes, so [`PollCadence`] lets a poll tick through only when it is due:
//!
//! - every tick while the node is not a member, MicroK8s does not run (or its status cannot be
//!   read), or anything the poll looks at changed since the previous tick ([`PollKey`]: the
//!   phase, the role, MicroK8s' view, the number of verified peers);
//! - after that, while nothing changes, the gap between polls doubles, 1, 2, 4 ticks, up to
//!   [`MAX_GAP_TICKS`] (30 s with 5-second ticks). Any change goes back to every tick at the
//!   next tick.
//!
//! So a MicroK8s that stops, loses quorum or gains a voter shows in the status document within
//! 30 s of a quiet period (at once when the change is one the agent sees itself: a phase or
//! role change, a peer appearing), and within a tick while things move.
//!
//! [`Heartbeat`]: how often the signed announcement is re-published. Peers count a node gone
//! once nothing came from it for `peer_timeout` (the formation core's rule), and only a record
//! with a new sequence number refreshes it (an identical copy is an mDNS refresh, not news).
//! Each re-publication costs every peer a multicast packet twice (mdns-sd repeats an
//! announcement once, a second later, RFC 6762 8.3), parsed by its mdns-sd thread, verified
//! and fed to its formation core: with 50 nodes and the simulator's 20-second peer timeout,
//! 20 packets a second at every node. So:
//!
//! - a node that is not a member yet re-announces every `peer_timeout / 4` (as before): four
//!   chances per timeout while formation needs every peer;
//! - a member re-announces every `peer_timeout / 3`: a peer still hears it three times per
//!   timeout (each sent twice), so it is counted gone only after two whole announcements are
//!   lost; a member that goes missing for a moment is only "missing" (it is removed after
//!   `replace-after`, 15 minutes by default, and the authority is taken over after
//!   `takeover_after`, both far longer than a timeout);
//! - any announcement (an urgent one after a routing change too) counts as a heartbeat: the
//!   next one is due a period after it, not at a fixed rate beside it.
//!
//! The timer ticks every `peer_timeout / 12` (at least 1 s) and [`Heartbeat::due`] says when
//! a period has passed (within half a tick). A restarted peer is found as before: it
//! announces itself when it starts, and its peers browse continuously.
//!
//! [`Heartbeat::direct`]: what a due heartbeat is. A node whose announcement has not changed
//! since it last went out over mDNS sends a direct heartbeat (one signed UDP datagram to each
//! peer, `rackseed_protocol::discovery::heartbeat`, whose module docs say why: every mDNS
//! packet costs each peer's mdns-sd several wakeups that scan its whole cache) and
//! re-publishes its mDNS record only every [`MDNS_REFRESH`] (60 s, before mdns-sd's queriers
//! would ask again for its 120-second records). That holds for a node still forming (waiting
//! for its slot, say) as for a member: a waiting node's announcement rarely changes while it
//! waits, and during formation the mDNS heartbeats of the waiting nodes were most of every
//! agent's CPU (below). Everything else goes over mDNS as before: any changed announcement
//! (a phase change at once, progress at the next heartbeat), the first heartbeat after a
//! start, and any heartbeat the direct path cannot send (a peer without IPv4, the UDP port
//! not bound). Liveness is unchanged for the formation core: a heartbeat of either kind
//! arrives as a refresh of the peer's latest verified record, so `peer_timeout`,
//! `takeover_after` and `replace-after` keep their meaning; newcomers find every node over
//! mDNS as before (its record stays published and fresh, and a newcomer's browse query is
//! answered from it).
//!
//! Measured (`agent_scale`, N = 50, 60 s idle, December 2026): mDNS datagrams received per
//! node fell from 20 to 14 a second, but mdns-sd's thread still used ~0.35 s CPU a minute,
//! most of a formed agent's own 0.45-0.52 s: its loop scans its whole cache after every
//! wakeup (`refresh_active_services`, `DnsRecord::refresh_maybe` in perf), and it wakes ~40
//! times a second (the packets, the 1-second expiry of each flushed TXT record, refresh
//! timers), so fewer packets alone hardly change it. The MicroK8s poll's cadence cut the
//! children's CPU (`microk8s status`) from 0.049 to 0.016-0.019 s a minute.
//!
//! With direct heartbeats (same test, N = 50, 60 s idle, three runs at load 5-17 on 2
//! cores): the busiest agent's CPU fell from 0.44 / 0.49 / 0.52 s a minute (min / median /
//! max, the previous session) to 0.20 / 0.20 / 0.22; mdns-sd's thread from ~0.45 to
//! 0.035-0.038 s a minute on average, its wakeups from ~32 to 0.2 a second (`perf stat -e
//! syscalls:sys_enter_epoll_wait` on the 50 threads for 20 s, one run each, which with
//! perf attached gave 0.62-0.69 s a minute before and 0.23 after); the formation time was
//! unchanged (19.0 / 19.1 / 23.3 s, against 18.8 / 19.1 / 22.8 s before, same hour).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rackseed_protocol::discovery::MDNS_REFRESH;
use rackseed_protocol::status::Microk8sView;

/// Most ticks between two polls once nothing changes (6 × 5 s = 30 s).
pub(super) const MAX_GAP_TICKS: u32 = 6;

/// What a poll depends on or reports; any difference from the previous tick means "poll now".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PollKey {
    /// This node's phase name (`member`, `waiting`, ...).
    pub phase: String,
    pub role: Option<String>,
    /// MicroK8s' view from the last poll that answered (`None`: not read yet, or unreadable).
    pub microk8s: Option<Microk8sView>,
    /// Verified peers (their addresses feed the join point and the API address).
    pub peers: usize,
}

impl PollKey {
    /// Stable enough to poll less often: a member whose MicroK8s runs.
    fn settled(&self) -> bool {
        self.phase == "member" && self.microk8s.as_ref().is_some_and(|v| v.running)
    }
}

/// The poll's cadence (see the module docs). Interior mutability, so the poll method keeps
/// taking `&self`.
#[derive(Debug, Default)]
pub(super) struct PollCadence(Mutex<Gaps>);

#[derive(Debug, Default)]
struct Gaps {
    last: Option<PollKey>,
    /// Ticks to let pass before the next poll.
    skip: u32,
    /// The gap after the next poll, in ticks (1 = every tick).
    next_gap: u32,
}

impl PollCadence {
    /// Called at every poll tick with what the poll would see now: true when it should run.
    pub(super) fn due(&self, key: PollKey) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let changed = g.last.as_ref() != Some(&key);
        let settled = key.settled();
        g.last = Some(key);
        if changed || !settled {
            g.skip = 0;
            g.next_gap = 1;
            return true;
        }
        if g.skip > 0 {
            g.skip -= 1;
            return false;
        }
        let gap = g.next_gap.max(1);
        g.skip = gap - 1;
        g.next_gap = (gap * 2).min(MAX_GAP_TICKS);
        true
    }
}

/// When the announcement is re-published (see the module docs).
#[derive(Debug)]
pub(super) struct Heartbeat {
    peer_timeout: Duration,
    /// When the last heartbeat (of either kind) went out.
    last: Option<Instant>,
    /// When the announcement last went out over mDNS.
    last_mdns: Option<Instant>,
}

impl Heartbeat {
    pub(super) fn new(peer_timeout: Duration) -> Heartbeat {
        Heartbeat {
            peer_timeout,
            last: None,
            last_mdns: None,
        }
    }

    /// The heartbeat timer's period: a twelfth of the peer timeout, at least a second.
    pub(super) fn tick(&self) -> Duration {
        (self.peer_timeout / 12).max(Duration::from_secs(1))
    }

    /// The gap between two announcements: a third of the peer timeout for a member, a
    /// quarter before.
    pub(super) fn period(&self, member: bool) -> Duration {
        self.peer_timeout / if member { 3 } else { 4 }
    }

    /// Whether a heartbeat is due at timer tick `now` (a period after the last announcement,
    /// within half a tick).
    pub(super) fn due(&self, now: Instant, member: bool) -> bool {
        self.last
            .is_none_or(|last| now + self.tick() / 2 >= last + self.period(member))
    }

    /// An announcement went out over mDNS at `now`.
    pub(super) fn announced(&mut self, now: Instant) {
        self.last = Some(now);
        self.last_mdns = Some(now);
    }

    /// Whether the heartbeat due at `now` may be a direct one: the announcement is
    /// `unchanged` since it last went out over mDNS, less than [`MDNS_REFRESH`] ago (within
    /// half a tick). Members and nodes still forming alike (see the module docs).
    pub(super) fn direct(&self, now: Instant, unchanged: bool) -> bool {
        unchanged
            && self
                .last_mdns
                .is_some_and(|at| now + self.tick() / 2 < at + MDNS_REFRESH)
    }

    /// A direct heartbeat went out at `now`.
    pub(super) fn beat(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(phase: &str, running: bool, voters: usize) -> PollKey {
        PollKey {
            phase: phase.into(),
            role: Some("worker".into()),
            microk8s: Some(Microk8sView {
                running,
                voters: (0..voters).map(|i| format!("10.0.0.{i}:19001")).collect(),
                ..Microk8sView::default()
            }),
            peers: 49,
        }
    }

    /// The ticks (of `n`) at which the poll runs, the key at each tick given by `at`.
    fn runs(n: usize, at: impl Fn(usize) -> PollKey) -> Vec<usize> {
        let c = PollCadence::default();
        (0..n).filter(|&t| c.due(at(t))).collect()
    }

    #[test]
    fn a_settled_member_backs_off_to_every_sixth_tick() {
        let ticks = runs(40, |_| key("member", true, 3));
        assert_eq!(ticks, vec![0, 1, 2, 4, 8, 14, 20, 26, 32, 38]);
        // Between polls never more than MAX_GAP_TICKS ticks.
        assert!(ticks
            .windows(2)
            .all(|w| w[1] - w[0] <= MAX_GAP_TICKS as usize));
    }

    #[test]
    fn every_tick_until_settled() {
        assert_eq!(runs(5, |_| key("waiting", true, 3)), vec![0, 1, 2, 3, 4]);
        assert_eq!(runs(5, |_| key("member", false, 1)), vec![0, 1, 2, 3, 4]);
        let c = PollCadence::default();
        let unread = PollKey {
            microk8s: None,
            ..key("member", true, 3)
        };
        assert!((0..5).all(|_| c.due(unread.clone())));
    }

    #[test]
    fn a_change_goes_back_to_every_tick_then_backs_off_again() {
        // Quiet until tick 20, when a voter goes away (MicroK8s' view changes).
        let ticks = runs(30, |t| key("member", true, if t < 20 { 3 } else { 2 }));
        assert_eq!(ticks, vec![0, 1, 2, 4, 8, 14, 20, 21, 22, 24, 28]);
        // A new peer (the peer count) counts as a change too.
        let c = PollCadence::default();
        for _ in 0..10 {
            c.due(key("member", true, 3));
        }
        let more = PollKey {
            peers: 50,
            ..key("member", true, 3)
        };
        assert!(c.due(more.clone()));
        assert!(c.due(more.clone()), "then the next tick");
        assert!(c.due(more.clone()), "and the one after");
        assert!(!c.due(more), "then backing off");
    }

    /// The announcement times over `secs` seconds of timer ticks, from a first one at 0.
    fn beats(
        h: &mut Heartbeat,
        t0: Instant,
        secs: u64,
        member: impl Fn(Duration) -> bool,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        let tick = h.tick();
        let mut at = Duration::ZERO;
        while at <= Duration::from_secs(secs) {
            if h.due(t0 + at, member(at)) {
                h.announced(t0 + at);
                out.push(at.as_secs_f64());
            }
            at += tick;
        }
        out
    }

    #[test]
    fn a_member_re_announces_every_third_of_the_peer_timeout_others_every_quarter() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(Duration::from_secs(20));
        assert_eq!(h.tick(), Duration::from_nanos(1_666_666_666));
        let gaps = |v: &[f64]| -> Vec<f64> {
            v.windows(2)
                .map(|w| ((w[1] - w[0]) * 100.0).round() / 100.0)
                .collect()
        };
        let before = beats(&mut h, t0, 30, |_| false);
        assert!(gaps(&before).iter().all(|g| *g == 5.0), "{before:?}");
        let mut h = Heartbeat::new(Duration::from_secs(20));
        let member = beats(&mut h, t0, 40, |_| true);
        assert!(gaps(&member).iter().all(|g| *g == 6.67), "{member:?}");
        // Every peer hears a member at least twice within any peer timeout.
        assert!(gaps(&member).iter().all(|g| *g * 2.0 < 20.0));
        // The agent's default 90 s: 30 s for a member, 22.5 s before.
        let h = Heartbeat::new(Duration::from_secs(90));
        assert_eq!(h.period(true), Duration::from_secs(30));
        assert_eq!(h.period(false), Duration::from_millis(22_500));
    }

    /// The kinds of a member's heartbeats over `secs` seconds (`true`: direct), its
    /// announcement changing at the ticks `changes` says.
    fn kinds(
        h: &mut Heartbeat,
        t0: Instant,
        secs: u64,
        changed: impl Fn(f64) -> bool,
    ) -> Vec<(f64, bool)> {
        let mut out = Vec::new();
        let mut at = Duration::ZERO;
        while at <= Duration::from_secs(secs) {
            let now = t0 + at;
            if h.due(now, true) {
                let direct = h.direct(now, !changed(at.as_secs_f64()));
                if direct {
                    h.beat(now);
                } else {
                    h.announced(now);
                }
                out.push(((at.as_secs_f64() * 100.0).round() / 100.0, direct));
            }
            at += h.tick();
        }
        out
    }

    #[test]
    fn a_settled_member_beats_directly_and_refreshes_its_mdns_record_every_minute() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(Duration::from_secs(20));
        let v = kinds(&mut h, t0, 130, |_| false);
        // Every 6.67 s as before; over mDNS at 0 s, then once a minute.
        assert!(
            v.windows(2)
                .all(|w| ((w[1].0 - w[0].0) - 6.67).abs() < 0.02),
            "{v:?}"
        );
        let mdns: Vec<f64> = v.iter().filter(|(_, d)| !d).map(|(t, _)| *t).collect();
        assert_eq!(mdns.len(), 3, "{mdns:?}");
        assert!(mdns.windows(2).all(|w| w[1] - w[0] <= 60.0), "{mdns:?}");
        assert!(mdns.windows(2).all(|w| w[1] - w[0] > 50.0), "{mdns:?}");
        // A changed announcement goes over mDNS at the next heartbeat.
        let mut h = Heartbeat::new(Duration::from_secs(20));
        let v = kinds(&mut h, t0, 40, |t| (19.0..22.0).contains(&t));
        assert_eq!(
            v.iter().find(|(t, _)| *t > 19.0),
            Some(&(20.0, false)),
            "{v:?}"
        );
        // Nothing over mDNS yet, a changed announcement, or the last mDNS record a minute
        // old: never direct.
        let h = Heartbeat::new(Duration::from_secs(20));
        assert!(!h.direct(t0, true), "nothing announced yet");
        let mut h = Heartbeat::new(Duration::from_secs(20));
        h.announced(t0);
        assert!(h.direct(t0 + Duration::from_secs(7), true));
        assert!(!h.direct(t0 + Duration::from_secs(7), false));
        assert!(!h.direct(t0 + MDNS_REFRESH, true));
        // The default 90 s timeout: a member beats every 30 s, every other one over mDNS.
        let mut h = Heartbeat::new(Duration::from_secs(90));
        let v = kinds(&mut h, t0, 240, |_| false);
        let kinds_only: Vec<bool> = v.iter().map(|(_, d)| *d).collect();
        assert_eq!(
            kinds_only,
            vec![false, true, false, true, false, true, false, true, false]
        );
    }

    #[test]
    fn an_urgent_announcement_counts_as_a_heartbeat_and_short_timeouts_beat_every_second() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(Duration::from_secs(20));
        assert!(h.due(t0, true), "the first one is due at once");
        h.announced(t0);
        // An urgent announcement at 4 s: the next heartbeat is a period after it.
        h.announced(t0 + Duration::from_secs(4));
        assert!(!h.due(t0 + Duration::from_secs(7), true));
        assert!(h.due(t0 + Duration::from_millis(10_700), true));
        // A 2-second peer timeout (failure tests): a beat every tick of a second, as before.
        let mut h = Heartbeat::new(Duration::from_secs(2));
        assert_eq!(h.tick(), Duration::from_secs(1));
        let v = beats(&mut h, t0, 5, |_| true);
        assert_eq!(v, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
