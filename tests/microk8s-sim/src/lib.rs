//! Test-only MicroK8s simulator: a `microk8s` command (and a `dqlite` client) that behaves like
//! the real snap's CLI on one node, plus a cluster agent daemon on TCP 25000 so joins cross the
//! network between namespaces or VMs. Never installed into user images.
//!
//! Pieces:
//! - [`cli`]: the `microk8s` entry point. It logs every command (JSON lines) and forwards it to
//!   the local daemon, which executes it; `sim-daemon`, `sim-install` and `sim-snap` (a fake
//!   `snap` CLI that installs the simulator) run in the CLI process itself.
//! - [`daemon`]: the node's cluster agent: join checks in the reference's order, replicated
//!   cluster view, heartbeats, standby promotion, quorum, and every CLI command's behaviour.
//! - [`model`]: pure data and rules (roles, quorum, rebalance) and the output renderers.
//! - [`http`]: a small HTTP/1.1 JSON transport over TLS, with join.py's fingerprint check.
//! - [`agent_cert`]: the cluster agent's certificate and key in `$SNAP_DATA/certs`.
//! - [`credentials`]: the persistent join tokens in `$SNAP_DATA/credentials` (revocable).
//! - [`state_file`]: the one atomic write every state file goes through (unique temporary
//!   names per file, process and write).
//!
//! Configuration is by environment ([`SimEnv`]); see `tests/microk8s-sim/README.md` for what is
//! modelled from the reference and what is not. To add a command: handle it in
//! `daemon::Daemon::run_command`, add its output format to [`model`], and test it.

pub mod agent_cert;
pub mod cli;
pub mod credentials;
pub mod daemon;
pub mod http;
pub mod model;
pub mod state_file;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The simulator's settings, from environment variables (defaults in brackets):
/// - `MICROK8S_SIM_STATE` \[/var/snap/microk8s/current/sim\]: this node's state folder. Its
///   parent folder is the node's `$SNAP_DATA` \[/var/snap/microk8s/current\], which holds the
///   cluster agent's TLS certificate and key where the real snap keeps them,
///   `$SNAP_DATA/certs/server.crt` and `$SNAP_DATA/certs/server.key` (written at install);
/// - `MICROK8S_SIM_LAUNCH_CONFIG` \[/etc/microk8s.yaml\]: read by `snap install` (A8);
/// - `MICROK8S_SIM_NODE` \[hostname, lowercased\]: node name;
/// - `MICROK8S_SIM_IP` \[first non-loopback IPv4 of this namespace\]: this node's address until a
///   join tells it which one the cluster sees;
/// - `MICROK8S_SIM_PORT` \[25000\]: cluster agent port (also used by the CLI to reach it locally);
/// - `MICROK8S_SIM_LOG` \[$STATE/commands.jsonl\]: the command log;
/// - `MICROK8S_SIM_INSTALL_DELAY_MS`, `MICROK8S_SIM_JOIN_DELAY_MS`,
///   `MICROK8S_SIM_ENABLE_DELAY_MS` \[0\]: modelled durations;
/// - `MICROK8S_SIM_HEARTBEAT_MS` \[1000\]: heartbeat interval; a peer is dead after 3 missed;
/// - `MICROK8S_SIM_CONNECT_TIMEOUT_MS` \[5000\]: the joiner's connect timeout;
/// - `MICROK8S_SIM_SIGN_RACE_MS` \[2\]: how long a certificate signing runs; one that starts
///   while another runs on the same node fails, as two simultaneous `openssl x509
///   -CAcreateserial` runs can (0: never).
#[derive(Debug, Clone)]
pub struct SimEnv {
    pub state_dir: PathBuf,
    /// `$SNAP_DATA`: the parent of `state_dir` (`state_dir` itself if it has none).
    pub snap_data: PathBuf,
    pub launch_config: PathBuf,
    pub node: String,
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub log: PathBuf,
    pub install_delay: Duration,
    pub join_delay: Duration,
    pub enable_delay: Duration,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    pub sign_race: Duration,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn ms(name: &str, default: u64) -> anyhow::Result<Duration> {
    match var(name) {
        None => Ok(Duration::from_millis(default)),
        Some(v) => v
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number of milliseconds")),
    }
}

impl SimEnv {
    /// Reads the environment; a malformed value is an error naming the variable.
    pub fn from_env() -> anyhow::Result<SimEnv> {
        let state_dir: PathBuf = var("MICROK8S_SIM_STATE")
            .unwrap_or_else(|| "/var/snap/microk8s/current/sim".into())
            .into();
        let node = match var("MICROK8S_SIM_NODE") {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().to_lowercase())
                .unwrap_or_else(|_| "localhost".into()),
        };
        let ip = match var("MICROK8S_SIM_IP") {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| anyhow::anyhow!("MICROK8S_SIM_IP={v:?} is not an IP address"))?,
            ),
            None => None,
        };
        let port = match var("MICROK8S_SIM_PORT") {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("MICROK8S_SIM_PORT={v:?} is not a port"))?,
            None => 25000,
        };
        Ok(SimEnv {
            log: var("MICROK8S_SIM_LOG")
                .map(PathBuf::from)
                .unwrap_or_else(|| state_dir.join("commands.jsonl")),
            launch_config: var("MICROK8S_SIM_LAUNCH_CONFIG")
                .unwrap_or_else(|| "/etc/microk8s.yaml".into())
                .into(),
            snap_data: state_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(&state_dir)
                .to_path_buf(),
            state_dir,
            node,
            ip,
            port,
            install_delay: ms("MICROK8S_SIM_INSTALL_DELAY_MS", 0)?,
            join_delay: ms("MICROK8S_SIM_JOIN_DELAY_MS", 0)?,
            enable_delay: ms("MICROK8S_SIM_ENABLE_DELAY_MS", 0)?,
            heartbeat: ms("MICROK8S_SIM_HEARTBEAT_MS", 1000)?,
            connect_timeout: ms("MICROK8S_SIM_CONNECT_TIMEOUT_MS", 5000)?,
            sign_race: ms("MICROK8S_SIM_SIGN_RACE_MS", 2)?,
        })
    }

    /// This node's own address: `MICROK8S_SIM_IP`, else the first non-loopback IPv4.
    pub fn own_ip(&self) -> Option<IpAddr> {
        self.ip.or_else(|| local_ipv4s().into_iter().next())
    }
}

/// Non-loopback, non-link-local IPv4 addresses of this network namespace (`hostname -I`).
pub fn local_ipv4s() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(_) => false,
        })
        .collect();
    out.dedup();
    out
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
