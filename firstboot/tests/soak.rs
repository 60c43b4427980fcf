//! The chaos soak (issue #23) and the clock tests: real agents in network namespaces with the
//! MicroK8s simulator, faults from a seed, invariants checked continuously (see
//! `soak_support`'s module docs for the faults, the invariants and the convergence bound).
//!
//! CI runs `soak_with_a_fixed_seed` as it is (seed 202, 90 s of faults on 3 control-plane nodes
//! and 4 workers). Longer or other soaks: `scripts/soak --seed N --minutes M`, which sets
//! `RACKSEED_SOAK_SEED`, `RACKSEED_SOAK_SECONDS`, `RACKSEED_SOAK_FAULTS` (a comma list of fault
//! kinds, default `all`), `RACKSEED_SOAK_GAP_MS` (mean gap between faults) and
//! `RACKSEED_SOAK_REPORT` (a file the report is also written to).
//!
//! Needs root (namespaces, tmpfs mounts), nftables and libfaketime (`scripts/install-deps`).

mod soak_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use soak_support::*;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        _ => default,
    }
}

fn spec_from_env() -> SoakSpec {
    let kinds = match std::env::var("RACKSEED_SOAK_FAULTS") {
        Ok(v) if !v.is_empty() => FaultKind::parse_list(&v).unwrap_or_else(|e| panic!("{e}")),
        _ => FaultKind::ALL.into_iter().collect(),
    };
    SoakSpec {
        seed: env_u64("RACKSEED_SOAK_SEED", 202),
        control_plane: 3,
        workers: 4,
        fault_phase: Duration::from_secs(env_u64("RACKSEED_SOAK_SECONDS", 90)),
        mean_gap: Duration::from_millis(env_u64("RACKSEED_SOAK_GAP_MS", 2_500)),
        kinds,
    }
}

#[test]
fn soak_with_a_fixed_seed() {
    let spec = spec_from_env();
    let report = run_soak(&spec);
    let text = report.print();
    println!("{text}");
    if let Ok(path) = std::env::var("RACKSEED_SOAK_REPORT") {
        if !path.is_empty() {
            std::fs::write(&path, &text).expect("writing the soak report");
        }
    }
    assert!(
        report.violations.is_empty() && report.unconverged.is_empty(),
        "soak seed {} failed (reproduce: scripts/soak --seed {} --minutes {:.2}):\n{text}",
        spec.seed,
        spec.seed,
        spec.fault_phase.as_secs_f64() / 60.0
    );
    assert!(report.faults_total() > 0, "no fault was injected:\n{text}");
}

#[test]
fn the_schedule_is_a_function_of_the_seed() {
    let spec = |seed| SoakSpec {
        seed,
        control_plane: 3,
        workers: 4,
        fault_phase: Duration::from_secs(600),
        mean_gap: Duration::from_millis(2_000),
        kinds: FaultKind::ALL.into_iter().collect(),
    };
    let show = |s: &Schedule| {
        s.faults
            .iter()
            .map(Fault::describe)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let a = Schedule::new(&spec(7));
    assert_eq!(show(&a), show(&Schedule::new(&spec(7))));
    assert_eq!(a.clock_behind, Schedule::new(&spec(7)).clock_behind);
    assert_ne!(show(&a), show(&Schedule::new(&spec(8))));
    // Ten minutes at a 2 s mean gap: about 300 faults, every drawn kind among them.
    assert!((200..=400).contains(&a.faults.len()), "{}", a.faults.len());
    let kinds: BTreeSet<FaultKind> = a.faults.iter().map(|f| f.kind).collect();
    for k in FaultKind::ALL {
        if k != FaultKind::ClockBehind {
            assert!(kinds.contains(&k), "{k:?} never drawn");
        }
    }
    assert!(a.clock_behind.is_some());
    for f in &a.faults {
        assert!(f.at < Duration::from_secs(600));
        if matches!(f.kind, FaultKind::Partition) {
            let all: BTreeSet<usize> = f.groups.iter().flatten().copied().collect();
            assert_eq!(all.len(), 7, "every node is in one group: {:?}", f.groups);
            assert!(f.groups.len() <= 3);
        }
    }
    // Switching kinds off leaves them out.
    let only = SoakSpec {
        kinds: FaultKind::parse_list("partition,kill-agent").unwrap(),
        ..spec(7)
    };
    let s = Schedule::new(&only);
    assert!(s.clock_behind.is_none());
    assert!(s
        .faults
        .iter()
        .all(|f| matches!(f.kind, FaultKind::Partition | FaultKind::KillAgent)));
    assert!(FaultKind::parse_list("partition,nope").is_err());
}

/// No safety rule depends on wall-clock agreement: three nodes whose wall clocks are years
/// apart (one 3 years behind until NTP answers, one 4 years ahead, one that jumps 2 hours
/// backward during formation) form one cluster, one join at a time, with every invariant
/// held. The node behind waits for time synchronisation before installing MicroK8s, says so in
/// its status, and installs once the clock is synchronised.
#[test]
fn clocks_years_apart_form_one_cluster_and_the_install_waits_for_time_sync() {
    let mut c = SoakCluster::new(3, 0, &[0, 1, 2]);
    c.set_clock_offset(0, "-94608000");
    c.set_clock_offset(1, "+126144000");
    c.mark_synchronized(1);
    c.mark_synchronized(2);
    let started = Instant::now();
    let mut inv = Invariants::new(&c, started);
    // Node 0 would wait up to 10 minutes; the others have synchronised.
    c.start_agent(0, 600);
    c.start_agent(1, 600);
    c.start_agent(2, 600);
    // Node 0 says it waits, and installs nothing while it does.
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        inv.check(&c);
        if let Some(doc) = c.status(0) {
            if let Some(p) = doc
                .problems
                .iter()
                .find(|p| p.starts_with("waiting for time synchronisation"))
            {
                break p.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never reported waiting for time synchronisation"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(waiting.contains("before installing MicroK8s"), "{waiting}");
    let t_jump = Instant::now() + Duration::from_secs(2);
    let mut jumped = false;
    // Keep it waiting for a few seconds: nothing is installed on node 0.
    while started.elapsed() < Duration::from_secs(12) {
        inv.check(&c);
        if !jumped && Instant::now() >= t_jump {
            c.set_clock_offset(2, "-7200");
            jumped = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(jumped);
    assert!(
        !c.nodes[0].dir.join("sim/installed.json").exists(),
        "node 0 installed MicroK8s before its clock was synchronised"
    );
    // NTP answers: the clock jumps 3 years forward and the flag appears.
    c.set_clock_offset(0, "+0");
    c.mark_synchronized(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        inv.check(&c);
        let docs: Vec<_> = (0..3).map(|i| c.status(i)).collect();
        if docs
            .iter()
            .all(|d| d.as_ref().is_some_and(|d| converged(d, 3)))
        {
            let d0 = docs[0].as_ref().unwrap();
            assert!(
                !d0.problems
                    .iter()
                    .any(|p| p.starts_with("waiting for time synchronisation")),
                "the waiting line is gone once synchronised: {:?}",
                d0.problems
            );
            assert!(
                d0.timeline
                    .iter()
                    .any(|e| e.what.starts_with("waiting for time synchronisation")),
                "the wait is in node 0's timeline"
            );
            break;
        }
        if Instant::now() > deadline {
            c.dump(30);
            panic!("the cluster did not form within 120 s of node 0's clock synchronising");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for _ in 0..5 {
        inv.check(&c);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        inv.violations.is_empty(),
        "invariants broken: {:#?}",
        inv.violations
    );
    // Every faked process is killed now (a power cut of each node, as at the end of a soak):
    // libfaketime's files went with their private /dev/shm, none is left on the host.
    let before = c.shm_before.clone();
    drop(c);
    let left = faketime_left(&before);
    assert!(
        left.is_empty(),
        "libfaketime left files in /dev/shm: {left:?}"
    );
}

/// The dump names what a failing join said: the failure in the status timeline (the
/// `JoinError` text, which carries the command's exit and stderr), the last error, and the
/// simulator's records of the node's commands that exited non-zero (and only that node's).
#[test]
fn the_dump_shows_why_a_join_failed() {
    let doc = rackseed_protocol::status::StatusDoc {
        node_id: "n0".into(),
        last_error: Some("microk8s join via 10.231.0.2 (attempt 1): seed 10.231.0.2 rejected the join (500): the node is already known to dqlite".into()),
        timeline: vec![
            rackseed_protocol::status::TimelineEntry { at: 1.0, what: "joining cluster c via 10.231.0.2 as control plane".into() },
            rackseed_protocol::status::TimelineEntry { at: 1.2, what: "microk8s join failed: seed 10.231.0.2 rejected the join (500): the node is already known to dqlite".into() },
        ],
        ..Default::default()
    };
    let records = [
        r#"{"ts_ms":1,"node":"node-0","pid":7,"program":"microk8s","event":"start","argv":["join","10.231.0.2:25000/<redacted>"]}"#,
        r#"{"ts_ms":2,"node":"node-0","pid":7,"program":"microk8s","event":"end","argv":["join","10.231.0.2:25000/<redacted>"],"exit":6}"#,
        r#"{"ts_ms":3,"node":"node-1","pid":8,"program":"microk8s","event":"end","argv":["status"],"exit":1}"#,
        r#"{"ts_ms":4,"node":"node-0","pid":9,"program":"microk8s","event":"end","argv":["status"],"exit":0}"#,
        "not json",
    ]
    .join("\n");
    let lines = failure_lines(0, Some(&doc), &records).join("\n");
    assert!(
        lines.contains("1.2s microk8s join failed: seed 10.231.0.2 rejected the join (500)"),
        "{lines}"
    );
    assert!(
        lines.contains("last error: Some(\"microk8s join via 10.231.0.2"),
        "{lines}"
    );
    assert!(
        lines.contains("microk8s join 10.231.0.2:25000/<redacted> -> exit 6"),
        "{lines}"
    );
    assert!(!lines.contains("-> exit 0"), "{lines}");
    assert!(!lines.contains("pid 8"), "another node's record: {lines}");
    assert!(!lines.contains("joining cluster"), "{lines}");
    let none = failure_lines(2, None, &records).join("\n");
    assert!(none.contains("the agent does not answer"), "{none}");
}
