//! The schema: walks the spanned TOML tree section by section, fills defaults, checks values
//! and cross-field rules, and collects every error and warning.
//!
//! Each section has one `read_*` function, in the submodule named after the section, that
//! opens its table with a [`TableReader`], reads every key it knows (so the rest are reported
//! as unknown) and returns the typed section. This module walks the top-level tables and holds
//! the helpers the sections share. Rules that span sections (static addresses vs MetalLB
//! blocks, hostpath on several nodes, ...) live in [`cross_section`]. To add a key: read it in
//! its section's function, add it to the model, and document it in `configs/*.toml` and the
//! README's config reference.

mod addons;
mod backup;
mod cluster;
mod cross_section;
mod image;
mod network;
mod nodes;

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diagnostic::Report;
use super::model::*;
use super::tree::{Kind, Node, TableReader};
use super::values;
use addons::read_addons;
use backup::read_backup;
use cluster::{read_cluster, read_microk8s};
use cross_section::{cross_checks, Parts};
use image::read_image;
use network::read_network;
use nodes::read_nodes;

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
    api_address: Option<Range<usize>>,
    standbys: Option<Range<usize>>,
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
        Some(e) => read_addons(rep, &e.value, &mut spans, base_dir),
        None => Some(Addons {
            dns: Dns {
                enabled: true,
                upstream: Vec::new(),
            },
            metallb: None,
            storage: Storage::None,
            longhorn: Longhorn::default(),
            offline: None,
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
    let backup = match top.get("backup") {
        Some(e) => read_backup(rep, &e.value),
        None => Some(Backup::default()),
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
        backup: backup?,
    };
    rep.errors.is_empty().then_some(config)
}

/// Rejects an inline secret with a message saying where secrets go instead.
pub(super) fn refuse_inline_secret(
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

pub(super) fn resolve(base_dir: &Path, p: &str) -> Result<PathBuf, String> {
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

pub(super) fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("expected an IP address like \"192.168.1.1\" or \"fd00::1\", got {s:?}")
    })
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
