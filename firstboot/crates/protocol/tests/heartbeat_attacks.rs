//! Attacks on direct heartbeats (`rackseed_protocol::discovery::heartbeat`) from a rogue host on
//! the same bridge, each lab host in its own network namespace (netns-lab). Needs root; fails
//! loudly without it.
//!
//! The trust rules under attack (heartbeat.rs module docs): a heartbeat counts only when it is
//! signed with the heartbeat key derived from the cluster secret, names a peer already verified
//! through its mDNS record, belongs to that record's boot, port and fingerprint, and is newer
//! than every heartbeat of that boot seen before (its own replay guard); it refreshes the peer
//! with the fields of its latest record and never changes them (addresses included). Anything
//! else is counted ([`HeartbeatStats`]) and logged once per (source, reason), at most 256 lines.
//!
//! Each lab: host 0 runs `node-a` (the sender), host 1 `node-b` (the observer whose view is
//! attacked), host 2 a third member, host 3 the rogue (no secret). The rogue's recordings are
//! the datagrams `node-a` sends `node-b`, taken off the wire by a packet socket in `node-b`'s
//! namespace (what a listener on a hub, a mirror port or behind an ARP spoof hears): a
//! heartbeat names its receiver and the receiver's boot under its signature, so only those are
//! worth replaying to `node-b` (the third member's copies are addressed to it, and are refused
//! by `node-b` as replays: the flood sends those too). "Last seen" is what the formation
//! core derives from discovery's events: every `Seen`/`Updated` of a peer refreshes it, so an
//! attack that moves it shows up as such an event at `node-b`. Each test first shows that the
//! observer does report a genuine heartbeat, so a quiet observer is no accident.
//!
//! The last test (`recorded_heartbeats_never_refresh_a_dead_member_at_a_restarted_observer`)
//! found that the replay guard, which lives only in memory, let a recording of a dead member's
//! last mDNS announcement and heartbeats refresh that member once per recorded heartbeat at an
//! observer that restarted since; heartbeats now name their receiver's boot (heartbeat.rs).
//!
//! Bounded: five labs, at most 20,000 + a few hundred datagrams, each wait at most 15 s.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netns_lab::{faults, Host, Lab};
use rackseed_protocol::discovery::heartbeat::{self, MAGIC, MAX_DATAGRAM};
use rackseed_protocol::discovery::record::{self, RecordHeader, Rejection};
use rackseed_protocol::discovery::{
    Discovery, DiscoveryConfig, HeartbeatStats, InterfaceChoice, Peer, PeerEvent,
};
use rackseed_protocol::secret::{ClusterSecret, Keyring};
use tokio::sync::mpsc;

const PORT: u16 = 7443;
const STEP: Duration = Duration::from_secs(15);
/// How long the observer is watched for a (wrong) refresh after an attack's last datagram was
/// counted. Datagrams are handled in arrival order, so by then every event they caused is out.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Counting the receiver's warnings (one global subscriber; each lab's threads carry its label).

#[derive(Default)]
struct WarnCounter(Mutex<HashMap<String, u64>>);

static WARNINGS: OnceLock<Arc<WarnCounter>> = OnceLock::new();

struct Counting(Arc<WarnCounter>);

struct MessageOf(String);

impl tracing::field::Visit for MessageOf {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Counting {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut m = MessageOf(String::new());
        e.record(&mut m);
        if m.0.starts_with("ignoring heartbeat datagram") {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            *self.0 .0.lock().unwrap().entry(thread).or_default() += 1;
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn warn_counter() -> Arc<WarnCounter> {
    WARNINGS
        .get_or_init(|| {
            let c = Arc::new(WarnCounter::default());
            tracing::subscriber::set_global_default(Counting(c.clone()))
                .expect("no other global subscriber in this test binary");
            c
        })
        .clone()
}

/// Heartbeat warnings logged so far on the runtime threads named `thread`.
fn warnings_on(thread: &str) -> u64 {
    warn_counter()
        .0
        .lock()
        .unwrap()
        .get(thread)
        .copied()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Members: a real discovery on a lab host, driven through commands.

enum Ask {
    Beat(std_mpsc::Sender<Result<usize, String>>),
    Stats(std_mpsc::Sender<HeartbeatStats>),
    Peers(std_mpsc::Sender<Vec<Peer>>),
    Announce(std_mpsc::Sender<Result<(), String>>),
    Stop,
}

struct Member {
    id: String,
    addr: Ipv4Addr,
    fp: String,
    boot: String,
    boot_counter: u64,
    /// The name of its runtime's threads (where its receiver logs).
    thread: String,
    tx: mpsc::UnboundedSender<Ask>,
    events: std_mpsc::Receiver<(Instant, PeerEvent)>,
    join: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.tx.send(Ask::Stop);
    }
}

impl Member {
    fn start(
        host: &Host,
        label: &str,
        id: &str,
        secret: &ClusterSecret,
        heartbeats: bool,
    ) -> Result<Member> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Ask>();
        let (ev_tx, events) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = format!("{label}-{id}");
        let fp = format!("{:02x}", host.index + 1).repeat(32);
        let (node_id, secret, fp2, tname) =
            (id.to_string(), secret.clone(), fp.clone(), thread.clone());
        let join = host.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(tname)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut cfg = DiscoveryConfig::new(secret, &node_id, PORT, &fp2);
                cfg.interfaces = InterfaceChoice::Named(vec!["eth0".into()]);
                cfg.heartbeats = heartbeats;
                let (disc, mut peers) = Discovery::start(cfg)?;
                disc.announce(vec![("phase".into(), "member".into())])?;
                let _ = ready_tx.send((disc.boot_id().to_string(), disc.boot_counter()));
                loop {
                    tokio::select! {
                        ev = peers.recv() => match ev {
                            Some(ev) => { let _ = ev_tx.send((Instant::now(), ev)); }
                            None => bail!("discovery of {node_id} stopped by itself"),
                        },
                        ask = rx.recv() => match ask {
                            None | Some(Ask::Stop) => break,
                            Some(Ask::Beat(r)) => { let _ = r.send(disc.heartbeat().map_err(|e| e.to_string())); }
                            Some(Ask::Stats(r)) => { let _ = r.send(disc.heartbeat_stats()); }
                            Some(Ask::Peers(r)) => { let _ = r.send(disc.peers()); }
                            Some(Ask::Announce(r)) => {
                                let fields = vec![("phase".into(), "member".into())];
                                let _ = r.send(disc.announce(fields).map_err(|e| e.to_string()));
                            }
                        },
                    }
                }
                disc.shutdown();
                Ok(())
            })
        });
        let (boot, boot_counter) = ready_rx
            .recv_timeout(STEP)
            .with_context(|| format!("{id} did not start"))?;
        Ok(Member {
            id: id.to_string(),
            addr: host.addr,
            fp,
            boot,
            boot_counter,
            thread,
            tx,
            events,
            join: Some(join),
        })
    }

    fn ask<T>(&self, make: impl FnOnce(std_mpsc::Sender<T>) -> Ask) -> Result<T> {
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("{} is gone", self.id))?;
        rx.recv_timeout(STEP)
            .with_context(|| format!("{} did not answer", self.id))
    }

    /// One direct heartbeat; how many peers it went to.
    fn beat(&self) -> Result<usize> {
        self.ask(Ask::Beat)?.map_err(anyhow::Error::msg)
    }

    fn stats(&self) -> Result<HeartbeatStats> {
        self.ask(Ask::Stats)
    }

    fn peer(&self, id: &str) -> Result<Peer> {
        self.ask(Ask::Peers)?
            .into_iter()
            .find(|p| p.node_id == id)
            .with_context(|| format!("{} does not know {id}", self.id))
    }

    /// Stops it (goodbye packets); fails if its thread failed or panicked.
    fn stop(&mut self) -> Result<()> {
        let _ = self.tx.send(Ask::Stop);
        self.join
            .take()
            .context("already stopped")?
            .join()
            .map_err(|_| anyhow::anyhow!("{} panicked", self.id))?
    }

    /// Events until `done` holds for one (returned) or `STEP` passes (error).
    fn wait_event(&self, what: &str, done: impl Fn(&PeerEvent) -> bool) -> Result<PeerEvent> {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((_, ev)) if done(&ev) => return Ok(ev),
                Ok(_) => {}
                Err(_) => bail!("{}: no {what} within {STEP:?}", self.id),
            }
        }
    }

    /// Every event that arrives within `window`.
    fn events_for(&self, window: Duration) -> Vec<(Instant, PeerEvent)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(e) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(e);
        }
        out
    }

    fn drain(&self) {
        while self.events.try_recv().is_ok() {}
    }

    /// Waits until its heartbeat counters satisfy `done`; the last ones seen either way.
    fn wait_stats(&self, done: impl Fn(&HeartbeatStats) -> bool) -> Result<HeartbeatStats> {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.stats()?;
            if done(&s) {
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "{}: heartbeat stats stuck at {s:?}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A heartbeat header with this member's signed fields and `tag` (node-a's real boot).
    fn header(&self, tag: &str, seq: u64) -> RecordHeader {
        RecordHeader {
            cluster_tag: tag.to_string(),
            node_id: self.id.clone(),
            port: PORT,
            fingerprint: self.fp.clone(),
            boot_counter: self.boot_counter,
            boot: self.boot.clone(),
            seq,
        }
    }
}

fn refreshes(evs: &[(Instant, PeerEvent)], id: &str) -> Vec<PeerEvent> {
    evs.iter()
        .filter(|(_, e)| matches!(e, PeerEvent::Seen(p) | PeerEvent::Updated(p) if p.node_id == id))
        .map(|(_, e)| e.clone())
        .collect()
}

fn is_refresh_of(e: &PeerEvent, id: &str) -> bool {
    matches!(e, PeerEvent::Seen(p) | PeerEvent::Updated(p) if p.node_id == id)
}

// ---------------------------------------------------------------------------------------------
// The lab.

struct Scene {
    lab: Lab,
    secret: ClusterSecret,
    a: Member,
    b: Member,
    _tap_member: Member,
    tap: std_mpsc::Receiver<Vec<u8>>,
    tap_stop: Arc<AtomicBool>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.tap_stop.store(true, Ordering::Relaxed);
    }
}

impl Scene {
    fn new(label: &str) -> Result<Scene> {
        warn_counter();
        let lab = Lab::new(4)?;
        let secret = ClusterSecret::generate();
        // The tap's socket first, so it holds the port before node-a learns of the tap.
        let (tap_tx, tap) = std_mpsc::channel();
        let (bound_tx, bound_rx) = std_mpsc::channel();
        let tap_stop = Arc::new(AtomicBool::new(false));
        let stop = tap_stop.clone();
        let _tap_thread = lab.host(2).spawn_thread(move || {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = bound_tx.send(());
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.recv_from(&mut buf);
            }
            Ok(())
        });
        bound_rx
            .recv_timeout(STEP)
            .context("the tap could not bind its UDP port")?;
        wire_capture(lab.host(1), lab.host(0).addr, tap_tx, tap_stop.clone())?;
        let a = Member::start(lab.host(0), label, "node-a", &secret, true)?;
        let b = Member::start(lab.host(1), label, "node-b", &secret, true)?;
        let tap_member = Member::start(lab.host(2), label, "tap", &secret, false)?;
        b.wait_event(
            "node-a's record",
            |e| matches!(e, PeerEvent::Seen(p) if p.node_id == "node-a"),
        )?;
        // node-a must know both peers before its heartbeats reach both.
        let deadline = Instant::now() + STEP;
        loop {
            let ids: BTreeSet<String> = a.ask(Ask::Peers)?.into_iter().map(|p| p.node_id).collect();
            if ids.contains("node-b") && ids.contains("tap") {
                break;
            }
            ensure!(Instant::now() < deadline, "node-a knows only {ids:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let the second copy of each announcement (a second later) pass first.
        std::thread::sleep(Duration::from_millis(1500));
        b.drain();
        Ok(Scene {
            lab,
            secret,
            a,
            b,
            _tap_member: tap_member,
            tap,
            tap_stop,
        })
    }

    fn rogue(&self) -> &Host {
        self.lab.host(3)
    }

    fn b_port(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.b.addr), PORT)
    }

    fn tag(&self) -> String {
        self.secret.cluster_tag()
    }

    /// node-a sends one genuine heartbeat; node-b reports the refresh (returned) and the tap
    /// hands over its wire bytes (returned), checked to be node-a's.
    fn genuine(&self) -> Result<(PeerEvent, Vec<u8>)> {
        ensure!(
            self.a.beat()? == 2,
            "node-a's heartbeat did not go to both peers"
        );
        let ev = self
            .b
            .wait_event("refresh of node-a", |e| is_refresh_of(e, "node-a"))?;
        let wire = self
            .tap
            .recv_timeout(STEP)
            .context("the tap captured no heartbeat")?;
        let (h, to) = heartbeat::decode(&Keyring::new(self.secret.clone()), Instant::now(), &wire)
            .map_err(|r| anyhow::anyhow!("captured datagram does not verify: {}", r.as_str()))?;
        ensure!(
            h.node_id == "node-a" && to.node_id == "node-b" && to.boot == self.b.boot,
            "captured {h:?} for {to:?}"
        );
        Ok((ev, wire))
    }
}

/// Records, in `host`'s namespace, the UDP payloads `from` sends to port [`PORT`] there, with a
/// packet socket (ETH_P_ALL: it sees a packet before any ingress filter drops it, as a mirror
/// port would): the rogue's recording of the heartbeats meant for that host.
fn wire_capture(
    host: &Host,
    from: Ipv4Addr,
    out: std_mpsc::Sender<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    use nix::sys::socket::{
        recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd;
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let _thread = host.spawn_thread(move || {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::empty(),
            SockProtocol::EthAll,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                continue;
            };
            // An IPv4 packet (the link header is gone on a datagram packet socket).
            let p = &buf[..n];
            if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
                continue;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if total < ihl + 8 || Ipv4Addr::new(p[12], p[13], p[14], p[15]) != from {
                continue;
            }
            if u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) != PORT {
                continue;
            }
            if out.send(p[ihl + 8..total].to_vec()).is_err() {
                break;
            }
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(STEP)
        .context("the wire capture did not start (a packet socket needs root)")?;
    Ok(())
}

/// Extra addresses on the rogue's eth0 (forged sources).
fn add_addrs(host: &Host, addrs: &[Ipv4Addr]) -> Result<()> {
    let batch: String = addrs
        .iter()
        .map(|a| format!("addr add {a}/24 dev eth0\n"))
        .collect();
    host.cmd("ip", STEP)
        .args(["-batch", "-"])
        .stdin_bytes(batch.into_bytes())
        .run_blocking()
        .context("adding the rogue's forged addresses")?;
    Ok(())
}

/// The rogue sends `datagrams` to `to`, the i-th from `sources[i % len]` (its own address when
/// empty), pausing a millisecond every `burst`. How many the kernel took.
fn rogue_send(
    host: &Host,
    sources: Vec<Ipv4Addr>,
    to: SocketAddr,
    datagrams: Vec<Vec<u8>>,
    burst: usize,
) -> Result<usize> {
    host.spawn_thread(move || {
        let socks: Vec<UdpSocket> = if sources.is_empty() {
            vec![UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?]
        } else {
            sources
                .iter()
                .map(|s| UdpSocket::bind((*s, 0)))
                .collect::<std::io::Result<_>>()?
        };
        let mut sent = 0;
        for (i, d) in datagrams.iter().enumerate() {
            if socks[i % socks.len()].send_to(d, to).is_ok() {
                sent += 1;
            }
            if (i + 1) % burst == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the rogue's sender panicked"))?
}

/// UDP receive-buffer drops so far in `host`'s namespace (`RcvbufErrors` of /proc/net/snmp).
fn udp_rcvbuf_errors(host: &Host) -> Result<u64> {
    let out = host
        .cmd("cat", STEP)
        .arg("/proc/net/snmp")
        .output_blocking()
        .context("reading /proc/net/snmp")?;
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .collect();
    ensure!(lines.len() >= 2, "no Udp lines in /proc/net/snmp");
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    let i = names
        .iter()
        .position(|n| *n == "RcvbufErrors")
        .context("no RcvbufErrors column")?;
    Ok(values[i].parse()?)
}

/// A datagram in the heartbeat wire format with these `key=value` lines.
fn wire(lines: &[(String, String)]) -> Vec<u8> {
    let mut out = format!("{MAGIC}\n");
    for (k, v) in lines {
        out.push_str(&format!("{k}={v}\n"));
    }
    out.into_bytes()
}

fn lines_of(d: &[u8]) -> Vec<(String, String)> {
    std::str::from_utf8(d)
        .expect("an encoded heartbeat is text")
        .lines()
        .skip(1)
        .map(|l| {
            let (k, v) = l.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// What a rogue without the secret can make for `header`: the real cluster tag signed with a
/// key of its own, an all-zero signature, none at all, another cluster's properly signed
/// heartbeat, and the peer's genuine mDNS record (heard on the wire) dressed as a heartbeat.
fn forgeries(
    secret: &ClusterSecret,
    header: &RecordHeader,
    to: &heartbeat::Addressee,
) -> Vec<(&'static str, Vec<u8>)> {
    let other = ClusterSecret::generate();
    let own_key = heartbeat::encode(&other.announcement_key(), header, to).expect("encodes");
    let mut zero = lines_of(&own_key);
    zero.last_mut().expect("sig line").1 = "00".repeat(32);
    let mut unsigned = lines_of(&own_key);
    unsigned.retain(|(k, _)| k != "sig");
    let mut theirs = header.clone();
    theirs.cluster_tag = other.cluster_tag();
    let other_cluster = heartbeat::encode(&other.announcement_key(), &theirs, to).expect("encodes");
    let record = record::encode_record(
        &secret.announcement_key(),
        header,
        &[("phase".to_string(), "member".to_string())],
    )
    .expect("encodes");
    vec![
        ("real tag, rogue's key", own_key),
        ("zero signature", wire(&zero)),
        ("no signature", wire(&unsigned)),
        ("another cluster", other_cluster),
        ("mDNS record as heartbeat", wire(&record)),
    ]
}

// ---------------------------------------------------------------------------------------------
// 1. No secret.

/// Well-formed heartbeats for node-a's real boot, port and fingerprint, with sequence numbers
/// far ahead of the real ones, from a rogue without the secret: all rejected and counted,
/// node-a's last-seen at node-b never moves, its record unchanged; node-a's next genuine
/// heartbeat (numbered far below the forged ones) still counts.
#[test]
fn heartbeats_without_the_secret_are_ignored_and_counted() -> Result<()> {
    let s = Scene::new("nosecret")?;
    let (first, _) = s.genuine()?;
    let before = s.b.stats()?;
    let record_before = s.b.peer("node-a")?;
    let mut datagrams = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..50u64 {
        let to = heartbeat::Addressee {
            node_id: "node-b".into(),
            boot: s.b.boot.clone(),
        };
        for (kind, d) in forgeries(&s.secret, &s.a.header(&s.tag(), 1_000_000 + i), &to) {
            kinds.push(kind);
            datagrams.push(d);
        }
    }
    // Each kind is refused by the receiver's own check too (what node-b runs).
    let ring = Keyring::new(s.secret.clone());
    for (kind, d) in kinds.iter().zip(&datagrams).take(5) {
        ensure!(
            heartbeat::decode(&ring, Instant::now(), d).is_err(),
            "{kind} verifies"
        );
    }
    let n = datagrams.len() as u64;
    let sent = rogue_send(s.rogue(), Vec::new(), s.b_port(), datagrams, 20)? as u64;
    ensure!(sent == n, "the rogue sent {sent} of {n}");
    let after = s.b.wait_stats(|st| st.rejected >= before.rejected + n)?;
    let evs = s.b.events_for(QUIET);
    ensure!(
        refreshes(&evs, "node-a").is_empty(),
        "a forged heartbeat refreshed node-a: {evs:?}"
    );
    ensure!(
        after.rejected == before.rejected + n
            && after.accepted == before.accepted
            && after.replayed == before.replayed
            && after.unmatched == before.unmatched,
        "node-b counted {after:?} after {before:?} and {n} forgeries"
    );
    ensure!(
        s.b.peer("node-a")? == record_before,
        "node-a's record changed"
    );
    // The forged sequence numbers did not advance the replay guard: the next genuine
    // heartbeat, numbered 2, still refreshes node-a, with the same record.
    let (next, _) = s.genuine()?;
    ensure!(
        next == first,
        "refresh changed the record: {next:?} vs {first:?}"
    );
    ensure!(s.b.stats()?.accepted == before.accepted + 1);
    let warned = warnings_on(&s.b.thread);
    ensure!(
        (1..=5).contains(&warned),
        "node-b logged {warned} warnings for one source and five kinds (once per reason)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Replay.

/// Genuine heartbeats captured on the wire, replayed after node-a fell silent (as a crashed
/// node does) and again after it shut down (its record lost at node-b): counted as replays,
/// and node-a is never refreshed nor seen again, so a dead member still ages out.
#[test]
fn replayed_heartbeats_never_keep_a_dead_member_alive() -> Result<()> {
    let mut s = Scene::new("replay")?;
    let mut captured = Vec::new();
    for _ in 0..5 {
        captured.push(s.genuine()?.1);
        std::thread::sleep(Duration::from_millis(100));
    }
    let replays = |s: &Scene| -> Result<()> {
        let before = s.b.stats()?;
        let mut datagrams = Vec::new();
        for _ in 0..3 {
            datagrams.extend(captured.iter().cloned());
        }
        let n = datagrams.len() as u64;
        let sent = rogue_send(s.rogue(), Vec::new(), s.b_port(), datagrams, 5)? as u64;
        ensure!(sent == n, "the rogue sent {sent} of {n}");
        let after = s.b.wait_stats(|st| st.replayed >= before.replayed + n)?;
        let evs = s.b.events_for(QUIET);
        ensure!(
            refreshes(&evs, "node-a").is_empty(),
            "a replayed heartbeat refreshed node-a: {evs:?}"
        );
        ensure!(
            after.replayed == before.replayed + n
                && after.accepted == before.accepted
                && after.rejected == before.rejected,
            "node-b counted {after:?} after {before:?} and {n} replays"
        );
        Ok(())
    };
    // node-a silent (alive or crashed: node-b cannot tell).
    replays(&s)?;
    // node-a gone: its goodbye reaches node-b, then the replays.
    s.a.stop()?;
    s.b.wait_event(
        "node-a lost",
        |e| matches!(e, PeerEvent::Lost { node_id } if node_id == "node-a"),
    )?;
    replays(&s)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Forged source address.

/// node-a's genuine heartbeat relayed by the rogue from its own address and from a forged one:
/// a duplicate (counted as a replay) while node-b also hears node-a directly; and when node-a's
/// packets no longer reach node-b (a partition the rogue bridges), the relayed heartbeat is a
/// true, newer "node-a is alive" and counts, but node-a's address, port and fingerprint in
/// node-b's view stay node-a's own: a relay can never move where node-b reaches node-a.
#[test]
fn a_relayed_or_forged_source_never_changes_a_peers_address() -> Result<()> {
    let s = Scene::new("forged")?;
    let forged = Ipv4Addr::new(10, 231, 0, 77);
    add_addrs(s.rogue(), &[forged])?;
    let own_addr = vec![IpAddr::V4(s.a.addr)];
    let check_view = |ev: &PeerEvent| -> Result<()> {
        let (PeerEvent::Seen(p) | PeerEvent::Updated(p)) = ev else {
            bail!("not a refresh: {ev:?}");
        };
        ensure!(
            p.addrs == own_addr && p.port == PORT && p.fingerprint == s.a.fp,
            "node-a's view changed: {p:?}"
        );
        Ok(())
    };
    let (ev, captured) = s.genuine()?;
    check_view(&ev)?;
    let before = s.b.stats()?;
    let sources = vec![s.lab.host(3).addr, forged];
    let sent = rogue_send(
        s.rogue(),
        sources.clone(),
        s.b_port(),
        vec![captured.clone(); 4],
        4,
    )?;
    ensure!(sent == 4, "the rogue sent {sent} of 4");
    let after = s.b.wait_stats(|st| st.replayed >= before.replayed + 4)?;
    ensure!(after.accepted == before.accepted, "{after:?}");
    let evs = s.b.events_for(QUIET);
    ensure!(
        refreshes(&evs, "node-a").is_empty(),
        "relayed duplicate refreshed: {evs:?}"
    );
    ensure!(
        s.b.peer("node-a")?.addrs == own_addr,
        "node-a's address changed"
    );

    // node-b stops hearing node-a (packets from node-a's MAC dropped at node-b's input); the wire
    // capture still hears them and the rogue relays each heartbeat from the forged address.
    let blocked = faults::HostFaults {
        blocked_macs: vec![faults::mac(s.lab.host(0))?],
        ..Default::default()
    };
    faults::apply(s.lab.host(1), &blocked)?;
    let result = (|| -> Result<()> {
        for _ in 0..3 {
            ensure!(s.a.beat()? == 2, "node-a's heartbeat did not go out");
            let d = s
                .tap
                .recv_timeout(STEP)
                .context("the wire capture recorded nothing")?;
            // Nothing arrives directly.
            let direct = s.b.events_for(Duration::from_millis(300));
            ensure!(
                refreshes(&direct, "node-a").is_empty(),
                "the partition leaks: {direct:?}"
            );
            let sent = rogue_send(s.rogue(), vec![forged], s.b_port(), vec![d], 1)?;
            ensure!(sent == 1);
            let ev =
                s.b.wait_event("relayed refresh of node-a", |e| is_refresh_of(e, "node-a"))?;
            check_view(&ev)?;
            ensure!(
                s.b.peer("node-a")?.addrs == own_addr,
                "node-a's address changed"
            );
        }
        Ok(())
    })();
    faults::apply(s.lab.host(1), &faults::HostFaults::default())?;
    result?;
    let end = s.b.stats()?;
    ensure!(
        end.accepted == after.accepted + 3 && end.rejected == before.rejected,
        "{end:?}"
    );
    // Healed: node-a's own heartbeats count again, same view.
    let (ev, _) = s.genuine()?;
    check_view(&ev)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Flood.

const FLOOD: usize = 20_000;
/// node-a's heartbeat period during the flood (the agent's is a twelfth of the peer timeout,
/// 7.5 s by default; a shorter one makes the test stricter).
const PERIOD: Duration = Duration::from_millis(250);
/// Longest time node-b may go without a refresh of node-a during the flood: eight periods
/// (still under a third of the agent's real period), so a few genuine datagrams the kernel
/// drops when node-b's socket buffer is full (the flood's honest effect on a loaded 2-core
/// machine running a debug build: up to ~500 of 20,000 seen) are tolerated, but a receiver
/// that stalls or falls behind for good is not.
const MAX_GAP: Duration = Duration::from_secs(2);

/// Deterministic pseudo-random bytes (xorshift), so a failing flood can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// 20,000 datagrams at node-b's heartbeat port from 67 source addresses: garbage, empty,
/// oversized, truncated genuine ones, valid-looking ones with a wrong MAC (for node-a and for
/// thousands of made-up node ids), another cluster's, and captured genuine ones replayed.
/// node-b does not panic, counts every one, logs at most one line per (source, reason) and
/// 256 in all, adds no peer, never refreshes node-a from them, and node-a's genuine
/// heartbeat every 250 ms keeps refreshing it throughout.
#[test]
fn a_flood_is_counted_bounded_and_the_genuine_heartbeat_still_counts() -> Result<()> {
    let mut s = Scene::new("flood")?;
    // 67 sources (prime to the 8 kinds), so each sends every kind: more (source, reason)
    // pairs than the receiver logs.
    let sources: Vec<Ipv4Addr> = (100..167).map(|i| Ipv4Addr::new(10, 231, 0, i)).collect();
    add_addrs(s.rogue(), &sources)?;
    let (first, captured) = s.genuine()?;
    let ring = Keyring::new(s.secret.clone());
    let captured_header = heartbeat::decode(&ring, Instant::now(), &captured)
        .map_err(|r| anyhow::anyhow!("{}", r.as_str()))?;
    let to_b = captured_header.1.clone();
    let other = ClusterSecret::generate();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut datagrams = Vec::with_capacity(FLOOD);
    let mut expected_logs = HashSet::new();
    let (mut want_rejected, mut want_replayed) = (0u64, 0u64);
    for i in 0..FLOOD {
        let d = match i % 8 {
            0 => {
                let n = 1 + rng.below(600);
                rng.bytes(n)
            }
            1 => Vec::new(),
            2 => {
                let mut d = captured.clone();
                let n = MAX_DATAGRAM + 1 + rng.below(1000);
                d.resize(n, b'x');
                d
            }
            3 => {
                let n = rng.below(captured.len());
                captured[..n].to_vec()
            }
            4 => {
                let h = s.a.header(&s.tag(), rng.next() >> 1);
                heartbeat::encode(&other.announcement_key(), &h, &to_b).expect("encodes")
            }
            5 => {
                let mut h = s.a.header(&s.tag(), 1);
                h.node_id = format!("made-up-{i}");
                heartbeat::encode(&other.announcement_key(), &h, &to_b).expect("encodes")
            }
            6 => {
                let mut h = s.a.header(&other.cluster_tag(), 1 + i as u64);
                h.node_id = format!("stranger-{i}");
                heartbeat::encode(&other.announcement_key(), &h, &to_b).expect("encodes")
            }
            _ => captured.clone(),
        };
        match heartbeat::decode(&ring, Instant::now(), &d) {
            Err(r) => {
                want_rejected += 1;
                expected_logs.insert((sources[i % sources.len()], r));
            }
            Ok(h) => {
                // Only the captured heartbeat itself (or it without its final newline, which
                // says the same) verifies.
                ensure!(h == captured_header, "flood item {i} verifies as {h:?}");
                want_replayed += 1;
            }
        }
        datagrams.push(d);
    }
    let kinds: BTreeSet<&str> = expected_logs.iter().map(|(_, r)| r.as_str()).collect();
    ensure!(kinds.len() >= 4, "the flood covers only {kinds:?}");
    ensure!(!expected_logs.iter().any(|(_, r)| *r == Rejection::Replayed));

    let before = s.b.stats()?;
    let drops_before = udp_rcvbuf_errors(s.lab.host(1))?;
    let warned_before = warnings_on(&s.b.thread);
    let peers_before: BTreeSet<String> =
        s.b.ask(Ask::Peers)?
            .into_iter()
            .map(|p| p.node_id)
            .collect();
    s.b.drain();

    // node-a beats every PERIOD while the rogue floods (10 datagrams a millisecond at most).
    let flooding = Arc::new(AtomicBool::new(true));
    let rogue = {
        let (host, to, srcs, flag) = (
            s.rogue().clone(),
            s.b_port(),
            sources.clone(),
            flooding.clone(),
        );
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = rogue_send(&host, srcs, to, datagrams, 10);
            flag.store(false, Ordering::Relaxed);
            r.map(|n| (n, t0.elapsed()))
        })
    };
    let mut genuine = 0u64;
    let mut refresh_at = vec![Instant::now()];
    let mut bad = Vec::new();
    while flooding.load(Ordering::Relaxed) {
        let next = Instant::now() + PERIOD;
        ensure!(
            s.a.beat()? == 2,
            "node-a's heartbeat did not go out during the flood"
        );
        genuine += 1;
        for (at, e) in
            s.b.events_for(next.saturating_duration_since(Instant::now()))
        {
            if is_refresh_of(&e, "node-a") {
                refresh_at.push(at);
                if e != first {
                    bad.push(e);
                }
            } else {
                bad.push(e);
            }
        }
    }
    let (sent, took) = rogue
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    ensure!(sent == FLOOD, "the rogue's kernel took {sent} of {FLOOD}");
    // One more after the flood: it must count promptly.
    ensure!(s.a.beat()? == 2);
    genuine += 1;
    let ev =
        s.b.wait_event("refresh after the flood", |e| is_refresh_of(e, "node-a"))?;
    refresh_at.push(Instant::now());
    ensure!(ev == first, "the record changed: {ev:?}");
    ensure!(
        bad.is_empty(),
        "unexpected events during the flood: {bad:?}"
    );

    let drops = udp_rcvbuf_errors(s.lab.host(1))? - drops_before;
    let want = want_rejected + want_replayed + genuine;
    let after = s.b.wait_stats(|st| {
        st.rejected + st.replayed + st.accepted + drops
            >= before.rejected + before.replayed + before.accepted + want
    })?;
    let got = (after.rejected - before.rejected)
        + (after.replayed - before.replayed)
        + (after.accepted - before.accepted);
    ensure!(
        got <= want && got + drops >= want,
        "node-b counted {got} of {want} datagrams ({drops} dropped by its kernel): {after:?}"
    );
    ensure!(
        after.unmatched == before.unmatched,
        "flood items matched a peer: {after:?}"
    );
    ensure!(
        after.rejected - before.rejected <= want_rejected
            && after.replayed - before.replayed <= want_replayed
            && after.accepted - before.accepted <= genuine,
        "{after:?}"
    );
    if drops == 0 {
        ensure!(
            after.rejected - before.rejected == want_rejected
                && after.replayed - before.replayed == want_replayed
                && after.accepted - before.accepted == genuine,
            "{after:?}"
        );
    }
    let gap = refresh_at
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    ensure!(
        gap <= MAX_GAP,
        "node-b went {gap:?} without a refresh of node-a during the flood ({drops} kernel drops)"
    );
    let peers_after: BTreeSet<String> =
        s.b.ask(Ask::Peers)?
            .into_iter()
            .map(|p| p.node_id)
            .collect();
    ensure!(
        peers_after == peers_before,
        "peer table changed: {peers_after:?}"
    );
    // Logged once per (source, reason), 256 lines at most; the rest only counted.
    let warned = warnings_on(&s.b.thread) - warned_before;
    let cap = 256u64;
    ensure!(warned <= cap, "node-b logged {warned} warnings");
    ensure!(
        expected_logs.len() as u64 > cap + 32,
        "{} pairs",
        expected_logs.len()
    );
    // Every pair has dozens of datagrams, so kernel drops never remove one.
    {
        ensure!(
            warned == (expected_logs.len() as u64).min(cap),
            "node-b logged {warned} warnings for {} (source, reason) pairs",
            expected_logs.len()
        );
    }
    println!(
        "flood: {FLOOD} datagrams in {:.2} s from {} sources; node-b counted {got}/{want} \
         ({drops} kernel drops), {} genuine heartbeats, longest gap between refreshes {:.0} ms \
         (bound {} ms), {warned} warnings for {} (source, reason) pairs",
        took.as_secs_f64(),
        sources.len(),
        genuine,
        gap.as_secs_f64() * 1000.0,
        MAX_GAP.as_millis(),
        expected_logs.len()
    );
    // No panic anywhere: node-b's thread ends cleanly.
    s.b.stop()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Replay to an observer that restarted.

const MDNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251)), 5353);

/// The rogue listens on the mDNS group and keeps the packets that come from `from`.
fn mdns_capture(
    host: &Host,
    from: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<Vec<Vec<u8>>>>> {
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let me = host.addr;
    let join = host.spawn_thread(move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5353))?;
        sock.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 251), &me)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let _ = ready_tx.send(());
        let mut out = Vec::new();
        let mut buf = [0u8; 9000];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, src)) = sock.recv_from(&mut buf) {
                if src.ip() == IpAddr::V4(from) {
                    out.push(buf[..n].to_vec());
                }
            }
        }
        Ok(out)
    });
    ready_rx
        .recv_timeout(STEP)
        .context("the rogue could not join the mDNS group")?;
    Ok(join)
}

/// A dead member's wire traffic replayed to an observer that restarted since: the rogue
/// recorded node-a's last mDNS announcement (multicast, heard by every host) and its last
/// heartbeats to node-b (the wire capture), node-a shut down, node-b restarted (fresh replay guards). The
/// recorded announcement may make node-b see node-a once (the mDNS path's documented limit,
/// `a_replay_seen_first_after_a_restart_cannot_hide_the_live_node` in discovery/mod.rs), after
/// which a dead member ages out; the recorded heartbeats must not refresh it again, or the
/// rogue keeps a dead member alive for as many heartbeat periods as it recorded (11,520 a
/// day at the default 7.5 s), after every restart of every observer.
#[test]
fn recorded_heartbeats_never_refresh_a_dead_member_at_a_restarted_observer() -> Result<()> {
    let mut s = Scene::new("restart")?;
    let stop = Arc::new(AtomicBool::new(false));
    let capture = mdns_capture(s.rogue(), s.a.addr, stop.clone())?;
    s.a.ask(Ask::Announce)?.map_err(anyhow::Error::msg)?;
    s.b.wait_event("node-a's new record", |e| is_refresh_of(e, "node-a"))?;
    // mdns-sd repeats an announcement a second later.
    std::thread::sleep(Duration::from_millis(1500));
    let mut recorded = Vec::new();
    for _ in 0..10 {
        recorded.push(s.genuine()?.1);
    }
    stop.store(true, Ordering::Relaxed);
    let announcements = capture
        .join()
        .map_err(|_| anyhow::anyhow!("the capture panicked"))??;
    ensure!(
        !announcements.is_empty(),
        "the rogue heard no mDNS packet of node-a"
    );

    // node-a dies (goodbye); node-b restarts.
    s.a.stop()?;
    s.b.wait_event(
        "node-a lost",
        |e| matches!(e, PeerEvent::Lost { node_id } if node_id == "node-a"),
    )?;
    s.b.stop()?;
    s.b = Member::start(s.lab.host(1), "restart2", "node-b", &s.secret, true)?;
    let quiet = s.b.events_for(Duration::from_secs(2));
    ensure!(
        refreshes(&quiet, "node-a").is_empty(),
        "the restarted node-b saw the dead node-a before any replay: {quiet:?}"
    );

    // The rogue replays node-a's announcement from the mDNS port.
    let n = announcements.len();
    let sent = s
        .rogue()
        .spawn_thread(move || {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5353))?;
            let mut sent = 0;
            for p in &announcements {
                sent += usize::from(sock.send_to(p, MDNS).is_ok());
            }
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the mDNS replay panicked"))??;
    ensure!(sent == n, "replayed {sent} of {n} mDNS packets");
    let after_record = s.b.events_for(Duration::from_secs(2));
    let seen_once = refreshes(&after_record, "node-a");
    println!(
        "restart: the recorded mDNS announcement ({n} packets) gave the restarted node-b {} \
         event(s) for the dead node-a",
        seen_once.len()
    );
    ensure!(
        seen_once.len() <= 1,
        "one record, several refreshes: {after_record:?}"
    );

    // Then the recorded heartbeats, one by one.
    let before = s.b.stats()?;
    let mut revived = 0;
    for d in recorded {
        rogue_send(s.rogue(), Vec::new(), s.b_port(), vec![d], 1)?;
        revived += refreshes(&s.b.events_for(Duration::from_millis(200)), "node-a").len();
    }
    let after = s.b.stats()?;
    ensure!(
        revived == 0 && after.accepted == before.accepted,
        "recorded heartbeats refreshed the dead node-a {revived} times at the restarted \
         node-b (heartbeat stats {before:?} -> {after:?}): the replay guard lives in memory, so \
         after a restart only the record's boot, port and fingerprint bind a heartbeat, and a \
         recording of N heartbeats keeps a dead member alive for N periods"
    );
    Ok(())
}
