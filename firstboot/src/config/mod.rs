//! The cluster configuration: one TOML file, one schema, used by `imagebuilder` at build time
//! and by `firstboot` at boot.
//!
//! The typed result lives in [`model`]; the loader that reads TOML and reports every error with
//! file:line:col and the field path is still to come (foundation issue).

pub mod model;
pub use model::*;
