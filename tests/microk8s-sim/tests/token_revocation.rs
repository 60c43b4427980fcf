//! Persistent join tokens are revocable (rackseed's secret rotation relies on it): the adapter's
//! `replace_persistent_token` edits `$SNAP_DATA/credentials/persistent-cluster-tokens.txt` and the
//! cluster agent answers the next join from the file, as the real one does
//! (canonical/microk8s-cluster-agent `pkg/util/token.go` `IsValidToken`): the revoked token is
//! refused with `500 invalid token` (join exits 6), the new one is accepted, with no restart.
//! Needs root (network namespaces). Run: `cargo test -p microk8s-sim --test token_revocation`.

mod support;

use firstboot::system::microk8s::{
    persistent_tokens_file, replace_persistent_token, TokenReplacement,
};
use netns_lab::Lab;
use rackseed_protocol::secret::ClusterSecret;
use support::*;

#[test]
fn a_revoked_persistent_token_is_refused_and_the_new_one_joins() {
    let rt = runtime();
    let _g = rt.enter();
    let lab = Lab::new(3).expect("creating the network lab (run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let mut n: Vec<SimNode> = (0..3)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for x in &mut n {
        x.install_and_start();
    }
    let old = secret().microk8s_token();
    let new = ClusterSecret::from_bytes([43; 32]).microk8s_token();
    // Install put the launch config's token where the agent reads it.
    let file = persistent_tokens_file(&n[0].dir);
    let text = std::fs::read_to_string(&file).expect("the persistent token file");
    assert!(text.lines().any(|l| l == old), "{text:?}");
    let url = |t: &str| format!("{}:25000/{t}", n[0].host.addr);
    let o = mk(&n[1], &["join", &url(&old), "--worker"]);
    assert_eq!(o.code(), Some(0), "the persistent token joins: {o:?}");

    // Rotation: new token in, old one out.
    let r = replace_persistent_token(&file, &new, std::slice::from_ref(&old)).unwrap();
    assert_eq!(r, TokenReplacement::Replaced { changed: true });
    let o = mk(&n[2], &["join", &url(&old), "--worker"]);
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(
        o.stdout.contains("Connection failed. invalid token (500)."),
        "{o:?}"
    );
    let o = mk(&n[2], &["join", &url(&new), "--worker"]);
    assert_eq!(
        o.code(),
        Some(0),
        "the new token joins without a restart: {o:?}"
    );
    // Neither token reached the command log in clear.
    let commands = std::fs::read_to_string(&log).unwrap();
    assert!(
        !commands.contains(&new) && !commands.contains(&old),
        "tokens logged"
    );
}
