//! A voter lost for good in a 3 control-plane + 2 worker cluster with no standby (issue #19,
//! item 3): the slot authority removes it once (`microk8s remove-node <ip> --force`, after
//! `cluster.replace-after`), then exactly one worker is converted: it runs `microk8s leave`,
//! the authority removes its Node (`remove-node <ip>`, no `--force`: it left), and it joins
//! again without `--worker`; the cluster is back at 3 voters, and the converted node's
//! status says why it changed role. Real agents in network namespaces with the simulator
//! (replace-after 1 minute, the shortest the config accepts). Needs root.
//! Run: `cargo test -p firstboot --test agent_convert`.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::*;

/// Power cut of node `i` for good: its agent and its simulated MicroK8s killed.
fn kill_for_good(c: &mut AgentCluster, i: usize) {
    assert!(c.kill_agent(i), "node {i}'s agent was running");
    assert!(c.kill_microk8s(i), "node {i}'s MicroK8s was running");
}

/// The simulator commands run from record `from` on (by `node`, or anybody if empty) whose
/// argv starts with `what`: (record index, node, argv).
fn runs(
    records: &[serde_json::Value],
    from: usize,
    node: &str,
    what: &str,
) -> Vec<(usize, String, Vec<String>)> {
    records
        .iter()
        .enumerate()
        .skip(from)
        .filter(|(_, r)| r["program"] == "microk8s" && r["event"] == "start")
        .filter(|(_, r)| node.is_empty() || r["node"] == node)
        .map(|(k, r)| {
            (
                k,
                r["node"].as_str().unwrap_or_default().to_owned(),
                argv(r),
            )
        })
        .filter(|(_, _, a)| a.first().map(String::as_str) == Some(what))
        .collect()
}

#[test]
fn a_lost_voter_is_removed_and_one_worker_becomes_control_plane() {
    let spec = ClusterSpec {
        expected_nodes: 5,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(5, spec);
    let base = std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap();
    assert!(base.contains("[cluster]\n"), "{base}");
    let cfg = c.dir.path().join("cluster-convert.toml");
    std::fs::write(
        &cfg,
        base.replacen("[cluster]\n", "[cluster]\nreplace-after = \"1m\"\n", 1),
    )
    .unwrap();
    for i in 0..5 {
        c.start_with_config(i, &cfg);
    }
    let all: Vec<usize> = (0..5).collect();
    let docs = c.wait_formed(&all, 3, Duration::from_secs(180));
    let role = |k: usize| docs[k].role.clone().unwrap_or_default();
    let workers: Vec<usize> = all
        .iter()
        .copied()
        .filter(|k| role(*k) == "worker")
        .collect();
    assert_eq!(workers.len(), 2, "3 control plane + 2 workers");
    let authority = docs[0].authority.clone().expect("an authority");
    let victim = all
        .iter()
        .copied()
        .find(|k| role(*k) == "control-plane" && docs[*k].node_id != authority)
        .expect("a voter that is not the slot authority");
    let victim_ip = c.nodes[victim].addr.to_string();
    let victim_id = docs[victim].node_id.clone();
    let mark = c.commands().len();
    let killed = Instant::now();
    kill_for_good(&mut c, victim);

    // Wait (bounded) until a former worker is a control-plane member and 3 voters are back.
    let live: Vec<usize> = all.iter().copied().filter(|k| *k != victim).collect();
    let deadline = killed + Duration::from_secs(150);
    let converted = loop {
        let docs: Vec<_> = live.iter().map(|k| (*k, c.status(*k))).collect();
        let done = docs.iter().find_map(|(k, d)| {
            let d = d.as_ref()?;
            let voters = d.microk8s.as_ref().map_or(0, |m| m.voters.len());
            (workers.contains(k)
                && d.phase == "member"
                && d.role.as_deref() == Some("control-plane")
                && voters == 3)
                .then_some(*k)
        });
        if let Some(k) = done {
            break k;
        }
        if Instant::now() > deadline {
            c.dump();
            panic!(
                "no worker converted within 150 s of the kill: {:?}",
                docs.iter()
                    .map(|(k, d)| (k, d.as_ref().map(|d| (d.phase.clone(), d.role.clone()))))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = killed.elapsed().as_secs_f64();
    eprintln!("worker node-{converted} converted, 3 voters again {took:.1} s after the kill");
    let docs = c.wait_formed(&live, 3, Duration::from_secs(60));
    let cps = docs
        .iter()
        .filter(|d| d.role.as_deref() == Some("control-plane"))
        .count();
    assert_eq!(cps, 3, "three control-plane members among the live nodes");
    let other = *workers.iter().find(|w| **w != converted).unwrap();
    assert_eq!(
        c.status(other).and_then(|d| d.role).as_deref(),
        Some("worker"),
        "the other worker stays a worker"
    );

    // The command log: remove-node --force of the dead voter, then leave (by the converted
    // worker only), then remove-node without --force of the worker, then its join without
    // --worker, in that order.
    let records = c.commands();
    let name = format!("node-{converted}");
    let conv_ip = c.nodes[converted].addr.to_string();
    let leaves = runs(&records, mark, "", "leave");
    assert_eq!(
        leaves.iter().map(|l| l.1.clone()).collect::<Vec<_>>(),
        vec![name.clone()],
        "exactly one leave, by the converted worker"
    );
    let removals = runs(&records, mark, "", "remove-node");
    assert_eq!(
        removals
            .iter()
            .map(|r| r.2[1..].to_vec())
            .collect::<Vec<_>>(),
        vec![
            vec![victim_ip.clone(), "--force".to_string()],
            vec![conv_ip.clone()]
        ],
        "the dead voter removed once with --force, the worker that left without"
    );
    assert!(
        removals.iter().all(|r| r.1 == removals[0].1),
        "one node ran remove-node"
    );
    let joins = runs(&records, mark, &name, "join");
    assert_eq!(
        joins.len(),
        1,
        "one join of the converted worker: {joins:?}"
    );
    assert!(!joins[0].2.iter().any(|a| a == "--worker"), "{joins:?}");
    assert!(
        removals[0].0 < leaves[0].0 && leaves[0].0 < removals[1].0 && removals[1].0 < joins[0].0,
        "remove-node --force, leave, remove-node, join in that order"
    );
    if let Err(e) = check_command_log(&records) {
        c.dump();
        panic!("{e}");
    }

    // Status: the converted node's timeline says why it changed role; the record's removals
    // (shown on every node) say why it was taken out as a worker.
    let doc = c.status(converted).expect("status of the converted node");
    let line = doc
        .timeline
        .iter()
        .find(|t| t.what.contains("changing role"))
        .unwrap_or_else(|| panic!("no role change in the timeline: {:?}", doc.timeline));
    assert!(
        line.what.contains("control plane at 2 of 3")
            && line
                .what
                .contains(&format!("after {victim_id} was removed")),
        "{}",
        line.what
    );
    let healing = c
        .status(live[0])
        .and_then(|d| d.healing)
        .expect("a healing view");
    let row = healing
        .removed
        .iter()
        .find(|r| r.node_id == doc.node_id)
        .unwrap_or_else(|| panic!("the conversion is not among the removals: {healing:?}"));
    assert!(
        row.done && row.reason.contains("control-plane member"),
        "{row:?}"
    );
}
