//! rackseed's workstation tool: builds, inspects and flashes appliance images.

pub mod base;
pub mod build;
pub mod customize;
pub mod disk;
pub mod flash;
pub mod inspect;
pub mod os_list;
pub mod outputs;
pub mod tool;
