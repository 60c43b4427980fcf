//! The proposer role: runs one Paxos round at a time ([`Round`]) that reads the record from a
//! quorum of promises, applies an [`Op`] to the newest record read ([`super::apply`]) and has
//! the result accepted; then aligns this node's phase with the chosen record and performs the
//! op's follow-up (sends the grant, the confirmation).
//!
//! A round that is refused or times out is dropped; the role that wanted it retries later with
//! a higher ballot. Every Accept also asks for a promise of the proposer's next ballot, kept in
//! [`Prepared`], so the next round of a busy slot authority skips phase 1.
//!
//! To extend: a new [`Op`]'s follow-up goes in [`Node::follow_up`]; quorum rules live in
//! [`Node::try_write`] (reads) and [`Node::on_accepted`] (writes) and must keep the safety
//! argument in [`crate`] true.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{apply, Node, Op};
use crate::events::{Action, Message};
use crate::types::{Accepted, Ballot, NodeId, Phase, Record};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stage {
    Reading,
    Writing,
}

/// The round in flight.
#[derive(Debug, Clone)]
pub(super) struct Round {
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
pub(super) struct Prepared {
    next: Ballot,
    base: Accepted,
    promises: BTreeSet<NodeId>,
}

impl Node {
    /// The op of the round in flight, if any.
    pub(super) fn round_op(&self) -> Option<&Op> {
        self.round.as_ref().map(|r| &r.op)
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

    pub(super) fn can_propose(&self, now: Duration) -> bool {
        self.round.is_none() && now >= self.backoff_until
    }

    fn backoff(&self) -> Duration {
        // Deterministic spread so that competing proposers do not retry in lockstep.
        let h = self
            .me
            .as_str()
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        self.params.round_timeout / 4 * (1 + (h % 4) as u32)
    }

    /// Who my round's Prepares and Accepts go to. After I saw a record chosen, its electorate:
    /// a read and a write then need only a majority of it (see [`Node::try_write`]), so the
    /// other nodes of a large cluster stay idle. Before, everybody I see and the electorate of
    /// the newest record I heard of (the read needs the pre-election quorum).
    ///
    /// During a handover (a joint step) both electorates count, and a record newer than the
    /// one I saw chosen may name another electorate: the targets are every quorum set of the
    /// chosen and of the newest known record, and of the round's own proposal.
    fn targets(&self) -> BTreeSet<NodeId> {
        let mut t: BTreeSet<NodeId> = match self.chosen() {
            Some(r) => r.quorum_sets().flatten().cloned().collect(),
            None => self.peers.keys().cloned().collect(),
        };
        if let Some(r) = self.known() {
            t.extend(r.quorum_sets().flatten().cloned());
        }
        if let Some(p) = self.round.as_ref().and_then(|r| r.proposal.as_ref()) {
            t.extend(p.quorum_sets().flatten().cloned());
        }
        t.remove(&self.me);
        t
    }

    pub(super) fn start_round(&mut self, now: Duration, op: Op, out: &mut Vec<Action>) {
        // One round at a time (callers check `can_propose`), and none before the node is
        // prepared.
        debug_assert!(
            self.round.is_none(),
            "{}: {op:?} started over {}",
            self.me,
            self.debug_round()
        );
        debug_assert!(
            self.st.phase != Phase::Preparing,
            "{}: {op:?} started while preparing",
            self.me
        );
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

    pub(super) fn on_promise(
        &mut self,
        now: Duration,
        from: NodeId,
        ballot: Ballot,
        accepted: Option<Accepted>,
        out: &mut Vec<Action>,
    ) {
        let before = self.targets();
        if let Some(acc) = &accepted {
            self.learn(acc);
        }
        let Some(round) = self.round.as_ref() else {
            return;
        };
        if round.ballot != ballot || round.stage != Stage::Reading {
            return;
        }
        // The promise named a record with another electorate (a handover): ask its members
        // at once, the read needs a majority of them too.
        for to in self.targets().difference(&before) {
            if !round.promises.contains_key(to) {
                out.push(Action::Send {
                    to: to.clone(),
                    msg: Message::Prepare {
                        ballot: round.ballot.clone(),
                    },
                });
            }
        }
        let Some(round) = self.round.as_mut() else {
            return;
        };
        round.promises.insert(from, accepted);
        self.try_write(now, out);
    }

    /// Phase 2: once the promises make a read quorum, applies the round's op to the newest
    /// record among them and asks the targets to accept the result.
    ///
    /// The read quorum: a majority of every quorum set ([`Record::quorum_sets`]: the
    /// electorate, and the old one during a handover) of the newest record among the promises
    /// and `C` (the record I saw chosen), and of the newest heard of; and, unless I saw a
    /// record chosen, the pre-election quorum `Q` in all. A proposer that saw `C` chosen
    /// starts from the newest of the promises and `C` itself; the safety argument in [`crate`]
    /// ("Handover") shows that this base is the latest chosen record or a later one, as with
    /// a `Q` read, also across handovers.
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
        // Every quorum set of the newest record read (and of the newest heard of) must be
        // represented by a majority among the promises: both electorates during a handover.
        // (The record I saw chosen is among the candidates for the newest: when nothing newer
        // came back, its sets are the ones checked.)
        let newest = [highest.as_ref(), self.st.known.as_ref()];
        for rec in newest.into_iter().flatten() {
            if !rec.record.has_quorum(round.promises.keys()) {
                return;
            }
        }
        let cur = highest.as_ref().map(|h| &h.record);
        let Some(mut proposal) = apply(&round.op, cur, &round.ballot, &self.me, &self.params)
        else {
            // Nothing to write: there is no record.
            let op = round.op.clone();
            self.round = None;
            if op == Op::Refresh {
                self.no_record(out);
            }
            return;
        };
        // A joint step ends only on the record I saw chosen: then a majority of the old
        // electorate holds it (or a later record), so every reader that still knows only the
        // old electorate finds the new one (see the safety argument in [`crate`]).
        if let Some(h) = &highest {
            let seen_chosen = chosen.is_some_and(|c| c.ballot == h.ballot);
            if h.record.electorate_old.is_some()
                && proposal.electorate_old.is_none()
                && !seen_chosen
            {
                proposal.electorate_old = h.record.electorate_old.clone();
            }
        }
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

    pub(super) fn on_accepted(
        &mut self,
        now: Duration,
        from: NodeId,
        ballot: Ballot,
        next: Option<Ballot>,
        out: &mut Vec<Action>,
    ) {
        self.catch_up_accepted(&from, &ballot);
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
        // A majority of every quorum set of the value written (both electorates during a
        // handover).
        if !proposal.has_quorum(round.accepts.iter()) {
            return;
        }
        if round.base_none && round.accepts.len() < self.params.election_quorum() {
            return;
        }
        let Some(round) = self.round.take() else {
            return;
        };
        let accepts = round.accepts.clone();
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
        // My ballots only grow, and a node sees a record chosen only by its own rounds.
        debug_assert!(
            self.st
                .chosen
                .as_ref()
                .is_none_or(|c| c.ballot < acc.ballot),
            "{}: chosen at {} after {:?}",
            self.me,
            acc.ballot,
            self.st.chosen.as_ref().map(|c| &c.ballot)
        );
        self.learn(&acc);
        self.st.chosen = Some(acc.clone());
        self.chosen_since = now;
        self.catch_up.chosen(accepts);
        self.round_done(now, round.op, acc.record, out);
    }

    /// A refusal of my round at `ballot`: drop the round and back off.
    pub(super) fn on_nack(
        &mut self,
        now: Duration,
        from: NodeId,
        ballot: Ballot,
        promised: Ballot,
    ) {
        self.st.max_ballot = self.st.max_ballot.max(promised.n);
        if self.round.as_ref().is_some_and(|r| r.ballot == ballot) {
            self.round = None;
            self.backoff_until = now + self.backoff();
            self.dirty = true;
        } else {
            self.catch_up_refused(&from, &ballot);
        }
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
        self.align_phase(&record, out);
    }

    /// The phase a chosen `record` implies: a member of it, or waiting for a slot in it when
    /// I was discovering or my phase names another cluster (I am a deposed seed).
    fn align_phase(&mut self, record: &Record, out: &mut Vec<Action>) {
        // A member (or a confirming joiner) the record removed while it was away leaves and
        // joins again (`removed.rs`).
        if self.leave_if_removed(record, out) {
            return;
        }
        // A node that is not a member by its own state, listed in a record in which things
        // happened since its election, is an earlier life of this node (re-flashed with the
        // same id, its MicroK8s fresh): it must join again, never take the place as it is.
        // (A seed that crashed before it saw its own election chosen finds the record
        // untouched: nobody can have joined it yet.)
        let lost_state = !matches!(
            self.st.phase,
            Phase::Member { .. } | Phase::Joining { .. } | Phase::Confirming { .. }
        ) && !record.is_untouched();
        if let Some(role) = record.members.get(&self.me).filter(|_| !lost_state) {
            let phase = Phase::Member {
                cluster: record.cluster.clone(),
                role: *role,
            };
            self.set_phase(phase, out);
            return;
        }
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

    /// What the proposer of `op` does once `record` (the result of `op`) is chosen.
    fn follow_up(&mut self, now: Duration, op: Op, record: &Record, out: &mut Vec<Action>) {
        match op {
            Op::Batch(ops) => {
                for op in ops {
                    self.follow_up(now, op, record, out);
                }
            }
            Op::Grant { to, req } => {
                let slot = record.slot_of(&to);
                if let (Some(s), Some(via)) = (slot, self.join_point.clone()) {
                    self.slot_watch.insert(s.seq, now);
                    out.push(Action::Send {
                        to: to.clone(),
                        msg: Message::SlotGrant {
                            req,
                            cluster: record.cluster.clone(),
                            seq: s.seq,
                            role: s.role,
                            via,
                        },
                    });
                    self.requests.remove(&to);
                }
            }
            Op::Confirm { node, ok, .. } => {
                self.reports.remove(&node);
                // A request of its kept from before its join asks for nothing any more.
                if ok {
                    self.requests.remove(&node);
                }
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

    /// Abandons a round that took too long; re-sends its current message to acceptors that
    /// have not answered yet (messages get lost).
    pub(super) fn drive_round(&mut self, now: Duration, out: &mut Vec<Action>) {
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
}
