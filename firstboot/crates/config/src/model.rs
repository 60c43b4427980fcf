//! The validated, typed cluster configuration.
//!
//! These are the types every other module uses. They are produced only by the loader in
//! [`super`] (which reads TOML, reports every error with file:line:col and the field path, and
//! fills defaults), so code that holds a [`ClusterConfig`] may rely on every invariant written
//! on the fields below. To add a setting: add the field here, read and validate it in the loader,
//! document it in `configs/*.toml`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

/// One cluster's configuration: the same file is validated by `imagebuilder` and read by
/// `firstboot` on every node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterConfig {
    pub cluster: Cluster,
    pub microk8s: Microk8s,
    pub addons: Addons,
    pub network: Network,
    /// The optional inventory (`[[nodes]]`): MACs unique, hostnames unique.
    pub nodes: Vec<NodeEntry>,
    pub image: Image,
    /// `[backup]`: scheduled datastore backups.
    pub backup: Backup,
}

/// `[backup]`: one control-plane node runs `microk8s dbctl backup` every `interval` and every
/// control-plane node keeps the newest `keep` archives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backup {
    /// `backup.interval`, 5 s to 30 days. Default [`DEFAULT_BACKUP_INTERVAL`].
    #[serde(with = "humantime_serde_shim")]
    pub interval: Duration,
    /// `backup.keep`, 1 to 1000 archives. Default [`DEFAULT_BACKUP_KEEP`].
    pub keep: u32,
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            interval: DEFAULT_BACKUP_INTERVAL,
            keep: DEFAULT_BACKUP_KEEP,
        }
    }
}

/// Default `backup.interval`: 6 hours. A backup lists every key of the datastore and the
/// archive is copied to every other control-plane node, which is cheap for a homelab's few
/// MiB but not free on an SD card; four a day bound what a lost datastore costs to the last
/// 6 hours of changes (most of a small cluster's state lives in Git or Helm values and is
/// re-applied anyway). Clusters that change often set it lower.
pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// Default `backup.keep`: 8 archives, two days at the default interval.
pub const DEFAULT_BACKUP_KEEP: u32 = 8;
/// Shortest `backup.interval` (tests use seconds).
pub const MIN_BACKUP_INTERVAL: Duration = Duration::from_secs(5);
/// Longest `backup.interval`.
pub const MAX_BACKUP_INTERVAL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// Lowercase RFC 1123 label; used in hostnames and in the image name.
    pub name: String,
    /// How many nodes join as control plane (dqlite voters): 1, 3, 5 or 7. Default 3.
    pub control_plane: u8,
    /// How many nodes to wait for before forming. Default: `control_plane`. Always
    /// `>= 1`; may be larger than `control_plane` (workers expected at formation).
    pub expected_nodes: u32,
    /// How long to wait for `expected_nodes` before forming with a majority of the
    /// control-plane count. Default 10 minutes.
    #[serde(with = "humantime_serde_shim")]
    pub formation_timeout: Duration,
    /// Most worker joins in flight at once (`cluster.join-parallelism`, 1 to 64, default
    /// [`DEFAULT_JOIN_PARALLELISM`]). Control-plane joins always run one at a time.
    pub join_parallelism: u32,
    /// Path of the cluster secret file on the machine running the tool (build time) or on the
    /// node (`/etc/rackseed/cluster.secret` inside images). Never read into logs.
    pub secret_file: PathBuf,
    /// The floating Kubernetes API address (`cluster.api-address`), held by one healthy
    /// control-plane node through keepalived; `None` when not configured.
    pub api_address: Option<ApiAddress>,
    /// Nodes beyond `control_plane` that join as full MicroK8s members (no `--worker`) so
    /// MicroK8s keeps them as dqlite standbys and promotes one when a voter is lost
    /// (`cluster.standbys`, 0 to 6). Default: [`default_standbys`].
    pub standbys: u8,
    /// A member unseen this long is removed from the cluster (`microk8s remove-node
    /// --force`, decided once through the cluster record) and replaced
    /// (`cluster.replace-after`, 1 minute to 30 days). Default [`DEFAULT_REPLACE_AFTER`].
    #[serde(with = "humantime_serde_shim")]
    pub replace_after: Duration,
    /// How often keepalived asks the local API server whether it is ready
    /// (`cluster.api-check-interval`, whole seconds from 1 to 10; default
    /// [`DEFAULT_API_CHECK_INTERVAL`]). The VRRP advert interval is twice this, so a
    /// partitioned minority's holder lets the address go before the majority claims it at
    /// any setting. Raise it only where starting `curl` every second is costly (emulated QEMU
    /// test clusters); failover takes proportionally longer.
    #[serde(with = "humantime_serde_shim")]
    pub api_check_interval: Duration,
}

/// Default of `cluster.replace-after`: 15 minutes. Long enough that a planned reboot, a
/// MicroK8s snap refresh or a switch restart (a Raspberry Pi with MicroK8s is back in 2 to 5
/// minutes) never costs a node its membership (a removed node must leave and join again);
/// short enough that the cluster is back at full strength, and a dead member of the
/// electorate handed over, long before a second failure is likely: the electorate can only
/// be handed over while a majority of it lives, so deaths further apart than this (plus one
/// join) are survived one by one.
pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(15 * 60);

/// Default of `cluster.api-check-interval`: 1 s (failover 4.4-6.5 s, see the agent's
/// keepalived module).
pub const DEFAULT_API_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest accepted `cluster.api-check-interval`.
pub const MAX_API_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Shortest accepted `cluster.replace-after`.
pub const MIN_REPLACE_AFTER: Duration = Duration::from_secs(60);
/// Longest accepted `cluster.replace-after`.
pub const MAX_REPLACE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// MicroK8s keeps 3 dqlite voters and 3 standbys (reference A5); full members beyond those six
/// are spares.
pub const MICROK8S_FULL_MEMBERS: u8 = 6;

/// Default of `cluster.standbys`: enough for `control_plane` plus the standbys to fill
/// MicroK8s' six full members (3 with the default 3 control-plane nodes). A cluster of 4 to 6
/// machines then has every machine a full member, as plain `microk8s join` makes it, and
/// MicroK8s replaces a lost voter by itself; machines beyond the sixth join as workers.
pub fn default_standbys(control_plane: u8) -> u8 {
    MICROK8S_FULL_MEMBERS.saturating_sub(control_plane)
}

/// Default of `cluster.join-parallelism`: 8 worker joins at once. A worker join changes no
/// dqlite membership, but each one makes the node it joins through sign two certificates
/// (with no lock, so simultaneous signings can fail and are retried) and then brings a kubelet,
/// kube-proxy and a calico pod up, pulling their images over the rack's shared uplink. Eight at
/// a time keeps that burst small for a Raspberry Pi control plane while a 50-node rack still
/// forms in 2 control-plane joins + 6 worker rounds instead of 49 serial joins.
pub const DEFAULT_JOIN_PARALLELISM: u32 = 8;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Microk8s {
    /// Snap channel, `<track>/<risk>` or `<risk>`, e.g. `1.32/stable`. Default `1.32/stable`.
    pub channel: String,
    /// Folder with staged `microk8s*.snap` + `.assert` (and `core2x`) for offline installs.
    pub offline_snaps: Option<PathBuf>,
}

/// `cluster.api-address`: a fixed address, or one chosen at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode", content = "address")]
pub enum ApiAddress {
    /// Chosen on the node's subnet at boot (ARP-probed), outside MetalLB's range and the
    /// nodes' addresses; IPv4 only.
    Auto,
    /// This address: never inside a MetalLB block, never a node's own address.
    Fixed(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Addons {
    /// CoreDNS. Default on, as in MicroK8s' own default launch configuration.
    pub dns: Dns,
    /// MetalLB load balancer; `None` when not configured.
    pub metallb: Option<Metallb>,
    pub storage: Storage,
    /// `[addons.longhorn]`: settings used when `storage = "longhorn"`.
    pub longhorn: Longhorn,
    /// `addons.offline`: a folder of staged `.deb` packages the storage needs (and, for
    /// Longhorn, its chart archive), copied into the image and installed at first boot.
    pub offline: Option<PathBuf>,
}

/// Longhorn's settings (`[addons.longhorn]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Longhorn {
    /// Where Longhorn keeps replica data on every node (`defaultSettings.defaultDataPath`).
    pub data_path: PathBuf,
    /// Free space each node needs under `data_path` before Longhorn is installed.
    pub min_free_space: u64,
}

/// The Longhorn chart version the agent installs (pinned; the image stages this archive as
/// `longhorn-<version>.tgz`).
pub const LONGHORN_CHART_VERSION: &str = "1.7.2";

/// The CSI snapshot controller's image the agent deploys beside Longhorn (a mirror of the
/// Kubernetes CSI project's `snapshot-controller` that needs no registry host in its name). The
/// image builder also asks for it among the staged container images (`addons.offline`).
pub const LONGHORN_SNAPSHOT_CONTROLLER_IMAGE: &str =
    "rancher/mirrored-sig-storage-snapshot-controller:v8.2.0";

impl Storage {
    /// The Debian/Ubuntu packages every node needs for this storage (staged in the image for
    /// official bases, added to a bootstrapped base's package list).
    pub fn node_packages(self) -> &'static [&'static str] {
        match self {
            Storage::Longhorn => &["open-iscsi", "nfs-common"],
            Storage::RookCeph => &["lvm2"],
            Storage::None | Storage::Hostpath | Storage::Mayastor => &[],
        }
    }
}

/// Packages a node needs for one configured feature other than storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeaturePackages {
    /// The setting that asks for them, as written in the config.
    pub setting: &'static str,
    /// What becomes of a node without them.
    pub without: &'static str,
    pub packages: &'static [&'static str],
}

impl ClusterConfig {
    /// The packages every node needs for what this config turns on besides its storage
    /// ([`Storage::node_packages`]): keepalived and curl (its health check's program) for
    /// `cluster.api-address`, iputils' arping for `addons.metallb.addresses = "auto"`.
    /// Bootstrapped bases always carry them; official bases get them staged with
    /// `addons.offline` and installed at first boot.
    pub fn feature_packages(&self) -> Vec<FeaturePackages> {
        let mut out = Vec::new();
        if self.cluster.api_address.is_some() {
            out.push(FeaturePackages {
                setting: "cluster.api-address",
                without: "the node cannot hold the floating API address (it forms without it)",
                packages: &["keepalived", "curl"],
            });
        }
        if matches!(self.addons.metallb, Some(Metallb::Auto { .. })) {
            out.push(FeaturePackages {
                setting: "addons.metallb.addresses = \"auto\"",
                without: "the node cannot probe MetalLB's automatic range",
                packages: &["iputils-arping"],
            });
        }
        out
    }
}

/// Longhorn's own default data path.
pub const DEFAULT_LONGHORN_DATA_PATH: &str = "/var/lib/longhorn";
/// Default of `addons.longhorn.min-free-space`: 10 GiB.
pub const DEFAULT_LONGHORN_MIN_FREE: u64 = 10 << 30;

impl Default for Longhorn {
    fn default() -> Self {
        Longhorn {
            data_path: PathBuf::from(DEFAULT_LONGHORN_DATA_PATH),
            min_free_space: DEFAULT_LONGHORN_MIN_FREE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dns {
    pub enabled: bool,
    /// Upstream resolvers passed as `dns:a,b`; empty means MicroK8s' default.
    pub upstream: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Metallb {
    /// Pick a small free range at the top of the node's subnet at boot (ARP-probed).
    Auto { count: u8 },
    /// Fixed blocks: at least one, no two overlapping, each start <= end and one family.
    Blocks { blocks: Vec<AddressBlock> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressBlock {
    /// `a.b.c.d-a.b.c.e` (IPv4 or IPv6, same family, start <= end).
    Range { start: IpAddr, end: IpAddr },
    /// `a.b.c.d/nn` or `fd00::/120`.
    Cidr(IpNet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    None,
    /// `hostpath-storage`: single-node only (validation warns for multi-node clusters).
    Hostpath,
    /// OpenEBS Mayastor: hugepages + nvme_tcp on every node.
    Mayastor,
    /// Rook-Ceph operator: needs internet at enable time (helm repo).
    RookCeph,
    /// Longhorn: installed by the agent with MicroK8s' helm; needs open-iscsi (iscsid) and the
    /// NFS client on every node.
    Longhorn,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Network {
    /// Interface to configure and announce on; `None` picks the first wired interface.
    pub interface: Option<String>,
    pub addressing: Addressing,
    /// Raspberry Pi Wi-Fi; the PSK is read from a file at build time, never written inline.
    pub wifi: Option<Wifi>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Addressing {
    Dhcp,
    /// Static: each node's own address comes from its inventory entry; these are shared.
    Static {
        gateway: IpAddr,
        dns: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Wifi {
    pub ssid: String,
    pub psk_file: PathBuf,
    /// ISO 3166 alpha-2 regulatory domain, uppercase, e.g. `GB`.
    pub country: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEntry {
    pub mac: MacAddr,
    /// Lowercase RFC 1123 label (MicroK8s rejects capitals and `_`).
    pub hostname: String,
    /// Pinned role; `None` lets formation decide (first `control_plane` nodes are control plane).
    pub role: Option<Role>,
    /// Seed preference: higher wins; ties broken by the stable node id. Default 0.
    pub priority: u32,
    /// Static address with prefix, required when `network.addressing` is static.
    pub address: Option<IpNet>,
    /// Kubernetes labels put on this node once it has joined (`labels = { key = "value" }`),
    /// checked by [`crate::node_labels`]. Empty when none.
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
}

impl Role {
    /// The role's name as written in config files and status documents (its serde name):
    /// `control-plane` or `worker`.
    pub fn name(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A MAC address, normalised to lowercase `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!(
                "expected a MAC address like aa:bb:cc:dd:ee:ff, got {s:?}"
            ));
        }
        let mut out = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!(
                    "expected a MAC address like aa:bb:cc:dd:ee:ff, got {s:?}"
                ));
            }
            out[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("expected a MAC address like aa:bb:cc:dd:ee:ff, got {s:?}"))?;
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Image {
    pub target: Target,
    pub base: Base,
    /// Final raw image size in bytes (growpart takes the rest of the disk at first boot).
    pub disk_size: u64,
    pub users: Vec<User>,
    /// Hostname for nodes not in the inventory. Placeholders: `{cluster}`, `{id}` (first 6 hex
    /// of the stable node id), `{mac}` (primary MAC without colons). Default `{cluster}-{id}`.
    pub hostname_pattern: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Target {
    #[serde(rename = "x86_64-efi")]
    X86_64Efi,
    #[serde(rename = "rpi4")]
    Rpi4,
    #[serde(rename = "rpi5")]
    Rpi5,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::X86_64Efi => "x86_64-efi",
            Target::Rpi4 => "rpi4",
            Target::Rpi5 => "rpi5",
        }
    }
    /// Debian/Ubuntu architecture name of the target's userland.
    pub fn deb_arch(self) -> &'static str {
        match self {
            Target::X86_64Efi => "amd64",
            Target::Rpi4 | Target::Rpi5 => "arm64",
        }
    }
    /// Rust target triple for the `firstboot` binary.
    pub fn rust_triple(self) -> &'static str {
        match self {
            Target::X86_64Efi => "x86_64-unknown-linux-gnu",
            Target::Rpi4 | Target::Rpi5 => "aarch64-unknown-linux-gnu",
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64-efi" => Ok(Target::X86_64Efi),
            "rpi4" => Ok(Target::Rpi4),
            "rpi5" => Ok(Target::Rpi5),
            _ => Err(format!("expected one of x86_64-efi, rpi4, rpi5, got {s:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Base {
    /// Official image by URL; always verified against `sha256` (64 lowercase hex).
    Official { url: String, sha256: String },
    /// A local image file; verified when `sha256` is given.
    Local {
        path: PathBuf,
        sha256: Option<String>,
    },
    /// Bootstrap a root filesystem from packages. `mirror: None` means: take it from the build
    /// machine's apt sources.
    Bootstrap {
        suite: String,
        mirror: Option<String>,
        arch: String,
        packages: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub name: String,
    pub ssh_keys: Vec<String>,
    /// Passwordless sudo. Default true (there is no password login).
    pub sudo: bool,
}

mod humantime_serde_shim {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

#[cfg(test)]
mod role_tests {
    use super::Role;

    #[test]
    fn role_names_are_the_serde_names() {
        for r in [Role::ControlPlane, Role::Worker] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
            assert_eq!(serde_json::from_value::<Role>(r.name().into()).unwrap(), r);
            assert_eq!(r.to_string(), r.name());
        }
    }
}
