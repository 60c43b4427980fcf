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
    pub network_config: String,
}

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

/// `network-config` (netplan v2). `psk` is the Wi-Fi PSK when Wi-Fi is configured.
pub fn network_config(config: &ClusterConfig, psk: Option<&str>) -> Result<String> {
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
    if let Some(w) = &net.wifi {
        let psk = psk.context("Wi-Fi is configured but no PSK was read")?;
        let mut aps = Map::new();
        aps.insert(w.ssid.clone(), json!({"password": psk}));
        network.insert(
            "wifis".into(),
            json!({"wlan0": {"dhcp4": true, "optional": true, "regulatory-domain": w.country, "access-points": aps}}),
        );
    }
    yaml(&json!({"network": network}))
}

/// All three files; the instance id changes whenever the seed's content changes, so cloud-init
/// applies a changed seed on a re-flashed machine.
pub fn seed(config: &ClusterConfig, psk: Option<&str>) -> Result<Seed> {
    let user_data = user_data(config)?;
    let network_config = network_config(config, psk)?;
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
    })
}
