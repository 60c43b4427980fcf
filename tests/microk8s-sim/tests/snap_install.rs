//! The simulator's fake `snap install microk8s`, as snapd behaves: a second install while the
//! first one's change is not done is refused (`snap "microk8s" has "install-snap" change in
//! progress`, exit 1; canonical/snapd `overlord/snapstate/conflict.go`), the first finishes
//! and leaves one consistent install, every call is in the command log, and no temporary file
//! is left behind. No namespace needed: the simulator's CLI runs as a plain process.
//! Run: `cargo test -p microk8s-sim --test snap_install`.

use std::path::Path;
use std::time::{Duration, Instant};

use rackseed_host::command::{Cmd, Output};

const SIM: &str = env!("CARGO_BIN_EXE_microk8s");

fn sim(dir: &Path, args: &[&str]) -> Output {
    Cmd::new(SIM, Duration::from_secs(30))
        .args(args)
        .env("MICROK8S_SIM_STATE", dir.join("current/sim"))
        .env("MICROK8S_SIM_LAUNCH_CONFIG", dir.join("microk8s.yaml"))
        .env("MICROK8S_SIM_NODE", "node-a")
        .env("MICROK8S_SIM_IP", "10.9.9.1")
        .env("MICROK8S_SIM_LOG", dir.join("commands.jsonl"))
        .env("MICROK8S_SIM_INSTALL_DELAY_MS", "1500")
        .output_blocking()
        .expect("running the simulator")
}

#[test]
fn a_second_snap_install_while_the_first_runs_is_refused_as_snapd_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("microk8s.yaml"),
        format!(
            "version: 0.2.0\npersistentClusterToken: {}\n",
            "t".repeat(40)
        ),
    )
    .unwrap();
    let install = [
        "sim-snap",
        "install",
        "microk8s",
        "--classic",
        "--channel=1.32/stable",
    ];
    let first = {
        let d = dir.path().to_path_buf();
        std::thread::spawn(move || sim(&d, &install))
    };
    // The first one holds its change once its log line is written.
    let log = dir.path().join("commands.jsonl");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"start\"")) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the first install never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let second = sim(dir.path(), &install);
    assert_eq!(second.code(), Some(1), "{second:?}");
    assert_eq!(
        second.stderr,
        "error: snap \"microk8s\" has \"install-snap\" change in progress\n"
    );
    let first = first.join().unwrap();
    assert_eq!(first.code(), Some(0), "{first:?}");
    // One consistent install; a third install now says it is installed.
    let installed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("current/sim/installed.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(installed["name"], "node-a");
    let third = sim(dir.path(), &install);
    assert_eq!(third.code(), Some(0), "{third:?}");
    assert!(third.stderr.contains("already installed"), "{third:?}");
    // Every call recorded, with its exit code: two ends with 0, one with 1.
    let text = std::fs::read_to_string(&log).unwrap();
    let ends: Vec<i64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["program"] == "snap" && v["event"] == "end")
        .filter_map(|v| v["exit"].as_i64())
        .collect();
    let mut sorted = ends.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 0, 1], "{text}");
    // No temporary file left anywhere.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert!(!p.to_string_lossy().ends_with(".tmp"), "left behind: {p:?}");
            }
        }
    }
}
