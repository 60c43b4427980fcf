//! TLS client trust for peers whose certificates no CA vouches for (self-signed coordinator
//! certificates, a VM behind a loopback forward, the MicroK8s agent as join.py reaches it):
//! the one rustls [`ServerCertVerifier`] of the workspace, [`PeerCertVerifier`].
//!
//! What it decides about the end-entity certificate is a closure ([`EndEntityCheck`]): pin it
//! by fingerprint ([`PeerCertVerifier::pinned`]), record it, or accept it
//! ([`PeerCertVerifier::accepting_any`]) where that is the caller's documented behaviour.
//! Names, CAs and validity dates are never looked at (no wall-clock dependency). What it never
//! leaves to the closure: the handshake signatures are checked by rustls' own
//! `verify_tls12_signature` / `verify_tls13_signature` with the provider's algorithms, so only
//! the holder of the shown certificate's key completes the handshake.
//!
//! To trust a certificate some other way, pass a new closure to [`PeerCertVerifier::new`];
//! the signature checks stay here.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::coordinator::identity::fingerprint_of;

/// Decides about the peer's end-entity certificate (DER): `Ok` accepts it, an error ends the
/// handshake with that error. It may also record what it saw.
pub type EndEntityCheck = dyn Fn(&CertificateDer<'_>) -> Result<(), rustls::Error> + Send + Sync;

/// The server-certificate verifier: the end-entity certificate goes to a closure, the
/// handshake signatures to rustls (module docs).
pub struct PeerCertVerifier {
    provider: Arc<CryptoProvider>,
    check: Box<EndEntityCheck>,
}

impl std::fmt::Debug for PeerCertVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCertVerifier").finish_non_exhaustive()
    }
}

/// Whether `fingerprint` is a certificate fingerprint as [`fingerprint_of`] writes it: 64
/// lowercase hex characters.
pub fn is_fingerprint(fingerprint: &str) -> bool {
    fingerprint.len() == 64
        && fingerprint
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl PeerCertVerifier {
    /// A verifier (with the ring provider, the workspace's one) that accepts the end-entity
    /// certificate when `check` does.
    pub fn new(
        check: impl Fn(&CertificateDer<'_>) -> Result<(), rustls::Error> + Send + Sync + 'static,
    ) -> PeerCertVerifier {
        PeerCertVerifier {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            check: Box::new(check),
        }
    }

    /// Accepts exactly the certificate whose DER SHA-256 ([`fingerprint_of`]) is
    /// `fingerprint`; `None` when `fingerprint` is not 64 lowercase hex characters.
    pub fn pinned(fingerprint: &str) -> Option<PeerCertVerifier> {
        if !is_fingerprint(fingerprint) {
            return None;
        }
        let pin = fingerprint.to_string();
        Some(PeerCertVerifier::new(move |cert| {
            let got = fingerprint_of(cert);
            if got == pin {
                Ok(())
            } else {
                Err(rustls::Error::General(format!(
                    "certificate fingerprint {got} does not match the announced {pin}"
                )))
            }
        }))
    }

    /// Accepts any certificate (its handshake signature is still checked): only where the
    /// caller documents why that is safe.
    pub fn accepting_any() -> PeerCertVerifier {
        PeerCertVerifier::new(|_| Ok(()))
    }

    /// The provider whose algorithms check the handshake signatures.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// A client configuration with rustls' safe default protocol versions, this verifier and
    /// no client certificate.
    pub fn client_config(self) -> Result<ClientConfig, rustls::Error> {
        Ok(ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth())
    }
}

impl ServerCertVerifier for PeerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        (self.check)(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::NodeIdentity;
    use std::sync::Mutex;

    fn verify(v: &PeerCertVerifier, der: &[u8]) -> Result<ServerCertVerified, rustls::Error> {
        v.verify_server_cert(
            &CertificateDer::from(der.to_vec()),
            &[],
            &ServerName::try_from("peer").unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn a_pin_accepts_its_certificate_only_and_bad_pins_are_refused() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let v = PeerCertVerifier::pinned(a.fingerprint()).unwrap();
        assert!(verify(&v, a.cert_der()).is_ok());
        let e = verify(&v, b.cert_der()).unwrap_err().to_string();
        assert!(e.contains("does not match the announced"), "{e}");
        assert!(e.contains(b.fingerprint()), "{e}");
        for bad in ["", "ab", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
            assert!(PeerCertVerifier::pinned(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_closure_sees_each_certificate_and_decides() {
        let a = NodeIdentity::generate().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let v = PeerCertVerifier::new(move |cert| {
            record.lock().unwrap().push(fingerprint_of(cert));
            Err(rustls::Error::General("refused here".into()))
        });
        assert!(verify(&v, a.cert_der()).is_err());
        assert_eq!(*seen.lock().unwrap(), vec![a.fingerprint().to_string()]);
        assert!(verify(
            &PeerCertVerifier::accepting_any(),
            b"not even a certificate"
        )
        .is_ok());
        assert!(!v.supported_verify_schemes().is_empty());
    }

    /// One handshake on loopback against a server showing `server`'s certificate.
    async fn handshake(server: &NodeIdentity, verifier: PeerCertVerifier) -> Result<(), String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config().unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(verifier.client_config().unwrap()));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), serve).await;
        r
    }

    #[tokio::test]
    async fn handshakes_complete_with_the_pinned_certificate_only() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let pinned = |id: &NodeIdentity| PeerCertVerifier::pinned(id.fingerprint()).unwrap();
        assert_eq!(handshake(&a, pinned(&a)).await, Ok(()));
        let e = handshake(&a, pinned(&b)).await.unwrap_err();
        assert!(e.contains("does not match the announced"), "{e}");
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let v = PeerCertVerifier::new(move |cert| {
            *record.lock().unwrap() = Some(fingerprint_of(cert));
            Ok(())
        });
        assert_eq!(handshake(&b, v).await, Ok(()));
        assert_eq!(seen.lock().unwrap().as_deref(), Some(b.fingerprint()));
    }
}
