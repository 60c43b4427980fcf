//! VM tier: boots real QEMU nodes from a tiny guest (Debian's kernel + a busybox initramfs built
//! by `scripts/qemu-test-guest.sh`, cached under the target directory) and drives the whole
//! life cycle through the library API: up, serial markers, ping across the multicast network,
//! the management port forward, kill, start, add, a graceful stop, down.
//!
//! Needs qemu-system-x86, qemu-utils, busybox-static, cpio and apt lists (for
//! `apt-get download` of the kernel); fails with a message naming what is missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu::cli::{run_async, DirArg, QemuCommand, UpArgs};
use qemu::{
    AccelChoice, Arch, BootSource, Cluster, ClusterError, ClusterSpec, NodeRunState, StopOutcome,
};
use rackseed_host::command::Cmd;

const BOOT_WAIT: Duration = Duration::from_secs(120);
const PEERS: &str = "192.168.76.10,192.168.76.11,192.168.76.12";

static GUEST: tokio::sync::OnceCell<(PathBuf, PathBuf)> = tokio::sync::OnceCell::const_new();

/// Builds (once per script version, shared by the tests of this binary) the test guest and
/// returns (vmlinuz, initrd.gz).
async fn test_guest() -> (PathBuf, PathBuf) {
    GUEST.get_or_init(build_test_guest).await.clone()
}

async fn build_test_guest() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-test-guest.sh");
    let text = std::fs::read(&script).expect("reading scripts/qemu-test-guest.sh");
    let hash = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-test-guest-{hash:016x}"));
    let (kernel, initrd) = (out.join("vmlinuz"), out.join("initrd.gz"));
    if !(kernel.exists() && initrd.exists()) {
        Cmd::new("sh", Duration::from_secs(600))
            .arg(&script)
            .arg(&out)
            .run()
            .await
            .expect("building the test guest (needs apt lists, busybox-static, cpio)");
    }
    (kernel, initrd)
}

fn require_tools() {
    for tool in ["qemu-system-x86_64", "qemu-system-aarch64", "qemu-img"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not installed: apt-get install --no-install-recommends qemu-system-x86 qemu-system-arm qemu-utils"
        );
    }
}

/// GET / on the node's management port (forwarded to the guest's busybox httpd).
fn fetch_mgmt(addr: std::net::SocketAddr) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.contains("rackseed-test-guest") => return body,
            other if std::time::Instant::now() > deadline => {
                panic!("management port {addr} gave no page: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// A 16 MiB empty raw disk image.
async fn blank_image(dir: &Path) -> PathBuf {
    let image = dir.join("base.raw");
    Cmd::new("qemu-img", Duration::from_secs(30))
        .args(["create", "-q", "-f", "raw"])
        .arg(&image)
        .arg("16M")
        .run()
        .await
        .expect("creating a blank image with qemu-img");
    image
}

/// No such process, or only its zombie is left.
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.contains(") Z "),
    }
}

/// Runs `f`; on failure prints every node's serial tail before panicking.
async fn check<T>(c: &Cluster, what: &str, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            for n in c.node_names() {
                eprintln!(
                    "--- {n} serial ---\n{}",
                    c.serial_tail(&n, 40).unwrap_or_default()
                );
            }
            panic!("{what}: {e:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_life_cycle_with_a_tiny_guest() {
    require_tools();
    let (kernel, initrd) = test_guest().await;
    let tmp = tempfile::tempdir().unwrap();
    let image = blank_image(tmp.path()).await;
    let dir = tmp.path().join("cluster");

    let mut spec = ClusterSpec::new(&image, &dir);
    spec.nodes = 2;
    spec.memory_mib = 256;
    spec.accel = AccelChoice::Auto;
    spec.boot = BootSource::Kernel {
        kernel,
        initrd: Some(initrd),
        append: format!("console=ttyS0 quiet panic=-1 rackseed.peers={PEERS}"),
    };
    let started = std::time::Instant::now();
    let mut c = Cluster::up(spec.clone()).await.expect("cluster up");
    c.kill_on_drop(true);

    // A second `up` on the same directory is refused and harms nothing.
    let e = Cluster::up(spec).await.unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<ClusterError>(),
            Some(ClusterError::ClusterExists { .. })
        ),
        "{e:#}"
    );

    let nodes = c.node_names();
    assert_eq!(nodes, ["node0", "node1"]);
    let macs: Vec<String> = nodes
        .iter()
        .map(|n| c.node(n).unwrap().mac.clone())
        .collect();
    assert_ne!(macs[0], macs[1]);

    // Overlays are copy-on-write on the image.
    for n in &nodes {
        let overlay = &c.node(n).unwrap().overlay;
        let info = Cmd::new("qemu-img", Duration::from_secs(30))
            .args(["info", "--output=json", "-U"])
            .arg(overlay)
            .run()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(
            v["backing-filename"],
            image.canonicalize().unwrap().to_str().unwrap()
        );
    }

    // Each node boots, sees its disk, and prints to its own serial log.
    for (n, mac) in nodes.iter().zip(&macs) {
        let marker = format!("RACKSEED-GUEST up mac={mac} ip=");
        check(&c, "boot", c.wait_for_serial(n, &marker, BOOT_WAIT).await).await;
        let log = std::fs::read_to_string(&c.node(n).unwrap().serial_log).unwrap();
        // Its overlay and its NoCloud seed volume.
        assert!(
            log.contains("disks=2"),
            "{n} does not see its disk and its seed:\n{log}"
        );
        let seed = c.node(n).unwrap().seed.clone().expect("a seed volume");
        assert!(seed.is_file(), "{}", seed.display());
        let other = macs.iter().find(|m| *m != mac).unwrap();
        assert!(
            !log.contains(&format!("mac={other}")),
            "serial logs are mixed up"
        );
    }
    println!("2 nodes up in {:?}", started.elapsed());

    // They reach each other over the multicast socket network, unicast and multicast (what
    // mDNS needs).
    for (node, peer) in [("node0", "192.168.76.11"), ("node1", "192.168.76.10")] {
        for marker in ["reached", "multicast-from"] {
            let line = format!("RACKSEED-GUEST {marker} {peer}");
            check(&c, marker, c.wait_for_serial(node, &line, BOOT_WAIT).await).await;
        }
    }
    println!(
        "unicast and multicast between guests in {:?}",
        started.elapsed()
    );

    // The management forward on 127.0.0.1 reaches each node's own guest.
    for (n, mac) in nodes.iter().zip(&macs) {
        let addr = c.mgmt_addr(n).unwrap();
        assert!(addr.ip().is_loopback());
        let page = fetch_mgmt(addr);
        assert!(
            page.contains(&format!("mac={mac}")),
            "{n} via {addr}: {page}"
        );
    }

    // Another handle on the state directory sees the same running cluster.
    let status = Cluster::open(&dir).unwrap().status();
    assert!(
        status.iter().all(|s| s.state == NodeRunState::Running),
        "{status:?}"
    );
    assert_ne!(status[0].pid, status[1].pid);

    // kill: hard power-off, the process is gone.
    let pid1 = c.node("node1").unwrap().pid.unwrap();
    assert!(c.kill("node1").await.unwrap());
    assert!(
        process_gone(pid1),
        "node1's qemu (pid {pid1}) survived kill"
    );
    assert!(!c.is_running("node1").unwrap());
    assert_eq!(
        Cluster::open(&dir).unwrap().status()[1].state,
        NodeRunState::Stopped
    );
    assert!(
        !c.kill("node1").await.unwrap(),
        "a second kill finds nothing running"
    );

    // start: boots again with the same overlay and MAC, and reaches node0 again.
    c.start("node1").await.unwrap();
    assert_eq!(c.node("node1").unwrap().mac, macs[1]);
    check(
        &c,
        "restart",
        c.wait_for_serial_count("node1", &format!("up mac={}", macs[1]), 2, BOOT_WAIT)
            .await,
    )
    .await;
    check(
        &c,
        "restart ping",
        c.wait_for_serial_count("node1", "reached 192.168.76.10", 2, BOOT_WAIT)
            .await,
    )
    .await;
    let e = c.start("node1").await.unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<ClusterError>(),
            Some(ClusterError::AlreadyRunning { .. })
        ),
        "{e:#}"
    );

    // add: a third node on the same image joins the same network.
    let name = c.add().await.unwrap();
    assert_eq!(name, "node2");
    check(
        &c,
        "add",
        c.wait_for_serial("node2", "RACKSEED-GUEST reached 192.168.76.10", BOOT_WAIT)
            .await,
    )
    .await;
    check(
        &c,
        "add",
        c.wait_for_serial("node2", "RACKSEED-GUEST reached 192.168.76.11", BOOT_WAIT)
            .await,
    )
    .await;

    // stop: the guest handles the power button and powers off by itself.
    let how = c.stop("node0", Duration::from_secs(30)).await.unwrap();
    assert_eq!(how, StopOutcome::PoweredOff);
    assert!(c.serial_tail("node0", 5).unwrap().contains("power button"));
    assert_eq!(
        c.stop("node0", Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyStopped
    );

    // Unknown nodes are named in the error.
    let e = c.kill("node9").await.unwrap_err();
    assert!(
        e.to_string().contains("node9") && e.to_string().contains("node2"),
        "{e}"
    );

    // down: everything stops, disks and state go, serial logs stay.
    let pids: Vec<u32> = c.state().nodes.iter().filter_map(|n| n.pid).collect();
    let disks: Vec<PathBuf> = c.state().nodes.iter().map(|n| n.overlay.clone()).collect();
    let logs: Vec<PathBuf> = c
        .state()
        .nodes
        .iter()
        .map(|n| n.serial_log.clone())
        .collect();
    c.down().await.unwrap();
    for p in pids {
        assert!(process_gone(p), "pid {p} survived down");
    }
    for d in disks {
        assert!(!d.exists(), "{} survived down", d.display());
    }
    for l in logs {
        assert!(l.exists(), "{} was removed", l.display());
    }
    assert!(!dir.join("cluster.json").exists());
    assert!(image.exists(), "the base image must never be touched");
    println!("life cycle done in {:?}", started.elapsed());
}

/// UEFI boot for both architectures: OVMF (x86_64, q35) and AAVMF (aarch64, virt) start from
/// pflash, find the node's virtio disk, find nothing bootable on the blank image and fall back
/// to the UEFI shell, all printed on the node's serial log. Two clusters run at once, on
/// different multicast ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uefi_firmware_boots_on_x86_64_and_aarch64() {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let image = blank_image(tmp.path()).await;
    let mut clusters = Vec::new();
    for arch in [Arch::X86_64, Arch::Aarch64] {
        let mut spec = ClusterSpec::new(&image, tmp.path().join(arch.to_string()));
        spec.nodes = 1;
        spec.arch = arch;
        spec.memory_mib = 256;
        spec.accel = AccelChoice::Tcg;
        let mut c = Cluster::up(spec)
            .await
            .unwrap_or_else(|e| panic!("{arch} up: {e:#}"));
        c.kill_on_drop(true);
        let vars = c
            .node("node0")
            .unwrap()
            .vars
            .clone()
            .expect("uefi node has vars");
        assert!(
            vars.starts_with(c.dir()),
            "{vars:?} is not the node's own copy"
        );
        clusters.push(c);
    }
    assert_ne!(clusters[0].mcast_port(), clusters[1].mcast_port());
    for c in &clusters {
        check(
            c,
            "uefi shell",
            c.wait_for_serial("node0", "UEFI Interactive Shell", BOOT_WAIT)
                .await,
        )
        .await;
        check(
            c,
            "uefi disk",
            c.wait_for_serial("node0", "BLK0", Duration::from_secs(30))
                .await,
        )
        .await;
    }
    for c in clusters {
        let overlay = c.node("node0").unwrap().overlay.clone();
        c.down().await.unwrap();
        assert!(!overlay.exists());
    }
}

/// The CLI manages one cluster across separate invocations through the state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_share_the_state_directory() {
    require_tools();
    let (kernel, initrd) = test_guest().await;
    let tmp = tempfile::tempdir().unwrap();
    let image = blank_image(tmp.path()).await;
    let dir = tmp.path().join("cli-cluster");
    let dir_arg = || DirArg { dir: dir.clone() };
    run_async(QemuCommand::Up(UpArgs {
        image,
        nodes: 1,
        arch: Arch::X86_64,
        memory: 256,
        cpus: 1,
        dir: dir_arg(),
        port: None,
        accel: AccelChoice::Tcg,
        guest_mgmt_port: 7443,
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: "console=ttyS0 quiet panic=-1".into(),
        disk_size: Some("32M".into()),
        no_reboot: true,
        subnet: qemu::seed::DEFAULT_SUBNET.parse().unwrap(),
        user_data: None,
        no_seed: false,
        uplink: false,
        // QEMU itself must take the forward to an address outside its 10.0.2.0/24.
        lb_forward: Some("192.168.76.200:80".parse().unwrap()),
    }))
    .await
    .expect("qemu up");
    let mut guard = Cluster::open(&dir).unwrap();
    guard.kill_on_drop(true);
    check(
        &guard,
        "cli boot",
        guard
            .wait_for_serial("node0", "RACKSEED-GUEST up", BOOT_WAIT)
            .await,
    )
    .await;
    run_async(QemuCommand::Status { dir: dir_arg() })
        .await
        .unwrap();
    run_async(QemuCommand::Kill {
        node: "0".into(),
        dir: dir_arg(),
    })
    .await
    .unwrap();
    assert!(!Cluster::open(&dir).unwrap().is_running("node0").unwrap());
    run_async(QemuCommand::Start {
        node: "node0".into(),
        dir: dir_arg(),
    })
    .await
    .unwrap();
    let c = Cluster::open(&dir).unwrap();
    assert!(c.is_running("node0").unwrap());
    // The LoadBalancer forward is recorded and survives the restart.
    assert_eq!(
        c.state().lb_forward.map(|f| f.to_string()).as_deref(),
        Some("192.168.76.200:80")
    );
    let lb = c.status()[0].lb_addr.expect("node0 has an LB forward");
    assert!(lb.ip().is_loopback(), "{lb}");
    let e = run_async(QemuCommand::Stop {
        node: "node7".into(),
        timeout: 1,
        dir: dir_arg(),
    })
    .await
    .unwrap_err();
    assert!(e.to_string().contains("node7"), "{e}");
    run_async(QemuCommand::Down { dir: dir_arg() })
        .await
        .unwrap();
    assert!(!dir.join("cluster.json").exists());
    assert!(!dir.join("node0.qcow2").exists());
    let e = run_async(QemuCommand::Status { dir: dir_arg() })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<ClusterError>(),
            Some(ClusterError::NoCluster { .. })
        ),
        "{e:#}"
    );
}
