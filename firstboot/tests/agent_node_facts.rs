//! Host-level agent tests (root; network namespaces; the MicroK8s simulator): what each node
//! reports about itself once the cluster formed. The status document's `address` is the node's
//! own address on the cluster network (the one its join point names), in `firstboot status
//! --json` and in the table. The inventory's Kubernetes labels (`[[nodes]] labels`) are put on
//! the nodes once they joined, by a control-plane member (`microk8s kubectl label node`, which
//! the simulator checks strictly), and shown in status.
//!
//! Run: `cargo test -p firstboot --test agent_node_facts` (as root; builds the simulator first:
//! `cargo build -p microk8s-sim`).

mod agent_support;

use std::time::Duration;

use agent_support::{argv, check_command_log, AgentCluster, ClusterSpec, FIRSTBOOT};
use rackseed_host::command::Cmd;

/// `firstboot status` (the table) of node `i`, run in its namespace.
fn status_table(c: &AgentCluster, i: usize) -> String {
    let node = &c.nodes[i];
    let out = Cmd::new("ip", Duration::from_secs(15))
        .args(["netns", "exec", &node.ns])
        .arg(FIRSTBOOT)
        .args(["status", "--port", "7443"])
        .arg("--config")
        .arg(c.dir.path().join("cluster.toml"))
        .arg("--state-dir")
        .arg(node.dir.join("state"))
        .output_blocking()
        .expect("firstboot status");
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout
}

#[test]
fn every_node_reports_its_cluster_address() {
    let mut c = AgentCluster::new(3, ClusterSpec::default());
    c.start_all();
    c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    for i in 0..3 {
        let want = c.nodes[i].addr.to_string();
        // The address is refreshed on the agent's MicroK8s poll (every 5 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let doc = c.status(i).expect("status document");
            if doc.address.as_deref() == Some(want.as_str()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {i}: address {:?}, expected {want}",
                doc.address
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let table = status_table(&c, i);
        let line = table
            .lines()
            .find(|l| l.starts_with("address "))
            .unwrap_or_else(|| panic!("no address line in:\n{table}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(want.as_str()),
            "{table}"
        );
    }
}

/// The inventory: labels for two of the three nodes (named as the simulator names them) and
/// for a machine that never boots. The MACs are not the lab's, so nothing else is pinned.
const INVENTORY: &str = r#"
[[nodes]]
mac = "02:00:00:00:00:10"
hostname = "node-0"
labels = { "example.com/rack" = "r1" }

[[nodes]]
mac = "02:00:00:00:00:12"
hostname = "node-2"
labels = { "node-role.kubernetes.io/storage" = "", "topology.kubernetes.io/zone" = "hall-b" }

[[nodes]]
mac = "02:00:00:00:00:19"
hostname = "node-9"
labels = { "example.com/rack" = "r9" }
"#;

#[test]
fn inventory_labels_are_put_on_the_joined_nodes_and_shown_in_status() {
    let spec = ClusterSpec {
        addons_toml: format!("{}{INVENTORY}", ClusterSpec::default().addons_toml),
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(3, spec);
    c.start_all();
    c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    // Every control-plane member reports the labels applied (the MicroK8s poll runs every 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let docs = loop {
        let docs: Vec<_> = (0..3).filter_map(|i| c.status(i)).collect();
        let done = docs.len() == 3
            && docs.iter().all(|d| {
                d.node_labels.len() == 3
                    && d.node_labels
                        .iter()
                        .all(|l| l.applied == (l.node != "node-9"))
            });
        if done {
            break docs;
        }
        if std::time::Instant::now() > deadline {
            c.dump();
            panic!(
                "labels not reported applied: {:?}",
                docs.iter().map(|d| &d.node_labels).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for d in &docs {
        let ghost = d.node_labels.iter().find(|l| l.node == "node-9").unwrap();
        assert_eq!(ghost.problem.as_deref(), Some("not in the cluster yet"));
    }
    let table = status_table(&c, 1);
    assert!(
        table.contains("labels    node-0 example.com/rack=r1 (applied)")
            && table.contains(
                "labels    node-2 node-role.kubernetes.io/storage=,topology.kubernetes.io/zone=hall-b (applied)"
            )
            && table.contains("labels    node-9 example.com/rack=r9 (not applied: not in the cluster yet)"),
        "{table}"
    );
    // What the cluster itself says: the Node objects carry the labels.
    let node = &c.nodes[1];
    let out = Cmd::new("ip", Duration::from_secs(15))
        .args(["netns", "exec", &node.ns])
        .arg(node.dir.join("bin/microk8s"))
        .args(["kubectl", "get", "nodes", "-o", "json"])
        .output_blocking()
        .expect("microk8s kubectl get nodes");
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("a node list");
    let labels = |name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no node {name}: {list}"))["metadata"]["labels"]
            .clone()
    };
    assert_eq!(labels("node-0")["example.com/rack"], "r1");
    assert_eq!(labels("node-2")["node-role.kubernetes.io/storage"], "");
    assert_eq!(labels("node-2")["topology.kubernetes.io/zone"], "hall-b");
    assert!(labels("node-1").get("example.com/rack").is_none());
    // Labels went on through `microk8s kubectl label node ... --overwrite`, each of which
    // succeeded, and only once the nodes were members (never on a worker, never failing).
    let records = c.commands();
    check_command_log(&records).unwrap();
    let label_calls: Vec<(Vec<String>, i64)> = records
        .iter()
        .filter(|r| {
            r["program"] == "microk8s"
                && argv(r).get(..2) == Some(&["kubectl".to_owned(), "label".to_owned()][..])
                && r["event"] == "end"
        })
        .map(|r| (argv(r), r["exit"].as_i64().unwrap_or(-1)))
        .collect();
    assert!(!label_calls.is_empty(), "no kubectl label call");
    for (a, exit) in &label_calls {
        assert_eq!(*exit, 0, "{a:?}");
        assert!(a.iter().any(|x| x == "--overwrite"), "{a:?}");
        assert!(
            !a.iter().any(|x| x == "node-9"),
            "an absent node is not labelled: {a:?}"
        );
    }
}
