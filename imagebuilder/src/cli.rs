//! The `imagebuilder` command line (clap derive).
//!
//! Commands: `validate CONFIG` (the same check as `firstboot check-config`) and
//! `secret new PATH`. To add a subcommand: add a variant to [`Command`] (with its arguments)
//! and one arm in [`run`] calling a function that does the work and returns an
//! [`ExitCode`], or an `anyhow::Result` passed through [`report`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use firstboot::secret::ClusterSecret;

#[derive(Debug, Parser)]
#[command(
    name = "imagebuilder",
    version,
    about = "rackseed: build bootable Ubuntu images that form a MicroK8s cluster by themselves"
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
    Validate {
        /// The cluster config (TOML).
        config: PathBuf,
    },
    /// Manage the cluster secret.
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Write a fresh 256-bit cluster secret to a new file (mode 0600). Never overwrites an
    /// existing file and never prints the secret.
    New {
        /// Where to write it, e.g. configs/homelab.secret (the config's `secret-file`).
        path: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    firstboot::logging::init(cli.verbose);
    match cli.command {
        Command::Validate { config } => firstboot::cli::check_config(&config),
        Command::Secret(SecretCommand::New { path }) => report(new_secret(&path)),
    }
}

/// Prints an error with its context chain to stderr and turns it into an exit code.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a fresh cluster secret to `path` (mode 0600, create-new).
pub fn new_secret(path: &Path) -> anyhow::Result<()> {
    ClusterSecret::generate()
        .write_new(path)
        .context("creating a new cluster secret")?;
    println!(
        "wrote a new 256-bit cluster secret to {} (mode 0600); keep it out of version control",
        path.display()
    );
    Ok(())
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
    fn parses_subcommands() {
        let cli = Cli::try_parse_from(["imagebuilder", "validate", "c.toml"]).unwrap();
        assert!(matches!(cli.command, Command::Validate { .. }));
        let cli = Cli::try_parse_from(["imagebuilder", "-v", "secret", "new", "s"]).unwrap();
        assert_eq!(cli.verbose, 1);
        assert!(matches!(
            cli.command,
            Command::Secret(SecretCommand::New { .. })
        ));
        assert!(Cli::try_parse_from(["imagebuilder", "secret"]).is_err());
    }
}
