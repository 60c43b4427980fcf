//! `imagebuilder status`: watch a cluster form from the workstation.
//!
//! The workstation holds the cluster secret (the same file that went into the images). It
//! browses mDNS with [`rackseed_protocol::discovery::Discovery`] without announcing anything, so it only
//! sees nodes whose announcements verify under that secret. For every such node it reads the
//! status document ([`StatusDoc`]) over the node's coordinator: TLS pinned to the fingerprint
//! from the signed announcement, request signed with the challenge-response HMAC. A machine
//! that forges an A record cannot present the pinned certificate, so a forged address fails
//! closed (shown as "unreachable").
//!
//! The verdict is one line from [`summarize`], a pure function of what was collected
//! ("HA formed: 3 voters, 2 workers; metallb enabled", "not formed: 2 of 3 control-plane
//! members; waiting for node-c (joining)"). [`watch`] prints a table of the nodes (redrawn in
//! place on a terminal, appended when it changed otherwise) or, with `json`, one
//! [`ClusterReport`] at the end; with `wait` it keeps refreshing until the cluster is
//! [settled](Summary::settled) or the timeout passes.
//!
//! Node-supplied strings are printed only after [`terminal_safe`] removed control characters,
//! so a hostile host name cannot drive the terminal.
//!
//! To show a new column: add it to [`NodeReport`] (it then appears in the JSON too) and to
//! [`render_table`]. To refine the verdict: change [`summarize`] and its fixture tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rackseed_config::Role;
use rackseed_formation::{Announcement, PhaseSummary};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::discovery::{
    Discovery, DiscoveryConfig, DiscoveryStats, InterfaceChoice, Peer, PeerEvent,
};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;
use serde::Serialize;
use tokio::sync::mpsc;

/// Control-plane size assumed when neither the config nor any node says.
pub const DEFAULT_CONTROL_PLANE: u32 = 3;

/// A node of this cluster seen over mDNS (its announcement verified under the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnouncedNode {
    pub node_id: String,
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub fingerprint: String,
    /// Announced phase, long name (`None` when absent or unknown).
    pub phase: Option<String>,
    /// Announced role, long name.
    pub role: Option<String>,
}

impl AnnouncedNode {
    /// Reads the announcement with the formation core's own decoder
    /// ([`Announcement::from_txt`], with the id discovery verified); a record it cannot read
    /// (e.g. a newer format) is still listed, with no phase and no role.
    pub fn from_peer(p: &Peer) -> Self {
        let ann = match Announcement::from_txt(&p.node_id, &p.fields) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::debug!(node = %p.node_id, error = %e, "announcement not understood");
                None
            }
        };
        AnnouncedNode {
            node_id: p.node_id.clone(),
            addresses: p.addrs.clone(),
            port: p.port,
            fingerprint: p.fingerprint.clone(),
            phase: ann.as_ref().map(|a| a.phase.name().to_owned()),
            role: ann.and_then(|a| a.role).map(|r| r.name().to_owned()),
        }
    }

    /// A member that announces the control-plane role.
    pub fn is_control_plane_member(&self) -> bool {
        self.phase.as_deref() == Some(PhaseSummary::Member.name())
            && self.role.as_deref() == Some(Role::ControlPlane.name())
    }
}

/// What the workstation knows about one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeReport {
    pub node_id: String,
    /// The address its coordinator answered on, else the first announced one.
    pub address: Option<IpAddr>,
    pub announced: AnnouncedNode,
    /// Its status document, when the coordinator answered.
    pub status: Option<StatusDoc>,
    /// Why the status document could not be read.
    pub error: Option<String>,
}

impl NodeReport {
    /// Phase from the status document, else the announced one.
    pub fn phase(&self) -> Option<&str> {
        self.status
            .as_ref()
            .map(|d| d.phase.as_str())
            .or(self.announced.phase.as_deref())
    }

    pub fn role(&self) -> Option<&str> {
        match &self.status {
            Some(d) => d.role.as_deref(),
            None => self.announced.role.as_deref(),
        }
    }
}

/// What the caller knows beyond the nodes' own documents (from the config file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Configured control-plane size.
    pub control_plane: Option<u32>,
    /// How many nodes must be seen before the cluster counts as settled.
    pub nodes: Option<usize>,
}

/// The verdict over all collected nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// MicroK8s reports HA on a member.
    pub formed: bool,
    /// Formed, every node seen is a reachable member, the expected number of nodes is seen,
    /// and no addon is still pending or being enabled: nothing more will happen by itself.
    pub settled: bool,
    pub line: String,
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How far an addon state is: the most advanced report across nodes wins.
fn addon_rank(state: &str) -> u8 {
    match state {
        "enabled" => 5,
        "failed" => 4,
        "manual" => 3,
        "enabling" => 2,
        "pending" => 1,
        _ => 0,
    }
}

/// Summarises the nodes' documents into one line. Pure; see the module docs.
pub fn summarize(nodes: &[NodeReport], expect: Expectations) -> Summary {
    if nodes.is_empty() {
        return Summary {
            formed: false,
            settled: false,
            line: "not formed: no nodes of this cluster found".into(),
        };
    }
    let docs: Vec<&StatusDoc> = nodes.iter().filter_map(|n| n.status.as_ref()).collect();
    let cp_target = expect
        .control_plane
        .or_else(|| docs.iter().filter_map(|d| d.control_plane_size).max())
        .unwrap_or(DEFAULT_CONTROL_PLANE) as usize;

    let members = member_roles(&docs);
    let control_plane = members.values().filter(|r| **r == "control-plane").count();
    let workers = members.values().filter(|r| **r == "worker").count();
    let voters = docs
        .iter()
        .filter_map(|d| d.microk8s.as_ref())
        .map(|m| m.voters.len())
        .max()
        .unwrap_or(0);
    let formed = docs.iter().any(|d| d.formed());
    let waiting = waiting_for(nodes, expect);

    let addons = addon_states(&docs);
    let addons_busy = addons
        .values()
        .any(|s| matches!(*s, "pending" | "enabling"));
    let addon_text = addons
        .iter()
        .map(|(n, s)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ");

    let mut line = if formed {
        formed_headline(voters, workers)
    } else {
        not_formed_headline(control_plane, cp_target, voters)
    };
    if !waiting.is_empty() {
        line.push_str("; waiting for ");
        line.push_str(&waiting.join(", "));
    } else if !formed {
        if control_plane < cp_target {
            line.push_str("; waiting for more nodes to appear");
        } else {
            line.push_str("; waiting for MicroK8s to report HA");
        }
    }
    if !addon_text.is_empty() {
        line.push_str("; ");
        line.push_str(&addon_text);
    }
    if let Some(api) = api_address_text(nodes) {
        line.push_str("; ");
        line.push_str(&api);
    }
    Summary {
        formed,
        settled: formed && waiting.is_empty() && !addons_busy,
        line,
    }
}

/// Who holds the floating API address, from the documents that report one: "API address
/// A held by n1", "held by nobody", "held by n1 and n2" (never normal), and the nodes that
/// cannot hold it and why. `None` when no document mentions one.
fn api_address_text(nodes: &[NodeReport]) -> Option<String> {
    let views: Vec<(&str, &rackseed_protocol::status::ApiAddressView)> = nodes
        .iter()
        .filter_map(|n| Some((n.node_id.as_str(), n.status.as_ref()?.api_address.as_ref()?)))
        .collect();
    if views.is_empty() {
        return None;
    }
    let address = views
        .iter()
        .find_map(|(_, v)| v.address.clone())
        .unwrap_or_else(|| "(not chosen yet)".into());
    let holders: Vec<&str> = views
        .iter()
        .filter(|(_, v)| v.held_here)
        .map(|(id, _)| *id)
        .collect();
    let mut text = match holders.as_slice() {
        [] => format!("API address {address} held by nobody"),
        [one] => format!("API address {address} held by {one}"),
        many => format!(
            "API address {address} held by {} nodes at once ({})",
            many.len(),
            many.join(", ")
        ),
    };
    for (id, v) in &views {
        if let Some(p) = &v.problem {
            text.push_str(&format!("; {id} cannot hold it: {p}"));
        }
    }
    Some(text)
}

/// Maps node id to role: every document's member list, plus nodes that say they are one.
fn member_roles<'a>(docs: &[&'a StatusDoc]) -> BTreeMap<&'a str, &'a str> {
    let mut members: BTreeMap<&str, &str> = BTreeMap::new();
    for d in docs {
        for m in &d.members {
            members.insert(&m.node_id, &m.role);
        }
        if d.phase == "member" {
            if let Some(r) = &d.role {
                members.entry(&d.node_id).or_insert(r);
            }
        }
    }
    members
}

/// Lists who is not there yet: unreachable and non-member nodes, and expected nodes not seen.
fn waiting_for(nodes: &[NodeReport], expect: Expectations) -> Vec<String> {
    let mut waiting: Vec<String> = Vec::new();
    for n in nodes {
        let is_member = match &n.status {
            Some(d) => d.phase == "member",
            None => false,
        };
        if n.error.is_some() {
            waiting.push(format!("{} (unreachable)", n.node_id));
        } else if !is_member {
            waiting.push(format!(
                "{} ({})",
                n.node_id,
                n.phase().unwrap_or("phase unknown")
            ));
        }
    }
    let too_few = expect.nodes.filter(|want| nodes.len() < *want);
    if let Some(want) = too_few {
        waiting.push(format!(
            "{} more of {want} expected nodes to appear",
            want - nodes.len()
        ));
    }
    waiting
}

/// Maps each addon name to the most advanced state any node reports for it.
fn addon_states<'a>(docs: &[&'a StatusDoc]) -> BTreeMap<&'a str, &'a str> {
    let mut addons: BTreeMap<&str, &str> = BTreeMap::new();
    for d in docs {
        for a in &d.addons {
            let e = addons.entry(&a.name).or_insert(&a.state);
            if addon_rank(&a.state) > addon_rank(e) {
                *e = &a.state;
            }
        }
    }
    addons
}

/// Formats the verdict's start for a formed cluster ("HA formed: 3 voters, no workers").
fn formed_headline(voters: usize, workers: usize) -> String {
    format!(
        "HA formed: {}, {}",
        plural(voters, "voter", "voters"),
        if workers == 0 {
            "no workers".to_string()
        } else {
            plural(workers, "worker", "workers")
        }
    )
}

/// Formats the verdict's start for a cluster not formed yet (members, then voters once enough).
fn not_formed_headline(control_plane: usize, cp_target: usize, voters: usize) -> String {
    let mut l = format!("not formed: {control_plane} of {cp_target} control-plane members");
    if control_plane >= cp_target {
        l.push_str(&format!(
            ", {} of {cp_target} MicroK8s voters",
            voters.min(cp_target)
        ));
    }
    l
}

/// Everything `imagebuilder status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterReport {
    pub formed: bool,
    pub settled: bool,
    pub summary: String,
    pub nodes: Vec<NodeReport>,
    /// Announcements dropped by discovery (e.g. another cluster's, or forged).
    pub ignored_announcements: u64,
}

/// Replaces control characters (terminal escapes) with `?`.
pub fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn cut(s: &str, max: usize) -> String {
    let s = terminal_safe(s);
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(3)).collect();
        t.push_str("...");
        t
    }
}

/// The table shown by `imagebuilder status` (node, IP, phase, role, last error) and the
/// summary line.
pub fn render_table(report: &ClusterReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<16} {:<12} {:<14} LAST ERROR",
        "NODE", "IP", "PHASE", "ROLE"
    );
    for n in &report.nodes {
        let err = n
            .error
            .as_deref()
            .map(|e| format!("unreachable: {e}"))
            .or_else(|| n.status.as_ref().and_then(|d| d.last_error.clone()))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<24} {:<16} {:<12} {:<14} {}",
            cut(&n.node_id, 24),
            n.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            cut(n.phase().unwrap_or("?"), 12),
            cut(n.role().unwrap_or("-"), 14),
            cut(&err, 100)
        );
    }
    let _ = writeln!(s, "{}", terminal_safe(&report.summary));
    s
}

/// The cluster secret and what the config says to expect, from `--config` and/or `--secret`
/// (`--secret` wins for the secret; the config's `secret-file` is used otherwise).
pub fn load_access(
    config: Option<&std::path::Path>,
    secret: Option<&std::path::Path>,
) -> Result<(ClusterSecret, Expectations)> {
    let mut expect = Expectations::default();
    let mut secret_file = secret.map(std::path::Path::to_path_buf);
    if let Some(path) = config {
        // Each diagnostic names the file, line and field.
        let loaded = rackseed_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = &loaded.config.cluster;
        expect.control_plane = Some(u32::from(c.control_plane));
        expect.nodes = Some(c.expected_nodes as usize);
        if secret_file.is_none() {
            secret_file = Some(c.secret_file.clone());
        }
    }
    let Some(secret_file) = secret_file else {
        anyhow::bail!("name the cluster with --config CONFIG or --secret FILE");
    };
    let secret = ClusterSecret::load(&secret_file)
        .context("reading the cluster secret (the file that went into the images)")?;
    Ok((secret, expect))
}

/// Browses the cluster's announcements without announcing anything.
pub struct ClusterBrowser {
    discovery: Discovery,
    events: mpsc::Receiver<PeerEvent>,
    peers: BTreeMap<String, Peer>,
}

impl ClusterBrowser {
    /// Starts browsing. Must run inside a tokio runtime.
    pub fn start(secret: &ClusterSecret, interfaces: InterfaceChoice) -> Result<Self> {
        let mut id = [0u8; 4];
        rand::fill(&mut id);
        // Our own id must not collide with a node's: a random one, and we never announce it.
        let node_id = format!("imagebuilder-{}", hex::encode(id));
        let mut cfg = DiscoveryConfig::new(secret.clone(), &node_id, 1, &"0".repeat(64));
        cfg.interfaces = interfaces;
        let (discovery, events) = Discovery::start(cfg).context("starting mDNS discovery")?;
        Ok(ClusterBrowser {
            discovery,
            events,
            peers: BTreeMap::new(),
        })
    }

    fn apply(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Seen(p) | PeerEvent::Updated(p) => {
                self.peers.insert(p.node_id.clone(), p);
            }
            PeerEvent::Lost { node_id } => {
                self.peers.remove(&node_id);
            }
        }
    }

    /// Takes in every event that arrived so far.
    pub fn drain(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.apply(ev);
        }
    }

    /// Collects events for `d`.
    pub async fn collect_for(&mut self, d: Duration) {
        self.collect_until(d, |_| false).await;
    }

    /// Collects events for at most `d`, returning early once `enough` holds for the number of
    /// nodes seen.
    pub async fn collect_until(&mut self, d: Duration, enough: impl Fn(usize) -> bool) {
        let end = tokio::time::Instant::now() + d;
        while !enough(self.peers.len()) {
            match tokio::time::timeout_at(end, self.events.recv()).await {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// The verified nodes currently seen, by node id.
    pub fn nodes(&self) -> Vec<AnnouncedNode> {
        self.peers.values().map(AnnouncedNode::from_peer).collect()
    }

    pub fn stats(&self) -> DiscoveryStats {
        self.discovery.stats()
    }
}

/// The client the workstation signs requests with.
pub fn workstation_client(secret: &ClusterSecret, timeout: Duration) -> CoordinatorClient {
    CoordinatorClient::new(secret, "imagebuilder").with_timeout(timeout)
}

/// Reads one node's status document, trying its announced addresses in order.
pub async fn fetch_status(client: &CoordinatorClient, node: &AnnouncedNode) -> NodeReport {
    let mut errors = Vec::new();
    for ip in &node.addresses {
        let peer = SocketAddr::new(*ip, node.port);
        match client.status(peer, &node.fingerprint).await {
            Ok(v) => match serde_json::from_value::<StatusDoc>(v) {
                Ok(doc) => {
                    return NodeReport {
                        node_id: node.node_id.clone(),
                        address: Some(*ip),
                        announced: node.clone(),
                        status: Some(doc),
                        error: None,
                    }
                }
                Err(e) => errors.push(format!("{peer}: unreadable status document: {e}")),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        errors.push("no address announced".into());
    }
    NodeReport {
        node_id: node.node_id.clone(),
        address: node.addresses.first().copied(),
        announced: node.clone(),
        status: None,
        error: Some(errors.join("; ")),
    }
}

/// Reads every node's status document concurrently.
pub async fn fetch_all(
    client: &Arc<CoordinatorClient>,
    nodes: Vec<AnnouncedNode>,
) -> Vec<NodeReport> {
    let mut set = tokio::task::JoinSet::new();
    for n in nodes {
        let client = client.clone();
        set.spawn(async move { fetch_status(&client, &n).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    out
}

/// Options of [`watch`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub secret: ClusterSecret,
    pub interfaces: InterfaceChoice,
    pub expect: Expectations,
    /// How long to browse before the first report (less once `expect.nodes` are seen).
    pub discover_for: Duration,
    /// Pause between refreshes with `wait`.
    pub refresh: Duration,
    /// Keep refreshing until settled or `timeout`.
    pub wait: bool,
    pub timeout: Duration,
    /// Print one JSON report at the end instead of tables.
    pub json: bool,
    /// Redraw the table in place (stdout is a terminal).
    pub tty: bool,
    /// Per-request timeout of the coordinator client.
    pub request_timeout: Duration,
}

impl WatchOptions {
    pub fn new(secret: ClusterSecret) -> Self {
        WatchOptions {
            secret,
            interfaces: InterfaceChoice::Auto,
            expect: Expectations::default(),
            discover_for: Duration::from_secs(3),
            refresh: Duration::from_secs(2),
            wait: false,
            timeout: Duration::from_secs(20 * 60),
            json: false,
            tty: false,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Discovers the cluster, reads every node's status and prints it to `out` (see the module
/// docs). Returns the last report; with `wait`, an unsettled report means the timeout passed.
pub async fn watch(opts: &WatchOptions, out: &mut dyn Write) -> Result<ClusterReport> {
    let deadline = Instant::now() + opts.timeout;
    let mut browser = ClusterBrowser::start(&opts.secret, opts.interfaces.clone())?;
    let client = Arc::new(workstation_client(&opts.secret, opts.request_timeout));
    let want = opts.expect.nodes;
    browser
        .collect_until(opts.discover_for.min(opts.timeout), |n| {
            want.is_some_and(|w| n >= w)
        })
        .await;
    // Answers to one query arrive together: a moment more catches nodes beyond the expected.
    browser.collect_for(Duration::from_millis(500)).await;
    let mut drawn_lines = 0usize;
    let mut last_table = String::new();
    loop {
        browser.drain();
        let nodes = fetch_all(&client, browser.nodes()).await;
        let summary = summarize(&nodes, opts.expect);
        let report = ClusterReport {
            formed: summary.formed,
            settled: summary.settled,
            summary: summary.line,
            nodes,
            ignored_announcements: browser.stats().dropped(),
        };
        if !opts.json {
            let table = render_table(&report);
            if opts.tty {
                if drawn_lines > 0 {
                    // Up to the first line of the previous table, then clear to the end.
                    write!(out, "\x1b[{drawn_lines}F\x1b[J")?;
                }
                out.write_all(table.as_bytes())?;
                drawn_lines = table.lines().count();
            } else if table != last_table {
                if !last_table.is_empty() {
                    writeln!(out)?;
                }
                out.write_all(table.as_bytes())?;
            }
            out.flush()?;
            last_table = table;
        }
        let done = !opts.wait || report.settled || Instant::now() >= deadline;
        if done {
            if opts.json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
                out.flush()?;
            }
            return Ok(report);
        }
        let pause = opts
            .refresh
            .min(deadline.saturating_duration_since(Instant::now()));
        browser.collect_for(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackseed_protocol::status::{AddonRow, MemberRow, Microk8sView};

    fn announced(id: &str, phase: &str, role: Option<&str>) -> AnnouncedNode {
        AnnouncedNode {
            node_id: id.into(),
            addresses: vec![],
            port: 7443,
            fingerprint: "0".repeat(64),
            phase: Some(phase.into()),
            role: role.map(str::to_string),
        }
    }

    fn member_doc(id: &str, role: &str, members: &[(&str, &str)], voters: usize) -> StatusDoc {
        StatusDoc {
            node_id: id.into(),
            phase: "member".into(),
            role: Some(role.into()),
            members: members
                .iter()
                .map(|(n, r)| MemberRow {
                    node_id: n.to_string(),
                    role: r.to_string(),
                })
                .collect(),
            microk8s: Some(Microk8sView {
                running: true,
                voters: (0..voters).map(|i| format!("10.0.0.{i}:19001")).collect(),
                ha: voters >= 3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(doc: StatusDoc) -> NodeReport {
        NodeReport {
            node_id: doc.node_id.clone(),
            address: None,
            announced: announced(&doc.node_id, &doc.phase, doc.role.as_deref()),
            status: Some(doc),
            error: None,
        }
    }

    fn with_addons(mut d: StatusDoc, addons: &[(&str, &str)]) -> StatusDoc {
        d.addons = addons
            .iter()
            .map(|(n, s)| AddonRow {
                name: n.to_string(),
                state: s.to_string(),
                reason: None,
            })
            .collect();
        d
    }

    const CP: &str = "control-plane";

    #[test]
    fn ha_with_workers_and_addons_is_settled() {
        let m = [
            ("a", CP),
            ("b", CP),
            ("c", CP),
            ("d", "worker"),
            ("e", "worker"),
        ];
        let nodes = vec![
            node(with_addons(
                member_doc("a", CP, &m, 3),
                &[("metallb", "enabled")],
            )),
            node(member_doc("b", CP, &m, 3)),
            node(member_doc("c", CP, &m, 3)),
            node(member_doc("d", "worker", &m, 0)),
            node(member_doc("e", "worker", &m, 0)),
        ];
        let s = summarize(&nodes, Expectations::default());
        assert_eq!(s.line, "HA formed: 3 voters, 2 workers; metallb enabled");
        assert!(s.formed && s.settled);
    }

    #[test]
    fn two_of_three_waits_for_the_joining_node() {
        let m = [("a", CP), ("b", CP)];
        let mut c = StatusDoc {
            node_id: "c".into(),
            phase: "joining".into(),
            role: Some(CP.into()),
            ..Default::default()
        };
        c.control_plane_size = Some(3);
        let nodes = vec![
            node(member_doc("a", CP, &m, 2)),
            node(member_doc("b", CP, &m, 2)),
            node(c),
        ];
        let s = summarize(&nodes, Expectations::default());
        assert_eq!(
            s.line,
            "not formed: 2 of 3 control-plane members; waiting for c (joining)"
        );
        assert!(!s.formed && !s.settled);
    }

    #[test]
    fn unreachable_and_missing_nodes_are_named() {
        let m = [("a", CP)];
        let unreachable = NodeReport {
            node_id: "b".into(),
            address: None,
            announced: announced("b", "waiting", None),
            status: None,
            error: Some("coordinator 10.0.0.2:7443 timed out".into()),
        };
        let nodes = vec![node(member_doc("a", CP, &m, 1)), unreachable];
        let s = summarize(
            &nodes,
            Expectations {
                control_plane: Some(5),
                nodes: Some(4),
            },
        );
        assert_eq!(
            s.line,
            "not formed: 1 of 5 control-plane members; waiting for b (unreachable), \
             2 more of 4 expected nodes to appear"
        );
    }

    #[test]
    fn enough_members_but_no_ha_yet_and_no_nodes_at_all() {
        let m = [("a", CP), ("b", CP), ("c", CP)];
        let nodes = vec![
            node(member_doc("a", CP, &m, 2)),
            node(member_doc("b", CP, &m, 2)),
            node(member_doc("c", CP, &m, 2)),
        ];
        let s = summarize(&nodes, Expectations::default());
        assert_eq!(
            s.line,
            "not formed: 3 of 3 control-plane members, 2 of 3 MicroK8s voters; \
             waiting for MicroK8s to report HA"
        );
        let s = summarize(&[], Expectations::default());
        assert!(!s.formed && !s.settled);
        assert_eq!(s.line, "not formed: no nodes of this cluster found");
    }

    #[test]
    fn formed_but_addons_busy_or_a_worker_joining_is_not_settled() {
        let m = [("a", CP), ("b", CP), ("c", CP)];
        let nodes = vec![
            node(with_addons(
                member_doc("a", CP, &m, 3),
                &[("metallb", "enabling"), ("hostpath-storage", "pending")],
            )),
            // Another node's older view of the same addon does not win over "enabling".
            node(with_addons(
                member_doc("b", CP, &m, 3),
                &[("metallb", "pending")],
            )),
            node(member_doc("c", CP, &m, 3)),
        ];
        let s = summarize(&nodes, Expectations::default());
        assert_eq!(
            s.line,
            "HA formed: 3 voters, no workers; hostpath-storage pending, metallb enabling"
        );
        assert!(s.formed && !s.settled);

        let mut with_joiner = nodes.clone();
        with_joiner[0] = node(member_doc("a", CP, &m, 3));
        with_joiner[1] = node(member_doc("b", CP, &m, 3));
        with_joiner.push(node(StatusDoc {
            node_id: "d".into(),
            phase: "joining".into(),
            role: Some("worker".into()),
            ..Default::default()
        }));
        let s = summarize(&with_joiner, Expectations::default());
        assert_eq!(
            s.line,
            "HA formed: 3 voters, no workers; waiting for d (joining)"
        );
        assert!(s.formed && !s.settled);
    }

    #[test]
    fn the_summary_names_the_api_address_holder_and_who_cannot_hold_it() {
        use rackseed_protocol::status::ApiAddressView;
        let members = [
            ("a", "control-plane"),
            ("b", "control-plane"),
            ("c", "control-plane"),
        ];
        let view = |held: bool, problem: Option<&str>| ApiAddressView {
            address: Some("10.0.0.100".into()),
            held_here: held,
            state: "x".into(),
            problem: problem.map(String::from),
            ..Default::default()
        };
        let with = |id: &str, v: Option<ApiAddressView>| {
            let mut d = member_doc(id, "control-plane", &members, 3);
            d.api_address = v;
            node(d)
        };
        let nodes = [
            with("a", Some(view(false, None))),
            with("b", Some(view(true, None))),
            with("c", Some(view(false, Some("keepalived is not installed")))),
        ];
        let line = summarize(&nodes, Expectations::default()).line;
        assert!(
            line.ends_with(
                "; API address 10.0.0.100 held by b; c cannot hold it: keepalived is not installed"
            ),
            "{line}"
        );
        let nobody = [with("a", Some(view(false, None))), with("b", None)];
        let line = summarize(&nobody, Expectations::default()).line;
        assert!(
            line.ends_with("; API address 10.0.0.100 held by nobody"),
            "{line}"
        );
        let two = [
            with("a", Some(view(true, None))),
            with("b", Some(view(true, None))),
        ];
        let line = summarize(&two, Expectations::default()).line;
        assert!(line.contains("held by 2 nodes at once (a, b)"), "{line}");
        let none = [with("a", None)];
        assert!(!summarize(&none, Expectations::default())
            .line
            .contains("API"));
    }

    #[test]
    fn failed_addons_settle_and_single_node_clusters_form() {
        let m = [("a", CP)];
        let mut d = with_addons(member_doc("a", CP, &m, 1), &[("metallb", "failed")]);
        d.microk8s.as_mut().unwrap().ha = true;
        d.control_plane_size = Some(1);
        let s = summarize(&[node(d)], Expectations::default());
        assert_eq!(s.line, "HA formed: 1 voter, no workers; metallb failed");
        assert!(s.formed && s.settled);
    }

    #[test]
    fn announced_codes_map_to_long_names_and_tables_are_terminal_safe() {
        let ann = Announcement {
            id: rackseed_formation::NodeId::new("ab12").unwrap(),
            priority: 0,
            phase: PhaseSummary::Member,
            role: Some(Role::ControlPlane),
            cluster: None,
            authority: None,
            record_ballot: None,
            members: 3,
            eligible: true,
        };
        let mut p = Peer {
            node_id: "n1".into(),
            addrs: vec![],
            port: 7443,
            fingerprint: "0".repeat(64),
            fields: ann.to_txt().into_iter().collect(),
        };
        // Keys a newer agent may add are ignored.
        p.fields.insert("x".into(), "y".into());
        let a = AnnouncedNode::from_peer(&p);
        assert_eq!(a.phase.as_deref(), Some("member"));
        assert_eq!(a.role.as_deref(), Some("control-plane"));
        assert!(a.is_control_plane_member());
        // A worker, and a record the decoder refuses, are not asked for a kubeconfig.
        p.fields.insert("ro".into(), "w".into());
        let w = AnnouncedNode::from_peer(&p);
        assert_eq!(w.role.as_deref(), Some("worker"));
        assert!(!w.is_control_plane_member());
        p.fields.insert("ro".into(), "boss".into());
        let bad = AnnouncedNode::from_peer(&p);
        assert_eq!((bad.phase, bad.role), (None, None));
        let mut doc = member_doc("n1", CP, &[("n1", CP)], 1);
        doc.last_error = Some("bad\x1b[2Jthing".into());
        let report = ClusterReport {
            formed: false,
            settled: false,
            summary: "x".into(),
            nodes: vec![node(doc)],
            ignored_announcements: 0,
        };
        let t = render_table(&report);
        assert!(!t.contains('\x1b'), "{t:?}");
        assert!(t.contains("bad?[2Jthing"), "{t}");
    }
}
