//! Scale: N agents (default 20 in the test suite; `RACKSEED_SCALE_NODES=50` for the full rack)
//! in network namespaces form one cluster with the MicroK8s simulator. Prints the formation
//! time next to the lower bound the simulated delays allow ([`formation_bound`]: control-plane
//! joins one at a time, worker joins `RACKSEED_SCALE_PARALLELISM` at once, default 8), every
//! agent's peak RSS and, with `RACKSEED_SCALE_IDLE_S=<seconds>`, the formed agents' CPU use
//! and RSS over that window. `scripts/bench-formation` runs it for N = 3, 10, 50 and 100.

mod agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agent_support::{check_command_log_with, AgentCluster, ClusterSpec};

/// The lower bound of formation with `n` nodes, `cp` of them control plane, worker joins
/// `parallelism` at once, `join_s` per join and `enable_s` per addon enable (two addons):
/// mDNS discovery (~1 s) + (cp − 1) serial control-plane joins + ⌈workers / parallelism⌉
/// worker rounds + the addon enables.
fn formation_bound(n: usize, cp: usize, parallelism: usize, join_s: f64, enable_s: f64) -> f64 {
    let cp = cp.min(n);
    let workers = n - cp;
    let rounds = workers.div_ceil(parallelism.max(1));
    1.0 + (cp as f64 - 1.0) * join_s + rounds as f64 * join_s + 2.0 * enable_s
}

#[test]
fn the_bound_counts_serial_control_plane_joins_and_parallel_worker_rounds() {
    assert_eq!(formation_bound(3, 3, 8, 0.5, 0.5), 1.0 + 1.0 + 0.0 + 1.0);
    assert_eq!(formation_bound(10, 3, 8, 0.5, 0.5), 1.0 + 1.0 + 0.5 + 1.0);
    assert_eq!(formation_bound(50, 3, 8, 0.5, 0.5), 1.0 + 1.0 + 3.0 + 1.0);
    assert_eq!(formation_bound(100, 3, 8, 0.5, 0.5), 1.0 + 1.0 + 6.5 + 1.0);
    // With one join at a time it is the old serial bound.
    assert_eq!(formation_bound(50, 3, 1, 0.5, 0.5), 1.0 + 49.0 * 0.5 + 1.0);
    // A real rack: 50 machines, 60 s per join.
    assert_eq!(formation_bound(50, 3, 1, 60.0, 0.0), 1.0 + 49.0 * 60.0);
    assert_eq!(
        formation_bound(50, 3, 8, 60.0, 0.0),
        1.0 + 2.0 * 60.0 + 6.0 * 60.0
    );
}

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
    let parallelism: u32 = std::env::var("RACKSEED_SCALE_PARALLELISM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(rackseed_config::DEFAULT_JOIN_PARALLELISM);
    let idle_s: u64 = std::env::var("RACKSEED_SCALE_IDLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let spec = ClusterSpec {
        expected_nodes: n as u32,
        join_delay_ms: join_ms,
        enable_delay_ms: enable_ms,
        join_timeout_s: 20,
        join_parallelism: parallelism,
        heartbeat_ms: 1000,
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
    check_command_log_with(&c.commands(), parallelism as usize).unwrap();
    let rss: Vec<u64> = all
        .iter()
        .filter_map(|&i| c.agent_peak_rss_kib(i))
        .collect();
    assert_eq!(rss.len(), n, "peak RSS of some agents could not be read");
    let max_rss = rss.iter().copied().max().unwrap_or(0);
    let mean_rss = rss.iter().sum::<u64>() / rss.len().max(1) as u64;
    let bound = formation_bound(
        n,
        3,
        parallelism as usize,
        join_ms as f64 / 1000.0,
        enable_ms as f64 / 1000.0,
    );
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
    // A formed agent's steady load: CPU seconds per minute (its own, and with the children
    // it waited for) and its RSS, over `idle_s` seconds once formation is complete.
    let idle = (idle_s > 0).then(|| idle_load(&c, n, idle_s));
    if let Some(l) = &idle {
        println!(
            "formed agent idle load N={n} over {idle_s} s: CPU max {:.3} s/min (with children {:.3}), mean {:.3} s/min; RSS max {:.1} MiB (target < 0.5 s/min, < 20 MiB): {}",
            l.cpu_max, l.cpu_children_max, l.cpu_mean, l.rss_max_mib, verdict(l.ok()),
        );
        let threads: Vec<String> = l
            .by_thread
            .iter()
            .map(|(name, s)| format!("{name} {s:.3}"))
            .collect();
        println!(
            "formed agent idle load N={n} by thread (mean s/min over the agents): {}; children waited for {:.3} s/min (mean)",
            threads.join(", "),
            l.children_mean,
        );
    }
    let idle_fields = idle.as_ref().map_or(String::new(), |l| {
        format!(
            " idle_cpu_max_s_per_min={:.3} idle_cpu_children_max_s_per_min={:.3} idle_cpu_mean_s_per_min={:.3} idle_rss_max_mib={:.1} idle_ok={}",
            l.cpu_max, l.cpu_children_max, l.cpu_mean, l.rss_max_mib, l.ok()
        )
    });
    // One machine-readable line for scripts/bench-formation.
    println!(
        "bench n={n} formation_s={:.2} bound_s={:.2} overhead_s={:.2} allowed_s={:.2} time_ok={} rss_max_mib={:.1} rss_mean_mib={:.1} rss_ok={}{idle_fields}",
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

/// What formed agents cost while nothing happens.
struct IdleLoad {
    /// CPU seconds per minute: the busiest agent's own, the busiest with its children, the mean.
    cpu_max: f64,
    cpu_children_max: f64,
    cpu_mean: f64,
    rss_max_mib: f64,
    /// Mean CPU seconds per minute of the agents' threads, by thread name (`mDNS_daemon` is
    /// mdns-sd's thread, `tokio-runtime-w` the driver, coordinator and discovery browser).
    by_thread: BTreeMap<String, f64>,
    /// Mean CPU seconds per minute of the children the agents waited for (`microk8s status`).
    children_mean: f64,
}

impl IdleLoad {
    fn ok(&self) -> bool {
        self.cpu_max < 0.5 && self.rss_max_mib < 20.0
    }
}

/// Samples every agent's CPU time (in all, and per thread), waits `secs` seconds, samples
/// again.
fn idle_load(c: &AgentCluster, n: usize, secs: u64) -> IdleLoad {
    let pids: Vec<u32> = c
        .nodes
        .iter()
        .map(|node| agent_pid(&node.dir).expect("the agent's process"))
        .collect();
    let threads_before: Vec<BTreeMap<u32, (String, f64)>> =
        pids.iter().map(|&p| thread_cpu_seconds(p)).collect();
    let before: Vec<(f64, f64)> = (0..n)
        .map(|i| c.agent_cpu_seconds(i).expect("agent CPU time"))
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    let per_min = 60.0 / secs as f64;
    let mut own = Vec::new();
    let mut with_children = Vec::new();
    for (i, b) in before.iter().enumerate() {
        let a = c.agent_cpu_seconds(i).expect("agent CPU time");
        own.push((a.0 - b.0) * per_min);
        with_children.push((a.1 - b.1) * per_min);
    }
    let mut by_thread: BTreeMap<String, f64> = BTreeMap::new();
    for (p, b) in pids.iter().zip(&threads_before) {
        for (tid, (name, after)) in thread_cpu_seconds(*p) {
            let was = b.get(&tid).map_or(0.0, |(_, s)| *s);
            *by_thread.entry(name).or_default() += (after - was) * per_min / n.max(1) as f64;
        }
    }
    let rss_max = (0..n).filter_map(|i| c.agent_rss_kib(i)).max().unwrap_or(0);
    let children: f64 = own.iter().zip(&with_children).map(|(o, w)| w - o).sum();
    IdleLoad {
        cpu_max: own.iter().copied().fold(0.0, f64::max),
        cpu_children_max: with_children.iter().copied().fold(0.0, f64::max),
        cpu_mean: own.iter().sum::<f64>() / n.max(1) as f64,
        rss_max_mib: rss_max as f64 / 1024.0,
        by_thread,
        children_mean: children / n.max(1) as f64,
    }
}

/// The pid of the agent whose state folder is `<dir>/state` (`ip netns exec` execs the
/// agent, so it is the process running `firstboot ... --state-dir <dir>/state`).
fn agent_pid(dir: &std::path::Path) -> Option<u32> {
    let state = dir.join("state");
    let want = state.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with(b"firstboot"));
        if is_agent
            && args
                .windows(2)
                .any(|w| w[0] == b"--state-dir" && w[1] == want)
        {
            return Some(pid);
        }
    }
    None
}

/// Each thread of process `pid`: its name and the CPU seconds it used so far, by thread id.
fn thread_cpu_seconds(pid: u32) -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ...`: utime and stime are fields 14 and 15, 11 and 12 after ')'.
        let Some((head, rest)) = text.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("?", |(_, n)| n).to_string();
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
            out.insert(tid, (name, (u + s) as f64 / 100.0));
        }
    }
    out
}
