//! rackseed's workstation tool: validates cluster configs, makes cluster secrets, and builds,
//! inspects and flashes appliance images. Logic lives in the modules below; `main.rs` only
//! parses arguments and calls [`cli::run`].

pub mod backup;
pub mod base;
pub mod build;
pub mod cli;
pub mod customize;
pub mod disk;
pub mod drill;
pub mod flash;
pub mod inspect;
pub mod kubeconfig;
pub mod os_list;
pub mod outputs;
pub mod qemu_cluster;
pub mod secret;
pub mod status;
pub mod tool;
