//! A stranger without the cluster secret floods the coordinator from many loopback addresses
//! (127.0.0.2 and up): idle TCP connections, nonce requests, and request bodies sent a byte
//! at a time. A node that authenticated before the flood keeps being served throughout, the
//! stranger's nonce requests evict none of its nonces, and the flood is counted.
//! Bounded: 12 stranger addresses, 4 connections (each one's cap) and 40 nonce requests each,
//! 8 s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorClient, CoordinatorConfig, Inbound, NodeIdentity,
};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::tls::PeerCertVerifier;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const STRANGERS: u8 = 12;
const FLOOD_FOR: Duration = Duration::from_secs(8);

fn stranger(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))
}

async fn connect_from(local: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(local, 0))?;
    sock.connect(to).await
}

fn tls_config(fingerprint: &str) -> rustls::ClientConfig {
    PeerCertVerifier::pinned(fingerprint)
        .unwrap()
        .client_config()
        .unwrap()
}

/// One stranger address: holds idle connections, asks for nonces, and sends a slow body
/// with a nonce it was given, until `until`.
async fn flood_from(local: IpAddr, server: SocketAddr, fingerprint: String, until: Instant) {
    let mut idle = Vec::new();
    for _ in 0..2 {
        if let Ok(s) = connect_from(local, server).await {
            idle.push(s);
        }
    }
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(&fingerprint))
        .local_address(local)
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut nonce = None;
    for _ in 0..40 {
        if Instant::now() >= until {
            break;
        }
        if let Ok(r) = http.get(format!("https://{server}/v1/nonce")).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                nonce = v["nonce"].as_str().map(str::to_owned);
            }
        }
    }
    if let (Some(nonce), Ok(tcp)) = (nonce, connect_from(local, server).await) {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&fingerprint)));
        let name = rustls::pki_types::ServerName::try_from("rackseed").unwrap();
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            let head = format!(
                "POST /v1/message HTTP/1.1\r\nhost: x\r\ncontent-length: 4096\r\n\
                 x-rackseed-node: evil\r\nx-rackseed-nonce: {nonce}\r\nx-rackseed-auth: 00\r\n\r\n"
            );
            let _ = tls.write_all(head.as_bytes()).await;
            while Instant::now() < until {
                if tls.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    tokio::time::sleep_until(until.into()).await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_node_is_served_through_a_flood_from_many_addresses() {
    let secret = ClusterSecret::generate();
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let (coord, mut rx) = Coordinator::<u32>::start(CoordinatorConfig {
        secret: secret.clone(),
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();
    tokio::spawn(async move {
        while let Some(inb) = rx.recv().await {
            let inb: Inbound<u32> = inb;
            let n = inb.message;
            inb.reply(vec![n + 1]);
        }
    });
    let addr = coord.local_addr();
    let peer = CoordinatorClient::new(&secret, "node-b").with_timeout(Duration::from_secs(3));
    assert_eq!(peer.send(addr, &fp, &1u32).await.unwrap(), vec![2]);

    let until = Instant::now() + FLOOD_FOR;
    let flood: Vec<_> = (0..STRANGERS)
        .map(|i| tokio::spawn(flood_from(stranger(i), addr, fp.clone(), until)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // One more address opens 10 connections: over its own cap of 4, so at least 6 are closed
    // at once.
    let mut extra = Vec::new();
    for _ in 0..10 {
        extra.push(connect_from(stranger(STRANGERS), addr).await.unwrap());
    }

    let mut worst = Duration::ZERO;
    let mut answered = 0;
    while Instant::now() + Duration::from_millis(500) < until {
        let t = Instant::now();
        let r = peer.send(addr, &fp, &10u32).await;
        assert_eq!(
            r.unwrap(),
            vec![11],
            "the verified node was refused mid-flood"
        );
        worst = worst.max(t.elapsed());
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for f in flood {
        f.await.unwrap();
    }
    let stats = coord.stats();
    eprintln!("answered {answered} messages mid-flood, slowest {worst:?}; {stats:?}");
    assert!(answered >= 5, "only {answered} messages sent mid-flood");
    assert!(worst < Duration::from_secs(2), "slowest answer {worst:?}");
    drop(extra);
    assert!(
        stats.connections_refused >= 6,
        "the flood was never capped: {stats:?}"
    );
    assert!(
        stats.nonces_issued > 100,
        "the nonce flood did not run: {stats:?}"
    );
    assert!(
        stats.body_timeouts > 0,
        "the slow bodies did not run: {stats:?}"
    );
}

#[tokio::test]
async fn a_slow_body_without_a_nonce_of_its_own_is_refused_before_it_is_read() {
    let secret = ClusterSecret::generate();
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let (coord, _rx) = Coordinator::<u32>::start(CoordinatorConfig {
        secret,
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();
    let tcp = connect_from(stranger(0), coord.local_addr()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&fp)));
    let name = rustls::pki_types::ServerName::try_from("rackseed").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let head = "POST /v1/message HTTP/1.1\r\nhost: x\r\ncontent-length: 4096\r\n\
                x-rackseed-node: evil\r\nx-rackseed-nonce: 00\r\nx-rackseed-auth: 00\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let t = Instant::now();
    let n = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut tls, &mut answer),
    )
    .await
    .expect("the server waited for the body")
    .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(coord.stats().unauthorized, 1);
}

/// Something answering in a peer's place (it holds the pinned key, or the pin was learnt
/// from it) streams an endless response: the client stops at its limit with a clear error.
#[tokio::test]
async fn an_endless_response_is_cut_at_the_client_limit() {
    use rackseed_protocol::coordinator::client::MAX_RESPONSE;
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(identity.server_config().unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut head = vec![0u8; 4096];
        let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut head).await;
        let _ = tls
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let chunk = vec![b' '; 64 * 1024];
        // Bounded: twice the client's limit, then stop.
        for _ in 0..(2 * MAX_RESPONSE / chunk.len()) {
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if tls.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let secret = ClusterSecret::generate();
    let client = CoordinatorClient::new(&secret, "node-b").with_timeout(Duration::from_secs(10));
    let err = client.nonce(addr, &fp).await.unwrap_err();
    assert!(
        err.to_string().contains("larger than"),
        "unexpected error: {err}"
    );
    server.abort();
}
