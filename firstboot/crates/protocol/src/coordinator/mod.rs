//! The coordinator: a small HTTPS service every node runs, carrying the formation core's
//! point-to-point messages (seed-claim acks, join-slot requests and grants, "joined"
//! confirmations), a read-only status document (also as a public HTML page, [`page`]) and the
//! cluster's kubeconfig for the workstation; plus its client.
//!
//! Trust (DESIGN.md rule 1): the server presents a self-signed certificate ([`identity`])
//! whose fingerprint the node announces in its signed mDNS record; clients pin it
//! ([`crate::tls::PeerCertVerifier::pinned`]). Every request carries a challenge-response HMAC under the
//! cluster's coordinator key bound to a single-use server nonce ([`auth`]), so a machine
//! without the secret gets no reply and a captured request cannot be replayed. No rule needs
//! the nodes' clocks to agree.
//!
//! Failover drills (`POST /v1/drill`, [`drill`]): a holder of the secret asks a node to cut
//! itself off.
//!
//! Secret rotation (`POST /v1/rotate`, [`rotation`]): the coordinator authenticates against
//! every secret its [`crate::secret::Keyring`] accepts, and the client signs with the ring's
//! current one, so a node switches secrets without a restart.
//!
//! The layer is generic over the message type `M` (any `Serialize + DeserializeOwned`):
//! the driver gets each authenticated message as a [`server::Inbound`] and answers with
//! `Vec<M>`. To add a kind of message, add a variant to the core's message enum; nothing here
//! changes.

pub mod auth;
pub mod backup;
pub mod client;
pub mod drill;
pub mod identity;
pub mod page;
pub mod rotation;
pub mod server;

pub use client::{ClientError, CoordinatorClient, SignedRequest};
pub use drill::{CutOff, DrillAck, DrillHandler, DrillRequest};
pub use identity::{fingerprint_of, IdentityError, NodeIdentity};
pub use rotation::{RotationAck, RotationHandler, RotationRequest, RotationStep};
pub use server::{
    Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorStats, Inbound, KubeconfigProvider,
};
