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
//! - ConfigMaps, the object the drill's probe writes (`imagebuilder drill`), kept in the
//!   node's datastore (`datastore`: kine keys `/registry/configmaps/<ns>/<name>`, written only
//!   with dqlite quorum, replicated to the live members): `GET`/`POST
//!   /api/v1/namespaces/<ns>/configmaps` (list, create: `201`, `409` when it exists) and
//!   `GET`/`PUT`/`DELETE /api/v1/namespaces/<ns>/configmaps/<name>` (`404` when absent). Names are
//!   DNS-1123 subdomains; the namespaces are MicroK8s' four (`default`, `kube-system`,
//!   `kube-public`, `kube-node-lease`), others are `404` as when a namespace does not exist.
//!   Without quorum these answer `500` (`etcdserver: request timed out`), as kube-apiserver does
//!   when kine cannot reach a dqlite leader. Errors are kube's `Status` objects.
//! - anything else: `404`.
//!
//! Credentials: the object routes need the cluster's admin credential, as kube-apiserver's
//! do (only the health endpoints are anonymous). `microk8s config` hands out a client
//! certificate (`client-certificate-data`); the simulator's certificate is a placeholder, not
//! X.509, so it cannot be presented in a TLS handshake: the simulator takes that
//! `client-certificate-data` value, exactly as the kubeconfig holds it, as a bearer token
//! (`Authorization: Bearer …`) instead, and accepts the one any member of this node's cluster
//! hands out. Anything else is `401 Unauthorized`. (A guess at no real behaviour: it stands in
//! for the client certificate check.)
//!
//! Where this guesses (no MicroK8s source says it):
//! - health bodies are JSON (`"ok"`, `{"error": …}`), not kube-apiserver's plain text: clients
//!   (curl `--fail`, keepalived) read only the status code;
//! - on a worker, MicroK8s runs its apiserver-proxy (traefik) on 16443, forwarding to the
//!   control plane; that proxy is not modelled: a worker answers `503`;
//! - the port is `MICROK8S_SIM_API_PORT` (default 16443) so several simulated nodes can share
//!   one network namespace; when it cannot be bound the daemon runs on without the endpoint
//!   and says so on stderr.
//!
//! To add a route, add an arm to [`Daemon::api_answer`] (objects: [`Daemon::api_object`]).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::datastore::{Object, Op, StoreError};
use super::Daemon;
use crate::http::{Request, Response};

/// Longest a request head may be, the longest body, and how long one exchange may take.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 128 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// kube-apiserver's secure port in MicroK8s.
pub const DEFAULT_API_PORT: u16 = 16443;

/// The namespaces a fresh MicroK8s has.
const NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// The port the endpoint listens on: `MICROK8S_SIM_API_PORT` or 16443.
pub fn api_port() -> u16 {
    std::env::var("MICROK8S_SIM_API_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_API_PORT)
}

/// A kube `Status` failure.
fn status(code: u16, reason: &str, message: impl Into<String>) -> Response {
    Response {
        status: code,
        body: json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message.into(),
            "reason": reason,
            "code": code,
        }),
    }
}

fn store_failure(e: &StoreError, what: &str) -> Response {
    let reason = match e {
        StoreError::NotFound => "NotFound",
        StoreError::Exists => "AlreadyExists",
        StoreError::TooLarge => "RequestEntityTooLarge",
        StoreError::Worker => "ServiceUnavailable",
        StoreError::NoQuorum(_) | StoreError::Full => "InternalError",
    };
    let message = match e {
        StoreError::NotFound => format!("configmaps {what} not found"),
        StoreError::Exists => format!("configmaps {what} already exists"),
        other => other.to_string(),
    };
    status(e.status(), reason, message)
}

/// A DNS-1123 subdomain (object names) or label (namespaces, `max` 63).
fn dns_name(s: &str, max: usize, dots: bool) -> bool {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(ok_char)
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

/// The object as the API shows it: the stored ConfigMap plus its resourceVersion.
fn shown(obj: &Object) -> serde_json::Value {
    let mut v = obj.value.clone();
    v["metadata"]["resourceVersion"] = json!(obj.mod_revision.to_string());
    v
}

/// A request's `Authorization` header and body, besides the method and path.
pub(super) struct ApiRequest {
    pub req: Request,
    pub bearer: Option<String>,
}

impl Daemon {
    /// Answers one API request (see the module docs).
    async fn api_answer(self: Arc<Self>, api: ApiRequest) -> Response {
        let req = &api.req;
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
            (_, p) if p.starts_with("/api/") => {
                if !self.admin_credential(api.bearer.as_deref()) {
                    return status(401, "Unauthorized", "Unauthorized");
                }
                if self.lock().worker {
                    return Response::error(
                        503,
                        "apiserver-proxy on a worker node is not simulated",
                    );
                }
                let segs: Vec<&str> = p.trim_end_matches('/').split('/').skip(1).collect();
                match segs.as_slice() {
                    ["api", "v1", "namespaces", ns, "configmaps", rest @ ..] if rest.len() <= 1 => {
                        self.api_object(&req.method, ns, rest.first().copied(), &req.body)
                            .await
                    }
                    _ => status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                }
            }
            _ => Response::error(404, "not found"),
        }
    }

    /// Whether `bearer` is the admin credential a member of this node's cluster hands out
    /// (see the module docs).
    fn admin_credential(&self, bearer: Option<&str>) -> bool {
        let Some(bearer) = bearer else {
            return false;
        };
        let st = self.lock();
        st.view.entries.iter().any(|e| {
            let kc = crate::model::render_kubeconfig("-", &st.view.cluster_id, &e.name);
            kc.lines()
                .filter_map(|l| l.trim().strip_prefix("client-certificate-data: "))
                .any(|c| c == bearer)
        })
    }

    /// The ConfigMap routes (see the module docs).
    async fn api_object(
        &self,
        method: &str,
        ns: &str,
        name: Option<&str>,
        body: &[u8],
    ) -> Response {
        if !NAMESPACES.contains(&ns) {
            return status(404, "NotFound", format!("namespaces \"{ns}\" not found"));
        }
        let prefix = format!("/registry/configmaps/{ns}/");
        match (method, name) {
            ("GET", None) => match self.datastore_list(&prefix).await {
                Ok((rev, items)) => Response::ok(json!({
                    "kind": "ConfigMapList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": rev.to_string()},
                    "items": items.iter().map(|(_, o)| shown(o)).collect::<Vec<_>>(),
                })),
                Err(e) => store_failure(&e, ""),
            },
            ("GET", Some(name)) => match self.datastore_get(&format!("{prefix}{name}")).await {
                Ok(o) => Response::ok(shown(&o)),
                Err(e) => store_failure(&e, &format!("\"{name}\"")),
            },
            ("DELETE", Some(name)) => {
                let op = Op::Delete {
                    key: format!("{prefix}{name}"),
                };
                match self.datastore_write(op).await {
                    Ok(_) => Response::ok(
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                    ),
                    Err(e) => store_failure(&e, &format!("\"{name}\"")),
                }
            }
            ("POST", None) | ("PUT", Some(_)) => {
                let mut obj: serde_json::Value = match serde_json::from_slice(body) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    _ => return status(400, "BadRequest", "the body is not a JSON object"),
                };
                let given = obj["metadata"]["name"].as_str().map(str::to_owned);
                let name = match (name, given) {
                    (Some(n), Some(g)) if n != g => {
                        return status(
                            400,
                            "BadRequest",
                            format!(
                            "the name of the object ({g}) does not match the name on the URL ({n})"
                        ),
                        )
                    }
                    (Some(n), _) => n.to_owned(),
                    (None, Some(g)) => g,
                    (None, None) => return status(422, "Invalid", "metadata.name: Required value"),
                };
                if !dns_name(&name, 253, true) {
                    return status(422, "Invalid", format!("ConfigMap \"{name}\" is invalid: metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"));
                }
                if obj
                    .get("data")
                    .is_some_and(|d| !d.is_object() && !d.is_null())
                {
                    return status(400, "BadRequest", "data must be a map of strings");
                }
                if obj["data"]
                    .as_object()
                    .is_some_and(|m| m.values().any(|v| !v.is_string()))
                {
                    return status(400, "BadRequest", "data must be a map of strings");
                }
                obj["apiVersion"] = json!("v1");
                obj["kind"] = json!("ConfigMap");
                obj["metadata"] = json!({"name": name, "namespace": ns});
                let key = format!("{prefix}{name}");
                let op = if method == "POST" {
                    Op::Create { key, value: obj }
                } else {
                    Op::Update { key, value: obj }
                };
                match self.datastore_write(op).await {
                    Ok(Some(o)) => Response {
                        status: if method == "POST" { 201 } else { 200 },
                        body: shown(&o),
                    },
                    Ok(None) => status(500, "InternalError", "the write returned no object"),
                    Err(e) => store_failure(&e, &format!("\"{name}\"")),
                }
            }
            _ => status(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported here"),
            ),
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

/// One HTTP/1.1 exchange on one TLS connection (then closed): the head, then a body of
/// `Content-Length` bytes (at most [`MAX_BODY`]; a request without the header has none, as
/// curl's bodiless GETs).
async fn answer_one(
    d: Arc<Daemon>,
    tls: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    let mut stream = tls.accept(tcp).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            anyhow::bail!("request head over {MAX_HEAD} bytes");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let mut body = buf[head_end + 4..].to_vec();
    let len = header("content-length").map(|v| v.parse::<usize>());
    let resp = match len {
        Some(Err(_)) => Response::error(400, "bad Content-Length"),
        Some(Ok(n)) if n > MAX_BODY => Response::error(413, format!("body over {MAX_BODY} bytes")),
        _ => {
            let n = len.and_then(Result::ok).unwrap_or(0);
            while body.len() < n {
                let got = stream.read(&mut chunk).await?;
                if got == 0 {
                    anyhow::bail!("closed inside the body");
                }
                body.extend_from_slice(&chunk[..got]);
            }
            body.truncate(n);
            let bearer = header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
            let mut first = text.lines().next().unwrap_or_default().split(' ');
            match (first.next(), first.next()) {
                (Some(method), Some(path)) if !method.is_empty() => {
                    d.api_answer(ApiRequest {
                        req: Request {
                            method: method.to_owned(),
                            path: path.to_owned(),
                            body,
                            peer,
                            local,
                        },
                        bearer,
                    })
                    .await
                }
                _ => Response::error(400, "malformed request line"),
            }
        }
    };
    let body = resp.body.to_string();
    let reason = match resp.status {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_1123() {
        assert!(dns_name("rackseed-drill-1.a", 253, true));
        assert!(!dns_name("rackseed-drill-1.a", 63, false));
        for bad in ["", "-a", "a-", "A", "a_b", "a b", &"a".repeat(254)] {
            assert!(!dns_name(bad, 253, true), "{bad:?}");
        }
    }
}
