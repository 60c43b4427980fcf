//! `[addons]`: DNS (a bool or a table with upstream servers), MetalLB (`"auto"` or address
//! blocks that must not overlap), the storage addon, Longhorn's settings
//! (`[addons.longhorn]`: `data-path`, `min-free-space`, only with `storage = "longhorn"`) and
//! `offline` (a folder of staged packages and charts for the storage).

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use super::{parse_ip, resolve, Spans, DEFAULT_METALLB_AUTO_COUNT};
use crate::diagnostic::Report;
use crate::model::*;
use crate::tree::{node_str, Kind, Node, TableReader};
use crate::values;

pub(super) fn read_addons(
    rep: &mut Report<'_>,
    node: &Node,
    spans: &mut Spans,
    base_dir: &Path,
) -> Option<Addons> {
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
    let longhorn = match t.get("longhorn") {
        None => Some(Longhorn::default()),
        Some(e) => {
            if storage.is_some_and(|s| s != Storage::Longhorn) {
                rep.error(
                    &e.key_span,
                    "addons.longhorn",
                    "only used with storage = \"longhorn\"",
                );
                ok = false;
            }
            read_longhorn(rep, &e.value)
        }
    };
    let offline = t.parsed(rep, "offline", |s| resolve(base_dir, s));
    ok &= !t.has("offline") || offline.is_some();
    t.finish(rep);
    if !ok {
        return None;
    }
    Some(Addons {
        dns: dns?,
        metallb,
        storage: storage?,
        longhorn: longhorn?,
        offline,
    })
}

/// Folders Longhorn's data must not live in: virtual or volatile filesystems, and the boot
/// partition.
const BAD_DATA_ROOTS: [&str; 6] = ["/proc", "/sys", "/dev", "/run", "/tmp", "/boot"];

/// Checks `addons.longhorn.data-path`: an absolute, normalised folder path that is not `/`
/// and not on a virtual, volatile or boot filesystem.
pub fn check_data_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!(
            "expected an absolute folder path like \"/var/lib/longhorn\", got {s:?}"
        ));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || s.contains("//")
    {
        return Err(format!(
            "expected a normalised path without `.`, `..` or `//`, got {s:?}"
        ));
    }
    if s.chars().any(|c| c.is_control() || c == ',') {
        return Err(format!(
            "{s:?} holds a control character or a comma (the chart passes it in a list)"
        ));
    }
    if p == Path::new("/") {
        return Err("the root folder cannot be longhorn's data path; use a folder like \"/var/lib/longhorn\"".into());
    }
    if let Some(bad) = BAD_DATA_ROOTS.iter().find(|b| p.starts_with(b)) {
        return Err(format!(
            "{s:?} is under {bad}, which is not persistent disk storage"
        ));
    }
    Ok(p.to_path_buf())
}

fn read_longhorn(rep: &mut Report<'_>, node: &Node) -> Option<Longhorn> {
    let mut t = TableReader::open(rep, node, "addons.longhorn")?;
    let d = Longhorn::default();
    let data_path = match t.parsed(rep, "data-path", check_data_path) {
        Some(p) => Some(p),
        None if t.has("data-path") => None,
        None => Some(d.data_path),
    };
    let min_free = match t.str(rep, "min-free-space") {
        None if t.has("min-free-space") => None,
        None => Some(d.min_free_space),
        Some((s, span)) => match values::parse_size(s) {
            Ok(n) if n >= 1 << 30 => Some(n),
            Ok(_) => {
                rep.error(
                    span,
                    "addons.longhorn.min-free-space",
                    format!("{s:?} is below 1GiB; longhorn needs room for at least one replica"),
                );
                None
            }
            Err(m) => {
                rep.error(span, "addons.longhorn.min-free-space", m);
                None
            }
        },
    };
    t.finish(rep);
    Some(Longhorn {
        data_path: data_path?,
        min_free_space: min_free?,
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
