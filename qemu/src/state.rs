//! The cluster's state file, `<dir>/cluster.json`: image, network ports, boot method and, per
//! node, its MACs, overlay, firmware variables, serial log, QMP socket and last pid. Separate
//! CLI invocations share a cluster through it. It is written atomically (temp file, fsync,
//! rename), so an interrupted command never leaves half a file.
//!
//! To record something new, add a field; keep `deny_unknown_fields` and bump [`STATE_VERSION`]
//! if old files cannot be read any more.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::accel::AccelChoice;
use crate::node::{Accel, Arch, LbForward};
use crate::seed::Subnet;

pub const STATE_FILE: &str = "cluster.json";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    pub version: u32,
    /// Stable cluster identity (the state directory's absolute path at `up`); MACs derive from it.
    pub id: String,
    pub image: PathBuf,
    /// `qemu-img info` format of the image (`raw`, `qcow2`), the overlays' backing format.
    pub image_format: String,
    /// Virtual size given to each overlay, if larger than the image (`qemu-img` size syntax).
    pub disk_size: Option<String>,
    pub arch: Arch,
    pub accel: AccelChoice,
    /// What `accel` resolved to at the first start (the KVM probe runs once per cluster).
    pub resolved_accel: Option<Accel>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub mcast_port: u16,
    pub guest_mgmt_port: u16,
    pub boot: BootConfig,
    pub no_reboot: bool,
    /// The cluster network's subnet for the per-node NoCloud seeds; `None`: no seeds.
    #[serde(default)]
    pub subnet: Option<Subnet>,
    /// The user-data every node's seed carries (a copy in the state directory, 0600); `None`:
    /// an empty `#cloud-config`.
    #[serde(default)]
    pub user_data: Option<PathBuf>,
    /// The management NICs reach beyond the host (`--uplink`).
    #[serde(default)]
    pub uplink: bool,
    /// The extra guest address:port every VM forwards from 127.0.0.1 (`--lb-forward`).
    #[serde(default)]
    pub lb_forward: Option<LbForward>,
    pub nodes: Vec<NodeState>,
}

/// How every node of the cluster boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BootConfig {
    /// UEFI: `code` shared read-only; each node gets a copy of `vars_template`.
    Uefi {
        code: PathBuf,
        vars_template: PathBuf,
    },
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// `node<index>`.
    pub name: String,
    pub index: u8,
    pub mac: String,
    pub mgmt_mac: String,
    /// Host port on 127.0.0.1 forwarded to the guest's management port.
    pub mgmt_port: u16,
    pub overlay: PathBuf,
    /// This node's UEFI variable store (UEFI boot only).
    pub vars: Option<PathBuf>,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub pid_file: PathBuf,
    /// pid of the last QEMU started for this node; check liveness, it may have exited.
    pub pid: Option<u32>,
    /// Accelerator of the last start.
    pub accel: Option<Accel>,
    /// This node's NoCloud seed volume, if the cluster has seeds.
    #[serde(default)]
    pub seed: Option<PathBuf>,
    /// The cluster-network address its seed gives it.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// Host port on 127.0.0.1 forwarded to the guest's MicroK8s API (16443).
    #[serde(default)]
    pub api_port: Option<u16>,
    /// Host port on 127.0.0.1 forwarded to the guest's SSH server (22).
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Host port on 127.0.0.1 forwarded to the cluster's `lb_forward` on this guest.
    #[serde(default)]
    pub lb_port: Option<u16>,
}

impl ClusterState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads `<dir>/cluster.json`.
    pub fn load(dir: &Path) -> anyhow::Result<ClusterState> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading cluster state {}", path.display()))?;
        let state: ClusterState = serde_json::from_str(&text)
            .with_context(|| format!("parsing cluster state {}", path.display()))?;
        anyhow::ensure!(
            state.version == STATE_VERSION,
            "cluster state {} has version {}, this tool reads version {STATE_VERSION}",
            path.display(),
            state.version
        );
        Ok(state)
    }

    /// Writes `<dir>/cluster.json` atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("cluster state serializes");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing cluster state {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterState {
        ClusterState {
            version: STATE_VERSION,
            id: "/tmp/c".into(),
            image: "/img/x.img".into(),
            image_format: "raw".into(),
            disk_size: None,
            arch: Arch::X86_64,
            accel: AccelChoice::Auto,
            resolved_accel: Some(Accel::Tcg),
            memory_mib: 1024,
            cpus: 1,
            mcast_port: 41000,
            guest_mgmt_port: 7443,
            boot: BootConfig::Kernel {
                kernel: "/k".into(),
                initrd: None,
                append: "console=ttyS0".into(),
            },
            no_reboot: false,
            subnet: Some("192.168.76.0/24".parse().unwrap()),
            user_data: None,
            uplink: false,
            lb_forward: Some("192.168.76.200:80".parse().unwrap()),
            nodes: vec![NodeState {
                name: "node0".into(),
                index: 0,
                mac: "52:54:00:00:00:00".into(),
                mgmt_mac: "52:54:00:00:01:00".into(),
                mgmt_port: 45000,
                overlay: "/tmp/c/node0.qcow2".into(),
                vars: None,
                serial_log: "/tmp/c/node0.serial.log".into(),
                qmp_socket: "/tmp/c/node0.qmp".into(),
                pid_file: "/tmp/c/node0.pid".into(),
                pid: Some(42),
                accel: Some(Accel::Tcg),
                seed: Some("/tmp/c/node0.seed.img".into()),
                address: Some(std::net::Ipv4Addr::new(192, 168, 76, 10)),
                api_port: Some(45100),
                ssh_port: Some(45200),
                lb_port: Some(45300),
            }],
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample();
        s.save(dir.path()).unwrap();
        assert_eq!(ClusterState::load(dir.path()).unwrap(), s);
        assert!(!dir.path().join(".cluster.json.tmp").exists());
    }

    #[test]
    fn files_written_before_the_lb_forward_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("lb_forward");
        v["nodes"][0].as_object_mut().unwrap().remove("lb_port");
        std::fs::write(dir.path().join(STATE_FILE), v.to_string()).unwrap();
        let s = ClusterState::load(dir.path()).unwrap();
        assert_eq!((s.lb_forward, s.nodes[0].lb_port), (None, None));
    }

    #[test]
    fn unknown_fields_and_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = ClusterState::load(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("cluster.json"), "{e:#}");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["surprise"] = 1.into();
        std::fs::write(dir.path().join(STATE_FILE), v.to_string()).unwrap();
        let e = ClusterState::load(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("surprise"), "{e:#}");
    }
}
