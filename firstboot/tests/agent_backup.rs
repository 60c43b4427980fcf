//! Scheduled datastore backups with real agents (root; network namespaces; the MicroK8s
//! simulator's `dbctl`), and the attacks on them.
//!
//! Three control-plane agents form a cluster with `backup.interval = "6s"`. Shown:
//! 1. exactly one node (the record's slot authority) runs `microk8s dbctl backup`, never two
//!    at once; every control-plane node holds each archive (mode 0600 in a 0700 folder, same
//!    SHA-256), and every status shows the newest backup's age and its three copies;
//! 2. a rogue on the same bridge without the secret can neither list, fetch nor push an
//!    archive (401 each, nothing stored);
//! 3. `imagebuilder backup pull` copies the archives to the workstation (0600, verified);
//! 4. a near-empty backup (the simulator's #4259/#4308 knob) is an alarm in the status, not a
//!    success;
//! 5. `imagebuilder restore` refuses a damaged, a renamed and a foreign archive before
//!    contacting any node (no `dbctl restore` runs); a good one is restored by exactly one node;
//! 6. the backup node is killed (agent and MicroK8s): another control-plane node takes the
//!    schedule over and its backups reach the other survivor; the archives taken before are
//!    still on both survivors.
//!
//! Bounded: formation 120 s, each wait for a backup 60 s, the takeover 120 s (the simulated
//! takeover delay is 30 s). Needs root and iproute2 and fails loudly without them; needs the
//! imagebuilder binary (`cargo build -p imagebuilder`). Run:
//! `cargo test -p firstboot --test agent_backup`.

mod agent_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_support::{argv, AgentCluster, ClusterSpec};
use rackseed_host::command::Output;
use rackseed_protocol::coordinator::backup::{BackupManifest, MANIFEST_FORMAT};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;

const WS: usize = 0;
const BOUND: Duration = Duration::from_secs(120);
const BACKUP_WAIT: Duration = Duration::from_secs(60);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs `imagebuilder ARGS…` on the workstation host.
fn imagebuilder(c: &AgentCluster, args: &[&std::ffi::OsStr]) -> Output {
    agent_support::imagebuilder_on(c.lab.host(WS), args)
}

/// Power cut of node `i`: its agent and its simulated MicroK8s killed.
fn kill_node(c: &mut AgentCluster, i: usize) {
    c.kill_agent(i);
    assert!(c.kill_microk8s(i), "node {i}'s MicroK8s was running");
}

fn backups_dir(c: &AgentCluster, i: usize) -> PathBuf {
    c.nodes[i].dir.join("state/backups")
}

fn held(c: &AgentCluster, i: usize) -> Vec<BackupManifest> {
    let mut out: Vec<BackupManifest> = std::fs::read_dir(backups_dir(c, i))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest.json"))
                .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|m| (m.created_unix, m.name.clone()));
    out
}

/// Waits until `pred` holds for the status of node `i`.
fn wait_status(
    c: &AgentCluster,
    i: usize,
    within: Duration,
    what: &str,
    pred: impl Fn(&StatusDoc) -> bool,
) -> StatusDoc {
    let deadline = Instant::now() + within;
    loop {
        if let Some(d) = c.status(i) {
            if pred(&d) {
                return d;
            }
        }
        if Instant::now() > deadline {
            c.dump();
            panic!(
                "node-{i}: {what} not seen within {within:?}; backup view: {:?}",
                c.status(i).and_then(|d| d.backup)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `(node, start ms, end ms)` of every `dbctl backup` the simulators ran.
fn dbctl_runs(c: &AgentCluster, sub: &str) -> Vec<(String, u64, u64)> {
    let recs = c.commands();
    let mut runs = Vec::new();
    for r in &recs {
        let a = argv(r);
        if r["event"] != "start" || a.first().map(String::as_str) != Some("dbctl") {
            continue;
        }
        if a.get(1).map(String::as_str) != Some(sub) {
            continue;
        }
        let pid = &r["pid"];
        let end = recs
            .iter()
            .find(|e| e["event"] == "end" && &e["pid"] == pid && e["node"] == r["node"])
            .and_then(|e| e["ts_ms"].as_u64())
            .unwrap_or(u64::MAX);
        runs.push((
            r["node"].as_str().unwrap_or_default().to_string(),
            r["ts_ms"].as_u64().unwrap(),
            end,
        ));
    }
    runs
}

fn targets(c: &AgentCluster, nodes: &[usize]) -> Vec<(SocketAddr, String)> {
    nodes
        .iter()
        .map(|&i| {
            let fp = rackseed_protocol::coordinator::identity::read_fingerprint(
                &c.nodes[i].dir.join("state"),
            )
            .unwrap();
            (SocketAddr::from((c.nodes[i].addr, 7443)), fp)
        })
        .collect()
}

/// A rogue without the secret on the workstation host: list, fetch and push per node.
fn rogue_attempts(c: &AgentCluster, nodes: &[usize], name: &str) -> Vec<Option<u16>> {
    let targets = targets(c, nodes);
    let name = name.to_string();
    c.lab
        .host(WS)
        .spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(async move {
                let wrong = ClusterSecret::generate();
                let rogue =
                    CoordinatorClient::new(&wrong, "rogue").with_timeout(Duration::from_secs(5));
                let mut out = Vec::new();
                for (addr, fp) in targets {
                    out.push(
                        rogue
                            .backup_list(addr, &fp)
                            .await
                            .err()
                            .and_then(|e| e.status()),
                    );
                    let mut quiet = |_: u64, _: Option<u64>| {};
                    out.push(
                        rogue
                            .backup_fetch(addr, &fp, &name, &mut quiet)
                            .await
                            .err()
                            .and_then(|e| e.status()),
                    );
                    let mut m = BackupManifest {
                        format: MANIFEST_FORMAT,
                        name: "backup-rogue".into(),
                        cluster_name: "agents".into(),
                        cluster_id: "1.x".into(),
                        origin: "rogue".into(),
                        created_unix: 1,
                        size: 3,
                        sha256: String::new(),
                        keys: 0,
                        data_bytes: 0,
                        suspect: None,
                        tag: String::new(),
                    };
                    m.sign(&wrong);
                    out.push(
                        rogue
                            .backup_push(addr, &fp, &m, b"abc")
                            .await
                            .err()
                            .and_then(|e| e.status()),
                    );
                }
                out
            }))
        })
        .join()
        .expect("rogue thread")
        .expect("entering the workstation's namespace")
}

#[test]
fn backups_run_on_one_node_reach_every_control_plane_node_and_survive_its_loss() {
    let _ = std::fs::create_dir_all("/dev/shm/rackseed-tests");
    let spec = ClusterSpec {
        addons_toml: format!(
            "{}\n[backup]\ninterval = \"6s\"\nkeep = 5\n",
            ClusterSpec::default().addons_toml
        ),
        ..ClusterSpec::default()
    };
    let mut c = AgentCluster::after_spare_hosts(1, 3, spec);
    c.start_all();
    c.wait_formed(&[0, 1, 2], 3, BOUND);

    // 1. One scheduler; every control-plane node holds the archive; status shows the copies.
    let doc = wait_status(&c, 0, BACKUP_WAIT, "a backup", |d| {
        d.backup.as_ref().is_some_and(|b| b.newest.is_some())
    });
    let docs: Vec<StatusDoc> = (0..3).map(|i| c.status(i).unwrap()).collect();
    let schedulers: Vec<usize> = (0..3)
        .filter(|&i| docs[i].backup.as_ref().is_some_and(|b| b.scheduler))
        .collect();
    assert_eq!(schedulers.len(), 1, "backup schedulers: {schedulers:?}");
    let s = schedulers[0];
    // The simulator names node i "node-i"; the agents use their node ids.
    let s_name = format!("node-{s}");
    let s_id = docs[s].node_id.clone();
    let _ = doc;
    let sdoc = wait_status(&c, s, BACKUP_WAIT, "three copies on the scheduler", |d| {
        d.backup.as_ref().is_some_and(|b| b.copies.len() == 3)
    });
    let view = sdoc.backup.unwrap();
    let first = view.newest.clone().unwrap();
    assert!(view.copy_failures.is_empty(), "{:?}", view.copy_failures);
    assert!(view.newest.as_ref().unwrap().age_s < 60);
    for i in 0..3 {
        let dir = backups_dir(&c, i);
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        let m = held(&c, i)
            .into_iter()
            .find(|m| m.name == first.name)
            .unwrap_or_else(|| panic!("node-{i} lacks {}", first.name));
        let a = dir.join(m.archive_file());
        assert_eq!(mode(&a), 0o600);
        assert_eq!(mode(&dir.join(m.manifest_file())), 0o600);
        assert_eq!(m.sha256, first.sha256);
        assert_eq!(m.origin, s_id, "taken by the scheduler");
        assert!(m.keys > 0 && m.suspect.is_none(), "{m:?}");
    }
    let runs = dbctl_runs(&c, "backup");
    assert!(!runs.is_empty());
    assert!(
        runs.iter().all(|(n, _, _)| *n == s_name),
        "dbctl backup ran elsewhere: {runs:?}"
    );

    // 2. A rogue without the secret: 401 for every list, fetch and push.
    let refusals = rogue_attempts(&c, &[0, 1, 2], &first.name);
    assert!(
        refusals.iter().all(|s| *s == Some(401)),
        "rogue answers: {refusals:?}"
    );
    for i in 0..3 {
        assert!(
            !held(&c, i).iter().any(|m| m.name == "backup-rogue"),
            "node-{i} kept the rogue's archive"
        );
    }

    // 3. Pull to the workstation.
    let ws_dir = c.dir.path().join("workstation");
    let cfg = c.dir.path().join("cluster.toml");
    let out = imagebuilder(
        &c,
        &[
            "backup".as_ref(),
            "pull".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "-o".as_ref(),
            ws_dir.as_os_str(),
        ],
    );
    assert!(out.status.success(), "pull: {}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&first.name), "{}", out.stdout);
    let pulled = ws_dir.join(format!("{}.tar.gz", first.name));
    assert_eq!(mode(&pulled), 0o600);
    assert_eq!(mode(&ws_dir), 0o700);
    assert_eq!(
        rackseed_protocol::coordinator::backup::sha256_hex(&std::fs::read(&pulled).unwrap()),
        first.sha256
    );
    assert!(
        !std::fs::read_dir(&ws_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with('.')),
        "a temporary file was left in the pull folder"
    );

    // 4. Near-empty backups raise the alarm.
    let knob = c.nodes[s].dir.join("sim/dbctl-near-empty");
    std::fs::write(&knob, "").unwrap();
    let alarmed = wait_status(&c, s, BACKUP_WAIT, "the near-empty alarm", |d| {
        d.backup
            .as_ref()
            .and_then(|b| b.alarm.as_deref())
            .is_some_and(|a| a.contains("near-empty"))
    });
    let newest = alarmed.backup.unwrap().newest.unwrap();
    assert!(newest.suspect.is_some());
    std::fs::remove_file(&knob).unwrap();
    wait_status(
        &c,
        s,
        BACKUP_WAIT,
        "the alarm cleared by a good backup",
        |d| d.backup.as_ref().is_some_and(|b| b.alarm.is_none()),
    );

    // 5. Restore: damaged, renamed and foreign archives are refused before any node is asked.
    let restore = |c: &AgentCluster, archive: &Path| {
        imagebuilder(
            c,
            &[
                "restore".as_ref(),
                "--config".as_ref(),
                cfg.as_os_str(),
                archive.as_os_str(),
                "--yes".as_ref(),
            ],
        )
    };
    let bad_dir = c.dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let manifest_src = ws_dir.join(format!("{}.manifest.json", first.name));
    // Damaged: one byte flipped.
    let damaged = bad_dir.join(format!("{}.tar.gz", first.name));
    let mut bytes = std::fs::read(&pulled).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&damaged, &bytes).unwrap();
    std::fs::copy(
        &manifest_src,
        bad_dir.join(format!("{}.manifest.json", first.name)),
    )
    .unwrap();
    let out = restore(&c, &damaged);
    assert!(!out.status.success());
    assert!(out.stderr.contains("damaged"), "{}", out.stderr);
    // Renamed.
    let renamed_dir = c.dir.path().join("renamed");
    std::fs::create_dir_all(&renamed_dir).unwrap();
    std::fs::copy(&pulled, renamed_dir.join("mine.tar.gz")).unwrap();
    std::fs::copy(&manifest_src, renamed_dir.join("mine.manifest.json")).unwrap();
    let out = restore(&c, &renamed_dir.join("mine.tar.gz"));
    assert!(!out.status.success());
    assert!(out.stderr.contains("renamed"), "{}", out.stderr);
    // Foreign: the same archive with a manifest signed by another cluster's secret.
    let foreign_dir = c.dir.path().join("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let mut m: BackupManifest =
        serde_json::from_slice(&std::fs::read(&manifest_src).unwrap()).unwrap();
    m.sign(&ClusterSecret::generate());
    std::fs::copy(&pulled, foreign_dir.join(m.archive_file())).unwrap();
    std::fs::write(
        foreign_dir.join(m.manifest_file()),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let out = restore(&c, &foreign_dir.join(m.archive_file()));
    assert!(!out.status.success());
    assert!(out.stderr.contains("another cluster"), "{}", out.stderr);
    assert!(
        dbctl_runs(&c, "restore").is_empty(),
        "a refused archive reached dbctl restore"
    );
    // A good one: restored by exactly one node.
    let out = restore(&c, &pulled);
    assert!(
        out.status.success(),
        "restore: {}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("restored"), "{}", out.stdout);
    let restores = dbctl_runs(&c, "restore");
    assert_eq!(restores.len(), 1, "{restores:?}");

    // 6. Kill the backup node: another takes the schedule over; nothing is lost.
    let before: Vec<String> = held(&c, s).iter().map(|m| m.name.clone()).collect();
    kill_node(&mut c, s);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != s).collect();
    let deadline = Instant::now() + BOUND;
    let new_s = loop {
        let found = survivors.iter().copied().find(|&i| {
            c.status(i).is_some_and(|d| {
                d.backup.as_ref().is_some_and(|b| {
                    b.scheduler && b.newest.as_ref().is_some_and(|n| n.origin == d.node_id)
                })
            })
        });
        if let Some(i) = found {
            break i;
        }
        if Instant::now() > deadline {
            c.dump();
            panic!("no survivor took the backups over within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(1000));
    };
    let other = survivors.iter().copied().find(|&i| i != new_s).unwrap();
    let new_doc = c.status(new_s).unwrap();
    let new_id = new_doc.node_id.clone();
    let taken = new_doc.backup.unwrap();
    let newest = taken.newest.clone().unwrap();
    wait_status(&c, other, BACKUP_WAIT, "the new scheduler's copy", |_| {
        held(&c, other).iter().any(|m| m.origin == new_id)
    });
    assert!(
        taken.copy_failures.iter().any(|f| f.contains(&s_id)) || !taken.copies.contains(&s_id),
        "{taken:?}"
    );
    assert!(newest.age_s < 60);
    for &i in &survivors {
        let names: Vec<String> = held(&c, i).iter().map(|m| m.name.clone()).collect();
        // The archives kept before the loss (minus what `keep` pruned since) are still there.
        let kept_before = before.iter().filter(|n| names.contains(n)).count();
        assert!(
            kept_before >= 1,
            "node-{i} lost the earlier backups: {names:?}"
        );
    }
    // Never two backups at once.
    let mut runs = dbctl_runs(&c, "backup");
    runs.retain(|r| r.2 != u64::MAX);
    runs.sort_by_key(|r| r.1);
    for w in runs.windows(2) {
        assert!(
            w[0].2 <= w[1].1 || w[0].0 == w[1].0,
            "two backups overlapped: {w:?}"
        );
    }
    assert!(runs.iter().any(|(n, _, _)| *n == format!("node-{new_s}")));
}
