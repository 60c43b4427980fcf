//! The member role: what a recorded member does. Only control-plane members act on the record,
//! and only on a record they saw chosen: the addon claimer enables the addons, the slot
//! authority runs its duties (`authority.rs`), another control-plane member learns the record
//! when it has a reason to (a Refresh round) and takes over granting when the authority has
//! been gone for `takeover_after`.
//!
//! To extend: a new member duty is one more case in [`Node::member_op`]; keep Refresh rounds
//! rare (they compete with the authority's grant rounds).

use std::time::Duration;

use super::{rank, Node, Op};
use crate::events::Action;
use crate::types::{Phase, Record};
use rackseed_config::Role;

impl Node {
    /// The decision step while a `Member` with `role`.
    pub(super) fn drive_member(&mut self, now: Duration, role: Role, out: &mut Vec<Action>) {
        debug_assert!(
            matches!(&self.st.phase, Phase::Member { role: r, .. } if *r == role),
            "{}: member step in phase {:?}",
            self.me,
            self.st.phase
        );
        // Told that the record removed me: learn it by a round of my own (any role).
        self.drive_removal_check(now, out);
        let Some(rec) = self.chosen() else {
            // Only control-plane members act on the record; they learn it with one round, but
            // only once they have a reason to act: a round of theirs would compete with the
            // authority's grant rounds (and make them retry after a back-off).
            if role == Role::ControlPlane
                && self.needs_chosen(now)
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
        // Keep the slot timer of the authority running even while a round is in flight;
        // carry out the removals the record decided.
        if self.is_authority() {
            self.watch_slot(now);
            self.forget_recorded_removals();
            self.drive_removals(now, out);
            self.drive_conversion(now, out);
            self.drive_removed_peers(now, out);
            self.drive_catch_up(now, out);
        } else {
            self.catch_up = Default::default();
        }
        if !self.can_propose(now) {
            return;
        }
        if let Some(op) = self.member_op(now, role) {
            if op == Op::Refresh {
                self.next_refresh = now + self.params.retry_interval;
            }
            if self.is_authority() {
                // Every round of the authority goes to the whole electorate.
                self.catch_up.round_started();
            }
            self.start_round(now, op, out);
        }
    }

    /// Result of [`Action::EnableAddons`].
    pub(super) fn on_addons(&mut self, res: Result<(), String>, out: &mut Vec<Action>) {
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

    /// A control-plane member that never saw a record chosen needs one before it can act: when
    /// the newest record it heard of names it as slot authority or addon enabler, when its
    /// phase names another cluster, or when the authority is missing (it may have to take
    /// over).
    fn needs_chosen(&self, now: Duration) -> bool {
        let Some(h) = self.hint() else { return true };
        let names_me = *h.authority == self.me
            || self
                .known()
                .is_some_and(|r| r.addons_by.as_ref() == Some(&self.me));
        names_me
            || self.st.phase.cluster() != Some(h.cluster)
            || self.missing_since.contains_key(h.authority)
            || self.announces_not_member(now, h.authority)
    }

    /// The next record change this member should propose, if any.
    fn member_op(&self, now: Duration, role: Role) -> Option<Op> {
        let hint = self.known()?;
        let rec = self.chosen()?;
        if self.needs_refresh(hint) && now >= self.next_refresh {
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
        self.takeover_op(now, hint)
    }

    /// Whether the newest record I heard of (`hint`) differs from what I act on in a way a
    /// Refresh round must settle.
    fn needs_refresh(&self, hint: &Record) -> bool {
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
        newer_elsewhere || mine_replaced || unconfirmed_claim || unconfirmed_authority
    }

    /// Takeover: the authority (per the newest record known, `hint`) has been gone for a
    /// while and I am the best live control-plane member, or the best has had as long as
    /// each one ranked before me to take over and has not: the `k`-th best (from 0) takes
    /// over once the authority is gone for `(k + 1) × takeover_after`. A member that never
    /// saw a record chosen reads only with the pre-election quorum `Q`, which fewer live
    /// nodes than `Q` never give; the next one may have seen one chosen. Two rounds that
    /// both take over are settled by Paxos: `apply` makes a takeover only of the authority
    /// the record still names. The round re-checks all of it.
    fn takeover_op(&self, now: Duration, hint: &Record) -> Option<Op> {
        // How long the authority has been gone: unseen, or announcing that it is no member
        // at all (its state is gone: re-flashed with the same id; it cannot grant until it
        // has joined again; that counts as gone for `takeover_after` at once).
        let unseen = self
            .missing_since
            .get(&hint.authority)
            .map(|t| now.saturating_sub(*t));
        let reflashed = self
            .announces_not_member(now, &hint.authority)
            .then(|| self.peers.get(&hint.authority))
            .flatten()
            .map(|p| now.saturating_sub(p.phase_since) + self.params.takeover_after);
        let gone_for = unseen.max(reflashed)?;
        let mut ranked: Vec<_> = hint
            .control_plane_members()
            .filter(|id| {
                **id != hint.authority && (**id == self.me || self.peers.contains_key(*id))
            })
            .map(|id| {
                let pr = if *id == self.me {
                    self.params.priority
                } else {
                    self.peers.get(id).map_or(0, |p| p.ann.priority)
                };
                (rank(pr, id), id)
            })
            .collect();
        ranked.sort();
        let k = ranked.iter().position(|(_, id)| **id == self.me)?;
        (gone_for >= self.params.takeover_after * (k as u32 + 1)).then(|| Op::Takeover {
            old: hint.authority.clone(),
        })
    }
}
