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
//! To extend: new fixed fields go into [`record`]; new per-peer data the core needs goes into
//! the application fields, not here.

pub mod record;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use crate::secret::ClusterSecret;
use rackseed_formation::NodeId;
use record::{Freshness, RecordHeader, Rejection, ReplayGuard};

/// Default service type.
pub const SERVICE_TYPE: &str = "_rackseed._tcp.local.";

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
}

struct Shared {
    stats: DiscoveryStats,
    seq: u64,
    shut: bool,
    /// The peer table, by node id.
    peers: BTreeMap<String, KnownPeer>,
}

/// One entry of the peer table.
struct KnownPeer {
    /// The latest verified record, as last reported.
    peer: Peer,
    /// False once the record was lost (until it is seen again).
    present: bool,
}

impl Shared {
    fn new() -> Self {
        Shared {
            stats: DiscoveryStats::default(),
            seq: 0,
            shut: false,
            peers: BTreeMap::new(),
        }
    }
}

/// Handle of a running discovery. Dropping it shuts discovery down.
pub struct Discovery {
    daemon: ServiceDaemon,
    cfg: Arc<Settings>,
    shared: Arc<Mutex<Shared>>,
}

struct Settings {
    key: [u8; 32],
    tag: String,
    node_id: String,
    port: u16,
    fingerprint: String,
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
        NodeId::check(&cfg.node_id).map_err(record::RecordError::from)?;
        if !(cfg.service_type.ends_with("._tcp.local.")
            || cfg.service_type.ends_with("._udp.local."))
        {
            return Err(DiscoveryError::ServiceType(cfg.service_type));
        }
        if cfg.interfaces == InterfaceChoice::Named(Vec::new()) {
            return Err(DiscoveryError::NoInterfaces);
        }
        let mut boot = [0u8; 8];
        rand::fill(&mut boot);
        let settings = Arc::new(Settings {
            key: cfg.secret.announcement_key(),
            tag: cfg.secret.cluster_tag(),
            node_id: cfg.node_id.clone(),
            port: cfg.port,
            fingerprint: cfg.fingerprint.clone(),
            boot: hex::encode(boot),
            service_type: cfg.service_type.clone(),
            ipv6: cfg.ipv6,
        });
        // Validate the fixed fields now rather than at the first announce.
        record::encode_record(&settings.key, &settings.header(0), &[])?;

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
        let events = match setup() {
            Ok(ev) => ev,
            Err(e) => {
                let _ = daemon.shutdown();
                return Err(DiscoveryError::Daemon(e.to_string()));
            }
        };
        let shared = Arc::new(Mutex::new(Shared::new()));
        let (tx, rx) = mpsc::channel(256);
        let mut browser = Browser {
            cfg: settings.clone(),
            shared: shared.clone(),
            guard: ReplayGuard::new(),
            logged: HashSet::new(),
            tx,
        };
        tokio::spawn(async move {
            while let Ok(ev) = events.recv_async().await {
                if !browser.handle(ev).await {
                    break;
                }
            }
            tracing::debug!("mdns browser stopped");
        });
        Ok((
            Discovery {
                daemon,
                cfg: settings,
                shared,
            },
            rx,
        ))
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
        let pairs = record::encode_record(&c.key, &c.header(seq), &fields)?;
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
    fn header(&self, seq: u64) -> RecordHeader {
        RecordHeader {
            cluster_tag: self.tag.clone(),
            node_id: self.node_id.clone(),
            port: self.port,
            fingerprint: self.fingerprint.clone(),
            boot: self.boot.clone(),
            seq,
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
    tx: mpsc::Sender<PeerEvent>,
}

impl Browser {
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
            ServiceEvent::ServiceRemoved(_, fullname) => {
                self.on_removed(instance_label(&fullname, &self.cfg.service_type))
            }
            _ => None,
        };
        match out {
            Some(e) => self.tx.send(e).await.is_ok(),
            None => !self.tx.is_closed(),
        }
    }

    fn on_resolved(
        &mut self,
        fullname: &str,
        instance: Option<&str>,
        pairs: &[(String, Option<Vec<u8>>)],
        addrs: Vec<IpAddr>,
    ) -> Option<PeerEvent> {
        let c = self.cfg.clone();
        let verdict = record::decode_record(&c.key, &c.tag, instance.unwrap_or(""), pairs)
            .and_then(|rec| {
                if rec.header.node_id == c.node_id {
                    return if rec.header.boot == c.boot {
                        Ok(None)
                    } else {
                        Err(Rejection::OwnIdConflict)
                    };
                }
                match self
                    .guard
                    .check(&rec.header.node_id, &rec.header.boot, rec.header.seq)
                {
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
                return None;
            }
        };
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
        let known = KnownPeer {
            peer,
            present: true,
        };
        shared.peers.insert(known.peer.node_id.clone(), known);
        Some(event)
    }

    /// The service of instance `instance` went away: its peer (if one was seen) is lost. The
    /// table keeps its record, marked lost.
    fn on_removed(&mut self, instance: Option<&str>) -> Option<PeerEvent> {
        let mut shared = self.shared.lock().expect("discovery state lock");
        let known = shared.peers.get_mut(instance?)?;
        if !known.present {
            return None;
        }
        known.present = false;
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
        let b = Browser {
            cfg: Arc::new(Settings {
                key: secret.announcement_key(),
                tag: secret.cluster_tag(),
                node_id: node_id.into(),
                port: 1,
                fingerprint: "00".repeat(32),
                boot: "aaaaaaaaaaaaaaaa".into(),
                service_type: SERVICE_TYPE.into(),
                ipv6: false,
            }),
            shared: Arc::new(Mutex::new(Shared::new())),
            guard: ReplayGuard::new(),
            logged: HashSet::new(),
            tx,
        };
        (b, rx)
    }

    fn signed(
        secret: &ClusterSecret,
        id: &str,
        boot: &str,
        seq: u64,
        phase: &str,
    ) -> Vec<(String, Option<Vec<u8>>)> {
        let h = RecordHeader {
            cluster_tag: secret.cluster_tag(),
            node_id: id.into(),
            port: 7443,
            fingerprint: "cd".repeat(32),
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
}
