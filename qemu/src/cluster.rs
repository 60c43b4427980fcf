//! A test cluster of QEMU nodes and its life cycle: `up`, `status`, `stop`, `kill`, `start`,
//! `add`, `down`. Each node boots from its own copy-on-write qcow2 overlay on one image, with
//! deterministic MACs, its UEFI variable store (or a direct kernel boot), a serial log file, a
//! QMP socket and a management port on 127.0.0.1. QEMU daemonizes, so the nodes outlive the
//! process that started them; the state lives in `<dir>/cluster.json` (see [`crate::state`]).
//!
//! Liveness is checked from `/proc`: the recorded pid must be alive, not a zombie, and its
//! command line must name this node's QMP socket (so a reused pid is never mistaken for a node).
//!
//! To add an operation, load the node with [`Cluster::node`], act through QMP
//! ([`crate::qmp`]) or the pid, then [`ClusterState::save`] the change.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rackseed_host::command::Cmd;

use crate::accel::{choose_accel, AccelChoice};
use crate::node::{
    fnv1a, node_macs, qemu_argv, Arch, Boot, LbForward, NodeSpec, DEFAULT_GUEST_MGMT_PORT,
};
use crate::qmp::qmp_execute;
use crate::seed::{SeedFiles, Subnet, DEFAULT_SUBNET};
use crate::state::{BootConfig, ClusterState, NodeState, STATE_VERSION};

/// Limit for `qemu-img` calls.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for QEMU to initialize and daemonize.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(60);
const QMP_TIMEOUT: Duration = Duration::from_secs(3);
/// Unix socket paths must fit in `sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;
/// Deterministic multicast ports are taken from this range.
const MCAST_PORT_BASE: u16 = 40000;
const MCAST_PORT_SPAN: u16 = 20000;

/// Errors a caller may want to branch on; everything else is an `anyhow` error with context.
/// Find them with `err.downcast_ref::<ClusterError>()`.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no cluster in {dir} (no cluster.json); run `up` first")]
    NoCluster { dir: PathBuf },
    #[error("a cluster already exists in {dir}; run `down` first or choose another --dir")]
    ClusterExists { dir: PathBuf },
    #[error("no node `{node}` in this cluster (nodes: {known})")]
    NoSuchNode { node: String, known: String },
    #[error("node {node} is already running (pid {pid})")]
    AlreadyRunning { node: String, pid: u32 },
    #[error("no {arch} UEFI firmware found (tried {tried}); install the {package} package")]
    MissingFirmware {
        arch: Arch,
        tried: String,
        package: &'static str,
    },
    #[error("multicast port {port} is already in use by another process (another cluster?)")]
    PortBusy { port: u16 },
    #[error("a cluster holds at most 256 nodes")]
    TooManyNodes,
}

/// How the nodes boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// UEFI from the disk (OVMF for x86_64, AAVMF for aarch64).
    Uefi,
    /// Direct kernel boot; `initrd` optional.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

/// What `up` creates. Build with [`ClusterSpec::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub image: PathBuf,
    pub dir: PathBuf,
    pub nodes: usize,
    pub arch: Arch,
    pub accel: AccelChoice,
    pub memory_mib: u32,
    pub cpus: u32,
    /// `None`: a free port chosen deterministically from the state directory.
    pub mcast_port: Option<u16>,
    pub guest_mgmt_port: u16,
    pub boot: BootSource,
    /// Virtual size of each overlay (`qemu-img` syntax, e.g. `8G`); `None` keeps the image's.
    pub disk_size: Option<String>,
    pub no_reboot: bool,
    /// The cluster network's subnet for each node's NoCloud seed ([`crate::seed`]); `None`
    /// attaches no seed.
    pub subnet: Option<Subnet>,
    /// The user-data the seeds carry (normally the image's own); `None`: an empty
    /// `#cloud-config`.
    pub user_data: Option<String>,
    /// Let the management NICs reach beyond the host (see [`NodeSpec::uplink`]).
    pub uplink: bool,
    /// Forward a free 127.0.0.1 port on every VM to this guest address and port (see
    /// [`LbForward`]); nodes added later get one too.
    pub lb_forward: Option<LbForward>,
}

impl ClusterSpec {
    /// Defaults: 3 x86_64 nodes, UEFI, 1024 MiB, 1 CPU, probed accelerator, mgmt port 7443,
    /// seeds on [`DEFAULT_SUBNET`] with an empty user-data.
    pub fn new(image: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> ClusterSpec {
        ClusterSpec {
            image: image.into(),
            dir: dir.into(),
            nodes: 3,
            arch: Arch::X86_64,
            accel: AccelChoice::Auto,
            memory_mib: 1024,
            cpus: 1,
            mcast_port: None,
            guest_mgmt_port: DEFAULT_GUEST_MGMT_PORT,
            boot: BootSource::Uefi,
            disk_size: None,
            no_reboot: false,
            subnet: Some(DEFAULT_SUBNET.parse().expect("the default subnet parses")),
            user_data: None,
            uplink: false,
            lb_forward: None,
        }
    }
}

/// Whether a node's QEMU is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRunState {
    Running,
    Stopped,
}

/// One row of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub state: NodeRunState,
    pub pid: Option<u32>,
    pub mac: String,
    /// `127.0.0.1:<port>` reaching the guest's management port.
    pub mgmt_addr: SocketAddr,
    /// `127.0.0.1:<port>` reaching the guest's MicroK8s API (16443).
    pub api_addr: Option<SocketAddr>,
    /// `127.0.0.1:<port>` reaching the guest's SSH server (22).
    pub ssh_addr: Option<SocketAddr>,
    /// `127.0.0.1:<port>` reaching the cluster's LoadBalancer forward ([`LbForward`]) on this
    /// guest: it answers only while this guest holds that address.
    pub lb_addr: Option<SocketAddr>,
    /// The cluster-network address its seed gives it (`None` without seeds).
    pub address: Option<Ipv4Addr>,
    pub serial_log: PathBuf,
}

/// How `stop` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off after the ACPI power button.
    PoweredOff,
    /// It did not within the timeout and was killed.
    Killed,
    /// It was not running.
    AlreadyStopped,
}

/// A cluster on disk. Dropping it leaves the nodes running, unless [`Cluster::kill_on_drop`]
/// was set (tests).
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    state: ClusterState,
    kill_on_drop: bool,
}

impl Cluster {
    /// Creates the state directory, one overlay per node, and boots them all.
    /// On failure, nodes already started are killed and their disks removed.
    pub async fn up(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        anyhow::ensure!(spec.nodes >= 1, "a cluster needs at least one node");
        anyhow::ensure!(spec.nodes <= 256, ClusterError::TooManyNodes);
        anyhow::ensure!(spec.memory_mib >= 64, "memory must be at least 64 MiB");
        anyhow::ensure!(spec.cpus >= 1, "cpus must be at least 1");
        if let Some(subnet) = spec.subnet {
            // Every node must get an address before any is started.
            subnet.node_address((spec.nodes - 1) as u8)?;
        }
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating state directory {}", spec.dir.display()))?;
        let dir = std::fs::canonicalize(&spec.dir)
            .with_context(|| format!("resolving state directory {}", spec.dir.display()))?;
        if ClusterState::path(&dir).exists() {
            return Err(ClusterError::ClusterExists { dir }.into());
        }
        let image = std::fs::canonicalize(&spec.image)
            .with_context(|| format!("reading image {}", spec.image.display()))?;
        let image_format = image_format(&image).await?;
        let boot = match spec.boot {
            BootSource::Uefi => {
                let (code, vars_template) = find_uefi_firmware(spec.arch)?;
                BootConfig::Uefi {
                    code,
                    vars_template,
                }
            }
            BootSource::Kernel {
                kernel,
                initrd,
                append,
            } => BootConfig::Kernel {
                kernel: std::fs::canonicalize(&kernel)
                    .with_context(|| format!("reading kernel {}", kernel.display()))?,
                initrd: match initrd {
                    Some(i) => Some(
                        std::fs::canonicalize(&i)
                            .with_context(|| format!("reading initrd {}", i.display()))?,
                    ),
                    None => None,
                },
                append,
            },
        };
        let id = dir.to_string_lossy().into_owned();
        let mcast_port = match spec.mcast_port {
            Some(p) => {
                anyhow::ensure!(udp_port_free(p), ClusterError::PortBusy { port: p });
                p
            }
            None => free_mcast_port(&id)?,
        };
        let user_data = match &spec.user_data {
            Some(text) => {
                let p = dir.join("user-data");
                rackseed_host::fs::write_atomic(&p, text.as_bytes(), 0o600)
                    .with_context(|| format!("writing {}", p.display()))?;
                Some(p)
            }
            None => None,
        };
        let mut cluster = Cluster {
            dir,
            state: ClusterState {
                version: STATE_VERSION,
                id,
                image,
                image_format,
                disk_size: spec.disk_size,
                arch: spec.arch,
                accel: spec.accel,
                resolved_accel: None,
                memory_mib: spec.memory_mib,
                cpus: spec.cpus,
                mcast_port,
                guest_mgmt_port: spec.guest_mgmt_port,
                boot,
                no_reboot: spec.no_reboot,
                subnet: spec.subnet,
                user_data,
                uplink: spec.uplink,
                lb_forward: spec.lb_forward,
                nodes: Vec::new(),
            },
            kill_on_drop: false,
        };
        cluster.save()?;
        for _ in 0..spec.nodes {
            if let Err(e) = cluster.add().await {
                cluster.kill_on_drop = false;
                if let Err(cleanup) = cluster.teardown().await {
                    tracing::warn!(error = %format!("{cleanup:#}"), "cleaning up after a failed up");
                }
                return Err(e);
            }
        }
        Ok(cluster)
    }

    /// Opens the cluster recorded in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> anyhow::Result<Cluster> {
        let dir = dir.as_ref();
        if !ClusterState::path(dir).exists() {
            return Err(ClusterError::NoCluster { dir: dir.into() }.into());
        }
        Ok(Cluster {
            dir: dir.into(),
            state: ClusterState::load(dir)?,
            kill_on_drop: false,
        })
    }

    /// Re-reads `cluster.json`, e.g. after another process (the CLI) changed the cluster.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        self.state = ClusterState::load(&self.dir)?;
        Ok(())
    }

    /// When set, dropping this value SIGKILLs every running node (for tests that may panic).
    pub fn kill_on_drop(&mut self, yes: bool) {
        self.kill_on_drop = yes;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn mcast_port(&self) -> u16 {
        self.state.mcast_port
    }

    /// Node names in index order.
    pub fn node_names(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A node by name (`node1`) or index (`1`).
    pub fn node(&self, node: &str) -> anyhow::Result<&NodeState> {
        Ok(&self.state.nodes[self.find(node)?])
    }

    /// `127.0.0.1:<port>` forwarded to the node's management port.
    pub fn mgmt_addr(&self, node: &str) -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            self.node(node)?.mgmt_port,
        )))
    }

    /// Whether the node's QEMU is alive.
    pub fn is_running(&self, node: &str) -> anyhow::Result<bool> {
        Ok(node_alive(self.node(node)?))
    }

    pub fn status(&self) -> Vec<NodeStatus> {
        self.state
            .nodes
            .iter()
            .map(|n| {
                let alive = node_alive(n);
                NodeStatus {
                    name: n.name.clone(),
                    state: if alive {
                        NodeRunState::Running
                    } else {
                        NodeRunState::Stopped
                    },
                    pid: if alive { n.pid } else { None },
                    mac: n.mac.clone(),
                    mgmt_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, n.mgmt_port)),
                    address: n.address,
                    api_addr: n
                        .api_port
                        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
                    ssh_addr: n
                        .ssh_port
                        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
                    lb_addr: n
                        .lb_port
                        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
                    serial_log: n.serial_log.clone(),
                }
            })
            .collect()
    }

    /// Adds one more node on the same image and boots it; returns its name.
    pub async fn add(&mut self) -> anyhow::Result<String> {
        let index = match self.state.nodes.iter().map(|n| n.index).max() {
            None => 0,
            Some(255) => return Err(ClusterError::TooManyNodes.into()),
            Some(i) => i + 1,
        };
        let name = format!("node{index}");
        if let Some(subnet) = self.state.subnet {
            subnet.node_address(index)?;
        }
        let (mac, mgmt_mac) = node_macs(&self.state.id, index);
        let sockets = socket_dir(&self.dir)?;
        let overlay = self.dir.join(format!("{name}.qcow2"));
        let mut create = Cmd::new("qemu-img", QEMU_IMG_TIMEOUT)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                &self.state.image_format,
                "-b",
            ])
            .arg(&self.state.image)
            .arg(&overlay);
        if let Some(size) = &self.state.disk_size {
            create = create.arg(size);
        }
        create
            .run()
            .await
            .with_context(|| format!("creating overlay {}", overlay.display()))?;
        let vars = match &self.state.boot {
            BootConfig::Uefi { vars_template, .. } => {
                let vars = self.dir.join(format!("{name}.vars.fd"));
                std::fs::copy(vars_template, &vars).with_context(|| {
                    format!(
                        "copying UEFI variables {} to {}",
                        vars_template.display(),
                        vars.display()
                    )
                })?;
                Some(vars)
            }
            BootConfig::Kernel { .. } => None,
        };
        let (seed, address) = match self.state.subnet {
            Some(subnet) => {
                let user_data = match &self.state.user_data {
                    Some(p) => Some(std::fs::read_to_string(p).with_context(|| {
                        format!("reading the seeds' user-data {}", p.display())
                    })?),
                    None => None,
                };
                let files = SeedFiles::for_node(
                    &self.state.id,
                    index,
                    &mac,
                    &mgmt_mac,
                    subnet,
                    user_data.as_deref(),
                    self.state.uplink,
                )?;
                let volume = self.dir.join(format!("{name}.seed.img"));
                crate::seed::write_volume(&files, &volume)
                    .await
                    .with_context(|| format!("writing {name}'s NoCloud seed"))?;
                (Some(volume), Some(subnet.node_address(index)?))
            }
            None => (None, None),
        };
        self.state.nodes.push(NodeState {
            name: name.clone(),
            index,
            mac,
            mgmt_mac,
            mgmt_port: free_tcp_port()?,
            overlay,
            vars,
            serial_log: self.dir.join(format!("{name}.serial.log")),
            qmp_socket: sockets.join(format!("{name}.qmp")),
            pid_file: self.dir.join(format!("{name}.pid")),
            pid: None,
            accel: None,
            seed,
            address,
            api_port: Some(free_tcp_port()?),
            ssh_port: Some(free_tcp_port()?),
            lb_port: match self.state.lb_forward {
                Some(_) => Some(free_tcp_port()?),
                None => None,
            },
        });
        self.save()?;
        self.start(&name).await?;
        Ok(name)
    }

    /// Boots a stopped node again with its overlay, firmware variables and MACs.
    pub async fn start(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self.find(node)?;
        let n = &self.state.nodes[i];
        if node_alive(n) {
            return Err(ClusterError::AlreadyRunning {
                node: n.name.clone(),
                pid: n.pid.unwrap_or_default(),
            }
            .into());
        }
        let accel = match self.state.resolved_accel {
            Some(a) => a,
            None => {
                let a = choose_accel(self.state.arch, self.state.accel).await;
                self.state.resolved_accel = Some(a);
                a
            }
        };
        let n = &mut self.state.nodes[i];
        if !tcp_port_free(n.mgmt_port) {
            n.mgmt_port = free_tcp_port()?;
        }
        if n.api_port.is_some_and(|p| !tcp_port_free(p)) {
            n.api_port = Some(free_tcp_port()?);
        }
        if n.ssh_port.is_some_and(|p| !tcp_port_free(p)) {
            n.ssh_port = Some(free_tcp_port()?);
        }
        if self.state.lb_forward.is_some() && !n.lb_port.is_some_and(tcp_port_free) {
            n.lb_port = Some(free_tcp_port()?);
        }
        for stale in [&n.qmp_socket, &n.pid_file] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing stale {}", stale.display()))
                }
            }
        }
        let boot = match &self.state.boot {
            BootConfig::Uefi { code, .. } => Boot::Uefi {
                code: code.clone(),
                vars: n
                    .vars
                    .clone()
                    .context("uefi node without a variable store")?,
            },
            BootConfig::Kernel {
                kernel,
                initrd,
                append,
            } => Boot::Kernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                append: append.clone(),
            },
        };
        let spec = NodeSpec {
            name: format!("rackseed-{}", n.name),
            arch: self.state.arch,
            accel,
            memory_mib: self.state.memory_mib,
            cpus: self.state.cpus,
            disk: n.overlay.clone(),
            seed: n.seed.clone(),
            boot,
            mac: n.mac.clone(),
            mgmt_mac: n.mgmt_mac.clone(),
            mcast_port: self.state.mcast_port,
            mgmt_host_port: n.mgmt_port,
            guest_mgmt_port: self.state.guest_mgmt_port,
            api_host_port: n.api_port,
            ssh_host_port: n.ssh_port,
            lb_forward: self.state.lb_forward.zip(n.lb_port).map(|(f, p)| (p, f)),
            uplink: self.state.uplink,
            serial_log: n.serial_log.clone(),
            qmp_socket: n.qmp_socket.clone(),
            pid_file: n.pid_file.clone(),
            no_reboot: self.state.no_reboot,
        };
        let argv = qemu_argv(&spec);
        Cmd::new(&argv[0], QEMU_START_TIMEOUT)
            .args(&argv[1..])
            .run()
            .await
            .with_context(|| format!("starting node {}", n.name))?;
        let pid_text = std::fs::read_to_string(&n.pid_file)
            .with_context(|| format!("reading pid file {}", n.pid_file.display()))?;
        let pid: u32 = pid_text.trim().parse().with_context(|| {
            format!(
                "pid file {} holds {:?}, not a pid",
                n.pid_file.display(),
                pid_text.trim()
            )
        })?;
        n.pid = Some(pid);
        n.accel = Some(accel);
        tracing::info!(node = %n.name, pid, %accel, mgmt_port = n.mgmt_port, "node started");
        self.save()
    }

    /// Presses the ACPI power button and waits up to `timeout` for the guest to power off;
    /// kills it after that.
    pub async fn stop(&mut self, node: &str, timeout: Duration) -> anyhow::Result<StopOutcome> {
        let i = self.find(node)?;
        let n = &self.state.nodes[i];
        if !node_alive(n) {
            return Ok(StopOutcome::AlreadyStopped);
        }
        match qmp_execute(&n.qmp_socket, "system_powerdown", None, QMP_TIMEOUT).await {
            Ok(_) => {
                if wait_exit(n, timeout).await {
                    self.state.nodes[i].pid = None;
                    self.save()?;
                    return Ok(StopOutcome::PoweredOff);
                }
                tracing::info!(node = %n.name, ?timeout, "no power-off after the power button; killing");
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(node = %n.name, error = %e, "power button failed; killing")
            }
        }
        self.kill(node).await?;
        Ok(StopOutcome::Killed)
    }

    /// Hard power-off: QMP `quit` (no guest shutdown), SIGKILL if that does not end it.
    /// Returns whether the node was running.
    pub async fn kill(&mut self, node: &str) -> anyhow::Result<bool> {
        let i = self.find(node)?;
        let was_running = hard_kill(&self.state.nodes[i]).await?;
        self.state.nodes[i].pid = None;
        self.save()?;
        Ok(was_running)
    }

    /// Kills every node, removes overlays, firmware variable stores, sockets and the state
    /// file. Serial logs stay in the directory for inspection.
    pub async fn down(mut self) -> anyhow::Result<()> {
        self.teardown().await
    }

    async fn teardown(&mut self) -> anyhow::Result<()> {
        for n in &self.state.nodes {
            hard_kill(n).await?;
        }
        let mut files: Vec<&Path> = Vec::new();
        for n in &self.state.nodes {
            files.extend([
                n.overlay.as_path(),
                n.qmp_socket.as_path(),
                n.pid_file.as_path(),
            ]);
            files.extend(n.vars.as_deref());
            files.extend(n.seed.as_deref());
        }
        files.extend(self.state.user_data.as_deref());
        for f in files {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
            }
        }
        let sockets = socket_dir(&self.dir)?;
        if sockets != self.dir {
            let _ = std::fs::remove_dir(&sockets);
        }
        let state = ClusterState::path(&self.dir);
        std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
        self.state.nodes.clear();
        Ok(())
    }

    /// Waits until the node's serial log contains `needle`.
    pub async fn wait_for_serial(
        &self,
        node: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_for_serial_count(node, needle, 1, timeout).await
    }

    /// Waits until the node's serial log contains `needle` at least `count` times (the log is
    /// appended across boots).
    pub async fn wait_for_serial_count(
        &self,
        node: &str,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let n = self.node(node)?;
        let start = Instant::now();
        loop {
            let log = std::fs::read(&n.serial_log).unwrap_or_default();
            let text = String::from_utf8_lossy(&log);
            if text.matches(needle).count() >= count {
                return Ok(());
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "node {} did not print {needle:?} ({count}x) within {timeout:?}; serial log {} ends:\n{}",
                    n.name,
                    n.serial_log.display(),
                    tail_lines(&text, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `lines` lines of the node's serial log (empty if none yet).
    pub fn serial_tail(&self, node: &str, lines: usize) -> anyhow::Result<String> {
        let n = self.node(node)?;
        let log = std::fs::read(&n.serial_log).unwrap_or_default();
        Ok(tail_lines(&String::from_utf8_lossy(&log), lines))
    }

    fn find(&self, node: &str) -> anyhow::Result<usize> {
        let by_index = node.parse::<u8>().ok();
        self.state
            .nodes
            .iter()
            .position(|n| n.name == node || Some(n.index) == by_index)
            .ok_or_else(|| {
                ClusterError::NoSuchNode {
                    node: node.into(),
                    known: self.node_names().join(", "),
                }
                .into()
            })
    }

    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.dir)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kill_on_drop {
            for n in &self.state.nodes {
                if let (true, Some(pid)) = (node_alive(n), n.pid) {
                    let _ = kill(pid_of(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// True when the node's recorded pid is a live (non-zombie) QEMU serving this node's socket.
fn node_alive(n: &NodeState) -> bool {
    let Some(pid) = n.pid else { return false };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = n.qmp_socket.to_string_lossy().replace(',', ",,");
    String::from_utf8_lossy(&cmdline).contains(needle.as_str())
}

/// Polls until the node's QEMU is gone; false on timeout.
async fn wait_exit(n: &NodeState, timeout: Duration) -> bool {
    let start = Instant::now();
    while node_alive(n) {
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// QMP `quit`, then SIGKILL; returns whether it was running.
async fn hard_kill(n: &NodeState) -> anyhow::Result<bool> {
    if !node_alive(n) {
        return Ok(false);
    }
    if let Err(e) = qmp_execute(&n.qmp_socket, "quit", None, QMP_TIMEOUT).await {
        let e = format!("{:#}", anyhow::Error::from(e));
        tracing::debug!(node = %n.name, error = %e, "qmp quit failed; sending SIGKILL");
    }
    if wait_exit(n, Duration::from_secs(3)).await {
        return Ok(true);
    }
    if let Some(pid) = n.pid {
        kill(pid_of(pid), Signal::SIGKILL)
            .with_context(|| format!("killing node {} (pid {pid})", n.name))?;
    }
    anyhow::ensure!(
        wait_exit(n, Duration::from_secs(5)).await,
        "node {} (pid {:?}) survived SIGKILL",
        n.name,
        n.pid
    );
    Ok(true)
}

/// Where QMP sockets go: the state directory when its path is short enough for a unix socket,
/// else `/tmp/rackseed-qemu-<hash of the directory>`.
fn socket_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.as_os_str().len() + "/node255.qmp".len() <= MAX_SOCKET_PATH {
        return Ok(dir.into());
    }
    let short = std::env::temp_dir().join(format!(
        "rackseed-qemu-{:016x}",
        fnv1a(dir.as_os_str().as_encoded_bytes())
    ));
    std::fs::create_dir_all(&short)
        .with_context(|| format!("creating socket directory {}", short.display()))?;
    Ok(short)
}

/// The image's format as `qemu-img info` sees it.
async fn image_format(image: &Path) -> anyhow::Result<String> {
    let out = Cmd::new("qemu-img", QEMU_IMG_TIMEOUT)
        .args(["info", "--output=json"])
        .arg(image)
        .run()
        .await
        .with_context(|| format!("inspecting image {}", image.display()))?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("parsing `qemu-img info` output for {}", image.display()))?;
    v.get("format")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
        .with_context(|| format!("`qemu-img info` names no format for {}", image.display()))
}

/// (read-only code, variable-store template) for `arch`, from Debian's packages.
pub fn find_uefi_firmware(arch: Arch) -> Result<(PathBuf, PathBuf), ClusterError> {
    let (candidates, package): (&[(&str, &str)], _) = match arch {
        Arch::X86_64 => (
            &[
                (
                    "/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.fd",
                ),
                (
                    "/usr/share/OVMF/OVMF_CODE.fd",
                    "/usr/share/OVMF/OVMF_VARS.fd",
                ),
            ],
            "ovmf",
        ),
        Arch::Aarch64 => (
            &[(
                "/usr/share/AAVMF/AAVMF_CODE.fd",
                "/usr/share/AAVMF/AAVMF_VARS.fd",
            )],
            "qemu-efi-aarch64",
        ),
    };
    candidates
        .iter()
        .find(|(c, v)| Path::new(c).exists() && Path::new(v).exists())
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
        .ok_or_else(|| ClusterError::MissingFirmware {
            arch,
            tried: candidates
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", "),
            package,
        })
}

/// No socket at all is bound to this UDP port (QEMU's multicast sockets included: binding the
/// wildcard address without SO_REUSEADDR conflicts with any of them).
fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

fn tcp_port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The first free port in a sequence that starts at a hash of the cluster id.
fn free_mcast_port(cluster_id: &str) -> anyhow::Result<u16> {
    let start = (fnv1a(cluster_id.as_bytes()) % u64::from(MCAST_PORT_SPAN)) as u16;
    (0..200u16)
        .map(|k| MCAST_PORT_BASE + (start + k) % MCAST_PORT_SPAN)
        .find(|p| udp_port_free(*p))
        .context("no free multicast port among 200 candidates")
}

/// A TCP port on 127.0.0.1 that is free now (the kernel's choice).
fn free_tcp_port() -> anyhow::Result<u16> {
    let l =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("reading a bound port")?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcast_port_is_deterministic_in_range_and_skips_busy_ports() {
        let p = free_mcast_port("/tmp/some-cluster").unwrap();
        assert!((MCAST_PORT_BASE..MCAST_PORT_BASE + MCAST_PORT_SPAN).contains(&p));
        let hold = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).unwrap();
        let q = free_mcast_port("/tmp/some-cluster").unwrap();
        assert_ne!(p, q);
        drop(hold);
        assert_eq!(free_mcast_port("/tmp/some-cluster").unwrap(), p);
    }

    #[test]
    fn long_state_dirs_get_short_socket_dirs() {
        let short = Path::new("/tmp/c");
        assert_eq!(socket_dir(short).unwrap(), short);
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let s = socket_dir(&long).unwrap();
        assert!(
            s.join("node255.qmp").as_os_str().len() <= MAX_SOCKET_PATH,
            "{s:?}"
        );
        assert_eq!(socket_dir(&long).unwrap(), s);
        let _ = std::fs::remove_dir(&s);
    }

    #[test]
    fn dead_or_foreign_pids_are_not_running_nodes() {
        let mut n = NodeState {
            name: "node0".into(),
            index: 0,
            mac: String::new(),
            mgmt_mac: String::new(),
            mgmt_port: 1,
            overlay: "/x".into(),
            vars: None,
            serial_log: "/x".into(),
            qmp_socket: "/tmp/rackseed-test-no-such.qmp".into(),
            pid_file: "/x".into(),
            pid: None,
            accel: None,
            seed: None,
            address: None,
            api_port: None,
            ssh_port: None,
            lb_port: None,
        };
        assert!(!node_alive(&n));
        // This test process is alive but is not a QEMU serving that socket.
        n.pid = Some(std::process::id());
        assert!(!node_alive(&n));
        n.pid = Some(u32::MAX - 1);
        assert!(!node_alive(&n));
    }

    #[test]
    fn open_without_state_is_no_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let e = Cluster::open(dir.path()).unwrap_err();
        assert!(matches!(
            e.downcast_ref::<ClusterError>(),
            Some(ClusterError::NoCluster { .. })
        ));
    }

    #[test]
    fn firmware_is_found_where_debian_installs_it() {
        let (code, vars) =
            find_uefi_firmware(Arch::X86_64).expect("OVMF missing: install the ovmf package");
        assert!(code.exists() && vars.exists());
        let (code, vars) = find_uefi_firmware(Arch::Aarch64)
            .expect("AAVMF missing: install the qemu-efi-aarch64 package");
        assert!(code.exists() && vars.exists());
    }
}
