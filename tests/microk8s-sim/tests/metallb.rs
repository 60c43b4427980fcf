//! MetalLB's layer-2 address in the simulator (`src/daemon/metallb.rs`): once `metallb` is
//! enabled with a range, exactly one live node, the one MetalLB's hash rule picks, holds the
//! pool's first address and answers HTTP on it from another lab host; a node labelled
//! `node.kubernetes.io/exclude-from-external-load-balancers` gives it up; a node killed like a
//! machine losing power (SIGKILL, its address dropped) is replaced by the next in the order
//! within a few heartbeats, and the client follows through the gratuitous ARP; a node stopped
//! with SIGTERM or `microk8s stop` drops the address itself (`stop` on a worker stops nothing,
//! as the snap's wrapper); `disable metallb` leaves no holder; a node of another cluster (no
//! metallb) never takes it. Every change is in the nodes' `metallb.jsonl`. With this
//! address the hash order is node-4 (the worker), node-2, node-1, node-3, so the worker's path
//! (it learns of other workers only through the control plane) is taken too.
//!
//! Needs root (network namespaces) and `arping`/`curl`; fails loudly otherwise. Bounded: every
//! wait is at most 15 s. Run: `cargo test -p microk8s-sim --test metallb`.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use firstboot::system::microk8s::{JoinRole, JoinTarget, Microk8s};
use microk8s_sim::daemon::{metallb_announcing_node, metallb_events};
use netns_lab::Lab;
use rackseed_host::command::Cmd;
use support::{eventually, mk, runtime, secret, SimNode};

const LB: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 240);
const POOL: &str = "10.231.0.240-10.231.0.250,fd00::10-fd00::20";
const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

fn holds(n: &SimNode) -> bool {
    holds_ip(n, LB)
}

fn holds_ip(n: &SimNode, ip: Ipv4Addr) -> bool {
    let out = Cmd::new("ip", Duration::from_secs(5))
        .args(["-n", &n.host.ns, "-4", "-o", "addr", "show"])
        .output_blocking()
        .expect("ip addr show");
    out.stdout
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(&ip.to_string()))
}

fn holders(nodes: &[SimNode]) -> Vec<String> {
    holders_of(nodes, LB)
}

fn holders_of(nodes: &[SimNode], ip: Ipv4Addr) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| holds_ip(n, ip))
        .map(|n| n.name.clone())
        .collect()
}

/// `curl http://LB/` from lab host 0: the body, if it answered 200.
fn fetch(lab: &Lab) -> Option<String> {
    fetch_ip(lab, LB)
}

fn fetch_ip(lab: &Lab, ip: Ipv4Addr) -> Option<String> {
    lab.host(0).http_get(&format!("http://{ip}/"))
}

/// Waits until `want` alone holds the address and answers for it; the time it took.
fn wait_holder(lab: &Lab, nodes: &[SimNode], want: &str) -> Duration {
    wait_holder_of(lab, nodes, want, LB)
}

fn wait_holder_of(lab: &Lab, nodes: &[SimNode], want: &str, ip: Ipv4Addr) -> Duration {
    let t = Instant::now();
    eventually(
        Duration::from_secs(15),
        &format!("{want} alone holding {ip}"),
        || (holders_of(nodes, ip) == [want]).then_some(()),
    );
    eventually(
        Duration::from_secs(15),
        &format!("{want} answering on {ip}"),
        || fetch_ip(lab, ip).filter(|b| b.trim_end().ends_with(&format!("answered by {want}"))),
    );
    t.elapsed()
}

fn expected(candidates: &[&str]) -> String {
    metallb_announcing_node(candidates.iter().copied(), &LB.to_string())
        .expect("candidates")
        .to_owned()
}

fn events(n: &SimNode, event: &str) -> Vec<serde_json::Value> {
    metallb_events(&n.dir.join("state"))
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

fn node<'a>(nodes: &'a mut [SimNode], name: &str) -> &'a mut SimNode {
    nodes.iter_mut().find(|n| n.name == name).unwrap()
}

#[test]
fn one_live_node_holds_the_address_and_the_next_takes_it_over() {
    let lab = Lab::new(6).expect("creating the network lab (this test must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (1..6)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    // node-1..node-3 control plane, node-4 a worker; node-5 stays a cluster of its own.
    let seed = IpAddr::V4(nodes[0].host.addr);
    for (i, role) in [
        (1, JoinRole::ControlPlane),
        (2, JoinRole::ControlPlane),
        (3, JoinRole::Worker),
    ] {
        let t = JoinTarget::new(seed, secret().microk8s_token());
        nodes[i]
            .run(move |a| async move { a.join(&t, role).await })
            .unwrap_or_else(|e| panic!("node {i} joining: {e}"));
        eventually(Duration::from_secs(15), "the join seen by the seed", || {
            let out = mk(&nodes[0], &["kubectl", "get", "nodes"]);
            (out.stdout.lines().filter(|l| l.contains(" Ready ")).count() == i + 1).then_some(())
        });
    }
    assert!(holders(&nodes).is_empty(), "no address before metallb");

    let out = mk(&nodes[0], &["enable", "metallb", POOL]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let cluster = ["node-1", "node-2", "node-3", "node-4"];
    let first = expected(&cluster);
    let took = wait_holder(&lab, &nodes, &first);
    println!("metallb: {first} announces {LB} {took:?} after enable");
    let ann = events(node(&mut nodes, &first), "announce");
    assert_eq!(ann.len(), 1, "{ann:?}");
    assert_eq!(ann[0]["ip"], LB.to_string());
    assert_eq!(ann[0]["speakers"].as_array().unwrap().len(), 4, "{ann:?}");
    let garp = eventually(Duration::from_secs(10), "the first gratuitous ARP", || {
        events(node(&mut nodes, &first), "gratuitous-arp").pop()
    });
    assert_eq!(garp["result"], "sent", "{garp}");
    // `microk8s stop` on a worker stops nothing (the wrapper's clustered.lock branch).
    let out = mk(node(&mut nodes, "node-4"), &["stop"]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("snap stop microk8s"), "{}", out.stdout);
    assert_eq!(
        mk(node(&mut nodes, "node-4"), &["stop", "--nope"]).code(),
        Some(0),
        "the worker branch comes before the options"
    );
    assert_eq!(mk(&nodes[0], &["stop", "--nope"]).code(), Some(1));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(holders(&nodes), std::slice::from_ref(&first));

    // Labelled out of load balancing: it lets go, the next in the order takes the address.
    let out = mk(
        &nodes[0],
        &[
            "kubectl",
            "label",
            "node",
            &first,
            &format!("{EXCLUDE}=true"),
        ],
    );
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let rest: Vec<&str> = cluster.iter().copied().filter(|n| *n != first).collect();
    let second = expected(&rest);
    wait_holder(&lab, &nodes, &second);
    let rel = events(node(&mut nodes, &first), "release");
    assert!(
        rel.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains(&second),
        "{rel:?}"
    );
    let out = mk(
        &nodes[0],
        &["kubectl", "label", "node", &first, &format!("{EXCLUDE}-")],
    );
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    wait_holder(&lab, &nodes, &first);

    // A power loss: the processes die and the machine holds no address.
    let victim = node(&mut nodes, &first);
    victim.kill();
    let _ = Cmd::new("ip", Duration::from_secs(5))
        .args(["-n", &victim.host.ns, "addr", "del", &format!("{LB}/32")])
        .args(["dev", "eth0"])
        .run_blocking();
    let killed = Instant::now();
    let took = wait_holder(&lab, &nodes, &second);
    println!("metallb: {second} answers on {LB} {took:?} after {first} was killed");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "takeover took {:?}",
        killed.elapsed()
    );
    let ann = events(node(&mut nodes, &second), "announce");
    let speakers = ann.last().unwrap()["speakers"].as_array().unwrap();
    assert!(
        !speakers.iter().any(|s| s == first.as_str()),
        "the dead node was no candidate: {ann:?}"
    );

    // A clean stop drops the address before the daemon exits; the next takes it.
    let rest2: Vec<&str> = rest.iter().copied().filter(|n| *n != second).collect();
    let third = expected(&rest2);
    assert!(
        node(&mut nodes, &second).terminate(Duration::from_secs(10)),
        "the daemon exits on SIGTERM"
    );
    assert!(!holds(node(&mut nodes, &second)), "dropped on the way out");
    let rel = events(node(&mut nodes, &second), "release");
    assert!(
        rel.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("SIGTERM"),
        "{rel:?}"
    );
    wait_holder(&lab, &nodes, &third);

    // Disabled: nobody holds it; enabled again: the same rule picks the same node.
    let out = mk(node(&mut nodes, &third), &["disable", "metallb"]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    eventually(Duration::from_secs(15), "no holder", || {
        holders(&nodes).is_empty().then_some(())
    });
    assert!(fetch(&lab).is_none(), "nothing answers on {LB}");
    let rel = events(node(&mut nodes, &third), "release");
    assert_eq!(
        rel.last().unwrap()["reason"],
        "metallb is not enabled",
        "{rel:?}"
    );
    let out = mk(node(&mut nodes, &third), &["enable", "metallb", POOL]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    wait_holder(&lab, &nodes, &third);

    // `microk8s stop` on a control-plane node: it lets go and its daemon ends; the last live
    // node takes the address (MetalLB needs no quorum: 1 of 3 voters is left).
    let rest3: Vec<&str> = rest2.iter().copied().filter(|n| *n != third).collect();
    let fourth = expected(&rest3);
    let out = mk(node(&mut nodes, &third), &["stop"]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let rel = events(node(&mut nodes, &third), "release");
    assert_eq!(rel.last().unwrap()["reason"], "microk8s stop", "{rel:?}");
    wait_holder(&lab, &nodes, &fourth);
    eventually(
        Duration::from_secs(5),
        "the stopped node's daemon gone",
        || {
            let out = mk(node(&mut nodes, &third), &["status"]);
            out.stdout.contains("not running").then_some(())
        },
    );

    // node-5 (a cluster of its own, no metallb) never took it.
    let n5 = node(&mut nodes, "node-5");
    assert!(metallb_events(&n5.dir.join("state")).is_empty());
    assert!(!holds(n5));
}

/// Workers heartbeat only the control plane; a worker hears of the other workers through the
/// control plane's pongs. With 10.231.0.241 the order over node-1 (control plane), node-2 and
/// node-3 (workers) is node-2, node-3, node-1: node-3 alone with what it sees itself (node-1
/// and itself) would announce too. Exactly node-2 must hold the address, node-3 never announce
/// while node-2 lives, and take over once it is dead.
#[test]
fn workers_learn_of_each_other_through_the_control_plane() {
    let ip = Ipv4Addr::new(10, 231, 0, 241);
    let lab = Lab::new(4).expect("creating the network lab (this test must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (1..4)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    let seed = IpAddr::V4(nodes[0].host.addr);
    for i in [1, 2] {
        let t = JoinTarget::new(seed, secret().microk8s_token());
        nodes[i]
            .run(move |a| async move { a.join(&t, JoinRole::Worker).await })
            .unwrap_or_else(|e| panic!("node {i} joining: {e}"));
    }
    eventually(Duration::from_secs(15), "both workers Ready", || {
        let out = mk(&nodes[0], &["kubectl", "get", "nodes"]);
        (out.stdout.lines().filter(|l| l.contains(" Ready ")).count() == 3).then_some(())
    });
    assert_eq!(
        metallb_announcing_node(["node-1", "node-2", "node-3"], &ip.to_string()),
        Some("node-2")
    );
    assert_eq!(
        metallb_announcing_node(["node-1", "node-3"], &ip.to_string()),
        Some("node-3")
    );
    let out = mk(
        &nodes[0],
        &["enable", "metallb", "10.231.0.241-10.231.0.250"],
    );
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    wait_holder_of(&lab, &nodes, "node-2", ip);
    // Steady: a few heartbeats later node-3 has announced nothing.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holders_of(&nodes, ip), ["node-2"]);
    assert!(
        events(&nodes[2], "announce").is_empty(),
        "{:?}",
        events(&nodes[2], "announce")
    );

    nodes[1].kill();
    let _ = Cmd::new("ip", Duration::from_secs(5))
        .args(["-n", &nodes[1].host.ns, "addr", "del", &format!("{ip}/32")])
        .args(["dev", "eth0"])
        .run_blocking();
    let took = wait_holder_of(&lab, &nodes, "node-3", ip);
    println!("metallb: the worker node-3 answers on {ip} {took:?} after node-2 was killed");
}
