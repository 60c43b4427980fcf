//! The MicroK8s output parsers on fixture files written to the exact formats of the reference
//! (part A: A3 join messages, A5 status/dqlite/kubectl). Fixtures: tests/fixtures/microk8s/.

use std::net::IpAddr;
use std::path::PathBuf;

use firstboot::system::microk8s::parse::{
    parse_cert_fingerprint, parse_dqlite_cluster_json, parse_join_rejection, parse_nodes_json,
    parse_status, parse_status_pretty, parse_status_yaml,
};
use firstboot::system::microk8s::{DqliteRole, NodeRole, Status};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/microk8s")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn yaml_status_of_an_ha_cluster() {
    let st = parse_status_yaml(&fixture("status-ha.yaml"))
        .unwrap()
        .expect("running");
    assert!(st.ha_enabled);
    assert_eq!(
        st.voters(),
        ["10.0.0.11:19001", "10.0.0.12:19001", "10.0.0.13:19001"]
    );
    assert_eq!(st.standby(), ["10.0.0.14:19001"]);
    assert!(st.ha_formed());
    assert!(st.addon_enabled("dns"));
    assert!(!st.addon_enabled("metallb"));
    assert_eq!(st.addons.len(), 4);
    assert_eq!(st.addons[0].repository.as_deref(), Some("core"));
}

#[test]
fn yaml_status_of_a_single_node_is_not_ha_formed() {
    let st = parse_status_yaml(&fixture("status-single.yaml"))
        .unwrap()
        .unwrap();
    assert!(st.ha_enabled, "the lock is on by default");
    assert!(!st.ha_formed());
    assert_eq!(st.voters(), ["127.0.0.1:19001"]);
}

#[test]
fn pretty_status_matches_the_yaml_one() {
    let pretty = parse_status_pretty(&fixture("status-ha.pretty"))
        .unwrap()
        .unwrap();
    let yaml = parse_status_yaml(&fixture("status-ha.yaml"))
        .unwrap()
        .unwrap();
    assert_eq!(pretty.voters(), yaml.voters());
    assert_eq!(pretty.standby(), yaml.standby());
    assert!(pretty.addon_enabled("dns") && pretty.addon_enabled("ha-cluster"));
    assert!(!pretty.addon_enabled("metallb"));
    assert_eq!(pretty.addons.len(), 4);
    assert_eq!(
        parse_status_pretty("microk8s is not running, try microk8s start\n").unwrap(),
        None
    );
}

#[test]
fn status_edge_cases_by_exit_code() {
    assert_eq!(
        parse_status(Some(0), &fixture("status-not-running.txt"), "").unwrap(),
        Status::Stopped
    );
    assert_eq!(
        parse_status(Some(1), &fixture("status-worker.txt"), "").unwrap(),
        Status::WorkerNode
    );
    assert_eq!(
        parse_status(Some(1), &fixture("status-not-ready.yaml"), "").unwrap(),
        Status::NotReady
    );
    assert_eq!(
        parse_status_yaml(&fixture("status-not-ready.yaml")).unwrap(),
        None
    );
    assert!(matches!(
        parse_status(Some(0), &fixture("status-ha.yaml"), "").unwrap(),
        Status::Running(s) if s.ha_formed()
    ));
}

#[test]
fn garbage_status_is_an_error_not_a_panic() {
    assert!(parse_status_yaml("hello").is_err());
    assert!(parse_status(Some(0), "microk8s:\n  running: maybe\n", "").is_err());
    assert!(parse_status(Some(2), "", "boom").is_err());
    let bad_role = "microk8s:\n  running: True\nhigh-availability:\n  nodes:\n    - address: a\n      role: king\n";
    assert!(parse_status_yaml(bad_role).is_err());
}

#[test]
fn dqlite_cluster_json() {
    let m = parse_dqlite_cluster_json(&fixture("dqlite-cluster.json")).unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(m[0].id, 3297041220608546238);
    assert_eq!(m[0].address, "10.0.0.11:19001");
    assert_eq!(m[0].ip(), Some("10.0.0.11".parse::<IpAddr>().unwrap()));
    assert_eq!(m.iter().filter(|x| x.role == DqliteRole::Voter).count(), 3);
    assert_eq!(m[3].role, DqliteRole::Standby);
    assert!(parse_dqlite_cluster_json("[{\"ID\":1,\"Address\":\"x\",\"Role\":7}]").is_err());
    assert!(parse_dqlite_cluster_json("Error: no available dqlite leader server found").is_err());
}

#[test]
fn kubectl_nodes_json() {
    let n = parse_nodes_json(&fixture("kubectl-nodes.json")).unwrap();
    assert_eq!(n.len(), 2);
    assert_eq!(n[0].name, "rack-a");
    assert_eq!(n[0].role, NodeRole::ControlPlane);
    assert!(n[0].ready);
    assert_eq!(n[0].internal_ip, Some("10.0.0.11".parse().unwrap()));
    assert_eq!(n[1].role, NodeRole::Worker);
    assert!(!n[1].ready, "Unknown is not ready");
}

#[test]
fn join_rejection_lines() {
    assert_eq!(
        parse_join_rejection(&fixture("join-invalid-token.txt")),
        Some((500, "invalid token".into()))
    );
    assert_eq!(
        parse_join_rejection(&fixture("join-already-known.txt")),
        Some((
            500,
            "the joining node (10.0.0.12) is already known to dqlite".into()
        ))
    );
    assert_eq!(
        parse_join_rejection("Connection failed. (502)."),
        Some((502, String::new()))
    );
    assert_eq!(
        parse_join_rejection(&fixture("join-invalid-connection.txt")),
        None
    );
}

/// The fingerprint the agent puts in grants is what MicroK8s' `server_cert_check` computes
/// (`openssl x509 -in server.crt -outform der | sha256sum`, recorded beside the fixture by
/// that very command), and a damaged file is a clear error.
#[test]
fn cluster_agent_fingerprint_matches_openssl() {
    let pem = fixture("server.crt");
    let want = fixture("server.crt.sha256");
    assert_eq!(parse_cert_fingerprint(&pem).unwrap(), want.trim());
    for bad in [
        "",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        let e = parse_cert_fingerprint(bad).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
    }
}
