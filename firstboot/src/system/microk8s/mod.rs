//! The MicroK8s adapter: [`Microk8s`] is everything firstboot asks of MicroK8s, with
//! [`RealMicrok8s`] driving the real snap through its CLI (every call through
//! [`Cmd`]) and `system::fakes::FakeMicrok8s` behaving the same in
//! memory for agent tests.
//!
//! Facts follow `shared/reference/microk8s-and-ubuntu-facts.md` part A:
//! - install writes the launch config (A8) to `/etc/microk8s.yaml` *before* `snap install`, with
//!   a `persistentClusterToken` derived from the cluster secret and the DNS addon plus kubelet
//!   DNS arguments the bundled default would have given;
//! - joins use `IP:25000/TOKEN[/FINGERPRINT]` built from an [`IpAddr`] (A3: the host must be an
//!   IP literal; join.py splits the host part on `:`, so an IPv6 seed cannot be expressed and is
//!   refused before running anything), `--worker` for workers, never `--controlplane`; the URL
//!   is a secret argument and never logged;
//! - exit codes of `join` map to [`JoinError`] (A3), status edge cases to [`Status`] (A5);
//! - worker joins may run at once (the formation core allows it; see `rackseed_formation`'s
//!   docs for what canonical/microk8s-cluster-agent `pkg/api/v2/join.go` does for a worker).
//!   Their certificate signings can collide on the seed (`SignCertificate` in
//!   `pkg/snap/snap.go` runs `openssl x509 … -CAcreateserial` with no lock): join.py then exits
//!   1 with `Failed to sign <name> certificate (<status>). <error>` (`get_client_cert` in
//!   `scripts/wrappers/join.py`), classified as the transient [`JoinError::CertificateSigning`],
//!   which the driver retries with backoff;
//! - membership comes from the dqlite `.cluster` query and `kubectl get nodes -o json` (A5);
//! - `microk8s config` (not in the reference; from the snap's `microk8s-config.wrapper`) prints
//!   the admin kubeconfig, or on a worker "This MicroK8s deployment is acting as a node in a
//!   cluster. Please use the microk8s config on the master." with exit 0, which maps to
//!   [`Microk8sError::WorkerNode`]. Its output is a credential and never goes into an error.
//!
//! - rotation ([`replace_persistent_token`]) edits `$SNAP_DATA/credentials/persistent-cluster-tokens.txt`
//!   directly, because MicroK8s has no command for persistent tokens (`add-node` writes only
//!   `cluster-tokens.txt`, A1). What it relies on, from canonical/microk8s-cluster-agent:
//!   `pkg/k8sinit/apply.go` (`applyPart`) puts the launch config's `persistentClusterToken`
//!   into that file through `AddPersistentClusterToken` (`pkg/snap/snap.go`, one token per
//!   line, appended); `ConsumeClusterToken` (`pkg/snap/snap.go`) checks that file first on
//!   every join and never consumes from it; `IsValidToken` (`pkg/util/token.go`) reads the
//!   file afresh on each call, trims each line and compares the part before an optional
//!   `|<unix-expiry>`. So a line added is accepted at the next join and a line removed is
//!   refused at once ("invalid token", 500, A4), with no restart of the cluster agent. The
//!   file is rewritten atomically with mode 0600 (MicroK8s' own writes use 0660 and the
//!   `microk8s` group; the cluster agent runs as root, so 0600 only narrows who reads the
//!   token). The `credentials` folder exists once the snap is installed; before that there is
//!   nothing to edit (the launch config, rewritten with the new token, carries it into the
//!   install) and `/var/snap/microk8s` is never created by us (snapd owns it).
//!
//! - datastore backup and restore (`microk8s dbctl`): see [`dbctl`] for what is relied on.
//!
//! - removing a dead member ([`Microk8s::remove_node`] with `force`, run by the slot
//!   authority when the cluster record decided it) relies on canonical/microk8s
//!   `scripts/wrappers/remove_node.py` (read at d099c907): on a node running dqlite, an IP
//!   argument is first looked up to the Kubernetes node whose `InternalIP` it is (`kubectl get
//!   no -o json`); the node must then exist in Kubernetes (`kubectl get no NAME`), else it
//!   prints "Node X does not exist in Kubernetes.", with `--force` removes a dqlite endpoint
//!   starting with `X:` (`dqlite … ".remove <ep>"`), and exits 1 ([`Microk8sError::UnknownNode`]:
//!   nothing is left that MicroK8s knows by that address, or the API was down). For a known
//!   node still in dqlite it refuses without `--force` ("Removal failed. Node X is registered
//!   with dqlite. Please, run first 'microk8s leave' on the departing node", exit 1,
//!   [`Microk8sError::StillInDqlite`]) whether or not the node is reachable; with `--force` it
//!   removes the endpoint, then the node's kubelet and callback tokens, and runs `kubectl
//!   delete no NAME` (exit 0). The local addresses are never removed from dqlite (the script
//!   only looks among the other endpoints), so naming this node itself only deletes its Node
//!   object: the agent never does (the formation core never removes the proposer). On a
//!   worker (no dqlite) only the Node is deleted; the adapter refuses there, as the agent only
//!   removes from control-plane members.
//! - [`Microk8s::leave`] relies on `scripts/wrappers/leave.py` (same commit): on a dqlite node
//!   it exits 3 when this node holds the only copy of the database
//!   (`is_leader_without_successor`, [`Microk8sError::OnlyCopy`]); otherwise it stops the API
//!   server and k8s-dqlite, removes its own endpoint through another member
//!   (`delete_dqlite_node(my_ep, other_ep)`), regenerates the cluster certificates and starts
//!   as a fresh single node. Its Kubernetes Node object stays until a member runs
//!   `remove-node` for it. A worker (`is_node_dqlite_worker`,
//!   `reset_current_dqlite_worker_installation`) contacts nobody: it stops its API server
//!   proxy, re-initialises a fresh dqlite and its kubelet/kube-proxy arguments, removes its
//!   `clustered.lock` and `no-k8s-dqlite` locks ("Not in clustering mode", exit 2, when they
//!   are missing) and restarts as a standalone node; its Node object stays in the cluster
//!   (NotReady). Before any of it, `microk8s-resources/wrappers/microk8s-leave.wrapper`
//!   (read at 0a02b022) refuses a node that is not in a cluster (no `no-cert-reissue` lock,
//!   which `leave` itself removes: a second `leave` is refused): "This MicroK8s deployment
//!   is not acting as a node in a cluster.", exit 1, [`Microk8sError::NotInCluster`].
//!   A worker being converted to control plane (`rackseed_formation`'s `Op::Convert`) runs
//!   `leave`; `NotInCluster` then means it left already (a restart after the leave).
//! - `remove-node` for a node that *left* needs no `--force`: remove_node.py (read at
//!   3f595537) refuses without it only while the node's address is among the other dqlite
//!   endpoints; a left worker (never in dqlite) or a left control-plane node (`leave` deleted
//!   its endpoint) just has its tokens and Node object deleted, exit 0. A name Kubernetes
//!   does not know is "does not exist in Kubernetes", exit 1, with or without `--force`
//!   ([`Microk8sError::UnknownNode`]).
//!
//! Parsing lives in [`parse`] and is tested on fixtures. To add an operation: add a method to
//! the trait, implement it here (invoke + a parser in `parse`) and in the fake.

pub mod dbctl;
pub mod helm;
pub mod labels;
pub mod launch;
pub mod parse;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;

use rackseed_host::command::{Cmd, CmdError, Output};
use rackseed_protocol::secret::ClusterSecret;

pub use launch::{render_launch_config, rewrite_launch_config_token, LaunchSettings};
pub use parse::{
    AddonState, DatastoreNode, DqliteMember, DqliteRole, K8sNode, NodeRole, ParseError,
    RunningStatus, Status,
};

/// Default CLI (the snap's `/snap/bin/microk8s`).
pub const DEFAULT_BINARY: &str = "microk8s";
/// Where the snap's install hook looks first for a launch configuration (A8).
pub const DEFAULT_LAUNCH_CONFIG: &str = "/etc/microk8s.yaml";
/// The dqlite client shipped in the snap (A5; there is no `microk8s.dqlite` command).
pub const DEFAULT_DQLITE: &str = "/snap/microk8s/current/bin/dqlite";
/// The backend directory holding `cluster.yaml`, `cluster.crt`, `cluster.key` (A5).
pub const DEFAULT_DQLITE_BACKEND: &str = "/var/snap/microk8s/current/var/kubernetes/backend";
/// The cluster agent's TLS certificate, `$SNAP_DATA/certs/server.crt` (A1): its fingerprint
/// is what `microk8s join IP:PORT/TOKEN/FINGERPRINT` checks on the seed.
pub const DEFAULT_CLUSTER_AGENT_CERT: &str = "/var/snap/microk8s/current/certs/server.crt";
/// The cluster agent's default port (A1).
pub const CLUSTER_AGENT_PORT: u16 = 25000;
/// Minimum token length (A1, `TOKEN_ΜΙΝ_LEN`).
pub const TOKEN_MIN_LEN: usize = 32;
/// How often [`Microk8s::wait_ready`] re-asks a stopped node.
const STOPPED_RETRY: Duration = Duration::from_millis(500);
/// Minimum fingerprint length (A3, `FINGERPRINT_MIN_LEN`).
pub const FINGERPRINT_MIN_LEN: usize = 12;

/// Where the snap comes from. Either way [`Microk8s::install`] first writes the launch config and
/// waits for snapd's seeding (`snap wait system seed.loaded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallSource {
    /// `snap install microk8s --classic --channel=<channel>`.
    Channel(String),
    /// A folder with staged `microk8s*.snap` + `.assert` (and optionally `core2x*` base snaps):
    /// `snap ack <assert>` for each, then `snap install <base>`, `snap install <microk8s> --classic`.
    Staged(PathBuf),
}

/// Whether install did anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    Installed,
    AlreadyInstalled,
}

/// Whether enable did anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnableOutcome {
    Enabled,
    AlreadyEnabled,
}

/// How a node joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinRole {
    /// No flag: a control-plane node (never `--controlplane`, which is broken; A3).
    ControlPlane,
    /// `--worker`.
    Worker,
}

/// The node to join through and the credentials for it. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTarget {
    pub seed: IpAddr,
    pub port: u16,
    pub token: String,
    /// The first >= 12 hex characters of the seed's certificate hash; optional (A8, #4582).
    pub fingerprint: Option<String>,
}

impl std::fmt::Debug for JoinTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTarget")
            .field("seed", &self.seed)
            .field("port", &self.port)
            .field("token", &"<redacted>")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl JoinTarget {
    /// A target on the default agent port with no fingerprint.
    pub fn new(seed: IpAddr, token: impl Into<String>) -> Self {
        JoinTarget {
            seed,
            port: CLUSTER_AGENT_PORT,
            token: token.into(),
            fingerprint: None,
        }
    }

    /// The `IP:PORT/TOKEN[/FINGERPRINT]` argument, validated as join.py's
    /// `get_valid_connection_parts` would (A3). Secret: pass it only via `Cmd::secret_arg`.
    pub fn url(&self) -> Result<String, JoinError> {
        let ip = match self.seed {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => {
                return Err(JoinError::InvalidConnection {
                    seed: self.seed,
                    reason: "microk8s join splits the seed on ':' and cannot take an IPv6 address"
                        .into(),
                })
            }
        };
        let bad = |reason: &str| JoinError::InvalidConnection {
            seed: self.seed,
            reason: reason.into(),
        };
        if self.port == 0 {
            return Err(bad("port must be 1-65535"));
        }
        if self.token.len() < TOKEN_MIN_LEN || self.token.contains(['/', ':']) {
            return Err(bad(
                "token must be at least 32 characters without '/' or ':'",
            ));
        }
        let mut url = format!("{ip}:{}/{}", self.port, self.token);
        if let Some(fp) = &self.fingerprint {
            if fp.len() < FINGERPRINT_MIN_LEN || fp.contains('/') {
                return Err(bad("fingerprint must be at least 12 characters"));
            }
            url.push('/');
            url.push_str(fp);
        }
        Ok(url)
    }
}

/// Why a join failed; callers branch on these (retry, re-pick a seed, give up).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Refused before contacting anyone (exit 1, "Invalid connection: …"), or the URL could not
    /// be built at all.
    #[error("invalid join connection for seed {seed}: {reason}")]
    InvalidConnection { seed: IpAddr, reason: String },
    /// The seed's cluster agent could not be reached (join.py does not catch the socket error;
    /// it exits 1 with a Python traceback naming `[Errno …]`).
    #[error("seed {seed} unreachable: {detail}")]
    Unreachable { seed: IpAddr, detail: String },
    /// Certificate fingerprint mismatch or TLS failure (exit 4).
    #[error("could not verify the identity of seed {seed}: {detail}")]
    Unverified { seed: IpAddr, detail: String },
    /// An HTTP protocol failure talking to the seed (exit 5).
    #[error("http failure talking to seed {seed}: {detail}")]
    Http { seed: IpAddr, detail: String },
    /// The seed answered non-200 (exit 6, `Connection failed. <error> (<status>).`): 500 for a
    /// bad token, an already-known node or a concurrent join, 501 not HA, 502 port mismatch,
    /// 503 joining itself (A4).
    #[error("seed {seed} rejected the join ({status}): {message}")]
    Rejected {
        seed: IpAddr,
        status: u16,
        message: String,
    },
    /// A worker's certificate signing on the seed failed (exit 1, `Failed to sign <name>
    /// certificate (<status>). <error>`, join.py `get_client_cert`). Transient: the seed's
    /// cluster agent signs with `openssl x509 … -CAcreateserial` and no lock
    /// (canonical/microk8s-cluster-agent `pkg/snap/snap.go` `SignCertificate`), so two
    /// workers joining at once can rarely collide on its serial file; the join is retried
    /// (with the persistent token, which a join never consumes).
    #[error("seed {seed} failed to sign the {certificate} certificate: {detail}")]
    CertificateSigning {
        seed: IpAddr,
        certificate: String,
        detail: String,
    },
    /// Any other non-zero exit (e.g. low-memory guard, exit 1 after the join request).
    #[error("`microk8s join` via seed {seed} failed (exit {code:?}): {detail}")]
    Failed {
        seed: IpAddr,
        code: Option<i32>,
        detail: String,
    },
    /// The command could not be run or timed out.
    #[error("running microk8s join via seed {seed}")]
    Command { seed: IpAddr, source: CmdError },
}

impl JoinError {
    /// Whether the same join may succeed when simply run again: a worker's certificate
    /// signing that collided with another one on the seed. Everything else needs a new
    /// grant (or is final).
    pub fn is_transient(&self) -> bool {
        matches!(self, JoinError::CertificateSigning { .. })
    }
}

impl JoinError {
    /// The seed rejected the token (`500 invalid token`).
    pub fn is_bad_token(&self) -> bool {
        matches!(self, JoinError::Rejected { status: 500, message, .. }
            if message.to_ascii_lowercase().contains("invalid token"))
    }
}

/// Errors of every other operation.
#[derive(Debug, thiserror::Error)]
pub enum Microk8sError {
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The operation is refused on a worker node (`is_cluster_locked`, A5/A7).
    #[error("`{command}` refused: this node is a worker (acting as a node in a cluster)")]
    WorkerNode { command: String },
    /// MicroK8s is stopped or not ready; the command needs a running cluster.
    #[error("`{command}` failed: microk8s is not running or not ready: {detail}")]
    NotRunning { command: String, detail: String },
    /// `leave` refused: this node holds the only copy of the database (exit 3, A6).
    #[error("`microk8s leave` refused: this node holds the only copy of the kubernetes database")]
    OnlyCopy,
    /// `leave` refused: this node is not in a cluster (never joined, or left already; exit 1
    /// from `microk8s-leave.wrapper`).
    #[error("`microk8s leave` refused: this node is not acting as a node in a cluster")]
    NotInCluster,
    /// `remove-node` without `--force` on a node still in dqlite (A6).
    #[error("`microk8s remove-node {node}` refused: the node is still in dqlite; run `microk8s leave` on it first or use force")]
    StillInDqlite { node: String },
    /// Kubernetes did not know the name (exit 1, A6); with `--force` a dqlite entry at that
    /// address was removed first.
    #[error("`microk8s remove-node {node}`: kubernetes does not know this node (with --force, its dqlite entry, if any, was removed)")]
    UnknownNode { node: String },
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("writing launch configuration {path}")]
    LaunchConfig {
        path: String,
        source: std::io::Error,
    },
    #[error("staged snaps in {dir}: {detail}")]
    Staged { dir: String, detail: String },
    #[error("`{command}` failed (exit {code:?}): {detail}")]
    Failed {
        command: String,
        code: Option<i32>,
        detail: String,
    },
}

/// Everything firstboot asks of MicroK8s. Object safe: hold it as `Arc<dyn Microk8s>`.
pub trait Microk8s: Send + Sync {
    /// Whether the snap is installed.
    fn is_installed(&self) -> BoxFuture<'_, Result<bool, Microk8sError>>;
    /// Writes the launch config, then installs (skipped when already installed).
    fn install<'a>(
        &'a self,
        source: &'a InstallSource,
        secret: &'a ClusterSecret,
    ) -> BoxFuture<'a, Result<InstallOutcome, Microk8sError>>;
    /// `microk8s status --format yaml`.
    fn status(&self) -> BoxFuture<'_, Result<Status, Microk8sError>>;
    /// `microk8s status --wait-ready --timeout N`: `Ok(true)` when ready in time.
    fn wait_ready(&self, timeout: Duration) -> BoxFuture<'_, Result<bool, Microk8sError>>;
    /// `microk8s join IP:PORT/TOKEN[/FP] [--worker]`.
    fn join<'a>(
        &'a self,
        target: &'a JoinTarget,
        role: JoinRole,
    ) -> BoxFuture<'a, Result<(), JoinError>>;
    /// The dqlite `.cluster` query (voters, standby, spare).
    fn dqlite_members(&self) -> BoxFuture<'_, Result<Vec<DqliteMember>, Microk8sError>>;
    /// `microk8s kubectl get nodes -o json`.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<K8sNode>, Microk8sError>>;
    /// `microk8s enable ADDON [ARGS…]`; idempotent; refused on workers.
    fn enable<'a>(
        &'a self,
        addon: &'a str,
        args: &'a [String],
    ) -> BoxFuture<'a, Result<EnableOutcome, Microk8sError>>;
    /// `microk8s kubectl label node NODE KEY=VALUE... --overwrite`: puts `labels` on the
    /// Kubernetes node `node` ([`labels`]). Control-plane nodes only: on a worker the kubectl
    /// wrapper refuses ([`Microk8sError::WorkerNode`]); an unknown node is
    /// [`Microk8sError::UnknownNode`].
    fn label_node<'a>(
        &'a self,
        node: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), Microk8sError>>;
    /// `microk8s leave`.
    fn leave(&self) -> BoxFuture<'_, Result<(), Microk8sError>>;
    /// `microk8s remove-node NAME_OR_IP [--force]`.
    fn remove_node<'a>(
        &'a self,
        name_or_ip: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<(), Microk8sError>>;
    /// `microk8s config`: the cluster's admin kubeconfig, its `server` the node's default
    /// interface address on port 16443. It reads a file, so it answers on a stopped node too;
    /// a worker has none ([`Microk8sError::WorkerNode`]). A credential: never log it.
    fn config(&self) -> BoxFuture<'_, Result<String, Microk8sError>>;
    /// The SHA-256 fingerprint (64 lowercase hex) of this node's cluster agent certificate,
    /// which joiners put in their join URL. Exists once MicroK8s is installed.
    fn cluster_agent_fingerprint(&self) -> BoxFuture<'_, Result<String, Microk8sError>>;
    /// MicroK8s' bundled helm and kubectl ([`helm::ClusterTools`]); `None` where there are
    /// none (the in-memory fake), and then nothing that needs them is attempted.
    fn cluster_tools(&self) -> Option<std::sync::Arc<dyn helm::ClusterTools>> {
        None
    }
    /// MicroK8s' datastore backup and restore (`microk8s dbctl`, [`dbctl`]); `None` where there
    /// is none (the in-memory fake), and then no backup is scheduled.
    fn datastore(&self) -> Option<std::sync::Arc<dyn dbctl::Datastore>> {
        None
    }
}

/// `$SNAP_DATA/credentials/persistent-cluster-tokens.txt`: the persistent join tokens the
/// cluster agent accepts (see the module docs).
pub fn persistent_tokens_file(snap_data: &Path) -> PathBuf {
    snap_data.join("credentials/persistent-cluster-tokens.txt")
}

/// `$SNAP_DATA` from the cluster agent certificate's path (`$SNAP_DATA/certs/server.crt`).
pub fn snap_data_of(cluster_agent_cert: &Path) -> PathBuf {
    cluster_agent_cert
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// What [`replace_persistent_token`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenReplacement {
    /// The file now holds `new` and none of the revoked tokens; `changed` when it was rewritten.
    Replaced { changed: bool },
    /// MicroK8s is not installed (no `credentials` folder): nothing to edit.
    NotInstalled,
}

/// Makes the persistent token file `file` accept `new` and refuse every token in `revoke`:
/// `new` is appended when missing, each line whose token (the part before `|`) is revoked is
/// dropped, other lines are kept as they are. Atomic, mode 0600; idempotent. Tokens never
/// appear in the error. See the module docs for the MicroK8s behaviour this relies on.
pub fn replace_persistent_token(
    file: &Path,
    new: &str,
    revoke: &[String],
) -> std::io::Result<TokenReplacement> {
    if file.parent().is_none_or(|d| !d.is_dir()) {
        return Ok(TokenReplacement::NotInstalled);
    }
    if new.len() < TOKEN_MIN_LEN || new.contains(['\n', '|']) {
        return Err(std::io::Error::other(format!(
            "the new persistent token for {} is malformed (at least {TOKEN_MIN_LEN} characters, one line, no '|')",
            file.display()
        )));
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let token_of = |line: &str| line.trim().split('|').next().unwrap_or("").to_string();
    let mut kept: Vec<&str> = Vec::new();
    let mut has_new = false;
    for line in text.lines() {
        let t = token_of(line);
        if t.is_empty() || (revoke.contains(&t) && t != new) {
            continue;
        }
        has_new |= t == new;
        kept.push(line);
    }
    if !has_new {
        kept.push(new);
    }
    let mut out = kept.join("\n");
    out.push('\n');
    if out == text {
        return Ok(TokenReplacement::Replaced { changed: false });
    }
    rackseed_host::fs::write_atomic(file, out.as_bytes(), 0o600)
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    Ok(TokenReplacement::Replaced { changed: true })
}

/// Paths and timeouts of [`RealMicrok8s`].
#[derive(Debug, Clone)]
pub struct RealMicrok8sConfig {
    /// The `microk8s` CLI. Default [`DEFAULT_BINARY`].
    pub binary: PathBuf,
    /// The `snap` CLI. Default `snap`.
    pub snap: PathBuf,
    /// The dqlite client. Default [`DEFAULT_DQLITE`].
    pub dqlite: PathBuf,
    /// The dqlite backend folder. Default [`DEFAULT_DQLITE_BACKEND`].
    pub dqlite_backend: PathBuf,
    /// Where to write the launch config. Default [`DEFAULT_LAUNCH_CONFIG`].
    pub launch_config: PathBuf,
    /// What the launch config holds besides the token (dns upstreams, SANs). Default: dns.
    pub launch_settings: LaunchSettings,
    /// The cluster agent's certificate. Default [`DEFAULT_CLUSTER_AGENT_CERT`].
    pub cluster_agent_cert: PathBuf,
    /// Timeout of `snap install`. Default 20 min (slow SD cards).
    pub install_timeout: Duration,
    /// Timeout of `microk8s join`. Default 10 min (it sleeps and restarts services, A4).
    pub join_timeout: Duration,
    /// Timeout of `microk8s enable`. Default 10 min.
    pub enable_timeout: Duration,
    /// Timeout of quick queries (status, kubectl, dqlite). Default 60 s.
    pub query_timeout: Duration,
}

impl Default for RealMicrok8sConfig {
    fn default() -> Self {
        RealMicrok8sConfig {
            binary: DEFAULT_BINARY.into(),
            snap: "snap".into(),
            dqlite: DEFAULT_DQLITE.into(),
            dqlite_backend: DEFAULT_DQLITE_BACKEND.into(),
            launch_config: DEFAULT_LAUNCH_CONFIG.into(),
            launch_settings: LaunchSettings::default(),
            cluster_agent_cert: DEFAULT_CLUSTER_AGENT_CERT.into(),
            install_timeout: Duration::from_secs(20 * 60),
            join_timeout: Duration::from_secs(10 * 60),
            enable_timeout: Duration::from_secs(10 * 60),
            query_timeout: Duration::from_secs(60),
        }
    }
}

/// MicroK8s through its CLI.
#[derive(Debug, Clone, Default)]
pub struct RealMicrok8s {
    pub config: RealMicrok8sConfig,
}

fn detail(out: &Output) -> String {
    tail(&format!("{}\n{}", out.stdout.trim(), out.stderr.trim()))
}

/// The last 600 characters of `text`, trimmed: the interesting line is usually last.
fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(600)
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[start..].to_owned()
}

impl RealMicrok8s {
    pub fn new(config: RealMicrok8sConfig) -> Self {
        RealMicrok8s { config }
    }

    fn mk(&self, timeout: Duration) -> Cmd {
        Cmd::new(&self.config.binary, timeout)
    }

    async fn run_mk(&self, args: &[&str], timeout: Duration) -> Result<Output, Microk8sError> {
        Ok(self.mk(timeout).args(args).output().await?)
    }

    /// Writes the launch config with mode 0600 (it holds the token), atomically.
    fn write_launch_config(&self, secret: &ClusterSecret) -> Result<(), Microk8sError> {
        let path = &self.config.launch_config;
        let err = |source| Microk8sError::LaunchConfig {
            path: path.display().to_string(),
            source,
        };
        write_private_file(
            path,
            render_launch_config(&secret.microk8s_token(), &self.config.launch_settings).as_bytes(),
        )
        .map_err(err)
    }

    async fn snap(&self, args: &[&str]) -> Result<Output, Microk8sError> {
        Ok(Cmd::new(&self.config.snap, self.config.install_timeout)
            .args(args)
            .run()
            .await?)
    }

    async fn install_staged(&self, dir: &Path) -> Result<(), Microk8sError> {
        let staged = find_staged(dir)?;
        for (_, assert) in staged.bases.iter().chain([&staged.microk8s]) {
            self.snap(&["ack", &assert.to_string_lossy()]).await?;
        }
        for (snap, _) in &staged.bases {
            self.snap(&["install", &snap.to_string_lossy()]).await?;
        }
        self.snap(&["install", &staged.microk8s.0.to_string_lossy(), "--classic"])
            .await?;
        Ok(())
    }
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename.
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("yaml.rackseed-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The staged snaps found in a folder: `(snap, assert)` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedSnaps {
    pub microk8s: (PathBuf, PathBuf),
    /// `core2x*` base snaps, installed before microk8s.
    pub bases: Vec<(PathBuf, PathBuf)>,
}

/// Finds `microk8s*.snap` and `core*.snap`, each with an `.assert` of the same stem.
pub fn find_staged(dir: &Path) -> Result<StagedSnaps, Microk8sError> {
    let err = |detail: String| Microk8sError::Staged {
        dir: dir.display().to_string(),
        detail,
    };
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    names.sort();
    let pair = |snap: &PathBuf| -> Result<(PathBuf, PathBuf), Microk8sError> {
        let assert = snap.with_extension("assert");
        if assert.is_file() {
            Ok((snap.clone(), assert))
        } else {
            Err(err(format!(
                "{} has no assertion {}",
                snap.display(),
                assert.display()
            )))
        }
    };
    let stem = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mk: Vec<&PathBuf> = names
        .iter()
        .filter(|p| stem(p).starts_with("microk8s"))
        .collect();
    let microk8s = match mk.as_slice() {
        [one] => pair(one)?,
        [] => return Err(err("no microk8s*.snap".into())),
        many => {
            return Err(err(format!(
                "{} microk8s*.snap files, expected one",
                many.len()
            )))
        }
    };
    let bases = names
        .iter()
        .filter(|p| stem(p).starts_with("core"))
        .map(pair)
        .collect::<Result<_, _>>()?;
    Ok(StagedSnaps { microk8s, bases })
}

/// Maps a finished `microk8s join` to the result (A3 exit codes).
pub fn classify_join(seed: IpAddr, out: &Output) -> Result<(), JoinError> {
    let text = format!("{}\n{}", out.stdout, out.stderr);
    let d = detail(out);
    match out.code() {
        Some(0) => Ok(()),
        Some(1) if text.contains("Invalid connection") => {
            Err(JoinError::InvalidConnection { seed, reason: d })
        }
        Some(1) if text.contains("Failed to sign ") => {
            let certificate = text
                .split("Failed to sign ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("a")
                .to_owned();
            Err(JoinError::CertificateSigning {
                seed,
                certificate,
                detail: d,
            })
        }
        Some(1)
            if text.contains("[Errno")
                || text.contains("ConnectionRefusedError")
                || text.contains("TimeoutError") =>
        {
            Err(JoinError::Unreachable { seed, detail: d })
        }
        Some(4) => Err(JoinError::Unverified { seed, detail: d }),
        Some(5) => Err(JoinError::Http { seed, detail: d }),
        Some(6) => match parse::parse_join_rejection(&text) {
            Some((status, message)) => Err(JoinError::Rejected {
                seed,
                status,
                message,
            }),
            None => Err(JoinError::Failed {
                seed,
                code: Some(6),
                detail: d,
            }),
        },
        code => Err(JoinError::Failed {
            seed,
            code,
            detail: d,
        }),
    }
}

/// The tail of stderr only: for commands whose stdout is a credential.
fn stderr_detail(out: &Output) -> String {
    tail(&out.stderr)
}

fn refused_on_worker(out: &Output) -> bool {
    out.stdout.contains(parse::WORKER_MARKER) || out.stderr.contains(parse::WORKER_MARKER)
}

impl Microk8s for RealMicrok8s {
    fn datastore(&self) -> Option<std::sync::Arc<dyn dbctl::Datastore>> {
        Some(std::sync::Arc::new(dbctl::RealDatastore::new(
            &self.config.binary,
        )))
    }

    fn cluster_tools(&self) -> Option<std::sync::Arc<dyn helm::ClusterTools>> {
        Some(std::sync::Arc::new(helm::RealClusterTools::new(
            &self.config.binary,
            self.config.query_timeout,
        )))
    }

    fn is_installed(&self) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        Box::pin(async move {
            // `snap list NAME` exits 0 when installed, 1 ("error: no matching snaps installed").
            let out = Cmd::new(&self.config.snap, self.config.query_timeout)
                .args(["list", "microk8s"])
                .output()
                .await?;
            match out.code() {
                Some(0) => Ok(true),
                Some(1) if out.stderr.contains("no matching snaps") => Ok(false),
                code => Err(Microk8sError::Failed {
                    command: "snap list microk8s".into(),
                    code,
                    detail: detail(&out),
                }),
            }
        })
    }

    fn install<'a>(
        &'a self,
        source: &'a InstallSource,
        secret: &'a ClusterSecret,
    ) -> BoxFuture<'a, Result<InstallOutcome, Microk8sError>> {
        Box::pin(async move {
            if self.is_installed().await? {
                return Ok(InstallOutcome::AlreadyInstalled);
            }
            // Before installing: the install hook reads it exactly once (A8).
            self.write_launch_config(secret)?;
            // On a first boot snapd may still be seeding; installs fail until it is done. (Not
            // from the reference: snapd's documented `snap wait system seed.loaded`.)
            self.snap(&["wait", "system", "seed.loaded"]).await?;
            match source {
                InstallSource::Channel(channel) => {
                    self.snap(&[
                        "install",
                        "microk8s",
                        "--classic",
                        &format!("--channel={channel}"),
                    ])
                    .await?;
                }
                InstallSource::Staged(dir) => self.install_staged(dir).await?,
            }
            Ok(InstallOutcome::Installed)
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<Status, Microk8sError>> {
        Box::pin(async move {
            let out = self
                .run_mk(&["status", "--format", "yaml"], self.config.query_timeout)
                .await?;
            Ok(parse::parse_status(out.code(), &out.stdout, &out.stderr)?)
        })
    }

    fn wait_ready(&self, timeout: Duration) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                // `--timeout 0` means forever (A5): ask for at least one second.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let secs = left.as_secs().max(1);
                let out = self
                    .mk(Duration::from_secs(secs) + self.config.query_timeout)
                    .args(["status", "--format", "yaml", "--wait-ready", "--timeout"])
                    .arg(secs.to_string())
                    .output()
                    .await?;
                match parse::parse_status(out.code(), &out.stdout, &out.stderr)? {
                    Status::Running(_) => return Ok(true),
                    Status::WorkerNode => {
                        return Err(Microk8sError::WorkerNode {
                            command: "microk8s status --wait-ready".into(),
                        })
                    }
                    // A stopped node answers at once; right after install its services may
                    // still be starting, so keep asking until the deadline.
                    Status::Stopped if tokio::time::Instant::now() + STOPPED_RETRY < deadline => {
                        tokio::time::sleep(STOPPED_RETRY).await
                    }
                    Status::NotReady | Status::Stopped => return Ok(false),
                }
            }
        })
    }

    fn join<'a>(
        &'a self,
        target: &'a JoinTarget,
        role: JoinRole,
    ) -> BoxFuture<'a, Result<(), JoinError>> {
        Box::pin(async move {
            let url = target.url()?;
            let mut cmd = self
                .mk(self.config.join_timeout)
                .arg("join")
                .secret_arg(url);
            if role == JoinRole::Worker {
                cmd = cmd.arg("--worker");
            }
            let out = cmd.output().await.map_err(|source| JoinError::Command {
                seed: target.seed,
                source,
            })?;
            classify_join(target.seed, &out)
        })
    }

    fn dqlite_members(&self) -> BoxFuture<'_, Result<Vec<DqliteMember>, Microk8sError>> {
        Box::pin(async move {
            let b = &self.config.dqlite_backend;
            let out = Cmd::new(&self.config.dqlite, self.config.query_timeout)
                .arg("-s")
                .arg(format!("file://{}", b.join("cluster.yaml").display()))
                .arg("-c")
                .arg(b.join("cluster.crt"))
                .arg("-k")
                .arg(b.join("cluster.key"))
                .args(["-f", "json", "k8s", ".cluster"])
                .run()
                .await?;
            Ok(parse::parse_dqlite_cluster_json(&out.stdout)?)
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<K8sNode>, Microk8sError>> {
        Box::pin(async move {
            let out = self
                .run_mk(
                    &["kubectl", "get", "nodes", "-o", "json"],
                    self.config.query_timeout,
                )
                .await?;
            if out.code() != Some(0) {
                return Err(Microk8sError::NotRunning {
                    command: "microk8s kubectl get nodes -o json".into(),
                    detail: detail(&out),
                });
            }
            Ok(parse::parse_nodes_json(&out.stdout)?)
        })
    }

    fn enable<'a>(
        &'a self,
        addon: &'a str,
        args: &'a [String],
    ) -> BoxFuture<'a, Result<EnableOutcome, Microk8sError>> {
        Box::pin(async move {
            let out = self
                .mk(self.config.enable_timeout)
                .args(["enable", addon])
                .args(args)
                .output()
                .await?;
            let command = format!("microk8s enable {addon}");
            if refused_on_worker(&out) {
                return Err(Microk8sError::WorkerNode { command });
            }
            match out.code() {
                Some(0) if out.stdout.contains("is already enabled") => {
                    Ok(EnableOutcome::AlreadyEnabled)
                }
                Some(0) => Ok(EnableOutcome::Enabled),
                Some(_) if out.stdout.contains("microk8s is not running") => {
                    Err(Microk8sError::NotRunning {
                        command,
                        detail: detail(&out),
                    })
                }
                code => Err(Microk8sError::Failed {
                    command,
                    code,
                    detail: detail(&out),
                }),
            }
        })
    }

    fn label_node<'a>(
        &'a self,
        node: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(labels::label_node(self, node, labels))
    }

    fn leave(&self) -> BoxFuture<'_, Result<(), Microk8sError>> {
        Box::pin(async move {
            let out = self.run_mk(&["leave"], self.config.join_timeout).await?;
            match out.code() {
                Some(0) => Ok(()),
                Some(3) => Err(Microk8sError::OnlyCopy),
                Some(1) if detail(&out).contains("not acting as a node in a cluster") => {
                    Err(Microk8sError::NotInCluster)
                }
                code => Err(Microk8sError::Failed {
                    command: "microk8s leave".into(),
                    code,
                    detail: detail(&out),
                }),
            }
        })
    }

    fn remove_node<'a>(
        &'a self,
        name_or_ip: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let mut args = vec!["remove-node", name_or_ip];
            if force {
                args.push("--force");
            }
            let out = self.run_mk(&args, self.config.query_timeout).await?;
            let node = name_or_ip.to_owned();
            if refused_on_worker(&out) {
                return Err(Microk8sError::WorkerNode {
                    command: format!("microk8s remove-node {node}"),
                });
            }
            match out.code() {
                Some(0) => Ok(()),
                Some(_) if !force && detail(&out).contains("microk8s leave") => {
                    Err(Microk8sError::StillInDqlite { node })
                }
                Some(1) if detail(&out).contains("does not exist") => {
                    Err(Microk8sError::UnknownNode { node })
                }
                code => Err(Microk8sError::Failed {
                    command: format!("microk8s remove-node {node}"),
                    code,
                    detail: detail(&out),
                }),
            }
        })
    }
    fn config(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        Box::pin(async move {
            let out = self.run_mk(&["config"], self.config.query_timeout).await?;
            let command = "microk8s config".to_owned();
            // On a worker the wrapper prints the refusal and exits 0.
            if refused_on_worker(&out) {
                return Err(Microk8sError::WorkerNode { command });
            }
            match out.code() {
                Some(0) => Ok(parse::parse_kubeconfig(&out.stdout)?),
                code => Err(Microk8sError::Failed {
                    command,
                    code,
                    detail: stderr_detail(&out),
                }),
            }
        })
    }
    fn cluster_agent_fingerprint(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        Box::pin(async move {
            let path = &self.config.cluster_agent_cert;
            let pem = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| Microk8sError::Failed {
                    command: format!("reading {}", path.display()),
                    code: None,
                    detail: e.to_string(),
                })?;
            Ok(parse::parse_cert_fingerprint(&pem)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, d))
    }

    #[test]
    fn url_is_ip_port_token_and_optional_fingerprint() {
        let mut t = JoinTarget::new(v4(11), "a".repeat(64));
        assert_eq!(
            t.url().unwrap(),
            format!("10.0.0.11:25000/{}", "a".repeat(64))
        );
        t.fingerprint = Some("0123456789ab".into());
        assert!(t.url().unwrap().ends_with("/0123456789ab"));
        t.fingerprint = Some("0123".into());
        assert!(matches!(t.url(), Err(JoinError::InvalidConnection { .. })));
    }

    #[test]
    fn url_refuses_ipv6_short_tokens_and_port_zero() {
        let t = JoinTarget::new("fd00::1".parse().unwrap(), "a".repeat(64));
        assert!(matches!(t.url(), Err(JoinError::InvalidConnection { .. })));
        let t = JoinTarget::new(v4(1), "a".repeat(31));
        assert!(matches!(t.url(), Err(JoinError::InvalidConnection { .. })));
        let mut t = JoinTarget::new(v4(1), "a".repeat(32));
        assert!(t.url().is_ok());
        t.port = 0;
        assert!(t.url().is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let t = JoinTarget::new(v4(1), "s3cr3t".repeat(8));
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }

    #[test]
    fn staged_folder_needs_exactly_one_microk8s_with_assertion() {
        let d = tempfile::tempdir().unwrap();
        assert!(find_staged(d.path()).is_err());
        for f in ["microk8s_7394.snap", "core22_1.snap", "core22_1.assert"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let e = find_staged(d.path()).unwrap_err().to_string();
        assert!(e.contains("no assertion"), "{e}");
        std::fs::write(d.path().join("microk8s_7394.assert"), b"x").unwrap();
        let s = find_staged(d.path()).unwrap();
        assert!(s.microk8s.0.ends_with("microk8s_7394.snap"));
        assert_eq!(s.bases.len(), 1);
    }
}
