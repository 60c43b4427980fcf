//! `cluster.join-parallelism`: how many worker joins run at once. Default 8, 1 to 64, an
//! integer; every error at the value's line.

mod common;

use common::{assert_diag, cluster};
use rackseed_config::{self as config, Diagnostic, DEFAULT_JOIN_PARALLELISM};

/// A valid config with `join-parallelism = value` on line 3 when given.
fn parse(value: Option<&str>) -> Result<config::Loaded, Vec<Diagnostic>> {
    let line = value.map_or(String::new(), |v| format!("join-parallelism = {v}\n"));
    common::parse(&cluster(&line))
}

#[test]
fn join_parallelism_defaults_to_eight_and_takes_one_to_sixty_four() {
    assert_eq!(DEFAULT_JOIN_PARALLELISM, 8);
    let cfg = parse(None).expect("valid").config;
    assert_eq!(cfg.cluster.join_parallelism, DEFAULT_JOIN_PARALLELISM);
    for n in [1u32, 3, 64] {
        let cfg = parse(Some(&n.to_string())).expect("valid").config;
        assert_eq!(cfg.cluster.join_parallelism, n);
    }
}

#[test]
fn join_parallelism_out_of_range_or_not_an_integer_is_refused_at_its_line() {
    for (v, needle) in [
        ("0", "from 1 to 64, got 0"),
        ("65", "from 1 to 64, got 65"),
        ("-3", "from 1 to 64"),
        ("\"8\"", "expected an integer"),
        ("2.5", "expected an integer"),
    ] {
        let diags = parse(Some(v)).expect_err(v);
        assert_diag(&diags, 3, None, "cluster.join-parallelism", needle);
    }
}
