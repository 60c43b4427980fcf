//! The simulated node: its cluster agent (HTTPS JSON on TCP 25000, with the certificate in
//! `$SNAP_DATA/certs/server.crt`) and the behaviour of every CLI command, which the `microk8s`
//! CLI forwards here over loopback (also TLS, as everything that reaches the agent).
//!
//! This module holds the node's state ([`Daemon`]), what it persists and its startup ([`run`]);
//! the behaviour lives in one module per concern:
//! - `agent_api`: the cluster agent's HTTP routes, including the seed's side of a join;
//! - `join`: `microk8s join`, the joiner's side, and the connection string rules;
//! - `replication`: the replicated [`View`], heartbeats and the leader's duties;
//! - `api_server`: the Kubernetes API endpoint on 16443 (readiness with the quorum rule, and
//!   ConfigMaps kept in `datastore`, with dqlite's quorum rules);
//! - `commands`: the other CLI commands, dispatched by [`Daemon::run_command`];
//! - `dbctl`: `microk8s dbctl backup|restore` of the datastore (kine keys);
//! - `helm`: `helm3` and the `kubectl` apply/wait/get calls for Longhorn and CSI snapshots,
//!   recorded and checked;
//! - `images`: `ctr image import|ls`, the node's containerd images (what an offline helm
//!   install's pods need on every Ready node);
//! - `metallb`: MetalLB's layer-2 speaker and one demo LoadBalancer service: the live node
//!   MetalLB would choose holds the pool's first address and answers HTTP on it.
//!
//! To add a command, add an arm to [`Daemon::run_command`] and its behaviour to `commands`
//! (or a module of its own when it talks to other nodes, as `join` does).

mod agent_api;
mod api_server;
mod commands;
mod datastore;
mod dbctl;
mod helm;
mod images;
mod join;
mod kubectl_label;
mod metallb;
mod replication;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::View;
use crate::SimEnv;
use crate::{agent_cert, http};

pub use commands::cmd_config;
pub use dbctl::dbctl_main;
pub use helm::{calls_path as cluster_tools_log, read_calls as cluster_tools_calls};
pub use images::{read_images as imported_images, ImportedImage};
pub use join::{fingerprint_of, valid_connection_parts};
pub use metallb::{
    announcing_node as metallb_announcing_node, events_path as metallb_events_path,
    read_events as metallb_events, service_address as metallb_service_address,
    SERVICE as METALLB_SERVICE,
};

/// Printed by `is_cluster_locked` on worker nodes (A5).
pub const WORKER_MSG: &str =
    "This MicroK8s deployment is acting as a node in a cluster.\nPlease use the control plane node.\n";
/// Printed by `status` when the node is not ready.
pub const NOT_READY_MSG: &str =
    "microk8s is not running. Use microk8s inspect for a deeper inspection.\n";
/// Printed when MicroK8s is stopped (A5).
pub const STOPPED_MSG: &str = "microk8s is not running, try microk8s start\n";
/// Printed (exit 0) by `microk8s config` on a worker (the snap's `microk8s-config.wrapper`).
pub const CONFIG_WORKER_MSG: &str = "This MicroK8s deployment is acting as a node in a cluster. Please use the microk8s config on the master.\n";
const TOKEN_MIN_LEN: usize = 32;
const FINGERPRINT_MIN_LEN: usize = 12;

/// An addon entry of the launch configuration (A8).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchAddon {
    pub name: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub disable: bool,
}

/// What `snap install` left behind (`$STATE/installed.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub persistent_token: Option<String>,
    /// Hex of the DER form of the agent's certificate, `$SNAP_DATA/certs/server.crt`; its
    /// SHA-256 prefix is the join fingerprint (A1). The daemon refuses to start when the file
    /// holds another certificate.
    pub cert_hex: String,
    pub addons: Vec<LaunchAddon>,
    pub kubelet_args: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    token: String,
    /// Unix seconds; `None` = one-time.
    expiry_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    view: View,
    my_ip: Option<IpAddr>,
    worker: bool,
    tokens: Vec<Token>,
    launch_applied: bool,
}

/// A command's result as the CLI prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn ok(stdout: impl Into<String>) -> Out {
        Out {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    fn fail(code: i32, stdout: impl Into<String>) -> Out {
        Out {
            code,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    fn err(code: i32, stderr: impl Into<String>) -> Out {
        Out {
            code,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

pub fn installed_path(env: &SimEnv) -> PathBuf {
    env.state_dir.join("installed.json")
}

/// The agent's request log (see `agent_api`).
pub fn request_log_path(env: &SimEnv) -> PathBuf {
    env.state_dir.join("requests.jsonl")
}

fn state_path(env: &SimEnv) -> PathBuf {
    env.state_dir.join("state.json")
}

/// Writes JSON atomically ([`crate::state_file::write_json`]: an unpredictable temporary
/// name per write, then a rename; mode 0600).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    crate::state_file::write_json(path, value)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// The in-flight joins younger than `timeout`, measured from when this node first saw each
/// (`seen`, on its own monotonic clock; it learns of a join when the seed pushes the view,
/// before the joiner goes on). The seed's wall-clock stamp only tells joins apart: nodes'
/// clocks can be years apart until NTP answers, so one node's stamp is never compared with
/// another's clock. Joins gone from `joining` are forgotten.
fn current_joins(
    seen: &mut BTreeMap<(IpAddr, u64), Instant>,
    joining: &[crate::model::InFlight],
    now: Instant,
    timeout: Duration,
) -> BTreeSet<(IpAddr, u64)> {
    seen.retain(|k, _| joining.iter().any(|j| (j.ip, j.since_ms) == *k));
    joining
        .iter()
        .map(|j| (j.ip, j.since_ms))
        .filter(|k| now.duration_since(*seen.entry(*k).or_insert(now)) <= timeout)
        .collect()
}

/// One simulated node.
pub struct Daemon {
    env: SimEnv,
    installed: Installed,
    st: Mutex<Persisted>,
    last_seen: Mutex<BTreeMap<String, Instant>>,
    /// On a worker: the other nodes the control plane reported alive in its pongs, and when
    /// (workers do not heartbeat each other; MetalLB's speakers all know each other).
    reported: Mutex<BTreeMap<String, Instant>>,
    /// When this node first saw each in-flight join (keyed by joiner and the seed's stamp), on
    /// its own monotonic clock: a join's age never compares one node's wall clock with
    /// another's (nodes' clocks can be years apart until NTP answers).
    inflight_seen: Mutex<BTreeMap<(IpAddr, u64), Instant>>,
    speaker: tokio::sync::Mutex<metallb::Speaker>,
    store: datastore::Store,
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Persisted> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.installed.name
    }

    fn persist(&self, st: &Persisted) {
        if let Err(e) = write_json(&state_path(&self.env), st) {
            eprintln!("microk8s-sim: {e:#}");
        }
    }

    fn dead_after(&self) -> Duration {
        self.env.heartbeat * 3
    }

    /// Names of the nodes alive in this node's view: itself plus peers heard from recently.
    fn alive(&self) -> BTreeSet<String> {
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut a: BTreeSet<String> = seen
            .iter()
            .filter(|(_, t)| t.elapsed() < self.dead_after())
            .map(|(n, _)| n.clone())
            .collect();
        a.insert(self.name().to_owned());
        a
    }

    fn ready(&self, st: &Persisted) -> bool {
        !st.worker && st.view.quorum(&self.alive())
    }

    fn inflight_timeout(&self) -> Duration {
        self.env.join_delay + Duration::from_secs(30)
    }

    /// Whether an in-flight join is still current, as this node measures it (see
    /// [`current_joins`]). Lock order: state before `inflight_seen`.
    fn inflight_current(&self, view: &View) -> impl Fn(&crate::model::InFlight) -> bool {
        let mut seen = self.inflight_seen.lock().unwrap_or_else(|p| p.into_inner());
        let current = current_joins(
            &mut seen,
            &view.joining,
            Instant::now(),
            self.inflight_timeout(),
        );
        move |j| current.contains(&(j.ip, j.since_ms))
    }

    /// Bumps the version, persists and returns the view to push.
    fn commit(&self, st: &mut Persisted) -> View {
        st.view.version += 1;
        self.persist(st);
        st.view.clone()
    }
}

/// The cluster id a node starts with (its own one-node cluster). Derived from the certificate
/// generated at install, so `microk8s config` shows the same CA before and after the daemon
/// first ran, as the real install hook creates the CA once. (A hash: DER certificates all start
/// alike.)
fn first_cluster_id(installed: &Installed) -> String {
    let der = hex::decode(&installed.cert_hex).unwrap_or_default();
    let mut tagged = b"microk8s-sim cluster id\n".to_vec();
    tagged.extend_from_slice(&der);
    crate::agent_cert::sha256_hex(&tagged)[..16].to_owned()
}

/// Runs the node until killed: loads `installed.json` (and `state.json` when present), serves
/// the agent on `0.0.0.0:PORT`, heartbeats, and applies the launch config's addons once.
pub async fn run(env: SimEnv) -> Result<()> {
    let ipath = installed_path(&env);
    let installed: Installed = match std::fs::read(&ipath) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", ipath.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "microk8s is not installed ({} is missing); run `snap install` first",
                ipath.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", ipath.display())),
    };
    let spath = state_path(&env);
    let st: Persisted = match std::fs::read(&spath) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", spath.display()))?
        }
        Err(_) => Persisted {
            view: View::single(first_cluster_id(&installed), &installed.name, env.own_ip()),
            my_ip: env.own_ip(),
            worker: false,
            tokens: vec![],
            launch_applied: false,
        },
    };
    let cert = agent_cert::load(&env.snap_data)?;
    if hex::encode(&cert.cert) != installed.cert_hex {
        bail!(
            "{} holds another certificate than the one install recorded in {}; reinstall",
            agent_cert::cert_path(&env.snap_data).display(),
            ipath.display()
        );
    }
    let tls = http::acceptor(cert)?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", env.port))
        .await
        .with_context(|| format!("binding the cluster agent to 0.0.0.0:{}", env.port))?;
    let store = datastore::Store::load(&env.state_dir);
    let d = Arc::new(Daemon {
        store,
        env,
        installed,
        st: Mutex::new(st),
        last_seen: Mutex::new(BTreeMap::new()),
        reported: Mutex::new(BTreeMap::new()),
        inflight_seen: Mutex::new(BTreeMap::new()),
        speaker: tokio::sync::Mutex::new(metallb::Speaker::default()),
    });
    d.persist(&d.lock());
    api_server::start(d.clone(), tls.clone());
    // Launch-config addons are applied by the running agent (A8).
    let launch = d.clone();
    tokio::spawn(async move {
        if launch.lock().launch_applied {
            return;
        }
        for a in launch.installed.addons.clone() {
            let mut argv = vec![
                if a.disable { "disable" } else { "enable" }.to_owned(),
                a.name.clone(),
            ];
            argv.extend(a.args.clone());
            let out = launch.run_command(&argv).await;
            if out.code != 0 {
                eprintln!(
                    "microk8s-sim: launch config addon {}: {}{}",
                    a.name, out.stdout, out.stderr
                );
            }
        }
        let mut st = launch.lock();
        st.launch_applied = true;
        launch.persist(&st);
    });
    let hb = d.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(hb.env.heartbeat).await;
            hb.heartbeat_once().await;
        }
    });
    // MetalLB's speaker re-decides every heartbeat (module `metallb`).
    let speaker = d.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(speaker.env.heartbeat).await;
            speaker.metallb_tick().await;
        }
    });
    // A stop (SIGTERM, as systemd sends) drops the LoadBalancer address before the exit; a
    // SIGKILL cannot (the machine lost power).
    let stopping = d.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        term.recv().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            stopping.metallb_stop("the node is stopping (SIGTERM)"),
        )
        .await;
        std::process::exit(0);
    });
    let handler = {
        let d = d.clone();
        move |req| d.clone().route(req)
    };
    http::serve(listener, tls, handler).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InFlight;

    fn join(ip: &str, since_ms: u64) -> InFlight {
        InFlight {
            ip: ip.parse().unwrap(),
            since_ms,
            worker: false,
        }
    }

    /// A join stamped by a seed whose clock is years behind this node's is current when first
    /// seen, and expires on this node's own clock, not on the difference of the two clocks.
    #[test]
    fn a_join_ages_on_the_observers_clock_not_the_seeds_stamp() {
        let mut seen = BTreeMap::new();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        // Stamped 4 years before (on this node's wall clock): still current.
        let years_ago = crate::now_ms() - 4 * 365 * 24 * 3600 * 1000;
        let joining = vec![join("10.0.0.1", years_ago), join("10.0.0.2", u64::MAX)];
        let current = current_joins(&mut seen, &joining, t0, timeout);
        assert_eq!(current.len(), 2, "{current:?}");
        let current = current_joins(&mut seen, &joining, t0 + Duration::from_secs(29), timeout);
        assert_eq!(current.len(), 2);
        // A join first seen later ages from then.
        let mut later = joining.clone();
        later.push(join("10.0.0.3", 5));
        let current = current_joins(&mut seen, &later, t0 + Duration::from_secs(31), timeout);
        assert_eq!(
            current.into_iter().collect::<Vec<_>>(),
            vec![("10.0.0.3".parse().unwrap(), 5)]
        );
        // Joins gone from the view are forgotten: one seen again starts afresh.
        let current = current_joins(&mut seen, &[], t0 + Duration::from_secs(32), timeout);
        assert!(current.is_empty() && seen.is_empty());
        let current = current_joins(&mut seen, &joining, t0 + Duration::from_secs(40), timeout);
        assert_eq!(current.len(), 2);
    }
}
