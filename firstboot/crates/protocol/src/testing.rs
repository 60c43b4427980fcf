//! Test helpers shared by this crate's tests and other crates' (the `testing` feature; a
//! release build never turns it on).
//!
//! To add one: put it here only when tests of two crates need the same setup.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::coordinator::{Coordinator, CoordinatorConfig, Inbound, NodeIdentity};
use crate::secret::{ClusterSecret, Keyring};

/// A stand-in node's coordinator (see [`loopback_coordinator`]).
pub struct LoopbackCoordinator {
    pub coordinator: Coordinator<serde_json::Value>,
    /// Its certificate's fingerprint (what clients pin).
    pub fingerprint: String,
    /// The keyring it authenticates against; rotate it to move the node.
    pub keyring: Arc<Keyring>,
    /// Its inbound messages (kept open for as long as the test holds this).
    pub inbound: mpsc::Receiver<Inbound<serde_json::Value>>,
}

/// A stand-in node's coordinator: listening on loopback (port 0), with a fresh identity, and
/// authenticating against a keyring that starts with `secret` alone (what an agent runs, so a
/// test can rotate the keyring underneath it).
pub async fn loopback_coordinator(secret: &ClusterSecret) -> LoopbackCoordinator {
    let identity = NodeIdentity::generate().expect("a coordinator identity");
    let fingerprint = identity.fingerprint().to_string();
    let keyring = Arc::new(Keyring::new(secret.clone()));
    let (coordinator, inbound) = Coordinator::<serde_json::Value>::start_with_keyring(
        CoordinatorConfig {
            secret: secret.clone(),
            identity,
            listen: "127.0.0.1:0".parse().expect("a loopback address"),
        },
        keyring.clone(),
    )
    .await
    .expect("a coordinator on loopback");
    LoopbackCoordinator {
        coordinator,
        fingerprint,
        keyring,
        inbound,
    }
}
