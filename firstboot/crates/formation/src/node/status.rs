//! What a node shows of itself: its discovery [`Announcement`], the human status line
//! (sd_notify `STATUS=`) and the [`Status`] snapshot for `firstboot status`. Nothing here
//! changes the protocol state; `publish` emits an announcement or status line only when it
//! changed.
//!
//! To extend: a new announced field goes in [`Node::announcement`] (and in
//! [`crate::announce`]'s wire format); a new phase needs its line in `Node::status_line`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Node, Op};
use crate::announce::Announcement;
use crate::events::Action;
use crate::types::{ClusterId, Conversion, NodeId, Phase, Removal, Slot};
use rackseed_config::Role;

/// A point-in-time view for `firstboot status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub me: NodeId,
    pub phase: Phase,
    pub role: Option<Role>,
    pub cluster: Option<ClusterId>,
    /// Slot authority per the newest known record.
    pub authority: Option<NodeId>,
    pub is_authority: bool,
    pub peers_seen: Vec<NodeId>,
    pub members_known: BTreeMap<NodeId, Role>,
    /// The join slots in use per the newest known record.
    pub slots: Vec<Slot>,
    pub addons_done: bool,
    pub last_error: Option<String>,
    /// Messages and events ignored as malformed, forged or stale.
    pub ignored: u64,
    /// The electorate per the newest known record (and the old one during a handover).
    pub electorate: Vec<NodeId>,
    pub electorate_old: Option<Vec<NodeId>>,
    /// Members the newest known record removed, oldest first.
    pub removed: Vec<Removal>,
    /// `replace_after` of this node's parameters.
    pub replace_after: std::time::Duration,
    /// The worker being converted to control plane per the newest known record, and why.
    #[serde(default)]
    pub converting: Option<Conversion>,
}

impl Node {
    /// Snapshot for `firstboot status`.
    pub fn status(&self) -> Status {
        let rec = self.known();
        Status {
            me: self.me.clone(),
            phase: self.st.phase.clone(),
            role: self.role(),
            cluster: self.st.phase.cluster().cloned(),
            authority: rec.map(|r| r.authority.clone()),
            is_authority: self.is_authority(),
            peers_seen: self.peers.keys().cloned().collect(),
            members_known: rec.map(|r| r.members.clone()).unwrap_or_default(),
            slots: rec.map(|r| r.slots.clone()).unwrap_or_default(),
            addons_done: rec.is_some_and(|r| r.addons_done) || self.st.addons_done,
            last_error: self.last_error.clone(),
            ignored: self.ignored,
            electorate: rec
                .map(|r| r.electorate.iter().cloned().collect())
                .unwrap_or_default(),
            electorate_old: rec
                .and_then(|r| r.electorate_old.as_ref())
                .map(|s| s.iter().cloned().collect()),
            removed: rec.map(|r| r.removed.clone()).unwrap_or_default(),
            replace_after: self.params.replace_after,
            converting: rec.and_then(|r| r.converting.clone()),
        }
    }

    /// Emits the announcement and the status line when they changed.
    pub(super) fn publish(&mut self, out: &mut Vec<Action>) {
        let ann = self.announcement();
        if self.last_announced.as_ref() != Some(&ann) {
            self.last_announced = Some(ann.clone());
            out.push(Action::Announce(ann));
        }
        let status = self.status_line();
        if status != self.last_status {
            self.last_status = status.clone();
            out.push(Action::SetStatus(status));
        }
    }

    fn announcement(&self) -> Announcement {
        let known = self.st.known.as_ref();
        let hint = self.hint();
        Announcement {
            id: self.me.clone(),
            priority: self.params.priority,
            phase: self.st.phase.summary(),
            role: self.role(),
            cluster: self.st.phase.cluster().cloned(),
            authority: known
                .map(|k| k.record.authority.clone())
                .or_else(|| hint.map(|h| h.authority.clone())),
            record_ballot: known.map(|k| k.ballot.clone()),
            members: known.map_or(0, |k| k.record.members.len() as u32),
            eligible: self.eligible(),
        }
    }

    fn status_line(&self) -> String {
        let peers = self.peers.len();
        let electing = self
            .round_op()
            .is_some_and(|op| matches!(op, Op::Elect { .. }));
        match &self.st.phase {
            Phase::Preparing => "preparing node".to_string(),
            Phase::Discovering if electing => {
                format!("proposing self as seed ({peers} peers seen)")
            }
            Phase::Discovering => format!(
                "discovering peers ({} of {} expected seen)",
                peers + 1,
                self.params.expected_nodes
            ),
            Phase::WaitingForSlot { cluster } => {
                format!("waiting for a join slot in cluster {cluster}")
            }
            Phase::Joining {
                cluster,
                seq,
                role,
                via,
            } => {
                format!("joining cluster {cluster} via {via} as {role} (slot {seq})")
            }
            Phase::Confirming { cluster, .. } => {
                format!("joined cluster {cluster}, confirming membership")
            }
            Phase::Member { cluster, role } => {
                let members = self.known().map_or(0, |r| r.members.len());
                let auth = if self.is_authority() {
                    ", granting join slots"
                } else {
                    ""
                };
                format!("member of cluster {cluster} as {role} ({members} members known{auth})")
            }
        }
    }
}
