//! Per-node cloud-init NoCloud seeds: how `up` and `add` give each VM its cluster-network
//! address, the way a cloud would, without touching the image.
//!
//! Each node gets a small FAT volume labelled `CIDATA` (built with `mkfs.vfat` and `mcopy`
//! through the command runner, attached read-only as a second virtio disk) holding:
//! - `meta-data`: `instance-id` (unique per cluster and node, so cloud-init runs its
//!   per-instance modules on each VM) and `local-hostname` (`node<index>`);
//! - `network-config`: netplan version 2, both NICs matched by the MACs the launcher gives them
//!   ([`crate::node::node_macs`]): the cluster NIC gets `<subnet base> + 10 + index` (default
//!   subnet [`DEFAULT_SUBNET`], so node0 is 192.168.76.10/24), the management NIC QEMU's
//!   user-mode guest address 10.0.2.15/24, no gateway (there is no way out); DHCP and IPv6
//!   link-local addressing are off on both, so the address the agent announces is the static one;
//! - `user-data`: the image's own user-data when the caller passes it (`imagebuilder qemu up`
//!   reads it from the image's seed), else an empty `#cloud-config`.
//!
//! Facts about cloud-init this relies on, from `cloudinit/sources/DataSourceNoCloud.py`
//! (canonical/cloud-init):
//! - a seed volume is a `vfat` or `iso9660` filesystem labelled `cidata` or `CIDATA`
//!   (`_get_devices`: `TYPE=vfat`/`TYPE=iso9660` intersected with `LABEL=CIDATA`/`cidata`);
//! - `user-data` and `meta-data` are required on it, `vendor-data` and `network-config`
//!   optional (`pp2d_kwargs`); a volume without both is skipped with a warning;
//! - the seed directory `/var/lib/cloud/seed/nocloud` (where `imagebuilder` puts an x86 image's
//!   seed) is read first and the volume is merged over it (`_merge_new_seed`): `meta-data`
//!   keys are merged with the volume's winning, while `network-config` and `user-data` from
//!   the volume replace the directory's. That is why the volume must carry the image's
//!   user-data (users, SSH keys) and not an empty one, and why its `network-config` is the one
//!   the node uses.
//!
//! The files are checked in this module's tests with the build machine's `cloud-init devel
//! net-convert` (cloud-init's own parser and netplan renderer) and `netplan generate
//! --root-dir`, and the volume with `blkid` and `mdir`.
//!
//! To add a seed file, add it to [`SeedFiles`] and to [`SeedFiles::entries`].

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rackseed_host::command::Cmd;
use serde::{Deserialize, Serialize};

/// The cluster network's default subnet; node `i` gets host number `10 + i`.
pub const DEFAULT_SUBNET: &str = "192.168.76.0/24";
/// Host number of node 0 in the subnet.
pub const FIRST_HOST: u32 = 10;
/// QEMU user-mode networking gives its guest this address (the management NIC).
pub const MGMT_ADDRESS: &str = "10.0.2.15/24";
/// The volume label cloud-init looks for (it accepts `cidata` and `CIDATA`; FAT labels are
/// upper case).
pub const LABEL: &str = "CIDATA";
/// Size of the FAT volume, KiB: the smallest FAT12 volume `mkfs.vfat` makes comfortably,
/// far more than the files need.
const VOLUME_KIB: u32 = 1024;
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// An IPv4 subnet in CIDR notation, e.g. `192.168.76.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    base: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The address of node `index`: host number `FIRST_HOST + index`, refused when that is
    /// the broadcast address or outside the subnet.
    pub fn node_address(self, index: u8) -> anyhow::Result<Ipv4Addr> {
        let host = FIRST_HOST + u32::from(index);
        let size = 1u64 << (32 - u32::from(self.prefix));
        anyhow::ensure!(
            u64::from(host) < size.saturating_sub(1),
            "subnet {self} has no room for node {index} (host number {host}); choose a larger --subnet"
        );
        Ok(Ipv4Addr::from(u32::from(self.base) + host))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("subnet `{s}` needs a prefix length, e.g. 192.168.76.0/24"))?;
        let base: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("subnet `{s}`: `{addr}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=28).contains(p))
            .ok_or_else(|| format!("subnet `{s}`: the prefix length must be 8 to 28"))?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(base) & !mask != 0 {
            return Err(format!(
                "subnet `{s}` has host bits set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(base) & mask)
            ));
        }
        if base.is_loopback() || base.is_multicast() || base.is_unspecified() {
            return Err(format!("subnet `{s}` is not a unicast network"));
        }
        let mgmt = Ipv4Addr::new(10, 0, 2, 15);
        if u32::from(mgmt) & mask == u32::from(base) {
            return Err(format!(
                "subnet `{s}` holds the management NIC's address 10.0.2.15; choose another"
            ));
        }
        Ok(Subnet { base, prefix })
    }
}

impl TryFrom<String> for Subnet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// The three files of one node's seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub network_config: String,
    pub user_data: String,
}

impl SeedFiles {
    /// The seed of node `index` of the cluster `cluster_id`, whose NICs have MACs `mac`
    /// (cluster) and `mgmt_mac` (management). `user_data`: the image's, or `None` for an
    /// empty `#cloud-config`.
    pub fn for_node(
        cluster_id: &str,
        index: u8,
        mac: &str,
        mgmt_mac: &str,
        subnet: Subnet,
        user_data: Option<&str>,
        uplink: bool,
    ) -> anyhow::Result<SeedFiles> {
        let address = subnet.node_address(index)?;
        let instance = crate::node::fnv1a(cluster_id.as_bytes());
        let meta_data = format!(
            "instance-id: rackseed-qemu-{instance:016x}-node{index}\nlocal-hostname: node{index}\n"
        );
        // Quoted MACs: YAML 1.1 would read an all-digit sexagesimal-looking value as a number.
        // With an uplink, the management NIC leads out through QEMU's NAT (its gateway and DNS
        // forwarder are 10.0.2.2 and 10.0.2.3).
        let way_out = if uplink {
            "      routes:\n        - to: default\n          via: 10.0.2.2\n      \
             nameservers:\n        addresses: [10.0.2.3]\n"
        } else {
            ""
        };
        let network_config = format!(
            "network:\n  version: 2\n  ethernets:\n    cluster:\n      match:\n        macaddress: \"{mac}\"\n      \
             addresses: [\"{address}/{prefix}\"]\n      dhcp4: false\n      dhcp6: false\n      \
             link-local: []\n    mgmt:\n      match:\n        macaddress: \"{mgmt_mac}\"\n      \
             addresses: [\"{MGMT_ADDRESS}\"]\n      dhcp4: false\n      dhcp6: false\n      \
             link-local: []\n{way_out}",
            prefix = subnet.prefix(),
        );
        let user_data = match user_data {
            Some(u) => u.to_string(),
            None => "#cloud-config\n{}\n".to_string(),
        };
        Ok(SeedFiles {
            meta_data,
            network_config,
            user_data,
        })
    }

    /// (file name, contents) in the order they are copied.
    pub fn entries(&self) -> [(&'static str, &str); 3] {
        [
            ("meta-data", &self.meta_data),
            ("network-config", &self.network_config),
            ("user-data", &self.user_data),
        ]
    }
}

/// Writes `files` as a `CIDATA` FAT volume at `volume` (mode 0600: the user-data may hold
/// password hashes). Built under a temporary name next to it and renamed, so a failure leaves
/// no half volume.
pub async fn write_volume(files: &SeedFiles, volume: &Path) -> anyhow::Result<()> {
    let dir = volume
        .parent()
        .with_context(|| format!("seed volume {} has no folder", volume.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".seed-")
        .tempdir_in(dir)
        .with_context(|| format!("creating scratch space in {}", dir.display()))?;
    let mut sources = Vec::new();
    for (name, text) in files.entries() {
        let p = scratch.path().join(name);
        rackseed_host::fs::write_atomic(&p, text.as_bytes(), 0o600)
            .with_context(|| format!("writing seed file {}", p.display()))?;
        sources.push(p);
    }
    let tmp = scratch.path().join("volume.img");
    Cmd::new("mkfs.vfat", TOOL_TIMEOUT)
        .args(["-C", "-n", LABEL])
        .arg(&tmp)
        .arg(VOLUME_KIB.to_string())
        .run()
        .await
        .context("making the seed's FAT filesystem (mkfs.vfat, package dosfstools)")?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {}", tmp.display()))?;
    Cmd::new("mcopy", TOOL_TIMEOUT)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&tmp)
        .args(&sources)
        .arg("::")
        .run()
        .await
        .context("copying the seed files onto the volume (mcopy, package mtools)")?;
    std::fs::rename(&tmp, volume)
        .with_context(|| format!("moving the seed volume to {}", volume.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        DEFAULT_SUBNET.parse().unwrap()
    }

    #[test]
    fn subnets_parse_and_bad_ones_say_why() {
        let s = subnet();
        assert_eq!(s.to_string(), "192.168.76.0/24");
        assert_eq!(s.node_address(0).unwrap(), Ipv4Addr::new(192, 168, 76, 10));
        assert_eq!(
            s.node_address(244).unwrap(),
            Ipv4Addr::new(192, 168, 76, 254)
        );
        let e = s.node_address(245).unwrap_err().to_string();
        assert!(e.contains("no room for node 245"), "{e}");
        let small: Subnet = "10.9.0.0/28".parse().unwrap();
        assert_eq!(small.node_address(4).unwrap(), Ipv4Addr::new(10, 9, 0, 14));
        assert!(small.node_address(5).is_err());
        for (bad, why) in [
            ("192.168.76.0", "prefix length"),
            ("192.168.76.1/24", "did you mean 192.168.76.0/24"),
            ("192.168.76.0/31", "8 to 28"),
            ("nonsense/24", "not an IPv4 address"),
            ("10.0.0.0/16", "10.0.2.15"),
            ("127.0.0.0/8", "not a unicast"),
        ] {
            let e = bad.parse::<Subnet>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"192.168.76.0/24\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Subnet>("\"1.2.3.4/24\"").is_err());
    }

    #[test]
    fn seeds_differ_per_node_and_carry_the_image_user_data() {
        let (m0, g0) = crate::node::node_macs("/c", 0);
        let (m1, g1) = crate::node::node_macs("/c", 1);
        let a = SeedFiles::for_node(
            "/c",
            0,
            &m0,
            &g0,
            subnet(),
            Some("#cloud-config\nusers: []\n"),
            false,
        )
        .unwrap();
        let b = SeedFiles::for_node("/c", 1, &m1, &g1, subnet(), None, false).unwrap();
        assert_ne!(a.meta_data, b.meta_data);
        assert!(
            a.meta_data.contains("local-hostname: node0\n"),
            "{}",
            a.meta_data
        );
        assert!(a.network_config.contains("192.168.76.10/24"));
        assert!(b.network_config.contains("192.168.76.11/24"));
        assert!(a.network_config.contains(&m0) && a.network_config.contains(&g0));
        assert_eq!(a.user_data, "#cloud-config\nusers: []\n");
        assert!(b.user_data.starts_with("#cloud-config\n"));
        let other = SeedFiles::for_node("/d", 0, &m0, &g0, subnet(), None, false).unwrap();
        assert_ne!(
            a.meta_data, other.meta_data,
            "instance ids differ between clusters"
        );
    }

    /// cloud-init's own converter renders the network-config to netplan, and netplan accepts
    /// the result: each NIC is matched by its MAC and gets only its static address.
    #[test]
    fn cloud_init_and_netplan_accept_the_network_config() {
        for uplink in [false, true] {
            check_network_config(uplink);
        }
    }

    fn check_network_config(uplink: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (mac, mgmt) = crate::node::node_macs("/c", 3);
        let seed = SeedFiles::for_node("/c", 3, &mac, &mgmt, subnet(), None, uplink).unwrap();
        let nc = dir.path().join("network-config");
        std::fs::write(&nc, &seed.network_config).unwrap();
        let out = dir.path().join("out");
        Cmd::new("cloud-init", Duration::from_secs(120))
            .args(["devel", "net-convert", "--network-data"])
            .arg(&nc)
            .args([
                "--kind",
                "yaml",
                "--output-kind",
                "netplan",
                "--distro",
                "debian",
            ])
            .arg("--directory")
            .arg(&out)
            .run_blocking()
            .expect("cloud-init (package cloud-init) converts the network-config");
        let rendered = std::fs::read_to_string(out.join("etc/netplan/50-cloud-init.yaml"))
            .expect("cloud-init rendered a netplan file");
        assert!(
            rendered.contains(&mac) && rendered.contains(&mgmt),
            "{rendered}"
        );
        assert!(rendered.contains("192.168.76.13/24"), "{rendered}");
        assert!(rendered.contains("10.0.2.15/24"), "{rendered}");
        assert!(!rendered.contains("dhcp4: true"), "{rendered}");
        // netplan itself (as on the node) generates networkd files from it.
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc/netplan")).unwrap();
        std::fs::write(root.join("etc/netplan/50-cloud-init.yaml"), &rendered).unwrap();
        Cmd::new("netplan", Duration::from_secs(60))
            .args(["generate", "--root-dir"])
            .arg(&root)
            .run_blocking()
            .expect("netplan (package netplan.io) accepts the rendered config");
        let units = root.join("run/systemd/network");
        let mut texts = Vec::new();
        for e in std::fs::read_dir(&units).unwrap() {
            texts.push(std::fs::read_to_string(e.unwrap().path()).unwrap());
        }
        let all = texts.join("\n");
        assert!(all.contains("Address=192.168.76.13/24"), "{all}");
        assert!(all.contains("Address=10.0.2.15/24"), "{all}");
        assert!(all.contains(&format!("MACAddress={mac}")), "{all}");
        assert!(
            !all.contains("DHCP=ipv4") && !all.contains("DHCP=yes"),
            "{all}"
        );
    }

    /// The volume is FAT, labelled CIDATA (what cloud-init looks for), 0600, and holds the
    /// three files byte for byte.
    #[test]
    fn the_volume_is_a_cidata_fat_filesystem_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mac, mgmt) = crate::node::node_macs("/c", 0);
        let seed = SeedFiles::for_node(
            "/c",
            0,
            &mac,
            &mgmt,
            subnet(),
            Some("#cloud-config\n"),
            false,
        )
        .unwrap();
        let vol = dir.path().join("node0.seed.img");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(write_volume(&seed, &vol)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&vol).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let probe = Cmd::new("blkid", Duration::from_secs(10))
            .args(["-p", "-o", "export"])
            .arg(&vol)
            .run_blocking()
            .expect("blkid (util-linux) reads the volume")
            .stdout;
        assert!(probe.contains("TYPE=vfat"), "{probe}");
        assert!(probe.contains("LABEL=CIDATA"), "{probe}");
        for (name, text) in seed.entries() {
            let got = Cmd::new("mtype", Duration::from_secs(10))
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&vol)
                .arg(format!("::{name}"))
                .run_blocking()
                .unwrap_or_else(|e| panic!("mtype {name}: {e}"))
                .stdout;
            assert_eq!(got, text, "{name}");
        }
        // Nothing else is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("node0.seed.img")]);
    }
}
