//! The record operations: [`Op`], the changes a Paxos round can make to the replicated
//! [`Record`], and [`apply`], their pure transition (no node state, no clock).
//!
//! Every change re-checks its own precondition on the record it is applied to, so a round that
//! read a newer record than its proposer expected writes nothing wrong, and a [`Op::Batch`] is
//! exactly its changes chosen back to back. Only [`Op::Handover`] (which starts a joint step:
//! the old electorate is kept beside the new one) and [`Op::FinishHandover`] (which ends it)
//! alter the electorate; the safety argument in [`crate`] says why that is safe, and the
//! proposer (`Node::try_write`) keeps a joint step from ending on a record it did not see
//! chosen.
//!
//! To add an operation: add an [`Op`] variant, a `fn` here that applies it to a `&mut Record`
//! (checking its precondition first), and its arm in [`apply`]; its trigger and follow-up live
//! with the role that proposes it (`authority.rs`, `member.rs`, `election.rs`) and in
//! `Node::follow_up` (`proposer.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::types::{Ballot, ClusterId, Conversion, FormationParams, NodeId, Record, Removal, Slot};
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
    /// Remove the dead member `node` (unseen for `replace_after` by the authority, `me`):
    /// out of the members, its slot and tentative place freed, a [`Removal`] noted for
    /// `microk8s remove-node <ip> --force`. Never the proposer itself. A dead node that is
    /// no member but holds a tentative place (its slot was reclaimed: it may have joined) is
    /// released the same way, with the role of that place; a conversion of `node` ends.
    Remove {
        node: NodeId,
        reason: String,
        ip: Option<IpAddr>,
    },
    /// `microk8s remove-node --force` ran for the removed `node`.
    RemovalDone { node: NodeId },
    /// Readmit the recorded member `node`, which asked for a join slot while announcing that
    /// it is not a member (its state is gone: a machine re-flashed with the same id). Out of
    /// the members like [`Op::Remove`]; a control-plane member's stale dqlite entry is then
    /// removed (`microk8s remove-node <ip> --force`, by the authority) before any
    /// control-plane slot is granted, a worker (no dqlite entry) needs nothing removed. Its
    /// request is then granted like any other. Never the proposer itself.
    Rejoin {
        node: NodeId,
        reason: String,
        ip: Option<IpAddr>,
    },
    /// Convert the live worker member `node` to a control-plane member: the control plane is
    /// below `control_plane` (members, tentative places and slots counted, standbys among
    /// them) and nothing else fills it. Only when no conversion is under way (one at a time,
    /// a field of the record, so two rounds never convert two workers) and every removal is
    /// carried out. The authority then asks `node` to leave ([`crate::Message::Convert`]).
    Convert { node: NodeId, reason: String },
    /// The worker being converted left (it asks for a slot and announces that it is no
    /// member): out of the members like [`Op::Remove`], its removal marked `left`
    /// (`microk8s remove-node <ip>` without `--force`, by the authority); the conversion
    /// stays until it is recorded a member again.
    ConvertLeft { node: NodeId, ip: Option<IpAddr> },
    /// End the conversion of `node`: it left and then stayed unseen for `replace_after`, or
    /// it has not left and the control plane is full again (a new machine joined).
    EndConversion { node: NodeId },
    /// Start handing the electorate over: `out` (dead) is replaced by `into` (live), as a
    /// joint step that keeps the old electorate beside the new one. Only when no handover is
    /// under way.
    Handover { out: NodeId, into: NodeId },
    /// End the joint step: the old electorate no longer counts.
    FinishHandover,
    /// Note the members' current addresses (what `remove-node` is given once they die).
    NoteAddresses(BTreeMap<NodeId, IpAddr>),
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
        Op::Remove { node, reason, ip } => remove_member(&mut r, node, reason, *ip, me),
        Op::Rejoin { node, reason, ip } => readmit_member(&mut r, node, reason, *ip, me),
        Op::RemovalDone { node } => mark_removal_done(&mut r, node, me),
        Op::Convert { node, reason } => start_conversion(&mut r, node, reason, me, params),
        Op::ConvertLeft { node, ip } => converted_left(&mut r, node, *ip, me),
        Op::EndConversion { node } => end_conversion(&mut r, node, me, params),
        Op::Handover { out, into } => start_handover(&mut r, out, into, me),
        Op::FinishHandover => finish_handover(&mut r, me),
        Op::NoteAddresses(addrs) => note_addresses(&mut r, addrs, me),
        Op::Refresh | Op::Batch(_) => {}
    }
    debug_assert!(r.seq >= cur.seq, "{op:?} moved the slot sequence back");
    debug_assert!(
        r.electorate == cur.electorate
            || matches!(op, Op::Handover { .. })
                && r.electorate_old.as_ref() == Some(&cur.electorate),
        "{op:?} changed the electorate outside a joint handover step"
    );
    debug_assert!(
        r.electorate_old == cur.electorate_old
            || matches!(op, Op::Handover { .. } | Op::FinishHandover),
        "{op:?} changed the joint step"
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
        electorate_old: None,
        removed: Vec::new(),
        addresses: BTreeMap::new(),
        converting: None,
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
    if r.authority != *me || r.members.contains_key(to) || r.removal_pending(to) {
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
/// frees its slot; a failed one frees slot `seq` if `node` still holds it. Only a node that
/// holds a slot or a tentative place is made a member: one the record released or removed
/// meanwhile (its `remove-node --force` took, or will take, it out of dqlite) is no member
/// of MicroK8s whatever its late report says; it must leave and join again.
fn record_join_result(r: &mut Record, node: &NodeId, seq: u64, role: Role, ok: bool) {
    if ok {
        let holder = r.slot_of(node).is_some() || r.tentative.contains_key(node);
        if !r.members.contains_key(node) && !holder {
            return;
        }
        if !r.members.contains_key(node) {
            let recorded = r
                .slot_of(node)
                .map(|s| s.role)
                .or_else(|| r.tentative.get(node).copied())
                .unwrap_or(role);
            r.members.insert(node.clone(), recorded);
        }
        // A converted worker is a member again: the conversion is over.
        if r.converting.as_ref().is_some_and(|c| c.node == *node) {
            r.converting = None;
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
/// control-plane nodes not yet in (not for one the record removed: it is gone, and its place
/// is free again). The worker being converted gets a free place without that reservation: it
/// left to fill it, and a worker join would only start the next conversion. MicroK8s itself
/// makes the first three voters and the next ones standbys.
fn role_for(r: &Record, to: &NodeId, params: &FormationParams) -> Role {
    let cp = params.control_plane as usize + params.standbys as usize;
    let counted = r.control_plane_count();
    let pinned = params.pinned_roles.get(to).copied();
    match pinned {
        Some(Role::Worker) => Role::Worker,
        Some(Role::ControlPlane) if counted < cp => Role::ControlPlane,
        Some(Role::ControlPlane) => Role::Worker,
        None => {
            let converting = r.converting.as_ref().is_some_and(|c| c.node == *to);
            let reserved = params
                .pinned_roles
                .iter()
                .filter(|(id, role)| {
                    **role == Role::ControlPlane
                        && !converting
                        && *id != to
                        && !r.members.contains_key(*id)
                        && !r.tentative.contains_key(*id)
                        && r.slot_of(id).is_none()
                        && !r.removed.iter().any(|x| x.node == **id)
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

/// Remove the dead member `node`, if I am the authority and it is a member other than me;
/// or release the tentative place of `node` (a reclaimed slot: it may have joined) if it is
/// no member but holds one. Either way `microk8s remove-node --force` is to follow, a
/// conversion of `node` ends and an addon claim of `node` not yet done is released.
fn remove_member(r: &mut Record, node: &NodeId, reason: &str, ip: Option<IpAddr>, me: &NodeId) {
    if r.authority != *me || node == me {
        return;
    }
    let Some(role) = r
        .members
        .remove(node)
        .or_else(|| r.tentative.get(node).copied())
    else {
        return;
    };
    // A worker removed before it left (dead, re-flashed) is converted no more.
    if r.converting.as_ref().is_some_and(|c| c.node == *node) {
        r.converting = None;
    }
    // An addon claim its holder never carried out goes with it: the next claim (by the
    // authority, once HA stands) enables them. `microk8s enable` is idempotent, and a
    // removed member is out of dqlite, so a late enable of its own cannot reach the cluster.
    if r.addons_by.as_ref() == Some(node) && !r.addons_done {
        r.addons_by = None;
    }
    r.tentative.remove(node);
    r.slots.retain(|s| s.node != *node);
    let ip = ip.or_else(|| r.addresses.get(node).copied());
    r.addresses.remove(node);
    r.removed.retain(|x| x.node != *node);
    r.removed.push(Removal {
        node: node.clone(),
        role,
        reason: reason.to_owned(),
        ip,
        done: false,
        left: false,
    });
    // Keep the newest; drop the oldest finished ones first.
    while r.removed.len() > Record::REMOVED_KEPT {
        let i = r.removed.iter().position(|x| x.done).unwrap_or(0);
        r.removed.remove(i);
    }
}

/// Readmit the member `node` whose state is gone: removed from the record as
/// [`remove_member`] does; a worker's removal is done at once (a worker is no dqlite member,
/// so nothing of it blocks its join), a control-plane member's waits for `remove-node`.
fn readmit_member(r: &mut Record, node: &NodeId, reason: &str, ip: Option<IpAddr>, me: &NodeId) {
    let Some(role) = r.members.get(node).copied() else {
        return;
    };
    remove_member(r, node, reason, ip, me);
    if role == Role::Worker {
        if let Some(x) = r.removed.iter_mut().rev().find(|x| x.node == *node) {
            x.done = true;
        }
    }
}

/// Start converting the worker member `node`, if I am the authority, no conversion is under
/// way, every removal is carried out, no slot is in use and the control plane (as
/// [`Record::control_plane_count`] counts it) is below `control_plane`.
fn start_conversion(
    r: &mut Record,
    node: &NodeId,
    reason: &str,
    me: &NodeId,
    params: &FormationParams,
) {
    if r.authority != *me
        || r.converting.is_some()
        || r.members.get(node) != Some(&Role::Worker)
        || params.pinned_roles.get(node) == Some(&Role::Worker)
        || !r.slots.is_empty()
        || !r.removed.iter().all(|x| x.done)
        || r.control_plane_count() >= params.control_plane as usize
    {
        return;
    }
    r.converting = Some(Conversion {
        node: node.clone(),
        reason: reason.to_owned(),
    });
}

/// End the conversion of `node`, if I am the authority and it is no longer needed (the
/// worker has not left and the control plane is full again) or its node is gone (it left and
/// is no member).
fn end_conversion(r: &mut Record, node: &NodeId, me: &NodeId, params: &FormationParams) {
    if r.authority != *me || r.converting.as_ref().is_none_or(|c| c.node != *node) {
        return;
    }
    let full = r.control_plane_count() >= params.control_plane as usize;
    if !r.members.contains_key(node) || full {
        r.converting = None;
    }
}

/// The worker being converted left: removed from the members (as [`remove_member`], which
/// would end the conversion, so it is kept), its removal marked `left` (no `--force`).
fn converted_left(r: &mut Record, node: &NodeId, ip: Option<IpAddr>, me: &NodeId) {
    let Some(conv) = r.converting.clone().filter(|c| c.node == *node) else {
        return;
    };
    if r.members.get(node) != Some(&Role::Worker) {
        return;
    }
    let reason = format!("left to become a control-plane member: {}", conv.reason);
    remove_member(r, node, &reason, ip, me);
    if r.members.contains_key(node) {
        return;
    }
    r.converting = Some(conv);
    if let Some(x) = r.removed.iter_mut().rev().find(|x| x.node == *node) {
        x.left = true;
    }
}

/// Mark `node`'s removal as carried out, if I am the authority.
fn mark_removal_done(r: &mut Record, node: &NodeId, me: &NodeId) {
    if r.authority != *me {
        return;
    }
    if let Some(x) = r.removed.iter_mut().find(|x| x.node == *node) {
        x.done = true;
    }
}

/// Replace `out` by `into` in the electorate as a joint step (the old electorate is kept in
/// `electorate_old`), if I am the authority, no joint step is under way, `out` is in the
/// electorate and `into` is not.
fn start_handover(r: &mut Record, out: &NodeId, into: &NodeId, me: &NodeId) {
    if r.authority != *me
        || r.electorate_old.is_some()
        || !r.electorate.contains(out)
        || r.electorate.contains(into)
        || out == into
    {
        return;
    }
    let old = r.electorate.clone();
    r.electorate.remove(out);
    r.electorate.insert(into.clone());
    r.electorate_old = Some(old);
}

/// End the joint step, if I am the authority. The proposer keeps the joint step when the
/// record it read is not the one it saw chosen (`Node::try_write`).
fn finish_handover(r: &mut Record, me: &NodeId) {
    if r.authority == *me {
        r.electorate_old = None;
    }
}

/// Note the addresses of members, if I am the authority.
fn note_addresses(r: &mut Record, addrs: &BTreeMap<NodeId, IpAddr>, me: &NodeId) {
    if r.authority != *me {
        return;
    }
    for (id, ip) in addrs {
        if r.members.contains_key(id) {
            r.addresses.insert(id.clone(), *ip);
        }
    }
}
