//! The `imagebuilder` binary: parses arguments and hands over to [`imagebuilder::cli::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    imagebuilder::cli::run(imagebuilder::cli::Cli::parse())
}
