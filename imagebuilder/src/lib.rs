//! placeholder

pub mod base;
pub mod build;
pub mod customize;
pub mod disk;
pub mod inspect;
pub mod outputs;
pub mod tool;
