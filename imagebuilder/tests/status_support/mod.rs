//! Stand-in nodes for the workstation tests: each runs a real coordinator and a real discovery
//! in its own network namespace (netns-lab), with a hand-made status document, an announcement
//! encoded by the formation core (phase and role chosen by the test) and, optionally, a fake
//! kubeconfig provider. The real agent is not needed to test what the
//! workstation does with what nodes publish.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netns_lab::Host;
use rackseed_config::Role;
use rackseed_formation::{Announcement, NodeId, PhaseSummary};
use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorConfig, KubeconfigProvider, NodeIdentity,
};
use rackseed_protocol::discovery::{Discovery, DiscoveryConfig, InterfaceChoice};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::{MemberRow, Microk8sView, StatusDoc, TimelineEntry};
use tokio::sync::mpsc;

pub const PORT: u16 = 7443;
pub const CP: &str = "control-plane";

pub enum Command {
    SetStatus(Box<StatusDoc>),
    Announce(Vec<(String, String)>),
    ClearKubeconfig,
    Stop,
}

/// What a fake kubeconfig provider answers.
#[derive(Clone)]
pub enum Kubeconfig {
    None,
    Serve(String),
    Fail(String),
}

pub struct FakeNode {
    pub id: String,
    pub addr: Ipv4Addr,
    tx: mpsc::UnboundedSender<Command>,
    join: Option<std::thread::JoinHandle<Result<()>>>,
}

impl FakeNode {
    pub fn send(&self, c: Command) {
        self.tx.send(c).expect("fake node is running");
    }

    pub fn set_status(&self, doc: StatusDoc) {
        self.send(Command::SetStatus(Box::new(doc)));
    }

    pub fn announce(&self, phase: PhaseSummary, role: Option<Role>) {
        self.send(Command::Announce(fields(&self.id, phase, role)));
    }

    pub fn stop(&mut self) -> Result<()> {
        let _ = self.tx.send(Command::Stop);
        match self.join.take() {
            Some(j) => j
                .join()
                .map_err(|_| anyhow::anyhow!("fake node {} panicked", self.id))?,
            None => Ok(()),
        }
    }
}

/// A failed test still stops its nodes; the lab then removes the namespaces.
impl Drop for FakeNode {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The announcement fields of a node with discovery id `id`, encoded by the formation core
/// ([`Announcement::to_txt`]). Its formation id must be lowercase hex, so it is the hex of `id`.
pub fn fields(id: &str, phase: PhaseSummary, role: Option<Role>) -> Vec<(String, String)> {
    Announcement {
        id: NodeId::new(hex::encode(id)).expect("hex is a valid node id"),
        priority: 0,
        phase,
        role,
        cluster: None,
        authority: None,
        record_ballot: None,
        members: 2,
        eligible: true,
    }
    .to_txt()
}

/// Starts a fake node on `host`: coordinator on port 7443, discovery on eth0, `doc` published,
/// announcing `phase` and `role`.
pub fn spawn(
    host: &Host,
    id: &str,
    secret: &ClusterSecret,
    doc: StatusDoc,
    phase: PhaseSummary,
    role: Option<Role>,
    kubeconfig: Kubeconfig,
) -> Result<FakeNode> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let node_id = id.to_string();
    let secret = secret.clone();
    let announce = fields(id, phase, role);
    let join = host.spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let started = async {
                let identity = NodeIdentity::generate()?;
                let fp = identity.fingerprint().to_string();
                let (coord, mut inbound) =
                    Coordinator::<serde_json::Value>::start(CoordinatorConfig {
                        secret: secret.clone(),
                        identity,
                        listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
                    })
                    .await?;
                tokio::spawn(async move { while inbound.recv().await.is_some() {} });
                coord.set_status_from(&doc)?;
                match kubeconfig {
                    Kubeconfig::None => {}
                    Kubeconfig::Serve(text) => {
                        let p: KubeconfigProvider = Arc::new(move || {
                            let text = text.clone();
                            Box::pin(async move { Ok(text) })
                        });
                        coord.set_kubeconfig_provider(p);
                    }
                    Kubeconfig::Fail(why) => {
                        let p: KubeconfigProvider = Arc::new(move || {
                            let why = why.clone();
                            Box::pin(async move { Err(anyhow::anyhow!(why)) })
                        });
                        coord.set_kubeconfig_provider(p);
                    }
                }
                let mut cfg = DiscoveryConfig::new(secret.clone(), &node_id, PORT, &fp);
                cfg.interfaces = InterfaceChoice::Named(vec!["eth0".into()]);
                let (disc, mut peers) = Discovery::start(cfg)?;
                tokio::spawn(async move { while peers.recv().await.is_some() {} });
                disc.announce(announce)?;
                anyhow::Ok((coord, disc))
            }
            .await;
            let (coord, disc) = match started {
                Ok(x) => {
                    let _ = ready_tx.send(Ok(()));
                    x
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            while let Some(c) = rx.recv().await {
                match c {
                    Command::Stop => break,
                    Command::SetStatus(doc) => coord.set_status_from(&*doc)?,
                    Command::Announce(f) => disc.announce(f)?,
                    Command::ClearKubeconfig => coord.clear_kubeconfig_provider(),
                }
            }
            disc.shutdown();
            coord.shutdown();
            Ok(())
        })
    });
    match ready_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("fake node {id} did not start: {e:#}"),
        Err(_) => {
            let r = join.join();
            bail!(
                "fake node {id} did not start in time: {:?}",
                r.map(|r| r.err())
            );
        }
    }
    Ok(FakeNode {
        id: id.to_string(),
        addr: host.addr,
        tx,
        join: Some(join),
    })
}

/// A status document for `id` at `addr`.
pub fn doc(id: &str, addr: Ipv4Addr, phase: &str, role: Option<&str>) -> StatusDoc {
    StatusDoc {
        version: "0.1.0".into(),
        node_id: id.into(),
        hostname: format!("rack-{id}"),
        address: Some(addr.to_string()),
        phase: phase.into(),
        role: role.map(str::to_string),
        control_plane_size: Some(3),
        timeline: vec![TimelineEntry {
            at: 0.5,
            what: "discovering peers".into(),
        }],
        ..Default::default()
    }
}

/// A member's document with the given member list and voter count.
pub fn member_doc(
    id: &str,
    addr: Ipv4Addr,
    role: &str,
    members: &[(&str, &str)],
    voters: &[Ipv4Addr],
) -> StatusDoc {
    let mut d = doc(id, addr, "member", Some(role));
    d.members = members
        .iter()
        .map(|(n, r)| MemberRow {
            node_id: n.to_string(),
            role: r.to_string(),
        })
        .collect();
    d.microk8s = Some(Microk8sView {
        running: true,
        voters: if role == CP {
            voters.iter().map(|v| format!("{v}:19001")).collect()
        } else {
            vec![]
        },
        standby: vec![],
        ha: role == CP && voters.len() >= 3,
        note: None,
    });
    d
}

/// Writes a fresh secret file (mode 0600) into `dir`.
pub fn secret_file(dir: &std::path::Path, name: &str) -> (ClusterSecret, std::path::PathBuf) {
    let s = ClusterSecret::generate();
    let path = dir.join(name);
    s.write_new(&path).expect("writing the test secret");
    (s, path)
}

/// Runs the imagebuilder binary inside `host` and returns its output (any exit status).
pub fn imagebuilder_in(
    host: &Host,
    args: &[&str],
    timeout: Duration,
) -> Result<rackseed_host::command::Output> {
    host.cmd(env!("CARGO_BIN_EXE_imagebuilder"), timeout)
        .args(args)
        .output_blocking()
        .context("running imagebuilder in the lab")
}
