//! Catch-up: the slot authority brings a member of the electorate that missed a record up to
//! date. A voter that was switched off, or lost the Accept, while the others chose a record
//! would hold the old one (and show it in its status) until the next change: as an acceptor it
//! only learns what reaches it, and a Refresh round of its own would compete with the
//! authority's rounds.
//!
//! - **Copies.** When my last round chose the newest record I know, every voter that has not
//!   answered `Accepted` for it (neither in the round nor since) and is seen as a member of my
//!   cluster is sent that round's Accept again, with no piggybacked promise. It is a copy of my
//!   own Accept, as a duplicated or delayed one would be (the network may do either), so it
//!   changes nothing Paxos relies on: an acceptor that promised a higher ballot refuses it, one
//!   that accepted it already answers again. The first copy goes once the record has stood for
//!   `retry_interval`; the next ones with a doubling interval up to twice `peer_timeout` (a
//!   voter that hears mDNS but not my messages costs one small message a while, never a
//!   round; one that was gone gets a copy as soon as it is seen again).
//!   Acknowledgements, not announcements, decide who is behind: an announced record ballot
//!   rides on the agent's heartbeat and may lag a change by tens of seconds.
//! - **Rounds.** A round of mine reaches every voter above its promise, so I run one (a
//!   Refresh, the last of my duties, `authority.rs`) when a voter refuses a copy (it promised a
//!   higher ballot), when a voter announces a *newer* record than I know for `retry_interval`
//!   (I was away while another member's round chose it), and when the newest record I know was
//!   another member's round and a voter announces the same older ballot for twice
//!   `peer_timeout` (longer than announcements can lag). Every round of mine restarts those
//!   waits; one that fails is retried.
//!
//! Only members of my cluster get copies: a node waiting to join again acts on its own rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::Node;
use crate::events::{Action, Message};
use crate::types::{Ballot, NodeId, PhaseSummary};

/// The authority's catch-up state (reset when it stops being the authority).
#[derive(Debug, Clone, Default)]
pub(super) struct CatchUp {
    /// Voters that answered `Accepted` for my chosen ballot (in the round or since).
    acked: BTreeSet<NodeId>,
    /// Copies sent to each voter since my last round chose: when the last one went, how many.
    sent: BTreeMap<NodeId, (Duration, u32)>,
    /// Voters announcing another record than the newest I know: the ballot they announce and
    /// since when they announce it.
    behind: BTreeMap<NodeId, (Option<Ballot>, Duration)>,
    /// A voter stays behind: a round of mine must bring it the record.
    pub(super) round: bool,
}

impl CatchUp {
    /// My round chose a record; `accepts` answered `Accepted` for it.
    pub(super) fn chosen(&mut self, accepts: BTreeSet<NodeId>) {
        *self = CatchUp {
            acked: accepts,
            ..CatchUp::default()
        };
    }

    /// A round of mine started: it goes to the whole electorate, so the waits start again.
    /// `round` stays set until a round of mine chooses (`chosen`): one that fails is retried.
    pub(super) fn round_started(&mut self) {
        self.behind.clear();
    }
}

impl Node {
    /// `from` answered `Accepted` for `ballot`.
    pub(super) fn catch_up_accepted(&mut self, from: &NodeId, ballot: &Ballot) {
        if self.st.chosen.as_ref().is_some_and(|c| c.ballot == *ballot) {
            self.catch_up.acked.insert(from.clone());
        }
    }

    /// `from` refused `ballot`, which is not a round of mine in flight.
    pub(super) fn catch_up_refused(&mut self, from: &NodeId, ballot: &Ballot) {
        let copy_refused = self.st.chosen.as_ref().is_some_and(|c| c.ballot == *ballot)
            && self.catch_up.sent.contains_key(from);
        if copy_refused && self.is_authority() {
            self.catch_up.round = true;
            self.dirty = true;
        }
    }

    /// The authority's step: copies to voters that have not acknowledged my record, and the
    /// decision to run a round of mine (see the module documentation).
    pub(super) fn drive_catch_up(&mut self, now: Duration, out: &mut Vec<Action>) {
        let interval = self.params.retry_interval;
        // How long an announcement may lag: a changed record ballot goes out with the next
        // heartbeat, or, if that multicast was lost, with the next periodic re-publish; both
        // come well within `peer_timeout` each.
        let patience = self.params.peer_timeout * 2;
        let (Some(acc), Some(newest)) = (self.st.chosen.as_ref(), self.st.known.as_ref()) else {
            return;
        };
        let mine_newest = acc.ballot == newest.ballot;
        let voters: BTreeSet<&NodeId> = acc
            .record
            .quorum_sets()
            .flatten()
            .filter(|id| **id != self.me)
            .collect();
        let cu = &mut self.catch_up;
        cu.behind.retain(|id, _| voters.contains(id));
        cu.sent.retain(|id, _| voters.contains(id));
        let may_copy = mine_newest
            && self.round.is_none()
            && now.saturating_sub(self.chosen_since) >= interval;
        let mut copies = Vec::new();
        for id in voters {
            let announced = self.peers.get(id).and_then(|p| {
                let member_here = p.ann.phase == PhaseSummary::Member
                    && p.ann.cluster.as_ref() == Some(&acc.record.cluster);
                member_here.then_some(p.ann.record_ballot.as_ref())
            });
            // Up to date: it announces the newest record I know, or acknowledged mine (and
            // announces nothing newer).
            let ahead = |b: &Option<&Ballot>| b.is_some_and(|b| *b > newest.ballot);
            let Some(ballot) = announced.filter(|b| {
                *b != Some(&newest.ballot) && (ahead(b) || !(mine_newest && cu.acked.contains(id)))
            }) else {
                cu.behind.remove(id);
                if announced.is_none() {
                    // Gone (or not a member here): back with a fresh copy at once.
                    cu.sent.remove(id);
                }
                continue;
            };
            let since = match cu.behind.get(id) {
                Some((b, t)) if b.as_ref() == ballot => *t,
                _ => {
                    cu.behind.insert(id.clone(), (ballot.cloned(), now));
                    now
                }
            };
            let waited = now.saturating_sub(since);
            if ahead(&ballot) {
                // I am the one behind.
                cu.round |= waited >= interval;
            } else if !mine_newest {
                cu.round |= waited >= patience;
            } else {
                let due = cu.sent.get(id).is_none_or(|(t, k)| {
                    let wait = interval
                        .saturating_mul(2u32.pow((*k).min(16)))
                        .min(patience);
                    now.saturating_sub(*t) >= wait
                });
                if may_copy && due {
                    copies.push(id.clone());
                }
            }
        }
        for to in copies {
            let k = cu.sent.get(&to).map_or(0, |(_, k)| k.saturating_add(1));
            cu.sent.insert(to.clone(), (now, k));
            out.push(Action::Send {
                to,
                msg: Message::Accept {
                    ballot: acc.ballot.clone(),
                    record: acc.record.clone(),
                    next: None,
                },
            });
        }
    }
}
