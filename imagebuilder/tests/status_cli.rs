//! `imagebuilder status` / `kubeconfig` refuse bad input before touching the network, with
//! messages that name the file.

mod cli_support;

use std::os::unix::fs::PermissionsExt;

use cli_support::imagebuilder;

#[test]
fn bad_config_or_secret_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    for sub in ["status", "kubeconfig"] {
        let out = imagebuilder(&[sub, "--config", missing.to_str().unwrap()]);
        assert_eq!(out.code(), Some(1), "{sub}: {}", out.stderr);
        assert!(out.stderr.contains("missing.toml"), "{}", out.stderr);

        let out = imagebuilder(&[sub]);
        assert_eq!(
            out.code(),
            Some(2),
            "{sub} without --config/--secret is a usage error"
        );
    }

    let open = dir.path().join("open.secret");
    std::fs::write(&open, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = imagebuilder(&["status", "--secret", open.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("open.secret") && out.stderr.contains("chmod 600"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(&"ab".repeat(32)),
        "the secret was printed"
    );

    // A config with errors lists them.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[cluster]\nname = \"Not A Label\"\n").unwrap();
    let out = imagebuilder(&["kubeconfig", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("bad.toml"), "{}", out.stderr);
    assert!(out.stderr.contains("cluster.name"), "{}", out.stderr);
}
