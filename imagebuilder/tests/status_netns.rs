//! `imagebuilder status` against three stand-in nodes (real coordinators and real mDNS
//! discovery, hand-made status documents and announcements), each in its own network
//! namespace, with the workstation in a fourth (netns-lab). Needs root; fails loudly without.
//!
//! Shows: a snapshot names every node with its address, phase and role and says what the
//! cluster waits for; `--wait` keeps waiting while the cluster forms and returns once it
//! settled, with the JSON report; `--wait` gives up at `--timeout` with exit status 1; a
//! workstation holding another cluster's secret sees no node.

mod status_support;

use std::time::{Duration, Instant};

use netns_lab::Lab;
use rackseed_config::Role::ControlPlane;
use rackseed_formation::PhaseSummary::{Joining, Member};
use rackseed_protocol::status::AddonRow;
use status_support::{doc, member_doc, spawn, Kubeconfig, CP};

const RUN: Duration = Duration::from_secs(90);

#[test]
fn status_reports_and_waits_for_the_cluster_to_form() {
    let lab = Lab::new(4).expect("creating the network lab (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let (secret, secret_path) = status_support::secret_file(dir.path(), "cluster.secret");
    let (_, other_path) = status_support::secret_file(dir.path(), "other.secret");
    let sp = secret_path.to_str().unwrap();
    let ips: Vec<_> = (0..3).map(|i| lab.host(i).addr).collect();
    let ws = lab.host(3).clone();

    // Two control-plane members so far; node-c is joining.
    let two = [("node-a", CP), ("node-b", CP)];
    let mut nodes = vec![
        spawn(
            lab.host(0),
            "node-a",
            &secret,
            member_doc("node-a", ips[0], CP, &two, &ips[..2]),
            Member,
            Some(ControlPlane),
            Kubeconfig::None,
        )
        .unwrap(),
        spawn(
            lab.host(1),
            "node-b",
            &secret,
            member_doc("node-b", ips[1], CP, &two, &ips[..2]),
            Member,
            Some(ControlPlane),
            Kubeconfig::None,
        )
        .unwrap(),
        spawn(
            lab.host(2),
            "node-c",
            &secret,
            doc("node-c", ips[2], "joining", Some(CP)),
            Joining,
            Some(ControlPlane),
            Kubeconfig::None,
        )
        .unwrap(),
    ];

    // A snapshot as JSON.
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "status",
            "--secret",
            sp,
            "--json",
            "--expect-nodes",
            "3",
            "--discover",
            "20s",
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout));
    assert_eq!(
        report["summary"], "not formed: 2 of 3 control-plane members; waiting for node-c (joining)",
        "{report:#}"
    );
    assert_eq!(report["formed"], false);
    assert_eq!(report["settled"], false);
    let rows = report["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{report:#}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["node_id"], format!("node-{}", ["a", "b", "c"][i]));
        assert_eq!(row["address"], ips[i].to_string(), "{row:#}");
        assert!(row["error"].is_null(), "{row:#}");
        assert_eq!(
            row["status"]["hostname"],
            format!("rack-{}", row["node_id"].as_str().unwrap())
        );
    }
    assert_eq!(rows[2]["status"]["phase"], "joining");
    assert_eq!(rows[2]["announced"]["phase"], "joining");

    // The same as a table (stdout is not a terminal: printed once, no escape sequences), this
    // time naming the cluster by its config: its default `secret-file` is `cluster.secret`
    // beside it, and its `expected-nodes` (3) ends the discovery window early.
    let config = dir.path().join("lab.toml");
    std::fs::write(
        &config,
        "[cluster]\nname = \"lab\"\n\n[image]\ntarget = \"rpi5\"\n\
         base = { kind = \"local\", path = \"base.img.xz\" }\n",
    )
    .unwrap();
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "status",
            "--config",
            config.to_str().unwrap(),
            "--discover",
            "20s",
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("LAST ERROR"),
        "{}",
        out.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("node-c")
            && l.contains(&ips[2].to_string())
            && l.contains("joining")
            && l.contains(CP)),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains('\x1b'), "{:?}", out.stdout);
    assert_eq!(
        *lines.last().unwrap(),
        "not formed: 2 of 3 control-plane members; waiting for node-c (joining)"
    );

    // --wait gives up at its timeout while the cluster is not formed.
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "status",
            "--secret",
            sp,
            "--json",
            "--wait",
            "--timeout",
            "4s",
            "--expect-nodes",
            "3",
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("did not settle within 4s: not formed: 2 of 3"),
        "{}",
        out.stderr
    );
    let last: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(last["settled"], false);

    // --wait while the cluster forms.
    let waiter_host = ws.clone();
    let sp_owned = sp.to_string();
    let started = Instant::now();
    let waiter = std::thread::spawn(move || {
        status_support::imagebuilder_in(
            &waiter_host,
            &[
                "status",
                "--secret",
                &sp_owned,
                "--json",
                "--wait",
                "--timeout",
                "60s",
                "--expect-nodes",
                "3",
            ],
            RUN,
        )
    });
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !waiter.is_finished(),
        "--wait returned before the cluster formed"
    );
    let three = [("node-a", CP), ("node-b", CP), ("node-c", CP)];
    let mut a = member_doc("node-a", ips[0], CP, &three, &ips);
    a.addons = vec![AddonRow {
        name: "metallb".into(),
        state: "enabled".into(),
        reason: None,
    }];
    nodes[0].set_status(a);
    nodes[1].set_status(member_doc("node-b", ips[1], CP, &three, &ips));
    nodes[2].set_status(member_doc("node-c", ips[2], CP, &three, &ips));
    nodes[2].announce(Member, Some(ControlPlane));
    let out = waiter.join().unwrap().unwrap();
    let waited = started.elapsed();
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--json --wait prints one JSON document ({e}):\n{}",
            out.stdout
        )
    });
    assert_eq!(
        report["summary"], "HA formed: 3 voters, no workers; metallb enabled",
        "{report:#}"
    );
    assert_eq!(report["formed"], true);
    assert_eq!(report["settled"], true);
    assert!(waited >= Duration::from_secs(5));
    println!(
        "--wait noticed the formed cluster {:?} after the change",
        waited - Duration::from_secs(5)
    );

    // Another cluster's secret: nothing of this cluster is seen.
    let out = status_support::imagebuilder_in(
        &ws,
        &[
            "status",
            "--secret",
            other_path.to_str().unwrap(),
            "--json",
            "--discover",
            "3s",
        ],
        RUN,
    )
    .unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["nodes"].as_array().unwrap().len(), 0, "{report:#}");
    assert_eq!(
        report["summary"],
        "not formed: no nodes of this cluster found"
    );
    assert!(
        report["ignored_announcements"].as_u64().unwrap() >= 1,
        "{report:#}"
    );

    for n in &mut nodes {
        n.stop().unwrap();
    }
}
