//! End-to-end on arm64: the rpi4 image, built from a bootstrapped Debian arm64 base with the
//! cross-built `firstboot` and the test-only overlay (the simulator, cross-built too), boots its
//! root filesystem under `qemu-system-aarch64 -M virt` with the kernel and initrd taken from its
//! `system-boot` partition. Two nodes start `firstboot`, announce themselves (each sees the
//! other), and form a cluster (one control-plane node, one worker).
//!
//! Needs what `e2e_qemu.rs` needs plus qemu-system-arm, an aarch64 binfmt handler for the full
//! arm64 bootstrap (scripts/install-deps registers it), and the aarch64 builds
//! (`scripts/build-firstboot-aarch64 --with-simulator`; scripts/test runs it first with
//! `RACKSEED_CROSS_PROFILE=cross-test`, which this test reads too). Fails, never skips, when any
//! is missing.

mod e2e_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e_support::*;
use qemu::{Arch, BootSource, Cluster, ClusterSpec};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const START_TIMEOUT: Duration = Duration::from_secs(900);
const FORM_TIMEOUT: Duration = Duration::from_secs(600);

const CONFIG: &str = r#"
[cluster]
name = "e2e-arm"
control-plane = 1
standbys = 0          # the second node must join as a worker
expected-nodes = 2
formation-timeout = "30m"
secret-file = "e2e.secret"

[addons]
storage = "none"

[network]
addressing = "dhcp"

[image]
target = "rpi4"
disk-size = "3GiB"

[image.base]
kind = "bootstrap"
"#;

/// The aarch64 builds of firstboot and the simulator, where `scripts/build-firstboot-aarch64`
/// puts them: `$RACKSEED_CROSS_TARGET_DIR` (default `target/cross`), then the triple, then the
/// cargo profile `$RACKSEED_CROSS_PROFILE` (default `release`; scripts/test builds and runs
/// with `cross-test`, a test-only profile that compiles several times faster).
fn cross_dir() -> PathBuf {
    let target_dir = std::env::var_os("RACKSEED_CROSS_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/cross"));
    let profile = std::env::var("RACKSEED_CROSS_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "release".into());
    let dir = target_dir.join(TRIPLE).join(&profile);
    for b in ["firstboot", "microk8s", "dqlite"] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: run `scripts/build-firstboot-aarch64 --with-simulator --profile \
             {profile}` first (scripts/test does), with the same RACKSEED_CROSS_TARGET_DIR",
            dir.join(b).display()
        );
    }
    println!("aarch64 binaries from {}", dir.display());
    dir
}

/// Copies `name` out of the image's `system-boot` partition (found by label).
async fn from_system_boot(image: &Path, name: &str, dest: &Path, scratch: &Path) {
    let table = imagebuilder::disk::read_table(image).await.unwrap();
    let part = table.by_label("system-boot").unwrap();
    let fat = imagebuilder::disk::fat::FatVolume::new(image, part.start);
    let data = fat
        .read(name, scratch)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("system-boot has no {name}"));
    std::fs::write(dest, data).unwrap();
}

#[test]
fn rpi4_image_boots_under_virt_and_two_nodes_form() {
    require_tools(&[
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("qemu-img", "qemu-utils"),
        ("debugfs", "e2fsprogs"),
        ("mcopy", "mtools"),
        ("curl", "curl"),
    ]);
    runtime().block_on(e2e_arm64());
}

async fn e2e_arm64() {
    let cross = cross_dir();
    let (_tmp, work, cluster_dir, cluster_id) = workdir();
    let overlay = work.join("overlay");
    write_overlay(&overlay, &cluster_id, &cross, false).await;
    let config = work.join("e2e.toml");
    std::fs::write(&config, with_host_suite(CONFIG)).unwrap();
    let image = build_image(&work, &config, &cross.join("firstboot"), &overlay).await;

    let kernel = work.join("vmlinuz");
    let initrd = work.join("initrd.img");
    from_system_boot(&image, "vmlinuz", &kernel, &work).await;
    from_system_boot(&image, "initrd.img", &initrd, &work).await;

    let mut spec = ClusterSpec::new(&image, &cluster_dir);
    spec.nodes = 2;
    spec.arch = Arch::Aarch64;
    spec.memory_mib = 1024;
    spec.boot = BootSource::Kernel {
        kernel,
        initrd: Some(initrd),
        append: "console=ttyAMA0 root=LABEL=writable rootfstype=ext4 rootwait rw".into(),
    };
    let mut watch = Watch::new(&cluster_dir);
    let mut cluster = Cluster::up(spec).await.expect("qemu up");
    cluster.kill_on_drop(true);
    let nodes = cluster.node_names();
    println!("powered on {nodes:?} (aarch64, -M virt)");

    // firstboot starts, announces itself (the other node sees it), and reaches its first phase.
    let started = watch
        .until(
            &cluster,
            &nodes,
            "firstboot running and announcing on both arm64 nodes",
            START_TIMEOUT,
            |docs| {
                docs.len() == 2
                    && docs.values().all(|d| {
                        d.timeline.iter().any(|e| e.what == "preparing node")
                            && d.peers.iter().any(|p| p.address.starts_with(SUBNET))
                    })
            },
        )
        .await;
    println!("both arm64 agents running and seeing each other {started:.1} s after power-on");

    // The plus: the two form a cluster (1 control plane, 1 worker).
    let formed = watch
        .until(
            &cluster,
            &nodes,
            "2-node arm64 formation",
            FORM_TIMEOUT,
            |docs| {
                docs.len() == 2
                    && docs.values().all(|d| d.phase == "member")
                    && docs
                        .values()
                        .filter(|d| d.role.as_deref() == Some("worker"))
                        .count()
                        == 1
            },
        )
        .await;
    println!("2-node arm64 cluster formed {formed:.1} s after power-on");
    for n in &nodes {
        println!("  {n} phases since power-on: {:?}", watch.phases[n]);
    }

    cluster.kill_on_drop(false);
    cluster.down().await.expect("qemu down");
}
