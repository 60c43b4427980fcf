//! Rules that involve several sections: static addressing vs the inventory, node addresses
//! vs MetalLB blocks, storage addons that do not suit the cluster, control-plane and
//! expected-node counts, and an image without users. Each rule is an error or a warning
//! pointing at the value it is about.

use std::ops::Range;

use super::{NodeSpans, Spans};
use crate::diagnostic::Report;
use crate::model::*;
use crate::values;

/// The sections as far as they were read: rules run on whatever is available, so one run
/// reports cross-section problems even while some section has its own errors.
pub(super) struct Parts<'a> {
    pub(super) cluster: Option<&'a Cluster>,
    pub(super) addons: Option<&'a Addons>,
    pub(super) network: Option<&'a Network>,
    /// The inventory entries that read cleanly (aligned with `Spans::nodes`).
    pub(super) nodes: &'a [NodeEntry],
    /// Whether the file has any `[[nodes]]` entry at all (even ones with errors).
    pub(super) has_inventory: bool,
    pub(super) image: Option<&'a Image>,
}

/// Checks the rules that involve several sections; errors and warnings.
pub(super) fn cross_checks(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans) {
    check_addressing(rep, p, spans);
    check_metallb_vs_nodes(rep, p, spans);
    let Some(cluster) = p.cluster else { return };
    check_api_address(rep, p, spans, cluster);
    check_standbys(rep, spans, cluster);
    check_storage(rep, p, spans, cluster);
    check_node_counts(rep, p, spans, cluster);
    if p.image.is_some_and(|i| i.users.is_empty()) {
        rep.warn(
            &spans.users,
            "image.users",
            "no users: nobody can log in to the nodes over SSH",
        );
    }
}

/// `nodes[N].key` for the `i`-th clean inventory entry (N is its position in the file).
fn node_field(spans: &Spans, i: usize, key: &str) -> String {
    format!("nodes[{}].{key}", spans.nodes[i].index)
}

/// The span of one value of the `i`-th clean inventory entry, or of the whole entry.
fn node_value(
    spans: &Spans,
    i: usize,
    value: impl Fn(&NodeSpans) -> &Option<Range<usize>>,
) -> Range<usize> {
    let ns = &spans.nodes[i];
    value(ns).clone().unwrap_or(ns.entry.clone())
}

/// Whether the cluster is meant to have more than one node.
fn is_multi_node(p: &Parts<'_>, cluster: &Cluster) -> bool {
    cluster.expected_nodes > 1 || cluster.control_plane > 1 || p.nodes.len() > 1
}

/// Static addressing needs an inventory with an address for every entry; DHCP takes none.
fn check_addressing(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans) {
    match p.network.map(|n| &n.addressing) {
        Some(Addressing::Static { gateway, .. }) => {
            if !p.has_inventory {
                rep.error(
                    spans.addressing.as_ref().unwrap_or(&spans.cluster),
                    "network.addressing",
                    "static addressing needs an inventory: add a [[nodes]] entry with `address` for every machine",
                );
            }
            for (i, n) in p.nodes.iter().enumerate() {
                match n.address {
                    None => rep.error(
                        &spans.nodes[i].entry,
                        &node_field(spans, i, "address"),
                        "missing required key; expected an address like \"192.168.1.11/24\" (network.addressing is \"static\")",
                    ),
                    Some(a) if !a.contains(gateway) => rep.warn(
                        &node_value(spans, i, |n| &n.address),
                        &node_field(spans, i, "address"),
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
                        &node_value(spans, i, |n| &n.address),
                        &node_field(spans, i, "address"),
                        "only used with network.addressing = \"static\"; with DHCP the router assigns addresses",
                    );
                }
            }
        }
        None => {}
    }
}

/// Node addresses must not be handed out by MetalLB.
fn check_metallb_vs_nodes(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans) {
    let Some(Metallb::Blocks { blocks }) = p.addons.and_then(|a| a.metallb.as_ref()) else {
        return;
    };
    for (i, n) in p.nodes.iter().enumerate() {
        let Some(a) = n.address else { continue };
        if let Some(j) = blocks
            .iter()
            .position(|b| values::block_contains(b, a.addr()))
        {
            rep.error(
                &node_value(spans, i, |n| &n.address),
                &node_field(spans, i, "address"),
                format!(
                    "{} lies inside addons.metallb.addresses[{j}] ({}); MetalLB would hand it out",
                    a.addr(),
                    values::format_block(&blocks[j])
                ),
            );
        }
    }
}

/// The floating API address: not handed out by MetalLB, not a node's own address, on the
/// nodes' subnet when the inventory says what that is; `auto` needs IPv4 node addresses.
fn check_api_address(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans, cluster: &Cluster) {
    let Some(api) = cluster.api_address else {
        return;
    };
    let span = spans.api_address.clone().unwrap_or(spans.cluster.clone());
    let field = "cluster.api-address";
    if cluster.control_plane == 1 {
        rep.warn(
            &span,
            field,
            "with control-plane = 1 the address has only one node to live on: it adds no availability",
        );
    }
    let ApiAddress::Fixed(ip) = api else {
        if let Some(i) = p
            .nodes
            .iter()
            .position(|n| n.address.is_some_and(|a| !a.addr().is_ipv4()))
        {
            rep.error(
                &span,
                field,
                format!(
                    "\"auto\" picks an IPv4 address, but {} is IPv6; write the address instead",
                    node_field(spans, i, "address")
                ),
            );
        }
        return;
    };
    if let Some(Metallb::Blocks { blocks }) = p.addons.and_then(|a| a.metallb.as_ref()) {
        if let Some(j) = blocks.iter().position(|b| values::block_contains(b, ip)) {
            rep.error(
                &span,
                field,
                format!(
                    "{ip} lies inside addons.metallb.addresses[{j}] ({}); MetalLB would hand it out to a service",
                    values::format_block(&blocks[j])
                ),
            );
        }
    }
    for (i, n) in p.nodes.iter().enumerate() {
        let Some(a) = n.address else { continue };
        if a.addr() == ip {
            rep.error(
                &span,
                field,
                format!(
                    "{ip} is {}'s own address ({}); the floating address must be a free one",
                    n.hostname,
                    node_field(spans, i, "address")
                ),
            );
        }
    }
    let subnets: Vec<_> = p.nodes.iter().filter_map(|n| n.address).collect();
    if !subnets.is_empty() && !subnets.iter().any(|a| a.contains(&ip)) {
        rep.error(
            &span,
            field,
            format!(
                "{ip} is on none of the inventory's subnets ({}); keepalived can only move an address within the nodes' network",
                subnets
                    .iter()
                    .map(|a| a.trunc().to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
}

/// Full members beyond MicroK8s' 3 voters and 3 standbys are spares: warned.
fn check_standbys(rep: &mut Report<'_>, spans: &Spans, cluster: &Cluster) {
    let full = u32::from(cluster.control_plane) + u32::from(cluster.standbys);
    if full > u32::from(MICROK8S_FULL_MEMBERS) {
        rep.warn(
            spans.standbys.as_ref().unwrap_or(&spans.cluster),
            "cluster.standbys",
            format!(
                "control-plane ({}) + standbys ({}) = {full} full members, but MicroK8s keeps 3 voters and 3 standbys: the other {} are spares, replicating the datastore without standing in",
                cluster.control_plane,
                cluster.standbys,
                full - u32::from(MICROK8S_FULL_MEMBERS)
            ),
        );
    }
}

/// Storage addons that do not suit the cluster's size, network or boards.
fn check_storage(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans, cluster: &Cluster) {
    let multi_node = is_multi_node(p, cluster);
    let storage_span = spans.storage.clone().unwrap_or(spans.cluster.clone());
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
            "longhorn is not a MicroK8s addon: it is installed with helm, which needs internet access at enable time unless addons.offline stages its chart and container images, and every node needs open-iscsi and an NFS client",
        ),
        Some(Storage::Mayastor) if matches!(target, Some(Target::Rpi4 | Target::Rpi5)) => rep.warn(
            &storage_span,
            "addons.storage",
            "mayastor reserves 1024 hugepages (2 GiB) on every node; Raspberry Pis with 4 GiB or less will be short of memory",
        ),
        _ => {}
    }
}

/// The control-plane count, expected nodes, inventory size and pinned roles agree.
fn check_node_counts(rep: &mut Report<'_>, p: &Parts<'_>, spans: &Spans, cluster: &Cluster) {
    let cp = cluster.control_plane;
    let expected = cluster.expected_nodes;
    let cluster_span = &spans.cluster;
    if let Some(Addressing::Static { .. }) = p.network.map(|n| &n.addressing) {
        let listed = p.nodes.len();
        let wanted = expected.max(u32::from(cp));
        if p.has_inventory && listed > 0 && (listed as u64) < u64::from(wanted) {
            rep.warn(
                spans.expected_nodes.as_ref().unwrap_or(cluster_span),
                "cluster.expected-nodes",
                format!(
                    "static addressing gives addresses only to the {listed} inventory nodes, but the cluster waits for {wanted}; formation falls back to the timeout"
                ),
            );
        }
    }
    if expected < u32::from(cp) {
        rep.warn(
            spans.expected_nodes.as_ref().unwrap_or(cluster_span),
            "cluster.expected-nodes",
            format!(
                "expected-nodes ({expected}) is below control-plane ({cp}): the cluster has {cp} control-plane nodes only once more machines join"
            ),
        );
    }
    if cp == 1 && is_multi_node(p, cluster) {
        rep.warn(
            spans.control_plane.as_ref().unwrap_or(cluster_span),
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
            &node_value(spans, i, |n| &n.role),
            &node_field(spans, i, "role"),
            format!(
                "{} nodes are pinned as control-plane but cluster.control-plane is {cp}; the extra ones become dqlite standbys",
                pinned.len()
            ),
        );
    }
}
