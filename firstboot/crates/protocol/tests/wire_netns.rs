//! Discovery + coordinator between real agents, each in its own network namespace on one
//! bridge with real multicast (netns-lab). Needs root; fails loudly without it.
//!
//! Shows: every node sees every other; a node with another cluster's secret is on the wire
//! (avahi lists it) but ignored and counted, and gets no reply from a coordinator; a captured
//! request replayed later is rejected; re-announcements arrive as updates; a node that shuts
//! down is reported lost; `avahi-browse -rpt _rackseed._tcp` resolves every node; forged
//! records published with `avahi-publish` (a replayed old record, a wrong signature under the
//! real cluster tag, no signature) are dropped and counted by every agent.
//! Prints discovery latency (run with `-- --nocapture` to see it): a node started after the
//! others announce -> seen by each running node; its start -> it has seen each running node;
//! re-announcement -> update seen; and nodes started together (about 1 s: mdns-sd does not
//! re-multicast a record within 1 s of the last time, RFC 6762 section 6, so a query that
//! arrives right after a peer's own announcement waits for that window).
//!
//! `RACKSEED_WIRE_NODES` (3..=10, default 5) sets the number of agents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netns_lab::{Host, Lab};
use rackseed_host::command::Cmd;
use rackseed_protocol::coordinator::{
    ClientError, Coordinator, CoordinatorClient, CoordinatorConfig, NodeIdentity, SignedRequest,
};
use rackseed_protocol::discovery::record::PROTOCOL_VERSION;
use rackseed_protocol::discovery::{
    Discovery, DiscoveryConfig, DiscoveryStats, HeartbeatStats, InterfaceChoice, PeerEvent,
};
use rackseed_protocol::secret::ClusterSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const PORT: u16 = 7443;
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Msg {
    RequestSlot { from: String },
    Granted { to: String },
}

enum Command {
    Announce(Vec<(String, String)>),
    Send {
        peer: SocketAddr,
        fp: String,
        reply: std_mpsc::Sender<Result<Vec<Msg>, ClientError>>,
    },
    /// Sign a request for `peer` and send it once; hand the signed request back.
    Capture {
        peer: SocketAddr,
        fp: String,
        reply: std_mpsc::Sender<Result<SignedRequest, ClientError>>,
    },
    Replay {
        peer: SocketAddr,
        fp: String,
        req: SignedRequest,
        reply: std_mpsc::Sender<Result<serde_json::Value, ClientError>>,
    },
    Stats(std_mpsc::Sender<DiscoveryStats>),
    /// One direct heartbeat; hands back how many peers it went to.
    Heartbeat(std_mpsc::Sender<Result<usize, String>>),
    HeartbeatStats(std_mpsc::Sender<HeartbeatStats>),
    Stop,
}

enum Note {
    Ready {
        fp: String,
        announced: Instant,
    },
    Peer {
        idx: usize,
        at: Instant,
        ev: PeerEvent,
    },
}

struct Agent {
    id: String,
    addr: IpAddr,
    fp: String,
    announced: Instant,
    tx: mpsc::UnboundedSender<Command>,
    join: Option<std::thread::JoinHandle<Result<DiscoveryStats>>>,
}

/// A failed test still stops its agents (their threads end; the lab then removes the hosts).
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Stop);
    }
}

impl Agent {
    fn stop(&mut self) -> Result<DiscoveryStats> {
        let _ = self.tx.send(Command::Stop);
        self.join
            .take()
            .context("agent already stopped")?
            .join()
            .map_err(|_| anyhow::anyhow!("agent {} panicked", self.id))?
    }

    fn request<T>(&self, make: impl FnOnce(std_mpsc::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("agent {} is gone", self.id))?;
        rx.recv_timeout(STEP_TIMEOUT)
            .with_context(|| format!("agent {} did not answer", self.id))
    }
}

fn spawn_agent(
    host: &Host,
    idx: usize,
    id: String,
    secret: ClusterSecret,
    notes: std_mpsc::Sender<Note>,
) -> Agent {
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let node_id = id.clone();
    let join = host.spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let identity = NodeIdentity::generate()?;
            let fp = identity.fingerprint().to_string();
            let (coord, mut inbound) = Coordinator::<Msg>::start(CoordinatorConfig {
                secret: secret.clone(),
                identity,
                listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
            })
            .await?;
            let me = node_id.clone();
            tokio::spawn(async move {
                while let Some(m) = inbound.recv().await {
                    let to = match &m.message {
                        Msg::RequestSlot { from } => from.clone(),
                        Msg::Granted { to } => to.clone(),
                    };
                    let _ = &me;
                    m.reply(vec![Msg::Granted { to }]);
                }
            });
            let mut cfg = DiscoveryConfig::new(secret.clone(), &node_id, PORT, &fp);
            cfg.interfaces = InterfaceChoice::Named(vec!["eth0".into()]);
            cfg.heartbeats = true;
            let (disc, mut peers) = Discovery::start(cfg)?;
            let client = CoordinatorClient::new(&secret, &node_id);
            disc.announce(vec![
                ("phase".into(), "electing".into()),
                ("prio".into(), idx.to_string()),
            ])?;
            let _ = ready_tx.send(Note::Ready {
                fp,
                announced: Instant::now(),
            });
            loop {
                tokio::select! {
                    ev = peers.recv() => match ev {
                        Some(ev) => { let _ = notes.send(Note::Peer { idx, at: Instant::now(), ev }); }
                        None => bail!("discovery of {node_id} stopped by itself"),
                    },
                    cmd = rx.recv() => match cmd {
                        None | Some(Command::Stop) => break,
                        Some(Command::Announce(fields)) => disc.announce(fields)?,
                        Some(Command::Stats(reply)) => { let _ = reply.send(disc.stats()); }
                        Some(Command::Heartbeat(reply)) => {
                            let _ = reply.send(disc.heartbeat().map_err(|e| e.to_string()));
                        }
                        Some(Command::HeartbeatStats(reply)) => {
                            let _ = reply.send(disc.heartbeat_stats());
                        }
                        Some(Command::Send { peer, fp, reply }) => {
                            let r = client.send(peer, &fp, &Msg::RequestSlot { from: node_id.clone() }).await;
                            let _ = reply.send(r);
                        }
                        Some(Command::Capture { peer, fp, reply }) => {
                            let r = async {
                                let nonce = client.nonce(peer, &fp).await?;
                                let req = client.sign_message(peer, &nonce, &Msg::RequestSlot { from: node_id.clone() })?;
                                client.send_signed::<serde_json::Value>(peer, &fp, &req).await?;
                                Ok(req)
                            }.await;
                            let _ = reply.send(r);
                        }
                        Some(Command::Replay { peer, fp, req, reply }) => {
                            let _ = reply.send(client.send_signed(peer, &fp, &req).await);
                        }
                    },
                }
            }
            let stats = disc.stats();
            disc.shutdown();
            coord.shutdown();
            Ok(stats)
        })
    });
    let (fp, announced) = match ready_rx.recv_timeout(STEP_TIMEOUT) {
        Ok(Note::Ready { fp, announced, .. }) => (fp, announced),
        _ => (String::new(), Instant::now()),
    };
    Agent {
        id,
        addr: IpAddr::V4(host.addr),
        fp,
        announced,
        tx,
        join: Some(join),
    }
}

fn figures(mut v: Vec<Duration>) -> String {
    v.sort();
    if v.is_empty() {
        return "no samples".into();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms over {} (observer, peer) pairs",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

/// Waits for peer events until `done` says so; returns false on timeout.
fn pump(
    notes: &std_mpsc::Receiver<Note>,
    log: &mut Vec<(usize, Instant, PeerEvent)>,
    mut done: impl FnMut(&[(usize, Instant, PeerEvent)]) -> bool,
) -> bool {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done(log) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match notes.recv_timeout(left) {
            Ok(Note::Peer { idx, at, ev }) => log.push((idx, at, ev)),
            Ok(Note::Ready { .. }) => {}
            Err(_) => return false,
        }
    }
    true
}

/// A private D-Bus system bus + avahi-daemon inside `host`; never touches the host's bus.
struct Avahi {
    dir: tempfile::TempDir,
    _dbus: tokio::process::Child,
    _daemon: tokio::process::Child,
    host: Host,
}

impl Avahi {
    fn start(host: &Host) -> Result<Avahi> {
        let dir = tempfile::tempdir()?;
        let bus = dir.path().join("bus");
        std::fs::write(
            dir.path().join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                bus.display()
            ),
        )?;
        std::fs::write(
            dir.path().join("avahi.conf"),
            "[server]\nhost-name=observer\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=eth0\n\
             enable-dbus=yes\n[wide-area]\nenable-wide-area=no\n",
        )?;
        let log = |name: &str| std::fs::File::create(dir.path().join(name));
        let dbus = Cmd::new("dbus-daemon", Duration::from_secs(60))
            .arg(format!(
                "--config-file={}",
                dir.path().join("bus.conf").display()
            ))
            .args(["--nofork", "--nopidfile"])
            .spawn_with(log("dbus.out")?, log("dbus.err")?)
            .context("starting a private dbus-daemon (Debian package dbus-daemon)")?;
        let t0 = Instant::now();
        while !bus.exists() {
            ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "dbus-daemon did not create {}",
                bus.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // `ip netns exec` gives the daemon a private mount namespace: a tmpfs on /run there
        // holds avahi's pid file and socket without touching the machine's /run.
        let daemon = host
            .cmd("sh", Duration::from_secs(60))
            .args([
                "-c",
                &format!(
                    "mount -t tmpfs tmpfs /run && mkdir -p /run/avahi-daemon && \
                     DBUS_SYSTEM_BUS_ADDRESS=unix:path={} exec avahi-daemon -f {} --no-drop-root --no-chroot",
                    bus.display(),
                    dir.path().join("avahi.conf").display()
                ),
            ])
            .spawn_with(log("avahi.out")?, log("avahi.err")?)
            .context("starting avahi-daemon (Debian package avahi-daemon)")?;
        let a = Avahi {
            dir,
            _dbus: dbus,
            _daemon: daemon,
            host: host.clone(),
        };
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(a.dir.path().join("avahi.err")).unwrap_or_default()
                + &std::fs::read_to_string(a.dir.path().join("avahi.out")).unwrap_or_default();
            if text.contains("Server startup complete") {
                return Ok(a);
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "avahi-daemon did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `avahi-publish -s NAME _rackseed._tcp PORT TXT...` until the returned child is dropped.
    fn publish(&self, name: &str, txt: &[String]) -> Result<tokio::process::Child> {
        let bus = format!(
            "DBUS_SYSTEM_BUS_ADDRESS=unix:path={}",
            self.dir.path().join("bus").display()
        );
        let err = std::fs::File::create(self.dir.path().join(format!("publish-{name}.err")))?;
        Ok(self
            .host
            .cmd("env", Duration::from_secs(60))
            .arg(bus)
            .args([
                "avahi-publish",
                "-s",
                name,
                "_rackseed._tcp",
                &PORT.to_string(),
            ])
            .args(txt)
            .spawn_with(std::process::Stdio::null(), err)?)
    }

    /// Browses until every agent in `expect` resolves with its address, the port, the
    /// cluster tag and `a.phase=<phase>`, and the stranger resolves too. By instance name.
    fn browse_until(
        &self,
        expect: &[(String, IpAddr)],
        tag: &str,
        phase: &str,
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let t0 = Instant::now();
        loop {
            let by_name: BTreeMap<String, Vec<String>> = self
                .browse()?
                .into_iter()
                .filter(|l| l.len() >= 10)
                .map(|l| (l[3].clone(), l))
                .collect();
            let complete = expect.iter().all(|(id, addr)| {
                by_name.get(id).is_some_and(|l| {
                    let txt = txt_strings(&l[9]);
                    l[7] == addr.to_string()
                        && l[8] == PORT.to_string()
                        && txt.contains(&format!("c={tag}"))
                        && txt.contains(&format!("a.phase={phase}"))
                })
            }) && by_name.contains_key("stranger");
            if complete {
                return Ok(by_name);
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "avahi-browse did not resolve every node in phase {phase}: {by_name:#?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `avahi-browse -rpt _rackseed._tcp`, resolved lines (`=`), IPv4 only.
    fn browse(&self) -> Result<Vec<Vec<String>>> {
        let out = self
            .host
            .cmd("env", Duration::from_secs(20))
            .arg(format!(
                "DBUS_SYSTEM_BUS_ADDRESS=unix:path={}",
                self.dir.path().join("bus").display()
            ))
            .args(["avahi-browse", "-rpt", "_rackseed._tcp"])
            .run_blocking()
            .context("running avahi-browse (Debian package avahi-utils)")?;
        Ok(out
            .stdout
            .lines()
            .filter(|l| l.starts_with("=;"))
            .map(|l| l.split(';').map(str::to_string).collect())
            .collect())
    }
}

/// The TXT strings of an `avahi-browse -p` line (`"k=v" "k=v"`; our values hold no quotes).
fn txt_strings(field: &str) -> Vec<String> {
    field
        .split("\" \"")
        .map(|t| t.trim_matches('"').to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Asks every agent for its stats until `ok` holds for all of them; false on timeout.
fn wait_stats(
    agents: &[Agent],
    ok: impl Fn(&DiscoveryStats) -> bool,
) -> Result<Vec<DiscoveryStats>> {
    let t0 = Instant::now();
    loop {
        let all: Vec<DiscoveryStats> = agents
            .iter()
            .map(|a| a.request(Command::Stats))
            .collect::<Result<_>>()?;
        if all.iter().all(&ok) || t0.elapsed() > STEP_TIMEOUT {
            return Ok(all);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agents_find_each_other_and_strangers_are_shut_out() -> Result<()> {
    let n: usize = std::env::var("RACKSEED_WIRE_NODES")
        .ok()
        .map(|v| v.parse().context("RACKSEED_WIRE_NODES must be a number"))
        .transpose()?
        .unwrap_or(5);
    ensure!(
        (3..=10).contains(&n),
        "RACKSEED_WIRE_NODES must be 3 to 10, not {n}"
    );
    let test_start = Instant::now();
    // Hosts 0..n: agents; n: a stranger with another secret; n+1: an avahi observer.
    let lab = Lab::new(n + 2)?;
    let _rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = _rt.enter();
    let secret = ClusterSecret::generate();
    let (notes_tx, notes) = std_mpsc::channel();
    // All but the last agent start together; the last one joins once they run, like a node
    // booted later.
    let mut agents: Vec<Agent> = (0..n - 1)
        .map(|i| {
            spawn_agent(
                lab.host(i),
                i,
                format!("node-{i}"),
                secret.clone(),
                notes_tx.clone(),
            )
        })
        .collect();
    let mut stranger = spawn_agent(
        lab.host(n),
        n,
        "stranger".into(),
        ClusterSecret::generate(),
        notes_tx.clone(),
    );
    ensure!(!stranger.fp.is_empty(), "the stranger did not start");
    let mut log = Vec::new();

    // 1. Every node sees every other (and no one sees the stranger).
    let all_seen = |m: usize| {
        move |log: &[(usize, Instant, PeerEvent)]| {
            (0..m).all(|i| {
                let seen: BTreeSet<&str> = log
                    .iter()
                    .filter_map(|(o, _, e)| match e {
                        PeerEvent::Seen(p) if *o == i => Some(p.node_id.as_str()),
                        _ => None,
                    })
                    .collect();
                seen.len() == m - 1
            })
        }
    };
    let ok = pump(&notes, &mut log, all_seen(n - 1));
    ensure!(
        ok,
        "the first {} nodes did not all see each other within {STEP_TIMEOUT:?}: {:?}",
        n - 1,
        log.iter().map(|(o, _, e)| (o, e)).collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(1500));
    agents.push(spawn_agent(
        lab.host(n - 1),
        n - 1,
        format!("node-{}", n - 1),
        secret.clone(),
        notes_tx.clone(),
    ));
    for a in &agents {
        ensure!(!a.fp.is_empty(), "agent {} did not start", a.id);
    }
    let ok = pump(&notes, &mut log, all_seen(n));
    ensure!(
        ok,
        "not every node saw every other within {STEP_TIMEOUT:?}: {:?}",
        log.iter().map(|(o, _, e)| (o, e)).collect::<Vec<_>>()
    );
    let late = &agents[n - 1];
    let (mut together, mut late_seen, mut late_finds) = (Vec::new(), Vec::new(), Vec::new());
    for (o, at, e) in &log {
        if let PeerEvent::Seen(p) = e {
            ensure!(p.node_id != "stranger", "node-{o} accepted the stranger");
            ensure!(*o < n, "the stranger accepted {}", p.node_id);
            let peer = agents
                .iter()
                .find(|a| a.id == p.node_id)
                .context("unknown peer")?;
            ensure!(
                p.addrs == vec![peer.addr],
                "{} seen at {:?}, not {}",
                p.node_id,
                p.addrs,
                peer.addr
            );
            ensure!(
                p.fingerprint == peer.fp && p.port == PORT,
                "{} pin or port wrong",
                p.node_id
            );
            ensure!(p.fields.get("phase").map(String::as_str) == Some("electing"));
            if p.node_id == late.id {
                late_seen.push(at.saturating_duration_since(late.announced));
            } else if *o == n - 1 {
                late_finds.push(at.saturating_duration_since(late.announced));
            } else {
                // Both running: from the later of the two announcements.
                let both = peer.announced.max(agents[*o].announced);
                together.push(at.saturating_duration_since(both));
            }
        }
    }

    // avahi-browse on a plain host of the same link resolves every node (and the stranger,
    // which is on the wire even though agents ignore it). Keep the last node's first record
    // to replay it later.
    let avahi = Avahi::start(lab.host(n + 1))?;
    let tag = secret.cluster_tag();
    let expect: Vec<(String, IpAddr)> = agents.iter().map(|a| (a.id.clone(), a.addr)).collect();
    let resolved = avahi.browse_until(&expect, &tag, "electing")?;
    println!(
        "avahi-browse -rpt _rackseed._tcp resolved {} services:",
        resolved.len()
    );
    for l in resolved.values() {
        println!("  {} -> {}:{} host {}", l[3], l[7], l[8], l[6]);
    }
    let old_record = txt_strings(&resolved[&agents[n - 1].id][9]);
    ensure!(old_record.contains(&"s=1".to_string()), "{old_record:?}");

    // 2. A phase change is re-announced and arrives as an update.
    let mut reannounced = HashMap::new();
    for a in &agents {
        reannounced.insert(a.id.clone(), Instant::now());
        a.tx.send(Command::Announce(vec![
            ("phase".into(), "joined".into()),
            ("prio".into(), "0".into()),
        ]))
        .ok()
        .context("agent gone")?;
    }
    let mark = log.len();
    let all_updated = |log: &[(usize, Instant, PeerEvent)]| {
        let got: BTreeSet<(usize, &str)> = log[mark..]
            .iter()
            .filter_map(|(o, _, e)| match e {
                PeerEvent::Updated(p) if p.fields["phase"] == "joined" => {
                    Some((*o, p.node_id.as_str()))
                }
                _ => None,
            })
            .collect();
        got.len() == n * (n - 1)
    };
    ensure!(
        pump(&notes, &mut log, all_updated),
        "phase change did not reach every node"
    );
    let mut update_latency = Vec::new();
    let mut counted = BTreeSet::new();
    for (o, at, e) in &log[mark..] {
        if let PeerEvent::Updated(p) = e {
            if p.fields["phase"] == "joined" && counted.insert((*o, p.node_id.clone())) {
                update_latency.push(at.saturating_duration_since(reannounced[&p.node_id]));
            }
        }
    }

    // 3. Coordinator: a member gets a reply; the stranger does not.
    let (a0_addr, a0_fp) = (SocketAddr::new(agents[0].addr, PORT), agents[0].fp.clone());
    let r = agents[1].request(|reply| Command::Send {
        peer: a0_addr,
        fp: a0_fp.clone(),
        reply,
    })??;
    ensure!(
        r == vec![Msg::Granted {
            to: "node-1".into()
        }],
        "unexpected reply {r:?}"
    );
    let e = stranger
        .request(|reply| Command::Send {
            peer: a0_addr,
            fp: a0_fp.clone(),
            reply,
        })?
        .err()
        .context("the stranger got a reply from a coordinator")?;
    ensure!(e.status() == Some(401), "stranger: {e}");

    // 4. A captured request replayed later (by anyone, here the stranger) is rejected.
    let captured = agents[2].request(|reply| Command::Capture {
        peer: a0_addr,
        fp: a0_fp.clone(),
        reply,
    })??;
    std::thread::sleep(Duration::from_millis(500));
    for who in [&agents[2], &stranger] {
        let e = who
            .request(|reply| Command::Replay {
                peer: a0_addr,
                fp: a0_fp.clone(),
                req: captured.clone(),
                reply,
            })?
            .err()
            .context("a replayed request was accepted")?;
        ensure!(
            e.status() == Some(401) && e.to_string().contains("nonce"),
            "replay: {e}"
        );
    }

    // 5. avahi sees the phase change too.
    avahi.browse_until(&expect, &tag, "joined")?;

    // 6. A node that shuts down is reported lost.
    let last = agents.len() - 1;
    let last_id = agents[last].id.clone();
    let last_stats = agents[last].stop()?;
    let mark = log.len();
    let lost_everywhere = |log: &[(usize, Instant, PeerEvent)]| {
        let got: BTreeSet<usize> = log[mark..]
            .iter()
            .filter_map(|(o, _, e)| {
                matches!(e, PeerEvent::Lost { node_id } if *node_id == last_id).then_some(*o)
            })
            .collect();
        got.len() == n - 1
    };
    ensure!(
        pump(&notes, &mut log, lost_everywhere),
        "{last_id}'s goodbye did not reach every node"
    );

    // 7. Forged records on the wire, published with avahi-publish from the observer:
    //    the last node's captured first record (an old seq), one with the real cluster tag
    //    but a wrong signature, one without a signature. All dropped, counted, never seen.
    let mark = log.len();
    let fake_fields = |id: &str| -> Vec<String> {
        vec![
            format!("v={PROTOCOL_VERSION}"),
            format!("c={tag}"),
            format!("id={id}"),
            format!("p={PORT}"),
            format!("fp={}", "ab".repeat(32)),
            "n=1".into(),
            format!("b={}", "12".repeat(8)),
            "s=1".into(),
            "a.phase=seed".into(),
        ]
    };
    let mut forged = fake_fields("forger");
    forged.push(format!("sig={}", "00".repeat(32)));
    let _pubs = [
        avahi.publish(&last_id, &old_record)?,
        avahi.publish("forger", &forged)?,
        avahi.publish("unsigned", &fake_fields("unsigned"))?,
    ];
    let remaining = &agents[..last];
    let st = wait_stats(remaining, |s| {
        s.replayed >= 1 && s.bad_signature >= 1 && s.missing_signature >= 1
    })?;
    for (i, s) in st.iter().enumerate() {
        ensure!(
            s.replayed >= 1 && s.bad_signature >= 1 && s.missing_signature >= 1,
            "agent {i} did not drop every forged record: {s:?}"
        );
    }
    while let Ok(note) = notes.try_recv() {
        if let Note::Peer { idx, at, ev } = note {
            log.push((idx, at, ev));
        }
    }
    for (o, _, e) in &log[mark..] {
        ensure!(
            !matches!(e, PeerEvent::Seen(_) | PeerEvent::Updated(_)),
            "node-{o} accepted a forged record: {e:?}"
        );
    }

    // 8. The stranger was on the wire and every agent dropped (and counted) its records;
    //    it never accepted ours either.
    let stranger_stats = stranger.stop()?;
    let mut all_stats = vec![last_stats];
    for a in agents.iter_mut().take(last) {
        all_stats.push(a.stop()?);
    }
    for (i, st) in all_stats.iter().enumerate() {
        ensure!(
            st.wrong_cluster >= 1,
            "agent {i} did not count the stranger: {st:?}"
        );
        ensure!(st.malformed == 0, "agent {i}: {st:?}");
        ensure!(st.accepted >= (n - 1) as u64, "agent {i}: {st:?}");
    }
    ensure!(
        stranger_stats.accepted == 0 && stranger_stats.wrong_cluster >= (n - 1) as u64,
        "stranger: {stranger_stats:?}"
    );

    println!("discovery with {n} agents in network namespaces (run with --nocapture to see this):");
    println!(
        "  late node's announce -> seen by running nodes:       {}",
        figures(late_seen)
    );
    println!(
        "  late node's start -> it has seen every running node: {}",
        figures(late_finds)
    );
    println!(
        "  re-announce (phase change) -> update seen:           {}",
        figures(update_latency)
    );
    println!(
        "  nodes started within one second of each other:      {}",
        figures(together)
    );
    println!("  agent stats (node-0): {:?}", all_stats[1]);
    println!("  whole test: {:.1} s", test_start.elapsed().as_secs_f64());
    ensure!(
        test_start.elapsed() < Duration::from_secs(60),
        "test took over 60 s"
    );
    Ok(())
}

/// Phase changes in quick succession (while the first announcement is still probing) end with
/// every peer holding the latest fields.
#[test]
fn rapid_reannouncements_converge_on_the_latest() -> Result<()> {
    let lab = Lab::new(2)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let secret = ClusterSecret::generate();
    let (notes_tx, notes) = std_mpsc::channel();
    let mut a = spawn_agent(
        lab.host(0),
        0,
        "node-a".into(),
        secret.clone(),
        notes_tx.clone(),
    );
    let mut b = spawn_agent(lab.host(1), 1, "node-b".into(), secret, notes_tx);
    ensure!(!a.fp.is_empty() && !b.fp.is_empty(), "agents did not start");
    for phase in ["claiming", "seeding", "joined"] {
        a.tx.send(Command::Announce(vec![("phase".into(), phase.into())]))
            .ok()
            .context("agent gone")?;
    }
    let mut log = Vec::new();
    let latest = |log: &[(usize, Instant, PeerEvent)]| {
        log.iter().rev().find_map(|(o, _, e)| match e {
            PeerEvent::Seen(p) | PeerEvent::Updated(p) if *o == 1 => {
                Some(p.fields.get("phase").cloned().unwrap_or_default())
            }
            _ => None,
        })
    };
    let ok = pump(&notes, &mut log, |l| latest(l).as_deref() == Some("joined"));
    ensure!(ok, "node-b ended with phase {:?}, not joined", latest(&log));
    // Nothing older may arrive afterwards and win.
    std::thread::sleep(Duration::from_secs(2));
    while let Ok(note) = notes.try_recv() {
        if let Note::Peer { idx, at, ev } = note {
            log.push((idx, at, ev));
        }
    }
    ensure!(
        latest(&log).as_deref() == Some("joined"),
        "regressed to {:?}",
        latest(&log)
    );
    let sb = b.stop()?;
    a.stop()?;
    println!("rapid re-announce: node-b stats {sb:?}");
    ensure!(sb.bad_signature == 0 && sb.malformed == 0, "{sb:?}");
    Ok(())
}

/// Direct heartbeats between two namespaces: once node-b has verified node-a's record, each
/// heartbeat node-a sends reaches node-b as a refresh of that record (same fields), counted,
/// with no mDNS announcement in between.
#[test]
fn direct_heartbeats_refresh_a_verified_peer() -> Result<()> {
    let lab = Lab::new(2)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let secret = ClusterSecret::generate();
    let (notes_tx, notes) = std_mpsc::channel();
    let mut a = spawn_agent(
        lab.host(0),
        0,
        "node-a".into(),
        secret.clone(),
        notes_tx.clone(),
    );
    let mut b = spawn_agent(lab.host(1), 1, "node-b".into(), secret, notes_tx);
    ensure!(!a.fp.is_empty() && !b.fp.is_empty(), "agents did not start");
    let mut log = Vec::new();
    let seen = |log: &[(usize, Instant, PeerEvent)], o: usize, id: &str| {
        log.iter()
            .any(|(i, _, e)| *i == o && matches!(e, PeerEvent::Seen(p) if p.node_id == id))
    };
    ensure!(
        pump(&notes, &mut log, |l| seen(l, 0, "node-b")
            && seen(l, 1, "node-a")),
        "the agents did not see each other"
    );
    // Let the second copy of each announcement (a second later) pass first.
    std::thread::sleep(Duration::from_millis(1500));
    while notes.try_recv().is_ok() {}
    let mdns_before = b.request(Command::Stats)?.accepted;
    let mut refreshes = Vec::new();
    for _ in 0..3 {
        let sent = a.request(Command::Heartbeat)?.map_err(anyhow::Error::msg)?;
        ensure!(sent == 1, "heartbeat went to {sent} peers, not 1");
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "no refresh of node-a at node-b");
            if let Ok(Note::Peer { idx: 1, ev, .. }) = notes.recv_timeout(left) {
                refreshes.push(ev);
                break;
            }
        }
    }
    for ev in &refreshes {
        ensure!(
            matches!(ev, PeerEvent::Updated(p) if p.node_id == "node-a" && p.fields["phase"] == "electing"),
            "unexpected event {ev:?}"
        );
    }
    let hb = b.request(Command::HeartbeatStats)?;
    ensure!(
        hb.accepted == 3 && hb.rejected == 0 && hb.replayed == 0 && hb.unmatched == 0,
        "node-b heartbeat stats {hb:?}"
    );
    ensure!(
        b.request(Command::Stats)?.accepted == mdns_before,
        "an mDNS record arrived: the refreshes were not the heartbeats"
    );
    let ha = a.request(Command::HeartbeatStats)?;
    ensure!(
        ha.sent == 3 && ha.send_errors == 0,
        "node-a heartbeat stats {ha:?}"
    );
    b.stop()?;
    a.stop()?;
    Ok(())
}
