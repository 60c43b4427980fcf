//! The drill's "cut yourself off" route (`POST /v1/drill`) on a real agent in a network
//! namespace (root): a caller without the cluster secret is refused (401) and the node stays
//! up; a request captured from a holder of the secret and replayed is refused (401) before the
//! handler; a request naming another node is refused (503) and changes nothing; an
//! authenticated isolate request takes the node's network down (its coordinator stops
//! answering) and the node brings it back by itself after the 10 s it was given.
//!
//! Bounded: the agent's start waits at most 60 s, the isolation lasts 10 s and the test waits
//! at most 40 s for the node to come back. Run: `cargo test -p firstboot --test attack_drill`.

mod agent_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};
use rackseed_protocol::coordinator::{CoordinatorClient, CutOff, DrillAck};
use rackseed_protocol::secret::ClusterSecret;

const WS: usize = 0;

/// Runs `f` with a client of `secret` on the workstation host.
fn on_ws<T: Send + 'static, F, Fut>(c: &AgentCluster, secret: &ClusterSecret, f: F) -> T
where
    F: FnOnce(CoordinatorClient) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let secret = secret.clone();
    c.lab
        .host(WS)
        .spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let client = CoordinatorClient::new(&secret, "imagebuilder")
                .with_timeout(Duration::from_secs(3));
            Ok(rt.block_on(f(client)))
        })
        .join()
        .expect("workstation thread")
        .expect("entering the namespace")
}

fn answers(c: &AgentCluster, target: (SocketAddr, String)) -> bool {
    let secret = c.spec.secret.clone();
    on_ws(c, &secret, move |client| async move {
        client.status(target.0, &target.1).await.is_ok()
    })
}

#[test]
fn the_cut_off_route_needs_the_secret_refuses_replays_and_cuts_the_node_off() {
    let spec = ClusterSpec {
        control_plane: 1,
        expected_nodes: 1,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::after_spare_hosts(1, 1, spec);
    c.start(0);
    let node_id = c.wait_formed(&[0], 1, Duration::from_secs(60))[0]
        .node_id
        .clone();
    let fp =
        rackseed_protocol::coordinator::identity::read_fingerprint(&c.nodes[0].dir.join("state"))
            .unwrap();
    let target = (SocketAddr::from((c.nodes[0].addr, 7443)), fp);
    let isolate = CutOff::Isolate {
        node_id: node_id.clone(),
        restore_after_s: 10,
    };

    // Without the secret: 401, nothing happens.
    let rogue = ClusterSecret::from_bytes([9; 32]);
    let (t, cut) = (target.clone(), isolate.clone());
    let refused = on_ws(&c, &rogue, move |client| async move {
        client
            .drill(t.0, &t.1, &cut)
            .await
            .err()
            .and_then(|e| e.status())
    });
    assert_eq!(refused, Some(401));

    // A request for another node id: refused by the handler (503), nothing happens; the same
    // signed request replayed: 401 (its nonce was used), the handler never sees it.
    let secret = c.spec.secret.clone();
    let t = target.clone();
    let (first, replay) = on_ws(&c, &secret, move |client| async move {
        let nonce = client.nonce(t.0, &t.1).await.unwrap();
        let other = CutOff::PowerOff {
            node_id: "some-other-node".into(),
        };
        let req = client.sign_drill(t.0, &nonce, &other).unwrap();
        let first: Result<DrillAck, _> = client.send_signed(t.0, &t.1, &req).await;
        let replay: Result<DrillAck, _> = client.send_signed(t.0, &t.1, &req).await;
        (
            first.err().map(|e| (e.status(), e.to_string())),
            replay.err().and_then(|e| e.status()),
        )
    });
    let (status, text) = first.expect("a drill for another node must be refused");
    assert_eq!(status, Some(503), "{text}");
    assert!(text.contains("nothing done"), "{text}");
    assert_eq!(replay, Some(401));
    assert!(answers(&c, target.clone()), "the node must still be up");

    // The holder of the secret cuts it off: it answers with its steps, then goes dark, then
    // comes back by itself.
    let (t, cut) = (target.clone(), isolate);
    let ack = on_ws(&c, &secret, move |client| async move {
        client.drill(t.0, &t.1, &cut).await
    })
    .expect("the drill request");
    assert_eq!(ack.node_id, node_id);
    assert_eq!(ack.restores_after_s, Some(10));
    assert!(
        ack.steps.iter().any(|s| s == "ip link set dev eth0 down"),
        "{:?}",
        ack.steps
    );
    assert!(ack.steps[0].ends_with("microk8s stop"), "{:?}", ack.steps);
    let cut_at = Instant::now();
    let mut went_dark = false;
    while cut_at.elapsed() < Duration::from_secs(9) {
        if !answers(&c, target.clone()) {
            went_dark = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(went_dark, "the node still answered after the cut");
    let deadline = Instant::now() + Duration::from_secs(40);
    while !answers(&c, target.clone()) {
        assert!(Instant::now() < deadline, "the node did not come back");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        cut_at.elapsed() >= Duration::from_secs(10),
        "back after {:?}, before its 10 s",
        cut_at.elapsed()
    );
    let log = std::fs::read_to_string(c.nodes[0].dir.join("agent.log")).unwrap();
    assert!(log.contains("failover drill: this node is back"), "{log}");
}
