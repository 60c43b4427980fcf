//! The coordinator's TLS identity: a self-signed certificate generated once per node and kept
//! in the state directory (`coordinator-key.pem` mode 0600, `coordinator-cert.pem`). Peers
//! never trust it through a CA; they pin its fingerprint (hex SHA-256 of the DER), which this
//! node announces in its signed mDNS record. The validity period is rcgen's default (1975 to
//! 4096) and nobody checks it, so a Pi without an RTC is not affected by its clock.
//!
//! Files are written to a temporary name, synced and renamed, key first; a cut between the
//! two leaves a key without a certificate, from which the certificate is simply regenerated.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub const KEY_FILE: &str = "coordinator-key.pem";
pub const CERT_FILE: &str = "coordinator-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid PEM {what}; move it away to generate a new identity")]
    Invalid { path: PathBuf, what: &'static str },
    #[error("{path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("generating the coordinator certificate: {0}")]
    Generate(String),
}

/// Certificate + key of this node's coordinator.
#[derive(Debug)]
pub struct NodeIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: String,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// Hex SHA-256 of a certificate's DER bytes (64 lowercase hex characters).
pub fn fingerprint_of(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn generate_cert(key: &rcgen::KeyPair) -> Result<rcgen::Certificate, IdentityError> {
    let params = rcgen::CertificateParams::new(vec!["rackseed-coordinator".to_string()])
        .map_err(|e| IdentityError::Generate(e.to_string()))?;
    params
        .self_signed(key)
        .map_err(|e| IdentityError::Generate(e.to_string()))
}

impl NodeIdentity {
    /// A fresh identity held only in memory (tests, or a node without a state directory).
    pub fn generate() -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = generate_cert(&key)?;
        Ok(Self::from_parts(
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ))
    }

    fn from_parts(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Self {
        let fingerprint = fingerprint_of(&cert);
        NodeIdentity {
            cert,
            key,
            fingerprint,
        }
    }

    /// Loads the identity from `dir`, creating it (and `dir`, mode 0700) the first time.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io {
                action,
                path,
                source,
            }
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("setting mode of", dir))?;
        }
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_pair = if key_path.exists() {
            let mode = std::fs::metadata(&key_path)
                .map_err(io("reading", &key_path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::KeyTooOpen {
                    path: key_path,
                    mode,
                });
            }
            let text = std::fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
            rcgen::KeyPair::from_pem(&text).map_err(|_| IdentityError::Invalid {
                path: key_path.clone(),
                what: "private key",
            })?
        } else {
            let kp =
                rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
            // A certificate without its key is useless: start over with both.
            let _ = std::fs::remove_file(&cert_path);
            write_atomic(&key_path, kp.serialize_pem().as_bytes(), 0o600)?;
            kp
        };
        let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
        if cert_path.exists() {
            let cert =
                CertificateDer::from_pem_file(&cert_path).map_err(|_| IdentityError::Invalid {
                    path: cert_path.clone(),
                    what: "certificate",
                })?;
            return Ok(Self::from_parts(cert, key));
        }
        let cert = generate_cert(&key_pair)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), fingerprint = %fingerprint_of(cert.der()), "generated coordinator certificate");
        Ok(Self::from_parts(cert.der().clone(), key))
    }

    /// Hex SHA-256 of the certificate DER: what peers pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, for a TLS server presenting this identity (the coordinator, or a test
    /// standing in for a peer). Never log or send it.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// A TLS server configuration presenting this identity: the ring provider, rustls' safe
    /// default protocol versions, no client certificates.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, rustls::Error> {
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![self.cert.clone()], self.key_der())
    }
}

/// The shared atomic writer (temp file unique per process, fsync, rename), with this module's
/// error type.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    rackseed_host::fs::write_atomic(path, bytes, mode).map_err(|e| IdentityError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("{e:#}")),
    })
}

/// The fingerprint of the certificate kept in `dir`, without creating anything (for
/// `firstboot status`, which must not race the agent's first start).
pub fn read_fingerprint(dir: &Path) -> Result<String, IdentityError> {
    let cert_path = dir.join(CERT_FILE);
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(|_| IdentityError::Invalid {
        path: cert_path.clone(),
        what: "certificate",
    })?;
    Ok(fingerprint_of(&cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = NodeIdentity::load_or_create(&state).unwrap();
        let key_mode = std::fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let b = NodeIdentity::load_or_create(&state).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        assert_eq!(a.fingerprint(), fingerprint_of(a.cert_der()));
    }

    #[test]
    fn lost_certificate_is_regenerated_from_the_kept_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeIdentity::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let b = NodeIdentity::load_or_create(dir.path()).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.key_der().secret_der(),
            b.key_der().secret_der(),
            "the key is kept"
        );
    }

    #[test]
    fn open_key_and_garbage_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, IdentityError::KeyTooOpen { .. }), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.path().join(CERT_FILE), "garbage").unwrap();
        let e = NodeIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains(CERT_FILE), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CERT_FILE)).unwrap(),
            "garbage"
        );
    }
}
