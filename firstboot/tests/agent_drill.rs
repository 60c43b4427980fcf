//! `imagebuilder drill` end to end (root; network namespaces; real `firstboot run` agents, real
//! keepalived and the MicroK8s simulator's API and MetalLB): three control-plane agents form
//! with a floating API address and MetalLB (the harness's range on the namespaces' network);
//! from a workstation host the drill finds the cluster over mDNS, reads the status documents,
//! fetches the kubeconfig, probes the API through the address once a second and the
//! simulator's demo LoadBalancer service (`--lb-url http://<first pool address>/`), and kills
//! the address holder with `--kill-with` (a script that SIGKILLs every process in that node's
//! namespace, agent, keepalived and simulated MicroK8s, and drops the addresses a dead
//! keepalived and a dead MetalLB speaker leave behind: a machine losing power).
//!
//! The LoadBalancer address must go down with the killed node for its RTO to mean anything, so
//! once the agents have enabled MetalLB the test moves the pool's start (`microk8s disable
//! metallb` and `enable metallb A-B` on a control-plane node, as a user would) to the first
//! address whose announcer under MetalLB's rule (the smallest `sha256(node#address)`, see
//! tests/microk8s-sim `src/daemon/metallb.rs`) is the API address's holder, and checks that
//! the holder answers there.
//!
//! The report must name the holder, measure the API's recovery through the address within
//! 15 s (keepalived moves it in 4.4-6.5 s), see quorum kept (2 of 3 voters), measure the
//! LoadBalancer's recovery (the next node in MetalLB's order takes the address once the
//! simulator counts the holder dead: 3 heartbeats of 1 s, then one more) within 30 s,
//! lose no write acknowledged before the kill, list the three nodes in the SPOF table and write
//! the Markdown, JSON and SVG files, the LoadBalancer's recovery in each.
//!
//! Bounded: formation 120 s, the address 60 s, MetalLB 60 s, the drill 150 s. Run with the
//! imagebuilder binary built: `cargo build -p imagebuilder && cargo test -p firstboot --test
//! agent_drill`.

mod agent_support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};
use rackseed_host::command::Cmd;
use sha2::{Digest, Sha256};

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 100);
const WS: usize = 0;
/// The harness's MetalLB range (`ClusterSpec::default`), IPv4 part.
const POOL_FIRST: u8 = 240;
const POOL_LAST: u8 = 250;

/// MetalLB's layer-2 announcer of `ip` among `nodes`: the smallest `sha256(node#ip)`.
fn announcer(nodes: &[String], ip: Ipv4Addr) -> String {
    nodes
        .iter()
        .min_by_key(|n| Sha256::digest(format!("{n}#{ip}").as_bytes()))
        .cloned()
        .expect("nodes")
}

/// `curl http://IP/` from the workstation host: the body, if it answered 200.
fn lb_answer(c: &AgentCluster, ip: Ipv4Addr) -> Option<String> {
    c.lab.host(WS).http_get(&format!("http://{ip}/"))
}

/// Runs node `i`'s `microk8s ARGS…` in its namespace.
fn microk8s(c: &AgentCluster, i: usize, args: &[&str]) -> rackseed_host::command::Output {
    let n = &c.nodes[i];
    Cmd::new("ip", Duration::from_secs(60))
        .args(["netns", "exec", &n.ns])
        .arg(n.dir.join("bin/microk8s"))
        .args(args)
        .output_blocking()
        .expect("running microk8s")
}

/// Waits until the LoadBalancer address answers from the workstation, naming `node`.
fn wait_lb(c: &AgentCluster, ip: Ipv4Addr, node: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = lb_answer(c, ip);
        if got
            .as_deref()
            .is_some_and(|b| b.trim_end().ends_with(&format!("answered by {node}")))
        {
            return;
        }
        if Instant::now() > deadline {
            c.dump();
            panic!("{ip} not answered by {node} within {timeout:?}: last answer {got:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

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
    // The simulator's default heartbeat (1 s): a node is dead after 3 s. With the harness's
    // 300 ms the LoadBalancer moved within ~1.2 s of the kill, which a probe's connection
    // bridges by its first SYN retransmission (1 s later): no probe round failed.
    let spec = ClusterSpec {
        heartbeat_ms: 1000,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::after_spare_hosts(1, 3, spec);
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

    // MetalLB: wait for the agents' enable, then start the pool where the holder announces.
    let names: Vec<String> = (0..3).map(|i| format!("node-{i}")).collect();
    let holder_name = &names[holder];
    let lb = (POOL_FIRST..=POOL_LAST)
        .map(|d| Ipv4Addr::new(10, 231, 0, d))
        .find(|ip| &announcer(&names, *ip) == holder_name)
        .expect("an address of the range that the holder announces");
    let deadline = Instant::now() + Duration::from_secs(60);
    while microk8s(&c, holder, &["status", "-a", "metallb"]).stdout != "enabled\n" {
        assert!(
            Instant::now() < deadline,
            "the agents did not enable metallb"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    if lb.octets()[3] != POOL_FIRST {
        for args in [
            vec!["disable".to_owned(), "metallb".to_owned()],
            vec![
                "enable".to_owned(),
                "metallb".to_owned(),
                format!("{lb}-10.231.0.{POOL_LAST}"),
            ],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = microk8s(&c, holder, &args);
            assert_eq!(
                out.code(),
                Some(0),
                "{args:?}: {}{}",
                out.stdout,
                out.stderr
            );
        }
    }
    wait_lb(&c, lb, holder_name, Duration::from_secs(60));
    let lb_url = format!("http://{lb}/");

    // The killer: every process of the node's namespace (again while short-lived ones such as
    // keepalived's health-check curl come and go: one gone before its kill failed a run), then
    // the addresses it held (keepalived's and MetalLB's: a dead machine answers for neither).
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
         ip -n \"$ns\" addr del {lb}/32 dev eth0 2>/dev/null || true\n\
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
        .args(["--lb-url", &lb_url])
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
    let lbm = &r["rto_loadbalancer"];
    assert_eq!(lbm["state"], "recovered", "{lbm}");
    let lb_secs = lbm["seconds"].as_f64().unwrap();
    assert!(
        lb_secs > 0.0 && lb_secs < 30.0,
        "LoadBalancer RTO {lb_secs} s (the simulator moves it 3-4 s after the kill: 3 missed 1 s heartbeats)"
    );
    // The next in MetalLB's order answers there now.
    let survivors: Vec<String> = names
        .iter()
        .filter(|n| *n != holder_name)
        .cloned()
        .collect();
    wait_lb(&c, lb, &announcer(&survivors, lb), Duration::from_secs(10));
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
    assert!(svg.contains("LoadBalancer back"), "{svg}");
    let md = std::fs::read_to_string(out_dir.join(format!("drill-{run}.md"))).unwrap();
    let lb_row = md
        .lines()
        .find(|l| l.starts_with("| RTO, LoadBalancer |"))
        .unwrap_or_else(|| panic!("no LoadBalancer row:\n{md}"));
    assert!(
        lb_row.contains(&format!("{lb_secs:.1}")),
        "{lb_row} (JSON: {lb_secs})"
    );
    let json_file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join(format!("drill-{run}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(json_file["rto_loadbalancer"], *lbm);
    println!(
        "drill figures: API RTO {secs:.1} s, LoadBalancer RTO {lb_secs:.1} s ({lb} from {holder_name}), quorum {}, writes acknowledged before the kill {} (lost {})",
        q["state"],
        rpo["acked_before_kill"],
        rpo["missing_before_kill"].as_array().unwrap().len()
    );
}
