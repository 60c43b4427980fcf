//! `imagebuilder qemu ...`: the command-line face of [`crate::Cluster`]. The image builder
//! mounts [`QemuCommand`] as one subcommand variant and calls [`run`]; every command reads or
//! writes the state directory (`--dir`, default `qemu-cluster`), so separate invocations
//! manage one cluster.
//!
//! To add a command, add a variant here and a method on [`crate::Cluster`] that does the work.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::accel::AccelChoice;
use crate::cluster::{BootSource, Cluster, ClusterSpec, NodeRunState, StopOutcome};
use crate::node::{Arch, LbForward, DEFAULT_GUEST_MGMT_PORT};
use crate::seed::{Subnet, DEFAULT_SUBNET};

/// Where the cluster's state lives.
#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// State directory: cluster.json, overlays, serial logs.
    #[arg(long, default_value = "qemu-cluster")]
    pub dir: PathBuf,
}

/// `qemu up`'s options: parsed once here, turned into a [`ClusterSpec`] by
/// [`UpArgs::into_spec`] (the image builder's `qemu up` fills in `user_data` first).
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Disk image the nodes boot from (raw or qcow2); it is never written.
    pub image: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, default_value = "x86_64")]
    pub arch: Arch,
    /// Guest memory per node, MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    #[command(flatten)]
    pub dir: DirArg,
    /// Multicast port of the cluster network (default: a free port derived from --dir).
    #[arg(long)]
    pub port: Option<u16>,
    /// auto probes KVM and falls back to TCG.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Guest port that each node's 127.0.0.1 management port forwards to.
    #[arg(long, default_value_t = DEFAULT_GUEST_MGMT_PORT)]
    pub guest_mgmt_port: u16,
    /// Boot this kernel directly instead of UEFI (e.g. a Pi image's, from system-boot).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    #[arg(long, requires = "kernel", default_value = "")]
    pub append: String,
    /// Virtual disk size per node (e.g. 8G), if larger than the image.
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Exit QEMU when the guest reboots.
    #[arg(long)]
    pub no_reboot: bool,
    /// Cluster-network subnet: node N gets host number 10+N, given by its cloud-init
    /// NoCloud seed (a CIDATA volume with meta-data, network-config, user-data).
    #[arg(long, default_value = DEFAULT_SUBNET)]
    pub subnet: Subnet,
    /// user-data (cloud-config) for every node's seed; the seed replaces the image's own
    /// user-data, so pass the image's (`imagebuilder qemu up` does).
    #[arg(long, conflicts_with = "no_seed")]
    pub user_data: Option<PathBuf>,
    /// Attach no NoCloud seed (the image must configure its own network).
    #[arg(long)]
    pub no_seed: bool,
    /// Let the management NICs reach beyond this machine through QEMU's NAT (e.g. for
    /// the nodes to install the MicroK8s snap); by default nothing leaves it.
    #[arg(long)]
    pub uplink: bool,
    /// Also forward a 127.0.0.1 port on every VM (`qemu status`, column LB) to this guest
    /// address and port, e.g. the MetalLB pool's first address and 80
    /// (192.168.76.200:80 for configs/qemu-test.toml): a VM's forward answers only while
    /// that VM holds the address, so `imagebuilder drill --qemu-dir` can see the
    /// LoadBalancer move. Nodes added later (`qemu add`) get one too.
    #[arg(long, value_name = "ADDRESS:PORT")]
    pub lb_forward: Option<LbForward>,
}

impl UpArgs {
    /// The cluster these options describe; reads the `--user-data` file.
    pub fn into_spec(self) -> anyhow::Result<ClusterSpec> {
        let user_data = match &self.user_data {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading user-data {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let boot = match self.kernel {
            Some(kernel) => BootSource::Kernel {
                kernel,
                initrd: self.initrd,
                append: self.append,
            },
            None => BootSource::Uefi,
        };
        // Every field named: a new one in ClusterSpec must be decided on here.
        Ok(ClusterSpec {
            image: self.image,
            dir: self.dir.dir,
            nodes: self.nodes,
            arch: self.arch,
            accel: self.accel,
            memory_mib: self.memory,
            cpus: self.cpus,
            mcast_port: self.port,
            guest_mgmt_port: self.guest_mgmt_port,
            boot,
            disk_size: self.disk_size,
            no_reboot: self.no_reboot,
            subnet: (!self.no_seed).then_some(self.subnet),
            user_data,
            uplink: self.uplink,
            lb_forward: self.lb_forward,
        })
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum QemuCommand {
    /// Boot a test cluster: one copy-on-write overlay of IMAGE per node.
    Up(UpArgs),
    /// Show every node: state, pid, management address, serial log.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Press the power button, wait, then kill if the guest did not power off.
    Stop {
        node: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Hard power-off (like pulling the plug).
    Kill {
        node: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Boot a stopped node again (same overlay, MACs, firmware variables).
    Start {
        node: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Boot one more node from the same image.
    Add {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Kill every node and delete overlays and state; serial logs are kept.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
}

/// Runs one command to completion (builds its own tokio runtime; call from synchronous code).
pub fn run(cmd: QemuCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cmd))
}

/// [`run`] for callers already inside a tokio runtime.
pub async fn run_async(cmd: QemuCommand) -> anyhow::Result<()> {
    match cmd {
        QemuCommand::Up(args) => {
            let cluster = Cluster::up(args.into_spec()?).await?;
            println!(
                "cluster up in {} (multicast port {})",
                cluster.dir().display(),
                cluster.mcast_port()
            );
            print_status(&cluster);
        }
        QemuCommand::Status { dir } => print_status(&Cluster::open(&dir.dir)?),
        QemuCommand::Stop { node, timeout, dir } => {
            let mut c = Cluster::open(&dir.dir)?;
            let how = c.stop(&node, Duration::from_secs(timeout)).await?;
            println!(
                "{node}: {}",
                match how {
                    StopOutcome::PoweredOff => "powered off",
                    StopOutcome::Killed => "did not power off in time; killed",
                    StopOutcome::AlreadyStopped => "was not running",
                }
            );
        }
        QemuCommand::Kill { node, dir } => {
            let was = Cluster::open(&dir.dir)?.kill(&node).await?;
            println!("{node}: {}", if was { "killed" } else { "was not running" });
        }
        QemuCommand::Start { node, dir } => {
            let mut c = Cluster::open(&dir.dir)?;
            c.start(&node).await?;
            print_status(&c);
        }
        QemuCommand::Add { dir } => {
            let mut c = Cluster::open(&dir.dir)?;
            let name = c.add().await?;
            println!("added {name}");
            print_status(&c);
        }
        QemuCommand::Down { dir } => {
            Cluster::open(&dir.dir)?.down().await?;
            println!(
                "cluster in {} is down (serial logs kept)",
                dir.dir.display()
            );
        }
    }
    Ok(())
}

pub fn print_status(c: &Cluster) {
    let lb = c.state().lb_forward;
    if let Some(f) = lb {
        println!(
            "LB: each VM's 127.0.0.1 port forwarded to {f} on it (answers where that VM holds {})",
            f.address
        );
    }
    println!(
        "{:<8} {:<8} {:>8}  {:<17}  {:<15}  {:<15}  {:<15}  {:<15}  {}SERIAL LOG",
        "NODE",
        "STATE",
        "PID",
        "MAC",
        "ADDRESS",
        "MGMT",
        "API",
        "SSH",
        if lb.is_some() {
            "LB               "
        } else {
            ""
        }
    );
    for s in c.status() {
        let lb_col = match (lb, s.lb_addr) {
            (None, _) => String::new(),
            (Some(_), a) => format!(
                "{:<15}  ",
                a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
            ),
        };
        println!(
            "{:<8} {:<8} {:>8}  {:<17}  {:<15}  {:<15}  {:<15}  {:<15}  {lb_col}{}",
            s.name,
            match s.state {
                NodeRunState::Running => "running",
                NodeRunState::Stopped => "stopped",
            },
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            s.mac,
            s.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            s.mgmt_addr,
            s.api_addr
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            s.ssh_addr
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            s.serial_log.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: QemuCommand,
    }

    #[test]
    fn parses_up_with_kernel_boot() {
        let t = Top::try_parse_from([
            "x",
            "up",
            "--nodes",
            "2",
            "--arch",
            "aarch64",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--append",
            "console=ttyAMA0",
            "--dir",
            "/tmp/c",
            "img.raw",
        ])
        .unwrap();
        match t.cmd {
            QemuCommand::Up(up) => {
                assert_eq!(up.nodes, 2);
                assert_eq!(up.arch, Arch::Aarch64);
                assert_eq!(up.kernel, Some("/k".into()));
                assert_eq!(up.dir.dir, PathBuf::from("/tmp/c"));
                assert_eq!(up.image, PathBuf::from("img.raw"));
                let spec = up.into_spec().unwrap();
                assert_eq!((spec.nodes, spec.arch), (2, Arch::Aarch64));
                assert_eq!(spec.dir, PathBuf::from("/tmp/c"));
                match spec.boot {
                    BootSource::Kernel {
                        kernel,
                        initrd,
                        append,
                    } => {
                        assert_eq!(kernel, PathBuf::from("/k"));
                        assert_eq!(initrd, Some("/i".into()));
                        assert_eq!(append, "console=ttyAMA0");
                    }
                    other => panic!("{other:?}"),
                }
            }
            _ => panic!("not up"),
        }
    }

    #[test]
    fn bare_up_means_three_uefi_nodes_with_defaults() {
        let t = Top::try_parse_from(["x", "up", "out/qemu.img"]).unwrap();
        match t.cmd {
            QemuCommand::Up(up) => {
                assert_eq!((up.nodes, up.arch, up.memory), (3, Arch::X86_64, 1024));
                assert_eq!(up.kernel, None);
                assert_eq!(up.accel, AccelChoice::Auto);
                assert_eq!(up.guest_mgmt_port, 7443);
                assert_eq!(up.dir.dir, PathBuf::from("qemu-cluster"));
                let spec = up.into_spec().unwrap();
                let defaults = ClusterSpec::new("out/qemu.img", "qemu-cluster");
                assert_eq!(format!("{spec:?}"), format!("{defaults:?}"));
            }
            _ => panic!("not up"),
        }
    }

    #[test]
    fn up_options_become_the_cluster_spec() {
        let up = |args: &[&str]| match Top::try_parse_from(["x", "up"].iter().chain(args))
            .unwrap()
            .cmd
        {
            QemuCommand::Up(up) => up,
            _ => panic!("not up"),
        };
        let tmp = tempfile::tempdir().unwrap();
        let ud = tmp.path().join("user-data");
        std::fs::write(&ud, "#cloud-config\nusers: []\n").unwrap();
        let ud_arg = ud.to_str().unwrap();
        let spec = up(&[
            "--memory",
            "512",
            "--cpus",
            "2",
            "--port",
            "5000",
            "--accel",
            "tcg",
            "--disk-size",
            "8G",
            "--no-reboot",
            "--uplink",
            "--subnet",
            "10.9.0.0/24",
            "--guest-mgmt-port",
            "8443",
            "--user-data",
            ud_arg,
            "--lb-forward",
            "192.168.76.200:80",
            "i.img",
        ])
        .into_spec()
        .unwrap();
        assert_eq!((spec.memory_mib, spec.cpus), (512, 2));
        assert_eq!(spec.mcast_port, Some(5000));
        assert_eq!(spec.accel, AccelChoice::Tcg);
        assert_eq!(spec.disk_size.as_deref(), Some("8G"));
        assert!(spec.no_reboot && spec.uplink);
        assert_eq!(spec.subnet.unwrap().to_string(), "10.9.0.0/24");
        assert_eq!(spec.guest_mgmt_port, 8443);
        assert_eq!(
            spec.user_data.as_deref(),
            Some("#cloud-config\nusers: []\n")
        );
        assert!(matches!(spec.boot, BootSource::Uefi));
        assert_eq!(
            spec.lb_forward.map(|f| f.to_string()).as_deref(),
            Some("192.168.76.200:80")
        );
        assert_eq!(
            up(&["--no-seed", "i.img"]).into_spec().unwrap().subnet,
            None
        );
        let missing = tmp.path().join("gone");
        let e = up(&["--user-data", missing.to_str().unwrap(), "i.img"])
            .into_spec()
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading user-data") && e.contains("gone"), "{e}");
    }

    #[test]
    fn a_bad_lb_forward_is_refused_with_the_reason() {
        for (arg, why) in [
            ("192.168.76.200", "give the guest address and port"),
            ("10.0.2.15:80", "10.0.2.0/24"),
        ] {
            let e = Top::try_parse_from(["x", "up", "--lb-forward", arg, "img"])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(why), "{arg}: {e}");
        }
    }

    #[test]
    fn initrd_without_kernel_and_bad_arch_are_refused() {
        assert!(Top::try_parse_from(["x", "up", "--initrd", "/i", "img"]).is_err());
        let e = Top::try_parse_from(["x", "up", "--arch", "sparc", "img"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sparc"), "{e}");
    }
}
