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

/// An archive as `microk8s dbctl backup -o NAME` writes it (what
/// [`crate::coordinator::backup::inspect_archive`] reads): a gzip-compressed tar holding the
/// folder `folder/` (mode 0700) and, for the `i`-th of `pairs`, `folder/i.key` (the key) and
/// `folder/i.data` (its value), mode 0640.
pub fn dbctl_archive(folder: &str, pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o700);
    dir.set_size(0);
    tar.append_data(&mut dir, format!("{folder}/"), std::io::empty())
        .expect("appending to an archive in memory");
    for (i, (key, value)) in pairs.iter().enumerate() {
        for (ext, bytes) in [("key", key.as_bytes()), ("data", *value)] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o640);
            h.set_size(bytes.len() as u64);
            tar.append_data(&mut h, format!("{folder}/{i}.{ext}"), bytes)
                .expect("appending to an archive in memory");
        }
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .expect("finishing an archive in memory")
}
