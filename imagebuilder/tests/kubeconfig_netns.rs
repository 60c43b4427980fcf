//! `imagebuilder kubeconfig` against three stand-in nodes (real coordinators and real mDNS
//! discovery, fake kubeconfig providers), each in its own network namespace, with the
//! workstation in a fourth (netns-lab). Needs root; fails loudly without.
//!
//! node-a is a control-plane member whose provider fails (MicroK8s down), node-b a
//! control-plane member that serves a kubeconfig naming 127.0.0.1, node-c a worker member.
//! Shows: the workstation skips the failing member and the worker, fetches node-b's
//! kubeconfig over the authenticated coordinator and points it at node-b's lab address;
//! `--output` writes it with mode 0600; when no member serves one, the error names every node
//! and why; another cluster's secret finds nothing and says why.

mod status_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use netns_lab::Lab;
use rackseed_config::Role::{ControlPlane, Worker};
use rackseed_formation::PhaseSummary::Member;
use status_support::{member_doc, spawn, Command, Kubeconfig, CP};

const RUN: Duration = Duration::from_secs(90);

/// What the stand-in's `microk8s config` answers (the kubeconfig tests' one fixture).
const FAKE: &str = include_str!("fixtures/microk8s-config.yaml");

#[test]
fn kubeconfig_comes_from_a_serving_control_plane_member_and_points_at_it() {
    let lab = Lab::new(4).expect("creating the network lab (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let (secret, secret_path) = status_support::secret_file(dir.path(), "cluster.secret");
    let (_, other_path) = status_support::secret_file(dir.path(), "other.secret");
    let sp = secret_path.to_str().unwrap();
    let ips: Vec<_> = (0..3).map(|i| lab.host(i).addr).collect();
    let ws = lab.host(3).clone();
    let members = [("node-a", CP), ("node-b", CP), ("node-c", "worker")];

    let mut nodes = vec![
        spawn(
            lab.host(0),
            "node-a",
            &secret,
            member_doc("node-a", ips[0], CP, &members, &ips[..2]),
            Member,
            Some(ControlPlane),
            Kubeconfig::Fail("microk8s is not running".into()),
        )
        .unwrap(),
        spawn(
            lab.host(1),
            "node-b",
            &secret,
            member_doc("node-b", ips[1], CP, &members, &ips[..2]),
            Member,
            Some(ControlPlane),
            Kubeconfig::Serve(FAKE.into()),
        )
        .unwrap(),
        spawn(
            lab.host(2),
            "node-c",
            &secret,
            member_doc("node-c", ips[2], "worker", &members, &[]),
            Member,
            Some(Worker),
            // A worker never has a provider; one here would show the workstation asked it.
            Kubeconfig::Serve("clusters: [wrong node]".into()),
        )
        .unwrap(),
    ];

    let out = status_support::imagebuilder_in(
        &ws,
        &["kubeconfig", "--secret", sp, "--timeout", "30s"],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        FAKE.replace(
            "https://127.0.0.1:16443",
            &format!("https://{}:16443", ips[1])
        )
    );
    assert!(
        !out.stderr.contains("not-a-real-token"),
        "the kubeconfig leaked into the log: {}",
        out.stderr
    );

    let file = dir.path().join("kubeconfig");
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "kubeconfig",
            "--secret",
            sp,
            "--timeout",
            "30s",
            "--output",
            file.to_str().unwrap(),
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("node-b"), "{}", out.stderr);
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains(&format!("server: https://{}:16443", ips[1])));

    // No member serves one any more: the error says who was asked and what they said.
    nodes[1].send(Command::ClearKubeconfig);
    let out = status_support::imagebuilder_in(
        &ws,
        &["kubeconfig", "--secret", sp, "--timeout", "5s"],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
    assert!(out.stdout.is_empty());
    for want in [
        "no control-plane member handed out a kubeconfig within 5s",
        "node-a (member, control-plane)",
        "node-c (member, worker)",
        "microk8s is not running",
        "node-b: coordinator",
        "serves no kubeconfig",
    ] {
        assert!(
            out.stderr.contains(want),
            "stderr lacks {want:?}:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("wrong node"), "the worker was asked");

    // Another cluster's secret sees no node and hints at the secret.
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "kubeconfig",
            "--secret",
            other_path.to_str().unwrap(),
            "--timeout",
            "4s",
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr
            .contains("no node of this cluster announced itself")
            && out.stderr.contains("is this the cluster's secret?"),
        "{}",
        out.stderr
    );

    for n in &mut nodes {
        n.stop().unwrap();
    }
}
