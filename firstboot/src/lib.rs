//! rackseed's node agent. See the README for the components in boot order.

pub mod addons;
pub mod config;
pub mod secret;
pub mod system;
