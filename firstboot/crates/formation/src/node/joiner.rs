//! The joiner role: a node on its way into the cluster. It prepares the host (`Preparing`),
//! asks the slot authority for the join slot (`WaitingForSlot`), runs `microk8s join` on a
//! fresh grant (`Joining`), reports the result until the authority records it (`Confirming`)
//! and becomes a `Member`.
//!
//! A grant is used only while waiting and only if it answers a request sent at most
//! `grant_max_age` ago (request ids carry the persisted boot count), which keeps the timing
//! bound that makes slot reclaim safe (see the safety argument in [`crate`]).
//!
//! To extend: a new joiner message gets a handler here, called from `Node::on_message`; a new
//! joiner phase gets a `drive_*` step here, called from `Node::drive`.

use std::time::Duration;

use super::{Node, Op};
use crate::events::{Action, JoinPoint, Message};
use crate::types::{ClusterId, NodeId, Phase};
use rackseed_config::Role;

impl Node {
    /// Result of node preparation: on success, on to `Discovering`; on failure, retry later.
    pub(super) fn on_prepared(
        &mut self,
        now: Duration,
        res: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        match res {
            Ok(()) => {
                if !self.st.prepared {
                    self.st.prepared = true;
                    if self.st.phase == Phase::Preparing {
                        self.st.phase = Phase::Discovering;
                    }
                    self.persist(out);
                }
                self.prepare_at = None;
            }
            Err(e) => {
                self.last_error = Some(format!("node preparation failed: {e}"));
                self.prepare_at = Some(now + self.params.retry_interval * 6);
            }
        }
    }

    /// The decision step while `Preparing`: (re)issue the preparation, or move on once done.
    pub(super) fn drive_preparing(&mut self, now: Duration, out: &mut Vec<Action>) {
        debug_assert_eq!(self.st.phase, Phase::Preparing, "{}", self.me);
        if !self.st.prepared && self.prepare_at.is_none_or(|t| now >= t) {
            self.prepare_at = Some(now + self.params.join_timeout);
            out.push(Action::PrepareNode);
        }
        if self.st.prepared {
            self.set_phase(Phase::Discovering, out);
        }
    }

    /// The decision step while waiting for a slot in `cluster`: follow the newest cluster
    /// heard of, finish or refute my own unfinished election, re-elect if the seed of an
    /// untouched cluster vanished, otherwise (re)send my slot request.
    pub(super) fn drive_waiting(
        &mut self,
        now: Duration,
        cluster: ClusterId,
        out: &mut Vec<Action>,
    ) {
        debug_assert!(
            matches!(&self.st.phase, Phase::WaitingForSlot { cluster: c } if *c == cluster),
            "{}: waiting step in phase {:?}",
            self.me,
            self.st.phase
        );
        let Some((hint_cluster, authority, members)) = self
            .hint()
            .map(|h| (h.cluster.clone(), h.authority.clone(), h.members))
        else {
            return;
        };
        if hint_cluster != cluster {
            self.set_phase(
                Phase::WaitingForSlot {
                    cluster: hint_cluster.clone(),
                },
                out,
            );
        }
        // The record may name me (my own unfinished election): finish or refute it. Not once
        // I know that record as one in which things happened: then it names an earlier life
        // of this node (re-flashed), which the others take over from and readmit.
        let finished_elsewhere = self
            .known()
            .is_some_and(|r| r.cluster == hint_cluster && !r.is_untouched());
        if (authority == self.me || hint_cluster.seed == self.me)
            && !finished_elsewhere
            && self.can_propose(now)
            && now >= self.next_refresh
        {
            self.next_refresh = now + self.params.retry_interval;
            self.start_round(now, Op::Refresh, out);
            return;
        }
        if self.start_reelection(now, hint_cluster, members, out) {
            return;
        }
        self.request_slot(now, out);
    }

    /// The longest a waiting node goes between slot requests: a third of `grant_max_age`
    /// (10 s with the agent's timings), at least `retry_interval`.
    pub(super) fn request_backoff_cap(&self) -> Duration {
        (self.params.grant_max_age / 3).max(self.params.retry_interval)
    }

    /// Sends a new slot request to the authority: the first after `retry_interval`, then each
    /// interval twice the one before, up to [`Node::request_backoff_cap`]. The authority keeps
    /// a request longer than that ([`Node::request_ttl`]) and grants a freed slot from the
    /// requests it keeps, so the backoff delays no grant; it only spares the authority the
    /// chatter of a long queue (48 waiting nodes once a second before). The backoff starts
    /// again with a new authority, a new cluster, or after a join.
    fn request_slot(&mut self, now: Duration, out: &mut Vec<Action>) {
        let interval = self
            .params
            .retry_interval
            .saturating_mul(1 << self.request_backoff.min(16))
            .min(self.request_backoff_cap());
        if self
            .last_request
            .is_some_and(|t| now < t || now.saturating_sub(t) < interval)
        {
            return;
        }
        let Some(to) = self.authority_target() else {
            return;
        };
        if self.last_request_to.as_ref() != Some(&to) {
            self.request_backoff = 0;
            self.last_request_to = Some(to.clone());
        } else {
            self.request_backoff = self.request_backoff.saturating_add(1);
        }
        self.last_request = Some(now);
        self.reqs
            .retain(|_, sent| now.saturating_sub(*sent) <= self.params.grant_max_age);
        self.next_req += 1;
        // Unique across restarts: the boot count is persisted.
        let req = (self.st.boots << 32) | (self.next_req & 0xffff_ffff);
        self.reqs.insert(req, now);
        out.push(Action::Send {
            to,
            msg: Message::SlotRequest { req },
        });
    }

    /// Where slot requests and join reports go.
    fn authority_target(&self) -> Option<NodeId> {
        let hint = self.hint().map(|h| h.authority.clone());
        let pick = match (&self.authority_override, hint) {
            (Some(o), _) if self.peers.contains_key(o) => Some(o.clone()),
            (_, h) => h,
        };
        pick.filter(|a| *a != self.me)
    }

    /// Whether a grant for request `req` may be used now: I am waiting and the request is
    /// fresh. The grant names its own join point, so the granter's mDNS address (unsigned)
    /// plays no part.
    pub(super) fn usable_grant(&self, now: Duration, req: u64) -> bool {
        let fresh = self
            .reqs
            .get(&req)
            .is_some_and(|sent| now.saturating_sub(*sent) <= self.params.grant_max_age);
        let waiting = matches!(self.st.phase, Phase::WaitingForSlot { .. });
        fresh && waiting
    }

    /// Starts the join granted by `granter` through its join point `via`: slot `seq` of
    /// `cluster` as `role`.
    pub(super) fn start_join(
        &mut self,
        granter: NodeId,
        via: JoinPoint,
        cluster: ClusterId,
        seq: u64,
        role: Role,
        out: &mut Vec<Action>,
    ) {
        // Only a waiting node uses a grant (`usable_grant`).
        debug_assert!(
            matches!(self.st.phase, Phase::WaitingForSlot { .. }),
            "{}: join started in phase {:?}",
            self.me,
            self.st.phase
        );
        self.reqs.clear();
        self.request_backoff = 0;
        // The join starts before its phase is persisted: a restart turns `Joining` back into
        // `WaitingForSlot` (see `Node::new`), so the persisted `Joining` only informs `status`,
        // and its fsync need not delay the join.
        out.push(Action::Join {
            via,
            worker: role == Role::Worker,
            timeout: self.params.join_timeout,
            cluster: cluster.clone(),
        });
        self.set_phase(
            Phase::Joining {
                cluster,
                seq,
                role,
                via: granter,
            },
            out,
        );
    }

    /// Result of the join: report it to the granter; on success confirm, else wait again.
    pub(super) fn on_join_finished(
        &mut self,
        now: Duration,
        res: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        let Phase::Joining {
            cluster,
            seq,
            role,
            via,
        } = self.st.phase.clone()
        else {
            self.ignored += 1;
            return;
        };
        match res {
            Ok(()) => {
                self.set_phase(
                    Phase::Confirming {
                        cluster: cluster.clone(),
                        seq,
                        role,
                    },
                    out,
                );
                out.push(Action::Send {
                    to: via,
                    msg: Message::JoinReport {
                        cluster,
                        seq,
                        role,
                        ok: true,
                    },
                });
                self.last_request = Some(now);
            }
            Err(e) => {
                self.last_error = Some(format!("join of cluster {cluster} via {via} failed: {e}"));
                self.set_phase(
                    Phase::WaitingForSlot {
                        cluster: cluster.clone(),
                    },
                    out,
                );
                out.push(Action::Send {
                    to: via,
                    msg: Message::JoinReport {
                        cluster,
                        seq,
                        role,
                        ok: false,
                    },
                });
                // back off before asking again
                self.last_request = Some(now + self.params.retry_interval);
            }
        }
    }

    /// The decision step while `Confirming`: repeat the (successful) join report.
    pub(super) fn drive_confirming(
        &mut self,
        now: Duration,
        cluster: ClusterId,
        seq: u64,
        role: Role,
        out: &mut Vec<Action>,
    ) {
        debug_assert!(
            matches!(&self.st.phase, Phase::Confirming { cluster: c, seq: s, role: r }
                if *c == cluster && *s == seq && *r == role),
            "{}: confirming step in phase {:?}",
            self.me,
            self.st.phase
        );
        // Told that the record released my place: learn it by a round of my own.
        self.drive_removal_check(now, out);
        if self.st.leaving.is_some() {
            return;
        }
        if self
            .last_request
            .is_some_and(|t| now.saturating_sub(t) < self.params.retry_interval)
        {
            return;
        }
        self.last_request = Some(now);
        if let Some(to) = self.authority_target() {
            out.push(Action::Send {
                to,
                msg: Message::JoinReport {
                    cluster,
                    seq,
                    role,
                    ok: true,
                },
            });
        }
    }

    /// The receiver of my request or report is not the authority; it suggests `hint`.
    pub(super) fn on_not_authority(&mut self, hint: Option<NodeId>) {
        if hint.as_ref() != Some(&self.me) {
            self.authority_override = hint;
        }
    }

    /// The authority recorded me as a member of `cluster` with `role`. Taken only while
    /// confirming my own join: a node waiting for a slot has not joined (a restart while
    /// `Joining` asks for a fresh grant, and `Confirming` is persisted before the report that
    /// makes the authority record a member), so a confirmation then means the record still
    /// lists an earlier life of this node (re-flashed with the same id, its MicroK8s fresh):
    /// it keeps asking for a slot, and the authority readmits it ([`super::Op::Rejoin`]).
    pub(super) fn on_join_confirmed(
        &mut self,
        cluster: ClusterId,
        role: Role,
        out: &mut Vec<Action>,
    ) {
        match &self.st.phase {
            Phase::Confirming { cluster: c, .. } if *c == cluster => {
                self.set_phase(Phase::Member { cluster, role }, out);
            }
            Phase::WaitingForSlot { cluster: c } if *c == cluster => {
                self.ignored += 1;
                self.last_error = Some(format!(
                    "cluster {cluster} still lists this node as a {role} member, but this node's \
                     state is gone (re-flashed?): asking to join again"
                ));
            }
            _ => self.ignored += 1,
        }
    }
}
