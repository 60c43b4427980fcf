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
use crate::node::{Arch, DEFAULT_GUEST_MGMT_PORT};
use crate::seed::{Subnet, DEFAULT_SUBNET};

/// Where the cluster's state lives.
#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// State directory: cluster.json, overlays, serial logs.
    #[arg(long, default_value = "qemu-cluster")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Subcommand)]
pub enum QemuCommand {
    /// Boot a test cluster: one copy-on-write overlay of IMAGE per node.
    Up {
        /// Disk image the nodes boot from (raw or qcow2); it is never written.
        image: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "x86_64")]
        arch: Arch,
        /// Guest memory per node, MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[command(flatten)]
        dir: DirArg,
        /// Multicast port of the cluster network (default: a free port derived from --dir).
        #[arg(long)]
        port: Option<u16>,
        /// auto probes KVM and falls back to TCG.
        #[arg(long, default_value = "auto")]
        accel: AccelChoice,
        /// Guest port that each node's 127.0.0.1 management port forwards to.
        #[arg(long, default_value_t = DEFAULT_GUEST_MGMT_PORT)]
        guest_mgmt_port: u16,
        /// Boot this kernel directly instead of UEFI (e.g. a Pi image's, from system-boot).
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        #[arg(long, requires = "kernel", default_value = "")]
        append: String,
        /// Virtual disk size per node (e.g. 8G), if larger than the image.
        #[arg(long)]
        disk_size: Option<String>,
        /// Exit QEMU when the guest reboots.
        #[arg(long)]
        no_reboot: bool,
        /// Cluster-network subnet: node N gets host number 10+N, given by its cloud-init
        /// NoCloud seed (a CIDATA volume with meta-data, network-config, user-data).
        #[arg(long, default_value = DEFAULT_SUBNET)]
        subnet: Subnet,
        /// user-data (cloud-config) for every node's seed; the seed replaces the image's own
        /// user-data, so pass the image's (`imagebuilder qemu up` does).
        #[arg(long, conflicts_with = "no_seed")]
        user_data: Option<PathBuf>,
        /// Attach no NoCloud seed (the image must configure its own network).
        #[arg(long)]
        no_seed: bool,
        /// Let the management NICs reach beyond this machine through QEMU's NAT (e.g. for
        /// the nodes to install the MicroK8s snap); by default nothing leaves it.
        #[arg(long)]
        uplink: bool,
    },
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
        QemuCommand::Up {
            image,
            nodes,
            arch,
            memory,
            cpus,
            dir,
            port,
            accel,
            guest_mgmt_port,
            kernel,
            initrd,
            append,
            disk_size,
            no_reboot,
            subnet,
            user_data,
            no_seed,
            uplink,
        } => {
            let mut spec = ClusterSpec::new(image, dir.dir);
            spec.nodes = nodes;
            spec.arch = arch;
            spec.memory_mib = memory;
            spec.cpus = cpus;
            spec.mcast_port = port;
            spec.accel = accel;
            spec.guest_mgmt_port = guest_mgmt_port;
            spec.disk_size = disk_size;
            spec.no_reboot = no_reboot;
            spec.subnet = (!no_seed).then_some(subnet);
            spec.uplink = uplink;
            spec.user_data = match user_data {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| anyhow::anyhow!("reading user-data {}: {e}", p.display()))?,
                ),
                None => None,
            };
            if let Some(kernel) = kernel {
                spec.boot = BootSource::Kernel {
                    kernel,
                    initrd,
                    append,
                };
            }
            let cluster = Cluster::up(spec).await?;
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
    println!(
        "{:<8} {:<8} {:>8}  {:<17}  {:<15}  {:<15}  {:<15}  {:<15}  SERIAL LOG",
        "NODE", "STATE", "PID", "MAC", "ADDRESS", "MGMT", "API", "SSH"
    );
    for s in c.status() {
        println!(
            "{:<8} {:<8} {:>8}  {:<17}  {:<15}  {:<15}  {:<15}  {:<15}  {}",
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
            QemuCommand::Up {
                nodes,
                arch,
                kernel,
                dir,
                image,
                ..
            } => {
                assert_eq!(nodes, 2);
                assert_eq!(arch, Arch::Aarch64);
                assert_eq!(kernel, Some("/k".into()));
                assert_eq!(dir.dir, PathBuf::from("/tmp/c"));
                assert_eq!(image, PathBuf::from("img.raw"));
            }
            _ => panic!("not up"),
        }
    }

    #[test]
    fn bare_up_means_three_uefi_nodes_with_defaults() {
        let t = Top::try_parse_from(["x", "up", "out/qemu.img"]).unwrap();
        match t.cmd {
            QemuCommand::Up {
                nodes,
                arch,
                kernel,
                memory,
                accel,
                guest_mgmt_port,
                dir,
                ..
            } => {
                assert_eq!((nodes, arch, memory), (3, Arch::X86_64, 1024));
                assert_eq!(kernel, None);
                assert_eq!(accel, AccelChoice::Auto);
                assert_eq!(guest_mgmt_port, 7443);
                assert_eq!(dir.dir, PathBuf::from("qemu-cluster"));
            }
            _ => panic!("not up"),
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
