//! The simulator's `microk8s kubectl label node`, strict like kubectl and the API server:
//! labels a known node, refuses an unknown one, a bad key or value, and a changed value without
//! `--overwrite`; `KEY-` removes; the result shows in `kubectl get nodes -o json`. Needs root
//! (network namespaces); fails loudly otherwise.
//!
//! Run: `cargo test -p microk8s-sim --test kubectl_label` (as root).

mod support;

use std::time::Duration;

use netns_lab::Lab;
use rackseed_host::command::{Cmd, Output};
use support::*;

fn kubectl(n: &SimNode, args: &[&str]) -> Output {
    let bin = n.dir.join("bin/microk8s");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    n.run(move |_| async move {
        Cmd::new(&bin, Duration::from_secs(15))
            .arg("kubectl")
            .args(&args)
            .output()
            .await
    })
    .expect("running microk8s kubectl")
}

fn labels_of(n: &SimNode, node: &str) -> serde_json::Value {
    let out = kubectl(n, &["get", "nodes", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("a node list");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["metadata"]["name"] == node)
        .expect("the node")["metadata"]["labels"]
        .clone()
}

#[test]
fn label_is_strict_like_kubectl() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut n = SimNode::new(&lab, 0, root.path(), &log, &[]);
    n.install_and_start();

    let ok = kubectl(
        &n,
        &["label", "node", "node-0", "example.com/rack=r1", "zone="],
    );
    assert_eq!(ok.code(), Some(0), "{}", ok.stderr);
    assert_eq!(ok.stdout, "node/node-0 labeled\n");
    let l = labels_of(&n, "node-0");
    assert_eq!(l["example.com/rack"], "r1");
    assert_eq!(l["zone"], "");
    assert_eq!(
        l["kubernetes.io/hostname"], "node-0",
        "the standard labels stay"
    );

    let same = kubectl(&n, &["label", "node", "node-0", "example.com/rack=r1"]);
    assert_eq!(same.code(), Some(0));
    assert_eq!(same.stdout, "node/node-0 not labeled\n");

    let changed = kubectl(&n, &["label", "node", "node-0", "example.com/rack=r2"]);
    assert_eq!(changed.code(), Some(1));
    assert!(
        changed
            .stderr
            .contains("already has a value (r1), and --overwrite is false"),
        "{}",
        changed.stderr
    );
    assert_eq!(labels_of(&n, "node-0")["example.com/rack"], "r1");
    let over = kubectl(
        &n,
        &[
            "label",
            "node",
            "node-0",
            "example.com/rack=r2",
            "--overwrite",
        ],
    );
    assert_eq!(over.code(), Some(0), "{}", over.stderr);
    assert_eq!(labels_of(&n, "node-0")["example.com/rack"], "r2");

    let ghost = kubectl(&n, &["label", "node", "ghost", "a=b"]);
    assert_eq!(ghost.code(), Some(1));
    assert!(
        ghost
            .stderr
            .contains("Error from server (NotFound): nodes \"ghost\" not found"),
        "{}",
        ghost.stderr
    );

    for bad in ["-a=b", "Example.com/a=b", "a=b c", "a=-b", "noequals"] {
        let out = kubectl(&n, &["label", "node", "node-0", bad, "--overwrite"]);
        assert_eq!(out.code(), Some(1), "{bad}: {}", out.stdout);
        assert!(!out.stderr.is_empty(), "{bad}");
    }

    let removed = kubectl(&n, &["label", "node", "node-0", "zone-"]);
    assert_eq!(removed.code(), Some(0), "{}", removed.stderr);
    assert!(labels_of(&n, "node-0").get("zone").is_none());
}
