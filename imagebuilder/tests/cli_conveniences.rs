//! The CLI conveniences, run as a user would: shell completions and man pages, `imagebuilder
//! flash` onto a regular file (needs `bmaptool`, Debian package bmap-tools), and `imagebuilder qemu` mounted as a subcommand.

mod cli_support;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use cli_support::imagebuilder;
use rackseed_host::command::Cmd;

#[test]
fn completions_name_every_subcommand_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = imagebuilder(&["completions", shell]);
        assert_eq!(out.code(), Some(0), "{shell}: {}", out.stderr);
        for sub in [
            "status",
            "kubeconfig",
            "flash",
            "qemu",
            "validate",
            "manpages",
        ] {
            assert!(
                out.stdout.contains(sub),
                "{shell} completions lack {sub}:\n{}",
                out.stdout
            );
        }
    }
    let out = imagebuilder(&["completions", "no-such-shell"]);
    assert_eq!(out.code(), Some(2), "clap rejects an unknown shell");
}

fn assert_man_page(path: &Path, mention: &str) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("man page {} missing: {e}", path.display()));
    assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
    assert!(
        text.contains(mention),
        "{} lacks {mention:?}",
        path.display()
    );
}

#[test]
fn man_pages_one_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = imagebuilder(&["manpages", dir.path().to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for (page, mention) in [
        ("imagebuilder.1", "imagebuilder"),
        ("imagebuilder-status.1", "\\-\\-wait"),
        ("imagebuilder-kubeconfig.1", "\\-\\-secret"),
        ("imagebuilder-flash.1", "\\-\\-bmap"),
        ("imagebuilder-qemu-up.1", "\\-\\-nodes"),
        ("imagebuilder-completions.1", "SHELL"),
    ] {
        assert_man_page(&dir.path().join(page), mention);
    }
    assert!(out.stdout.contains("man pages into"), "{}", out.stdout);

    let out = imagebuilder(&["manpages", "/proc/no-such-dir/x"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("/proc/no-such-dir/x"), "{}", out.stderr);
}

#[test]
fn flash_subcommand_writes_a_file_target_only_with_allow_file_and_refuses_without_yes_off_a_terminal(
) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("tiny.img");
    let mut f = std::fs::File::create(&img).unwrap();
    f.set_len(4 << 20).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[0x5a; 9000]).unwrap();
    drop(f);
    // Beside the image, where `flash` looks by default.
    let bmap = dir.path().join("tiny.bmap");
    Cmd::new("bmaptool", Duration::from_secs(60))
        .args(["create", "-o"])
        .arg(&bmap)
        .arg(&img)
        .run_blocking()
        .expect("bmaptool create (Debian package bmap-tools) must be installed");
    let target = dir.path().join("card.bin");
    std::fs::File::create(&target).unwrap();
    let (i, t) = (img.to_str().unwrap(), target.to_str().unwrap());

    let out = imagebuilder(&["flash", i, t, "--yes"]);
    assert_eq!(out.code(), Some(1), "a regular file needs --allow-file");
    assert!(out.stderr.contains("--allow-file"), "{}", out.stderr);
    let out = imagebuilder(&["flash", i, t, "--allow-file"]);
    assert_eq!(
        out.code(),
        Some(1),
        "must refuse without --yes and without a terminal"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        0,
        "nothing written"
    );

    let out = imagebuilder(&["flash", i, t, "--yes", "--allow-file"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("flashed"), "{}", out.stdout);
    let written = std::fs::read(&target).unwrap();
    assert_eq!(&written[(1 << 20)..(1 << 20) + 9000], &[0x5a; 9000][..]);
}

#[test]
fn qemu_is_a_subcommand() {
    let out = imagebuilder(&["qemu", "--help"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for sub in ["up", "status", "kill", "down"] {
        assert!(out.stdout.contains(sub), "{}", out.stdout);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = imagebuilder(&["qemu", "status", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("no cluster"), "{}", out.stderr);
}
