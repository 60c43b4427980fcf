//! rackseed's workstation tool: validates cluster configs, makes cluster secrets and (soon)
//! builds bootable images. Logic lives in the modules below; `main.rs` only parses arguments.

pub mod cli;
