//! Failover drills on real nodes: the messages of `POST /v1/drill`, which the workstation
//! (`imagebuilder drill --kill …` without a QEMU cluster) sends to the node it chose, and the
//! handler type the agent installs to carry them out
//! ([`super::Coordinator::set_drill_handler`]).
//!
//! The request asks the node to *cut itself off* ([`CutOff`]):
//! - [`CutOff::Isolate`]: stop MicroK8s (`microk8s stop`) and take the node's cluster network
//!   interface down, then, after `restore_after_s`, bring the interface up and start MicroK8s
//!   again (`microk8s start`). The node is then as good as dead to its peers, the API address
//!   and the LoadBalancer addresses, while it keeps its disk; it comes back by itself;
//! - [`CutOff::PowerOff`]: `systemctl poweroff`; the node comes back only when a person powers
//!   it on.
//!
//! The node answers first ([`DrillAck`]: what it will do, and when) and acts
//! [`DRILL_GRACE`] later, so the answer leaves before the network goes.
//!
//! Authentication is the coordinator's usual challenge-response with the cluster secret (and a
//! single-use nonce, so a captured request cannot be replayed): only a holder of the secret can
//! cut a node off. A node that has no handler (or already runs a drill) answers 503.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// How long the node waits between its answer and the cut.
pub const DRILL_GRACE: Duration = Duration::from_secs(1);

/// How long the handler may take to accept (it acts later, in the background).
pub const DRILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds of an isolation's length: long enough to measure a failover, short enough that a
/// mistyped value does not keep a machine away for a day.
pub const MIN_ISOLATION: Duration = Duration::from_secs(10);
pub const MAX_ISOLATION: Duration = Duration::from_secs(4 * 3600);

/// Body of `POST /v1/drill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cut", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CutOff {
    /// Stop MicroK8s and take the network down for `restore_after_s` seconds.
    Isolate {
        /// The node id the workstation means: a node that is someone else refuses, so a
        /// request sent to a moved address cuts off no other machine.
        node_id: String,
        restore_after_s: u64,
    },
    /// Power the machine off.
    PowerOff { node_id: String },
}

impl CutOff {
    /// The node the request is meant for.
    pub fn node_id(&self) -> &str {
        match self {
            CutOff::Isolate { node_id, .. } | CutOff::PowerOff { node_id } => node_id,
        }
    }

    /// The cut's name, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            CutOff::Isolate { .. } => "isolate",
            CutOff::PowerOff { .. } => "power-off",
        }
    }

    /// Checks the request's own bounds (the isolation's length).
    pub fn validate(&self) -> Result<(), String> {
        if let CutOff::Isolate {
            restore_after_s, ..
        } = self
        {
            let d = Duration::from_secs(*restore_after_s);
            if d < MIN_ISOLATION || d > MAX_ISOLATION {
                return Err(format!(
                    "restore-after {restore_after_s} s is outside {}..={} s",
                    MIN_ISOLATION.as_secs(),
                    MAX_ISOLATION.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// The node's answer: what it will do, in order, starting [`DRILL_GRACE`] after the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillAck {
    pub node_id: String,
    /// The commands, in words (`microk8s stop`, `ip link set dev eth0 down`, …).
    pub steps: Vec<String>,
    /// When it restores itself (isolate), in seconds after the cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restores_after_s: Option<u64>,
}

/// An authenticated drill request, as the handler gets it.
#[derive(Debug, Clone)]
pub struct DrillRequest {
    /// The sender's node id (the workstation signs as `imagebuilder`).
    pub from: String,
    pub cut: CutOff,
}

/// Accepts a drill request on this node (the agent installs one; see
/// `firstboot::driver::drill`) and schedules the cut. An error is answered 503 with its text.
pub type DrillHandler =
    Arc<dyn Fn(DrillRequest) -> BoxFuture<'static, Result<DrillAck, String>> + Send + Sync>;

/// The reason given while no handler is installed.
pub const NO_DRILL_HANDLER: &str = "this node takes no failover drills";

impl super::CoordinatorClient {
    /// Asks the node at `peer` (pinned to `fingerprint`) to cut itself off.
    pub async fn drill(
        &self,
        peer: std::net::SocketAddr,
        fingerprint: &str,
        cut: &CutOff,
    ) -> Result<DrillAck, super::ClientError> {
        let body = drill_body(peer, cut)?;
        self.call(peer, fingerprint, ("POST", DRILL_PATH), body)
            .await
    }

    /// Signs a `POST /v1/drill` carrying `cut` for `nonce` (send it with
    /// [`super::CoordinatorClient::send_signed`]).
    pub fn sign_drill(
        &self,
        peer: std::net::SocketAddr,
        nonce: &str,
        cut: &CutOff,
    ) -> Result<super::SignedRequest, super::ClientError> {
        Ok(self.sign("POST", DRILL_PATH, nonce, drill_body(peer, cut)?))
    }
}

/// The route of a drill request.
const DRILL_PATH: &str = "/v1/drill";

fn drill_body(peer: std::net::SocketAddr, cut: &CutOff) -> Result<Vec<u8>, super::ClientError> {
    serde_json::to_vec(cut).map_err(|e| super::ClientError::Encode {
        peer,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_strictly_and_bounds_hold() {
        let c = CutOff::Isolate {
            node_id: "n1".into(),
            restore_after_s: 60,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"cut":"isolate","node_id":"n1","restore_after_s":60}"#
        );
        assert_eq!(serde_json::from_str::<CutOff>(&text).unwrap(), c);
        assert!(c.validate().is_ok());
        assert!(serde_json::from_str::<CutOff>(r#"{"cut":"power-off"}"#).is_err());
        assert!(
            serde_json::from_str::<CutOff>(r#"{"cut":"power-off","node_id":"a","x":1}"#).is_err()
        );
        for bad in [0, 9, 4 * 3600 + 1] {
            let c = CutOff::Isolate {
                node_id: "n".into(),
                restore_after_s: bad,
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let p = CutOff::PowerOff {
            node_id: "n2".into(),
        };
        assert_eq!(p.name(), "power-off");
        assert_eq!(p.node_id(), "n2");
        assert!(p.validate().is_ok());
    }
}
