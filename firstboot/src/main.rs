//! The `firstboot` binary: parses arguments and hands over to [`firstboot::cli::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    firstboot::cli::run(firstboot::cli::Cli::parse())
}
