//! Benchmark (run by `scripts/bench-failover`, ignored in the normal test run): how long the
//! floating API address is unreachable when its holder dies. Three control-plane agents with
//! real keepalived in network namespaces; `RACKSEED_FAILOVER_KILLS` (default 10, at most 50)
//! times: the holder loses power (keepalived and agent SIGKILLed, cable pulled), and the time
//! until `https://<address>:16443/readyz` answers 200 again from another lab host is
//! measured; then the dead node comes back and the next round starts once it is ready.
//! Prints every figure and min / median / max next to the 10 s target. Needs root.

mod agent_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 100);
const CLIENT: usize = 0;
const TARGET: Duration = Duration::from_secs(10);
/// A round that takes longer than this is a failure, not a figure.
const GIVE_UP: Duration = Duration::from_secs(60);

fn single_holder(c: &AgentCluster) -> Option<usize> {
    match c.address_holders(ADDRESS)[..] {
        [h] => Some(h),
        _ => None,
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "benchmark: run by scripts/bench-failover"]
fn failover_time_of_the_api_address() {
    let kills: usize = std::env::var("RACKSEED_FAILOVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .clamp(1, 50);
    let mut c = AgentCluster::after_spare_hosts(1, 3, ClusterSpec::default());
    c.set_api_address(&ADDRESS.to_string());
    for i in 0..3 {
        c.start_with_keepalived(i);
    }
    let _keepalived = c.keepalived_guard();
    c.wait_formed(&[0, 1, 2], 3, Duration::from_secs(120));
    wait_until(
        "one holder and the API through the address",
        GIVE_UP,
        || single_holder(&c).is_some() && c.api_ready_via(CLIENT, ADDRESS),
    );

    let mut times = Vec::new();
    for round in 0..kills {
        let holder = single_holder(&c).expect("one holder before the kill");
        let t = Instant::now();
        c.power_off(holder, holder + 1, ADDRESS);
        let mut next = None;
        wait_until("the API through the address again", GIVE_UP, || {
            next = single_holder(&c).filter(|&h| h != holder);
            next.is_some() && c.api_ready_via(CLIENT, ADDRESS)
        });
        let took = t.elapsed();
        println!(
            "kill {:>2}: node-{holder} died, node-{} answers through {ADDRESS} after {:.2} s",
            round + 1,
            next.unwrap(),
            took.as_secs_f64()
        );
        times.push(took);
        // The dead node comes back and is ready (its API answers, keepalived stands by).
        c.power_on(holder, holder + 1);
        let ip = c.nodes[holder].addr;
        wait_until("the restarted node's API", GIVE_UP, || {
            c.api_ready_via(CLIENT, ip)
        });
        wait_until("the restarted node standing by", GIVE_UP, || {
            c.status(holder)
                .and_then(|d| d.api_address)
                .is_some_and(|v| v.state.starts_with("standing by"))
        });
        // keepalived's health check needs 2 successes (rise 2) before it is a backup again.
        std::thread::sleep(Duration::from_secs(3));
    }
    times.sort();
    let secs = |d: Duration| d.as_secs_f64();
    let median = if times.len() % 2 == 1 {
        secs(times[times.len() / 2])
    } else {
        (secs(times[times.len() / 2 - 1]) + secs(times[times.len() / 2])) / 2.0
    };
    let max = secs(*times.last().unwrap());
    println!(
        "failover over {kills} kills: min {:.2} s, median {median:.2} s, max {max:.2} s; target {:.0} s: {}",
        secs(times[0]),
        secs(TARGET),
        if max <= secs(TARGET) { "met" } else { "NOT met" }
    );
}
