//! A node the record removed while it was away comes back: it was unseen by the slot
//! authority for `replace_after` (powered off, or cut off by a partition), so the record
//! removed it ([`Op::Remove`]) or released its tentative place, and the authority ran
//! `microk8s remove-node <ip> --force`. The node itself still believes it is joined.
//!
//! What such a node looks like in MicroK8s (canonical/microk8s, read at commit 3f595537):
//! `scripts/wrappers/remove_node.py` with `--force` deletes the node's dqlite endpoint (`dqlite
//! … .remove <ip>:19001`, only when one is registered at that address), its callback and
//! kubelet tokens and its Kubernetes Node object, all on the survivors; nothing on the removed
//! node changes: its `backend/cluster.yaml`, certificates and `clustered.lock` still say it
//! is in the cluster, while dqlite no longer counts it (a worker keeps its kubelet
//! credentials but lost its Node object). `scripts/wrappers/leave.py` then resets it: a
//! control-plane node asks dqlite for the endpoints (its own is no longer listed, so it
//! deletes nothing), wipes `var/kubernetes/backend`, makes new cluster certificates and
//! starts as a lone node; a worker (`no-k8s-dqlite` lock) is reset locally without asking
//! the cluster. After that it can join through a slot like any new node, and the address
//! is free in dqlite ("already known to dqlite" only while an endpoint stays registered).
//!
//! So:
//! 1. The record never counts it as a member again on its own word: a join report from a
//!    node holding no slot and no tentative place records nothing ([`crate::node::apply`],
//!    `record_join_result`), so a late report after a release does not make a member that
//!    dqlite no longer has.
//! 2. The authority tells a node that acts as a member (announces `Member`, or reports a
//!    join) although its chosen record removed it ([`Message::Removed`], every retry
//!    interval). That is only a hint: the node runs a Refresh round of its own and acts only
//!    if the record that round *chooses* lists it as removed and holding nothing (decided by
//!    a majority of the electorate, so a minority never makes a node leave; a stale or forged
//!    hint costs one round). It then runs `microk8s leave` ([`Action::Leave`]) and, once
//!    left, waits for a slot in the same cluster like a new node.
//! 3. Its slot waits until its own removal is carried out ([`crate::Record::removal_pending`]):
//!    a forced removal after its new join would take the new membership out of dqlite (or
//!    delete a new worker's Node object). A control-plane slot waits for every removal
//!    anyway. Its role is counted afresh: its old place was freed by the removal.
//!
//! To extend: another kind of stale membership is one more case in [`Node::removed_from`].

use std::time::Duration;

use super::{Node, Op};
use crate::events::{Action, Message};
use crate::types::{ClusterId, NodeId, Phase, PhaseSummary, Record};

impl Node {
    /// Authority: tells `to` that the record removed it (see the module docs).
    pub(super) fn tell_removed(&mut self, to: NodeId, cluster: ClusterId, out: &mut Vec<Action>) {
        out.push(Action::Send {
            to,
            msg: Message::Removed { cluster },
        });
    }

    /// Authority: tells every peer that announces itself a member (or a confirming joiner) of
    /// my cluster although the chosen record removed it, once per retry interval each.
    pub(super) fn drive_removed_peers(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !self.is_authority() {
            return;
        }
        let Some(rec) = self.chosen() else { return };
        let cluster = rec.cluster.clone();
        let stale: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| {
                p.ann.cluster.as_ref() == Some(&cluster)
                    && matches!(p.ann.phase, PhaseSummary::Member | PhaseSummary::Confirming)
                    && rec.was_removed(&p.ann.id)
            })
            .map(|p| p.ann.id.clone())
            .collect();
        self.removed_told.retain(|id, _| stale.contains(id));
        for id in stale {
            let due = self
                .removed_told
                .get(&id)
                .is_none_or(|t| now < *t || now - *t >= self.params.retry_interval);
            if due {
                self.removed_told.insert(id.clone(), now);
                self.tell_removed(id, cluster.clone(), out);
            }
        }
    }

    /// A hint that the record removed me from `cluster`: checked by a round of my own.
    pub(super) fn on_removed_notice(&mut self, cluster: ClusterId) {
        let mine = match &self.st.phase {
            Phase::Member { cluster: c, .. } | Phase::Confirming { cluster: c, .. } => {
                *c == cluster
            }
            _ => false,
        };
        if mine && self.st.leaving.is_none() {
            self.check_removal = true;
        } else {
            self.ignored += 1;
        }
    }

    /// While a hint is pending: a Refresh round (any role), at most once per retry interval.
    /// Its chosen record decides ([`Node::leave_if_removed`]).
    pub(super) fn drive_removal_check(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !self.check_removal || self.st.leaving.is_some() {
            return;
        }
        if self.can_propose(now) && now >= self.next_refresh {
            self.check_removal = false;
            self.next_refresh = now + self.params.retry_interval;
            self.start_round(now, Op::Refresh, out);
        }
    }

    /// The cluster a chosen `record` removed me from, if I act as its member (or as a
    /// confirming joiner of it) and it lists me removed and holding nothing.
    fn removed_from(&self, record: &Record) -> Option<ClusterId> {
        match &self.st.phase {
            Phase::Member { cluster, .. } | Phase::Confirming { cluster, .. }
                if *cluster == record.cluster && record.was_removed(&self.me) =>
            {
                Some(cluster.clone())
            }
            _ => None,
        }
    }

    /// On a record I saw chosen: if it removed me, run `microk8s leave`, then join again
    /// ([`Node::on_left`] waits for a slot). Returns whether it did.
    pub(super) fn leave_if_removed(&mut self, record: &Record, out: &mut Vec<Action>) -> bool {
        let Some(cluster) = self.removed_from(record) else {
            return false;
        };
        if self.st.leaving.is_some() {
            return true;
        }
        let why = record
            .removed
            .iter()
            .rev()
            .find(|x| x.node == self.me)
            .map(|x| x.reason.clone())
            .unwrap_or_default();
        let reason = format!(
            "the cluster record removed this node while it was away ({why}); leaving to join \
             again"
        );
        self.last_error = Some(reason.clone());
        self.check_removal = false;
        self.start_leave(cluster, reason, out);
        true
    }
}
