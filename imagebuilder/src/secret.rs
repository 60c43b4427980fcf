//! `imagebuilder secret rotate`: moves every live node of a cluster to a new secret (and so a new
//! MicroK8s join token), so that an old image or a lost SD card can no longer join the cluster
//! or sway its election.
//!
//! Files on the workstation (the config's `secret-file` is `S`):
//! - the new secret is made once, into the *pending* file (`S.new`, or `--new-secret-file`),
//!   mode 0600, create-new, never printed; a later run finds it there and resumes the same
//!   rotation, so the command is idempotent: run it again until it reports every node moved;
//! - once every node moved, `S` is copied to `S.old` (0600) and the new secret replaces `S`
//!   (atomic, 0600); the pending file is removed. New images built from the config then hold
//!   the new secret.
//!
//! Steps (the protocol is in `rackseed_protocol::coordinator::rotation`), each sent to every
//! node before the next begins, over the pinned TLS and HMAC-signed coordinator:
//! 1. find the nodes: verified announcements under the old or the new secret (browsed for
//!    `--discover`), plus every member the nodes' status documents list (a member that does not
//!    answer is *unreachable*, not forgotten);
//! 2. **stage** on every node: it accepts the new secret as well. If any node (other than the
//!    `--revoke`d ones) is unreachable, stop here: nothing was switched, the staged key expires
//!    on its own, and the report says to bring the node back or to revoke it;
//! 3. **commit** on every node: it stores the new secret, replaces its MicroK8s token (the old
//!    one revoked) and signs with the new secret, still accepting the old one for a grace period.
//!    If a node fails its commit, the run stops after this step: the switched nodes and the
//!    others understand each other only for `ROTATION_GRACE` (10 min; neither the staged nor the
//!    old key outlives an agent restart), so the report says to run again before then;
//! 4. **finish** on every node: only the new secret is accepted. A `--revoke`d node, or any
//!    node holding only the old secret, is now refused by all: it cannot join, its
//!    announcements are dropped, its coordinator messages (election, join slots) are refused.
//!
//! A node that holds the old secret can answer on a node's behalf during the rotation (the old
//! secret is the only identity); the report lists every node moved, with its address and
//! certificate fingerprint, so an unexpected one shows. Revoking a lost node means naming its
//! node id with `--revoke`. The card also holds that node's MicroK8s credentials: remove it
//! from MicroK8s too (`microk8s remove-node <name> --force` on a survivor).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_protocol::coordinator::rotation::ROTATION_GRACE;
use rackseed_protocol::coordinator::{ClientError, CoordinatorClient, RotationAck, RotationStep};
use rackseed_protocol::discovery::{Discovery, DiscoveryConfig, InterfaceChoice};
use rackseed_protocol::secret::{ClusterSecret, Keyring};
use rackseed_protocol::status::StatusDoc;

/// What `secret rotate` needs.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// The current secret file (the config's `secret-file`).
    pub secret_file: PathBuf,
    /// Where the new secret waits until every node moved.
    pub pending_file: PathBuf,
    /// Node ids left behind on the old secret (lost or retired nodes).
    pub revoke: Vec<String>,
    pub interfaces: InterfaceChoice,
    /// How long to browse for announcements.
    pub discover: Duration,
    /// Timeout of one request to one node.
    pub timeout: Duration,
}

impl RotateOptions {
    /// Defaults for `secret_file`: pending file `<secret_file>.new`, 5 s of browsing, 10 s
    /// per request.
    pub fn new(secret_file: PathBuf) -> Self {
        RotateOptions {
            pending_file: suffixed(&secret_file, "new"),
            secret_file,
            revoke: Vec::new(),
            interfaces: InterfaceChoice::Auto,
            discover: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// `path` with `.suffix` appended to its file name.
pub fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// Where one node stands at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeOutcome {
    /// On the new secret only (or, when the run stopped early, as far as it got: see `step`).
    Moved,
    /// Accepts the new secret as well; still signs with the old one (the run stopped there).
    Staged,
    /// Signs with the new secret, still accepting the old one for the grace period (the run
    /// stopped there).
    Switched,
    /// Not reached (or refused); the reason in words.
    Unreachable(String),
    /// Left on the old secret on purpose (`--revoke`).
    Revoked,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub node_id: String,
    /// `ip:port` it was reached at, if it was.
    pub address: Option<String>,
    pub fingerprint: Option<String>,
    pub outcome: NodeOutcome,
    /// What the commit did with its MicroK8s token.
    pub token: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RotateReport {
    pub nodes: Vec<NodeReport>,
    /// Every targeted node moved and the workstation's files were promoted.
    pub complete: bool,
    /// Whether this run made the pending secret (else it resumed one).
    pub created_pending: bool,
}

impl RotateReport {
    /// The report as a table plus a verdict with what to do next.
    pub fn render(&self, opts: &RotateOptions) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{:<24} {:<22} {:<14} RESULT", "NODE", "ADDRESS", "CERT");
        for n in &self.nodes {
            let result = match &n.outcome {
                NodeOutcome::Moved => format!(
                    "moved{}",
                    n.token
                        .as_ref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default()
                ),
                NodeOutcome::Staged => "staged only (not switched)".to_string(),
                NodeOutcome::Switched => "switched (still accepts the old secret)".to_string(),
                NodeOutcome::Unreachable(why) => format!("unreachable: {why}"),
                NodeOutcome::Revoked => "revoked (left on the old secret)".to_string(),
            };
            let _ = writeln!(
                s,
                "{:<24} {:<22} {:<14} {result}",
                n.node_id,
                n.address.as_deref().unwrap_or("-"),
                n.fingerprint
                    .as_deref()
                    .map(|f| &f[..f.len().min(12)])
                    .unwrap_or("-"),
            );
        }
        if self.complete {
            let _ = writeln!(
                s,
                "rotated: every node is on the new secret; {} holds it now, the old one is in {}",
                opts.secret_file.display(),
                suffixed(&opts.secret_file, "old").display()
            );
            let _ = writeln!(
                s,
                "build new images from the config: old images and cards can no longer join"
            );
        } else {
            let _ = writeln!(
                s,
                "not finished: the new secret waits in {}; run the same command again to resume",
                opts.pending_file.display()
            );
            let _ = writeln!(
                s,
                "a node that is gone for good: run again with --revoke NODE_ID to leave it behind"
            );
            let switched = self
                .nodes
                .iter()
                .filter(|n| n.outcome == NodeOutcome::Switched)
                .count();
            if switched > 0 {
                // Switched nodes accept the old secret, and the others the staged new one,
                // only for the grace period: after it they no longer understand each other.
                let _ = writeln!(
                    s,
                    "{switched} node(s) already sign with the new secret and the others accept it only for {} min after this run: run again before then",
                    ROTATION_GRACE.as_secs() / 60
                );
            }
        }
        s
    }
}

/// A node to move: where to reach it.
#[derive(Debug, Clone)]
struct Target {
    node_id: String,
    addrs: Vec<SocketAddr>,
    fingerprint: String,
}

/// Runs a rotation (see the module docs). `Err` only when nothing was sent (bad input, no
/// node found); otherwise the report says per node what happened.
pub async fn rotate(opts: &RotateOptions) -> Result<RotateReport> {
    for id in &opts.revoke {
        rackseed_formation::NodeId::check(id)
            .with_context(|| format!("--revoke {id:?} is not a node id"))?;
    }
    let old = ClusterSecret::load(&opts.secret_file)
        .context("reading the current cluster secret (the file that went into the images)")?;
    let (new, created_pending) = pending_secret(opts, &old)?;
    if new == old {
        // An earlier run promoted the files and was cut off before removing the pending file.
        remove_pending(opts)?;
        bail!(
            "{} already holds the secret pending in {} (an earlier rotation finished); the pending file was removed: run again to rotate anew",
            opts.secret_file.display(),
            opts.pending_file.display()
        );
    }
    let found = match find_nodes(opts, &old, &new).await {
        Ok(found) => found,
        Err(e) => {
            discard_unsent(opts, created_pending);
            return Err(e);
        }
    };
    rotate_found(opts, &old, &new, created_pending, found).await
}

/// A pending secret this run made and sent to no node: removed, so the workstation is left as
/// it was. Once a step was sent, the pending file is never removed here: the nodes may hold
/// that secret (a failure after the switch would otherwise lose the only copy).
fn discard_unsent(opts: &RotateOptions, created_pending: bool) {
    if created_pending {
        let _ = std::fs::remove_file(&opts.pending_file);
    }
}

/// The pending new secret: the one an earlier run left, or a fresh one written now.
fn pending_secret(opts: &RotateOptions, old: &ClusterSecret) -> Result<(ClusterSecret, bool)> {
    let p = &opts.pending_file;
    if p.exists() {
        let s = ClusterSecret::load(p).with_context(|| {
            format!(
                "reading the pending new secret {} left by an earlier run",
                p.display()
            )
        })?;
        eprintln!(
            "resuming the rotation to the secret pending in {}",
            p.display()
        );
        return Ok((s, false));
    }
    let mut s = ClusterSecret::generate();
    while &s == old {
        s = ClusterSecret::generate();
    }
    s.write_new(p).context("writing the new secret")?;
    eprintln!("made a new 256-bit secret in {} (mode 0600)", p.display());
    Ok((s, true))
}

fn remove_pending(opts: &RotateOptions) -> Result<()> {
    match std::fs::remove_file(&opts.pending_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", opts.pending_file.display()))
        }
        _ => Ok(()),
    }
}

/// The nodes to reach, by node id, and the members that announced nothing.
type Found = (BTreeMap<String, Target>, Vec<String>);

/// Moves the nodes `find_nodes` found (see the module docs).
async fn rotate_found(
    opts: &RotateOptions,
    old: &ClusterSecret,
    new: &ClusterSecret,
    created_pending: bool,
    (mut targets, unseen_members): Found,
) -> Result<RotateReport> {
    let mut reports: BTreeMap<String, NodeReport> = BTreeMap::new();
    for id in unseen_members {
        reports.insert(
            id.clone(),
            NodeReport {
                node_id: id,
                address: None,
                fingerprint: None,
                outcome: NodeOutcome::Unreachable(
                    "a cluster member that announced nothing during discovery".into(),
                ),
                token: None,
            },
        );
    }
    for id in &opts.revoke {
        targets.remove(id);
        reports.insert(
            id.clone(),
            NodeReport {
                node_id: id.clone(),
                address: None,
                fingerprint: None,
                outcome: NodeOutcome::Revoked,
                token: None,
            },
        );
    }
    if targets.is_empty() {
        discard_unsent(opts, created_pending);
        bail!(
            "no node of this cluster answered within {:?} (checked announcements under the current and the pending secret); nothing changed",
            opts.discover
        );
    }
    let with_old = CoordinatorClient::new(old, "imagebuilder").with_timeout(opts.timeout);
    let with_new = CoordinatorClient::new(new, "imagebuilder").with_timeout(opts.timeout);
    let hex = new.to_file_contents().trim().to_string();
    let steps = [
        (
            RotationStep::Stage {
                secret: hex.clone(),
            },
            [&with_old, &with_new],
        ),
        (RotationStep::Commit { secret: hex }, [&with_new, &with_old]),
        (
            RotationStep::Finish {
                tag: new.cluster_tag(),
            },
            [&with_new, &with_old],
        ),
    ];
    let mut complete = true;
    for (step, clients) in &steps {
        let mut failed = false;
        for t in targets.values() {
            let r = reports.entry(t.node_id.clone()).or_insert(NodeReport {
                node_id: t.node_id.clone(),
                address: None,
                fingerprint: Some(t.fingerprint.clone()),
                outcome: NodeOutcome::Staged,
                token: None,
            });
            match send_step(t, step, clients).await {
                Ok((addr, ack)) => {
                    r.address = Some(addr.to_string());
                    if ack.token.is_some() {
                        r.token = ack.token.clone();
                    }
                    r.outcome = match step {
                        RotationStep::Stage { .. } => NodeOutcome::Staged,
                        RotationStep::Commit { .. } => NodeOutcome::Switched,
                        RotationStep::Finish { .. } => check_moved(&ack, new),
                    };
                    if r.outcome != NodeOutcome::Moved
                        && matches!(step, RotationStep::Finish { .. })
                    {
                        failed = true;
                    }
                }
                Err(e) => {
                    r.outcome = NodeOutcome::Unreachable(format!("{}: {e}", step.name()));
                    failed = true;
                }
            }
        }
        let unreachable_members = reports
            .values()
            .any(|r| matches!(r.outcome, NodeOutcome::Unreachable(_)));
        if failed || unreachable_members {
            complete = false;
            break;
        }
    }
    if complete {
        promote_files(opts, old, new).with_context(|| {
            format!(
                "every node moved to the new secret, which stays in {}: keep that file and run the same command again once {} can be written",
                opts.pending_file.display(),
                opts.secret_file.display()
            )
        })?;
    }
    Ok(RotateReport {
        nodes: reports.into_values().collect(),
        complete,
        created_pending,
    })
}

/// The outcome a finish acknowledgement shows.
fn check_moved(ack: &RotationAck, new: &ClusterSecret) -> NodeOutcome {
    if ack.current_tag == new.cluster_tag() && ack.accepted_tags == [new.cluster_tag()] {
        NodeOutcome::Moved
    } else {
        NodeOutcome::Unreachable(format!(
            "answered finish but signs with {} and accepts {:?}",
            ack.current_tag, ack.accepted_tags
        ))
    }
}

/// Sends one step to one node: each of its addresses, with the first client, then, on a
/// refused signature, the other one.
async fn send_step(
    t: &Target,
    step: &RotationStep,
    clients: &[&CoordinatorClient; 2],
) -> Result<(SocketAddr, RotationAck), ClientError> {
    let mut last = None;
    for addr in &t.addrs {
        for c in clients {
            match c.rotate(*addr, &t.fingerprint, step).await {
                Ok(ack) => return Ok((*addr, ack)),
                Err(e @ ClientError::Refused { status: 401, .. }) => last = Some(e),
                Err(e @ ClientError::Refused { .. }) => return Err(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or(ClientError::Tls("no address announced".into())))
}

/// Browses announcements under both secrets and reads the nodes' status documents: the nodes
/// to reach, by node id, and the members listed there that announced nothing.
async fn find_nodes(
    opts: &RotateOptions,
    old: &ClusterSecret,
    new: &ClusterSecret,
) -> Result<Found> {
    let ring = Arc::new(Keyring::new(old.clone()));
    ring.accept_also(new.clone(), Instant::now() + ROTATION_GRACE);
    let mut id = [0u8; 4];
    rand::fill(&mut id);
    let mut cfg = DiscoveryConfig::new(
        old.clone(),
        &format!("imagebuilder-{}", hex::encode(id)),
        1,
        &"0".repeat(64),
    );
    cfg.interfaces = opts.interfaces.clone();
    cfg.keyring = Some(ring);
    let (discovery, mut events) = Discovery::start(cfg).context("starting mDNS discovery")?;
    let end = tokio::time::Instant::now() + opts.discover;
    // Discovery keeps the peer table; the events only pace the wait.
    while let Ok(Some(_)) = tokio::time::timeout_at(end, events.recv()).await {}
    let peers = discovery.peers();
    discovery.shutdown();
    let mut targets = BTreeMap::new();
    for p in peers {
        let addrs = p
            .addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, p.port))
            .collect();
        targets.insert(
            p.node_id.clone(),
            Target {
                node_id: p.node_id,
                addrs,
                fingerprint: p.fingerprint,
            },
        );
    }
    let mut members = std::collections::BTreeSet::new();
    let clients = [
        CoordinatorClient::new(old, "imagebuilder").with_timeout(opts.timeout),
        CoordinatorClient::new(new, "imagebuilder").with_timeout(opts.timeout),
    ];
    for t in targets.values() {
        'node: for addr in &t.addrs {
            for c in &clients {
                if let Ok(v) = c.status(*addr, &t.fingerprint).await {
                    if let Ok(doc) = serde_json::from_value::<StatusDoc>(v) {
                        members.extend(doc.members.into_iter().map(|m| m.node_id));
                    }
                    break 'node;
                }
            }
        }
    }
    let unseen = members
        .into_iter()
        .filter(|m| !targets.contains_key(m) && !opts.revoke.contains(m))
        .collect();
    Ok((targets, unseen))
}

/// Every node moved: the old secret goes to `S.old`, the new one into `S`, the pending file
/// away, in an order that a cut at any point leaves resumable.
fn promote_files(opts: &RotateOptions, old: &ClusterSecret, new: &ClusterSecret) -> Result<()> {
    let old_copy = suffixed(&opts.secret_file, "old");
    old.replace_file(&old_copy)
        .context("keeping the old secret")?;
    new.replace_file(&opts.secret_file)
        .context("storing the new secret")?;
    remove_pending(opts)
}

/// `imagebuilder secret rotate`: runs it and prints the report; an error when not every node
/// moved.
pub fn run_cli(opts: &RotateOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt.block_on(rotate(opts))?;
    print!("{}", report.render(opts));
    if !report.complete {
        let unreachable: Vec<&str> = report
            .nodes
            .iter()
            .filter(|n| matches!(n.outcome, NodeOutcome::Unreachable(_)))
            .map(|n| n.node_id.as_str())
            .collect();
        bail!(
            "not every node moved (unreachable: {}); nothing is lost: run the same command again",
            if unreachable.is_empty() {
                "none".to_string()
            } else {
                unreachable.join(", ")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixed_appends_to_the_file_name() {
        assert_eq!(
            suffixed(Path::new("configs/lab.secret"), "new"),
            PathBuf::from("configs/lab.secret.new")
        );
    }

    /// A node on loopback that carries out the steps on a keyring, as the agent's rotator does.
    async fn stand_in_node(
        old: &ClusterSecret,
    ) -> (rackseed_protocol::testing::LoopbackCoordinator, Target) {
        use rackseed_protocol::coordinator::RotationRequest;
        let node = rackseed_protocol::testing::loopback_coordinator(old).await;
        let (coord, fingerprint, ring) = (
            &node.coordinator,
            node.fingerprint.clone(),
            node.keyring.clone(),
        );
        coord.set_rotation_handler(Arc::new(move |req: RotationRequest| {
            let ring = ring.clone();
            Box::pin(async move {
                let later = Instant::now() + ROTATION_GRACE;
                match req.step {
                    RotationStep::Stage { secret } => {
                        ring.accept_also(ClusterSecret::from_hex(&secret).ok_or("hex")?, later)
                    }
                    RotationStep::Commit { secret } => {
                        ring.switch_to(ClusterSecret::from_hex(&secret).ok_or("hex")?, later);
                    }
                    RotationStep::Finish { .. } => ring.forget_others(),
                }
                let keys = ring.accepted(Instant::now());
                Ok(RotationAck {
                    node_id: "node-a".into(),
                    current_tag: keys[0].tag().into(),
                    accepted_tags: keys.iter().map(|k| k.tag().to_string()).collect(),
                    token: None,
                })
            })
        }));
        let target = Target {
            node_id: "node-a".into(),
            addrs: vec![coord.local_addr()],
            fingerprint,
        };
        (node, target)
    }

    #[tokio::test]
    async fn a_failure_after_the_nodes_moved_keeps_the_pending_secret() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = RotateOptions::new(dir.path().join("lab.secret"));
        opts.timeout = Duration::from_secs(5);
        let old = ClusterSecret::generate();
        old.write_new(&opts.secret_file).unwrap();
        let (new, created) = pending_secret(&opts, &old).unwrap();
        assert!(created);
        // The workstation cannot keep the old secret (`.old` is in the way): promotion fails
        // after every node moved.
        std::fs::create_dir(suffixed(&opts.secret_file, "old")).unwrap();
        let (_node, target) = stand_in_node(&old).await;
        let found = (BTreeMap::from([("node-a".to_string(), target)]), Vec::new());
        let e = rotate_found(&opts, &old, &new, created, found)
            .await
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("every node moved"), "{text}");
        assert_eq!(
            ClusterSecret::load(&opts.pending_file).unwrap(),
            new,
            "the only copy of the secret the nodes now hold"
        );
        assert!(!text.contains(new.to_file_contents().trim()), "{text}");
        // Fixed, the same command finishes.
        std::fs::remove_dir(suffixed(&opts.secret_file, "old")).unwrap();
        let (again, created) = pending_secret(&opts, &old).unwrap();
        assert!(!created);
        let (_node, target) = stand_in_node(&new).await;
        let found = (BTreeMap::from([("node-a".to_string(), target)]), Vec::new());
        let report = rotate_found(&opts, &old, &again, created, found)
            .await
            .unwrap();
        assert!(report.complete);
        assert_eq!(ClusterSecret::load(&opts.secret_file).unwrap(), new);
        assert!(!opts.pending_file.exists());
    }

    #[test]
    fn a_run_stopped_after_some_switched_says_how_long_the_cluster_has() {
        let opts = RotateOptions::new(PathBuf::from("lab.secret"));
        let node = |id: &str, outcome| NodeReport {
            node_id: id.into(),
            address: None,
            fingerprint: None,
            outcome,
            token: None,
        };
        let mut report = RotateReport {
            nodes: vec![
                node("node-a", NodeOutcome::Switched),
                node(
                    "node-b",
                    NodeOutcome::Unreachable("commit: timed out".into()),
                ),
            ],
            complete: false,
            created_pending: false,
        };
        let text = report.render(&opts);
        assert!(
            text.contains("1 node(s) already sign with the new secret")
                && text.contains("only for 10 min"),
            "{text}"
        );
        report.nodes[0].outcome = NodeOutcome::Staged;
        assert!(!report.render(&opts).contains("already sign"));
    }

    #[tokio::test]
    async fn a_missing_secret_file_is_a_clear_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RotateOptions::new(dir.path().join("lab.secret"));
        let e = rotate(&opts).await.unwrap_err();
        assert!(format!("{e:#}").contains("lab.secret"), "{e:#}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
