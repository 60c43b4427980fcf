//! `[[nodes]] labels = { ... }`: Kubernetes label syntax, reserved prefixes, and every bad key
//! or value reported at its own line and column with its field path.

mod common;

use common::{assert_diag, cluster, parse};
use rackseed_config::Diagnostic;

/// A config whose second `[[nodes]]` entry has `labels` on line 13.
fn config(labels: &str) -> String {
    cluster("")
        + &format!(
            "\n[[nodes]]\nmac = \"dc:a6:32:00:00:01\"\nhostname = \"n1\"\n\n\
             [[nodes]]\nlabels = {labels}\nmac = \"dc:a6:32:00:00:02\"\nhostname = \"n2\"\n"
        )
}

#[track_caller]
fn assert_error(diags: &[Diagnostic], line: usize, col: usize, field: &str, needle: &str) {
    assert_diag(diags, line, Some(col), field, needle);
}

#[test]
fn labels_are_read_in_order_and_default_to_none() {
    let c = parse(&config(
        r#"{ "example.com/rack" = "r1", zone = "", "node-role.kubernetes.io/storage" = "true", "topology.kubernetes.io/zone" = "hall-a" }"#,
    ))
    .unwrap()
    .config;
    assert!(c.nodes[0].labels.is_empty());
    let l: Vec<(&str, &str)> = c.nodes[1]
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        l,
        [
            ("example.com/rack", "r1"),
            ("node-role.kubernetes.io/storage", "true"),
            ("topology.kubernetes.io/zone", "hall-a"),
            ("zone", ""),
        ]
    );
}

#[test]
fn every_bad_key_and_value_is_reported_at_its_position() {
    // `labels = ` puts the table's `{` at column 10.
    let diags = parse(&config(
        r#"{ "-x" = "a", ok = "b c", "kubernetes.io/hostname" = "h", "Example.com/y" = "v" }"#,
    ))
    .unwrap_err();
    let f = |k: &str| format!("nodes[1].labels.{k:?}");
    assert_error(&diags, 13, 12, &f("-x"), "start and end");
    assert_error(&diags, 13, 29, &f("ok"), "' '");
    assert_error(&diags, 13, 36, &f("kubernetes.io/hostname"), "reserved");
    assert_error(&diags, 13, 68, &f("Example.com/y"), "DNS subdomain");
    assert_eq!(diags.len(), 4, "{diags:?}");
}

#[test]
fn labels_must_be_a_table_of_strings() {
    let diags = parse(&config("[\"a=b\"]")).unwrap_err();
    assert_error(
        &diags,
        13,
        10,
        "nodes[1].labels",
        "expected a table of labels",
    );
    let diags = parse(&config("{ a = 1 }")).unwrap_err();
    assert_error(&diags, 13, 16, "nodes[1].labels.\"a\"", "expected a string");
    let long = "v".repeat(64);
    let diags = parse(&config(&format!("{{ a = \"{long}\" }}"))).unwrap_err();
    assert_error(&diags, 13, 16, "nodes[1].labels.\"a\"", "at most 63");
}
