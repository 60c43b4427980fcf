//! In-process fakes of the external systems, with real behaviour (no canned answers), for agent
//! and driver tests.
//!
//! [`FakeMicrok8s`] implements [`Microk8s`] on a shared in-memory [`FakeWorld`]: several fakes
//! created from one world can join each other, and the world enforces the same rules as the
//! MicroK8s simulator (reference part A): the launch config token is the only accepted token
//! (`500 invalid token`), port mismatch is 502, joining oneself 503, an already-known IP 500, a
//! second join while one is in flight fails with 500 (the concurrent-join race); the first 3
//! control-plane nodes are voters, then standby, then spare; workers are not dqlite members;
//! stopping a voter promotes a standby while quorum holds; without a majority of voters every
//! control-plane node reports not ready. Enable is idempotent and refused on workers. `config`
//! prints an admin kubeconfig in `microk8s config`'s layout (server `https://<node IP>:16443`,
//! one stand-in CA per cluster) on installed control-plane nodes, also stopped ones (the real
//! command only reads a file), and is refused on workers. `leave` follows the simulator and
//! canonical/microk8s (`microk8s-leave.wrapper`, `scripts/wrappers/leave.py`): a control-plane
//! node alone in its cluster (never joined, or left already) is refused as not in a cluster
//! ([`Microk8sError::NotInCluster`], exit 1); the only voter is refused
//! ([`Microk8sError::OnlyCopy`], exit 3) only while other dqlite members depend on it, so the
//! last control-plane node with only workers left leaves; a node that leaves starts over as a
//! fresh single node and its Node object stays in the old cluster. Every operation is recorded
//! ([`FakeWorld::log`]) so tests can assert what the agent did.
//!
//! To fake another system, add a struct here implementing that system's trait on shared state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::system::microk8s::{
    parse::address_ip, AddonState, DatastoreNode, DqliteMember, DqliteRole, EnableOutcome,
    InstallOutcome, InstallSource, JoinError, JoinRole, JoinTarget, K8sNode, Microk8s,
    Microk8sError, NodeRole, RunningStatus, Status, CLUSTER_AGENT_PORT,
};
use rackseed_protocol::secret::ClusterSecret;

/// One recorded call on a fake node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    pub node: String,
    /// e.g. `install`, `join 10.0.0.1 --worker`, `enable metallb`, `join-done 10.0.0.1`.
    pub what: String,
}

#[derive(Debug, Default)]
struct Cluster {
    /// dqlite members in join order: (ip, id, role).
    members: Vec<(IpAddr, u64, DqliteRole)>,
    /// Kubernetes nodes: (name, ip, worker).
    k8s: Vec<(String, IpAddr, bool)>,
    addons: BTreeSet<String>,
    /// The node currently joining through this cluster, if any.
    joining: Option<IpAddr>,
    /// The first node's dqlite address is still 127.0.0.1 until the first join (A4).
    bound: bool,
    /// Labels set with `kubectl label node`, by node name.
    labels: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug)]
struct Node {
    name: String,
    installed: bool,
    up: bool,
    token: Option<String>,
    cluster: u64,
    worker: bool,
    port: u16,
}

#[derive(Debug, Default)]
struct World {
    nodes: BTreeMap<IpAddr, Node>,
    clusters: BTreeMap<u64, Cluster>,
    next_id: u64,
    log: Vec<FakeCall>,
    join_delay: Duration,
}

/// Shared state of many fake MicroK8s nodes. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct FakeWorld(Arc<Mutex<World>>);

impl FakeWorld {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a join stays in flight (models `update_dqlite`, A4). Default zero.
    pub fn set_join_delay(&self, d: Duration) {
        self.lock().join_delay = d;
    }

    /// A node of this world at `ip` named `name`, not yet installed.
    pub fn node(&self, name: &str, ip: IpAddr) -> FakeMicrok8s {
        let mut w = self.lock();
        w.next_id += 1;
        let id = w.next_id;
        w.nodes.insert(
            ip,
            Node {
                name: name.to_owned(),
                installed: false,
                up: true,
                token: None,
                cluster: id,
                worker: false,
                port: CLUSTER_AGENT_PORT,
            },
        );
        FakeMicrok8s {
            world: self.clone(),
            ip,
        }
    }

    /// Every call made so far, in order.
    pub fn log(&self) -> Vec<FakeCall> {
        self.lock().log.clone()
    }

    /// Stops (`false`) or restarts (`true`) a node, as if its host died or came back. Losing a
    /// voter promotes a standby when a majority of voters is still up.
    pub fn set_up(&self, ip: IpAddr, up: bool) {
        let mut w = self.lock();
        if let Some(n) = w.nodes.get_mut(&ip) {
            n.up = up;
        }
        let cid = match w.nodes.get(&ip) {
            Some(n) => n.cluster,
            None => return,
        };
        rebalance(&mut w, cid);
    }
}

/// dqlite's role adjustment: while a majority of voters is up, replace down voters by up
/// standbys/spares and keep up to 3 standbys.
fn rebalance(w: &mut World, cid: u64) {
    let up: BTreeSet<IpAddr> = w
        .nodes
        .iter()
        .filter(|(_, n)| n.up)
        .map(|(ip, _)| *ip)
        .collect();
    let Some(c) = w.clusters.get_mut(&cid) else {
        return;
    };
    let voters = c
        .members
        .iter()
        .filter(|m| m.2 == DqliteRole::Voter)
        .count();
    let up_voters = c
        .members
        .iter()
        .filter(|m| m.2 == DqliteRole::Voter && up.contains(&m.0))
        .count();
    if up_voters * 2 <= voters {
        return;
    }
    loop {
        let down_voter = c
            .members
            .iter()
            .position(|m| m.2 == DqliteRole::Voter && !up.contains(&m.0));
        let candidate = c
            .members
            .iter()
            .position(|m| m.2 != DqliteRole::Voter && up.contains(&m.0));
        match (down_voter, candidate) {
            (Some(d), Some(p)) => {
                c.members[d].2 = DqliteRole::Spare;
                c.members[p].2 = DqliteRole::Voter;
            }
            _ => break,
        }
    }
}

fn quorum(w: &World, cid: u64) -> bool {
    let Some(c) = w.clusters.get(&cid) else {
        return true;
    };
    let voters: Vec<&IpAddr> = c
        .members
        .iter()
        .filter(|m| m.2 == DqliteRole::Voter)
        .map(|m| &m.0)
        .collect();
    let up = voters
        .iter()
        .filter(|ip| w.nodes.get(ip).is_some_and(|n| n.up))
        .count();
    up * 2 > voters.len()
}

/// A MicroK8s node in a [`FakeWorld`].
#[derive(Debug, Clone)]
pub struct FakeMicrok8s {
    world: FakeWorld,
    ip: IpAddr,
}

const KNOWN_ADDONS: &[&str] = &[
    "dns",
    "ha-cluster",
    "helm",
    "helm3",
    "hostpath-storage",
    "ingress",
    "metallb",
    "metrics-server",
    "rbac",
    "registry",
    "dashboard",
    "cert-manager",
    "community",
    "mayastor",
    "rook-ceph",
];

impl FakeMicrok8s {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    fn record(&self, w: &mut World, what: String) {
        let node = w
            .nodes
            .get(&self.ip)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        w.log.push(FakeCall { node, what });
    }

    fn node<'w>(&self, w: &'w World) -> &'w Node {
        w.nodes
            .get(&self.ip)
            .expect("fake node exists in its world")
    }

    /// Checks the node can answer commands; returns its cluster id.
    fn running(&self, w: &World, command: &str) -> Result<u64, Microk8sError> {
        let n = self.node(w);
        if !n.installed || !n.up {
            return Err(Microk8sError::NotRunning {
                command: command.into(),
                detail: "microk8s is not running, try microk8s start".into(),
            });
        }
        Ok(n.cluster)
    }

    fn refuse_worker(&self, w: &World, command: &str) -> Result<(), Microk8sError> {
        if self.node(w).worker {
            return Err(Microk8sError::WorkerNode {
                command: command.into(),
            });
        }
        Ok(())
    }

    fn ready_cp(&self, w: &World, command: &str) -> Result<u64, Microk8sError> {
        let cid = self.running(w, command)?;
        self.refuse_worker(w, command)?;
        if !quorum(w, cid) {
            return Err(Microk8sError::NotRunning {
                command: command.into(),
                detail: "datastore quorum lost".into(),
            });
        }
        Ok(cid)
    }

    fn start_join(&self, target: &JoinTarget, role: JoinRole) -> Result<u64, JoinError> {
        let seed = target.seed;
        let url = target.url()?;
        let mut w = self.world.lock();
        let flag = if role == JoinRole::Worker {
            " --worker"
        } else {
            ""
        };
        let host = url.split('/').next().unwrap_or_default().to_owned();
        self.record(&mut w, format!("join {host}{flag}"));
        let me = self.node(&w);
        if !me.installed || !me.up {
            return Err(JoinError::Failed {
                seed,
                code: Some(1),
                detail: "microk8s is not running".into(),
            });
        }
        let reject = |status: u16, message: &str| JoinError::Rejected {
            seed,
            status,
            message: message.into(),
        };
        let Some(s) = w.nodes.get(&seed).filter(|s| s.installed && s.up) else {
            return Err(JoinError::Unreachable {
                seed,
                detail: "ConnectionRefusedError: [Errno 111] Connection refused".into(),
            });
        };
        if target.port != s.port {
            return Err(JoinError::Unreachable {
                seed,
                detail: "ConnectionRefusedError: [Errno 111] Connection refused".into(),
            });
        }
        // join.py checks the fingerprint in the TLS handshake, before it sends the token (A3).
        if let Some(fp) = &target.fingerprint {
            if !fake_fingerprint(seed).starts_with(fp.as_str()) {
                return Err(JoinError::Unverified {
                    seed,
                    detail: format!("Could not verify the identity of {seed}"),
                });
            }
        }
        if s.worker {
            return Err(reject(500, "invalid token"));
        }
        if s.token.as_deref() != Some(target.token.as_str()) {
            return Err(reject(500, "invalid token"));
        }
        if me.port != s.port {
            return Err(reject(502, "port mismatch"));
        }
        if seed == self.ip {
            return Err(reject(
                503,
                "the joining node has the same IP as the node we join",
            ));
        }
        let cid = s.cluster;
        let c = w.clusters.entry(cid).or_default();
        if c.members.iter().any(|m| m.0 == self.ip) {
            return Err(reject(
                500,
                &format!("the joining node ({}) is already known to dqlite", self.ip),
            ));
        }
        if c.joining.is_some() {
            return Err(reject(
                500,
                "failed to join dqlite: another node is joining the cluster",
            ));
        }
        c.joining = Some(self.ip);
        c.bound = true;
        Ok(cid)
    }

    fn finish_join(&self, cid: u64, role: JoinRole) {
        let mut w = self.world.lock();
        let name = self.node(&w).name.clone();
        let old = self.node(&w).cluster;
        w.clusters.remove(&old);
        w.next_id += 1;
        let id = w.next_id;
        let c = w.clusters.entry(cid).or_default();
        c.joining = None;
        if role == JoinRole::ControlPlane {
            let count = |r| c.members.iter().filter(|m| m.2 == r).count();
            let r = if count(DqliteRole::Voter) < 3 {
                DqliteRole::Voter
            } else if count(DqliteRole::Standby) < 3 {
                DqliteRole::Standby
            } else {
                DqliteRole::Spare
            };
            c.members.push((self.ip, id, r));
        }
        c.k8s.push((name, self.ip, role == JoinRole::Worker));
        let n = w.nodes.get_mut(&self.ip).expect("fake node exists");
        n.cluster = cid;
        n.worker = role == JoinRole::Worker;
        self.record(&mut w, format!("join-done {cid}"));
    }

    fn status_now(&self) -> Status {
        let w = self.world.lock();
        let n = self.node(&w);
        if !n.installed || !n.up {
            return Status::Stopped;
        }
        if n.worker {
            return Status::WorkerNode;
        }
        if !quorum(&w, n.cluster) {
            return Status::NotReady;
        }
        let c = &w.clusters[&n.cluster];
        let datastore = if c.bound {
            c.members
                .iter()
                .map(|m| DatastoreNode {
                    address: format!("{}:19001", m.0),
                    role: m.2,
                })
                .collect()
        } else {
            vec![DatastoreNode {
                address: "127.0.0.1:19001".into(),
                role: DqliteRole::Voter,
            }]
        };
        Status::Running(RunningStatus {
            ha_enabled: true,
            datastore,
            addons: KNOWN_ADDONS
                .iter()
                .map(|a| AddonState {
                    name: (*a).into(),
                    repository: Some("core".into()),
                    enabled: c.addons.contains(*a) || *a == "ha-cluster",
                })
                .collect(),
        })
    }
}

impl Microk8s for FakeMicrok8s {
    fn is_installed(&self) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        Box::pin(async move { Ok(self.node(&self.world.lock()).installed) })
    }

    fn install<'a>(
        &'a self,
        source: &'a InstallSource,
        secret: &'a ClusterSecret,
    ) -> BoxFuture<'a, Result<InstallOutcome, Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            if self.node(&w).installed {
                return Ok(InstallOutcome::AlreadyInstalled);
            }
            self.record(&mut w, format!("install {source:?}"));
            let ip = self.ip;
            let name = self.node(&w).name.clone();
            let cid = self.node(&w).cluster;
            let n = w.nodes.get_mut(&ip).expect("fake node exists");
            n.installed = true;
            n.token = Some(secret.microk8s_token());
            let c = w.clusters.entry(cid).or_default();
            c.members = vec![(ip, 3297041220608546238, DqliteRole::Voter)];
            c.k8s = vec![(name, ip, false)];
            // The launch config enables dns (A8).
            c.addons.insert("dns".into());
            Ok(InstallOutcome::Installed)
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<Status, Microk8sError>> {
        Box::pin(async move { Ok(self.status_now()) })
    }

    fn wait_ready(&self, timeout: Duration) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match self.status_now() {
                    Status::Running(_) => return Ok(true),
                    Status::WorkerNode => {
                        return Err(Microk8sError::WorkerNode {
                            command: "microk8s status --wait-ready".into(),
                        })
                    }
                    _ if tokio::time::Instant::now() >= deadline => return Ok(false),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
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
            let cid = self.start_join(target, role)?;
            let delay = self.world.lock().join_delay;
            tokio::time::sleep(delay).await;
            self.finish_join(cid, role);
            Ok(())
        })
    }

    fn dqlite_members(&self) -> BoxFuture<'_, Result<Vec<DqliteMember>, Microk8sError>> {
        Box::pin(async move {
            let w = self.world.lock();
            let cid = self.ready_cp(&w, "dqlite .cluster")?;
            let c = &w.clusters[&cid];
            Ok(c.members
                .iter()
                .map(|m| DqliteMember {
                    id: m.1,
                    address: if c.bound {
                        format!("{}:19001", m.0)
                    } else {
                        "127.0.0.1:19001".into()
                    },
                    role: m.2,
                })
                .collect())
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<K8sNode>, Microk8sError>> {
        Box::pin(async move {
            let w = self.world.lock();
            let cid = self.running(&w, "microk8s kubectl get nodes")?;
            if !quorum(&w, cid) {
                return Err(Microk8sError::NotRunning {
                    command: "microk8s kubectl get nodes -o json".into(),
                    detail: "datastore quorum lost".into(),
                });
            }
            Ok(w.clusters[&cid]
                .k8s
                .iter()
                .map(|(name, ip, worker)| K8sNode {
                    name: name.clone(),
                    internal_ip: Some(*ip),
                    ready: w.nodes.get(ip).is_some_and(|n| n.up && n.cluster == cid),
                    role: if *worker {
                        NodeRole::Worker
                    } else {
                        NodeRole::ControlPlane
                    },
                    labels: w.clusters[&cid]
                        .labels
                        .get(name)
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect())
        })
    }

    fn enable<'a>(
        &'a self,
        addon: &'a str,
        args: &'a [String],
    ) -> BoxFuture<'a, Result<EnableOutcome, Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            self.record(
                &mut w,
                format!("enable {addon} {}", args.join(" "))
                    .trim_end()
                    .into(),
            );
            let command = format!("microk8s enable {addon}");
            let cid = self.ready_cp(&w, &command)?;
            if !KNOWN_ADDONS.contains(&addon) {
                return Err(Microk8sError::Failed {
                    command,
                    code: Some(1),
                    detail: format!("Addon {addon} was not found in any repository"),
                });
            }
            let c = w.clusters.get_mut(&cid).expect("cluster exists");
            if c.addons.insert(addon.to_owned()) {
                Ok(EnableOutcome::Enabled)
            } else {
                Ok(EnableOutcome::AlreadyEnabled)
            }
        })
    }

    fn label_node<'a>(
        &'a self,
        node: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            self.record(
                &mut w,
                format!("kubectl label node {node} {}", pairs.join(" ")),
            );
            let cid = self.ready_cp(&w, "microk8s kubectl label node")?;
            let c = w.clusters.get_mut(&cid).expect("cluster exists");
            if !c.k8s.iter().any(|(n, _, _)| n == node) {
                return Err(Microk8sError::UnknownNode {
                    node: node.to_owned(),
                });
            }
            let have = c.labels.entry(node.to_owned()).or_default();
            have.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            Ok(())
        })
    }

    fn leave(&self) -> BoxFuture<'_, Result<(), Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            self.record(&mut w, "leave".into());
            let cid = self.running(&w, "microk8s leave")?;
            let ip = self.ip;
            let worker = self.node(&w).worker;
            let c = w.clusters.get_mut(&cid).expect("cluster exists");
            // `microk8s-leave.wrapper`: a control-plane node alone in its cluster (never
            // joined, or left before) is not acting as a node in a cluster, exit 1.
            if !worker && c.k8s.len() <= 1 {
                return Err(Microk8sError::NotInCluster);
            }
            let voters: Vec<IpAddr> = c
                .members
                .iter()
                .filter(|m| m.2 == DqliteRole::Voter)
                .map(|m| m.0)
                .collect();
            // leave.py's `is_leader_without_successor`: the only voter refuses (exit 3) only
            // while other dqlite members depend on it; with workers alone left it leaves.
            if voters == [ip] && c.members.len() > 1 {
                return Err(Microk8sError::OnlyCopy);
            }
            c.members.retain(|m| m.0 != ip);
            w.next_id += 1;
            let fresh = w.next_id;
            let name = self.node(&w).name.clone();
            w.clusters.insert(
                fresh,
                Cluster {
                    members: vec![(ip, 3297041220608546238, DqliteRole::Voter)],
                    k8s: vec![(name, ip, false)],
                    ..Default::default()
                },
            );
            let n = w.nodes.get_mut(&ip).expect("fake node exists");
            n.cluster = fresh;
            n.worker = false;
            rebalance(&mut w, cid);
            Ok(())
        })
    }

    fn remove_node<'a>(
        &'a self,
        name_or_ip: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            self.record(&mut w, format!("remove-node {name_or_ip} force={force}"));
            let command = format!("microk8s remove-node {name_or_ip}");
            let cid = self.ready_cp(&w, &command)?;
            let c = w.clusters.get_mut(&cid).expect("cluster exists");
            let k8s = c
                .k8s
                .iter()
                .position(|(n, ip, _)| n == name_or_ip || ip.to_string() == name_or_ip);
            let ip = k8s.map(|i| c.k8s[i].1).or_else(|| address_ip(name_or_ip));
            let in_dqlite = ip.and_then(|ip| c.members.iter().position(|m| m.0 == ip));
            if let Some(i) = in_dqlite {
                if !force {
                    return Err(Microk8sError::StillInDqlite {
                        node: name_or_ip.into(),
                    });
                }
                c.members.remove(i);
            }
            match k8s {
                Some(i) => {
                    c.k8s.remove(i);
                    rebalance(&mut w, cid);
                    Ok(())
                }
                None => {
                    rebalance(&mut w, cid);
                    Err(Microk8sError::UnknownNode {
                        node: name_or_ip.into(),
                    })
                }
            }
        })
    }
    fn config(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            self.record(&mut w, "config".into());
            if !self.node(&w).installed {
                return Err(Microk8sError::Failed {
                    command: "microk8s config".into(),
                    code: Some(1),
                    detail: "microk8s is not installed".into(),
                });
            }
            self.refuse_worker(&w, "microk8s config")?;
            let n = self.node(&w);
            Ok(fake_kubeconfig(self.ip, n.cluster, &n.name))
        })
    }

    fn cluster_agent_fingerprint(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            self.record(&mut w, "cluster-agent-fingerprint".into());
            if !self.node(&w).installed {
                return Err(Microk8sError::Failed {
                    command: "reading certs/server.crt".into(),
                    code: None,
                    detail: "No such file or directory (os error 2)".into(),
                });
            }
            Ok(fake_fingerprint(self.ip))
        })
    }
}

/// The fake node at `ip`'s cluster agent certificate fingerprint: 64 hex, one per node.
pub fn fake_fingerprint(ip: IpAddr) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(format!("fake cluster agent {ip}")))
}

/// A kubeconfig in the layout `microk8s config` prints (the snap's `client-x509.config.template`
/// filled in by `create_kubeconfig_x509`, server rewritten to the node's address). The
/// certificate data are stand-ins: base64 of PEM-looking text naming the cluster and node.
fn fake_kubeconfig(ip: IpAddr, cluster: u64, node: &str) -> String {
    use base64::Engine as _;
    let b64 = |what: &str, body: String| {
        base64::engine::general_purpose::STANDARD.encode(format!(
            "-----BEGIN {what}-----\n{body}\n-----END {what}-----\n"
        ))
    };
    format!(
        "apiVersion: v1\n\
         clusters:\n\
         - cluster:\n    certificate-authority-data: {ca}\n    server: https://{server}\n  name: microk8s-cluster\n\
         contexts:\n\
         - context:\n    cluster: microk8s-cluster\n    user: admin\n  name: microk8s\n\
         current-context: microk8s\n\
         kind: Config\n\
         preferences: {{}}\n\
         users:\n\
         - name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n",
        ca = b64("CERTIFICATE", format!("fake CA of cluster {cluster}")),
        server = std::net::SocketAddr::new(ip, 16443),
        cert = b64("CERTIFICATE", format!("fake admin certificate of {node}")),
        key = b64("RSA PRIVATE KEY", format!("fake admin key of {node}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, d))
    }

    async fn cluster(n: usize, secret: &ClusterSecret) -> (FakeWorld, Vec<FakeMicrok8s>) {
        let world = FakeWorld::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let node = world.node(&format!("n{i}"), ip(i as u8 + 1));
            node.install(&InstallSource::Channel("1.32/stable".into()), secret)
                .await
                .unwrap();
            nodes.push(node);
        }
        (world, nodes)
    }

    /// [`cluster`] of `n` nodes joined through the first: nodes `1..control_planes` as
    /// control plane, the rest as workers.
    async fn joined(
        n: usize,
        control_planes: usize,
        secret: &ClusterSecret,
    ) -> (FakeWorld, Vec<FakeMicrok8s>) {
        let (world, nodes) = cluster(n, secret).await;
        let t = JoinTarget::new(ip(1), secret.microk8s_token());
        for (i, node) in nodes.iter().enumerate().skip(1) {
            let role = if i < control_planes {
                JoinRole::ControlPlane
            } else {
                JoinRole::Worker
            };
            node.join(&t, role).await.unwrap();
        }
        (world, nodes)
    }

    #[tokio::test]
    async fn three_control_planes_and_workers_form_ha() {
        let s = ClusterSecret::from_bytes([7; 32]);
        let (world, nodes) = joined(5, 3, &s).await;
        let Status::Running(st) = nodes[0].status().await.unwrap() else {
            panic!("seed not running")
        };
        assert!(st.ha_formed(), "{st:?}");
        assert_eq!(nodes[4].status().await.unwrap(), Status::WorkerNode);
        assert_eq!(nodes[0].nodes().await.unwrap().len(), 5);
        assert!(matches!(
            nodes[3].enable("metallb", &[]).await,
            Err(Microk8sError::WorkerNode { .. })
        ));
        assert_eq!(
            nodes[1].enable("dns", &[]).await.unwrap(),
            EnableOutcome::AlreadyEnabled
        );
        assert!(world.log().iter().all(|c| !c.what.contains("controlplane")));
        // The admin kubeconfig: on control-plane nodes, naming the node, one CA per cluster.
        let k1 = nodes[1].config().await.unwrap();
        let k2 = nodes[2].config().await.unwrap();
        assert!(k1.contains("    server: https://10.0.0.2:16443\n"), "{k1}");
        assert_eq!(
            crate::system::microk8s::parse::parse_kubeconfig(&k1).unwrap(),
            k1
        );
        let ca = |k: &str| {
            k.lines()
                .find(|l| l.contains("certificate-authority-data"))
                .map(str::to_owned)
        };
        assert_eq!(ca(&k1), ca(&k2));
        assert_ne!(k1, k2, "each node has its own admin certificate");
        assert!(matches!(
            nodes[3].config().await,
            Err(Microk8sError::WorkerNode { .. })
        ));
        world.set_up(ip(1), false);
        assert!(
            nodes[0].config().await.is_ok(),
            "a stopped node still has its file"
        );
    }

    #[tokio::test]
    async fn usable_as_a_shared_trait_object() {
        let s = ClusterSecret::from_bytes([3; 32]);
        let world = FakeWorld::new();
        let m: std::sync::Arc<dyn Microk8s> = std::sync::Arc::new(world.node("a", ip(1)));
        assert!(!m.is_installed().await.unwrap());
        assert_eq!(m.status().await.unwrap(), Status::Stopped);
        let src = InstallSource::Channel("1.32/stable".into());
        assert_eq!(
            m.install(&src, &s).await.unwrap(),
            InstallOutcome::Installed
        );
        assert_eq!(
            m.install(&src, &s).await.unwrap(),
            InstallOutcome::AlreadyInstalled
        );
        assert!(m.wait_ready(Duration::from_secs(1)).await.unwrap());
        assert_eq!(
            m.dqlite_members().await.unwrap()[0].address,
            "127.0.0.1:19001"
        );
        assert!(matches!(m.leave().await, Err(Microk8sError::NotInCluster)));
    }

    /// `leave` as the simulator and MicroK8s do it: only the voter others depend on is refused
    /// as the only copy; a node alone (never joined, or left already) is not in a cluster.
    #[tokio::test]
    async fn leave_refuses_the_only_copy_and_a_node_not_in_a_cluster() {
        let s = ClusterSecret::from_bytes([5; 32]);
        let (world, nodes) = joined(5, 4, &s).await;
        // Voters n0..n2, standby n3, worker n4. Two voters leave: n0 is the only voter
        // left while n3 still depends on it.
        nodes[1].leave().await.unwrap();
        nodes[2].leave().await.unwrap();
        assert!(matches!(
            nodes[0].leave().await,
            Err(Microk8sError::OnlyCopy)
        ));
        // Once the standby left too, only the worker is left: the last voter may go.
        nodes[3].leave().await.unwrap();
        nodes[0].leave().await.unwrap();
        // Now alone, and a second leave is refused like one on a node that never joined.
        assert!(matches!(
            nodes[0].leave().await,
            Err(Microk8sError::NotInCluster)
        ));
        // A worker is in a cluster whatever its view holds: it leaves.
        nodes[4].leave().await.unwrap();
        // Refused leaves are recorded too.
        assert_eq!(world.log().iter().filter(|c| c.what == "leave").count(), 7);
    }

    #[tokio::test]
    async fn join_failures_are_typed() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (world, nodes) = cluster(3, &s).await;
        let bad = JoinTarget::new(ip(1), "x".repeat(64));
        assert!(nodes[1]
            .join(&bad, JoinRole::ControlPlane)
            .await
            .unwrap_err()
            .is_bad_token());
        let gone = JoinTarget::new(ip(9), s.microk8s_token());
        assert!(matches!(
            nodes[1].join(&gone, JoinRole::ControlPlane).await,
            Err(JoinError::Unreachable { .. })
        ));
        let own = JoinTarget::new(ip(1), s.microk8s_token());
        assert!(matches!(
            nodes[0].join(&own, JoinRole::ControlPlane).await,
            Err(JoinError::Rejected { status: 503, .. })
        ));
        // The seed's own fingerprint passes (as a 12-hex prefix too); another node's fails
        // before anything reaches the seed.
        let fp = nodes[0].cluster_agent_fingerprint().await.unwrap();
        assert_eq!(fp, fake_fingerprint(ip(1)));
        let mut wrong = JoinTarget::new(ip(1), s.microk8s_token());
        wrong.fingerprint = Some(fake_fingerprint(ip(2))[..12].to_owned());
        assert!(matches!(
            nodes[1].join(&wrong, JoinRole::ControlPlane).await,
            Err(JoinError::Unverified { .. })
        ));
        world.set_join_delay(Duration::from_millis(300));
        let (a, b) = tokio::join!(nodes[1].join(&own, JoinRole::ControlPlane), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            nodes[2].join(&own, JoinRole::ControlPlane).await
        });
        a.unwrap();
        assert!(
            matches!(b, Err(JoinError::Rejected { status: 500, .. })),
            "{b:?}"
        );
    }

    #[tokio::test]
    async fn losing_voters_keeps_then_loses_quorum_and_promotes_standby() {
        let s = ClusterSecret::from_bytes([2; 32]);
        let (world, nodes) = joined(4, 4, &s).await;
        world.set_up(ip(3), false);
        let Status::Running(st) = nodes[0].status().await.unwrap() else {
            panic!("quorum should hold")
        };
        assert_eq!(st.voters().len(), 3, "standby promoted: {st:?}");
        assert!(st.voters().contains(&"10.0.0.4:19001"));
        world.set_up(ip(2), false);
        world.set_up(ip(4), false);
        assert_eq!(nodes[0].status().await.unwrap(), Status::NotReady);
    }
}
