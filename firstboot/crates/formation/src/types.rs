//! Value types of the formation protocol: node ids, ballots, cluster ids, the replicated
//! cluster [`Record`], the persisted [`Phase`] and [`PersistedState`], and [`FormationParams`].
//!
//! Everything here is plain data (serde, no behaviour beyond small helpers), so the driver, the
//! coordinator and `firstboot status` can build against it. To add a persisted field, give it
//! `#[serde(default)]` so state files written by older agents still load.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use rackseed_config::{ClusterConfig, MacAddr, Role};

/// Stable node identity, and the one rule for what a node id is: 1 to [`NodeId::MAX_LEN`]
/// lowercase ASCII letters, digits or '-'. Agents use the lowercase hex of their machine id
/// (see `firstboot`'s `identity`) or their primary MAC ([`NodeId::from_mac`]).
///
/// The same rule holds on the wire: discovery checks it for every announced id (the id is
/// also the mDNS instance name, a DNS label, so lowercase only: DNS compares names
/// case-insensitively) and the coordinator for every requester. Its ordering is the election
/// tiebreak (lower wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id is empty")]
    Empty,
    #[error("node id is {0} characters long, at most 48 allowed")]
    TooLong(usize),
    #[error("node id {0:?} holds other characters than lowercase ASCII letters, digits and '-'")]
    Characters(String),
}

impl NodeId {
    /// Longest id (it is also a DNS label and part of the mDNS host name).
    pub const MAX_LEN: usize = 48;

    /// Validates `s` as a node id (see [`NodeId`] for the rule).
    pub fn new(s: impl Into<String>) -> Result<NodeId, NodeIdError> {
        let s = s.into();
        Self::check(&s)?;
        Ok(NodeId(s))
    }

    /// The node id rule itself, for callers that keep the id as text (discovery records,
    /// coordinator requests).
    pub fn check(s: &str) -> Result<(), NodeIdError> {
        if s.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(NodeIdError::TooLong(s.len()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        {
            return Err(NodeIdError::Characters(s.to_owned()));
        }
        Ok(())
    }

    /// The id derived from a MAC address: its 12 hex digits.
    pub fn from_mac(mac: MacAddr) -> NodeId {
        NodeId(mac.0.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

/// A Paxos ballot: totally ordered by `(n, node)`, unique because each proposer only uses its
/// own id and never reuses an `n` (the highest `n` it used is persisted before use).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub n: u64,
    pub node: NodeId,
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.n, self.node)
    }
}

/// The identity of one MicroK8s cluster: the seed that founded it and the ballot number of the
/// election that chose it. At most one cluster identity ever gets a member besides its seed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId {
    pub seed: NodeId,
    pub term: u64,
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.seed)
    }
}

/// A join slot: `node` may run `microk8s join` as `role`. `seq` is unique per grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub node: NodeId,
    pub role: Role,
    pub seq: u64,
}

/// The slots field as records hold it: a list; records written before parallel worker joins
/// hold one slot or none under the name `slot`, and read as a list of zero or one.
fn slots_from_any<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Slot>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<Slot>),
        One(Option<Slot>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(o) => o.into_iter().collect(),
    })
}

/// The replicated cluster record: the single value every CAS (compare-and-set over Paxos)
/// reads and rewrites. See the module documentation of [`super`] for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub cluster: ClusterId,
    /// The nodes whose votes count once the cluster exists: the seed and the best-ranked
    /// candidates it saw (at most [`FormationParams::electorate_cap`]), fixed at the election.
    /// Changed only by a handover (one member replaced, through a joint step, see
    /// [`Record::electorate_old`]). Every write needs a majority of it.
    pub electorate: BTreeSet<NodeId>,
    /// While a handover is under way (joint step): the electorate before it. Every write and
    /// every read then needs a majority of both sets; only a proposer that saw this joint
    /// record chosen may drop it. See the safety argument in [`crate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub electorate_old: Option<BTreeSet<NodeId>>,
    /// The node that grants join slots (always a control-plane member).
    pub authority: NodeId,
    /// Confirmed members with their role; the seed is the first.
    pub members: BTreeMap<NodeId, Role>,
    /// The join slots in use: at most one control-plane slot and nothing else, or up to
    /// [`FormationParams::join_parallelism`] worker slots (see [`Record::may_grant`]).
    #[serde(default, alias = "slot", deserialize_with = "slots_from_any")]
    pub slots: Vec<Slot>,
    /// Holders of slots that timed out: they may have joined, so their role stays counted
    /// until they confirm (then they move to `members`) or ask for a slot again.
    #[serde(default)]
    pub tentative: BTreeMap<NodeId, Role>,
    /// Last slot sequence number handed out.
    pub seq: u64,
    /// The control-plane member that enables the addons (claimed once, never changed).
    #[serde(default)]
    pub addons_by: Option<NodeId>,
    #[serde(default)]
    pub addons_done: bool,
    /// Members removed because they were unseen for `replace_after` (newest last, at most
    /// [`Record::REMOVED_KEPT`] kept): who, why, and whether `microk8s remove-node --force`
    /// has run for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Removal>,
    /// The members' addresses as the slot authority saw them (what `remove-node` is given
    /// once a member is dead and no longer announces itself).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<NodeId, IpAddr>,
    /// The one worker being converted to a control-plane member (the control plane fell
    /// below `control_plane` and nothing else can fill it), until it is recorded a member
    /// again: at most one at a time (see `Op::Convert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converting: Option<Conversion>,
}

/// A worker chosen to become a control-plane member: it runs `microk8s leave`, is removed
/// from the record and from MicroK8s (`remove-node <ip>`, no `--force`: it left dqlite-free),
/// then asks for a control-plane slot and joins without `--worker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversion {
    pub node: NodeId,
    /// Why, in words (for status pages and the node's own timeline).
    pub reason: String,
}

/// A member the record removed: the slot authority saw it unseen for `replace_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    pub node: NodeId,
    /// The role it had.
    pub role: Role,
    /// Why, in words (for status pages): e.g. "unseen for 15m by node-a".
    pub reason: String,
    /// The address `microk8s remove-node <ip> --force` is given (the record's last known).
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// `microk8s remove-node --force` succeeded (or found nothing left to remove).
    #[serde(default)]
    pub done: bool,
    /// The member left by itself (`microk8s leave`, a worker being converted): it holds no
    /// dqlite entry, so `remove-node` runs without `--force`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
}

impl Record {
    /// How many removals the record keeps (the oldest finished ones are dropped first).
    pub const REMOVED_KEPT: usize = 16;

    /// The sets of which every read and every write needs a strict majority: the electorate,
    /// and during a handover also the one before it.
    pub fn quorum_sets(&self) -> impl Iterator<Item = &BTreeSet<NodeId>> {
        std::iter::once(&self.electorate).chain(self.electorate_old.as_ref())
    }

    /// Whether the acceptors in `have` hold a strict majority of every quorum set.
    pub fn has_quorum<'a>(&self, have: impl Iterator<Item = &'a NodeId> + Clone) -> bool {
        self.quorum_sets()
            .all(|s| have.clone().filter(|id| s.contains(*id)).count() >= majority(s.len()))
    }

    /// The slot `node` holds, if any.
    pub fn slot_of(&self, node: &NodeId) -> Option<&Slot> {
        self.slots.iter().find(|s| s.node == *node)
    }

    /// Whether a slot for `role` may be granted to `to` (who holds no slot) with a limit of
    /// `parallelism` concurrent joins: a control-plane join only while no slot is in use (they
    /// change dqlite's membership, one at a time); a worker join only while no control-plane
    /// join is in flight and fewer than `parallelism` slots are in use.
    /// A control-plane join also waits for every decided removal to be carried out
    /// (`remove-node --force` changes dqlite's membership too).
    pub fn may_grant(&self, role: Role, parallelism: usize) -> bool {
        match role {
            Role::ControlPlane => self.slots.is_empty() && self.removed.iter().all(|x| x.done),
            Role::Worker => {
                self.slots.iter().all(|s| s.role == Role::Worker)
                    && self.slots.len() < parallelism.max(1)
            }
        }
    }

    /// Whether `node` was removed (or released) and its `remove-node` is not carried out yet:
    /// it gets no slot before (a forced removal after its new join would take the new
    /// membership out of dqlite, or delete a new worker's Node object).
    pub fn removal_pending(&self, node: &NodeId) -> bool {
        self.removed.iter().any(|x| x.node == *node && !x.done)
    }

    /// Whether the record took `node` out (a removal of it is noted) and it holds nothing
    /// since: no membership, no slot, no tentative place.
    pub fn was_removed(&self, node: &NodeId) -> bool {
        self.removed.iter().any(|x| x.node == *node)
            && !self.members.contains_key(node)
            && self.slot_of(node).is_none()
            && !self.tentative.contains_key(node)
    }

    /// Control-plane nodes counted against `control_plane`: members, tentative, and the slots.
    pub fn control_plane_count(&self) -> usize {
        let members = self
            .members
            .values()
            .filter(|r| **r == Role::ControlPlane)
            .count();
        let tentative = self
            .tentative
            .iter()
            .filter(|(id, r)| **r == Role::ControlPlane && !self.members.contains_key(*id))
            .count();
        let slots = self
            .slots
            .iter()
            .filter(|s| {
                s.role == Role::ControlPlane
                    && !self.members.contains_key(&s.node)
                    && !self.tentative.contains_key(&s.node)
            })
            .count();
        members + tentative + slots
    }

    /// Confirmed control-plane members.
    pub fn control_plane_members(&self) -> impl Iterator<Item = &NodeId> {
        self.members
            .iter()
            .filter(|(_, r)| **r == Role::ControlPlane)
            .map(|(id, _)| id)
    }

    /// True while nothing but the seed ever happened in this cluster (no slot was ever
    /// granted, no addon claim): the only state in which a re-election may replace it.
    pub fn is_untouched(&self) -> bool {
        self.seq == 0
            && self.members.len() == 1
            && self.members.contains_key(&self.cluster.seed)
            && self.slots.is_empty()
            && self.tentative.is_empty()
            && self.addons_by.is_none()
            && self.electorate_old.is_none()
            && self.removed.is_empty()
            && self.converting.is_none()
    }
}

/// What this node is doing; persisted after every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase")]
pub enum Phase {
    /// Node preparation (hugepages, modules, packages) has not finished yet.
    Preparing,
    /// No cluster known: watching peers, maybe proposing itself as seed.
    Discovering,
    /// A cluster exists; waiting for the authority to grant this node the join slot.
    WaitingForSlot { cluster: ClusterId },
    /// Granted slot `seq`: running `microk8s join` against `via`.
    Joining {
        cluster: ClusterId,
        seq: u64,
        role: Role,
        via: NodeId,
    },
    /// The join succeeded; waiting for the authority to record the membership.
    Confirming {
        cluster: ClusterId,
        seq: u64,
        role: Role,
    },
    /// A recorded member of `cluster` (the seed is one from its election on).
    Member { cluster: ClusterId, role: Role },
}

impl Phase {
    /// Short name used in announcements and status lines.
    pub fn summary(&self) -> PhaseSummary {
        match self {
            Phase::Preparing => PhaseSummary::Preparing,
            Phase::Discovering => PhaseSummary::Discovering,
            Phase::WaitingForSlot { .. } => PhaseSummary::Waiting,
            Phase::Joining { .. } => PhaseSummary::Joining,
            Phase::Confirming { .. } => PhaseSummary::Confirming,
            Phase::Member { .. } => PhaseSummary::Member,
        }
    }

    pub fn cluster(&self) -> Option<&ClusterId> {
        match self {
            Phase::Preparing | Phase::Discovering => None,
            Phase::WaitingForSlot { cluster }
            | Phase::Joining { cluster, .. }
            | Phase::Confirming { cluster, .. }
            | Phase::Member { cluster, .. } => Some(cluster),
        }
    }
}

/// The phase without its data, as announced to peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseSummary {
    Preparing,
    Discovering,
    Waiting,
    Joining,
    Confirming,
    Member,
}

impl PhaseSummary {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseSummary::Preparing => "prep",
            PhaseSummary::Discovering => "disc",
            PhaseSummary::Waiting => "wait",
            PhaseSummary::Joining => "join",
            PhaseSummary::Confirming => "conf",
            PhaseSummary::Member => "memb",
        }
    }

    /// The long name used in status documents and tables (`member`, `joining`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PhaseSummary::Preparing => "preparing",
            PhaseSummary::Discovering => "discovering",
            PhaseSummary::Waiting => "waiting",
            PhaseSummary::Joining => "joining",
            PhaseSummary::Confirming => "confirming",
            PhaseSummary::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<PhaseSummary> {
        Some(match s {
            "prep" => PhaseSummary::Preparing,
            "disc" => PhaseSummary::Discovering,
            "wait" => PhaseSummary::Waiting,
            "join" => PhaseSummary::Joining,
            "conf" => PhaseSummary::Confirming,
            "memb" => PhaseSummary::Member,
            _ => return None,
        })
    }
}

/// An accepted Paxos value: the record written at `ballot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub ballot: Ballot,
    pub record: Record,
}

/// The acceptor's binding promises: never accept below `promised`; `accepted` is the last
/// value accepted. Both are persisted before any reply leaves the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptorState {
    pub promised: Option<Ballot>,
    pub accepted: Option<Accepted>,
}

/// Everything the driver writes atomically (temp file, fsync, rename) on [`super::Action::Persist`].
/// Holds no absolute times: the clock restarts with the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Format version of this structure.
    pub version: u32,
    pub phase: Phase,
    /// Node preparation finished (it survives reboots: sysctl files, modules-load.d).
    pub prepared: bool,
    pub acceptor: AcceptorState,
    /// Highest ballot number this node used or saw; a proposer never reuses one.
    pub max_ballot: u64,
    /// Newest record this node learned (by ballot), possibly never chosen: a hint for
    /// routing, never the basis of a decision.
    pub known: Option<Accepted>,
    /// The newest record this node saw *chosen* (its own completed round): what it may act on.
    #[serde(default)]
    pub chosen: Option<Accepted>,
    /// How many times the agent started with this state; makes slot request ids unique
    /// across restarts (a grant answering a request from before a crash is never taken).
    #[serde(default)]
    pub boots: u64,
    /// A chosen record names this node as the one that enables the addons.
    #[serde(default)]
    pub addons_claimed: bool,
    /// This node ran `microk8s enable` successfully.
    #[serde(default)]
    pub addons_done: bool,
    /// A `microk8s leave` this node started and has not seen the result of (a worker being
    /// converted, or a node the record removed while it was away): after a crash it runs it
    /// again (a standalone node counts as having left), so a leave that completed just before
    /// the crash is never mistaken for a node still in its cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving: Option<PendingLeave>,
}

/// A `microk8s leave` in flight ([`PersistedState::leaving`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLeave {
    pub cluster: ClusterId,
    pub reason: String,
}

impl PersistedState {
    pub const VERSION: u32 = 1;

    pub fn fresh() -> PersistedState {
        PersistedState {
            version: Self::VERSION,
            phase: Phase::Preparing,
            prepared: false,
            acceptor: AcceptorState::default(),
            max_ballot: 0,
            known: None,
            chosen: None,
            boots: 0,
            addons_claimed: false,
            addons_done: false,
            leaving: None,
        }
    }
}

/// Tuning and inventory facts, identical on every node of a cluster (they come from the same
/// config file). Use [`FormationParams::from_config`] in the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormationParams {
    /// Control-plane nodes (dqlite voters) wanted: 1, 3, 5 or 7.
    pub control_plane: u8,
    /// Nodes to wait for before forming. See the module docs for why quorums count these.
    pub expected_nodes: u32,
    /// After this long (since this boot) a majority of the electorate may form.
    pub formation_timeout: Duration,
    /// A granted slot that is neither confirmed nor given back after this long is reclaimed.
    /// Must exceed `join_timeout + grant_max_age` with margin (see [`Self::validate`]).
    pub slot_timeout: Duration,
    /// The driver kills a `microk8s join` (including its wait for Ready) after this long.
    pub join_timeout: Duration,
    /// A joiner ignores a grant answering a request it sent longer ago than this.
    pub grant_max_age: Duration,
    /// A peer whose announcement was not refreshed for this long counts as gone.
    pub peer_timeout: Duration,
    /// How long a Paxos round may take before it is abandoned and retried.
    pub round_timeout: Duration,
    /// How often a waiting node repeats its slot request / join report.
    pub retry_interval: Duration,
    /// How long the slot authority (or a lone seed) must be unseen before a takeover
    /// (or re-election).
    pub takeover_after: Duration,
    /// This node's seed preference: higher wins.
    pub priority: u32,
    /// Inventory-pinned roles.
    pub pinned_roles: BTreeMap<NodeId, Role>,
    /// Enable the addons once HA has formed.
    pub addons_wanted: bool,
    /// Most joins in flight at once (`cluster.join-parallelism`); control-plane joins are
    /// always alone, so this limits concurrent worker joins.
    #[serde(default = "default_join_parallelism")]
    pub join_parallelism: u32,
    /// Joiners beyond `control_plane` that still join as full members (`cluster.standbys`):
    /// MicroK8s makes them dqlite standbys and promotes one when a voter is lost. They join
    /// one at a time, like every full member. Default 0 (older parameters).
    #[serde(default)]
    pub standbys: u8,
    /// A member unseen (no announcement, no message) for this long, by the slot authority's
    /// own clock, is removed (`microk8s remove-node --force`) and, if it was in the
    /// electorate, handed over to a live node (`cluster.replace-after`). Must exceed
    /// `peer_timeout`.
    #[serde(default = "default_replace_after")]
    pub replace_after: Duration,
}

fn default_replace_after() -> Duration {
    rackseed_config::DEFAULT_REPLACE_AFTER
}

fn default_join_parallelism() -> u32 {
    rackseed_config::DEFAULT_JOIN_PARALLELISM
}

/// Why a [`FormationParams`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("control-plane count must be 1, 3, 5 or 7, got {0}")]
    ControlPlane(u8),
    #[error("expected node count must be at least 1")]
    ExpectedNodes,
    #[error(
        "slot timeout {slot:?} must exceed 5/4 of join timeout {join:?} plus grant max age {age:?}, or two joins could overlap"
    )]
    SlotTimeout {
        slot: Duration,
        join: Duration,
        age: Duration,
    },
    #[error("{0} must be non-zero")]
    Zero(&'static str),
    #[error("replace-after {replace:?} must exceed the peer timeout {peer:?}")]
    ReplaceAfter { replace: Duration, peer: Duration },
}

impl FormationParams {
    /// Parameters with the agent's default timings.
    pub fn new(control_plane: u8, expected_nodes: u32, formation_timeout: Duration) -> Self {
        FormationParams {
            control_plane,
            expected_nodes,
            formation_timeout,
            slot_timeout: Duration::from_secs(900),
            join_timeout: Duration::from_secs(600),
            grant_max_age: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(90),
            round_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_secs(5),
            takeover_after: Duration::from_secs(180),
            priority: 0,
            pinned_roles: BTreeMap::new(),
            addons_wanted: true,
            join_parallelism: default_join_parallelism(),
            standbys: 0,
            replace_after: default_replace_after(),
        }
    }

    /// Parameters for node `my_id` (with primary MAC `my_mac`, used to find its inventory
    /// entry) from the cluster config. Inventory roles are pinned by the MAC-derived id.
    pub fn from_config(cfg: &ClusterConfig, my_mac: Option<MacAddr>) -> FormationParams {
        let mut p = FormationParams::new(
            cfg.cluster.control_plane,
            cfg.cluster.expected_nodes,
            cfg.cluster.formation_timeout,
        );
        for entry in &cfg.nodes {
            if let Some(role) = entry.role {
                p.pinned_roles.insert(NodeId::from_mac(entry.mac), role);
            }
            if Some(entry.mac) == my_mac {
                p.priority = entry.priority;
            }
        }
        p.join_parallelism = cfg.cluster.join_parallelism;
        p.standbys = cfg.cluster.standbys;
        p.replace_after = cfg.cluster.replace_after;
        // A peer counts as gone after `peer_timeout`; a short replace-after (tests, small
        // labs) shortens it so that "unseen for replace-after" stays meaningful.
        p.peer_timeout = p.peer_timeout.min(p.replace_after / 2);
        let a = &cfg.addons;
        p.addons_wanted =
            a.dns.enabled || a.metallb.is_some() || a.storage != rackseed_config::Storage::None;
        p
    }

    /// Checks the invariants the safety argument relies on.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if ![1, 3, 5, 7].contains(&self.control_plane) {
            return Err(ParamsError::ControlPlane(self.control_plane));
        }
        if self.expected_nodes == 0 {
            return Err(ParamsError::ExpectedNodes);
        }
        if self.join_parallelism == 0 {
            return Err(ParamsError::Zero("join parallelism"));
        }
        for (name, d) in [
            ("slot timeout", self.slot_timeout),
            ("join timeout", self.join_timeout),
            ("peer timeout", self.peer_timeout),
            ("round timeout", self.round_timeout),
            ("retry interval", self.retry_interval),
            ("takeover delay", self.takeover_after),
        ] {
            if d.is_zero() {
                return Err(ParamsError::Zero(name));
            }
        }
        if self.replace_after <= self.peer_timeout {
            return Err(ParamsError::ReplaceAfter {
                replace: self.replace_after,
                peer: self.peer_timeout,
            });
        }
        let need = (self.join_timeout + self.grant_max_age) * 5 / 4;
        if self.slot_timeout <= need {
            return Err(ParamsError::SlotTimeout {
                slot: self.slot_timeout,
                join: self.join_timeout,
                age: self.grant_max_age,
            });
        }
        Ok(())
    }

    /// Size of the pre-election electorate: `max(expected_nodes, control_plane)`.
    pub fn electorate_size(&self) -> usize {
        (self.expected_nodes as usize).max(self.control_plane as usize)
    }

    /// Votes needed before a cluster exists: a strict majority of [`Self::electorate_size`].
    pub fn election_quorum(&self) -> usize {
        self.electorate_size() / 2 + 1
    }

    /// Most nodes a cluster's electorate holds (the acceptors whose majority every round
    /// after the election needs): `2 × control_plane + 1`, at least 5. The record then
    /// outlives the loss of `control_plane` of them (two for a single control-plane node),
    /// while a round on a rack of fifty costs a handful of messages instead of fifty.
    pub fn electorate_cap(&self) -> usize {
        (2 * self.control_plane as usize + 1).max(5)
    }

    /// Control-plane members at which HA counts as formed: 3 voters, or fewer if configured.
    pub fn ha_size(&self) -> usize {
        (self.control_plane as usize).min(3)
    }
}

/// Strict majority of a set of `n`.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}
