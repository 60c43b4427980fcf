//! Standbys with the floating API address: five machines with the default `cluster.standbys`
//! all join as full members (MicroK8s: 3 voters, 2 standbys); keepalived runs on all five.
//! The voter holding the address dies: MicroK8s (the simulator, as the reference facts
//! describe) promotes a standby, so the survivors are back at 3 voters, and the address is
//! held by one survivor and answers. Needs root.

mod agent_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 100);
const CLIENT: usize = 0;

#[test]
fn a_dead_voter_is_replaced_by_a_standby_and_the_address_lives_on() {
    let spec = ClusterSpec {
        expected_nodes: 5,
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::after_spare_hosts(1, 5, spec);
    c.set_api_address(&ADDRESS.to_string());
    c.use_default_standbys();
    for i in 0..5 {
        c.start_with_keepalived(i);
    }
    let _keepalived = c.keepalived_guard();
    let all: Vec<usize> = (0..5).collect();
    let docs = c.wait_formed(&all, 3, Duration::from_secs(180));
    for d in &docs {
        assert_eq!(d.role.as_deref(), Some("control-plane"), "{}", d.node_id);
    }
    // MicroK8s' own view: 3 voters and 2 standbys, the same on every node.
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let v = c.status(0).and_then(|d| d.microk8s);
        if v.as_ref()
            .is_some_and(|m| m.voters.len() == 3 && m.standby.len() == 2)
        {
            break v.unwrap();
        }
        assert!(Instant::now() < deadline, "no 3 voters + 2 standbys: {v:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let is_voter =
        |i: usize, voters: &[String]| voters.contains(&format!("{}:19001", c.nodes[i].addr));
    // The address settles on one node; every node's keepalived has the four others as peers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        if let [h] = c.address_holders(ADDRESS)[..] {
            if c.api_ready_via(CLIENT, ADDRESS) {
                break h;
            }
        }
        assert!(Instant::now() < deadline, "no single holder");
        std::thread::sleep(Duration::from_millis(200));
    };
    for i in 0..5 {
        let peers = c
            .status(i)
            .and_then(|d| d.api_address)
            .map(|a| a.peers.len());
        assert_eq!(peers, Some(4), "node-{i}");
    }
    // A voter dies: the holder if it is one, else the first voter (then the holder stays).
    let victim = if is_voter(holder, &view.voters) {
        holder
    } else {
        (0..5).find(|&i| is_voter(i, &view.voters)).unwrap()
    };
    c.power_off(victim, victim + 1, ADDRESS);
    let survivors: Vec<usize> = (0..5).filter(|&i| i != victim).collect();
    let gone = format!("{}:19001", c.nodes[victim].addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views: Vec<_> = survivors
            .iter()
            .map(|&i| c.status(i).and_then(|d| d.microk8s))
            .collect();
        let healed = views.iter().all(|v| {
            v.as_ref()
                .is_some_and(|m| m.voters.len() == 3 && !m.voters.contains(&gone))
        });
        let holders = c.address_holders(ADDRESS);
        if healed
            && holders.len() == 1
            && survivors.contains(&holders[0])
            && c.api_ready_via(CLIENT, ADDRESS)
        {
            break;
        }
        if Instant::now() > deadline {
            c.dump();
            panic!("not healed after node-{victim} died: {views:?}, holders {holders:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
