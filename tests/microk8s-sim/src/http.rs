//! The simulated cluster agent's transport: a deliberately small HTTP/1.1 (one request per
//! connection, JSON bodies, `Connection: close`) over TLS, as the real agent serves HTTPS on
//! 25000 with `$SNAP_DATA/certs/server.crt` ([`crate::agent_cert`]). Requests are bounded in
//! size and time; malformed ones (including failed handshakes) are answered 400 or dropped and
//! counted, never a panic. A connection that completes the handshake and closes without sending
//! a byte (a joiner that rejected the certificate) is not a request and is not counted.
//!
//! The client ([`request`]) behaves like join.py's `HTTPSConnection` with
//! `ssl._create_unverified_context()`: any certificate is accepted in the handshake (signatures
//! are still checked, so the peer must hold the key of the certificate it shows), and the
//! peer's DER certificate is hashed right after it. With a fingerprint, a mismatch ends the
//! connection before a single byte of the request is written ([`ClientError::Unverified`]).
//!
//! To add a route, match on it in the daemon's `route` function.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_protocol::tls::PeerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::agent_cert::{sha256_hex, AgentCert};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Malformed requests seen by this process.
pub static BAD_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// A parsed request plus the connection's addresses.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// A response: status code and JSON body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Response {
    pub fn ok(body: serde_json::Value) -> Self {
        Response { status: 200, body }
    }
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Response {
            status,
            body: serde_json::json!({ "error": msg.into() }),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// An error that only says the peer went away (no bytes of a request were malformed).
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
}

/// Reads one message; `None` when the peer closed before sending a byte.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            bail!("header larger than {MAX_HEAD} bytes");
        }
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer that closed without close_notify before sending anything (a reset when
            // it closed with our session tickets still unread).
            Err(e) if buf.is_empty() && closed_by_peer(&e) => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 && buf.is_empty() {
            return Ok(None);
        }
        if n == 0 {
            bail!("connection closed before the end of the header");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).context("header is not utf-8")?;
    let mut body = buf[head_end + 4..].to_vec();
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .context("bad content-length")?;
    match len {
        Some(len) => {
            if len > MAX_BODY {
                bail!("body of {len} bytes is over {MAX_BODY}");
            }
            while body.len() < len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed inside the body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => loop {
            // No length: read to end (responses with Connection: close).
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            if body.len() > MAX_BODY {
                bail!("body over {MAX_BODY} bytes");
            }
        },
    }
    Ok(Some((head, body)))
}

/// The server side of TLS for the agent's certificate (ring provider, TLS 1.2 and 1.3).
pub fn acceptor(cert: AgentCert) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert], cert.key)
        .context("the cluster agent's certificate and key")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `handler` on `listener` over TLS forever.
pub async fn serve<F, Fut>(listener: TcpListener, tls: TlsAcceptor, handler: F)
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Ok(local) = tcp.local_addr() else {
                return;
            };
            let exchange = async {
                let mut stream = match tls.accept(tcp).await {
                    Ok(s) => s,
                    // The client finished its handshake and left (a joiner that rejected the
                    // certificate): the tickets we sent after it met a closed socket.
                    Err(e) if closed_by_peer(&e) => return anyhow::Ok(None),
                    Err(e) => return Err(anyhow::Error::new(e).context("TLS handshake")),
                };
                let msg = read_message(&mut stream).await?;
                anyhow::Ok(Some((stream, msg)))
            };
            let (mut stream, (head, body)) =
                match tokio::time::timeout(READ_TIMEOUT, exchange).await {
                    Ok(Ok(Some((stream, Some(msg))))) => (stream, msg),
                    // Handshake done, nothing sent: not a request.
                    Ok(Ok(None | Some((_, None)))) => return,
                    Ok(Err(_)) | Err(_) => {
                        BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            let mut first = head.lines().next().unwrap_or_default().split(' ');
            let resp = match (first.next(), first.next()) {
                (Some(m), Some(p)) if !m.is_empty() => {
                    handler(Request {
                        method: m.to_owned(),
                        path: p.to_owned(),
                        body,
                        peer,
                        local,
                    })
                    .await
                }
                _ => {
                    BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
                    Response::error(400, "malformed request line")
                }
            };
            let body = resp.body.to_string();
            let msg = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                resp.status,
                reason(resp.status),
                body.len(),
                body
            );
            let _ = stream.write_all(msg.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("timed out connecting")]
    ConnectTimeout,
    /// The TLS handshake failed (join.py: `ssl.SSLError`).
    #[error("{0}")]
    Tls(String),
    /// The peer's certificate does not match the expected fingerprint; nothing was sent.
    #[error("the peer's certificate (sha256 {sha256}) does not match the fingerprint")]
    Unverified { sha256: String },
    /// The exchange failed after the handshake.
    #[error("{0}")]
    Protocol(String),
}

/// The client side of TLS, built once per process.
fn connector() -> Result<TlsConnector, ClientError> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            // Any certificate, as `ssl._create_unverified_context()` accepts (module docs); the
            // handshake signatures are still checked, so the peer must hold the key of the
            // certificate it presents.
            let config = PeerCertVerifier::accepting_any()
                .client_config()
                .map_err(|e| format!("TLS protocol versions: {e}"))?;
            Ok(TlsConnector::from(Arc::new(config)))
        })
        .clone()
        .map_err(ClientError::Tls)
}

/// A TLS connection to `addr` as join.py opens one: any certificate is accepted; returns the
/// stream and the lowercase hex SHA-256 of the peer's DER certificate. Nothing is written yet.
pub async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<(TlsStream<TcpStream>, String), ClientError> {
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ClientError::ConnectTimeout),
        Ok(Err(e)) => return Err(ClientError::Connect(e)),
        Ok(Ok(s)) => s,
    };
    let stream = connector()?
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let sha256 = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| sha256_hex(c))
        .ok_or_else(|| ClientError::Tls("the peer presented no certificate".into()))?;
    Ok((stream, sha256))
}

/// One request over TLS; returns (status, parsed JSON body or Null). With `fingerprint`, the
/// SHA-256 hex of the peer's DER certificate must start with it, checked after the handshake
/// and before the request is written (join.py's `join_request`); otherwise
/// [`ClientError::Unverified`] and the peer received nothing but the handshake.
pub async fn request(
    addr: SocketAddr,
    fingerprint: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    connect_timeout: Duration,
    total_timeout: Duration,
) -> Result<(u16, serde_json::Value), ClientError> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let msg = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let (mut stream, sha256) = connect(addr, connect_timeout).await?;
        if fingerprint.is_some_and(|fp| !sha256.starts_with(fp)) {
            // Dropped without a write: no request, no close_notify.
            return Err(ClientError::Unverified { sha256 });
        }
        stream
            .write_all(msg.as_bytes())
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream
            .flush()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (head, body) = read_message(&mut stream)
            .await
            .map_err(|e| ClientError::Protocol(format!("{e:#}")))?
            .ok_or_else(|| ClientError::Protocol("connection closed without an answer".into()))?;
        let status: u16 = head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol("bad status line".into()))?;
        let json = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("bad json: {e}")))?
        };
        Ok((status, json))
    };
    match tokio::time::timeout(total_timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Protocol(
            "timed out waiting for the answer".into(),
        )),
    }
}
