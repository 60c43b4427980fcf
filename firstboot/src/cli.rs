//! The `firstboot` command line (clap derive).
//!
//! `firstboot check-config CONFIG` runs the same check as `imagebuilder validate`. To add a
//! subcommand: add a variant to [`Command`] and one arm in [`run`] calling a function that does
//! the work and returns an exit code (or an error, printed with its context chain).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;

#[derive(Debug, Parser)]
#[command(
    name = "firstboot",
    version,
    about = "rackseed node agent: forms a MicroK8s cluster on first boot"
)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a cluster config file; print every error, or warnings and a summary.
    CheckConfig {
        /// The cluster config (TOML).
        config: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    crate::logging::init(cli.verbose);
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
    }
}

/// Loads and checks `path`, printing warnings and `ok: <summary>` to stdout, or every error to
/// stderr. Shared by `imagebuilder validate` and `firstboot check-config`.
pub fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("ok: {}", config::summary(&loaded.config));
            ExitCode::SUCCESS
        }
        Err(err) => {
            for d in &err.diagnostics {
                eprintln!("error: {d}");
            }
            let n = err.diagnostics.len();
            eprintln!(
                "{}: {n} error{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_check_config() {
        let cli = Cli::try_parse_from(["firstboot", "-vv", "check-config", "c.toml"]).unwrap();
        assert_eq!(cli.verbose, 2);
        assert!(
            matches!(cli.command, Command::CheckConfig { ref config } if config == Path::new("c.toml"))
        );
    }
}
