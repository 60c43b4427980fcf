//! The signed announcement record: what a node puts in its mDNS TXT record, and the strict
//! decoder that turns a received TXT record back into verified fields. Pure: no sockets, no
//! clock, no `mdns_sd` types, so it is property-tested on arbitrary input.
//!
//! Wire format (TXT key/value pairs, in this order):
//!
//! | key    | value                                                                   |
//! |--------|-------------------------------------------------------------------------|
//! | `v`    | protocol version, [`PROTOCOL_VERSION`]                                  |
//! | `c`    | cluster tag ([`ClusterSecret::cluster_tag`], 16 hex; not the name)      |
//! | `id`   | node id; must equal the service instance name (both are signed)        |
//! | `p`    | coordinator TCP port                                                    |
//! | `fp`   | hex SHA-256 of the coordinator certificate (DER), 64 lowercase hex      |
//! | `n`    | boot counter: persisted, one higher at each agent start (decimal `u64`) |
//! | `b`    | per-boot random id, 16 lowercase hex                                    |
//! | `s`    | announcement sequence number within this boot (decimal `u64`)           |
//! | `a.K`  | application field `K` (formation core's payload), any number, in order  |
//! | `sig`  | HMAC-SHA256 under [`ClusterSecret::announcement_key`], 64 lowercase hex |
//!
//! The HMAC covers a canonical encoding of the instance name and every other pair sorted by
//! key (each length-prefixed), so no field can be changed, dropped, added or moved to another
//! instance without breaking it. Nothing secret is in the record.
//!
//! Order of one node's records: the boot counter `n` first (a record of an older boot never
//! displaces the current one, whatever it arrives after), then, within one counter, the
//! sequence number of the same boot id (see [`ReplayGuard`]).
//!
//! Version 2 added `n`. A version-1 agent drops version-2 records as `WrongVersion` (and a
//! version-2 agent drops version-1 records the same way): agents of both versions on one LAN
//! ignore each other, counted, so a cluster is built from one agent version.
//!
//! The node id follows the one rule of [`NodeId`] (the formation crate's), and this record is
//! the only place it travels: the application fields carry no id of their own.
//!
//! To add a fixed field: give it a short key, add it to [`FIXED_KEYS`], encode it in
//! [`encode_record`] and validate it in [`decode_record`]; bump [`PROTOCOL_VERSION`] when old
//! nodes would misread it.
//!
//! [`ClusterSecret::cluster_tag`]: crate::secret::ClusterSecret::cluster_tag
//! [`ClusterSecret::announcement_key`]: crate::secret::ClusterSecret::announcement_key

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use hmac::{Hmac, Mac};
use rackseed_formation::{NodeId, NodeIdError};
use sha2::Sha256;

/// Version of this record format; records with another version are dropped.
pub const PROTOCOL_VERSION: &str = "2";
/// Prefix of application field keys in the TXT record.
pub const APP_PREFIX: &str = "a.";
/// Keys of the fixed (non-application) fields, signature excluded.
pub const FIXED_KEYS: [&str; 8] = ["v", "c", "id", "p", "fp", "n", "b", "s"];
/// Longest node id (it is also a DNS label and part of the host name).
pub const MAX_NODE_ID_LEN: usize = NodeId::MAX_LEN;
/// Longest application key (without the `a.` prefix).
pub const MAX_APP_KEY_LEN: usize = 32;
/// Longest `key=value` TXT string (DNS limits one string to 255 bytes).
pub const MAX_PAIR_LEN: usize = 250;
/// Cap on the whole encoded TXT record, so one announcement fits one mDNS packet.
pub const MAX_TXT_LEN: usize = 1000;
/// Most application fields in one record.
pub const MAX_APP_FIELDS: usize = 24;

/// The fixed, non-secret identity fields of one announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub cluster_tag: String,
    pub node_id: String,
    pub port: u16,
    pub fingerprint: String,
    /// The node's boot counter: persisted, one higher at each agent start.
    pub boot_counter: u64,
    /// This boot's random id.
    pub boot: String,
    pub seq: u64,
}

/// A record whose signature, cluster tag and fields all checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub header: RecordHeader,
    /// Application fields, keys without the `a.` prefix.
    pub fields: BTreeMap<String, String>,
}

/// Why a received record was dropped. Each kind has its own counter in the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// Missing or different protocol version (a foreign or newer service of the same type).
    WrongVersion,
    /// Another cluster's tag (a different secret).
    WrongCluster,
    /// No `sig` field.
    MissingSignature,
    /// `sig` present but does not match (tampered, or forged without the secret).
    BadSignature,
    /// Signed correctly but a field is out of range or missing (a bug in the sender).
    Malformed,
    /// Older (boot counter, boot, seq) than one already accepted from that node: a replay.
    Replayed,
    /// A different boot announces our own node id (cloned machine-id?).
    OwnIdConflict,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::WrongVersion => "wrong protocol version",
            Rejection::WrongCluster => "another cluster's tag",
            Rejection::MissingSignature => "missing signature",
            Rejection::BadSignature => "bad signature",
            Rejection::Malformed => "malformed fields",
            Rejection::Replayed => "replayed (older boot counter/boot/seq than already accepted)",
            Rejection::OwnIdConflict => "another machine announces our node id",
        }
    }
}

/// Errors building a record from local input (a caller bug, reported before anything is sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    NodeId(#[from] NodeIdError),
    #[error("announcement field key {0:?} is not 1 to 32 printable ASCII characters without '=' or spaces")]
    FieldKey(String),
    #[error("announcement field {0:?} appears twice")]
    DuplicateField(String),
    #[error(
        "announcement field {key:?} is too long ({len} bytes as key=value; at most {MAX_PAIR_LEN})"
    )]
    FieldTooLong { key: String, len: usize },
    #[error("announcement has {0} fields; at most {MAX_APP_FIELDS}")]
    TooManyFields(usize),
    #[error("announcement TXT record would be {0} bytes; at most {MAX_TXT_LEN}")]
    TooLarge(usize),
    #[error("fingerprint {0:?} is not 64 lowercase hex characters")]
    Fingerprint(String),
}

/// Whether `id` is a node id: the one rule, [`NodeId::check`], for ids kept as text.
pub fn valid_node_id(id: &str) -> bool {
    NodeId::check(id).is_ok()
}

fn valid_app_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_APP_KEY_LEN
        && k.bytes().all(|b| b.is_ascii_graphic() && b != b'=')
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn canonical_bytes(instance: &str, pairs: &BTreeMap<&str, &str>) -> Vec<u8> {
    fn lp(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut out = b"rackseed/announce/v2\0".to_vec();
    lp(&mut out, instance.as_bytes());
    for (k, v) in pairs {
        lp(&mut out, k.as_bytes());
        lp(&mut out, v.as_bytes());
    }
    out
}

fn mac(key: &[u8; 32]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length")
}

/// Builds the TXT pairs for one announcement, signature last. The instance name is the
/// node id.
pub fn encode_record(
    key: &[u8; 32],
    header: &RecordHeader,
    fields: &[(String, String)],
) -> Result<Vec<(String, String)>, RecordError> {
    NodeId::check(&header.node_id)?;
    if !is_lower_hex(&header.fingerprint, 64) {
        return Err(RecordError::Fingerprint(header.fingerprint.clone()));
    }
    if fields.len() > MAX_APP_FIELDS {
        return Err(RecordError::TooManyFields(fields.len()));
    }
    let mut pairs: Vec<(String, String)> = vec![
        ("v".into(), PROTOCOL_VERSION.into()),
        ("c".into(), header.cluster_tag.clone()),
        ("id".into(), header.node_id.clone()),
        ("p".into(), header.port.to_string()),
        ("fp".into(), header.fingerprint.clone()),
        ("n".into(), header.boot_counter.to_string()),
        ("b".into(), header.boot.clone()),
        ("s".into(), header.seq.to_string()),
    ];
    let mut seen = HashSet::new();
    for (k, v) in fields {
        if !valid_app_key(k) {
            return Err(RecordError::FieldKey(k.clone()));
        }
        if !seen.insert(k.as_str()) {
            return Err(RecordError::DuplicateField(k.clone()));
        }
        let len = APP_PREFIX.len() + k.len() + 1 + v.len();
        if len > MAX_PAIR_LEN {
            return Err(RecordError::FieldTooLong {
                key: k.clone(),
                len,
            });
        }
        pairs.push((format!("{APP_PREFIX}{k}"), v.clone()));
    }
    let sorted: BTreeMap<&str, &str> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut m = mac(key);
    m.update(&canonical_bytes(&header.node_id, &sorted));
    pairs.push(("sig".into(), hex::encode(m.finalize().into_bytes())));
    let total: usize = pairs.iter().map(|(k, v)| 1 + k.len() + 1 + v.len()).sum();
    if total > MAX_TXT_LEN {
        return Err(RecordError::TooLarge(total));
    }
    Ok(pairs)
}

/// Decodes and verifies one received record. `instance` is the service instance label,
/// `pairs` the TXT strings in wire order (`None` value = a key without `=`). Never panics.
pub fn decode_record(
    key: &[u8; 32],
    cluster_tag: &str,
    instance: &str,
    pairs: &[(String, Option<Vec<u8>>)],
) -> Result<VerifiedRecord, Rejection> {
    if pairs.len() > FIXED_KEYS.len() + MAX_APP_FIELDS + 1 {
        return Err(Rejection::Malformed);
    }
    let mut map: BTreeMap<&str, &str> = BTreeMap::new();
    let mut lower = HashSet::new();
    let mut malformed = false;
    for (k, v) in pairs {
        let v = match v.as_deref().map(std::str::from_utf8) {
            Some(Ok(v)) => v,
            _ => {
                malformed = true;
                continue;
            }
        };
        // DNS TXT keys compare case-insensitively: two spellings of one key are ambiguous.
        if !lower.insert(k.to_ascii_lowercase()) {
            malformed = true;
            continue;
        }
        map.insert(k.as_str(), v);
    }
    if map.get("v") != Some(&PROTOCOL_VERSION) {
        return Err(Rejection::WrongVersion);
    }
    if map.get("c") != Some(&cluster_tag) {
        return Err(Rejection::WrongCluster);
    }
    let Some(sig) = map.remove("sig") else {
        return Err(Rejection::MissingSignature);
    };
    let Ok(sig) = hex::decode(sig) else {
        return Err(Rejection::BadSignature);
    };
    let mut m = mac(key);
    m.update(&canonical_bytes(instance, &map));
    if m.verify_slice(&sig).is_err() {
        return Err(Rejection::BadSignature);
    }
    if malformed {
        return Err(Rejection::Malformed);
    }
    let field = |k: &str| map.get(k).copied().ok_or(Rejection::Malformed);
    let node_id = field("id")?;
    if !valid_node_id(node_id) || node_id != instance {
        return Err(Rejection::Malformed);
    }
    let port: u16 = field("p")?.parse().map_err(|_| Rejection::Malformed)?;
    let fingerprint = field("fp")?;
    let boot = field("b")?;
    if port == 0 || !is_lower_hex(fingerprint, 64) || !is_lower_hex(boot, 16) {
        return Err(Rejection::Malformed);
    }
    let boot_counter = decimal_u64(field("n")?)?;
    let seq = decimal_u64(field("s")?)?;
    let mut fields = BTreeMap::new();
    for (k, v) in &map {
        if let Some(app) = k.strip_prefix(APP_PREFIX) {
            if !valid_app_key(app) {
                return Err(Rejection::Malformed);
            }
            fields.insert(app.to_string(), v.to_string());
        } else if !FIXED_KEYS.contains(k) {
            return Err(Rejection::Malformed);
        }
    }
    Ok(VerifiedRecord {
        header: RecordHeader {
            cluster_tag: cluster_tag.to_string(),
            node_id: node_id.to_string(),
            port,
            fingerprint: fingerprint.to_string(),
            boot_counter,
            boot: boot.to_string(),
            seq,
        },
        fields,
    })
}

/// A decimal `u64` as the encoder writes it: digits only (no sign, no spaces).
fn decimal_u64(text: &str) -> Result<u64, Rejection> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::Malformed);
    }
    text.parse().map_err(|_| Rejection::Malformed)
}

/// Verdict of the [`ReplayGuard`] on a verified record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than anything accepted from this node (or the first record, a higher boot
    /// counter, or a new boot id under the same counter).
    Newer,
    /// The record already accepted last (an mDNS refresh or cache re-read).
    Same,
    /// A lower boot counter, an older seq in the current boot, or a boot id this node has
    /// already moved on from under the same counter.
    Stale,
}

/// Boot ids remembered per node under one boot counter (see [`ReplayGuard`]).
const BOOTS_REMEMBERED: usize = 16;
/// Nodes tracked; beyond this the least recently updated entry is forgotten.
const NODES_TRACKED: usize = 4096;

#[derive(Debug, Default)]
struct NodeHistory {
    boot_counter: u64,
    boot: String,
    seq: u64,
    /// Boot ids left under `boot_counter` (emptied when the counter moves on).
    past_boots: VecDeque<String>,
    touched: u64,
}

/// Orders signed records per node id by (boot counter, boot, seq) without any clock.
///
/// The boot counter decides which boot is current: the agent persists it and raises it at
/// each start before it announces, and it is signed. A record with a lower counter than the
/// highest accepted from that node is stale, whatever order records arrive in, so a recording
/// of an earlier boot can never displace (hide) the live one, also after this observer
/// restarted: the live node's next record carries the higher counter and wins for good.
///
/// Within one counter the rule is the one from before counters: a lower `seq` of the same boot
/// id is stale; another boot id under the same counter (only when a node lost its counter
/// file's last write, or a clone) is newer unless the node already left it: the guard
/// remembers the last 16 (`BOOTS_REMEMBERED`) boot ids left under the current counter.
///
/// What it does not prevent: replaying the *latest* record (it is simply the same record, and
/// may resurrect a peer after it was lost until its TTL runs out). Announcements are only
/// hints to the formation core; safety decisions go through the authenticated coordinator.
///
/// A node whose counter file is lost (re-flashed under the same node id: an inventory MAC id
/// or a kept machine id, its state directory gone) starts again at the clock's Unix seconds
/// ([`advance_boot_counter`]): its earlier life started from the clock too and rose once per
/// agent start, far fewer times than seconds passed since, so the new counter is higher and
/// observers take its records as newer at once. Only a clock still behind at that first
/// start (a Pi without RTC before NTP) gives a lower counter; such a node is held stale by an
/// observer that saw a higher counter, until that observer restarts.
///
/// [`advance_boot_counter`]: crate::discovery::advance_boot_counter
#[derive(Debug, Default)]
pub struct ReplayGuard {
    nodes: HashMap<String, NodeHistory>,
    clock: u64,
}

impl ReplayGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of nodes tracked (at most 4096, `NODES_TRACKED`).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True before the first record.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Judges `(boot_counter, boot, seq)` from `node_id` and records it when it is newer.
    pub fn check(&mut self, node_id: &str, boot_counter: u64, boot: &str, seq: u64) -> Freshness {
        use std::cmp::Ordering;
        self.clock += 1;
        let clock = self.clock;
        if !self.nodes.contains_key(node_id) && self.nodes.len() >= NODES_TRACKED {
            if let Some(oldest) = self
                .nodes
                .iter()
                .min_by_key(|(_, h)| h.touched)
                .map(|(k, _)| k.clone())
            {
                self.nodes.remove(&oldest);
            }
        }
        let h = self.nodes.entry(node_id.to_string()).or_default();
        let verdict = if h.boot.is_empty() {
            Freshness::Newer
        } else {
            match boot_counter.cmp(&h.boot_counter) {
                Ordering::Less => Freshness::Stale,
                Ordering::Greater => {
                    h.past_boots.clear();
                    Freshness::Newer
                }
                Ordering::Equal if h.boot == boot => match seq.cmp(&h.seq) {
                    Ordering::Greater => Freshness::Newer,
                    Ordering::Equal => Freshness::Same,
                    Ordering::Less => Freshness::Stale,
                },
                Ordering::Equal if h.past_boots.iter().any(|b| b == boot) => Freshness::Stale,
                Ordering::Equal => {
                    if h.past_boots.len() == BOOTS_REMEMBERED {
                        h.past_boots.pop_front();
                    }
                    h.past_boots.push_back(h.boot.clone());
                    Freshness::Newer
                }
            }
        };
        if verdict == Freshness::Newer {
            h.boot_counter = boot_counter;
            h.boot = boot.to_string();
            h.seq = seq;
        }
        h.touched = clock;
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [3; 32];
    const TAG: &str = "0123456789abcdef";

    fn header(id: &str, seq: u64) -> RecordHeader {
        RecordHeader {
            cluster_tag: TAG.into(),
            node_id: id.into(),
            port: 7443,
            fingerprint: "ab".repeat(32),
            boot_counter: 7,
            boot: "00112233445566ff".into(),
            seq,
        }
    }

    fn to_wire(pairs: &[(String, String)]) -> Vec<(String, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone().into_bytes())))
            .collect()
    }

    fn fields() -> Vec<(String, String)> {
        vec![
            ("phase".into(), "electing".into()),
            ("prio".into(), "10".into()),
        ]
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let pairs = encode_record(&KEY, &header("node-a", 5), &fields()).unwrap();
        let rec = decode_record(&KEY, TAG, "node-a", &to_wire(&pairs)).unwrap();
        assert_eq!(rec.header, header("node-a", 5));
        assert_eq!(rec.fields.get("phase").unwrap(), "electing");
        assert_eq!(rec.fields.len(), 2);
    }

    #[test]
    fn wire_order_does_not_matter_but_every_byte_does() {
        let pairs = encode_record(&KEY, &header("node-a", 5), &fields()).unwrap();
        let mut rev = pairs.clone();
        rev.reverse();
        assert!(decode_record(&KEY, TAG, "node-a", &to_wire(&rev)).is_ok());
        for i in 0..pairs.len() - 1 {
            let mut t = pairs.clone();
            t[i].1.push('0');
            let r = decode_record(&KEY, TAG, "node-a", &to_wire(&t)).unwrap_err();
            assert!(
                matches!(
                    r,
                    Rejection::BadSignature | Rejection::WrongVersion | Rejection::WrongCluster
                ),
                "tampering with {} gave {r:?}",
                t[i].0
            );
            let mut dropped = pairs.clone();
            dropped.remove(i);
            assert!(decode_record(&KEY, TAG, "node-a", &to_wire(&dropped)).is_err());
        }
    }

    #[test]
    fn record_moved_to_another_instance_is_rejected() {
        let pairs = encode_record(&KEY, &header("node-a", 5), &fields()).unwrap();
        assert_eq!(
            decode_record(&KEY, TAG, "node-b", &to_wire(&pairs)).unwrap_err(),
            Rejection::BadSignature
        );
    }

    #[test]
    fn other_secret_other_tag_and_missing_signature_are_told_apart() {
        let pairs = encode_record(&KEY, &header("node-a", 1), &fields()).unwrap();
        assert_eq!(
            decode_record(&[4; 32], TAG, "node-a", &to_wire(&pairs)).unwrap_err(),
            Rejection::BadSignature
        );
        assert_eq!(
            decode_record(&KEY, "ffffffffffffffff", "node-a", &to_wire(&pairs)).unwrap_err(),
            Rejection::WrongCluster
        );
        let unsigned: Vec<_> = pairs.iter().filter(|(k, _)| k != "sig").cloned().collect();
        assert_eq!(
            decode_record(&KEY, TAG, "node-a", &to_wire(&unsigned)).unwrap_err(),
            Rejection::MissingSignature
        );
        assert_eq!(
            decode_record(&KEY, TAG, "node-a", &[]).unwrap_err(),
            Rejection::WrongVersion
        );
    }

    #[test]
    fn duplicate_keys_in_any_case_are_malformed() {
        let pairs = encode_record(&KEY, &header("node-a", 1), &fields()).unwrap();
        let mut w = to_wire(&pairs);
        w.push(("A.PHASE".into(), Some(b"joined".to_vec())));
        assert!(decode_record(&KEY, TAG, "node-a", &w).is_err());
    }

    #[test]
    fn bad_local_input_is_refused_before_sending() {
        assert!(matches!(
            encode_record(&KEY, &header("node a", 1), &[]),
            Err(RecordError::NodeId(_))
        ));
        let dup = vec![("x".into(), "1".into()), ("x".into(), "2".into())];
        assert!(matches!(
            encode_record(&KEY, &header("n", 1), &dup),
            Err(RecordError::DuplicateField(_))
        ));
        let eq = vec![("a=b".into(), "1".into())];
        assert!(matches!(
            encode_record(&KEY, &header("n", 1), &eq),
            Err(RecordError::FieldKey(_))
        ));
        let long = vec![("x".into(), "y".repeat(300))];
        assert!(matches!(
            encode_record(&KEY, &header("n", 1), &long),
            Err(RecordError::FieldTooLong { .. })
        ));
        let many: Vec<_> = (0..8).map(|i| (format!("k{i}"), "v".repeat(200))).collect();
        assert!(matches!(
            encode_record(&KEY, &header("n", 1), &many),
            Err(RecordError::TooLarge(_))
        ));
    }

    #[test]
    fn replay_guard_orders_seq_and_remembers_left_boots() {
        let mut g = ReplayGuard::new();
        assert_eq!(g.check("a", 1, "b1", 3), Freshness::Newer);
        assert_eq!(g.check("a", 1, "b1", 3), Freshness::Same);
        assert_eq!(g.check("a", 1, "b1", 2), Freshness::Stale);
        assert_eq!(g.check("a", 1, "b1", 4), Freshness::Newer);
        // A reboot: higher counter, new boot id, seq restarts.
        assert_eq!(g.check("a", 2, "b2", 0), Freshness::Newer);
        // The earlier boot's records are now replays, whatever their seq.
        assert_eq!(g.check("a", 1, "b1", 99), Freshness::Stale);
        assert_eq!(g.check("a", 2, "b2", 1), Freshness::Newer);
        // Other nodes are independent.
        assert_eq!(g.check("b", 1, "b1", 0), Freshness::Newer);
        assert_eq!(g.len(), 2);
    }

    /// The attack of finding 1: a recording of an earlier boot that this observer never saw
    /// (new boot id, any seq) must not displace the current boot.
    #[test]
    fn a_never_seen_older_boot_never_displaces_the_current_one() {
        let mut g = ReplayGuard::new();
        assert_eq!(g.check("x", 5, "cur", 1), Freshness::Newer);
        for (old_counter, seq) in [(4, 1), (4, u64::MAX), (1, 0), (0, 7)] {
            assert_eq!(
                g.check("x", old_counter, "old", seq),
                Freshness::Stale,
                "counter {old_counter} seq {seq}"
            );
        }
        // The live boot goes on unhindered.
        assert_eq!(g.check("x", 5, "cur", 1), Freshness::Same);
        assert_eq!(g.check("x", 5, "cur", 2), Freshness::Newer);
    }

    /// After an observer restart the replay may arrive first; the live record then wins for
    /// good and the replay stays refused.
    #[test]
    fn a_replay_seen_first_is_superseded_by_the_live_boot() {
        let mut g = ReplayGuard::new();
        assert_eq!(g.check("x", 1, "old", 9), Freshness::Newer);
        assert_eq!(g.check("x", 2, "cur", 1), Freshness::Newer);
        assert_eq!(g.check("x", 1, "old", 9), Freshness::Stale);
        assert_eq!(g.check("x", 1, "old", 10), Freshness::Stale);
        assert_eq!(g.check("x", 2, "cur", 1), Freshness::Same);
    }

    /// Within one counter the earlier rule holds: a new boot id is newer, a left one stale.
    /// A higher counter forgets the boot ids left under the lower one.
    #[test]
    fn within_one_counter_boot_ids_follow_the_earlier_rule() {
        let mut g = ReplayGuard::new();
        assert_eq!(g.check("x", 3, "b1", 5), Freshness::Newer);
        assert_eq!(g.check("x", 3, "b2", 0), Freshness::Newer);
        assert_eq!(g.check("x", 3, "b1", 6), Freshness::Stale);
        assert_eq!(
            g.check("x", 4, "b1", 0),
            Freshness::Newer,
            "a higher counter"
        );
        assert_eq!(g.check("x", 3, "b2", 9), Freshness::Stale);
    }

    #[test]
    fn the_boot_counter_is_signed_and_must_be_decimal() {
        let pairs = encode_record(&KEY, &header("node-a", 1), &fields()).unwrap();
        assert!(pairs.contains(&("n".to_string(), "7".to_string())));
        // Changing the counter breaks the signature.
        let mut raised = pairs.clone();
        raised.iter_mut().find(|(k, _)| k == "n").unwrap().1 = "8".into();
        assert_eq!(
            decode_record(&KEY, TAG, "node-a", &to_wire(&raised)).unwrap_err(),
            Rejection::BadSignature
        );
        // A signed record without a counter, or with a non-decimal one, is malformed.
        for bad in [
            None,
            Some("-1"),
            Some(" 7"),
            Some(""),
            Some("99999999999999999999"),
        ] {
            let mut p: BTreeMap<&str, String> = pairs
                .iter()
                .filter(|(k, _)| k != "sig" && k != "n")
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            if let Some(b) = bad {
                p.insert("n", b.to_string());
            }
            let sorted: BTreeMap<&str, &str> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut m = mac(&KEY);
            m.update(&canonical_bytes("node-a", &sorted));
            let mut wire: Vec<(String, String)> =
                p.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            wire.push(("sig".into(), hex::encode(m.finalize().into_bytes())));
            assert_eq!(
                decode_record(&KEY, TAG, "node-a", &to_wire(&wire)).unwrap_err(),
                Rejection::Malformed,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_version_1_record_is_a_wrong_version() {
        let mut pairs = encode_record(&KEY, &header("node-a", 1), &fields()).unwrap();
        pairs.iter_mut().find(|(k, _)| k == "v").unwrap().1 = "1".into();
        assert_eq!(
            decode_record(&KEY, TAG, "node-a", &to_wire(&pairs)).unwrap_err(),
            Rejection::WrongVersion
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn decoder_never_panics_on_arbitrary_pairs(
            instance in ".{0,60}",
            pairs in proptest::collection::vec(
                (".{0,12}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80))),
                0..40),
        ) {
            let _ = decode_record(&KEY, TAG, &instance, &pairs);
        }

        #[test]
        fn decoder_rejects_mutated_valid_records(
            seq in any::<u64>(),
            app in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,40}", 0..6),
            idx in any::<prop::sample::Index>(),
            junk in "[ -~]{1,8}",
        ) {
            let f: Vec<(String, String)> = app.into_iter().collect();
            let pairs = encode_record(&KEY, &header("node-x", seq), &f).unwrap();
            let wire = to_wire(&pairs);
            let rec = decode_record(&KEY, TAG, "node-x", &wire).unwrap();
            prop_assert_eq!(rec.header.seq, seq);
            prop_assert_eq!(rec.fields.len(), f.len());
            let mut bad = pairs.clone();
            let i = idx.index(bad.len());
            bad[i].1.push_str(&junk);
            prop_assert!(decode_record(&KEY, TAG, "node-x", &to_wire(&bad)).is_err());
        }

        #[test]
        fn decoder_accepts_signed_garbage_only_as_malformed_or_valid(
            extra in proptest::collection::vec(("[ -~]{0,10}", "[ -~]{0,20}"), 0..6),
        ) {
            // A sender with the key but buggy fields: must never panic, and any accepted
            // record has a valid node id and fingerprint.
            let mut pairs: Vec<(&str, String)> =
                vec![("v", PROTOCOL_VERSION.into()), ("c", TAG.into())];
            for (k, v) in &extra { pairs.push((k.as_str(), v.clone())); }
            let sorted: BTreeMap<&str, &str> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut m = mac(&KEY);
            m.update(&canonical_bytes("n", &sorted));
            let mut wire: Vec<(String, Option<Vec<u8>>)> = sorted
                .iter().map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec()))).collect();
            wire.push(("sig".into(), Some(hex::encode(m.finalize().into_bytes()).into_bytes())));
            if let Ok(rec) = decode_record(&KEY, TAG, "n", &wire) {
                prop_assert!(valid_node_id(&rec.header.node_id));
                prop_assert_eq!(rec.header.fingerprint.len(), 64);
            }
        }
    }
}
