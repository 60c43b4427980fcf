//! `firstboot check-config` runs the same check as `imagebuilder validate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rackseed_host::command::{Cmd, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn firstboot(args: &[&str]) -> Output {
    Cmd::new(env!("CARGO_BIN_EXE_firstboot"), Duration::from_secs(60))
        .args(args)
        .current_dir(repo())
        .output_blocking()
        .expect("running firstboot")
}

#[test]
fn check_config_accepts_an_example() {
    let out = firstboot(&["check-config", "configs/rack.toml"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stdout.starts_with("ok: cluster \"rack1\""),
        "{}",
        out.stdout
    );
}

#[test]
fn check_config_rejects_with_locations() {
    let out = firstboot(&[
        "check-config",
        "tests/fixtures/config/unknown-top-level.toml",
    ]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr
            .contains("unknown-top-level.toml:8:2: extras: unknown key"),
        "{}",
        out.stderr
    );
}

#[test]
fn verbose_flag_is_accepted() {
    let out = firstboot(&["-vv", "check-config", "configs/qemu-test.toml"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}
