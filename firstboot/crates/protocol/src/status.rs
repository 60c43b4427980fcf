//! The node status document: what `firstboot status` prints, what the coordinator serves as
//! JSON (and as an HTML page), and what `imagebuilder status` aggregates across nodes.
//!
//! It holds no secrets and no tokens: node ids, addresses, phases, roles, MicroK8s membership,
//! addon states, preparation problems and a timeline of this node's phase changes. Times are
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
    }
}
