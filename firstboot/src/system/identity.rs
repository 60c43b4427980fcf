//! Who this machine is: its stable node id, its primary MAC, and the hostname it should take.
//!
//! The node id is derived from `/etc/machine-id` (hashed with an application label, as systemd
//! recommends, so the machine id itself is never published), or from the primary MAC when the
//! machine id is missing or not yet initialised. Images must ship an empty `/etc/machine-id` so
//! that every flashed machine generates its own at first boot; the image builder does that.
//!
//! Everything reads below a `root` directory so tests can use a fake filesystem.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use rackseed_config::{ClusterConfig, MacAddr};

pub use rackseed_protocol::discovery::is_virtual_interface;

/// The primary NIC and its MAC: the configured interface, else the first physical-looking
/// interface by name that has a non-zero MAC.
pub fn primary_mac(root: &Path, interface: Option<&str>) -> Result<(String, MacAddr)> {
    let net = root.join("sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(&net)
        .with_context(|| format!("listing {}", net.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let candidates: Vec<String> = match interface {
        Some(i) => vec![i.to_owned()],
        None => names
            .into_iter()
            .filter(|n| !is_virtual_interface(n))
            .collect(),
    };
    for name in candidates {
        let path = net.join(&name).join("address");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Ok(mac) = text.trim().parse::<MacAddr>() {
            if mac.0 != [0; 6] {
                return Ok((name, mac));
            }
        }
    }
    bail!(
        "no usable network interface with a MAC address under {}",
        net.display()
    )
}

/// The stable node id: 16 lowercase hex characters.
pub fn node_id(root: &Path, primary: Option<MacAddr>) -> Result<String> {
    let mid = std::fs::read_to_string(root.join("etc/machine-id")).unwrap_or_default();
    let mid = mid.trim();
    let source = if mid.len() == 32 && mid.chars().all(|c| c.is_ascii_hexdigit()) {
        format!("machine-id:{mid}")
    } else if let Some(mac) = primary {
        format!("mac:{mac}")
    } else {
        bail!("neither /etc/machine-id nor a primary MAC address is available for a node id");
    };
    let digest = Sha256::digest(format!("rackseed/v1/node-id/{source}").as_bytes());
    Ok(hex::encode(&digest[..8]))
}

/// The hostname this node should have: its inventory entry's, else the configured pattern.
pub fn desired_hostname(config: &ClusterConfig, node_id: &str, mac: Option<MacAddr>) -> String {
    if let Some(mac) = mac {
        if let Some(entry) = config.nodes.iter().find(|n| n.mac == mac) {
            return entry.hostname.clone();
        }
    }
    let mac_text = mac
        .map(|m| m.to_string().replace(':', ""))
        .unwrap_or_default();
    config
        .image
        .hostname_pattern
        .replace("{cluster}", &config.cluster.name)
        .replace("{id}", &node_id[..node_id.len().min(6)])
        .replace("{mac}", &mac_text)
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, mac) in [
            ("cni0", "aa:aa:aa:aa:aa:aa"),
            ("enp1s0", "52:54:00:12:34:56"),
            ("lo", "00:00:00:00:00:00"),
        ] {
            let p = d.path().join("sys/class/net").join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("address"), format!("{mac}\n")).unwrap();
        }
        d
    }

    #[test]
    fn primary_mac_skips_virtual_interfaces() {
        let root = fake_root();
        let (name, mac) = primary_mac(root.path(), None).unwrap();
        assert_eq!(name, "enp1s0");
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn node_id_prefers_machine_id_and_falls_back_to_mac() {
        let root = fake_root();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let from_mac = node_id(root.path(), Some(mac)).unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/machine-id"), "uninitialized\n").unwrap();
        assert_eq!(node_id(root.path(), Some(mac)).unwrap(), from_mac);
        std::fs::write(
            root.path().join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let from_mid = node_id(root.path(), Some(mac)).unwrap();
        assert_ne!(from_mid, from_mac);
        assert_eq!(from_mid.len(), 16);
        assert!(!from_mid.contains("0123456789abcdef"));
        assert!(node_id(tempfile::tempdir().unwrap().path(), None).is_err());
    }
}
