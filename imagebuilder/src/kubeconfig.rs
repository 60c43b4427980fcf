//! `imagebuilder kubeconfig`: fetch the cluster's admin kubeconfig from a control-plane member
//! and point it at that member's address.
//!
//! The workstation browses mDNS (announcing nothing; see [`crate::status::ClusterBrowser`]),
//! keeps the nodes whose verified announcement (decoded by the formation core's
//! `Announcement::from_txt`) says "member, control-plane", and asks each in turn for
//! `POST /v1/kubeconfig` over its coordinator: TLS pinned
//! to the announced fingerprint, request signed with the cluster secret's challenge-response.
//! The kubeconfig never travels over any other channel, and is never logged.
//!
//! MicroK8s' `microk8s config` names the API server by the address the node picked for
//! itself; [`point_at`] rewrites every `server:` to the address the workstation actually
//! reached the node on (`https://<ip>:16443`, keeping the port MicroK8s wrote if there was
//! one), and checks the result still parses as a kubeconfig whose clusters all use it.
//!
//! When the cluster has a floating API address (`cluster.api-address`, held through keepalived
//! by one healthy control-plane node), the member's status document names it, and `server:`
//! is that address instead, so the kubeconfig keeps working when that member dies. An
//! `"auto"` address is not in the API certificate (it is chosen after the certificate is
//! made), so such a kubeconfig also names the certificate's `kubernetes` SAN as
//! `tls-server-name` ([`name_tls_server`]).
//!
//! To change which node is asked first: change the ordering in [`fetch`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::secret::ClusterSecret;

use crate::status::{workstation_client, AnnouncedNode, ClusterBrowser};

/// MicroK8s' API server port.
pub const API_SERVER_PORT: u16 = 16443;

/// Options of [`fetch`].
#[derive(Debug, Clone)]
pub struct KubeconfigOptions {
    pub secret: ClusterSecret,
    pub interfaces: InterfaceChoice,
    /// Give up when no control-plane member handed one out by then.
    pub timeout: Duration,
    /// Per-request timeout of the coordinator client.
    pub request_timeout: Duration,
}

impl KubeconfigOptions {
    pub fn new(secret: ClusterSecret) -> Self {
        KubeconfigOptions {
            secret,
            interfaces: InterfaceChoice::Auto,
            timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A kubeconfig and where it came from.
pub struct Fetched {
    /// Rewritten to point at `address`.
    pub kubeconfig: String,
    pub node_id: String,
    pub address: IpAddr,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("node_id", &self.node_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

fn server_url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("https://{v4}:{port}"),
        IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
    }
}

/// The port of an `https://host:port[/...]` URL, if it names one.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.trim().trim_matches(|c| c == '"' || c == '\'');
    let rest = rest.split_once("://").map(|(_, r)| r).unwrap_or(rest);
    let authority = rest.split('/').next()?;
    let port = if let Some(after) = authority.strip_prefix('[') {
        after.split_once("]:")?.1
    } else {
        authority.rsplit_once(':')?.1
    };
    port.parse().ok()
}

/// Rewrites every `server:` of a kubeconfig to `https://<ip>:<port>` (the port MicroK8s wrote,
/// else [`API_SERVER_PORT`]) and checks that the result is a kubeconfig whose every cluster
/// uses that server. Pure.
pub fn point_at(kubeconfig: &str, ip: IpAddr) -> Result<String> {
    let mut out = String::with_capacity(kubeconfig.len() + 32);
    let mut rewritten = 0;
    for line in kubeconfig.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let indent_len = body.len() - body.trim_start_matches([' ', '-']).len();
        let (indent, rest) = body.split_at(indent_len);
        if let Some(old) = rest.strip_prefix("server:") {
            let port = url_port(old).unwrap_or(API_SERVER_PORT);
            out.push_str(indent);
            out.push_str("server: ");
            out.push_str(&server_url(ip, port));
            out.push_str(&line[body.len()..]);
            rewritten += 1;
        } else {
            out.push_str(line);
        }
    }
    if rewritten == 0 {
        bail!("the kubeconfig names no API server (no `server:` line)");
    }
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&out).context("the kubeconfig is not valid YAML")?;
    let clusters = doc
        .get("clusters")
        .and_then(|c| c.as_sequence())
        .context("the kubeconfig has no `clusters` list")?;
    if clusters.is_empty() {
        bail!("the kubeconfig's `clusters` list is empty");
    }
    for c in clusters {
        let server = c
            .get("cluster")
            .and_then(|c| c.get("server"))
            .and_then(|s| s.as_str());
        match server {
            Some(s) if s.starts_with(&format!("https://{}", url_host(ip))) => {}
            other => bail!(
                "after rewriting, a cluster's server is {:?}, not on {ip}",
                other.unwrap_or("missing")
            ),
        }
    }
    Ok(out)
}

/// A DNS name every MicroK8s API certificate holds (`csr.conf.template`'s `DNS.1`).
pub const CERTIFICATE_NAME: &str = "kubernetes";

/// The floating API address a status document (JSON) names, and whether the API certificate
/// holds it. Pure.
pub fn floating_address(doc: &serde_json::Value) -> Option<(IpAddr, bool)> {
    let view = doc.get("api_address")?;
    let ip = view.get("address")?.as_str()?.parse().ok()?;
    let in_certificate = view
        .get("in_certificate")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Some((ip, in_certificate))
}

/// Adds `tls-server-name: <name>` under every `server:` line (same indentation), so clients
/// check the API certificate against `name` instead of the address. Pure.
pub fn name_tls_server(kubeconfig: &str, name: &str) -> Result<String> {
    let mut out = String::with_capacity(kubeconfig.len() + 64);
    let mut added = 0;
    for line in kubeconfig.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        if body.trim_start().starts_with("tls-server-name:") {
            continue;
        }
        out.push_str(line);
        let indent_len = body.len() - body.trim_start_matches([' ', '-']).len();
        if body[indent_len..].starts_with("server:") {
            if !line.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&" ".repeat(indent_len));
            out.push_str(&format!("tls-server-name: {name}\n"));
            added += 1;
        }
    }
    if added == 0 {
        bail!("the kubeconfig names no API server (no `server:` line)");
    }
    serde_yaml::from_str::<serde_yaml::Value>(&out).context("the kubeconfig is not valid YAML")?;
    Ok(out)
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn describe(n: &AnnouncedNode) -> String {
    format!(
        "{} ({}, {})",
        n.node_id,
        n.phase.as_deref().unwrap_or("phase unknown"),
        n.role.as_deref().unwrap_or("no role yet")
    )
}

/// Discovers the cluster and fetches the kubeconfig from the first control-plane member that
/// hands one out (by node id; a member that refuses is retried after the others). See the
/// module docs.
pub async fn fetch(opts: &KubeconfigOptions) -> Result<Fetched> {
    let deadline = Instant::now() + opts.timeout;
    let mut browser = ClusterBrowser::start(&opts.secret, opts.interfaces.clone())?;
    let client = workstation_client(&opts.secret, opts.request_timeout);
    // Last failure per node, shown if nothing works.
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    let mut asked_this_round: Vec<String> = Vec::new();
    loop {
        browser.drain();
        let nodes = browser.nodes();
        let mut candidates: Vec<&AnnouncedNode> = nodes
            .iter()
            .filter(|n| n.is_control_plane_member())
            .filter(|n| !asked_this_round.contains(&n.node_id))
            .collect();
        candidates.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        if let Some(node) = candidates.first() {
            asked_this_round.push(node.node_id.clone());
            for ip in &node.addresses {
                let peer = SocketAddr::new(*ip, node.port);
                match client.kubeconfig(peer, &node.fingerprint).await {
                    Ok(k) => {
                        let floating = match client.status(peer, &node.fingerprint).await {
                            Ok(doc) => floating_address(&doc),
                            Err(e) => {
                                tracing::debug!(node = %node.node_id, error = %e, "no status");
                                None
                            }
                        };
                        let server = floating.map_or(*ip, |(vip, _)| vip);
                        let context = || format!("kubeconfig from {} ({peer})", node.node_id);
                        let mut kubeconfig = point_at(&k, server).with_context(context)?;
                        if floating.is_some_and(|(_, in_certificate)| !in_certificate) {
                            kubeconfig = name_tls_server(&kubeconfig, CERTIFICATE_NAME)
                                .with_context(context)?;
                        }
                        tracing::info!(node = %node.node_id, %peer, %server, "fetched the kubeconfig");
                        return Ok(Fetched {
                            kubeconfig,
                            node_id: node.node_id.clone(),
                            address: server,
                        });
                    }
                    Err(e) => {
                        tracing::debug!(node = %node.node_id, error = %e, "no kubeconfig");
                        failures.insert(node.node_id.clone(), e.to_string());
                    }
                }
            }
            if node.addresses.is_empty() {
                failures.insert(node.node_id.clone(), "no address announced".into());
            }
            continue;
        }
        if Instant::now() >= deadline {
            let stats = browser.stats();
            let mut msg = if nodes.is_empty() {
                format!(
                    "no node of this cluster announced itself over mDNS within {}",
                    humantime_secs(opts.timeout)
                )
            } else {
                format!(
                    "no control-plane member handed out a kubeconfig within {}; nodes seen: {}",
                    humantime_secs(opts.timeout),
                    nodes.iter().map(describe).collect::<Vec<_>>().join(", ")
                )
            };
            for (node, why) in &failures {
                msg.push_str(&format!("\n  {node}: {why}"));
            }
            if stats.wrong_cluster > 0 || stats.bad_signature > 0 {
                msg.push_str(&format!(
                    "\n  {} announcement(s) of another cluster and {} with a bad signature were \
                     ignored: is this the cluster's secret?",
                    stats.wrong_cluster, stats.bad_signature
                ));
            }
            bail!(msg);
        }
        // Everyone known was asked: start a new round after a pause.
        asked_this_round.clear();
        let pause = Duration::from_millis(if failures.is_empty() { 300 } else { 1000 })
            .min(deadline.saturating_duration_since(Instant::now()));
        browser.collect_for(pause).await;
    }
}

/// Writes a kubeconfig to `path` with mode 0600: to a temporary name in the same folder, synced,
/// then renamed, so an existing file is replaced whole or not at all.
pub fn write_private(path: &std::path::Path, kubeconfig: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(kubeconfig.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `microk8s config`'s shape (the one fixture the kubeconfig tests share).
    const MICROK8S_CONFIG: &str = include_str!("../tests/fixtures/microk8s-config.yaml");

    #[test]
    fn server_is_pointed_at_the_reached_address_and_the_rest_is_kept() {
        let out = point_at(MICROK8S_CONFIG, "192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(
            out,
            MICROK8S_CONFIG.replace("https://127.0.0.1:16443", "https://192.0.2.7:16443")
        );
        let v6 = point_at(MICROK8S_CONFIG, "fd00::7".parse().unwrap()).unwrap();
        assert!(v6.contains("    server: https://[fd00::7]:16443\n"), "{v6}");
    }

    #[test]
    fn a_written_port_is_kept_and_a_missing_one_defaults() {
        let custom = MICROK8S_CONFIG.replace("https://127.0.0.1:16443", "https://[fe80::1]:6443/");
        let out = point_at(&custom, "192.0.2.7".parse().unwrap()).unwrap();
        assert!(out.contains("server: https://192.0.2.7:6443\n"), "{out}");
        let none = MICROK8S_CONFIG.replace("https://127.0.0.1:16443", "\"https://node-a\"");
        let out = point_at(&none, "192.0.2.7".parse().unwrap()).unwrap();
        assert!(out.contains("server: https://192.0.2.7:16443\n"), "{out}");
    }

    #[test]
    fn the_floating_address_from_a_status_document_becomes_the_server() {
        let doc = serde_json::json!({
            "node_id": "a",
            "api_address": {"address": "192.0.2.100", "held_here": false, "in_certificate": true}
        });
        let (vip, in_cert) = floating_address(&doc).unwrap();
        assert_eq!(vip, "192.0.2.100".parse::<IpAddr>().unwrap());
        assert!(in_cert);
        let out = point_at(MICROK8S_CONFIG, vip).unwrap();
        assert!(
            out.contains("    server: https://192.0.2.100:16443\n"),
            "{out}"
        );
        // No floating address (none configured, or "auto" not chosen yet): the node's own.
        assert_eq!(floating_address(&serde_json::json!({"node_id": "a"})), None);
        let none = serde_json::json!({"api_address": {"address": null, "state": "no address yet"}});
        assert_eq!(floating_address(&none), None);
    }

    #[test]
    fn an_address_outside_the_certificate_names_the_certificates_dns_name() {
        let out = point_at(MICROK8S_CONFIG, "192.0.2.100".parse().unwrap()).unwrap();
        let named = name_tls_server(&out, CERTIFICATE_NAME).unwrap();
        assert!(
            named.contains(
                "    server: https://192.0.2.100:16443\n    tls-server-name: kubernetes\n"
            ),
            "{named}"
        );
        let doc: serde_yaml::Value = serde_yaml::from_str(&named).unwrap();
        assert_eq!(
            doc["clusters"][0]["cluster"]["tls-server-name"].as_str(),
            Some("kubernetes")
        );
        // Idempotent: a second pass does not add a second line.
        assert_eq!(name_tls_server(&named, CERTIFICATE_NAME).unwrap(), named);
        assert!(name_tls_server("kind: Config\n", CERTIFICATE_NAME).is_err());
    }

    #[test]
    fn documents_that_are_not_kubeconfigs_are_refused() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let e = point_at("apiVersion: v1\nclusters: []\n", ip).unwrap_err();
        assert!(e.to_string().contains("no `server:`"), "{e}");
        let e = point_at("server: https://x:1\n", ip).unwrap_err();
        assert!(e.to_string().contains("clusters"), "{e}");
        let e = point_at("clusters: [oops\nserver: https://x:1\n", ip).unwrap_err();
        assert!(e.to_string().contains("not valid YAML"), "{e}");
        let e = point_at(
            "clusters:\n- cluster: {server: https://10.0.0.1:16443}\n",
            ip,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no `server:`"), "{e}");
    }
}
