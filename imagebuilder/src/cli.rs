//! The `imagebuilder` command line (clap derive).
//!
//! Commands: `validate CONFIG` (the same check as `firstboot check-config`), `secret new PATH`,
//! `secret rotate` (move the cluster to a new secret; [`crate::secret`]),
//! `build` and `inspect IMAGE` (logic in [`crate::build`] / [`crate::inspect`]),
//! `status` (watch the cluster form), `kubeconfig` (fetch the admin kubeconfig),
//! `drill` (kill a node, measure RTO and RPO; [`crate::drill`]),
//! `flash IMAGE DEVICE`, `qemu ...` (test clusters), `completions SHELL` and `manpages DIR`.
//! To add a subcommand: add a variant to [`Command`] (with its arguments)
//! and one arm in [`run`] calling a function that does the work and returns an
//! [`ExitCode`], or an `anyhow::Result` passed through [`report`].

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand};
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::secret::ClusterSecret;

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
    /// Build an appliance image from a base image (official, local or bootstrapped).
    Build(crate::build::BuildArgs),
    /// Show the partitions and rackseed files of a built image (never the secret).
    Inspect(crate::inspect::InspectArgs),
    /// Watch the cluster form: every node's phase and role, and a one-line verdict.
    Status(StatusArgs),
    /// Print the cluster's admin kubeconfig, fetched from a control-plane member over its
    /// authenticated coordinator and pointed at that member's address.
    Kubeconfig(KubeconfigArgs),
    /// The cluster's datastore backups: `backup pull --config C -o DIR`.
    #[command(subcommand)]
    Backup(crate::backup::BackupCli),
    /// Restore a datastore backup onto the cluster (one control-plane node runs `microk8s
    /// dbctl restore`); refuses a damaged or foreign archive before contacting any node.
    Restore(crate::backup::RestoreArgs),
    /// Kill one node on purpose and measure what it cost: RTO (API, quorum, LoadBalancer) and
    /// RPO (probe writes lost, newest backup's age), with a table of single points of failure.
    Drill(crate::drill::DrillArgs),
    /// Write an image to an SD card, USB stick or disk (only the blocks in its .bmap, verified).
    Flash {
        /// The image: .img, .img.xz or .img.zst.
        image: PathBuf,
        /// The target block device, e.g. /dev/sdb or /dev/mmcblk0.
        device: PathBuf,
        /// The block map (default: next to the image, `<name>.bmap`).
        #[arg(long)]
        bmap: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Accept a partition as the target (refused by default: images hold a whole disk).
        #[arg(long)]
        allow_partition: bool,
        /// Accept a regular file as the target (refused by default: a typo in the device
        /// path would otherwise fill a file in /dev).
        #[arg(long)]
        allow_file: bool,
    },
    /// Run a QEMU test cluster on this machine.
    Qemu {
        #[command(subcommand)]
        cmd: crate::qemu_cluster::QemuCli,
    },
    /// Print a shell completion script, e.g. `imagebuilder completions bash > /etc/bash_completion.d/imagebuilder`.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (imagebuilder.1 and one per subcommand) into DIR.
    Manpages { dir: PathBuf },
}

/// Which cluster to talk to, and how to find it.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("cluster").required(true).multiple(true))]
pub struct ClusterArgs {
    /// The cluster config (its `secret-file` names the secret; also gives the expected sizes).
    #[arg(long, group = "cluster")]
    pub config: Option<PathBuf>,
    /// The cluster secret file (overrides the config's `secret-file`).
    #[arg(long, group = "cluster")]
    pub secret: Option<PathBuf>,
    /// Browse mDNS only on this interface (repeatable; default: every physical interface).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
}

impl ClusterArgs {
    fn interface_choice(&self) -> InterfaceChoice {
        if self.interfaces.is_empty() {
            InterfaceChoice::Auto
        } else {
            InterfaceChoice::Named(self.interfaces.clone())
        }
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print one JSON report (for scripts) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep refreshing until the cluster formed and settled, or --timeout passed (exit 1).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 20m or 90s.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long to listen for announcements before the first report, e.g. 3s (less once the
    /// expected number of nodes is seen).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub discover: Duration,
    /// Count the cluster as settled only once this many nodes are seen (default: the
    /// config's expected-nodes).
    #[arg(long)]
    pub expect_nodes: Option<usize>,
}

#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Give up when no control-plane member handed one out by then, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write it to this file (mode 0600) instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Write a fresh 256-bit cluster secret to a new file (mode 0600). Never overwrites an
    /// existing file and never prints the secret.
    New {
        /// Where to write it, e.g. configs/homelab.secret (the config's `secret-file`).
        path: PathBuf,
    },
    /// Move every live node to a new secret and MicroK8s join token over the authenticated
    /// coordinator, so old images and lost cards can no longer join or sway the election.
    /// Resumable: run it again until it reports every node moved.
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Where the new secret waits until every node moved (default: the secret file + `.new`);
    /// an existing file there is resumed, never replaced.
    #[arg(long, value_name = "FILE")]
    pub new_secret_file: Option<PathBuf>,
    /// Leave this node behind on the old secret (a lost or retired node; repeatable).
    #[arg(long, value_name = "NODE_ID")]
    pub revoke: Vec<String>,
    /// How long to listen for the nodes' announcements, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub discover: Duration,
    /// Timeout of one request to one node, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    rackseed_host::logging::init(cli.verbose);
    match cli.command {
        Command::Validate { config } => rackseed_config::check_config(&config),
        Command::Secret(SecretCommand::New { path }) => report(new_secret(&path)),
        Command::Secret(SecretCommand::Rotate(args)) => report(rotate_secret(&args)),
        Command::Build(args) => report(crate::build::run_cli(args)),
        Command::Inspect(args) => report(crate::inspect::run_cli(args)),
        Command::Status(args) => status(&args),
        Command::Kubeconfig(args) => report(kubeconfig(&args)),
        Command::Drill(args) => crate::drill::run_cli(args),
        Command::Backup(cmd) => report(crate::backup::run_cli(cmd)),
        Command::Restore(args) => report(crate::backup::run_restore_cli(args)),
        Command::Flash {
            image,
            device,
            bmap,
            yes,
            allow_partition,
            allow_file,
        } => report(flash(crate::flash::FlashRequest {
            image,
            bmap,
            device,
            yes,
            progress: true,
            allow: crate::flash::Allow {
                partition: allow_partition,
                file: allow_file,
            },
        })),
        Command::Qemu { cmd } => report(crate::qemu_cluster::run(cmd)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "imagebuilder",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => report(
            rackseed_host::terminal::write_manpages(Cli::command(), &dir).map(|pages| {
                println!("wrote {} man pages into {}", pages.len(), dir.display());
            }),
        ),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `imagebuilder status`: exit 0 with a report; with `--wait`, exit 1 unless it settled.
fn status(args: &StatusArgs) -> ExitCode {
    let run = || -> anyhow::Result<bool> {
        let (secret, mut expect) = crate::status::load_access(
            args.cluster.config.as_deref(),
            args.cluster.secret.as_deref(),
        )?;
        if args.expect_nodes.is_some() {
            expect.nodes = args.expect_nodes;
        }
        let mut opts = crate::status::WatchOptions::new(secret);
        opts.interfaces = args.cluster.interface_choice();
        opts.expect = expect;
        opts.wait = args.wait;
        opts.timeout = args.timeout;
        opts.discover_for = args.discover;
        opts.json = args.json;
        opts.tty = std::io::stdout().is_terminal();
        let mut out = std::io::stdout().lock();
        let report = runtime()?.block_on(crate::status::watch(&opts, &mut out))?;
        if args.wait && !report.settled {
            anyhow::bail!(
                "the cluster did not settle within {}: {}",
                humantime::format_duration(args.timeout),
                crate::status::terminal_safe(&report.summary)
            );
        }
        Ok(report.settled)
    };
    report(run().map(|_| ()))
}

/// `imagebuilder kubeconfig`: to stdout, or to `--output` (mode 0600, written then renamed).
fn kubeconfig(args: &KubeconfigArgs) -> anyhow::Result<()> {
    let (secret, _) = crate::status::load_access(
        args.cluster.config.as_deref(),
        args.cluster.secret.as_deref(),
    )?;
    let mut opts = crate::kubeconfig::KubeconfigOptions::new(secret);
    opts.interfaces = args.cluster.interface_choice();
    opts.timeout = args.timeout;
    let fetched = runtime()?.block_on(crate::kubeconfig::fetch(&opts))?;
    match &args.output {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(fetched.kubeconfig.as_bytes())
                .and_then(|()| out.flush())
                .context("writing the kubeconfig to stdout")?;
        }
        Some(path) => {
            crate::kubeconfig::write_private(path, &fetched.kubeconfig)?;
            eprintln!(
                "wrote the kubeconfig of {} (API server {}) to {}",
                fetched.node_id,
                fetched.address,
                path.display()
            );
        }
    }
    Ok(())
}

fn flash(req: crate::flash::FlashRequest) -> anyhow::Result<()> {
    let r = crate::flash::flash(&req, &crate::flash::SystemBlockInfo)?;
    println!(
        "flashed {}: wrote {} bytes of {} in {:.2} s and verified {} bytes in {:.2} s",
        req.device.display(),
        r.written_bytes,
        r.image_size,
        r.write_time.as_secs_f64(),
        r.verified_bytes,
        r.verify_time.as_secs_f64()
    );
    Ok(())
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

/// `secret rotate`: the secret file from `--secret` or the config's `secret-file`.
fn rotate_secret(args: &RotateArgs) -> anyhow::Result<()> {
    let secret_file = match (&args.cluster.secret, &args.cluster.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => {
            rackseed_config::load(c)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .config
                .cluster
                .secret_file
        }
        (None, None) => anyhow::bail!("name the cluster with --config CONFIG or --secret FILE"),
    };
    let mut opts = crate::secret::RotateOptions::new(secret_file);
    if let Some(p) = &args.new_secret_file {
        opts.pending_file = p.clone();
    }
    opts.revoke = args.revoke.clone();
    opts.interfaces = args.cluster.interface_choice();
    opts.discover = args.discover;
    opts.timeout = args.timeout;
    crate::secret::run_cli(&opts)
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
        let cli = Cli::try_parse_from([
            "imagebuilder",
            "status",
            "--secret",
            "s",
            "--json",
            "--wait",
            "--timeout",
            "90s",
        ])
        .unwrap();
        let Command::Status(a) = cli.command else {
            panic!("not status")
        };
        assert!(a.json && a.wait);
        assert_eq!(a.timeout, Duration::from_secs(90));
        assert!(
            Cli::try_parse_from(["imagebuilder", "kubeconfig"]).is_err(),
            "kubeconfig needs --config or --secret"
        );
        let cli =
            Cli::try_parse_from(["imagebuilder", "flash", "a.img", "/dev/sdz", "--yes"]).unwrap();
        assert!(matches!(cli.command, Command::Flash { yes: true, .. }));
        let cli = Cli::try_parse_from(["imagebuilder", "qemu", "status", "--dir", "d"]).unwrap();
        assert!(matches!(cli.command, Command::Qemu { .. }));
    }
}
