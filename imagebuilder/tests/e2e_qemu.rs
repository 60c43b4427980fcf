//! End-to-end: a flash-equivalent x86_64-efi image, built from a bootstrapped Debian base with
//! the MicroK8s simulator laid in through the test-only overlay (`tests/e2e-overlay`), boots as
//! three QEMU nodes under OVMF on one loopback multicast network and forms an HA cluster. Then
//! the seed's VM is hard-killed (the other two keep quorum), a 4th node boots from the same
//! image and joins as a worker, and the killed node is restarted and comes back as a member
//! without forming anything.
//!
//! Node status is read over each node's management port (QEMU user networking forwards
//! `127.0.0.1:PORT` to the guest's coordinator port 7443, `/status.json`). On failure the tail
//! of every node's serial log is printed. The figures (power-on to HA, time per phase) are
//! printed at the end; `cargo test -p imagebuilder --test e2e_qemu -- --nocapture` shows them.
//!
//! Needs root (debootstrap), qemu-system-x86, OVMF, qemu-utils, e2fsprogs, curl, and the
//! workspace's binaries (`cargo build --workspace --bins`): it fails with a message naming
//! what is missing, never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use firstboot::status::StatusDoc;
use firstboot::system::command::Cmd;
use qemu::{Cluster, ClusterSpec};

/// Simulated MicroK8s: each join takes this long, each addon enable this long.
const JOIN_DELAY_MS: u64 = 3000;
const ENABLE_DELAY_MS: u64 = 2000;
/// Software-emulated VMs sharing 2 cores boot slowly; these bound each stage.
const FORM_TIMEOUT: Duration = Duration::from_secs(900);
const STAGE_TIMEOUT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_secs(3);
/// The test network (one static address per MAC, written into the overlay).
const SUBNET: &str = "192.168.76.";
const NODES_MAX: u8 = 4;

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_imagebuilder")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn require_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the QEMU end-to-end test needs root (debootstrap); CI runs it as root"
    );
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "debugfs",
        "mkfs.ext4",
        "curl",
        "strip",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not installed (scripts/install-deps installs it)"
        );
    }
}

async fn run(cmd: Cmd) -> String {
    let what = cmd.display();
    match cmd.run().await {
        Ok(out) => out.stdout,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// A copy of `from` without debug info (smaller images, faster copies).
async fn stripped(from: &Path, to: &Path) {
    run(Cmd::new("strip", Duration::from_secs(60))
        .args(["--strip-debug", "-o"])
        .arg(to)
        .arg(from))
    .await;
}

/// The overlay: the repository's test tree, the simulator binaries, the per-MAC network files
/// and the simulator's settings.
async fn write_overlay(dir: &Path, cluster_id: &str) {
    let src = repo().join("tests/e2e-overlay/root");
    run(Cmd::new("cp", Duration::from_secs(60))
        .args(["-a", "--no-target-directory"])
        .arg(&src)
        .arg(dir))
    .await;
    let lib = dir.join("usr/local/lib/rackseed-sim");
    for (from, to) in [("microk8s", "microk8s-sim"), ("dqlite", "dqlite-sim")] {
        stripped(&bin(from), &lib.join(to)).await;
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

const CONFIG: &str = r#"
[cluster]
name = "e2e"
control-plane = 3
expected-nodes = 3
formation-timeout = "30m"
secret-file = "e2e.secret"

[addons]
storage = "none"

[addons.metallb]
addresses = ["192.168.76.200-192.168.76.220"]

[network]
addressing = "dhcp"

[image]
target = "x86_64-efi"
disk-size = "3GiB"

[image.base]
kind = "bootstrap"
"#;

/// The config, with the suite the build machine's apt sources name (the mirror, left out,
/// defaults to the same sources).
fn config_text() -> String {
    use imagebuilder::base::apt_sources;
    let (suite, _) = apt_sources::main_suite(&apt_sources::read_sources(Path::new("/etc/apt")))
        .expect("the build machine's apt sources name no release suite");
    format!("{CONFIG}suite = \"{suite}\"\n")
}

/// One node's status over its management port, if it answers.
async fn status(cluster: &Cluster, node: &str) -> Option<StatusDoc> {
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
struct Watch {
    start: Instant,
    phases: BTreeMap<String, Vec<(String, f64)>>,
    last: BTreeMap<String, StatusDoc>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            start: Instant::now(),
            phases: BTreeMap::new(),
            last: BTreeMap::new(),
        }
    }

    async fn poll(&mut self, cluster: &Cluster, nodes: &[String]) {
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

    /// Polls until `done` holds for the latest documents, or fails with every serial tail.
    async fn until(
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
                panic!("{what}: not reached within {timeout:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn dump(cluster: &Cluster, last: &BTreeMap<String, StatusDoc>) {
    for n in cluster.node_names() {
        eprintln!("==== {n}: last status: {:?}", last.get(&n));
        match cluster.serial_tail(&n, 60) {
            Ok(t) => eprintln!("==== {n}: serial log (last 60 lines)\n{t}"),
            Err(e) => eprintln!("==== {n}: no serial log: {e:#}"),
        }
    }
}

fn is_member(d: &StatusDoc) -> bool {
    d.phase == "member"
}

fn cp_ha(d: &StatusDoc) -> bool {
    is_member(d)
        && d.role.as_deref() == Some("control-plane")
        && d.microk8s
            .as_ref()
            .is_some_and(|m| m.running && m.ha && m.voters.len() == 3)
}

fn addons_enabled(d: &StatusDoc) -> bool {
    !d.addons.is_empty() && d.addons.iter().all(|a| a.state == "enabled")
}

#[test]
fn three_vms_form_ha_survive_the_seed_and_take_a_worker() {
    require_tools();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(e2e());
}

async fn e2e() {
    let tmp = tempfile::Builder::new()
        .prefix("rackseed-e2e-")
        .tempdir()
        .unwrap();
    let work = std::fs::canonicalize(tmp.path()).unwrap();
    let cluster_dir = work.join("cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    // The launcher derives MACs from the canonical cluster directory; the image's network files
    // match them.
    let cluster_id = std::fs::canonicalize(&cluster_dir)
        .unwrap()
        .to_string_lossy()
        .into_owned();

    // Build the image, exactly as a user would, plus the test-only overlay.
    let overlay = work.join("overlay");
    write_overlay(&overlay, &cluster_id).await;
    let config = work.join("e2e.toml");
    std::fs::write(&config, config_text()).unwrap();
    let ib = bin("imagebuilder");
    run(Cmd::new(&ib, Duration::from_secs(30))
        .args(["secret", "new"])
        .arg(work.join("e2e.secret")))
    .await;
    let firstboot = work.join("firstboot");
    stripped(&bin("firstboot"), &firstboot).await;
    let out = work.join("out");
    let t = Instant::now();
    let log = run(Cmd::new(&ib, Duration::from_secs(1800))
        .arg("build")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .arg("--firstboot-bin")
        .arg(&firstboot)
        .arg("--overlays")
        .arg(repo().join("overlays"))
        .arg("--overlay")
        .arg(&overlay))
    .await;
    println!("image built in {:.1} s{log}", t.elapsed().as_secs_f64());
    let image = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "img"))
        .expect("the build wrote an .img");

    // Power on three nodes.
    let mut spec = ClusterSpec::new(&image, &cluster_dir);
    spec.nodes = 3;
    spec.memory_mib = 768;
    let mut watch = Watch::new();
    let mut cluster = Cluster::up(spec).await.expect("qemu up");
    cluster.kill_on_drop(true);
    let first3 = cluster.node_names();
    println!("powered on {first3:?} ({})", cluster.dir().display());

    let formed = watch
        .until(&cluster, &first3, "3 voters, HA", FORM_TIMEOUT, |docs| {
            docs.len() == 3 && docs.values().all(cp_ha)
        })
        .await;
    let addons_at = watch
        .until(&cluster, &first3, "addons enabled", STAGE_TIMEOUT, |docs| {
            docs.values().any(addons_enabled)
        })
        .await;
    let docs: Vec<StatusDoc> = first3.iter().map(|n| watch.last[n].clone()).collect();
    let clusters: std::collections::BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "one cluster: {clusters:?}");
    let members: std::collections::BTreeSet<_> =
        docs.iter().map(|d| format!("{:?}", d.members)).collect();
    assert_eq!(
        members.len(),
        1,
        "every node agrees on the members: {members:?}"
    );
    for d in &docs {
        let addr = d.address.clone().unwrap_or_default();
        assert!(
            addr.starts_with(SUBNET),
            "announced on the cluster network: {d:?}"
        );
    }
    let enabled: Vec<_> = docs
        .iter()
        .filter(|d| addons_enabled(d))
        .map(|d| &d.node_id)
        .collect();
    assert!(!enabled.is_empty());
    println!(
        "HA formed {formed:.1} s after power-on (simulated join {JOIN_DELAY_MS} ms, enable \
         {ENABLE_DELAY_MS} ms); addons enabled at {addons_at:.1} s"
    );
    for (n, d) in first3.iter().zip(&docs) {
        println!(
            "  {n} ({}) phases since power-on: {:?}",
            d.node_id, watch.phases[n]
        );
        for e in &d.timeline {
            println!("    agent +{:6.1} s  {}", e.at, e.what);
        }
    }

    // Hard-kill the seed (the node that granted the join slots).
    let seed_id = docs[0].authority.clone().expect("an authority");
    let seed = first3
        .iter()
        .zip(&docs)
        .find(|(_, d)| d.node_id == seed_id)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| panic!("the authority {seed_id} is one of the nodes"));
    assert!(cluster.kill(&seed).await.unwrap(), "{seed} was running");
    let killed_at = watch.start.elapsed().as_secs_f64();
    watch.last.remove(&seed);
    let others: Vec<String> = first3.iter().filter(|n| **n != seed).cloned().collect();
    // Let the survivors notice (the simulator's heartbeats), then check they keep quorum.
    tokio::time::sleep(Duration::from_secs(20)).await;
    watch
        .until(
            &cluster,
            &others,
            "quorum kept without the seed",
            STAGE_TIMEOUT,
            |docs| docs.len() == 2 && docs.values().all(cp_ha),
        )
        .await;
    println!("killed the seed {seed} at {killed_at:.1} s; the other two keep quorum");

    // A 4th node from the same image joins as a worker by itself.
    let fourth = cluster.add().await.expect("qemu add");
    let with4: Vec<String> = others.iter().cloned().chain([fourth.clone()]).collect();
    let worker_at = watch
        .until(
            &cluster,
            &with4,
            "4th node is a worker",
            FORM_TIMEOUT,
            |docs| {
                docs.get(&fourth).is_some_and(|d| {
                    is_member(d)
                        && d.role.as_deref() == Some("worker")
                        && d.microk8s
                            .as_ref()
                            .is_some_and(|m| m.note.as_deref() == Some("worker node"))
                })
            },
        )
        .await;
    println!("{fourth} joined as a worker at {worker_at:.1} s");

    // The killed node comes back as a member and forms nothing.
    cluster.start(&seed).await.expect("qemu start");
    let all: Vec<String> = cluster.node_names();
    let back_at = watch
        .until(
            &cluster,
            &all,
            "the killed node is back",
            FORM_TIMEOUT,
            |docs| docs.get(&seed).is_some_and(cp_ha),
        )
        .await;
    let back = &watch.last[&seed];
    assert_eq!(back.node_id, seed_id, "same identity after the restart");
    assert_eq!(back.cluster, docs[0].cluster, "same cluster");
    for e in &back.timeline {
        assert!(
            !e.what.contains("joining cluster") && !e.what.contains("elect"),
            "the restarted node must not join or elect again: {:?}",
            back.timeline
        );
    }
    let final_members = back.members.len();
    assert_eq!(final_members, 4, "4 members: {:?}", back.members);
    println!(
        "{seed} back as a member at {back_at:.1} s: {:?}",
        back.timeline
    );

    cluster.kill_on_drop(false);
    cluster.down().await.expect("qemu down");
}
