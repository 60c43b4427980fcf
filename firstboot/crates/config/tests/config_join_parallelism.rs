//! `cluster.join-parallelism`: how many worker joins run at once. Default 8, 1 to 64, an
//! integer; every error at the value's line.

use std::path::Path;

use rackseed_config::{self as config, Diagnostic, DEFAULT_JOIN_PARALLELISM};

fn parse(value: Option<&str>) -> Result<config::Loaded, Vec<Diagnostic>> {
    let line = value.map_or(String::new(), |v| format!("join-parallelism = {v}\n"));
    let text = format!(
        "[cluster]\nname = \"lab\"\n{line}\n[image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n"
    );
    config::parse(&text, Path::new("/cfg/lab.toml")).map_err(|e| e.diagnostics)
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
        assert!(
            diags.iter().any(|d| d.line == 3
                && d.field == "cluster.join-parallelism"
                && d.message.contains(needle)),
            "{v}: no cluster.join-parallelism error at line 3 containing {needle:?}: {diags:?}"
        );
    }
}
