//! The agent's tokio loop: events in, the pure formation core decides, actions out.
//!
//! [`run`] takes its dependencies ([`Agent`]) and a shutdown future. It starts the coordinator
//! (HTTPS, join-slot messages, status document) and mDNS discovery, then feeds the formation
//! core ([`rackseed_formation::Node`]) with:
//! - verified peer announcements and losses from discovery (the announcement's id is the one
//!   discovery verified with the record; discovery also keeps each peer's addresses),
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
//! The loop lives here; the long-running effects (preparation, join, addons, the MicroK8s
//! poll) are in `driver/effects.rs`, and the status document and served kubeconfig in
//! `driver/status.rs`. To add a long-running action: write it in `effects`, spawn it from
//! `Runtime::execute_answering` and send its result back through the task channel as an
//! [`Event`].

mod api_address;
mod api_auto;
mod backup;
mod cadence;
pub mod drill;
mod effects;
mod in_flight;
mod labels;
mod replace;
mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::rotate::{RotationFiles, Rotator};
use crate::system::microk8s::Microk8s;
use crate::system::notify::Notifier;
use crate::system::state::StateFile;
use rackseed_config::{ClusterConfig, MacAddr};
use rackseed_formation::{
    Action, Announcement, Event, FormationParams, Message, Node, NodeId, PersistedState, Phase,
};
use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorClient, CoordinatorConfig, Inbound, NodeIdentity,
};
use rackseed_protocol::discovery::{Discovery, DiscoveryConfig, InterfaceChoice, PeerEvent};
use rackseed_protocol::secret::{ClusterSecret, Keyring};
use rackseed_protocol::status::{AddonRow, Microk8sView, StatusDoc};
use status::KubeconfigServing;

/// How often the formation core ticks.
const TICK: Duration = Duration::from_secs(1);
/// How a time-synchronisation wait's status line starts (it is listed among the problems
/// while it lasts).
const TIME_SYNC_WAITING: &str = "waiting for time synchronisation";
/// How often MicroK8s' own status is read for the status document.
const MICROK8S_POLL: Duration = Duration::from_secs(5);

/// Everything the agent needs; built by `firstboot run` from the real system, or by tests.
pub struct Agent {
    pub config: ClusterConfig,
    /// The secret the agent started with; the live one is `keyring`'s current secret.
    pub secret: ClusterSecret,
    /// The node's secrets, shared by discovery, the coordinator and its client; a secret
    /// rotation ([`crate::rotate`]) switches them at run time.
    pub keyring: Arc<Keyring>,
    /// Where the secret and the MicroK8s token derived from it live (rotation rewrites them).
    pub rotation_files: RotationFiles,
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
    /// How keepalived (the floating API address) is started and reloaded.
    pub keepalived: crate::system::keepalived::KeepalivedControl,
    /// The programs a failover drill's cut-off runs ([`drill`]).
    pub cut_off: drill::CutOffControl,
    /// The bounded wait for time synchronisation before the MicroK8s install and join.
    pub time_sync: crate::system::timesync::TimeSyncWait,
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
    ApiAddress(rackseed_protocol::status::ApiAddressView),
    /// The inventory's node labels, as a control-plane member put them on.
    NodeLabels(Vec<rackseed_protocol::status::NodeLabelsView>),
    /// The replicated storage's health (Longhorn), read on control-plane members.
    Storage(rackseed_protocol::status::StorageHealthView),
    /// A datastore backup run ended (`driver/backup.rs`).
    Backup(Box<crate::backup::Outcome>),
    /// Waiting for time synchronisation (the status line), or done waiting (`None`).
    TimeSync(Option<String>),
}

struct Runtime {
    agent: Arc<Agent>,
    started: Instant,
    node: Node,
    discovery: Discovery,
    coordinator: Coordinator<Message>,
    client: Arc<CoordinatorClient>,
    /// Messages still on their way: a repeat of one waits for it (`driver/in_flight.rs`).
    in_flight: in_flight::InFlight,
    tasks: mpsc::Sender<TaskResult>,
    state: StateFile,
    doc: StatusDoc,
    last_status_line: String,
    /// The last announcement, re-published as a heartbeat so peers keep seeing this node.
    last_announcement: Option<Announcement>,
    /// The announcement as it last went out over mDNS (a member beats directly while the
    /// last one equals it: `driver/cadence.rs`).
    mdns_announcement: Option<Announcement>,
    /// The status document as last handed to the coordinator.
    published: Option<StatusDoc>,
    /// Set when preparation found MicroK8s a lone node; cleared by the first join attempt.
    /// Until then this node cannot already be a member, so that join skips the check.
    lone: Arc<AtomicBool>,
    /// Set while node preparation (with the MicroK8s install) runs: the core re-issues
    /// `PrepareNode` when no result came within its join timeout, and a slow install must not
    /// get a second one beside it (snapd refuses it, and two installs would write the same
    /// files); the running one's result answers both.
    preparing: Arc<AtomicBool>,
    /// What `POST /v1/kubeconfig` currently answers.
    kubeconfig: KubeconfigServing,
    /// The floating API address's keepalived, when the cluster has one.
    api_address: Option<Arc<api_address::ApiAddressKeeper>>,
    /// Datastore backups: the store and the schedule (`driver/backup.rs`).
    backup: backup::BackupDuty,
    /// When the MicroK8s poll runs (`driver/cadence.rs`).
    poll_cadence: cadence::PollCadence,
    /// When the announcement is re-published (`driver/cadence.rs`).
    heartbeat: cadence::Heartbeat,
}

/// What the loop waits on besides the clock: discovery, the coordinator and its own tasks.
struct Inputs {
    peer_events: mpsc::Receiver<PeerEvent>,
    inbound: mpsc::Receiver<Inbound<Message>>,
    task_rx: mpsc::Receiver<TaskResult>,
    /// How often the announcement is re-published.
    heartbeat_every: Duration,
}

/// Runs the agent until `shutdown` completes. Persisted state makes a restart resume.
pub async fn run(agent: Agent, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (mut rt, inputs, actions) = Runtime::start(Arc::new(agent)).await?;
    rt.execute(actions).await?;
    rt.agent.notifier.ready();
    rt.spawn_microk8s_poll();
    rt.event_loop(inputs, shutdown).await?;
    tracing::info!("shutting down");
    rt.agent.notifier.stopping();
    rt.discovery.shutdown();
    rt.coordinator.shutdown();
    Ok(())
}

impl Runtime {
    /// Starts the coordinator and discovery and resumes the formation core from the persisted
    /// state; returns the core's first actions, not yet executed.
    async fn start(agent: Arc<Agent>) -> Result<(Runtime, Inputs, Vec<Action>)> {
        let started = Instant::now();
        // It holds the coordinator's private key, the phase and the boot counter.
        rackseed_host::fs::create_private_dir(&agent.state_dir)
            .context("the agent's state folder (--state-dir) holds its private key")?;
        let identity = NodeIdentity::load_or_create(&agent.state_dir)
            .with_context(|| format!("coordinator identity in {}", agent.state_dir.display()))?;
        let fingerprint = identity.fingerprint().to_owned();
        let (coordinator, inbound) = Coordinator::<Message>::start_with_keyring(
            CoordinatorConfig {
                secret: agent.secret.clone(),
                identity,
                listen: agent.listen,
            },
            agent.keyring.clone(),
        )
        .await
        .with_context(|| format!("starting the coordinator on {}", agent.listen))?;
        let rotator = Rotator::new(
            agent.node_id.as_str(),
            agent.keyring.clone(),
            agent.rotation_files.clone(),
        );
        coordinator.set_rotation_handler(Arc::new(rotator).handler());
        let cutter = drill::Cutter::new(
            agent.node_id.as_str(),
            agent.interfaces.clone(),
            agent.cut_off.clone(),
        );
        coordinator.set_drill_handler(Arc::new(cutter).handler());
        let port = coordinator.local_addr().port();

        let mut dcfg = DiscoveryConfig::new(
            agent.secret.clone(),
            agent.node_id.as_str(),
            port,
            &fingerprint,
        );
        dcfg.interfaces = agent.interfaces.clone();
        dcfg.keyring = Some(agent.keyring.clone());
        // Members' heartbeats go directly to each peer over UDP (see `driver/cadence.rs`).
        dcfg.heartbeats = true;
        // Raised and persisted before anything is announced: peers order this node's boots by
        // it, so a recording of an earlier boot cannot hide this one.
        dcfg.boot_counter = rackseed_protocol::discovery::advance_boot_counter(&agent.state_dir)?;
        let (discovery, peer_events) = Discovery::start(dcfg).context("starting mDNS discovery")?;

        let state = state_file(&agent.state_dir);
        let persisted: Option<PersistedState> = state.load()?;
        let resumed = persisted.is_some();
        let resumed_member = persisted.as_ref().is_some_and(is_member);
        let params = match &agent.params {
            Some(p) => p.clone(),
            None => FormationParams::from_config(&agent.config, agent.mac),
        };
        params.validate().context("formation parameters")?;
        // Peers forget a node whose announcement is not refreshed within `peer_timeout`, so
        // the announcement is re-published (with a new sequence number) well within it.
        let heartbeat = cadence::Heartbeat::new(params.peer_timeout);
        let heartbeat_every = heartbeat.tick();
        let (node, actions) = Node::new(params, agent.node_id.clone(), persisted, Duration::ZERO);
        let (tasks, task_rx) = mpsc::channel(256);
        let client = Arc::new(CoordinatorClient::with_keyring(
            agent.keyring.clone(),
            agent.node_id.as_str(),
        ));
        let mut rt = Runtime {
            doc: StatusDoc {
                version: env!("CARGO_PKG_VERSION").into(),
                node_id: agent.node_id.to_string(),
                hostname: agent.hostname.clone(),
                control_plane_size: Some(u32::from(agent.config.cluster.control_plane)),
                microk8s_simulated: rackseed_protocol::status::microk8s_is_simulated(),
                ..StatusDoc::default()
            },
            agent,
            started,
            node,
            discovery,
            coordinator,
            client,
            in_flight: Default::default(),
            tasks,
            state,
            last_status_line: String::new(),
            last_announcement: None,
            mdns_announcement: None,
            published: None,
            lone: Arc::new(AtomicBool::new(false)),
            preparing: Arc::new(AtomicBool::new(false)),
            kubeconfig: KubeconfigServing::NotYet,
            api_address: None,
            backup: Default::default(),
            poll_cadence: Default::default(),
            heartbeat,
        };
        rt.api_address = api_address::ApiAddressKeeper::new(&rt.agent).map(Arc::new);
        rt.resume_prerequisites(resumed_member);
        tracing::info!(
            node = %rt.agent.node_id,
            port,
            resumed,
            boot = rt.discovery.boot_counter(),
            "agent started"
        );
        rt.timeline(if resumed {
            "agent restarted; resuming from persisted state"
        } else {
            "agent started"
        });
        let inputs = Inputs {
            peer_events,
            inbound,
            task_rx,
            heartbeat_every,
        };
        Ok((rt, inputs, actions))
    }

    /// Feeds events to the formation core and executes its actions until `shutdown`.
    async fn event_loop(
        &mut self,
        mut inputs: Inputs,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(inputs.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(MICROK8S_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            // An inbound message is answered in its own HTTP response: what the core sends
            // back to its sender while handling it (a promise, an accepted, a grant...).
            let mut answering = None;
            let event = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tick.tick() => Some(Event::Tick),
                _ = poll.tick() => {
                    self.spawn_microk8s_poll();
                    self.note_own_address();
                    self.backup_tick();
                    None
                }
                _ = heartbeat.tick() => {
                    let (now, member) = (Instant::now(), self.doc.phase == "member");
                    if self.heartbeat.due(now, member) {
                        self.beat(now);
                    }
                    None
                }
                Some(ev) = inputs.peer_events.recv() => self.peer_event(ev),
                Some(msg) = inputs.inbound.recv() => {
                    let ev = self.inbound(&msg);
                    answering = ev.is_some().then_some(msg);
                    ev
                }
                Some(res) = inputs.task_rx.recv() => self.task_result(res),
            };
            if let Some(ev) = event {
                let now = self.started.elapsed();
                let actions = self.node.handle(now, ev);
                self.execute_answering(actions, answering).await?;
            }
            self.publish_status();
        }
    }

    /// The event for a discovery report. Discovery verified the record and its id, and keeps
    /// the peer's addresses; the core gets the announcement and the preferred address.
    fn peer_event(&mut self, ev: PeerEvent) -> Option<Event> {
        match ev {
            PeerEvent::Seen(p) | PeerEvent::Updated(p) => {
                let ann = match Announcement::from_txt(&p.node_id, &p.fields) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(peer = %p.node_id, error = %e, "ignoring announcement");
                        return None;
                    }
                };
                // Prefer IPv4: MicroK8s joins cannot use IPv6 seeds (reference A3).
                let ip = p.preferred_addr()?;
                self.note_peer_seen(&ann, ip);
                Some(Event::PeerSeen { ann, ip })
            }
            PeerEvent::Lost { node_id } => {
                let id = NodeId::new(node_id).ok()?;
                // Discovery keeps the address: a lost mDNS record (expiry under load, an
                // unsigned goodbye) does not mean the peer is gone, and the pinned coordinator
                // client can still reach it. The formation core decides liveness.
                self.note_peer_lost(&id);
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
                self.note_task_event(&ev);
                Some(*ev)
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
            TaskResult::ApiAddress(view) => {
                self.doc.api_address = Some(view);
                None
            }
            TaskResult::NodeLabels(rows) => {
                self.doc.node_labels = rows;
                None
            }
            TaskResult::Storage(view) => {
                self.doc.storage = Some(view);
                None
            }
            TaskResult::Backup(outcome) => {
                self.backup_finished(*outcome);
                None
            }
            TaskResult::TimeSync(line) => {
                self.doc
                    .problems
                    .retain(|p| !p.starts_with(TIME_SYNC_WAITING));
                if let Some(line) = line {
                    self.timeline(line.clone());
                    self.doc.problems.push(line);
                }
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
                    via,
                    worker,
                    timeout,
                    cluster,
                } => {
                    self.timeline(format!(
                        "joining cluster {cluster} via {} as {}",
                        via.ip,
                        if worker { "worker" } else { "control plane" }
                    ));
                    self.spawn_join(via, worker, timeout);
                }
                Action::EnableAddons { cluster } => {
                    self.timeline(format!("enabling addons for cluster {cluster}"));
                    self.spawn_addons();
                }
                Action::RemoveNode {
                    node,
                    ip,
                    cluster,
                    force,
                } => {
                    self.timeline(if force {
                        format!("removing member {node} ({ip}) from cluster {cluster} (--force)")
                    } else {
                        format!("removing member {node} ({ip}), which left, from cluster {cluster}")
                    });
                    self.spawn_remove_node(node, ip, force);
                }
                Action::Leave { cluster, reason } => {
                    self.timeline(format!(
                        "changing role: leaving cluster {cluster} as a worker (microk8s leave) \
                         to join it again as control plane; why: {reason}"
                    ));
                    self.spawn_leave();
                }
            }
        }
        if let Some(a) = answering {
            a.reply(answers);
        }
        Ok(())
    }

    /// Shows the node's last prerequisite verdict (kept in the state folder) at once, and, on
    /// a member (which does not prepare again), checks it again in the background: a
    /// restarted member neither forgets an unmet prerequisite nor keeps one that was fixed.
    fn resume_prerequisites(&mut self, member: bool) {
        match crate::addons::prep::load_verdict(&self.agent.state_dir) {
            Ok(Some(v)) => {
                self.doc.problems = v.problems;
                self.doc.fixes = v.fixes;
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(error = %why, "the kept prerequisite verdict");
                self.doc.last_error = Some(format!("the kept prerequisite verdict: {why}"));
            }
        }
        if !member {
            return;
        }
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            match effects::check_prerequisites(&agent).await {
                Ok(r) => {
                    let _ = tasks
                        .send(TaskResult::Problems {
                            problems: r.problems,
                            fixes: r.fixes,
                        })
                        .await;
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "re-checking prerequisites"),
            }
        });
    }

    /// A due heartbeat: direct while the cadence allows it, else over mDNS.
    fn beat(&mut self, now: Instant) {
        let unchanged =
            self.last_announcement.is_some() && self.last_announcement == self.mdns_announcement;
        if self.heartbeat.direct(now, unchanged) {
            match self.discovery.heartbeat() {
                Ok(_) => {
                    self.heartbeat.beat(now);
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "direct heartbeat not sent; announcing"),
            }
        }
        self.reannounce();
    }

    fn reannounce(&mut self) {
        let Some(ann) = &self.last_announcement else {
            return;
        };
        match self.discovery.announce(ann.to_txt()) {
            // Any announcement refreshes this node at its peers: the heartbeat counts from it.
            Ok(()) => {
                tracing::debug!(phase = ann.phase.name(), "announced over mdns");
                self.heartbeat.announced(Instant::now());
                self.mdns_announcement = Some(ann.clone());
            }
            Err(e) => {
                tracing::warn!(error = %e, "announcing failed");
                self.doc.last_error = Some(format!("announcing failed: {e}"));
            }
        }
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        tracing::trace!(peer = %to, msg = msg.kind(), "message out");
        let Some((peer, ip)) = self
            .discovery
            .peer(to.as_str())
            .and_then(|p| p.preferred_addr().map(|ip| (p, ip)))
        else {
            tracing::debug!(peer = %to, "no address for peer; message dropped");
            return;
        };
        let addr = SocketAddr::new(ip, peer.port);
        let Some(on_its_way) = self.in_flight.claim(&to, addr, &msg) else {
            tracing::debug!(peer = %to, msg = msg.kind(), "the same message is still on its way; not sent again");
            return;
        };
        let fp = peer.fingerprint;
        let client = self.client.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let sent = client.send(addr, &fp, &msg).await;
            drop(on_its_way);
            let res = match sent {
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
}

/// True once the persisted phase says this node is a member.
pub fn is_member(st: &PersistedState) -> bool {
    matches!(st.phase, Phase::Member { .. })
}
