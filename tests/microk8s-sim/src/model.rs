//! The simulated cluster's data and the pure rules over it: the replicated [`View`] every member
//! holds (dqlite membership + Kubernetes nodes + addons), role assignment on join (first 3
//! control-plane nodes voters, next 3 standby, then spare; workers are not dqlite members; A5),
//! quorum, standby promotion, and the output renderers (status yaml/pretty/short, dqlite
//! `.cluster` JSON, `kubectl get nodes -o json`) in the reference's formats (A5), and the admin
//! kubeconfig `microk8s config` prints (the snap's `client-x509.config.template` layout).
//!
//! No I/O here; the daemon calls these. To add an output, add a renderer and a unit test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// dqlite's id for the bootstrap node.
pub const BOOTSTRAP_ID: u64 = 3297041220608546238;

/// dqlite role, serialised as dqlite's number (0 voter, 1 standby, 2 spare).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Standby,
    Spare,
}

impl Role {
    pub fn number(self) -> u8 {
        match self {
            Role::Voter => 0,
            Role::Standby => 1,
            Role::Spare => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Standby => "standby",
            Role::Spare => "spare",
        }
    }
}

/// One node known to the cluster: a Kubernetes Node, and a dqlite member unless `role` is None
/// (workers, nodes that left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub id: u64,
    pub role: Option<Role>,
    pub worker: bool,
}

/// An addon's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonRecord {
    pub enabled: bool,
    pub args: Vec<String>,
}

/// A join the cluster is serving (seed accepted it, joiner not done yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub ip: IpAddr,
    pub since_ms: u64,
    /// A worker join (`--worker`): no dqlite membership change.
    #[serde(default)]
    pub worker: bool,
}

/// What every member of one cluster holds; the highest `version` wins on sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub cluster_id: String,
    pub version: u64,
    /// dqlite still bound to 127.0.0.1 (before the first join, A4).
    pub bound: bool,
    pub ha_enabled: bool,
    pub entries: Vec<Entry>,
    pub addons: BTreeMap<String, AddonRecord>,
    /// The joins in flight: one control-plane join alone, or any number of worker joins.
    #[serde(default)]
    pub joining: Vec<InFlight>,
    /// Labels set with `kubectl label node` (besides the ones every node carries), by node name.
    #[serde(default)]
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// The core addons the simulator knows: (name, description).
pub const ADDONS: &[(&str, &str)] = &[
    ("cert-manager", "Cloud native certificate management"),
    ("community", "The community addons repository"),
    ("dashboard", "The Kubernetes dashboard"),
    ("dns", "CoreDNS"),
    ("gpu", "Alias to nvidia add-on"),
    (
        "ha-cluster",
        "Configure high availability on the current node",
    ),
    ("helm", "Helm - the package manager for Kubernetes"),
    ("helm3", "Helm 3 - the package manager for Kubernetes"),
    (
        "host-access",
        "Allow Pods connecting to Host services smoothly",
    ),
    (
        "hostpath-storage",
        "Storage class; allocates storage from host directory",
    ),
    ("ingress", "Ingress controller for external access"),
    ("mayastor", "OpenEBS MayaStor"),
    ("metallb", "Loadbalancer for your Kubernetes cluster"),
    (
        "metrics-server",
        "K8s Metrics Server for API access to service metrics",
    ),
    ("minio", "MinIO object storage"),
    (
        "observability",
        "A lightweight observability stack for logs, traces and metrics",
    ),
    ("rbac", "Role-Based Access Control for authorisation"),
    (
        "registry",
        "Private image registry exposed on localhost:32000",
    ),
    ("rook-ceph", "Distributed Ceph storage using Rook"),
    ("storage", "Alias to hostpath-storage add-on, deprecated"),
];

/// The addon version the simulator reports.
pub const ADDON_VERSION: &str = "1.32.0";

impl View {
    /// A fresh single-node cluster.
    pub fn single(cluster_id: String, name: &str, ip: Option<IpAddr>) -> View {
        let mut addons = BTreeMap::new();
        addons.insert(
            "ha-cluster".to_owned(),
            AddonRecord {
                enabled: true,
                args: vec![],
            },
        );
        View {
            cluster_id,
            version: 1,
            bound: false,
            ha_enabled: true,
            entries: vec![Entry {
                name: name.to_owned(),
                ip,
                id: BOOTSTRAP_ID,
                role: Some(Role::Voter),
                worker: false,
            }],
            addons,
            joining: Vec::new(),
            node_labels: BTreeMap::new(),
        }
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn entry_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.name == name)
    }

    /// The dqlite address of an entry as members see it.
    pub fn address(&self, e: &Entry) -> String {
        match (self.bound, e.ip) {
            (true, Some(ip)) => format!("{ip}:19001"),
            _ => "127.0.0.1:19001".to_owned(),
        }
    }

    /// dqlite members in join order.
    pub fn members(&self) -> impl Iterator<Item = (&Entry, Role)> {
        self.entries.iter().filter_map(|e| e.role.map(|r| (e, r)))
    }

    fn count(&self, role: Role) -> usize {
        self.members().filter(|(_, r)| *r == role).count()
    }

    /// The role a new control-plane member gets (A5).
    pub fn next_role(&self) -> Role {
        if self.count(Role::Voter) < 3 {
            Role::Voter
        } else if self.count(Role::Standby) < 3 {
            Role::Standby
        } else {
            Role::Spare
        }
    }

    /// Whether a majority of voters is alive.
    pub fn quorum(&self, alive: &BTreeSet<String>) -> bool {
        let voters: Vec<&Entry> = self
            .members()
            .filter(|(_, r)| *r == Role::Voter)
            .map(|(e, _)| e)
            .collect();
        let up = voters.iter().filter(|e| alive.contains(&e.name)).count();
        up * 2 > voters.len()
    }

    /// dqlite's role adjustment, run by the lowest-id live voter while quorum holds: a dead
    /// voter is demoted to spare when a live standby/spare can take its place, and standbys are
    /// refilled from live spares. Returns whether anything changed.
    pub fn rebalance(&mut self, alive: &BTreeSet<String>) -> bool {
        if !self.quorum(alive) {
            return false;
        }
        let mut changed = false;
        loop {
            let dead = self
                .entries
                .iter()
                .position(|e| e.role == Some(Role::Voter) && !alive.contains(&e.name));
            let cand = self.entries.iter().position(|e| {
                matches!(e.role, Some(Role::Standby) | Some(Role::Spare)) && alive.contains(&e.name)
            });
            match (dead, cand) {
                (Some(d), Some(c)) => {
                    self.entries[d].role = Some(Role::Spare);
                    self.entries[c].role = Some(Role::Voter);
                    changed = true;
                }
                _ => break,
            }
        }
        while self.count(Role::Standby) < 3 {
            let Some(s) = self
                .entries
                .iter()
                .position(|e| e.role == Some(Role::Spare) && alive.contains(&e.name))
            else {
                break;
            };
            self.entries[s].role = Some(Role::Standby);
            changed = true;
        }
        if changed {
            self.version += 1;
        }
        changed
    }

    /// Addon enabled?
    pub fn addon_enabled(&self, name: &str) -> bool {
        self.addons.get(name).is_some_and(|a| a.enabled)
    }
}

/// `status --format yaml` of a ready node (A5 format).
pub fn render_status_yaml(v: &View) -> String {
    let mut s = String::from("microk8s:\n  running: True\nhigh-availability:\n");
    s.push_str(&format!(
        "  enabled: {}\n  nodes:\n",
        if v.ha_enabled { "True" } else { "False" }
    ));
    for (e, r) in v.members() {
        s.push_str(&format!(
            "    - address: {}\n      role: {}\n",
            v.address(e),
            r.name()
        ));
    }
    s.push_str("addons:\n");
    for (name, desc) in ADDONS {
        s.push_str(&format!(
            "  - name: {name}\n    repository: core\n    description: {desc}\n    version: {ADDON_VERSION}\n    status: {}\n",
            if v.addon_enabled(name) { "enabled" } else { "disabled" }
        ));
        s.push_str(&addon_args_line(v, name));
    }
    s
}

/// Not in MicroK8s' output: the arguments an enabled addon was enabled with (from the launch
/// configuration or `microk8s enable`), as one flow-sequence line `    args: ["…"]` that
/// MicroK8s-format parsers skip. Real MicroK8s shows them only inside the addon's objects (dns:
/// the `forward . <nameservers>` line of the `coredns` ConfigMap's Corefile). Empty when the
/// addon is disabled or had no arguments.
pub fn addon_args_line(v: &View, name: &str) -> String {
    match v.addons.get(name) {
        Some(a) if a.enabled && !a.args.is_empty() => {
            let list: Vec<String> = a
                .args
                .iter()
                .map(|x| serde_json::Value::String(x.clone()).to_string())
                .collect();
            format!("    args: [{}]\n", list.join(", "))
        }
        _ => String::new(),
    }
}

/// `status --format yaml` of a node that is not ready.
pub fn render_not_ready_yaml() -> String {
    "microk8s:\n  running: False\n  message: microk8s is not running. Use microk8s inspect for a deeper inspection.\n".into()
}

fn ha_lines(v: &View) -> String {
    let list = |role: Role| {
        let l: Vec<String> = v
            .members()
            .filter(|(_, r)| *r == role)
            .map(|(e, _)| v.address(e))
            .collect();
        if l.is_empty() {
            "none".to_owned()
        } else {
            l.join(" ")
        }
    };
    format!(
        "high-availability: {}\n  datastore master nodes: {}\n  datastore standby nodes: {}\n",
        if v.count(Role::Voter) > 2 {
            "yes"
        } else {
            "no"
        },
        list(Role::Voter),
        list(Role::Standby)
    )
}

/// `status --format pretty` of a ready node (A5 format).
pub fn render_status_pretty(v: &View) -> String {
    let mut s = format!("microk8s is running\n{}addons:\n  enabled:\n", ha_lines(v));
    let line = |name: &str, desc: &str| format!("    {name:<20} # (core) {desc}\n");
    for (n, d) in ADDONS.iter().filter(|(n, _)| v.addon_enabled(n)) {
        s.push_str(&line(n, d));
    }
    s.push_str("  disabled:\n");
    for (n, d) in ADDONS.iter().filter(|(n, _)| !v.addon_enabled(n)) {
        s.push_str(&line(n, d));
    }
    s
}

/// `status --format short` (the default) of a ready node.
pub fn render_status_short(v: &View) -> String {
    let mut s = format!("microk8s is running\n{}addons:\n", ha_lines(v));
    for (n, _) in ADDONS {
        s.push_str(&format!(
            "core/{n}: {}\n",
            if v.addon_enabled(n) {
                "enabled"
            } else {
                "disabled"
            }
        ));
    }
    s
}

/// The dqlite `.cluster` query in JSON (A5).
pub fn render_dqlite_json(v: &View) -> String {
    let rows: Vec<serde_json::Value> = v
        .members()
        .map(|(e, r)| serde_json::json!({"ID": e.id, "Address": v.address(e), "Role": r.number()}))
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// `kubectl get nodes -o json`: a v1 List of Nodes with the MicroK8s role labels (A5).
pub fn render_nodes_json(v: &View, alive: &BTreeSet<String>) -> String {
    let items: Vec<serde_json::Value> = v
        .entries
        .iter()
        .map(|e| {
            let (label, value) = if e.worker {
                ("node.kubernetes.io/microk8s-worker", "microk8s-worker")
            } else {
                ("node.kubernetes.io/microk8s-controlplane", "microk8s-controlplane")
            };
            let mut addresses = vec![serde_json::json!({"type": "Hostname", "address": e.name})];
            if let Some(ip) = e.ip {
                addresses.insert(0, serde_json::json!({"type": "InternalIP", "address": ip.to_string()}));
            }
            let ready = if alive.contains(&e.name) {
                serde_json::json!({"type": "Ready", "status": "True", "reason": "KubeletReady"})
            } else {
                serde_json::json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"})
            };
            let mut labels = serde_json::Map::new();
            for (k, v) in v.node_labels.get(&e.name).into_iter().flatten() {
                labels.insert(k.clone(), serde_json::json!(v));
            }
            labels.insert("kubernetes.io/hostname".into(), serde_json::json!(e.name));
            labels.insert("microk8s.io/cluster".into(), serde_json::json!("true"));
            labels.insert(label.into(), serde_json::json!(value));
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": e.name,
                    "labels": labels
                },
                "status": {"addresses": addresses, "conditions": [ready]}
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": {"resourceVersion": ""}
    }))
    .expect("json values serialise")
}

/// The admin kubeconfig as `microk8s config` prints it: the snap's x509 client template filled
/// in by `create_kubeconfig_x509` (CA, admin certificate and key as base64), `127.0.0.1`
/// replaced by `server_host`, then the wrapper's `echo` (an empty last line). There are no real
/// certificates: the data are base64 of PEM-looking text naming the cluster (`ca_of`, so every
/// control-plane node of one cluster shows the same CA) and the node (each node signs its own
/// admin certificate when it joins).
pub fn render_kubeconfig(server_host: &str, ca_of: &str, node: &str) -> String {
    use base64::Engine as _;
    let b64 = |what: &str, body: String| {
        base64::engine::general_purpose::STANDARD.encode(format!(
            "-----BEGIN {what}-----\n{body}\n-----END {what}-----\n"
        ))
    };
    let ca = b64("CERTIFICATE", format!("simulated CA of cluster {ca_of}"));
    let cert = b64(
        "CERTIFICATE",
        format!("simulated admin certificate of {node}"),
    );
    let key = b64("RSA PRIVATE KEY", format!("simulated admin key of {node}"));
    let mut s = String::from("apiVersion: v1\nclusters:\n- cluster:\n");
    s.push_str(&format!("    certificate-authority-data: {ca}\n"));
    s.push_str(&format!("    server: https://{server_host}:16443\n"));
    s.push_str("  name: microk8s-cluster\ncontexts:\n- context:\n    cluster: microk8s-cluster\n");
    s.push_str("    user: admin\n  name: microk8s\ncurrent-context: microk8s\nkind: Config\n");
    s.push_str("preferences: {}\nusers:\n- name: admin\n  user:\n");
    s.push_str(&format!(
        "    client-certificate-data: {cert}\n    client-key-data: {key}\n\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(name: &str, d: u8, role: Role) -> Entry {
        Entry {
            name: name.into(),
            ip: Some(IpAddr::from([10, 0, 0, d])),
            id: d as u64,
            role: Some(role),
            worker: false,
        }
    }

    fn alive(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn four() -> View {
        let mut v = View::single("c".into(), "a", None);
        v.bound = true;
        v.entries = vec![
            cp("a", 1, Role::Voter),
            cp("b", 2, Role::Voter),
            cp("c", 3, Role::Voter),
            cp("d", 4, Role::Standby),
        ];
        v
    }

    #[test]
    fn roles_fill_voters_then_standby_then_spare() {
        let mut v = View::single("c".into(), "a", None);
        let mut roles = vec![];
        for i in 0..7 {
            let r = v.next_role();
            roles.push(r);
            v.entries.push(cp(&format!("n{i}"), i as u8 + 2, r));
        }
        use Role::*;
        assert_eq!(
            roles,
            [Voter, Voter, Standby, Standby, Standby, Spare, Spare]
        );
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_live_standby() {
        let mut v = four();
        assert!(v.rebalance(&alive(&["a", "b", "d"])));
        assert_eq!(v.entry("c").unwrap().role, Some(Role::Spare));
        assert_eq!(v.entry("d").unwrap().role, Some(Role::Voter));
    }

    #[test]
    fn quorum_needs_a_majority_of_voters() {
        let v = four();
        assert!(v.quorum(&alive(&["a", "b"])));
        assert!(!v.quorum(&alive(&["a", "d"])));
        let mut v = four();
        assert!(
            !v.rebalance(&alive(&["a", "d"])),
            "no changes without quorum"
        );
    }

    #[test]
    fn outputs_follow_the_reference_formats() {
        let v = four();
        let y = render_status_yaml(&v);
        assert!(y.starts_with("microk8s:\n  running: True\nhigh-availability:\n  enabled: True\n  nodes:\n    - address: 10.0.0.1:19001\n      role: voter\n"), "{y}");
        let p = render_status_pretty(&v);
        assert!(p.contains("high-availability: yes\n  datastore master nodes: 10.0.0.1:19001 10.0.0.2:19001 10.0.0.3:19001\n  datastore standby nodes: 10.0.0.4:19001\n"), "{p}");
        let j: serde_json::Value = serde_json::from_str(&render_dqlite_json(&v)).unwrap();
        assert_eq!(j[3]["Role"], 1);
        assert_eq!(j[0]["Address"], "10.0.0.1:19001");
    }

    #[test]
    fn the_kubeconfig_is_a_kubeconfig_naming_the_server_and_the_cluster_ca() {
        let a = render_kubeconfig("10.0.0.1", "c1", "a");
        let b = render_kubeconfig("10.0.0.2", "c1", "b");
        let y: serde_yaml::Value = serde_yaml::from_str(&a).unwrap();
        assert_eq!(y["kind"], "Config");
        assert_eq!(
            y["clusters"][0]["cluster"]["server"],
            "https://10.0.0.1:16443"
        );
        assert_eq!(y["users"][0]["name"], "admin");
        assert!(a.ends_with("\n\n"), "the wrapper's echo");
        let ca = |k: &str| {
            serde_yaml::from_str::<serde_yaml::Value>(k).unwrap()["clusters"][0]["cluster"]
                ["certificate-authority-data"]
                .clone()
        };
        assert_eq!(ca(&a), ca(&b));
        assert_ne!(ca(&a), ca(&render_kubeconfig("10.0.0.1", "c2", "a")));
    }
}
