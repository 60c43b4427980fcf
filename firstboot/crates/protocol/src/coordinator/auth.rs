//! Challenge-response authentication of coordinator requests, and the strict parsing of
//! request bodies. Pure: the time is passed in as a monotonic [`Instant`], nothing here does
//! I/O, so it is property-tested on arbitrary input.
//!
//! A client first fetches a fresh nonce (`GET /v1/nonce`). It then sends the request with
//! three headers: [`HEADER_NODE`] (its node id), [`HEADER_NONCE`] and [`HEADER_AUTH`] =
//! hex HMAC-SHA256 under [`ClusterSecret::coordinator_key`] of a length-prefixed encoding of
//! (nonce, method, path, SHA-256 of the body, node id). The server accepts a nonce once and only
//! within [`NONCE_TTL`] of issuing it, by its own monotonic clock: a captured request replayed
//! later fails because its nonce is gone, and no clock agreement between nodes is needed.
//! A presented nonce is consumed even when the signature is wrong, so a nonce cannot be used
//! for guessing. Only nonces, never application state, change on a rejected request.
//!
//! What the HMAC proves: the sender holds the cluster secret. All nodes share that secret, so
//! it does not prove *which* member sent the request; the node id is the sender's claim.
//!
//! [`ClusterSecret::coordinator_key`]: crate::secret::ClusterSecret::coordinator_key

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::discovery::record::valid_node_id;

pub const HEADER_NODE: &str = "x-rackseed-node";
pub const HEADER_NONCE: &str = "x-rackseed-nonce";
pub const HEADER_AUTH: &str = "x-rackseed-auth";
/// How long an issued nonce stays usable (server's monotonic clock).
pub const NONCE_TTL: Duration = Duration::from_secs(30);
/// Nonces from `GET /v1/nonce` outstanding per client address; more evict that address's
/// oldest.
pub const PUBLIC_NONCES_PER_ADDR: usize = 8;
/// Nonces handed to a verified peer with its answers, outstanding per address.
pub const VERIFIED_NONCES_PER_ADDR: usize = 64;
/// Client addresses holding nonces at once.
pub const MAX_NONCE_ADDRS: usize = 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Body of `POST /v1/message`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest<M> {
    pub message: M,
}

/// Successful response to `POST /v1/message`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageResponse<M> {
    pub replies: Vec<M>,
    /// A fresh nonce for the sender's next request, so that it needs no `GET /v1/nonce`
    /// round trip (issued and expiring like any other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_nonce: Option<String>,
}

/// Response to `GET /v1/nonce`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceResponse {
    pub nonce: String,
}

/// Body of every 4xx/5xx response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
}

/// A refused request: HTTP status and a reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

fn lp(m: &mut Hmac<Sha256>, b: &[u8]) {
    m.update(&(b.len() as u32).to_be_bytes());
    m.update(b);
}

fn request_mac(
    key: &[u8; 32],
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
    node: &str,
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    m.update(b"rackseed/coordinator/v1\0");
    lp(&mut m, nonce.as_bytes());
    lp(&mut m, method.as_bytes());
    lp(&mut m, path.as_bytes());
    lp(&mut m, &Sha256::digest(body));
    lp(&mut m, node.as_bytes());
    m
}

/// The [`HEADER_AUTH`] value for a request.
pub fn sign_request(
    key: &[u8; 32],
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
    node: &str,
) -> String {
    hex::encode(
        request_mac(key, nonce, method, path, body, node)
            .finalize()
            .into_bytes(),
    )
}

/// Outstanding nonces, kept per client address so that a stranger asking for nonces can
/// only ever push out its own.
///
/// Two pools per address: nonces handed out by `GET /v1/nonce` to anyone (at most
/// [`PUBLIC_NONCES_PER_ADDR`], oldest evicted), and nonces handed to a peer with the answer
/// to an authenticated request (at most [`VERIFIED_NONCES_PER_ADDR`]). The table holds at most
/// [`MAX_NONCE_ADDRS`] addresses; when it is full, an address holding only public nonces makes
/// room, never one holding a verified peer's nonces.
#[derive(Debug)]
pub struct NonceStore {
    ttl: Duration,
    max_addrs: usize,
    by_addr: HashMap<IpAddr, AddrNonces>,
}

#[derive(Debug, Default)]
struct AddrNonces {
    public: VecDeque<(String, Instant)>,
    verified: VecDeque<(String, Instant)>,
}

impl AddrNonces {
    fn len(&self) -> usize {
        self.public.len() + self.verified.len()
    }

    fn prune(&mut self, ttl: Duration, now: Instant) {
        for pool in [&mut self.public, &mut self.verified] {
            pool.retain(|(_, at)| now.saturating_duration_since(*at) <= ttl);
        }
    }

    /// Issue time of its newest public nonce (the address to evict first is the one whose
    /// newest request is oldest).
    fn newest_public(&self) -> Option<Instant> {
        self.public.back().map(|(_, at)| *at)
    }
}

/// Which pool a nonce is issued from (see [`NonceStore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceKind {
    /// `GET /v1/nonce`: anyone may ask.
    Public,
    /// With the answer to a request that passed authentication.
    Verified,
}

impl Default for NonceStore {
    fn default() -> Self {
        Self::new(NONCE_TTL, MAX_NONCE_ADDRS)
    }
}

impl NonceStore {
    pub fn new(ttl: Duration, max_addrs: usize) -> Self {
        NonceStore {
            ttl,
            max_addrs: max_addrs.max(1),
            by_addr: HashMap::new(),
        }
    }

    /// Issues a fresh random nonce (32 bytes, hex) for a client at `addr`; `None` when the
    /// table is full of addresses holding verified peers' nonces.
    pub fn issue(&mut self, addr: IpAddr, kind: NonceKind, now: Instant) -> Option<String> {
        if !self.by_addr.contains_key(&addr) && !self.make_room(now) {
            return None;
        }
        let entry = self.by_addr.entry(addr).or_default();
        entry.prune(self.ttl, now);
        let (pool, cap) = match kind {
            NonceKind::Public => (&mut entry.public, PUBLIC_NONCES_PER_ADDR),
            NonceKind::Verified => (&mut entry.verified, VERIFIED_NONCES_PER_ADDR),
        };
        while pool.len() >= cap {
            pool.pop_front();
        }
        let mut b = [0u8; 32];
        rand::fill(&mut b);
        let n = hex::encode(b);
        pool.push_back((n.clone(), now));
        Some(n)
    }

    /// True when `nonce` was issued to `addr`, is unused and not expired. Consumes nothing:
    /// the server checks it before reading a request's body.
    pub fn is_outstanding(&self, addr: IpAddr, nonce: &str, now: Instant) -> bool {
        self.by_addr.get(&addr).is_some_and(|e| {
            e.public
                .iter()
                .chain(e.verified.iter())
                .any(|(n, at)| n == nonce && now.saturating_duration_since(*at) <= self.ttl)
        })
    }

    /// Removes `nonce` from `addr`'s pools; true when it was outstanding and not expired.
    pub fn consume(&mut self, addr: IpAddr, nonce: &str, now: Instant) -> bool {
        let Some(entry) = self.by_addr.get_mut(&addr) else {
            return false;
        };
        let mut found = None;
        for pool in [&mut entry.public, &mut entry.verified] {
            if let Some(i) = pool.iter().position(|(n, _)| n == nonce) {
                found = pool.remove(i).map(|(_, at)| at);
                break;
            }
        }
        if entry.len() == 0 {
            self.by_addr.remove(&addr);
        }
        found.is_some_and(|at| now.saturating_duration_since(at) <= self.ttl)
    }

    /// Outstanding nonces over all addresses (expired ones included until pruned).
    pub fn len(&self) -> usize {
        self.by_addr.values().map(AddrNonces::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Addresses holding nonces.
    pub fn addresses(&self) -> usize {
        self.by_addr.len()
    }

    /// Makes room for one more address: drops expired nonces, then, when still full, the
    /// public-only address whose newest nonce is oldest. False when every address holds a
    /// verified peer's nonces.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.by_addr.len() < self.max_addrs {
            return true;
        }
        let ttl = self.ttl;
        self.by_addr.retain(|_, e| {
            e.prune(ttl, now);
            e.len() > 0
        });
        if self.by_addr.len() < self.max_addrs {
            return true;
        }
        let victim = self
            .by_addr
            .iter()
            .filter(|(_, e)| e.verified.is_empty())
            .min_by_key(|(_, e)| e.newest_public())
            .map(|(a, _)| *a);
        match victim {
            Some(a) => {
                self.by_addr.remove(&a);
                true
            }
            None => false,
        }
    }
}

/// The parts of a request that authentication looks at. Header values are `None` when absent
/// or not valid UTF-8.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// The client's address, as the connection shows it: nonces are bound to it.
    pub from: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub node: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub auth: Option<&'a str>,
    pub body: &'a [u8],
    /// The largest body this route takes: [`MAX_BODY`], or more for the routes that carry
    /// backup archives from an address that authenticated before (the server's choice).
    pub max_body: usize,
}

/// Checks a request's challenge-response; returns the sender's node id.
pub fn authenticate(
    key: &[u8; 32],
    nonces: &mut NonceStore,
    now: Instant,
    req: RequestParts<'_>,
) -> Result<String, Refusal> {
    authenticate_any(&[*key], nonces, now, req)
}

/// [`authenticate`] against several keys (a node accepting an old or a staged secret during a
/// rotation): the nonce is consumed once, and the signature must verify under one of `keys`.
pub fn authenticate_any(
    keys: &[[u8; 32]],
    nonces: &mut NonceStore,
    now: Instant,
    req: RequestParts<'_>,
) -> Result<String, Refusal> {
    let (Some(node), Some(nonce), Some(auth)) = (req.node, req.nonce, req.auth) else {
        return Err(Refusal::new(
            401,
            format!("missing {HEADER_NODE}, {HEADER_NONCE} or {HEADER_AUTH} header; fetch a nonce from GET /v1/nonce and sign the request"),
        ));
    };
    if !valid_node_id(node) {
        return Err(Refusal::new(
            400,
            format!("{HEADER_NODE} is not a valid node id"),
        ));
    }
    if req.body.len() > req.max_body {
        return Err(Refusal::new(
            413,
            format!("body larger than {} bytes", req.max_body),
        ));
    }
    if !nonces.consume(req.from, nonce, now) {
        return Err(Refusal::new(
            401,
            "nonce unknown, expired or already used; fetch a new one",
        ));
    }
    let Ok(sig) = hex::decode(auth) else {
        return Err(Refusal::new(401, format!("{HEADER_AUTH} is not hex")));
    };
    let verified = keys.iter().any(|key| {
        request_mac(key, nonce, req.method, req.path, req.body, node)
            .verify_slice(&sig)
            .is_ok()
    });
    if !verified {
        return Err(Refusal::new(
            401,
            "bad request signature (wrong cluster secret?)",
        ));
    }
    Ok(node.to_string())
}

/// Parses an authenticated `POST /v1/message` body.
pub fn parse_message<M: DeserializeOwned>(body: &[u8]) -> Result<M, Refusal> {
    match serde_json::from_slice::<MessageRequest<M>>(body) {
        Ok(r) => Ok(r.message),
        Err(e) if e.is_data() => Err(Refusal::new(422, format!("invalid message: {e}"))),
        Err(e) => Err(Refusal::new(400, format!("malformed json: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [9; 32];
    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const STRANGER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 66));

    fn parts<'a>(nonce: &'a str, auth: &'a str, body: &'a [u8]) -> RequestParts<'a> {
        RequestParts {
            from: PEER,
            method: "POST",
            path: "/v1/message",
            node: Some("node-a"),
            nonce: Some(nonce),
            auth: Some(auth),
            body,
            max_body: MAX_BODY,
        }
    }

    #[test]
    fn signed_request_passes_once_then_replay_fails() {
        let mut store = NonceStore::default();
        let t0 = Instant::now();
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let body = br#"{"message":1}"#;
        let sig = sign_request(&KEY, &n, "POST", "/v1/message", body, "node-a");
        assert_eq!(
            authenticate(&KEY, &mut store, t0, parts(&n, &sig, body)).unwrap(),
            "node-a"
        );
        let e = authenticate(&KEY, &mut store, t0, parts(&n, &sig, body)).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.reason.contains("nonce"), "{}", e.reason);
    }

    #[test]
    fn the_body_limit_is_the_routes_own() {
        // A backup archive is far over the message limit; the server raises the limit for the
        // backup routes of an address that authenticated before, and authentication must
        // take that limit, not refuse every archive over MAX_BODY.
        let t0 = Instant::now();
        let body = vec![7u8; MAX_BODY + 1];
        let mut store = NonceStore::default();
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let sig = sign_request(&KEY, &n, "POST", "/v1/message", &body, "node-a");
        let e = authenticate(&KEY, &mut store, t0, parts(&n, &sig, &body)).unwrap_err();
        assert_eq!(e.status, 413, "{}", e.reason);
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let sig = sign_request(&KEY, &n, "POST", "/v1/message", &body, "node-a");
        let big = RequestParts {
            max_body: 2 * MAX_BODY,
            ..parts(&n, &sig, &body)
        };
        assert_eq!(authenticate(&KEY, &mut store, t0, big).unwrap(), "node-a");
    }

    #[test]
    fn every_signed_part_matters() {
        let body = br#"{"message":1}"#;
        let t0 = Instant::now();
        type Case<'a> = (&'a str, &'a str, &'a [u8], &'a str, [u8; 32]);
        let cases: [Case; 5] = [
            ("GET", "/v1/message", body, "node-a", KEY),
            ("POST", "/v1/status", body, "node-a", KEY),
            ("POST", "/v1/message", br#"{"message":2}"#, "node-a", KEY),
            ("POST", "/v1/message", body, "node-b", KEY),
            ("POST", "/v1/message", body, "node-a", [1; 32]),
        ];
        for (m, p, b, node, key) in cases {
            let mut store = NonceStore::default();
            let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
            let sig = sign_request(&key, &n, m, p, b, node);
            let e = authenticate(&KEY, &mut store, t0, parts(&n, &sig, body)).unwrap_err();
            assert_eq!(e.status, 401, "{m} {p} {node}");
            assert!(e.reason.contains("signature"));
        }
    }

    #[test]
    fn any_of_several_keys_passes_and_a_stranger_key_consumes_the_nonce() {
        let t0 = Instant::now();
        let body = br#"{"message":1}"#;
        let other = [3u8; 32];
        let mut store = NonceStore::default();
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let sig = sign_request(&other, &n, "POST", "/v1/message", body, "node-a");
        assert_eq!(
            authenticate_any(&[KEY, other], &mut store, t0, parts(&n, &sig, body)).unwrap(),
            "node-a"
        );
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let sig = sign_request(&[4; 32], &n, "POST", "/v1/message", body, "node-a");
        let e = authenticate_any(&[KEY, other], &mut store, t0, parts(&n, &sig, body)).unwrap_err();
        assert_eq!(e.status, 401);
        assert!(!store.is_outstanding(PEER, &n, t0), "the nonce is gone");
    }

    #[test]
    fn nonces_expire_by_monotonic_time_and_are_bounded_per_address() {
        let t0 = Instant::now();
        let mut store = NonceStore::new(Duration::from_secs(30), 3);
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        assert!(!store.consume(PEER, &n, t0 + Duration::from_secs(31)));
        let a = store.issue(PEER, NonceKind::Public, t0).unwrap();
        for _ in 0..PUBLIC_NONCES_PER_ADDR {
            store.issue(PEER, NonceKind::Public, t0).unwrap();
        }
        assert_eq!(store.len(), PUBLIC_NONCES_PER_ADDR);
        assert!(
            !store.consume(PEER, &a, t0),
            "oldest nonce evicted at the cap"
        );
        // Expired nonces are pruned on issue.
        store.issue(PEER, NonceKind::Public, t0 + Duration::from_secs(60));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_nonce_is_good_only_from_the_address_it_was_issued_to() {
        let t0 = Instant::now();
        let mut store = NonceStore::default();
        let n = store.issue(PEER, NonceKind::Public, t0).unwrap();
        assert!(!store.is_outstanding(STRANGER, &n, t0));
        assert!(!store.consume(STRANGER, &n, t0));
        assert!(store.is_outstanding(PEER, &n, t0));
        assert!(store.consume(PEER, &n, t0));
        assert!(!store.is_outstanding(PEER, &n, t0));
    }

    #[test]
    fn a_stranger_flooding_nonce_requests_evicts_no_peer_nonce() {
        let t0 = Instant::now();
        let mut store = NonceStore::new(NONCE_TTL, 4);
        let public = store.issue(PEER, NonceKind::Public, t0).unwrap();
        let verified = store.issue(PEER, NonceKind::Verified, t0).unwrap();
        // One stranger address asking 10,000 times only cycles its own pool.
        for _ in 0..10_000 {
            store.issue(STRANGER, NonceKind::Public, t0).unwrap();
        }
        assert!(store.is_outstanding(PEER, &public, t0));
        // Strangers on many addresses fill the table: public-only addresses make room for
        // each other; the peer holding a verified nonce is never pushed out.
        for i in 0..1_000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i));
            let _ = store.issue(
                addr,
                NonceKind::Public,
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert!(store.addresses() <= 4);
        assert!(store.consume(PEER, &verified, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn body_parsing_is_strict_and_explains() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Claim {
            #[allow(dead_code)]
            term: u64,
        }
        assert!(parse_message::<Claim>(br#"{"message":{"term":3}}"#).is_ok());
        let e = parse_message::<Claim>(br#"{"message":{"term":3,"x":1}}"#).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.reason.contains("unknown field"), "{}", e.reason);
        let e = parse_message::<Claim>(br#"{"message":{"term":3}, "extra":1}"#).unwrap_err();
        assert_eq!(e.status, 422);
        let e = parse_message::<Claim>(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_requests_never_panic_and_never_pass_without_the_key(
            method in "[A-Z]{0,8}",
            path in "[ -~]{0,40}",
            node in proptest::option::of("[ -~]{0,60}"),
            nonce in proptest::option::of("[0-9a-f]{0,70}"),
            use_real_nonce in any::<bool>(),
            auth in proptest::option::of("[ -~]{0,70}"),
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let t0 = Instant::now();
            let mut store = NonceStore::default();
            let real = store.issue(PEER, NonceKind::Public, t0).unwrap();
            let nonce = if use_real_nonce { Some(real.clone()) } else { nonce };
            let r = authenticate(&KEY, &mut store, t0, RequestParts {
                from: PEER, method: &method, path: &path, node: node.as_deref(),
                nonce: nonce.as_deref(), auth: auth.as_deref(), body: &body,
                max_body: MAX_BODY,
            });
            prop_assert!(r.is_err());
            let r = r.unwrap_err();
            prop_assert!((400..500).contains(&r.status));
            let _ = parse_message::<serde_json::Value>(&body);
        }

        #[test]
        fn arbitrary_json_bodies_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            v in proptest::collection::btree_map("[a-z]{0,8}", any::<i64>(), 0..5),
        ) {
            let _ = parse_message::<serde_json::Value>(&body);
            let wrapped = serde_json::to_vec(&v).unwrap();
            let _ = parse_message::<u64>(&wrapped);
            let _ = parse_message::<MessageRequest<String>>(&wrapped);
        }
    }
}
