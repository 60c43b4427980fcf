//! A machine re-flashed with the same node id (its state and MicroK8s wiped, same machine id,
//! name and address) joins its cluster again (issues #19, #23): a worker rejoins with one
//! `microk8s join --worker` and nothing removed from dqlite; a control-plane member's stale
//! dqlite entry is first removed (`microk8s remove-node <ip> --force`, by one node), then it
//! joins again as control plane and the cluster is back at 3 voters. Real agents in network
//! namespaces with the simulator. Needs root.
//! Run: `cargo test -p firstboot --test agent_reflash`.

mod agent_support;

use std::time::Duration;

use agent_support::*;

/// Power cut and re-flash of node `i`: agent and MicroK8s killed, the agent's state, the
/// simulated MicroK8s and its files wiped; machine id, name and address kept.
fn reflash(c: &mut AgentCluster, i: usize) {
    c.kill_agent(i);
    c.kill_microk8s(i);
    let d = c.nodes[i].dir.clone();
    std::thread::sleep(Duration::from_millis(300));
    for sub in ["state", "sim", "certs", "etc"] {
        let _ = std::fs::remove_dir_all(d.join(sub));
    }
    for sub in ["state", "etc"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
}

/// The simulator commands node `i` ran from record `from` on whose argv starts with `what`.
fn runs(c: &AgentCluster, from: usize, node: &str, what: &str) -> Vec<(usize, Vec<String>)> {
    c.commands()
        .iter()
        .enumerate()
        .skip(from)
        .filter(|(_, r)| r["program"] == "microk8s" && r["event"] == "start")
        .filter(|(_, r)| node.is_empty() || r["node"] == node)
        .map(|(k, r)| (k, argv(r)))
        .filter(|(_, a)| a.first().map(String::as_str) == Some(what))
        .collect()
}

#[test]
fn a_reflashed_worker_and_a_reflashed_control_plane_member_join_again() {
    let spec = ClusterSpec {
        expected_nodes: 4,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(4, spec);
    c.start_all();
    let docs = c.wait_formed(&[0, 1, 2, 3], 3, Duration::from_secs(180));
    let role = |k: usize| docs[k].role.clone().unwrap_or_default();
    let w = (0..4).find(|k| role(*k) == "worker").expect("a worker");

    // 1. The worker.
    let mark = c.commands().len();
    reflash(&mut c, w);
    c.start(w);
    c.wait_formed(&[0, 1, 2, 3], 3, Duration::from_secs(150));
    let name = format!("node-{w}");
    let joins = runs(&c, mark, &name, "join");
    assert_eq!(joins.len(), 1, "one join after the re-flash: {joins:?}");
    assert!(joins[0].1.iter().any(|a| a == "--worker"), "{joins:?}");
    assert!(
        runs(&c, mark, "", "remove-node").is_empty(),
        "a worker is no dqlite member: nothing removed"
    );

    // 2. A control-plane member.
    let cp = (0..4)
        .find(|k| role(*k) == "control-plane")
        .expect("a control-plane node");
    let ip = c.nodes[cp].addr.to_string();
    let mark = c.commands().len();
    reflash(&mut c, cp);
    c.start(cp);
    let docs = c.wait_formed(&[0, 1, 2, 3], 3, Duration::from_secs(180));
    assert_eq!(docs[cp].role.as_deref(), Some("control-plane"));
    let name = format!("node-{cp}");
    let joins = runs(&c, mark, &name, "join");
    assert_eq!(joins.len(), 1, "one join after the re-flash: {joins:?}");
    assert!(!joins[0].1.iter().any(|a| a == "--worker"), "{joins:?}");
    let removals = runs(&c, mark, "", "remove-node");
    assert_eq!(
        removals
            .iter()
            .map(|(_, a)| a[1..].to_vec())
            .collect::<Vec<_>>(),
        vec![vec![ip.clone(), "--force".to_string()]],
        "its stale dqlite entry removed once, by address"
    );
    assert!(removals[0].0 < joins[0].0, "remove-node before the join");
    let records = c.commands();
    if let Err(e) = check_command_log(&records) {
        c.dump();
        panic!("{e}");
    }
}
