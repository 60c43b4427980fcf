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
//!
//! Rotation (`imagebuilder secret rotate`): a running node holds its secrets in a [`Keyring`],
//! shared by its discovery, its coordinator server and its coordinator client. The ring has
//! one *current* secret (announcements and requests are signed with it) and, for a bounded
//! time, others it still *accepts*: a staged new secret before the switch, the old one for a
//! grace period after it. [`ClusterSecret::replace_file`] writes the new secret atomically.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::RwLock;
use std::time::Instant;

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

    /// Parses the file format (64 hex characters, surrounding white space ignored); `None`
    /// when malformed. The text is never echoed anywhere.
    pub fn from_hex(text: &str) -> Option<Self> {
        Self::parse(text.trim())
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

    /// Writes the secret to `path` with mode 0600, replacing an existing file atomically
    /// (temporary file, fsync, rename): a power cut leaves the old or the new secret, never
    /// half of one. Used by rotation; [`ClusterSecret::write_new`] is for fresh files.
    pub fn replace_file(&self, path: &Path) -> Result<(), SecretError> {
        rackseed_host::fs::write_atomic(path, self.to_file_contents().as_bytes(), 0o600).map_err(
            |e| SecretError::Write {
                path: path.display().to_string(),
                source: std::io::Error::other(format!("{e:#}")),
            },
        )
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

    /// Key for the control-plane nodes' VRRP (keepalived) instance of the floating API
    /// address: its virtual router id and authentication password come from it.
    pub fn keepalived_key(&self) -> [u8; 32] {
        self.derive("rackseed/v1/keepalived-vrrp")
    }
}

/// The values one secret yields, derived once.
#[derive(Clone, PartialEq, Eq)]
pub struct DerivedKeys {
    secret: ClusterSecret,
    tag: String,
    announcement: [u8; 32],
    coordinator: [u8; 32],
}

/// Redacted like the secret; the tag is not secret.
impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKeys")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl DerivedKeys {
    pub fn new(secret: ClusterSecret) -> Self {
        DerivedKeys {
            tag: secret.cluster_tag(),
            announcement: secret.announcement_key(),
            coordinator: secret.coordinator_key(),
            secret,
        }
    }

    pub fn secret(&self) -> &ClusterSecret {
        &self.secret
    }

    /// [`ClusterSecret::cluster_tag`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// [`ClusterSecret::announcement_key`].
    pub fn announcement_key(&self) -> &[u8; 32] {
        &self.announcement
    }

    /// [`ClusterSecret::coordinator_key`].
    pub fn coordinator_key(&self) -> &[u8; 32] {
        &self.coordinator
    }
}

/// Most secrets a ring accepts besides its current one.
pub const MAX_ACCEPTED_OTHERS: usize = 4;

/// The secrets a node signs with and accepts, swappable at run time (see the module docs).
/// Cheap to read; shared as `Arc<Keyring>`.
#[derive(Debug)]
pub struct Keyring {
    ring: RwLock<Ring>,
}

#[derive(Debug)]
struct Ring {
    current: DerivedKeys,
    /// Also accepted, each until its deadline (monotonic).
    others: Vec<(DerivedKeys, Instant)>,
}

impl Keyring {
    /// A ring holding only `secret`.
    pub fn new(secret: ClusterSecret) -> Self {
        Keyring {
            ring: RwLock::new(Ring {
                current: DerivedKeys::new(secret),
                others: Vec::new(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The secret this node signs with.
    pub fn current(&self) -> DerivedKeys {
        self.read().current.clone()
    }

    /// Every secret accepted at `now`: the current one first, then the others still in time.
    pub fn accepted(&self, now: Instant) -> Vec<DerivedKeys> {
        let r = self.read();
        std::iter::once(r.current.clone())
            .chain(
                r.others
                    .iter()
                    .filter(|(_, until)| now <= *until)
                    .map(|(k, _)| k.clone()),
            )
            .collect()
    }

    /// The accepted secret whose cluster tag is `tag`, if any.
    pub fn for_tag(&self, tag: &str, now: Instant) -> Option<DerivedKeys> {
        self.accepted(now).into_iter().find(|k| k.tag == tag)
    }

    /// Accepts `secret` as well until `until` (a staged rotation); signing is unchanged.
    /// Nothing changes when it is the current secret.
    pub fn accept_also(&self, secret: ClusterSecret, until: Instant) {
        let mut r = self.write();
        if r.current.secret == secret {
            return;
        }
        r.others.retain(|(k, _)| k.secret != secret);
        r.others.push((DerivedKeys::new(secret), until));
        while r.others.len() > MAX_ACCEPTED_OTHERS {
            r.others.remove(0);
        }
    }

    /// Makes `secret` the current one; the previous one stays accepted until `old_until`.
    /// Returns the previous secret, or `None` when `secret` already was the current one.
    pub fn switch_to(&self, secret: ClusterSecret, old_until: Instant) -> Option<ClusterSecret> {
        let mut r = self.write();
        if r.current.secret == secret {
            return None;
        }
        r.others.retain(|(k, _)| k.secret != secret);
        let old = std::mem::replace(&mut r.current, DerivedKeys::new(secret));
        let previous = old.secret.clone();
        r.others.push((old, old_until));
        while r.others.len() > MAX_ACCEPTED_OTHERS {
            r.others.remove(0);
        }
        Some(previous)
    }

    /// Accepts only the current secret from now on (a finished rotation).
    pub fn forget_others(&self) {
        self.write().others.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keyring_stages_switches_and_forgets() {
        let (a, b) = (
            ClusterSecret::from_bytes([1; 32]),
            ClusterSecret::from_bytes([2; 32]),
        );
        let ring = Keyring::new(a.clone());
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        assert_eq!(ring.accepted(t0).len(), 1);
        ring.accept_also(b.clone(), later);
        ring.accept_also(b.clone(), later);
        assert_eq!(
            ring.current().secret(),
            &a,
            "staging does not change signing"
        );
        assert_eq!(ring.accepted(t0).len(), 2);
        assert!(ring.for_tag(&b.cluster_tag(), t0).is_some());
        assert!(
            ring.for_tag(&b.cluster_tag(), later + Duration::from_secs(1))
                .is_none(),
            "a stage expires"
        );
        assert_eq!(ring.switch_to(b.clone(), later), Some(a.clone()));
        assert_eq!(ring.switch_to(b.clone(), later), None, "idempotent");
        assert_eq!(ring.current().secret(), &b);
        let tags: Vec<String> = ring
            .accepted(t0)
            .iter()
            .map(|k| k.tag().to_string())
            .collect();
        assert_eq!(tags, [b.cluster_tag(), a.cluster_tag()]);
        ring.forget_others();
        assert!(ring.for_tag(&a.cluster_tag(), t0).is_none());
        assert!(!format!("{:?}", ring.current()).contains("0202"));
    }

    #[test]
    fn replace_file_is_atomic_0600_and_from_hex_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = ClusterSecret::generate();
        s.replace_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterSecret::load(&path).unwrap(), s);
        assert_eq!(ClusterSecret::from_hex(&s.to_file_contents()), Some(s));
        assert_eq!(ClusterSecret::from_hex("abc"), None);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

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
