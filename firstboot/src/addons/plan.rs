//! The addon plan: the exact `microk8s enable` argument lists, in order, for a configuration,
//! plus [`LONGHORN`], the one step MicroK8s has no addon for (the agent installs it with
//! MicroK8s' helm, see [`super::longhorn`]), and the prerequisite notes that
//! `imagebuilder validate` prints.
//!
//! Syntax choices (see the MicroK8s facts, A7):
//! - Arguments always go in the **separate-argument form** (`microk8s enable metallb <list>`),
//!   never the inline `name:args` form: MicroK8s splits the inline form on `:`, which breaks
//!   every IPv6 address. The enable scripts receive the same `$1` either way, so the separate
//!   form is correct for IPv4 too.
//! - `dns`: upstream resolvers as one comma-separated argument (`dns 1.1.1.1,2606:4700::1111`);
//!   the dns enable script splits `$1` on commas and checks each with `ip route get`.
//!   dns is also in the launch configuration (`/etc/microk8s.yaml`), which enables it before any
//!   join. It is still enabled explicitly here: enabling an enabled addon is a no-op that exits 0
//!   ("already enabled"), so this costs nothing, confirms dns in status, and repairs a launch
//!   config that failed to apply. Because that no-op does **not** change the upstreams of an
//!   already-enabled dns, the launch configuration must carry the same arguments: its writer uses
//!   [`dns_enable`] so both places agree.
//! - `metallb`: all blocks (ranges `a-b` and CIDRs `a/n`, IPv4 and IPv6) in one comma-separated
//!   argument.
//! - `mayastor`: `--default-pool-size 20G` (MicroK8s' own default, made explicit so the plan
//!   says what it creates). No `--skip-*` flags: node preparation makes the checks pass, and a
//!   node that cannot is reported by [`super::prep`].
//!
//! To add an addon: map its config to an [`AddonEnable`] (or a [`ManualStep`]) in
//! [`plan_addon_enables`] and describe its prerequisites in [`prerequisite_notes`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use rackseed_config::{AddressBlock, Base, ClusterConfig, Dns, Metallb, Storage, Target};

/// Mayastor's default pool: a file of this size on every node.
pub const MAYASTOR_POOL_SIZE: &str = "20G";

/// MicroK8s' kubelet root directory, which Longhorn's CSI driver must be told about.
pub const MICROK8S_KUBELET_DIR: &str = "/var/snap/microk8s/common/var/lib/kubelet";

/// Longhorn's public Helm chart repository (used when the image staged no chart).
pub const LONGHORN_CHART_REPO: &str = "https://charts.longhorn.io";

/// The plan step that installs Longhorn ([`super::longhorn::install`], not `microk8s enable`).
pub const LONGHORN: &str = "longhorn";

/// One `microk8s enable` call: `microk8s enable <name> <args...>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonEnable {
    pub name: String,
    pub args: Vec<String>,
}

impl AddonEnable {
    fn new(name: &str, args: Vec<String>) -> Self {
        AddonEnable {
            name: name.to_owned(),
            args,
        }
    }

    /// Everything after `microk8s`: `["enable", name, args...]`.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec!["enable".to_owned(), self.name.clone()];
        v.extend(self.args.iter().cloned());
        v
    }
}

/// Something the user (or a later tool) must do by hand because MicroK8s has no addon for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualStep {
    pub name: String,
    /// Why it is manual and what it needs.
    pub summary: String,
    /// The shell commands to run on one control-plane node, in order.
    pub commands: Vec<String>,
    pub needs_internet: bool,
}

/// What to do once HA has formed: `enables` in order (once, on one control-plane node), and the
/// manual steps to show in status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AddonPlan {
    pub enables: Vec<AddonEnable>,
    pub manual: Vec<ManualStep>,
}

/// Values known only at run time.
#[derive(Debug, Clone, Default)]
pub struct PlanContext {
    /// The blocks chosen by [`super::autorange::choose_auto_range`] when MetalLB is `auto`.
    pub metallb_auto: Option<Vec<AddressBlock>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("metallb addresses are \"auto\" but no range was chosen yet; run the auto-range probe first")]
    AutoRangeUnresolved,
    #[error("metallb has no address blocks; refusing to run `microk8s enable metallb` without addresses (it would prompt)")]
    NoMetallbAddresses,
}

/// The `enable dns` call for these settings, or `None` when dns is off. Also what the launch
/// configuration writer must put in `addons:` so both agree (see the module docs).
pub fn dns_enable(dns: &Dns) -> Option<AddonEnable> {
    if !dns.enabled {
        return None;
    }
    let args = if dns.upstream.is_empty() {
        Vec::new()
    } else {
        vec![join_comma(dns.upstream.iter())]
    };
    Some(AddonEnable::new("dns", args))
}

/// One address block in the syntax MetalLB's enable script accepts: `start-end` or `net/len`.
pub fn format_block(block: &AddressBlock) -> String {
    match block {
        AddressBlock::Range { start, end } => format!("{start}-{end}"),
        AddressBlock::Cidr(net) => net.to_string(),
    }
}

fn join_comma<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// The addon plan for `cfg`, in order: dns, metallb, storage. See the module docs for why each
/// argument has its form.
pub fn plan_addon_enables(cfg: &ClusterConfig, ctx: &PlanContext) -> Result<AddonPlan, PlanError> {
    let mut plan = AddonPlan::default();
    if let Some(dns) = dns_enable(&cfg.addons.dns) {
        plan.enables.push(dns);
    }
    if let Some(metallb) = &cfg.addons.metallb {
        let blocks: &[AddressBlock] = match metallb {
            Metallb::Blocks { blocks } => blocks,
            Metallb::Auto { .. } => ctx
                .metallb_auto
                .as_deref()
                .ok_or(PlanError::AutoRangeUnresolved)?,
        };
        if blocks.is_empty() {
            return Err(PlanError::NoMetallbAddresses);
        }
        plan.enables.push(AddonEnable::new(
            "metallb",
            vec![join_comma(blocks.iter().map(format_block))],
        ));
    }
    match cfg.addons.storage {
        Storage::None => {}
        Storage::Hostpath => plan
            .enables
            .push(AddonEnable::new("hostpath-storage", Vec::new())),
        Storage::Mayastor => plan.enables.push(AddonEnable::new(
            "mayastor",
            vec!["--default-pool-size".into(), MAYASTOR_POOL_SIZE.into()],
        )),
        Storage::RookCeph => plan.enables.push(AddonEnable::new("rook-ceph", Vec::new())),
        // Not a MicroK8s addon (not in core, not in `community`): the agent's own step.
        Storage::Longhorn => plan.enables.push(AddonEnable::new(LONGHORN, Vec::new())),
    }
    Ok(plan)
}

/// Human-readable prerequisites of the configured addons, for `imagebuilder validate` and the
/// agent's status. Each line starts with the addon name.
pub fn prerequisite_notes(cfg: &ClusterConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let dns = &cfg.addons.dns;
    if dns.enabled && !dns.upstream.is_empty() {
        let v6 = dns.upstream.iter().any(IpAddr::is_ipv6);
        notes.push(format!(
            "dns: upstream resolvers {} must be routable from the node that enables dns (the addon \
             checks each with `ip route get`){}; the launch configuration must carry the same \
             list, since re-enabling an enabled dns changes nothing",
            join_comma(dns.upstream.iter()),
            if v6 {
                "; IPv6 resolvers need an IPv6 default route on the nodes"
            } else {
                ""
            }
        ));
    }
    match &cfg.addons.metallb {
        None => {}
        Some(Metallb::Auto { count }) => notes.push(format!(
            "metallb: addresses = \"auto\" picks {count} free IPv4 addresses at the top of the \
             node's subnet, above every node's own address, ARP-probed when addons are enabled; \
             a DHCP server may still lease them later, so reserve them on the router (or list \
             explicit blocks)"
        )),
        Some(Metallb::Blocks { blocks }) => {
            let v6 = blocks.iter().any(|b| match b {
                AddressBlock::Range { start, .. } => start.is_ipv6(),
                AddressBlock::Cidr(n) => matches!(n, ipnet::IpNet::V6(_)),
            });
            if v6 {
                notes.push(
                    "metallb: IPv6 blocks are only handed to IPv6 or dual-stack Services; \
                     MicroK8s' default network is IPv4-only, so dual-stack needs extra \
                     configuration"
                        .into(),
                );
            }
        }
    }
    match cfg.addons.storage {
        Storage::None => {}
        Storage::Hostpath => {
            if cfg.cluster.expected_nodes > 1 {
                notes.push(
                    "hostpath-storage: meant for single-node clusters; a volume lives on one \
                     node's disk and is lost with that node"
                        .into(),
                );
            }
        }
        Storage::Mayastor => notes.push(format!(
            "mayastor: every node needs amd64 or arm64, at least {} GiB of RAM ({} MiB are \
             reserved as 1024 hugepages), 2 CPU cores and the nvme-tcp kernel module \
             (linux-modules-extra on Ubuntu kernels); firstboot sets hugepages and loads \
             nvme-tcp on every node; each node gets a {MAYASTOR_POOL_SIZE} file-backed pool",
            super::prep::MAYASTOR_MIN_RAM_GIB,
            super::prep::HUGEPAGES_WANTED * 2
        )),
        Storage::RookCeph => notes.push(
            "rook-ceph: needs internet access at enable time (helm repo); every OSD node needs \
             a raw, unformatted disk or partition, lvm2 and the rbd kernel module; the addon \
             installs only the operator, so create a CephCluster (or run `microk8s \
             connect-external-ceph`) afterwards"
                .into(),
        ),
        Storage::Longhorn => {
            notes.push(format!(
                "longhorn: installed by firstboot with microk8s' helm (chart {}, {} replicas per \
                 volume at most, the default StorageClass, data in {}, a VolumeSnapshotClass \
                 {}); every node needs open-iscsi with iscsid running, nfs-common, the iscsi_tcp \
                 module and {} GiB free there; the chart comes from addons.offline when staged, \
                 else from {LONGHORN_CHART_REPO}; its container images are imported on every \
                 node from the image archives (*.tar) staged there too, else pulled from their \
                 registries",
                super::longhorn::CHART_VERSION,
                super::longhorn::replica_count(usize::MAX),
                cfg.addons.longhorn.data_path.display(),
                super::longhorn::SNAPSHOT_CLASS,
                cfg.addons.longhorn.min_free_space >> 30,
            ));
        }
    }
    let pkgs = cfg.addons.storage.node_packages();
    if !pkgs.is_empty() {
        let list = pkgs.join(" and ");
        notes.push(match (&cfg.image.base, &cfg.addons.offline) {
            (Base::Bootstrap { .. }, _) => format!(
                "packages: {list} are added to the bootstrapped base, so every node has them"
            ),
            (_, Some(dir)) => format!(
                "packages: {list} (with their dependencies, for the nodes' architecture) must be \
                 staged as .deb files in {}; the image carries them and firstboot installs them \
                 offline",
                dir.display()
            ),
            (_, None) => format!(
                "packages: {list} are not in an official base and nothing stages them: set \
                 addons.offline to a folder of their .deb files, or every node needs a package \
                 source at first boot"
            ),
        });
    }
    if matches!(cfg.image.target, Target::Rpi4 | Target::Rpi5) {
        notes.push(
            "rpi: the memory cgroup must be on (cgroup_enable=memory cgroup_memory=1 in \
             /boot/firmware/cmdline.txt) and the vxlan module present (Ubuntu 21.10-23.10 raspi \
             kernels need linux-modules-extra-raspi); firstboot checks both at boot"
                .into(),
        );
    }
    notes
}
