//! firstboot's MicroK8s adapter (`RealMicrok8s`, through the one command runner) against the
//! simulator, one node per network namespace, so joins cross a bridge. Needs root (network
//! namespaces); fails loudly otherwise. Each test is bounded (well under 60 s).
//!
//! Run: `cargo test -p microk8s-sim --test adapter` (as root).

mod support;

use std::net::IpAddr;
use std::time::Duration;

use firstboot::system::microk8s::{
    DqliteRole, EnableOutcome, InstallOutcome, InstallSource, JoinError, JoinRole, JoinTarget,
    Microk8s, Microk8sError, NodeRole, Status,
};
use netns_lab::Lab;
use support::*;

fn lab(n: usize) -> Lab {
    Lab::new(n).expect("creating the network lab (these tests must run as root)")
}

fn target(node: &SimNode) -> JoinTarget {
    JoinTarget::new(IpAddr::V4(node.host.addr), secret().microk8s_token())
}

fn join(node: &SimNode, t: &JoinTarget, role: JoinRole) -> Result<(), JoinError> {
    let t = t.clone();
    node.run(move |a| async move { a.join(&t, role).await })
}

/// Joins and waits until the cluster (seen from `seed`) lists the node as a Ready Kubernetes
/// node and, for control-plane nodes, a dqlite member: the serialisation the reference asks for.
fn join_and_settle(seed: &SimNode, node: &SimNode, role: JoinRole) {
    join(node, &target(seed), role).unwrap_or_else(|e| panic!("{} joining: {e}", node.name));
    let ip = IpAddr::V4(node.host.addr);
    eventually(Duration::from_secs(10), "the new node to be Ready", || {
        let nodes = seed.run(|a| async move { a.nodes().await }).ok()?;
        let n = nodes.iter().find(|n| n.internal_ip == Some(ip))?;
        n.ready.then_some(())
    });
    if role == JoinRole::ControlPlane {
        eventually(Duration::from_secs(10), "the new node in dqlite", || {
            let m = seed.run(|a| async move { a.dqlite_members().await }).ok()?;
            m.iter().any(|m| m.ip() == Some(ip)).then_some(())
        });
        eventually(
            Duration::from_secs(10),
            "the new member to be ready",
            || {
                node.run(|a| async move { a.wait_ready(Duration::from_secs(1)).await })
                    .ok()?
                    .then_some(())
            },
        );
    }
}

#[test]
fn install_writes_the_launch_config_first_and_issues_the_real_snap_argv() {
    let lab = lab(1);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut n = SimNode::new(&lab, 0, root.path(), &log, &[]);

    let installed = n.run(|a| async move { a.is_installed().await }).unwrap();
    assert!(!installed);
    let out = n
        .run(|a| async move {
            a.install(&InstallSource::Channel("1.32/stable".into()), &secret())
                .await
        })
        .unwrap();
    assert_eq!(out, InstallOutcome::Installed);
    // Installed but its services not started yet: stopped (exit 0, A5).
    assert_eq!(n.status(), Status::Stopped);
    n.start();
    let ready = n.run(|a| async move { a.wait_ready(Duration::from_secs(15)).await });
    assert!(ready.unwrap(), "{}", n.daemon_log());

    let lc = n.dir.join("etc/microk8s.yaml");
    let text = std::fs::read_to_string(&lc).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        v["persistentClusterToken"].as_str().unwrap(),
        secret().microk8s_token()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&lc).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The simulator's install hook read it (A8): the token is what it now accepts, and the
    // launch config's dns addon was applied by the running agent.
    let installed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(n.dir.join("state/installed.json")).unwrap())
            .unwrap();
    assert_eq!(
        installed["persistent_token"].as_str().unwrap(),
        secret().microk8s_token()
    );
    let st = eventually(
        Duration::from_secs(5),
        "dns from the launch config",
        || match n.status() {
            Status::Running(s) if s.addon_enabled("dns") => Some(s),
            _ => None,
        },
    );
    assert!(!st.ha_formed());
    assert_eq!(st.voters(), ["127.0.0.1:19001"], "not yet bound (A4)");

    // Idempotent: a second install does nothing.
    let again = n
        .run(|a| async move {
            a.install(&InstallSource::Channel("1.32/stable".into()), &secret())
                .await
        })
        .unwrap();
    assert_eq!(again, InstallOutcome::AlreadyInstalled);

    let snaps: Vec<Vec<String>> = log_records(&log)
        .iter()
        .filter(|r| r["program"] == "snap" && r["event"] == "start")
        .map(|r| serde_json::from_value(r["argv"].clone()).unwrap())
        .collect();
    assert_eq!(
        snaps,
        vec![
            vec!["list", "microk8s"],
            vec!["list", "microk8s"],
            vec!["wait", "system", "seed.loaded"],
            vec!["install", "microk8s", "--classic", "--channel=1.32/stable"],
            vec!["list", "microk8s"],
        ]
    );
}

#[test]
fn staged_install_acks_every_assertion_then_installs_base_and_microk8s() {
    let lab = lab(1);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let n = SimNode::new(&lab, 0, root.path(), &log, &[]);
    let staged = root.path().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    for f in [
        "microk8s_7964.snap",
        "microk8s_7964.assert",
        "core22_2045.snap",
        "core22_2045.assert",
    ] {
        std::fs::write(staged.join(f), b"staged").unwrap();
    }
    let src = InstallSource::Staged(staged.clone());
    let out = n
        .run(move |a| async move { a.install(&src, &secret()).await })
        .unwrap();
    assert_eq!(out, InstallOutcome::Installed);
    let snaps: Vec<String> = log_records(&log)
        .iter()
        .filter(|r| r["program"] == "snap" && r["event"] == "end")
        .map(|r| {
            let argv: Vec<String> = serde_json::from_value(r["argv"].clone()).unwrap();
            let want = if argv[0] == "list" { 1 } else { 0 };
            assert_eq!(r["exit"], want, "{r}");
            argv.join(" ")
        })
        .collect();
    let s = |f: &str| staged.join(f).display().to_string();
    assert_eq!(
        snaps,
        vec![
            "list microk8s".to_owned(),
            "wait system seed.loaded".to_owned(),
            format!("ack {}", s("core22_2045.assert")),
            format!("ack {}", s("microk8s_7964.assert")),
            format!("install {}", s("core22_2045.snap")),
            format!("install {} --classic", s("microk8s_7964.snap")),
        ]
    );
}

#[test]
fn three_control_planes_and_two_workers_form_ha_across_namespaces() {
    let lab = lab(5);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (0..5)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let role = if i < 3 {
            JoinRole::ControlPlane
        } else {
            JoinRole::Worker
        };
        join_and_settle(&nodes[0], n, role);
    }
    let ips: Vec<String> = (0..3)
        .map(|i| format!("{}:19001", lab.host(i).addr))
        .collect();
    let Status::Running(st) = nodes[0].status() else {
        panic!("the seed is not running");
    };
    assert!(st.ha_formed(), "{st:?}");
    assert_eq!(
        st.voters(),
        ips,
        "the seed was rebound to its lab address (A4)"
    );
    assert!(st.standby().is_empty());
    for w in &nodes[3..] {
        assert_eq!(w.status(), Status::WorkerNode);
    }
    let members = nodes[1]
        .run(|a| async move { a.dqlite_members().await })
        .unwrap();
    assert_eq!(members.len(), 3, "workers are not dqlite members");
    assert!(members.iter().all(|m| m.role == DqliteRole::Voter));
    // Every member sees every node Ready once heartbeats went round.
    let k8s = eventually(Duration::from_secs(5), "all nodes Ready on node-2", || {
        let k = nodes[2].run(|a| async move { a.nodes().await }).ok()?;
        (k.len() == 5 && k.iter().all(|n| n.ready)).then_some(k)
    });
    assert_eq!(k8s.iter().filter(|n| n.role == NodeRole::Worker).count(), 2);

    // Addons: enable once on a control-plane node; idempotent from another; refused on workers.
    let args = vec!["10.231.0.200-10.231.0.210".to_owned()];
    let first = nodes[1]
        .run(move |a| async move { a.enable("metallb", &args).await })
        .unwrap();
    assert_eq!(first, EnableOutcome::Enabled);
    let again = nodes[2]
        .run(|a| async move { a.enable("metallb", &[]).await })
        .unwrap();
    assert_eq!(again, EnableOutcome::AlreadyEnabled);
    let refused = nodes[3].run(|a| async move { a.enable("hostpath-storage", &[]).await });
    assert!(
        matches!(refused, Err(Microk8sError::WorkerNode { .. })),
        "{refused:?}"
    );
    let Status::Running(st) = nodes[0].status() else {
        panic!("seed not running");
    };
    assert!(st.addon_enabled("metallb"));

    // What the log says the adapter did.
    let recs = log_records(&log);
    for r in recs
        .iter()
        .filter(|r| r["event"] == "start" && r["program"] == "microk8s")
    {
        let argv: Vec<String> = serde_json::from_value(r["argv"].clone()).unwrap();
        assert!(!argv.iter().any(|a| a == "--controlplane"), "{r}");
        if argv[0] == "join" {
            let host = argv[1].split(':').next().unwrap();
            assert!(host.parse::<IpAddr>().is_ok(), "join by hostname: {r}");
            let worker = ["node-3", "node-4"].contains(&r["node"].as_str().unwrap());
            assert_eq!(argv.iter().any(|a| a == "--worker"), worker, "{r}");
        }
    }
    // Every enable that succeeded ran on a control-plane node; the one on a worker failed.
    for r in recs
        .iter()
        .filter(|r| r["event"] == "end" && r["argv"][0] == "enable")
    {
        let node = r["node"].as_str().unwrap();
        let cp = ["node-0", "node-1", "node-2"].contains(&node);
        assert_eq!(r["exit"] == 0, cp, "{r}");
    }
    let mut joins = join_intervals(&log);
    joins.sort_by_key(|j| j.1);
    assert_eq!(joins.len(), 4);
    for w in joins.windows(2) {
        assert!(w[0].2 <= w[1].1, "joins overlapped: {w:?}");
    }
}

#[test]
fn every_join_failure_has_its_typed_error() {
    let lab = lab(4);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    // A join stays in flight for 1.5 s, so a second one can arrive meanwhile.
    let env = [("MICROK8S_SIM_JOIN_DELAY_MS", "1500")];
    let mut nodes: Vec<SimNode> = (0..3)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &env))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    let seed = &nodes[0];

    // Bad token: 500 invalid token (exit 6).
    let mut bad = target(seed);
    bad.token = "0".repeat(64);
    let e = join(&nodes[1], &bad, JoinRole::ControlPlane).unwrap_err();
    assert!(e.is_bad_token(), "{e}");

    // Unreachable seed: host 3 has no simulator and its link is cut.
    lab.disconnect(3).unwrap();
    let gone = JoinTarget::new(IpAddr::V4(lab.host(3).addr), secret().microk8s_token());
    let e = join(&nodes[1], &gone, JoinRole::ControlPlane).unwrap_err();
    assert!(matches!(e, JoinError::Unreachable { .. }), "{e}");
    // A reachable host with nothing listening: connection refused, also unreachable.
    let refused = JoinTarget {
        port: 25001,
        ..target(seed)
    };
    let e = join(&nodes[1], &refused, JoinRole::ControlPlane).unwrap_err();
    assert!(matches!(e, JoinError::Unreachable { .. }), "{e}");

    // Joining oneself: 503.
    let e = join(seed, &target(seed), JoinRole::ControlPlane).unwrap_err();
    assert!(matches!(e, JoinError::Rejected { status: 503, .. }), "{e}");

    // Fingerprint mismatch: exit 4.
    let fp = JoinTarget {
        fingerprint: Some("000000000000".into()),
        ..target(seed)
    };
    let e = join(&nodes[1], &fp, JoinRole::ControlPlane).unwrap_err();
    assert!(matches!(e, JoinError::Unverified { .. }), "{e}");

    // IPv6 seeds cannot be expressed (A3); refused before running anything.
    let v6 = JoinTarget::new("fd00::1".parse().unwrap(), secret().microk8s_token());
    let e = join(&nodes[1], &v6, JoinRole::ControlPlane).unwrap_err();
    assert!(matches!(e, JoinError::InvalidConnection { .. }), "{e}");

    // Concurrent joins: the second, arriving while the first is in flight, is rejected.
    let (a, b) = (nodes[1].adapter.clone(), nodes[2].adapter.clone());
    let t = target(seed);
    let first = {
        let t = t.clone();
        nodes[1].host.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(async move { a.join(&t, JoinRole::ControlPlane).await }))
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let second = nodes[2].run(move |_| async move { b.join(&t, JoinRole::ControlPlane).await });
    let first = first.join().unwrap().unwrap();
    first.expect("the first join succeeds");
    let e = second.unwrap_err();
    assert!(
        matches!(&e, JoinError::Rejected { status: 500, message, .. } if message.contains("in progress")),
        "{e}"
    );
    // The log shows the overlap the driver must prevent.
    let mut j: Vec<_> = join_intervals(&log)
        .into_iter()
        .filter(|(n, _, _)| n == "node-1" || n == "node-2")
        .collect();
    j.sort_by_key(|x| x.1);
    let last_two = &j[j.len() - 2..];
    assert!(
        last_two[0].2 > last_two[1].1,
        "expected overlap: {last_two:?}"
    );

    // Already known: joining again.
    let e = join(&nodes[1], &target(seed), JoinRole::ControlPlane).unwrap_err();
    assert!(
        matches!(&e, JoinError::Rejected { status: 500, message, .. } if message.contains("already known")),
        "{e}"
    );
    lab.reconnect(3).unwrap();
}

#[test]
fn quorum_is_kept_with_two_of_three_voters_and_lost_with_one() {
    let lab = lab(4);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (0..4)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    for i in 1..4 {
        join_and_settle(&nodes[0], &nodes[i], JoinRole::ControlPlane);
    }
    let addr = |i: usize| format!("{}:19001", lab.host(i).addr);
    let Status::Running(st) = nodes[0].status() else {
        panic!("not running")
    };
    assert_eq!(st.voters(), [addr(0), addr(1), addr(2)]);
    assert_eq!(st.standby(), [addr(3)], "the 4th control plane is standby");

    // Kill voter 2: the standby is promoted, 3 voters again.
    nodes[2].kill();
    let st = eventually(
        Duration::from_secs(10),
        "standby promotion",
        || match nodes[0].status() {
            Status::Running(s) if s.voters().contains(&addr(3).as_str()) => Some(s),
            _ => None,
        },
    );
    assert_eq!(st.voters().len(), 3);
    assert!(!st.voters().contains(&addr(2).as_str()));

    // Kill voter 1: 2 of 3 voters alive, quorum kept.
    nodes[1].kill();
    std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 5));
    let Status::Running(st) = nodes[0].status() else {
        panic!("quorum should hold with 2 of 3 voters");
    };
    assert_eq!(st.voters().len(), 3);
    let k8s = nodes[3].run(|a| async move { a.nodes().await }).unwrap();
    let ready: Vec<&str> = k8s
        .iter()
        .filter(|n| n.ready)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(ready, ["node-0", "node-3"]);

    // Kill voter 3: 1 of 3, quorum lost.
    nodes[3].kill();
    eventually(Duration::from_secs(10), "quorum loss", || {
        (nodes[0].status() == Status::NotReady).then_some(())
    });
    let e = nodes[0].run(|a| async move { a.nodes().await });
    assert!(matches!(e, Err(Microk8sError::NotRunning { .. })), "{e:?}");
    assert!(nodes[0]
        .run(|a| async move { a.dqlite_members().await })
        .is_err());
    let ready = nodes[0].run(|a| async move { a.wait_ready(Duration::from_secs(1)).await });
    assert!(!ready.unwrap());
}

#[test]
fn leave_and_remove_node_follow_the_reference() {
    let lab = lab(3);
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (0..3)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    // A lone node is not in a cluster (exit 1, microk8s-leave.wrapper).
    let e = nodes[0].run(|a| async move { a.leave().await });
    assert!(matches!(e, Err(Microk8sError::NotInCluster)), "{e:?}");
    join_and_settle(&nodes[0], &nodes[1], JoinRole::ControlPlane);
    join_and_settle(&nodes[0], &nodes[2], JoinRole::Worker);

    // remove-node without force on a dqlite member is refused.
    let e = nodes[0].run(|a| async move { a.remove_node("node-1", false).await });
    assert!(
        matches!(e, Err(Microk8sError::StillInDqlite { .. })),
        "{e:?}"
    );
    // leave, then remove-node: the Node object stays until removed (A6).
    nodes[1]
        .run(|a| async move { a.leave().await })
        .expect("leave");
    // Once left it is a lone node: a second leave is refused (exit 1).
    let e = nodes[1].run(|a| async move { a.leave().await });
    assert!(matches!(e, Err(Microk8sError::NotInCluster)), "{e:?}");
    let still = nodes[0].run(|a| async move { a.nodes().await }).unwrap();
    assert!(still.iter().any(|n| n.name == "node-1"));
    nodes[0]
        .run(|a| async move { a.remove_node("node-1", false).await })
        .expect("remove-node after leave");
    let members = nodes[0]
        .run(|a| async move { a.dqlite_members().await })
        .unwrap();
    assert_eq!(members.len(), 1);
    // Unknown name with --force: exit 1, typed.
    let e = nodes[0].run(|a| async move { a.remove_node("no-such-node", true).await });
    assert!(matches!(e, Err(Microk8sError::UnknownNode { .. })), "{e:?}");
    // Refused on a worker.
    let e = nodes[2].run(|a| async move { a.remove_node("node-0", true).await });
    assert!(matches!(e, Err(Microk8sError::WorkerNode { .. })), "{e:?}");
}
