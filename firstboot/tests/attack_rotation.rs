//! Revocation (root; network namespaces; the MicroK8s simulator): `imagebuilder secret rotate`
//! moves every live node to a new secret and MicroK8s token, and a node that kept the old
//! secret (a lost card, an old image) can no longer join or sway the cluster.
//!
//! Four agents form a cluster (3 control plane, one worker), each card holding its own copy of
//! the secret. The worker's card is lost: its agent and MicroK8s stop. From a workstation host
//! on the same bridge:
//! 1. `secret rotate` without `--revoke`: the lost node is a member that does not answer, so the run
//!    stops after staging, exits non-zero naming it, and switches nothing (every secret file as
//!    before; the pending secret kept, 0600);
//! 2. `secret rotate --revoke <lost node>`: resumes the same pending secret, moves the others
//!    (stage, commit, finish) and exits 0; the workstation's secret file holds the new secret,
//!    `.old` the old one, both 0600; each moved node's secret file holds the new secret (0600),
//!    its persistent token file the new token and not the old one, its launch config the new
//!    token.
//!
//! Then, with the old secret: the lost card comes back and an old image (node 4) boots; a rogue on the
//! workstation host asks the nodes' coordinators for their status and offers them a rotation;
//! the rogue joins MicroK8s with the old token. Every one of these is refused: the members
//! count the dropped announcements (`wrong_cluster`) and the 401s, list neither node as a peer
//! or member, node 4 never runs `microk8s join`, the old token's join exits 6 with `invalid
//! token (500)`. The moved nodes keep working: a new image (node 5, the new secret) joins.
//! Finally no secret or token (old or new) is in any agent log, simulator log, command log,
//! `imagebuilder` output, or world-readable file outside the simulator's own state folders.
//!
//! Bounded: formation and the new node's join wait at most 120 s each, the old-secret nodes
//! run for 20 s, the rogue sends 3 requests per node. Needs root and iproute2 and fails loudly
//! without them. Run: `cargo test -p firstboot --test attack_rotation` (with the imagebuilder
//! binary built: `cargo build -p imagebuilder`).

mod agent_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{argv, AgentCluster, ClusterSpec};
use firstboot::system::microk8s::parse::parse_cert_fingerprint;
use firstboot::system::microk8s::persistent_tokens_file;
use rackseed_host::command::{Cmd, Output};
use rackseed_protocol::coordinator::{ClientError, CoordinatorClient, RotationStep};
use rackseed_protocol::secret::ClusterSecret;

const WS: usize = 0;
const BOUND: Duration = Duration::from_secs(120);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs `imagebuilder ARGS…` on the workstation host.
fn imagebuilder(c: &AgentCluster, args: &[&std::ffi::OsStr]) -> Output {
    agent_support::imagebuilder_on(c.lab.host(WS), args)
}

/// A copy of the cluster's config whose `secret-file` is a copy of `secret`, in `dir`.
fn config_copy(c: &AgentCluster, dir: &Path, secret: &ClusterSecret) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    secret.write_new(&dir.join("cluster.secret")).unwrap();
    let text = std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap();
    std::fs::write(dir.join("cluster.toml"), text).unwrap();
    dir.join("cluster.toml")
}

/// The rogue (old secret) on the workstation host: per node, a status read, a rotation offer and
/// a formation-shaped message, each answered 401. Returns the refusals' statuses.
fn rogue_requests(c: &AgentCluster, old: &ClusterSecret, nodes: &[usize]) -> Vec<Option<u16>> {
    let targets: Vec<(SocketAddr, String)> = nodes
        .iter()
        .map(|&i| {
            let fp = rackseed_protocol::coordinator::identity::read_fingerprint(
                &c.nodes[i].dir.join("state"),
            )
            .unwrap();
            (SocketAddr::from((c.nodes[i].addr, 7443)), fp)
        })
        .collect();
    let old = old.clone();
    c.lab
        .host(WS)
        .spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(async move {
                let rogue =
                    CoordinatorClient::new(&old, "rogue").with_timeout(Duration::from_secs(5));
                let mut out = Vec::new();
                for (addr, fp) in targets {
                    out.push(rogue.status(addr, &fp).await.err().and_then(|e| e.status()));
                    let offer = RotationStep::Stage {
                        secret: "ab".repeat(32),
                    };
                    out.push(
                        rogue
                            .rotate(addr, &fp, &offer)
                            .await
                            .err()
                            .and_then(|e| e.status()),
                    );
                    let msg = serde_json::json!({"kind": "anything"});
                    let r: Result<Vec<serde_json::Value>, ClientError> =
                        rogue.send(addr, &fp, &msg).await;
                    out.push(r.err().and_then(|e| e.status()));
                }
                out
            }))
        })
        .join()
        .expect("rogue thread")
        .expect("entering the workstation's namespace")
}

/// Every file under `root` (but the simulator's own state folders, which model MicroK8s'
/// internals) that others may read, with its content.
fn world_readable_files(root: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if p.file_name().is_some_and(|n| n == "sim") {
                continue;
            }
            world_readable_files(&p, out);
        } else if meta.is_file() && meta.permissions().mode() & 0o004 != 0 {
            out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
}

#[test]
fn a_rotated_cluster_refuses_the_old_secret_and_admits_the_new_one() {
    let spec = ClusterSpec {
        expected_nodes: 3,
        ..ClusterSpec::default()
    };
    let old = spec.secret.clone();
    let mut c = AgentCluster::after_spare_hosts(1, 6, spec);
    let base = c.dir.path().to_path_buf();
    // Every card holds its own copy of the secret, and so does the workstation.
    let cards: Vec<PathBuf> = (0..4)
        .map(|i| config_copy(&c, &base.join(format!("card-{i}")), &old))
        .collect();
    let card_secret = |i: usize| base.join(format!("card-{i}/cluster.secret"));
    let ws_cfg = config_copy(&c, &base.join("workstation"), &old);
    let ws_secret = base.join("workstation/cluster.secret");
    let pending = base.join("workstation/cluster.secret.new");
    for (i, card) in cards.iter().enumerate() {
        c.start_with_config(i, card);
    }
    let docs = c.wait_formed(&[0, 1, 2, 3], 3, BOUND);
    let ids: Vec<String> = docs.iter().map(|d| d.node_id.clone()).collect();
    // The card of the worker is lost: its agent and MicroK8s stop.
    let lost = docs
        .iter()
        .position(|d| d.role.as_deref() == Some("worker"))
        .expect("one worker among 4 nodes with control-plane = 3");
    let kept: Vec<usize> = (0..4).filter(|&i| i != lost).collect();
    c.stop_agent(lost);
    assert!(
        c.kill_microk8s(lost),
        "the lost node's MicroK8s was running"
    );

    // 1. Without --revoke: stops before any switch, names the lost node, loses nothing.
    let rotate = |c: &AgentCluster, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "secret".as_ref(),
            "rotate".as_ref(),
            "--config".as_ref(),
            ws_cfg.as_os_str(),
            "--discover".as_ref(),
            "4s".as_ref(),
            "--timeout".as_ref(),
            "5s".as_ref(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        imagebuilder(c, &args)
    };
    let first = rotate(&c, &[]);
    assert_eq!(first.code(), Some(1), "{}\n{}", first.stdout, first.stderr);
    assert!(
        first
            .stdout
            .lines()
            .any(|l| l.starts_with(&ids[lost]) && l.contains("unreachable")),
        "the lost node reported unreachable: {}",
        first.stdout
    );
    assert!(
        first.stderr.contains("run the same command again"),
        "{}",
        first.stderr
    );
    assert_eq!(
        ClusterSecret::load(&ws_secret).unwrap(),
        old,
        "nothing switched"
    );
    for &i in &kept {
        assert_eq!(
            ClusterSecret::load(&card_secret(i)).unwrap(),
            old,
            "node {i} switched"
        );
    }
    assert_eq!(mode(&pending), 0o600);
    let new = ClusterSecret::load(&pending).unwrap();
    assert_ne!(new, old);

    // 2. --revoke the lost node: the same pending secret goes to the others.
    let t = std::time::Instant::now();
    let second = rotate(&c, &["--revoke", &ids[lost]]);
    eprintln!(
        "rotation of {} nodes (4 s of discovery included): {:.2} s",
        kept.len(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        second.code(),
        Some(0),
        "{}\n{}",
        second.stdout,
        second.stderr
    );
    for (i, id) in ids.iter().enumerate() {
        let line = second
            .stdout
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no report line for {id}: {}", second.stdout));
        let want = if i == lost { "revoked" } else { "moved" };
        assert!(line.contains(want), "{line}");
    }
    assert_eq!(ClusterSecret::load(&ws_secret).unwrap(), new);
    assert_eq!(
        ClusterSecret::load(&base.join("workstation/cluster.secret.old")).unwrap(),
        old
    );
    assert_eq!(mode(&ws_secret), 0o600);
    assert!(
        !pending.exists(),
        "the pending file is gone once every node moved"
    );
    assert_eq!(ClusterSecret::load(&card_secret(lost)).unwrap(), old);
    for &i in &kept {
        assert_eq!(
            ClusterSecret::load(&card_secret(i)).unwrap(),
            new,
            "node {i}"
        );
        assert_eq!(mode(&card_secret(i)), 0o600);
        let f = persistent_tokens_file(&c.nodes[i].dir);
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.lines().any(|l| l == new.microk8s_token()), "node {i}");
        assert!(
            !text.contains(&old.microk8s_token()),
            "node {i} still accepts the old token"
        );
        assert_eq!(mode(&f), 0o600);
        let launch = std::fs::read_to_string(c.nodes[i].dir.join("etc/microk8s.yaml")).unwrap();
        assert!(
            launch.contains(&new.microk8s_token()),
            "node {i} launch config"
        );
    }
    // The harness reads status documents with the operator's copy: it moves too.
    new.replace_file(&base.join("cluster.secret")).unwrap();
    let moved = c.wait_formed(&kept, 3, BOUND);
    let before: Vec<u64> = moved
        .iter()
        .map(|d| d.rejections.discovery.wrong_cluster)
        .collect();
    let unauthorized_before: Vec<u64> = moved
        .iter()
        .map(|d| d.rejections.coordinator.unauthorized)
        .collect();

    // The old secret, everywhere at once: the lost card back, an old image (node 4), a rogue.
    c.start_with_config(lost, &cards[lost]);
    let node4_cfg = config_copy(&c, &base.join("card-4"), &old);
    c.start_with_config(4, &node4_cfg);
    let refusals = rogue_requests(&c, &old, &kept);
    assert!(refusals.iter().all(|s| *s == Some(401)), "{refusals:?}");
    // Give the old-secret agents time to try (announce, browse, elect), bounded.
    std::thread::sleep(Duration::from_secs(20));
    let id4 = firstboot::system::identity::node_id(&c.nodes[4].dir.join("root"), None).unwrap();
    let after = c.wait_formed(&kept, 3, BOUND);
    for (k, d) in after.iter().enumerate() {
        assert!(
            d.rejections.discovery.wrong_cluster > before[k],
            "{} counted no dropped announcement from the old-secret nodes: {:?}",
            d.node_id,
            d.rejections
        );
        assert!(
            d.rejections.coordinator.unauthorized >= unauthorized_before[k] + 3,
            "{} did not count the rogue's 401s: {:?}",
            d.node_id,
            d.rejections
        );
        assert!(
            d.peers
                .iter()
                .all(|p| p.address != c.nodes[4].addr.to_string() && p.node_id != id4),
            "the old image is a peer of {}: {:?}",
            d.node_id,
            d.peers
        );
        if let Some(p) = d.peers.iter().find(|p| p.node_id == ids[lost]) {
            assert_eq!(
                p.phase, "lost",
                "{} sees the revoked node again: {p:?}",
                d.node_id
            );
        }
        assert!(d.members.iter().all(|m| m.node_id != id4));
    }
    assert!(!c.persisted_member(4), "the old image joined");
    assert!(
        !c.commands()
            .iter()
            .any(|r| r["node"] == "node-4" && argv(r).first().map(String::as_str) == Some("join")),
        "the old image's agent ran microk8s join"
    );
    // Its token is revoked on every member: a join with it by hand is refused as the cluster
    // agent refuses it (node 4's MicroK8s is installed by its agent's node preparation).
    let ready = std::time::Instant::now();
    while !c.nodes[4].dir.join("daemon.pid").exists() {
        assert!(
            ready.elapsed() < BOUND,
            "node 4's MicroK8s was never installed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for &i in &kept {
        let fp = parse_cert_fingerprint(
            &std::fs::read_to_string(c.nodes[i].dir.join("certs/server.crt")).unwrap(),
        )
        .unwrap();
        let o = Cmd::new("ip", Duration::from_secs(60))
            .args(["netns", "exec", &c.nodes[4].ns])
            .arg(c.nodes[4].dir.join("bin/microk8s"))
            .arg("join")
            .secret_arg(format!(
                "{}:25000/{}/{}",
                c.nodes[i].addr,
                old.microk8s_token(),
                &fp[..12]
            ))
            .arg("--worker")
            .output_blocking()
            .unwrap();
        assert_eq!(o.code(), Some(6), "node {i}: {o:?}");
        assert!(o.stdout.contains("invalid token (500)."), "node {i}: {o:?}");
    }

    // The moved nodes keep working: a new image with the new secret joins.
    c.stop_agent(lost);
    c.stop_agent(4);
    let t = std::time::Instant::now();
    c.start_with_config(5, &ws_cfg);
    let with_new: Vec<usize> = kept.iter().copied().chain([5]).collect();
    let docs = c.wait_formed(&with_new, 3, BOUND);
    eprintln!(
        "a new image with the new secret joined in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(docs[3].phase, "member");
    assert_eq!(docs[3].role.as_deref(), Some("worker"), "{:?}", docs[3]);

    // No secret or token in logs, outputs or world-readable files.
    let needles = [
        old.to_file_contents().trim().to_string(),
        new.to_file_contents().trim().to_string(),
        old.microk8s_token(),
        new.microk8s_token(),
    ];
    let mut texts: Vec<(String, String)> = vec![
        (
            "first rotate".into(),
            format!("{}{}", first.stdout, first.stderr),
        ),
        (
            "second rotate".into(),
            format!("{}{}", second.stdout, second.stderr),
        ),
        (
            "command log".into(),
            std::fs::read_to_string(&c.log).unwrap_or_default(),
        ),
    ];
    for n in &c.nodes {
        for f in ["agent.log", "daemon.log"] {
            texts.push((
                format!("node-{} {f}", n.index),
                std::fs::read_to_string(n.dir.join(f)).unwrap_or_default(),
            ));
        }
    }
    for (what, text) in &texts {
        for (k, s) in needles.iter().enumerate() {
            assert!(
                !text.contains(s.as_str()),
                "secret/token #{k} in the {what}"
            );
        }
    }
    let mut files = Vec::new();
    world_readable_files(&base, &mut files);
    assert!(
        !files.is_empty(),
        "the scan found the world-readable files (logs, binaries' wrappers)"
    );
    for (p, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        for (k, s) in needles.iter().enumerate() {
            assert!(
                !text.contains(s.as_str()),
                "secret/token #{k} in world-readable {}",
                p.display()
            );
        }
    }
}
