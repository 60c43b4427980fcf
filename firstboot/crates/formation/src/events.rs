//! The formation core's inputs and outputs: [`Event`]s the driver feeds in, [`Action`]s it
//! executes, and the point-to-point [`Message`]s nodes exchange through the coordinator.
//!
//! To add an input or output: add a variant here, handle it in [`super::Node::handle`] and in
//! the driver, and cover it in the simulated network of `tests/formation_props.rs`.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::announce::Announcement;
use super::types::{Accepted, Ballot, ClusterId, NodeId, PersistedState, Record};
use rackseed_config::Role;

/// Something that happened, fed to [`super::Node::handle`].
// Events are moved once into `handle` and dropped; boxing the record-carrying messages would
// cost an allocation per message for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A verified announcement (first sight or update) and the address it came from.
    PeerSeen { ann: Announcement, ip: IpAddr },
    /// Discovery lost the peer (mDNS goodbye or expiry). A hint only: a peer counts as gone
    /// when neither an announcement nor a message came from it for `peer_timeout`.
    PeerLost { id: NodeId },
    /// Periodic timer; once a second is plenty.
    Tick,
    /// Result of [`Action::PrepareNode`].
    NodePrepared(Result<(), String>),
    /// Result of [`Action::Join`] (join plus wait for Ready).
    JoinFinished(Result<(), String>),
    /// Result of [`Action::EnableAddons`].
    AddonsEnabled(Result<(), String>),
    /// Result of [`Action::RemoveNode`] for `node`.
    NodeRemoved {
        node: NodeId,
        result: Result<(), String>,
    },
    /// Result of [`Action::Leave`].
    Left(Result<(), String>),
    /// A message from an authenticated peer.
    Message { from: NodeId, msg: Message },
    /// Where other nodes join this one: its address and its MicroK8s cluster agent's
    /// certificate fingerprint, known once MicroK8s is installed here. A slot authority grants
    /// nothing before it knows this, because every grant carries it.
    JoinPointKnown(JoinPoint),
}

/// Where a joiner runs `microk8s join`: the granting node's address and the SHA-256
/// fingerprint (lowercase hex, at least 12 characters) of its cluster agent's certificate.
/// It travels inside the authenticated grant, so a forged mDNS address record can neither
/// steer a join nor receive the token: `microk8s join` checks the fingerprint before it sends
/// anything, and refuses (exit 4) any other endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinPoint {
    pub ip: IpAddr,
    pub fingerprint: String,
}

impl JoinPoint {
    /// Shortest fingerprint prefix `microk8s join` accepts (`FINGERPRINT_MIN_LEN`).
    pub const MIN_FINGERPRINT: usize = 12;

    /// A join point, if `fingerprint` is lowercase hex of at least
    /// [`JoinPoint::MIN_FINGERPRINT`] and at most 64 characters.
    pub fn new(ip: IpAddr, fingerprint: impl Into<String>) -> Option<JoinPoint> {
        let fingerprint = fingerprint.into();
        let ok = (Self::MIN_FINGERPRINT..=64).contains(&fingerprint.len())
            && fingerprint
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then_some(JoinPoint { ip, fingerprint })
    }
}

/// Something the driver must do, in order. A [`Action::Persist`] must be durable (temp file,
/// fsync, rename) before any later action of the same batch is executed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
// Actions come a few at a time and are consumed at once; boxing the persisted state would only
// add an allocation per step.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Advertise this announcement (replacing the previous one).
    Announce(Announcement),
    /// Send one message; it may be lost, duplicated or delayed.
    Send { to: NodeId, msg: Message },
    /// Write this state atomically before executing the following actions.
    Persist(PersistedState),
    /// Prepare the host (hugepages, kernel modules, packages); report [`Event::NodePrepared`].
    PrepareNode,
    /// Run `microk8s join <via.ip>:25000/<token>/<via.fingerprint>` (with `--worker` when
    /// `worker`), then wait until this node is Ready; kill it after `timeout`; report
    /// [`Event::JoinFinished`]. Must report success when this node already is a member.
    Join {
        via: JoinPoint,
        worker: bool,
        timeout: Duration,
        cluster: ClusterId,
    },
    /// Enable the configured addons on this control-plane node; report [`Event::AddonsEnabled`].
    EnableAddons { cluster: ClusterId },
    /// Run `microk8s remove-node <ip>` here (with `--force` when `force`) for the member
    /// `node` the record removed (dead, re-flashed, or a worker that left to be converted;
    /// only the slot authority issues this); report [`Event::NodeRemoved`]. A node MicroK8s
    /// no longer knows counts as removed.
    RemoveNode {
        node: NodeId,
        ip: IpAddr,
        cluster: ClusterId,
        force: bool,
    },
    /// Run `microk8s leave` on this node (it becomes a standalone node, to join `cluster`
    /// again: a worker being converted to control plane, or a node the record removed while
    /// it was away; `reason` says which); report [`Event::Left`]. A node that is standalone
    /// already counts as having left.
    Leave { cluster: ClusterId, reason: String },
    /// A human status line (sd_notify `STATUS=`).
    SetStatus(String),
}

/// Point-to-point messages (JSON over the authenticated coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "msg")]
pub enum Message {
    /// Paxos phase 1: promise not to accept anything below `ballot`.
    Prepare { ballot: Ballot },
    /// Binding promise for `ballot`, with the acceptor's last accepted record.
    Promise {
        ballot: Ballot,
        accepted: Option<Accepted>,
    },
    /// Paxos phase 2: accept `record` at `ballot`. With `next` (the proposer's next ballot),
    /// an acceptor that accepts also promises `next` at once, exactly as if `Prepare { next }`
    /// had followed: the proposer's next round can skip phase 1.
    Accept {
        ballot: Ballot,
        record: Record,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<Ballot>,
    },
    /// `ballot` accepted; with `next`, also promised `next` (the acceptor's last accepted
    /// record is then the one it just accepted at `ballot`).
    Accepted {
        ballot: Ballot,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<Ballot>,
    },
    /// Refused: the acceptor has promised `promised`, higher than `ballot`.
    Nack { ballot: Ballot, promised: Ballot },
    /// Ask the slot authority for the join slot; `req` identifies this request.
    SlotRequest { req: u64 },
    /// The slot is yours: join `cluster` as `role` through the sender's join point `via`.
    SlotGrant {
        req: u64,
        cluster: ClusterId,
        seq: u64,
        role: Role,
        via: JoinPoint,
    },
    /// The receiver is not the slot authority; try `hint`.
    NotAuthority { hint: Option<NodeId> },
    /// The joiner's result for slot `seq`.
    JoinReport {
        cluster: ClusterId,
        seq: u64,
        role: Role,
        ok: bool,
    },
    /// The membership is recorded: the joiner is a member with `role`.
    JoinConfirmed { cluster: ClusterId, role: Role },
    /// From the slot authority to the worker a chosen record names in `converting`: leave
    /// and join `cluster` again as a control-plane member (`reason` in words).
    Convert { cluster: ClusterId, reason: String },
    /// From the slot authority to a node that acts as a member of `cluster` (announces
    /// `Member`, or reports a join) although the record it saw chosen removed or released
    /// it. Only a hint: the receiver runs a round of its own and leaves (`microk8s leave`) to
    /// join again only if the record that round chooses says so.
    Removed { cluster: ClusterId },
}

impl Message {
    /// Short name of the message kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Prepare { .. } => "prepare",
            Message::Promise { .. } => "promise",
            Message::Accept { .. } => "accept",
            Message::Accepted { .. } => "accepted",
            Message::Nack { .. } => "nack",
            Message::SlotRequest { .. } => "slot-request",
            Message::SlotGrant { .. } => "slot-grant",
            Message::NotAuthority { .. } => "not-authority",
            Message::JoinReport { .. } => "join-report",
            Message::JoinConfirmed { .. } => "join-confirmed",
            Message::Convert { .. } => "convert",
            Message::Removed { .. } => "removed",
        }
    }
}
