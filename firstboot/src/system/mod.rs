//! Everything that touches the host, behind small interfaces with real implementations and
//! fakes for tests. [`rackseed_host::command`] is the one way any rackseed code runs an
//! external program; [`microk8s`] drives MicroK8s; `fakes` (with the `testing` feature) holds
//! in-process fakes with real behaviour.

#[cfg(any(test, feature = "testing"))]
pub mod fakes;
pub mod hostname;
pub mod identity;
pub mod keepalived;
pub mod microk8s;
pub mod notify;
pub mod state;
pub mod timesync;
