//! `[cluster]` (name, control-plane count, expected nodes, formation timeout, join parallelism,
//! secret file, api address, standbys, replace-after) and
//! `[microk8s]` (snap channel, offline snaps).

use std::path::Path;

use super::{
    refuse_inline_secret, resolve, Spans, DEFAULT_CHANNEL, DEFAULT_FORMATION_TIMEOUT,
    DEFAULT_SECRET_FILE,
};
use crate::diagnostic::Report;
use crate::model::*;
use crate::tree::{Node, TableReader};
use crate::values;

pub(super) fn read_cluster(
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
    let join_parallelism = match t.int(rep, "join-parallelism", 1, 64) {
        Some((n, _)) => Some(n as u32),
        None if t.has("join-parallelism") => None,
        None => Some(DEFAULT_JOIN_PARALLELISM),
    };
    let secret_file = match t.parsed(rep, "secret-file", |s| resolve(base_dir, s)) {
        Some(p) => Some(p),
        None if t.has("secret-file") => None,
        None => Some(base_dir.join(DEFAULT_SECRET_FILE)),
    };
    let api_address = match t.str(rep, "api-address") {
        Some((s, span)) => {
            spans.api_address = Some(span.clone());
            match parse_api_address(s) {
                Ok(a) => Some(a),
                Err(m) => {
                    rep.error(span, "cluster.api-address", m);
                    None
                }
            }
        }
        None => None,
    };
    let bad_api_address = t.has("api-address") && api_address.is_none();
    let standbys = t.int(rep, "standbys", 0, 6).map(|(n, span)| {
        spans.standbys = Some(span.clone());
        n as u8
    });
    let bad_standbys = t.has("standbys") && standbys.is_none();
    let replace_after = match t.str(rep, "replace-after") {
        Some((s, span)) => match values::parse_duration(s) {
            Ok(d) if (MIN_REPLACE_AFTER..=MAX_REPLACE_AFTER).contains(&d) => Some(d),
            Ok(d) => {
                rep.error(
                    span,
                    "cluster.replace-after",
                    format!(
                        "expected a duration from 1m to 30 days (a member unseen this long is removed), got {}s",
                        d.as_secs()
                    ),
                );
                None
            }
            Err(m) => {
                rep.error(span, "cluster.replace-after", m);
                None
            }
        },
        None if t.has("replace-after") => None,
        None => Some(DEFAULT_REPLACE_AFTER),
    };
    let api_check_interval = match t.str(rep, "api-check-interval") {
        Some((s, span)) => match values::parse_duration(s) {
            Ok(d)
                if (DEFAULT_API_CHECK_INTERVAL..=MAX_API_CHECK_INTERVAL).contains(&d)
                    && d.subsec_nanos() == 0 =>
            {
                Some(d)
            }
            Ok(d) => {
                rep.error(
                    span,
                    "cluster.api-check-interval",
                    format!(
                        "expected whole seconds from 1s to 10s (keepalived's check interval), got {:?}",
                        d
                    ),
                );
                None
            }
            Err(m) => {
                rep.error(span, "cluster.api-check-interval", m);
                None
            }
        },
        None if t.has("api-check-interval") => None,
        None => Some(DEFAULT_API_CHECK_INTERVAL),
    };
    refuse_inline_secret(
        rep,
        &mut t,
        &["secret", "token"],
        "create the secret with `imagebuilder secret new PATH` and set `secret-file`",
    );
    t.finish(rep);
    let control_plane = control_plane?;
    if bad_expected || bad_api_address || bad_standbys {
        return None;
    }
    Some(Cluster {
        name: name?,
        control_plane,
        expected_nodes: expected_nodes.unwrap_or(u32::from(control_plane)),
        formation_timeout: formation_timeout?,
        join_parallelism: join_parallelism?,
        secret_file: secret_file?,
        api_address,
        standbys: standbys.unwrap_or_else(|| default_standbys(control_plane)),
        replace_after: replace_after?,
        api_check_interval: api_check_interval?,
    })
}

/// `"auto"` or one unicast IPv4 address (not unspecified, loopback, multicast, link-local or
/// broadcast).
fn parse_api_address(s: &str) -> Result<ApiAddress, String> {
    if s.trim() == "auto" {
        return Ok(ApiAddress::Auto);
    }
    let ip: std::net::IpAddr = s.trim().parse().map_err(|_| {
        format!("expected \"auto\" or an IP address like \"192.168.1.10\", got {s:?}")
    })?;
    let link_local = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local {
        return Err(format!(
            "expected a unicast address on the nodes' network, got {ip}"
        ));
    }
    if ip.is_ipv6() {
        // The agent's keepalived instance refuses it too (VRRPv3 has no authentication): say
        // so here rather than let every node report that it cannot hold the address.
        return Err(format!(
            "{ip} is IPv6: the floating address is held through keepalived with VRRPv2 authentication, which is IPv4 only; use an IPv4 address"
        ));
    }
    Ok(ApiAddress::Fixed(ip))
}

pub(super) fn read_microk8s(
    rep: &mut Report<'_>,
    node: &Node,
    base_dir: &Path,
) -> Option<Microk8s> {
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
