//! `imagebuilder secret new`: a fresh 256-bit secret, mode 0600, never overwritten, never
//! printed.

mod cli_support;

use std::os::unix::fs::PermissionsExt;

use cli_support::imagebuilder;
use rackseed_protocol::secret::ClusterSecret;

#[test]
fn writes_a_new_secret_with_mode_0600_and_never_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lab.secret");
    let p = path.to_str().unwrap();

    let out = imagebuilder(&["secret", "new", p]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let hex = text.trim();
    assert_eq!(hex.len(), 64, "256 bits as hex");
    assert!(
        !out.stdout.contains(hex) && !out.stderr.contains(hex),
        "the secret was printed"
    );
    ClusterSecret::load(&path).expect("the file loads as a cluster secret");

    // A second secret is different (fresh randomness).
    let other = dir.path().join("other.secret");
    let out = imagebuilder(&["secret", "new", other.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_ne!(std::fs::read_to_string(&other).unwrap(), text);
}

#[test]
fn refuses_to_overwrite_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing.secret");
    std::fs::write(&path, "keep me\n").unwrap();
    let out = imagebuilder(&["secret", "new", path.to_str().unwrap()]);
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me\n");
}

#[test]
fn reports_an_unwritable_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/x.secret");
    let out = imagebuilder(&["secret", "new", path.to_str().unwrap()]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains(path.to_str().unwrap()),
        "{}",
        out.stderr
    );
}
