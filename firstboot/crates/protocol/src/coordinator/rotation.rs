//! Secret rotation over the coordinator: the messages of `POST /v1/rotate`, which the
//! workstation (`imagebuilder secret rotate`) sends to every live node, and the handler type
//! the agent installs to carry them out ([`super::Coordinator::set_rotation_handler`]).
//!
//! A rotation moves every node from secret A to secret B in three steps, each sent to every
//! node before the next begins, so that at no moment does a moved node talk a key an unmoved
//! one refuses:
//! 1. [`RotationStep::Stage`] (signed with A): the node also *accepts* B, until
//!    [`ROTATION_GRACE`] has passed; it still signs and announces with A.
//! 2. [`RotationStep::Commit`] (signed with A or B): the node stores B, replaces the MicroK8s
//!    token derived from A by the one derived from B, and signs and announces with B; it
//!    still accepts A for [`ROTATION_GRACE`], so a node the workstation has not reached yet
//!    keeps working meanwhile.
//! 3. [`RotationStep::Finish`] (signed with B): the node accepts B only.
//!
//! Every step is idempotent (a repeated stage, commit or finish answers the same), so a
//! rotation cut off anywhere is finished by running it again. A node the workstation never
//! reached keeps A and, once the others finished (or their grace ran out), is refused by all
//! of them: its announcements fail the cluster tag, its requests the signature, its MicroK8s
//! token is revoked.
//!
//! The body carries secret B in clear inside the pinned TLS connection; it is authenticated
//! with the request's HMAC like every other route. `Debug` never shows it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// How long a node keeps accepting the other secret after a stage or a commit, in case the
/// workstation does not finish (it normally finishes within seconds).
pub const ROTATION_GRACE: Duration = Duration::from_secs(600);

/// How long the handler may take (writing files, replacing the MicroK8s token).
pub const ROTATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Body of `POST /v1/rotate`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RotationStep {
    /// Accept `secret` (64 hex) as well, until [`ROTATION_GRACE`].
    Stage { secret: String },
    /// Store `secret` and switch to it (see the module docs).
    Commit { secret: String },
    /// Accept only the secret whose cluster tag is `tag` (the node's current one).
    Finish { tag: String },
}

/// Redacted: the stage and commit steps carry the new secret.
impl std::fmt::Debug for RotationStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RotationStep::Stage { .. } => f.write_str("Stage(<redacted>)"),
            RotationStep::Commit { .. } => f.write_str("Commit(<redacted>)"),
            RotationStep::Finish { tag } => write!(f, "Finish({tag})"),
        }
    }
}

impl RotationStep {
    /// The step's name, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            RotationStep::Stage { .. } => "stage",
            RotationStep::Commit { .. } => "commit",
            RotationStep::Finish { .. } => "finish",
        }
    }
}

/// A node's answer to a rotation step: where its keys stand afterwards. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationAck {
    pub node_id: String,
    /// Cluster tag of the secret the node signs with now.
    pub current_tag: String,
    /// Cluster tags of every secret it accepts now (the current one first).
    pub accepted_tags: Vec<String>,
    /// What the MicroK8s token replacement did (commit only), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// An authenticated rotation step, as the handler gets it.
#[derive(Debug, Clone)]
pub struct RotationRequest {
    /// The sender's node id (the workstation signs as `imagebuilder`).
    pub from: String,
    pub step: RotationStep,
}

/// Carries out a rotation step on this node (the agent installs one; see
/// `firstboot::rotate`). An error is answered 503 with its text: it must not hold a secret.
pub type RotationHandler =
    Arc<dyn Fn(RotationRequest) -> BoxFuture<'static, Result<RotationAck, String>> + Send + Sync>;

/// The reason given while no handler is installed.
pub const NO_ROTATION_HANDLER: &str = "this node does not take secret rotations";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_strictly_and_debug_hides_the_secret() {
        let s = RotationStep::Commit {
            secret: "ab".repeat(32),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            serde_json::from_str::<RotationStep>(&text).unwrap(),
            s.clone()
        );
        assert!(!format!("{s:?}").contains("abab"));
        assert!(serde_json::from_str::<RotationStep>(r#"{"step":"stage"}"#).is_err());
        assert!(
            serde_json::from_str::<RotationStep>(r#"{"step":"finish","tag":"x","extra":1}"#)
                .is_err()
        );
        assert_eq!(s.name(), "commit");
    }
}
