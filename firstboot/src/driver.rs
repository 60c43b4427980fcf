//! The agent's tokio loop: events in, the pure formation core decides, actions out.
//!
//! [`run`] takes its dependencies ([`Agent`]) and a shutdown future. It starts the coordinator
//! (HTTPS, join-slot messages, status document) and mDNS discovery, then feeds the formation
//! core ([`rackseed_formation::Node`]) with:
//! - verified peer announcements and losses from discovery,
//! - authenticated messages from the coordinator (and the replies to messages it sent),
//! - a one-second tick,
//! - the results of the long-running actions it started (node preparation with the MicroK8s
//!   install, `microk8s join`, addon enablement),
//!
//! and executes the core's actions in order: `Persist` is written atomically before anything
//! after it; `Announce` re-publishes the signed mDNS record; `Send` goes out over the pinned
//! coordinator client; `PrepareNode`, `Join` and `EnableAddons` run as tasks whose results come
//! back as events. Nothing here decides anything about formation.
//!
//! Once the node is a control-plane member, its coordinator hands the admin kubeconfig
//! (`microk8s config`) to authenticated requests (`imagebuilder kubeconfig`); a worker member
//! refuses with the reason. Once the node is a member with its addons done, the loop only
//! answers peers, re-announces on changes, refreshes the status document every few seconds and
//! otherwise sleeps.
//!
//! To add a long-running action: spawn it in [`Runtime::execute`] and send its result back
//! through the task channel as an [`Event`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::addons::{self, progress::AddonProgress};
use crate::system::microk8s::{InstallSource, JoinRole, JoinTarget, Microk8s, Status};
use crate::system::notify::Notifier;
use crate::system::state::StateFile;
use rackseed_config::{ClusterConfig, MacAddr, Metallb, Role, Target};
use rackseed_formation::{
    Action, Announcement, Event, FormationParams, Message, Node, NodeId, PersistedState, Phase,
};
use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorClient, CoordinatorConfig, Inbound, NodeIdentity,
};
use rackseed_protocol::discovery::{Discovery, DiscoveryConfig, InterfaceChoice, PeerEvent};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::{
    AddonRow, MemberRow, Microk8sView, PeerRow, StatusDoc, TimelineEntry,
};

/// How often the formation core ticks.
const TICK: Duration = Duration::from_secs(1);
/// How often MicroK8s' own status is read for the status document.
const MICROK8S_POLL: Duration = Duration::from_secs(5);
/// Timeout for waiting until MicroK8s is ready after install.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything the agent needs; built by `firstboot run` from the real system, or by tests.
pub struct Agent {
    pub config: ClusterConfig,
    pub secret: ClusterSecret,
    pub node_id: NodeId,
    pub mac: Option<MacAddr>,
    pub hostname: String,
    /// Folder for `state.json`, `addons.json` and the coordinator's key and certificate.
    pub state_dir: PathBuf,
    /// Root of the host filesystem for node preparation (`/` on a node).
    pub root: PathBuf,
    /// Coordinator listen address (`0.0.0.0:7443` on a node).
    pub listen: SocketAddr,
    pub interfaces: InterfaceChoice,
    pub microk8s: Arc<dyn Microk8s>,
    pub notifier: Arc<dyn Notifier>,
    /// Join timeout etc. override (tests); `None` uses [`FormationParams::from_config`].
    pub params: Option<FormationParams>,
}

/// Where the agent keeps its formation phase.
pub fn state_file(state_dir: &std::path::Path) -> StateFile {
    StateFile::new(state_dir.join("state.json"))
}

fn addons_file(state_dir: &std::path::Path) -> StateFile {
    StateFile::new(state_dir.join("addons.json"))
}

/// Results of spawned tasks.
enum TaskResult {
    Event(Box<Event>),
    Replies {
        from: NodeId,
        msgs: Vec<Message>,
    },
    SendFailed {
        to: NodeId,
        error: String,
    },
    Microk8s(Option<Microk8sView>),
    Problems {
        problems: Vec<String>,
        fixes: Vec<String>,
    },
    Addons(Vec<AddonRow>),
}

struct PeerAddr {
    ip: IpAddr,
    port: u16,
    fingerprint: String,
    phase: String,
    role: Option<String>,
}

struct Runtime {
    agent: Arc<Agent>,
    started: Instant,
    node: Node,
    discovery: Discovery,
    coordinator: Coordinator<Message>,
    client: Arc<CoordinatorClient>,
    tasks: mpsc::Sender<TaskResult>,
    peers: BTreeMap<NodeId, PeerAddr>,
    state: StateFile,
    doc: StatusDoc,
    last_status_line: String,
    /// The last announcement, re-published as a heartbeat so peers keep seeing this node.
    last_announcement: Option<Announcement>,
    /// The status document as last handed to the coordinator.
    published: Option<StatusDoc>,
    /// Set when preparation found MicroK8s a lone node; cleared by the first join attempt.
    /// Until then this node cannot already be a member, so that join skips the check.
    lone: Arc<AtomicBool>,
    /// What `POST /v1/kubeconfig` currently answers.
    kubeconfig: KubeconfigServing,
}

/// Whether the coordinator hands out the admin kubeconfig (see [`Runtime::serve_kubeconfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KubeconfigServing {
    /// Not a member yet: 503 "not a running control-plane member yet".
    NotYet,
    /// A control-plane member: `microk8s config` on each authenticated request.
    Serving,
    /// A worker member: 503 saying to ask a control-plane member.
    Worker,
}

/// Runs the agent until `shutdown` completes. Persisted state makes a restart resume.
pub async fn run(agent: Agent, shutdown: impl Future<Output = ()>) -> Result<()> {
    let agent = Arc::new(agent);
    let started = Instant::now();
    std::fs::create_dir_all(&agent.state_dir)
        .with_context(|| format!("creating {}", agent.state_dir.display()))?;
    let identity = NodeIdentity::load_or_create(&agent.state_dir)
        .with_context(|| format!("coordinator identity in {}", agent.state_dir.display()))?;
    let fingerprint = identity.fingerprint().to_owned();
    let (coordinator, mut inbound) = Coordinator::<Message>::start(CoordinatorConfig {
        secret: agent.secret.clone(),
        identity,
        listen: agent.listen,
    })
    .await
    .with_context(|| format!("starting the coordinator on {}", agent.listen))?;
    let port = coordinator.local_addr().port();

    let mut dcfg = DiscoveryConfig::new(
        agent.secret.clone(),
        agent.node_id.as_str(),
        port,
        &fingerprint,
    );
    dcfg.interfaces = agent.interfaces.clone();
    let (discovery, mut peer_events) = Discovery::start(dcfg).context("starting mDNS discovery")?;

    let state = state_file(&agent.state_dir);
    let persisted: Option<PersistedState> = state.load()?;
    let resumed = persisted.is_some();
    let params = match &agent.params {
        Some(p) => p.clone(),
        None => FormationParams::from_config(&agent.config, agent.mac),
    };
    params.validate().context("formation parameters")?;
    // Peers forget a node whose announcement is not refreshed within `peer_timeout`, so the
    // announcement is re-published (with a new sequence number) well within it.
    let heartbeat_every = (params.peer_timeout / 4).max(Duration::from_secs(1));
    let (node, actions) = Node::new(params, agent.node_id.clone(), persisted, Duration::ZERO);
    let (tasks, mut task_rx) = mpsc::channel(256);
    let client = Arc::new(CoordinatorClient::new(
        &agent.secret,
        agent.node_id.as_str(),
    ));
    let mut rt = Runtime {
        doc: StatusDoc {
            version: env!("CARGO_PKG_VERSION").into(),
            node_id: agent.node_id.to_string(),
            hostname: agent.hostname.clone(),
            control_plane_size: Some(u32::from(agent.config.cluster.control_plane)),
            ..StatusDoc::default()
        },
        agent,
        started,
        node,
        discovery,
        coordinator,
        client,
        tasks,
        peers: BTreeMap::new(),
        state,
        last_status_line: String::new(),
        last_announcement: None,
        published: None,
        lone: Arc::new(AtomicBool::new(false)),
        kubeconfig: KubeconfigServing::NotYet,
    };
    tracing::info!(
        node = %rt.agent.node_id,
        port,
        resumed,
        "agent started"
    );
    rt.timeline(if resumed {
        "agent restarted; resuming from persisted state"
    } else {
        "agent started"
    });
    rt.execute(actions).await?;
    rt.agent.notifier.ready();
    rt.spawn_microk8s_poll();

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(MICROK8S_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        // An inbound message is answered in its own HTTP response: what the core sends back
        // to its sender while handling it (a promise, an accepted, a grant...).
        let mut answering = None;
        let event = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => Some(Event::Tick),
            _ = poll.tick() => { rt.spawn_microk8s_poll(); None }
            _ = heartbeat.tick() => { rt.reannounce(); None }
            Some(ev) = peer_events.recv() => rt.peer_event(ev),
            Some(msg) = inbound.recv() => {
                let ev = rt.inbound(&msg);
                answering = ev.is_some().then_some(msg);
                ev
            }
            Some(res) = task_rx.recv() => rt.task_result(res),
        };
        if let Some(ev) = event {
            let now = rt.started.elapsed();
            let actions = rt.node.handle(now, ev);
            rt.execute_answering(actions, answering).await?;
        }
        rt.publish_status();
    }
    tracing::info!("shutting down");
    rt.agent.notifier.stopping();
    rt.discovery.shutdown();
    rt.coordinator.shutdown();
    Ok(())
}

impl Runtime {
    fn timeline(&mut self, what: impl Into<String>) {
        let what = what.into();
        // Keep the document small: the first entries tell how formation went, the last ones
        // what happens now.
        if self.doc.timeline.len() >= 200 {
            self.doc.timeline.remove(50);
        }
        self.doc.timeline.push(TimelineEntry {
            at: self.started.elapsed().as_secs_f64(),
            what,
        });
    }

    fn peer_event(&mut self, ev: PeerEvent) -> Option<Event> {
        match ev {
            PeerEvent::Seen(p) | PeerEvent::Updated(p) => {
                let ann = match Announcement::from_txt(&p.fields) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(peer = %p.node_id, error = %e, "ignoring announcement");
                        return None;
                    }
                };
                // Prefer IPv4: MicroK8s joins cannot use IPv6 seeds (reference A3).
                let ip = p
                    .addrs
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or_else(|| p.addrs.first())
                    .copied()?;
                if ann.id.as_str() != p.node_id {
                    tracing::debug!(peer = %p.node_id, "announcement id differs from record id");
                    return None;
                }
                let first = !self.peers.contains_key(&ann.id);
                self.peers.insert(
                    ann.id.clone(),
                    PeerAddr {
                        ip,
                        port: p.port,
                        fingerprint: p.fingerprint.clone(),
                        phase: ann.phase.name().into(),
                        role: ann.role.map(|r| r.name().to_owned()),
                    },
                );
                if first {
                    self.timeline(format!("saw {} at {ip}", ann.id));
                }
                Some(Event::PeerSeen { ann, ip })
            }
            PeerEvent::Lost { node_id } => {
                let id = NodeId::new(node_id).ok()?;
                // Keep the address: a lost mDNS record (expiry under load, an unsigned goodbye)
                // does not mean the peer is gone, and the pinned coordinator client can still
                // reach it. The formation core decides liveness.
                if let Some(p) = self.peers.get_mut(&id) {
                    p.phase = "lost".into();
                }
                self.timeline(format!("lost {id}"));
                Some(Event::PeerLost { id })
            }
        }
    }

    /// The event for an inbound message (none if the sender id is malformed: the dropped
    /// `Inbound` then answers 503).
    fn inbound(&mut self, msg: &Inbound<Message>) -> Option<Event> {
        tracing::trace!(peer = %msg.from, msg = msg.message.kind(), "message in");
        Some(Event::Message {
            from: NodeId::new(msg.from.clone()).ok()?,
            msg: msg.message.clone(),
        })
    }

    fn task_result(&mut self, res: TaskResult) -> Option<Event> {
        match res {
            TaskResult::Event(ev) => {
                let ev = *ev;
                match &ev {
                    Event::NodePrepared(r) => self.timeline(match r {
                        Ok(()) => "node prepared; microk8s installed and ready".to_owned(),
                        Err(e) => format!("node preparation failed: {e}"),
                    }),
                    Event::JoinFinished(r) => self.timeline(match r {
                        Ok(()) => "microk8s join finished".to_owned(),
                        Err(e) => format!("microk8s join failed: {e}"),
                    }),
                    Event::AddonsEnabled(r) => self.timeline(match r {
                        Ok(()) => "addons enabled".to_owned(),
                        Err(e) => format!("addons failed: {e}"),
                    }),
                    _ => {}
                }
                if let Event::NodePrepared(Err(e))
                | Event::JoinFinished(Err(e))
                | Event::AddonsEnabled(Err(e)) = &ev
                {
                    self.doc.last_error = Some(e.clone());
                }
                Some(ev)
            }
            TaskResult::Replies { from, msgs } => {
                // Several replies: feed the first now and queue the rest in order.
                let mut it = msgs.into_iter();
                let first = it.next()?;
                for m in it {
                    let _ = self.tasks.try_send(TaskResult::Replies {
                        from: from.clone(),
                        msgs: vec![m],
                    });
                }
                Some(Event::Message { from, msg: first })
            }
            TaskResult::SendFailed { to, error } => {
                tracing::debug!(peer = %to, %error, "message not delivered");
                None
            }
            TaskResult::Microk8s(view) => {
                self.doc.microk8s = view;
                None
            }
            TaskResult::Problems { problems, fixes } => {
                self.doc.problems = problems;
                self.doc.fixes = fixes;
                None
            }
            TaskResult::Addons(rows) => {
                self.doc.addons = rows;
                None
            }
        }
    }

    async fn execute(&mut self, actions: Vec<Action>) -> Result<()> {
        self.execute_answering(actions, None).await
    }

    /// Runs `actions` in order. Messages for the sender of `answering` are held and go back
    /// in its HTTP response once every action ran, so after any persist that preceded them
    /// (a promise or an accept is durable before the proposer sees it).
    async fn execute_answering(
        &mut self,
        actions: Vec<Action>,
        answering: Option<Inbound<Message>>,
    ) -> Result<()> {
        let mut answers = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, msg }
                    if answering.as_ref().is_some_and(|a| a.from == to.as_str()) =>
                {
                    tracing::trace!(peer = %to, msg = msg.kind(), "message out (answer)");
                    answers.push(msg);
                }
                Action::Persist(st) => {
                    self.state
                        .store(&st)
                        .context("persisting the formation state")?;
                }
                Action::Announce(ann) => {
                    // Progress alone (record ballot, member count) rides on the heartbeat.
                    let urgent = self
                        .last_announcement
                        .as_ref()
                        .is_none_or(|last| !last.only_progress_differs(&ann));
                    self.last_announcement = Some(ann);
                    if urgent {
                        self.reannounce();
                    }
                }
                Action::Send { to, msg } => self.send(to, msg),
                Action::SetStatus(line) => {
                    if line != self.last_status_line {
                        tracing::info!(status = %line);
                        self.agent.notifier.status(&line);
                        self.timeline(line.clone());
                        self.last_status_line = line;
                    }
                }
                Action::PrepareNode => self.spawn_prepare(),
                Action::Join {
                    seed_ip,
                    worker,
                    timeout,
                    cluster,
                } => {
                    self.timeline(format!(
                        "joining cluster {cluster} via {seed_ip} as {}",
                        if worker { "worker" } else { "control plane" }
                    ));
                    self.spawn_join(seed_ip, worker, timeout);
                }
                Action::EnableAddons { cluster } => {
                    self.timeline(format!("enabling addons for cluster {cluster}"));
                    self.spawn_addons();
                }
            }
        }
        if let Some(a) = answering {
            a.reply(answers);
        }
        Ok(())
    }

    fn reannounce(&mut self) {
        let Some(ann) = &self.last_announcement else {
            return;
        };
        if let Err(e) = self.discovery.announce(ann.to_txt()) {
            tracing::warn!(error = %e, "announcing failed");
            self.doc.last_error = Some(format!("announcing failed: {e}"));
        }
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        tracing::trace!(peer = %to, msg = msg.kind(), "message out");
        let Some(peer) = self.peers.get(&to) else {
            tracing::debug!(peer = %to, "no address for peer; message dropped");
            return;
        };
        let addr = SocketAddr::new(peer.ip, peer.port);
        let fp = peer.fingerprint.clone();
        let client = self.client.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let res = match client.send(addr, &fp, &msg).await {
                Ok(msgs) if msgs.is_empty() => return,
                Ok(msgs) => TaskResult::Replies { from: to, msgs },
                Err(e) => TaskResult::SendFailed {
                    to,
                    error: e.to_string(),
                },
            };
            let _ = tasks.send(res).await;
        });
    }

    fn spawn_prepare(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.clone();
        tokio::spawn(async move {
            let result = prepare(&agent, &tasks, &lone)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::NodePrepared(result))))
                .await;
        });
    }

    fn spawn_join(&self, seed_ip: IpAddr, worker: bool, timeout: Duration) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.swap(false, Ordering::SeqCst);
        tokio::spawn(async move {
            let joining = join(&agent, seed_ip, worker, lone);
            let result = match tokio::time::timeout(timeout, joining).await {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err(format!("join did not finish within {timeout:?}")),
            };
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::JoinFinished(result))))
                .await;
        });
    }

    fn spawn_addons(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let peers: Vec<IpAddr> = self.peers.values().map(|p| p.ip).collect();
        tokio::spawn(async move {
            let result = enable_addons(&agent, &tasks, &peers)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::AddonsEnabled(result))))
                .await;
        });
    }

    fn spawn_microk8s_poll(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let ha_size = (agent.config.cluster.control_plane as usize).min(3);
        tokio::spawn(async move {
            let view = match agent.microk8s.status().await {
                Err(_) => None,
                Ok(Status::Stopped) => Some(Microk8sView {
                    running: false,
                    note: Some("microk8s is not running".into()),
                    ..Default::default()
                }),
                Ok(Status::NotReady) => Some(Microk8sView {
                    running: true,
                    note: Some("not ready (starting, or quorum lost)".into()),
                    ..Default::default()
                }),
                Ok(Status::WorkerNode) => Some(Microk8sView {
                    running: true,
                    note: Some("worker node".into()),
                    ..Default::default()
                }),
                Ok(Status::Running(s)) => {
                    let voters: Vec<String> = s.voters().into_iter().map(String::from).collect();
                    Some(Microk8sView {
                        running: true,
                        ha: voters.len() >= ha_size,
                        standby: s.standby().into_iter().map(String::from).collect(),
                        voters,
                        note: None,
                    })
                }
            };
            let _ = tasks.send(TaskResult::Microk8s(view)).await;
        });
    }

    /// Serves the admin kubeconfig over the coordinator (authenticated requests only) once
    /// this node is a control-plane member: `microk8s config` runs on each request, so the
    /// answer follows MicroK8s (certificate refreshes, a stopped service's error). The text is
    /// never logged or kept here. A worker member refuses with a reason naming where to ask.
    fn serve_kubeconfig(&mut self, phase: &Phase) {
        let want = match phase {
            Phase::Member {
                role: Role::ControlPlane,
                ..
            } => KubeconfigServing::Serving,
            Phase::Member {
                role: Role::Worker, ..
            } => KubeconfigServing::Worker,
            _ => KubeconfigServing::NotYet,
        };
        if want == self.kubeconfig {
            return;
        }
        match want {
            KubeconfigServing::Serving => {
                let mk = self.agent.microk8s.clone();
                self.coordinator.set_kubeconfig_provider(Arc::new(move || {
                    let mk = mk.clone();
                    Box::pin(async move { Ok(mk.config().await?) })
                }));
                self.timeline("serving the admin kubeconfig to holders of the cluster secret");
            }
            KubeconfigServing::Worker => self.coordinator.refuse_kubeconfig(
                "this node is a worker and has no admin kubeconfig; ask a control-plane member",
            ),
            KubeconfigServing::NotYet => self.coordinator.clear_kubeconfig_provider(),
        }
        self.kubeconfig = want;
    }

    /// Refreshes the status document served by the coordinator.
    fn publish_status(&mut self) {
        let st = self.node.status();
        self.serve_kubeconfig(&st.phase);
        self.doc.phase = st.phase.summary().name().into();
        self.doc.role = st.role.map(|r| r.name().to_owned());
        self.doc.cluster = st.cluster.as_ref().map(|c| c.to_string());
        self.doc.authority = st.authority.as_ref().map(|a| a.to_string());
        if let Some(e) = &st.last_error {
            self.doc.last_error = Some(e.clone());
        }
        self.doc.members = st
            .members_known
            .iter()
            .map(|(id, role)| MemberRow {
                node_id: id.to_string(),
                role: role.name().to_owned(),
            })
            .collect();
        self.doc.peers = self
            .peers
            .iter()
            .map(|(id, p)| PeerRow {
                node_id: id.to_string(),
                address: p.ip.to_string(),
                phase: p.phase.clone(),
                role: p.role.clone(),
            })
            .collect();
        // The loop calls this after every event; only a changed document is re-encoded.
        if self.published.as_ref() != Some(&self.doc) {
            let _ = self.coordinator.set_status_from(&self.doc);
            self.published = Some(self.doc.clone());
        }
    }
}

/// Node preparation: storage/hardware checks, then install MicroK8s and wait until it is ready.
/// A Pi booted without the memory cgroup (an image not made by rackseed, or a `cmdline.txt`
/// edited since): add the flags and reboot once; the persisted phase resumes preparation after
/// the reboot. Never reboots twice for this ([`addons::prep::pi_cgroup_step`]), and never when
/// `--root` is not `/` (a test must not reboot its host).
async fn pi_memory_cgroup(agent: &Agent) -> Result<()> {
    use addons::prep::PiCgroup;
    match addons::prep::pi_cgroup_step(&agent.root).context("checking the memory cgroup")? {
        PiCgroup::Ready | PiCgroup::FlagsIgnored => Ok(()),
        PiCgroup::RebootNeeded => {
            let why = "added cgroup_enable=memory cgroup_memory=1 to cmdline.txt; rebooting once \
                       so the kernel reads them";
            if agent.root != std::path::Path::new("/") {
                anyhow::bail!("{why} (not rebooting: --root is {})", agent.root.display());
            }
            tracing::warn!("{why}");
            agent
                .notifier
                .status("rebooting once to enable the memory cgroup");
            rackseed_host::command::Cmd::new("systemctl", Duration::from_secs(30))
                .arg("reboot")
                .run()
                .await
                .context("systemctl reboot")?;
            anyhow::bail!("{why}")
        }
    }
}

async fn prepare(agent: &Agent, tasks: &mpsc::Sender<TaskResult>, lone: &AtomicBool) -> Result<()> {
    let readiness = addons::prep::prepare_node(
        &agent.root,
        agent.config.addons.storage,
        agent.config.image.target,
        &addons::prep::HostKernel,
    )
    .await
    .context("preparing the node")?;
    let _ = tasks
        .send(TaskResult::Problems {
            problems: readiness.problems.clone(),
            fixes: readiness.fixes.clone(),
        })
        .await;
    if matches!(agent.config.image.target, Target::Rpi4 | Target::Rpi5) {
        for (p, f) in readiness.problems.iter().zip(&readiness.fixes) {
            tracing::warn!(problem = %p, fix = %f, "raspberry pi check");
        }
        pi_memory_cgroup(agent).await?;
    }
    let source = match &agent.config.microk8s.offline_snaps {
        Some(dir) => InstallSource::Staged(dir.clone()),
        None => InstallSource::Channel(agent.config.microk8s.channel.clone()),
    };
    let outcome = agent
        .microk8s
        .install(&source, &agent.secret)
        .await
        .context("installing microk8s")?;
    tracing::info!(?outcome, "microk8s installed");
    if !agent
        .microk8s
        .wait_ready(READY_TIMEOUT)
        .await
        .context("waiting for microk8s to be ready")?
    {
        anyhow::bail!("microk8s did not become ready within {READY_TIMEOUT:?}");
    }
    // A lone node now is not a member of anything until this agent joins it somewhere.
    let alone =
        matches!(agent.microk8s.status().await, Ok(Status::Running(s)) if s.datastore.len() <= 1);
    lone.store(alone, Ordering::SeqCst);
    Ok(())
}

/// `microk8s join` through the seed, then wait until ready. A node that already is a member
/// (a restart after a join that succeeded) reports success without joining again; that
/// check is skipped only for the first join after preparation found a lone node (`lone`).
async fn join(agent: &Agent, seed_ip: IpAddr, worker: bool, lone: bool) -> Result<()> {
    if !lone && already_joined(agent.microk8s.as_ref(), seed_ip, worker).await {
        tracing::info!(%seed_ip, "already a member; not joining again");
        return Ok(());
    }
    let target = JoinTarget::new(seed_ip, agent.secret.microk8s_token());
    let role = if worker {
        JoinRole::Worker
    } else {
        JoinRole::ControlPlane
    };
    agent
        .microk8s
        .join(&target, role)
        .await
        .with_context(|| format!("microk8s join via {seed_ip}"))?;
    if !worker
        && !agent
            .microk8s
            .wait_ready(READY_TIMEOUT)
            .await
            .context("waiting for microk8s after the join")?
    {
        anyhow::bail!("microk8s was not ready within {READY_TIMEOUT:?} after joining");
    }
    Ok(())
}

async fn already_joined(mk: &dyn Microk8s, seed_ip: IpAddr, worker: bool) -> bool {
    match mk.status().await {
        Ok(Status::WorkerNode) => worker,
        Ok(Status::Running(s)) if !worker => {
            let seed = format!("{seed_ip}:19001");
            s.datastore.len() > 1 && s.datastore.iter().any(|n| n.address == seed)
        }
        _ => false,
    }
}

/// Enables the planned addons one by one, persisting progress so a crash mid-enable resumes.
async fn enable_addons(
    agent: &Agent,
    tasks: &mpsc::Sender<TaskResult>,
    peers: &[IpAddr],
) -> Result<()> {
    let file = addons_file(&agent.state_dir);
    let mut progress: AddonProgress = match file.load()? {
        Some(mut p) => {
            let p: &mut AddonProgress = &mut p;
            p.resume();
            p.clone()
        }
        None => {
            let ctx = addons::plan::PlanContext {
                metallb_auto: auto_metallb(agent, peers).await?,
            };
            let plan =
                addons::plan::plan_addon_enables(&agent.config, &ctx).context("planning addons")?;
            AddonProgress::new(plan)
        }
    };
    file.store(&progress)?;
    let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
    while let Some(next) = addons::progress::next_addon_to_enable(&progress).cloned() {
        progress.mark_enabling(&next.name)?;
        file.store(&progress)?;
        let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
        let result = agent
            .microk8s
            .enable(&next.name, &next.args)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        addons::progress::record_result(&mut progress, &next.name, result)?;
        file.store(&progress)?;
        let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
    }
    let failed: Vec<String> = progress
        .addons
        .iter()
        .filter(|r| matches!(r.state, addons::progress::AddonState::Failed { .. }))
        .map(|r| r.enable.name.clone())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("addons failed: {}", failed.join(", "))
    }
}

async fn auto_metallb(
    agent: &Agent,
    peers: &[IpAddr],
) -> Result<Option<Vec<rackseed_config::AddressBlock>>> {
    let Some(Metallb::Auto { count }) = &agent.config.addons.metallb else {
        return Ok(None);
    };
    let iface = match &agent.config.network.interface {
        Some(i) => i.clone(),
        None => crate::system::identity::primary_mac(std::path::Path::new("/"), None)?.0,
    };
    let net = addons::autorange::interface_ipv4(&iface).await?;
    let mut nodes: Vec<std::net::Ipv4Addr> = peers
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    nodes.push(net.addr());
    let reserved = match &agent.config.network.addressing {
        rackseed_config::Addressing::Static { gateway, dns } => std::iter::once(gateway)
            .chain(dns.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        rackseed_config::Addressing::Dhcp => Vec::new(),
    };
    let range = addons::autorange::choose_auto_range(
        &addons::autorange::ArpingProber::new(iface),
        &addons::autorange::AutoRangeRequest {
            interface: net,
            nodes,
            reserved,
            count: *count,
        },
    )
    .await?;
    tracing::info!(addresses = ?range.addresses, in_use = ?range.in_use, "metallb auto range");
    Ok(Some(range.blocks))
}

fn addon_rows(p: &AddonProgress) -> Vec<AddonRow> {
    use addons::progress::AddonState;
    let mut rows: Vec<AddonRow> = p
        .addons
        .iter()
        .map(|r| {
            let (state, reason) = match &r.state {
                AddonState::Pending => ("pending", None),
                AddonState::Enabling => ("enabling", r.last_error.clone()),
                AddonState::Enabled => ("enabled", None),
                AddonState::Failed { reason } => ("failed", Some(reason.clone())),
            };
            AddonRow {
                name: r.enable.name.clone(),
                state: state.into(),
                reason,
            }
        })
        .collect();
    rows.extend(p.manual.iter().map(|m| AddonRow {
        name: m.name.clone(),
        state: "manual".into(),
        reason: Some(m.summary.clone()),
    }));
    rows
}

/// True once the persisted phase says this node is a member.
pub fn is_member(st: &PersistedState) -> bool {
    matches!(st.phase, Phase::Member { .. })
}
