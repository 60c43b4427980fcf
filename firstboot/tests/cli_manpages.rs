//! `firstboot manpages DIR` and `firstboot completions SHELL`, run as a user would.

use std::time::Duration;

use rackseed_host::command::{Cmd, Output};

fn firstboot(args: &[&str]) -> Output {
    Cmd::new(env!("CARGO_BIN_EXE_firstboot"), Duration::from_secs(60))
        .args(args)
        .output_blocking()
        .expect("running firstboot")
}

#[test]
fn man_pages_one_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = firstboot(&["manpages", dir.path().to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for want in [
        "firstboot.1",
        "firstboot-check-config.1",
        "firstboot-completions.1",
        "firstboot-manpages.1",
        "firstboot-run.1",
    ] {
        let page = dir.path().join(want);
        let text = std::fs::read_to_string(&page)
            .unwrap_or_else(|e| panic!("man page {} missing: {e}", page.display()));
        assert!(text.contains(".TH"), "{want}: {text}");
    }
    let check = std::fs::read_to_string(dir.path().join("firstboot-check-config.1")).unwrap();
    assert!(check.contains("CONFIG"), "{check}");
}

#[test]
fn completions_name_every_subcommand() {
    let out = firstboot(&["completions", "bash"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for sub in ["run", "status", "reset", "check-config"] {
        assert!(out.stdout.contains(sub), "completions lack {sub}");
    }
}
