//! The node's read-only status page: `GET /` renders the current [`StatusDoc`] as one small
//! HTML document on the server (no JavaScript; the browser reloads it every
//! [`REFRESH_SECONDS`]), and `GET /status.json` serves the same document as JSON.
//!
//! Why these two need no authentication: a browser cannot do the coordinator's HMAC
//! challenge-response, and the status document holds no secrets by design (see
//! [`crate::status`]): node ids, host names, addresses, phases, roles, MicroK8s voter addresses,
//! addon states, preparation problems, a timeline of phase changes and counters of what the
//! node refused (reasons are fixed texts, never received data). No cluster secret, no
//! join token, no MicroK8s token, no kubeconfig, no certificate key is ever put in it; the
//! driver builds it from the formation state and MicroK8s' status only. What a stranger on the
//! LAN learns is what it could learn by watching the cluster's mDNS traffic and port-scanning
//! it. Everything that changes state (`POST /v1/message`) and the kubeconfig
//! (`POST /v1/kubeconfig`) stays authenticated. As a second line of defence the server cuts the
//! cluster secret and the MicroK8s token derived from it out of the public copies, should a bug
//! ever put one in the document (an error message echoing a join URL, say), and logs a warning.
//!
//! Every value shown comes from a node (host names, addon reasons, MicroK8s notes, peers'
//! announced phases) and is HTML-escaped by [`escape_html`]; the response also carries a
//! Content-Security-Policy that allows no script at all, so a hostile string that slipped past
//! escaping still could not run.
//!
//! To show a new field: add it to [`StatusDoc`] and render it in [`render_page`] through
//! [`escape_html`] (the unit tests check a hostile value in every field).

use std::fmt::Write;

use crate::status::StatusDoc;

/// Seconds between the browser's reloads of the page.
pub const REFRESH_SECONDS: u32 = 5;

/// Content-Security-Policy of the page: inline styles only, no script, no framing.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab/newline have no business in a page.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}\
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}.bad{color:#a00}.ok{color:#070}.muted{color:#777}";

/// Renders the page for the status document the driver published (`doc`), which may be the
/// initial empty object before the driver's first update, or something that is not a
/// [`StatusDoc`] at all (then the page says so and shows nothing else).
pub fn render_page(doc: &serde_json::Value) -> String {
    let parsed = serde_json::from_value::<StatusDoc>(doc.clone());
    let mut s = String::new();
    let title = match &parsed {
        Ok(d) => format!("rackseed {} ({})", d.node_id, d.phase),
        Err(_) => "rackseed node".to_string(),
    };
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        escape_html(&title)
    );
    match parsed {
        Ok(d) => render_doc(&mut s, &d),
        Err(_) if doc.as_object().is_some_and(|o| o.is_empty()) => {
            let _ = writeln!(
                s,
                "<h1>rackseed node</h1><p id=\"no-status\">This node has not published its \
                 status yet. The page reloads every {REFRESH_SECONDS} seconds.</p>"
            );
        }
        Err(e) => {
            let _ = writeln!(
                s,
                "<h1>rackseed node</h1><p id=\"bad-status\" class=\"bad\">This node's status \
                 document cannot be shown: {}. The raw document is at \
                 <a href=\"/status.json\">/status.json</a>.</p>",
                escape_html(&e.to_string())
            );
        }
    }
    let _ = writeln!(
        s,
        "<p class=\"muted\">Read-only. Reloads every {REFRESH_SECONDS} seconds. \
         The same document as JSON: <a href=\"/status.json\">/status.json</a>.</p>\
         </body></html>"
    );
    s
}

fn opt(o: &Option<String>) -> String {
    o.as_deref().map(escape_html).unwrap_or_else(|| "-".into())
}

/// Renders the body of the page for a parsed status document, section by section.
fn render_doc(s: &mut String, d: &StatusDoc) {
    render_this_node(s, d);
    render_peers(s, d);
    render_members(s, d);
    render_microk8s(s, d);
    render_api_address(s, d);
    render_addons(s, d);
    render_storage(s, d);
    render_node_labels(s, d);
    render_problems(s, d);
    render_rejections(s, d);
    render_timeline(s, d);
}

/// Renders the heading, the cluster verdict and the table about this node.
fn render_this_node(s: &mut String, d: &StatusDoc) {
    let e = escape_html;
    let _ = writeln!(
        s,
        "<h1>rackseed node <span id=\"node-id\">{}</span></h1>",
        e(&d.node_id)
    );
    let verdict = if d.formed() {
        "<p id=\"verdict\" class=\"ok\">This node is a member of a highly-available cluster.</p>"
    } else {
        "<p id=\"verdict\">This node is not (yet) part of a highly-available cluster.</p>"
    };
    s.push_str(verdict);
    let _ = writeln!(s, "<table id=\"this-node\">");
    let rows: [(&str, String); 8] = [
        ("host name", e(&d.hostname)),
        ("address", opt(&d.address)),
        ("phase", e(&d.phase)),
        ("role", opt(&d.role)),
        ("cluster", opt(&d.cluster)),
        ("slot authority", opt(&d.authority)),
        ("firstboot", e(&d.version)),
        ("last error", opt(&d.last_error)),
    ];
    for (k, v) in rows {
        let class = if k == "last error" && d.last_error.is_some() {
            " class=\"bad\""
        } else {
            ""
        };
        let _ = writeln!(s, "<tr><th>{k}</th><td{class}>{v}</td></tr>");
    }
    s.push_str("</table>\n");
}

/// Renders the "Nodes this node sees" section: the peers found through discovery.
fn render_peers(s: &mut String, d: &StatusDoc) {
    let e = escape_html;
    let _ = writeln!(s, "<h2>Nodes this node sees ({})</h2>", d.peers.len());
    if d.peers.is_empty() {
        s.push_str("<p class=\"muted\">No peers seen yet.</p>\n");
    } else {
        s.push_str(
            "<table id=\"peers\"><tr><th>node</th><th>address</th><th>phase</th><th>role</th></tr>\n",
        );
        for p in &d.peers {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(&p.node_id),
                e(&p.address),
                e(&p.phase),
                opt(&p.role)
            );
        }
        s.push_str("</table>\n");
    }
}

/// Renders the "Cluster members" section.
fn render_members(s: &mut String, d: &StatusDoc) {
    let e = escape_html;
    let _ = writeln!(s, "<h2>Cluster members ({})</h2>", d.members.len());
    if d.members.is_empty() {
        s.push_str("<p class=\"muted\">No members recorded yet.</p>\n");
    } else {
        s.push_str("<table id=\"members\"><tr><th>node</th><th>role</th></tr>\n");
        for m in &d.members {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td></tr>",
                e(&m.node_id),
                e(&m.role)
            );
        }
        s.push_str("</table>\n");
    }
}

/// Renders the "MicroK8s" section: running, high availability, voters, standby and note.
fn render_microk8s(s: &mut String, d: &StatusDoc) {
    s.push_str("<h2>MicroK8s</h2>\n");
    if d.microk8s_simulated {
        s.push_str(
            "<p id=\"microk8s-simulated\" class=\"bad\">MicroK8s simulated: this QEMU \
             test-cluster image runs rackseed's MicroK8s simulator, not MicroK8s.</p>\n",
        );
    }
    match &d.microk8s {
        None => s.push_str("<p id=\"microk8s\" class=\"muted\">Not asked yet.</p>\n"),
        Some(m) => {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.iter()
                        .map(|x| escape_html(x))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let _ = writeln!(
                s,
                "<table id=\"microk8s\">\
                 <tr><th>running</th><td>{}</td></tr>\
                 <tr><th>high availability</th><td class=\"{}\">{}</td></tr>\
                 <tr><th>voters ({})</th><td>{}</td></tr>\
                 <tr><th>standby ({})</th><td>{}</td></tr>\
                 <tr><th>note</th><td>{}</td></tr></table>",
                if m.running { "yes" } else { "no" },
                if m.ha { "ok" } else { "bad" },
                if m.ha { "yes" } else { "no" },
                m.voters.len(),
                list(&m.voters),
                m.standby.len(),
                list(&m.standby),
                opt(&m.note)
            );
        }
    }
}

/// Renders the "API address" section (only when the cluster has a floating API address):
/// the address, whether this node holds it, keepalived's state and any problem.
fn render_api_address(s: &mut String, d: &StatusDoc) {
    let Some(a) = &d.api_address else { return };
    let _ = writeln!(
        s,
        "<h2>API address</h2>\n<table id=\"api-address\">\
         <tr><th>address</th><td>{}</td></tr>\
         <tr><th>held by this node</th><td class=\"{}\">{}</td></tr>\
         <tr><th>state</th><td>{}</td></tr>\
         <tr><th>peers</th><td>{}</td></tr>\
         <tr><th>problem</th><td class=\"{}\">{}</td></tr></table>",
        opt(&a.address),
        if a.held_here { "ok" } else { "muted" },
        if a.held_here { "yes" } else { "no" },
        escape_html(&a.state),
        if a.peers.is_empty() {
            "-".to_string()
        } else {
            a.peers
                .iter()
                .map(|p| escape_html(p))
                .collect::<Vec<_>>()
                .join(", ")
        },
        if a.problem.is_some() { "bad" } else { "ok" },
        opt(&a.problem)
    );
}

/// Renders the "Storage" section (only where the node reads the storage's health): installed
/// or not, the chart, volume counts and the degraded and faulted volumes by name.
fn render_storage(s: &mut String, d: &StatusDoc) {
    let Some(h) = &d.storage else { return };
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.iter()
                .map(|n| escape_html(n))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(
        s,
        "<h2>Storage</h2>\n<table id=\"storage\">\
         <tr><th>storage</th><td>{}</td></tr>\
         <tr><th>installed</th><td class=\"{}\">{}</td></tr>\
         <tr><th>chart</th><td>{}</td></tr>\
         <tr><th>volumes</th><td>{} ({} healthy, {} detached)</td></tr>\
         <tr><th>degraded</th><td class=\"{}\">{}</td></tr>\
         <tr><th>faulted</th><td class=\"{}\">{}</td></tr>\
         <tr><th>problem</th><td class=\"{}\">{}</td></tr></table>",
        escape_html(&h.storage),
        if h.installed { "ok" } else { "bad" },
        if h.installed { "yes" } else { "no" },
        opt(&h.chart),
        h.volumes,
        h.healthy,
        h.detached,
        if h.degraded.is_empty() { "ok" } else { "bad" },
        list(&h.degraded),
        if h.faulted.is_empty() { "ok" } else { "bad" },
        list(&h.faulted),
        if h.problem.is_some() { "bad" } else { "ok" },
        opt(&h.problem)
    );
}

/// Renders the "Node labels" section (only where the inventory has labels and this node is a
/// control-plane member that puts them on): each node's labels and whether it carries them.
fn render_node_labels(s: &mut String, d: &StatusDoc) {
    if d.node_labels.is_empty() {
        return;
    }
    s.push_str(
        "<h2>Node labels</h2>\n<table id=\"node-labels\"><tr><th>node</th><th>labels</th><th>state</th></tr>\n",
    );
    for l in &d.node_labels {
        let pairs: Vec<String> = l
            .labels
            .iter()
            .map(|(k, v)| escape_html(&format!("{k}={v}")))
            .collect();
        let state = match (&l.problem, l.applied) {
            (_, true) => "applied".to_owned(),
            (Some(p), false) => format!("not applied: {}", escape_html(p)),
            (None, false) => "not applied".to_owned(),
        };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{state}</td></tr>",
            escape_html(&l.node),
            pairs.join(", "),
            if l.applied { "ok" } else { "bad" },
        );
    }
    s.push_str("</table>\n");
}

/// Renders the "Addons" section: each addon's state and reason.
fn render_addons(s: &mut String, d: &StatusDoc) {
    let e = escape_html;
    s.push_str("<h2>Addons</h2>\n");
    if d.addons.is_empty() {
        s.push_str("<p class=\"muted\">None reported by this node.</p>\n");
    } else {
        s.push_str("<table id=\"addons\"><tr><th>addon</th><th>state</th><th>reason</th></tr>\n");
        for a in &d.addons {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(&a.name),
                e(&a.state),
                opt(&a.reason)
            );
        }
        s.push_str("</table>\n");
    }
}

/// Renders the "Problems" section with each problem's fix, only when there are problems.
fn render_problems(s: &mut String, d: &StatusDoc) {
    let e = escape_html;
    if !d.problems.is_empty() {
        s.push_str(
            "<h2>Problems</h2>\n<table id=\"problems\"><tr><th>problem</th><th>fix</th></tr>\n",
        );
        for (i, p) in d.problems.iter().enumerate() {
            let fix = d.fixes.get(i).map(|f| e(f)).unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "<tr><td class=\"bad\">{}</td><td>{fix}</td></tr>", e(p));
        }
        s.push_str("</table>\n");
    }
}

/// Renders the "Refused" section: the non-zero rejection counters.
fn render_rejections(s: &mut String, d: &StatusDoc) {
    s.push_str("<h2>Refused</h2>\n");
    if d.rejections.total() == 0 {
        s.push_str("<p class=\"muted\">Nothing refused since the agent started.</p>\n");
    } else {
        s.push_str("<table id=\"rejections\"><tr><th>by</th><th>reason</th><th>count</th></tr>\n");
        for (by, what, n) in d.rejections.rows() {
            if n > 0 {
                let _ = writeln!(s, "<tr><td>{by}</td><td>{what}</td><td>{n}</td></tr>");
            }
        }
        s.push_str("</table>\n");
    }
}

/// Renders the "Formation timeline" section: each phase change with its time.
fn render_timeline(s: &mut String, d: &StatusDoc) {
    s.push_str("<h2>Formation timeline</h2>\n");
    if d.timeline.is_empty() {
        s.push_str("<p class=\"muted\">Nothing yet.</p>\n");
    } else {
        s.push_str(
            "<table id=\"timeline\"><tr><th>seconds after the agent started</th><th>what</th></tr>\n",
        );
        for t in &d.timeline {
            let at = if t.at.is_finite() {
                format!("+{:.1}", t.at)
            } else {
                "?".to_string()
            };
            let _ = writeln!(s, "<tr><td>{at}</td><td>{}</td></tr>", escape_html(&t.what));
        }
        s.push_str("</table>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{
        AddonRow, ApiAddressView, MemberRow, Microk8sView, NodeLabelsView, PeerRow,
        StorageHealthView, TimelineEntry,
    };

    const EVIL: &str = "<script>alert(1)</script>\"'&";

    #[test]
    fn a_simulated_microk8s_is_said_plainly() {
        let mut doc = StatusDoc {
            node_id: "n1".into(),
            phase: "member".into(),
            ..Default::default()
        };
        let page = render_page(&serde_json::to_value(&doc).unwrap());
        assert!(!page.contains("MicroK8s simulated"), "{page}");
        doc.microk8s_simulated = true;
        let page = render_page(&serde_json::to_value(&doc).unwrap());
        assert!(page.contains("MicroK8s simulated"), "{page}");
    }

    fn hostile_doc() -> StatusDoc {
        let evil = || EVIL.to_string();
        StatusDoc {
            version: evil(),
            node_id: evil(),
            hostname: evil(),
            address: Some(evil()),
            phase: evil(),
            role: Some(evil()),
            cluster: Some(evil()),
            authority: Some(evil()),
            peers: vec![PeerRow {
                node_id: evil(),
                address: evil(),
                phase: evil(),
                role: Some(evil()),
            }],
            members: vec![MemberRow {
                node_id: evil(),
                role: evil(),
            }],
            microk8s: Some(Microk8sView {
                running: true,
                voters: vec![evil()],
                standby: vec![evil()],
                ha: false,
                note: Some(evil()),
            }),
            addons: vec![AddonRow {
                name: evil(),
                state: evil(),
                reason: Some(evil()),
            }],
            problems: vec![evil()],
            fixes: vec![evil()],
            last_error: Some(evil()),
            timeline: vec![TimelineEntry {
                at: 1.0,
                what: evil(),
            }],
            api_address: Some(ApiAddressView {
                address: Some(evil()),
                held_here: true,
                state: evil(),
                peers: vec![evil()],
                problem: Some(evil()),
                in_certificate: false,
            }),
            storage: Some(StorageHealthView {
                storage: evil(),
                chart: Some(evil()),
                degraded: vec![evil()],
                faulted: vec![evil()],
                problem: Some(evil()),
                ..Default::default()
            }),
            node_labels: vec![NodeLabelsView {
                node: evil(),
                labels: [(evil(), evil())].into(),
                applied: false,
                problem: Some(evil()),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn node_labels_show_per_node() {
        let doc = StatusDoc {
            node_id: "node-a".into(),
            node_labels: vec![
                NodeLabelsView {
                    node: "node-0".into(),
                    labels: [("example.com/rack".to_owned(), "r1".to_owned())].into(),
                    applied: true,
                    problem: None,
                },
                NodeLabelsView {
                    node: "node-9".into(),
                    labels: [("zone".to_owned(), String::new())].into(),
                    applied: false,
                    problem: Some("not in the cluster yet".into()),
                },
            ],
            ..Default::default()
        };
        let page = render_page(&serde_json::to_value(&doc).unwrap());
        for want in [
            "<table id=\"node-labels\">",
            "<tr><td>node-0</td><td>example.com/rack=r1</td><td class=\"ok\">applied</td></tr>",
            "<td>node-9</td><td>zone=</td><td class=\"bad\">not applied: not in the cluster yet</td>",
        ] {
            assert!(page.contains(want), "{want} missing:\n{page}");
        }
        let none = render_page(&serde_json::json!({"node_id": "n"}));
        assert!(!none.contains("id=\"node-labels\""));
    }

    #[test]
    fn storage_health_shows_degraded_volumes() {
        let doc = StatusDoc {
            node_id: "node-a".into(),
            storage: Some(StorageHealthView {
                storage: "longhorn".into(),
                installed: true,
                chart: Some("longhorn-1.7.2".into()),
                volumes: 3,
                healthy: 1,
                degraded: vec!["pvc-1 (3 replicas wanted)".into()],
                detached: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let page = render_page(&serde_json::to_value(&doc).unwrap());
        for want in [
            "<table id=\"storage\">",
            "<td>longhorn-1.7.2</td>",
            "<td>3 (1 healthy, 1 detached)</td>",
            "class=\"bad\">pvc-1 (3 replicas wanted)</td>",
        ] {
            assert!(page.contains(want), "{want} missing:\n{page}");
        }
        assert_eq!(
            doc.storage.unwrap().summary(),
            "longhorn: installed (longhorn-1.7.2), 3 volumes: 1 healthy, 1 degraded, 0 faulted, \
             1 detached; degraded: pvc-1 (3 replicas wanted)"
        );
        let none = render_page(&serde_json::json!({"node_id": "n"}));
        assert!(!none.contains("id=\"storage\""));
    }

    #[test]
    fn escape_covers_markup_quotes_and_controls() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>\u{1b}"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;\u{fffd}"
        );
    }

    #[test]
    fn every_field_is_escaped() {
        let page = render_page(&serde_json::to_value(hostile_doc()).unwrap());
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains(EVIL));
        let escaped = escape_html(EVIL);
        // Title, h1 and 21 other places in the body.
        let n = page.matches(&escaped).count();
        assert!(n >= 20, "only {n} escaped copies:\n{page}");
    }

    #[test]
    fn unpublished_or_foreign_documents_render_a_notice() {
        let page = render_page(&serde_json::json!({}));
        assert!(page.contains("id=\"no-status\""), "{page}");
        for v in [
            serde_json::json!([1, 2]),
            serde_json::json!({"node_id": "<b>x</b>"}),
        ] {
            let page = render_page(&v);
            assert!(page.contains("id=\"bad-status\""), "{page}");
            assert!(!page.contains("<b>"), "{page}");
        }
    }

    #[test]
    fn sections_show_their_rows() {
        let doc = StatusDoc {
            version: "0.1.0".into(),
            node_id: "node-a".into(),
            hostname: "rack-1".into(),
            phase: "member".into(),
            role: Some("control-plane".into()),
            peers: vec![PeerRow {
                node_id: "node-b".into(),
                address: "10.0.0.2".into(),
                phase: "joining".into(),
                role: None,
            }],
            microk8s: Some(Microk8sView {
                running: true,
                voters: vec!["10.0.0.1:19001".into()],
                ha: true,
                ..Default::default()
            }),
            timeline: vec![TimelineEntry {
                at: 12.3,
                what: "joined via node-c".into(),
            }],
            ..Default::default()
        };
        let quiet = render_page(&serde_json::to_value(&doc).unwrap());
        assert!(quiet.contains("Nothing refused since the agent started."));
        let mut doc = doc;
        doc.rejections.discovery.replayed = 7;
        doc.rejections.coordinator.tls_failures = 2;
        let page = render_page(&serde_json::to_value(&doc).unwrap());
        assert!(
            page.contains("<tr><td>discovery</td><td>replayed</td><td>7</td></tr>")
                && page.contains("<tr><td>coordinator</td><td>tls failures</td><td>2</td></tr>")
                && !page.contains("<td>body timeouts</td>"),
            "{page}"
        );
        for want in [
            "<span id=\"node-id\">node-a</span>",
            "<td>node-b</td><td>10.0.0.2</td><td>joining</td><td>-</td>",
            "<td>+12.3</td><td>joined via node-c</td>",
            "class=\"ok\">yes</td>",
            "content=\"5\"",
        ] {
            assert!(page.contains(want), "missing {want:?} in\n{page}");
        }
        assert!(!page.contains("<script"));
    }
}
