//! What crosses the network between rackseed nodes, and between the nodes and the workstation:
//! the keys derived from the cluster secret ([`secret`]), signed mDNS announcements
//! ([`discovery`]), the coordinator's HTTPS service and its client ([`coordinator`]), and the
//! status document every node serves ([`status`]); the one TLS verifier for peers no CA vouches
//! for ([`tls`]). The agent runs both ends; the image
//! builder's `status` and `kubeconfig` use the browsing and client side. The `testing` module
//! (feature `testing`) holds the test setup two crates' tests share.

pub mod coordinator;
pub mod discovery;
pub mod secret;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
