//! rackseed's workstation tool: builds, inspects and flashes appliance images.

pub mod flash;
pub mod kubeconfig;
pub mod os_list;
pub mod status;
