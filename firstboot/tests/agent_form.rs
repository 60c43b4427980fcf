//! Host-level agent tests (root; network namespaces; the MicroK8s simulator): real `firstboot
//! run` processes form clusters, survive crashes and partitions, and ignore strangers.

mod agent_support;

use std::collections::BTreeSet;
use std::time::Duration;

use agent_support::{argv, check_command_log, AgentCluster, ClusterSpec};

fn enables(records: &[serde_json::Value]) -> Vec<(String, String, i64)> {
    let mut starts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for r in records {
        let argv = argv(r);
        if r["program"] != "microk8s" || argv.first().map(String::as_str) != Some("enable") {
            continue;
        }
        let key = (r["node"].to_string(), r["pid"].to_string());
        match r["event"].as_str() {
            Some("start") => {
                starts.insert(key, argv.get(1).cloned().unwrap_or_default());
            }
            Some("end") => {
                if let Some(addon) = starts.remove(&key) {
                    out.push((
                        r["node"].as_str().unwrap_or_default().to_owned(),
                        addon,
                        r["exit"].as_i64().unwrap_or(-1),
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn three_nodes_form_one_ha_cluster_and_enable_addons_once() {
    let mut c = AgentCluster::new(3, ClusterSpec::default());
    c.start_all();
    let docs = c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    let formed_at = c.elapsed();
    let clusters: BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "one cluster: {clusters:?}");
    for d in &docs {
        assert_eq!(d.members.len(), 3, "{d:?}");
        assert_eq!(d.role.as_deref(), Some("control-plane"));
        assert!(d.microk8s.as_ref().unwrap().ha);
    }
    // Every node agrees on the member list.
    let members: BTreeSet<_> = docs.iter().map(|d| format!("{:?}", d.members)).collect();
    assert_eq!(members.len(), 1, "{members:?}");
    // Addons: enabled once each, on one control-plane node, after HA.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = (0..3)
            .filter_map(|i| c.status(i))
            .any(|d| !d.addons.is_empty() && d.addons.iter().all(|a| a.state == "enabled"));
        if done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "addons not enabled");
        std::thread::sleep(Duration::from_millis(500));
    }
    let records = c.commands();
    check_command_log(&records).unwrap();
    let en = enables(&records);
    let ok: Vec<_> = en.iter().filter(|(_, _, code)| *code == 0).collect();
    let names: Vec<&str> = ok.iter().map(|(_, a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        vec!["dns", "metallb"],
        "each addon enabled once: {en:?}"
    );
    let nodes: BTreeSet<_> = ok.iter().map(|(n, _, _)| n.clone()).collect();
    assert_eq!(nodes.len(), 1, "from one node: {en:?}");
    println!("3-node formation: HA after {formed_at:.1} s");
}

#[test]
fn five_nodes_give_three_control_plane_and_two_workers_and_a_sixth_joins_later() {
    let spec = ClusterSpec {
        expected_nodes: 5,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(6, spec);
    for i in 0..5 {
        c.start(i);
    }
    let docs = c.wait_formed(&[0, 1, 2, 3, 4], 3, Duration::from_secs(180));
    let roles: Vec<_> = docs.iter().map(|d| d.role.clone().unwrap()).collect();
    assert_eq!(
        roles.iter().filter(|r| *r == "control-plane").count(),
        3,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| *r == "worker").count(),
        2,
        "{roles:?}"
    );
    c.start(5);
    let late = c.wait_formed(&[5], 3, Duration::from_secs(120));
    assert_eq!(late[0].role.as_deref(), Some("worker"));
    assert_eq!(
        late[0].cluster, docs[0].cluster,
        "the late node joined the same cluster"
    );
    check_command_log(&c.commands()).unwrap();
}

#[test]
fn a_node_cut_off_during_the_election_does_not_form_its_own_and_joins_after() {
    // The two connected nodes form once the formation timeout passes with a majority visible.
    let spec = ClusterSpec {
        formation_timeout: "15s",
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(3, spec);
    c.lab.disconnect(2).unwrap();
    c.start_all();
    let docs = c.wait_formed(&[0, 1], 2, Duration::from_secs(120));
    assert_eq!(docs[0].cluster, docs[1].cluster);
    // The cut-off node never became a member of anything while alone.
    let alone = c.status(2).expect("node 2 answers locally");
    assert_ne!(alone.phase, "member", "{alone:?}");
    assert!(alone.cluster.is_none() || alone.cluster == docs[0].cluster);
    c.lab.reconnect(2).unwrap();
    let all = c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    let clusters: BTreeSet<_> = all.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    check_command_log(&c.commands()).unwrap();
}

#[test]
fn a_node_with_the_wrong_secret_changes_nothing() {
    let mut c = AgentCluster::new(4, ClusterSpec::default());
    // Node 3 runs with another secret: rewrite its view of the config.
    let stranger_dir = c.dir.path().join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    firstboot::secret::ClusterSecret::from_bytes([9; 32])
        .write_new(&stranger_dir.join("cluster.secret"))
        .unwrap();
    let text = std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap();
    std::fs::write(stranger_dir.join("cluster.toml"), text).unwrap();
    c.start(0);
    c.start(1);
    c.start(2);
    c.start_with_config(3, &stranger_dir.join("cluster.toml"));
    let docs = c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    for d in &docs {
        assert!(
            d.peers
                .iter()
                .all(|p| p.address != c.nodes[3].addr.to_string()),
            "the stranger must not be a peer: {:?}",
            d.peers
        );
        assert_eq!(d.members.len(), 3);
    }
    let records = c.commands();
    assert!(
        !records
            .iter()
            .any(|r| r["node"] == "node-3" && r["argv"][0] == "join"),
        "the stranger never joined"
    );
}

/// A small deterministic generator (seed printed, so a failing run can be replayed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

#[test]
fn agents_killed_at_random_moments_resume_and_converge_to_one_cluster() {
    let seed = std::env::var("RACKSEED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test seed {seed} (RACKSEED_CRASH_SEED={seed} replays it)");
    let mut rng = Lcg(seed);
    let spec = ClusterSpec {
        expected_nodes: 5,
        join_delay_ms: 800,
        join_timeout_s: 10,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(5, spec);
    c.start_all();
    const KILLS: usize = 24;
    let mut phases_hit = BTreeSet::new();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.next(1500)));
        let victim = rng.next(5) as usize;
        let phase = c
            .status(victim)
            .map(|d| d.phase)
            .unwrap_or_else(|| "down".into());
        phases_hit.insert(phase.clone());
        assert!(c.kill_agent(victim), "node {victim} was running");
        println!("kill {k}: node {victim} in phase {phase}");
        std::thread::sleep(Duration::from_millis(rng.next(500)));
        c.start(victim);
    }
    let docs = c.wait_formed(&[0, 1, 2, 3, 4], 3, Duration::from_secs(240));
    let clusters: BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "one cluster: {clusters:?}");
    let cp = docs
        .iter()
        .filter(|d| d.role.as_deref() == Some("control-plane"))
        .count();
    assert_eq!(
        cp,
        3,
        "three control-plane nodes: {:?}",
        docs.iter().map(|d| &d.role).collect::<Vec<_>>()
    );
    check_command_log(&c.commands()).unwrap();
    println!("phases at the kills: {phases_hit:?}");
}
