//! Secret rotation on a node: carries out the steps `imagebuilder secret rotate` sends over the
//! coordinator (`POST /v1/rotate`; the protocol is in
//! `rackseed_protocol::coordinator::rotation`).
//!
//! The [`Rotator`] holds the node's [`Keyring`] (shared with its discovery, coordinator server
//! and client) and the files a secret lives in:
//! - **stage**: the ring also accepts the new secret, for `ROTATION_GRACE`; nothing is written.
//! - **commit**, in an order a power cut at any point leaves recoverable by running the
//!   rotation again: (1) MicroK8s' persistent token file gets the new token and loses the old
//!   one (and any other token the ring still accepts), (2) the launch config is rewritten with
//!   the new token, (3) the secret file (the config's `secret-file`) is replaced atomically,
//!   mode 0600, (4) the ring switches: announcements and requests are signed with the new
//!   secret, the old one is accepted for `ROTATION_GRACE` more. Before (3) a restart comes up
//!   on the old secret and the next rotation run redoes every step; after (3) it comes up on
//!   the new one. A repeated commit of the current secret re-checks (1) and (2).
//! - **finish**: the ring forgets every secret but the current one, which must be the one the
//!   workstation names (by its cluster tag).
//!
//! The old secret is not kept on the node: revocation means a node's copy is worthless once
//! the cluster moved. Steps run one at a time. Nothing here logs a secret or a token; errors
//! name files and steps only.
//!
//! To extend (e.g. another credential derived from the secret): replace it in `commit` before
//! step (3), idempotently.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::system::microk8s::{
    replace_persistent_token, rewrite_launch_config_token, TokenReplacement,
};
use rackseed_protocol::coordinator::rotation::ROTATION_GRACE;
use rackseed_protocol::coordinator::{RotationAck, RotationHandler, RotationRequest, RotationStep};
use rackseed_protocol::secret::{ClusterSecret, Keyring};

/// The files that hold the secret and what is derived from it, on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationFiles {
    /// The config's `secret-file` (read at every agent start).
    pub secret_file: PathBuf,
    /// MicroK8s' launch config (`/etc/microk8s.yaml`), holding `persistentClusterToken`.
    pub launch_config: PathBuf,
    /// `$SNAP_DATA/credentials/persistent-cluster-tokens.txt`.
    pub persistent_tokens: PathBuf,
}

/// Carries out rotation steps on this node (see the module docs).
pub struct Rotator {
    node_id: String,
    keyring: Arc<Keyring>,
    files: RotationFiles,
    /// One step at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Rotator {
    pub fn new(node_id: &str, keyring: Arc<Keyring>, files: RotationFiles) -> Self {
        Rotator {
            node_id: node_id.to_string(),
            keyring,
            files,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// The handler to install on the coordinator.
    pub fn handler(self: Arc<Self>) -> RotationHandler {
        Arc::new(move |req: RotationRequest| {
            let me = self.clone();
            Box::pin(async move { me.apply(req).await.map_err(|e| format!("{e:#}")) })
        })
    }

    /// Carries out one step and says where this node's keys stand afterwards.
    pub async fn apply(&self, req: RotationRequest) -> Result<RotationAck> {
        let _one_at_a_time = self.busy.lock().await;
        let step = req.step.name();
        let token = match req.step {
            RotationStep::Stage { secret } => {
                let new = parse_secret(&secret)?;
                self.keyring
                    .accept_also(new, Instant::now() + ROTATION_GRACE);
                None
            }
            RotationStep::Commit { secret } => {
                let new = parse_secret(&secret)?;
                let this = tokio::task::block_in_place(|| self.commit(new))?;
                Some(this)
            }
            RotationStep::Finish { tag } => {
                let current = self.keyring.current();
                if current.tag() != tag {
                    bail!(
                        "this node signs with the secret tagged {}, not {tag}: commit the rotation first",
                        current.tag()
                    );
                }
                self.keyring.forget_others();
                None
            }
        };
        tracing::info!(requester = %req.from, step, "secret rotation step done");
        Ok(self.ack(token))
    }

    /// The commit step (see the module docs for the order); returns what happened to the
    /// MicroK8s token, in words.
    fn commit(&self, new: ClusterSecret) -> Result<String> {
        let now = Instant::now();
        let new_token = new.microk8s_token();
        let revoke: Vec<String> = self
            .keyring
            .accepted(now)
            .iter()
            .filter(|k| k.secret() != &new)
            .map(|k| k.secret().microk8s_token())
            .collect();
        let tokens = &self.files.persistent_tokens;
        let replaced =
            replace_persistent_token(tokens, &new_token, &revoke).with_context(|| {
                format!(
                    "replacing the persistent join token in {}",
                    tokens.display()
                )
            })?;
        let launch = &self.files.launch_config;
        rewrite_launch_config_token(launch, &new_token)
            .with_context(|| format!("rewriting the token in {}", launch.display()))?;
        let secret_file = &self.files.secret_file;
        new.replace_file(secret_file)
            .with_context(|| format!("storing the new secret in {}", secret_file.display()))?;
        let switched = self.keyring.switch_to(new, now + ROTATION_GRACE).is_some();
        if switched {
            tracing::info!(
                "switched to the new cluster secret; the old one is accepted for the grace period"
            );
        }
        Ok(match replaced {
            TokenReplacement::Replaced { changed: true } => {
                format!(
                    "new persistent join token in place, {} old one(s) revoked",
                    revoke.len()
                )
            }
            TokenReplacement::Replaced { changed: false } => {
                "persistent join token already replaced".to_string()
            }
            TokenReplacement::NotInstalled => {
                "MicroK8s not installed yet: the launch config carries the new token".to_string()
            }
        })
    }

    fn ack(&self, token: Option<String>) -> RotationAck {
        let accepted = self.keyring.accepted(Instant::now());
        RotationAck {
            node_id: self.node_id.clone(),
            current_tag: accepted[0].tag().to_string(),
            accepted_tags: accepted.iter().map(|k| k.tag().to_string()).collect(),
            token,
        }
    }
}

fn parse_secret(hex: &str) -> Result<ClusterSecret> {
    ClusterSecret::from_hex(hex)
        .context("the new secret in the rotation step is not 64 hex characters")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::microk8s::{persistent_tokens_file, render_launch_config};
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    struct Node {
        _dir: tempfile::TempDir,
        files: RotationFiles,
        ring: Arc<Keyring>,
        rotator: Rotator,
    }

    fn node(old: &ClusterSecret, installed: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let snap_data = dir.path().join("snap");
        let files = RotationFiles {
            secret_file: dir.path().join("cluster.secret"),
            launch_config: dir.path().join("microk8s.yaml"),
            persistent_tokens: persistent_tokens_file(&snap_data),
        };
        old.write_new(&files.secret_file).unwrap();
        std::fs::write(
            &files.launch_config,
            render_launch_config(&old.microk8s_token(), &Default::default()),
        )
        .unwrap();
        if installed {
            std::fs::create_dir_all(files.persistent_tokens.parent().unwrap()).unwrap();
            std::fs::write(
                &files.persistent_tokens,
                format!(
                    "{}\nmanual-token-kept-by-the-operator-0000000000\n",
                    old.microk8s_token()
                ),
            )
            .unwrap();
        }
        let ring = Arc::new(Keyring::new(old.clone()));
        let rotator = Rotator::new("node-a", ring.clone(), files.clone());
        Node {
            _dir: dir,
            files,
            ring,
            rotator,
        }
    }

    fn req(step: RotationStep) -> RotationRequest {
        RotationRequest {
            from: "imagebuilder".into(),
            step,
        }
    }

    fn hex(s: &ClusterSecret) -> String {
        s.to_file_contents().trim().to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn stage_commit_finish_moves_secret_token_and_keys_idempotently() {
        let (old, new) = (
            ClusterSecret::from_bytes([1; 32]),
            ClusterSecret::from_bytes([2; 32]),
        );
        let n = node(&old, true);
        let ack = n
            .rotator
            .apply(req(RotationStep::Stage { secret: hex(&new) }))
            .await
            .unwrap();
        assert_eq!(ack.current_tag, old.cluster_tag());
        assert_eq!(ack.accepted_tags, [old.cluster_tag(), new.cluster_tag()]);
        assert_eq!(
            ClusterSecret::load(&n.files.secret_file).unwrap(),
            old,
            "staging writes nothing"
        );
        for _ in 0..2 {
            let ack = n
                .rotator
                .apply(req(RotationStep::Commit { secret: hex(&new) }))
                .await
                .unwrap();
            assert_eq!(ack.current_tag, new.cluster_tag());
        }
        assert_eq!(ClusterSecret::load(&n.files.secret_file).unwrap(), new);
        assert_eq!(mode(&n.files.secret_file), 0o600);
        let tokens = std::fs::read_to_string(&n.files.persistent_tokens).unwrap();
        assert!(tokens.lines().any(|l| l == new.microk8s_token()));
        assert!(
            !tokens.contains(&old.microk8s_token()),
            "the old token is revoked"
        );
        assert!(
            tokens.contains("manual-token-kept-by-the-operator"),
            "other tokens stay"
        );
        assert_eq!(mode(&n.files.persistent_tokens), 0o600);
        let launch = std::fs::read_to_string(&n.files.launch_config).unwrap();
        assert!(launch.contains(&new.microk8s_token()) && !launch.contains(&old.microk8s_token()));
        assert!(
            n.ring.for_tag(&old.cluster_tag(), Instant::now()).is_some(),
            "grace period"
        );
        let ack = n
            .rotator
            .apply(req(RotationStep::Finish {
                tag: new.cluster_tag(),
            }))
            .await
            .unwrap();
        assert_eq!(ack.accepted_tags, [new.cluster_tag()]);
        // A finish for another secret is refused and changes nothing.
        let e = n
            .rotator
            .apply(req(RotationStep::Finish {
                tag: old.cluster_tag(),
            }))
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("commit the rotation first"),
            "{e:#}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn bad_input_changes_nothing_and_never_echoes_the_secret() {
        let old = ClusterSecret::from_bytes([1; 32]);
        let n = node(&old, false);
        let bogus = "zz".repeat(32);
        let e = n
            .rotator
            .apply(req(RotationStep::Commit {
                secret: bogus.clone(),
            }))
            .await
            .unwrap_err();
        assert!(!format!("{e:#}").contains(&bogus));
        assert_eq!(ClusterSecret::load(&n.files.secret_file).unwrap(), old);
        assert_eq!(n.ring.accepted(Instant::now()).len(), 1);
        // Not installed: no credentials folder is created, the launch config carries the token.
        let new = ClusterSecret::from_bytes([2; 32]);
        let ack = n
            .rotator
            .apply(req(RotationStep::Commit { secret: hex(&new) }))
            .await
            .unwrap();
        assert!(ack.token.unwrap().contains("not installed"));
        assert!(!n.files.persistent_tokens.parent().unwrap().exists());
        let launch = std::fs::read_to_string(&n.files.launch_config).unwrap();
        assert!(launch.contains(&new.microk8s_token()));
    }

    #[test]
    fn token_file_keeps_ttl_lines_and_refuses_a_malformed_new_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("persistent-cluster-tokens.txt");
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        std::fs::write(&f, format!("{a}|99999999999\n\n{b}\n")).unwrap();
        let r = replace_persistent_token(&f, &"c".repeat(32), std::slice::from_ref(&a)).unwrap();
        assert_eq!(r, TokenReplacement::Replaced { changed: true });
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            format!("{b}\n{}\n", "c".repeat(32))
        );
        let r = replace_persistent_token(&f, &"c".repeat(32), &[a]).unwrap();
        assert_eq!(r, TokenReplacement::Replaced { changed: false });
        let e = replace_persistent_token(&f, "short", &[]).unwrap_err();
        assert!(!e.to_string().contains(&b));
    }
}
