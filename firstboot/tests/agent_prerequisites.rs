//! A node of an official base whose image did not stage keepalived: the cluster config asks
//! for a floating API address, the agent (packaged keepalived, `systemctl` mode) finds neither
//! keepalived nor curl under its root and nothing staged to install them from. The node still
//! forms; its status names what is missing, the setting that needs it and what the node lacks
//! (the address), and the API-address view says keepalived is not installed. Restarted, the
//! member shows the same verdict at once (kept in its state folder) and after checking again.
//! One agent with the simulator in a network namespace; needs root.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};
use rackseed_protocol::status::StatusDoc;

const VERDICT: &str = "api-address: keepalived and curl not installed on this node (every \
                       api-address node needs them): the node cannot hold the floating API \
                       address (it forms without it)";

fn wait_for(c: &AgentCluster, what: &str, ok: impl Fn(&StatusDoc) -> bool) -> StatusDoc {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(d) = c.status(0) {
            if ok(&d) {
                return d;
            }
            if Instant::now() > deadline {
                c.dump();
                panic!("{what} within 60 s; last document: {d:#?}");
            }
        } else if Instant::now() > deadline {
            c.dump();
            panic!("{what} within 60 s; no status document");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn keepalived_missing_is_a_verdict_the_node_forms_and_a_restart_keeps_it() {
    let spec = ClusterSpec {
        control_plane: 1,
        expected_nodes: 1,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(1, spec);
    let a = c.nodes[0].addr.octets();
    c.set_api_address(&format!("{}.{}.{}.100", a[0], a[1], a[2]));
    c.start(0);
    let d = c.wait_formed(&[0], 1, Duration::from_secs(90)).remove(0);
    assert!(d.problems.iter().any(|p| p == VERDICT), "{:?}", d.problems);
    let view = wait_for(&c, "the API-address view says keepalived is missing", |d| {
        d.api_address
            .as_ref()
            .and_then(|v| v.problem.as_deref())
            .is_some_and(|p| p.starts_with("keepalived is not installed"))
    })
    .api_address
    .unwrap();
    assert!(!view.held_here, "{view:?}");
    assert_eq!(view.state, "cannot hold the address", "{view:?}");

    // Restarted: the member does not prepare again, yet its verdict is there from the start.
    assert!(c.stop_agent(0).is_some(), "the agent stopped");
    c.start(0);
    let again = wait_for(&c, "the restarted member's document", |d| {
        d.phase == "member"
    });
    assert!(
        again.problems.iter().any(|p| p == VERDICT),
        "{:?}",
        again.problems
    );
    // Its check after the restart comes to the same verdict (still exactly one line of it).
    std::thread::sleep(Duration::from_secs(2));
    let later = c.status(0).expect("status");
    assert_eq!(
        later.problems.iter().filter(|p| *p == VERDICT).count(),
        1,
        "{:?}",
        later.problems
    );
    assert!(
        later.timeline.iter().any(|t| t.what.contains("resuming")),
        "{:?}",
        later.timeline
    );
}
