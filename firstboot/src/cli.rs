//! The `firstboot` command line (clap derive).
//!
//! `firstboot check-config CONFIG` runs the same check as `imagebuilder validate`;
//! `completions SHELL` and `manpages DIR` write shell completions and man pages. To add a
//! subcommand: add a variant to [`Command`] and one arm in [`run`] calling a function that does
//! the work and returns an exit code (or an error, printed with its context chain).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
// Parsed once per process; the size of the `run` options does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Check a cluster config file; print every error, or warnings and a summary.
    CheckConfig {
        /// The cluster config (TOML).
        config: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (firstboot.1 and one per subcommand) into DIR.
    Manpages { dir: PathBuf },
    /// Run the agent (the systemd service's main): discover peers, form or join the cluster.
    Run(crate::agent_cli::RunArgs),
    /// Show this node's phase, role, peers, members and last error.
    Status {
        #[arg(long, default_value = crate::agent_cli::DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = crate::agent_cli::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = crate::agent_cli::DEFAULT_PORT)]
        port: u16,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Return this node to "fresh" (a member leaves its MicroK8s cluster first).
    Reset {
        #[arg(long, default_value = crate::agent_cli::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long, default_value = "microk8s")]
        microk8s_bin: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    rackseed_host::logging::init(cli.verbose);
    match cli.command {
        Command::CheckConfig { config } => rackseed_config::check_config(&config),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "firstboot",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => {
            match rackseed_host::terminal::write_manpages(Cli::command(), &dir) {
                Ok(pages) => {
                    println!("wrote {} man pages into {}", pages.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => crate::agent_cli::run(args),
        Command::Status {
            config,
            state_dir,
            port,
            json,
        } => crate::agent_cli::status(&config, &state_dir, port, json),
        Command::Reset {
            state_dir,
            yes,
            microk8s_bin,
        } => crate::agent_cli::reset(&state_dir, yes, &microk8s_bin),
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
            matches!(cli.command, Command::CheckConfig { ref config } if config == std::path::Path::new("c.toml"))
        );
    }

    #[test]
    fn parses_completions_and_manpages() {
        let cli = Cli::try_parse_from(["firstboot", "completions", "zsh"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Completions {
                shell: clap_complete::Shell::Zsh
            }
        ));
        let cli = Cli::try_parse_from(["firstboot", "manpages", "out"]).unwrap();
        assert!(matches!(cli.command, Command::Manpages { .. }));
        assert!(Cli::try_parse_from(["firstboot", "completions", "cmd.exe"]).is_err());
    }
}
