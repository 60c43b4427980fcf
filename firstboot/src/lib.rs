//! rackseed's node agent, and only the agent. See `ARCHITECTURE.md` for the crates and the
//! README for the components in boot order.
//!
//! The pure formation core is the `rackseed-formation` crate, the config schema
//! `rackseed-config`, the wire protocol (discovery, coordinator, status document)
//! `rackseed-protocol`, and the command runner `rackseed-host`. This crate wires them to the
//! host: the [`driver`] loop, secret rotation ([`rotate`]), the [`system`] adapters (MicroK8s, systemd, state file), the
//! [`addons`] and the command line. Test doubles (`system::fakes`, `addons::fakes`) are
//! compiled only with the `testing` feature, never into the released binary.

pub mod addons;
pub mod agent_cli;
pub mod backup;
pub mod cli;
pub mod driver;
pub mod rotate;
pub mod system;
