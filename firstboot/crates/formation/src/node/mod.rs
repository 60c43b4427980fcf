//! [`Node`]: one node's formation state machine. Every node is an acceptor, may propose
//! rounds, joins as a joiner and, as a control-plane member, may serve as slot authority.
//!
//! `handle(now, event)` updates the state and returns the actions to execute. The protocol
//! and its safety argument are in the documentation of [`crate`]. This file holds the node's
//! state, the event and message dispatch, the periodic decision step (`drive`) and the views
//! every role shares (`known`, `chosen`, `hint`, `set_phase`); each role is a separate
//! `impl Node` block in a file of its own:
//!
//! - `record.rs`: [`Op`] and [`apply`], the pure record operations (no node state);
//! - `acceptor.rs`: answering `Prepare` and `Accept`;
//! - `proposer.rs`: running a round, and aligning the phase with the record it chose;
//! - `election.rs`: seed election and re-election;
//! - `joiner.rs`: preparing, asking for the slot, joining, confirming;
//! - `member.rs`: what a recorded member does (addons, Refresh, takeover);
//! - `authority.rs`: the slot authority's requests, reports and rounds;
//! - `catch_up.rs`: the authority brings members of the electorate that missed a record up to
//!   date;
//! - `healing.rs`: the authority's removals of dead members and electorate handovers;
//! - `convert.rs`: a worker converted to a control-plane member (authority and worker side);
//! - `removed.rs`: a node the record removed while it was away comes back, leaves and joins
//!   again (authority and node side);
//! - `status.rs`: the announcement, the status line and [`Status`].
//!
//! To add a record-changing operation: add an [`Op`] variant and its pure transition in
//! [`apply`] (`record.rs`), its trigger in the role that proposes it, and its follow-up in
//! `Node::follow_up` (`proposer.rs`). To add a message: a variant in [`crate::events`], an arm
//! in `Node::on_message` calling a handler in the file of the role that receives it.

mod acceptor;
mod authority;
mod catch_up;
mod convert;
mod election;
mod healing;
mod joiner;
mod member;
mod proposer;
mod record;
mod removed;
mod status;

pub use record::{apply, Op};
pub use status::Status;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use crate::announce::Announcement;
use crate::events::{Action, Event, JoinPoint, Message};
use crate::types::{
    Accepted, Ballot, ClusterId, FormationParams, NodeId, PersistedState, Phase, PhaseSummary,
    Record,
};
use catch_up::CatchUp;
use proposer::{Prepared, Round};
use rackseed_config::Role;

/// Drops every [`Action::Persist`] directly followed by another one: each holds the whole
/// state, the later one includes every change of the earlier, and no action ran in between, so
/// writing only the later one is equivalent (and saves an fsync).
fn coalesce_persists(out: &mut Vec<Action>) {
    let mut i = 0;
    while i + 1 < out.len() {
        if matches!(out[i], Action::Persist(_)) && matches!(out[i + 1], Action::Persist(_)) {
            out.remove(i);
        } else {
            i += 1;
        }
    }
}

/// Whether node `me` may go from phase `from` to a different phase `to`: the state machine in
/// the crate documentation, each step keeping the cluster it must keep. Checked by
/// `Node::set_phase` in debug builds (so the property tests fail loudly when a change breaks
/// it); a new phase change needs its line here.
fn phase_change_allowed(from: &Phase, to: &Phase, me: &NodeId) -> bool {
    use Phase::*;
    match (from, to) {
        (Preparing, Discovering) => true,
        // A cluster became known, or a Refresh found none.
        (Discovering, WaitingForSlot { .. }) | (WaitingForSlot { .. }, Discovering) => true,
        // Only my own election makes me a member without a join: I am its seed.
        (Discovering, Member { cluster, .. }) => cluster.seed == *me,
        // The newest cluster changed; a fresh grant; recorded as a member (the authority's
        // confirmation, or a record of my own re-election).
        (WaitingForSlot { .. }, WaitingForSlot { .. } | Joining { .. } | Member { .. }) => true,
        // The join ended: it reports the slot it was granted, or asks again in its cluster.
        (
            Joining {
                cluster, seq, role, ..
            },
            Confirming {
                cluster: c,
                seq: s,
                role: r,
            },
        ) => cluster == c && seq == s && role == r,
        (Joining { cluster, .. }, WaitingForSlot { cluster: c }) => cluster == c,
        // A node joins one cluster only: the one it was granted a slot in.
        (Joining { cluster, .. } | Confirming { cluster, .. }, Member { cluster: c, .. }) => {
            cluster == c
        }
        // A worker being converted left its cluster (`microk8s leave`) to join it again as
        // a control-plane member; a member or a confirming joiner the record removed while
        // it was away left it to join again (`removed.rs`).
        (
            Member {
                cluster,
                role: Role::Worker,
            }
            | Confirming { cluster, .. },
            WaitingForSlot { cluster: c },
        ) => cluster == c,
        (
            Member {
                cluster,
                role: Role::ControlPlane,
            },
            WaitingForSlot { cluster: c },
        ) if cluster == c => true,
        // Only a deposed seed leaves its cluster: a re-election replaces only a cluster in
        // which nothing happened, whose only member is its seed.
        (
            Member {
                cluster,
                role: Role::ControlPlane,
            },
            WaitingForSlot { cluster: c },
        ) => cluster.seed == *me && cluster != c,
        _ => false,
    }
}

/// Election order: higher priority first, then lower id.
fn rank(priority: u32, id: &NodeId) -> (Reverse<u32>, NodeId) {
    (Reverse(priority), id.clone())
}

/// Where the newest cluster information points (borrowed from the known record or a peer).
#[derive(Debug, Clone, Copy)]
struct Hint<'a> {
    cluster: &'a ClusterId,
    authority: &'a NodeId,
    ballot: Option<&'a Ballot>,
    members: u32,
}

#[derive(Debug, Clone)]
struct Peer {
    ann: Announcement,
    ip: IpAddr,
    seen: Duration,
    /// Since when the peer announces that it is (or is not, [`not_member`]) a member (a late
    /// copy of an older announcement restarts it, and the next fresh one restarts it again).
    phase_since: Duration,
}

/// Whether an announced phase says its node is no member of anything (yet).
fn not_member(phase: PhaseSummary) -> bool {
    matches!(
        phase,
        PhaseSummary::Preparing | PhaseSummary::Discovering | PhaseSummary::Waiting
    )
}

/// One node's formation state machine. See [`crate`].
#[derive(Debug, Clone)]
pub struct Node {
    params: FormationParams,
    me: NodeId,
    boot: Duration,
    st: PersistedState,
    peers: BTreeMap<NodeId, Peer>,
    round: Option<Round>,
    prepared: Option<Prepared>,
    backoff_until: Duration,
    // joiner
    reqs: BTreeMap<u64, Duration>,
    next_req: u64,
    last_request: Option<Duration>,
    /// How many slot requests went to `last_request_to` in a row (their interval doubles).
    request_backoff: u32,
    last_request_to: Option<NodeId>,
    authority_override: Option<NodeId>,
    // authority
    requests: BTreeMap<NodeId, (u64, Duration)>,
    reports: BTreeMap<NodeId, (u64, Role, bool)>,
    /// Slot sequence number -> when I first saw it granted (for the reclaim timer).
    slot_watch: BTreeMap<u64, Duration>,
    /// Where joiners join this node; no grant goes out before it is known.
    join_point: Option<JoinPoint>,
    // failure detection: id -> since when it has been missing
    missing_since: BTreeMap<NodeId, Duration>,
    /// The last address each peer was seen at (this process's view).
    last_ip: BTreeMap<NodeId, IpAddr>,
    // removals (authority): `remove-node` in flight, finished (to be recorded), retry times
    removing: BTreeSet<NodeId>,
    removals_done: BTreeSet<NodeId>,
    removal_retry_at: BTreeMap<NodeId, Duration>,
    // conversion: when the authority last asked the converted worker to leave (whether this
    // node's `microk8s leave` is running is `st.leaving`)
    convert_sent: Option<Duration>,
    /// Authority: when each node acting as a member although removed was last told so.
    removed_told: BTreeMap<NodeId, Duration>,
    /// Told that the record removed me: learn the record by a round of my own.
    check_removal: bool,
    next_refresh: Duration,
    /// When `st.chosen` last changed (or this process started): announcements lag a round.
    chosen_since: Duration,
    /// Authority: bringing members of the electorate that missed a record up to date.
    catch_up: CatchUp,
    prepare_at: Option<Duration>,
    addons_issued: bool,
    last_error: Option<String>,
    ignored: u64,
    last_announced: Option<Announcement>,
    last_status: String,
    /// State changed while handling a Paxos message: run the decision step.
    dirty: bool,
}

impl Node {
    /// Starts (or resumes from `persisted`) at local time `now`. Returns the actions to run.
    pub fn new(
        params: FormationParams,
        me: NodeId,
        persisted: Option<PersistedState>,
        now: Duration,
    ) -> (Node, Vec<Action>) {
        let mut out = Vec::new();
        let mut st = persisted.unwrap_or_else(PersistedState::fresh);
        st.boots += 1;
        // A join cannot still be running after a restart: ask for a fresh grant (a new grant
        // keeps the timing bound that makes slot reclaim safe; the driver's join reports
        // success when this node already is a member).
        if let Phase::Joining { cluster, .. } = &st.phase {
            st.phase = Phase::WaitingForSlot {
                cluster: cluster.clone(),
            };
        }
        out.push(Action::Persist(st.clone()));
        let mut node = Node {
            params,
            me,
            boot: now,
            st,
            peers: BTreeMap::new(),
            round: None,
            prepared: None,
            backoff_until: now,
            reqs: BTreeMap::new(),
            next_req: 0,
            last_request: None,
            request_backoff: 0,
            last_request_to: None,
            authority_override: None,
            requests: BTreeMap::new(),
            reports: BTreeMap::new(),
            slot_watch: BTreeMap::new(),
            join_point: None,
            missing_since: BTreeMap::new(),
            last_ip: BTreeMap::new(),
            removing: BTreeSet::new(),
            removals_done: BTreeSet::new(),
            removal_retry_at: BTreeMap::new(),
            convert_sent: None,
            removed_told: BTreeMap::new(),
            check_removal: false,
            next_refresh: now,
            chosen_since: now,
            catch_up: CatchUp::default(),
            prepare_at: None,
            addons_issued: false,
            last_error: None,
            ignored: 0,
            last_announced: None,
            last_status: String::new(),
            dirty: false,
        };
        // A leave started before a crash runs again (it may have completed unseen).
        if let Some(l) = node.st.leaving.clone() {
            if matches!(
                node.st.phase,
                Phase::Member { .. } | Phase::Confirming { .. }
            ) {
                out.push(Action::Leave {
                    cluster: l.cluster,
                    reason: l.reason,
                });
            } else {
                node.st.leaving = None;
                node.persist(&mut out);
            }
        }
        node.drive(now, &mut out);
        coalesce_persists(&mut out);
        (node, out)
    }

    pub fn id(&self) -> &NodeId {
        &self.me
    }

    pub fn phase(&self) -> &Phase {
        &self.st.phase
    }

    pub fn persisted(&self) -> &PersistedState {
        &self.st
    }

    /// Feeds one event; returns the actions to execute in order.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut out = self.handle_event(now, event);
        coalesce_persists(&mut out);
        out
    }

    fn handle_event(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let decide = match event {
            Event::PeerSeen { ann, ip } => self.on_peer_seen(now, ann, ip),
            // A hint only (unsigned goodbye, or a record expired on a busy network): the peer
            // counts as gone once nothing from it arrived for `peer_timeout`.
            Event::PeerLost { .. } => true,
            Event::Tick => true,
            Event::NodePrepared(res) => {
                self.on_prepared(now, res, &mut out);
                true
            }
            Event::JoinFinished(res) => {
                self.on_join_finished(now, res, &mut out);
                true
            }
            Event::AddonsEnabled(res) => {
                self.on_addons(res, &mut out);
                true
            }
            Event::NodeRemoved { node, result } => {
                self.on_node_removed(now, node, result);
                true
            }
            Event::Left(res) => {
                self.on_left(res, &mut out);
                true
            }
            Event::Message { from, msg } => self.on_message_event(now, from, msg, &mut out),
            Event::JoinPointKnown(jp) => {
                let changed = self.join_point.as_ref() != Some(&jp);
                self.join_point = Some(jp);
                changed
            }
        };
        if decide {
            self.dirty = false;
            self.drive(now, &mut out);
        }
        out
    }

    /// A verified announcement. Returns whether the decision step should run (not for a
    /// plain refresh, which changes nothing but liveness; timers run on ticks).
    fn on_peer_seen(&mut self, now: Duration, ann: Announcement, ip: IpAddr) -> bool {
        if let Some(p) = self.peers.get_mut(&ann.id) {
            if p.ann == ann && p.ip == ip {
                p.seen = now;
                return false;
            }
        }
        if ann.id != self.me {
            if let Some(b) = &ann.record_ballot {
                self.st.max_ballot = self.st.max_ballot.max(b.n);
            }
            self.missing_since.remove(&ann.id);
            self.last_ip.insert(ann.id.clone(), ip);
            let phase_since = match self.peers.get(&ann.id) {
                Some(p) if not_member(p.ann.phase) == not_member(ann.phase) => p.phase_since,
                _ => now,
            };
            self.peers.insert(
                ann.id.clone(),
                Peer {
                    ann,
                    ip,
                    seen: now,
                    phase_since,
                },
            );
        }
        true
    }

    /// A message from an authenticated peer. Returns whether the decision step should run
    /// (Paxos traffic only needs it when it changed something).
    fn on_message_event(
        &mut self,
        now: Duration,
        from: NodeId,
        msg: Message,
        out: &mut Vec<Action>,
    ) -> bool {
        // An authenticated message shows the sender is alive even when its mDNS announcements
        // are late (a busy network): no takeover of a working authority.
        if let Some(p) = self.peers.get_mut(&from) {
            p.seen = now;
        }
        let paxos = matches!(
            msg,
            Message::Prepare { .. }
                | Message::Promise { .. }
                | Message::Accept { .. }
                | Message::Accepted { .. }
                | Message::Nack { .. }
        );
        self.on_message(now, from, msg, out);
        !paxos || self.dirty
    }

    /// Dispatches a message to the role that handles it.
    fn on_message(&mut self, now: Duration, from: NodeId, msg: Message, out: &mut Vec<Action>) {
        if from == self.me {
            self.ignored += 1;
            return;
        }
        match msg {
            // acceptor
            Message::Prepare { ballot } => self.on_prepare(from, ballot, out),
            Message::Accept {
                ballot,
                record,
                next,
            } => self.on_accept(from, ballot, record, next, out),
            // proposer
            Message::Promise { ballot, accepted } => {
                self.on_promise(now, from, ballot, accepted, out)
            }
            Message::Accepted { ballot, next } => self.on_accepted(now, from, ballot, next, out),
            // Refused because the acceptor promised my own later ballot (the piggybacked next
            // one): a stale repeat of a message it already answered, not competition.
            Message::Nack { promised, .. } if promised.node == self.me => self.ignored += 1,
            Message::Nack { ballot, promised } => self.on_nack(now, from, ballot, promised),
            // authority
            Message::SlotRequest { req } => self.on_slot_request(now, from, req, out),
            Message::JoinReport {
                cluster,
                seq,
                role,
                ok,
            } => self.on_join_report(from, cluster, seq, role, ok, out),
            // joiner
            Message::SlotGrant {
                req,
                cluster,
                seq,
                role,
                via,
            } => {
                if self.usable_grant(now, req) {
                    self.start_join(from, via, cluster, seq, role, out);
                } else {
                    self.ignored += 1;
                }
            }
            Message::NotAuthority { hint } => self.on_not_authority(hint),
            Message::JoinConfirmed { cluster, role } => self.on_join_confirmed(cluster, role, out),
            // converted worker
            Message::Convert { cluster, reason } => self.on_convert(from, cluster, reason, out),
            // a node the record removed while it was away
            Message::Removed { cluster } => self.on_removed_notice(cluster),
        }
    }

    // ----- views and state changes shared by the roles -----

    fn known(&self) -> Option<&Record> {
        self.st.known.as_ref().map(|a| &a.record)
    }

    fn chosen(&self) -> Option<&Record> {
        self.st.chosen.as_ref().map(|a| &a.record)
    }

    fn role(&self) -> Option<Role> {
        match &self.st.phase {
            Phase::Joining { role, .. }
            | Phase::Confirming { role, .. }
            | Phase::Member { role, .. } => Some(*role),
            _ => None,
        }
    }

    /// Whether I may be elected seed (not pinned to worker).
    fn eligible(&self) -> bool {
        self.params.pinned_roles.get(&self.me) != Some(&Role::Worker)
    }

    fn persist(&self, out: &mut Vec<Action>) {
        out.push(Action::Persist(self.st.clone()));
    }

    /// Moves to `phase` (persisting it) if it differs from the current one. Debug builds
    /// check the change against the state machine ([`phase_change_allowed`]).
    fn set_phase(&mut self, phase: Phase, out: &mut Vec<Action>) {
        if self.st.phase != phase {
            debug_assert!(
                phase_change_allowed(&self.st.phase, &phase, &self.me),
                "{}: illegal phase change {:?} -> {phase:?}",
                self.me,
                self.st.phase
            );
            self.st.phase = phase;
            self.persist(out);
        }
    }

    /// Remember `acc` if it is newer than what we know. Returns whether it was.
    fn learn(&mut self, acc: &Accepted) -> bool {
        let newer = self.st.known.as_ref().is_none_or(|k| acc.ballot > k.ballot);
        if newer {
            self.st.known = Some(acc.clone());
            self.dirty = true;
        }
        self.st.max_ballot = self.st.max_ballot.max(acc.ballot.n);
        newer
    }

    /// Best hint of the cluster and its authority: the known record, or the announcement
    /// carrying the newest record ballot.
    fn hint(&self) -> Option<Hint<'_>> {
        let mut best: Option<Hint<'_>> = self.st.known.as_ref().map(|k| Hint {
            cluster: &k.record.cluster,
            authority: &k.record.authority,
            ballot: Some(&k.ballot),
            members: k.record.members.len() as u32,
        });
        for p in self.peers.values() {
            let Some(c) = &p.ann.cluster else { continue };
            let better = match &best {
                None => true,
                Some(h) => p.ann.record_ballot.as_ref() > h.ballot,
            };
            if better {
                best = Some(Hint {
                    cluster: c,
                    authority: p.ann.authority.as_ref().unwrap_or(&c.seed),
                    ballot: p.ann.record_ballot.as_ref(),
                    members: p.ann.members,
                });
            }
        }
        best
    }

    // ----- the periodic decision step -----

    fn drive(&mut self, now: Duration, out: &mut Vec<Action>) {
        self.watch_peers(now);
        self.drive_round(now, out);
        match self.st.phase.clone() {
            Phase::Preparing => self.drive_preparing(now, out),
            Phase::Discovering => self.drive_discovering(now, out),
            Phase::WaitingForSlot { cluster } => self.drive_waiting(now, cluster, out),
            Phase::Joining { .. } => {}
            Phase::Confirming { cluster, seq, role } => {
                self.drive_confirming(now, cluster, seq, role, out)
            }
            Phase::Member { role, .. } => self.drive_member(now, role, out),
        }
        self.publish(out);
    }

    /// Expires silent peers and notes since when the seed and the authority are missing.
    fn watch_peers(&mut self, now: Duration) {
        let timeout = self.params.peer_timeout;
        self.peers
            .retain(|_, p| now.saturating_sub(p.seen) < timeout);
        let mut watch: BTreeSet<NodeId> = BTreeSet::new();
        if let Some(h) = self.hint() {
            watch.insert(h.cluster.seed.clone());
            watch.insert(h.authority.clone());
        }
        // The slot authority watches every member, every holder of a slot or a tentative
        // place and every member of the electorate: it removes (releases) and replaces those
        // unseen for `replace_after` (by its own clock only).
        if let Some(r) = self.chosen().filter(|r| r.authority == self.me) {
            watch.extend(r.members.keys().cloned());
            watch.extend(r.tentative.keys().cloned());
            watch.extend(r.slots.iter().map(|s| s.node.clone()));
            watch.extend(r.quorum_sets().flatten().cloned());
            watch.extend(r.converting.iter().map(|c| c.node.clone()));
        }
        watch.remove(&self.me);
        self.missing_since.retain(|id, _| watch.contains(id));
        for id in watch {
            if !self.peers.contains_key(&id) {
                self.missing_since.entry(id).or_insert(now);
            }
        }
    }
}
