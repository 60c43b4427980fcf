//! [`Node`]: one node's formation state machine (acceptor, proposer, joiner, slot authority).
//!
//! `handle(now, event)` updates the state and returns the actions to execute. The protocol
//! and its safety argument are in the documentation of [`super`]. To add a record-changing
//! operation: add an [`Op`] variant, its pure transition in [`apply`], its trigger in
//! `Node::drive`, and its follow-up in `Node::round_done`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::announce::Announcement;
use super::events::{Action, Event, Message};
use super::types::{
    majority, Accepted, Ballot, ClusterId, FormationParams, NodeId, PersistedState, Phase, Record,
    Slot,
};
use rackseed_config::Role;

/// A record-changing operation, run as one Paxos round (read the record, apply, write back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Found a cluster with me as seed. If `replace` is set, also replace that cluster when
    /// nothing ever happened in it (its seed vanished before the first join).
    Elect {
        electorate: BTreeSet<NodeId>,
        replace: Option<ClusterId>,
    },
    /// Give the join slot to `to` (answering its request `req`).
    Grant { to: NodeId, req: u64 },
    /// Record the result of `node`'s join in slot `seq`.
    Confirm {
        node: NodeId,
        seq: u64,
        role: Role,
        ok: bool,
    },
    /// Take back slot `seq` after it timed out.
    Reclaim { seq: u64 },
    /// Become slot authority in place of `old`.
    Takeover { old: NodeId },
    /// Claim the (single) addon enablement.
    ClaimAddons,
    /// Record that the addons are enabled.
    AddonsDone,
    /// Learn (and complete) the current record without changing it.
    Refresh,
    /// Several changes in one round, applied in order (the slot authority confirms a join,
    /// grants the freed slot to the next requester and claims the addons at once).
    Batch(Vec<Op>),
}

/// Pure transition of the record for `op` proposed by `me` at `ballot`. `None` means nothing
/// to write (there is no record and `op` does not create one).
pub fn apply(
    op: &Op,
    cur: Option<&Record>,
    ballot: &Ballot,
    me: &NodeId,
    params: &FormationParams,
) -> Option<Record> {
    let fresh = |electorate: BTreeSet<NodeId>, seq: u64| Record {
        cluster: ClusterId {
            seed: me.clone(),
            term: ballot.n,
        },
        electorate,
        authority: me.clone(),
        members: BTreeMap::from([(me.clone(), Role::ControlPlane)]),
        slot: None,
        tentative: BTreeMap::new(),
        seq,
        addons_by: None,
        addons_done: false,
    };
    if let Op::Batch(ops) = op {
        let mut acc = cur.cloned();
        for op in ops {
            if let Some(next) = apply(op, acc.as_ref(), ballot, me, params) {
                acc = Some(next);
            }
        }
        return acc;
    }
    let Some(cur) = cur else {
        return match op {
            Op::Elect { electorate, .. } => {
                let mut electorate = electorate.clone();
                electorate.insert(me.clone());
                Some(fresh(electorate, 0))
            }
            _ => None,
        };
    };
    let mut r = cur.clone();
    match op {
        Op::Elect { replace, .. } => {
            if replace.as_ref() == Some(&r.cluster) && r.is_untouched() && r.cluster.seed != *me {
                r = fresh(cur.electorate.clone(), cur.seq);
            }
        }
        Op::Grant { to, .. } => {
            if r.authority == *me && !r.members.contains_key(to) {
                match &r.slot {
                    Some(s) if s.node == *to => {
                        r.seq += 1;
                        r.slot = Some(Slot {
                            node: to.clone(),
                            role: s.role,
                            seq: r.seq,
                        });
                    }
                    Some(_) => {}
                    None => {
                        let role = match r.tentative.remove(to) {
                            Some(role) => role,
                            None => role_for(&r, to, params),
                        };
                        r.seq += 1;
                        r.slot = Some(Slot {
                            node: to.clone(),
                            role,
                            seq: r.seq,
                        });
                    }
                }
            }
        }
        Op::Confirm {
            node,
            seq,
            role,
            ok,
        } => {
            let slot_is_node = r.slot.as_ref().is_some_and(|s| s.node == *node);
            if *ok {
                if !r.members.contains_key(node) {
                    let recorded = r
                        .slot
                        .as_ref()
                        .filter(|s| s.node == *node)
                        .map(|s| s.role)
                        .or_else(|| r.tentative.get(node).copied())
                        .unwrap_or(*role);
                    r.members.insert(node.clone(), recorded);
                }
                r.tentative.remove(node);
                if slot_is_node {
                    r.slot = None;
                }
            } else if r
                .slot
                .as_ref()
                .is_some_and(|s| s.node == *node && s.seq == *seq)
            {
                r.slot = None;
            }
        }
        Op::Reclaim { seq } => {
            if let Some(s) = r.slot.clone().filter(|s| s.seq == *seq) {
                r.tentative.insert(s.node, s.role);
                r.slot = None;
            }
        }
        Op::Takeover { old } => {
            if r.authority == *old && r.members.get(me) == Some(&Role::ControlPlane) {
                r.authority = me.clone();
            }
        }
        Op::ClaimAddons => {
            if r.addons_by.is_none()
                && r.members.get(me) == Some(&Role::ControlPlane)
                && r.control_plane_members().count() >= params.ha_size()
            {
                r.addons_by = Some(me.clone());
            }
        }
        Op::AddonsDone => {
            if r.addons_by.as_ref() == Some(me) {
                r.addons_done = true;
            }
        }
        Op::Refresh | Op::Batch(_) => {}
    }
    Some(r)
}

/// Role for the next joiner: pinned roles first; otherwise control plane while fewer than
/// `control_plane` are counted, keeping places for pinned control-plane nodes not yet in.
fn role_for(r: &Record, to: &NodeId, params: &FormationParams) -> Role {
    let cp = params.control_plane as usize;
    let counted = r.control_plane_count();
    let pinned = params.pinned_roles.get(to).copied();
    match pinned {
        Some(Role::Worker) => Role::Worker,
        Some(Role::ControlPlane) if counted < cp => Role::ControlPlane,
        Some(Role::ControlPlane) => Role::Worker,
        None => {
            let reserved = params
                .pinned_roles
                .iter()
                .filter(|(id, role)| {
                    **role == Role::ControlPlane
                        && *id != to
                        && !r.members.contains_key(*id)
                        && !r.tentative.contains_key(*id)
                        && r.slot.as_ref().is_none_or(|s| s.node != **id)
                })
                .count();
            if counted + reserved < cp {
                Role::ControlPlane
            } else {
                Role::Worker
            }
        }
    }
}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Reading,
    Writing,
}

#[derive(Debug, Clone)]
struct Round {
    op: Op,
    ballot: Ballot,
    started: Duration,
    last_send: Duration,
    stage: Stage,
    promises: BTreeMap<NodeId, Option<Accepted>>,
    /// The value read was "no record" (an election write needs the pre-election quorum too).
    base_none: bool,
    proposal: Option<Record>,
    accepts: BTreeSet<NodeId>,
    /// The ballot the Accepts ask to be promised next, and who promised it.
    next: Option<Ballot>,
    next_promises: BTreeSet<NodeId>,
}

/// Phase 1 of this proposer's next round, done ahead: acceptors that accepted `base` also
/// promised `next` (see [`Message::Accept`]). Used by the next round only while nothing newer
/// was heard of, so a slot authority pays one phase per change instead of two.
#[derive(Debug, Clone)]
struct Prepared {
    next: Ballot,
    base: Accepted,
    promises: BTreeSet<NodeId>,
}

/// A point-in-time view for `firstboot status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub me: NodeId,
    pub phase: Phase,
    pub role: Option<Role>,
    pub cluster: Option<ClusterId>,
    /// Slot authority per the newest known record.
    pub authority: Option<NodeId>,
    pub is_authority: bool,
    pub peers_seen: Vec<NodeId>,
    pub members_known: BTreeMap<NodeId, Role>,
    pub slot: Option<Slot>,
    pub addons_done: bool,
    pub last_error: Option<String>,
    /// Messages and events ignored as malformed, forged or stale.
    pub ignored: u64,
}

/// One node's formation state machine. See [`super`].
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
    authority_override: Option<NodeId>,
    // authority
    requests: BTreeMap<NodeId, (u64, Duration)>,
    reports: BTreeMap<NodeId, (u64, Role, bool)>,
    slot_watch: Option<(u64, Duration)>,
    // failure detection: id -> since when it has been missing
    missing_since: BTreeMap<NodeId, Duration>,
    next_refresh: Duration,
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
            authority_override: None,
            requests: BTreeMap::new(),
            reports: BTreeMap::new(),
            slot_watch: None,
            missing_since: BTreeMap::new(),
            next_refresh: now,
            prepare_at: None,
            addons_issued: false,
            last_error: None,
            ignored: 0,
            last_announced: None,
            last_status: String::new(),
            dirty: false,
        };
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

    /// One line about the Paxos round in flight (for logs and test diagnostics).
    pub fn debug_round(&self) -> String {
        match &self.round {
            None => format!("no round; backoff until {:?}", self.backoff_until),
            Some(r) => format!(
                "round {:?} ballot {} stage {:?} started {:?} promises {} accepts {}",
                r.op,
                r.ballot,
                r.stage,
                r.started,
                r.promises.len(),
                r.accepts.len()
            ),
        }
    }

    /// Snapshot for `firstboot status`.
    pub fn status(&self) -> Status {
        let rec = self.known();
        Status {
            me: self.me.clone(),
            phase: self.st.phase.clone(),
            role: self.role(),
            cluster: self.st.phase.cluster().cloned(),
            authority: rec.map(|r| r.authority.clone()),
            is_authority: self.is_authority(),
            peers_seen: self.peers.keys().cloned().collect(),
            members_known: rec.map(|r| r.members.clone()).unwrap_or_default(),
            slot: rec.and_then(|r| r.slot.clone()),
            addons_done: rec.is_some_and(|r| r.addons_done) || self.st.addons_done,
            last_error: self.last_error.clone(),
            ignored: self.ignored,
        }
    }

    /// Feeds one event; returns the actions to execute in order.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut out = self.handle_event(now, event);
        coalesce_persists(&mut out);
        out
    }

    fn handle_event(&mut self, now: Duration, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::PeerSeen { ann, ip } => {
                if let Some(p) = self.peers.get_mut(&ann.id) {
                    if p.ann == ann && p.ip == ip {
                        // A plain refresh changes nothing but liveness; timers run on ticks.
                        p.seen = now;
                        return out;
                    }
                }
                if ann.id != self.me {
                    if let Some(b) = &ann.record_ballot {
                        self.st.max_ballot = self.st.max_ballot.max(b.n);
                    }
                    self.missing_since.remove(&ann.id);
                    self.peers
                        .insert(ann.id.clone(), Peer { ann, ip, seen: now });
                }
            }
            Event::PeerLost { .. } => {
                // A hint only (unsigned goodbye, or a record expired on a busy network): the
                // peer counts as gone once nothing from it arrived for `peer_timeout`.
            }
            Event::Tick => {}
            Event::NodePrepared(res) => self.on_prepared(now, res, &mut out),
            Event::JoinFinished(res) => self.on_join_finished(now, res, &mut out),
            Event::AddonsEnabled(res) => self.on_addons(res, &mut out),
            Event::Message { from, msg } => {
                // An authenticated message shows the sender is alive even when its mDNS
                // announcements are late (a busy network): no takeover of a working authority.
                if let Some(p) = self.peers.get_mut(&from) {
                    p.seen = now;
                }
                // Paxos traffic only needs the decision step when it changed something.
                let paxos = matches!(
                    msg,
                    Message::Prepare { .. }
                        | Message::Promise { .. }
                        | Message::Accept { .. }
                        | Message::Accepted { .. }
                        | Message::Nack { .. }
                );
                self.on_message(now, from, msg, &mut out);
                if paxos && !self.dirty {
                    return out;
                }
            }
        }
        self.dirty = false;
        self.drive(now, &mut out);
        out
    }

    // ----- helpers -----

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

    fn is_authority(&self) -> bool {
        matches!(
            self.st.phase,
            Phase::Member {
                role: Role::ControlPlane,
                ..
            }
        ) && self
            .chosen()
            .is_some_and(|r| r.authority == self.me && r.members.contains_key(&self.me))
    }

    /// My round in flight may make me slot authority (an election or a takeover), or the
    /// newest record I heard of names me.
    fn may_become_authority(&self) -> bool {
        self.round
            .as_ref()
            .is_some_and(|r| matches!(r.op, Op::Elect { .. } | Op::Takeover { .. }))
            || self.known().is_some_and(|r| r.authority == self.me)
    }

    fn eligible(&self) -> bool {
        self.params.pinned_roles.get(&self.me) != Some(&Role::Worker)
    }

    fn persist(&self, out: &mut Vec<Action>) {
        out.push(Action::Persist(self.st.clone()));
    }

    fn set_phase(&mut self, phase: Phase, out: &mut Vec<Action>) {
        if self.st.phase != phase {
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

    /// Who my round's Prepares and Accepts go to. After I saw a record chosen, its electorate:
    /// a read and a write then need only a majority of it (see [`Node::try_write`]), so the
    /// other nodes of a large cluster stay idle. Before, everybody I see and the electorate of
    /// the newest record I heard of (the read needs the pre-election quorum).
    fn targets(&self) -> BTreeSet<NodeId> {
        let mut t: BTreeSet<NodeId> = match self.chosen() {
            Some(r) => r.electorate.clone(),
            None => {
                let mut t: BTreeSet<NodeId> = self.peers.keys().cloned().collect();
                if let Some(r) = self.known() {
                    t.extend(r.electorate.iter().cloned());
                }
                t
            }
        };
        t.remove(&self.me);
        t
    }

    fn announcement(&self) -> Announcement {
        let known = self.st.known.as_ref();
        let hint = self.hint();
        Announcement {
            id: self.me.clone(),
            priority: self.params.priority,
            phase: self.st.phase.summary(),
            role: self.role(),
            cluster: self.st.phase.cluster().cloned(),
            authority: known
                .map(|k| k.record.authority.clone())
                .or_else(|| hint.map(|h| h.authority.clone())),
            record_ballot: known.map(|k| k.ballot.clone()),
            members: known.map_or(0, |k| k.record.members.len() as u32),
            eligible: self.eligible(),
        }
    }

    fn status_line(&self) -> String {
        let peers = self.peers.len();
        let electing = self
            .round
            .as_ref()
            .is_some_and(|r| matches!(r.op, Op::Elect { .. }));
        match &self.st.phase {
            Phase::Preparing => "preparing node".to_string(),
            Phase::Discovering if electing => {
                format!("proposing self as seed ({peers} peers seen)")
            }
            Phase::Discovering => format!(
                "discovering peers ({} of {} expected seen)",
                peers + 1,
                self.params.expected_nodes
            ),
            Phase::WaitingForSlot { cluster } => {
                format!("waiting for a join slot in cluster {cluster}")
            }
            Phase::Joining {
                cluster,
                seq,
                role,
                via,
            } => {
                format!("joining cluster {cluster} via {via} as {role} (slot {seq})")
            }
            Phase::Confirming { cluster, .. } => {
                format!("joined cluster {cluster}, confirming membership")
            }
            Phase::Member { cluster, role } => {
                let members = self.known().map_or(0, |r| r.members.len());
                let auth = if self.is_authority() {
                    ", granting join slots"
                } else {
                    ""
                };
                format!("member of cluster {cluster} as {role} ({members} members known{auth})")
            }
        }
    }

    // ----- event handlers -----

    fn on_prepared(&mut self, now: Duration, res: Result<(), String>, out: &mut Vec<Action>) {
        match res {
            Ok(()) => {
                if !self.st.prepared {
                    self.st.prepared = true;
                    if self.st.phase == Phase::Preparing {
                        self.st.phase = Phase::Discovering;
                    }
                    self.persist(out);
                }
                self.prepare_at = None;
            }
            Err(e) => {
                self.last_error = Some(format!("node preparation failed: {e}"));
                self.prepare_at = Some(now + self.params.retry_interval * 6);
            }
        }
    }

    fn on_join_finished(&mut self, now: Duration, res: Result<(), String>, out: &mut Vec<Action>) {
        let Phase::Joining {
            cluster,
            seq,
            role,
            via,
        } = self.st.phase.clone()
        else {
            self.ignored += 1;
            return;
        };
        match res {
            Ok(()) => {
                self.set_phase(
                    Phase::Confirming {
                        cluster: cluster.clone(),
                        seq,
                        role,
                    },
                    out,
                );
                out.push(Action::Send {
                    to: via,
                    msg: Message::JoinReport {
                        cluster,
                        seq,
                        role,
                        ok: true,
                    },
                });
                self.last_request = Some(now);
            }
            Err(e) => {
                self.last_error = Some(format!("join of cluster {cluster} via {via} failed: {e}"));
                self.set_phase(
                    Phase::WaitingForSlot {
                        cluster: cluster.clone(),
                    },
                    out,
                );
                out.push(Action::Send {
                    to: via,
                    msg: Message::JoinReport {
                        cluster,
                        seq,
                        role,
                        ok: false,
                    },
                });
                // back off before asking again
                self.last_request = Some(now + self.params.retry_interval);
            }
        }
    }

    fn on_addons(&mut self, res: Result<(), String>, out: &mut Vec<Action>) {
        self.addons_issued = false;
        match res {
            Ok(()) => {
                if !self.st.addons_done {
                    self.st.addons_done = true;
                    self.persist(out);
                }
            }
            Err(e) => self.last_error = Some(format!("enabling addons failed: {e}")),
        }
    }

    fn on_message(&mut self, now: Duration, from: NodeId, msg: Message, out: &mut Vec<Action>) {
        if from == self.me {
            self.ignored += 1;
            return;
        }
        match msg {
            Message::Prepare { ballot } => {
                if ballot.node != from {
                    self.ignored += 1;
                    return;
                }
                let reply = self.acceptor_prepare(ballot, out);
                out.push(Action::Send {
                    to: from,
                    msg: reply,
                });
            }
            Message::Accept {
                ballot,
                record,
                next,
            } => {
                if ballot.node != from {
                    self.ignored += 1;
                    return;
                }
                // A next ballot must be the sender's own and higher; otherwise accept only.
                let next = next.filter(|n| n.node == from && *n > ballot);
                let reply = self.acceptor_accept(ballot, record, next, out);
                out.push(Action::Send {
                    to: from,
                    msg: reply,
                });
            }
            Message::Promise { ballot, accepted } => {
                self.on_promise(now, from, ballot, accepted, out)
            }
            Message::Accepted { ballot, next } => self.on_accepted(now, from, ballot, next, out),
            // Refused because the acceptor promised my own later ballot (the piggybacked next
            // one): a stale repeat of a message it already answered, not competition.
            Message::Nack { promised, .. } if promised.node == self.me => self.ignored += 1,
            Message::Nack { ballot, promised } => {
                self.st.max_ballot = self.st.max_ballot.max(promised.n);
                if self.round.as_ref().is_some_and(|r| r.ballot == ballot) {
                    self.round = None;
                    self.backoff_until = now + self.backoff();
                    self.dirty = true;
                }
            }
            Message::SlotRequest { req } => {
                if self.is_authority() {
                    let member = self
                        .chosen()
                        .and_then(|r| Some((r.cluster.clone(), *r.members.get(&from)?)));
                    match member {
                        Some((cluster, role)) => out.push(Action::Send {
                            to: from,
                            msg: Message::JoinConfirmed { cluster, role },
                        }),
                        None => {
                            self.requests.insert(from, (req, now));
                        }
                    }
                } else if self.may_become_authority() {
                    // Keep it for when my round completes: the requester would otherwise
                    // only ask again after its retry interval.
                    self.requests.insert(from, (req, now));
                } else {
                    let hint = self
                        .hint()
                        .map(|h| h.authority.clone())
                        .filter(|a| *a != self.me);
                    out.push(Action::Send {
                        to: from,
                        msg: Message::NotAuthority { hint },
                    });
                }
            }
            Message::SlotGrant {
                req,
                cluster,
                seq,
                role,
            } => {
                let fresh = self
                    .reqs
                    .get(&req)
                    .is_some_and(|sent| now.saturating_sub(*sent) <= self.params.grant_max_age);
                let waiting = matches!(self.st.phase, Phase::WaitingForSlot { .. });
                let ip = self.peers.get(&from).map(|p| p.ip);
                match (fresh && waiting, ip) {
                    (true, Some(ip)) => {
                        self.reqs.clear();
                        // The join starts before its phase is persisted: a restart turns
                        // `Joining` back into `WaitingForSlot` (see `Node::new`), so the
                        // persisted `Joining` only informs `status`, and its fsync need not
                        // delay the join.
                        out.push(Action::Join {
                            seed_ip: ip,
                            worker: role == Role::Worker,
                            timeout: self.params.join_timeout,
                            cluster: cluster.clone(),
                        });
                        self.set_phase(
                            Phase::Joining {
                                cluster,
                                seq,
                                role,
                                via: from,
                            },
                            out,
                        );
                    }
                    _ => self.ignored += 1,
                }
            }
            Message::NotAuthority { hint } => {
                if hint.as_ref() != Some(&self.me) {
                    self.authority_override = hint;
                }
            }
            Message::JoinReport {
                cluster,
                seq,
                role,
                ok,
            } => {
                if self.is_authority() && self.chosen().is_some_and(|r| r.cluster == cluster) {
                    let member = self.chosen().and_then(|r| r.members.get(&from)).copied();
                    match member {
                        Some(role) if ok => out.push(Action::Send {
                            to: from,
                            msg: Message::JoinConfirmed { cluster, role },
                        }),
                        _ => {
                            self.reports.insert(from, (seq, role, ok));
                        }
                    }
                } else if !self.is_authority() {
                    let hint = self
                        .hint()
                        .map(|h| h.authority.clone())
                        .filter(|a| *a != self.me);
                    out.push(Action::Send {
                        to: from,
                        msg: Message::NotAuthority { hint },
                    });
                } else {
                    self.ignored += 1;
                }
            }
            Message::JoinConfirmed { cluster, role } => match &self.st.phase {
                Phase::Confirming { cluster: c, .. } | Phase::WaitingForSlot { cluster: c }
                    if *c == cluster =>
                {
                    self.set_phase(Phase::Member { cluster, role }, out);
                }
                _ => self.ignored += 1,
            },
        }
    }

    // ----- acceptor -----

    fn acceptor_prepare(&mut self, ballot: Ballot, out: &mut Vec<Action>) -> Message {
        self.st.max_ballot = self.st.max_ballot.max(ballot.n);
        match &self.st.acceptor.promised {
            Some(p) if *p > ballot => Message::Nack {
                ballot,
                promised: p.clone(),
            },
            _ => {
                if self.st.acceptor.promised.as_ref() != Some(&ballot) {
                    self.st.acceptor.promised = Some(ballot.clone());
                    self.persist(out);
                }
                Message::Promise {
                    ballot,
                    accepted: self.st.acceptor.accepted.clone(),
                }
            }
        }
    }

    /// Accepts `record` at `ballot` unless a higher ballot was promised; then, with `next`,
    /// promises `next` as a `Prepare { next }` arriving right after would (the promise's
    /// "last accepted" is the record just accepted). One persist covers both.
    fn acceptor_accept(
        &mut self,
        ballot: Ballot,
        record: Record,
        next: Option<Ballot>,
        out: &mut Vec<Action>,
    ) -> Message {
        self.st.max_ballot = self.st.max_ballot.max(ballot.n);
        let acc = Accepted {
            ballot: ballot.clone(),
            record,
        };
        // A repeated Accept (retransmitted, duplicated) of what I accepted is answered again,
        // even if I promised a higher ballot since (e.g. the piggybacked next one): having
        // accepted it stays true.
        let already = self.st.acceptor.accepted.as_ref() == Some(&acc);
        if let Some(p) = self.st.acceptor.promised.as_ref().filter(|p| **p > ballot) {
            if !already {
                return Message::Nack {
                    ballot,
                    promised: p.clone(),
                };
            }
        }
        let mut changed = false;
        if !already {
            self.st.acceptor.promised = Some(ballot.clone());
            self.st.acceptor.accepted = Some(acc.clone());
            self.learn(&acc);
            changed = true;
        }
        let next = next.filter(|n| self.st.acceptor.promised.as_ref().is_none_or(|p| p <= n));
        if let Some(n) = &next {
            self.st.max_ballot = self.st.max_ballot.max(n.n);
            if self.st.acceptor.promised.as_ref() != Some(n) {
                self.st.acceptor.promised = Some(n.clone());
                changed = true;
            }
        }
        if changed {
            self.persist(out);
        }
        Message::Accepted { ballot, next }
    }

    // ----- proposer -----

    fn backoff(&self) -> Duration {
        // Deterministic spread so that competing proposers do not retry in lockstep.
        let h = self
            .me
            .as_str()
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        self.params.round_timeout / 4 * (1 + (h % 4) as u32)
    }

    fn start_round(&mut self, now: Duration, op: Op, out: &mut Vec<Action>) {
        // Phase 1 done ahead by my last round's Accepts, if nothing was heard of since.
        let prepared = self.prepared.take().filter(|p| {
            self.st.known.as_ref().map(|k| &k.ballot) == Some(&p.base.ballot)
                && self.st.chosen.as_ref().map(|c| &c.ballot) == Some(&p.base.ballot)
                && self.st.acceptor.promised.as_ref() == Some(&p.next)
                && self.st.max_ballot == p.next.n
        });
        let (ballot, promises) = match prepared {
            Some(p) => {
                let promises: BTreeMap<NodeId, Option<Accepted>> = p
                    .promises
                    .into_iter()
                    .map(|id| (id, Some(p.base.clone())))
                    .collect();
                (p.next, promises)
            }
            None => {
                let n = self
                    .st
                    .max_ballot
                    .max(self.st.acceptor.promised.as_ref().map_or(0, |b| b.n))
                    + 1;
                self.st.max_ballot = n;
                // The ballot number must be durable before it is used: never reuse one after
                // a crash. (My own promise is persisted right after; the two writes coalesce.)
                self.persist(out);
                let ballot = Ballot {
                    n,
                    node: self.me.clone(),
                };
                (ballot, BTreeMap::new())
            }
        };
        // Those who promised already (mine included) need no Prepare.
        let asked: BTreeSet<NodeId> = promises.keys().cloned().collect();
        self.round = Some(Round {
            op,
            ballot: ballot.clone(),
            started: now,
            last_send: now,
            stage: Stage::Reading,
            promises,
            base_none: false,
            proposal: None,
            accepts: BTreeSet::new(),
            next: None,
            next_promises: BTreeSet::new(),
        });
        let own = (!asked.contains(&self.me)).then(|| self.acceptor_prepare(ballot.clone(), out));
        for to in self.targets() {
            if asked.contains(&to) {
                continue;
            }
            out.push(Action::Send {
                to,
                msg: Message::Prepare {
                    ballot: ballot.clone(),
                },
            });
        }
        match own {
            Some(Message::Promise { ballot, accepted }) => {
                let me = self.me.clone();
                self.on_promise(now, me, ballot, accepted, out);
            }
            // My own acceptor refused (it promised higher): the round cannot win.
            Some(_) => {}
            None => self.try_write(now, out),
        }
    }

    fn on_promise(
        &mut self,
        now: Duration,
        from: NodeId,
        ballot: Ballot,
        accepted: Option<Accepted>,
        out: &mut Vec<Action>,
    ) {
        if let Some(acc) = &accepted {
            self.learn(acc);
        }
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot || round.stage != Stage::Reading {
            return;
        }
        round.promises.insert(from, accepted);
        self.try_write(now, out);
    }

    /// Phase 2: once the promises make a read quorum, applies the round's op to the newest
    /// record among them and asks the targets to accept the result.
    ///
    /// The read quorum: a majority of every electorate known (of the newest record among the
    /// promises, of the newest heard of, of the one I saw chosen) and, unless I saw a record
    /// chosen, the pre-election quorum `Q` in all. A proposer that saw `C` chosen starts from
    /// the newest of the promises and `C` itself: every record chosen after `C` was accepted
    /// by a majority of `C`'s electorate (it descends from `C`, and no change alters the
    /// electorate), which the promises meet; so the base is the latest chosen record or a
    /// later one, as with a `Q` read (see the safety argument in [`super`]).
    fn try_write(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        let chosen = self.st.chosen.as_ref();
        if round.stage != Stage::Reading
            || (chosen.is_none() && round.promises.len() < self.params.election_quorum())
        {
            return;
        }
        let highest = round
            .promises
            .values()
            .flatten()
            .chain(chosen)
            .max_by(|a, b| a.ballot.cmp(&b.ballot))
            .cloned();
        // Every electorate we know of must be represented by a majority among the promises.
        let mut electorates: Vec<&BTreeSet<NodeId>> = Vec::new();
        if let Some(h) = &highest {
            electorates.push(&h.record.electorate);
        }
        if let Some(k) = &self.st.known {
            electorates.push(&k.record.electorate);
        }
        if let Some(c) = chosen {
            electorates.push(&c.record.electorate);
        }
        for s in electorates {
            let have = round.promises.keys().filter(|id| s.contains(*id)).count();
            if have < majority(s.len()) {
                return;
            }
        }
        let cur = highest.as_ref().map(|h| &h.record);
        let Some(proposal) = apply(&round.op, cur, &round.ballot, &self.me, &self.params) else {
            // Nothing to write: there is no record.
            let op = round.op.clone();
            self.round = None;
            if op == Op::Refresh {
                self.no_record(out);
            }
            return;
        };
        round.base_none = highest.is_none();
        round.stage = Stage::Writing;
        round.last_send = now;
        round.proposal = Some(proposal.clone());
        let ballot = round.ballot.clone();
        let next = Ballot {
            n: ballot.n + 1,
            node: self.me.clone(),
        };
        round.next = Some(next.clone());
        // The Accepts go out before my own accept is persisted (below), so the fsync overlaps
        // their delivery.
        for to in self.targets() {
            out.push(Action::Send {
                to,
                msg: Message::Accept {
                    ballot: ballot.clone(),
                    record: proposal.clone(),
                    next: Some(next.clone()),
                },
            });
        }
        // `next` is reserved like any ballot of mine, and my own accept is durable before it
        // counts: the persist below runs before any answer is handled. (`next` is only ever
        // proposed with in a later round, after this persist.)
        self.st.max_ballot = self.st.max_ballot.max(next.n);
        let own = self.acceptor_accept(ballot.clone(), proposal.clone(), Some(next.clone()), out);
        self.persist(out);
        if let Message::Accepted { ballot, next } = own {
            let me = self.me.clone();
            self.on_accepted(now, me, ballot, next, out);
        }
    }

    fn on_accepted(
        &mut self,
        now: Duration,
        from: NodeId,
        ballot: Ballot,
        next: Option<Ballot>,
        out: &mut Vec<Action>,
    ) {
        // A late answer to my last completed round still counts as a promise for the next.
        if let (Some(p), Some(n)) = (self.prepared.as_mut(), next.as_ref()) {
            if p.base.ballot == ballot && p.next == *n {
                p.promises.insert(from.clone());
            }
        }
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot || round.stage != Stage::Writing {
            return;
        }
        if next.is_some() && next == round.next {
            round.next_promises.insert(from.clone());
        }
        round.accepts.insert(from);
        let Some(proposal) = &round.proposal else {
            return;
        };
        let s = &proposal.electorate;
        if round.accepts.iter().filter(|id| s.contains(*id)).count() < majority(s.len()) {
            return;
        }
        if round.base_none && round.accepts.len() < self.params.election_quorum() {
            return;
        }
        let Some(round) = self.round.take() else {
            return;
        };
        let Some(record) = round.proposal else { return };
        let acc = Accepted {
            ballot: round.ballot,
            record,
        };
        self.prepared = round.next.map(|next| Prepared {
            next,
            base: acc.clone(),
            promises: round.next_promises,
        });
        self.learn(&acc);
        self.st.chosen = Some(acc.clone());
        self.round_done(now, round.op, acc.record, out);
    }

    /// A Refresh read found no record at all: any cluster we heard of never formed.
    fn no_record(&mut self, out: &mut Vec<Action>) {
        if matches!(self.st.phase, Phase::WaitingForSlot { .. }) {
            self.st.known = None;
            self.set_phase(Phase::Discovering, out);
            self.persist(out);
        }
    }

    /// `record` is now chosen. Align our phase with it and perform the op's follow-up.
    fn round_done(&mut self, now: Duration, op: Op, record: Record, out: &mut Vec<Action>) {
        self.dirty = true;
        if record.addons_by.as_ref() == Some(&self.me) {
            self.st.addons_claimed = true;
        }
        if record.authority != self.me {
            self.requests.clear();
            self.reports.clear();
        }
        // The messages that follow from the chosen record (a grant, a confirmation) go out
        // before it is persisted here: it is durable at a majority of the electorate already,
        // and nothing persisted below is needed for them to be right. The next joiner does not
        // wait for this fsync.
        self.follow_up(now, op, &record, out);
        self.persist(out);
        if let Some(role) = record.members.get(&self.me) {
            let phase = Phase::Member {
                cluster: record.cluster.clone(),
                role: *role,
            };
            self.set_phase(phase, out);
        } else {
            match &self.st.phase {
                Phase::Discovering => self.set_phase(
                    Phase::WaitingForSlot {
                        cluster: record.cluster.clone(),
                    },
                    out,
                ),
                Phase::Member { cluster, .. } | Phase::WaitingForSlot { cluster }
                    if *cluster != record.cluster =>
                {
                    self.set_phase(
                        Phase::WaitingForSlot {
                            cluster: record.cluster.clone(),
                        },
                        out,
                    )
                }
                _ => {}
            }
        }
    }

    /// What the proposer of `op` does once `record` (the result of `op`) is chosen.
    fn follow_up(&mut self, now: Duration, op: Op, record: &Record, out: &mut Vec<Action>) {
        match op {
            Op::Batch(ops) => {
                for op in ops {
                    self.follow_up(now, op, record, out);
                }
            }
            Op::Grant { to, req } => {
                if let Some(s) = record.slot.as_ref().filter(|s| s.node == to) {
                    self.slot_watch = Some((s.seq, now));
                    out.push(Action::Send {
                        to: to.clone(),
                        msg: Message::SlotGrant {
                            req,
                            cluster: record.cluster.clone(),
                            seq: s.seq,
                            role: s.role,
                        },
                    });
                    self.requests.remove(&to);
                }
            }
            Op::Confirm { node, ok, .. } => {
                self.reports.remove(&node);
                if ok {
                    if let Some(role) = record.members.get(&node) {
                        out.push(Action::Send {
                            to: node.clone(),
                            msg: Message::JoinConfirmed {
                                cluster: record.cluster.clone(),
                                role: *role,
                            },
                        });
                    }
                }
            }
            _ => {}
        }
    }

    // ----- the periodic decision step -----

    fn drive(&mut self, now: Duration, out: &mut Vec<Action>) {
        // Expire silent peers and note since when known nodes are missing.
        let timeout = self.params.peer_timeout;
        self.peers
            .retain(|_, p| now.saturating_sub(p.seen) < timeout);
        let mut watch: BTreeSet<NodeId> = BTreeSet::new();
        if let Some(h) = self.hint() {
            watch.insert(h.cluster.seed.clone());
            watch.insert(h.authority.clone());
        }
        watch.remove(&self.me);
        self.missing_since.retain(|id, _| watch.contains(id));
        for id in watch {
            if !self.peers.contains_key(&id) {
                self.missing_since.entry(id).or_insert(now);
            }
        }
        self.drive_round(now, out);

        match self.st.phase.clone() {
            Phase::Preparing => {
                if !self.st.prepared && self.prepare_at.is_none_or(|t| now >= t) {
                    self.prepare_at = Some(now + self.params.join_timeout);
                    out.push(Action::PrepareNode);
                }
                if self.st.prepared {
                    self.set_phase(Phase::Discovering, out);
                }
            }
            Phase::Discovering => self.drive_discovering(now, out),
            Phase::WaitingForSlot { cluster } => self.drive_waiting(now, cluster, out),
            Phase::Joining { .. } => {}
            Phase::Confirming { cluster, seq, role } => {
                if self
                    .last_request
                    .is_none_or(|t| now.saturating_sub(t) >= self.params.retry_interval)
                {
                    self.last_request = Some(now);
                    if let Some(to) = self.authority_target() {
                        out.push(Action::Send {
                            to,
                            msg: Message::JoinReport {
                                cluster,
                                seq,
                                role,
                                ok: true,
                            },
                        });
                    }
                }
            }
            Phase::Member { role, .. } => self.drive_member(now, role, out),
        }

        let ann = self.announcement();
        if self.last_announced.as_ref() != Some(&ann) {
            self.last_announced = Some(ann.clone());
            out.push(Action::Announce(ann));
        }
        let status = self.status_line();
        if status != self.last_status {
            self.last_status = status.clone();
            out.push(Action::SetStatus(status));
        }
    }

    /// Abandons a round that took too long; re-sends its current message to acceptors that
    /// have not answered yet (messages get lost).
    fn drive_round(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(r) = self.round.as_ref() else { return };
        if now.saturating_sub(r.started) >= self.params.round_timeout {
            self.round = None;
            self.backoff_until = now + self.backoff();
            return;
        }
        if now.saturating_sub(r.last_send) < self.params.retry_interval {
            return;
        }
        let targets = self.targets();
        let Some(r) = self.round.as_mut() else { return };
        r.last_send = now;
        for to in targets {
            let msg = match (&r.stage, &r.proposal) {
                (Stage::Reading, _) if !r.promises.contains_key(&to) => Message::Prepare {
                    ballot: r.ballot.clone(),
                },
                (Stage::Writing, Some(p)) if !r.accepts.contains(&to) => Message::Accept {
                    ballot: r.ballot.clone(),
                    record: p.clone(),
                    next: r.next.clone(),
                },
                _ => continue,
            };
            out.push(Action::Send { to, msg });
        }
    }

    /// The electorate of a fresh election among `candidates` (priority, id, eligible), this
    /// node included: this node and the best-ranked others, eligible candidates first, at most
    /// [`FormationParams::electorate_cap`] in all. The best-ranked are also the first to be
    /// granted a slot when they wait for one, so the control plane is normally drawn from the
    /// electorate.
    fn electorate_of(&self, candidates: &[(u32, NodeId, bool)]) -> BTreeSet<NodeId> {
        let mut order: Vec<&(u32, NodeId, bool)> =
            candidates.iter().filter(|c| c.1 != self.me).collect();
        order.sort_by_key(|c| (!c.2, rank(c.0, &c.1)));
        let mut electorate = BTreeSet::from([self.me.clone()]);
        let others = self.params.electorate_cap().saturating_sub(1);
        electorate.extend(order.into_iter().take(others).map(|c| c.1.clone()));
        electorate
    }

    /// This node and every visible peer, as (priority, id, eligible).
    fn participants(&self) -> Vec<(u32, NodeId, bool)> {
        let mut all: Vec<(u32, NodeId, bool)> = self
            .peers
            .values()
            .map(|p| (p.ann.priority, p.ann.id.clone(), p.ann.eligible))
            .collect();
        all.push((self.params.priority, self.me.clone(), self.eligible()));
        all
    }

    fn can_propose(&self, now: Duration) -> bool {
        self.round.is_none() && now >= self.backoff_until
    }

    fn drive_discovering(&mut self, now: Duration, out: &mut Vec<Action>) {
        if let Some(cluster) = self.hint().map(|h| h.cluster.clone()) {
            // Rule: an existing cluster wins; never start a second one.
            self.set_phase(
                Phase::WaitingForSlot {
                    cluster: cluster.clone(),
                },
                out,
            );
            self.drive_waiting(now, cluster, out);
            return;
        }
        if !self.can_propose(now) {
            return;
        }
        let participants = self.participants();
        let seen = participants.len();
        let all_here = seen >= self.params.electorate_size();
        let timed_out = now.saturating_sub(self.boot) >= self.params.formation_timeout
            && seen >= self.params.election_quorum();
        if !(all_here || timed_out) {
            return;
        }
        let any_eligible = participants.iter().any(|p| p.2);
        let best = participants
            .iter()
            .filter(|p| p.2 || !any_eligible)
            .min_by_key(|p| rank(p.0, &p.1))
            .map(|p| p.1.clone());
        if best.as_ref() == Some(&self.me) {
            let electorate = self.electorate_of(&participants);
            self.start_round(
                now,
                Op::Elect {
                    electorate,
                    replace: None,
                },
                out,
            );
        }
    }

    /// The waiting node that gets the free slot next (pinned control-plane nodes first, then
    /// by rank), other than `except`.
    fn next_requester(&self, except: Option<&NodeId>) -> Option<(NodeId, u64)> {
        self.requests
            .iter()
            .filter(|(id, _)| Some(*id) != except)
            .min_by_key(|(id, _)| {
                let pinned_cp = self.params.pinned_roles.get(*id) == Some(&Role::ControlPlane);
                let pr = self.peers.get(*id).map_or(0, |p| p.ann.priority);
                (!pinned_cp, rank(pr, id))
            })
            .map(|(id, (req, _))| (id.clone(), *req))
    }

    /// Where slot requests and join reports go.
    fn authority_target(&self) -> Option<NodeId> {
        let hint = self.hint().map(|h| h.authority.clone());
        let pick = match (&self.authority_override, hint) {
            (Some(o), _) if self.peers.contains_key(o) => Some(o.clone()),
            (_, h) => h,
        };
        pick.filter(|a| *a != self.me)
    }

    fn drive_waiting(&mut self, now: Duration, cluster: ClusterId, out: &mut Vec<Action>) {
        let Some((hint_cluster, authority, members)) = self
            .hint()
            .map(|h| (h.cluster.clone(), h.authority.clone(), h.members))
        else {
            return;
        };
        if hint_cluster != cluster {
            self.set_phase(
                Phase::WaitingForSlot {
                    cluster: hint_cluster.clone(),
                },
                out,
            );
        }
        // The record may name me (my own unfinished election): finish or refute it.
        if (authority == self.me || hint_cluster.seed == self.me)
            && self.can_propose(now)
            && now >= self.next_refresh
        {
            self.next_refresh = now + self.params.retry_interval;
            self.start_round(now, Op::Refresh, out);
            return;
        }
        // Re-election: the seed vanished before anything happened in its cluster.
        let untouched = match self.known().filter(|r| r.cluster == hint_cluster) {
            Some(r) => r.is_untouched(),
            None => members <= 1,
        };
        let seed_gone = self
            .missing_since
            .get(&hint_cluster.seed)
            .is_some_and(|t| now.saturating_sub(*t) >= self.params.takeover_after);
        if untouched && seed_gone && self.eligible() && self.can_propose(now) {
            let best = self
                .peers
                .values()
                .filter(|p| p.ann.eligible && p.ann.role.is_none())
                .map(|p| rank(p.ann.priority, &p.ann.id))
                .min();
            if best.is_none_or(|b| rank(self.params.priority, &self.me) < b) {
                // Used only if the read finds no record at all (the old one was never chosen).
                let electorate = self.electorate_of(&self.participants());
                self.start_round(
                    now,
                    Op::Elect {
                        electorate,
                        replace: Some(hint_cluster),
                    },
                    out,
                );
                return;
            }
        }
        if self
            .last_request
            .is_none_or(|t| now >= t && now.saturating_sub(t) >= self.params.retry_interval)
        {
            if let Some(to) = self.authority_target() {
                self.last_request = Some(now);
                self.reqs
                    .retain(|_, sent| now.saturating_sub(*sent) <= self.params.grant_max_age);
                self.next_req += 1;
                // Unique across restarts: the boot count is persisted.
                let req = (self.st.boots << 32) | (self.next_req & 0xffff_ffff);
                self.reqs.insert(req, now);
                out.push(Action::Send {
                    to,
                    msg: Message::SlotRequest { req },
                });
            }
        }
    }

    fn drive_member(&mut self, now: Duration, role: Role, out: &mut Vec<Action>) {
        let Some(rec) = self.chosen() else {
            // Only control-plane members act on the record; they learn it with one round, but
            // only once they have a reason to act: a round of theirs would compete with the
            // authority's grant rounds (and make them retry after a back-off).
            if role == Role::ControlPlane
                && self.needs_chosen()
                && self.can_propose(now)
                && now >= self.next_refresh
            {
                self.next_refresh = now + self.params.retry_interval;
                self.start_round(now, Op::Refresh, out);
            }
            return;
        };
        // Addons: only the claimer enables them, and only once a *chosen* record says so
        // (`known` may hold a value that was accepted but never chosen).
        if self.st.addons_claimed && !self.st.addons_done && !self.addons_issued {
            let cluster = rec.cluster.clone();
            self.addons_issued = true;
            out.push(Action::EnableAddons { cluster });
        }
        // Keep the slot timer of the authority running even while a round is in flight.
        if self.is_authority() {
            let slot_seq = self.chosen().and_then(|r| r.slot.as_ref().map(|s| s.seq));
            match (slot_seq, self.slot_watch) {
                (Some(seq), Some((w, _))) if w == seq => {}
                (Some(seq), _) => self.slot_watch = Some((seq, now)),
                (None, _) => self.slot_watch = None,
            }
            let fresh = self.params.retry_interval * 3;
            self.requests
                .retain(|_, (_, at)| now.saturating_sub(*at) <= fresh);
        }
        if !self.can_propose(now) {
            return;
        }
        if let Some(op) = self.member_op(now, role) {
            if op == Op::Refresh {
                self.next_refresh = now + self.params.retry_interval;
            }
            self.start_round(now, op, out);
        }
    }

    /// A control-plane member that never saw a record chosen needs one before it can act: when
    /// the newest record it heard of names it as slot authority or addon enabler, when its
    /// phase names another cluster, or when the authority is missing (it may have to take
    /// over).
    fn needs_chosen(&self) -> bool {
        let Some(h) = self.hint() else { return true };
        let names_me = *h.authority == self.me
            || self
                .known()
                .is_some_and(|r| r.addons_by.as_ref() == Some(&self.me));
        names_me
            || self.st.phase.cluster() != Some(h.cluster)
            || self.missing_since.contains_key(h.authority)
    }

    /// The next record change this member should propose, if any.
    fn member_op(&self, now: Duration, role: Role) -> Option<Op> {
        let hint = self.known()?;
        let rec = self.chosen()?;
        // Someone announces a newer record with another cluster (I may be a deposed seed) or
        // another authority (maybe me, by a takeover I never saw finish): learn the record.
        // Other news reaches members as acceptors anyway.
        let newer_elsewhere = self.peers.values().any(|p| {
            let newer = p
                .ann
                .record_ballot
                .as_ref()
                .is_some_and(|b| self.st.known.as_ref().is_none_or(|k| *b > k.ballot));
            let differs = p.ann.cluster.as_ref().is_some_and(|c| *c != hint.cluster)
                || p.ann
                    .authority
                    .as_ref()
                    .is_some_and(|a| *a != hint.authority);
            newer && differs
        });
        // My known record names another cluster (a re-election replaced mine): confirm it.
        let mine_replaced = self.st.phase.cluster() != Some(&hint.cluster);
        // A record names me as addon enabler but I never saw it chosen (crash): confirm it.
        let unconfirmed_claim =
            hint.addons_by.as_ref() == Some(&self.me) && !self.st.addons_claimed;
        // A record names me as slot authority (my takeover may have been chosen unseen).
        let unconfirmed_authority = hint.authority == self.me && !self.is_authority();
        if (newer_elsewhere || mine_replaced || unconfirmed_claim || unconfirmed_authority)
            && now >= self.next_refresh
        {
            return Some(Op::Refresh);
        }
        let claimer = rec.addons_by.as_ref() == Some(&self.me);
        if self.is_authority() {
            return self.authority_op(now, rec);
        }
        if role != Role::ControlPlane || !rec.members.contains_key(&self.me) {
            return None;
        }
        if claimer && self.st.addons_done && !rec.addons_done {
            return Some(Op::AddonsDone);
        }
        // Takeover: the authority (per the newest record known) has been gone for a while
        // and I am the best live control-plane member. The round re-checks all of it.
        let gone = self
            .missing_since
            .get(&hint.authority)
            .is_some_and(|t| now.saturating_sub(*t) >= self.params.takeover_after);
        if !gone {
            return None;
        }
        let best = hint
            .control_plane_members()
            .filter(|id| {
                **id != hint.authority && (**id == self.me || self.peers.contains_key(*id))
            })
            .min_by_key(|id| {
                let pr = if **id == self.me {
                    self.params.priority
                } else {
                    self.peers.get(*id).map_or(0, |p| p.ann.priority)
                };
                rank(pr, id)
            })?;
        (*best == self.me).then(|| Op::Takeover {
            old: hint.authority.clone(),
        })
    }

    fn authority_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        // 1. join results. The round that records one also grants the slot it frees to the
        // next requester and claims the addons if HA is complete (each change is re-checked
        // by `apply` on the record read, exactly as in a round of its own), so a join costs
        // one round rather than two.
        if let Some((node, (seq, role, ok))) = self.reports.iter().next() {
            let mut ops = vec![Op::Confirm {
                node: node.clone(),
                seq: *seq,
                role: *role,
                ok: *ok,
            }];
            if rec.slot.as_ref().is_some_and(|s| s.node == *node) {
                if let Some((to, req)) = self.next_requester(Some(node)) {
                    ops.push(Op::Grant { to, req });
                }
            }
            if self.params.addons_wanted && rec.addons_by.is_none() {
                ops.push(Op::ClaimAddons);
            }
            return Some(if ops.len() == 1 {
                ops.remove(0)
            } else {
                Op::Batch(ops)
            });
        }
        // 2. reclaim a timed-out slot
        if let (Some(s), Some((seq, since))) = (&rec.slot, self.slot_watch) {
            if s.seq == seq && now.saturating_sub(since) >= self.params.slot_timeout {
                return Some(Op::Reclaim { seq });
            }
        }
        // 3. grant the free slot (pinned control-plane nodes first, then by rank); a request
        // from the slot holder itself means its join ended without a report reaching us.
        let next = match &rec.slot {
            Some(s) => self
                .requests
                .get(&s.node)
                .map(|(req, _)| (s.node.clone(), *req)),
            None => self.next_requester(None),
        };
        if let Some((to, req)) = next {
            return Some(Op::Grant { to, req });
        }
        // 4. addons once HA formed
        if self.params.addons_wanted
            && rec.addons_by.is_none()
            && rec.control_plane_members().count() >= self.params.ha_size()
        {
            return Some(Op::ClaimAddons);
        }
        if rec.addons_by.as_ref() == Some(&self.me) && self.st.addons_done && !rec.addons_done {
            return Some(Op::AddonsDone);
        }
        None
    }
}
