//! The cloud-init NoCloud seed: `user-data` (users, SSH keys, `preserve_hostname: true` so
//! cloud-init does not undo the hostname `firstboot` sets), `meta-data` (`instance-id`) and
//! `network-config` (netplan v2: wired DHCP or per-MAC static addresses from the inventory,
//! plus Wi-Fi with the PSK read from the configured file at build time).
//!
//! Raspberry Pi images carry the seed on `system-boot` (Ubuntu's `fs_label: system-boot`);
//! x86 images carry it in `/var/lib/cloud/seed/nocloud/`. To add a cloud-config key, add it to
//! [`user_data`] and keep `cloud-init schema` passing in the image tests.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rackseed_config::{Addressing, ClusterConfig};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The three seed files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    /// Wired networking only: on a Raspberry Pi this file sits on the FAT boot partition,
    /// which Ubuntu mounts readable by every user, so it never holds the Wi-Fi PSK.
    pub network_config: String,
    /// The Wi-Fi netplan file ([`WIFI_NETPLAN_PATH`], mode 0600 in the root filesystem), when
    /// Wi-Fi is configured: the only place the PSK is written.
    pub wifi_netplan: Option<String>,
}

/// Where the Wi-Fi settings go: a netplan file of the root filesystem, 0600 (netplan itself
/// warns about PSKs in files others can read). netplan merges it with cloud-init's
/// `50-cloud-init.yaml` made from `network-config`.
pub const WIFI_NETPLAN_PATH: &str = "/etc/netplan/60-rackseed-wifi.yaml";

/// Reads a Wi-Fi PSK file: one line, 8-63 printable ASCII characters or 64 hex digits.
pub fn read_psk(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the Wi-Fi PSK file {}", path.display()))?;
    let psk = raw.trim_end_matches(['\n', '\r']);
    let ok_pass = (8..=63).contains(&psk.len()) && psk.chars().all(|c| (' '..='~').contains(&c));
    let ok_hex = psk.len() == 64 && psk.chars().all(|c| c.is_ascii_hexdigit());
    if psk.contains('\n') || !(ok_pass || ok_hex) {
        bail!(
            "Wi-Fi PSK in {} must be one line of 8-63 printable ASCII characters or 64 hex digits",
            path.display()
        );
    }
    Ok(psk.to_string())
}

fn yaml(v: &Value) -> Result<String> {
    Ok(serde_yaml::to_string(v)?)
}

/// `user-data` (`#cloud-config`).
pub fn user_data(config: &ClusterConfig) -> Result<String> {
    let users: Vec<Value> = config
        .image
        .users
        .iter()
        .map(|u| {
            let mut m = Map::new();
            m.insert("name".into(), json!(u.name));
            m.insert("shell".into(), json!("/bin/bash"));
            m.insert("lock_passwd".into(), json!(true));
            m.insert("ssh_authorized_keys".into(), json!(u.ssh_keys));
            if u.sudo {
                m.insert("sudo".into(), json!("ALL=(ALL) NOPASSWD:ALL"));
                m.insert("groups".into(), json!("sudo"));
            }
            Value::Object(m)
        })
        .collect();
    let mut doc = json!({
        "preserve_hostname": true,
        "ssh_pwauth": false,
        "growpart": {"mode": "auto", "devices": ["/"]},
    });
    // No configured users: leave `users` out, which keeps the image's default user (cloud-init
    // rejects an empty list).
    if !users.is_empty() {
        doc["users"] = Value::Array(users);
    }
    Ok(format!("#cloud-config\n{}", yaml(&doc)?))
}

/// `network-config` (netplan v2): the wired interfaces; Wi-Fi is in [`wifi_netplan`].
pub fn network_config(config: &ClusterConfig) -> Result<String> {
    let net = &config.network;
    let mut ethernets = Map::new();
    match &net.addressing {
        Addressing::Dhcp => {
            let matcher = match &net.interface {
                Some(i) => json!({"name": i}),
                None => json!({"name": "e*"}),
            };
            ethernets.insert(
                "wired".into(),
                json!({"match": matcher, "dhcp4": true, "dhcp6": true, "optional": true}),
            );
        }
        Addressing::Static { gateway, dns } => {
            let dns: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
            for n in &config.nodes {
                let Some(addr) = n.address else {
                    bail!(
                        "node {} has no address but network.addressing is static",
                        n.hostname
                    );
                };
                ethernets.insert(
                    n.hostname.clone(),
                    json!({
                        "match": {"macaddress": n.mac.to_string()},
                        "addresses": [addr.to_string()],
                        "routes": [{"to": "default", "via": gateway.to_string()}],
                        "nameservers": {"addresses": dns},
                        "optional": true,
                    }),
                );
            }
        }
    }
    let mut network = Map::new();
    network.insert("version".into(), json!(2));
    network.insert("ethernets".into(), Value::Object(ethernets));
    yaml(&json!({"network": network}))
}

/// The Wi-Fi netplan file (v2) when Wi-Fi is configured; `psk` is its PSK.
pub fn wifi_netplan(config: &ClusterConfig, psk: Option<&str>) -> Result<Option<String>> {
    let Some(w) = &config.network.wifi else {
        return Ok(None);
    };
    let psk = psk.context("Wi-Fi is configured but no PSK was read")?;
    let mut aps = Map::new();
    aps.insert(w.ssid.clone(), json!({"password": psk}));
    let wifis = json!({"wlan0": {"dhcp4": true, "optional": true, "regulatory-domain": w.country, "access-points": aps}});
    yaml(&json!({"network": {"version": 2, "wifis": wifis}})).map(Some)
}

/// All three files; the instance id changes whenever the seed's content changes, so cloud-init
/// applies a changed seed on a re-flashed machine.
pub fn seed(config: &ClusterConfig, psk: Option<&str>) -> Result<Seed> {
    let user_data = user_data(config)?;
    let network_config = network_config(config)?;
    let wifi_netplan = wifi_netplan(config, psk)?;
    let mut h = Sha256::new();
    h.update(user_data.as_bytes());
    h.update(network_config.as_bytes());
    let id = hex::encode(h.finalize());
    let meta_data = format!(
        "instance-id: rackseed-{}-{}\n",
        config.cluster.name,
        &id[..12]
    );
    Ok(Seed {
        user_data,
        meta_data,
        network_config,
        wifi_netplan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ClusterConfig {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[image]\ntarget = \"rpi4\"\n\
             base = {{ kind = \"local\", path = \"b.img\" }}\n{extra}"
        );
        rackseed_config::parse(&text, Path::new("/cfg/lab.toml"))
            .unwrap_or_else(|e| panic!("{e:?}"))
            .config
    }

    /// What netplan itself makes of the files (Debian package netplan.io): both files
    /// together, as cloud-init leaves them on the node.
    fn netplan_generate(files: &[(&str, &str)]) {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc/netplan");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let out = rackseed_host::command::Cmd::new("netplan", std::time::Duration::from_secs(60))
            .args(["generate", "--root-dir"])
            .arg(root.path())
            .output_blocking()
            .expect("netplan is installed (scripts/install-deps: netplan.io)");
        assert_eq!(out.code(), Some(0), "netplan generate: {}", out.stderr);
    }

    #[test]
    fn the_psk_is_only_in_the_wifi_file_and_netplan_accepts_both() {
        let cfg = config(
            "[network.wifi]\nssid = \"homelab\"\npsk-file = \"/cfg/w.psk\"\ncountry = \"GB\"\n",
        );
        let psk = "correct horse battery";
        let seed = seed(&cfg, Some(psk)).unwrap();
        assert!(
            !seed.network_config.contains(psk),
            "{}",
            seed.network_config
        );
        assert!(!seed.user_data.contains(psk) && !seed.meta_data.contains(psk));
        let wifi = seed.wifi_netplan.expect("wifi file");
        assert!(wifi.contains("homelab") && wifi.contains(psk), "{wifi}");
        netplan_generate(&[
            ("50-cloud-init.yaml", &seed.network_config),
            ("60-rackseed-wifi.yaml", &wifi),
        ]);
        // Without Wi-Fi there is no such file, and the wired config stands alone.
        let wired = seed_without_wifi();
        assert!(wired.wifi_netplan.is_none());
        netplan_generate(&[("50-cloud-init.yaml", &wired.network_config)]);
    }

    fn seed_without_wifi() -> Seed {
        seed(&config(""), None).unwrap()
    }
}
