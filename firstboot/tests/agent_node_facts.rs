//! Host-level agent test (root; network namespaces; the MicroK8s simulator): what each node
//! reports about itself once the cluster formed. The status document's `address` is the node's
//! own address on the cluster network (the one its join point names), in `firstboot status
//! --json` and in the table.
//!
//! Run: `cargo test -p firstboot --test agent_node_facts` (as root; builds the simulator first:
//! `cargo build -p microk8s-sim`).

mod agent_support;

use std::time::Duration;

use agent_support::{AgentCluster, ClusterSpec, FIRSTBOOT};
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
