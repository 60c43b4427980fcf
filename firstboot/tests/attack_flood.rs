//! Attack on the trust path (root; network namespaces; the MicroK8s simulator): "anyone on the
//! LAN can starve the coordinator". While three agents form a cluster, a host on the same
//! bridge without the cluster secret floods every node's coordinator (port 7443):
//!
//! - it keeps idle TCP connections open (re-opening them when closed), which never start TLS,
//!   and once a second opens a burst of more than the server allows one address;
//! - it asks for nonces (`GET /v1/nonce`) as fast as the server answers, one TLS connection
//!   each;
//! - with a nonce it was given, it starts a signed-looking `POST /v1/message` and sends the
//!   body a byte every 500 ms.
//!
//! The cluster must still form, within the usual bound, and each node's status document must
//! show the flood refused (connections refused at once, or bodies timed out). Prints formation
//! time with and without the flood. Bounded: at most [`MAX_REQUESTS`] nonce requests and
//! [`MAX_CONNECTS`] connection attempts per node, for at most the formation bound. Needs root
//! and iproute2 and fails loudly without them. Run: `cargo test -p firstboot --test attack_flood`.

mod agent_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_support::{AgentCluster, ClusterSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NODES: usize = 3;
const FORMATION_BOUND: Duration = Duration::from_secs(120);
const MAX_REQUESTS: u64 = 3000;
const MAX_CONNECTS: u64 = 6000;
const IDLE_CONNECTIONS: usize = 2;
/// Connections opened at once every second, more than the server allows one address.
const BURST: usize = 8;

/// A TLS client that accepts any certificate: the flooder needs no pin (it could read the
/// fingerprint from mDNS anyway).
fn connector() -> tokio_rustls::TlsConnector {
    let cfg = rackseed_protocol::tls::PeerCertVerifier::accepting_any()
        .client_config()
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// What the flooder achieved against one node.
#[derive(Debug, Default)]
struct Counts {
    connects: AtomicU64,
    nonces: AtomicU64,
    slow_bodies: AtomicU64,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_to(to: SocketAddr) -> Option<Tls> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(to))
        .await
        .ok()?
        .ok()?;
    let name = rustls::pki_types::ServerName::try_from("rackseed").unwrap();
    tokio::time::timeout(Duration::from_secs(2), connector().connect(name, tcp))
        .await
        .ok()?
        .ok()
}

/// One `GET /v1/nonce`; the nonce when the server gave one.
async fn ask_nonce(to: SocketAddr) -> Option<String> {
    let mut s = tls_to(to).await?;
    s.write_all(b"GET /v1/nonce HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["nonce"].as_str().map(str::to_owned)
}

async fn flood_node(to: SocketAddr, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut slow: Option<Tls> = None;
    let mut last_trickle = Instant::now();
    let mut last_burst = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && counts.nonces.load(Ordering::Relaxed) < MAX_REQUESTS
        && counts.connects.load(Ordering::Relaxed) < MAX_CONNECTS
    {
        // Idle connections: a closed one reads as end-of-file; replace it.
        idle.retain_mut(|s| {
            let mut b = [0u8; 1];
            !matches!(s.try_read(&mut b), Ok(0))
        });
        while idle.len() < IDLE_CONNECTIONS {
            counts.connects.fetch_add(1, Ordering::Relaxed);
            match TcpStream::connect(to).await {
                Ok(s) => idle.push(s),
                Err(_) => break,
            }
        }
        // Once a second, a burst over the per-address cap.
        if last_burst.elapsed() >= Duration::from_secs(1) {
            last_burst = Instant::now();
            let mut burst = Vec::new();
            for _ in 0..BURST {
                counts.connects.fetch_add(1, Ordering::Relaxed);
                if let Ok(s) = TcpStream::connect(to).await {
                    burst.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        counts.connects.fetch_add(1, Ordering::Relaxed);
        let nonce = ask_nonce(to).await;
        if nonce.is_some() {
            counts.nonces.fetch_add(1, Ordering::Relaxed);
        }
        match (&mut slow, nonce) {
            (None, Some(nonce)) => {
                counts.connects.fetch_add(1, Ordering::Relaxed);
                if let Some(mut s) = tls_to(to).await {
                    let head = format!(
                        "POST /v1/message HTTP/1.1\r\nhost: x\r\ncontent-length: 4096\r\n\
                         x-rackseed-node: flooder\r\nx-rackseed-nonce: {nonce}\r\n\
                         x-rackseed-auth: 00\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_ok() {
                        counts.slow_bodies.fetch_add(1, Ordering::Relaxed);
                        slow = Some(s);
                    }
                }
            }
            (Some(s), _) if last_trickle.elapsed() >= Duration::from_millis(500) => {
                last_trickle = Instant::now();
                if s.write_all(b"x").await.is_err() {
                    slow = None;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn formation_completes_while_a_stranger_floods_every_coordinator() {
    netns_lab::require_root("the coordinator flood").unwrap();
    let plain_s = AgentCluster::formation_seconds(NODES, FORMATION_BOUND);

    let mut c = AgentCluster::after_spare_hosts(1, NODES, ClusterSpec::default());
    let targets: Vec<SocketAddr> = c
        .nodes
        .iter()
        .map(|n| SocketAddr::from((n.addr, 7443)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<Counts>> = targets.iter().map(|_| Arc::default()).collect();
    let flooder = {
        let (stop, counts, targets) = (stop.clone(), counts.clone(), targets.clone());
        c.lab.host(0).spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let tasks: Vec<_> = targets
                    .into_iter()
                    .zip(counts)
                    .map(|(to, n)| tokio::spawn(flood_node(to, stop.clone(), n)))
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
            Ok(())
        })
    };
    let flooder_addr: Ipv4Addr = c.lab.host(0).addr;
    let t = Instant::now();
    c.start_all();
    let docs = c.wait_formed(&[0, 1, 2], 3, FORMATION_BOUND);
    let flooded_s = t.elapsed().as_secs_f64();
    // Keep flooding a little after formation so the slow bodies reach their timeout.
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flooder panicked").expect("flooder");

    for (i, n) in counts.iter().enumerate() {
        eprintln!(
            "flood against node {i}: {} connection attempts, {} nonces issued to the flooder, {} slow bodies",
            n.connects.load(Ordering::Relaxed),
            n.nonces.load(Ordering::Relaxed),
            n.slow_bodies.load(Ordering::Relaxed)
        );
    }
    let total_nonces: u64 = counts
        .iter()
        .map(|n| n.nonces.load(Ordering::Relaxed))
        .sum();
    assert!(total_nonces > 50, "the nonce flood did not run");
    let mut refused_total = 0;
    let mut timeouts_total = 0;
    for i in 0..NODES {
        let doc = c.status(i).expect("status after formation");
        let r = &doc.rejections.coordinator;
        eprintln!("node {i} coordinator rejections: {r:?}");
        refused_total += r.connections_refused;
        timeouts_total += r.body_timeouts;
        assert_eq!(
            doc.members.len(),
            NODES,
            "only the {NODES} nodes are members (not the flooder at {flooder_addr}): {:?}",
            doc.members
        );
    }
    assert!(
        refused_total > 0,
        "no connection was refused: the caps did not act"
    );
    assert!(timeouts_total > 0, "no slow body timed out");
    assert_eq!(docs.len(), NODES);
    eprintln!(
        "formation of {NODES} nodes: {plain_s:.1} s without the flood, {flooded_s:.1} s with it"
    );
}
