//! The slot authority role: the control-plane member the chosen record names `authority`. It
//! collects slot requests and join reports, and turns them into rounds on the record: confirm
//! a join (batched with the next grant and the addon claim), reclaim a timed-out slot, grant
//! the free slot, claim the addons once HA formed. Any other node answers requests and reports
//! with `NotAuthority` and a hint.
//!
//! To extend: a new authority duty is one more step in [`Node::authority_op`] (in priority
//! order), an [`super::Op`] with its pure change in `record.rs`, and its follow-up in
//! `Node::follow_up`.

use std::time::Duration;

use super::{rank, Node, Op};
use crate::events::{Action, Message};
use crate::types::{ClusterId, NodeId, Phase, Record};
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

    /// Keeps the slot timer running (even while a round is in flight) and forgets requests
    /// not repeated for three retry intervals.
    pub(super) fn watch_slot(&mut self, now: Duration) {
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

    /// The authority's next record change on the chosen record `rec`, if any.
    pub(super) fn authority_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        debug_assert!(
            self.is_authority() && self.chosen() == Some(rec),
            "{}: authority duties without being the authority of the chosen record",
            self.me
        );
        // 1. join results. The round that records one also grants the slot it frees to the
        // next requester and claims the addons if HA is complete (each change is re-checked
        // by `apply` on the record read, exactly as in a round of its own), so a join costs
        // one round rather than two.
        if let Some(op) = self.confirm_op(rec) {
            return Some(op);
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
            // Every grant carries my join point: none before MicroK8s here is known.
            _ if self.join_point.is_none() => None,
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

    /// The round recording the first join report kept: the Confirm, batched with the grant of
    /// the slot it frees and the addon claim.
    fn confirm_op(&self, rec: &Record) -> Option<Op> {
        let (node, (seq, role, ok)) = self.reports.iter().next()?;
        let mut ops = vec![Op::Confirm {
            node: node.clone(),
            seq: *seq,
            role: *role,
            ok: *ok,
        }];
        if rec.slot.as_ref().is_some_and(|s| s.node == *node) && self.join_point.is_some() {
            if let Some((to, req)) = self.next_requester(Some(node)) {
                ops.push(Op::Grant { to, req });
            }
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
