//! End-to-end: a flash-equivalent x86_64-efi image, built by `imagebuilder build` from a
//! bootstrapped Debian base with the product's `--microk8s simulated` option (the QEMU
//! test-cluster image) and nothing else, boots as three QEMU nodes under OVMF with the
//! launcher's per-VM cloud-init NoCloud seeds (no test overlay: the seeds give the addresses)
//! and forms an HA cluster. In the same run it checks what a cloud-style first boot must give:
//! each VM has the address its seed names; the user and SSH key from the image's seed let the
//! test log in over each VM's forwarded SSH port; SSH host keys and machine-ids differ between
//! VMs; the root filesystem fills the (larger than the image) disk; the nodes say "MicroK8s
//! simulated". Then the VM holding the floating API address is hard-killed and the API is
//! reached through the floating address again from a survivor (the time is printed), the other
//! two keep quorum, a 4th node from the same image joins as a worker by itself, and the killed
//! node restarts as a member without forming anything.
//!
//! Node status is read over each node's management port (QEMU user networking forwards
//! `127.0.0.1:PORT` to the guest's coordinator port 7443, `/status.json`). On failure the tail
//! of every node's serial log is printed. The figures (power-on to HA, time per phase, API
//! failover) are printed; `cargo test -p imagebuilder --test e2e_qemu -- --nocapture` shows them.
//!
//! Needs root (debootstrap), qemu-system-x86, OVMF, qemu-utils, e2fsprogs, dosfstools, mtools,
//! curl, openssh-client, and the workspace's binaries (`cargo build --workspace --bins`): it
//! fails with a message naming what is missing, never skips.

mod e2e_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e_support::*;
use qemu::{Cluster, ClusterSpec};
use rackseed_host::command::Cmd;
use rackseed_protocol::status::StatusDoc;

/// Software-emulated VMs sharing 2 cores boot slowly; these bound each stage.
// Boot under TCG with cloud-init and snapd, then up to 120 s waiting for time synchronisation
// (no NTP on the test network), then formation: 900 s was missed once on a loaded machine.
const FORM_TIMEOUT: Duration = Duration::from_secs(1500);
const STAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// The floating API address, on the launcher's default cluster subnet (192.168.76.0/24).
const API_ADDRESS: &str = "192.168.76.100";
/// Each VM's disk is larger than the 3 GiB image: the root filesystem must grow into it.
const DISK_SIZE: &str = "4G";
const DISK_BYTES: u64 = 4 << 30;

const CONFIG: &str = r#"
[cluster]
name = "e2e"
control-plane = 3
expected-nodes = 3
standbys = 0          # the 4th VM must join as a worker
formation-timeout = "30m"
secret-file = "e2e.secret"
api-address = "192.168.76.100"
api-check-interval = "5s"   # under TCG one curl of /readyz takes over a second

[addons]
storage = "none"

[addons.metallb]
addresses = ["192.168.76.200-192.168.76.220"]

[network]
addressing = "dhcp"

[image]
target = "x86_64-efi"
disk-size = "3GiB"

[[image.users]]
name = "tester"
ssh-keys = ["@KEY@"]

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

fn holds_api_address(d: &StatusDoc) -> bool {
    d.api_address.as_ref().is_some_and(|a| a.held_here)
}

#[test]
fn three_vms_form_ha_survive_the_api_holder_and_take_a_worker() {
    require_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("debugfs", "e2fsprogs"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("curl", "curl"),
        ("strip", "binutils"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("ssh-keyscan", "openssh-client"),
    ]);
    runtime().block_on(e2e());
}

/// Logs in to a VM over its forwarded SSH port as the seed's user with the test's key.
struct Ssh {
    key: PathBuf,
}

impl Ssh {
    fn cmd(&self, addr: SocketAddr, script: &str, timeout: Duration) -> Cmd {
        Cmd::new("ssh", timeout)
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &addr.port().to_string()])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=30",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("tester@{}", addr.ip()))
            .arg(script)
    }

    /// Runs `script`, retrying the login until `timeout` (sshd and cloud-init's user may come
    /// up after the agent).
    async fn run(&self, addr: SocketAddr, script: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .cmd(addr, script, Duration::from_secs(60))
                .output()
                .await
            {
                Ok(out) if out.code() == Some(0) => return out.stdout,
                Ok(out) if Instant::now() > deadline => panic!(
                    "ssh tester@{addr} {script:?}: exit {:?}: {}",
                    out.code(),
                    out.stderr
                ),
                Err(e) if Instant::now() > deadline => panic!("ssh tester@{addr}: {e}"),
                _ => tokio::time::sleep(Duration::from_secs(3)).await,
            }
        }
    }
}

/// The VM's public SSH host keys, read through a login (sorted "type key" pairs).
async fn host_keys_over_ssh(ssh: &Ssh, addr: SocketAddr) -> Vec<String> {
    let out = ssh
        .run(addr, "cat /etc/ssh/ssh_host_*_key.pub", STAGE_TIMEOUT)
        .await;
    let mut keys: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(format!("{} {}", f.next()?, f.next()?))
        })
        .collect();
    keys.sort();
    keys
}

async fn e2e() {
    let (_tmp, work, cluster_dir, _cluster_id) = workdir();
    let key = work.join("id_ed25519");
    run(Cmd::new("ssh-keygen", Duration::from_secs(30))
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e-test", "-f"])
        .arg(&key))
    .await;
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let ssh = Ssh { key: key.clone() };
    let config = work.join("e2e.toml");
    std::fs::write(
        &config,
        with_host_suite(&CONFIG.replace("@KEY@", pubkey.trim())),
    )
    .unwrap();
    let firstboot = work.join("firstboot");
    stripped(&bin("firstboot"), &firstboot).await;
    let sim = simulator_bins(&work.join("sim")).await;
    let image = build_image_with(
        &work,
        &config,
        &firstboot,
        &[
            "--microk8s".into(),
            "simulated".into(),
            "--simulator-bin".into(),
            sim.into_os_string(),
        ],
    )
    .await;
    check_inspect_says_simulated(&image).await;

    // The seeds carry the image's own user-data (its users and keys) and their own addresses.
    let user_data = imagebuilder::qemu_cluster::image_user_data(&image)
        .await
        .expect("reading the image's user-data")
        .expect("the image has a cloud-init seed");
    assert!(user_data.contains("tester"), "{user_data}");

    // Power on three nodes.
    let mut spec = ClusterSpec::new(&image, &cluster_dir);
    spec.nodes = 3;
    spec.memory_mib = 768;
    spec.disk_size = Some(DISK_SIZE.into());
    spec.user_data = Some(user_data);
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
    // Each node has the address its seed names, and reaches its peers on the cluster network
    // (never on the management NIC's 10.0.2.15, the same address on every VM).
    let rows = cluster.status();
    for (row, d) in rows.iter().zip(&docs) {
        let want = row.address.expect("the launcher gave the node an address");
        assert_eq!(
            d.address.as_deref(),
            Some(want.to_string().as_str()),
            "{}: the address from its seed",
            row.name
        );
        assert!(
            d.microk8s_simulated,
            "{}: MicroK8s simulated shown",
            row.name
        );
        assert_eq!(d.peers.len(), 2, "{d:?}");
        for p in &d.peers {
            assert!(
                p.address.starts_with(SUBNET),
                "peer on the cluster network: {d:?}"
            );
        }
    }
    assert!(docs.iter().any(addons_enabled));
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

    check_first_boot(&cluster, &ssh).await;

    // Hard-kill the VM holding the floating API address; the API answers through the address
    // again from a survivor.
    // keepalived is configured once the members are known and takes the address after its
    // election (seconds to a minute under TCG): wait for exactly one holder.
    let held_at = watch
        .until(
            &cluster,
            &first3,
            "the API address held by one node",
            STAGE_TIMEOUT,
            |docs| docs.values().filter(|d| holds_api_address(d)).count() == 1,
        )
        .await;
    println!("API address {API_ADDRESS} held {held_at:.1} s after power-on");
    let docs: Vec<StatusDoc> = first3.iter().map(|n| watch.last[n].clone()).collect();
    let holders: Vec<&String> = first3
        .iter()
        .zip(&docs)
        .filter(|(_, d)| holds_api_address(d))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(holders.len(), 1, "exactly one holder: {docs:?}");
    let killed = holders[0].clone();
    let killed_id = watch.last[&killed].node_id.clone();
    let others: Vec<String> = first3.iter().filter(|n| **n != killed).cloned().collect();
    let survivor_ssh = cluster.status()[cluster
        .node_names()
        .iter()
        .position(|n| *n == others[0])
        .unwrap()]
    .ssh_addr
    .expect("an SSH forward");
    let probe = format!(
        "curl -sk --max-time 2 -o /dev/null -w '%{{http_code}}' https://{API_ADDRESS}:16443/readyz"
    );
    let before = ssh.run(survivor_ssh, &probe, STAGE_TIMEOUT).await;
    assert_ne!(
        before.trim(),
        "000",
        "the API answers through {API_ADDRESS}"
    );
    assert!(cluster.kill(&killed).await.unwrap(), "{killed} was running");
    let killed_at = Instant::now();
    let since_power_on = watch.start.elapsed().as_secs_f64();
    watch.last.remove(&killed);
    let failover = loop {
        let out = ssh
            .cmd(survivor_ssh, &probe, Duration::from_secs(20))
            .output()
            .await;
        if let Ok(o) = out {
            if o.code() == Some(0) && o.stdout.trim() != "000" {
                break killed_at.elapsed().as_secs_f64();
            }
        }
        assert!(
            killed_at.elapsed() < STAGE_TIMEOUT,
            "the API did not answer through {API_ADDRESS} within {STAGE_TIMEOUT:?} of the kill"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "killed the API address holder {killed} at {since_power_on:.1} s; the API answered \
         through {API_ADDRESS} again {failover:.1} s later (probe from {} over SSH, every 0.5 s)",
        others[0]
    );
    watch
        .until(
            &cluster,
            &others,
            "quorum kept and the address held by a survivor",
            STAGE_TIMEOUT,
            |docs| {
                docs.len() == 2
                    && docs.values().all(cp_ha)
                    && docs.values().filter(|d| holds_api_address(d)).count() == 1
            },
        )
        .await;
    println!("the other two keep quorum and one of them holds {API_ADDRESS}");

    // A 4th node from the same image joins as a worker by itself, and the killed node comes
    // back as a member and forms nothing: both are powered on together (each boot costs
    // minutes under TCG). The killed node learns the record it missed (the worker) with a
    // round of its own once it sees the newer announcements, which may finish after its
    // MicroK8s reports HA: wait for both.
    let fourth = cluster.add().await.expect("qemu add");
    cluster.start(&killed).await.expect("qemu start");
    let all: Vec<String> = cluster.node_names();
    let is_worker = |d: &StatusDoc| {
        is_member(d)
            && d.role.as_deref() == Some("worker")
            && d.microk8s
                .as_ref()
                .is_some_and(|m| m.note.as_deref() == Some("worker node"))
    };
    let worker_at = watch
        .until(
            &cluster,
            &all,
            "4th node is a worker",
            FORM_TIMEOUT,
            |docs| docs.get(&fourth).is_some_and(is_worker),
        )
        .await;
    let fourth_row = cluster
        .status()
        .into_iter()
        .find(|r| r.name == fourth)
        .unwrap();
    assert_eq!(
        watch.last[&fourth].address.as_deref(),
        fourth_row.address.map(|a| a.to_string()).as_deref(),
        "qemu add gave the 4th node its seed's address"
    );
    println!("{fourth} joined as a worker at {worker_at:.1} s");
    let back_at = watch
        .until(
            &cluster,
            &all,
            "the killed node is back and knows the 4 members",
            FORM_TIMEOUT,
            |docs| {
                docs.get(&killed)
                    .is_some_and(|d| cp_ha(d) && d.members.len() == 4)
            },
        )
        .await;
    let back = &watch.last[&killed];
    assert_eq!(back.node_id, killed_id, "same identity after the restart");
    assert_eq!(back.cluster, docs[0].cluster, "same cluster");
    for e in &back.timeline {
        assert!(
            !e.what.contains("joining cluster") && !e.what.contains("elect"),
            "the restarted node must not join or elect again: {:?}",
            back.timeline
        );
    }
    assert_eq!(back.members.len(), 4, "4 members: {:?}", back.members);
    println!(
        "{killed} back as a member at {back_at:.1} s: {:?}",
        back.timeline
    );

    cluster.kill_on_drop(false);
    cluster.down().await.expect("qemu down");
}

/// `imagebuilder inspect` names the simulator.
async fn check_inspect_says_simulated(image: &Path) {
    let out = run(Cmd::new(bin("imagebuilder"), Duration::from_secs(120))
        .arg("inspect")
        .arg(image))
    .await;
    assert!(
        out.contains("microk8s: MicroK8s simulated"),
        "inspect shows the simulator: {out}"
    );
}

/// What a cloud-style first boot gives each of the first three VMs, checked over SSH as the
/// seed's user: the login itself (user and key from the seed), distinct machine-ids and SSH
/// host keys, and a root filesystem grown to the disk.
async fn check_first_boot(cluster: &Cluster, ssh: &Ssh) {
    let mut machine_ids = BTreeSet::new();
    let mut host_key_sets = BTreeSet::new();
    for row in cluster.status() {
        let addr = row.ssh_addr.expect("an SSH forward");
        let out = ssh
            .run(
                addr,
                "id -un; cat /etc/machine-id; lsblk -bndo SIZE /dev/vda; \
                 df -B1 --output=size / | tail -n1; cat /etc/issue.d/*.issue",
                STAGE_TIMEOUT,
            )
            .await;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert!(lines.len() >= 5, "{}: {out}", row.name);
        assert_eq!(
            lines[0], "tester",
            "{}: logged in as the seed's user",
            row.name
        );
        let mid = lines[1];
        assert!(
            mid.len() == 32 && mid.chars().all(|c| c.is_ascii_hexdigit()),
            "{}: machine-id {mid:?}",
            row.name
        );
        machine_ids.insert(mid.to_string());
        let disk: u64 = lines[2].parse().unwrap();
        let root: u64 = lines[3].parse().unwrap();
        assert_eq!(
            disk, DISK_BYTES,
            "{}: the VM's disk is {DISK_SIZE}",
            row.name
        );
        // The ESP and the partition table take the rest; an ungrown root would be < 3 GiB.
        assert!(
            root > disk - (600 << 20),
            "{}: the root filesystem ({root} bytes) fills the disk ({disk} bytes)",
            row.name
        );
        assert!(
            out.contains("MicroK8s simulated"),
            "{}: the login banner says MicroK8s simulated: {out}",
            row.name
        );
        // Read over the logged-in session: ssh-keyscan through the forward timed out (exit 1)
        // on a loaded machine although the login worked.
        let keys = host_keys_over_ssh(ssh, addr).await;
        assert!(!keys.is_empty(), "{}: no SSH host keys", row.name);
        host_key_sets.insert(keys);
        println!(
            "{}: logged in as tester over {addr}; machine-id {mid}; root filesystem {root} of \
             {disk} bytes",
            row.name
        );
    }
    // Where a first boot's time goes under TCG (figures only, printed for the record; each
    // query bounded: PID 1 answered none of them within 120 s once, on a loaded machine).
    if let Some(addr) = cluster.status().first().and_then(|r| r.ssh_addr) {
        let out = ssh
            .cmd(
                addr,
                "timeout 15 systemctl list-jobs --no-pager | head -n 15; \
                 timeout 15 systemd-analyze time; \
                 timeout 15 systemd-analyze blame | head -n 15",
                Duration::from_secs(60),
            )
            .output()
            .await;
        match out {
            Ok(o) => println!("first boot of node0, systemd-analyze:\n{}", o.stdout),
            Err(e) => println!("systemd-analyze over SSH failed: {e:#}"),
        }
    }
    let n = cluster.node_names().len();
    assert_eq!(machine_ids.len(), n, "machine-ids differ: {machine_ids:?}");
    assert_eq!(host_key_sets.len(), n, "SSH host keys differ between VMs");
}
