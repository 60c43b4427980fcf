//! `imagebuilder validate` as a user runs it: the real binary, exit codes, and where the
//! messages go (warnings and errors on stderr, the `ok:` summary on stdout).

mod cli_support;

use std::path::{Path, PathBuf};

use rackseed_host::command::Output;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `imagebuilder args` from the repository's root, where the example configs are.
fn imagebuilder(args: &[&str]) -> Output {
    cli_support::imagebuilder_in(&repo(), args)
}

#[test]
fn every_example_config_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let rel = path
            .strip_prefix(repo())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let out = imagebuilder(&["validate", &rel]);
        assert_eq!(out.code(), Some(0), "{rel}:\n{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.starts_with("ok: cluster "),
            "{rel}: {}",
            out.stdout
        );
        assert!(!out.stderr.contains("error"), "{rel}: {}", out.stderr);
        n += 1;
    }
    assert!(n >= 4, "expected the four example configs, found {n}");
}

#[test]
fn warnings_are_printed_and_do_not_fail() {
    let out = imagebuilder(&["validate", "configs/rpi-homelab.toml"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning: configs/rpi-homelab.toml:")
            && out
                .stderr
                .contains("addons.storage: hostpath storage is not suitable"),
        "{}",
        out.stderr
    );
}

#[test]
fn unknown_top_level_key_fails_with_its_line() {
    let out = imagebuilder(&["validate", "tests/fixtures/config/unknown-top-level.toml"]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains(
            "error: tests/fixtures/config/unknown-top-level.toml:8:2: extras: unknown key"
        ),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("ok:"));
}

#[test]
fn invalid_value_fails_with_its_line() {
    let out = imagebuilder(&["validate", "tests/fixtures/config/invalid-value.toml"]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains(
            "tests/fixtures/config/invalid-value.toml:3:17: cluster.control-plane: expected 1, 3, 5 or 7"
        ),
        "{}",
        out.stderr
    );
}

#[test]
fn all_errors_of_a_file_are_printed() {
    let out = imagebuilder(&["validate", "tests/fixtures/config/many-errors.toml"]);
    assert_ne!(out.code(), Some(0));
    let errors = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .count();
    assert_eq!(errors, 12, "{}", out.stderr);
    assert!(out.stderr.contains("12 errors found"), "{}", out.stderr);
}

#[test]
fn missing_file_fails_cleanly() {
    let out = imagebuilder(&["validate", "configs/does-not-exist.toml"]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr
            .contains("configs/does-not-exist.toml: cannot read config file"),
        "{}",
        out.stderr
    );
}

#[test]
fn usage_errors_exit_non_zero() {
    let out = imagebuilder(&["validate"]);
    assert_eq!(out.code(), Some(2), "clap usage error: {}", out.stderr);
    let out = imagebuilder(&["--help"]);
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout.contains("validate") && out.stdout.contains("secret"));
}
