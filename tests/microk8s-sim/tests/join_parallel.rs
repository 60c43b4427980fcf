//! Concurrent joins in the simulator, as canonical/microk8s-cluster-agent serves them: worker
//! joins beside worker joins succeed; a control-plane join beside any join, or a worker join
//! beside a control-plane join, is refused; two certificate signings at once make the later
//! worker join fail with join.py's "Failed to sign" (exit 1), which the adapter reports as the
//! transient `JoinError::CertificateSigning`, and the same join run again succeeds.
//! Needs root (network namespaces). Run: `cargo test -p microk8s-sim --test join_parallel`.

mod support;

use std::time::Duration;

use firstboot::system::microk8s::{JoinError, JoinRole, JoinTarget, Microk8s};
use netns_lab::Lab;
use rackseed_host::command::Output;
use support::*;

fn url(seed: &SimNode) -> String {
    format!("{}:25000/{}", seed.host.addr, secret().microk8s_token())
}

/// `n` installed and started nodes with the given simulator settings.
fn cluster(n: usize, env: &[(&str, &str)]) -> (Lab, tempfile::TempDir, Vec<SimNode>) {
    let lab = Lab::new(n).expect("creating the network lab (run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let mut nodes: Vec<SimNode> = (0..n)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, env))
        .collect();
    for x in &mut nodes {
        x.install_and_start();
    }
    (lab, root, nodes)
}

/// Runs `microk8s join URL [--worker]` on `node` in a thread of its own.
fn join_in_background(
    node: &SimNode,
    url: String,
    worker: bool,
) -> std::thread::JoinHandle<Output> {
    let host = node.host.clone();
    let bin = node.dir.join("bin/microk8s").to_string_lossy().into_owned();
    std::thread::spawn(move || {
        let mut cmd = host
            .cmd(&bin, Duration::from_secs(30))
            .args(["join", url.as_str()]);
        if worker {
            cmd = cmd.arg("--worker");
        }
        cmd.output_blocking().expect("running the simulator")
    })
}

#[test]
fn worker_joins_run_together_but_never_beside_a_control_plane_join() {
    let rt = runtime();
    let _g = rt.enter();
    // Joins take 1.5 s; signings never race here.
    let (_lab, _root, n) = cluster(
        6,
        &[
            ("MICROK8S_SIM_JOIN_DELAY_MS", "1500"),
            ("MICROK8S_SIM_SIGN_RACE_MS", "0"),
        ],
    );
    let u = url(&n[0]);
    // Three workers at once: all join.
    let workers: Vec<_> = (1..=3)
        .map(|i| join_in_background(&n[i], u.clone(), true))
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    // A control-plane join while they are in flight is refused (the concurrent-join race).
    let o = mk(&n[4], &["join", &u]);
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(o.stdout.contains("still in progress"), "{o:?}");
    for w in workers {
        let o = w.join().unwrap();
        assert_eq!(
            o.code(),
            Some(0),
            "a worker join beside worker joins: {o:?}"
        );
    }
    // Now alone, the control-plane join succeeds; a worker join while it runs is refused.
    let cp = join_in_background(&n[4], u.clone(), false);
    std::thread::sleep(Duration::from_millis(400));
    let o = mk(&n[5], &["join", &u, "--worker"]);
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(
        o.stdout
            .contains("failed to retrieve list of control plane nodes"),
        "{o:?}"
    );
    let o = cp.join().unwrap();
    assert_eq!(o.code(), Some(0), "{o:?}");
    let o = mk(&n[5], &["join", &u, "--worker"]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    // Everyone is in the seed's view: 2 control-plane nodes, 4 workers.
    let status = n[0].status();
    let firstboot::system::microk8s::Status::Running(s) = status else {
        panic!("seed not running: {status:?}");
    };
    assert_eq!(s.datastore.len(), 2, "{s:?}");
}

#[test]
fn simultaneous_certificate_signings_fail_the_later_join_and_a_retry_succeeds() {
    let rt = runtime();
    let _g = rt.enter();
    // A signing runs for 1 s: a second worker's signing during it collides.
    let (_lab, _root, n) = cluster(
        4,
        &[
            ("MICROK8S_SIM_JOIN_DELAY_MS", "200"),
            ("MICROK8S_SIM_SIGN_RACE_MS", "1000"),
        ],
    );
    let u = url(&n[0]);
    let first = join_in_background(&n[1], u.clone(), true);
    std::thread::sleep(Duration::from_millis(300));
    let target = JoinTarget {
        fingerprint: None,
        ..JoinTarget::new(n[0].host.addr.into(), secret().microk8s_token())
    };
    let t = target.clone();
    let second = n[2].run(move |a| async move { a.join(&t, JoinRole::Worker).await });
    let e = second.expect_err("a signing beside another one fails");
    assert!(
        matches!(&e, JoinError::CertificateSigning { certificate, .. } if certificate == "kubelet"),
        "{e}"
    );
    assert!(e.is_transient());
    assert!(
        e.to_string()
            .contains("failed to sign the kubelet certificate"),
        "{e}"
    );
    let o = first.join().unwrap();
    assert_eq!(
        o.code(),
        Some(0),
        "the signing already running succeeds: {o:?}"
    );
    // One joiner's two signings never race with each other, and the failed join left nothing
    // in flight: the same join again succeeds, and so does a control-plane join after it.
    let t = target.clone();
    n[2].run(move |a| async move { a.join(&t, JoinRole::Worker).await })
        .expect("the retried join succeeds");
    let o = mk(&n[3], &["join", &u]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    // The seed's agent logged what openssl would have said.
    assert!(
        n[0].daemon_log().contains("unable to load number"),
        "{}",
        n[0].daemon_log()
    );
}
