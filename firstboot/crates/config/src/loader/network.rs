//! `[network]`: the interface, DHCP or static addressing (gateway, DNS servers) and the
//! optional `[network.wifi]` table.

use std::path::Path;

use super::{parse_ip, refuse_inline_secret, resolve, Spans};
use crate::diagnostic::Report;
use crate::model::*;
use crate::tree::{Kind, Node, TableReader};
use crate::values;

pub(super) fn read_network(
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
