//! The acceptor role: every node, in every phase, answers `Prepare` and `Accept`. Its promise
//! and last accepted record are persisted before the answer goes out (the `Persist` action
//! comes first), so a crash never makes it forget a promise.
//!
//! To extend: a new Paxos request gets a handler here (called from `Node::on_message`) that
//! checks the sender owns the ballot, updates `st.acceptor`, persists and replies.

use super::Node;
use crate::events::{Action, Message};
use crate::types::{Accepted, Ballot, NodeId, Record};

impl Node {
    /// A `Prepare` from `from`: promise (or refuse) and answer.
    pub(super) fn on_prepare(&mut self, from: NodeId, ballot: Ballot, out: &mut Vec<Action>) {
        if ballot.node != from {
            self.ignored += 1;
            return;
        }
        let reply = self.acceptor_prepare(ballot, out);
        out.push(Action::Send {
            to: from,
            msg: reply,
        });
    }

    /// An `Accept` from `from`: accept (or refuse) and answer.
    pub(super) fn on_accept(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        record: Record,
        next: Option<Ballot>,
        out: &mut Vec<Action>,
    ) {
        if ballot.node != from {
            self.ignored += 1;
            return;
        }
        // A next ballot must be the sender's own and higher; otherwise accept only.
        let next = next.filter(|n| n.node == from && *n > ballot);
        let reply = self.acceptor_accept(ballot, record, next, out);
        out.push(Action::Send {
            to: from,
            msg: reply,
        });
    }

    /// Promises `ballot` unless a higher one was promised; the answer to send.
    pub(super) fn acceptor_prepare(&mut self, ballot: Ballot, out: &mut Vec<Action>) -> Message {
        let before = self.st.acceptor.promised.clone();
        self.st.max_ballot = self.st.max_ballot.max(ballot.n);
        let reply = self.promise_or_refuse(ballot, out);
        self.debug_check_promise(before.as_ref());
        reply
    }

    fn promise_or_refuse(&mut self, ballot: Ballot, out: &mut Vec<Action>) -> Message {
        match &self.st.acceptor.promised {
            Some(p) if *p > ballot => Message::Nack {
                ballot,
                promised: p.clone(),
            },
            _ => {
                if self.st.acceptor.promised.as_ref() != Some(&ballot) {
                    self.st.acceptor.promised = Some(ballot.clone());
                    self.persist(out);
                }
                Message::Promise {
                    ballot,
                    accepted: self.st.acceptor.accepted.clone(),
                }
            }
        }
    }

    /// Accepts `record` at `ballot` unless a higher ballot was promised; then, with `next`,
    /// promises `next` as a `Prepare { next }` arriving right after would (the promise's
    /// "last accepted" is the record just accepted). One persist covers both.
    pub(super) fn acceptor_accept(
        &mut self,
        ballot: Ballot,
        record: Record,
        next: Option<Ballot>,
        out: &mut Vec<Action>,
    ) -> Message {
        let before = self.st.acceptor.promised.clone();
        self.st.max_ballot = self.st.max_ballot.max(ballot.n);
        let acc = Accepted {
            ballot: ballot.clone(),
            record,
        };
        // A repeated Accept (retransmitted, duplicated) of what I accepted is answered again,
        // even if I promised a higher ballot since (e.g. the piggybacked next one): having
        // accepted it stays true.
        let already = self.st.acceptor.accepted.as_ref() == Some(&acc);
        if let Some(p) = self.st.acceptor.promised.as_ref().filter(|p| **p > ballot) {
            if !already {
                return Message::Nack {
                    ballot,
                    promised: p.clone(),
                };
            }
        }
        let mut changed = false;
        if !already {
            self.st.acceptor.promised = Some(ballot.clone());
            self.st.acceptor.accepted = Some(acc.clone());
            self.learn(&acc);
            changed = true;
        }
        let next = next.filter(|n| self.st.acceptor.promised.as_ref().is_none_or(|p| p <= n));
        if let Some(n) = &next {
            self.st.max_ballot = self.st.max_ballot.max(n.n);
            if self.st.acceptor.promised.as_ref() != Some(n) {
                self.st.acceptor.promised = Some(n.clone());
                changed = true;
            }
        }
        if changed {
            self.persist(out);
        }
        self.debug_check_promise(before.as_ref());
        Message::Accepted { ballot, next }
    }

    /// The acceptor's binding state, after every change (`before` was its promise): a promise
    /// never moves back, is never above the highest ballot number reserved or seen (so this
    /// node's next ballot is higher), and nothing was accepted above it.
    fn debug_check_promise(&self, before: Option<&Ballot>) {
        let a = &self.st.acceptor;
        debug_assert!(
            a.promised.as_ref() >= before,
            "{}: promise moved back from {before:?} to {:?}",
            self.me,
            a.promised
        );
        debug_assert!(
            a.promised
                .as_ref()
                .is_none_or(|p| p.n <= self.st.max_ballot),
            "{}: promised {:?} above max ballot {}",
            self.me,
            a.promised,
            self.st.max_ballot
        );
        debug_assert!(
            a.accepted
                .as_ref()
                .is_none_or(|acc| a.promised.as_ref().is_some_and(|p| acc.ballot <= *p)),
            "{}: accepted {:?} above promise {:?}",
            self.me,
            a.accepted.as_ref().map(|acc| &acc.ballot),
            a.promised
        );
    }
}
