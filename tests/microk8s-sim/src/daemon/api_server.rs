//! The node's Kubernetes API endpoint: kube-apiserver's `--secure-port=16443` (MicroK8s'
//! `microk8s-resources/default-args/kube-apiserver`), over TLS with the node's
//! `$SNAP_DATA/certs/server.crt` (that file is also kube-apiserver's `--tls-cert-file` there).
//!
//! What is modelled: the health endpoints a load balancer or keepalived health check asks,
//! without credentials (MicroK8s' default kube-apiserver arguments set no `--anonymous-auth`,
//! so it keeps the upstream default `true`, and `--authorization-mode=AlwaysAllow`):
//! - `GET /readyz`: `200` while this node's datastore has quorum (a majority of the voters
//!   alive in its view, the rule [`crate::model::View::quorum`] applies everywhere else in the
//!   simulator); otherwise `500` naming the failed `etcd` check, as kube-apiserver's readiness
//!   fails when kine cannot reach a dqlite leader;
//! - `GET /livez`: `200` while the process runs (kube-apiserver stays live without quorum);
//! - anything else: `404`.
//!
//! Where this guesses (no MicroK8s source says it):
//! - bodies are JSON (`"ok"`, `{"error": …}`), not kube-apiserver's plain text: clients
//!   (curl `--fail`, keepalived) read only the status code;
//! - on a worker, MicroK8s runs its apiserver-proxy (traefik) on 16443, forwarding to the
//!   control plane; that proxy is not modelled: a worker answers `503`;
//! - the port is `MICROK8S_SIM_API_PORT` (default 16443) so several simulated nodes can share
//!   one network namespace; when it cannot be bound the daemon runs on without the endpoint
//!   and says so on stderr.
//!
//! To add a route, add an arm to [`Daemon::api_answer`].

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::Daemon;
use crate::http::{Request, Response};

/// Longest a request head may be, and how long one exchange may take.
const MAX_HEAD: usize = 16 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// kube-apiserver's secure port in MicroK8s.
pub const DEFAULT_API_PORT: u16 = 16443;

/// The port the endpoint listens on: `MICROK8S_SIM_API_PORT` or 16443.
pub fn api_port() -> u16 {
    std::env::var("MICROK8S_SIM_API_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_API_PORT)
}

impl Daemon {
    /// Answers one API request (see the module docs).
    async fn api_answer(self: Arc<Self>, req: Request) -> Response {
        let path = req.path.split('?').next().unwrap_or_default();
        match (req.method.as_str(), path) {
            ("GET", "/livez") => Response::ok(json!("ok")),
            ("GET", "/readyz") => {
                let st = self.lock();
                if st.worker {
                    Response::error(503, "apiserver-proxy on a worker node is not simulated")
                } else if st.view.quorum(&self.alive()) {
                    Response::ok(json!("ok"))
                } else {
                    Response::error(
                        500,
                        "[-]etcd failed: reason withheld\nreadyz check failed (no dqlite quorum)",
                    )
                }
            }
            (_, "/livez" | "/readyz") => Response::error(405, "method not allowed"),
            _ => Response::error(404, "not found"),
        }
    }
}

/// Serves the API endpoint on `0.0.0.0:`[`api_port`] until the daemon exits; a port that cannot
/// be bound leaves the daemon without the endpoint (reported on stderr).
pub(super) fn start(d: Arc<Daemon>, tls: TlsAcceptor) {
    tokio::spawn(async move {
        let port = api_port();
        let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("microk8s-sim: no API endpoint: binding 0.0.0.0:{port}: {e}");
                return;
            }
        };
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (d, tls) = (d.clone(), tls.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, answer_one(d, tls, tcp, peer)).await;
            });
        }
    });
}

/// One HTTP/1.1 exchange on one TLS connection (then closed). Unlike the cluster agent's
/// routes, API requests are bodiless GETs that end at the blank line (curl sends no
/// `Content-Length` then), so this reads the head only.
async fn answer_one(
    d: Arc<Daemon>,
    tls: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    let mut stream = tls.accept(tcp).await?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            anyhow::bail!("request head over {MAX_HEAD} bytes");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed before the end of the request head");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next().unwrap_or_default().split(' ');
    let resp = match (first.next(), first.next()) {
        (Some(method), Some(path)) if !method.is_empty() => {
            d.api_answer(Request {
                method: method.to_owned(),
                path: path.to_owned(),
                body: Vec::new(),
                peer,
                local,
            })
            .await
        }
        _ => Response::error(400, "malformed request line"),
    };
    let body = resp.body.to_string();
    let reason = match resp.status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let msg = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        resp.status,
        body.len(),
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
