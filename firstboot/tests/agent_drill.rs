//! `imagebuilder drill` end to end (root; network namespaces; real `firstboot run` agents, real
//! keepalived and the MicroK8s simulator's API): three control-plane agents form with a
//! floating API address; from a workstation host the drill finds the cluster over mDNS, reads
//! the status documents, fetches the kubeconfig, probes the API through the address once a
//! second, and kills the address holder with `--kill-with` (a script that SIGKILLs every
//! process in that node's namespace, agent, keepalived and simulated MicroK8s, and drops the
//! address a dead keepalived leaves behind: a machine losing power). The report must name the
//! holder, measure the API's recovery through the address within 15 s (keepalived moves it in
//! 4.4-6.5 s), see quorum kept (2 of 3 voters), lose no write acknowledged before the kill,
//! say the LoadBalancer was not measured (the simulator has no MetalLB), list the three nodes
//! in the SPOF table and write the Markdown, JSON and SVG files.
//!
//! Bounded: formation 120 s, the address 60 s, the drill 150 s. Run with the imagebuilder
//! binary built: `cargo build -p imagebuilder && cargo test -p firstboot --test agent_drill`.

mod agent_support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 100);
const WS: usize = 0;

fn one_holder(c: &AgentCluster, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        if let [h] = c.address_holders(ADDRESS)[..] {
            if c.api_ready_via(WS, ADDRESS) {
                return h;
            }
        }
        if Instant::now() > deadline {
            c.dump();
            panic!("no single holder of {ADDRESS} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_drill_kills_the_address_holder_and_measures_rto_and_rpo() {
    let mut c = AgentCluster::after_spare_hosts(1, 3, ClusterSpec::default());
    let _guard = c.keepalived_guard();
    c.set_api_address(&ADDRESS.to_string());
    for i in 0..3 {
        c.start_with_keepalived(i);
    }
    let docs = c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    let holder = one_holder(&c, Duration::from_secs(60));
    let holder_id = docs
        .iter()
        .find(|d| d.address.as_deref() == Some(&c.nodes[holder].addr.to_string()))
        .map(|d| d.node_id.clone())
        .unwrap_or_else(|| panic!("no status document for node {holder}"));

    // The killer: every process of the node's namespace (again while short-lived ones such as
    // keepalived's health-check curl come and go: one gone before its kill failed a run), then
    // the address it held.
    let mut script = String::from("#!/bin/sh\nset -e\ncase \"$2\" in\n");
    for n in &c.nodes {
        script.push_str(&format!("{addr}) ns={ns} ;;\n", addr = n.addr, ns = n.ns));
    }
    script.push_str(&format!(
        "*) echo \"unknown node $1 $2\" >&2; exit 1 ;;\nesac\n\
         for _ in 1 2 3 4 5 6 7 8 9 10; do\n\
           pids=$(ip netns pids \"$ns\"); [ -z \"$pids\" ] && break\n\
           kill -9 $pids 2>/dev/null || true; sleep 0.2\n\
         done\n\
         [ -z \"$(ip netns pids \"$ns\")\" ] || {{ echo \"$ns still has processes\" >&2; exit 1; }}\n\
         ip -n \"$ns\" addr del {ADDRESS}/24 dev eth0 2>/dev/null || true\n\
         echo \"$1 $2\" >> '{log}'\n",
        log = c.dir.path().join("killed.log").display()
    ));
    let killer = c.dir.path().join("kill-node");
    std::fs::write(&killer, script).unwrap();
    std::fs::set_permissions(&killer, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out_dir = c.dir.path().join("reports");
    let bin = agent_support::imagebuilder_bin();
    let config = c.dir.path().join("cluster.toml");
    let started = Instant::now();
    let out = c
        .lab
        .host(WS)
        .cmd(&bin.to_string_lossy(), Duration::from_secs(150))
        .args(["drill", "--config"])
        .arg(&config)
        .args(["--kill", "api-holder", "--kill-with"])
        .arg(&killer)
        .args(["--yes", "--json", "--max-rto", "30", "--baseline", "3s"])
        .args(["--timeout", "60s", "--discover", "10s", "--out"])
        .arg(&out_dir)
        .output_blocking()
        .expect("running imagebuilder drill");
    eprintln!(
        "drill took {:?}; stderr:\n{}",
        started.elapsed(),
        out.stderr
    );
    if out.code() != Some(0) {
        c.dump();
        panic!(
            "drill exited {:?}:\n{}\n{}",
            out.code(),
            out.stdout,
            out.stderr
        );
    }
    let r: serde_json::Value = serde_json::from_str(&out.stdout).expect("the JSON report");
    let killed = std::fs::read_to_string(c.dir.path().join("killed.log")).unwrap();
    assert_eq!(
        killed.trim(),
        format!("{holder_id} {}", c.nodes[holder].addr),
        "the holder, and only it, was killed"
    );
    assert_eq!(r["target"]["node_id"], holder_id.as_str());
    assert_eq!(r["target"]["api_address"], true);
    let rto = &r["rto_api"];
    assert_eq!(rto["state"], "recovered", "{rto}");
    let secs = rto["seconds"].as_f64().unwrap();
    assert!(
        (2.0..=15.0).contains(&secs),
        "API RTO {secs} s (keepalived moves the address in 4.4-6.5 s)"
    );
    let q = &r["rto_quorum"];
    match q["state"].as_str() {
        Some("no-outage") => {}
        Some("recovered") => assert!(q["seconds"].as_f64().unwrap() <= 5.0, "{q}"),
        other => panic!("quorum: {other:?} {q}"),
    }
    assert_eq!(r["rto_loadbalancer"]["state"], "not-measured");
    let rpo = &r["rpo"];
    assert_eq!(rpo["checked"], true, "{rpo}");
    assert!(rpo["acked_before_kill"].as_u64().unwrap() >= 2, "{rpo}");
    assert_eq!(
        rpo["missing_before_kill"].as_array().unwrap().len(),
        0,
        "{rpo}"
    );
    assert!(rpo["newest_backup_age_s"].is_null() || rpo["newest_backup_age_s"].is_u64());
    let spof = r["spof"].as_array().unwrap();
    assert_eq!(spof.len(), 3, "{spof:?}");
    assert!(spof.iter().all(|row| row["role"] == "voter"), "{spof:?}");
    let run = r["run_id"].as_str().unwrap();
    for ext in ["md", "json", "svg"] {
        let p = out_dir.join(format!("drill-{run}.{ext}"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!text.is_empty());
    }
    let svg = std::fs::read_to_string(out_dir.join(format!("drill-{run}.svg"))).unwrap();
    assert!(svg.contains("<svg") && svg.contains("API back"), "{svg}");
    println!(
        "drill figures: API RTO {secs:.1} s, quorum {}, writes acknowledged before the kill {} (lost {})",
        q["state"],
        rpo["acked_before_kill"],
        rpo["missing_before_kill"].as_array().unwrap().len()
    );
}
