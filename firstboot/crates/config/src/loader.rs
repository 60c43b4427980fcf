//! The schema: walks the spanned TOML tree section by section, fills defaults, checks values
//! and cross-field rules, and collects every error and warning.
//!
//! Each section has one `read_*` function that opens its table with a [`TableReader`], reads
//! every key it knows (so the rest are reported as unknown) and returns the typed section.
//! Rules that span sections (static addresses vs MetalLB blocks, hostpath on several nodes,
//! ...) live in [`cross_checks`]. To add a key: read it in its section's function, add it to
//! the model, and document it in `configs/*.toml` and the README's config reference.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::diagnostic::Report;
use super::model::*;
use super::tree::{node_str, Kind, Node, TableReader};
use super::values;

/// Default snap channel when `[microk8s] channel` is not set.
pub const DEFAULT_CHANNEL: &str = "1.32/stable";
/// Default `cluster.formation-timeout`.
pub const DEFAULT_FORMATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Default `cluster.secret-file`, relative to the config file's directory.
pub const DEFAULT_SECRET_FILE: &str = "cluster.secret";
/// Default `image.disk-size`.
pub const DEFAULT_DISK_SIZE: u64 = 8 << 30;
/// Default `image.hostname-pattern`.
pub const DEFAULT_HOSTNAME_PATTERN: &str = "{cluster}-{id}";
/// Default `addons.metallb.count` with `addresses = "auto"`.
pub const DEFAULT_METALLB_AUTO_COUNT: u8 = 8;
/// Smallest accepted `image.disk-size`.
pub const MIN_DISK_SIZE: u64 = 2 << 30;

/// Spans of values that cross-field rules point at.
#[derive(Default)]
struct Spans {
    cluster: Range<usize>,
    control_plane: Option<Range<usize>>,
    expected_nodes: Option<Range<usize>>,
    storage: Option<Range<usize>>,
    addressing: Option<Range<usize>>,
    nodes: Vec<NodeSpans>,
    users: Range<usize>,
}

#[derive(Default, Clone)]
struct NodeSpans {
    /// Position in the file's `[[nodes]]` list.
    index: usize,
    entry: Range<usize>,
    mac: Option<Range<usize>>,
    hostname: Option<Range<usize>>,
    address: Option<Range<usize>>,
    role: Option<Range<usize>>,
}

/// Reads the whole document. Returns `None` when any error was reported.
pub(crate) fn read_config(
    rep: &mut Report<'_>,
    root: &Node,
    base_dir: &Path,
) -> Option<ClusterConfig> {
    let mut spans = Spans::default();
    let mut top = TableReader::open(rep, root, "")?;

    let cluster = match top.get("cluster") {
        Some(e) => read_cluster(rep, &e.value, base_dir, &mut spans),
        None => {
            rep.error(
                &root.span,
                "cluster",
                "missing required table [cluster]; expected at least `name = \"...\"`",
            );
            None
        }
    };
    let microk8s = match top.get("microk8s") {
        Some(e) => read_microk8s(rep, &e.value, base_dir),
        None => Some(Microk8s {
            channel: DEFAULT_CHANNEL.to_string(),
            offline_snaps: None,
        }),
    };
    let addons = match top.get("addons") {
        Some(e) => read_addons(rep, &e.value, &mut spans),
        None => Some(Addons {
            dns: Dns {
                enabled: true,
                upstream: Vec::new(),
            },
            metallb: None,
            storage: Storage::None,
        }),
    };
    let network = match top.get("network") {
        Some(e) => read_network(rep, &e.value, base_dir, &mut spans),
        None => Some(Network {
            interface: None,
            addressing: Addressing::Dhcp,
            wifi: None,
        }),
    };
    let mut has_inventory = false;
    let nodes = match top.get("nodes") {
        Some(e) => {
            has_inventory = matches!(&e.value.kind, Kind::Array(a) if !a.is_empty());
            read_nodes(rep, &e.value, &mut spans)
        }
        None => (Vec::new(), true),
    };
    let cluster_name = cluster.as_ref().map_or("cluster", |c| c.name.as_str());
    let image = match top.get("image") {
        Some(e) => read_image(rep, &e.value, base_dir, cluster_name, &mut spans),
        None => {
            rep.error(
                &root.span,
                "image",
                "missing required table [image]; expected at least `target` and `base`",
            );
            None
        }
    };
    top.finish(rep);

    let (nodes, nodes_ok) = nodes;
    cross_checks(
        rep,
        &Parts {
            cluster: cluster.as_ref(),
            addons: addons.as_ref(),
            network: network.as_ref(),
            nodes: &nodes,
            has_inventory,
            image: image.as_ref(),
        },
        &spans,
    );
    let config = ClusterConfig {
        cluster: cluster?,
        microk8s: microk8s?,
        addons: addons?,
        network: network?,
        nodes: if nodes_ok { nodes } else { return None },
        image: image?,
    };
    rep.errors.is_empty().then_some(config)
}

/// Rejects an inline secret with a message saying where secrets go instead.
fn refuse_inline_secret(
    rep: &mut Report<'_>,
    t: &mut TableReader<'_>,
    keys: &[&'static str],
    instead: &str,
) {
    for key in keys {
        if let Some(e) = t.get(key) {
            rep.error(
                &e.key_span,
                &t.field(key),
                format!("secrets are never written inline in the config: {instead}"),
            );
        }
    }
}

fn resolve(base_dir: &Path, p: &str) -> Result<PathBuf, String> {
    if p.trim().is_empty() {
        return Err("expected a file path, got an empty string".into());
    }
    let p = Path::new(p);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    })
}

fn read_cluster(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    spans: &mut Spans,
) -> Option<Cluster> {
    let mut t = TableReader::open(rep, node, "cluster")?;
    spans.cluster = t.span.clone();
    let name = t.parsed(rep, "name", |s| {
        values::check_label(s).map(|()| s.to_string())
    });
    if !t.has("name") {
        t.missing(rep, "name", "a lowercase name like \"homelab\"");
    }
    let mut control_plane = Some(3u8);
    if let Some((n, span)) = t.int(rep, "control-plane", 1, 7) {
        spans.control_plane = Some(span.clone());
        if n % 2 == 1 {
            control_plane = Some(n as u8);
        } else {
            rep.error(
                span,
                &t.field("control-plane"),
                format!("expected 1, 3, 5 or 7 (an odd count keeps a dqlite majority), got {n}"),
            );
            control_plane = None;
        }
    } else if t.has("control-plane") {
        control_plane = None;
    }
    let mut expected_nodes = None;
    if let Some((n, span)) = t.int(rep, "expected-nodes", 1, 10_000) {
        spans.expected_nodes = Some(span.clone());
        expected_nodes = Some(n as u32);
    }
    let bad_expected = t.has("expected-nodes") && expected_nodes.is_none();
    let formation_timeout = match t.str(rep, "formation-timeout") {
        Some((s, span)) => match values::parse_duration(s) {
            Ok(d) if d.is_zero() => {
                rep.error(
                    span,
                    "cluster.formation-timeout",
                    "expected a duration above zero, like \"10m\"",
                );
                None
            }
            Ok(d) => Some(d),
            Err(m) => {
                rep.error(span, "cluster.formation-timeout", m);
                None
            }
        },
        None if t.has("formation-timeout") => None,
        None => Some(DEFAULT_FORMATION_TIMEOUT),
    };
    let secret_file = match t.parsed(rep, "secret-file", |s| resolve(base_dir, s)) {
        Some(p) => Some(p),
        None if t.has("secret-file") => None,
        None => Some(base_dir.join(DEFAULT_SECRET_FILE)),
    };
    refuse_inline_secret(
        rep,
        &mut t,
        &["secret", "token"],
        "create the secret with `imagebuilder secret new PATH` and set `secret-file`",
    );
    t.finish(rep);
    let control_plane = control_plane?;
    if bad_expected {
        return None;
    }
    Some(Cluster {
        name: name?,
        control_plane,
        expected_nodes: expected_nodes.unwrap_or(u32::from(control_plane)),
        formation_timeout: formation_timeout?,
        secret_file: secret_file?,
    })
}

fn read_microk8s(rep: &mut Report<'_>, node: &Node, base_dir: &Path) -> Option<Microk8s> {
    let mut t = TableReader::open(rep, node, "microk8s")?;
    let channel = match t.parsed(rep, "channel", |s| {
        values::check_channel(s).map(|()| s.to_string())
    }) {
        Some(c) => Some(c),
        None if t.has("channel") => None,
        None => Some(DEFAULT_CHANNEL.to_string()),
    };
    let offline = t.parsed(rep, "offline-snaps", |s| resolve(base_dir, s));
    let bad_offline = t.has("offline-snaps") && offline.is_none();
    t.finish(rep);
    if bad_offline {
        return None;
    }
    Some(Microk8s {
        channel: channel?,
        offline_snaps: offline,
    })
}

fn read_addons(rep: &mut Report<'_>, node: &Node, spans: &mut Spans) -> Option<Addons> {
    let mut t = TableReader::open(rep, node, "addons")?;
    let mut ok = true;
    let dns = match t.get("dns") {
        None => Some(Dns {
            enabled: true,
            upstream: Vec::new(),
        }),
        Some(e) => match &e.value.kind {
            Kind::Bool(b) => Some(Dns {
                enabled: *b,
                upstream: Vec::new(),
            }),
            Kind::Table(_) => read_dns(rep, &e.value),
            _ => {
                rep.error(
                    &e.value.span,
                    "addons.dns",
                    format!(
                        "expected true, false or a table with `enabled` and `upstream`, found {}",
                        e.value.type_name()
                    ),
                );
                None
            }
        },
    };
    let metallb = match t.get("metallb") {
        None => None,
        Some(e) => {
            let m = read_metallb(rep, &e.value);
            ok &= m.is_some();
            m
        }
    };
    let storage = match t.str(rep, "storage") {
        None if t.has("storage") => None,
        None => Some(Storage::None),
        Some((s, span)) => {
            spans.storage = Some(span.clone());
            let v = match s {
                "none" => Some(Storage::None),
                "hostpath" => Some(Storage::Hostpath),
                "mayastor" => Some(Storage::Mayastor),
                "rook-ceph" => Some(Storage::RookCeph),
                "longhorn" => Some(Storage::Longhorn),
                _ => None,
            };
            if v.is_none() {
                rep.error(
                    span,
                    "addons.storage",
                    format!(
                        "expected one of hostpath, mayastor, rook-ceph, longhorn, none; got {s:?}"
                    ),
                );
            }
            v
        }
    };
    t.finish(rep);
    if !ok {
        return None;
    }
    Some(Addons {
        dns: dns?,
        metallb,
        storage: storage?,
    })
}

fn read_dns(rep: &mut Report<'_>, node: &Node) -> Option<Dns> {
    let mut t = TableReader::open(rep, node, "addons.dns")?;
    let enabled = t.bool(rep, "enabled");
    let bad_enabled = t.has("enabled") && enabled.is_none();
    let upstream = t.list(rep, "upstream", parse_ip);
    let n_up = match t.get("upstream") {
        Some(e) => match &e.value.kind {
            Kind::Array(a) => Some(a.len()),
            _ => None,
        },
        None => Some(0),
    };
    t.finish(rep);
    let upstream: Vec<IpAddr> = upstream
        .unwrap_or_default()
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    if bad_enabled || n_up != Some(upstream.len()) {
        return None;
    }
    Some(Dns {
        enabled: enabled.unwrap_or(true),
        upstream,
    })
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("expected an IP address like \"192.168.1.1\" or \"fd00::1\", got {s:?}")
    })
}

fn read_metallb(rep: &mut Report<'_>, node: &Node) -> Option<Metallb> {
    let mut t = TableReader::open(rep, node, "addons.metallb")?;
    let result = match t.get("addresses") {
        None => {
            t.missing(
                rep,
                "addresses",
                "\"auto\" or a list of ranges/CIDRs like [\"192.168.1.240-192.168.1.250\"]",
            );
            None
        }
        Some(e) => match &e.value.kind {
            Kind::Str(s) if s == "auto" => {
                let count = match t.int(rep, "count", 1, 64) {
                    Some((n, _)) => Some(n as u8),
                    None if t.has("count") => None,
                    None => Some(DEFAULT_METALLB_AUTO_COUNT),
                };
                count.map(|count| Metallb::Auto { count })
            }
            Kind::Array(items) => {
                // (position in the list, block) for every item that parsed.
                let mut parsed: Vec<(usize, AddressBlock)> = Vec::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    let f = format!("addons.metallb.addresses[{i}]");
                    let Some(s) = node_str(rep, item, &f) else {
                        ok = false;
                        continue;
                    };
                    match values::parse_block(s) {
                        Ok(b) => parsed.push((i, b)),
                        Err(m) => {
                            rep.error(&item.span, &f, m);
                            ok = false;
                        }
                    }
                }
                if items.is_empty() {
                    rep.error(
                        &e.value.span,
                        "addons.metallb.addresses",
                        "expected at least one address range or CIDR (or \"auto\")",
                    );
                    ok = false;
                }
                let blocks: Vec<AddressBlock> = parsed.iter().map(|(_, b)| b.clone()).collect();
                for (a, b) in values::find_overlaps(&blocks) {
                    let (i, j) = (parsed[a].0, parsed[b].0);
                    rep.error(
                        &items[j].span,
                        &format!("addons.metallb.addresses[{j}]"),
                        format!(
                            "{} overlaps addons.metallb.addresses[{i}] ({}); blocks must not share addresses",
                            values::format_block(&blocks[b]),
                            values::format_block(&blocks[a])
                        ),
                    );
                    ok = false;
                }
                if t.has("count") {
                    let e = t.get("count");
                    if let Some(e) = e {
                        rep.error(
                            &e.key_span,
                            "addons.metallb.count",
                            "`count` is only used with addresses = \"auto\"",
                        );
                    }
                    ok = false;
                }
                ok.then_some(Metallb::Blocks { blocks })
            }
            _ => {
                rep.error(
                    &e.value.span,
                    "addons.metallb.addresses",
                    "expected \"auto\" or a list of ranges/CIDRs like [\"192.168.1.240-192.168.1.250\", \"fd00::/120\"]",
                );
                None
            }
        },
    };
    t.finish(rep);
    result
}

fn read_network(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    spans: &mut Spans,
) -> Option<Network> {
    let mut t = TableReader::open(rep, node, "network")?;
    let interface = t.parsed(rep, "interface", |s| {
        values::check_interface(s).map(|()| s.to_string())
    });
    let mode = match t.str(rep, "addressing") {
        None if t.has("addressing") => None,
        None => Some("dhcp"),
        Some((s, span)) => {
            spans.addressing = Some(span.clone());
            if s == "dhcp" || s == "static" {
                Some(s)
            } else {
                rep.error(
                    span,
                    "network.addressing",
                    format!("expected \"dhcp\" or \"static\", got {s:?}"),
                );
                None
            }
        }
    };
    let addressing = match mode {
        Some("static") => {
            let gateway = t.parsed(rep, "gateway", parse_ip);
            if !t.has("gateway") {
                t.missing(
                    rep,
                    "gateway",
                    "the router's address, like \"192.168.1.1\", with addressing = \"static\"",
                );
            }
            let dns = t.list(rep, "dns", parse_ip);
            let dns_len = t.get("dns").map(|e| match &e.value.kind {
                Kind::Array(a) => a.len(),
                _ => usize::MAX,
            });
            let dns_ok = dns_len.is_none_or(|n| dns.as_ref().is_some_and(|d| d.len() == n));
            match (gateway, dns_ok) {
                (Some(gateway), true) => {
                    let dns = dns.map(|d| d.into_iter().map(|(ip, _)| ip).collect::<Vec<_>>());
                    Some(Addressing::Static {
                        gateway,
                        dns: dns.unwrap_or_else(|| vec![gateway]),
                    })
                }
                _ => None,
            }
        }
        Some(_) => {
            for key in ["gateway", "dns"] {
                if let Some(e) = t.get(key) {
                    rep.error(
                        &e.key_span,
                        &format!("network.{key}"),
                        "only used with addressing = \"static\" (DHCP supplies it)",
                    );
                }
            }
            Some(Addressing::Dhcp)
        }
        None => None,
    };
    let wifi = match t.get("wifi") {
        None => None,
        Some(e) => read_wifi(rep, &e.value, base_dir),
    };
    // Errors in `interface`, `wifi` or misplaced keys are reported above; the addressing mode
    // is still returned so cross-section rules can run (the config is rejected anyway).
    t.finish(rep);
    Some(Network {
        interface,
        addressing: addressing?,
        wifi,
    })
}

fn read_wifi(rep: &mut Report<'_>, node: &Node, base_dir: &Path) -> Option<Wifi> {
    let mut t = TableReader::open(rep, node, "network.wifi")?;
    let ssid = t.parsed(rep, "ssid", |s| {
        if s.is_empty() || s.len() > 32 {
            Err(format!(
                "expected an SSID of 1 to 32 bytes, got {} bytes",
                s.len()
            ))
        } else {
            Ok(s.to_string())
        }
    });
    if !t.has("ssid") {
        t.missing(rep, "ssid", "the network name");
    }
    let psk_file = t.parsed(rep, "psk-file", |s| resolve(base_dir, s));
    if !t.has("psk-file") {
        t.missing(
            rep,
            "psk-file",
            "the path of a file holding the Wi-Fi passphrase",
        );
    }
    let country = t.parsed(rep, "country", |s| {
        if s.len() == 2 && s.chars().all(|c| c.is_ascii_alphabetic()) {
            Ok(s.to_ascii_uppercase())
        } else {
            Err(format!(
                "expected a two-letter ISO 3166 country code like \"GB\" or \"US\" (Wi-Fi regulatory domain), got {s:?}"
            ))
        }
    });
    if !t.has("country") {
        t.missing(
            rep,
            "country",
            "a two-letter country code like \"GB\" (Wi-Fi regulatory domain)",
        );
    }
    refuse_inline_secret(
        rep,
        &mut t,
        &["psk", "password", "passphrase"],
        "put the Wi-Fi passphrase in a file (mode 0600) and set `psk-file`",
    );
    t.finish(rep);
    Some(Wifi {
        ssid: ssid?,
        psk_file: psk_file?,
        country: country?,
    })
}

/// Reads the inventory: the entries that read cleanly, and whether the whole list did.
fn read_nodes(rep: &mut Report<'_>, node: &Node, spans: &mut Spans) -> (Vec<NodeEntry>, bool) {
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
    t.finish(rep);
    let entry = match (mac, &hostname, role, priority) {
        (Some(mac), Some(hostname), Ok(role), Ok(priority)) if !bad_address => Some(NodeEntry {
            mac,
            hostname: hostname.clone(),
            role,
            priority,
            address,
        }),
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

fn read_image(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    cluster_name: &str,
    spans: &mut Spans,
) -> Option<Image> {
    let mut t = TableReader::open(rep, node, "image")?;
    let target = t.parsed(rep, "target", |s| s.parse::<Target>());
    if !t.has("target") {
        t.missing(rep, "target", "one of x86_64-efi, rpi4, rpi5");
    }
    let base = match t.get("base") {
        None => {
            t.missing(
                rep,
                "base",
                "a table with kind = \"official\" (url, sha256), \"local\" (path) or \"bootstrap\" (suite)",
            );
            None
        }
        Some(e) => read_base(rep, &e.value, base_dir, target),
    };
    let disk_size = match t.str(rep, "disk-size") {
        None if t.has("disk-size") => None,
        None => Some(DEFAULT_DISK_SIZE),
        Some((s, span)) => match values::parse_size(s) {
            Ok(n) if n < MIN_DISK_SIZE => {
                rep.error(
                    span,
                    "image.disk-size",
                    format!("expected at least 2GiB, got {s:?}"),
                );
                None
            }
            Ok(n) if n % (1 << 20) != 0 => {
                rep.error(
                    span,
                    "image.disk-size",
                    format!("expected a whole number of MiB, got {s:?}"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(m) => {
                rep.error(span, "image.disk-size", m);
                None
            }
        },
    };
    spans.users = t.span.clone();
    let users = match t.get("users") {
        None => Some(Vec::new()),
        Some(e) => {
            spans.users = e.value.span.clone();
            read_users(rep, &e.value)
        }
    };
    let pattern = match t.parsed(rep, "hostname-pattern", |s| {
        values::check_hostname_pattern(s, cluster_name).map(|()| s.to_string())
    }) {
        Some(p) => Some(p),
        None if t.has("hostname-pattern") => None,
        None => {
            // The default pattern must also give valid hostnames (a long cluster name breaks it).
            if let Err(m) = values::check_hostname_pattern(DEFAULT_HOSTNAME_PATTERN, cluster_name) {
                rep.error(
                    &t.span,
                    "image.hostname-pattern",
                    format!("the default {m}; shorten cluster.name or set hostname-pattern"),
                );
            }
            Some(DEFAULT_HOSTNAME_PATTERN.to_string())
        }
    };
    t.finish(rep);
    Some(Image {
        target: target?,
        base: base?,
        disk_size: disk_size?,
        users: users?,
        hostname_pattern: pattern?,
    })
}

fn read_base(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
    target: Option<Target>,
) -> Option<Base> {
    let mut t = TableReader::open(rep, node, "image.base")?;
    let kind = t.str(rep, "kind");
    let result = match kind {
        None => {
            if !t.has("kind") {
                t.missing(rep, "kind", "\"official\", \"local\" or \"bootstrap\"");
            }
            None
        }
        Some(("official", _)) => {
            let url = t.parsed(rep, "url", |s| {
                values::check_http_url(s).map(|()| s.to_string())
            });
            if !t.has("url") {
                t.missing(rep, "url", "the image's download URL");
            }
            let sha = t.parsed(rep, "sha256", values::parse_sha256);
            if !t.has("sha256") {
                t.missing(
                    rep,
                    "sha256",
                    "the image's SHA-256 (64 hex digits); official images are always verified",
                );
            }
            match (url, sha) {
                (Some(url), Some(sha256)) => Some(Base::Official { url, sha256 }),
                _ => None,
            }
        }
        Some(("local", _)) => {
            let path = t.parsed(rep, "path", |s| resolve(base_dir, s));
            if !t.has("path") {
                t.missing(rep, "path", "the path of an image file");
            }
            let sha = t.parsed(rep, "sha256", values::parse_sha256);
            let bad_sha = t.has("sha256") && sha.is_none();
            match path {
                Some(path) if !bad_sha => Some(Base::Local { path, sha256: sha }),
                _ => None,
            }
        }
        Some(("bootstrap", _)) => {
            let suite = t.parsed(rep, "suite", |s| {
                values::check_debian_name(s).map(|()| s.to_string())
            });
            if !t.has("suite") {
                t.missing(
                    rep,
                    "suite",
                    "a distribution suite like \"noble\" or \"bookworm\"",
                );
            }
            let mirror = t.parsed(rep, "mirror", |s| {
                if s.starts_with("file:///") {
                    Ok(s.to_string())
                } else {
                    values::check_http_url(s).map(|()| s.to_string())
                }
            });
            let bad_mirror = t.has("mirror") && mirror.is_none();
            let want = target.map(Target::deb_arch);
            let arch = match t.str(rep, "arch") {
                None if t.has("arch") => None,
                None => Some(want.unwrap_or("amd64").to_string()),
                Some((s, span)) => match (want, target) {
                    (Some(w), Some(tg)) if w != s => {
                        rep.error(
                            span,
                            "image.base.arch",
                            format!(
                                "expected {w:?} for target {} (or leave it out), got {s:?}",
                                tg.as_str()
                            ),
                        );
                        None
                    }
                    _ => Some(s.to_string()),
                },
            };
            let packages = t.list(rep, "packages", |s| {
                values::check_debian_name(s).map(|()| s.to_string())
            });
            let n_pk = t.get("packages").map(|e| match &e.value.kind {
                Kind::Array(a) => a.len(),
                _ => usize::MAX,
            });
            let packages: Option<Vec<String>> = match (packages, n_pk) {
                (None, None) => Some(Vec::new()),
                (Some(p), Some(n)) if p.len() == n => Some(p.into_iter().map(|(s, _)| s).collect()),
                _ => None,
            };
            match (suite, arch, packages) {
                (Some(suite), Some(arch), Some(packages)) if !bad_mirror => Some(Base::Bootstrap {
                    suite,
                    mirror,
                    arch,
                    packages,
                }),
                _ => None,
            }
        }
        Some((other, span)) => {
            rep.error(
                span,
                "image.base.kind",
                format!("expected \"official\", \"local\" or \"bootstrap\", got {other:?}"),
            );
            // Take the other keys so they are not also reported as unknown.
            for k in [
                "url", "sha256", "path", "suite", "mirror", "arch", "packages",
            ] {
                t.get(k);
            }
            None
        }
    };
    t.finish(rep);
    result
}

fn read_users(rep: &mut Report<'_>, node: &Node) -> Option<Vec<User>> {
    let Kind::Array(items) = &node.kind else {
        rep.error(
            &node.span,
            "image.users",
            format!(
                "expected an array of tables ([[image.users]]), found {}",
                node.type_name()
            ),
        );
        return None;
    };
    let mut out: Vec<User> = Vec::new();
    // Every name that parsed, with its position, for the duplicate check.
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let path = format!("image.users[{i}]");
        let Some(mut t) = TableReader::open(rep, item, &path) else {
            ok = false;
            continue;
        };
        let name = t.parsed(rep, "name", |s| {
            values::check_username(s).map(|()| s.to_string())
        });
        if !t.has("name") {
            t.missing(rep, "name", "a login name like \"ubuntu\"");
        }
        if let Some(n) = &name {
            if let Some((_, prev)) = seen.iter().find(|(s, _)| s == n) {
                let span = t.get("name").map_or(&item.span, |e| &e.value.span);
                rep.error(
                    span,
                    &format!("{path}.name"),
                    format!("duplicate user {n:?}: image.users[{prev}] has it too"),
                );
                ok = false;
            }
            seen.push((n.clone(), i));
        }
        let keys = t.list(rep, "ssh-keys", |s| {
            values::check_ssh_key(s).map(|()| s.trim().to_string())
        });
        let n_keys = t.get("ssh-keys").map(|e| match &e.value.kind {
            Kind::Array(a) => a.len(),
            _ => usize::MAX,
        });
        let keys = match (keys, n_keys) {
            (Some(k), Some(n)) if k.len() == n && n > 0 => {
                Some(k.into_iter().map(|(s, _)| s).collect())
            }
            (Some(k), Some(0)) if k.is_empty() => {
                rep.error(
                    &item.span,
                    &format!("{path}.ssh-keys"),
                    "expected at least one SSH public key (images have no password login)",
                );
                None
            }
            (None, None) => {
                t.missing(
                    rep,
                    "ssh-keys",
                    "a list of SSH public keys (images have no password login)",
                );
                None
            }
            _ => None,
        };
        let sudo = t.bool(rep, "sudo");
        let bad_sudo = t.has("sudo") && sudo.is_none();
        refuse_inline_secret(
            rep,
            &mut t,
            &["password", "passwd"],
            "images have no password login; use `ssh-keys`",
        );
        t.finish(rep);
        match (name, keys) {
            (Some(name), Some(ssh_keys)) if !bad_sudo => out.push(User {
                name,
                ssh_keys,
                sudo: sudo.unwrap_or(true),
            }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn storage_name(s: Storage) -> &'static str {
    match s {
        Storage::None => "none",
        Storage::Hostpath => "hostpath",
        Storage::Mayastor => "mayastor",
        Storage::RookCeph => "rook-ceph",
        Storage::Longhorn => "longhorn",
    }
}

/// Rules that involve several sections; errors and warnings.
/// The sections as far as they were read: rules run on whatever is available, so one run
/// reports cross-section problems even while some section has its own errors.
struct Parts<'a> {
    cluster: Option<&'a Cluster>,
    addons: Option<&'a Addons>,
    network: Option<&'a Network>,
    /// The inventory entries that read cleanly (aligned with `Spans::nodes`).
    nodes: &'a [NodeEntry],
    /// Whether the file has any `[[nodes]]` entry at all (even ones with errors).
    has_inventory: bool,
    image: Option<&'a Image>,
}

fn cross_checks(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans) {
    let cluster_span = spans.cluster.clone();
    let node_field = |i: usize, key: &str| format!("nodes[{}].{key}", spans.nodes[i].index);
    let node_span =
        |i: usize, s: &Option<Range<usize>>| s.clone().unwrap_or(spans.nodes[i].entry.clone());

    // Static addressing needs an inventory with an address for every entry.
    match p.network.map(|n| &n.addressing) {
        Some(Addressing::Static { gateway, .. }) => {
            if !p.has_inventory {
                rep.error(
                    spans.addressing.as_ref().unwrap_or(&cluster_span),
                    "network.addressing",
                    "static addressing needs an inventory: add a [[nodes]] entry with `address` for every machine",
                );
            }
            for (i, n) in p.nodes.iter().enumerate() {
                match n.address {
                    None => rep.error(
                        &spans.nodes[i].entry,
                        &node_field(i, "address"),
                        "missing required key; expected an address like \"192.168.1.11/24\" (network.addressing is \"static\")",
                    ),
                    Some(a) if !a.contains(gateway) => rep.warn(
                        &node_span(i, &spans.nodes[i].address),
                        &node_field(i, "address"),
                        format!("gateway {gateway} is outside this node's subnet {}", a.trunc()),
                    ),
                    Some(_) => {}
                }
            }
        }
        Some(Addressing::Dhcp) => {
            for (i, n) in p.nodes.iter().enumerate() {
                if n.address.is_some() {
                    rep.error(
                        &node_span(i, &spans.nodes[i].address),
                        &node_field(i, "address"),
                        "only used with network.addressing = \"static\"; with DHCP the router assigns addresses",
                    );
                }
            }
        }
        None => {}
    }

    // Node addresses must not be handed out by MetalLB.
    if let Some(Metallb::Blocks { blocks }) = p.addons.and_then(|a| a.metallb.as_ref()) {
        for (i, n) in p.nodes.iter().enumerate() {
            let Some(a) = n.address else { continue };
            if let Some(j) = blocks
                .iter()
                .position(|b| values::block_contains(b, a.addr()))
            {
                rep.error(
                    &node_span(i, &spans.nodes[i].address),
                    &node_field(i, "address"),
                    format!(
                        "{} lies inside addons.metallb.addresses[{j}] ({}); MetalLB would hand it out",
                        a.addr(),
                        values::format_block(&blocks[j])
                    ),
                );
            }
        }
    }

    let Some(cluster) = p.cluster else { return };
    let cp = cluster.control_plane;
    let expected = cluster.expected_nodes;
    let multi_node = expected > 1 || cp > 1 || p.nodes.len() > 1;

    let storage_span = spans.storage.clone().unwrap_or(cluster_span.clone());
    let target = p.image.map(|i| i.target);
    match p.addons.map(|a| a.storage) {
        Some(Storage::Hostpath) if multi_node => rep.warn(
            &storage_span,
            "addons.storage",
            "hostpath storage is not suitable for multi-node clusters (MicroK8s warns so too): volumes live on one node's disk and pods elsewhere cannot reach them",
        ),
        Some(Storage::RookCeph) => rep.warn(
            &storage_span,
            "addons.storage",
            "rook-ceph needs internet access when it is enabled (it adds the rook helm repository); offline clusters cannot enable it",
        ),
        Some(Storage::Longhorn) => rep.warn(
            &storage_span,
            "addons.storage",
            "longhorn is not a MicroK8s addon: it is installed with helm, which needs internet access at enable time, and every node needs open-iscsi and an NFS client",
        ),
        Some(Storage::Mayastor) if matches!(target, Some(Target::Rpi4 | Target::Rpi5)) => rep.warn(
            &storage_span,
            "addons.storage",
            "mayastor reserves 1024 hugepages (2 GiB) on every node; Raspberry Pis with 4 GiB or less will be short of memory",
        ),
        _ => {}
    }

    if let Some(Addressing::Static { .. }) = p.network.map(|n| &n.addressing) {
        let listed = p.nodes.len();
        let wanted = expected.max(u32::from(cp));
        if p.has_inventory && listed > 0 && (listed as u64) < u64::from(wanted) {
            rep.warn(
                spans.expected_nodes.as_ref().unwrap_or(&cluster_span),
                "cluster.expected-nodes",
                format!(
                    "static addressing gives addresses only to the {listed} inventory nodes, but the cluster waits for {wanted}; formation falls back to the timeout"
                ),
            );
        }
    }
    if expected < u32::from(cp) {
        rep.warn(
            spans.expected_nodes.as_ref().unwrap_or(&cluster_span),
            "cluster.expected-nodes",
            format!(
                "expected-nodes ({expected}) is below control-plane ({cp}): the cluster has {cp} control-plane nodes only once more machines join"
            ),
        );
    }
    if cp == 1 && multi_node {
        rep.warn(
            spans.control_plane.as_ref().unwrap_or(&cluster_span),
            "cluster.control-plane",
            "control-plane = 1 gives no high availability: if that node fails the cluster is down",
        );
    }
    let pinned: Vec<usize> = p
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.role == Some(Role::ControlPlane))
        .map(|(i, _)| i)
        .collect();
    if let Some(&i) = pinned.get(usize::from(cp)) {
        rep.warn(
            &node_span(i, &spans.nodes[i].role),
            &node_field(i, "role"),
            format!(
                "{} nodes are pinned as control-plane but cluster.control-plane is {cp}; the extra ones become dqlite standbys",
                pinned.len()
            ),
        );
    }
    if p.image.is_some_and(|i| i.users.is_empty()) {
        rep.warn(
            &spans.users,
            "image.users",
            "no users: nobody can log in to the nodes over SSH",
        );
    }
}

/// A one-line summary of a valid config, as printed by `validate`.
pub fn summary(c: &ClusterConfig) -> String {
    let lb = match &c.addons.metallb {
        None => "no metallb".to_string(),
        Some(Metallb::Auto { count }) => format!("metallb auto ({count} addresses)"),
        Some(Metallb::Blocks { blocks }) => format!(
            "metallb {}",
            blocks
                .iter()
                .map(values::format_block)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    format!(
        "cluster {:?}: {} control-plane, {} expected nodes, {} inventory nodes, target {}, microk8s {}, {}, storage {}",
        c.cluster.name,
        c.cluster.control_plane,
        c.cluster.expected_nodes,
        c.nodes.len(),
        c.image.target.as_str(),
        c.microk8s.channel,
        lb,
        storage_name(c.addons.storage)
    )
}
