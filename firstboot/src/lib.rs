//! rackseed's node agent. See the README for the components in boot order.

pub mod cli;
pub mod config;
pub mod logging;
pub mod secret;
pub mod system;
