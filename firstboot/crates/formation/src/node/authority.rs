//! The slot authority role: the control-plane member the chosen record names `authority`. It
//! collects slot requests and join reports, and turns them into rounds on the record: confirm
//! the joins reported (batched with the grants of the slots they free and the addon claim),
//! reclaim a timed-out slot, grant free slots, claim the addons once HA formed. Any other node
//! answers requests and reports with `NotAuthority` and a hint.
//!
//! Slots: a control-plane join runs alone; worker joins run up to
//! [`crate::FormationParams::join_parallelism`] at once, never beside a control-plane join
//! ([`crate::Record::may_grant`], checked again by `apply` on the record each round reads).
//! Grants go to the waiting nodes in order (pinned control-plane nodes first, then by rank);
//! the first one that cannot be granted stops the round's grants, so a control-plane joiner
//! that waits for worker joins to drain is not overtaken by later workers.
//!
//! To extend: a new authority duty is one more step in [`Node::authority_op`] (in priority
//! order), an [`super::Op`] with its pure change in `record.rs`, and its follow-up in
//! `Node::follow_up`.

use std::time::Duration;

use super::{apply, rank, Node, Op};
use crate::events::{Action, Message};
use crate::types::{Ballot, ClusterId, NodeId, Phase, Record};
use rackseed_config::Role;

impl Node {
    /// Whether I am the slot authority: a control-plane member named authority by a record I
    /// saw chosen.
    pub(super) fn is_authority(&self) -> bool {
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
        self.round_op()
            .is_some_and(|op| matches!(op, Op::Elect { .. } | Op::Takeover { .. }))
            || self.known().is_some_and(|r| r.authority == self.me)
    }

    /// Answers `to` that I am not the authority, naming the one I know of.
    fn refer_to_authority(&self, to: NodeId, out: &mut Vec<Action>) {
        let hint = self
            .hint()
            .map(|h| h.authority.clone())
            .filter(|a| *a != self.me);
        out.push(Action::Send {
            to,
            msg: Message::NotAuthority { hint },
        });
    }

    /// A slot request `req` from `from`: keep it (as authority, or as a node that may soon
    /// be one), confirm a member that asks again, or refer it to the authority.
    pub(super) fn on_slot_request(
        &mut self,
        now: Duration,
        from: NodeId,
        req: u64,
        out: &mut Vec<Action>,
    ) {
        if self.is_authority() {
            let member = self
                .chosen()
                .and_then(|r| Some((r.cluster.clone(), *r.members.get(&from)?)));
            match member {
                // A recorded member that asks for a slot and announces that it is not a
                // member lost its state (re-flashed with the same id): kept, and readmitted
                // by the next round (`rejoin_op`).
                Some(_) if self.announces_not_member(now, &from) => {
                    self.requests.insert(from, (req, now));
                }
                // The worker being converted left and asks for its control-plane slot: kept,
                // and taken out of the members by the next round (`converted_left_op`).
                Some(_) if self.is_converting(&from) => {
                    self.requests.insert(from, (req, now));
                }
                Some((cluster, role)) => out.push(Action::Send {
                    to: from,
                    msg: Message::JoinConfirmed { cluster, role },
                }),
                None => {
                    self.requests.insert(from, (req, now));
                }
            }
        } else if self.may_become_authority() {
            // Keep it for when my round completes: the requester would otherwise only ask
            // again after its retry interval.
            self.requests.insert(from, (req, now));
        } else {
            self.refer_to_authority(from, out);
        }
    }

    /// `from`'s join report for slot `seq` of `cluster`: keep it for the next round, confirm a
    /// member again, or refer it to the authority.
    pub(super) fn on_join_report(
        &mut self,
        from: NodeId,
        cluster: ClusterId,
        seq: u64,
        role: Role,
        ok: bool,
        out: &mut Vec<Action>,
    ) {
        if !self.is_authority() {
            self.refer_to_authority(from, out);
            return;
        }
        if self.chosen().is_none_or(|r| r.cluster != cluster) {
            self.ignored += 1;
            return;
        }
        // A report of a node the record removed or released (no member, no slot, no
        // tentative place): it is told so, and records nothing (`removed.rs`).
        if let Some(rec) = self.chosen().filter(|r| r.was_removed(&from)) {
            let cluster = rec.cluster.clone();
            self.tell_removed(from, cluster, out);
            return;
        }
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
    }

    /// Keeps the slot timers running (even while a round is in flight: each slot's from when
    /// I first saw it) and forgets requests not repeated for [`Node::request_ttl`].
    pub(super) fn watch_slot(&mut self, now: Duration) {
        let seqs: Vec<u64> = self
            .chosen()
            .map(|r| r.slots.iter().map(|s| s.seq).collect())
            .unwrap_or_default();
        self.slot_watch.retain(|seq, _| seqs.contains(seq));
        for seq in seqs {
            self.slot_watch.entry(seq).or_insert(now);
        }
        let fresh = self.request_ttl();
        self.requests
            .retain(|_, (_, at)| now.saturating_sub(*at) <= fresh);
    }

    /// How long the authority keeps a slot request that is not repeated: three retry
    /// intervals, or two of a waiting node's longest backoff ([`Node::request_backoff_cap`]),
    /// whichever is longer (with the agent's timings 20 s, under `grant_max_age`, so a grant
    /// for a kept request is still fresh at its joiner).
    pub(super) fn request_ttl(&self) -> Duration {
        (self.params.retry_interval * 3).max(self.request_backoff_cap() * 2)
    }

    /// The waiting nodes in the order they get free slots (pinned control-plane nodes first,
    /// then by rank), other than `except`.
    fn requesters_in_order(&self, except: &[&NodeId]) -> Vec<(NodeId, u64)> {
        let mut v: Vec<_> = self
            .requests
            .iter()
            .filter(|(id, _)| !except.contains(id))
            .map(|(id, (req, _))| {
                let pinned_cp = self.params.pinned_roles.get(id) == Some(&Role::ControlPlane);
                let pr = self.peers.get(id).map_or(0, |p| p.ann.priority);
                ((!pinned_cp, rank(pr, id)), id.clone(), *req)
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, id, req)| (id, req)).collect()
    }

    /// The grants for the free slots of `rec` (the record as the round's earlier changes leave
    /// it), in order, other than to `except`: each is tried on a scratch copy with [`apply`],
    /// the very rule the round applies, and the first refused one ends the list.
    fn grants_for(&self, rec: &Record, except: &[&NodeId]) -> Vec<Op> {
        let mut scratch = rec.clone();
        let ballot = Ballot {
            n: 0,
            node: self.me.clone(),
        };
        let mut ops = Vec::new();
        for (to, req) in self.requesters_in_order(except) {
            // A member is readmitted first (`rejoin_op`), and a removed node rejoining waits
            // for its own `remove-node`; until then they wait their turn without holding up
            // the others.
            if scratch.slot_of(&to).is_some()
                || scratch.members.contains_key(&to)
                || scratch.removal_pending(&to)
            {
                continue;
            }
            let op = Op::Grant {
                to: to.clone(),
                req,
            };
            match apply(&op, Some(&scratch), &ballot, &self.me, &self.params) {
                Some(next) if next.slot_of(&to).is_some() => {
                    scratch = next;
                    ops.push(op);
                }
                _ => break,
            }
        }
        ops
    }

    /// The authority's next record change on the chosen record `rec`, if any.
    pub(super) fn authority_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        debug_assert!(
            self.is_authority() && self.chosen() == Some(rec),
            "{}: authority duties without being the authority of the chosen record",
            self.me
        );
        // 1. join results. The round that records them also grants the slots they free to the
        // next requesters and claims the addons if HA is complete (each change is re-checked
        // by `apply` on the record read, exactly as in a round of its own), so a join costs
        // one round rather than two.
        if let Some(op) = self.confirm_op(rec) {
            return Some(op);
        }
        // 2. reclaim a timed-out slot
        for s in &rec.slots {
            let since = self.slot_watch.get(&s.seq);
            if since.is_some_and(|t| now.saturating_sub(*t) >= self.params.slot_timeout) {
                return Some(Op::Reclaim { seq: s.seq });
            }
        }
        // 2a. the worker being converted left (`convert.rs`); readmit members whose state is
        // gone (they ask for a slot again).
        if let Some(op) = self.converted_left_op(rec) {
            return Some(op);
        }
        if let Some(op) = self.rejoin_op(now, rec) {
            return Some(op);
        }
        // 2b. heal: record finished removals, end a handover, remove dead members, hand a
        // dead electorate member's vote over (`healing.rs`).
        if let Some(op) = self.healing_op(now, rec) {
            return Some(op);
        }
        // 3. grant free slots (pinned control-plane nodes first, then by rank); a request
        // from a slot holder itself means its join ended without a report reaching us, and
        // it is granted again. Every grant carries my join point: none before MicroK8s here
        // is known.
        if self.join_point.is_some() {
            let mut ops: Vec<Op> = rec
                .slots
                .iter()
                .filter_map(|s| {
                    let (req, _) = self.requests.get(&s.node)?;
                    Some(Op::Grant {
                        to: s.node.clone(),
                        req: *req,
                    })
                })
                .collect();
            ops.extend(self.grants_for(rec, &[]));
            match ops.len() {
                0 => {}
                1 => return ops.pop(),
                _ => return Some(Op::Batch(ops)),
            }
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
        // 5. keep the members' addresses (for `remove-node` once one dies)
        if let Some(op) = self.addresses_op(rec) {
            return Some(op);
        }
        // 6. a member of the electorate stays behind the record (`catch_up.rs`): any round of
        // mine reaches it; with nothing else to do, a Refresh.
        self.catch_up.round.then_some(Op::Refresh)
    }

    /// The round recording every join report kept: the Confirms, batched with the grants of
    /// the slots they free and the addon claim.
    fn confirm_op(&self, rec: &Record) -> Option<Op> {
        if self.reports.is_empty() {
            return None;
        }
        let ballot = Ballot {
            n: 0,
            node: self.me.clone(),
        };
        let mut ops = Vec::new();
        let mut after = rec.clone();
        for (node, (seq, role, ok)) in &self.reports {
            let op = Op::Confirm {
                node: node.clone(),
                seq: *seq,
                role: *role,
                ok: *ok,
            };
            if let Some(next) = apply(&op, Some(&after), &ballot, &self.me, &self.params) {
                after = next;
            }
            ops.push(op);
        }
        if after.slots.len() < rec.slots.len() && self.join_point.is_some() {
            let reporters: Vec<&NodeId> = self.reports.keys().collect();
            ops.extend(self.grants_for(&after, &reporters));
        }
        if self.params.addons_wanted && rec.addons_by.is_none() {
            ops.push(Op::ClaimAddons);
        }
        Some(if ops.len() == 1 {
            ops.remove(0)
        } else {
            Op::Batch(ops)
        })
    }
}
