//! A deliberately small HTTP/1.1 (one request per connection, JSON bodies, `Connection: close`)
//! for the simulated cluster agent. Plain HTTP, not TLS: the simulator does not model
//! certificates (see the README). Requests are bounded in size and time; malformed ones are
//! answered 400 (or dropped) and counted, never a panic.
//!
//! To add a route, match on it in the daemon's `route` function.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

async fn read_message(stream: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            bail!("header larger than {MAX_HEAD} bytes");
        }
        let n = stream.read(&mut chunk).await?;
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
    Ok((head, body))
}

/// Serves `handler` on `listener` forever.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let Ok(local) = stream.local_addr() else {
                return;
            };
            let parsed = tokio::time::timeout(READ_TIMEOUT, read_message(&mut stream)).await;
            let resp = match parsed {
                Ok(Ok((head, body))) => {
                    let mut first = head.lines().next().unwrap_or_default().split(' ');
                    match (first.next(), first.next()) {
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
                    }
                }
                _ => {
                    BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
                    return;
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
    /// TCP connect failed or timed out: (errno-like name, text).
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("timed out connecting")]
    ConnectTimeout,
    /// The exchange failed after connecting.
    #[error("{0}")]
    Protocol(String),
}

/// One request; returns (status, parsed JSON body or Null).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    connect_timeout: Duration,
    total_timeout: Duration,
) -> Result<(u16, serde_json::Value), ClientError> {
    let mut stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ClientError::ConnectTimeout),
        Ok(Err(e)) => return Err(ClientError::Connect(e)),
        Ok(Ok(s)) => s,
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let msg = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream
            .write_all(msg.as_bytes())
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (head, body) = read_message(&mut stream)
            .await
            .map_err(|e| ClientError::Protocol(format!("{e:#}")))?;
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
