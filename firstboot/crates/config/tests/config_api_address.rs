//! `cluster.api-address`: the floating API address. Fixed or `"auto"`, refused where MetalLB
//! would hand it out, where a node already has it, off the inventory's subnets, and malformed;
//! every error at the value's line.

mod common;

use common::{assert_diag, cluster, parse};
use rackseed_config::{ApiAddress, Diagnostic};

#[track_caller]
fn assert_error(diags: &[Diagnostic], line: usize, needle: &str) {
    assert_diag(diags, line, None, "cluster.api-address", needle);
}

/// A valid config with `api-address = api` on line 3, `rest` after `[image]`.
fn config(api: &str, rest: &str) -> String {
    cluster(&format!("api-address = {api}\n")) + rest
}

const INVENTORY: &str = r#"
[network]
addressing = "static"
gateway = "192.168.1.1"

[[nodes]]
mac = "aa:bb:cc:00:00:01"
hostname = "n1"
address = "192.168.1.11/24"

[[nodes]]
mac = "aa:bb:cc:00:00:02"
hostname = "n2"
address = "192.168.1.12/24"
"#;

#[test]
fn absent_fixed_and_auto() {
    let none = parse(&config("\"auto\"", "")).unwrap();
    assert_eq!(none.config.cluster.api_address, Some(ApiAddress::Auto));
    let fixed = parse(&config("\"192.168.1.10\"", INVENTORY)).unwrap();
    assert_eq!(
        fixed.config.cluster.api_address,
        Some(ApiAddress::Fixed("192.168.1.10".parse().unwrap()))
    );
    let text = config("\"auto\"", "").replace("api-address = \"auto\"\n", "");
    assert_eq!(parse(&text).unwrap().config.cluster.api_address, None);
}

#[test]
fn malformed_and_unusable_addresses_are_refused_at_their_line() {
    for (bad, needle) in [
        ("\"192.168.1\"", "expected \"auto\" or an IP address"),
        ("\"automatic\"", "expected \"auto\" or an IP address"),
        ("\"127.0.0.1\"", "unicast address"),
        ("\"0.0.0.0\"", "unicast address"),
        ("\"224.0.0.18\"", "unicast address"),
        ("\"169.254.1.1\"", "unicast address"),
        ("\"fe80::1\"", "unicast address"),
        (
            "\"fd00::10\"",
            "is IPv6: the floating address is held through keepalived",
        ),
        ("5", "expected a string"),
    ] {
        let diags = parse(&config(bad, "")).expect_err(bad);
        assert_error(&diags, 3, needle);
    }
}

#[test]
fn an_address_metallb_hands_out_is_refused() {
    let metallb = "\n[addons.metallb]\naddresses = [\"192.168.1.200-192.168.1.220\"]\n";
    let diags = parse(&config("\"192.168.1.210\"", metallb)).unwrap_err();
    assert_error(
        &diags,
        3,
        "lies inside addons.metallb.addresses[0] (192.168.1.200-192.168.1.220)",
    );
    parse(&config("\"192.168.1.199\"", metallb)).unwrap();
}

#[test]
fn a_nodes_own_address_and_another_subnet_are_refused() {
    let diags = parse(&config("\"192.168.1.12\"", INVENTORY)).unwrap_err();
    assert_error(&diags, 3, "is n2's own address (nodes[1].address)");
    let diags = parse(&config("\"10.0.0.10\"", INVENTORY)).unwrap_err();
    assert_error(
        &diags,
        3,
        "on none of the inventory's subnets (192.168.1.0/24)",
    );
}

#[test]
fn auto_needs_ipv4_nodes_and_one_control_plane_node_is_warned() {
    let v6 = INVENTORY
        .replace("192.168.1.11/24", "fd00::11/64")
        .replace("192.168.1.1\"", "fd00::1\"");
    let diags = parse(&config("\"auto\"", &v6)).unwrap_err();
    assert_error(
        &diags,
        3,
        "\"auto\" picks an IPv4 address, but nodes[0].address is IPv6",
    );
    let single = config("\"auto\"", "").replace("[cluster]\n", "[cluster]\ncontrol-plane = 1\n");
    let loaded = parse(&single).unwrap();
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.field == "cluster.api-address" && w.message.contains("one node")),
        "{:?}",
        loaded.warnings
    );
}
