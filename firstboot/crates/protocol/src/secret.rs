//! The cluster secret: 256 random bits shared by every node of one cluster.
//!
//! Stored as 64 lowercase hex characters (plus a newline) in a file of mode 0600. It never
//! appears in logs, `Debug` output or error messages. Everything else that needs a shared
//! value derives it here with HMAC-SHA256 under a fixed label, so one file yields:
//! - [`ClusterSecret::cluster_tag`]: a short non-secret tag announced over mDNS so nodes can
//!   tell clusters apart without publishing the cluster name;
//! - [`ClusterSecret::announcement_key`] / [`ClusterSecret::coordinator_key`]: HMAC keys;
//! - [`ClusterSecret::microk8s_token`]: MicroK8s' `persistentClusterToken` (>= 32 chars).
//!
//! To derive a new value, add a method with its own label; never reuse a label.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Errors reading or writing a secret file. Messages name the path, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading cluster secret {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing cluster secret {path}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster secret {path} already exists; refusing to overwrite it")]
    Exists { path: String },
    #[error("cluster secret {path} is malformed: expected 64 hex characters (256 bits)")]
    Malformed { path: String },
    #[error("cluster secret {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    TooOpen { path: String, mode: u32 },
}

/// 256-bit cluster secret. `Debug` is redacted and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// A fresh secret from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::fill(&mut b);
        ClusterSecret(b)
    }

    /// Wraps raw bytes (tests and fixtures).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ClusterSecret(bytes)
    }

    /// Reads a secret file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
            path: p.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::TooOpen { path: p, mode });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(text.trim()).ok_or(SecretError::Malformed { path: p })
    }

    fn parse(hex_text: &str) -> Option<Self> {
        if hex_text.len() != 64 {
            return None;
        }
        let bytes = hex::decode(hex_text).ok()?;
        Some(ClusterSecret(bytes.try_into().ok()?))
    }

    /// Writes the secret to a new file with mode 0600; an existing file is never replaced.
    pub fn write_new(&self, path: &Path) -> Result<(), SecretError> {
        let p = path.display().to_string();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    SecretError::Exists { path: p.clone() }
                } else {
                    SecretError::Write {
                        path: p.clone(),
                        source,
                    }
                }
            })?;
        let mut text = hex::encode(self.0);
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| SecretError::Write { path: p, source })
    }

    /// The secret's file content (for writing it into images). Handle with care.
    pub fn to_file_contents(&self) -> String {
        format!("{}\n", hex::encode(self.0))
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Non-secret 16-hex-char tag identifying the cluster in announcements.
    pub fn cluster_tag(&self) -> String {
        hex::encode(&self.derive("rackseed/v1/cluster-tag")[..8])
    }

    /// Key for the HMAC over mDNS announcement fields.
    pub fn announcement_key(&self) -> [u8; 32] {
        self.derive("rackseed/v1/announcement-hmac")
    }

    /// Key for the coordinator's challenge-response HMAC.
    pub fn coordinator_key(&self) -> [u8; 32] {
        self.derive("rackseed/v1/coordinator-hmac")
    }

    /// MicroK8s `persistentClusterToken`: 64 hex characters, identical on every node.
    pub fn microk8s_token(&self) -> String {
        hex::encode(self.derive("rackseed/v1/microk8s-persistent-cluster-token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_is_0600_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let s = ClusterSecret::generate();
        s.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterSecret::load(&path).unwrap(), s);
    }

    #[test]
    fn write_new_refuses_existing_file_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "keep me").unwrap();
        let err = ClusterSecret::generate().write_new(&path).unwrap_err();
        assert!(matches!(err, SecretError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn load_rejects_open_mode_and_malformed_content_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "zz-not-hex-zz").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ClusterSecret::load(&path),
            Err(SecretError::TooOpen { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = ClusterSecret::load(&path).unwrap_err();
        assert!(matches!(err, SecretError::Malformed { .. }));
        assert!(!err.to_string().contains("zz-not-hex-zz"));
    }

    #[test]
    fn derived_values_differ_and_debug_is_redacted() {
        let s = ClusterSecret::from_bytes([7; 32]);
        assert_ne!(s.announcement_key(), s.coordinator_key());
        assert_eq!(s.cluster_tag().len(), 16);
        assert_eq!(s.microk8s_token().len(), 64);
        assert!(!format!("{s:?}").contains("0707"));
        let other = ClusterSecret::from_bytes([8; 32]);
        assert_ne!(s.cluster_tag(), other.cluster_tag());
    }
}
