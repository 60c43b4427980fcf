//! The coordinator client: pins the peer's certificate fingerprint (taken from its signed
//! announcement) and signs every request with the challenge-response of [`super::auth`].
//!
//! [`PinnedCert`] accepts exactly the certificate whose DER SHA-256 equals the pin, ignores
//! names, CAs and validity dates (no wall-clock dependency), and still verifies the handshake
//! signature, so only the holder of that certificate's key can complete the handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::auth::{
    sign_request, ErrorBody, MessageRequest, MessageResponse, NonceResponse, HEADER_AUTH,
    HEADER_NODE, HEADER_NONCE, NONCE_TTL,
};
use super::identity::fingerprint_of;
use super::rotation::{RotationAck, RotationStep};
use super::server::KubeconfigResponse;
use crate::secret::{ClusterSecret, Keyring};

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

/// Accepts only the certificate with this SHA-256 fingerprint. See the module docs.
#[derive(Debug)]
pub struct PinnedCert {
    pin: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    pub fn new(fingerprint: &str) -> Result<Self, ClientError> {
        if fingerprint.len() != 64
            || !fingerprint
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ClientError::BadPin(fingerprint.to_string()));
        }
        Ok(PinnedCert {
            pin: fingerprint.to_string(),
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint_of(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {got} does not match the announced {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
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
        let verifier = Arc::new(PinnedCert::new(pin)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
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

    /// Reads a response body of at most [`MAX_RESPONSE`] bytes: a peer (or whoever answers in
    /// its place) cannot make the client buffer without bound.
    async fn read_limited(
        &self,
        peer: SocketAddr,
        mut resp: reqwest::Response,
    ) -> Result<Vec<u8>, ClientError> {
        let too_large = || ClientError::Decode {
            peer,
            reason: format!("response larger than {MAX_RESPONSE} bytes"),
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE as u64)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(peer, e))? {
            if bytes.len() + chunk.len() > MAX_RESPONSE {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = self.read_limited(peer, resp).await?;
        if !status.is_success() {
            let reason = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(ClientError::Refused {
                peer,
                status: status.as_u16(),
                reason,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            peer,
            reason: e.to_string(),
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
        Ok(self.decode::<NonceResponse>(peer, resp).await?.nonce)
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
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| {
            ClientError::Encode {
                peer,
                reason: e.to_string(),
            }
        })?;
        let resp = self
            .http(fingerprint)?
            .request(method, format!("https://{peer}{}", req.path))
            .header(HEADER_NODE, &req.node)
            .header(HEADER_NONCE, &req.nonce)
            .header(HEADER_AUTH, &req.auth)
            .header("content-type", "application/json")
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| self.transport(peer, e))?;
        self.decode(peer, resp).await
    }

    /// [`CoordinatorClient::send_signed`] with a longer timeout for this request (archive
    /// transfers, restores).
    pub(super) async fn send_signed_within<T: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        req: &SignedRequest,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut quiet = |_: u64, _: Option<u64>| {};
        let bytes = self
            .send_signed_raw(peer, fingerprint, req, timeout, MAX_RESPONSE, &mut quiet)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            peer,
            reason: e.to_string(),
        })
    }

    /// Sends a signed request and returns the successful answer's raw body (at most `max`
    /// bytes), reporting `(received, announced length)` to `progress` as chunks arrive.
    pub(super) async fn send_signed_raw(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        req: &SignedRequest,
        timeout: Duration,
        max: usize,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<Vec<u8>, ClientError> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| {
            ClientError::Encode {
                peer,
                reason: e.to_string(),
            }
        })?;
        let mut resp = self
            .http(fingerprint)?
            .request(method, format!("https://{peer}{}", req.path))
            .timeout(timeout)
            .header(HEADER_NODE, &req.node)
            .header(HEADER_NONCE, &req.nonce)
            .header(HEADER_AUTH, &req.auth)
            .header("content-type", "application/octet-stream")
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| self.transport(peer, e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = self.read_limited(peer, resp).await?;
            let reason = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(ClientError::Refused {
                peer,
                status: status.as_u16(),
                reason,
            });
        }
        let total = resp.content_length();
        let too_large = || ClientError::Decode {
            peer,
            reason: format!("response larger than {max} bytes"),
        };
        if total.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(total.unwrap_or(0).min(max as u64) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(peer, e))? {
            if bytes.len() + chunk.len() > max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
            progress(bytes.len() as u64, total);
        }
        Ok(bytes)
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
        let nonce = self.nonce(peer, fingerprint).await?;
        let req = self.sign("GET", "/v1/status", &nonce, Vec::new());
        self.send_signed(peer, fingerprint, &req).await
    }

    /// Fetches the cluster's admin kubeconfig from the control-plane member at `peer`
    /// (`POST /v1/kubeconfig`). A node that serves none answers 503 ([`ClientError::Refused`]).
    /// The kubeconfig is a credential: callers must not log it.
    pub async fn kubeconfig(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
    ) -> Result<String, ClientError> {
        let nonce = self.nonce(peer, fingerprint).await?;
        let req = self.sign("POST", "/v1/kubeconfig", &nonce, Vec::new());
        let resp: KubeconfigResponse = self.send_signed(peer, fingerprint, &req).await?;
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
        let nonce = self.nonce(peer, fingerprint).await?;
        let req = self.sign("POST", "/v1/rotate", &nonce, body);
        self.send_signed(peer, fingerprint, &req).await
    }
}
