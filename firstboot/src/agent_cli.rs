//! The agent's own subcommands: `firstboot run` (the systemd service's main), `firstboot status`
//! and `firstboot reset`. Kept apart from [`crate::cli`]'s argument definitions so that file
//! stays a list of commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::driver::{self, Agent};
use crate::system::hostname::{HostnameSetter, SystemHostname};
use crate::system::identity;
use crate::system::keepalived::KeepalivedControl;
use crate::system::microk8s::{Microk8s, RealMicrok8s, RealMicrok8sConfig};
use crate::system::notify::SystemdNotifier;
use rackseed_config as config;
use rackseed_formation::{FormationParams, NodeId, PersistedState, Phase};
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;

/// Default paths on a node (the image builder installs these).
pub const DEFAULT_CONFIG: &str = "/etc/rackseed/cluster.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rackseed";
/// The coordinator's port (HTTPS: join slots, status page).
pub const DEFAULT_PORT: u16 = 7443;

/// Options of `firstboot run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The cluster config.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where the agent keeps its state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Root of the host filesystem (node preparation, machine id).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Coordinator listen address.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Announce and browse only on these interfaces (default: the config's interface, or all
    /// but loopback and container/virtual ones).
    #[arg(long)]
    pub interface: Vec<String>,
    /// Use this node id instead of the one derived from the machine id (tests).
    #[arg(long, hide = true)]
    pub node_id: Option<String>,
    /// Leave the hostname alone (tests running many agents on one machine).
    #[arg(long, hide = true)]
    pub no_hostname: bool,
    /// The `microk8s` command.
    #[arg(long, default_value = "microk8s")]
    pub microk8s_bin: PathBuf,
    /// The `snap` command.
    #[arg(long, default_value = "snap")]
    pub snap_bin: PathBuf,
    /// The dqlite client of the snap.
    #[arg(long, default_value = crate::system::microk8s::DEFAULT_DQLITE)]
    pub dqlite_bin: PathBuf,
    /// Where to write MicroK8s' launch configuration.
    #[arg(long, default_value = crate::system::microk8s::DEFAULT_LAUNCH_CONFIG)]
    pub launch_config: PathBuf,
    /// MicroK8s' cluster agent certificate (`$SNAP_DATA/certs/server.crt`): its fingerprint
    /// goes into every grant this node hands out, and joiners check it.
    #[arg(long, default_value = crate::system::microk8s::DEFAULT_CLUSTER_AGENT_CERT)]
    pub cluster_agent_cert: PathBuf,
    /// Run this keepalived binary for the floating API address directly (VRRP only, its log
    /// and pid files in the state folder) instead of the packaged `keepalived.service` through
    /// systemctl (tests: one keepalived per network namespace).
    #[arg(long, hide = true)]
    pub keepalived_bin: Option<PathBuf>,
    /// Scale the formation timers down for simulated clusters: join timeout in seconds (slot
    /// reclaim and takeover delays follow). Not for real MicroK8s, whose joins take minutes.
    #[arg(long, hide = true)]
    pub sim_join_timeout: Option<u64>,
    /// Longest wait, in seconds after the agent starts, for systemd-timesyncd to synchronise
    /// the clock before MicroK8s is installed or joined (0: do not wait). Nodes without
    /// systemd-timesyncd, and nodes whose clock was set at boot from a real-time clock that
    /// reads no earlier than the image's build, never wait.
    #[arg(long, default_value_t = crate::system::timesync::DEFAULT_WAIT.as_secs())]
    pub time_sync_wait: u64,
}

impl RunArgs {
    fn keepalived(&self) -> KeepalivedControl {
        match &self.keepalived_bin {
            Some(binary) => KeepalivedControl::Direct {
                binary: binary.clone(),
                run_dir: self.state_dir.join("keepalived"),
            },
            None => KeepalivedControl::Systemd,
        }
    }

    fn microk8s(&self, cfg: &config::ClusterConfig) -> RealMicrok8s {
        RealMicrok8s::new(RealMicrok8sConfig {
            launch_settings: crate::system::microk8s::LaunchSettings::from_config(cfg),
            binary: self.microk8s_bin.clone(),
            snap: self.snap_bin.clone(),
            dqlite: self.dqlite_bin.clone(),
            launch_config: self.launch_config.clone(),
            cluster_agent_cert: self.cluster_agent_cert.clone(),
            ..RealMicrok8sConfig::default()
        })
    }
}

/// Timers for simulated clusters: everything scales with the join timeout.
pub fn sim_params(
    cfg: &config::ClusterConfig,
    mac: Option<config::MacAddr>,
    join_secs: u64,
) -> FormationParams {
    let mut p = FormationParams::from_config(cfg, mac);
    let join = Duration::from_secs(join_secs.max(1));
    p.join_timeout = join;
    p.grant_max_age = Duration::from_secs(3);
    p.slot_timeout = (join + p.grant_max_age) * 3 / 2 + Duration::from_secs(1);
    p.peer_timeout = Duration::from_secs(20);
    p.round_timeout = Duration::from_secs(4);
    p.retry_interval = Duration::from_secs(1);
    p.takeover_after = Duration::from_secs(30);
    p
}

fn load_config(path: &Path) -> Result<config::ClusterConfig> {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                tracing::warn!("{w}");
            }
            Ok(l.config)
        }
        Err(e) => bail!("{e}"),
    }
}

/// `firstboot run`: the service's main. Returns when SIGTERM/SIGINT arrives.
pub fn run(args: RunArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(args: RunArgs) -> Result<()> {
    let cfg = load_config(&args.config)?;
    let secret = ClusterSecret::load(&cfg.cluster.secret_file)?;
    let iface_hint = args
        .interface
        .first()
        .cloned()
        .or_else(|| cfg.network.interface.clone());
    let mac = identity::primary_mac(Path::new("/"), iface_hint.as_deref())
        .map(|(_, m)| m)
        .ok();
    let node_id = match &args.node_id {
        Some(id) => NodeId::new(id.clone())?,
        // Inventory nodes are known by their MAC (roles and priorities are pinned that way).
        None => match mac.filter(|m| cfg.nodes.iter().any(|n| n.mac == *m)) {
            Some(m) => NodeId::from_mac(m),
            None => NodeId::new(identity::node_id(&args.root, mac)?)?,
        },
    };
    let hostname = identity::desired_hostname(&cfg, node_id.as_str(), mac);
    if !args.no_hostname {
        match SystemHostname::default().set(&hostname).await {
            Ok(how) => tracing::info!(%hostname, via = how, "hostname set"),
            Err(e) => {
                tracing::warn!(%hostname, error = %format!("{e:#}"), "could not set the hostname")
            }
        }
    }
    let interfaces = if !args.interface.is_empty() {
        InterfaceChoice::Named(args.interface.clone())
    } else if let Some(i) = &cfg.network.interface {
        InterfaceChoice::Named(vec![i.clone()])
    } else {
        InterfaceChoice::Auto
    };
    let params = args.sim_join_timeout.map(|s| sim_params(&cfg, mac, s));
    let rotation_files = crate::rotate::RotationFiles {
        secret_file: cfg.cluster.secret_file.clone(),
        launch_config: args.launch_config.clone(),
        persistent_tokens: crate::system::microk8s::persistent_tokens_file(
            &crate::system::microk8s::snap_data_of(&args.cluster_agent_cert),
        ),
    };
    let agent = Agent {
        keyring: Arc::new(rackseed_protocol::secret::Keyring::new(secret.clone())),
        rotation_files,
        secret,
        node_id,
        mac,
        hostname,
        state_dir: args.state_dir.clone(),
        root: args.root.clone(),
        listen: args.listen,
        interfaces,
        microk8s: Arc::new(args.microk8s(&cfg)),
        notifier: Arc::new(SystemdNotifier),
        params,
        keepalived: args.keepalived(),
        cut_off: driver::drill::CutOffControl {
            microk8s: args.microk8s_bin.clone(),
            ..Default::default()
        },
        time_sync: crate::system::timesync::TimeSyncWait::new(
            &args.root,
            Duration::from_secs(args.time_sync_wait),
        ),
        config: cfg,
    };
    driver::run(agent, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `firstboot status`: asks the running agent; falls back to the persisted phase.
pub fn status(config_path: &Path, state_dir: &Path, port: u16, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fetch_status(config_path, state_dir, port)) {
        Ok(doc) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print!("{}", doc.render_table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn fetch_status(config_path: &Path, state_dir: &Path, port: u16) -> Result<StatusDoc> {
    let cfg = load_config(config_path)?;
    let secret = ClusterSecret::load(&cfg.cluster.secret_file)?;
    let fingerprint = rackseed_protocol::coordinator::identity::read_fingerprint(state_dir);
    let client =
        rackseed_protocol::coordinator::CoordinatorClient::new(&secret, "ffffffffffffffff")
            .with_timeout(Duration::from_secs(5));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let answer = match fingerprint {
        Ok(fp) => client.status(addr, &fp).await.map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    match answer {
        Ok(v) => Ok(serde_json::from_value(v).context("reading the agent's status document")?),
        Err(e) => {
            let st: Option<PersistedState> = driver::state_file(state_dir).load()?;
            let phase = st
                .map(|s| format!("{:?}", s.phase))
                .unwrap_or_else(|| "fresh (no state yet)".into());
            Ok(StatusDoc {
                version: env!("CARGO_PKG_VERSION").into(),
                phase,
                last_error: Some(format!("the agent is not answering on {addr}: {e:#}")),
                ..StatusDoc::default()
            })
        }
    }
}

/// `firstboot reset`: back to "fresh". A member first leaves MicroK8s (`microk8s leave`).
pub fn reset(state_dir: &Path, yes: bool, microk8s_bin: &Path) -> ExitCode {
    let result = (|| -> Result<bool> {
        let state = driver::state_file(state_dir);
        let st: Option<PersistedState> = state.load()?;
        let in_cluster = st.as_ref().is_some_and(|s| {
            matches!(
                s.phase,
                Phase::Member { .. } | Phase::Joining { .. } | Phase::Confirming { .. }
            )
        });
        let prompt = format!(
            "This resets the rackseed agent state in {}{}.",
            state_dir.display(),
            if in_cluster {
                " and makes this node leave its MicroK8s cluster (microk8s leave)"
            } else {
                ""
            }
        );
        if !yes && !rackseed_host::terminal::confirm(&prompt)? {
            return Ok(false);
        }
        if in_cluster {
            let mk = RealMicrok8s::new(RealMicrok8sConfig {
                binary: microk8s_bin.to_owned(),
                ..RealMicrok8sConfig::default()
            });
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(mk.leave())
                .context("microk8s leave (remove the node from the cluster with `microk8s remove-node <name> --force` on a survivor afterwards)")?;
        }
        state.remove()?;
        crate::system::state::StateFile::new(state_dir.join("addons.json")).remove()?;
        Ok(true)
    })();
    match result {
        Ok(true) => {
            println!("reset: the agent starts fresh on its next start (systemctl restart rackseed-firstboot)");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("not confirmed; nothing changed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
