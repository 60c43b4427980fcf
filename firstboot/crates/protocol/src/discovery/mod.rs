//! mDNS discovery: advertises this node and browses its peers. The only module that imports
//! `mdns_sd`.
//!
//! [`Discovery::start`] registers a `_rackseed._tcp.local.` service whose instance name is the
//! node id, and browses the same type. Each TXT record is a signed [`record`] carrying the
//! formation core's application fields; every received record is verified (protocol version,
//! cluster tag, HMAC under the cluster's announcement key, field syntax, replay order) before it
//! becomes a [`PeerEvent`]. Anything else is dropped and counted in [`DiscoveryStats`], and
//! logged once per (instance, reason), never per packet. Our own announcements are ignored.
//!
//! Interfaces: [`InterfaceChoice::Auto`] uses every interface except loopback and
//! container/virtual ones ([`is_virtual_interface`]: `cni0`, `flannel.*`, `vxlan.*`, `cali*`,
//! `docker*`, `veth*`, `virbr*`, `cilium*`, `kube*`, `tun*`, `wg*`, `lxc*`, ...). mdns-sd rescans
//! interfaces every 5 s and re-applies our predicate each time, so interfaces MicroK8s creates
//! later stay excluded. [`InterfaceChoice::Named`] uses only the listed interfaces.
//! IPv6 is off by default (`ipv6: false`): MicroK8s joins use IPv4 literals, and link-local
//! IPv6 addresses would need a scope id to be usable; turn it on when the LAN is IPv6-only.
//!
//! Addresses (A/AAAA records) are not signed (a node has one per interface and mDNS carries
//! them in separate records). A forged address can at most point a client at a machine that
//! cannot present the pinned certificate, so the coordinator connection fails closed.
//! Likewise `Lost` comes from unsigned goodbye packets or TTL expiry: treat it as a hint.
//!
//! The peer table: discovery is the one place that keeps what the network says about each
//! verified peer (addresses, coordinator port and fingerprint, latest fields), by node id, also
//! after its record was lost (the pinned coordinator client may still reach it). The agent asks
//! it for addresses ([`Discovery::peer`], [`Discovery::peers`]) instead of keeping its own copy;
//! the formation core keeps only what is its own (each peer's announcement and liveness).
//! Node ids follow the one rule of [`rackseed_formation::NodeId`].
//!
//! Boots are ordered by a boot counter ([`advance_boot_counter`]): the agent raises it in its
//! state directory at each start and announces it signed, so a recording of an earlier boot
//! never hides the live one ([`record::ReplayGuard`]).
//!
//! Bounded memory under a flood of fake instances: mdns-sd caches every record of our service
//! type that reaches it and has no size limit of its own (its options bound names and packet
//! sizes, not the cache). The browser remembers at most [`MAX_PENDING`] instances it could not
//! verify; the next new one empties mdns-sd's cache of our type (`stop_browse` + `browse`,
//! counted in `cache_flushes`, the forgotten instances in `unverified_forgotten`), and verified
//! peers come back with the answers to the new query (same records: no event). mdns-sd ends a
//! subscription whose event channel (1000 events) fills up; the browser then browses again
//! (`browse_restarts`) instead of going deaf. The peer table holds at most [`MAX_PEERS`]
//! verified peers: at the limit a new peer takes the place of the longest-lost one, and is
//! refused (`peers_refused`) when every peer is present. Only holders of the cluster secret get
//! into the table at all, so a stranger can never evict a verified peer.
//!
//! Rotation: the keys come from a [`Keyring`] ([`DiscoveryConfig::keyring`], shared with the
//! coordinator). Announcements are signed with its current secret; a received record is
//! verified with the accepted secret whose cluster tag it carries, so during a rotation peers on
//! the old and on the new secret see each other, and afterwards a node left on the old secret
//! is dropped as `wrong_cluster`.
//!
//! To extend: new fixed fields go into [`record`]; new per-peer data the core needs goes into
//! the application fields, not here.

mod boot;
pub mod heartbeat;
pub mod record;

pub use boot::{advance_boot_counter, BOOT_COUNTER_FILE};
pub use heartbeat::{HeartbeatStats, MDNS_REFRESH};

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use crate::secret::{ClusterSecret, Keyring};
use rackseed_formation::NodeId;
use record::{Freshness, RecordHeader, Rejection, ReplayGuard};

/// Default service type.
pub const SERVICE_TYPE: &str = "_rackseed._tcp.local.";
/// Most instances the browser keeps that it could not verify (see the module docs).
pub const MAX_PENDING: usize = 256;
/// Most verified peers in the peer table (see the module docs).
pub const MAX_PEERS: usize = 256;

/// Which network interfaces discovery uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InterfaceChoice {
    /// Every interface except loopback and container/virtual ones.
    #[default]
    Auto,
    /// Only these interfaces (by name).
    Named(Vec<String>),
}

impl InterfaceChoice {
    /// Whether discovery uses the interface `name` (`loopback` tells whether it is one).
    pub fn wants(&self, name: &str, loopback: bool) -> bool {
        match self {
            InterfaceChoice::Auto => !loopback && !is_virtual_interface(name),
            InterfaceChoice::Named(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Interface name prefixes that never count as a node's own network: loopback, container
/// runtimes and CNIs (they appear once MicroK8s runs), bridges, tunnels. The one list for
/// discovery and for the agent's choice of its primary NIC.
const VIRTUAL_PREFIXES: &[&str] = &[
    "lo", "cni", "flannel", "vxlan", "cali", "docker", "veth", "virbr", "br-", "tun", "tap", "wg",
    "kube", "dummy", "cilium", "lxc", "weave", "genev", "ovn",
];

/// True for loopback, container and virtual interfaces.
pub fn is_virtual_interface(name: &str) -> bool {
    VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What [`Discovery::start`] needs.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub secret: ClusterSecret,
    /// This node's stable id (the rule of [`NodeId`]). Also the instance name.
    pub node_id: String,
    /// The coordinator's TCP port.
    pub port: u16,
    /// Hex SHA-256 of this node's coordinator certificate (DER), 64 lowercase hex characters.
    pub fingerprint: String,
    pub interfaces: InterfaceChoice,
    /// Also use IPv6 (off by default; see the module docs).
    pub ipv6: bool,
    /// Service type, normally [`SERVICE_TYPE`].
    pub service_type: String,
    /// This start's boot counter, announced signed: an agent sets it from
    /// [`advance_boot_counter`]; [`DiscoveryConfig::new`] sets 1 (a one-off process).
    pub boot_counter: u64,
    /// The keys to sign and verify with, shared with the coordinator so a secret rotation
    /// switches them at run time; `None` ([`DiscoveryConfig::new`]) means `secret` alone.
    pub keyring: Option<Arc<Keyring>>,
    /// Send and receive direct heartbeats ([`heartbeat`]) on UDP `port`; off in
    /// [`DiscoveryConfig::new`] (a workstation browsing the LAN needs none).
    pub heartbeats: bool,
}

impl DiscoveryConfig {
    pub fn new(secret: ClusterSecret, node_id: &str, port: u16, fingerprint: &str) -> Self {
        DiscoveryConfig {
            secret,
            node_id: node_id.to_string(),
            port,
            fingerprint: fingerprint.to_string(),
            interfaces: InterfaceChoice::Auto,
            ipv6: false,
            service_type: SERVICE_TYPE.to_string(),
            boot_counter: 1,
            keyring: None,
            heartbeats: false,
        }
    }
}

/// A verified peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: String,
    /// Addresses the peer's mDNS responder published (sorted; IPv4 only unless `ipv6`).
    pub addrs: Vec<IpAddr>,
    /// Coordinator port (signed).
    pub port: u16,
    /// Coordinator certificate fingerprint to pin (signed).
    pub fingerprint: String,
    /// The peer's application fields (signed).
    pub fields: BTreeMap<String, String>,
}

impl Peer {
    /// The address to reach the peer at: its first IPv4 address, else its first one. IPv4 is
    /// preferred because MicroK8s joins cannot use IPv6 seeds.
    pub fn preferred_addr(&self) -> Option<IpAddr> {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| self.addrs.first())
            .copied()
    }
}

/// What discovery tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer verified for the first time (or again after it was lost).
    Seen(Peer),
    /// A newer announcement or new addresses from a known peer.
    Updated(Peer),
    /// Its service went away (goodbye packet or TTL expiry). Unsigned: a hint only.
    Lost { node_id: String },
}

/// Counters of received records, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    pub accepted: u64,
    pub own: u64,
    pub wrong_version: u64,
    pub wrong_cluster: u64,
    pub missing_signature: u64,
    pub bad_signature: u64,
    pub malformed: u64,
    pub replayed: u64,
    pub own_id_conflict: u64,
    /// Unverified instances forgotten when the pending set was full (see the module docs).
    pub unverified_forgotten: u64,
    /// Times mdns-sd's cache of our service type was emptied because of them.
    pub cache_flushes: u64,
    /// Times mdns-sd ended our subscription (its event channel full) and we browsed again.
    pub browse_restarts: u64,
    /// Verified peers refused because the peer table was full of present peers.
    pub peers_refused: u64,
}

impl DiscoveryStats {
    fn count(&mut self, r: Rejection) {
        let c = match r {
            Rejection::WrongVersion => &mut self.wrong_version,
            Rejection::WrongCluster => &mut self.wrong_cluster,
            Rejection::MissingSignature => &mut self.missing_signature,
            Rejection::BadSignature => &mut self.bad_signature,
            Rejection::Malformed => &mut self.malformed,
            Rejection::Replayed => &mut self.replayed,
            Rejection::OwnIdConflict => &mut self.own_id_conflict,
        };
        *c += 1;
    }

    /// All dropped records.
    pub fn dropped(&self) -> u64 {
        self.wrong_version
            + self.wrong_cluster
            + self.missing_signature
            + self.bad_signature
            + self.malformed
            + self.replayed
            + self.own_id_conflict
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("starting the mDNS daemon: {0}")]
    Daemon(String),
    #[error("service type {0:?} must end with ._tcp.local. or ._udp.local.")]
    ServiceType(String),
    #[error("no interface named for discovery; name at least one or choose auto")]
    NoInterfaces,
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error("publishing announcement of {node_id}: {reason}")]
    Register { node_id: String, reason: String },
    #[error("discovery is shut down")]
    Shutdown,
    #[error("direct heartbeats unavailable: {0}")]
    Heartbeat(String),
}

struct Shared {
    stats: DiscoveryStats,
    seq: u64,
    shut: bool,
    /// The peer table, by node id; at most [`MAX_PEERS`].
    peers: BTreeMap<String, KnownPeer>,
    /// Counts peer-table changes, to find the longest-lost peer.
    clock: u64,
    /// Direct heartbeats sent so far in this boot (their sequence numbers).
    hb_seq: u64,
    hb: HeartbeatStats,
}

/// One entry of the peer table.
struct KnownPeer {
    /// The latest verified record, as last reported.
    peer: Peer,
    /// False once the record was lost (until it is seen again).
    present: bool,
    /// `Shared::clock` when this entry last changed.
    changed: u64,
    /// The boot of the latest record (a heartbeat must come from the same one).
    boot_counter: u64,
    boot: String,
}

impl Shared {
    fn new() -> Self {
        Shared {
            stats: DiscoveryStats::default(),
            seq: 0,
            shut: false,
            peers: BTreeMap::new(),
            clock: 0,
            hb_seq: 0,
            hb: HeartbeatStats::default(),
        }
    }

    /// Whether a new peer fits in the table: when it is full, the longest-lost peer makes
    /// room; when every peer is present, there is none.
    fn make_room(&mut self) -> bool {
        if self.peers.len() < MAX_PEERS {
            return true;
        }
        let lost = self
            .peers
            .iter()
            .filter(|(_, k)| !k.present)
            .min_by_key(|(_, k)| k.changed)
            .map(|(id, _)| id.clone());
        match lost {
            Some(id) => {
                tracing::info!(peer = %id, "peer table full; forgetting the longest-lost peer");
                self.peers.remove(&id);
                true
            }
            None => false,
        }
    }
}

/// Instances the browser saw but could not verify, in arrival order; at most [`MAX_PENDING`].
#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    names: HashSet<String>,
}

impl Pending {
    /// Notes `fullname`; false when it is new and the set is full (the caller flushes).
    fn note(&mut self, fullname: &str) -> bool {
        if self.names.contains(fullname) {
            return true;
        }
        if self.order.len() >= MAX_PENDING {
            return false;
        }
        self.order.push_back(fullname.to_string());
        self.names.insert(fullname.to_string());
        true
    }

    fn forget(&mut self, fullname: &str) {
        if self.names.remove(fullname) {
            self.order.retain(|n| n != fullname);
        }
    }

    /// Forgets every instance; returns how many.
    fn clear(&mut self) -> usize {
        self.names.clear();
        let n = self.order.len();
        self.order.clear();
        n
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

/// Handle of a running discovery. Dropping it shuts discovery down.
pub struct Discovery {
    daemon: ServiceDaemon,
    cfg: Arc<Settings>,
    shared: Arc<Mutex<Shared>>,
    /// The direct heartbeat socket (sending side), when heartbeats are on and it bound.
    hb_sock: Option<std::net::UdpSocket>,
    /// Stops the heartbeat receiver.
    hb_stop: Arc<tokio::sync::Notify>,
}

struct Settings {
    keyring: Arc<Keyring>,
    node_id: String,
    port: u16,
    fingerprint: String,
    boot_counter: u64,
    boot: String,
    service_type: String,
    ipv6: bool,
}

impl Discovery {
    /// Starts the mDNS daemon and the browser. Must run inside a tokio runtime. Nothing is
    /// announced until [`Discovery::announce`].
    pub fn start(
        cfg: DiscoveryConfig,
    ) -> Result<(Discovery, mpsc::Receiver<PeerEvent>), DiscoveryError> {
        let settings = Arc::new(Settings::from_config(&cfg)?);
        let (daemon, events) = start_daemon(&cfg)?;
        let shared = Arc::new(Mutex::new(Shared::new()));
        let (tx, rx) = mpsc::channel(256);
        let hb_stop = Arc::new(tokio::sync::Notify::new());
        let hb_sock = if cfg.heartbeats {
            match bind_heartbeats(cfg.port) {
                Ok((send, recv)) => {
                    let receiver =
                        heartbeat::Receiver::new(settings.clone(), shared.clone(), tx.clone());
                    tokio::spawn(receiver.run(recv, hb_stop.clone()));
                    Some(send)
                }
                Err(e) => {
                    // The agent then keeps announcing over mDNS (`heartbeat` fails).
                    tracing::warn!(port = cfg.port, error = %e, "no direct heartbeats: binding UDP failed");
                    None
                }
            }
        } else {
            None
        };
        let browser = Browser::new(settings.clone(), shared.clone(), tx);
        tokio::spawn(browser.run(events, daemon.clone()));
        Ok((
            Discovery {
                daemon,
                cfg: settings,
                shared,
                hb_sock,
                hb_stop,
            },
            rx,
        ))
    }

    /// Sends one direct heartbeat ([`heartbeat`]) to every present peer; returns how many
    /// went out. Fails, sending nothing, when heartbeats are off, the socket did not bind, or a
    /// present peer has no IPv4 address: then announce instead.
    pub fn heartbeat(&self) -> Result<usize, DiscoveryError> {
        let Some(sock) = &self.hb_sock else {
            return Err(DiscoveryError::Heartbeat("not enabled".into()));
        };
        // One datagram per peer, each addressed (under its signature) to that peer's boot.
        let datagrams = {
            let mut s = self.shared.lock().expect("discovery state lock");
            if s.shut {
                return Err(DiscoveryError::Shutdown);
            }
            let Some(targets) = heartbeat::targets(&s.peers) else {
                return Err(DiscoveryError::Heartbeat(
                    "a present peer has no IPv4 address".into(),
                ));
            };
            s.hb_seq += 1;
            let keys = self.cfg.keyring.current();
            let header = self.cfg.header(s.hb_seq);
            targets
                .into_iter()
                .map(|(to, who)| {
                    heartbeat::encode(keys.announcement_key(), &header, &who).map(|d| (to, d))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let (mut sent, mut errors) = (0u64, 0u64);
        for (to, datagram) in &datagrams {
            match sock.send_to(datagram, to) {
                Ok(_) => sent += 1,
                Err(e) => {
                    errors += 1;
                    tracing::debug!(%to, error = %e, "heartbeat not sent");
                }
            }
        }
        let mut s = self.shared.lock().expect("discovery state lock");
        s.hb.sent += sent;
        s.hb.send_errors += errors;
        Ok(sent as usize)
    }

    /// Counters of direct heartbeats so far.
    pub fn heartbeat_stats(&self) -> HeartbeatStats {
        self.shared.lock().expect("discovery state lock").hb.clone()
    }

    /// Publishes (or re-publishes) this node's announcement with these application fields,
    /// in this order. Call it on every phase change; each call carries a higher sequence number.
    pub fn announce(&self, fields: Vec<(String, String)>) -> Result<(), DiscoveryError> {
        let seq = {
            let mut s = self.shared.lock().expect("discovery state lock");
            if s.shut {
                return Err(DiscoveryError::Shutdown);
            }
            s.seq += 1;
            s.seq
        };
        let c = &self.cfg;
        let keys = c.keyring.current();
        let pairs = record::encode_record(keys.announcement_key(), &c.header(seq), &fields)?;
        let host = format!("rackseed-{}.local.", c.node_id);
        let props: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let reg = |reason: String| DiscoveryError::Register {
            node_id: c.node_id.clone(),
            reason,
        };
        let mut info = ServiceInfo::new(&c.service_type, &c.node_id, &host, "", c.port, &props[..])
            .map_err(|e| reg(e.to_string()))?
            .enable_addr_auto();
        // No probing (RFC 6762 8.1). Probing exists to rename an instance whose name is taken,
        // but a renamed instance no longer matches its signed name and every peer would drop
        // it, so renaming cannot help us. Worse, mdns-sd treats our own re-announcement
        // during the ~750 ms probe of the previous one as a conflict and renames us
        // ("node-a (2)"). Names are node ids, unique by construction; a clone announcing our
        // id is detected through its boot id instead (`own_id_conflict`).
        info.set_requires_probe(false);
        self.daemon.register(info).map_err(|e| reg(e.to_string()))
    }

    /// Counters of received records so far.
    pub fn stats(&self) -> DiscoveryStats {
        self.shared
            .lock()
            .expect("discovery state lock")
            .stats
            .clone()
    }

    /// The latest verified record of peer `node_id`, also after it was lost.
    pub fn peer(&self, node_id: &str) -> Option<Peer> {
        let s = self.shared.lock().expect("discovery state lock");
        s.peers.get(node_id).map(|k| k.peer.clone())
    }

    /// Every peer verified so far (by node id), also those whose record was lost.
    pub fn peers(&self) -> Vec<Peer> {
        let s = self.shared.lock().expect("discovery state lock");
        s.peers.values().map(|k| k.peer.clone()).collect()
    }

    /// This boot's random id (as announced in `b`).
    pub fn boot_id(&self) -> &str {
        &self.cfg.boot
    }

    /// This start's boot counter (as announced in `n`).
    pub fn boot_counter(&self) -> u64 {
        self.cfg.boot_counter
    }

    /// Sends goodbye packets for our service and stops the daemon. Idempotent. Blocks for
    /// at most a few seconds while the mDNS daemon confirms (also when dropped).
    pub fn shutdown(&self) {
        {
            let mut s = self.shared.lock().expect("discovery state lock");
            if s.shut {
                return;
            }
            s.shut = true;
        }
        self.hb_stop.notify_one();
        let fullname = format!("{}.{}", self.cfg.node_id, self.cfg.service_type);
        if let Ok(rx) = self.daemon.unregister(&fullname) {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Settings {
    /// Checks the configuration and derives this boot's settings (keys, tag, random boot id).
    fn from_config(cfg: &DiscoveryConfig) -> Result<Settings, DiscoveryError> {
        NodeId::check(&cfg.node_id).map_err(record::RecordError::from)?;
        if !(cfg.service_type.ends_with("._tcp.local.")
            || cfg.service_type.ends_with("._udp.local."))
        {
            return Err(DiscoveryError::ServiceType(cfg.service_type.clone()));
        }
        if cfg.interfaces == InterfaceChoice::Named(Vec::new()) {
            return Err(DiscoveryError::NoInterfaces);
        }
        let mut boot = [0u8; 8];
        rand::fill(&mut boot);
        let settings = Settings {
            keyring: cfg
                .keyring
                .clone()
                .unwrap_or_else(|| Arc::new(Keyring::new(cfg.secret.clone()))),
            node_id: cfg.node_id.clone(),
            port: cfg.port,
            fingerprint: cfg.fingerprint.clone(),
            boot_counter: cfg.boot_counter,
            boot: hex::encode(boot),
            service_type: cfg.service_type.clone(),
            ipv6: cfg.ipv6,
        };
        // Validate the fixed fields now rather than at the first announce.
        record::encode_record(
            settings.keyring.current().announcement_key(),
            &settings.header(0),
            &[],
        )?;
        Ok(settings)
    }

    fn header(&self, seq: u64) -> RecordHeader {
        RecordHeader {
            cluster_tag: self.keyring.current().tag().to_string(),
            node_id: self.node_id.clone(),
            port: self.port,
            fingerprint: self.fingerprint.clone(),
            boot_counter: self.boot_counter,
            boot: self.boot.clone(),
            seq,
        }
    }
}

/// The heartbeat socket on UDP `port` (all IPv4 addresses): a non-blocking sending handle and
/// the tokio socket the receiver reads.
fn bind_heartbeats(port: u16) -> std::io::Result<(std::net::UdpSocket, tokio::net::UdpSocket)> {
    let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port))?;
    sock.set_nonblocking(true)?;
    let send = sock.try_clone()?;
    Ok((send, tokio::net::UdpSocket::from_std(sock)?))
}

/// Starts the mdns-sd daemon on the chosen interfaces and browses our service type.
fn start_daemon(
    cfg: &DiscoveryConfig,
) -> Result<(ServiceDaemon, mdns_sd::Receiver<ServiceEvent>), DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(|e| DiscoveryError::Daemon(e.to_string()))?;
    let choice = cfg.interfaces.clone();
    let setup = || -> Result<_, mdns_sd::Error> {
        // Selections are re-applied on every interface rescan (last match wins), so the
        // predicate keeps excluding interfaces that appear later.
        daemon.disable_interface(IfKind::Predicate(IfPredicate::new(move |i| {
            !choice.wants(&i.name, i.is_loopback())
        })))?;
        if !cfg.ipv6 {
            daemon.disable_interface(IfKind::IPv6)?;
        }
        daemon.browse(&cfg.service_type)
    };
    match setup() {
        Ok(events) => Ok((daemon, events)),
        Err(e) => {
            let _ = daemon.shutdown();
            Err(DiscoveryError::Daemon(e.to_string()))
        }
    }
}

/// Distinct (instance, reason) pairs logged; beyond this, drops are only counted.
const LOG_ONCE_CAP: usize = 1024;

struct Browser {
    cfg: Arc<Settings>,
    shared: Arc<Mutex<Shared>>,
    guard: ReplayGuard,
    logged: HashSet<(String, Rejection)>,
    /// Instances seen but not verified (a flood of fakes lands here).
    pending: Pending,
    /// Set when mdns-sd's cache of our type should be emptied (the pending set overflowed).
    flush: bool,
    tx: mpsc::Sender<PeerEvent>,
}

impl Browser {
    fn new(cfg: Arc<Settings>, shared: Arc<Mutex<Shared>>, tx: mpsc::Sender<PeerEvent>) -> Self {
        Browser {
            cfg,
            shared,
            guard: ReplayGuard::new(),
            logged: HashSet::new(),
            pending: Pending::default(),
            flush: false,
            tx,
        }
    }

    /// Handles mdns-sd events until shutdown, browsing again after a cache flush or a
    /// subscription mdns-sd ended.
    async fn run(mut self, mut events: mdns_sd::Receiver<ServiceEvent>, daemon: ServiceDaemon) {
        loop {
            let mut flush = false;
            while let Ok(ev) = events.recv_async().await {
                if !self.handle(ev).await {
                    tracing::debug!("mdns browser stopped");
                    return;
                }
                if self.flush {
                    self.flush = false;
                    flush = true;
                    break;
                }
            }
            if self.shared.lock().expect("discovery state lock").shut {
                break;
            }
            if !flush {
                // mdns-sd ended the subscription: its event channel filled up (a flood).
                tracing::warn!("mdns subscription ended (event channel full?); browsing again");
                self.shared
                    .lock()
                    .expect("discovery state lock")
                    .stats
                    .browse_restarts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            // Empties mdns-sd's cache of our service type, then asks again.
            let _ = daemon.stop_browse(&self.cfg.service_type);
            match daemon.browse(&self.cfg.service_type) {
                Ok(ev) => events = ev,
                Err(e) => {
                    tracing::debug!(error = %e, "mdns browse ended");
                    break;
                }
            }
        }
        tracing::debug!("mdns browser stopped");
    }

    /// Notes an instance that is not (yet) a verified peer. When the pending set is full,
    /// everything unverified is forgotten here and the mdns-sd cache flush is requested.
    fn note_unverified(&mut self, fullname: &str) {
        let instance = instance_label(fullname, &self.cfg.service_type);
        let mut shared = self.shared.lock().expect("discovery state lock");
        if instance.is_some_and(|i| i == self.cfg.node_id || shared.peers.contains_key(i)) {
            return;
        }
        if !self.pending.note(fullname) {
            let forgotten = self.pending.clear();
            shared.stats.unverified_forgotten += forgotten as u64;
            shared.stats.cache_flushes += 1;
            self.flush = true;
            tracing::warn!(
                forgotten,
                "too many unverifiable mdns instances; emptying the mdns cache of our service type"
            );
            self.pending.note(fullname);
        }
    }

    /// Handles one mdns-sd event; false when the receiver is gone.
    async fn handle(&mut self, ev: ServiceEvent) -> bool {
        let out = match ev {
            ServiceEvent::ServiceResolved(svc) => {
                let instance = instance_label(&svc.fullname, &self.cfg.service_type);
                let pairs: Vec<(String, Option<Vec<u8>>)> = svc
                    .txt_properties
                    .iter()
                    .map(|p| (p.key().to_string(), p.val().map(<[u8]>::to_vec)))
                    .collect();
                let mut addrs: Vec<IpAddr> = svc
                    .addresses
                    .iter()
                    .map(|a| a.to_ip_addr())
                    .filter(|a| self.cfg.ipv6 || a.is_ipv4())
                    .collect();
                addrs.sort();
                addrs.dedup();
                self.on_resolved(&svc.fullname, instance, &pairs, addrs)
            }
            ServiceEvent::ServiceFound(_, fullname) => {
                self.on_found(&fullname);
                None
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                self.pending.forget(&fullname);
                self.on_removed(instance_label(&fullname, &self.cfg.service_type))
            }
            _ => None,
        };
        match out {
            Some(e) => self.tx.send(e).await.is_ok(),
            None => !self.tx.is_closed(),
        }
    }

    /// An instance of our type appeared (its records not resolved yet).
    fn on_found(&mut self, fullname: &str) {
        self.note_unverified(fullname);
    }

    fn on_resolved(
        &mut self,
        fullname: &str,
        instance: Option<&str>,
        pairs: &[(String, Option<Vec<u8>>)],
        addrs: Vec<IpAddr>,
    ) -> Option<PeerEvent> {
        let c = self.cfg.clone();
        // The accepted secret whose tag the record names (else the current one, which then
        // refuses it as another cluster's).
        let named_tag = pairs
            .iter()
            .find(|(k, _)| k == "c")
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok());
        let keys = named_tag
            .and_then(|t| c.keyring.for_tag(t, std::time::Instant::now()))
            .unwrap_or_else(|| c.keyring.current());
        let verdict = record::decode_record(
            keys.announcement_key(),
            keys.tag(),
            instance.unwrap_or(""),
            pairs,
        )
        .and_then(|rec| {
            if rec.header.node_id == c.node_id {
                return if rec.header.boot == c.boot {
                    Ok(None)
                } else {
                    Err(Rejection::OwnIdConflict)
                };
            }
            let h = &rec.header;
            match self.guard.check(&h.node_id, h.boot_counter, &h.boot, h.seq) {
                Freshness::Stale => Err(Rejection::Replayed),
                Freshness::Same => Ok(Some((rec, false))),
                Freshness::Newer => Ok(Some((rec, true))),
            }
        });
        let mut shared = self.shared.lock().expect("discovery state lock");
        let (rec, newer) = match verdict {
            Ok(Some(found)) => found,
            Ok(None) => {
                shared.stats.own += 1;
                return None;
            }
            Err(r) => {
                shared.stats.count(r);
                drop(shared);
                self.log_once(fullname, r);
                self.note_unverified(fullname);
                return None;
            }
        };
        self.pending.forget(fullname);
        if !shared.peers.contains_key(&rec.header.node_id) && !shared.make_room() {
            shared.stats.peers_refused += 1;
            return None;
        }
        shared.stats.accepted += 1;
        let peer = Peer {
            node_id: rec.header.node_id,
            addrs,
            port: rec.header.port,
            fingerprint: rec.header.fingerprint,
            fields: rec.fields,
        };
        let event = match shared.peers.get(&peer.node_id) {
            None | Some(KnownPeer { present: false, .. }) => {
                tracing::info!(peer = %peer.node_id, addrs = ?peer.addrs, "peer seen");
                PeerEvent::Seen(peer.clone())
            }
            // A newer record with the same content is the peer's heartbeat: report it, so the
            // formation core keeps counting the peer as present.
            Some(old) if old.peer == peer && !newer => return None,
            Some(_) => PeerEvent::Updated(peer.clone()),
        };
        shared.clock += 1;
        let known = KnownPeer {
            peer,
            present: true,
            changed: shared.clock,
            boot_counter: rec.header.boot_counter,
            boot: rec.header.boot,
        };
        shared.peers.insert(known.peer.node_id.clone(), known);
        Some(event)
    }

    /// The service of instance `instance` went away: its peer (if one was seen) is lost. The
    /// table keeps its record, marked lost.
    fn on_removed(&mut self, instance: Option<&str>) -> Option<PeerEvent> {
        let mut guard = self.shared.lock().expect("discovery state lock");
        let shared = &mut *guard;
        let known = shared.peers.get_mut(instance?)?;
        if !known.present {
            return None;
        }
        known.present = false;
        shared.clock += 1;
        known.changed = shared.clock;
        Some(PeerEvent::Lost {
            node_id: known.peer.node_id.clone(),
        })
    }

    fn log_once(&mut self, fullname: &str, r: Rejection) {
        if self.logged.len() >= LOG_ONCE_CAP {
            return;
        }
        // Names come from the network: cap and escape before logging.
        let name: String = fullname.chars().take(80).collect();
        if self.logged.insert((name.clone(), r)) {
            tracing::warn!(
                instance = %name.escape_debug(),
                reason = r.as_str(),
                "ignoring mdns announcement (logged once per instance and reason; see stats)"
            );
            if self.logged.len() == LOG_ONCE_CAP {
                tracing::warn!("too many distinct bad announcements; only counting from now on");
            }
        }
    }
}

/// The instance label of `fullname` for `service_type`, if it is one.
fn instance_label<'a>(fullname: &'a str, service_type: &str) -> Option<&'a str> {
    fullname
        .strip_suffix(service_type)
        .and_then(|s| s.strip_suffix('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_skips_loopback_and_container_interfaces_named_picks_exactly() {
        let auto = InterfaceChoice::Auto;
        for v in [
            "cni0",
            "flannel.1",
            "vxlan.calico",
            "cali1234abcd",
            "docker0",
            "veth9f8e",
        ] {
            assert!(!auto.wants(v, false), "{v} must be skipped");
        }
        assert!(!auto.wants("lo", true));
        for real in ["eth0", "enp3s0", "wlan0", "end0", "eno1"] {
            assert!(auto.wants(real, false), "{real} must be used");
        }
        let named = InterfaceChoice::Named(vec!["enp3s0".into()]);
        assert!(named.wants("enp3s0", false));
        assert!(!named.wants("eth0", false));
    }

    #[test]
    fn instance_label_strips_the_type() {
        assert_eq!(
            instance_label("node-a._rackseed._tcp.local.", SERVICE_TYPE),
            Some("node-a")
        );
        assert_eq!(instance_label("x._other._tcp.local.", SERVICE_TYPE), None);
    }

    fn browser(node_id: &str, secret: &ClusterSecret) -> (Browser, mpsc::Receiver<PeerEvent>) {
        let (tx, rx) = mpsc::channel(16);
        let cfg = Arc::new(Settings {
            keyring: Arc::new(Keyring::new(secret.clone())),
            node_id: node_id.into(),
            port: 1,
            fingerprint: "00".repeat(32),
            boot_counter: 1,
            boot: "aaaaaaaaaaaaaaaa".into(),
            service_type: SERVICE_TYPE.into(),
            ipv6: false,
        });
        let b = Browser::new(cfg, Arc::new(Mutex::new(Shared::new())), tx);
        (b, rx)
    }

    fn signed(
        secret: &ClusterSecret,
        id: &str,
        boot: &str,
        seq: u64,
        phase: &str,
    ) -> Vec<(String, Option<Vec<u8>>)> {
        signed_in_boot(secret, id, 1, boot, seq, phase)
    }

    /// A record of `id` from its boot number `boot_counter` (boot id `boot`).
    fn signed_in_boot(
        secret: &ClusterSecret,
        id: &str,
        boot_counter: u64,
        boot: &str,
        seq: u64,
        phase: &str,
    ) -> Vec<(String, Option<Vec<u8>>)> {
        let h = RecordHeader {
            cluster_tag: secret.cluster_tag(),
            node_id: id.into(),
            port: 7443,
            fingerprint: "cd".repeat(32),
            boot_counter,
            boot: boot.into(),
            seq,
        };
        record::encode_record(
            &secret.announcement_key(),
            &h,
            &[("phase".into(), phase.into())],
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, Some(v.into_bytes())))
        .collect()
    }

    /// A TXT record as it is on the wire: length-prefixed `key=value` strings.
    fn txt_bytes(pairs: &[(String, Option<Vec<u8>>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in pairs {
            let mut item = k.as_bytes().to_vec();
            if let Some(v) = v {
                item.push(b'=');
                item.extend_from_slice(v);
            }
            out.push(item.len() as u8);
            out.extend_from_slice(&item);
        }
        out
    }

    fn from_wire(txt: &[u8]) -> Vec<(String, Option<Vec<u8>>)> {
        mdns_sd::TxtProperties::from(txt)
            .iter()
            .map(|p| (p.key().to_string(), p.val().map(<[u8]>::to_vec)))
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, .. Default::default() })]

        /// Raw TXT bytes through mdns-sd's TXT parser and ours: never a panic, never a peer.
        #[test]
        fn arbitrary_txt_bytes_are_never_accepted(
            txt in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            name in "[ -~]{0,40}",
        ) {
            let s = ClusterSecret::from_bytes([1; 32]);
            let (mut b, _rx) = browser("me", &s);
            let full = format!("{name}._rackseed._tcp.local.");
            let inst = instance_label(&full, SERVICE_TYPE);
            proptest::prop_assert_eq!(b.on_resolved(&full, inst, &from_wire(&txt), vec![]), None);
        }

        /// A valid record with one byte flipped on the wire is either rejected or, if the
        /// flip left the signed content intact, decodes to exactly the original.
        #[test]
        fn flipped_byte_in_a_valid_record_is_caught(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let s = ClusterSecret::from_bytes([1; 32]);
            let (mut b, _rx) = browser("me", &s);
            let good = signed(&s, "peer", "bbbbbbbbbbbbbbbb", 1, "a");
            let mut txt = txt_bytes(&good);
            let i = at.index(txt.len());
            txt[i] ^= xor;
            let full = "peer._rackseed._tcp.local.";
            if let Some(PeerEvent::Seen(p)) = b.on_resolved(full, Some("peer"), &from_wire(&txt), vec![]) {
                proptest::prop_assert_eq!(p.fields["phase"].as_str(), "a");
                proptest::prop_assert_eq!(p.node_id.as_str(), "peer");
            }
        }
    }

    #[test]
    fn signed_record_survives_the_wire_encoding() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let good = signed(&s, "peer", "bbbbbbbbbbbbbbbb", 1, "a");
        let e = b.on_resolved(
            "peer._rackseed._tcp.local.",
            Some("peer"),
            &from_wire(&txt_bytes(&good)),
            vec![],
        );
        assert!(matches!(e, Some(PeerEvent::Seen(_))), "{e:?}");
    }

    #[test]
    fn the_peer_table_keeps_a_lost_peer_and_reports_it_seen_again() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let full = "peer._rackseed._tcp.local.";
        let addrs: Vec<IpAddr> = vec!["fe80::1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let rec = signed(&s, "peer", "bbbbbbbbbbbbbbbb", 1, "a");
        let e = b.on_resolved(full, Some("peer"), &rec, addrs.clone());
        let Some(PeerEvent::Seen(p)) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            p.preferred_addr(),
            Some("10.0.0.2".parse().unwrap()),
            "IPv4 first"
        );
        assert_eq!(
            b.on_removed(Some("peer")),
            Some(PeerEvent::Lost {
                node_id: "peer".into()
            })
        );
        assert_eq!(b.on_removed(Some("peer")), None, "lost once");
        assert_eq!(b.on_removed(Some("stranger")), None);
        {
            let shared = b.shared.lock().unwrap();
            let known = &shared.peers["peer"];
            assert!(!known.present);
            assert_eq!(
                known.peer, p,
                "a lost peer keeps its record (and addresses)"
            );
        }
        // The same record again after the loss: seen again.
        let e = b.on_resolved(full, Some("peer"), &rec, addrs);
        assert!(matches!(e, Some(PeerEvent::Seen(_))), "{e:?}");
        assert!(b.shared.lock().unwrap().peers["peer"].present);
    }

    #[test]
    fn browser_emits_seen_updated_and_counts_drops() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let full = "peer._rackseed._tcp.local.";
        let ip: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap()];
        let boot = "bbbbbbbbbbbbbbbb";
        let e = b.on_resolved(
            full,
            Some("peer"),
            &signed(&s, "peer", boot, 1, "a"),
            ip.clone(),
        );
        assert!(matches!(e, Some(PeerEvent::Seen(ref p)) if p.fields["phase"] == "a"));
        // The same record again (mDNS refresh): nothing new.
        assert_eq!(
            b.on_resolved(
                full,
                Some("peer"),
                &signed(&s, "peer", boot, 1, "a"),
                ip.clone()
            ),
            None
        );
        let e = b.on_resolved(
            full,
            Some("peer"),
            &signed(&s, "peer", boot, 2, "b"),
            ip.clone(),
        );
        assert!(matches!(e, Some(PeerEvent::Updated(ref p)) if p.fields["phase"] == "b"));
        // Replay of seq 1: dropped and counted.
        assert_eq!(
            b.on_resolved(
                full,
                Some("peer"),
                &signed(&s, "peer", boot, 1, "a"),
                ip.clone()
            ),
            None
        );
        // Own record ignored; own id from another boot flagged.
        let mine = signed(&s, "me", "aaaaaaaaaaaaaaaa", 1, "x");
        assert_eq!(
            b.on_resolved("me._rackseed._tcp.local.", Some("me"), &mine, ip.clone()),
            None
        );
        let clone = signed(&s, "me", "cccccccccccccccc", 1, "x");
        assert_eq!(
            b.on_resolved("me._rackseed._tcp.local.", Some("me"), &clone, ip.clone()),
            None
        );
        // Another cluster.
        let other = ClusterSecret::from_bytes([2; 32]);
        let foreign = signed(&other, "evil", boot, 1, "seed");
        assert_eq!(
            b.on_resolved("evil._rackseed._tcp.local.", Some("evil"), &foreign, ip),
            None
        );
        let st = b.shared.lock().unwrap().stats.clone();
        assert_eq!(st.accepted, 3);
        assert_eq!(st.replayed, 1);
        assert_eq!(st.own, 1);
        assert_eq!(st.own_id_conflict, 1);
        assert_eq!(st.wrong_cluster, 1);
        assert_eq!(b.logged.len(), 3, "each (instance, reason) logged once");
    }

    /// What the browse task does when the browser asks for a flush (the daemon part aside).
    fn flushed(b: &mut Browser) -> bool {
        std::mem::replace(&mut b.flush, false)
    }

    fn wire(pairs: &[(String, Option<Vec<u8>>)]) -> Vec<(String, Option<Vec<u8>>)> {
        from_wire(&txt_bytes(pairs))
    }

    /// Finding 1's attack: node X's announcement from boot 1 is recorded; X restarts (boot 2,
    /// a higher signed counter); the recording replayed byte for byte never displaces X's boot-2
    /// record, however high its sequence number.
    #[test]
    fn a_rotation_accepts_both_secrets_then_drops_the_old_one_as_another_cluster() {
        let (old, new) = (
            ClusterSecret::from_bytes([1; 32]),
            ClusterSecret::from_bytes([2; 32]),
        );
        let (mut b, _rx) = browser("me", &old);
        let ring = b.cfg.keyring.clone();
        let ip = vec![IpAddr::from([10, 0, 0, 2])];
        let full = |id: &str| format!("{id}._rackseed._tcp.local.");
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // Before staging, the new secret is another cluster's.
        let moved = signed(&new, "moved", "bbbbbbbbbbbbbbbb", 1, "a");
        assert!(b
            .on_resolved(&full("moved"), Some("moved"), &moved, ip.clone())
            .is_none());
        ring.accept_also(new.clone(), later);
        let moved = signed(&new, "moved", "bbbbbbbbbbbbbbbb", 2, "a");
        assert!(b
            .on_resolved(&full("moved"), Some("moved"), &moved, ip.clone())
            .is_some());
        ring.switch_to(new.clone(), later);
        let laggard = signed(&old, "laggard", "cccccccccccccccc", 1, "a");
        assert!(
            b.on_resolved(&full("laggard"), Some("laggard"), &laggard, ip.clone())
                .is_some(),
            "the old secret is accepted during the grace period"
        );
        ring.forget_others();
        let left = signed(&old, "left", "dddddddddddddddd", 1, "a");
        assert!(b
            .on_resolved(&full("left"), Some("left"), &left, ip)
            .is_none());
        let st = b.shared.lock().unwrap().stats.clone();
        assert_eq!((st.accepted, st.wrong_cluster), (2, 2));
    }

    #[test]
    fn replaying_an_earlier_boot_never_hides_the_live_node() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let full = "x._rackseed._tcp.local.";
        let ip: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap()];
        let recording = txt_bytes(&signed_in_boot(&s, "x", 1, "1111111111111111", 40, "old"));
        let e = b.on_resolved(full, Some("x"), &from_wire(&recording), ip.clone());
        assert!(matches!(e, Some(PeerEvent::Seen(ref p)) if p.fields["phase"] == "old"));
        // X restarts: boot 2, sequence numbers start again low.
        let live = signed_in_boot(&s, "x", 2, "2222222222222222", 1, "new");
        let e = b.on_resolved(full, Some("x"), &wire(&live), ip.clone());
        assert!(matches!(e, Some(PeerEvent::Updated(ref p)) if p.fields["phase"] == "new"));
        // The replay, again and again: refused, counted, X unchanged.
        for _ in 0..3 {
            assert_eq!(
                b.on_resolved(full, Some("x"), &from_wire(&recording), ip.clone()),
                None
            );
        }
        // X's own records keep being accepted (a refresh, then its next announcement).
        assert_eq!(
            b.on_resolved(full, Some("x"), &wire(&live), ip.clone()),
            None
        );
        let next = signed_in_boot(&s, "x", 2, "2222222222222222", 2, "newer");
        let e = b.on_resolved(full, Some("x"), &wire(&next), ip);
        assert!(matches!(e, Some(PeerEvent::Updated(ref p)) if p.fields["phase"] == "newer"));
        let shared = b.shared.lock().unwrap();
        assert_eq!(shared.stats.replayed, 3);
        let x = &shared.peers["x"];
        assert!(x.present);
        assert_eq!(x.peer.fields["phase"], "newer");
    }

    /// After this observer restarts, the replay may arrive first and is shown; X's current
    /// record then supersedes it for good.
    #[test]
    fn a_replay_seen_first_after_a_restart_cannot_hide_the_live_node() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let full = "x._rackseed._tcp.local.";
        let ip: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap()];
        let recording = txt_bytes(&signed_in_boot(&s, "x", 1, "1111111111111111", 40, "old"));
        let e = b.on_resolved(full, Some("x"), &from_wire(&recording), ip.clone());
        assert!(matches!(e, Some(PeerEvent::Seen(_))), "{e:?}");
        let live = signed_in_boot(&s, "x", 2, "2222222222222222", 1, "new");
        let e = b.on_resolved(full, Some("x"), &wire(&live), ip.clone());
        assert!(matches!(e, Some(PeerEvent::Updated(ref p)) if p.fields["phase"] == "new"));
        assert_eq!(
            b.on_resolved(full, Some("x"), &from_wire(&recording), ip),
            None
        );
        let shared = b.shared.lock().unwrap();
        assert_eq!(shared.peers["x"].peer.fields["phase"], "new");
        assert_eq!(shared.stats.replayed, 1);
    }

    /// Finding 2's attack: 10,000 fake instances (found only, unsigned, forged, another
    /// cluster's) through the browser. Everything it keeps stays under its bound, mdns-sd's
    /// cache is flushed every `MAX_PENDING` new ones, and a real peer is still seen, before
    /// and after.
    #[test]
    fn ten_thousand_fake_instances_stay_bounded_and_a_real_peer_is_seen() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let other = ClusterSecret::from_bytes([2; 32]);
        let (mut b, _rx) = browser("me", &s);
        let ip: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap()];
        let real = "real._rackseed._tcp.local.";
        let rec = signed(&s, "real", "bbbbbbbbbbbbbbbb", 1, "a");
        assert!(matches!(
            b.on_resolved(real, Some("real"), &rec, ip.clone()),
            Some(PeerEvent::Seen(_))
        ));
        let mut flushes = 0;
        for i in 0..10_000u32 {
            let id = format!("fake-{i}");
            let full = format!("{id}._rackseed._tcp.local.");
            match i % 4 {
                0 => b.on_found(&full),
                1 => {
                    let mut unsigned = signed(&s, &id, "bbbbbbbbbbbbbbbb", 1, "seed");
                    unsigned.retain(|(k, _)| k != "sig");
                    assert_eq!(b.on_resolved(&full, Some(&id), &unsigned, ip.clone()), None);
                }
                2 => {
                    let forged = signed(&other, &id, "bbbbbbbbbbbbbbbb", 1, "seed");
                    assert_eq!(b.on_resolved(&full, Some(&id), &forged, ip.clone()), None);
                }
                _ => {
                    // Another cluster's record moved under the real cluster's tag.
                    let mut forged = signed(&other, &id, "bbbbbbbbbbbbbbbb", 1, "seed");
                    for (k, v) in &mut forged {
                        if k == "c" {
                            *v = Some(s.cluster_tag().into_bytes());
                        }
                    }
                    assert_eq!(b.on_resolved(&full, Some(&id), &forged, ip.clone()), None);
                }
            }
            // Forged records under the real peer's name never make it pending nor evict it.
            if i % 1000 == 0 {
                let mut forged = rec.clone();
                forged.last_mut().unwrap().1 = Some("00".repeat(32).into_bytes());
                assert_eq!(b.on_resolved(real, Some("real"), &forged, ip.clone()), None);
            }
            flushes += usize::from(flushed(&mut b));
            assert!(b.pending.len() <= MAX_PENDING);
            assert_eq!(b.pending.names.len(), b.pending.len());
            assert!(b.logged.len() <= LOG_ONCE_CAP);
        }
        assert_eq!(
            flushes,
            10_000 / MAX_PENDING,
            "one flush per {MAX_PENDING} new fakes"
        );
        assert!(b.guard.len() <= 1, "fakes never reach the replay guard");
        {
            let shared = b.shared.lock().unwrap();
            assert_eq!(shared.peers.len(), 1, "only the real peer is in the table");
            assert!(shared.peers["real"].present);
            assert_eq!(shared.stats.cache_flushes, flushes as u64);
            assert_eq!(
                shared.stats.unverified_forgotten,
                (flushes * MAX_PENDING) as u64
            );
            assert_eq!(shared.stats.accepted, 1);
        }
        // After the flood, the real peer's next record is still accepted, and a newcomer too.
        let next = signed(&s, "real", "bbbbbbbbbbbbbbbb", 2, "b");
        assert!(matches!(
            b.on_resolved(real, Some("real"), &next, ip.clone()),
            Some(PeerEvent::Updated(_))
        ));
        let late = signed(&s, "late", "bbbbbbbbbbbbbbbb", 1, "a");
        assert!(matches!(
            b.on_resolved("late._rackseed._tcp.local.", Some("late"), &late, ip),
            Some(PeerEvent::Seen(_))
        ));
    }

    /// Direct heartbeats refresh a peer known from its record, for that record's boot only:
    /// newer ones count, a replay or a duplicate does not, one from a stranger or from another
    /// boot changes nothing, and one from a peer whose record was lost brings it back.
    #[test]
    fn heartbeats_refresh_known_peers_of_the_same_boot_only() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let (tx, _hb_rx) = mpsc::channel(16);
        let mut r = heartbeat::Receiver::new(b.cfg.clone(), b.shared.clone(), tx);
        let from: std::net::SocketAddr = "10.0.0.2:7443".parse().unwrap();
        let key = s.announcement_key();
        let me = heartbeat::Addressee {
            node_id: "me".into(),
            boot: b.cfg.boot.clone(),
        };
        let hb_to = |id: &str, boot: &str, seq: u64, to: &heartbeat::Addressee| {
            let h = RecordHeader {
                cluster_tag: s.cluster_tag(),
                node_id: id.into(),
                port: 7443,
                fingerprint: "cd".repeat(32),
                boot_counter: 1,
                boot: boot.into(),
                seq,
            };
            heartbeat::encode(&key, &h, to).unwrap()
        };
        let hb = |id: &str, boot: &str, seq: u64| hb_to(id, boot, seq, &me);
        let boot = "bbbbbbbbbbbbbbbb";
        // Before its record: unmatched.
        assert_eq!(r.on_datagram(from, &hb("peer", boot, 1)), None);
        let ip = vec![IpAddr::from([10, 0, 0, 2])];
        let rec = signed(&s, "peer", boot, 1, "member");
        let full = "peer._rackseed._tcp.local.";
        let Some(PeerEvent::Seen(p)) = b.on_resolved(full, Some("peer"), &rec, ip.clone()) else {
            panic!("record not seen");
        };
        assert_eq!(
            r.on_datagram(from, &hb("peer", boot, 2)),
            Some(PeerEvent::Updated(p.clone()))
        );
        assert_eq!(r.on_datagram(from, &hb("peer", boot, 2)), None, "duplicate");
        assert_eq!(r.on_datagram(from, &hb("peer", boot, 1)), None, "replay");
        // Newer, but addressed to another node, or to an earlier boot of this one (a
        // recording replayed after a restart): never a refresh, and the guard is not moved.
        let other = heartbeat::Addressee {
            node_id: "other".into(),
            boot: b.cfg.boot.clone(),
        };
        let earlier = heartbeat::Addressee {
            node_id: "me".into(),
            boot: "0123456789abcdef".into(),
        };
        assert_eq!(r.on_datagram(from, &hb_to("peer", boot, 9, &other)), None);
        assert_eq!(r.on_datagram(from, &hb_to("peer", boot, 9, &earlier)), None);
        // Another boot of the same id (its record not seen yet): unmatched.
        assert_eq!(
            r.on_datagram(from, &hb("peer", "cccccccccccccccc", 1)),
            None
        );
        // Our own: ignored.
        assert_eq!(r.on_datagram(from, &hb("me", "aaaaaaaaaaaaaaaa", 1)), None);
        // Its record lost (expiry), then a heartbeat: seen again, same fields.
        assert!(b.on_removed(Some("peer")).is_some());
        assert_eq!(
            r.on_datagram(from, &hb("peer", boot, 3)),
            Some(PeerEvent::Seen(p.clone()))
        );
        assert!(b.shared.lock().unwrap().peers["peer"].present);
        // Garbage: counted, nothing else.
        assert_eq!(r.on_datagram(from, b"hello"), None);
        let st = b.shared.lock().unwrap().hb.clone();
        assert_eq!(
            (st.accepted, st.replayed, st.unmatched, st.rejected),
            (2, 4, 2, 1),
            "{st:?}"
        );
        // The table's fields never changed.
        assert_eq!(b.shared.lock().unwrap().peers["peer"].peer, p);
    }

    /// Where heartbeats go: every present peer's first IPv4 address at its signed port; none
    /// at all when a present peer has only IPv6 addresses.
    #[test]
    fn heartbeat_targets_are_present_peers_ipv4_only() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let boot = "bbbbbbbbbbbbbbbb";
        let see = |b: &mut Browser, id: &str, addrs: Vec<IpAddr>| {
            let full = format!("{id}._rackseed._tcp.local.");
            b.on_resolved(&full, Some(id), &signed(&s, id, boot, 1, "a"), addrs)
        };
        see(
            &mut b,
            "a",
            vec!["fe80::1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
        );
        see(&mut b, "b", vec!["10.0.0.3".parse().unwrap()]);
        see(&mut b, "c", vec!["10.0.0.4".parse().unwrap()]);
        b.on_removed(Some("c"));
        let t = heartbeat::targets(&b.shared.lock().unwrap().peers).unwrap();
        let who = |id: &str| heartbeat::Addressee {
            node_id: id.into(),
            boot: boot.into(),
        };
        assert_eq!(
            t,
            vec![
                ("10.0.0.2:7443".parse().unwrap(), who("a")),
                ("10.0.0.3:7443".parse().unwrap(), who("b"))
            ]
        );
        see(&mut b, "d", vec!["fe80::2".parse().unwrap()]);
        assert_eq!(heartbeat::targets(&b.shared.lock().unwrap().peers), None);
    }

    /// At `MAX_PEERS` verified peers, a newcomer takes the place of the longest-lost peer and
    /// is refused (counted) while every peer is present: no present peer is ever evicted.
    #[test]
    fn a_full_peer_table_never_evicts_a_present_peer() {
        let s = ClusterSecret::from_bytes([1; 32]);
        let (mut b, _rx) = browser("me", &s);
        let boot = "bbbbbbbbbbbbbbbb";
        let ip: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap()];
        let see = |b: &mut Browser, id: &str| {
            let full = format!("{id}._rackseed._tcp.local.");
            b.on_resolved(&full, Some(id), &signed(&s, id, boot, 1, "a"), ip.clone())
        };
        for i in 0..MAX_PEERS {
            assert!(matches!(
                see(&mut b, &format!("p{i}")),
                Some(PeerEvent::Seen(_))
            ));
        }
        assert_eq!(see(&mut b, "newcomer"), None);
        assert_eq!(b.shared.lock().unwrap().stats.peers_refused, 1);
        assert!(b.on_removed(Some("p7")).is_some());
        assert!(b.on_removed(Some("p3")).is_some());
        assert!(matches!(see(&mut b, "newcomer"), Some(PeerEvent::Seen(_))));
        let shared = b.shared.lock().unwrap();
        assert_eq!(shared.peers.len(), MAX_PEERS);
        assert!(
            !shared.peers.contains_key("p7"),
            "the longest-lost peer made room"
        );
        assert!(shared.peers.contains_key("p3"));
        assert!(shared.peers.values().filter(|k| k.present).count() == MAX_PEERS - 1);
    }
}
