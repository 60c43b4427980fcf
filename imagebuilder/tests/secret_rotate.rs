//! `imagebuilder secret rotate` with bad input or nothing to rotate: a clear error, exit 1, and
//! nothing lost or left behind (the secret file as it was, no pending, `.old` or temporary
//! file). The rotation itself, against running agents, is `firstboot`'s `attack_rotation` test.
//! The "no node answers" case runs in a network namespace of its own (root; iproute2), so no
//! cluster on this machine can answer.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cli_support::{imagebuilder, BIN, RUN_BOUND};
use netns_lab::Lab;
use rackseed_protocol::secret::ClusterSecret;

/// The folder's file names, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("lab.secret");
    let s = secret.to_str().unwrap();

    // No secret file.
    let out = imagebuilder(&["secret", "rotate", "--secret", s]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("lab.secret"), "{}", out.stderr);
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));

    // Neither --config nor --secret.
    let out = imagebuilder(&["secret", "rotate"]);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);

    let old = ClusterSecret::generate();
    old.write_new(&secret).unwrap();
    let hex = old.to_file_contents().trim().to_string();

    // A secret others can read is refused (and named), not rotated.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = imagebuilder(&["secret", "rotate", "--secret", s]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A --revoke that is no node id.
    let out = imagebuilder(&["secret", "rotate", "--secret", s, "--revoke", "Not An Id!"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("--revoke"), "{}", out.stderr);

    // A malformed pending secret from an earlier run is named and left alone.
    let pending = dir.path().join("lab.secret.new");
    std::fs::write(&pending, "half a secret").unwrap();
    std::fs::set_permissions(&pending, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = imagebuilder(&["secret", "rotate", "--secret", s]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("lab.secret.new"), "{}", out.stderr);
    assert!(!out.stderr.contains("half a secret"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&pending).unwrap(), "half a secret");
    std::fs::remove_file(&pending).unwrap();

    assert_eq!(names(dir.path()), ["lab.secret"]);
    assert_eq!(ClusterSecret::load(&secret).unwrap(), old);
    for o in [&out.stdout, &out.stderr] {
        assert!(!o.contains(&hex), "the secret was printed");
    }
}

#[test]
fn with_no_node_answering_nothing_is_switched_or_left_behind() {
    let lab = Lab::new(1).expect("creating the network lab (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("lab.secret");
    let old = ClusterSecret::generate();
    old.write_new(&secret).unwrap();
    let out = lab
        .host(0)
        .cmd(BIN, RUN_BOUND)
        .args(["secret", "rotate", "--secret"])
        .arg(&secret)
        .args(["--discover", "2s", "--timeout", "2s"])
        .output_blocking()
        .expect("running imagebuilder");
    assert_eq!(out.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("no node of this cluster answered")
            && out.stderr.contains("nothing changed"),
        "{}",
        out.stderr
    );
    assert_eq!(
        names(dir.path()),
        ["lab.secret"],
        "no pending, .old or temporary file"
    );
    assert_eq!(ClusterSecret::load(&secret).unwrap(), old);
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
