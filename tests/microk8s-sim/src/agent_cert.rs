//! The cluster agent's TLS certificate, where the real snap keeps it: `$SNAP_DATA/certs/server.crt`
//! and `$SNAP_DATA/certs/server.key` (PEM; the key mode 0600). Install generates a fresh
//! self-signed pair (rcgen, ECDSA P-256); the daemon serves it and `add-node` prints the first 12
//! hex digits of the SHA-256 of its DER form as the check hash (A1), which is what `microk8s
//! join IP:PORT/TOKEN/FINGERPRINT` compares with the certificate the peer presents (A3).
//!
//! The real certificate is signed by the cluster CA and names the node's addresses; nothing in
//! the simulator looks at either, so a self-signed certificate stands in.

use std::path::{Path, PathBuf};

use crate::state_file::write_atomic;
use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// `$SNAP_DATA/certs/server.crt`.
pub fn cert_path(snap_data: &Path) -> PathBuf {
    snap_data.join("certs/server.crt")
}

/// `$SNAP_DATA/certs/server.key`.
pub fn key_path(snap_data: &Path) -> PathBuf {
    snap_data.join("certs/server.key")
}

/// The lowercase hex SHA-256 of a DER certificate; `join` compares its prefix (A3).
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The agent's certificate and key, as the daemon serves them.
#[derive(Debug)]
pub struct AgentCert {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// Generates a new self-signed certificate and key and writes them under `snap_data` (the key
/// with mode 0600, both through a temporary file and a rename); returns the certificate's DER.
pub fn generate_and_write(snap_data: &Path) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate().context("generating the cluster agent's key")?;
    let mut params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
    ])
    .context("cluster agent certificate parameters")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let cert = params
        .self_signed(&key)
        .context("self-signing the cluster agent's certificate")?;
    let dir = snap_data.join("certs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Each through its own unpredictable temporary name: the key and the certificate, or two
    // installs that overlap on a slow machine, never rename each other's file.
    write_atomic(&key_path(snap_data), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path(snap_data), cert.pem().as_bytes(), 0o644)?;
    Ok(cert.der().to_vec())
}

/// Reads the certificate and key that install wrote under `snap_data`.
pub fn load(snap_data: &Path) -> Result<AgentCert> {
    let (cpath, kpath) = (cert_path(snap_data), key_path(snap_data));
    let cert = CertificateDer::from_pem_file(&cpath)
        .with_context(|| format!("reading the cluster agent certificate {}", cpath.display()))?;
    let key = PrivateKeyDer::from_pem_file(&kpath)
        .with_context(|| format!("reading the cluster agent key {}", kpath.display()))?;
    if cert.is_empty() {
        bail!("{} holds an empty certificate", cpath.display());
    }
    Ok(AgentCert { cert, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn install_writes_a_loadable_pair_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let der = generate_and_write(dir.path()).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.cert.as_ref(), &der[..]);
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(key_path(dir.path())), 0o600);
        assert_eq!(mode(cert_path(dir.path())), 0o644);
        let pem = std::fs::read_to_string(cert_path(dir.path())).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        // A second install makes a different certificate.
        assert_ne!(generate_and_write(dir.path()).unwrap(), der);
        assert_eq!(sha256_hex(&der).len(), 64);
    }
}
