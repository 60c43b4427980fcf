//! Everything that touches the host, behind small interfaces with real implementations and
//! fakes for tests. [`command`] is the one way any rackseed code runs an external program.

pub mod command;
pub mod hostname;
pub mod identity;
pub mod notify;
pub mod state;
