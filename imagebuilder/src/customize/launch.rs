//! `/etc/microk8s.yaml`, the MicroK8s launch configuration applied by the snap's install hook.
//!
//! Supplying it replaces MicroK8s' bundled default, so the default's DNS addon and kubelet DNS
//! arguments are copied in (reference A8). Every node gets the same `persistentClusterToken`,
//! derived from the cluster secret, so any member can accept a join with no `add-node` call.
//! Joins are not listed here (they would race); `firstboot` serialises them.

use anyhow::{bail, Result};
use rackseed_config::ClusterConfig;
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
    let doc = json!({
        "version": "0.2.0",
        "persistentClusterToken": token,
        "addons": addons,
        "extraKubeletArgs": {
            "--cluster-domain": "cluster.local",
            "--cluster-dns": "10.152.183.10",
        },
    });
    let body = serde_yaml::to_string(&doc)?;
    Ok(format!("# Written by rackseed imagebuilder: MicroK8s launch configuration (read at snap install).\n---\n{body}"))
}
