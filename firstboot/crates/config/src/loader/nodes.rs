//! `[[nodes]]`, the inventory: one entry per machine (MAC, hostname, role, priority, static
//! address, Kubernetes labels), with MACs, hostnames and addresses unique across entries.
//! Labels follow Kubernetes' syntax ([`crate::node_labels`]); each bad key or value is
//! reported at its own position.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;

use super::{NodeSpans, Spans};
use crate::diagnostic::Report;
use crate::model::*;
use crate::node_labels::{check_label_key, check_label_value};
use crate::tree::{node_str, Kind, Node, TableReader};
use crate::values;

/// Reads the inventory: the entries that read cleanly, and whether the whole list did.
pub(super) fn read_nodes(
    rep: &mut Report<'_>,
    node: &Node,
    spans: &mut Spans,
) -> (Vec<NodeEntry>, bool) {
    let Kind::Array(items) = &node.kind else {
        rep.error(
            &node.span,
            "nodes",
            format!(
                "expected an array of tables ([[nodes]]), found {}",
                node.type_name()
            ),
        );
        return (Vec::new(), false);
    };
    let partials: Vec<PartialNode> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| read_node(rep, item, i))
        .collect();
    let mut ok = partials.len() == items.len();
    // Uniqueness across entries, among every value that parsed (even in entries with other
    // errors), so one run shows all the clashes.
    let mut macs: HashMap<MacAddr, usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, usize> = HashMap::new();
    let mut errors = Vec::new();
    for p in &partials {
        let ns = &p.spans;
        let i = ns.index;
        let at = |s: &Option<Range<usize>>| s.clone().unwrap_or(ns.entry.clone());
        if let Some(mac) = p.mac {
            if let Some(prev) = macs.insert(mac, i) {
                errors.push((
                    at(&ns.mac),
                    format!("nodes[{i}].mac"),
                    format!("duplicate MAC {mac}: nodes[{prev}] has it too; MACs must be unique"),
                ));
            }
        }
        if let Some(name) = &p.hostname {
            if let Some(prev) = names.insert(name.as_str(), i) {
                errors.push((
                    at(&ns.hostname),
                    format!("nodes[{i}].hostname"),
                    format!("duplicate hostname {name:?}: nodes[{prev}] has it too; hostnames must be unique"),
                ));
            }
        }
        if let Some(a) = p.address {
            if let Some(prev) = addrs.insert(a.addr(), i) {
                errors.push((
                    at(&ns.address),
                    format!("nodes[{i}].address"),
                    format!("duplicate address {}: nodes[{prev}] has it too", a.addr()),
                ));
            }
        }
    }
    for (span, field, msg) in errors {
        rep.error(&span, &field, msg);
        ok = false;
    }
    let mut out = Vec::new();
    for p in partials {
        match p.entry {
            Some(e) => {
                out.push(e);
                spans.nodes.push(p.spans);
            }
            None => ok = false,
        }
    }
    (out, ok)
}

/// One `[[nodes]]` entry as far as it parsed: the values uniqueness is checked on, and the
/// whole entry when every key was valid.
struct PartialNode {
    spans: NodeSpans,
    mac: Option<MacAddr>,
    hostname: Option<String>,
    address: Option<IpNet>,
    entry: Option<NodeEntry>,
}

fn read_node(rep: &mut Report<'_>, node: &Node, i: usize) -> Option<PartialNode> {
    let path = format!("nodes[{i}]");
    let mut t = TableReader::open(rep, node, &path)?;
    let mut ns = NodeSpans {
        index: i,
        entry: node.span.clone(),
        ..Default::default()
    };
    let mac = t.parsed(rep, "mac", values::parse_mac);
    if !t.has("mac") {
        t.missing(
            rep,
            "mac",
            "the machine's MAC address like \"dc:a6:32:01:02:03\"",
        );
    }
    ns.mac = t.get("mac").map(|e| e.value.span.clone());
    let hostname = t.parsed(rep, "hostname", |s| {
        values::check_label(s).map(|()| s.to_string())
    });
    if !t.has("hostname") {
        t.missing(rep, "hostname", "a lowercase RFC 1123 label like \"pi-1\"");
    }
    ns.hostname = t.get("hostname").map(|e| e.value.span.clone());
    let role = match t.str(rep, "role") {
        None if t.has("role") => Err(()),
        None => Ok(None),
        Some((s, span)) => {
            ns.role = Some(span.clone());
            match s {
                "control-plane" => Ok(Some(Role::ControlPlane)),
                "worker" => Ok(Some(Role::Worker)),
                _ => {
                    rep.error(
                        span,
                        &t.field("role"),
                        format!("expected \"control-plane\" or \"worker\", got {s:?}"),
                    );
                    Err(())
                }
            }
        }
    };
    let priority = match t.int(rep, "priority", 0, i64::from(u32::MAX)) {
        Some((p, _)) => Ok(p as u32),
        None if t.has("priority") => Err(()),
        None => Ok(0),
    };
    let address = t.parsed(rep, "address", |s| {
        let net: IpNet = s.trim().parse().map_err(|_| {
            format!("expected an address with prefix length like \"192.168.1.11/24\", got {s:?}")
        })?;
        if net.addr().is_ipv4()
            && net.prefix_len() < 31
            && (net.addr() == net.network() || net.addr() == net.broadcast())
        {
            return Err(format!(
                "{s:?} is the network or broadcast address of its subnet; expected a host address"
            ));
        }
        Ok(net)
    });
    if let Some(e) = t.get("address") {
        ns.address = Some(e.value.span.clone());
    }
    let bad_address = t.has("address") && address.is_none();
    let labels = match t.get("labels") {
        None => Some(BTreeMap::new()),
        Some(e) => read_labels(rep, &e.value, &t.field("labels")),
    };
    t.finish(rep);
    let entry = match (mac, &hostname, role, priority, labels) {
        (Some(mac), Some(hostname), Ok(role), Ok(priority), Some(labels)) if !bad_address => {
            Some(NodeEntry {
                mac,
                hostname: hostname.clone(),
                role,
                priority,
                address,
                labels,
            })
        }
        _ => None,
    };
    Some(PartialNode {
        spans: ns,
        mac,
        hostname,
        address,
        entry,
    })
}

/// Reads `labels = { key = "value", ... }`: every bad key (at the key) and value (at the value)
/// is reported; `None` when any was.
fn read_labels(rep: &mut Report<'_>, node: &Node, field: &str) -> Option<BTreeMap<String, String>> {
    let Kind::Table(entries) = &node.kind else {
        rep.error(
            &node.span,
            field,
            format!(
                "expected a table of labels like {{ \"example.com/rack\" = \"r1\" }}, found {}",
                node.type_name()
            ),
        );
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in entries {
        let f = format!("{field}.{:?}", e.key);
        if let Err(m) = check_label_key(&e.key) {
            rep.error(&e.key_span, &f, m);
            ok = false;
        }
        match node_str(rep, &e.value, &f) {
            Some(v) => match check_label_value(v) {
                Ok(()) => {
                    out.insert(e.key.clone(), v.to_owned());
                }
                Err(m) => {
                    rep.error(&e.value.span, &f, m);
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    ok.then_some(out)
}
