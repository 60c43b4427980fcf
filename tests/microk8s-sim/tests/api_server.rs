//! The simulated Kubernetes API endpoint (16443): `/readyz` answers 200 on a control-plane
//! node while its datastore has quorum and 500 once it lost it; `/livez` stays 200; unknown
//! paths are 404; a worker answers 503 (its apiserver-proxy is not simulated). Asked with curl
//! over TLS from another lab host, as a keepalived health check or a client would. Needs root.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use firstboot::system::microk8s::{JoinRole, JoinTarget, Microk8s};
use netns_lab::Lab;
use rackseed_host::command::Cmd;
use support::{eventually, runtime, secret, SimNode};

/// The HTTP status `GET https://<ip>:16443<path>` answers from lab host `from` (0: no answer).
fn http_status(lab: &Lab, from: usize, ip: std::net::Ipv4Addr, path: &str) -> u16 {
    let out = Cmd::new("ip", Duration::from_secs(5))
        .args([
            "netns",
            "exec",
            &lab.host(from).ns,
            "curl",
            "--silent",
            "--insecure",
        ])
        .args([
            "--max-time",
            "2",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .arg(format!("https://{ip}:16443{path}"))
        .output_blocking()
        .expect("curl");
    out.stdout.trim().parse().unwrap_or(0)
}

#[test]
fn readiness_follows_quorum_and_workers_do_not_serve_it() {
    let lab = Lab::new(5).expect("creating the network lab (these tests must run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (1..5)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
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
        if role == JoinRole::ControlPlane {
            eventually(Duration::from_secs(15), "the member ready", || {
                nodes[i]
                    .run(|a| async move { a.wait_ready(Duration::from_secs(1)).await })
                    .ok()?
                    .then_some(())
            });
        }
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.host.addr).collect();
    let ip = |i: usize| addrs[i];
    // Lab host 0 is the client.
    for i in 0..3 {
        eventually(Duration::from_secs(10), "ready with quorum", || {
            (http_status(&lab, 0, ip(i), "/readyz") == 200).then_some(())
        });
        assert_eq!(http_status(&lab, 0, ip(i), "/livez"), 200);
        assert_eq!(http_status(&lab, 0, ip(i), "/version-of-nothing"), 404);
    }
    assert_eq!(http_status(&lab, 0, ip(3), "/readyz"), 503, "a worker");

    // Two of three voters gone: node 0 lost quorum, its readiness fails, it stays live.
    nodes[1].kill();
    nodes[2].kill();
    eventually(Duration::from_secs(10), "not ready without quorum", || {
        (http_status(&lab, 0, ip(0), "/readyz") == 500).then_some(())
    });
    assert_eq!(http_status(&lab, 0, ip(0), "/livez"), 200);
}
