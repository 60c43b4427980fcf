//! Converting a worker to a control-plane member, when the control plane fell below
//! `control_plane` (a dead voter was removed) and nothing else fills the place: no standby
//! that MicroK8s promotes by itself (standbys are full members and count), no new machine
//! waiting for a slot (it would get the control-plane place anyway).
//!
//! 1. The slot authority decides it by a round ([`Op::Convert`]): the record holds at most
//!    one conversion, and `apply` refuses a second, so two workers are never converted at
//!    once, and a minority (no majority of the electorate) converts nobody. The worker
//!    chosen is the best-ranked live worker member announcing `Member` (not one pinned to
//!    worker).
//! 2. The authority asks it ([`Message::Convert`], repeated every retry interval until it
//!    left); the worker runs `microk8s leave` ([`Action::Leave`]; what it does is in
//!    `firstboot`'s `system::microk8s` docs) and, once it left, waits for a slot like any
//!    new node (`Member` → `WaitingForSlot` of the same cluster, the one phase change a
//!    member makes besides a deposed seed's).
//! 3. Its slot request (while it announces that it is no member) makes the authority take it
//!    out of the members ([`Op::ConvertLeft`]) with a removal marked `left`: `microk8s
//!    remove-node <ip>` *without* `--force` ([`Action::RemoveNode`]; a node that left holds
//!    no dqlite entry, and canonical/microk8s `scripts/wrappers/remove_node.py` then only
//!    deletes its Node object and tokens). A control-plane slot waits for that removal, as
//!    for every removal ([`crate::Record::may_grant`]).
//! 4. Its request is granted as control plane (the place is free), it joins without
//!    `--worker`, and the Confirm that records it ends the conversion.
//!
//! The conversion ends early ([`Op::EndConversion`]) when the worker has not left yet and
//! the control plane is full again, or when it left and then stayed unseen for
//! `replace_after`; a worker removed as dead or re-flashed before it left ends it too, and
//! so does one released as a dead holder of a tentative place after it left (its
//! control-plane slot was reclaimed: that removal runs with `--force`, since its join may
//! have gone through; see the crate docs).

use std::time::Duration;

use super::{not_member, rank, Node, Op};
use crate::events::{Action, Message};
use crate::types::{ClusterId, NodeId, PendingLeave, Phase, Record};
use rackseed_config::Role;

impl Node {
    /// The authority's conversion step on the chosen record `rec`: end a conversion no longer
    /// needed, or start one when the control plane is below target and only a worker can
    /// fill it.
    pub(super) fn conversion_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        let target = self.params.control_plane as usize;
        let counted = rec.control_plane_count();
        if let Some(c) = &rec.converting {
            let member = rec.members.contains_key(&c.node);
            let gone = !member && self.is_dead(now, &c.node);
            return ((member && counted >= target) || gone).then(|| Op::EndConversion {
                node: c.node.clone(),
            });
        }
        if counted >= target || !rec.slots.is_empty() || !rec.removed.iter().all(|x| x.done) {
            return None;
        }
        // A new machine waiting for a slot takes the control-plane place itself.
        let newcomer = self.requests.keys().any(|id| {
            !rec.members.contains_key(id) && self.params.pinned_roles.get(id) != Some(&Role::Worker)
        });
        if newcomer {
            return None;
        }
        let node = rec
            .members
            .iter()
            .filter(|(id, role)| {
                **role == Role::Worker
                    && self.params.pinned_roles.get(*id) != Some(&Role::Worker)
                    && self
                        .peers
                        .get(*id)
                        .is_some_and(|p| p.ann.phase == crate::types::PhaseSummary::Member)
            })
            .map(|(id, _)| {
                let pr = self.peers.get(id).map_or(0, |p| p.ann.priority);
                (rank(pr, id), id.clone())
            })
            .min()?
            .1;
        let why = rec
            .removed
            .last()
            .map(|x| format!(" after {} was removed", x.node))
            .unwrap_or_default();
        Some(Op::Convert {
            reason: format!(
                "control plane at {counted} of {target}{why} and no standby for MicroK8s to \
                 promote: worker {node} converted to control plane by {}",
                self.me
            ),
            node,
        })
    }

    /// The worker being converted asks for a slot and announces that it is no member: it
    /// left. Out of the members, its `remove-node` (without `--force`) to follow.
    pub(super) fn converted_left_op(&self, rec: &Record) -> Option<Op> {
        let c = rec.converting.as_ref()?;
        let left = rec.members.get(&c.node) == Some(&Role::Worker)
            && self.requests.contains_key(&c.node)
            && self
                .peers
                .get(&c.node)
                .is_some_and(|p| not_member(p.ann.phase));
        left.then(|| Op::ConvertLeft {
            node: c.node.clone(),
            ip: self.last_ip.get(&c.node).copied(),
        })
    }

    /// Whether the chosen record converts `id` (its slot requests are kept, not answered
    /// with a confirmation of its worker membership).
    pub(super) fn is_converting(&self, id: &NodeId) -> bool {
        self.chosen()
            .and_then(|r| r.converting.as_ref())
            .is_some_and(|c| c.node == *id)
    }

    /// The authority asks the worker being converted to leave, every retry interval until
    /// it did.
    pub(super) fn drive_conversion(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !self.is_authority() {
            return;
        }
        let Some(rec) = self.chosen() else { return };
        let Some(c) = rec.converting.as_ref() else {
            self.convert_sent = None;
            return;
        };
        if rec.members.get(&c.node) != Some(&Role::Worker) {
            return;
        }
        if self
            .convert_sent
            .is_some_and(|t| now >= t && now - t < self.params.retry_interval)
        {
            return;
        }
        let msg = Message::Convert {
            cluster: rec.cluster.clone(),
            reason: c.reason.clone(),
        };
        let to = c.node.clone();
        self.convert_sent = Some(now);
        out.push(Action::Send { to, msg });
    }

    /// The authority (`from`) asks this worker to leave and join again as control plane.
    pub(super) fn on_convert(
        &mut self,
        from: NodeId,
        cluster: ClusterId,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        let worker_here = matches!(
            &self.st.phase,
            Phase::Member { cluster: c, role: Role::Worker } if *c == cluster
        );
        let from_authority = self.hint().is_some_and(|h| *h.authority == from);
        if !worker_here || !from_authority || self.st.leaving.is_some() {
            self.ignored += 1;
            return;
        }
        self.start_leave(cluster, reason, out);
    }

    /// Runs `microk8s leave` for `cluster`, its intent persisted first (after a crash it runs
    /// again: [`crate::PersistedState::leaving`]).
    pub(super) fn start_leave(
        &mut self,
        cluster: ClusterId,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        self.st.leaving = Some(PendingLeave {
            cluster: cluster.clone(),
            reason: reason.clone(),
        });
        self.persist(out);
        out.push(Action::Leave { cluster, reason });
    }

    /// Result of [`Action::Leave`] (a worker being converted, or a node the record removed,
    /// `removed.rs`): once left, wait for a slot in the same cluster; a failure is retried at
    /// the authority's next request (or its next hint of the removal).
    pub(super) fn on_left(&mut self, res: Result<(), String>, out: &mut Vec<Action>) {
        if self.st.leaving.take().is_some() {
            self.persist(out);
        }
        let cluster = match &self.st.phase {
            Phase::Member { cluster, .. } | Phase::Confirming { cluster, .. } => cluster.clone(),
            _ => {
                self.ignored += 1;
                return;
            }
        };
        match res {
            Ok(()) => {
                self.set_phase(Phase::WaitingForSlot { cluster }, out);
                // Ask at once: the authority waits for this request.
                self.last_request = None;
                self.request_backoff = 0;
            }
            Err(e) => {
                self.last_error = Some(format!(
                    "leaving cluster {cluster} to join it again failed: {e}"
                ));
            }
        }
    }
}
