//! rackseed's workstation tool: validates cluster configs, makes cluster secrets, and builds,
//! inspects and flashes appliance images. Logic lives in the modules below; `main.rs` only
//! parses arguments and calls [`cli::run`].

pub mod cli;
pub mod flash;
pub mod os_list;
