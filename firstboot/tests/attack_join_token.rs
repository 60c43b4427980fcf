//! Attack on the trust path (root; network namespaces; the MicroK8s simulator): "the MicroK8s
//! join token can be captured by a LAN host without the secret".
//!
//! Three agents form a cluster while a rogue machine on the same bridge, without the cluster
//! secret, does what a LAN host can do to get the token:
//!
//! 1. It browses `_rackseed._tcp.local.` (mdns-sd) and, for every node host name it sees
//!    (`rackseed-<id>.local.`), announces an A record of its own for that name every 400 ms:
//!    it registers a `_rogue-relay._tcp.local.` service with mdns-sd whose host name is the
//!    node's and whose address is one of the rogue's (no probing), so every announcement
//!    carries the forged A record with the cache-flush bit, and the rogue also answers
//!    queries for the name. The rogue holds the lab's lowest addresses (lab hosts 0..3, moved
//!    onto host 0), and an agent reaches a peer at its lowest IPv4 address, so coordinator
//!    traffic goes to the rogue whenever the forged record is in an agent's cache.
//! 2. On each of those addresses it relays the node's coordinator port (the one the node's
//!    signed record names) byte for byte to the real node, so pinned TLS and the HMAC pass
//!    through it, and it keeps every byte in both directions.
//! 3. It listens on port 25000 on all its addresses as a fake MicroK8s cluster agent: a client
//!    that opens with a TLS record gets a TLS server with the rogue's own self-signed
//!    certificate, any other client is read as plain TCP; every byte a client sends after the
//!    handshake (or at all, for plain TCP) is kept.
//!
//! The cluster must still form, the token must be in none of the rogue's bytes, every join must
//! name a real node's address and that node's certificate fingerprint, and nothing may list the
//! rogue as a member. A control then shows that the rogue's recorder does catch a token when a
//! client skips the fingerprint check (`--skip-verify`), so "no token seen" is not the recorder
//! being deaf. The rogue's agent refusing a join with the real seed's fingerprint is the
//! simulator's own attack test (`tests/microk8s-sim/tests/join_tls.rs`), not repeated here.
//!
//! Bounded: the rogue announces at most [`MAX_ANNOUNCE_ROUNDS`] rounds, keeps at most
//! [`CAPTURE_CAP`] bytes per connection and direction, and reads a fake-agent connection for at
//! most 5 s; formation waits at most 120 s, as the other agent tests. Needs root and iproute2
//! and fails loudly without them. Run: `cargo test -p firstboot --test attack_join_token`.

mod agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::{argv, AgentCluster, AgentNode, ClusterSpec};
use firstboot::system::microk8s::parse::parse_cert_fingerprint;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use netns_lab::{Host, Lab};
use rackseed_host::command::Cmd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVICE: &str = "_rackseed._tcp.local.";
/// Lab hosts 0..ROGUE_HOSTS give their addresses to the rogue (one per node it impersonates).
const ROGUE_HOSTS: usize = 3;
const NODES: usize = 3;
const ANNOUNCE_EVERY: Duration = Duration::from_millis(400);
const MAX_ANNOUNCE_ROUNDS: u32 = 450;
const CAPTURE_CAP: usize = 1 << 20;
const FORMATION_BOUND: Duration = Duration::from_secs(120);

/// One connection through the rogue's coordinator relay.
#[derive(Debug, Clone)]
struct Relayed {
    via: SocketAddr,
    client: SocketAddr,
    to: SocketAddr,
    /// Client to node, node to client (the first [`CAPTURE_CAP`] bytes each).
    up: Vec<u8>,
    down: Vec<u8>,
    up_total: u64,
    down_total: u64,
    connect_error: Option<String>,
}

/// One connection to the rogue's fake cluster agent on port 25000.
#[derive(Debug)]
struct AgentConn {
    client: SocketAddr,
    tls: bool,
    handshake: Result<(), String>,
    /// What the client sent after the handshake (plain TCP: everything).
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct RogueLog {
    /// Node host name -> (the rogue address announced for it, the node's real address, port).
    spoofed: BTreeMap<String, (Ipv4Addr, Ipv4Addr, u16)>,
    /// Forged A-record announcements sent (one per spoofed name per round).
    announcements: u64,
    relayed: Vec<Relayed>,
    agent_conns: Vec<AgentConn>,
    problems: Vec<String>,
}

struct Rogue {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<RogueLog>>,
    handle: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Rogue {
    /// Starts the rogue in `host`'s namespace with `addrs` (all on its eth0); returns once it
    /// browses and its fake cluster agent listens.
    fn start(host: &Host, addrs: Vec<Ipv4Addr>) -> Rogue {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(RogueLog::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, log2) = (stop.clone(), log.clone());
        let handle = host.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_rogue(addrs, log2, stop2, ready_tx))
        });
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!(
                "the rogue did not start: {:?}",
                handle.join().map(|r| r.map_err(|e| format!("{e:#}")))
            );
        }
        Rogue { stop, log, handle }
    }

    fn finish(self) -> RogueLog {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .expect("the rogue thread panicked")
            .expect("the rogue failed");
        Arc::try_unwrap(self.log)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|arc| std::mem::take(&mut *arc.lock().unwrap()))
    }
}

fn lock(log: &Mutex<RogueLog>) -> std::sync::MutexGuard<'_, RogueLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_rogue(
    addrs: Vec<Ipv4Addr>,
    log: Arc<Mutex<RogueLog>>,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let agent = TcpListener::bind(("0.0.0.0", 25000)).await?;
    tokio::spawn(fake_cluster_agent(agent, rogue_tls()?, log.clone()));
    let daemon = ServiceDaemon::new()?;
    daemon.disable_interface(IfKind::IPv6)?;
    let events = daemon.browse(SERVICE)?;
    let _ = ready.send(());
    let mut free = addrs.iter().copied();
    let mut forged: Vec<ServiceInfo> = Vec::new();
    let mut rounds = 0u32;
    let mut next_round = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Ok(ServiceEvent::ServiceResolved(svc))) =
            tokio::time::timeout(Duration::from_millis(100), events.recv_async()).await
        {
            let host = svc.host.clone();
            let real = svc
                .addresses
                .iter()
                .filter_map(|a| match a.to_ip_addr() {
                    IpAddr::V4(v4) if !addrs.contains(&v4) => Some(v4),
                    _ => None,
                })
                .min();
            let known = lock(&log).spoofed.contains_key(&host);
            if let (false, Some(real)) = (known, real) {
                let Some(via) = free.next() else {
                    lock(&log)
                        .problems
                        .push(format!("no rogue address left for {host}"));
                    continue;
                };
                let port = svc.port;
                let listener = TcpListener::bind((via, port)).await?;
                tokio::spawn(relay(listener, SocketAddr::from((real, port)), log.clone()));
                let none: &[(&str, &str)] = &[];
                let mut info = ServiceInfo::new(
                    "_rogue-relay._tcp.local.",
                    &format!("relay-{}", forged.len()),
                    &host,
                    via.to_string().as_str(),
                    port,
                    none,
                )?;
                info.set_requires_probe(false);
                forged.push(info);
                lock(&log).spoofed.insert(host, (via, real, port));
                next_round = tokio::time::Instant::now();
            }
        }
        if tokio::time::Instant::now() >= next_round && rounds < MAX_ANNOUNCE_ROUNDS {
            for info in &forged {
                daemon.register(info.clone())?;
            }
            rounds += 1;
            lock(&log).announcements += forged.len() as u64;
            next_round = tokio::time::Instant::now() + ANNOUNCE_EVERY;
        }
    }
    let _ = daemon.shutdown();
    Ok(())
}

/// A TLS acceptor with the rogue's own self-signed certificate.
fn rogue_tls() -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    let ck = rcgen::generate_simple_self_signed(vec!["rogue.local".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Reads what a client sends for at most 5 s (until EOF or error).
async fn read_for_a_while(mut s: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        let room = CAPTURE_CAP.saturating_sub(got.len());
        got.extend_from_slice(&chunk[..n.min(room)]);
    }
    got
}

/// The fake cluster agent: TLS for clients whose first byte is a TLS handshake record, plain
/// TCP for the others; every connection is recorded.
async fn fake_cluster_agent(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    log: Arc<Mutex<RogueLog>>,
) {
    loop {
        let Ok((tcp, client)) = listener.accept().await else {
            continue;
        };
        let (tls, log) = (tls.clone(), log.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout(Duration::from_secs(5), tcp.peek(&mut first)).await;
            let is_tls = matches!(peeked, Ok(Ok(1))) && first[0] == 0x16;
            let (handshake, bytes) = if is_tls {
                match tokio::time::timeout(Duration::from_secs(5), tls.accept(tcp)).await {
                    Ok(Ok(s)) => (Ok(()), read_for_a_while(s).await),
                    Ok(Err(e)) => (Err(e.to_string()), Vec::new()),
                    Err(_) => (Err("handshake timed out".to_owned()), Vec::new()),
                }
            } else {
                (Ok(()), read_for_a_while(tcp).await)
            };
            lock(&log).agent_conns.push(AgentConn {
                client,
                tls: is_tls,
                handshake,
                bytes,
            });
        });
    }
}

/// Relays every connection to `listener` byte for byte to `to`, recording both directions.
async fn relay(listener: TcpListener, to: SocketAddr, log: Arc<Mutex<RogueLog>>) {
    let via = listener.local_addr().expect("relay address");
    loop {
        let Ok((client, from)) = listener.accept().await else {
            continue;
        };
        let idx = {
            let mut l = lock(&log);
            l.relayed.push(Relayed {
                via,
                client: from,
                to,
                up: Vec::new(),
                down: Vec::new(),
                up_total: 0,
                down_total: 0,
                connect_error: None,
            });
            l.relayed.len() - 1
        };
        let log = log.clone();
        tokio::spawn(async move {
            let server =
                match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(to)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        lock(&log).relayed[idx].connect_error = Some(e.to_string());
                        return;
                    }
                    Err(_) => {
                        lock(&log).relayed[idx].connect_error = Some("timed out".to_owned());
                        return;
                    }
                };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(
                pump(cr, sw, &log, idx, true),
                pump(sr, cw, &log, idx, false)
            );
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: &Mutex<RogueLog>,
    idx: usize,
    up: bool,
) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut l = lock(log);
            let r = &mut l.relayed[idx];
            let (kept, total) = if up {
                (&mut r.up, &mut r.up_total)
            } else {
                (&mut r.down, &mut r.down_total)
            };
            *total += n as u64;
            let room = CAPTURE_CAP.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn ip(args: &[&str]) {
    Cmd::new("ip", Duration::from_secs(20))
        .args(args)
        .run_blocking()
        .unwrap_or_else(|e| panic!("ip {}: {e:#}", args.join(" ")));
}

/// Moves the addresses of lab hosts 1..ROGUE_HOSTS onto host 0's eth0: one rogue machine with
/// the lab's lowest addresses. Returns them, lowest first.
fn give_the_rogue_the_spare_addresses(lab: &Lab) -> Vec<Ipv4Addr> {
    let rogue = lab.host(0);
    let mut addrs = vec![rogue.addr];
    for i in 1..ROGUE_HOSTS {
        let h = lab.host(i);
        let cidr = format!("{}/24", h.addr);
        ip(&["-n", &h.ns, "addr", "del", &cidr, "dev", "eth0"]);
        ip(&["-n", &rogue.ns, "addr", "add", &cidr, "dev", "eth0"]);
        addrs.push(h.addr);
    }
    addrs
}

/// The simulator's command log redacts join connection strings; the test's own copy of each
/// one comes from the node's `bin/microk8s` wrapper, which appends `$2` of every `join` to
/// `join-connections.log` in the node's folder before running the simulator.
fn record_join_connections(nodes: &[AgentNode]) {
    for n in nodes {
        let wrapper = n.dir.join("bin/microk8s");
        let text = std::fs::read_to_string(&wrapper).unwrap();
        let hook = format!(
            "#!/bin/sh\nif [ \"$1\" = join ]; then printf '%s\\n' \"$2\" >> '{}'; fi\n",
            n.dir.join("join-connections.log").display()
        );
        assert!(text.starts_with("#!/bin/sh\n"), "{text}");
        std::fs::write(&wrapper, text.replacen("#!/bin/sh\n", &hook, 1)).unwrap();
    }
}

fn join_connections(nodes: &[AgentNode]) -> Vec<(usize, String)> {
    nodes
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(n.dir.join("join-connections.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| (n.index, l.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The sha256 of node `n`'s cluster agent certificate (`certs/server.crt` in its folder, the
/// simulator's `$SNAP_DATA`).
fn cert_fingerprint(n: &AgentNode) -> String {
    let path = n.dir.join("certs/server.crt");
    let pem = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_cert_fingerprint(&pem).unwrap()
}

/// Where a needle occurs in a haystack, if anywhere.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_lan_host_without_the_secret_never_captures_the_join_token() {
    netns_lab::require_root("the join-token attack").unwrap();
    let plain_s = AgentCluster::formation_seconds(NODES, FORMATION_BOUND);

    let spec = ClusterSpec::default();
    let token = spec.secret.microk8s_token();
    let mut c = AgentCluster::after_spare_hosts(ROGUE_HOSTS, NODES, spec);
    let rogue_addrs = give_the_rogue_the_spare_addresses(&c.lab);
    record_join_connections(&c.nodes);
    let node_addrs: BTreeSet<Ipv4Addr> = c.nodes.iter().map(|n| n.addr).collect();
    assert!(
        rogue_addrs.iter().all(|r| node_addrs.iter().all(|n| r < n)),
        "the rogue must hold the lowest addresses: {rogue_addrs:?} vs {node_addrs:?}"
    );
    let rogue = Rogue::start(c.lab.host(0), rogue_addrs.clone());
    let t = Instant::now();
    c.start_all();
    let docs = c.wait_formed(&[0, 1, 2], 3, FORMATION_BOUND);
    let attacked_s = t.elapsed().as_secs_f64();

    // What the rogue and the simulator saw during formation, before the control below adds
    // its own join.
    let records = c.commands();
    let connections = join_connections(&c.nodes);
    let (spoofed, announcements, relayed, agent_conns) = {
        let l = lock(&rogue.log);
        assert!(
            l.relayed.iter().all(|r| r.connect_error.is_none()),
            "the relay could not reach a node: {:?}",
            l.relayed
                .iter()
                .filter_map(|r| r.connect_error.as_ref())
                .collect::<Vec<_>>()
        );
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        (
            l.spoofed.clone(),
            l.announcements,
            l.relayed.clone(),
            l.agent_conns.len(),
        )
    };

    // Formed: one cluster of the three nodes, three voters, all at real node addresses.
    let ids: BTreeSet<String> = docs.iter().map(|d| d.node_id.clone()).collect();
    assert_eq!(ids.len(), NODES, "{ids:?}");
    let clusters: BTreeSet<_> = docs.iter().map(|d| d.cluster.clone()).collect();
    assert_eq!(clusters.len(), 1, "one cluster: {clusters:?}");
    for d in &docs {
        let members: BTreeSet<String> = d.members.iter().map(|m| m.node_id.clone()).collect();
        assert_eq!(
            members, ids,
            "{} lists other members: {:?}",
            d.node_id, d.members
        );
        let voters = &d.microk8s.as_ref().expect("microk8s view").voters;
        assert_eq!(voters.len(), 3, "{voters:?}");
        for v in voters {
            let host: Ipv4Addr = v
                .rsplit_once(':')
                .and_then(|(h, _)| h.parse().ok())
                .unwrap_or_else(|| panic!("voter {v} is not ip:port"));
            assert!(
                node_addrs.contains(&host),
                "{} lists voter {v}, not a node's address",
                d.node_id
            );
        }
    }

    // The attack was in place: every node's host name was forged to a rogue address whose
    // relay leads to that node.
    for (i, d) in docs.iter().enumerate() {
        let name = format!("rackseed-{}.local.", d.node_id);
        let (via, real, port) = spoofed
            .get(&name)
            .unwrap_or_else(|| panic!("the rogue never forged {name}: {spoofed:?}"));
        assert_eq!(*real, c.nodes[i].addr, "{name}");
        assert!(rogue_addrs.contains(via));
        assert_eq!(*port, 7443);
    }

    // The token is in none of the rogue's bytes: not through the relay, not on 25000.
    let (raw, upper) = (hex::decode(&token).unwrap(), token.to_uppercase());
    let needles: [&[u8]; 3] = [token.as_bytes(), upper.as_bytes(), &raw];
    let (mut up, mut down) = (0u64, 0u64);
    for r in &relayed {
        up += r.up_total;
        down += r.down_total;
        for (dir, bytes) in [("client to node", &r.up), ("node to client", &r.down)] {
            for n in needles {
                assert!(
                    find(bytes, n).is_none(),
                    "the token crossed the relay {} -> {} -> {} ({dir}) in clear",
                    r.client,
                    r.via,
                    r.to
                );
            }
        }
    }
    {
        let l = lock(&rogue.log);
        for conn in &l.agent_conns {
            for n in needles {
                assert!(
                    find(&conn.bytes, n).is_none(),
                    "the rogue's cluster agent received the token from {}: {conn:?}",
                    conn.client
                );
            }
        }
    }

    // Every join went to a real node's cluster agent with that node's fingerprint.
    let rogue_ips: Vec<String> = rogue_addrs.iter().map(ToString::to_string).collect();
    let joins: Vec<Vec<String>> = records
        .iter()
        .filter(|r| r["program"] == "microk8s" && r["event"] == "start")
        .map(argv)
        .filter(|a| a.first().map(String::as_str) == Some("join"))
        .collect();
    assert!(
        joins.len() >= NODES - 1,
        "two joiners, at least two joins: {joins:?}"
    );
    for a in &joins {
        let conn = a.get(1).map(String::as_str).unwrap_or_default();
        let host = conn.split(':').next().unwrap_or_default();
        assert!(
            node_addrs.iter().any(|n| n.to_string() == host)
                && !rogue_ips.iter().any(|r| r == host),
            "a join went to {conn}, not a node's address"
        );
        assert!(conn.starts_with(&format!("{host}:25000/")), "{a:?}");
    }
    assert_eq!(
        connections.len(),
        joins.len(),
        "the wrapper saw every join the simulator logged: {connections:?}"
    );
    for (joiner, conn) in &connections {
        let parts: Vec<&str> = conn.split('/').collect();
        let [hostport, tok, fp] = parts[..] else {
            panic!(
                "node-{joiner} joined with {} parts, not IP:25000/TOKEN/FINGERPRINT",
                parts.len()
            );
        };
        let (host, port) = hostport.split_once(':').expect("IP:PORT");
        assert_eq!(port, "25000");
        let seed = c
            .nodes
            .iter()
            .find(|n| n.addr.to_string() == host)
            .unwrap_or_else(|| panic!("node-{joiner} joined {host}, not a node's address"));
        assert_ne!(seed.index, *joiner, "node-{joiner} joined itself");
        assert!(tok == token, "node-{joiner} joined with another token");
        assert!(
            fp.len() >= 12 && fp.bytes().all(|b| b.is_ascii_hexdigit()),
            "node-{joiner}'s fingerprint {fp:?} is not 12+ hex"
        );
        assert!(
            cert_fingerprint(seed).starts_with(&fp.to_lowercase()),
            "node-{joiner} joined {host} with a fingerprint that is not node-{}'s certificate",
            seed.index
        );
    }

    let peer_rows: Vec<String> = docs
        .iter()
        .flat_map(|d| {
            d.peers
                .iter()
                .map(move |p| format!("{} sees {} at {}", d.node_id, p.node_id, p.address))
        })
        .collect();
    eprintln!(
        "rogue: forged {} names ({announcements} A-record announcements), relayed {} coordinator connections ({up} bytes up, {down} down), {agent_conns} connections to its port 25000 during formation",
        spoofed.len(),
        relayed.len()
    );
    for r in &relayed {
        eprintln!(
            "relayed: {} -> {} -> {} ({} bytes up, {} down)",
            r.client, r.via, r.to, r.up_total, r.down_total
        );
    }
    for (joiner, conn) in &connections {
        let parts: Vec<&str> = conn.split('/').collect();
        eprintln!(
            "join by node-{joiner}: {}/<token>/<{} hex fingerprint>",
            parts[0],
            parts[2].len()
        );
    }
    eprintln!("peer addresses in the status documents at formation: {peer_rows:?}");
    eprintln!(
        "formation of 3 control-plane nodes: {plain_s:.1} s without the rogue, {attacked_s:.1} s with it"
    );
    assert!(
        !relayed.is_empty(),
        "no agent ever sent coordinator traffic through the rogue: the attack did not bite"
    );

    // Control: the recorder is not deaf. A join that skips the fingerprint check, dialled from
    // node 1 to the rogue with a canary token, hands the canary to the rogue.
    let canary = "c0ffee11".repeat(8);
    let seed_fp = cert_fingerprint(&c.nodes[0]);
    let before = lock(&rogue.log).agent_conns.len();
    let o = Cmd::new("ip", Duration::from_secs(60))
        .args(["netns", "exec", &c.nodes[1].ns])
        .arg(c.nodes[1].dir.join("bin/microk8s"))
        .args([
            "join",
            &format!("{}:25000/{canary}/{seed_fp}", rogue_addrs[0]),
            "--skip-verify",
        ])
        .output_blocking()
        .expect("running the simulated microk8s join");
    assert_ne!(o.code(), Some(0), "{o:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let caught = loop {
        let l = lock(&rogue.log);
        let caught = l.agent_conns[before..]
            .iter()
            .any(|s| s.tls && s.handshake.is_ok() && find(&s.bytes, canary.as_bytes()).is_some());
        if caught || Instant::now() > deadline {
            break caught;
        }
        drop(l);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        caught,
        "the rogue's recorder missed a token sent with --skip-verify: {:?} / {:?}",
        o,
        lock(&rogue.log).agent_conns
    );
    rogue.finish();
}
