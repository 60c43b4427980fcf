//! Scale: N agents (default 20 in the test suite; `RACKSEED_SCALE_NODES=50` for the full rack) in network namespaces form one
//! cluster with the MicroK8s simulator. Prints the formation time next to the lower bound the
//! simulated delays allow, and every agent's peak RSS. `scripts/bench-formation` runs it for
//! N = 3, 10 and 50.

mod agent_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agent_support::{check_command_log, AgentCluster, ClusterSpec};

#[test]
fn many_agents_form_one_cluster() {
    let n: usize = std::env::var("RACKSEED_SCALE_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let join_ms: u64 = std::env::var("RACKSEED_SCALE_JOIN_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let enable_ms = 500;
    let spec = ClusterSpec {
        expected_nodes: n as u32,
        join_delay_ms: join_ms,
        enable_delay_ms: enable_ms,
        join_timeout_s: 20,
        // Fixed metallb range only: no ARP probing in the scale run.
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::new(n, spec);
    let t0 = Instant::now();
    c.start_all();
    let all: Vec<usize> = (0..n).collect();
    let mut pending: BTreeSet<usize> = all.iter().copied().collect();
    let deadline = t0 + Duration::from_secs(60 + n as u64 * 6);
    let mut members_at = None;
    let mut addons_at = None;
    while members_at.is_none() || addons_at.is_none() {
        // Progress as the agents persist it: reading the state files costs next to nothing
        // (unlike a `firstboot status` process per node), so the poll can be fine-grained.
        // MicroK8s' own view is checked at the end.
        pending.retain(|&i| !c.persisted_member(i));
        if pending.is_empty() && members_at.is_none() {
            members_at = Some(t0.elapsed());
        }
        if addons_at.is_none() && c.addons_enabled_somewhere() {
            addons_at = Some(t0.elapsed());
        }
        if Instant::now() > deadline {
            c.dump();
            panic!(
                "{n} agents did not form in time; not yet members: {pending:?}; addons enabled: {}",
                addons_at.is_some()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let formed = members_at.unwrap().max(addons_at.unwrap());
    let docs = c.wait_formed(&all, 3.min(n), Duration::from_secs(30));
    let clusters: BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    let cp = docs
        .iter()
        .filter(|d| d.role.as_deref() == Some("control-plane"))
        .count();
    assert_eq!(cp, 3.min(n));
    check_command_log(&c.commands()).unwrap();
    let rss: Vec<u64> = all
        .iter()
        .filter_map(|&i| c.agent_peak_rss_kib(i))
        .collect();
    assert_eq!(rss.len(), n, "peak RSS of some agents could not be read");
    let max_rss = rss.iter().copied().max().unwrap_or(0);
    let mean_rss = rss.iter().sum::<u64>() / rss.len().max(1) as u64;
    // Lower bound: mDNS discovery (~1 s) + (N-1) serial joins + the addon enables (2 addons).
    let bound = 1.0 + (n as f64 - 1.0) * join_ms as f64 / 1000.0 + 2.0 * enable_ms as f64 / 1000.0;
    let overhead = formed.as_secs_f64() - bound;
    let allowed = bound * 0.10 + 2.0;
    let verdict = |ok: bool| if ok { "pass" } else { "FAIL" };
    println!(
        "formation N={n}: {:.1} s (all members at {:.1} s, addons enabled at {:.1} s); lower bound {:.1} s; overhead {:.1} s ({:.0}%); target <= 10% + 2 s = {:.1} s: {}",
        formed.as_secs_f64(),
        members_at.unwrap().as_secs_f64(),
        addons_at.unwrap().as_secs_f64(),
        bound,
        overhead,
        100.0 * overhead / bound,
        allowed,
        verdict(overhead <= allowed),
    );
    println!(
        "agent peak RSS N={n}: max {:.1} MiB, mean {:.1} MiB (target < 20 MiB): {}",
        max_rss as f64 / 1024.0,
        mean_rss as f64 / 1024.0,
        verdict(max_rss < 20 * 1024),
    );
    // One machine-readable line for scripts/bench-formation.
    println!(
        "bench n={n} formation_s={:.2} bound_s={:.2} overhead_s={:.2} allowed_s={:.2} time_ok={} rss_max_mib={:.1} rss_mean_mib={:.1} rss_ok={}",
        formed.as_secs_f64(),
        bound,
        overhead,
        allowed,
        overhead <= allowed,
        max_rss as f64 / 1024.0,
        mean_rss as f64 / 1024.0,
        max_rss < 20 * 1024,
    );
}
