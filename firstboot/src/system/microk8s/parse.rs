//! Parsers for MicroK8s' output, split from invocation so they can be tested on captured text in
//! `tests/fixtures/microk8s/`. Each takes the command's text and returns typed data; none runs
//! anything. Formats are the ones in the reference (A3, A5): `status --format yaml` (printed by
//! Python `print` calls, so it is parsed line by line rather than as YAML, which such output
//! does not always satisfy), the dqlite `.cluster` JSON, `kubectl get nodes -o json`, the
//! `Connection failed. <error> (<status>).` line of a rejected join, and the kubeconfig printed
//! by `microk8s config` (checked, never quoted in errors: it is a credential).
//!
//! To support a new output, add a `parse_*` function here and a fixture next to the others.

use std::net::IpAddr;

use serde::Deserialize;

/// What a malformed output looked like; names the command it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unexpected output from `{what}`: {detail}")]
pub struct ParseError {
    pub what: &'static str,
    pub detail: String,
}

fn perr(what: &'static str, detail: impl Into<String>) -> ParseError {
    ParseError {
        what,
        detail: detail.into(),
    }
}

/// A dqlite role (reference A5: Role 0/1/2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DqliteRole {
    Voter,
    Standby,
    Spare,
}

impl DqliteRole {
    fn from_name(s: &str) -> Option<Self> {
        match s {
            "voter" => Some(DqliteRole::Voter),
            "standby" => Some(DqliteRole::Standby),
            "spare" => Some(DqliteRole::Spare),
            _ => None,
        }
    }

    fn from_number(n: u64) -> Option<Self> {
        match n {
            0 => Some(DqliteRole::Voter),
            1 => Some(DqliteRole::Standby),
            2 => Some(DqliteRole::Spare),
            _ => None,
        }
    }
}

/// One `high-availability.nodes` entry of `status --format yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreNode {
    /// `ip:19001`.
    pub address: String,
    pub role: DqliteRole,
}

/// One `addons` entry of `status --format yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonState {
    pub name: String,
    pub repository: Option<String>,
    pub enabled: bool,
}

/// `status --format yaml` of a running, ready node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunningStatus {
    /// The `ha-cluster` lock exists; says nothing about quorum (reference A5).
    pub ha_enabled: bool,
    pub datastore: Vec<DatastoreNode>,
    pub addons: Vec<AddonState>,
}

impl RunningStatus {
    /// Addresses (`ip:19001`) with role voter.
    pub fn voters(&self) -> Vec<&str> {
        self.with_role(DqliteRole::Voter)
    }

    /// Addresses (`ip:19001`) with role standby.
    pub fn standby(&self) -> Vec<&str> {
        self.with_role(DqliteRole::Standby)
    }

    fn with_role(&self, role: DqliteRole) -> Vec<&str> {
        self.datastore
            .iter()
            .filter(|n| n.role == role)
            .map(|n| n.address.as_str())
            .collect()
    }

    /// "HA formed": at least 3 voters (reference A5, `ha_cluster_formed`: voters > 2).
    pub fn ha_formed(&self) -> bool {
        self.voters().len() >= 3
    }

    /// Whether the named addon is listed as enabled.
    pub fn addon_enabled(&self, name: &str) -> bool {
        self.addons.iter().any(|a| a.name == name && a.enabled)
    }
}

/// What `microk8s status` says about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// "microk8s is not running, try microk8s start" (exit 0).
    Stopped,
    /// Joined with `--worker`: status refuses with "acting as a node in a cluster" (exit 1).
    WorkerNode,
    /// Running but not ready (exit 1), e.g. quorum lost or still starting.
    NotReady,
    Running(RunningStatus),
}

/// Text printed by a stopped node.
pub const NOT_RUNNING_MARKER: &str = "microk8s is not running, try microk8s start";
/// Text printed when a command is refused on a worker node (`is_cluster_locked`).
pub const WORKER_MARKER: &str = "This MicroK8s deployment is acting as a node in a cluster";

/// Interprets `microk8s status --format yaml` from its exit code and output.
pub fn parse_status(code: Option<i32>, stdout: &str, stderr: &str) -> Result<Status, ParseError> {
    let all = format!("{stdout}\n{stderr}");
    if all.contains(WORKER_MARKER) {
        return Ok(Status::WorkerNode);
    }
    if all.contains(NOT_RUNNING_MARKER) {
        return Ok(Status::Stopped);
    }
    match code {
        Some(0) => {
            let s = parse_status_yaml(stdout)?;
            Ok(s.map(Status::Running).unwrap_or(Status::NotReady))
        }
        Some(1) => Ok(Status::NotReady),
        other => Err(perr(
            "microk8s status",
            format!("exit status {other:?}: {}", all.trim()),
        )),
    }
}

/// Parses `status --format yaml`; `Ok(None)` when it reports `running: False`.
pub fn parse_status_yaml(text: &str) -> Result<Option<RunningStatus>, ParseError> {
    const WHAT: &str = "microk8s status --format yaml";
    let mut section = String::new();
    let mut running: Option<bool> = None;
    let mut st = RunningStatus::default();
    // The list item being read in `high-availability.nodes` or `addons`.
    let mut node: Option<(Option<String>, Option<DqliteRole>)> = None;
    let mut addon: Option<AddonState> = None;
    let flush_node = |node: &mut Option<(Option<String>, Option<DqliteRole>)>,
                      st: &mut RunningStatus|
     -> Result<(), ParseError> {
        if let Some((addr, role)) = node.take() {
            match (addr, role) {
                (Some(address), Some(role)) => st.datastore.push(DatastoreNode { address, role }),
                (a, r) => {
                    return Err(perr(
                        WHAT,
                        format!("incomplete datastore node (address {a:?}, role {r:?})"),
                    ))
                }
            }
        }
        Ok(())
    };
    for raw in text.lines() {
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        let indent = raw.len() - raw.trim_start().len();
        let line = raw.trim();
        if indent == 0 {
            flush_node(&mut node, &mut st)?;
            st.addons.extend(addon.take());
            section = line.trim_end_matches(':').to_owned();
            continue;
        }
        let (item_start, body) = match line.strip_prefix("- ") {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let (key, value) = match body.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => continue,
        };
        match section.as_str() {
            "microk8s" if key == "running" => running = Some(parse_py_bool(value, WHAT)?),
            "high-availability" => {
                if item_start {
                    flush_node(&mut node, &mut st)?;
                    node = Some((None, None));
                }
                let in_item = node.is_some();
                match (key, node.as_mut()) {
                    ("enabled", _) if !in_item => st.ha_enabled = parse_py_bool(value, WHAT)?,
                    ("address", Some(n)) => n.0 = Some(value.to_owned()),
                    ("role", Some(n)) => {
                        n.1 = Some(DqliteRole::from_name(value).ok_or_else(|| {
                            perr(WHAT, format!("unknown datastore role {value:?}"))
                        })?)
                    }
                    _ => {}
                }
            }
            "addons" => {
                if item_start {
                    st.addons.extend(addon.take());
                    addon = Some(AddonState {
                        name: String::new(),
                        repository: None,
                        enabled: false,
                    });
                }
                if let Some(a) = addon.as_mut() {
                    match key {
                        "name" => a.name = value.to_owned(),
                        "repository" => a.repository = Some(value.to_owned()),
                        "status" => a.enabled = value == "enabled",
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    flush_node(&mut node, &mut st)?;
    st.addons.extend(addon.take());
    if st.addons.iter().any(|a| a.name.is_empty()) {
        return Err(perr(WHAT, "an addon entry has no name"));
    }
    match running {
        Some(true) => Ok(Some(st)),
        Some(false) => Ok(None),
        None => Err(perr(WHAT, "no `microk8s: running:` line")),
    }
}

fn parse_py_bool(v: &str, what: &'static str) -> Result<bool, ParseError> {
    match v {
        "True" | "true" => Ok(true),
        "False" | "false" => Ok(false),
        _ => Err(perr(what, format!("expected True or False, got {v:?}"))),
    }
}

/// One row of the dqlite `.cluster` query (reference A5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DqliteMember {
    pub id: u64,
    /// `ip:19001`.
    pub address: String,
    pub role: DqliteRole,
}

impl DqliteMember {
    /// The IP part of the address, if it parses.
    pub fn ip(&self) -> Option<IpAddr> {
        address_ip(&self.address)
    }
}

/// The IP of an `ip:port` or `[v6]:port` address.
pub fn address_ip(address: &str) -> Option<IpAddr> {
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    address.parse().ok()
}

#[derive(Deserialize)]
struct RawMember {
    #[serde(rename = "ID")]
    id: u64,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Role")]
    role: u64,
}

/// Parses `dqlite … -f json k8s .cluster`: `[{"ID":…,"Address":"ip:19001","Role":0},…]`.
pub fn parse_dqlite_cluster_json(text: &str) -> Result<Vec<DqliteMember>, ParseError> {
    const WHAT: &str = "dqlite .cluster";
    let raw: Vec<RawMember> =
        serde_json::from_str(text.trim()).map_err(|e| perr(WHAT, e.to_string()))?;
    raw.into_iter()
        .map(|m| {
            Ok(DqliteMember {
                id: m.id,
                role: DqliteRole::from_number(m.role)
                    .ok_or_else(|| perr(WHAT, format!("unknown role {}", m.role)))?,
                address: m.address,
            })
        })
        .collect()
}

/// A node's role from its MicroK8s labels (reference A5, PR #2444).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    ControlPlane,
    Worker,
    /// Neither label (e.g. a node added by other means).
    Unlabelled,
}

/// Label carried by control-plane nodes.
pub const CONTROLPLANE_LABEL: &str = "node.kubernetes.io/microk8s-controlplane";
/// Label carried by worker nodes.
pub const WORKER_LABEL: &str = "node.kubernetes.io/microk8s-worker";

/// One Kubernetes Node as `kubectl get nodes -o json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sNode {
    pub name: String,
    pub internal_ip: Option<IpAddr>,
    /// The `Ready` condition is `"True"`.
    pub ready: bool,
    pub role: NodeRole,
    /// Every label the Node carries (`metadata.labels`).
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct NodeList {
    items: Vec<RawNode>,
}
#[derive(Deserialize)]
struct RawNode {
    metadata: RawMeta,
    #[serde(default)]
    status: RawNodeStatus,
}
#[derive(Deserialize)]
struct RawMeta {
    name: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}
#[derive(Deserialize, Default)]
struct RawNodeStatus {
    #[serde(default)]
    addresses: Vec<RawAddress>,
    #[serde(default)]
    conditions: Vec<RawCondition>,
}
#[derive(Deserialize)]
struct RawAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}
#[derive(Deserialize)]
struct RawCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

/// Parses `microk8s kubectl get nodes -o json` (a `v1/List` of Nodes).
pub fn parse_nodes_json(text: &str) -> Result<Vec<K8sNode>, ParseError> {
    let list: NodeList = serde_json::from_str(text.trim())
        .map_err(|e| perr("microk8s kubectl get nodes -o json", e.to_string()))?;
    Ok(list
        .items
        .into_iter()
        .map(|n| {
            let role = if n.metadata.labels.contains_key(CONTROLPLANE_LABEL) {
                NodeRole::ControlPlane
            } else if n.metadata.labels.contains_key(WORKER_LABEL) {
                NodeRole::Worker
            } else {
                NodeRole::Unlabelled
            };
            K8sNode {
                internal_ip: n
                    .status
                    .addresses
                    .iter()
                    .find(|a| a.kind == "InternalIP")
                    .and_then(|a| a.address.parse().ok()),
                ready: n
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.kind == "Ready" && c.status == "True"),
                name: n.metadata.name,
                role,
                labels: n.metadata.labels,
            }
        })
        .collect())
}

/// Parses join.py's line for a non-200 answer, `Connection failed. <error> (<status>).`, into
/// (status, error). The error part may be empty when the agent sent no JSON `error` field.
pub fn parse_join_rejection(text: &str) -> Option<(u16, String)> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("Connection failed."))?
        .trim();
    let rest = line.strip_prefix("Connection failed.")?.trim();
    let rest = rest.strip_suffix('.').unwrap_or(rest).trim_end();
    let open = rest.rfind('(')?;
    let status: u16 = rest[open + 1..].strip_suffix(')')?.trim().parse().ok()?;
    Some((status, rest[..open].trim().to_owned()))
}

/// Parses `status --format pretty` of a ready node (reference A5): `microk8s is running`,
/// `high-availability: yes|no`, the datastore master/standby lines and the addon lists.
/// `Ok(None)` when it does not say `microk8s is running`.
pub fn parse_status_pretty(text: &str) -> Result<Option<RunningStatus>, ParseError> {
    const WHAT: &str = "microk8s status --format pretty";
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    if lines.next().map(str::trim) != Some("microk8s is running") {
        return Ok(None);
    }
    let mut st = RunningStatus::default();
    let mut in_addons: Option<bool> = None;
    for line in lines {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("high-availability:") {
            // "yes" means HA formed; the lock itself is on whenever this line is printed.
            st.ha_enabled = true;
            if !matches!(v.trim(), "yes" | "no") {
                return Err(perr(WHAT, format!("high-availability is {:?}", v.trim())));
            }
        } else if let Some(v) = t.strip_prefix("datastore master nodes:") {
            push_addresses(&mut st, v, DqliteRole::Voter);
        } else if let Some(v) = t.strip_prefix("datastore standby nodes:") {
            push_addresses(&mut st, v, DqliteRole::Standby);
        } else if t == "addons:" {
            in_addons = Some(false);
        } else if t == "enabled:" && in_addons.is_some() {
            in_addons = Some(true);
        } else if t == "disabled:" && in_addons.is_some() {
            in_addons = Some(false);
        } else if let Some(enabled) = in_addons {
            let (name, rest) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
            let repository = rest
                .trim()
                .strip_prefix("# (")
                .and_then(|r| r.split_once(')'))
                .map(|(repo, _)| repo.to_owned());
            st.addons.push(AddonState {
                name: name.to_owned(),
                repository,
                enabled,
            });
        }
    }
    Ok(Some(st))
}

fn push_addresses(st: &mut RunningStatus, list: &str, role: DqliteRole) {
    if list.trim() == "none" {
        return;
    }
    st.datastore
        .extend(list.split_whitespace().map(|a| DatastoreNode {
            address: a.to_owned(),
            role,
        }));
}

/// Checks that `microk8s config` printed a kubeconfig (`kind: Config`, at least one cluster,
/// every cluster naming a `server`) and returns it with one final newline (the wrapper echoes an
/// empty line after the file). The text holds the admin credentials, so errors describe what is
/// wrong without quoting any of it.
pub fn parse_kubeconfig(text: &str) -> Result<String, ParseError> {
    const WHAT: &str = "microk8s config";
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        perr(
            WHAT,
            match e.location() {
                Some(l) => format!("not YAML (line {}, column {})", l.line(), l.column()),
                None => "not YAML".to_owned(),
            },
        )
    })?;
    if doc.get("kind").and_then(|k| k.as_str()) != Some("Config") {
        return Err(perr(WHAT, "not a kubeconfig (no `kind: Config`)"));
    }
    let clusters = doc
        .get("clusters")
        .and_then(|c| c.as_sequence())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| perr(WHAT, "the kubeconfig lists no clusters"))?;
    let named = |c: &serde_yaml::Value| {
        c.get("cluster")
            .and_then(|c| c.get("server"))
            .and_then(|s| s.as_str())
            .is_some_and(|s| !s.trim().is_empty())
    };
    if !clusters.iter().all(named) {
        return Err(perr(WHAT, "a cluster of the kubeconfig names no server"));
    }
    Ok(format!("{}\n", text.trim_end()))
}

/// The cluster agent's certificate fingerprint as `microk8s join` checks it: the lowercase hex
/// SHA-256 of the certificate in DER form (A1: `openssl x509 -in $SNAP_DATA/certs/server.crt
/// -outform der | sha256sum`; A3: `sha256(peer DER cert).hexdigest()`), from the PEM file
/// `server.crt`. The first certificate of the file counts.
pub fn parse_cert_fingerprint(pem: &str) -> Result<String, ParseError> {
    use base64::Engine as _;
    use sha2::Digest as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let what = "cluster agent certificate";
    let start = pem
        .find(BEGIN)
        .ok_or_else(|| perr(what, "no PEM CERTIFICATE block"))?
        + BEGIN.len();
    let len = pem[start..]
        .find(END)
        .ok_or_else(|| perr(what, "PEM CERTIFICATE block is not terminated"))?;
    let body: String = pem[start..start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| perr(what, format!("PEM body is not base64: {e}")))?;
    // A DER certificate is a SEQUENCE (0x30); anything else is not a certificate.
    if der.first() != Some(&0x30) || der.len() < 64 {
        return Err(perr(what, "PEM body is not a DER certificate"));
    }
    Ok(hex::encode(sha2::Sha256::digest(&der)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of `client-x509.config.template` after the snap's `create_kubeconfig_x509`
    /// and the `microk8s config` wrapper (server rewritten to the default interface address,
    /// then an `echo`).
    const CONFIG: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Q0EK\n    server: https://10.0.0.5:16443\n  name: microk8s-cluster\ncontexts:\n- context:\n    cluster: microk8s-cluster\n    user: admin\n  name: microk8s\ncurrent-context: microk8s\nkind: Config\npreferences: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: Q0VSVAo=\n    client-key-data: U0VDUkVUS0VZCg==\n\n";

    #[test]
    fn a_kubeconfig_is_accepted_with_one_final_newline() {
        let k = parse_kubeconfig(CONFIG).unwrap();
        assert!(k.ends_with("U0VDUkVUS0VZCg==\n"), "{k}");
        assert_eq!(k, CONFIG.trim_end().to_owned() + "\n");
    }

    #[test]
    fn other_text_is_refused_without_quoting_it() {
        for (text, want) in [
            (
                "microk8s is not running, try microk8s start\n",
                "kind: Config",
            ),
            (
                "kind: Config\nclusters: []\nusers: [{user: {token: SECRETTOKEN}}]\n",
                "no clusters",
            ),
            (
                "kind: Config\nclusters:\n- cluster: {certificate-authority-data: SECRETTOKEN}\n",
                "names no server",
            ),
            ("kind: Config\nusers: [SECRETTOKEN\n", "not YAML (line"),
        ] {
            let e = parse_kubeconfig(text).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert!(!e.to_string().contains("SECRETTOKEN"), "{e}");
        }
    }
}
