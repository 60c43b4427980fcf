//! The node status document: what `firstboot status` prints, what the coordinator serves as
//! JSON (and as an HTML page), and what `imagebuilder status` aggregates across nodes.
//!
//! It holds no secrets and no tokens: node ids, addresses, phases, roles, MicroK8s membership,
//! addon states, preparation problems, a timeline of this node's phase changes, and what it
//! refused ([`Rejections`]: discovery's dropped announcements, the coordinator's refusals). Times are
//! seconds since this agent started (monotonic), never wall-clock: Raspberry Pis have no RTC.
//! To add a field, add it here with `#[serde(default)]` so older agents' documents still parse.

use serde::{Deserialize, Serialize};

/// One node's view of itself and the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// firstboot version.
    pub version: String,
    pub node_id: String,
    pub hostname: String,
    /// The address peers reach this node on (announced over mDNS), if known.
    #[serde(default)]
    pub address: Option<String>,
    /// Phase summary: preparing, discovering, waiting, joining, confirming, member.
    pub phase: String,
    /// control-plane / worker once decided.
    #[serde(default)]
    pub role: Option<String>,
    /// The cluster identity this node belongs to or waits for.
    #[serde(default)]
    pub cluster: Option<String>,
    /// The node currently granting join slots, per this node's newest knowledge.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub peers: Vec<PeerRow>,
    /// Cluster members with their roles (from the replicated formation record).
    #[serde(default)]
    pub members: Vec<MemberRow>,
    /// MicroK8s' own view, when this node can ask it.
    #[serde(default)]
    pub microk8s: Option<Microk8sView>,
    #[serde(default)]
    pub addons: Vec<AddonRow>,
    /// Node preparation / hardware problems and their fixes (same length).
    #[serde(default)]
    pub problems: Vec<String>,
    #[serde(default)]
    pub fixes: Vec<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    /// The configured number of control-plane nodes (`cluster.control-plane`), so that
    /// `imagebuilder status` can say "2 of 3" without the config file.
    #[serde(default)]
    pub control_plane_size: Option<u32>,
    /// What this node refused since its agent started.
    #[serde(default)]
    pub rejections: Rejections,
    /// The floating API address (`cluster.api-address`) as this node sees it; `None` when
    /// the cluster has none.
    #[serde(default)]
    pub api_address: Option<ApiAddressView>,
    /// The inventory's Kubernetes labels (`[[nodes]] labels`) as a control-plane member
    /// found and put them on each node; empty on workers and when no node has labels.
    #[serde(default)]
    pub node_labels: Vec<NodeLabelsView>,
    /// The replicated storage's health as this control-plane node reads it (Longhorn); `None`
    /// where it is not read (workers, other storage, before the install).
    #[serde(default)]
    pub storage: Option<StorageHealthView>,
    /// Datastore backups: the newest archive's age and where its copies are; `None` on
    /// workers and before this node is a control-plane member.
    #[serde(default)]
    pub backup: Option<BackupView>,
    /// This node's `microk8s` is the MicroK8s simulator (a QEMU test-cluster image built with
    /// `--microk8s simulated`; the image carries the marker [`SIMULATED_MARKER`]). Shown as
    /// "MicroK8s simulated" wherever the status is.
    #[serde(default)]
    pub microk8s_simulated: bool,
    /// Healing, as the cluster record this node knows says it: the electorate (whose
    /// majority every decision needs; the old one too during a handover) and the members
    /// removed because they were unseen for `cluster.replace-after`, with why. `None` before
    /// the node knows a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healing: Option<HealingView>,
}

/// The record's electorate and removed members (`firstboot`'s formation core).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealingView {
    /// Node ids whose majority every record change needs.
    pub electorate: Vec<String>,
    /// During a handover: the electorate before it (its majority is needed too).
    #[serde(default)]
    pub electorate_old: Option<Vec<String>>,
    /// `cluster.replace-after` in seconds.
    pub replace_after_s: u64,
    /// Members removed, oldest first.
    #[serde(default)]
    pub removed: Vec<RemovedRow>,
}

/// One member the cluster removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedRow {
    pub node_id: String,
    /// `control-plane` or `worker`.
    pub role: String,
    /// Why (e.g. "unseen for 15m00s (replace-after 900s), removed by ...").
    pub reason: String,
    /// The address `microk8s remove-node --force` was given.
    #[serde(default)]
    pub address: Option<String>,
    /// `microk8s remove-node --force` has run.
    pub done: bool,
}

/// The file a QEMU test-cluster image built with the MicroK8s simulator carries (written by
/// `imagebuilder build --microk8s simulated`, never in an image for hardware).
pub const SIMULATED_MARKER: &str = "/etc/rackseed/microk8s-simulated";

/// Whether this machine's MicroK8s is the simulator (the marker file exists).
pub fn microk8s_is_simulated() -> bool {
    std::path::Path::new(SIMULATED_MARKER).exists()
}

/// Datastore backups as one node sees them (`firstboot::backup`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupView {
    /// This node takes the cluster's backups (it is the record's slot authority).
    pub scheduler: bool,
    /// `backup.interval` in seconds.
    pub interval_s: u64,
    /// The newest archive this node holds.
    pub newest: Option<BackupArchiveView>,
    /// Nodes known to hold a copy of the newest archive: this node, plus, on the node that
    /// took it, every control-plane node that acknowledged its copy.
    pub copies: Vec<String>,
    /// Control-plane nodes the newest archive could not be copied to, with the reason.
    pub copy_failures: Vec<String>,
    /// Archives this node holds.
    pub held: u32,
    /// Set while the newest backup is suspect (near-empty compared with the one before it,
    /// MicroK8s #4259/#4308) or the last attempt failed: an alarm, not a success.
    pub alarm: Option<String>,
    /// Seconds (this agent's clock) since the last attempt, and its error if it failed.
    pub last_attempt_s: Option<u64>,
    pub last_error: Option<String>,
}

/// One archive in [`BackupView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupArchiveView {
    pub name: String,
    /// The node that took it.
    pub origin: String,
    /// Unix seconds by the origin's clock (the one wall-clock value here: backups are dated).
    pub created_unix: u64,
    /// Age by this node's clock when the document was made (0 if that clock is behind).
    pub age_s: u64,
    pub size: u64,
    pub keys: u64,
    pub sha256: String,
    /// Why it looks near-empty, if it does.
    pub suspect: Option<String>,
}

/// Replicated storage health: whether it is installed and how its volumes stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageHealthView {
    /// The storage addon, e.g. `longhorn`.
    pub storage: String,
    /// Its helm release is `deployed`.
    pub installed: bool,
    /// `<chart>-<version>` of the release.
    pub chart: Option<String>,
    /// Volumes in all, and those whose replicas are all healthy.
    pub volumes: u32,
    pub healthy: u32,
    /// Volumes running with fewer healthy replicas than wanted (name and wanted count).
    pub degraded: Vec<String>,
    /// Volumes with no healthy replica.
    pub faulted: Vec<String>,
    /// Detached volumes (their robustness is not known while detached).
    pub detached: u32,
    /// What could not be read, or why it is not installed.
    pub problem: Option<String>,
}

impl StorageHealthView {
    /// One line for tables and the page.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {}",
            self.storage,
            if self.installed {
                "installed"
            } else {
                "not installed"
            }
        );
        if let Some(c) = &self.chart {
            s.push_str(&format!(" ({c})"));
        }
        if self.installed {
            s.push_str(&format!(
                ", {} volumes: {} healthy, {} degraded, {} faulted, {} detached",
                self.volumes,
                self.healthy,
                self.degraded.len(),
                self.faulted.len(),
                self.detached
            ));
            for (what, names) in [("degraded", &self.degraded), ("faulted", &self.faulted)] {
                if !names.is_empty() {
                    s.push_str(&format!("; {what}: {}", names.join(", ")));
                }
            }
        }
        if let Some(p) = &self.problem {
            s.push_str(&format!("; {p}"));
        }
        s
    }
}

/// One inventory node's Kubernetes labels: wanted, and whether the Node carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeLabelsView {
    /// The Kubernetes node name (the inventory hostname).
    pub node: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The Node carries every one of them.
    pub applied: bool,
    /// Why not (not joined yet, the label command failed).
    pub problem: Option<String>,
}

impl NodeLabelsView {
    /// One line for tables: `node k=v,k2=v2 (applied)`.
    pub fn summary(&self) -> String {
        let pairs: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let state = match (&self.problem, self.applied) {
            (_, true) => "applied".to_owned(),
            (Some(p), false) => format!("not applied: {p}"),
            (None, false) => "not applied".to_owned(),
        };
        format!("{} {} ({state})", self.node, pairs.join(","))
    }
}

/// The floating API address on one node: whether this node holds it, and keepalived's state.
/// Which node holds it is the one whose document says `held_here`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiAddressView {
    /// The address, once known (`"auto"` is chosen at boot).
    pub address: Option<String>,
    /// This node's interfaces carry the address now.
    pub held_here: bool,
    /// In words: holding, standing by, not a control-plane member, waiting for ...
    pub state: String,
    /// The other control-plane members keepalived exchanges adverts with.
    pub peers: Vec<String>,
    /// Why this node cannot hold the address (keepalived missing, no interface on its subnet).
    pub problem: Option<String>,
    /// The API server's certificate names the address (a fixed address, written into the
    /// launch configuration's `extraSANs` at build); an `"auto"` one is not in it.
    pub in_certificate: bool,
}

/// What this node refused since its agent started: announcements discovery dropped and
/// requests or connections the coordinator refused. Each field is a counter; a document from
/// an agent without this section reads as all zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rejections {
    pub discovery: DiscoveryRejections,
    pub coordinator: CoordinatorRejections,
}

/// Announcements discovery dropped, by reason, and what it forgot to stay bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiscoveryRejections {
    /// Another protocol version (an agent of another release, or a foreign service).
    pub wrong_version: u64,
    /// Another cluster's announcements (another secret).
    pub wrong_cluster: u64,
    pub missing_signature: u64,
    /// Forged or tampered announcements.
    pub bad_signature: u64,
    pub malformed: u64,
    /// Older than one already accepted from that node (a replay).
    pub replayed: u64,
    /// Another machine announcing this node's id.
    pub own_id_conflict: u64,
    /// Unverifiable instances forgotten to keep memory bounded (a flood).
    pub unverified_forgotten: u64,
    /// Times the mDNS cache was emptied because of them.
    pub cache_flushes: u64,
    /// Times mdns-sd ended the subscription (its event queue full) and discovery browsed again.
    pub browse_restarts: u64,
    /// Verified peers refused because the peer table was full.
    pub peers_refused: u64,
}

/// Requests and connections the coordinator refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorRejections {
    /// 401: no or a wrong proof of the cluster secret, or a replayed nonce.
    pub unauthorized: u64,
    /// 400, 404, 405, 413 or 422.
    pub bad_requests: u64,
    /// 503: the agent did not answer in time.
    pub unavailable: u64,
    /// Failed TLS handshakes.
    pub tls_failures: u64,
    /// Connections closed at once (per-address cap, or the server full).
    pub connections_refused: u64,
    /// Request bodies that did not arrive in time.
    pub body_timeouts: u64,
}

impl Rejections {
    /// Every counter as (where, what, count), in a fixed order.
    pub fn rows(&self) -> Vec<(&'static str, &'static str, u64)> {
        let d = &self.discovery;
        let c = &self.coordinator;
        vec![
            ("discovery", "wrong version", d.wrong_version),
            ("discovery", "another cluster", d.wrong_cluster),
            ("discovery", "missing signature", d.missing_signature),
            ("discovery", "bad signature", d.bad_signature),
            ("discovery", "malformed", d.malformed),
            ("discovery", "replayed", d.replayed),
            ("discovery", "our id, another machine", d.own_id_conflict),
            ("discovery", "unverified forgotten", d.unverified_forgotten),
            ("discovery", "mdns cache flushes", d.cache_flushes),
            ("discovery", "mdns re-browses", d.browse_restarts),
            ("discovery", "peers refused (table full)", d.peers_refused),
            ("coordinator", "unauthorized (401)", c.unauthorized),
            ("coordinator", "bad requests", c.bad_requests),
            ("coordinator", "unavailable (503)", c.unavailable),
            ("coordinator", "tls failures", c.tls_failures),
            ("coordinator", "connections refused", c.connections_refused),
            ("coordinator", "body timeouts", c.body_timeouts),
        ]
    }

    /// Every counter added up.
    pub fn total(&self) -> u64 {
        self.rows().iter().map(|(_, _, n)| n).sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub node_id: String,
    pub address: String,
    pub phase: String,
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    pub node_id: String,
    pub role: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Microk8sView {
    pub running: bool,
    /// `ip:19001` of dqlite voters.
    pub voters: Vec<String>,
    #[serde(default)]
    pub standby: Vec<String>,
    /// At least 3 voters (or the configured control-plane size when smaller).
    pub ha: bool,
    /// Quorum lost or not ready, in MicroK8s' words.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonRow {
    pub name: String,
    /// pending, enabling, enabled, failed, manual.
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Seconds since this agent started.
    pub at: f64,
    pub what: String,
}

impl StatusDoc {
    /// True when this node is a member and MicroK8s reports HA.
    pub fn formed(&self) -> bool {
        self.phase == "member" && self.microk8s.as_ref().is_some_and(|m| m.ha)
    }

    /// A plain-text table for terminals.
    pub fn render_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "node      {} ({})", self.node_id, self.hostname);
        let _ = writeln!(s, "address   {}", opt(&self.address));
        let _ = writeln!(s, "phase     {}", self.phase);
        let _ = writeln!(s, "role      {}", opt(&self.role));
        let _ = writeln!(s, "cluster   {}", opt(&self.cluster));
        let _ = writeln!(s, "authority {}", opt(&self.authority));
        if let Some(m) = &self.microk8s {
            let _ = writeln!(
                s,
                "microk8s  {} voters={} standby={} ha={}{}",
                if m.running { "running" } else { "not running" },
                m.voters.len(),
                m.standby.len(),
                if m.ha { "yes" } else { "no" },
                m.note
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
        }
        if let Some(a) = &self.api_address {
            let _ = writeln!(
                s,
                "api addr  {} {}{}",
                opt(&a.address),
                if a.held_here {
                    "held by this node"
                } else {
                    "not held here"
                },
                format!(" ({})", a.state)
                    + &a.problem
                        .as_ref()
                        .map(|p| format!("; PROBLEM: {p}"))
                        .unwrap_or_default()
            );
        }
        if let Some(h) = &self.storage {
            let _ = writeln!(s, "storage   {}", h.summary());
        }
        for l in &self.node_labels {
            let _ = writeln!(s, "labels    {}", l.summary());
        }
        let _ = writeln!(s, "last err  {}", opt(&self.last_error));
        let _ = writeln!(s, "\nPEER              ADDRESS          PHASE       ROLE");
        for p in &self.peers {
            let _ = writeln!(
                s,
                "{:<17} {:<16} {:<11} {}",
                p.node_id,
                p.address,
                p.phase,
                opt(&p.role)
            );
        }
        let _ = writeln!(s, "\nMEMBER            ROLE");
        for m in &self.members {
            let _ = writeln!(s, "{:<17} {}", m.node_id, m.role);
        }
        if !self.addons.is_empty() {
            let _ = writeln!(s, "\nADDON             STATE      REASON");
            for a in &self.addons {
                let _ = writeln!(s, "{:<17} {:<10} {}", a.name, a.state, opt(&a.reason));
            }
        }
        if self.rejections.total() == 0 {
            let _ = writeln!(s, "\nREJECTED          none");
        } else {
            let _ = writeln!(s, "\nREJECTED BY       REASON                      COUNT");
            for (by, what, n) in self.rejections.rows() {
                if n > 0 {
                    let _ = writeln!(s, "{by:<17} {what:<27} {n}");
                }
            }
        }
        for (p, f) in self.problems.iter().zip(&self.fixes) {
            let _ = writeln!(s, "\nproblem: {p}\n    fix: {f}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_documents_without_optional_fields_parse() {
        let doc: StatusDoc = serde_json::from_str(
            r#"{"version":"0.1.0","node_id":"ab","hostname":"n1","phase":"member"}"#,
        )
        .unwrap();
        assert!(!doc.formed());
        let table = doc.render_table();
        assert!(table.contains("phase     member"), "{table}");
        assert_eq!(doc.rejections, Rejections::default());
        assert!(table.contains("REJECTED          none"), "{table}");
    }

    #[test]
    fn the_api_address_survives_json_and_shows_in_the_table() {
        let doc = StatusDoc {
            node_id: "a".into(),
            api_address: Some(ApiAddressView {
                address: Some("10.0.0.100".into()),
                held_here: true,
                state: "holding (keepalived master)".into(),
                peers: vec!["10.0.0.12".into()],
                problem: None,
                in_certificate: true,
            }),
            ..StatusDoc::default()
        };
        let back: StatusDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        let table = doc.render_table();
        assert!(
            table.contains("api addr  10.0.0.100 held by this node (holding (keepalived master))"),
            "{table}"
        );
        let mut missing = doc.clone();
        let view = missing.api_address.as_mut().unwrap();
        view.held_here = false;
        view.problem = Some("keepalived is not installed".into());
        let table = missing.render_table();
        assert!(
            table.contains("not held here")
                && table.contains("PROBLEM: keepalived is not installed"),
            "{table}"
        );
        // Documents of agents without the field parse as no API address.
        let old: StatusDoc = serde_json::from_str(
            r#"{"version":"1","node_id":"a","hostname":"h","phase":"member"}"#,
        )
        .unwrap();
        assert_eq!(old.api_address, None);
    }

    #[test]
    fn rejections_survive_json_and_show_in_the_table() {
        let mut doc = StatusDoc::default();
        doc.rejections.discovery.bad_signature = 4;
        doc.rejections.coordinator.unauthorized = 2;
        let back: StatusDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        assert_eq!(doc.rejections.total(), 6);
        let table = doc.render_table();
        assert!(
            table.contains("discovery         bad signature               4"),
            "{table}"
        );
        assert!(
            table.contains("coordinator       unauthorized (401)          2"),
            "{table}"
        );
        assert!(
            !table.contains("replayed"),
            "zero counters are left out: {table}"
        );
        // A section from a newer agent with counters this one does not know still parses.
        let newer: Rejections =
            serde_json::from_str(r#"{"discovery":{"replayed":3,"future":1},"coordinator":{}}"#)
                .unwrap();
        assert_eq!(newer.discovery.replayed, 3);
    }
}
