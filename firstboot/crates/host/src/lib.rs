//! What every rackseed binary shares on the host, and nothing else: the one command runner
//! ([`command::Cmd`]), atomic file writes ([`fs::write_atomic`]) and private folders
//! ([`fs::create_private_dir`]), the tracing setup ([`logging::init`]) and the terminal
//! prompts ([`terminal::confirm`]), and the reader of container image archives and Helm
//! charts' images ([`image_archive`], as containerd and the charts read them). The agent, the image builder and the QEMU launcher depend
//! on this crate instead of on each other.

pub mod command;
pub mod fs;
pub mod image_archive;
pub mod logging;
pub mod terminal;
