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
//! copied in. A fixed `cluster.api-address` goes into `extraSANs` (as in the image builder's
//! copy, `imagebuilder/src/customize/launch.rs`; the agent's write replaces that copy). Every node gets the same `persistentClusterToken` (derived from the cluster
//! secret). Joins are not listed (they would race; the agent serialises them).
//!
//! To add something to the launch configuration: add a field to [`LaunchSettings`] (or a sibling
//! settings struct), fill it in [`LaunchSettings::from_config`], render it in
//! [`render_launch_config`] and test the rendered YAML.

use std::net::IpAddr;
use std::path::Path;

use rackseed_config::{ApiAddress, ClusterConfig};

use super::TOKEN_MIN_LEN;

/// What goes into the launch configuration besides the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSettings {
    /// The `dns` addon's arguments (one comma-separated list of upstream resolvers, or none),
    /// or `None` when dns is off.
    pub dns: Option<Vec<String>>,
    /// `extraSANs`: a fixed `cluster.api-address`, so the API server's certificate (made at
    /// install) holds it, as the image builder's copy of this file says.
    pub extra_sans: Vec<IpAddr>,
}

impl Default for LaunchSettings {
    /// What MicroK8s' bundled default gives: dns with no arguments.
    fn default() -> Self {
        LaunchSettings {
            dns: Some(Vec::new()),
            extra_sans: Vec::new(),
        }
    }
}

impl LaunchSettings {
    /// The launch configuration's settings for `cfg`: the same `dns` arguments the addon plan
    /// passes to `microk8s enable dns`, and a fixed API address as a SAN.
    pub fn from_config(cfg: &ClusterConfig) -> Self {
        LaunchSettings {
            dns: crate::addons::plan::dns_enable(&cfg.addons.dns).map(|e| e.args),
            extra_sans: match cfg.cluster.api_address {
                Some(ApiAddress::Fixed(ip)) => vec![ip],
                _ => Vec::new(),
            },
        }
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The launch configuration written to `/etc/microk8s.yaml` (A8) with `token` as its
/// `persistentClusterToken`.
pub fn render_launch_config(token: &str, settings: &LaunchSettings) -> String {
    let mut s = format!(
        "---\nversion: 0.2.0\npersistentClusterToken: {}\n",
        quoted(token)
    );
    match &settings.dns {
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
    if !settings.extra_sans.is_empty() {
        let list: Vec<String> = settings
            .extra_sans
            .iter()
            .map(|ip| quoted(&ip.to_string()))
            .collect();
        s.push_str(&format!("extraSANs: [{}]\n", list.join(", ")));
    }
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
            &LaunchSettings::default(),
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
        let addons = LaunchSettings {
            dns: Some(vec!["1.1.1.1,2606:4700::1111".into()]),
            extra_sans: vec![],
        };
        let v = yaml(&render_launch_config(&"f".repeat(64), &addons));
        assert_eq!(v["addons"][0]["name"].as_str(), Some("dns"));
        assert_eq!(
            v["addons"][0]["args"][0].as_str(),
            Some("1.1.1.1,2606:4700::1111")
        );
        let off = yaml(&render_launch_config(
            &"f".repeat(64),
            &LaunchSettings {
                dns: None,
                extra_sans: vec![],
            },
        ));
        assert_eq!(off["addons"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn a_fixed_api_address_is_a_san() {
        let settings = LaunchSettings {
            extra_sans: vec!["192.0.2.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ..LaunchSettings::default()
        };
        let v = yaml(&render_launch_config(&"f".repeat(64), &settings));
        assert_eq!(v["extraSANs"][0].as_str(), Some("192.0.2.10"));
        assert_eq!(v["extraSANs"][1].as_str(), Some("fd00::10"));
        let none = render_launch_config(&"f".repeat(64), &LaunchSettings::default());
        assert!(!none.contains("extraSANs"), "{none}");
    }

    #[test]
    fn the_token_rewrite_keeps_the_dns_upstreams() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("microk8s.yaml");
        assert!(!rewrite_launch_config_token(&p, &"b".repeat(64)).unwrap());
        let addons = LaunchSettings {
            dns: Some(vec!["9.9.9.9".into()]),
            extra_sans: vec!["192.0.2.10".parse().unwrap()],
        };
        std::fs::write(&p, render_launch_config(&"a".repeat(64), &addons)).unwrap();
        assert!(rewrite_launch_config_token(&p, &"b".repeat(64)).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, render_launch_config(&"b".repeat(64), &addons));
        assert!(rewrite_launch_config_token(&p, "short").is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "untouched");
    }
}
