//! Unit tests for each formation rule, on a small perfect (FIFO, lossless) in-test network, or
//! on one node fed by hand.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rackseed_config::Role;
use rackseed_formation::{
    Action, Announcement, Ballot, ClusterId, Event, FormationParams, JoinPoint, Message, Node,
    NodeId, ParamsError, PersistedState, Phase, PhaseSummary,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid id")
}

fn params(cp: u8, expected: u32) -> FormationParams {
    let mut p = FormationParams::new(cp, expected, secs(30));
    p.join_timeout = secs(8);
    p.grant_max_age = secs(4);
    p.slot_timeout = secs(20);
    p.peer_timeout = secs(10);
    p.round_timeout = secs(6);
    p.retry_interval = secs(2);
    p.takeover_after = secs(15);
    p.validate().expect("test params are valid");
    p
}

fn ip(k: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, k))
}

/// A lossless network of nodes. Joins finish after `join_ticks` unless held.
struct Net {
    t: u64,
    order: Vec<NodeId>,
    params: BTreeMap<NodeId, FormationParams>,
    nodes: BTreeMap<NodeId, Node>,
    down: BTreeMap<NodeId, bool>,
    persisted: BTreeMap<NodeId, PersistedState>,
    anns: BTreeMap<NodeId, Announcement>,
    queue: VecDeque<(NodeId, Event)>,
    /// Running joins: node -> (end tick, started tick).
    joins: BTreeMap<NodeId, (u64, u64)>,
    hold_joins: bool,
    /// Boot nodes without telling them their join point (MicroK8s not installed yet).
    hide_join_points: bool,
    /// Announcements reach the others only every this many ticks (the agent sends a changed
    /// record ballot with its next heartbeat, every `peer_timeout / 3`).
    ann_every: u64,
    /// Crash this node as soon as it becomes a member.
    crash_on_member: Option<NodeId>,
    /// Crash a node right after it starts `microk8s leave`, before it sees the result (the
    /// leave itself completes).
    crash_on_leave: bool,
    crash_after: Option<NodeId>,
    join_ticks: u64,
    /// Every join started: (node, worker, start tick, cluster).
    join_log: Vec<(NodeId, bool, u64, ClusterId)>,
    /// Finished joins: (node, start, end).
    join_spans: Vec<(NodeId, u64, u64)>,
    addons: Vec<NodeId>,
    prepares: Vec<(NodeId, Ballot, u64)>,
    /// Every Prepare and Accept sent: (from, to, tick).
    paxos_sends: Vec<(NodeId, NodeId, u64)>,
    /// Every `remove-node` issued: (by, node, address, tick).
    removals: Vec<(NodeId, NodeId, IpAddr, u64)>,
    /// Whether each of `removals` had `--force`.
    removal_force: Vec<bool>,
    /// Every `microk8s leave`: (node, tick).
    leaves: Vec<(NodeId, u64)>,
    /// Partition: nodes in different groups hear nothing of each other (default group 0).
    group: BTreeMap<NodeId, u8>,
}

impl Net {
    fn new(ids: &[(&str, u32)], base: FormationParams) -> Net {
        let mut net = Net {
            t: 0,
            order: Vec::new(),
            params: BTreeMap::new(),
            nodes: BTreeMap::new(),
            down: BTreeMap::new(),
            persisted: BTreeMap::new(),
            anns: BTreeMap::new(),
            queue: VecDeque::new(),
            joins: BTreeMap::new(),
            hold_joins: false,
            hide_join_points: false,
            ann_every: 1,
            crash_on_member: None,
            crash_on_leave: false,
            crash_after: None,
            join_ticks: 2,
            join_log: Vec::new(),
            join_spans: Vec::new(),
            addons: Vec::new(),
            prepares: Vec::new(),
            paxos_sends: Vec::new(),
            removals: Vec::new(),
            removal_force: Vec::new(),
            leaves: Vec::new(),
            group: BTreeMap::new(),
        };
        for (name, prio) in ids {
            let mut p = base.clone();
            p.priority = *prio;
            net.order.push(id(name));
            net.params.insert(id(name), p);
        }
        net
    }

    fn ip_of(&self, n: &NodeId) -> IpAddr {
        ip(self.order.iter().position(|x| x == n).expect("known node") as u8 + 1)
    }

    fn boot(&mut self, n: &str) {
        let n = id(n);
        let persisted = self.persisted.get(&n).cloned();
        let (node, actions) =
            Node::new(self.params[&n].clone(), n.clone(), persisted, secs(self.t));
        self.nodes.insert(n.clone(), node);
        self.down.insert(n.clone(), false);
        self.run(&n, actions);
        if !self.hide_join_points {
            let jp = self.join_point_of(&n);
            self.queue.push_back((n, Event::JoinPointKnown(jp)));
        }
    }

    /// A node's join point: its address and a fingerprint only it has.
    fn join_point_of(&self, n: &NodeId) -> JoinPoint {
        JoinPoint::new(self.ip_of(n), format!("{:0>12}", n.as_str())).expect("valid")
    }

    fn crash(&mut self, n: &str) {
        let n = id(n);
        self.nodes.remove(&n);
        self.anns.remove(&n);
        self.joins.remove(&n);
        self.down.insert(n, true);
    }

    fn run(&mut self, from: &NodeId, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Announce(ann) => {
                    self.anns.insert(from.clone(), ann);
                }
                Action::Send { to, msg } => {
                    if let Message::Prepare { ballot } = &msg {
                        self.prepares.push((from.clone(), ballot.clone(), self.t));
                    }
                    if matches!(msg, Message::Prepare { .. } | Message::Accept { .. }) {
                        self.paxos_sends.push((from.clone(), to.clone(), self.t));
                    }
                    self.queue.push_back((
                        to,
                        Event::Message {
                            from: from.clone(),
                            msg,
                        },
                    ));
                }
                Action::Persist(st) => {
                    self.persisted.insert(from.clone(), st);
                }
                Action::PrepareNode => self
                    .queue
                    .push_back((from.clone(), Event::NodePrepared(Ok(())))),
                Action::Join {
                    worker,
                    cluster,
                    via,
                    ..
                } => {
                    assert!(
                        self.order.iter().any(|n| self.join_point_of(n) == via),
                        "join through a known node's join point: {via:?}"
                    );
                    self.join_log.push((from.clone(), worker, self.t, cluster));
                    self.joins
                        .insert(from.clone(), (self.t + self.join_ticks, self.t));
                }
                Action::EnableAddons { .. } => {
                    self.addons.push(from.clone());
                    self.queue
                        .push_back((from.clone(), Event::AddonsEnabled(Ok(()))));
                }
                Action::Leave { .. } => {
                    self.leaves.push((from.clone(), self.t));
                    if self.crash_on_leave {
                        self.crash_after = Some(from.clone());
                    } else {
                        self.queue.push_back((from.clone(), Event::Left(Ok(()))));
                    }
                }
                Action::RemoveNode {
                    node, ip, force, ..
                } => {
                    self.removals.push((from.clone(), node.clone(), ip, self.t));
                    self.removal_force.push(force);
                    self.queue.push_back((
                        from.clone(),
                        Event::NodeRemoved {
                            node,
                            result: Ok(()),
                        },
                    ));
                }
                Action::SetStatus(_) => {}
            }
        }
    }

    fn same_side(&self, a: &NodeId, b: &NodeId) -> bool {
        self.group.get(a).copied().unwrap_or(0) == self.group.get(b).copied().unwrap_or(0)
    }

    fn deliver(&mut self, to: &NodeId, ev: Event) {
        let cut = match &ev {
            Event::Message { from, .. } => !self.same_side(from, to),
            Event::PeerSeen { ann, .. } => !self.same_side(&ann.id, to),
            _ => false,
        };
        if cut {
            return;
        }
        let now = secs(self.t);
        if let Some(node) = self.nodes.get_mut(to) {
            let actions = node.handle(now, ev);
            let member = matches!(node.phase(), Phase::Member { .. });
            let to = to.clone();
            self.run(&to, actions);
            if self.crash_after.as_ref() == Some(&to) {
                self.crash_after = None;
                self.crash(to.as_str());
                return;
            }
            if member && self.crash_on_member.as_ref() == Some(&to) {
                self.crash_on_member = None;
                self.crash(to.as_str());
            }
        }
    }

    fn step(&mut self) {
        // announcements
        let anns: Vec<(NodeId, Announcement)> = self
            .anns
            .iter()
            .filter(|_| self.t % self.ann_every == 0)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (from, ann) in anns {
            let from_ip = self.ip_of(&from);
            let targets: Vec<NodeId> = self.nodes.keys().filter(|k| **k != from).cloned().collect();
            for to in targets {
                self.deliver(
                    &to,
                    Event::PeerSeen {
                        ann: ann.clone(),
                        ip: from_ip,
                    },
                );
            }
        }
        let mut budget = 100_000;
        while let Some((to, ev)) = self.queue.pop_front() {
            self.deliver(&to, ev);
            budget -= 1;
            assert!(budget > 0, "message storm");
        }
        if !self.hold_joins {
            let done: Vec<NodeId> = self
                .joins
                .iter()
                .filter(|(_, (end, _))| *end <= self.t)
                .map(|(k, _)| k.clone())
                .collect();
            for n in done {
                self.finish_join(&n, Ok(()));
            }
        }
        let all: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for n in all {
            self.deliver(&n, Event::Tick);
        }
        self.t += 1;
    }

    fn finish_join(&mut self, n: &NodeId, res: Result<(), String>) {
        if let Some((_, start)) = self.joins.remove(n) {
            self.join_spans.push((n.clone(), start, self.t));
            self.deliver(n, Event::JoinFinished(res));
        }
    }

    fn steps(&mut self, k: u64) {
        for _ in 0..k {
            self.step();
        }
    }

    fn phase(&self, n: &str) -> Phase {
        self.nodes[&id(n)].phase().clone()
    }

    fn all_members(&self) -> bool {
        self.nodes
            .values()
            .all(|n| matches!(n.phase(), Phase::Member { .. }))
    }

    fn roles(&self) -> BTreeMap<NodeId, Role> {
        self.nodes
            .iter()
            .filter_map(|(k, n)| match n.phase() {
                Phase::Member { role, .. } => Some((k.clone(), *role)),
                _ => None,
            })
            .collect()
    }

    fn run_until_members(&mut self, max: u64) {
        for _ in 0..max {
            if self.all_members() {
                return;
            }
            self.step();
        }
        panic!(
            "not all members after {max} ticks: {:?}",
            self.nodes.values().map(|n| n.status()).collect::<Vec<_>>()
        );
    }
}

fn cluster_of(p: &Phase) -> Option<ClusterId> {
    p.cluster().cloned()
}

#[test]
fn three_nodes_form_one_cluster_with_the_best_candidate_as_seed() {
    let mut net = Net::new(&[("0a", 0), ("0b", 0), ("0c", 0)], params(3, 3));
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    net.run_until_members(200);
    let seed = cluster_of(&net.phase("0a")).expect("cluster").seed;
    assert_eq!(seed, id("0a"), "equal priority: the lowest id wins");
    for n in ["0b", "0c"] {
        assert_eq!(cluster_of(&net.phase(n)), cluster_of(&net.phase("0a")));
    }
    let first_join = net.join_log.first().expect("joins happened").2;
    assert!(
        net.prepares
            .iter()
            .filter(|p| p.2 < first_join)
            .all(|(from, _, _)| *from == id("0a")),
        "only the best candidate proposes before the cluster exists"
    );
    assert!(net.roles().values().all(|r| *r == Role::ControlPlane));
}

#[test]
fn higher_priority_wins_the_seed_role() {
    let mut net = Net::new(&[("0a", 0), ("0b", 5), ("0c", 1)], params(3, 3));
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    net.run_until_members(200);
    assert_eq!(
        cluster_of(&net.phase("0a")).expect("cluster").seed,
        id("0b")
    );
}

#[test]
fn nodes_pinned_to_worker_are_never_seed() {
    let mut base = params(3, 3);
    base.pinned_roles.insert(id("0a"), Role::Worker);
    let mut net = Net::new(&[("0a", 9), ("0b", 0), ("0c", 0)], base);
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    net.run_until_members(200);
    assert_eq!(
        cluster_of(&net.phase("0a")).expect("cluster").seed,
        id("0b")
    );
    assert_eq!(net.roles()[&id("0a")], Role::Worker);
}

#[test]
fn before_the_timeout_nodes_wait_for_all_expected_nodes() {
    let mut net = Net::new(&[("0a", 0), ("0b", 0), ("0c", 0)], params(3, 3));
    net.boot("0a");
    net.boot("0b");
    net.steps(20); // formation timeout is 30 s
    assert!(
        net.prepares.is_empty(),
        "no election before all expected nodes are visible"
    );
    net.steps(15);
    assert!(
        !net.prepares.is_empty(),
        "after the timeout a majority (2 of 3) forms"
    );
    net.run_until_members(200);
    net.boot("0c");
    net.run_until_members(200);
    assert_eq!(net.roles().len(), 3);
}

#[test]
fn a_minority_never_forms_a_cluster() {
    // 5 expected: 2 visible nodes are a minority, even long after the timeout.
    let mut net = Net::new(&[("0a", 0), ("0b", 0)], params(5, 5));
    net.boot("0a");
    net.boot("0b");
    net.steps(300);
    assert!(net.prepares.is_empty());
    assert!(net.join_log.is_empty());
    assert_eq!(net.phase("0a"), Phase::Discovering);
    // A single node of 3 expected alone: the same.
    let mut net = Net::new(&[("0a", 0)], params(3, 3));
    net.boot("0a");
    net.steps(300);
    assert!(net.prepares.is_empty());
}

#[test]
fn a_node_that_sees_a_formed_cluster_joins_it_instead_of_electing() {
    let mut net = Net::new(&[("0a", 0), ("0b", 0), ("0c", 0), ("01", 9)], params(3, 3));
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    net.run_until_members(200);
    let before = net.prepares.len();
    // A late node with the highest priority and lowest id must not start a second cluster.
    net.boot("01");
    net.run_until_members(200);
    assert!(
        net.prepares[before..]
            .iter()
            .all(|(from, _, _)| *from != id("01")),
        "late node never proposes"
    );
    assert_eq!(cluster_of(&net.phase("01")), cluster_of(&net.phase("0a")));
    assert_eq!(
        net.roles()[&id("01")],
        Role::Worker,
        "control plane is full"
    );
}

#[test]
fn with_a_parallelism_of_one_joins_are_serial_and_roles_follow_the_order() {
    let names = ["0a", "0b", "0c", "0d", "0e", "0f"];
    let mut p = params(3, 6);
    p.join_parallelism = 1;
    let mut net = Net::new(&names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(), p);
    net.join_ticks = 4;
    for n in names {
        net.boot(n);
    }
    net.run_until_members(400);
    let mut spans = net.join_spans.clone();
    spans.sort_by_key(|s| s.1);
    for w in spans.windows(2) {
        assert!(w[0].2 <= w[1].1, "joins overlap: {w:?}");
    }
    let cp = net
        .roles()
        .values()
        .filter(|r| **r == Role::ControlPlane)
        .count();
    assert_eq!(cp, 3, "exactly control_plane control-plane nodes");
    // The first two joiners (after the seed) are control plane, the rest workers.
    let mut log = net.join_log.clone();
    log.sort_by_key(|j| j.2);
    let workers: Vec<bool> = log.iter().map(|j| j.1).collect();
    assert_eq!(workers, vec![false, false, true, true, true]);
    let cluster = &log[0].3;
    assert!(log.iter().all(|j| j.3 == *cluster));
}

#[test]
fn worker_joins_run_in_parallel_up_to_the_limit_and_never_beside_a_control_plane_join() {
    let names = ["0a", "0b", "0c", "0d", "0e", "0f", "1a", "1b", "1c"];
    let mut p = params(3, 9);
    p.join_parallelism = 3;
    let mut net = Net::new(&names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(), p);
    net.join_ticks = 4;
    for n in names {
        net.boot(n);
    }
    net.run_until_members(400);
    let worker_of: BTreeMap<NodeId, bool> =
        net.join_log.iter().map(|j| (j.0.clone(), j.1)).collect();
    let spans = net.join_spans.clone();
    assert_eq!(
        spans.len(),
        8,
        "every node but the seed joined once: {spans:?}"
    );
    let mut most = 0;
    for a in &spans {
        // Joins running while `a` started (a span is [start, end)).
        let beside: Vec<_> = spans
            .iter()
            .filter(|b| b.0 != a.0 && b.1 <= a.1 && a.1 < b.2)
            .collect();
        most = most.max(beside.len() + 1);
        if !worker_of[&a.0] {
            assert!(
                beside.is_empty(),
                "control-plane join {a:?} overlaps {beside:?}"
            );
        }
        for b in &beside {
            assert!(
                worker_of[&a.0] && worker_of[&b.0],
                "{a:?} overlaps the control-plane join {b:?}"
            );
        }
    }
    assert_eq!(
        most, 3,
        "up to join_parallelism = 3 worker joins at once: {spans:?}"
    );
    let roles = net.roles();
    assert_eq!(
        roles.values().filter(|r| **r == Role::ControlPlane).count(),
        3
    );
    // The two control-plane joins come first, one at a time; the six workers then take 2
    // rounds of 3, not 6 rounds.
    let last_end = spans.iter().map(|s| s.2).max().unwrap();
    let first_worker = spans
        .iter()
        .filter(|s| worker_of[&s.0])
        .map(|s| s.1)
        .min()
        .unwrap();
    assert!(
        last_end - first_worker < 4 * 4,
        "6 workers with 3 at a time took {} ticks",
        last_end - first_worker
    );
}

#[test]
fn a_worker_slot_is_not_granted_beside_a_control_plane_slot_nor_one_over_the_limit() {
    use rackseed_formation::{Op, Record, Slot};
    let me = id("0a");
    let mut p = params(3, 6);
    p.join_parallelism = 2;
    let base = Record {
        cluster: ClusterId {
            seed: me.clone(),
            term: 1,
        },
        electorate: [me.clone(), id("0b"), id("0c")].into_iter().collect(),
        authority: me.clone(),
        members: [(me.clone(), Role::ControlPlane)].into_iter().collect(),
        slots: vec![],
        tentative: BTreeMap::new(),
        seq: 0,
        addons_by: None,
        addons_done: false,
        electorate_old: None,
        removed: Vec::new(),
        addresses: BTreeMap::new(),
        converting: None,
    };
    let ballot = Ballot {
        n: 3,
        node: me.clone(),
    };
    let grant = |r: &Record, to: &str| {
        rackseed_formation::node::apply(
            &Op::Grant { to: id(to), req: 1 },
            Some(r),
            &ballot,
            &me,
            &p,
        )
        .expect("a record")
    };
    // 0b gets a control-plane slot; nobody else gets one beside it.
    let r = grant(&base, "0b");
    assert_eq!(r.slots.len(), 1);
    assert_eq!(r.slots[0].role, Role::ControlPlane);
    assert_eq!(
        grant(&r, "0c"),
        r,
        "a second join beside a control-plane join"
    );
    // With the control plane complete (0b, 0c members), workers get slots up to the limit.
    let mut full = base.clone();
    full.members.insert(id("0b"), Role::ControlPlane);
    full.members.insert(id("0c"), Role::ControlPlane);
    let r = grant(&grant(&full, "0d"), "0e");
    assert_eq!(r.slots.len(), 2);
    assert!(r.slots.iter().all(|s| s.role == Role::Worker));
    assert_eq!(
        grant(&r, "0f"),
        r,
        "a third worker join over the limit of 2"
    );
    // A control-plane join waits for worker joins to drain.
    let mut cp_wanted = base.clone();
    cp_wanted.slots.push(Slot {
        node: id("0d"),
        role: Role::Worker,
        seq: 1,
    });
    cp_wanted.seq = 1;
    assert_eq!(grant(&cp_wanted, "0b"), cp_wanted);
    // Records written before this change hold one slot under `slot` and still load.
    let mut json = serde_json::to_value(&r).unwrap();
    let obj = json.as_object_mut().unwrap();
    let one = obj.remove("slots").unwrap()[0].clone();
    obj.insert("slot".into(), one);
    let old: Record = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(old.slots, vec![r.slots[0].clone()]);
    json.as_object_mut()
        .unwrap()
        .insert("slot".into(), serde_json::Value::Null);
    let none: Record = serde_json::from_value(json).unwrap();
    assert!(none.slots.is_empty());
}

#[test]
fn pinned_roles_are_respected_and_keep_their_place() {
    let mut base = params(3, 5);
    base.pinned_roles.insert(id("0b"), Role::Worker);
    base.pinned_roles.insert(id("0e"), Role::ControlPlane);
    let names = ["0a", "0b", "0c", "0d", "0e"];
    let mut net = Net::new(&names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(), base);
    for n in names {
        net.boot(n);
    }
    net.run_until_members(400);
    let roles = net.roles();
    assert_eq!(roles[&id("0b")], Role::Worker);
    assert_eq!(roles[&id("0e")], Role::ControlPlane);
    assert_eq!(
        roles.values().filter(|r| **r == Role::ControlPlane).count(),
        3
    );
}

#[test]
fn addons_are_enabled_once_from_one_control_plane_node_after_ha() {
    let names = ["0a", "0b", "0c", "0d"];
    let mut net = Net::new(
        &names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(),
        params(3, 4),
    );
    for n in names {
        net.boot(n);
    }
    // Before the third control-plane member is confirmed: no addons.
    for _ in 0..400 {
        let cp = net
            .roles()
            .values()
            .filter(|r| **r == Role::ControlPlane)
            .count();
        if cp < 3 {
            assert!(net.addons.is_empty(), "addons before HA");
        }
        net.step();
    }
    assert_eq!(net.addons.len(), 1, "{:?}", net.addons);
    assert_eq!(net.roles()[&net.addons[0]], Role::ControlPlane);
    // A single-node cluster (control_plane = 1) enables them right away.
    let mut net = Net::new(&[("0a", 0)], params(1, 1));
    net.boot("0a");
    net.steps(20);
    assert_eq!(net.addons, vec![id("0a")]);
}

#[test]
fn a_crashed_joiner_resumes_by_asking_for_a_fresh_slot() {
    let names = ["0a", "0b", "0c"];
    let mut net = Net::new(
        &names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(),
        params(3, 3),
    );
    net.hold_joins = true;
    for n in names {
        net.boot(n);
    }
    for _ in 0..200 {
        if !net.joins.is_empty() {
            break;
        }
        net.step();
    }
    let joiner = net.joins.keys().next().expect("a join started").clone();
    assert!(
        matches!(net.persisted[&joiner].phase, Phase::Joining { .. }),
        "Joining persisted before Join"
    );
    net.crash(joiner.as_str());
    net.steps(3);
    net.boot(joiner.as_str());
    assert!(
        matches!(net.persisted[&joiner].phase, Phase::WaitingForSlot { .. }),
        "restart never resumes a join blindly"
    );
    net.hold_joins = false;
    net.run_until_members(300);
}

#[test]
fn a_slot_that_is_never_confirmed_is_reclaimed_and_counted() {
    let names = ["0a", "0b", "0c", "0d"];
    let mut net = Net::new(
        &names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(),
        params(3, 4),
    );
    net.hold_joins = true;
    for n in names {
        net.boot(n);
    }
    for _ in 0..200 {
        if !net.joins.is_empty() {
            break;
        }
        net.step();
    }
    let stuck = net.joins.keys().next().expect("a join started").clone();
    // The holder vanishes for good in the middle of its join.
    net.crash(stuck.as_str());
    net.hold_joins = false;
    for _ in 0..400 {
        net.step();
        let others_done = net
            .nodes
            .iter()
            .filter(|(k, _)| **k != stuck)
            .all(|(_, n)| matches!(n.phase(), Phase::Member { .. }));
        if others_done {
            break;
        }
    }
    let st = net.nodes[&id("0a")].status();
    assert!(
        st.members_known.len() >= 3,
        "slot was reclaimed and others joined: {st:?}"
    );
    // The vanished holder may have joined as control plane: it stays counted.
    let cp_members = st
        .members_known
        .values()
        .filter(|r| **r == Role::ControlPlane)
        .count();
    assert!(cp_members <= 2, "its control-plane place is kept: {st:?}");
}

#[test]
fn the_seed_is_replaced_when_it_vanishes_before_anyone_joined() {
    let mut net = Net::new(&[("0a", 0), ("0b", 0), ("0c", 0)], params(3, 3));
    // The seed dies the moment its election is chosen, before any grant.
    net.crash_on_member = Some(id("0a"));
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    for _ in 0..100 {
        if net.nodes.len() == 2 {
            break;
        }
        net.step();
    }
    assert_eq!(net.nodes.len(), 2, "the seed was elected and crashed");
    assert!(matches!(
        net.persisted[&id("0a")].phase,
        Phase::Member { .. }
    ));
    assert!(net.join_log.is_empty());
    net.run_until_members(300);
    let c = cluster_of(&net.phase("0b")).expect("cluster");
    assert_eq!(
        c.seed,
        id("0b"),
        "the next best candidate replaced the seed"
    );
    // The old seed comes back (still believing in its own cluster), learns that it was
    // replaced, and joins the new cluster.
    net.boot("0a");
    for _ in 0..300 {
        net.step();
        if cluster_of(&net.phase("0a")) == Some(c.clone()) && net.all_members() {
            break;
        }
    }
    assert_eq!(cluster_of(&net.phase("0a")), Some(c));
    assert!(net.join_log.iter().all(|j| j.3.seed == id("0b")));
}

#[test]
fn another_control_plane_member_takes_over_granting_when_the_authority_vanishes() {
    let names = ["0a", "0b", "0c", "0d", "0e"];
    let mut net = Net::new(
        &names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(),
        params(3, 5),
    );
    for n in names {
        net.boot(n);
    }
    // Wait until the seed has at least one more member, then remove it.
    for _ in 0..300 {
        if net.nodes[&id("0a")].status().members_known.len() >= 3 {
            break;
        }
        net.step();
    }
    net.crash("0a");
    for _ in 0..600 {
        let live_members = net
            .nodes
            .values()
            .all(|n| matches!(n.phase(), Phase::Member { .. }));
        if live_members {
            break;
        }
        net.step();
    }
    let st = net.nodes[&id("0b")].status();
    assert!(
        net.nodes
            .values()
            .all(|n| matches!(n.phase(), Phase::Member { .. })),
        "{st:?}"
    );
    assert_ne!(st.authority, Some(id("0a")), "authority moved");
}

#[test]
fn acceptor_promises_are_binding_and_persisted_before_the_reply() {
    let p = params(3, 3);
    let (mut node, _) = Node::new(p.clone(), id("0a"), None, secs(0));
    let hi = Ballot {
        n: 5,
        node: id("0b"),
    };
    let lo = Ballot {
        n: 4,
        node: id("0c"),
    };
    let out = node.handle(
        secs(1),
        Event::Message {
            from: id("0b"),
            msg: Message::Prepare { ballot: hi.clone() },
        },
    );
    let persist = out
        .iter()
        .position(|a| matches!(a, Action::Persist(s) if s.acceptor.promised == Some(hi.clone())));
    let reply = out.iter().position(|a| {
        matches!(
            a,
            Action::Send {
                msg: Message::Promise { .. },
                ..
            }
        )
    });
    assert!(
        persist.is_some() && reply.is_some() && persist < reply,
        "{out:?}"
    );
    let out = node.handle(
        secs(2),
        Event::Message {
            from: id("0c"),
            msg: Message::Prepare { ballot: lo.clone() },
        },
    );
    assert!(out.iter().any(
        |a| matches!(a, Action::Send { msg: Message::Nack { promised, .. }, .. } if *promised == hi)
    ));
    // A forged ballot (claiming another proposer) is ignored.
    let out = node.handle(
        secs(3),
        Event::Message {
            from: id("0c"),
            msg: Message::Prepare {
                ballot: Ballot {
                    n: 9,
                    node: id("0b"),
                },
            },
        },
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Send { .. })));
    assert_eq!(node.status().ignored, 1);
    // The promise survives a restart.
    let st = node.persisted().clone();
    let (mut node, _) = Node::new(p, id("0a"), Some(st), secs(0));
    let out = node.handle(
        secs(1),
        Event::Message {
            from: id("0c"),
            msg: Message::Prepare { ballot: lo },
        },
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: Message::Nack { .. },
            ..
        }
    )));
}

#[test]
fn a_stale_grant_is_ignored() {
    let p = params(3, 3);
    let (mut node, _) = Node::new(p, id("0c"), None, secs(0));
    node.handle(secs(0), Event::NodePrepared(Ok(())));
    let cluster = ClusterId {
        seed: id("0a"),
        term: 1,
    };
    let ann = Announcement {
        id: id("0a"),
        priority: 0,
        phase: PhaseSummary::Member,
        role: Some(Role::ControlPlane),
        cluster: Some(cluster.clone()),
        authority: Some(id("0a")),
        record_ballot: Some(Ballot {
            n: 1,
            node: id("0a"),
        }),
        members: 1,
        eligible: true,
    };
    let out = node.handle(secs(1), Event::PeerSeen { ann, ip: ip(1) });
    let req = out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                to,
                msg: Message::SlotRequest { req },
            } if *to == id("0a") => Some(*req),
            _ => None,
        })
        .expect("a waiting node asks the authority for a slot");
    // Answered long after the request: must not join.
    let grant = Message::SlotGrant {
        req,
        cluster: cluster.clone(),
        seq: 1,
        role: Role::ControlPlane,
        via: JoinPoint::new(ip(1), "0123456789ab").unwrap(),
    };
    let mut out = node.handle(
        secs(1) + secs(5),
        Event::Message {
            from: id("0a"),
            msg: grant.clone(),
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Join { .. })),
        "{out:?}"
    );
    // A fresh answer to a new request is accepted: the join starts and `Joining` is persisted.
    out.extend(node.handle(secs(7), Event::Tick));
    let req = out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                msg: Message::SlotRequest { req },
                ..
            } => Some(*req),
            _ => None,
        })
        .next_back()
        .expect("asks again");
    let grant = Message::SlotGrant {
        req,
        cluster,
        seq: 2,
        role: Role::Worker,
        via: JoinPoint::new(ip(1), "0123456789ab").unwrap(),
    };
    let before = node.persisted().clone();
    let out = node.handle(
        secs(8),
        Event::Message {
            from: id("0a"),
            msg: grant,
        },
    );
    let joining = out.iter().find_map(|a| match a {
        Action::Persist(s) if matches!(s.phase, Phase::Joining { .. }) => Some(s.clone()),
        _ => None,
    });
    let join = out
        .iter()
        .any(|a| matches!(a, Action::Join { worker: true, via, .. } if via.ip == ip(1) && via.fingerprint == "0123456789ab"));
    assert!(join, "{out:?}");
    let joining = joining.expect("`Joining` is persisted");
    // The join need not wait for that persist: killed before it or after it, the node resumes
    // the same way, waiting for a fresh grant (it never resumes a join).
    let resumed = |st: PersistedState| {
        let (n, _) = Node::new(params(3, 3), id("0c"), Some(st), secs(0));
        n.phase().clone()
    };
    let waiting = Phase::WaitingForSlot {
        cluster: ClusterId {
            seed: id("0a"),
            term: 1,
        },
    };
    assert_eq!(resumed(before), waiting);
    assert_eq!(resumed(joining), waiting);
}

#[test]
fn params_are_validated_and_built_from_config() {
    let mut p = params(3, 3);
    p.slot_timeout = p.join_timeout;
    assert!(matches!(p.validate(), Err(ParamsError::SlotTimeout { .. })));
    let mut p = params(3, 3);
    p.control_plane = 2;
    assert_eq!(p.validate(), Err(ParamsError::ControlPlane(2)));
    assert_eq!(params(3, 3).election_quorum(), 2);
    assert_eq!(params(5, 5).election_quorum(), 3);
    assert_eq!(
        params(3, 10).election_quorum(),
        6,
        "quorums count every expected node"
    );
    assert_eq!(params(1, 1).ha_size(), 1);
    assert_eq!(params(5, 5).ha_size(), 3);
    assert!(
        FormationParams::new(3, 3, secs(600)).validate().is_ok(),
        "defaults are valid"
    );
}

#[test]
fn node_ids_are_lowercase_letters_digits_and_dashes() {
    assert!(NodeId::new("0123abcdef").is_ok());
    assert!(NodeId::new("node-xyz").is_ok());
    assert!(NodeId::new("").is_err());
    assert!(NodeId::new("ABCD").is_err());
    assert!(NodeId::new("x_y").is_err());
    assert!(NodeId::new("x.y").is_err());
    assert!(NodeId::new("a".repeat(49)).is_err());
    let mac: rackseed_config::MacAddr = "AA:bb:0c:00:11:22".parse().expect("mac");
    assert_eq!(NodeId::from_mac(mac).as_str(), "aabb0c001122");
    let json = serde_json::to_string(&id("0a")).expect("serialize");
    assert_eq!(json, "\"0a\"");
    assert!(
        serde_json::from_str::<NodeId>("\"0A\"").is_err(),
        "validated on deserialize"
    );
}

#[test]
fn a_grant_for_a_request_from_before_a_restart_is_ignored() {
    let p = params(3, 3);
    let (mut node, _) = Node::new(p.clone(), id("0c"), None, secs(0));
    node.handle(secs(0), Event::NodePrepared(Ok(())));
    let cluster = ClusterId {
        seed: id("0a"),
        term: 1,
    };
    let ann = Announcement {
        id: id("0a"),
        priority: 0,
        phase: PhaseSummary::Member,
        role: Some(Role::ControlPlane),
        cluster: Some(cluster.clone()),
        authority: Some(id("0a")),
        record_ballot: Some(Ballot {
            n: 1,
            node: id("0a"),
        }),
        members: 1,
        eligible: true,
    };
    let req_of = |out: &[Action]| {
        out.iter().find_map(|a| match a {
            Action::Send {
                msg: Message::SlotRequest { req },
                ..
            } => Some(*req),
            _ => None,
        })
    };
    let out = node.handle(
        secs(1),
        Event::PeerSeen {
            ann: ann.clone(),
            ip: ip(1),
        },
    );
    let old_req = req_of(&out).expect("asks for a slot");
    // Restart (the clock starts again at zero) and ask again.
    let (mut node, _) = Node::new(p, id("0c"), Some(node.persisted().clone()), secs(0));
    let out = node.handle(secs(1), Event::PeerSeen { ann, ip: ip(1) });
    let new_req = req_of(&out).expect("asks again after the restart");
    assert_ne!(old_req, new_req, "request ids are unique across restarts");
    let stale = Message::SlotGrant {
        req: old_req,
        cluster,
        seq: 1,
        role: Role::ControlPlane,
        via: JoinPoint::new(ip(1), "0123456789ab").unwrap(),
    };
    let out = node.handle(
        secs(2),
        Event::Message {
            from: id("0a"),
            msg: stale,
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Join { .. })),
        "{out:?}"
    );
}

#[test]
fn params_from_the_rack_example_config() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../configs/rack.toml");
    let loaded = rackseed_config::load(&path).expect("configs/rack.toml loads");
    let mac: rackseed_config::MacAddr = "3c:ec:ef:10:00:02".parse().expect("mac");
    let p = FormationParams::from_config(&loaded.config, Some(mac));
    assert_eq!(p.priority, 90, "priority of this node's inventory entry");
    assert_eq!(p.control_plane, loaded.config.cluster.control_plane);
    assert_eq!(p.expected_nodes, 5);
    assert_eq!(
        p.pinned_roles.get(&id("3cecef100001")),
        Some(&Role::ControlPlane)
    );
    assert_eq!(p.pinned_roles.get(&id("3cecef100005")), Some(&Role::Worker));
    assert!(p.addons_wanted);
    p.validate().expect("derived params are valid");
    // A machine not in the inventory gets priority 0.
    let other: rackseed_config::MacAddr = "02:00:00:00:00:09".parse().expect("mac");
    assert_eq!(
        FormationParams::from_config(&loaded.config, Some(other)).priority,
        0
    );
}

#[test]
fn a_cluster_that_ever_granted_a_slot_can_never_be_replaced() {
    use rackseed_formation::{Record, Slot};
    let me = id("0a");
    let mut r = Record {
        cluster: ClusterId {
            seed: me.clone(),
            term: 1,
        },
        electorate: [me.clone(), id("0b"), id("0c")].into_iter().collect(),
        authority: me.clone(),
        members: [(me.clone(), Role::ControlPlane)].into_iter().collect(),
        slots: vec![],
        tentative: BTreeMap::new(),
        seq: 0,
        addons_by: None,
        addons_done: false,
        electorate_old: None,
        removed: Vec::new(),
        addresses: BTreeMap::new(),
        converting: None,
    };
    assert!(r.is_untouched());
    r.seq = 1;
    r.slots = vec![Slot {
        node: id("0b"),
        role: Role::ControlPlane,
        seq: 1,
    }];
    assert!(!r.is_untouched());
    // Even after the (failed) join gave the slot back.
    r.slots.clear();
    assert!(!r.is_untouched());
    let p = params(3, 3);
    let op = rackseed_formation::Op::Elect {
        electorate: r.electorate.clone(),
        replace: Some(r.cluster.clone()),
    };
    let ballot = Ballot {
        n: 7,
        node: id("0b"),
    };
    assert_eq!(
        rackseed_formation::node::apply(&op, Some(&r), &ballot, &id("0b"), &p),
        Some(r.clone())
    );
}

/// Names `0a`, `0b`, ... for `n` nodes, with priorities from `prio`.
fn many(n: usize, prio: impl Fn(usize) -> u32) -> Vec<(String, u32)> {
    (0..n)
        .map(|i| (format!("{:02x}", 0x0a + i), prio(i)))
        .collect()
}

fn net_of(nodes: &[(String, u32)], p: FormationParams) -> Net {
    let refs: Vec<(&str, u32)> = nodes.iter().map(|(n, pr)| (n.as_str(), *pr)).collect();
    Net::new(&refs, p)
}

#[test]
fn a_large_cluster_keeps_a_small_electorate_of_its_best_candidates() {
    // 16 nodes, 3 control plane: the electorate is the seed and the 6 next best candidates
    // (priority first, then id; nodes pinned to worker last), and once the election is
    // chosen every Paxos message goes to the electorate only.
    let nodes = many(16, |i| if i == 9 || i == 12 { 4 } else { 0 });
    let mut p = params(3, 16);
    p.pinned_roles.insert(id("0b"), Role::Worker);
    assert_eq!(p.electorate_cap(), 7);
    let mut net = net_of(&nodes, p);
    for (n, _) in &nodes {
        net.boot(n);
    }
    net.run_until_members(2000);
    let seed = net.nodes.values().find_map(|n| {
        let c = n.persisted().chosen.as_ref()?;
        Some(c.record.clone())
    });
    let rec = seed.expect("some node saw the record chosen");
    let expected: BTreeSet<NodeId> = ["13", "16", "0a", "0c", "0d", "0e", "0f"]
        .into_iter()
        .map(id)
        .collect();
    assert_eq!(rec.cluster.seed, id("13"), "priority 4, lowest id");
    assert_eq!(rec.electorate, expected);
    let cp: BTreeSet<NodeId> = net
        .roles()
        .into_iter()
        .filter(|(_, r)| *r == Role::ControlPlane)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(cp.len(), 3);
    assert!(
        cp.is_subset(&rec.electorate),
        "control plane {cp:?} drawn from the electorate"
    );
    let first_join = net.join_log.first().expect("joins happened").2;
    let late: Vec<_> = net
        .paxos_sends
        .iter()
        .filter(|(_, to, t)| *t > first_join && !rec.electorate.contains(to))
        .collect();
    assert!(
        late.is_empty(),
        "Paxos messages outside the electorate: {late:?}"
    );
    assert!(net.paxos_sends.iter().any(|(_, _, t)| *t > first_join));
}

#[test]
fn a_node_added_later_joins_while_only_the_electorate_is_up() {
    // 15 expected nodes (pre-election quorum 8), electorate 7. After formation the 8 nodes
    // outside the electorate are switched off: 7 are up, fewer than the pre-election quorum,
    // yet a 16th machine flashed with the same image joins, because rounds on a chosen record
    // need only a majority of its electorate.
    let nodes = many(16, |_| 0);
    let mut net = net_of(&nodes, params(3, 15));
    for (n, _) in &nodes[..15] {
        net.boot(n);
    }
    net.run_until_members(2000);
    let rec = net.nodes[&id("0a")]
        .persisted()
        .chosen
        .clone()
        .expect("the seed saw its record chosen")
        .record;
    let off: Vec<String> = nodes[..15]
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| !rec.electorate.contains(&id(n)))
        .collect();
    assert_eq!(off.len(), 8);
    for n in &off {
        net.crash(n);
    }
    net.steps(20);
    let late = &nodes[15].0;
    net.boot(late);
    for _ in 0..200 {
        if matches!(net.phase(late), Phase::Member { .. }) {
            break;
        }
        net.step();
    }
    assert_eq!(
        net.phase(late),
        Phase::Member {
            cluster: rec.cluster.clone(),
            role: Role::Worker
        }
    );
}

#[test]
fn no_slot_is_granted_before_the_authority_knows_its_join_point_and_joins_use_it() {
    let mut net = Net::new(&[("0a", 0), ("0b", 0), ("0c", 0)], params(3, 3));
    net.hide_join_points = true;
    for n in ["0a", "0b", "0c"] {
        net.boot(n);
    }
    net.steps(60);
    assert!(
        net.join_log.is_empty(),
        "a grant went out without a join point: {:?}",
        net.join_log
    );
    assert!(
        matches!(net.phase("0a"), Phase::Member { .. }),
        "the seed formed"
    );
    // The seed's MicroK8s is up: it learns where others join it, and grants go out.
    let jp = net.join_point_of(&id("0a"));
    net.queue.push_back((id("0a"), Event::JoinPointKnown(jp)));
    net.run_until_members(200);
    assert_eq!(net.join_log.len(), 2, "{:?}", net.join_log);
}

#[test]
fn standbys_join_as_full_members_one_at_a_time_and_the_rest_as_workers() {
    let names = ["0a", "0b", "0c", "0d", "0e", "0f", "1a"];
    let mut p = params(3, 7);
    p.standbys = 2;
    p.join_parallelism = 4;
    let mut net = Net::new(&names.iter().map(|n| (*n, 0)).collect::<Vec<_>>(), p);
    net.join_ticks = 4;
    for n in names {
        net.boot(n);
    }
    net.run_until_members(400);
    let roles = net.roles();
    let full = roles.values().filter(|r| **r == Role::ControlPlane).count();
    assert_eq!(full, 5, "3 control-plane nodes + 2 standbys: {roles:?}");
    let worker_of: BTreeMap<NodeId, bool> =
        net.join_log.iter().map(|j| (j.0.clone(), j.1)).collect();
    assert_eq!(worker_of.values().filter(|w| **w).count(), 2);
    // A full member's join changes dqlite's membership: it never runs beside another join.
    let spans = net.join_spans.clone();
    for a in spans.iter().filter(|a| !worker_of[&a.0]) {
        let beside: Vec<_> = spans
            .iter()
            .filter(|b| b.0 != a.0 && b.1 < a.2 && a.1 < b.2)
            .collect();
        assert!(
            beside.is_empty(),
            "full-member join {a:?} overlaps {beside:?}"
        );
    }
}

// ----- healing: dead members removed, the electorate handed over -----

/// Healing parameters: a member unseen for 40 s is removed.
fn healing_params(cp: u8, expected: u32) -> FormationParams {
    let mut p = params(cp, expected);
    p.replace_after = secs(40);
    p.validate().expect("test params are valid");
    p
}

/// 3 control-plane members (a, b, c) and a 4th machine; c is switched off, d joins (its
/// record chosen by a and b) and stays; returns the 4-member record chosen while c was away.
fn member_off_while_a_join_was_recorded() -> (Net, rackseed_formation::Record) {
    let mut net = Net::new(&[("a", 3), ("b", 2), ("c", 1), ("d", 0)], params(3, 3));
    for n in ["a", "b", "c"] {
        net.boot(n);
    }
    net.run_until_members(2000);
    net.crash("c");
    net.steps(5);
    net.boot("d");
    for _ in 0..400 {
        if matches!(net.phase("d"), Phase::Member { .. }) {
            break;
        }
        net.step();
    }
    assert!(
        matches!(net.phase("d"), Phase::Member { .. }),
        "{:?}",
        net.phase("d")
    );
    net.steps(20);
    let four = newest_chosen(&net);
    assert_eq!(four.members.len(), 4);
    (net, four)
}

/// The newest record `n` learned (it must know one).
fn known_of(net: &Net, n: &str) -> rackseed_formation::Accepted {
    net.nodes[&id(n)]
        .persisted()
        .known
        .clone()
        .expect("a known record")
}

/// Runs `ticks` ticks in which no node may send a Prepare or an Accept (nothing changes).
fn assert_quiet(net: &mut Net, ticks: u64) {
    let sends = net.paxos_sends.len();
    net.steps(ticks);
    assert_eq!(
        &net.paxos_sends[sends..],
        &[],
        "Paxos traffic in a cluster where nothing changes"
    );
}

/// Ticks until `n` holds a record with `members` members (at most `limit`).
fn ticks_until_known_members(net: &mut Net, n: &str, members: usize, limit: u64) -> Option<u64> {
    for t in 0..limit {
        let known = net.nodes[&id(n)].persisted().known.as_ref();
        if known.is_some_and(|k| k.record.members.len() == members) {
            return Some(t);
        }
        net.step();
    }
    None
}

#[test]
fn a_control_plane_member_down_while_a_record_was_chosen_learns_it_when_back() {
    // c comes back holding the 3-member record. Nothing changes in the cluster after that, so
    // as a mere acceptor it would hold the old record (and show "3 members known") until the
    // next change: the authority sends it the chosen record again.
    let (mut net, four) = member_off_while_a_join_was_recorded();
    let before = net.prepares.len();
    net.boot("c");
    let took = ticks_until_known_members(&mut net, "c", 4, 30);
    assert!(
        took.is_some(),
        "the restarted member still holds {:?} 30 ticks after its boot",
        net.nodes[&id("c")]
            .persisted()
            .known
            .as_ref()
            .map(|k| k.record.members.len())
    );
    let known = known_of(&net, "c");
    assert_eq!(known.record.members, four.members);
    // The authority's copy, not a round of its own: no Prepare from a.
    assert!(
        !net.prepares[before..]
            .iter()
            .any(|(from, _, _)| *from == id("a")),
        "the authority ran a round to bring c the record: {:?}",
        &net.prepares[before..]
    );
    // Once c acknowledged it, all is quiet: no more copies, no rounds.
    net.steps(2);
    assert_quiet(&mut net, 60);
}

#[test]
fn a_member_that_promised_a_higher_ballot_gets_the_record_from_a_round_of_the_authority() {
    // As above, but c promised a ballot above the chosen record's (a proposer's Prepare that
    // went nowhere) before the authority's copy arrives: c refuses the copy, and the
    // authority's next round, above that promise, brings it the record.
    let (mut net, four) = member_off_while_a_join_was_recorded();
    net.boot("c");
    let high = Ballot {
        n: 1000,
        node: id("b"),
    };
    net.queue.push_front((
        id("c"),
        Event::Message {
            from: id("b"),
            msg: Message::Prepare {
                ballot: high.clone(),
            },
        },
    ));
    let took = ticks_until_known_members(&mut net, "c", 4, 40);
    assert!(took.is_some(), "c never learned the 4-member record");
    let known = known_of(&net, "c");
    assert_eq!(known.record.members, four.members);
    assert!(
        known.ballot > high,
        "learned at {} (promised {high})",
        known.ballot
    );
    assert_eq!(
        known.ballot.node,
        id("a"),
        "brought by the authority's round"
    );
}

#[test]
fn a_formed_cluster_is_quiet_while_announcements_lag_its_record() {
    // The agent sends a changed record ballot with its next heartbeat (every peer_timeout / 3):
    // for a while after each round the voters announce the previous ballot. That is no reason
    // for the authority to run rounds (each would make a new ballot, announced late again).
    let mut p = params(3, 5);
    p.peer_timeout = secs(30);
    p.replace_after = secs(120);
    p.validate().expect("valid");
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut net = Net::new(
        &[("a", 6), ("b", 5), ("c", 4), ("d", 3), ("e", 2), ("f", 1)],
        p,
    );
    net.ann_every = 20;
    for n in &names[..5] {
        net.boot(n);
    }
    net.run_until_members(3000);
    // A late machine joins: the authority's rounds for it come long before the voters'
    // next announcements.
    while net.t % 20 != 1 {
        net.step();
    }
    net.boot("f");
    net.run_until_members(3000);
    net.steps(40);
    assert_quiet(&mut net, 200);
}

/// The newest record any live node saw chosen.
fn newest_chosen(net: &Net) -> rackseed_formation::Record {
    net.nodes
        .values()
        .filter_map(|n| n.persisted().chosen.clone())
        .max_by(|a, b| a.ballot.cmp(&b.ballot))
        .expect("a chosen record")
        .record
}

fn authority_of(net: &Net) -> NodeId {
    newest_chosen(net).authority
}

#[test]
fn replace_after_must_exceed_the_peer_timeout() {
    let mut p = params(3, 3);
    p.replace_after = p.peer_timeout;
    assert!(matches!(
        p.validate(),
        Err(ParamsError::ReplaceAfter { .. })
    ));
}

#[test]
fn a_dead_member_is_removed_once_by_the_authority_and_its_vote_handed_over() {
    // Five nodes form (all five in the electorate); a sixth comes later (outside it).
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0), ("f", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    for n in ["a", "b", "c", "d", "e"] {
        net.boot(n);
    }
    net.run_until_members(200);
    net.boot("f");
    net.run_until_members(200);
    let rec = newest_chosen(&net);
    assert!(!rec.electorate.contains(&id("f")), "{:?}", rec.electorate);
    let authority = rec.authority.clone();
    // A member that is neither the authority nor the seed dies for good.
    let victim = ["b", "c", "d", "e"]
        .into_iter()
        .map(id)
        .find(|n| *n != authority && *n != rec.cluster.seed && rec.electorate.contains(n))
        .expect("a victim");
    let victim_ip = net.ip_of(&victim);
    net.crash(victim.as_str());
    // Not before replace-after: nothing removed at 30 s.
    net.steps(30);
    assert!(net.removals.is_empty(), "{:?}", net.removals);
    net.steps(60);
    assert_eq!(
        forced_removals(&net)
            .iter()
            .map(|r| (&r.0, &r.1, r.2))
            .collect::<Vec<_>>(),
        vec![(&authority, &victim, victim_ip)],
        "exactly one remove-node --force, by the authority, of the dead member's address"
    );
    // A control-plane victim leaves 2 of 3: one worker is converted (its remove-node, after
    // it left, has no --force); a worker victim converts nobody.
    let conversions = net.removals.len() - 1;
    assert_eq!(net.leaves.len(), conversions, "{:?}", net.leaves);
    assert!(conversions <= 1, "{:?}", net.removals);
    let rec = newest_chosen(&net);
    assert!(!rec.members.contains_key(&victim));
    let removal = rec
        .removed
        .iter()
        .find(|x| x.node == victim)
        .expect("removal noted");
    assert!(removal.done, "{removal:?}");
    assert_eq!(removal.role, Role::ControlPlane);
    assert!(removal.reason.contains("unseen for"), "{}", removal.reason);
    // The vote went to the live node outside the electorate, and the joint step ended.
    assert!(!rec.electorate.contains(&victim), "{:?}", rec.electorate);
    assert!(rec.electorate.contains(&id("f")), "{:?}", rec.electorate);
    assert_eq!(rec.electorate.len(), 5);
    assert_eq!(rec.electorate_old, None);
    // The status shows it.
    let st = net.nodes[&authority].status();
    assert!(st.removed.iter().any(|x| x.node == victim));
    assert!(st.electorate.contains(&id("f")));
    // Nothing more happens.
    net.steps(60);
    assert_eq!(forced_removals(&net).len(), 1, "{:?}", net.removals);
    assert_eq!(net.removals.len(), 1 + conversions, "{:?}", net.removals);
}

/// The `remove-node --force` runs (dead or re-flashed members), without the removals of
/// workers that left to be converted.
fn forced_removals(net: &Net) -> Vec<(NodeId, NodeId, IpAddr, u64)> {
    net.removals
        .iter()
        .zip(&net.removal_force)
        .filter(|(_, f)| **f)
        .map(|(r, _)| r.clone())
        .collect()
}

#[test]
fn a_minority_holding_the_authority_removes_nobody_and_the_majority_heals() {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    for n in ["a", "b", "c", "d", "e"] {
        net.boot(n);
    }
    net.run_until_members(200);
    let authority = authority_of(&net);
    let other = names
        .iter()
        .map(|(n, _)| id(n))
        .find(|n| *n != authority)
        .expect("another node");
    // The authority and one other node are cut off from the other three for 3 minutes.
    net.group.insert(authority.clone(), 1);
    net.group.insert(other.clone(), 1);
    net.steps(180);
    let minority: Vec<&(NodeId, NodeId, IpAddr, u64)> = net
        .removals
        .iter()
        .filter(|r| r.0 == authority || r.0 == other)
        .collect();
    assert!(minority.is_empty(), "the minority removed {minority:?}");
    // The majority took over and removed the two it cannot see, once each (with --force;
    // the workers it then converted, one at a time, were removed without, after they left).
    let forced = forced_removals(&net);
    let removed: BTreeSet<&NodeId> = forced.iter().map(|r| &r.1).collect();
    assert_eq!(
        removed,
        BTreeSet::from([&authority, &other]),
        "{:?}",
        net.removals
    );
    assert_eq!(forced.len(), 2, "{:?}", net.removals);
    let by: BTreeSet<&NodeId> = net.removals.iter().map(|r| &r.0).collect();
    assert_eq!(by.len(), 1, "one node ran remove-node: {:?}", net.removals);
    let leaves: Vec<&NodeId> = net.leaves.iter().map(|l| &l.0).collect();
    let unforced: Vec<&NodeId> = net
        .removals
        .iter()
        .zip(&net.removal_force)
        .filter(|(_, f)| !**f)
        .map(|(r, _)| &r.1)
        .collect();
    assert_eq!(
        leaves, unforced,
        "each converted worker left, then was removed"
    );
    // The partition heals: one history, the minority's stale authority decides nothing.
    // The two removed nodes (dqlite no longer has them) are no members until they left and
    // joined again through a slot, once each, with no further removal.
    net.group.clear();
    let healed_at = net.t;
    let leaves_before = net.leaves.len();
    let before = net.removals.len();
    for n in [&authority, &other] {
        steps_checking_not_member_before_rejoin(&mut net, n, healed_at, 150, |net| {
            net.all_members()
                && newest_chosen(net).members.contains_key(&authority)
                && newest_chosen(net).members.contains_key(&other)
        });
    }
    assert_eq!(forced_removals(&net).len(), 2, "{:?}", net.removals);
    assert_eq!(net.removals.len(), before, "{:?}", net.removals);
    let rec = newest_chosen(&net);
    assert!(
        rec.members.contains_key(&authority) && rec.members.contains_key(&other),
        "{rec:?}"
    );
    let mut left: Vec<&NodeId> = net.leaves[leaves_before..].iter().map(|l| &l.0).collect();
    left.sort();
    let mut expect = vec![&authority, &other];
    expect.sort();
    assert_eq!(left, expect, "each removed node left once");
    for n in [&authority, &other] {
        let joins = net
            .join_log
            .iter()
            .filter(|(j, _, t, _)| j == n && *t >= healed_at)
            .count();
        assert_eq!(joins, 1, "{n} joined again once");
    }
    assert!(rec.removed.iter().all(|x| x.done));
    assert!(net.all_members());
}

#[test]
fn a_control_plane_slot_waits_for_the_removal_to_be_carried_out() {
    let names = [("a", 0), ("b", 0), ("c", 0)];
    let p = healing_params(3, 3);
    let mut net = Net::new(&names, p.clone());
    for n in ["a", "b", "c"] {
        net.boot(n);
    }
    net.run_until_members(200);
    let rec = newest_chosen(&net);
    // Record with a removal not yet carried out: no control-plane grant, a worker grant is fine.
    let mut pending = rec.clone();
    pending.removed.push(rackseed_formation::Removal {
        node: id("zz"),
        role: Role::ControlPlane,
        reason: "test".into(),
        ip: None,
        done: false,
        left: false,
    });
    assert!(!pending.may_grant(Role::ControlPlane, 8));
    assert!(pending.may_grant(Role::Worker, 8));
    pending.removed[0].done = true;
    assert!(pending.may_grant(Role::ControlPlane, 8));
}

// ----- a machine re-flashed with the same id joins again -----

/// Re-flash `n`: power off, state gone (same id, same address), boot again.
fn reflash(net: &mut Net, n: &str) {
    net.crash(n);
    net.persisted.remove(&id(n));
    net.steps(2);
    net.boot(n);
}

/// Joins `n` started from tick `since` on: (worker, tick).
fn joins_since(net: &Net, n: &NodeId, since: u64) -> Vec<(bool, u64)> {
    net.join_log
        .iter()
        .filter(|j| j.0 == *n && j.2 >= since)
        .map(|j| (j.1, j.2))
        .collect()
}

#[test]
fn a_reflashed_worker_with_the_same_id_joins_again_and_nothing_is_removed_from_dqlite() {
    let mut net = formed_five();
    let rec = newest_chosen(&net);
    let worker = rec
        .members
        .iter()
        .find(|(_, r)| **r == Role::Worker)
        .map(|(n, _)| n.clone())
        .expect("a worker");
    let t0 = net.t;
    reflash(&mut net, worker.as_str());
    // Before the fix it was confirmed a member at once, without a join.
    net.run_until_members(200);
    net.steps(10);
    assert_eq!(
        joins_since(&net, &worker, t0)
            .iter()
            .map(|j| j.0)
            .collect::<Vec<_>>(),
        vec![true],
        "the re-flashed worker ran exactly one worker join: {:?}",
        net.join_log
    );
    let rec = newest_chosen(&net);
    assert_eq!(rec.members.get(&worker), Some(&Role::Worker));
    let x = rec
        .removed
        .iter()
        .find(|x| x.node == worker)
        .expect("the readmission is noted");
    assert!(x.done && x.reason.contains("re-flashed"), "{x:?}");
    assert!(
        net.removals.is_empty(),
        "a worker is no dqlite member: nothing to remove-node: {:?}",
        net.removals
    );
    assert_eq!(rec.control_plane_count(), 3);
}

#[test]
fn a_reflashed_control_plane_member_is_removed_from_dqlite_once_then_joins_again() {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0)];
    let mut net = Net::new(&names, healing_params(3, 4));
    for (n, _) in names {
        net.boot(n);
    }
    net.run_until_members(300);
    let rec = newest_chosen(&net);
    let authority = rec.authority.clone();
    let victim = rec
        .control_plane_members()
        .find(|n| **n != authority)
        .cloned()
        .expect("a control-plane member besides the authority");
    let victim_ip = net.ip_of(&victim);
    let t0 = net.t;
    reflash(&mut net, victim.as_str());
    net.run_until_members(200);
    net.steps(10);
    // Exactly one remove-node, by the authority, of its address, before its join.
    assert_eq!(
        net.removals
            .iter()
            .map(|r| (&r.0, &r.1, r.2))
            .collect::<Vec<_>>(),
        vec![(&authority, &victim, victim_ip)],
        "{:?}",
        net.removals
    );
    let joins = joins_since(&net, &victim, t0);
    assert_eq!(joins.len(), 1, "{:?}", net.join_log);
    assert!(!joins[0].0, "joins again as control plane");
    assert!(
        net.removals[0].3 <= joins[0].1,
        "remove-node ({}) ran before the join ({})",
        net.removals[0].3,
        joins[0].1
    );
    let rec = newest_chosen(&net);
    assert_eq!(rec.members.get(&victim), Some(&Role::ControlPlane));
    assert_eq!(rec.control_plane_count(), 3);
    assert!(rec.removed.iter().all(|x| x.done), "{:?}", rec.removed);
    // Nothing more happens.
    net.steps(60);
    assert_eq!(net.removals.len(), 1, "{:?}", net.removals);
    assert_eq!(joins_since(&net, &victim, t0).len(), 1);
}

#[test]
fn a_reflashed_slot_authority_is_taken_over_from_and_joins_again() {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0)];
    let mut net = Net::new(&names, healing_params(3, 4));
    for (n, _) in names {
        net.boot(n);
    }
    net.run_until_members(300);
    let old = authority_of(&net);
    let old_ip = net.ip_of(&old);
    let t0 = net.t;
    reflash(&mut net, old.as_str());
    // Well before takeover-after (15 s): the others see it announce that it is no member.
    net.run_until_members(200);
    net.steps(10);
    let rec = newest_chosen(&net);
    assert_ne!(rec.authority, old, "another member took over");
    assert_eq!(rec.members.get(&old), Some(&Role::ControlPlane));
    assert_eq!(rec.control_plane_count(), 3);
    let joins = joins_since(&net, &old, t0);
    assert_eq!(joins.len(), 1, "{:?}", net.join_log);
    assert!(!joins[0].0);
    assert_eq!(
        net.removals.iter().map(|r| (&r.1, r.2)).collect::<Vec<_>>(),
        vec![(&old, old_ip)],
        "{:?}",
        net.removals
    );
    assert!(net.removals[0].3 <= joins[0].1);
}

// ----- a worker converted to control plane when the voters fall below target -----

/// The live members' roles by their own phase.
fn live_control_plane(net: &Net) -> BTreeSet<NodeId> {
    net.roles()
        .into_iter()
        .filter(|(_, r)| *r == Role::ControlPlane)
        .map(|(n, _)| n)
        .collect()
}

/// Five nodes, 3 control-plane and 2 workers, no standbys, with the healing parameters:
/// formed (all members).
fn formed_five() -> Net {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    for (n, _) in names {
        net.boot(n);
    }
    net.run_until_members(300);
    net
}

#[test]
fn a_worker_that_crashed_during_its_conversion_leave_leaves_again_and_becomes_control_plane() {
    // The worker's `microk8s leave` completes, but the machine dies before the agent sees the
    // result. Back, it must not take itself for a worker still in the cluster (MicroK8s has it
    // standalone): it runs the leave again (a standalone node counts as left) and goes on.
    let mut net = formed_five();
    let rec = newest_chosen(&net);
    let authority = rec.authority.clone();
    let victim = rec
        .control_plane_members()
        .find(|n| **n != authority)
        .cloned()
        .expect("a voter that is not the authority");
    net.crash_on_leave = true;
    net.crash(victim.as_str());
    for _ in 0..300 {
        if !net.leaves.is_empty() {
            break;
        }
        net.step();
    }
    assert_eq!(net.leaves.len(), 1, "one worker left to be converted");
    let w = net.leaves[0].0.clone();
    assert!(net.down[&w], "{w} crashed right after starting its leave");
    assert!(
        net.persisted[&w].leaving.is_some(),
        "the leave's intent is persisted before it runs"
    );
    net.crash_on_leave = false;
    net.steps(3);
    net.boot(w.as_str());
    assert_eq!(
        net.leaves.iter().filter(|(n, _)| *n == w).count(),
        2,
        "{w} runs its leave again at boot"
    );
    for _ in 0..400 {
        if matches!(
            net.phase(w.as_str()),
            Phase::Member {
                role: Role::ControlPlane,
                ..
            }
        ) {
            break;
        }
        net.step();
    }
    assert!(
        matches!(
            net.phase(w.as_str()),
            Phase::Member {
                role: Role::ControlPlane,
                ..
            }
        ),
        "{w} is {:?}",
        net.phase(w.as_str())
    );
    assert!(net.persisted[&w].leaving.is_none());
}

#[test]
fn a_lost_voter_is_removed_once_and_exactly_one_worker_becomes_control_plane() {
    // 3 control-plane nodes and 2 workers, no standbys: MicroK8s has nobody to promote.
    let mut net = formed_five();
    let rec = newest_chosen(&net);
    let workers: Vec<NodeId> = rec
        .members
        .iter()
        .filter(|(_, r)| **r == Role::Worker)
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(workers.len(), 2, "{:?}", rec.members);
    let authority = rec.authority.clone();
    let victim = rec
        .control_plane_members()
        .find(|n| **n != authority)
        .cloned()
        .expect("a voter that is not the authority");
    let victim_ip = net.ip_of(&victim);
    let t0 = net.t;
    net.crash(victim.as_str());
    // Before replace-after (40 s): nothing removed, nobody converted.
    net.steps(30);
    assert!(net.removals.is_empty() && net.leaves.is_empty());
    // Watch the record while it heals: never two conversions, never a worker converted
    // while another one is still on its way.
    let mut converted_seen = BTreeSet::new();
    for _ in 0..150 {
        net.step();
        let rec = newest_chosen(&net);
        if let Some(c) = &rec.converting {
            converted_seen.insert(c.node.clone());
        }
        let waiting: Vec<_> = net
            .nodes
            .iter()
            .filter(|(n, node)| {
                workers.contains(n) && !matches!(node.phase(), Phase::Member { .. })
            })
            .map(|(n, _)| n.clone())
            .collect();
        assert!(waiting.len() <= 1, "two workers left at once: {waiting:?}");
    }
    // The dead voter was removed once, with --force, by the authority.
    let forced: Vec<_> = net
        .removals
        .iter()
        .zip(&net.removal_force)
        .filter(|(_, f)| **f)
        .map(|(r, _)| (r.0.clone(), r.1.clone(), r.2))
        .collect();
    assert_eq!(forced, vec![(authority.clone(), victim.clone(), victim_ip)]);
    // Exactly one worker converted: one leave, then remove-node without --force, then a
    // control-plane join (no --worker), in that order.
    assert_eq!(net.leaves.len(), 1, "{:?}", net.leaves);
    let (converted, left_at) = net.leaves[0].clone();
    assert!(workers.contains(&converted), "{converted} was a worker");
    assert_eq!(converted_seen, BTreeSet::from([converted.clone()]));
    let unforced: Vec<_> = net
        .removals
        .iter()
        .zip(&net.removal_force)
        .filter(|(_, f)| !**f)
        .map(|(r, _)| r.clone())
        .collect();
    assert_eq!(unforced.len(), 1, "{:?}", net.removals);
    assert_eq!(unforced[0].1, converted);
    assert_eq!(unforced[0].2, net.ip_of(&converted));
    assert!(unforced[0].3 >= left_at, "remove-node after the leave");
    let joins = joins_since(&net, &converted, t0);
    assert_eq!(joins.len(), 1, "{:?}", net.join_log);
    assert!(!joins[0].0, "joined without --worker");
    assert!(joins[0].1 >= unforced[0].3, "the join after remove-node");
    // Back at 3 control-plane members; the other worker stays a worker.
    let rec = newest_chosen(&net);
    assert_eq!(rec.control_plane_members().count(), 3, "{:?}", rec.members);
    assert_eq!(rec.members.get(&converted), Some(&Role::ControlPlane));
    assert_eq!(rec.converting, None);
    assert_eq!(live_control_plane(&net).len(), 3);
    let other = workers.iter().find(|w| **w != converted).expect("other");
    assert_eq!(net.roles().get(other), Some(&Role::Worker));
    // Why it changed role stays in the record (status shows it).
    let x = rec
        .removed
        .iter()
        .find(|x| x.node == converted)
        .expect("the conversion is noted");
    assert!(x.left && x.done, "{x:?}");
    assert!(
        x.reason.contains("control-plane member") && x.reason.contains(victim.as_str()),
        "{}",
        x.reason
    );
    let st = net.nodes[&converted].status();
    assert!(st.removed.iter().any(|x| x.node == converted) || st.converting.is_none());
    // Nothing more happens.
    net.steps(60);
    assert_eq!(net.leaves.len(), 1);
    assert_eq!(net.removals.len(), 2, "{:?}", net.removals);
}

#[test]
fn a_second_conversion_is_refused_while_one_is_under_way() {
    use rackseed_formation::{Op, Record};
    let me = id("0a");
    let p = healing_params(3, 5);
    let rec = Record {
        cluster: ClusterId {
            seed: me.clone(),
            term: 1,
        },
        electorate: [me.clone(), id("0b"), id("0c"), id("0d"), id("0e")]
            .into_iter()
            .collect(),
        authority: me.clone(),
        members: [
            (me.clone(), Role::ControlPlane),
            (id("0b"), Role::ControlPlane),
            (id("0d"), Role::Worker),
            (id("0e"), Role::Worker),
        ]
        .into_iter()
        .collect(),
        slots: vec![],
        tentative: BTreeMap::new(),
        seq: 4,
        addons_by: None,
        addons_done: false,
        electorate_old: None,
        removed: Vec::new(),
        addresses: BTreeMap::new(),
        converting: None,
    };
    let ballot = Ballot {
        n: 9,
        node: me.clone(),
    };
    let apply = |r: &Record, op: Op, by: &NodeId| {
        rackseed_formation::node::apply(&op, Some(r), &ballot, by, &p).expect("a record")
    };
    let convert = |n: &str| Op::Convert {
        node: id(n),
        reason: "test".into(),
    };
    let one = apply(&rec, convert("0d"), &me);
    assert_eq!(
        one.converting.as_ref().map(|c| c.node.clone()),
        Some(id("0d"))
    );
    // A second one, even in the same round, changes nothing.
    let two = apply(&one, convert("0e"), &me);
    assert_eq!(two, one);
    let batch = apply(&rec, Op::Batch(vec![convert("0d"), convert("0e")]), &me);
    assert_eq!(batch, one);
    // Only the authority converts; never a control-plane member; never at full strength.
    assert_eq!(apply(&rec, convert("0d"), &id("0b")), rec);
    assert_eq!(apply(&rec, convert("0b"), &me), rec);
    let mut full = rec.clone();
    full.members.insert(id("0c"), Role::ControlPlane);
    assert_eq!(apply(&full, convert("0d"), &me), full);
    // Nor while a removal is not carried out.
    let mut pending = rec.clone();
    pending.removed.push(rackseed_formation::Removal {
        node: id("0z"),
        role: Role::ControlPlane,
        reason: "test".into(),
        ip: None,
        done: false,
        left: false,
    });
    assert_eq!(apply(&pending, convert("0d"), &me), pending);
    // The worker left: out of the members, its removal without --force; the conversion ends
    // when it is recorded a control-plane member.
    let left = apply(
        &one,
        Op::ConvertLeft {
            node: id("0d"),
            ip: Some(ip(4)),
        },
        &me,
    );
    assert!(!left.members.contains_key(&id("0d")));
    assert!(left.converting.is_some());
    let x = left.removed.last().expect("removal");
    assert!(x.left && !x.done && x.ip == Some(ip(4)), "{x:?}");
    assert!(!left.may_grant(Role::ControlPlane, 4));
    let done = apply(&left, Op::RemovalDone { node: id("0d") }, &me);
    assert!(done.may_grant(Role::ControlPlane, 4));
    let granted = apply(
        &done,
        Op::Grant {
            to: id("0d"),
            req: 1,
        },
        &me,
    );
    let slot = granted.slot_of(&id("0d")).expect("a slot").clone();
    assert_eq!(slot.role, Role::ControlPlane);
    let member = apply(
        &granted,
        Op::Confirm {
            node: id("0d"),
            seq: slot.seq,
            role: Role::ControlPlane,
            ok: true,
        },
        &me,
    );
    assert_eq!(member.members.get(&id("0d")), Some(&Role::ControlPlane));
    assert_eq!(member.converting, None);
    assert_eq!(member.control_plane_members().count(), 3);
}

#[test]
fn a_minority_partition_converts_nobody_and_the_majority_converts_one_of_its_workers() {
    let mut net = formed_five();
    let rec = newest_chosen(&net);
    let authority = rec.authority.clone();
    let workers: Vec<NodeId> = rec
        .members
        .iter()
        .filter(|(_, r)| **r == Role::Worker)
        .map(|(n, _)| n.clone())
        .collect();
    // The authority and one worker are cut off from the other two voters and the other
    // worker, for good.
    let (w_minority, w_majority) = (workers[0].clone(), workers[1].clone());
    net.group.insert(authority.clone(), 1);
    net.group.insert(w_minority.clone(), 1);
    net.steps(240);
    let minority = [authority.clone(), w_minority.clone()];
    assert!(
        net.leaves.iter().all(|(n, _)| !minority.contains(n)),
        "the minority converted: {:?}",
        net.leaves
    );
    assert!(
        net.removals.iter().all(|r| !minority.contains(&r.0)),
        "the minority removed: {:?}",
        net.removals
    );
    // The majority (two voters, one worker) removed the two it cannot see and converted its
    // worker: three control-plane members again.
    assert_eq!(
        net.leaves.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        vec![w_majority.clone()]
    );
    let majority_rec = net
        .nodes
        .iter()
        .filter(|(n, _)| !minority.contains(n))
        .filter_map(|(_, n)| n.persisted().chosen.clone())
        .max_by(|a, b| a.ballot.cmp(&b.ballot))
        .expect("a chosen record")
        .record;
    assert_eq!(
        majority_rec.members.get(&w_majority),
        Some(&Role::ControlPlane),
        "{:?}",
        majority_rec.members
    );
    assert_eq!(majority_rec.control_plane_members().count(), 3);
    assert!(!majority_rec.members.contains_key(&authority));
}

#[test]
fn no_worker_is_converted_while_a_standby_fills_the_place() {
    // 3 voters + 1 standby + 1 worker: MicroK8s promotes the standby itself.
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut p = healing_params(3, 5);
    p.standbys = 1;
    let mut net = Net::new(&names, p);
    for (n, _) in names {
        net.boot(n);
    }
    net.run_until_members(300);
    let rec = newest_chosen(&net);
    assert_eq!(rec.control_plane_members().count(), 4, "{:?}", rec.members);
    let victim = rec
        .control_plane_members()
        .find(|n| **n != rec.authority)
        .cloned()
        .expect("victim");
    net.crash(victim.as_str());
    net.steps(150);
    assert_eq!(net.removals.len(), 1, "{:?}", net.removals);
    assert!(net.leaves.is_empty(), "{:?}", net.leaves);
    assert_eq!(newest_chosen(&net).control_plane_members().count(), 3);
}

#[test]
fn a_dead_holder_of_a_tentative_control_plane_place_is_released_once_and_a_worker_converted() {
    // 3 control-plane places, 5 nodes: the second control-plane joiner vanishes for good in
    // the middle of its join, so its slot is reclaimed and it stays counted (tentative).
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    net.hold_joins = true;
    for (n, _) in names {
        net.boot(n);
    }
    for _ in 0..200 {
        if !net.joins.is_empty() {
            break;
        }
        net.step();
    }
    let stuck = net.joins.keys().next().expect("a join started").clone();
    assert!(
        matches!(
            net.phase(stuck.as_str()),
            Phase::Joining {
                role: Role::ControlPlane,
                ..
            }
        ),
        "{:?}",
        net.phase(stuck.as_str())
    );
    let stuck_ip = net.ip_of(&stuck);
    net.crash(stuck.as_str());
    net.hold_joins = false;
    // The slot is reclaimed (20 s) and the others join: one more control-plane member
    // beside the seed, two workers, the dead holder counted as the third.
    for _ in 0..300 {
        net.step();
        if newest_chosen(&net).tentative.contains_key(&stuck)
            && net
                .nodes
                .values()
                .all(|n| matches!(n.phase(), Phase::Member { .. }))
        {
            break;
        }
    }
    let rec = newest_chosen(&net);
    assert_eq!(
        rec.tentative.get(&stuck),
        Some(&Role::ControlPlane),
        "{rec:?}"
    );
    assert_eq!(rec.control_plane_members().count(), 2, "{rec:?}");
    assert!(net.removals.is_empty(), "{:?}", net.removals);
    // Unseen for replace-after (40 s): the authority alone releases the place, once, with
    // `remove-node --force` (its join may have gone through); the control plane is then at
    // 2 of 3 and exactly one worker is converted.
    let authority = rec.authority.clone();
    net.steps(200);
    assert_eq!(
        forced_removals(&net)
            .iter()
            .map(|r| (&r.0, &r.1, r.2))
            .collect::<Vec<_>>(),
        vec![(&authority, &stuck, stuck_ip)],
        "exactly one remove-node --force, by the authority, of the dead holder's address"
    );
    let rec = newest_chosen(&net);
    assert!(rec.tentative.is_empty(), "{rec:?}");
    let removal = rec
        .removed
        .iter()
        .find(|x| x.node == stuck)
        .expect("release noted");
    assert!(removal.done && !removal.left, "{removal:?}");
    assert_eq!(removal.role, Role::ControlPlane);
    assert!(removal.reason.contains("released"), "{}", removal.reason);
    assert_eq!(
        net.leaves.len(),
        1,
        "one worker converted: {:?}",
        net.leaves
    );
    assert_eq!(live_control_plane(&net).len(), 3, "{:?}", net.roles());
    assert_eq!(rec.control_plane_members().count(), 3, "{rec:?}");
    assert!(rec.converting.is_none(), "{:?}", rec.converting);
}

/// Steps `net` up to `k` times, until `done`; checks at every step that the newest chosen
/// record never lists `n` as a member while its latest join started before `since` (a node
/// removed from dqlite is no member until it joined again).
fn steps_checking_not_member_before_rejoin(
    net: &mut Net,
    n: &NodeId,
    since: u64,
    k: u64,
    done: impl Fn(&Net) -> bool,
) {
    for _ in 0..k {
        net.step();
        let rejoined = net
            .join_log
            .iter()
            .any(|(j, _, t, _)| j == n && *t >= since);
        let listed = newest_chosen(net).members.contains_key(n);
        assert!(
            rejoined || !listed,
            "{n} recorded a member again at tick {} without a new join: {:?}",
            net.t,
            newest_chosen(net)
        );
        if done(net) {
            return;
        }
    }
}

#[test]
fn a_member_removed_while_powered_off_leaves_and_joins_again_once() {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    for (n, _) in names {
        net.boot(n);
    }
    for _ in 0..300 {
        net.step();
        if net.all_members() && newest_chosen(&net).members.len() == 5 {
            break;
        }
    }
    let w = net
        .roles()
        .into_iter()
        .find(|(_, r)| *r == Role::Worker)
        .expect("a worker")
        .0;
    // Powered off longer than replace-after (40 s): removed, `remove-node --force` done.
    net.crash(w.as_str());
    for _ in 0..300 {
        net.step();
        if newest_chosen(&net)
            .removed
            .iter()
            .any(|x| x.node == w && x.done)
        {
            break;
        }
    }
    let removed_at = net.t;
    assert!(!newest_chosen(&net).members.contains_key(&w));
    assert_eq!(forced_removals(&net).iter().filter(|r| r.1 == w).count(), 1);
    // It comes back still believing it is a member: told so, it checks the record by a
    // round of its own, leaves once, and joins again through a slot.
    net.boot(w.as_str());
    assert!(matches!(net.phase(w.as_str()), Phase::Member { .. }));
    steps_checking_not_member_before_rejoin(&mut net, &w, removed_at, 300, |net| {
        net.all_members() && newest_chosen(net).members.contains_key(&w)
    });
    assert!(
        newest_chosen(&net).members.contains_key(&w),
        "{:?}",
        newest_chosen(&net)
    );
    let leaves: Vec<_> = net.leaves.iter().filter(|(n, _)| *n == w).collect();
    assert_eq!(leaves.len(), 1, "one leave: {:?}", net.leaves);
    let rejoins: Vec<_> = net
        .join_log
        .iter()
        .filter(|(n, _, t, _)| *n == w && *t >= removed_at)
        .collect();
    assert_eq!(rejoins.len(), 1, "one join again: {rejoins:?}");
    assert!(rejoins[0].2 >= leaves[0].1, "joins after it left");
    assert_eq!(
        forced_removals(&net).iter().filter(|r| r.1 == w).count(),
        1,
        "no second removal of the node that came back"
    );
    assert!(net.all_members());
}

#[test]
fn a_late_join_report_after_the_place_was_released_records_no_member_and_the_node_joins_again() {
    let names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)];
    let mut net = Net::new(&names, healing_params(3, 5));
    net.hold_joins = true;
    for (n, _) in names {
        net.boot(n);
    }
    for _ in 0..200 {
        if !net.joins.is_empty() {
            break;
        }
        net.step();
    }
    let x = net.joins.keys().next().expect("a join started").clone();
    // Its join goes through, but it is cut off before its report arrives, for longer than
    // the slot timeout plus replace-after: its place is reclaimed, then released with
    // `remove-node --force` (dqlite no longer has it).
    net.group.insert(x.clone(), 1);
    net.finish_join(&x, Ok(()));
    assert!(matches!(net.phase(x.as_str()), Phase::Confirming { .. }));
    net.hold_joins = false;
    for _ in 0..400 {
        net.step();
        if newest_chosen(&net)
            .removed
            .iter()
            .any(|r| r.node == x && r.done)
            && newest_chosen(&net).converting.is_none()
        {
            break;
        }
    }
    let released_at = net.t;
    assert!(
        forced_removals(&net).iter().any(|r| r.1 == x),
        "{:?}",
        net.removals
    );
    assert!(matches!(net.phase(x.as_str()), Phase::Confirming { .. }));
    // The partition heals: its repeated report records nothing; it leaves and joins again.
    net.group.remove(&x);
    steps_checking_not_member_before_rejoin(&mut net, &x, released_at, 300, |net| {
        net.all_members() && newest_chosen(net).members.contains_key(&x)
    });
    let rec = newest_chosen(&net);
    assert!(rec.members.contains_key(&x), "{rec:?}");
    assert!(
        net.leaves.iter().filter(|(n, _)| *n == x).count() == 1,
        "{:?}",
        net.leaves
    );
    assert_eq!(rec.control_plane_members().count(), 3, "{rec:?}");
    assert!(net.all_members());
}
