//! The MicroK8s launch configuration, `/etc/microk8s.yaml` (reference A8), as the agent writes
//! it right before `snap install`.
//!
//! The snap's install hook copies the first launch configuration it finds and the cluster agent
//! applies its `addons:` once MicroK8s runs. That is the **only** moment the DNS addon's
//! arguments (its upstream resolvers) can reach MicroK8s without disabling dns first: a later
//! `microk8s enable dns 1.1.1.1` on an enabled addon prints "Addon core/dns is already enabled"
//! and changes nothing (reference A7 and C, last item: canonical/microk8s `scripts/wrappers/enable.py` hands
//! the currently enabled addons to `xable`, which skips them before the addon's `enable` script
//! runs; canonical/microk8s-core-addons `addons/dns/enable` is what writes the upstreams
//! into CoreDNS's Corefile as `forward . <nameservers>`). So the file carries exactly the
//! arguments of the addon plan's `enable dns` ([`crate::addons::plan::dns_enable`]): both
//! places agree, and dns off means no dns entry at all.
//!
//! Supplying a file replaces the bundled default, so the default's kubelet DNS arguments are
//! copied in. Every node gets the same `persistentClusterToken` (derived from the cluster
//! secret). Joins are not listed (they would race; the agent serialises them).
//!
//! To add something to the launch configuration: add a field to [`LaunchAddons`] (or a sibling
//! settings struct), fill it in [`LaunchAddons::from_config`], render it in
//! [`render_launch_config`] and test the rendered YAML.

use std::path::Path;

use rackseed_config::ClusterConfig;

use super::TOKEN_MIN_LEN;

/// What the launch configuration enables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchAddons {
    /// The `dns` addon's arguments (one comma-separated list of upstream resolvers, or none),
    /// or `None` when dns is off.
    pub dns: Option<Vec<String>>,
}

impl Default for LaunchAddons {
    /// What MicroK8s' bundled default gives: dns with no arguments.
    fn default() -> Self {
        LaunchAddons {
            dns: Some(Vec::new()),
        }
    }
}

impl LaunchAddons {
    /// The launch configuration's addons for `cfg`: the same `dns` arguments the addon plan
    /// passes to `microk8s enable dns`.
    pub fn from_config(cfg: &ClusterConfig) -> Self {
        LaunchAddons {
            dns: crate::addons::plan::dns_enable(&cfg.addons.dns).map(|e| e.args),
        }
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The launch configuration written to `/etc/microk8s.yaml` (A8) with `token` as its
/// `persistentClusterToken`.
pub fn render_launch_config(token: &str, addons: &LaunchAddons) -> String {
    let mut s = format!(
        "---\nversion: 0.2.0\npersistentClusterToken: {}\n",
        quoted(token)
    );
    match &addons.dns {
        None => s.push_str("addons: []\n"),
        Some(args) => {
            s.push_str("addons:\n  - name: dns\n");
            if !args.is_empty() {
                let list: Vec<String> = args.iter().map(|a| quoted(a)).collect();
                s.push_str(&format!("    args: [{}]\n", list.join(", ")));
            }
        }
    }
    s.push_str(
        "extraKubeletArgs:\n  --cluster-domain: cluster.local\n  --cluster-dns: 10.152.183.10\n",
    );
    s
}

/// The top-level `persistentClusterToken:` key.
const TOKEN_KEY: &str = "persistentClusterToken:";

/// Rewrites the launch config at `path` (when it exists) with `token` as its
/// `persistentClusterToken`, atomically with mode 0600, so a later (re)install of the snap
/// does not bring a revoked token back. Only the token line changes: the addons (dns upstreams)
/// and anything else in the file stay as they were. Returns whether the file exists.
pub fn rewrite_launch_config_token(path: &Path, token: &str) -> std::io::Result<bool> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if token.len() < TOKEN_MIN_LEN || !token.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(std::io::Error::other(format!(
            "the new token for {} is malformed (at least {TOKEN_MIN_LEN} ASCII letters or digits)",
            path.display()
        )));
    }
    let line = format!("{TOKEN_KEY} {}", quoted(token));
    let mut found = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(TOKEN_KEY) {
                found = true;
                line.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !found {
        out.push(line);
    }
    let mut body = out.join("\n");
    body.push('\n');
    super::write_private_file(path, body.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn launch_config_has_token_dns_and_kubelet_args() {
        let v = yaml(&render_launch_config(
            &"f".repeat(64),
            &LaunchAddons::default(),
        ));
        assert_eq!(v["persistentClusterToken"].as_str(), Some(&*"f".repeat(64)));
        assert_eq!(v["addons"][0]["name"].as_str(), Some("dns"));
        assert!(v["addons"][0].get("args").is_none());
        assert_eq!(
            v["extraKubeletArgs"]["--cluster-dns"].as_str(),
            Some("10.152.183.10")
        );
        assert_eq!(
            v["extraKubeletArgs"]["--cluster-domain"].as_str(),
            Some("cluster.local")
        );
    }

    #[test]
    fn dns_upstreams_go_into_the_addon_args_ipv4_and_ipv6() {
        let addons = LaunchAddons {
            dns: Some(vec!["1.1.1.1,2606:4700::1111".into()]),
        };
        let v = yaml(&render_launch_config(&"f".repeat(64), &addons));
        assert_eq!(v["addons"][0]["name"].as_str(), Some("dns"));
        assert_eq!(
            v["addons"][0]["args"][0].as_str(),
            Some("1.1.1.1,2606:4700::1111")
        );
        let off = yaml(&render_launch_config(
            &"f".repeat(64),
            &LaunchAddons { dns: None },
        ));
        assert_eq!(off["addons"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn the_token_rewrite_keeps_the_dns_upstreams() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("microk8s.yaml");
        assert!(!rewrite_launch_config_token(&p, &"b".repeat(64)).unwrap());
        let addons = LaunchAddons {
            dns: Some(vec!["9.9.9.9".into()]),
        };
        std::fs::write(&p, render_launch_config(&"a".repeat(64), &addons)).unwrap();
        assert!(rewrite_launch_config_token(&p, &"b".repeat(64)).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, render_launch_config(&"b".repeat(64), &addons));
        assert!(rewrite_launch_config_token(&p, "short").is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "untouched");
    }
}
