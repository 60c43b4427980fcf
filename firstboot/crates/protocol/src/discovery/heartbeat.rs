//! Direct heartbeats: a node's "still here" as one small signed UDP datagram per peer, instead
//! of a new mDNS announcement (a formed member's, and one's still forming while its
//! announcement does not change: the agent's `driver/cadence.rs` decides which beat goes how).
//!
//! Why: a member used to prove it was alive by re-publishing its signed mDNS record every
//! third of the peer timeout. Each re-publication is two multicast packets (mdns-sd repeats
//! every announcement a second later, RFC 6762 8.3) with four records each, and in
//! mdns-sd 0.21.7 every received record costs far more than its parsing:
//!
//! - `Zeroconf::handle_response` pushes two timers per received record (its expiry and its
//!   80 % refresh time) onto the daemon's timer heap, also for a record it already had, and a
//!   changed TXT record flushes the previous one to expire a second later (RFC 6762 10.2): so
//!   one heartbeat packet wakes the daemon at arrival, after 1 s, after 96 s and 120 s (the
//!   SRV and A records' refresh and expiry, TTL 120 s), and after 3,600 s and 4,500 s (PTR and
//!   TXT, TTL 4,500 s); the heap keeps every one of those instants until it passes;
//! - after every wakeup, `Zeroconf::run` calls `refresh_active_services` (through
//!   `DnsCache::refresh_due_ptr`, `refresh_due_srv_txt` and `refresh_due_hosts`, which call
//!   `DnsRecord::refresh_maybe` on every cached record of every browsed instance, with a
//!   `String` hash lookup each) and `evict_expired_services`, so each wakeup costs in
//!   proportion to the number of peers (~300 µs at 49 peers measured here).
//!
//! (Read in `src/service_daemon.rs`, `src/dns_cache.rs`, `src/dns_parser.rs` and
//! `src/service_info.rs` (`DNS_HOST_TTL` 120, `DNS_OTHER_TTL` 4,500, no public TTL setter) of
//! mdns-sd 0.21.7, the version in Cargo.lock.) So a member's idle load grew with peers ×
//! heartbeat rate × peers. A datagram to each peer's agent costs its receiver one socket read
//! and one HMAC, and leaves no timer behind.
//!
//! What stays on mDNS: everything discovery is for. A member's record stays published and is
//! re-published on every change, and at least every [`MDNS_REFRESH`] while nothing changes
//! (well before mdns-sd's queriers would ask for the SRV and A records again, at 80 % of
//! their 120-second TTL), so newcomers still find it with one query and its record never
//! expires in a peer's cache. A node still forming announces each phase change over mDNS at
//! once, as before, and beats directly while it waits.
//!
//! Wire format: the line `rackseed-heartbeat/1`, then the fixed fields of a signed record
//! ([`super::record`]: `v`, `c`, `id`, `p`, `fp`, `n`, `b`, `s`), the addressee as two
//! application fields (`a.to`: the receiver's node id, `a.tb`: the receiver's boot id, as its
//! own verified record announces them), then `sig`, one `key=value` a line, at most
//! [`MAX_DATAGRAM`] bytes. It is signed with a key of
//! its own, derived from the announcement key ([`heartbeat_key`]), so a heartbeat can never
//! pass for an mDNS announcement or the other way round. `s` counts heartbeats within the
//! boot (apart from the announcements' sequence numbers) and is checked by a
//! [`ReplayGuard`] of its own: only a newer heartbeat counts, so a recorded one replayed later
//! proves nothing.
//!
//! The replay guard lives in memory, so it alone cannot stop a replay to a receiver that
//! restarted since the recording (a rogue replaying a dead member's last mDNS announcement and
//! then its recorded heartbeats would refresh it once per heartbeat, and a restarted slot
//! authority starts its liveness clocks afresh: the dead member's removal would wait). So
//! every heartbeat names, under its signature, the one receiver it is for and that receiver's
//! boot id (random per start): a receiver accepts only heartbeats addressed to itself in its
//! current boot. A recording therefore proves nothing to any later boot of its receiver, nor
//! to another peer that missed it (counted as replays). The cost is one HMAC per peer per
//! beat. A receiver that restarted gets heartbeats again once its peers have its new record
//! (it announces at start); until then it hears them over mDNS as any newcomer does.
//!
//! A heartbeat is accepted only from a peer already verified through its mDNS record, and only
//! for the boot (boot counter and boot id), port and fingerprint of that record: it refreshes
//! the peer (reported as [`PeerEvent::Updated`], or [`PeerEvent::Seen`] when its record had
//! been lost) with the fields of its latest record; it never changes them. It goes to the
//! port the peer signed as its coordinator port, over UDP (IPv4: MicroK8s joins need IPv4
//! anyway; a peer without an IPv4 address makes [`super::Discovery::heartbeat`] fail, and the
//! agent announces over mDNS instead).
//!
//! Compatibility: an agent without direct heartbeats still hears a member's mDNS refresh every
//! [`MDNS_REFRESH`], within the default 90-second peer timeout.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use super::record::{self, Freshness, RecordHeader, Rejection, ReplayGuard};
use super::{KnownPeer, PeerEvent, Settings, Shared};
use crate::secret::Keyring;

/// First line of every heartbeat datagram.
pub const MAGIC: &str = "rackseed-heartbeat/1";
/// Largest heartbeat datagram accepted (a real one is about 300 bytes).
pub const MAX_DATAGRAM: usize = 512;
/// How often a member re-publishes its mDNS record while nothing changes (see the module
/// docs): under 80 % of mdns-sd's 120-second SRV/A TTL, so no peer ever needs to ask.
pub const MDNS_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// Distinct (source, reason) pairs logged; beyond this, drops are only counted.
const LOG_ONCE_CAP: usize = 256;

/// Counters of direct heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Sends the kernel refused (unreachable network, full buffer).
    pub send_errors: u64,
    /// Heartbeats accepted (each refreshed a known peer).
    pub accepted: u64,
    /// Datagrams that failed the checks (garbage, bad signature, another cluster...).
    pub rejected: u64,
    /// Replayed or duplicated heartbeats.
    pub replayed: u64,
    /// Valid heartbeats from nodes not (yet) in the peer table, or from another boot, port
    /// or certificate than their record's.
    pub unmatched: u64,
}

/// The key heartbeats are signed with: HMAC-SHA256 of a fixed label under the announcement
/// key (domain separation from the mDNS records).
pub fn heartbeat_key(announcement_key: &[u8; 32]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(announcement_key).expect("hmac takes any key");
    m.update(b"rackseed/heartbeat/v1");
    m.finalize().into_bytes().into()
}

/// Whom a heartbeat is for: the receiver's node id and its boot id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressee {
    pub node_id: String,
    pub boot: String,
}

/// One heartbeat datagram for `header` (its `seq` is the heartbeat's number), addressed to
/// `to` in its current boot.
pub fn encode(
    announcement_key: &[u8; 32],
    header: &RecordHeader,
    to: &Addressee,
) -> Result<Vec<u8>, record::RecordError> {
    let fields = [
        ("to".to_string(), to.node_id.clone()),
        ("tb".to_string(), to.boot.clone()),
    ];
    let pairs = record::encode_record(&heartbeat_key(announcement_key), header, &fields)?;
    let mut out = format!("{MAGIC}\n").into_bytes();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses and verifies one datagram with the accepted key its cluster tag names; returns the
/// sender's header and whom it was addressed to. Never panics.
pub fn decode(
    keyring: &Keyring,
    now: std::time::Instant,
    datagram: &[u8],
) -> Result<(RecordHeader, Addressee), Rejection> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Rejection::Malformed);
    }
    let text = std::str::from_utf8(datagram).map_err(|_| Rejection::Malformed)?;
    let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
    if lines.next() != Some(MAGIC) {
        return Err(Rejection::WrongVersion);
    }
    let mut pairs: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for line in lines {
        let (k, v) = line.split_once('=').ok_or(Rejection::Malformed)?;
        pairs.push((k.to_string(), Some(v.as_bytes().to_vec())));
        if pairs.len() > record::FIXED_KEYS.len() + 3 {
            return Err(Rejection::Malformed);
        }
    }
    let field = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let keys = field("c")
        .and_then(|tag| keyring.for_tag(tag, now))
        .unwrap_or_else(|| keyring.current());
    let id = field("id").unwrap_or("");
    let rec = record::decode_record(
        &heartbeat_key(keys.announcement_key()),
        keys.tag(),
        id,
        &pairs,
    )?;
    let mut fields = rec.fields;
    let (Some(node_id), Some(boot)) = (fields.remove("to"), fields.remove("tb")) else {
        return Err(Rejection::Malformed);
    };
    if !fields.is_empty() {
        return Err(Rejection::Malformed);
    }
    Ok((rec.header, Addressee { node_id, boot }))
}

/// Receives heartbeats: verifies them and refreshes the peers in the peer table.
pub(super) struct Receiver {
    cfg: Arc<Settings>,
    shared: Arc<Mutex<Shared>>,
    guard: ReplayGuard,
    logged: HashSet<(IpAddr, Rejection)>,
    tx: mpsc::Sender<PeerEvent>,
}

impl Receiver {
    pub(super) fn new(
        cfg: Arc<Settings>,
        shared: Arc<Mutex<Shared>>,
        tx: mpsc::Sender<PeerEvent>,
    ) -> Self {
        Receiver {
            cfg,
            shared,
            guard: ReplayGuard::new(),
            logged: HashSet::new(),
            tx,
        }
    }

    /// Reads datagrams until `stop` is notified or the event receiver is gone.
    pub(super) async fn run(mut self, sock: tokio::net::UdpSocket, stop: Arc<tokio::sync::Notify>) {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            let (n, from) = tokio::select! {
                _ = stop.notified() => break,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "heartbeat socket read failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if let Some(ev) = self.on_datagram(from, &buf[..n]) {
                if self.tx.send(ev).await.is_err() {
                    break;
                }
            } else if self.tx.is_closed() {
                break;
            }
        }
        tracing::debug!("heartbeat receiver stopped");
    }

    /// Handles one datagram from `from`; the event for the driver, if it refreshed a peer.
    pub(super) fn on_datagram(&mut self, from: SocketAddr, data: &[u8]) -> Option<PeerEvent> {
        let (header, to) = match decode(&self.cfg.keyring, std::time::Instant::now(), data) {
            Ok(x) => x,
            Err(r) => {
                self.shared
                    .lock()
                    .expect("discovery state lock")
                    .hb
                    .rejected += 1;
                self.log_once(from.ip(), r);
                return None;
            }
        };
        if header.node_id == self.cfg.node_id {
            return None;
        }
        let mut guard = self.shared.lock().expect("discovery state lock");
        let shared = &mut *guard;
        // Addressed to another node, or to an earlier boot of this one: a recording replayed
        // (see the module docs). Genuine, so not a rejection; never a refresh.
        if to.node_id != self.cfg.node_id || to.boot != self.cfg.boot {
            shared.hb.replayed += 1;
            return None;
        }
        // Matched against the record first, so a heartbeat of another boot never moves the
        // replay guard on (it would hold the record's boot stale).
        let Some(known) = shared
            .peers
            .get_mut(&header.node_id)
            .filter(|k| matches_record(k, &header))
        else {
            shared.hb.unmatched += 1;
            return None;
        };
        let freshness = self.guard.check(
            &header.node_id,
            header.boot_counter,
            &header.boot,
            header.seq,
        );
        if freshness != Freshness::Newer {
            shared.hb.replayed += 1;
            return None;
        }
        shared.hb.accepted += 1;
        if known.present {
            return Some(PeerEvent::Updated(known.peer.clone()));
        }
        tracing::info!(peer = %header.node_id, "peer seen again (heartbeat)");
        known.present = true;
        shared.clock += 1;
        known.changed = shared.clock;
        Some(PeerEvent::Seen(known.peer.clone()))
    }

    fn log_once(&mut self, ip: IpAddr, r: Rejection) {
        if self.logged.len() < LOG_ONCE_CAP && self.logged.insert((ip, r)) {
            tracing::warn!(
                from = %ip,
                reason = r.as_str(),
                "ignoring heartbeat datagram (logged once per source and reason)"
            );
        }
    }
}

/// Whether a verified heartbeat belongs to the boot, port and certificate of the peer's record.
fn matches_record(known: &KnownPeer, h: &RecordHeader) -> bool {
    known.boot_counter == h.boot_counter
        && known.boot == h.boot
        && known.peer.port == h.port
        && known.peer.fingerprint == h.fingerprint
}

/// Where heartbeats to the present peers of `peers` go and whom each is for: each one's first
/// IPv4 address and signed coordinator port, its node id and the boot id of its latest record;
/// `None` when a present peer has no IPv4 address.
pub(super) fn targets(peers: &BTreeMap<String, KnownPeer>) -> Option<Vec<(SocketAddr, Addressee)>> {
    peers
        .iter()
        .filter(|(_, k)| k.present)
        .map(|(id, k)| {
            k.peer.addrs.iter().find(|a| a.is_ipv4()).map(|ip| {
                (
                    SocketAddr::new(*ip, k.peer.port),
                    Addressee {
                        node_id: id.clone(),
                        boot: k.boot.clone(),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::ClusterSecret;
    use std::time::Instant;

    fn header(id: &str, boot: &str, seq: u64) -> RecordHeader {
        RecordHeader {
            cluster_tag: ClusterSecret::from_bytes([1; 32]).cluster_tag(),
            node_id: id.into(),
            port: 7443,
            fingerprint: "cd".repeat(32),
            boot_counter: 1,
            boot: boot.into(),
            seq,
        }
    }

    fn to() -> Addressee {
        Addressee {
            node_id: "me".into(),
            boot: "aaaaaaaaaaaaaaaa".into(),
        }
    }

    fn ring() -> Keyring {
        Keyring::new(ClusterSecret::from_bytes([1; 32]))
    }

    #[test]
    fn a_heartbeat_round_trips_and_any_change_breaks_it() {
        let r = ring();
        let key = *r.current().announcement_key();
        let h = header("peer", "bbbbbbbbbbbbbbbb", 7);
        let d = encode(&key, &h, &to()).unwrap();
        assert!(d.len() <= MAX_DATAGRAM, "{} bytes", d.len());
        assert_eq!(decode(&r, Instant::now(), &d), Ok((h.clone(), to())));
        // The longest node ids on both ends still fit one datagram.
        let long = "n".repeat(record::MAX_NODE_ID_LEN);
        let far = Addressee {
            node_id: long.clone(),
            boot: "f".repeat(16),
        };
        let big_d = encode(&key, &header(&long, "bbbbbbbbbbbbbbbb", u64::MAX), &far).unwrap();
        assert!(big_d.len() <= MAX_DATAGRAM, "{} bytes", big_d.len());
        // Every single-byte change is refused (or, never, decodes to something else).
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x01;
            match decode(&r, Instant::now(), &bad) {
                Err(_) => {}
                Ok(got) => assert_eq!(got, (h.clone(), to()), "flip at {i}"),
            }
        }
        // Another cluster's secret: refused.
        let other = Keyring::new(ClusterSecret::from_bytes([2; 32]));
        assert_eq!(
            decode(&other, Instant::now(), &d),
            Err(Rejection::WrongCluster)
        );
        // Garbage and oversize: refused without panicking.
        assert!(decode(&r, Instant::now(), b"").is_err());
        assert!(decode(&r, Instant::now(), &[0xff; 40]).is_err());
        let mut big = d.clone();
        big.resize(MAX_DATAGRAM + 1, b'x');
        assert_eq!(decode(&r, Instant::now(), &big), Err(Rejection::Malformed));
    }

    /// Domain separation: a heartbeat's fields as a TXT record fail the announcement check,
    /// and an announcement's TXT fields as a heartbeat fail the heartbeat check.
    #[test]
    fn heartbeats_and_announcements_never_pass_for_each_other() {
        let r = ring();
        let key = *r.current().announcement_key();
        let h = header("peer", "bbbbbbbbbbbbbbbb", 3);
        let d = encode(&key, &h, &to()).unwrap();
        let text = std::str::from_utf8(&d).unwrap();
        let pairs: Vec<(String, Option<Vec<u8>>)> = text
            .lines()
            .skip(1)
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), Some(v.as_bytes().to_vec()))
            })
            .collect();
        assert_eq!(
            record::decode_record(&key, r.current().tag(), "peer", &pairs),
            Err(Rejection::BadSignature)
        );
        let ann = record::encode_record(&key, &h, &[]).unwrap();
        let mut as_hb = format!("{MAGIC}\n");
        for (k, v) in ann {
            as_hb.push_str(&format!("{k}={v}\n"));
        }
        assert_eq!(
            decode(&r, Instant::now(), as_hb.as_bytes()),
            Err(Rejection::BadSignature)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, .. Default::default() })]

        /// Arbitrary datagrams, also ones that start like a heartbeat: never a panic, never
        /// accepted.
        #[test]
        fn arbitrary_datagrams_are_never_accepted(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            magic in proptest::prelude::any::<bool>(),
        ) {
            let r = ring();
            let mut d = if magic { format!("{MAGIC}\n").into_bytes() } else { Vec::new() };
            d.extend_from_slice(&body);
            proptest::prop_assert!(decode(&r, Instant::now(), &d).is_err());
        }
    }
}
