//! The floating API address with real keepalived processes (one per node's network
//! namespace, started by the agents) and the MicroK8s simulator's API endpoint: held by exactly
//! one control-plane node, answered through from another lab host, moved when its holder dies,
//! never held by a partitioned minority while the majority holds it, and kept by one VRRP group
//! through a secret rotation and a member's restart. Needs root.

mod agent_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};
use rackseed_protocol::coordinator::{CoordinatorClient, RotationStep};
use rackseed_protocol::secret::ClusterSecret;

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 100);
/// Lab host 0 is the client (a workstation); node `i` is on lab host `i + 1`.
const CLIENT: usize = 0;

/// Three control-plane agents with keepalived, formed, the address held by one of them and
/// answering. Returns the cluster (node index = agent) and the holder.
fn formed_cluster() -> (AgentCluster, usize) {
    let mut c = AgentCluster::after_spare_hosts(1, 3, ClusterSpec::default());
    c.set_api_address(&ADDRESS.to_string());
    for i in 0..3 {
        c.start_with_keepalived(i);
    }
    c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    let holder = wait_for_one_holder(&c, &[0, 1, 2], Duration::from_secs(60));
    (c, holder)
}

/// Waits until exactly one of `candidates` holds the address (and no other node does) and
/// the API answers through it; returns the holder.
fn wait_for_one_holder(c: &AgentCluster, candidates: &[usize], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let holders = c.address_holders(ADDRESS);
        if let [h] = holders[..] {
            if candidates.contains(&h) && c.api_ready_via(CLIENT, ADDRESS) {
                return h;
            }
        }
        if Instant::now() > deadline {
            c.dump();
            for i in 0..c.nodes.len() {
                let log = std::fs::read_to_string(c.keepalived_dir(i).join("keepalived.log"))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("---- node-{i} keepalived.log (tail)");
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("{l}");
                }
            }
            panic!("no single holder among {candidates:?} within {timeout:?}: holders {holders:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_address_is_held_by_one_node_and_moves_when_it_dies() {
    let (mut c, holder) = formed_cluster();
    let _keepalived = c.keepalived_guard();

    // Every member's document says who holds it; the configuration is private and names the
    // two other members as unicast peers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let docs: Vec<_> = (0..3).map(|i| c.status(i)).collect();
        let views: Vec<_> = docs
            .iter()
            .map(|d| d.as_ref().and_then(|d| d.api_address.clone()))
            .collect();
        let settled = views.iter().enumerate().all(|(i, v)| {
            v.as_ref().is_some_and(|v| {
                v.address.as_deref() == Some("10.231.0.100")
                    && v.held_here == (i == holder)
                    && v.peers.len() == 2
                    && v.problem.is_none()
            })
        });
        if settled {
            assert!(views[holder].as_ref().unwrap().state.starts_with("holding"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never settled: {views:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for i in 0..3 {
        use std::os::unix::fs::PermissionsExt;
        let conf = c.nodes[i].dir.join("root/etc/keepalived/keepalived.conf");
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} must not be world-readable", conf.display());
        let text = std::fs::read_to_string(&conf).unwrap();
        for j in (0..3).filter(|&j| j != i) {
            assert!(
                text.contains(&format!("        {}\n", c.nodes[j].addr)),
                "{text}"
            );
        }
        assert!(text.contains(&format!("unicast_src_ip {}", c.nodes[i].addr)));
    }

    // The holder dies: another node takes the address and the API answers through it.
    let t = Instant::now();
    c.power_off(holder, holder + 1, ADDRESS);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    let next = wait_for_one_holder(&c, &survivors, Duration::from_secs(30));
    let took = t.elapsed();
    eprintln!("address moved from node-{holder} to node-{next} in {took:.1?}");
    // Nothing holds it twice for the next few seconds.
    for _ in 0..10 {
        assert_eq!(c.address_holders(ADDRESS), vec![next]);
        std::thread::sleep(Duration::from_millis(300));
    }

    // The dead node comes back: it stands by (nopreempt), the address stays where it is.
    c.power_on(holder, holder + 1);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let back = c.status(holder).and_then(|d| d.api_address);
        if back
            .as_ref()
            .is_some_and(|v| v.state.starts_with("standing by"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-{holder} never stood by again: {back:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for _ in 0..10 {
        assert_eq!(c.address_holders(ADDRESS), vec![next]);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(c.api_ready_via(CLIENT, ADDRESS));
}

#[test]
fn a_partitioned_minority_never_holds_the_address_while_the_majority_does() {
    let (c, holder) = formed_cluster();
    let _keepalived = c.keepalived_guard();
    let majority: Vec<usize> = (0..3).filter(|&i| i != holder).collect();

    // The holder is cut off from the two others (links stay up; it still hears nothing).
    c.partition(holder, &majority, true);
    let mut samples = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        let holders = c.address_holders(ADDRESS);
        let both = holders.contains(&holder) && holders.iter().any(|h| majority.contains(h));
        assert!(
            !both,
            "the minority node-{holder} and the majority held the address at once after {:.1?}: {holders:?}",
            t.elapsed()
        );
        samples.push((t.elapsed(), holders));
        std::thread::sleep(Duration::from_millis(100));
    }
    let released = samples
        .iter()
        .find(|(_, h)| !h.contains(&holder))
        .map(|(at, _)| *at);
    let claimed = samples
        .iter()
        .find(|(_, h)| h.iter().any(|x| majority.contains(x)))
        .map(|(at, _)| *at);
    eprintln!("minority released at {released:.1?}, majority claimed at {claimed:.1?}");
    let next = wait_for_one_holder(&c, &majority, Duration::from_secs(5));
    let doc = c.status(holder).and_then(|d| d.api_address).unwrap();
    assert!(!doc.held_here, "{doc:?}");

    // Healed: the address stays with the majority's node; never two holders meanwhile.
    c.partition(holder, &majority, false);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        assert_eq!(c.address_holders(ADDRESS), vec![next], "after healing");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.api_ready_via(CLIENT, ADDRESS));
}

#[test]
fn an_auto_address_is_chosen_outside_metallb_and_agreed_on_by_every_node() {
    let mut c = AgentCluster::after_spare_hosts(1, 3, ClusterSpec::default());
    c.set_api_address("auto");
    for i in 0..3 {
        c.start_with_keepalived(i);
    }
    let _keepalived = c.keepalived_guard();
    c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    // The lab is 10.231.0.0/24 with MetalLB on .240-.250 (the harness's config): the first
    // free address from the top, above every node, outside MetalLB's block is .254.
    let chosen = Ipv4Addr::new(10, 231, 0, 254);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addrs: Vec<Option<String>> = (0..3)
            .map(|i| {
                c.status(i)
                    .and_then(|d| d.api_address)
                    .and_then(|a| a.address)
            })
            .collect();
        let holders = c.address_holders(chosen);
        if addrs.iter().all(|a| a.as_deref() == Some("10.231.0.254"))
            && holders.len() == 1
            && c.api_ready_via(CLIENT, chosen)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto address not agreed on and held: {addrs:?}, holders {holders:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every node persisted the same choice: made there (nodes that became members at the
    // same moment each choose, deterministically the same) or adopted from a peer's document.
    for i in 0..3 {
        let text = std::fs::read_to_string(c.nodes[i].dir.join("state/api-address.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["address"], "10.231.0.254");
        let how = v["how"].as_str().unwrap();
        assert!(how == "chosen" || how.starts_with("adopted from "), "{how}");
    }
}

/// Node `i`'s keepalived `virtual_router_id` and `auth_pass` lines (what one VRRP group shares).
fn vrrp_group(c: &AgentCluster, i: usize) -> Option<(String, String)> {
    let text =
        std::fs::read_to_string(c.nodes[i].dir.join("root/etc/keepalived/keepalived.conf")).ok()?;
    let line = |key: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(key))
            .map(str::to_string)
    };
    Some((line("virtual_router_id ")?, line("auth_pass ")?))
}

/// Rotates the three nodes from `old` to `new` as `imagebuilder secret rotate` does (stage,
/// commit, finish, each step on every node before the next), from the client's lab host.
fn rotate_all(c: &AgentCluster, old: &ClusterSecret, new: &ClusterSecret) {
    let targets: Vec<(std::net::SocketAddr, String)> = (0..3)
        .map(|i| {
            let fp = rackseed_protocol::coordinator::identity::read_fingerprint(
                &c.nodes[i].dir.join("state"),
            )
            .unwrap();
            (std::net::SocketAddr::from((c.nodes[i].addr, 7443)), fp)
        })
        .collect();
    let (old, new) = (old.clone(), new.clone());
    c.lab
        .host(CLIENT)
        .spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let with_old = CoordinatorClient::new(&old, "imagebuilder")
                    .with_timeout(Duration::from_secs(10));
                let with_new = CoordinatorClient::new(&new, "imagebuilder")
                    .with_timeout(Duration::from_secs(10));
                let hex = new.to_file_contents().trim().to_string();
                let steps = [
                    (
                        RotationStep::Stage {
                            secret: hex.clone(),
                        },
                        &with_old,
                    ),
                    (RotationStep::Commit { secret: hex }, &with_new),
                    (
                        RotationStep::Finish {
                            tag: new.cluster_tag(),
                        },
                        &with_new,
                    ),
                ];
                for (step, client) in &steps {
                    for (addr, fp) in &targets {
                        client
                            .rotate(*addr, fp, step)
                            .await
                            .map_err(|e| anyhow::anyhow!("{} on {addr}: {e}", step.name()))?;
                    }
                }
                Ok(())
            })
        })
        .join()
        .expect("rotation thread")
        .expect("rotating the secret");
}

#[test]
fn after_a_secret_rotation_and_a_restart_the_members_stay_one_vrrp_group() {
    let (mut c, holder) = formed_cluster();
    let _keepalived = c.keepalived_guard();
    let before = vrrp_group(&c, holder).expect("the holder's keepalived.conf");
    let old = c.spec.secret.clone();
    let new = ClusterSecret::from_bytes([8; 32]);
    rotate_all(&c, &old, &new);
    // A member reboots: its agent starts on the new secret (its secret file), its keepalived
    // keeps running as under systemd.
    let restarted = (0..3).find(|&i| i != holder).unwrap();
    c.stop_agent(restarted);
    c.start_with_keepalived(restarted);
    // Every member's keepalived follows the secret it signs with now: one group, the new one.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let groups: Vec<_> = (0..3).map(|i| vrrp_group(&c, i)).collect();
        if groups.iter().all(|g| g.is_some() && *g == groups[0])
            && groups[0] != Some(before.clone())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the members' VRRP router ids and passwords differ after the rotation (two groups \
             would each claim the address): before {before:?}, now {groups:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Settled: one holder, answering, and never two at once afterwards (the address may still
    // move once on a loaded machine, as after any reload; a second group would claim it).
    wait_for_one_holder(&c, &[0, 1, 2], Duration::from_secs(30));
    let mut seen = Vec::new();
    for _ in 0..20 {
        let holders = c.address_holders(ADDRESS);
        seen.push(holders.clone());
        assert!(
            holders.len() <= 1,
            "two holders after the rotation: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for_one_holder(&c, &[0, 1, 2], Duration::from_secs(30));
}
