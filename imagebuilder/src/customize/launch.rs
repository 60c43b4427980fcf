//! `/etc/microk8s.yaml`, the MicroK8s launch configuration applied by the snap's install hook.
//!
//! Supplying it replaces MicroK8s' bundled default, so the default's DNS addon and kubelet DNS
//! arguments are copied in (reference A8). Every node gets the same `persistentClusterToken`,
//! derived from the cluster secret, so any member can accept a join with no `add-node` call.
//! Joins are not listed here (they would race); `firstboot` serialises them.
//!
//! A fixed `cluster.api-address` goes into `extraSANs`, so the API server's certificate (made
//! at install, `csr.conf.template`'s `#MOREIPS`) names the floating address clients use. An
//! `"auto"` address is chosen at boot, after the certificate exists: kubeconfigs for it name
//! the certificate's `kubernetes` SAN instead (`tls-server-name`, see `kubeconfig.rs`).

use anyhow::{bail, Result};
use rackseed_config::{ApiAddress, ClusterConfig};
use serde_json::json;

/// Renders the launch configuration for `config` with `token` (at least 32 characters, as
/// MicroK8s requires for persistent tokens).
pub fn render(config: &ClusterConfig, token: &str) -> Result<String> {
    if token.len() < 32 || !token.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("the MicroK8s cluster token must be at least 32 ASCII letters or digits");
    }
    let mut addons = Vec::new();
    if config.addons.dns.enabled {
        if config.addons.dns.upstream.is_empty() {
            addons.push(json!({"name": "dns"}));
        } else {
            let up: Vec<String> = config
                .addons
                .dns
                .upstream
                .iter()
                .map(|a| a.to_string())
                .collect();
            addons.push(json!({"name": "dns", "args": [up.join(",")]}));
        }
    }
    let mut doc = json!({
        "version": "0.2.0",
        "persistentClusterToken": token,
        "addons": addons,
        "extraKubeletArgs": {
            "--cluster-domain": "cluster.local",
            "--cluster-dns": "10.152.183.10",
        },
    });
    if let Some(ApiAddress::Fixed(ip)) = config.cluster.api_address {
        doc["extraSANs"] = json!([ip.to_string()]);
    }
    let body = serde_yaml::to_string(&doc)?;
    Ok(format!("# Written by rackseed imagebuilder: MicroK8s launch configuration (read at snap install).\n---\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(api: &str) -> ClusterConfig {
        let text = format!(
            "[cluster]\nname = \"lab\"\n{api}\n[image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n"
        );
        rackseed_config::parse(&text, std::path::Path::new("/cfg/lab.toml"))
            .unwrap()
            .config
    }

    #[test]
    fn a_fixed_api_address_is_an_extra_san_and_auto_adds_none() {
        let token = "a".repeat(64);
        let fixed = render(&config("api-address = \"192.168.1.10\""), &token).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(&fixed).unwrap();
        let sans: Vec<&str> = doc["extraSANs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(sans, ["192.168.1.10"]);
        for text in [
            render(&config("api-address = \"auto\""), &token).unwrap(),
            render(&config(""), &token).unwrap(),
        ] {
            assert!(!text.contains("extraSANs"), "{text}");
        }
    }
}
