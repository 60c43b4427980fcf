//! Healing, a duty of the slot authority: members unseen for `replace_after` are removed from
//! the record ([`Op::Remove`]) and then from MicroK8s ([`Action::RemoveNode`], `microk8s
//! remove-node <ip> --force`, recorded done by [`Op::RemovalDone`]); so are the holders of
//! tentative places (a reclaimed slot: their join may have gone through) unseen that long,
//! which otherwise count against `control_plane` forever; a dead member of the
//! electorate is replaced by a live node through a joint step ([`Op::Handover`], then
//! [`Op::FinishHandover`]); the members' addresses are kept in the record
//! ([`Op::NoteAddresses`]) so a dead member can still be named to `remove-node`.
//!
//! "Unseen" is measured by the authority alone, on its own monotonic clock: a member counts as
//! missing once no announcement and no message came from it for `peer_timeout`, and is dead
//! once it has been unseen for `replace_after` in all (`missing_since + peer_timeout`). A new
//! authority (after a takeover or a restart) starts every clock afresh, so it waits a whole
//! `replace_after` before it removes anybody. Clocks of different nodes are never compared.
//!
//! Every decision is a round on the record, so it needs a majority of the electorate (both
//! electorates during a handover): a minority partition, even one holding the authority,
//! decides nothing, and two nodes never both decide a removal (the second round finds the
//! member gone, `apply` re-checks). Only the authority named by the record it saw chosen runs
//! `remove-node`; after a takeover the new authority runs the removals not yet recorded done
//! again, which MicroK8s tolerates (a node it no longer knows is reported, and counted here,
//! as removed).
//!
//! A control plane left below target by a removal, that no standby or new machine fills, gets
//! one worker converted (`convert.rs`), one at a time.
//!
//! To extend: a new healing step is one more case in [`Node::healing_op`], in priority order.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::{rank, Node, Op};
use crate::events::Action;
use crate::types::{NodeId, Record};
use rackseed_config::Role;

impl Node {
    /// How long `id` has been unseen by this node's clock, if it is missing at all.
    fn unseen_for(&self, now: Duration, id: &NodeId) -> Option<Duration> {
        let since = self.missing_since.get(id)?;
        Some(now.saturating_sub(*since) + self.params.peer_timeout)
    }

    /// Whether `id` counts as dead: unseen for `replace_after`.
    pub(super) fn is_dead(&self, now: Duration, id: &NodeId) -> bool {
        *id != self.me
            && self
                .unseen_for(now, id)
                .is_some_and(|d| d >= self.params.replace_after)
    }

    fn is_live(&self, id: &NodeId) -> bool {
        *id == self.me || self.peers.contains_key(id)
    }

    /// The authority's next healing change on the chosen record `rec`, if any.
    pub(super) fn healing_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        // 1. removals carried out: record them.
        let done: Vec<Op> = self
            .removals_done
            .iter()
            .filter(|n| rec.removed.iter().any(|x| x.node == **n && !x.done))
            .map(|n| Op::RemovalDone { node: n.clone() })
            .collect();
        if !done.is_empty() {
            return Some(batch(done));
        }
        // 2. end a joint step (the proposer keeps it unless it reads this very record).
        if rec.electorate_old.is_some() {
            return Some(Op::FinishHandover);
        }
        // 3. remove the dead members, and release the dead holders of tentative places (a
        // reclaimed slot whose join may have gone through: `remove-node --force` as well).
        let tentative = rec
            .tentative
            .keys()
            .filter(|id| !rec.members.contains_key(*id));
        let remove: Vec<Op> = rec
            .members
            .keys()
            .chain(tentative)
            .filter(|id| self.is_dead(now, id))
            .map(|id| {
                let secs = self.unseen_for(now, id).unwrap_or_default().as_secs();
                let what = if rec.members.contains_key(id) {
                    "removed"
                } else {
                    "its join unconfirmed (slot reclaimed), released"
                };
                Op::Remove {
                    node: id.clone(),
                    reason: format!(
                        "unseen for {}m{:02}s (replace-after {}s), {what} by {}",
                        secs / 60,
                        secs % 60,
                        self.params.replace_after.as_secs(),
                        self.me
                    ),
                    ip: self.last_ip.get(id).copied(),
                }
            })
            .collect();
        if !remove.is_empty() {
            return Some(batch(remove));
        }
        // 4. hand a dead electorate member's vote to a live node.
        if let Some(op) = self.handover_op(now, rec) {
            return Some(op);
        }
        // 5. a control plane below target that nothing else fills: convert one worker.
        self.conversion_op(now, rec)
    }

    /// Whether `id` has announced for a while (`peer_timeout / 2`, several of its
    /// re-announcements) that it is not a member of anything (preparing, discovering or
    /// waiting for a slot): a recorded member that announces so lost its state. A member
    /// keeps announcing `Member` across restarts (the phase is persisted), so only a node
    /// whose state is gone announces this; a slot request that is merely late (sent before
    /// its join) finds its sender announcing `Member` by then, and a late copy of an older
    /// announcement stands only until the sender's next one.
    pub(super) fn announces_not_member(&self, now: Duration, id: &NodeId) -> bool {
        self.peers.get(id).is_some_and(|p| {
            super::not_member(p.ann.phase)
                && now.saturating_sub(p.phase_since) >= self.params.peer_timeout / 2
        })
    }

    /// Readmission of the recorded members that asked for a slot while announcing that they
    /// are not members (re-flashed with the same id, see [`Op::Rejoin`]).
    pub(super) fn rejoin_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        let ops: Vec<Op> = self
            .requests
            .keys()
            .filter(|id| **id != self.me && rec.members.contains_key(*id))
            .filter(|id| rec.converting.as_ref().is_none_or(|c| c.node != **id))
            .filter(|id| self.announces_not_member(now, id))
            .map(|id| Op::Rejoin {
                node: id.clone(),
                reason: format!(
                    "asked to join again while recorded a member (its state is gone: \
                     re-flashed), readmitted by {}",
                    self.me
                ),
                ip: self.last_ip.get(id).copied(),
            })
            .collect();
        (!ops.is_empty()).then(|| batch(ops))
    }

    /// One dead member of the electorate replaced by the best live node outside it: a live
    /// control-plane member first, then another live member, then a live node waiting to join
    /// this cluster (every node is an acceptor). None while nobody can take its place.
    fn handover_op(&self, now: Duration, rec: &Record) -> Option<Op> {
        let out = rec
            .electorate
            .iter()
            .find(|id| self.is_dead(now, id) && !rec.members.contains_key(*id))?;
        let mut candidates: Vec<_> = rec
            .members
            .iter()
            .map(|(id, role)| (id, Some(*role)))
            .chain(
                self.peers
                    .values()
                    .filter(|p| p.ann.cluster.as_ref() == Some(&rec.cluster))
                    .map(|p| (&p.ann.id, None)),
            )
            .filter(|(id, _)| !rec.electorate.contains(*id) && self.is_live(id))
            .map(|(id, role)| {
                let class = match role {
                    Some(Role::ControlPlane) => 0,
                    Some(Role::Worker) => 1,
                    None => 2,
                };
                let pr = self
                    .peers
                    .get(id)
                    .map_or(self.params.priority, |p| p.ann.priority);
                ((class, rank(pr, id)), id.clone())
            })
            .collect();
        candidates.sort();
        let into = candidates.into_iter().next()?.1;
        Some(Op::Handover {
            out: out.clone(),
            into,
        })
    }

    /// The live members whose address the record lacks or has wrong, if any; the
    /// authority's own too (its join point's address): a later authority that never saw it
    /// announce (a restart) can then still name it to `remove-node`.
    pub(super) fn addresses_op(&self, rec: &Record) -> Option<Op> {
        let mine = self.join_point.as_ref().map(|jp| (self.me.clone(), jp.ip));
        let changed: BTreeMap<NodeId, IpAddr> = rec
            .members
            .keys()
            .filter(|id| self.peers.contains_key(*id))
            .filter_map(|id| Some((id.clone(), *self.last_ip.get(id)?)))
            .chain(mine)
            .filter(|(id, ip)| rec.members.contains_key(id) && rec.addresses.get(id) != Some(ip))
            .collect();
        (!changed.is_empty()).then_some(Op::NoteAddresses(changed))
    }

    /// Issues `remove-node` for every removal the chosen record holds that is not done, not
    /// running, and not waiting for a retry. Only the authority does.
    pub(super) fn drive_removals(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !self.is_authority() {
            return;
        }
        let Some(rec) = self.st.chosen.as_ref().map(|a| a.record.clone()) else {
            return;
        };
        let cluster = rec.cluster.clone();
        let mut run = Vec::new();
        let mut settled = Vec::new();
        for x in rec.removed.iter().filter(|x| !x.done) {
            if self.removing.contains(&x.node)
                || self.removals_done.contains(&x.node)
                || self.removal_retry_at.get(&x.node).is_some_and(|t| now < *t)
            {
                continue;
            }
            let Some(ip) = x.ip else {
                // Never seen at an address by any authority: nothing MicroK8s could be given.
                self.last_error = Some(format!(
                    "removed member {} has no known address; `microk8s remove-node` cannot name it",
                    x.node
                ));
                settled.push(x.node.clone());
                continue;
            };
            // The address now belongs to a recorded member (a machine re-flashed with a new
            // identity joined there): the stale entry went with its join; naming the address
            // would remove the new member.
            let taken = rec
                .addresses
                .iter()
                .any(|(id, a)| *a == ip && rec.members.contains_key(id));
            if taken {
                settled.push(x.node.clone());
                continue;
            }
            run.push((x.node.clone(), ip, !x.left));
        }
        self.removals_done.extend(settled);
        for (node, ip, force) in run {
            self.removing.insert(node.clone());
            out.push(Action::RemoveNode {
                node,
                ip,
                cluster: cluster.clone(),
                force,
            });
        }
    }

    /// Result of [`Action::RemoveNode`]: recorded by the next round, or retried later.
    pub(super) fn on_node_removed(
        &mut self,
        now: Duration,
        node: NodeId,
        result: Result<(), String>,
    ) {
        self.removing.remove(&node);
        match result {
            Ok(()) => {
                self.removal_retry_at.remove(&node);
                self.removals_done.insert(node);
            }
            Err(e) => {
                self.last_error = Some(format!("removing dead member {node} failed: {e}"));
                self.removal_retry_at
                    .insert(node, now + self.params.retry_interval * 6);
            }
        }
    }

    /// Forgets finished removals once the chosen record has them done.
    pub(super) fn forget_recorded_removals(&mut self) {
        let Some(rec) = self.chosen() else { return };
        let recorded: Vec<NodeId> = self
            .removals_done
            .iter()
            .filter(|n| !rec.removed.iter().any(|x| x.node == **n && !x.done))
            .cloned()
            .collect();
        for n in recorded {
            self.removals_done.remove(&n);
        }
    }
}

fn batch(mut ops: Vec<Op>) -> Op {
    if ops.len() == 1 {
        ops.remove(0)
    } else {
        Op::Batch(ops)
    }
}
