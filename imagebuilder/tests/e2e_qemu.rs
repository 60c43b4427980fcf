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

mod e2e_support;

use std::collections::BTreeSet;
use std::time::Duration;

use e2e_support::*;
use qemu::{Cluster, ClusterSpec};
use rackseed_protocol::status::StatusDoc;

/// Software-emulated VMs sharing 2 cores boot slowly; these bound each stage.
const FORM_TIMEOUT: Duration = Duration::from_secs(900);
const STAGE_TIMEOUT: Duration = Duration::from_secs(600);

const CONFIG: &str = r#"
[cluster]
name = "e2e"
control-plane = 3
expected-nodes = 3
standbys = 0          # the 4th VM must join as a worker
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
    require_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("debugfs", "e2fsprogs"),
        ("mkfs.ext4", "e2fsprogs"),
        ("curl", "curl"),
        ("strip", "binutils"),
    ]);
    runtime().block_on(e2e());
}

async fn e2e() {
    let (_tmp, work, cluster_dir, cluster_id) = workdir();
    let overlay = work.join("overlay");
    let host_bins = bin("microk8s").parent().unwrap().to_path_buf();
    write_overlay(&overlay, &cluster_id, &host_bins, true).await;
    let config = work.join("e2e.toml");
    std::fs::write(&config, with_host_suite(CONFIG)).unwrap();
    let firstboot = work.join("firstboot");
    stripped(&bin("firstboot"), &firstboot).await;
    let image = build_image(&work, &config, &firstboot, &overlay).await;

    // Power on three nodes.
    let mut spec = ClusterSpec::new(&image, &cluster_dir);
    spec.nodes = 3;
    spec.memory_mib = 768;
    let mut watch = Watch::new(&cluster_dir);
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
    let clusters: BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "one cluster: {clusters:?}");
    let members: BTreeSet<_> = docs.iter().map(|d| format!("{:?}", d.members)).collect();
    assert_eq!(
        members.len(),
        1,
        "every node agrees on the members: {members:?}"
    );
    // Peers are reached on the cluster network, never on the management NIC's 10.0.2.15
    // (the same address on every VM).
    for d in &docs {
        assert_eq!(d.peers.len(), 2, "{d:?}");
        for p in &d.peers {
            assert!(
                p.address.starts_with(SUBNET),
                "peer on the cluster network: {d:?}"
            );
        }
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

    // The killed node comes back as a member and forms nothing. It learns the record it
    // missed (the worker) with a round of its own once it sees the newer announcements, which
    // may finish after its MicroK8s reports HA: wait for both.
    cluster.start(&seed).await.expect("qemu start");
    let all: Vec<String> = cluster.node_names();
    let back_at = watch
        .until(
            &cluster,
            &all,
            "the killed node is back and knows the 4 members",
            FORM_TIMEOUT,
            |docs| {
                docs.get(&seed)
                    .is_some_and(|d| cp_ha(d) && d.members.len() == 4)
            },
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
