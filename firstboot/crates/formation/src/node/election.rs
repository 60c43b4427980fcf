//! Seed election: while no cluster is known (phase `Discovering`), the best visible candidate
//! proposes a record naming itself seed ([`Op::Elect`]) once the expected nodes are visible,
//! or once `formation_timeout` passed with the pre-election quorum visible. A waiting node
//! also re-elects when the seed of an untouched cluster vanished before anyone joined.
//!
//! To extend: the candidate order is [`super::rank`] (priority, then id); who is a candidate is
//! [`Node::eligible`]; the electorate a new record fixes is [`Node::electorate_of`].

use std::collections::BTreeSet;
use std::time::Duration;

use super::{rank, Node, Op};
use crate::events::Action;
use crate::types::{ClusterId, NodeId, Phase};

impl Node {
    /// The decision step while `Discovering`: join a known cluster, or elect myself seed.
    pub(super) fn drive_discovering(&mut self, now: Duration, out: &mut Vec<Action>) {
        debug_assert_eq!(self.st.phase, Phase::Discovering, "{}", self.me);
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

    /// Re-election while waiting for a slot in `cluster` (whose newest known record has
    /// `members` members): when nothing happened in it and its seed has been gone for
    /// `takeover_after`, the best waiting candidate replaces it. Returns whether it started
    /// the round.
    pub(super) fn start_reelection(
        &mut self,
        now: Duration,
        cluster: ClusterId,
        members: u32,
        out: &mut Vec<Action>,
    ) -> bool {
        debug_assert!(
            matches!(self.st.phase, Phase::WaitingForSlot { .. }),
            "{}: re-election in phase {:?}",
            self.me,
            self.st.phase
        );
        let untouched = match self.known().filter(|r| r.cluster == cluster) {
            Some(r) => r.is_untouched(),
            None => members <= 1,
        };
        let seed_gone = self
            .missing_since
            .get(&cluster.seed)
            .is_some_and(|t| now.saturating_sub(*t) >= self.params.takeover_after);
        if !(untouched && seed_gone && self.eligible() && self.can_propose(now)) {
            return false;
        }
        let best = self
            .peers
            .values()
            .filter(|p| p.ann.eligible && p.ann.role.is_none())
            .map(|p| rank(p.ann.priority, &p.ann.id))
            .min();
        if best.is_some_and(|b| rank(self.params.priority, &self.me) >= b) {
            return false;
        }
        // Used only if the read finds no record at all (the old one was never chosen).
        let electorate = self.electorate_of(&self.participants());
        self.start_round(
            now,
            Op::Elect {
                electorate,
                replace: Some(cluster),
            },
            out,
        );
        true
    }

    /// The electorate of a fresh election among `candidates` (priority, id, eligible), this
    /// node included: this node and the best-ranked others, eligible candidates first, at most
    /// [`crate::FormationParams::electorate_cap`] in all. The best-ranked are also the first to
    /// be granted a slot when they wait for one, so the control plane is normally drawn from
    /// the electorate.
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
}
