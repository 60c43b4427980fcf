//! The coordinator client: pins the peer's certificate fingerprint (taken from its signed
//! announcement) and signs every request with the challenge-response of [`super::auth`].
//!
//! [`PeerCertVerifier::pinned`] accepts exactly the certificate whose DER SHA-256 equals the
//! pin, ignores names, CAs and validity dates (no wall-clock dependency), and still verifies
//! the handshake signature, so only the holder of that certificate's key can complete the
//! handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::auth::{
    sign_request, ErrorBody, MessageRequest, MessageResponse, NonceResponse, HEADER_AUTH,
    HEADER_NODE, HEADER_NONCE, NONCE_TTL,
};
use super::rotation::{RotationAck, RotationStep};
use super::server::KubeconfigResponse;
use crate::secret::{ClusterSecret, Keyring};
use crate::tls::PeerCertVerifier;

/// Default timeout of one request (connect + TLS + response).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection to a peer is kept this long for the next request, well below the
/// server's [`super::server::IDLE_TIMEOUT`]. While a round is under way the slot authority
/// talks to every peer several times a second, so it pays one TLS handshake per peer instead
/// of two per message; waiting nodes that ask every few seconds still reconnect each time.
pub const POOL_IDLE: Duration = Duration::from_secs(3);

/// Largest response body the client reads (a status document of a large cluster, or a
/// kubeconfig, is far smaller).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("fingerprint {0:?} of peer is not 64 lowercase hex characters")]
    BadPin(String),
    #[error("building tls client: {0}")]
    Tls(String),
    #[error("request to coordinator {peer} failed: {reason}")]
    Transport { peer: SocketAddr, reason: String },
    #[error("coordinator {peer} timed out")]
    Timeout { peer: SocketAddr },
    #[error("coordinator {peer} refused the request ({status}): {reason}")]
    Refused {
        peer: SocketAddr,
        status: u16,
        reason: String,
    },
    #[error("coordinator {peer} sent an unreadable response: {reason}")]
    Decode { peer: SocketAddr, reason: String },
    #[error("encoding message for {peer}: {reason}")]
    Encode { peer: SocketAddr, reason: String },
}

impl ClientError {
    /// HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A request signed for one nonce; sending it twice fails the second time. `Debug` leaves
/// the body out (a rotation step carries a secret).
#[derive(Clone)]
pub struct SignedRequest {
    pub method: String,
    pub path: String,
    pub node: String,
    pub nonce: String,
    pub auth: String,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for SignedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("node", &self.node)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Talks to peers' coordinators. Cheap to share (`Arc`); keeps one HTTP client per pin.
pub struct CoordinatorClient {
    /// Requests are signed with the ring's current secret.
    keyring: Arc<Keyring>,
    node_id: String,
    timeout: Duration,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    /// Nonces handed out with peers' answers ([`MessageResponse::next_nonce`]), one per peer,
    /// with when they arrived; used for the next message within half the nonce lifetime.
    nonces: Mutex<HashMap<SocketAddr, (String, std::time::Instant)>>,
}

impl std::fmt::Debug for CoordinatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorClient")
            .field("node_id", &self.node_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Full error chain of a transport error (reqwest's `Display` hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How a signed request travels: its body's content type, the time it may take (the
/// client's own timeout when `None`), the largest answer read and who hears how much of it
/// has arrived.
pub(super) struct Delivery<'p> {
    pub content_type: &'static str,
    pub timeout: Option<Duration>,
    pub max: usize,
    pub progress: Option<&'p mut (dyn FnMut(u64, Option<u64>) + Send)>,
}

impl Delivery<'_> {
    /// A JSON body within the client's timeout; answers up to [`MAX_RESPONSE`].
    pub(super) fn json() -> Self {
        Delivery {
            content_type: "application/json",
            timeout: None,
            max: MAX_RESPONSE,
            progress: None,
        }
    }

    /// A binary body (an archive frame) within `timeout`; answers up to [`MAX_RESPONSE`].
    pub(super) fn transfer(timeout: Duration) -> Self {
        Delivery {
            content_type: "application/octet-stream",
            timeout: Some(timeout),
            ..Delivery::json()
        }
    }
}

/// Decodes a JSON answer from `peer`.
pub(super) fn json<T: DeserializeOwned>(peer: SocketAddr, bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode {
        peer,
        reason: e.to_string(),
    })
}

impl CoordinatorClient {
    /// A client that signs as `node_id` with the cluster's coordinator key.
    pub fn new(secret: &ClusterSecret, node_id: &str) -> Self {
        Self::with_keyring(Arc::new(Keyring::new(secret.clone())), node_id)
    }

    /// A client that signs as `node_id` with `keyring`'s current secret at each request (a
    /// rotation switches it without a new client).
    pub fn with_keyring(keyring: Arc<Keyring>, node_id: &str) -> Self {
        CoordinatorClient {
            keyring,
            node_id: node_id.to_string(),
            timeout: DEFAULT_TIMEOUT,
            clients: Mutex::new(HashMap::new()),
            nonces: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn http(&self, pin: &str) -> Result<reqwest::Client, ClientError> {
        let mut clients = self.clients.lock().expect("client cache lock");
        if let Some(c) = clients.get(pin) {
            return Ok(c.clone());
        }
        let tls = PeerCertVerifier::pinned(pin)
            .ok_or_else(|| ClientError::BadPin(pin.to_string()))?
            .client_config()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .pool_max_idle_per_host(2)
            .pool_idle_timeout(POOL_IDLE)
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build()
            .map_err(|e| ClientError::Tls(chain(&e)))?;
        if clients.len() >= 256 {
            clients.clear();
        }
        clients.insert(pin.to_string(), client.clone());
        Ok(client)
    }

    fn transport(&self, peer: SocketAddr, e: reqwest::Error) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout { peer }
        } else {
            ClientError::Transport {
                peer,
                reason: chain(&e),
            }
        }
    }

    /// Reads a response body of at most `delivery.max` bytes, reporting `(received, announced
    /// length)` to its progress as chunks arrive: a peer (or whoever answers in its place)
    /// cannot make the client buffer without bound.
    async fn read_limited(
        &self,
        peer: SocketAddr,
        mut resp: reqwest::Response,
        delivery: &mut Delivery<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let max = delivery.max;
        let too_large = || ClientError::Decode {
            peer,
            reason: format!("response larger than {max} bytes"),
        };
        let total = resp.content_length();
        if total.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(total.unwrap_or(0).min(max as u64) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(peer, e))? {
            if bytes.len() + chunk.len() > max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
            if let Some(progress) = delivery.progress.as_mut() {
                progress(bytes.len() as u64, total);
            }
        }
        Ok(bytes)
    }

    /// The body of a successful answer (read as `delivery` says), or the refusal with the
    /// peer's reason (its error body, at most [`MAX_RESPONSE`] bytes read).
    async fn read_answer(
        &self,
        peer: SocketAddr,
        resp: reqwest::Response,
        delivery: &mut Delivery<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return self.read_limited(peer, resp, delivery).await;
        }
        let bytes = self.read_limited(peer, resp, &mut Delivery::json()).await?;
        let reason = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        Err(ClientError::Refused {
            peer,
            status: status.as_u16(),
            reason,
        })
    }

    /// Fetches a fresh nonce from `peer`.
    pub async fn nonce(&self, peer: SocketAddr, fingerprint: &str) -> Result<String, ClientError> {
        let resp = self
            .http(fingerprint)?
            .get(format!("https://{peer}/v1/nonce"))
            .send()
            .await
            .map_err(|e| self.transport(peer, e))?;
        let bytes = self.read_answer(peer, resp, &mut Delivery::json()).await?;
        Ok(json::<NonceResponse>(peer, &bytes)?.nonce)
    }

    /// Signs a `POST /v1/message` carrying `message` for `nonce`.
    pub fn sign_message<M: Serialize>(
        &self,
        peer: SocketAddr,
        nonce: &str,
        message: &M,
    ) -> Result<SignedRequest, ClientError> {
        let body =
            serde_json::to_vec(&MessageRequest { message }).map_err(|e| ClientError::Encode {
                peer,
                reason: e.to_string(),
            })?;
        Ok(self.sign("POST", "/v1/message", nonce, body))
    }

    pub(super) fn sign(
        &self,
        method: &str,
        path: &str,
        nonce: &str,
        body: Vec<u8>,
    ) -> SignedRequest {
        SignedRequest {
            method: method.to_string(),
            path: path.to_string(),
            node: self.node_id.clone(),
            nonce: nonce.to_string(),
            auth: sign_request(
                self.keyring.current().coordinator_key(),
                nonce,
                method,
                path,
                &body,
                &self.node_id,
            ),
            body,
        }
    }

    /// Sends a request signed earlier (see [`CoordinatorClient::sign_message`]).
    pub async fn send_signed<T: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        req: &SignedRequest,
    ) -> Result<T, ClientError> {
        let bytes = self
            .send_signed_with(peer, fingerprint, req, &mut Delivery::json())
            .await?;
        json(peer, &bytes)
    }

    /// The one way a signed request goes out (every `send_signed*` and [`Self::call`] end
    /// here): the signature headers, the body as `delivery` labels it, within its timeout;
    /// returns the successful answer's raw body.
    pub(super) async fn send_signed_with(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        req: &SignedRequest,
        delivery: &mut Delivery<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| {
            ClientError::Encode {
                peer,
                reason: e.to_string(),
            }
        })?;
        let mut builder = self
            .http(fingerprint)?
            .request(method, format!("https://{peer}{}", req.path));
        if let Some(timeout) = delivery.timeout {
            builder = builder.timeout(timeout);
        }
        let resp = builder
            .header(HEADER_NODE, &req.node)
            .header(HEADER_NONCE, &req.nonce)
            .header(HEADER_AUTH, &req.auth)
            .header("content-type", delivery.content_type)
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| self.transport(peer, e))?;
        self.read_answer(peer, resp, delivery).await
    }

    /// One authenticated round trip: a fresh nonce from `peer`, `method path body` signed for
    /// it and sent as `delivery` says; returns the successful answer's raw body.
    pub(super) async fn call_with(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        (method, path): (&str, &str),
        body: Vec<u8>,
        delivery: &mut Delivery<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let nonce = self.nonce(peer, fingerprint).await?;
        let req = self.sign(method, path, &nonce, body);
        self.send_signed_with(peer, fingerprint, &req, delivery)
            .await
    }

    /// [`Self::call_with`] with a JSON body and answer.
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        (method, path): (&str, &str),
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let bytes = self
            .call_with(
                peer,
                fingerprint,
                (method, path),
                body,
                &mut Delivery::json(),
            )
            .await?;
        json(peer, &bytes)
    }

    /// Sends one message to the coordinator at `peer`, whose certificate must have
    /// `fingerprint`; returns the peer's replies.
    pub async fn send<M: Serialize + DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        message: &M,
    ) -> Result<Vec<M>, ClientError> {
        match self.send_once(peer, fingerprint, message).await {
            // A kept-alive connection the peer closed just as we reused it; a fresh nonce and
            // connection settle it. (Protocol messages may arrive twice: they are idempotent.)
            Err(ClientError::Transport { .. }) => self.send_once(peer, fingerprint, message).await,
            res => res,
        }
    }

    async fn send_once<M: Serialize + DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        message: &M,
    ) -> Result<Vec<M>, ClientError> {
        if let Some(nonce) = self.cached_nonce(peer) {
            match self.send_with(peer, fingerprint, &nonce, message).await {
                // The peer restarted or forgot the nonce: ask for a fresh one below.
                Err(ClientError::Refused { status: 401, .. }) => {}
                res => return res,
            }
        }
        let nonce = self.nonce(peer, fingerprint).await?;
        self.send_with(peer, fingerprint, &nonce, message).await
    }

    async fn send_with<M: Serialize + DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        nonce: &str,
        message: &M,
    ) -> Result<Vec<M>, ClientError> {
        let req = self.sign_message(peer, nonce, message)?;
        let resp: MessageResponse<M> = self.send_signed(peer, fingerprint, &req).await?;
        if let Some(n) = resp.next_nonce {
            let mut cache = self.nonces.lock().expect("nonce cache lock");
            if cache.len() >= 256 && !cache.contains_key(&peer) {
                cache.clear();
            }
            cache.insert(peer, (n, std::time::Instant::now()));
        }
        Ok(resp.replies)
    }

    /// The nonce the peer handed out with its last answer, if still well within its lifetime.
    /// Taken out: a nonce is good for one request only.
    fn cached_nonce(&self, peer: SocketAddr) -> Option<String> {
        let (nonce, at) = self
            .nonces
            .lock()
            .expect("nonce cache lock")
            .remove(&peer)?;
        (at.elapsed() < NONCE_TTL / 2).then_some(nonce)
    }

    /// Reads the peer's status document.
    pub async fn status(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
    ) -> Result<serde_json::Value, ClientError> {
        self.call(peer, fingerprint, ("GET", "/v1/status"), Vec::new())
            .await
    }

    /// Fetches the cluster's admin kubeconfig from the control-plane member at `peer`
    /// (`POST /v1/kubeconfig`). A node that serves none answers 503 ([`ClientError::Refused`]).
    /// The kubeconfig is a credential: callers must not log it.
    pub async fn kubeconfig(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
    ) -> Result<String, ClientError> {
        let resp: KubeconfigResponse = self
            .call(peer, fingerprint, ("POST", "/v1/kubeconfig"), Vec::new())
            .await?;
        Ok(resp.kubeconfig)
    }

    /// Sends one secret rotation step to the node at `peer` (`POST /v1/rotate`); returns
    /// where the node's keys stand afterwards. The step may carry a secret: it travels only
    /// inside the pinned TLS connection.
    pub async fn rotate(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        step: &RotationStep,
    ) -> Result<RotationAck, ClientError> {
        let body = serde_json::to_vec(step).map_err(|e| ClientError::Encode {
            peer,
            reason: e.to_string(),
        })?;
        self.call(peer, fingerprint, ("POST", "/v1/rotate"), body)
            .await
    }
}
