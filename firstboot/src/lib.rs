//! rackseed's node agent. See the README for the components in boot order.

pub mod addons;
pub mod agent_cli;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod discovery;
pub mod driver;
pub mod formation;
pub mod logging;
pub mod secret;
pub mod status;
pub mod system;
