//! rackseed's workstation tool: builds, inspects and flashes appliance images.

pub mod flash;
pub mod os_list;
