//! Shared by the QEMU end-to-end tests (`e2e_qemu.rs` for x86_64, `e2e_qemu_arm64.rs`): the
//! test-only image overlay (simulator + fixed test network, used by the arm64 test; the x86
//! test uses the product's `--microk8s simulated` and the launcher's per-VM NoCloud seeds),
//! building an image with the `imagebuilder` binary, and watching nodes' status over their
//! management ports, with every serial log's tail printed when a stage is not reached in time.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::Cluster;
use rackseed_host::command::Cmd;
use rackseed_protocol::status::StatusDoc;

/// Simulated MicroK8s: each join takes this long, each addon enable this long.
pub const JOIN_DELAY_MS: u64 = 3000;
pub const ENABLE_DELAY_MS: u64 = 2000;
pub const POLL: Duration = Duration::from_secs(3);
/// The test network (one static address per MAC, written into the overlay).
pub const SUBNET: &str = "192.168.76.";
/// Network files are written for this many nodes.
pub const NODES_MAX: u8 = 4;

/// A binary of this workspace's host build.
pub fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_imagebuilder")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails (never skips) when the test cannot run here: not root, or a (tool, Debian package)
/// missing.
pub fn require_tools(tools: &[(&str, &str)]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the QEMU end-to-end tests need root (debootstrap); CI runs them as root"
    );
    if let Err(e) = imagebuilder::tool::require(tools) {
        panic!("{e:#} (scripts/install-deps installs them)");
    }
}

/// Runs `cmd`, panicking with its stderr tail on failure; returns stdout.
pub async fn run(cmd: Cmd) -> String {
    let what = cmd.display();
    match cmd.run().await {
        Ok(out) => out.stdout,
        Err(e) => panic!("{what}: {:#}", anyhow::Error::from(e)),
    }
}

/// A copy of `from` without debug info (smaller images, faster copies).
pub async fn stripped(from: &Path, to: &Path) {
    run(Cmd::new("strip", Duration::from_secs(60))
        .args(["--strip-debug", "-o"])
        .arg(to)
        .arg(from))
    .await;
}

/// The overlay: the repository's test tree (`tests/e2e-overlay/root`), the simulator binaries
/// (`microk8s` and `dqlite` from `sim_dir`; stripped when `strip`), the per-MAC network files
/// for the cluster `cluster_id`, and the simulator's settings.
pub async fn write_overlay(dir: &Path, cluster_id: &str, sim_dir: &Path, strip: bool) {
    let src = repo().join("tests/e2e-overlay/root");
    run(Cmd::new("cp", Duration::from_secs(60))
        .args(["-a", "--no-target-directory"])
        .arg(&src)
        .arg(dir))
    .await;
    let lib = dir.join("usr/local/lib/rackseed-sim");
    for (from, to) in [("microk8s", "microk8s-sim"), ("dqlite", "dqlite-sim")] {
        let from = sim_dir.join(from);
        assert!(from.is_file(), "{} is missing", from.display());
        if strip {
            stripped(&from, &lib.join(to)).await;
        } else {
            std::fs::copy(&from, lib.join(to)).unwrap();
        }
    }
    let units = dir.join("etc/systemd/system");
    for u in ["microk8s-sim.path", "microk8s-sim.service"] {
        std::fs::copy(
            repo().join("tests/microk8s-sim/packaging").join(u),
            units.join(u),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("etc/rackseed-sim.env"),
        format!(
            "MICROK8S_SIM_JOIN_DELAY_MS={JOIN_DELAY_MS}\nMICROK8S_SIM_ENABLE_DELAY_MS={ENABLE_DELAY_MS}\n\
             MICROK8S_SIM_HEARTBEAT_MS=1000\nRACKSEED_SIM_SUBNET={SUBNET}\n"
        ),
    )
    .unwrap();
    let net = dir.join("etc/systemd/network");
    std::fs::create_dir_all(&net).unwrap();
    let mut mgmt = Vec::new();
    for i in 0..NODES_MAX {
        let (mac, mgmt_mac) = qemu::node::node_macs(cluster_id, i);
        std::fs::write(
            net.join(format!("10-cluster-{i}.network")),
            format!(
                "[Match]\nMACAddress={mac}\n\n[Network]\nAddress={SUBNET}{}/24\n\
                 LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
                10 + u32::from(i)
            ),
        )
        .unwrap();
        mgmt.push(mgmt_mac);
    }
    std::fs::write(
        net.join("20-mgmt.network"),
        format!(
            "[Match]\nMACAddress={}\n\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\n\
             IPv6AcceptRA=no\n",
            mgmt.join(" ")
        ),
    )
    .unwrap();
}

/// `config` with the suite the build machine's apt sources name appended (it must end inside
/// `[image.base]`; the mirror, left out, defaults to the same sources).
pub fn with_host_suite(config: &str) -> String {
    use imagebuilder::base::apt_sources;
    let (suite, _) = apt_sources::main_suite(&apt_sources::read_sources(Path::new("/etc/apt")))
        .expect("the build machine's apt sources name no release suite");
    format!("{config}suite = \"{suite}\"\n")
}

/// A work folder, the cluster folder inside it, and the cluster id the launcher will derive
/// MACs from (the canonical cluster folder).
pub fn workdir() -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let tmp = tempfile::Builder::new()
        .prefix("rackseed-e2e-")
        .tempdir()
        .unwrap();
    let work = std::fs::canonicalize(tmp.path()).unwrap();
    let cluster_dir = work.join("cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let id = std::fs::canonicalize(&cluster_dir)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    (tmp, work, cluster_dir, id)
}

/// Builds an image with the `imagebuilder` binary, as a user would, plus the test overlay;
/// returns the raw image.
pub async fn build_image(work: &Path, config: &Path, firstboot: &Path, overlay: &Path) -> PathBuf {
    build_image_with(
        work,
        config,
        firstboot,
        &["--overlay".into(), overlay.as_os_str().to_owned()],
    )
    .await
}

/// The simulator's binaries (`microk8s`, `dqlite` of this workspace's host build), stripped,
/// in `dir`: what `imagebuilder build --microk8s simulated --simulator-bin DIR` takes.
pub async fn simulator_bins(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["microk8s", "dqlite"] {
        stripped(&bin(name), &dir.join(name)).await;
    }
    dir.to_path_buf()
}

/// Builds an image with the `imagebuilder` binary and `extra` arguments; returns the raw image.
pub async fn build_image_with(
    work: &Path,
    config: &Path,
    firstboot: &Path,
    extra: &[std::ffi::OsString],
) -> PathBuf {
    let ib = bin("imagebuilder");
    let secret = work.join("e2e.secret");
    if !secret.exists() {
        run(Cmd::new(&ib, Duration::from_secs(30))
            .args(["secret", "new"])
            .arg(&secret))
        .await;
    }
    let out = work.join("out");
    let t = Instant::now();
    let log = run(Cmd::new(&ib, Duration::from_secs(3600))
        .arg("build")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(&out)
        .arg("--firstboot-bin")
        .arg(firstboot)
        .arg("--overlays")
        .arg(repo().join("overlays"))
        .args(extra))
    .await;
    println!("image built in {:.1} s\n{log}", t.elapsed().as_secs_f64());
    std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "img"))
        .expect("the build wrote an .img")
}

/// One node's status over its management port, if it answers.
pub async fn status(cluster: &Cluster, node: &str) -> Option<StatusDoc> {
    let addr = cluster.mgmt_addr(node).ok()?;
    let out = Cmd::new("curl", Duration::from_secs(10))
        .args(["-sk", "--max-time", "5"])
        .arg(format!("https://{addr}/status.json"))
        .output()
        .await
        .ok()?;
    serde_json::from_str(&out.stdout).ok()
}

/// Watches the nodes, remembering when (since power-on) each one was first seen in each phase.
/// If the test panics anywhere while it is alive, it prints every node's serial log tail.
pub struct Watch {
    pub start: Instant,
    pub phases: BTreeMap<String, Vec<(String, f64)>>,
    pub last: BTreeMap<String, StatusDoc>,
    cluster_dir: PathBuf,
    dumped: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.dumped {
            match Cluster::open(&self.cluster_dir) {
                Ok(c) => dump(&c, &self.last),
                Err(e) => eprintln!(
                    "no cluster to dump in {}: {e:#}",
                    self.cluster_dir.display()
                ),
            }
        }
    }
}

impl Watch {
    /// Call just before powering on the cluster in `cluster_dir`.
    pub fn new(cluster_dir: &Path) -> Watch {
        Watch {
            start: Instant::now(),
            phases: BTreeMap::new(),
            last: BTreeMap::new(),
            cluster_dir: cluster_dir.to_path_buf(),
            dumped: false,
        }
    }

    pub async fn poll(&mut self, cluster: &Cluster, nodes: &[String]) {
        for n in nodes {
            if let Some(doc) = status(cluster, n).await {
                let seen = self.phases.entry(n.clone()).or_default();
                if seen.last().map(|(p, _)| p != &doc.phase).unwrap_or(true) {
                    let at = self.start.elapsed().as_secs_f64();
                    println!("[{at:7.1} s] {n}: {} ({:?})", doc.phase, doc.role);
                    seen.push((doc.phase.clone(), at));
                }
                self.last.insert(n.clone(), doc);
            }
        }
    }

    /// Polls until `done` holds for the latest documents; returns seconds since power-on, or
    /// fails with every node's serial tail.
    pub async fn until(
        &mut self,
        cluster: &Cluster,
        nodes: &[String],
        what: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, StatusDoc>) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll(cluster, nodes).await;
            if done(&self.last) {
                return self.start.elapsed().as_secs_f64();
            }
            if Instant::now() > deadline {
                dump(cluster, &self.last);
                self.dumped = true;
                panic!("{what}: not reached within {timeout:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Prints every node's last status and serial log tail.
pub fn dump(cluster: &Cluster, last: &BTreeMap<String, StatusDoc>) {
    for n in cluster.node_names() {
        eprintln!("==== {n}: last status: {:?}", last.get(&n));
        match cluster.serial_tail(&n, 60) {
            Ok(t) => eprintln!("==== {n}: serial log (last 60 lines)\n{t}"),
            Err(e) => eprintln!("==== {n}: no serial log: {e:#}"),
        }
    }
}

/// A multi-thread runtime for a test body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
