//! The `firstboot` command line (clap derive).
//!
//! `firstboot check-config CONFIG` runs the same check as `imagebuilder validate`;
//! `completions SHELL` and `manpages DIR` write shell completions and man pages. To add a
//! subcommand: add a variant to [`Command`] and one arm in [`run`] calling a function that does
//! the work and returns an exit code (or an error, printed with its context chain).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};

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
    crate::logging::init(cli.verbose);
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "firstboot",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => match write_manpages(Cli::command(), &dir) {
            Ok(pages) => {
                println!("wrote {} man pages into {}", pages.len(), dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
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

/// Writes `<name>.1` for the command and `<name>-<sub>.1` for every subcommand (recursively,
/// e.g. `imagebuilder-qemu-up.1`) into `dir`; returns the pages there, sorted.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = cmd.get_name().to_string();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file.starts_with(&name) && file.ends_with(".1") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
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

/// Asks for "yes" on the terminal before something destructive (`firstboot reset`,
/// `imagebuilder flash`). Without a terminal it refuses, so scripts must pass `--yes`.
pub fn confirm(prompt: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{prompt} Refusing without a terminal to confirm on; pass --yes");
    }
    eprint!("{prompt}\nType 'yes' to continue: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
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
