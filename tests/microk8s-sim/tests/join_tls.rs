//! The cluster agent speaks TLS with `$SNAP_DATA/certs/server.crt`, and `microk8s join` checks
//! the connection string's fingerprint against the certificate the peer presents, after the
//! handshake and before it writes the request (A1, A3). Attacks: a rogue agent with its own
//! certificate, one replaying the seed's certificate without its key, and a plain-HTTP listener,
//! each where the joiner dials; none of them may receive a byte of the request (so the token).
//! Needs root (network namespaces). Run: `cargo test -p microk8s-sim --test join_tls`.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use microk8s_sim::agent_cert::{self, sha256_hex};
use microk8s_sim::http;
use netns_lab::{Host, Lab};
use rackseed_host::command::Cmd;
use support::*;

fn lab_of(n: usize, extra: &[(&str, &str)]) -> (Lab, tempfile::TempDir, Vec<SimNode>) {
    let lab = Lab::new(n).expect("creating the network lab (run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let nodes = (0..n)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, extra))
        .collect();
    (lab, root, nodes)
}

/// The full SHA-256 fingerprint of a node's `certs/server.crt` (its `$SNAP_DATA` is its folder,
/// the parent of `MICROK8S_SIM_STATE`).
fn fingerprint(node: &SimNode) -> String {
    sha256_hex(&agent_cert::load(&node.dir).expect("certs/server.crt").cert)
}

/// The peers that reached a node's agent with a request (its request log).
fn request_peers(node: &SimNode) -> Vec<(String, String)> {
    log_records(&node.dir.join("state/requests.jsonl"))
        .into_iter()
        .map(|r| {
            (
                r["peer"].as_str().unwrap().to_owned(),
                r["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn unverified(ip: impl std::fmt::Display) -> String {
    format!("Joining cluster failed. Could not verify the identity of {ip}. Use '--skip-verify' to skip server certificate check.\n")
}

#[test]
fn add_node_prints_the_hash_of_the_served_certificate_and_join_checks_it() {
    let rt = runtime();
    let _g = rt.enter();
    let (_lab, _root, mut n) = lab_of(3, &[]);
    for x in &mut n {
        x.install_and_start();
    }
    // The check hash is the first 12 hex of sha256(DER of certs/server.crt), computed here as
    // A1's `openssl x509 -outform der | sha256sum`.
    let crt = n[0].dir.join("certs/server.crt");
    let der_file = n[0].dir.join("server.der");
    Cmd::new("openssl", Duration::from_secs(10))
        .args(["x509", "-in", &crt.to_string_lossy(), "-outform", "der"])
        .args(["-out", &der_file.to_string_lossy()])
        .run_blocking()
        .expect("openssl x509");
    let full = sha256_hex(&std::fs::read(&der_file).unwrap());
    assert_eq!(full, fingerprint(&n[0]));
    let o = mk(&n[0], &["add-node", "--format", "token-check"]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    let check = o.stdout.trim().split('/').nth(1).unwrap().to_owned();
    assert_eq!(check, full[..12], "add-node's check hash");
    // The key is private; every node has its own certificate.
    let key = std::fs::metadata(n[0].dir.join("certs/server.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    assert_ne!(fingerprint(&n[1]), full);

    // Wrong fingerprints (12 hex and 64 hex) with a one-time token: exit 4 with join.py's
    // message, and the seed never sees a request from the joiner, so the token survives.
    let token = "7".repeat(32);
    assert_eq!(mk(&n[0], &["add-node", "-t", &token]).code(), Some(0));
    let seed = n[0].host.addr;
    let joiner = n[1].host.addr.to_string();
    let wrong_full = fingerprint(&n[1]);
    for wrong in [&wrong_full[..12], &wrong_full[..]] {
        let o = mk(&n[1], &["join", &format!("{seed}:25000/{token}/{wrong}")]);
        assert_eq!(o.code(), Some(4), "{o:?}");
        assert_eq!(
            o.stdout,
            format!("Contacting cluster at {seed}\n{}", unverified(seed)),
            "{o:?}"
        );
    }
    assert!(
        request_peers(&n[0]).iter().all(|(p, _)| p != &joiner),
        "the seed saw a request from the rejected joiner: {:?}",
        request_peers(&n[0])
    );
    // The right full fingerprint: the same one-time token still works.
    let o = mk(&n[1], &["join", &format!("{seed}:25000/{token}/{full}")]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    assert!(
        o.stdout.contains("Successfully joined the cluster."),
        "{o:?}"
    );
    assert!(request_peers(&n[0]).contains(&(joiner, "/cluster/api/v2.0/join".to_owned())));
    // Now it is consumed (A2).
    let o = mk(
        &n[2],
        &["join", &format!("{seed}:25000/{token}/{}", &full[..12])],
    );
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(o.stdout.contains("invalid token (500)."), "{o:?}");
    // The right 12-hex prefix (what add-node prints) with another token.
    let token2 = "8".repeat(32);
    assert_eq!(mk(&n[0], &["add-node", "-t", &token2]).code(), Some(0));
    let o = mk(&n[2], &["join", &format!("{seed}:25000/{token2}/{check}")]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    // --skip-verify skips the check, as join.py.
    let token3 = "9".repeat(32);
    assert_eq!(mk(&n[0], &["add-node", "-t", &token3]).code(), Some(0));
    let o = mk(
        &n[2],
        &[
            "join",
            &format!("{seed}:25000/{token3}/{}", &wrong_full[..12]),
            "--skip-verify",
        ],
    );
    assert_ne!(o.code(), Some(4), "{o:?}");
}

/// What one connection to a fake agent brought: whether the TLS handshake completed, and the
/// application bytes read after it (until EOF or 5 s).
#[derive(Debug)]
struct Seen {
    handshake: Result<(), String>,
    app_bytes: Vec<u8>,
}

/// Starts a fake agent in `host`'s namespace on `port`: accepts connections, completes (or
/// fails) the TLS handshake with `tls`, and records what each connection sent. Returns once it
/// listens; set the flag to stop it, then join the handle.
fn rogue_agent(
    host: &Host,
    port: u16,
    tls: tokio_rustls::TlsAcceptor,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<anyhow::Result<Vec<Seen>>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop2 = stop.clone();
    let handle = host.spawn_thread(move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
        listener.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::AsyncReadExt;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let mut seen = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let Ok(Ok((tcp, _))) =
                    tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                else {
                    continue;
                };
                match tls.accept(tcp).await {
                    Err(e) => seen.push(Seen {
                        handshake: Err(e.to_string()),
                        app_bytes: vec![],
                    }),
                    Ok(mut s) => {
                        let mut app_bytes = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                        // Until EOF (a close without close_notify is an error: also the end).
                        while let Ok(Ok(n)) =
                            tokio::time::timeout_at(deadline, s.read(&mut chunk)).await
                        {
                            if n == 0 {
                                break;
                            }
                            app_bytes.extend_from_slice(&chunk[..n]);
                        }
                        seen.push(Seen {
                            handshake: Ok(()),
                            app_bytes,
                        });
                    }
                }
            }
            anyhow::Ok(seen)
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the rogue agent listens");
    (stop, handle)
}

/// A TLS server presenting `cert` but signing with another key (the rogue has a copy of the
/// seed's public certificate, not its private key).
#[derive(Debug)]
struct StolenCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for StolenCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn stolen_certificate_acceptor(seed_cert: agent_cert::AgentCert) -> tokio_rustls::TlsAcceptor {
    let own_dir = tempfile::tempdir().unwrap();
    agent_cert::generate_and_write(own_dir.path()).unwrap();
    let own_key = agent_cert::load(own_dir.path()).unwrap().key;
    let signer = rustls::crypto::ring::sign::any_supported_type(&own_key).unwrap();
    let ck = rustls::sign::CertifiedKey::new(vec![seed_cert.cert], signer);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(StolenCertificate(Arc::new(ck))));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[test]
fn a_rogue_agent_where_the_joiner_dials_never_receives_the_token() {
    let rt = runtime();
    let _g = rt.enter();
    // Node 0 is the seed, node 1 the joiner; the rogue listens in node 2's namespace (another
    // address), on the agent port and on others.
    let (_lab, _root, mut n) = lab_of(3, &[]);
    for x in &mut n[..2] {
        x.install_and_start();
    }
    let (seed, joiner, rogue_host) = (&n[0], &n[1], &n[2].host);
    let seed_fp = fingerprint(seed);
    let token = "5".repeat(32);
    assert_eq!(mk(seed, &["add-node", "-t", &token]).code(), Some(0));

    // 1. Its own certificate: the fingerprint does not match; exit 4 with join.py's message.
    let own_dir = tempfile::tempdir().unwrap();
    agent_cert::generate_and_write(own_dir.path()).unwrap();
    let own = http::acceptor(agent_cert::load(own_dir.path()).unwrap()).unwrap();
    // 2. The seed's real certificate, replayed without the seed's key: the handshake fails.
    let stolen = stolen_certificate_acceptor(agent_cert::load(&seed.dir).unwrap());
    for (case, port, tls, fp) in [
        (
            "own certificate, 12 hex",
            25000,
            own.clone(),
            &seed_fp[..12],
        ),
        ("own certificate, 64 hex", 25001, own, &seed_fp[..]),
        ("seed's certificate, no key", 25002, stolen, &seed_fp[..12]),
    ] {
        let rogue = rogue_host.addr;
        let (stop, handle) = rogue_agent(rogue_host, port, tls);
        let o = mk(joiner, &["join", &format!("{rogue}:{port}/{token}/{fp}")]);
        stop.store(true, Ordering::Relaxed);
        let seen = handle.join().unwrap().unwrap();
        assert_eq!(seen.len(), 1, "{case}: one connection: {seen:?}");
        assert_eq!(
            seen[0].handshake.is_ok(),
            case.starts_with("own"),
            "{case}: {seen:?}"
        );
        assert!(
            seen[0].app_bytes.is_empty(),
            "{case}: the rogue read {} application bytes: {:?}",
            seen[0].app_bytes.len(),
            String::from_utf8_lossy(&seen[0].app_bytes)
        );
        assert_eq!(o.code(), Some(4), "{case}: {o:?}");
        if case.starts_with("own") {
            assert_eq!(
                o.stdout,
                format!("Contacting cluster at {rogue}\n{}", unverified(rogue)),
                "{case}"
            );
        } else {
            assert!(
                o.stdout.contains("Peer node verification failed with "),
                "{case}: {o:?}"
            );
        }
    }
    // The one-time token never left the joiner: the real seed still takes it.
    let addr = seed.host.addr;
    let o = mk(
        joiner,
        &["join", &format!("{addr}:25000/{token}/{seed_fp}")],
    );
    assert_eq!(o.code(), Some(0), "{o:?}");
}

#[test]
fn a_plain_http_listener_where_the_joiner_dials_gets_no_token() {
    let rt = runtime();
    let _g = rt.enter();
    // Node 0 is the seed, node 1 the joiner; the listener is in node 2's namespace.
    let (_lab, _root, mut n) = lab_of(3, &[]);
    for x in &mut n[..2] {
        x.install_and_start();
    }
    let seed_fp = fingerprint(&n[0]);
    let token = "4".repeat(32);
    let target = n[2].host.addr;
    for (port, fp) in [(25000u16, None), (25001, Some(&seed_fp[..12]))] {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // An HTTP server: answers whatever arrives with a 400, then reads until EOF.
        let listener = n[2].host.spawn_thread(move || {
            use std::io::{Read, Write};
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            let _ = ready_tx.send(());
            let (mut s, _) = l.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = vec![0u8; 64 * 1024];
            let n = s.read(&mut got).unwrap_or(0);
            got.truncate(n);
            let _ = s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = s.read_to_end(&mut got);
            anyhow::Ok(got)
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let url = match fp {
            Some(fp) => format!("{target}:{port}/{token}/{fp}"),
            None => format!("{target}:{port}/{token}"),
        };
        let o = mk(&n[1], &["join", &url]);
        let got = listener.join().unwrap().unwrap();
        assert_eq!(o.code(), Some(4), "{url}: {o:?}");
        assert!(
            o.stdout.contains("Peer node verification failed with "),
            "{o:?}"
        );
        assert_eq!(got.first(), Some(&0x16), "a TLS handshake record: {got:?}");
        assert!(
            !String::from_utf8_lossy(&got).contains(&token)
                && !got.windows(token.len()).any(|w| w == token.as_bytes()),
            "the listener received the token"
        );
    }
}
