//! The chaos soak: real `firstboot run` agents with simulated MicroK8s nodes in network
//! namespaces, a fault scheduler driven by one seed, invariants checked every 200 ms while the
//! faults run, and convergence measured once they stop.
//!
//! The soak's folder is a tmpfs mounted on a temporary folder under [`SOAK_PARENT`]. Each node
//! has there `bin/` wrappers for the simulator as in
//! `agent_support`, `root/` (its machine id and the time-synchronisation files the agent reads,
//! `usr/lib/systemd/systemd-timesyncd` and `run/systemd/timesync/synchronized`), `state/` (the
//! agent's state folder, a 1 MiB tmpfs so it can be filled and made read-only), `sim/` (the
//! simulated MicroK8s), `agent.log`, `daemon.log` and, for nodes with a clock fault,
//! `faketime` (libfaketime's offset file: the agent and its MicroK8s run with libfaketime
//! preloaded and only their wall clock moves; `FAKETIME_DONT_FAKE_MONOTONIC=1`, as an NTP step
//! leaves CLOCK_MONOTONIC alone). Those processes see a private `/dev/shm` ([`SHM_PRIVATE`]),
//! so the files libfaketime leaves when a process is killed go with it; the soak's end and
//! the clocks test check that none appeared on the host.
//!
//! The cluster has an `api-address` ([`API_ADDRESS`]) and the agents run real keepalived
//! (`--keepalived-bin`, as `api_address.rs` does), its pid files and log on a tmpfs of their
//! own at `state/keepalived`; the simulator serves `/readyz` on 16443, which keepalived's
//! health check asks. keepalived outlives a killed agent (as under systemd) and dies in a power
//! cut, which also takes the address off the interface (a machine without power holds
//! nothing).
//!
//! The schedule is a pure function of the seed ([`Schedule::new`]): which node's clock starts
//! years behind, when NTP answers it, and every fault (kind, node(s), start, duration). The
//! same seed gives the same faults at the same offsets; what the agents do in between depends
//! on timing, so a failure is reproduced by running the seed again (a few times if it is a
//! race).
//!
//! Faults (each switchable, [`FaultKind`]): link faults on one node (loss, duplication, late
//! and reordered packets; `netns_lab::faults`), multicast dropped on every node while unicast
//! works, partitions into 2 or 3 random groups, `kill -9` of an agent (restarted after 0-3 s,
//! like `Restart=on-failure` but sooner), `kill -9` of the simulated MicroK8s daemon (restarted
//! after 1-3 s, as systemd restarts the snap's services), a power cut (every process in the
//! node's namespace killed, agent and MicroK8s started again after 1-6 s, state kept), a
//! re-flash of a worker (power cut, then state and MicroK8s wiped, same machine id and name), the
//! state folder full or read-only for 3-12 s, a clock that starts 3 years behind and jumps when
//! "NTP answers" (the synchronised flag appears at the same moment), and a clock that jumps 2
//! hours backward.
//!
//! Invariants ([`Invariants`]), checked every 200 ms from the nodes' files, the simulator's
//! command log and `/proc`: never two clusters (formation ids of nodes past discovery, and
//! simulator cluster ids of multi-member views); never two control-plane joins at once (nor a
//! worker join during one; a join process the soak killed ends with its kill); control plane
//! (dqlite members) never above its configured size; every addon enabled at most once (no
//! `enable X` starts after one succeeded); no secret or token in any agent or MicroK8s log; no
//! panic; `state.json`/`addons.json` always parse; agent RSS below [`RSS_BOUND_KIB`]; at most one
//! holder of the API address among the nodes of the majority side (read in every node's
//! namespace over netlink; during a partition the side with more than half of the configured
//! control plane among its members, else the whole cluster; a cut-off minority may hold it
//! until its API server's readiness fails, and is only counted). After the heal the address
//! must have exactly one holder, answering `/readyz` through the address. An agent
//! that exits on its own is restarted (systemd's `Restart=on-failure`) and counted, not a
//! violation: exiting on an error it cannot handle (a state file it cannot write) is the
//! service's contract.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns_lab::faults::{self, HostFaults};
use netns_lab::{Host, Lab};
use rackseed_host::command::Cmd;
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;

pub const FIRSTBOOT: &str = env!("CARGO_BIN_EXE_firstboot");
/// libfaketime, multithreaded flavour (Debian package libfaketime).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// An agent above this resident size is a violation (it runs on 4 GB Pis beside MicroK8s).
pub const RSS_BOUND_KIB: u64 = 96 * 1024;
/// How often the invariants are checked.
pub const POLL: Duration = Duration::from_millis(200);
/// The join timeout the agents run with (`--sim-join-timeout`).
pub const JOIN_TIMEOUT_S: u64 = 20;
/// The agents' `--time-sync-wait`.
pub const TIME_SYNC_WAIT_S: u64 = 20;
/// The cluster's floating API address (`cluster.api-address`), on the lab's subnet
/// (`10.231.0.0/24`: nodes from `.1`, MetalLB `.240-.250`).
pub const API_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 231, 0, 100);
/// The packaged keepalived the agents run (`--keepalived-bin`), as `api_address.rs` does.
pub const KEEPALIVED: &str = "/usr/sbin/keepalived";
/// Where the soak's folder is made (a tmpfs is mounted on it). Not under `/dev/shm`: the
/// processes under libfaketime get a private `/dev/shm` (see [`SHM_PRIVATE`]), which would
/// hide it from them.
pub const SOAK_PARENT: &str = "/var/tmp";
/// Mounts a private tmpfs on `/dev/shm` in the mount namespace `ip netns exec` made: a
/// process under libfaketime creates `/dev/shm/faketime_shm_<pid>` and
/// `sem.faketime_sem_<pid>` and removes them only when it exits normally, so every agent or
/// MicroK8s the soak kills would leave two files behind on the host. In a namespace of its own
/// they go away with the namespace's last process (`ip netns exec` makes `/` a slave mount,
/// so nothing propagates back). libfaketime 0.9.10 has no switch that avoids the shared
/// memory (its README, "Cleaning up shared memory", says to delete the files by hand).
pub const SHM_PRIVATE: &str = "mount -t tmpfs -o size=1m,mode=1777 rsoak-shm /dev/shm";

/// The bound for convergence after the faults stop, derived from the agents' timers with the
/// simulated join timeout J = 20 s (`firstboot::agent_cli::sim_params`): a slot granted just
/// before the heal may have to expire, slot timeout = (J + 3 s grant age) x 1.5 + 1 s = 35.5
/// s, then one control-plane join at a time (at most 3 x (join 0.3-1 s + ready), ~5 s) and the
/// workers in parallel (~2 s); peers that lost each other are seen again within one announce
/// heartbeat (peer timeout 20 s / 4 = 5 s), and a node restarted at the heal may wait for time
/// synchronisation ([`TIME_SYNC_WAIT_S`] = 20 s) before it installs. 35.5 + 5 + 2 + 5 + 20 =
/// 67.5 s, plus a join timeout's worth of slack for a join that hangs on a peer cut at the
/// last moment: 90 s. The API address's one holder answering through it is part of it: once
/// the control plane is formed, keepalived on a member whose API is ready claims within its
/// master-down interval (3 adverts of 2 s plus skew, 6.5 s at most) after the agent's next
/// MicroK8s poll, well inside the slack.
pub const CONVERGENCE_BOUND: Duration = Duration::from_secs(90);

/// A small, fully specified generator (SplitMix64), so a seed means the same schedule on every
/// machine and with every version of any crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.range(1, 100) <= pct
    }
}

/// The kinds of fault, each switchable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    LinkFaults,
    MulticastDropped,
    Partition,
    KillAgent,
    KillMicrok8s,
    PowerCut,
    Reflash,
    DiskFull,
    ReadOnly,
    ClockBehind,
    ClockBackward,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::LinkFaults,
        FaultKind::MulticastDropped,
        FaultKind::Partition,
        FaultKind::KillAgent,
        FaultKind::KillMicrok8s,
        FaultKind::PowerCut,
        FaultKind::Reflash,
        FaultKind::DiskFull,
        FaultKind::ReadOnly,
        FaultKind::ClockBehind,
        FaultKind::ClockBackward,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LinkFaults => "link-faults",
            FaultKind::MulticastDropped => "multicast-dropped",
            FaultKind::Partition => "partition",
            FaultKind::KillAgent => "kill-agent",
            FaultKind::KillMicrok8s => "kill-microk8s",
            FaultKind::PowerCut => "power-cut",
            FaultKind::Reflash => "reflash",
            FaultKind::DiskFull => "disk-full",
            FaultKind::ReadOnly => "read-only",
            FaultKind::ClockBehind => "clock-behind",
            FaultKind::ClockBackward => "clock-backward",
        }
    }

    /// Parses a comma-separated list of names (`all` for every kind).
    pub fn parse_list(s: &str) -> Result<BTreeSet<FaultKind>, String> {
        let mut out = BTreeSet::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                out.extend(FaultKind::ALL);
                continue;
            }
            let k = FaultKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    format!(
                        "unknown fault kind {name:?}; known: all, {}",
                        FaultKind::ALL.map(FaultKind::name).join(", ")
                    )
                })?;
            out.insert(k);
        }
        Ok(out)
    }

    /// Faults drawn by the scheduler (the clock-behind fault is placed at the start).
    fn drawn(self) -> bool {
        self != FaultKind::ClockBehind
    }

    /// Relative weights of the drawn faults.
    fn weight(self) -> u64 {
        match self {
            FaultKind::LinkFaults => 4,
            FaultKind::MulticastDropped => 2,
            FaultKind::Partition => 3,
            FaultKind::KillAgent => 4,
            FaultKind::KillMicrok8s => 3,
            FaultKind::PowerCut => 3,
            FaultKind::Reflash => 1,
            FaultKind::DiskFull => 2,
            FaultKind::ReadOnly => 2,
            FaultKind::ClockBehind => 0,
            FaultKind::ClockBackward => 1,
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// Offset from the start of the soak.
    pub at: Duration,
    /// How long it lasts (link faults, partitions, disk faults; the downtime of kills).
    pub lasts: Duration,
    /// The nodes it hits (for a partition: every node, grouped by `groups`).
    pub nodes: Vec<usize>,
    pub groups: Vec<Vec<usize>>,
    pub link: HostFaults,
}

impl Fault {
    pub fn describe(&self) -> String {
        let what = match self.kind {
            FaultKind::Partition => format!("groups {:?}", self.groups),
            FaultKind::LinkFaults => format!(
                "node {:?}: loss {}%, duplicated {}%, late/reordered {}%",
                self.nodes, self.link.loss_pct, self.link.dup_pct, self.link.slow_pct
            ),
            _ => format!("nodes {:?}", self.nodes),
        };
        format!(
            "{:>7.1}s {} {} for {:.1}s",
            self.at.as_secs_f64(),
            self.kind.name(),
            what,
            self.lasts.as_secs_f64()
        )
    }
}

/// What the soak does, all of it derived from the seed.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// The node whose clock starts years behind, and when NTP answers it.
    pub clock_behind: Option<(usize, Duration)>,
}

/// Soak settings.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub seed: u64,
    pub control_plane: usize,
    pub workers: usize,
    /// How long faults are injected.
    pub fault_phase: Duration,
    /// Mean gap between the starts of two faults.
    pub mean_gap: Duration,
    pub kinds: BTreeSet<FaultKind>,
}

impl SoakSpec {
    pub fn nodes(&self) -> usize {
        self.control_plane + self.workers
    }
}

impl Schedule {
    pub fn new(spec: &SoakSpec) -> Schedule {
        let mut rng = Rng::new(spec.seed);
        let n = spec.nodes();
        let clock_behind = spec.kinds.contains(&FaultKind::ClockBehind).then(|| {
            (
                rng.below(n),
                Duration::from_millis(rng.range(5_000, 40_000)),
            )
        });
        let drawn: Vec<FaultKind> = spec.kinds.iter().copied().filter(|k| k.drawn()).collect();
        let total: u64 = drawn.iter().map(|k| k.weight()).sum();
        let mut faults = Vec::new();
        let mut t = Duration::from_millis(rng.range(1_000, 3_000));
        while total > 0 && t < spec.fault_phase {
            let mut pick = rng.range(1, total);
            let kind = *drawn
                .iter()
                .find(|k| {
                    if pick <= k.weight() {
                        true
                    } else {
                        pick -= k.weight();
                        false
                    }
                })
                .expect("weights add up");
            let node = rng.below(n);
            let mut f = Fault {
                kind,
                at: t,
                lasts: Duration::ZERO,
                nodes: vec![node],
                groups: Vec::new(),
                link: HostFaults::default(),
            };
            match kind {
                FaultKind::LinkFaults => {
                    f.lasts = Duration::from_millis(rng.range(3_000, 15_000));
                    f.link = HostFaults {
                        loss_pct: rng.range(0, 30) as u8,
                        dup_pct: rng.range(0, 10) as u8,
                        slow_pct: rng.range(0, 30) as u8,
                        ..HostFaults::default()
                    };
                }
                FaultKind::MulticastDropped => {
                    f.nodes = (0..n).collect();
                    f.lasts = Duration::from_millis(rng.range(5_000, 20_000));
                }
                FaultKind::Partition => {
                    let k = rng.range(2, 3) as usize;
                    let mut groups = vec![Vec::new(); k];
                    for i in 0..n {
                        groups[rng.below(k)].push(i);
                    }
                    groups.retain(|g| !g.is_empty());
                    f.nodes = (0..n).collect();
                    f.groups = groups;
                    f.lasts = Duration::from_millis(rng.range(3_000, 20_000));
                }
                FaultKind::KillAgent => f.lasts = Duration::from_millis(rng.range(0, 3_000)),
                FaultKind::KillMicrok8s => f.lasts = Duration::from_millis(rng.range(1_000, 3_000)),
                FaultKind::PowerCut => f.lasts = Duration::from_millis(rng.range(1_000, 6_000)),
                FaultKind::Reflash => {
                    // Workers only (picked at run time, from this node on), so CI's seed
                    // keeps its schedule: a re-flashed control-plane member (MicroK8s'
                    // "already known to dqlite" case: remove-node first, then its join) is
                    // covered by `agent_reflash` and the formation core's rules tests.
                    f.lasts = Duration::from_millis(rng.range(1_000, 4_000));
                }
                FaultKind::DiskFull | FaultKind::ReadOnly => {
                    f.lasts = Duration::from_millis(rng.range(3_000, 12_000))
                }
                FaultKind::ClockBackward => {}
                FaultKind::ClockBehind => unreachable!("not drawn"),
            }
            faults.push(f);
            let mean = spec.mean_gap.as_millis() as u64;
            t += Duration::from_millis(rng.range(mean / 2, mean * 3 / 2));
        }
        Schedule {
            seed: spec.seed,
            faults,
            clock_behind,
        }
    }
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn sim_bin(name: &str) -> PathBuf {
    let p = Path::new(FIRSTBOOT).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the MicroK8s simulator first (cargo build -p microk8s-sim)",
        p.display()
    );
    p
}

/// Runs a command on the host, failing loudly.
fn must(cmd: Cmd) {
    if let Err(e) = cmd.run_blocking() {
        panic!("{e:#}");
    }
}

/// One machine of the soak.
pub struct SoakNode {
    pub index: usize,
    pub host: Host,
    pub mac: String,
    pub dir: PathBuf,
    agent: Option<tokio::process::Child>,
    /// libfaketime's offset file, for nodes with a clock fault.
    pub faketime: Option<PathBuf>,
    /// Down (power cut, re-flash) until the harness boots it again.
    pub down: bool,
    pub link: HostFaults,
    /// When the agent exited on its own (restarted 1 s later).
    exited_at: Option<Instant>,
}

impl SoakNode {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn sync_flag(&self) -> PathBuf {
        self.dir
            .join("root")
            .join(firstboot::system::timesync::SYNCHRONIZED_FLAG)
    }
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref()?.id()
    }
}

/// The cluster under test.
pub struct SoakCluster {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<SoakNode>,
    pub log: PathBuf,
    pub config: PathBuf,
    pub secret: ClusterSecret,
    pub secret_bytes: [u8; 32],
    pub control_plane: usize,
    pub rt: tokio::runtime::Runtime,
    /// Agents that exited on their own (restarted, as systemd would).
    pub agent_exits: Vec<String>,
    /// libfaketime's files in /dev/shm before the soak started (others' files, left alone).
    pub shm_before: BTreeSet<String>,
}

impl SoakCluster {
    /// Prepares the nodes (nothing started). `clocks`: nodes that run under libfaketime.
    pub fn new(control_plane: usize, workers: usize, clocks: &[usize]) -> SoakCluster {
        let n = control_plane + workers;
        if !clocks.is_empty() {
            assert!(
                Path::new(LIBFAKETIME).exists(),
                "{LIBFAKETIME} is missing: install the libfaketime package (scripts/install-deps)"
            );
        }
        assert!(
            Path::new(KEEPALIVED).exists(),
            "{KEEPALIVED} is missing: install keepalived (scripts/install-deps installs it)"
        );
        let lab = Lab::new(n).expect("network lab (needs root)");
        let dir = tempfile::Builder::new()
            .prefix("rackseed-soak-")
            .tempdir_in(SOAK_PARENT)
            .unwrap();
        // The soak's files on a tmpfs of their own (fast, and gone with the soak).
        must(
            Cmd::new("mount", Duration::from_secs(10))
                .args(["-t", "tmpfs", "-o", "mode=0700", "rsoak-root"])
                .arg(dir.path()),
        );
        let log = dir.path().join("commands.jsonl");
        // A secret of distinct bytes, so its encodings are findable in logs.
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = 0x5a ^ (i as u8).wrapping_mul(37);
        }
        let secret = ClusterSecret::from_bytes(bytes);
        secret
            .write_new(&dir.path().join("cluster.secret"))
            .unwrap();
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nname = \"soak\"\napi-address = \"{API_ADDRESS}\"\ncontrol-plane = {control_plane}\nexpected-nodes = {n}\n\
                 formation-timeout = \"10m\"\nstandbys = 0\nsecret-file = \"cluster.secret\"\n\n\
                 [addons]\nstorage = \"none\"\n\n[addons.metallb]\naddresses = [\"10.231.0.240-10.231.0.250\"]\n\n\
                 [network]\naddressing = \"dhcp\"\n\n[image]\ntarget = \"x86_64-efi\"\n\n\
                 [image.base]\nkind = \"local\"\npath = \"base.img\"\n"
            ),
        )
        .unwrap();
        let mut c = SoakCluster {
            lab,
            dir,
            nodes: Vec::new(),
            log,
            config,
            secret,
            secret_bytes: bytes,
            control_plane,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            agent_exits: Vec::new(),
            shm_before: faketime_files(),
        };
        for i in 0..n {
            c.prepare_node(i, clocks.contains(&i));
        }
        c
    }

    fn prepare_node(&mut self, i: usize, faked_clock: bool) {
        let host = self.lab.host(i).clone();
        let dir = self.dir.path().join(format!("node-{i}"));
        for sub in ["bin", "etc", "root/etc", "root/usr/lib/systemd", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("root/etc/machine-id"),
            format!("{:032x}\n", 0x50a0_0000u64 + i as u64 * 7919),
        )
        .unwrap();
        // Every node runs systemd-timesyncd; it has synchronised unless the node's clock is
        // one the soak moves.
        std::fs::write(
            dir.join("root")
                .join(firstboot::system::timesync::TIMESYNCD_BINARIES[0]),
            b"",
        )
        .unwrap();
        // The state folder is a small tmpfs of its own, so it can fill up or turn read-only.
        must(
            Cmd::new("mount", Duration::from_secs(10))
                .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "rsoak-state"])
                .arg(dir.join("state")),
        );
        // keepalived's pid files and log (`--keepalived-bin`: `<state>/keepalived`) on a
        // tmpfs of their own, as on a node, where systemd's keepalived keeps them in /run and
        // the journal: the state folder's faults do not reach them, and keepalived's open log
        // would make remounting the state folder read-only fail ("mount point is busy").
        std::fs::create_dir_all(dir.join("state/keepalived")).unwrap();
        must(
            Cmd::new("mount", Duration::from_secs(10))
                .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "rsoak-keepalived"])
                .arg(dir.join("state/keepalived")),
        );
        let faketime = faked_clock.then(|| dir.join("faketime"));
        if let Some(f) = &faketime {
            std::fs::write(f, "+0\n").unwrap();
        }
        let sim = sim_bin("microk8s");
        let dqlite = sim_bin("dqlite");
        let mut env = format!(
            "export MICROK8S_SIM_STATE='{state}' MICROK8S_SIM_NODE='node-{i}' MICROK8S_SIM_LOG='{log}' \
             MICROK8S_SIM_LAUNCH_CONFIG='{lc}' MICROK8S_SIM_HEARTBEAT_MS=300 \
             MICROK8S_SIM_CONNECT_TIMEOUT_MS=1500 MICROK8S_SIM_JOIN_DELAY_MS=300 MICROK8S_SIM_ENABLE_DELAY_MS=0 MICROK8S_SIM_IP={ip}\n",
            state = dir.join("sim").display(),
            log = self.log.display(),
            lc = dir.join("etc/microk8s.yaml").display(),
            ip = host.addr,
        );
        if let Some(f) = &faketime {
            env.push_str(&faketime_exports(f));
        }
        write_exec(
            &dir.join("bin/microk8s"),
            &format!("#!/bin/sh\n{env}exec '{}' \"$@\"\n", sim.display()),
        );
        write_exec(
            &dir.join("bin/dqlite"),
            &format!("#!/bin/sh\n{env}exec '{}' \"$@\"\n", dqlite.display()),
        );
        let start_daemon = format!(
            "setsid '{sim}' sim-daemon >>'{dlog}' 2>&1 </dev/null &\necho $! > '{pid}'\n",
            sim = sim.display(),
            pid = dir.join("daemon.pid").display(),
            dlog = dir.join("daemon.log").display(),
        );
        // The fake snapd starts the node's MicroK8s services after a successful install.
        write_exec(
            &dir.join("bin/snap"),
            &format!(
                "#!/bin/sh\n{env}'{sim}' sim-snap \"$@\" || exit $?\n\
                 if [ \"$1\" = install ] && [ ! -s '{pid}' ]; then\n{start_daemon}fi\n",
                sim = sim.display(),
                pid = dir.join("daemon.pid").display(),
            ),
        );
        // What systemd does at boot or after the service crashed: start the snap's services
        // (run through `ip netns exec`, so in a mount namespace of its own: a faked clock's
        // libfaketime files go to a private /dev/shm there).
        let shm = if faketime.is_some() {
            format!("{SHM_PRIVATE} || exit 1\n")
        } else {
            String::new()
        };
        write_exec(
            &dir.join("bin/start-microk8s"),
            &format!("#!/bin/sh\n{shm}{env}{start_daemon}"),
        );
        let mac = faults::mac(&host).unwrap();
        self.nodes.push(SoakNode {
            index: i,
            host,
            mac,
            dir,
            agent: None,
            faketime,
            down: false,
            link: HostFaults::default(),
            exited_at: None,
        });
    }

    /// Marks node `i`'s clock synchronised (systemd-timesyncd's flag).
    pub fn mark_synchronized(&self, i: usize) {
        let flag = self.nodes[i].sync_flag();
        std::fs::create_dir_all(flag.parent().unwrap()).unwrap();
        std::fs::write(flag, b"").unwrap();
    }

    /// Sets node `i`'s wall-clock offset (libfaketime syntax: `+0`, `-94608000`).
    pub fn set_clock_offset(&self, i: usize, offset: &str) {
        let f = self.nodes[i]
            .faketime
            .as_ref()
            .expect("node runs without libfaketime");
        rackseed_host::fs::write_atomic(f, format!("{offset}\n").as_bytes(), 0o644).unwrap();
    }

    /// Starts node `i`'s agent with the given `--time-sync-wait`.
    pub fn start_agent(&mut self, i: usize, time_sync_wait_s: u64) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("agent.log"))
            .unwrap();
        let d = &node.dir;
        let _guard = self.rt.enter();
        let mut cmd = Cmd::new("ip", Duration::from_secs(1)).args(["netns", "exec", &node.host.ns]);
        if node.faketime.is_some() {
            // A private /dev/shm for libfaketime's files (see SHM_PRIVATE); the agent's
            // children (MicroK8s commands, keepalived) share it. libfaketime is preloaded
            // into the agent only: `ip` and `sh` exec, so a libfaketime loaded into them
            // would never remove its files.
            cmd = cmd.args([
                "sh",
                "-c",
                &format!("{SHM_PRIVATE} && export LD_PRELOAD='{LIBFAKETIME}' && exec \"$@\""),
                "sh",
            ]);
        }
        let mut cmd = cmd
            .arg(FIRSTBOOT)
            .args(["-v", "run", "--no-hostname", "--listen", "0.0.0.0:7443"])
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--microk8s-bin")
            .arg(d.join("bin/microk8s"))
            .arg("--snap-bin")
            .arg(d.join("bin/snap"))
            .arg("--dqlite-bin")
            .arg(d.join("bin/dqlite"))
            .arg("--launch-config")
            .arg(d.join("etc/microk8s.yaml"))
            .arg("--cluster-agent-cert")
            .arg(d.join("certs/server.crt"))
            .args(["--sim-join-timeout", &JOIN_TIMEOUT_S.to_string()])
            .args(["--time-sync-wait", &time_sync_wait_s.to_string()])
            .arg("--keepalived-bin")
            .arg(KEEPALIVED)
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/nonexistent/rackseed-test-bus",
            )
            .env(
                "RUST_LOG",
                "info,firstboot=debug,rackseed_host::command=info",
            )
            .env("NO_COLOR", "1");
        if let Some(f) = &node.faketime {
            cmd = cmd
                .env("FAKETIME_TIMESTAMP_FILE", f)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        let child = cmd
            .spawn_with(log.try_clone().unwrap(), log)
            .expect("starting firstboot");
        node.agent = Some(child);
        node.down = false;
        node.exited_at = None;
    }

    /// kill -9 of node `i`'s agent. Returns whether one was running.
    pub fn kill_agent(&mut self, i: usize) -> bool {
        let Some(mut child) = self.nodes[i].agent.take() else {
            return false;
        };
        if let Some(pid) = child.id() {
            sigkill(pid as i32);
        }
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        });
        true
    }

    /// The simulated MicroK8s daemon's pid, if it was started.
    fn daemon_pid(&self, i: usize) -> Option<i32> {
        std::fs::read_to_string(self.nodes[i].dir.join("daemon.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// kill -9 of node `i`'s MicroK8s daemon. Returns whether one was running.
    pub fn kill_microk8s(&mut self, i: usize) -> bool {
        match self.daemon_pid(i) {
            Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => {
                sigkill(pid);
                true
            }
            _ => false,
        }
    }

    /// Starts node `i`'s MicroK8s daemon again if it is installed and not running.
    pub fn restart_microk8s(&mut self, i: usize) {
        let installed = self.nodes[i].dir.join("sim/installed.json").exists();
        let running = self
            .daemon_pid(i)
            .is_some_and(|p| Path::new(&format!("/proc/{p}/cmdline")).exists() && !zombie(p));
        if installed && !running {
            must(
                self.nodes[i]
                    .host
                    .cmd("sh", Duration::from_secs(10))
                    .arg(self.nodes[i].dir.join("bin/start-microk8s")),
            );
        }
    }

    /// Every process in node `i`'s namespace killed at once (agent, MicroK8s, running
    /// commands): a power cut. Returns the pids killed.
    pub fn power_cut(&mut self, i: usize) -> Vec<u32> {
        let out = Cmd::new("ip", Duration::from_secs(10))
            .args(["netns", "pids", &self.nodes[i].host.ns])
            .output_blocking()
            .expect("ip netns pids");
        let pids: Vec<u32> = out
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for &p in &pids {
            sigkill(p as i32);
        }
        self.kill_agent(i);
        self.nodes[i].down = true;
        // keepalived died with the rest; a machine without power holds no address (a killed
        // keepalived leaves it on the interface, and the soak's cable stays plugged in).
        if self.address_holders(API_ADDRESS).contains(&i) {
            must(self.nodes[i].host.cmd("ip", Duration::from_secs(10)).args([
                "addr",
                "del",
                &format!("{API_ADDRESS}/24"),
                "dev",
                "eth0",
            ]));
        }
        pids
    }

    /// The nodes whose interfaces carry `address` now: one thread enters each node's network
    /// namespace in turn and reads its addresses over netlink (`getifaddrs`), so a check every
    /// 200 ms starts no process.
    pub fn address_holders(&self, address: std::net::Ipv4Addr) -> Vec<usize> {
        let namespaces: Vec<&str> = self.nodes.iter().map(|n| n.host.ns.as_str()).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut holders = Vec::new();
                for (i, ns) in namespaces.iter().enumerate() {
                    netns_lab::enter_netns(ns).unwrap_or_else(|e| panic!("entering {ns}: {e:#}"));
                    let addrs = nix::ifaddrs::getifaddrs()
                        .unwrap_or_else(|e| panic!("reading the addresses in {ns}: {e}"));
                    if addrs
                        .filter_map(|a| a.address)
                        .any(|a| a.as_sockaddr_in().map(|v4| v4.ip()) == Some(address))
                    {
                        holders.push(i);
                    }
                }
                holders
            })
            .join()
            .expect("the address reader panicked")
        })
    }

    /// Whether `GET https://<address>:16443/readyz` answers 200 from node `from`'s namespace.
    pub fn api_ready_via(&self, from: usize, address: std::net::Ipv4Addr) -> bool {
        self.nodes[from]
            .host
            .cmd("curl", Duration::from_secs(5))
            .args(["--fail", "--silent", "--insecure", "--max-time", "2"])
            .args(["--output", "/dev/null"])
            .arg(format!("https://{address}:16443/readyz"))
            .output_blocking()
            .is_ok_and(|o| o.status.success())
    }

    /// Node `i`'s role if its agent's state says it is a member.
    pub fn member_role(&self, i: usize) -> Option<String> {
        let t = std::fs::read_to_string(self.nodes[i].state().join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&t).ok()?;
        (v["phase"]["phase"] == "member")
            .then(|| v["phase"]["role"].as_str().map(String::from))
            .flatten()
    }

    /// A re-flash after a power cut: the agent's state, MicroK8s and its files wiped; the
    /// machine id (so the node id and name) kept.
    pub fn wipe(&mut self, i: usize) {
        let d = self.nodes[i].dir.clone();
        remount(&d.join("state"), "rw");
        for e in std::fs::read_dir(d.join("state")).unwrap().flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        for sub in ["sim", "certs", "etc"] {
            let _ = std::fs::remove_dir_all(d.join(sub));
        }
        std::fs::create_dir_all(d.join("etc")).unwrap();
        let _ = std::fs::remove_file(d.join("daemon.pid"));
    }

    /// Fills node `i`'s state folder until no byte fits.
    pub fn fill_state(&self, i: usize) {
        use std::io::Write;
        let path = self.nodes[i].state().join("filler");
        let Ok(mut f) = std::fs::File::create(&path) else {
            return;
        };
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        while f.write_all(&small[..1]).is_ok() {}
        let _ = f.sync_all();
    }

    /// Removes the filler; false if it is still there (the folder is read-only just now).
    pub fn unfill_state(&self, i: usize) -> bool {
        let p = self.nodes[i].state().join("filler");
        std::fs::remove_file(&p).is_ok() || !p.exists()
    }

    pub fn set_read_only(&self, i: usize, ro: bool) {
        remount(&self.nodes[i].state(), if ro { "ro" } else { "rw" });
    }

    /// The status document of node `i` (`firstboot status --json` in its namespace).
    pub fn status(&self, i: usize) -> Option<StatusDoc> {
        let node = &self.nodes[i];
        let out = node
            .host
            .cmd(FIRSTBOOT, Duration::from_secs(15))
            .args(["status", "--json", "--port", "7443"])
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(node.state())
            .output_blocking()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let doc: StatusDoc = serde_json::from_str(&out.stdout).ok()?;
        (!doc.node_id.is_empty()).then_some(doc)
    }

    /// The first node from `i` on (cyclically) that is up and a worker member.
    pub fn worker_from(&self, i: usize) -> Option<usize> {
        let n = self.nodes.len();
        (0..n).map(|k| (i + k) % n).find(|&j| {
            !self.nodes[j].down
                && std::fs::read_to_string(self.nodes[j].state().join("state.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| {
                        v["phase"]["phase"] == "member" && v["phase"]["role"] == "worker"
                    })
        })
    }

    /// Restarts agents that exited on their own 1 s later (systemd's `Restart=on-failure`,
    /// with a shorter `RestartSec`), noting why they exited.
    pub fn reap_exited(&mut self, time_sync_wait_s: u64) {
        let rt = self.rt.handle().clone();
        let _guard = rt.enter();
        for i in 0..self.nodes.len() {
            let exited = match self.nodes[i].agent.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.nodes[i].agent = None;
                self.nodes[i].exited_at = Some(Instant::now());
                let tail = last_line_with(&self.nodes[i].dir.join("agent.log"), "rror")
                    .unwrap_or_default();
                self.agent_exits
                    .push(format!("node-{i}: agent exited ({status}): {tail}"));
            }
            if self.nodes[i]
                .exited_at
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.nodes[i].exited_at = None;
                if self.nodes[i].agent.is_none() && !self.nodes[i].down {
                    self.start_agent(i, time_sync_wait_s);
                }
            }
        }
    }

    /// The agent's resident set now, in KiB.
    pub fn agent_rss_kib(&self, i: usize) -> Option<u64> {
        let pid = self.nodes[i].agent_pid()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Prints the tail of every agent, daemon and keepalived log, and for each node what
    /// its failed tasks said: the failures in its status document's timeline (a failed
    /// join's error carries the command's exit and stderr: `JoinError`), its last error,
    /// the agent log's join lines and the simulator's records of its failed commands (argv
    /// and exit), so a node whose joins keep failing shows why even when the log's tail has
    /// scrolled past it.
    pub fn dump(&self, lines: usize) {
        let records = std::fs::read_to_string(&self.log).unwrap_or_default();
        for n in &self.nodes {
            for f in ["agent.log", "daemon.log", "state/keepalived/keepalived.log"] {
                let text = std::fs::read_to_string(n.dir.join(f)).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = &all[all.len().saturating_sub(lines)..];
                eprintln!("---- node-{} {f} (last {} lines)", n.index, tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
            for l in failure_lines(n.index, self.status(n.index).as_ref(), &records) {
                eprintln!("{l}");
            }
            let text = std::fs::read_to_string(n.dir.join("agent.log")).unwrap_or_default();
            let joins: Vec<&str> = text.lines().filter(|l| l.contains("join")).collect();
            eprintln!(
                "---- node-{} agent.log lines about joins (last 10)",
                n.index
            );
            for l in &joins[joins.len().saturating_sub(10)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Keeps the logs in `dir` (for `RACKSEED_SOAK_KEEP`).
    pub fn keep_logs(&self, keep: &Path) {
        let _ = std::fs::create_dir_all(keep);
        let _ = std::fs::copy(&self.log, keep.join("commands.jsonl"));
        for n in &self.nodes {
            for f in ["agent.log", "daemon.log"] {
                let _ = std::fs::copy(n.dir.join(f), keep.join(format!("node-{}-{f}", n.index)));
            }
            let _ = std::fs::copy(
                n.dir.join("state/keepalived/keepalived.log"),
                keep.join(format!("node-{}-keepalived.log", n.index)),
            );
        }
    }
}

impl Drop for SoakCluster {
    fn drop(&mut self) {
        if let Some(keep) = std::env::var_os("RACKSEED_SOAK_KEEP").filter(|k| !k.is_empty()) {
            self.keep_logs(Path::new(&keep));
        }
        for i in 0..self.nodes.len() {
            self.power_cut(i);
        }
        for n in &self.nodes {
            let _ = Cmd::new("umount", Duration::from_secs(10))
                .arg("-l")
                .arg(n.state())
                .run_blocking();
        }
        let _ = Cmd::new("umount", Duration::from_secs(10))
            .arg("-l")
            .arg(self.dir.path())
            .run_blocking();
    }
}

/// What node `i`'s failures said, for the dump: the failed steps in its status document's
/// timeline and its last error, then the simulator's records of its commands that exited
/// non-zero (`records`: the command log, JSON lines), at most 10 of each.
pub fn failure_lines(i: usize, doc: Option<&StatusDoc>, records: &str) -> Vec<String> {
    let mut out = vec![format!("---- node-{i} failures in its status document")];
    match doc {
        Some(d) => {
            let failed: Vec<String> = d
                .timeline
                .iter()
                .filter(|e| e.what.contains("failed"))
                .map(|e| format!("{:>8.1}s {}", e.at, e.what))
                .collect();
            out.extend(failed[failed.len().saturating_sub(10)..].iter().cloned());
            out.push(format!("last error: {:?}", d.last_error));
        }
        None => out.push("(no status document: the agent does not answer)".into()),
    }
    out.push(format!(
        "---- node-{i} commands that failed (the simulator's records)"
    ));
    let node = format!("node-{i}");
    let failed: Vec<String> = records
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["node"] == node.as_str()
                && r["event"] == "end"
                && r["exit"].as_i64().is_some_and(|x| x != 0)
        })
        .map(|r| {
            let argv: Vec<&str> = r["argv"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            format!(
                "ts {} pid {} {} {} -> exit {}",
                r["ts_ms"],
                r["pid"],
                r["program"].as_str().unwrap_or("?"),
                argv.join(" "),
                r["exit"]
            )
        })
        .collect();
    out.extend(failed[failed.len().saturating_sub(10)..].iter().cloned());
    out
}

/// libfaketime's shared-memory files and semaphores in the host's /dev/shm.
pub fn faketime_files() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("faketime_shm_") || n.starts_with("sem.faketime_sem_"))
                .collect()
        })
        .unwrap_or_default()
}

/// libfaketime's files in /dev/shm that were not there `before`.
pub fn faketime_left(before: &BTreeSet<String>) -> Vec<String> {
    faketime_files().difference(before).cloned().collect()
}

fn faketime_exports(file: &Path) -> String {
    format!(
        "export LD_PRELOAD='{LIBFAKETIME}' FAKETIME_TIMESTAMP_FILE='{}' FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_CACHE_DURATION=1\n",
        file.display()
    )
}

fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn remount(dir: &Path, mode: &str) {
    must(
        Cmd::new("mount", Duration::from_secs(10))
            .args(["-o", &format!("remount,{mode}")])
            .arg(dir),
    );
}

fn last_line_with(path: &Path, needle: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| l.contains(needle))
        .map(|l| l.chars().take(300).collect())
}

/// Reads the lines appended to a file since the last call.
#[derive(Debug, Default)]
pub struct Tail {
    offset: u64,
    partial: String,
}

impl Tail {
    pub fn new_lines(&mut self, path: &Path) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated or replaced: start over.
            self.offset = 0;
            self.partial.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let _ = f.take(8 * 1024 * 1024).read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(String::from).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines
    }
}

/// The continuous invariant checks (see the module docs). Violations are kept, with the
/// soak time they were seen at.
pub struct Invariants {
    pub control_plane: usize,
    pub violations: Vec<String>,
    commands: Tail,
    logs: BTreeMap<PathBuf, Tail>,
    /// Open joins: (node, pid) -> worker.
    open_joins: BTreeMap<(String, u64), bool>,
    /// Addons some `enable` succeeded for.
    enabled: BTreeSet<String>,
    /// Strings that must never appear in a log.
    secrets: Vec<String>,
    pub max_rss_kib: u64,
    pub checks: u64,
    started: Instant,
    /// Each violation message once.
    seen: BTreeSet<String>,
    /// The partition now (empty: none); the soak sets it as it cuts and heals.
    pub groups: Vec<Vec<usize>>,
    /// Checks by how many nodes of the majority side held the API address.
    pub majority_holders: BTreeMap<usize, u64>,
    /// Checks in which a node outside the majority side held it too (allowed: a cut-off
    /// holder lets go once its API server's readiness fails).
    pub minority_held: u64,
    /// Checks during a partition with no side holding a majority of the control plane.
    pub no_majority: u64,
}

impl Invariants {
    pub fn new(cluster: &SoakCluster, started: Instant) -> Invariants {
        let s = &cluster.secret;
        let mut secrets = vec![s.microk8s_token()];
        let bytes = &cluster.secret_bytes;
        secrets.push(hex::encode(bytes));
        secrets.push(hex::encode_upper(bytes));
        {
            use base64::Engine;
            secrets.push(base64::engine::general_purpose::STANDARD.encode(bytes));
            secrets.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        }
        Invariants {
            control_plane: cluster.control_plane,
            violations: Vec::new(),
            commands: Tail::default(),
            logs: BTreeMap::new(),
            open_joins: BTreeMap::new(),
            enabled: BTreeSet::new(),
            secrets,
            max_rss_kib: 0,
            checks: 0,
            started,
            seen: BTreeSet::new(),
            groups: Vec::new(),
            majority_holders: BTreeMap::new(),
            minority_held: 0,
            no_majority: 0,
        }
    }

    fn violation(&mut self, what: String) {
        if self.seen.insert(what.clone()) {
            let line = format!("{:>7.1}s {what}", self.started.elapsed().as_secs_f64());
            eprintln!("VIOLATION {line}");
            self.violations.push(line);
        }
    }

    /// Joins whose process the soak killed end with the kill. Call after draining the
    /// command log ([`Invariants::check`]) and before the kill.
    pub fn killed(&mut self, pids: &[u32]) {
        self.open_joins
            .retain(|(_, pid), _| !pids.contains(&(*pid as u32)));
    }

    /// One round of checks.
    pub fn check(&mut self, c: &SoakCluster) {
        self.checks += 1;
        self.check_commands(c);
        self.check_files(c);
        self.check_logs(c);
        self.check_api_address(c);
        for i in 0..c.nodes.len() {
            if let Some(rss) = c.agent_rss_kib(i) {
                self.max_rss_kib = self.max_rss_kib.max(rss);
                if rss > RSS_BOUND_KIB {
                    self.violation(format!(
                        "node-{i}: agent RSS {rss} KiB above the bound {RSS_BOUND_KIB} KiB"
                    ));
                }
            }
        }
    }

    fn check_commands(&mut self, c: &SoakCluster) {
        for line in self.commands.new_lines(&c.log) {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let argv: Vec<String> = r["argv"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if r["program"] != "microk8s" {
                continue;
            }
            let node = r["node"].as_str().unwrap_or_default().to_owned();
            let pid = r["pid"].as_u64().unwrap_or_default();
            let event = r["event"].as_str().unwrap_or_default();
            match argv.first().map(String::as_str) {
                Some("join") => {
                    let worker = argv.iter().any(|a| a == "--worker");
                    match event {
                        "start" => {
                            // A join whose process died without an end record (killed with
                            // its node) is over.
                            self.open_joins.retain(|(_, p), _| {
                                Path::new(&format!("/proc/{p}")).exists() && !zombie(*p as i32)
                            });
                            let clash = self
                                .open_joins
                                .iter()
                                .find(|(_, w)| !worker || !**w)
                                .map(|((n, p), w)| (n.clone(), *p, *w));
                            if let Some((other, opid, ow)) = clash {
                                self.violation(format!(
                                    "two joins at once: {node} (pid {pid}, {}) started while {other} (pid {opid}, {}) was joining",
                                    if worker { "worker" } else { "control plane" },
                                    if ow { "worker" } else { "control plane" },
                                ));
                            }
                            self.open_joins.insert((node, pid), worker);
                        }
                        "end" => {
                            self.open_joins.remove(&(node, pid));
                        }
                        _ => {}
                    }
                }
                Some("enable") if argv.len() >= 2 => {
                    let addon = argv[1].clone();
                    match event {
                        "start" if self.enabled.contains(&addon) => {
                            self.violation(format!(
                                "addon {addon} enabled again by {node} after an enable succeeded"
                            ));
                        }
                        "end" if r["exit"] == 0 => {
                            self.enabled.insert(addon);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    fn check_files(&mut self, c: &SoakCluster) {
        let mut formation_clusters = BTreeSet::new();
        let mut sim_clusters = BTreeSet::new();
        for n in &c.nodes {
            for f in ["state.json", "addons.json"] {
                let p = n.state().join(f);
                let Ok(bytes) = std::fs::read(&p) else {
                    continue;
                };
                match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) => {
                        if f == "state.json" {
                            if let Some(id) = v["phase"]["cluster"].as_str() {
                                formation_clusters.insert(id.to_owned());
                            }
                        }
                    }
                    Err(e) => self.violation(format!(
                        "node-{}: {f} is corrupt ({e}; {} bytes)",
                        n.index,
                        bytes.len()
                    )),
                }
            }
            let Ok(text) = std::fs::read_to_string(n.dir.join("sim/state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let entries = v["view"]["entries"].as_array().cloned().unwrap_or_default();
            let members: BTreeSet<&str> = entries
                .iter()
                .filter(|e| !e["role"].is_null())
                .filter_map(|e| e["name"].as_str())
                .collect();
            if entries.len() > 1 {
                if let Some(id) = v["view"]["cluster_id"].as_str() {
                    sim_clusters.insert(id.to_owned());
                }
            }
            if members.len() > self.control_plane {
                self.violation(format!(
                    "node-{}'s MicroK8s lists {} control-plane (dqlite) members, more than {}: {members:?}",
                    n.index,
                    members.len(),
                    self.control_plane
                ));
            }
        }
        if formation_clusters.len() > 1 {
            self.violation(format!("two clusters formed: {formation_clusters:?}"));
        }
        if sim_clusters.len() > 1 {
            self.violation(format!("two MicroK8s clusters: {sim_clusters:?}"));
        }
    }

    /// At most one holder of the API address among the nodes of the majority: the side of a
    /// partition with more than half of the configured control plane among its members (the
    /// whole cluster when there is no partition). A cut-off minority may hold it until its
    /// health check fails; a partition with no majority side constrains nothing.
    fn check_api_address(&mut self, c: &SoakCluster) {
        let holders = c.address_holders(API_ADDRESS);
        let n = c.nodes.len();
        let majority: Vec<usize> = if self.groups.is_empty() {
            (0..n).collect()
        } else {
            let cp: Vec<usize> = (0..n)
                .filter(|&i| c.member_role(i).as_deref() == Some("control-plane"))
                .collect();
            match self
                .groups
                .iter()
                .find(|g| 2 * g.iter().filter(|i| cp.contains(i)).count() > self.control_plane)
            {
                Some(g) => g.clone(),
                None => {
                    self.no_majority += 1;
                    return;
                }
            }
        };
        let inside: Vec<usize> = holders
            .iter()
            .copied()
            .filter(|h| majority.contains(h))
            .collect();
        *self.majority_holders.entry(inside.len()).or_default() += 1;
        if inside.len() < holders.len() {
            self.minority_held += 1;
        }
        if inside.len() > 1 {
            self.violation(format!(
                "{} nodes of the majority side {majority:?} hold the API address {API_ADDRESS} at once: {inside:?}",
                inside.len()
            ));
        }
    }

    fn check_logs(&mut self, c: &SoakCluster) {
        for n in &c.nodes {
            for f in ["agent.log", "daemon.log"] {
                let p = n.dir.join(f);
                let lines = self.logs.entry(p.clone()).or_default().new_lines(&p);
                for l in lines {
                    if l.contains("panicked at") {
                        self.violation(format!("node-{} {f}: panic: {l}", n.index));
                    }
                    if self.secrets.iter().any(|s| l.contains(s.as_str())) {
                        self.violation(format!(
                            "node-{} {f}: a secret or token in the log (line withheld)",
                            n.index
                        ));
                    }
                }
            }
        }
    }
}

/// Whether node `i`'s status says it converged: a member, and HA formed (3 voters) on
/// control-plane members; workers say so.
pub fn converged(doc: &StatusDoc, voters: usize) -> bool {
    doc.phase == "member"
        && doc
            .microk8s
            .as_ref()
            .is_some_and(|m| m.voters.len() == voters || m.note.as_deref() == Some("worker node"))
}

/// The soak's outcome.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub fault_phase_s: f64,
    pub faults_by_kind: BTreeMap<&'static str, u32>,
    pub violations: Vec<String>,
    /// Seconds from the heal to each node's convergence.
    pub convergence_s: Vec<f64>,
    pub unconverged: Vec<String>,
    pub agent_exits: Vec<String>,
    pub max_rss_kib: u64,
    pub checks: u64,
    pub clock_behind: Option<(usize, f64)>,
    pub total_s: f64,
    /// Invariant checks by how many nodes of the majority side held the API address.
    pub majority_holders: BTreeMap<usize, u64>,
    pub minority_held: u64,
    pub no_majority: u64,
    /// The API address's one holder after the heal, and when it answered through it.
    pub api_holder: Option<(usize, f64)>,
    /// libfaketime's files the soak left in /dev/shm (must be none).
    pub shm_left: Vec<String>,
}

impl Report {
    pub fn faults_total(&self) -> u32 {
        self.faults_by_kind.values().sum()
    }

    pub fn print(&self) -> String {
        let mut conv = self.convergence_s.clone();
        conv.sort_by(f64::total_cmp);
        let median = if conv.is_empty() {
            f64::NAN
        } else {
            conv[conv.len() / 2]
        };
        let max = conv.last().copied().unwrap_or(f64::NAN);
        let mut s = String::new();
        s.push_str(&format!(
            "soak report: seed {} ({} nodes, faults for {:.0} s, {:.0} s in all)\n",
            self.seed, self.nodes, self.fault_phase_s, self.total_s
        ));
        s.push_str(&format!("  faults injected: {}\n", self.faults_total()));
        for (k, v) in &self.faults_by_kind {
            s.push_str(&format!("    {k:<18} {v}\n"));
        }
        if let Some((n, at)) = self.clock_behind {
            s.push_str(&format!(
                "  node-{n}'s clock started 3 years behind; NTP answered at {at:.1} s\n"
            ));
        }
        s.push_str(&format!(
            "  invariant violations: {} ({} rounds of checks)\n",
            self.violations.len(),
            self.checks
        ));
        for v in &self.violations {
            s.push_str(&format!("    {v}\n"));
        }
        s.push_str(&format!(
            "  convergence after the heal: median {median:.1} s, max {max:.1} s over {} nodes (bound {} s)\n",
            conv.len(),
            CONVERGENCE_BOUND.as_secs()
        ));
        for u in &self.unconverged {
            s.push_str(&format!("    NOT CONVERGED {u}\n"));
        }
        s.push_str(&format!(
            "  agents that exited on their own (restarted): {}\n",
            self.agent_exits.len()
        ));
        for e in &self.agent_exits {
            s.push_str(&format!("    {e}\n"));
        }
        s.push_str(&format!(
            "  agent RSS max {} KiB (bound {} KiB)\n",
            self.max_rss_kib, RSS_BOUND_KIB
        ));
        let counts: Vec<String> = self
            .majority_holders
            .iter()
            .map(|(k, v)| format!("{k} holder(s): {v}"))
            .collect();
        s.push_str(&format!(
            "  API address {API_ADDRESS}, checks by holders on the majority side: {}; a minority holder beside them: {}; partitioned with no majority side: {}\n",
            if counts.is_empty() { "none".into() } else { counts.join(", ") },
            self.minority_held,
            self.no_majority
        ));
        match self.api_holder {
            Some((h, at)) => s.push_str(&format!(
                "  after the heal: node-{h} the one holder, /readyz answered through the address {at:.1} s after the heal\n"
            )),
            None => s.push_str("  after the heal: no single holder answering /readyz\n"),
        }
        s.push_str(&format!(
            "  libfaketime files left in /dev/shm: {}\n",
            self.shm_left.len()
        ));
        s
    }
}

/// Runs one soak: starts the cluster, injects the schedule's faults while checking the
/// invariants, heals everything, and measures convergence.
pub fn run_soak(spec: &SoakSpec) -> Report {
    let schedule = Schedule::new(spec);
    eprintln!(
        "soak seed {} ({} faults scheduled; reproduce: scripts/soak --seed {} --minutes {:.2})",
        spec.seed,
        schedule.faults.len(),
        spec.seed,
        spec.fault_phase.as_secs_f64() / 60.0
    );
    for f in &schedule.faults {
        eprintln!("  plan {}", f.describe());
    }
    let backward: Vec<usize> = schedule
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::ClockBackward)
        .flat_map(|f| f.nodes.clone())
        .collect();
    let mut clocks: Vec<usize> = backward.clone();
    if let Some((n, _)) = schedule.clock_behind {
        clocks.push(n);
    }
    let mut c = SoakCluster::new(spec.control_plane, spec.workers, &clocks);
    let n = c.nodes.len();
    for i in 0..n {
        if schedule.clock_behind.map(|(b, _)| b) != Some(i) {
            c.mark_synchronized(i);
        }
    }
    if let Some((b, _)) = schedule.clock_behind {
        // 3 years behind.
        c.set_clock_offset(b, "-94608000");
    }
    let started = Instant::now();
    let mut inv = Invariants::new(&c, started);
    let mut report = Report {
        seed: spec.seed,
        nodes: n,
        fault_phase_s: spec.fault_phase.as_secs_f64(),
        ..Report::default()
    };
    for i in 0..n {
        c.start_agent(i, TIME_SYNC_WAIT_S);
    }
    // Pending ends of faults: (when, action).
    enum End {
        Link(usize),
        Multicast,
        Partition,
        StartAgent(usize),
        StartMicrok8s(usize),
        Boot(usize),
        Unfill(usize),
        Writable(usize),
    }
    let mut pending: Vec<(Duration, End)> = Vec::new();
    let mut next = 0usize;
    let mut ntp_done = schedule.clock_behind.is_none();
    let mut partitioned = false;
    let mut multicast_off = false;
    let mut groups_now: Vec<Vec<usize>> = Vec::new();
    let hosts: Vec<Host> = c.nodes.iter().map(|x| x.host.clone()).collect();
    let macs: Vec<String> = c.nodes.iter().map(|x| x.mac.clone()).collect();
    let apply_link = |c: &mut SoakCluster, i: usize| {
        let f = c.nodes[i].link.clone();
        if let Err(e) = faults::apply(&c.nodes[i].host, &f) {
            panic!("applying link faults: {e:#}");
        }
    };
    while started.elapsed() < spec.fault_phase || !pending.is_empty() {
        let now = started.elapsed();
        // Faults stop at the end of the fault phase: every pending end runs then.
        let ending = now >= spec.fault_phase;
        if !ntp_done {
            let (b, at) = schedule.clock_behind.unwrap();
            if now >= at || ending {
                c.set_clock_offset(b, "+0");
                c.mark_synchronized(b);
                report.clock_behind = Some((b, now.as_secs_f64()));
                *report.faults_by_kind.entry("clock-behind").or_default() += 1;
                ntp_done = true;
            }
        }
        while next < schedule.faults.len() && schedule.faults[next].at <= now && !ending {
            let f = schedule.faults[next].clone();
            next += 1;
            let i = f.nodes[0];
            let injected = match f.kind {
                FaultKind::LinkFaults => {
                    let mut link = f.link.clone();
                    link.drop_multicast = c.nodes[i].link.drop_multicast;
                    link.blocked_macs = c.nodes[i].link.blocked_macs.clone();
                    c.nodes[i].link = link;
                    apply_link(&mut c, i);
                    pending.push((now + f.lasts, End::Link(i)));
                    true
                }
                FaultKind::MulticastDropped if !multicast_off => {
                    multicast_off = true;
                    for j in 0..n {
                        c.nodes[j].link.drop_multicast = true;
                        apply_link(&mut c, j);
                    }
                    pending.push((now + f.lasts, End::Multicast));
                    true
                }
                FaultKind::Partition if !partitioned => {
                    partitioned = true;
                    groups_now = f.groups.clone();
                    inv.groups = groups_now.clone();
                    let mut links: Vec<HostFaults> =
                        c.nodes.iter().map(|x| x.link.clone()).collect();
                    faults::partition(&hosts, &macs, &groups_now, &mut links)
                        .unwrap_or_else(|e| panic!("partition: {e:#}"));
                    for (j, l) in links.into_iter().enumerate() {
                        c.nodes[j].link = l;
                    }
                    pending.push((now + f.lasts, End::Partition));
                    true
                }
                FaultKind::KillAgent if !c.nodes[i].down => {
                    let was = c.kill_agent(i);
                    if was {
                        pending.push((now + f.lasts, End::StartAgent(i)));
                    }
                    was
                }
                FaultKind::KillMicrok8s if !c.nodes[i].down => {
                    inv.check(&c);
                    let was = c.kill_microk8s(i);
                    if was {
                        pending.push((now + f.lasts, End::StartMicrok8s(i)));
                    }
                    was
                }
                FaultKind::Reflash if c.worker_from(i).is_none() => false,
                FaultKind::PowerCut | FaultKind::Reflash if !c.nodes[i].down => {
                    // Roles are decided at run time (the first joiners become the control
                    // plane): a re-flash hits the first up worker from the drawn node on.
                    let i = match f.kind {
                        FaultKind::Reflash => c.worker_from(i).expect("checked above"),
                        _ => i,
                    };
                    inv.check(&c);
                    let pids = c.power_cut(i);
                    inv.killed(&pids);
                    if f.kind == FaultKind::Reflash {
                        c.wipe(i);
                    }
                    pending.push((now + f.lasts, End::Boot(i)));
                    true
                }
                FaultKind::DiskFull => {
                    c.fill_state(i);
                    pending.push((now + f.lasts, End::Unfill(i)));
                    true
                }
                FaultKind::ReadOnly => {
                    c.set_read_only(i, true);
                    pending.push((now + f.lasts, End::Writable(i)));
                    true
                }
                FaultKind::ClockBackward if c.nodes[i].faketime.is_some() => {
                    c.set_clock_offset(i, "-7200");
                    true
                }
                _ => false,
            };
            if injected {
                *report.faults_by_kind.entry(f.kind.name()).or_default() += 1;
                eprintln!("  fault {}", f.describe());
            }
        }
        // Run the ends that are due (all of them once the fault phase is over).
        let mut i = 0;
        while i < pending.len() {
            if pending[i].0 <= now || ending {
                let (_, end) = pending.remove(i);
                match end {
                    End::Link(j) => {
                        c.nodes[j].link.loss_pct = 0;
                        c.nodes[j].link.dup_pct = 0;
                        c.nodes[j].link.slow_pct = 0;
                        apply_link(&mut c, j);
                    }
                    End::Multicast => {
                        multicast_off = false;
                        for j in 0..n {
                            c.nodes[j].link.drop_multicast = false;
                            apply_link(&mut c, j);
                        }
                    }
                    End::Partition => {
                        partitioned = false;
                        groups_now.clear();
                        inv.groups.clear();
                        let mut links: Vec<HostFaults> =
                            c.nodes.iter().map(|x| x.link.clone()).collect();
                        faults::partition(&hosts, &macs, &[], &mut links)
                            .unwrap_or_else(|e| panic!("healing a partition: {e:#}"));
                        for (j, l) in links.into_iter().enumerate() {
                            c.nodes[j].link = l;
                        }
                    }
                    End::StartAgent(j) => {
                        if c.nodes[j].agent_pid().is_none() && !c.nodes[j].down {
                            c.start_agent(j, TIME_SYNC_WAIT_S);
                        }
                    }
                    End::StartMicrok8s(j) => {
                        if !c.nodes[j].down {
                            c.restart_microk8s(j);
                        }
                    }
                    End::Boot(j) => {
                        if c.nodes[j].down {
                            c.restart_microk8s(j);
                            c.start_agent(j, TIME_SYNC_WAIT_S);
                        }
                    }
                    End::Unfill(j) => {
                        if !c.unfill_state(j) && !ending {
                            pending.push((now + Duration::from_secs(1), End::Unfill(j)));
                        }
                    }
                    End::Writable(j) => c.set_read_only(j, false),
                }
            } else {
                i += 1;
            }
        }
        c.reap_exited(TIME_SYNC_WAIT_S);
        inv.check(&c);
        if started.elapsed() >= spec.fault_phase && pending.is_empty() {
            break;
        }
        std::thread::sleep(POLL);
    }
    // Healed: every link clean, every state folder writable and with room, every node up,
    // MicroK8s running where installed.
    for i in 0..n {
        c.set_read_only(i, false);
        assert!(
            c.unfill_state(i),
            "node-{i}: the filler could not be removed"
        );
        if !c.nodes[i].link.is_healthy() {
            c.nodes[i].link = HostFaults::default();
            apply_link(&mut c, i);
        }
        if c.nodes[i].down || c.nodes[i].agent_pid().is_none() {
            c.restart_microk8s(i);
            c.start_agent(i, TIME_SYNC_WAIT_S);
        } else {
            c.restart_microk8s(i);
        }
    }
    let healed = Instant::now();
    eprintln!(
        "faults stopped at {:.1} s; waiting for convergence (bound {} s)",
        started.elapsed().as_secs_f64(),
        CONVERGENCE_BOUND.as_secs()
    );
    let voters = spec.control_plane.min(3);
    let mut done: Vec<Option<f64>> = vec![None; n];
    let mut last_poll = Instant::now() - Duration::from_secs(5);
    let mut last_docs: Vec<Option<StatusDoc>> = vec![None; n];
    // After the heal the address has exactly one holder, and the API answers through it.
    let mut api: Option<(usize, f64)> = None;
    let mut last_holders = Vec::new();
    while healed.elapsed() < CONVERGENCE_BOUND
        && (done.iter().any(Option::is_none) || api.is_none())
    {
        c.reap_exited(TIME_SYNC_WAIT_S);
        inv.check(&c);
        if last_poll.elapsed() >= Duration::from_secs(1) {
            last_poll = Instant::now();
            if api.is_none() {
                last_holders = c.address_holders(API_ADDRESS);
                if let [h] = last_holders[..] {
                    if c.api_ready_via((h + 1) % n, API_ADDRESS) {
                        api = Some((h, healed.elapsed().as_secs_f64()));
                    }
                }
            }
            for i in 0..n {
                if done[i].is_some() {
                    continue;
                }
                let doc = c.status(i);
                if doc.as_ref().is_some_and(|d| converged(d, voters)) {
                    done[i] = Some(healed.elapsed().as_secs_f64());
                }
                last_docs[i] = doc;
            }
        }
        std::thread::sleep(POLL);
    }
    // A last round of checks after convergence.
    for _ in 0..5 {
        inv.check(&c);
        std::thread::sleep(POLL);
    }
    for (i, d) in done.iter().enumerate() {
        match d {
            Some(s) => report.convergence_s.push(*s),
            None => report.unconverged.push(format!(
                "node-{i}: {}",
                last_docs[i]
                    .as_ref()
                    .map(|d| format!(
                        "phase {}, role {:?}, microk8s {:?}, last error {:?}",
                        d.phase,
                        d.role,
                        d.microk8s
                            .as_ref()
                            .map(|m| (m.voters.len(), m.note.clone())),
                        d.last_error
                    ))
                    .unwrap_or_else(|| "no status".into())
            )),
        }
    }
    match api {
        Some(h) => report.api_holder = Some(h),
        None => report.unconverged.push(format!(
            "API address {API_ADDRESS}: holders {last_holders:?}, not one answering /readyz"
        )),
    }
    if !report.unconverged.is_empty() {
        c.dump(30);
    }
    report.violations = inv.violations.clone();
    report.majority_holders = inv.majority_holders.clone();
    report.minority_held = inv.minority_held;
    report.no_majority = inv.no_majority;
    report.max_rss_kib = inv.max_rss_kib;
    report.checks = inv.checks;
    report.agent_exits = c.agent_exits.clone();
    report.total_s = started.elapsed().as_secs_f64();
    // Everything the soak started is gone now: libfaketime must have left nothing behind.
    let before = c.shm_before.clone();
    drop(c);
    report.shm_left = faketime_left(&before);
    for f in &report.shm_left {
        report
            .violations
            .push(format!("libfaketime left /dev/shm/{f} behind"));
    }
    report
}
