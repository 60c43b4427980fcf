//! Node preparation runs once at a time: a MicroK8s install slower than the agent's join
//! timeout (after which the formation core asks for the preparation again) is never joined by
//! a second `snap install` (snapd would refuse it, "change in progress"; the simulator does
//! too, and records every call). A real agent in a network namespace with the simulator.
//! Needs root. Run: `cargo test -p firstboot --test agent_prepare`.

mod agent_support;

use std::time::Duration;

use agent_support::*;

#[test]
fn a_slow_microk8s_install_is_never_started_twice() {
    let spec = ClusterSpec {
        control_plane: 1,
        expected_nodes: 1,
        // The core asks again after the join timeout (2 s): three times during the install.
        join_timeout_s: 2,
        install_delay_ms: 7_000,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(1, spec);
    c.start(0);
    c.wait_formed(&[0], 1, Duration::from_secs(90));
    let installs: Vec<serde_json::Value> = c
        .commands()
        .into_iter()
        .filter(|r| r["program"] == "snap" && r["argv"][0] == "install")
        .collect();
    let starts = installs.iter().filter(|r| r["event"] == "start").count();
    let failed: Vec<&serde_json::Value> = installs
        .iter()
        .filter(|r| r["event"] == "end" && r["exit"] != 0)
        .collect();
    if starts != 1 || !failed.is_empty() {
        c.dump();
    }
    assert_eq!(starts, 1, "one snap install in all: {installs:#?}");
    assert!(
        failed.is_empty(),
        "no refused or failed install: {failed:#?}"
    );
    let log = std::fs::read_to_string(c.nodes[0].dir.join("agent.log")).unwrap();
    assert!(
        log.contains("not started again"),
        "the core asked again during the install, and the driver waited for the running one"
    );
}
