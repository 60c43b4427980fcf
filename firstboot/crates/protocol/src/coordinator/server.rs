//! The coordinator's HTTPS server (rustls + hyper, HTTP/1.1 only).
//!
//! Routes:
//! - `GET /v1/nonce` (no auth): a fresh single-use nonce, `{"nonce": "..."}`.
//! - `POST /v1/message` (auth): body `{"message": M}`; the message goes to the driver as an
//!   [`Inbound`] and the driver's reply becomes `{"replies": [M, ...]}`.
//! - `GET /v1/status` (auth): the status document the driver last set, over the pinned and
//!   authenticated channel (what `imagebuilder status` reads).
//! - `GET /` and `GET /status.json` (no auth): the same document as a read-only HTML page and
//!   as JSON, for a browser (which cannot do the HMAC dance). The document holds no secrets by
//!   design; see [`super::page`] for what it shows and why that is acceptable.
//! - `POST /v1/kubeconfig` (auth): the cluster's admin kubeconfig, `{"kubeconfig": "..."}`,
//!   from the provider the driver installed with [`Coordinator::set_kubeconfig_provider`]
//!   (`microk8s config` on a control-plane member); 503 with the reason when there is none
//!   (not a member yet, or a worker: [`Coordinator::refuse_kubeconfig`]) or it fails. It is a credential: served only to holders of the cluster secret, never logged.
//! - `POST /v1/rotate` (auth): a secret rotation step ([`super::rotation::RotationStep`]),
//!   carried out by the handler the agent installed ([`Coordinator::set_rotation_handler`]);
//!   answers a [`super::rotation::RotationAck`], or 503 with the reason.
//! - `POST /v1/drill` (auth): a failover drill's request that this node cut itself off
//!   ([`super::drill::CutOff`]), accepted by the handler the agent installed
//!   ([`Coordinator::set_drill_handler`]), which answers a [`super::drill::DrillAck`] and
//!   acts [`super::drill::DRILL_GRACE`] later; 503 with the reason otherwise.
//!
//! - `POST /v1/backup/push|list|fetch|restore` (auth): datastore backup archives, see
//!   [`super::backup`]; bodies up to [`super::backup::MAX_FRAME`] within
//!   [`super::backup::TRANSFER_TIMEOUT`], but only from an address that authenticated
//!   within [`VERIFIED_FOR`] (others get [`MAX_BODY`]; the client authenticates with a
//!   status read first). Served once the agent installed a store
//!   ([`Coordinator::set_backup_store`]) or a restore handler; 503 before.
//!
//! Authentication accepts every secret of the node's [`Keyring`] ([`Coordinator::keyring`]),
//! so a rotation swaps keys without a restart.
//!
//! Refusals are `{"error": "<reason>"}` with 400 (malformed), 401 (authentication), 404, 405,
//! 408 (body too slow), 413 (body over [`MAX_BODY`]), 422 (JSON of the wrong shape) or 503
//! (driver busy or gone). Only the presented nonce is consumed by a refused request; the
//! driver sees nothing.
//!
//! A stranger on the LAN cannot starve the nodes of the coordinator (formation depends on
//! it, though safety never does):
//! - connections are capped per client address ([`MAX_CONNECTIONS_PER_STRANGER`]) and in all
//!   ([`MAX_CONNECTIONS`]); [`RESERVED_FOR_VERIFIED`] of them only addresses that
//!   authenticated within [`VERIFIED_FOR`] may use; a connection over a cap is closed at once
//!   (the accept loop never waits);
//! - the TLS handshake has 10 s, the headers [`IDLE_TIMEOUT`], the body [`BODY_TIMEOUT`], and
//!   an authenticated route refuses a request whose nonce this address was not given before
//!   reading its body;
//! - nonces are bound to the address they were issued to, and a stranger's nonce requests
//!   only ever push out its own (see [`NonceStore`]);
//! - any connection is shut down gracefully after 5 minutes.
//!
//! To add a route: add a match arm in `route`; authenticate it like the others unless it only
//! reads the status document.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes_body::{full, Body};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::auth::{
    authenticate_any, parse_message, ErrorBody, MessageResponse, NonceKind, NonceResponse,
    NonceStore, Refusal, RequestParts, HEADER_AUTH, HEADER_NODE, HEADER_NONCE, MAX_BODY,
    MAX_NONCE_ADDRS,
};
use super::drill::{CutOff, DrillHandler, DrillRequest, DRILL_TIMEOUT, NO_DRILL_HANDLER};
use super::identity::NodeIdentity;
use super::page;
use super::rotation::{
    RotationAck, RotationHandler, RotationRequest, RotationStep, NO_ROTATION_HANDLER,
    ROTATION_TIMEOUT,
};
use crate::secret::{ClusterSecret, Keyring};

/// Simultaneous connections served; more are closed at once. A rack's nodes each keep one or
/// two kept-alive connections to the slot authority (a 50-node rack needs about 100), so the
/// cap sits well above that.
pub const MAX_CONNECTIONS: usize = 256;
/// Of [`MAX_CONNECTIONS`], the ones only addresses that authenticated recently may use, so
/// strangers filling the rest cannot lock the cluster's own nodes out.
pub const RESERVED_FOR_VERIFIED: usize = 128;
/// Connections open at once from one address that has not authenticated recently.
pub const MAX_CONNECTIONS_PER_STRANGER: usize = 4;
/// Connections open at once from one address that authenticated recently.
pub const MAX_CONNECTIONS_PER_VERIFIED: usize = 16;
/// An address counts as verified this long after its last authenticated request.
pub const VERIFIED_FOR: Duration = Duration::from_secs(600);
/// How long a request's body may take to arrive (the headers have [`IDLE_TIMEOUT`]).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the driver has to answer a message.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection with no request for this long is closed (hyper's header-read
/// timeout runs while it waits for the next request). Clients drop idle connections sooner
/// ([`super::client::POOL_IDLE`]), so they never send on one the server is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection is shut down gracefully (the request in flight is answered) after this long,
/// however busy it is.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long the kubeconfig provider may take (`microk8s config` is normally quick).
pub const KUBECONFIG_TIMEOUT: Duration = Duration::from_secs(20);

/// Produces the cluster's admin kubeconfig (the driver plugs in `microk8s config`).
pub type KubeconfigProvider =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, anyhow::Result<String>> + Send + Sync>;

/// Successful response to `POST /v1/kubeconfig`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeconfigResponse {
    pub kubeconfig: String,
}

/// Redacted: a kubeconfig is a credential.
impl std::fmt::Debug for KubeconfigResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeconfigResponse(<redacted>)")
    }
}

mod bytes_body {
    use http_body_util::Full;
    pub type Body = Full<hyper::body::Bytes>;
    pub fn full(v: Vec<u8>) -> Body {
        Full::new(hyper::body::Bytes::from(v))
    }
}

/// A message from an authenticated peer, waiting for the driver's replies.
#[derive(Debug)]
pub struct Inbound<M> {
    /// The sender's node id (as claimed by a holder of the cluster secret).
    pub from: String,
    pub message: M,
    reply: oneshot::Sender<Vec<M>>,
}

impl<M> Inbound<M> {
    /// Answers the sender. Dropping the `Inbound` without replying answers 503.
    pub fn reply(self, replies: Vec<M>) {
        let _ = self.reply.send(replies);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("binding coordinator to {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("building the coordinator's tls config")]
    Tls(#[from] rustls::Error),
}

/// Counters of requests by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoordinatorStats {
    /// Answers to `GET /v1/nonce` (nonces handed out with message answers are not counted).
    pub nonces_issued: u64,
    pub messages: u64,
    pub status_reads: u64,
    /// Unauthenticated reads of `GET /` and `GET /status.json`.
    pub page_reads: u64,
    /// Kubeconfigs handed out.
    pub kubeconfig_reads: u64,
    /// Refused with 401.
    pub unauthorized: u64,
    /// Refused with 400, 404, 405, 413 or 422.
    pub bad_requests: u64,
    /// 503: the driver did not answer.
    pub unavailable: u64,
    /// TLS handshakes that failed (e.g. a scanner, or a client pinning another certificate).
    pub tls_failures: u64,
    /// Connections closed at once: over the per-address cap, or the server full.
    pub connections_refused: u64,
    /// Requests whose body did not arrive within [`BODY_TIMEOUT`].
    pub body_timeouts: u64,
}

/// What [`Coordinator::start`] needs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub secret: ClusterSecret,
    pub identity: NodeIdentity,
    /// Where to listen, e.g. `0.0.0.0:7443` (port 0 picks a free port).
    pub listen: SocketAddr,
}

struct State {
    keyring: Arc<Keyring>,
    rotation: Mutex<Option<RotationHandler>>,
    drill: Mutex<Option<DrillHandler>>,
    nonces: Mutex<NonceStore>,
    conns: Mutex<ConnTable>,
    stats: Mutex<CoordinatorStats>,
    status: watch::Receiver<serde_json::Value>,
    kubeconfig: Mutex<KubeconfigSource>,
    /// Values that must never appear on the public page (see [`page_response`]).
    never_public: Vec<String>,
    backup: Mutex<super::backup::BackupServing>,
}

/// Where `POST /v1/kubeconfig` gets its answer.
enum KubeconfigSource {
    /// 503 with this reason.
    Unavailable(String),
    Provider(KubeconfigProvider),
}

/// The reason given until a provider is installed (or after it was withdrawn).
pub const NO_KUBECONFIG_YET: &str =
    "this node serves no kubeconfig (it is not a running control-plane member yet)";

/// A running coordinator. Dropping it stops the server and closes its connections.
pub struct Coordinator<M> {
    local_addr: SocketAddr,
    status: watch::Sender<serde_json::Value>,
    state: Arc<State>,
    task: JoinHandle<()>,
    _m: PhantomData<fn() -> M>,
}

impl<M> Drop for Coordinator<M> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<M> Coordinator<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    /// Binds and starts serving. Messages arrive on the returned receiver.
    pub async fn start(
        cfg: CoordinatorConfig,
    ) -> Result<(Coordinator<M>, mpsc::Receiver<Inbound<M>>), CoordinatorError> {
        let keyring = Arc::new(Keyring::new(cfg.secret.clone()));
        Self::start_with_keyring(cfg, keyring).await
    }

    /// [`Coordinator::start`] authenticating against `keyring` (shared with the node's
    /// discovery and client, so a rotation moves all three at once); `cfg.secret` is then
    /// only kept off the public page.
    pub async fn start_with_keyring(
        cfg: CoordinatorConfig,
        keyring: Arc<Keyring>,
    ) -> Result<(Coordinator<M>, mpsc::Receiver<Inbound<M>>), CoordinatorError> {
        let mut tls = cfg.identity.server_config()?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| CoordinatorError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| CoordinatorError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (status_tx, status_rx) = watch::channel(serde_json::json!({}));
        let state = Arc::new(State {
            keyring,
            rotation: Mutex::new(None),
            drill: Mutex::new(None),
            nonces: Mutex::new(NonceStore::default()),
            conns: Mutex::new(ConnTable::default()),
            stats: Mutex::new(CoordinatorStats::default()),
            status: status_rx,
            kubeconfig: Mutex::new(KubeconfigSource::Unavailable(NO_KUBECONFIG_YET.into())),
            never_public: vec![
                cfg.secret.microk8s_token(),
                cfg.secret.to_file_contents().trim().to_string(),
            ],
            backup: Mutex::new(Default::default()),
        });
        let (tx, rx) = mpsc::channel::<Inbound<M>>(64);
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone(), tx));
        tracing::info!(%local_addr, fingerprint = cfg.identity.fingerprint(), "coordinator listening");
        Ok((
            Coordinator {
                local_addr,
                status: status_tx,
                state,
                task,
                _m: PhantomData,
            },
            rx,
        ))
    }
}

impl<M> Coordinator<M> {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the status document served at `GET /v1/status`. It must hold no secrets.
    pub fn set_status(&self, doc: serde_json::Value) {
        self.status.send_replace(doc);
    }

    /// [`Coordinator::set_status`] from any serialisable document.
    pub fn set_status_from<T: Serialize>(&self, doc: &T) -> Result<(), serde_json::Error> {
        self.set_status(serde_json::to_value(doc)?);
        Ok(())
    }

    /// The secrets this coordinator authenticates against.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.state.keyring.clone()
    }

    /// Serves `POST /v1/rotate` with `handler` (called once per authenticated request, with
    /// [`ROTATION_TIMEOUT`]). Until this is called, the route answers 503.
    pub fn set_rotation_handler(&self, handler: RotationHandler) {
        *self.state.rotation.lock().expect("rotation lock") = Some(handler);
    }

    /// Serves `POST /v1/drill` with `handler` (called once per authenticated request, with
    /// [`DRILL_TIMEOUT`]). Until this is called, the route answers 503.
    pub fn set_drill_handler(&self, handler: DrillHandler) {
        *self.state.drill.lock().expect("drill lock") = Some(handler);
    }

    pub fn stats(&self) -> CoordinatorStats {
        self.state.stats.lock().expect("stats lock").clone()
    }

    /// Serves `POST /v1/kubeconfig` from `provider` (called once per authenticated request,
    /// with [`KUBECONFIG_TIMEOUT`]). Until this is called, the route answers 503.
    pub fn set_kubeconfig_provider(&self, provider: KubeconfigProvider) {
        *self.state.kubeconfig.lock().expect("kubeconfig lock") =
            KubeconfigSource::Provider(provider);
    }

    /// Stops serving the kubeconfig (e.g. the node left the cluster); the route answers 503
    /// with [`NO_KUBECONFIG_YET`].
    pub fn clear_kubeconfig_provider(&self) {
        self.refuse_kubeconfig(NO_KUBECONFIG_YET);
    }

    /// Stops serving the kubeconfig, answering 503 with `reason` (e.g. "this node is a worker;
    /// ask a control-plane member").
    pub fn refuse_kubeconfig(&self, reason: impl Into<String>) {
        *self.state.kubeconfig.lock().expect("kubeconfig lock") =
            KubeconfigSource::Unavailable(reason.into());
    }

    /// Serves `POST /v1/backup/push|list|fetch` from `store` (see [`super::backup`]).
    pub fn set_backup_store(&self, store: Arc<dyn super::backup::BackupStore>) {
        self.state.backup.lock().expect("backup lock").store = Some(store);
    }

    /// Serves `POST /v1/backup/restore` with `handler`.
    pub fn set_restore_handler(&self, handler: super::backup::RestoreHandler) {
        self.state.backup.lock().expect("backup lock").restore = Some(handler);
    }

    /// Stops accepting and closes open connections.
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

/// Open connections per client address, and the addresses that authenticated recently.
#[derive(Debug, Default)]
struct ConnTable {
    open: HashMap<IpAddr, usize>,
    total: usize,
    verified: HashMap<IpAddr, Instant>,
}

impl ConnTable {
    fn is_verified(&self, addr: IpAddr, now: Instant) -> bool {
        self.verified
            .get(&addr)
            .is_some_and(|at| now.saturating_duration_since(*at) <= VERIFIED_FOR)
    }

    /// Admits one more connection from `addr`, or says no: strangers get
    /// [`MAX_CONNECTIONS_PER_STRANGER`] each and share all but [`RESERVED_FOR_VERIFIED`] of
    /// the slots; verified addresses get more and may use every slot.
    fn admit(&mut self, addr: IpAddr, now: Instant) -> bool {
        let verified = self.is_verified(addr, now);
        let (per_addr, total) = if verified {
            (MAX_CONNECTIONS_PER_VERIFIED, MAX_CONNECTIONS)
        } else {
            (
                MAX_CONNECTIONS_PER_STRANGER,
                MAX_CONNECTIONS - RESERVED_FOR_VERIFIED,
            )
        };
        let mine = self.open.get(&addr).copied().unwrap_or(0);
        if mine >= per_addr || self.total >= total {
            return false;
        }
        *self.open.entry(addr).or_default() += 1;
        self.total += 1;
        true
    }

    fn release(&mut self, addr: IpAddr) {
        if let Some(n) = self.open.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&addr);
            }
        }
        self.total = self.total.saturating_sub(1);
    }

    /// Remembers that `addr` just authenticated (bounded: expired entries go first).
    fn mark_verified(&mut self, addr: IpAddr, now: Instant) {
        if self.verified.len() >= MAX_NONCE_ADDRS && !self.verified.contains_key(&addr) {
            self.verified
                .retain(|_, at| now.saturating_duration_since(*at) <= VERIFIED_FOR);
            if self.verified.len() >= MAX_NONCE_ADDRS {
                return;
            }
        }
        self.verified.insert(addr, now);
    }
}

/// Gives a connection's slot back when the connection ends.
struct ConnGuard {
    state: Arc<State>,
    addr: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state
            .conns
            .lock()
            .expect("conns lock")
            .release(self.addr);
    }
}

async fn accept_loop<M>(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    tx: mpsc::Sender<Inbound<M>>,
) where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "coordinator accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let admitted = state
            .conns
            .lock()
            .expect("conns lock")
            .admit(peer.ip(), Instant::now());
        if !admitted {
            state.stats.lock().expect("stats lock").connections_refused += 1;
            tracing::debug!(%peer, "coordinator refused a connection (per-address cap or full)");
            drop(tcp);
            continue;
        }
        let guard = ConnGuard {
            state: state.clone(),
            addr: peer.ip(),
        };
        // Handshake and answers are small writes: without this, Nagle's algorithm holds the
        // next one back until the client's delayed ACK (40 ms) on every fresh connection.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "coordinator could not set TCP_NODELAY");
        }
        conns.spawn(serve_connection(
            acceptor.clone(),
            tcp,
            peer,
            state.clone(),
            tx.clone(),
            guard,
        ));
    }
}

async fn serve_connection<M>(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    tx: mpsc::Sender<Inbound<M>>,
    _guard: ConnGuard,
) where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state.stats.lock().expect("stats lock").tls_failures += 1;
            tracing::debug!(%peer, error = %e, "coordinator tls handshake failed");
            return;
        }
        Err(_) => {
            state.stats.lock().expect("stats lock").tls_failures += 1;
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let tx = tx.clone();
        async move { Ok::<_, std::convert::Infallible>(route(state, tx, peer.ip(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HANDLER_TIMEOUT, conn).await;
        }
    }
}

fn json_response(status: u16, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(full(body))
        .expect("static response parts are valid")
}

/// The public page or JSON. The document holds no secrets by design; as a second line of
/// defence, the cluster secret and the MicroK8s token derived from it are cut out of it should
/// a bug ever put one there (e.g. an error message echoing a join URL).
fn page_response(state: &State, json: bool) -> Response<Body> {
    state.stats.lock().expect("stats lock").page_reads += 1;
    let mut text = serde_json::to_string(&*state.status.borrow()).expect("json value");
    let live: Vec<String> = state
        .keyring
        .accepted(Instant::now())
        .iter()
        .flat_map(|k| {
            [
                k.secret().microk8s_token(),
                k.secret().to_file_contents().trim().to_string(),
            ]
        })
        .collect();
    for secret in state.never_public.iter().chain(&live) {
        if text.contains(secret.as_str()) {
            tracing::warn!("the status document contains a secret; cut from the public page (a bug: report it)");
            text = text.replace(secret.as_str(), "<redacted>");
        }
    }
    let (content_type, body) = if json {
        ("application/json", text.into_bytes())
    } else {
        let doc: serde_json::Value =
            serde_json::from_str(&text).expect("hex replaced by plain text stays valid json");
        (
            "text/html; charset=utf-8",
            page::render_page(&doc).into_bytes(),
        )
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("content-security-policy", page::CONTENT_SECURITY_POLICY)
        .body(full(body))
        .expect("static response parts are valid")
}

async fn kubeconfig_response(state: &State) -> Response<Body> {
    let provider = match &*state.kubeconfig.lock().expect("kubeconfig lock") {
        KubeconfigSource::Provider(p) => p.clone(),
        KubeconfigSource::Unavailable(reason) => {
            return refuse(state, Refusal::new(503, reason.clone()))
        }
    };
    let kubeconfig = match tokio::time::timeout(KUBECONFIG_TIMEOUT, provider()).await {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            return refuse(
                state,
                Refusal::new(503, format!("getting the kubeconfig on this node: {e:#}")),
            )
        }
        Err(_) => {
            return refuse(
                state,
                Refusal::new(
                    503,
                    format!("getting the kubeconfig on this node took over {KUBECONFIG_TIMEOUT:?}"),
                ),
            )
        }
    };
    state.stats.lock().expect("stats lock").kubeconfig_reads += 1;
    let body = serde_json::to_vec(&KubeconfigResponse { kubeconfig }).expect("string serialises");
    json_response(200, body)
}

fn refuse(state: &State, r: Refusal) -> Response<Body> {
    {
        let mut s = state.stats.lock().expect("stats lock");
        match r.status {
            401 => s.unauthorized += 1,
            503 => s.unavailable += 1,
            _ => s.bad_requests += 1,
        }
    }
    tracing::debug!(status = r.status, reason = %r.reason, "coordinator refused a request");
    let body = serde_json::to_vec(&ErrorBody { error: r.reason }).expect("string serialises");
    json_response(r.status, body)
}

/// Reads a request's body: at most `max_body` bytes, within `body_timeout` ([`MAX_BODY`] and
/// [`BODY_TIMEOUT`] except for the backup routes).
async fn read_body(
    req: Request<Incoming>,
    max_body: usize,
    body_timeout: Duration,
) -> Result<(hyper::http::request::Parts, Vec<u8>), Refusal> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || Refusal::new(413, format!("body larger than {max_body} bytes"));
    if declared.is_some_and(|n| n > max_body as u64) {
        return Err(too_large());
    }
    let collect = http_body_util::Limited::new(body, max_body).collect();
    match tokio::time::timeout(body_timeout, collect).await {
        Err(_) => Err(Refusal::new(
            408,
            format!("body did not arrive within {body_timeout:?}"),
        )),
        Ok(Ok(b)) => Ok((parts, b.to_bytes().to_vec())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(Refusal::new(400, format!("reading body: {e}"))),
    }
}

/// Refuses, before its body is read, a request that cannot pass authentication: headers
/// missing, or a nonce this address was not given. A stranger's slow body then costs nothing.
fn precheck(state: &State, client: IpAddr, req: &Request<Incoming>) -> Result<(), Refusal> {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (Some(_), Some(nonce), Some(_)) = (h(HEADER_NODE), h(HEADER_NONCE), h(HEADER_AUTH)) else {
        return Err(Refusal::new(
            401,
            format!("missing {HEADER_NODE}, {HEADER_NONCE} or {HEADER_AUTH} header; fetch a nonce from GET /v1/nonce and sign the request"),
        ));
    };
    let known =
        state
            .nonces
            .lock()
            .expect("nonce lock")
            .is_outstanding(client, nonce, Instant::now());
    if !known {
        return Err(Refusal::new(
            401,
            "nonce unknown, expired or already used; fetch a new one",
        ));
    }
    Ok(())
}

async fn route<M>(
    state: Arc<State>,
    tx: mpsc::Sender<Inbound<M>>,
    client: IpAddr,
    req: Request<Incoming>,
) -> Response<Body>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/v1/nonce") => {
            let nonce = state.nonces.lock().expect("nonce lock").issue(
                client,
                NonceKind::Public,
                Instant::now(),
            );
            let Some(nonce) = nonce else {
                return refuse(&state, Refusal::new(503, "too many clients; try again"));
            };
            state.stats.lock().expect("stats lock").nonces_issued += 1;
            json_response(
                200,
                serde_json::to_vec(&NonceResponse { nonce }).expect("serialises"),
            )
        }
        (Method::GET, "/") => page_response(&state, false),
        (Method::GET, "/status.json") => page_response(&state, true),
        (Method::POST, "/v1/message")
        | (Method::GET, "/v1/status")
        | (Method::POST, "/v1/kubeconfig")
        | (Method::POST, "/v1/rotate")
        | (Method::POST, "/v1/drill") => authenticated_route(&state, tx, client, req).await,
        (Method::POST, p) if super::backup::is_backup_path(p) => {
            authenticated_route(&state, tx, client, req).await
        }
        (_, p) if super::backup::is_backup_path(p) => refuse(
            &state,
            Refusal::new(405, format!("{method} not allowed on {path}")),
        ),
        (
            _,
            "/" | "/status.json" | "/v1/nonce" | "/v1/message" | "/v1/status" | "/v1/kubeconfig"
            | "/v1/rotate" | "/v1/drill",
        ) => refuse(
            &state,
            Refusal::new(405, format!("{method} not allowed on {path}")),
        ),
        _ => refuse(&state, Refusal::new(404, format!("no route {path}"))),
    }
}

/// The routes that need the cluster secret: authenticate, then answer.
async fn authenticated_route<M>(
    state: &State,
    tx: mpsc::Sender<Inbound<M>>,
    client: IpAddr,
    req: Request<Incoming>,
) -> Response<Body>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if let Err(r) = precheck(state, client, &req) {
        return refuse(state, r);
    }
    // Archive-sized bodies only from an address that authenticated before (a stranger
    // holding a public nonce gets the usual small limit, so it cannot make the node buffer).
    let verified = state
        .conns
        .lock()
        .expect("conns lock")
        .is_verified(client, Instant::now());
    let (max_body, body_timeout) = if super::backup::is_backup_path(&path) && verified {
        (super::backup::MAX_FRAME, super::backup::TRANSFER_TIMEOUT)
    } else {
        (MAX_BODY, BODY_TIMEOUT)
    };
    let (parts, body) = match read_body(req, max_body, body_timeout).await {
        Ok(x) => x,
        Err(r) => {
            if r.status == 408 {
                state.stats.lock().expect("stats lock").body_timeouts += 1;
            }
            return refuse(state, r);
        }
    };
    let h = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let now = Instant::now();
    let keys: Vec<[u8; 32]> = state
        .keyring
        .accepted(now)
        .iter()
        .map(|k| *k.coordinator_key())
        .collect();
    let from = authenticate_any(
        &keys,
        &mut state.nonces.lock().expect("nonce lock"),
        now,
        RequestParts {
            from: client,
            method: method.as_str(),
            path: &path,
            node: h(HEADER_NODE),
            nonce: h(HEADER_NONCE),
            auth: h(HEADER_AUTH),
            body: &body,
            max_body,
        },
    );
    let from = match from {
        Ok(f) => f,
        Err(r) => return refuse(state, r),
    };
    state
        .conns
        .lock()
        .expect("conns lock")
        .mark_verified(client, now);
    if path == "/v1/kubeconfig" {
        tracing::info!(requester = %from, "handing out the kubeconfig");
        return kubeconfig_response(state).await;
    }
    if path == "/v1/rotate" {
        return rotation_response(state, from, &body).await;
    }
    if path == "/v1/drill" {
        return drill_response(state, from, &body).await;
    }
    if super::backup::is_backup_path(&path) {
        return backup_response(state, from, &path, body).await;
    }
    if method == Method::GET {
        state.stats.lock().expect("stats lock").status_reads += 1;
        let doc = serde_json::to_vec(&*state.status.borrow()).expect("json value");
        return json_response(200, doc);
    }
    let message = match parse_message::<M>(&body) {
        Ok(m) => m,
        Err(r) => return refuse(state, r),
    };
    deliver(state, tx, client, from, message).await
}

/// Answers an authenticated backup route (see [`super::backup`]).
async fn backup_response(state: &State, from: String, path: &str, body: Vec<u8>) -> Response<Body> {
    let serving = {
        let b = state.backup.lock().expect("backup lock");
        (b.store.clone(), b.restore.clone())
    };
    let secrets: Vec<ClusterSecret> = state
        .keyring
        .accepted(Instant::now())
        .iter()
        .map(|k| k.secret().clone())
        .collect();
    match super::backup::answer(serving, secrets, from, path, body).await {
        Ok(a) => Response::builder()
            .status(StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK))
            .header("content-type", a.content_type)
            .body(full(a.body))
            .expect("static response parts are valid"),
        Err((status, reason)) => refuse(state, Refusal::new(status, reason)),
    }
}

/// Hands an authenticated drill request to the installed handler.
async fn drill_response(state: &State, from: String, body: &[u8]) -> Response<Body> {
    let cut = match serde_json::from_slice::<CutOff>(body) {
        Ok(c) => c,
        Err(e) => {
            return refuse(
                state,
                Refusal::new(
                    422,
                    format!(
                        "invalid drill request (line {}, column {}): expected {{\"cut\": \"isolate\", \"node_id\": ID, \"restore_after_s\": N}} or {{\"cut\": \"power-off\", \"node_id\": ID}}",
                        e.line(),
                        e.column()
                    ),
                ),
            )
        }
    };
    if let Err(reason) = cut.validate() {
        return refuse(state, Refusal::new(422, reason));
    }
    let handler = state.drill.lock().expect("drill lock").clone();
    let Some(handler) = handler else {
        return refuse(state, Refusal::new(503, NO_DRILL_HANDLER));
    };
    tracing::warn!(requester = %from, cut = cut.name(), "failover drill: asked to cut this node off");
    match tokio::time::timeout(DRILL_TIMEOUT, handler(DrillRequest { from, cut })).await {
        Ok(Ok(ack)) => json_response(200, serde_json::to_vec(&ack).expect("ack serialises")),
        Ok(Err(reason)) => refuse(state, Refusal::new(503, reason)),
        Err(_) => refuse(
            state,
            Refusal::new(
                503,
                format!("the drill handler took over {DRILL_TIMEOUT:?}"),
            ),
        ),
    }
}

/// Carries out an authenticated rotation step through the installed handler.
async fn rotation_response(state: &State, from: String, body: &[u8]) -> Response<Body> {
    let step = match parse_rotation_step(body) {
        Ok(s) => s,
        Err(r) => return refuse(state, r),
    };
    let handler = state.rotation.lock().expect("rotation lock").clone();
    let Some(handler) = handler else {
        return refuse(state, Refusal::new(503, NO_ROTATION_HANDLER));
    };
    tracing::info!(requester = %from, step = step.name(), "secret rotation step");
    let answer =
        tokio::time::timeout(ROTATION_TIMEOUT, handler(RotationRequest { from, step })).await;
    let ack: RotationAck = match answer {
        Ok(Ok(ack)) => ack,
        Ok(Err(reason)) => return refuse(state, Refusal::new(503, reason)),
        Err(_) => {
            return refuse(
                state,
                Refusal::new(
                    503,
                    format!("the rotation step took over {ROTATION_TIMEOUT:?}"),
                ),
            )
        }
    };
    json_response(200, serde_json::to_vec(&ack).expect("ack serialises"))
}

/// Parses a `POST /v1/rotate` body; the error never quotes the body (it may hold a secret).
fn parse_rotation_step(body: &[u8]) -> Result<RotationStep, Refusal> {
    serde_json::from_slice::<RotationStep>(body).map_err(|e| {
        Refusal::new(
            422,
            format!(
                "invalid rotation step (line {}, column {}): expected {{\"step\": \"stage\"|\"commit\", \"secret\": HEX}} or {{\"step\": \"finish\", \"tag\": TAG}}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Hands an authenticated message to the driver and answers with its replies and the
/// sender's next nonce.
async fn deliver<M>(
    state: &State,
    tx: mpsc::Sender<Inbound<M>>,
    client: IpAddr,
    from: String,
    message: M,
) -> Response<Body>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let (reply_tx, reply_rx) = oneshot::channel();
    let inbound = Inbound {
        from,
        message,
        reply: reply_tx,
    };
    let busy = |why: &str| Refusal::new(503, why.to_string());
    if tokio::time::timeout(HANDLER_TIMEOUT, tx.send(inbound))
        .await
        .map_or(true, |r| r.is_err())
    {
        return refuse(state, busy("agent is not taking messages"));
    }
    match tokio::time::timeout(HANDLER_TIMEOUT, reply_rx).await {
        Ok(Ok(replies)) => {
            state.stats.lock().expect("stats lock").messages += 1;
            let next_nonce = state.nonces.lock().expect("nonce lock").issue(
                client,
                NonceKind::Verified,
                Instant::now(),
            );
            match serde_json::to_vec(&MessageResponse {
                replies,
                next_nonce,
            }) {
                Ok(b) => json_response(200, b),
                Err(e) => refuse(state, Refusal::new(500, format!("encoding replies: {e}"))),
            }
        }
        Ok(Err(_)) => refuse(state, busy("agent dropped the message")),
        Err(_) => refuse(state, busy("agent did not answer in time")),
    }
}
