//! The record operations: [`Op`], the changes a Paxos round can make to the replicated
//! [`Record`], and [`apply`], their pure transition (no node state, no clock).
//!
//! Every change re-checks its own precondition on the record it is applied to, so a round that
//! read a newer record than its proposer expected writes nothing wrong, and a [`Op::Batch`] is
//! exactly its changes chosen back to back. No change alters the electorate (the safety
//! argument in [`crate`] relies on it).
//!
//! To add an operation: add an [`Op`] variant, a `fn` here that applies it to a `&mut Record`
//! (checking its precondition first), and its arm in [`apply`]; its trigger and follow-up live
//! with the role that proposes it (`authority.rs`, `member.rs`, `election.rs`) and in
//! `Node::follow_up` (`proposer.rs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{Ballot, ClusterId, FormationParams, NodeId, Record, Slot};
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
    /// Give a join slot to `to` (answering its request `req`).
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
                Some(founding_record(electorate, 0, ballot, me))
            }
            _ => None,
        };
    };
    let mut r = cur.clone();
    match op {
        Op::Elect { replace, .. } => replace_untouched(&mut r, replace.as_ref(), ballot, me),
        Op::Grant { to, .. } => grant_slot(&mut r, to, me, params),
        Op::Confirm {
            node,
            seq,
            role,
            ok,
        } => record_join_result(&mut r, node, *seq, *role, *ok),
        Op::Reclaim { seq } => reclaim_slot(&mut r, *seq),
        Op::Takeover { old } => take_over_authority(&mut r, old, me),
        Op::ClaimAddons => claim_addons(&mut r, me, params),
        Op::AddonsDone => mark_addons_done(&mut r, me),
        Op::Refresh | Op::Batch(_) => {}
    }
    debug_assert!(
        r.electorate == cur.electorate && r.seq >= cur.seq,
        "{op:?} changed the electorate or moved the slot sequence back"
    );
    Some(r)
}

/// The record of a new cluster with `me` as seed, slot authority and only member.
fn founding_record(electorate: BTreeSet<NodeId>, seq: u64, ballot: &Ballot, me: &NodeId) -> Record {
    Record {
        cluster: ClusterId {
            seed: me.clone(),
            term: ballot.n,
        },
        electorate,
        authority: me.clone(),
        members: BTreeMap::from([(me.clone(), Role::ControlPlane)]),
        slots: Vec::new(),
        tentative: BTreeMap::new(),
        seq,
        addons_by: None,
        addons_done: false,
    }
}

/// Elect over an existing record: replace it by my cluster only if it is the one named in
/// `replace`, nothing ever happened in it, and it is not mine already. Keeps the electorate
/// and the slot sequence.
fn replace_untouched(r: &mut Record, replace: Option<&ClusterId>, ballot: &Ballot, me: &NodeId) {
    if replace == Some(&r.cluster) && r.is_untouched() && r.cluster.seed != *me {
        *r = founding_record(r.electorate.clone(), r.seq, ballot, me);
    }
}

/// Give `to` a slot, if I am the authority, `to` is not a member and a slot for its role is
/// free ([`Record::may_grant`]: a control-plane join alone, worker joins up to
/// `join_parallelism` and never beside a control-plane join). A slot `to` already holds gets
/// a new sequence number, keeping its role.
fn grant_slot(r: &mut Record, to: &NodeId, me: &NodeId, params: &FormationParams) {
    if r.authority != *me || r.members.contains_key(to) {
        return;
    }
    if let Some(i) = r.slots.iter().position(|s| s.node == *to) {
        r.seq += 1;
        r.slots[i].seq = r.seq;
        return;
    }
    let role = match r.tentative.get(to) {
        Some(role) => *role,
        None => role_for(r, to, params),
    };
    if !r.may_grant(role, params.join_parallelism as usize) {
        return;
    }
    r.tentative.remove(to);
    r.seq += 1;
    r.slots.push(Slot {
        node: to.clone(),
        role,
        seq: r.seq,
    });
}

/// A successful join makes `node` a member (with the role it was granted, if known) and
/// frees its slot; a failed one frees slot `seq` if `node` still holds it.
fn record_join_result(r: &mut Record, node: &NodeId, seq: u64, role: Role, ok: bool) {
    if ok {
        if !r.members.contains_key(node) {
            let recorded = r
                .slot_of(node)
                .map(|s| s.role)
                .or_else(|| r.tentative.get(node).copied())
                .unwrap_or(role);
            r.members.insert(node.clone(), recorded);
        }
        r.tentative.remove(node);
        r.slots.retain(|s| s.node != *node);
    } else {
        r.slots.retain(|s| !(s.node == *node && s.seq == seq));
    }
}

/// Free slot `seq`; its holder stays counted as tentative (it may have joined).
fn reclaim_slot(r: &mut Record, seq: u64) {
    if let Some(i) = r.slots.iter().position(|s| s.seq == seq) {
        let s = r.slots.remove(i);
        r.tentative.insert(s.node, s.role);
    }
}

/// Make `me` the authority, if the record still names `old` and I am a control-plane member.
fn take_over_authority(r: &mut Record, old: &NodeId, me: &NodeId) {
    if r.authority == *old && r.members.get(me) == Some(&Role::ControlPlane) {
        r.authority = me.clone();
    }
}

/// Claim the addon enablement for `me`, once, when HA is complete and I am a control-plane
/// member.
fn claim_addons(r: &mut Record, me: &NodeId, params: &FormationParams) {
    if r.addons_by.is_none()
        && r.members.get(me) == Some(&Role::ControlPlane)
        && r.control_plane_members().count() >= params.ha_size()
    {
        r.addons_by = Some(me.clone());
    }
}

/// Record the addons as enabled, if `me` holds the claim.
fn mark_addons_done(r: &mut Record, me: &NodeId) {
    if r.addons_by.as_ref() == Some(me) {
        r.addons_done = true;
    }
}

/// Role for the next joiner: pinned roles first; otherwise control plane (a full MicroK8s
/// member) while fewer than `control_plane + standbys` are counted, keeping places for pinned
/// control-plane nodes not yet in. MicroK8s itself makes the first three voters and the next
/// ones standbys.
fn role_for(r: &Record, to: &NodeId, params: &FormationParams) -> Role {
    let cp = params.control_plane as usize + params.standbys as usize;
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
                        && r.slot_of(id).is_none()
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
