//! Everything that touches the host, behind small interfaces with real implementations and
//! fakes for tests. [`command`] is the one way any rackseed code runs an external program;
//! [`microk8s`] drives MicroK8s; [`fakes`] holds in-process fakes with real behaviour.

pub mod command;
pub mod fakes;
pub mod hostname;
pub mod identity;
pub mod microk8s;
pub mod notify;
pub mod state;
