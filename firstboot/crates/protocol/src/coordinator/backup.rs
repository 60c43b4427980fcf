//! Datastore backups on the wire: the signed manifest that goes with every archive, the checks
//! an archive must pass before anyone keeps or restores it, and the coordinator routes that
//! carry archives between nodes and to the workstation.
//!
//! # The archive
//!
//! An archive is exactly what `microk8s dbctl backup -o NAME` writes (checked against
//! canonical/microk8s `scripts/wrappers/dbctl.py` and canonical/k8s-dqlite
//! `pkg/migrator/migrator.go`): `NAME.tar.gz`, a gzip'd tar holding one folder `NAME/` with
//! pairs `0.key`/`0.data`, `1.key`/`1.data`, … (each kine key under `/` and its raw value).
//! `dbctl restore FILE` looks for the folder named after the file's base name, so a renamed
//! archive restores *nothing* and still exits 0: [`inspect_archive`] therefore insists on the
//! folder being `NAME/`, the pairs being contiguous from 0 and nothing else being inside, and
//! every holder keeps the file under its original name.
//!
//! # The manifest
//!
//! Beside each archive travels a [`BackupManifest`]: its name, the cluster (config name and
//! formation cluster id), the node that took it, when (that node's clock, for display and
//! scheduling only), size, SHA-256, key count and data bytes, and whether it looked
//! near-empty (MicroK8s #4259/#4308). It is signed with an HMAC under a key derived from the
//! cluster secret ([`manifest_key`]), so an archive from another cluster (another secret) or a
//! manifest edited to match a tampered archive is refused by every receiver and by restore.
//!
//! # Routes (all authenticated like `/v1/message`; see [`super::server`])
//!
//! - `POST /v1/backup/push`: body = [`encode_frame`] of manifest + archive. The receiver checks
//!   the signature, size, checksum and contents ([`verify_archive`]) before its
//!   [`BackupStore`] keeps it. Bodies up to [`MAX_ARCHIVE`] (plus the manifest), within
//!   [`TRANSFER_TIMEOUT`].
//! - `POST /v1/backup/list`: `{"backups": [manifest, …]}` of what the node holds.
//! - `POST /v1/backup/fetch`: body `{"name": NAME}`; answers the frame (octet-stream).
//! - `POST /v1/backup/restore`: body = frame; checked as a push, then handed to the node's
//!   [`RestoreHandler`] (which runs `microk8s dbctl restore`); answers a [`RestoreReport`].
//!
//! The answers are not signed, but they come over the pinned TLS connection, and what matters
//! in them (the archive) is checked against its signed manifest by the client.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::client::{json, ClientError, CoordinatorClient, Delivery};
use crate::secret::ClusterSecret;

/// Largest archive accepted anywhere (push, fetch, restore). A homelab datastore's dump is a
/// few MiB; kine's default quota is far below this.
pub const MAX_ARCHIVE: usize = 256 << 20;
/// Largest manifest in a frame.
pub const MAX_MANIFEST: usize = 16 * 1024;
/// Largest body of a backup route: a frame.
pub const MAX_FRAME: usize = MAX_ARCHIVE + MAX_MANIFEST + 16;
/// Most bytes an archive may unpack to (a gzip bomb stops here).
pub const MAX_UNPACKED: u64 = 4 << 30;
/// How long one archive transfer (push, fetch) may take.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restore may take on the node (`dbctl restore` writes key by key).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(1800);
/// Version of [`BackupManifest`].
pub const MANIFEST_FORMAT: u32 = 1;
const FRAME_MAGIC: &[u8; 6] = b"RSBK1\n";

/// What travels beside an archive. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackupManifest {
    pub format: u32,
    /// The archive is `NAME.tar.gz` holding the folder `NAME/` ([`check_name`]).
    pub name: String,
    /// `cluster.name` of the config.
    pub cluster_name: String,
    /// The formation's cluster id (`term.seed`) when the backup was taken.
    pub cluster_id: String,
    /// The node that took it.
    pub origin: String,
    /// Unix seconds by the origin's clock.
    pub created_unix: u64,
    /// Archive bytes.
    pub size: u64,
    /// Hex SHA-256 of the archive.
    pub sha256: String,
    /// Key/value pairs inside.
    pub keys: u64,
    /// Sum of the values' sizes.
    pub data_bytes: u64,
    /// Why the archive looked near-empty compared with the backup before it (an alarm), if it
    /// did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
    /// Hex HMAC-SHA256 under [`manifest_key`] of the manifest with `tag` empty.
    pub tag: String,
}

impl BackupManifest {
    /// The archive's file name, `NAME.tar.gz`.
    pub fn archive_file(&self) -> String {
        format!("{}.tar.gz", self.name)
    }

    /// The manifest's file name beside the archive, `NAME.manifest.json`.
    pub fn manifest_file(&self) -> String {
        format!("{}.manifest.json", self.name)
    }

    fn mac(&self, key: &[u8; 32]) -> Hmac<Sha256> {
        let mut unsigned = self.clone();
        unsigned.tag = String::new();
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
        m.update(&serde_json::to_vec(&unsigned).expect("manifest serialises"));
        m
    }

    /// Signs the manifest with `secret`.
    pub fn sign(&mut self, secret: &ClusterSecret) {
        self.tag = hex::encode(self.mac(&manifest_key(secret)).finalize().into_bytes());
    }

    /// Whether one of `secrets` signed this manifest.
    pub fn signed_by_any(&self, secrets: &[ClusterSecret]) -> bool {
        let Ok(tag) = hex::decode(&self.tag) else {
            return false;
        };
        secrets
            .iter()
            .any(|s| self.mac(&manifest_key(s)).verify_slice(&tag).is_ok())
    }
}

/// The manifest signing key: HMAC-SHA256 under the coordinator key of a fixed label, so it is
/// bound to the cluster secret and used for nothing else.
pub fn manifest_key(secret: &ClusterSecret) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(&secret.coordinator_key())
        .expect("hmac takes any key length");
    m.update(b"rackseed/v1/backup-manifest");
    m.finalize().into_bytes().into()
}

/// Why an archive (or its manifest) was refused. Messages name what is wrong and never
/// contain archive contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("backup name {0:?} is not a plain file name (letters, digits, '.', '_', '-'; at most 100 characters)")]
    BadName(String),
    #[error("the manifest of {name} is not signed with this cluster's secret: the archive belongs to another cluster or was altered")]
    Foreign { name: String },
    #[error("{name} is a backup of cluster {found:?}, not of {expected:?}")]
    OtherCluster {
        name: String,
        expected: String,
        found: String,
    },
    #[error("{name} is {actual} bytes, its manifest says {expected}: the archive is truncated or damaged")]
    Size {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{name}: SHA-256 {actual} does not match the manifest's {expected}: the archive is damaged"
    )]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{name} is larger than {MAX_ARCHIVE} bytes")]
    TooLarge { name: String },
    #[error("{name} is not a readable tar.gz: {reason}")]
    Unreadable { name: String, reason: String },
    #[error("{name} does not hold what `microk8s dbctl backup` writes: {reason}")]
    Layout { name: String, reason: String },
    #[error("{name} holds {actual} keys, its manifest says {expected}")]
    KeyCount {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("unreadable backup frame: {0}")]
    Frame(String),
}

/// What [`inspect_archive`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFacts {
    pub size: u64,
    pub sha256: String,
    pub keys: u64,
    pub data_bytes: u64,
}

/// Accepts `backup-2026-12-07-05-30-00` and the like: no path separators, no leading dot, no
/// `.tar.gz` (the archive's name adds it).
pub fn check_name(name: &str) -> Result<(), ArchiveError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && !name.ends_with(".tar.gz")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ArchiveError::BadName(name.to_string()))
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Opens `archive` as the tar.gz `dbctl backup -o NAME` writes and counts its pairs: every
/// entry must be the folder `NAME/` or a regular file `NAME/<i>.key` / `NAME/<i>.data`, the
/// pairs complete and numbered from 0 without gaps (restore stops at the first missing
/// `<i>.key`). Unpacks at most [`MAX_UNPACKED`] bytes.
pub fn inspect_archive(name: &str, archive: &[u8]) -> Result<ArchiveFacts, ArchiveError> {
    check_name(name)?;
    if archive.len() > MAX_ARCHIVE {
        return Err(ArchiveError::TooLarge { name: name.into() });
    }
    let unreadable = |reason: String| ArchiveError::Unreadable {
        name: name.into(),
        reason,
    };
    let layout = |reason: String| ArchiveError::Layout {
        name: name.into(),
        reason,
    };
    let gz = flate2::read::GzDecoder::new(archive).take(MAX_UNPACKED);
    let mut tar = tar::Archive::new(gz);
    let mut keys = std::collections::BTreeSet::new();
    let mut datas = std::collections::BTreeSet::new();
    let mut data_bytes = 0u64;
    let entries = tar.entries().map_err(|e| unreadable(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| unreadable(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| unreadable(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        let rel = path.trim_end_matches('/');
        if rel == name || rel == format!("./{name}") {
            if !kind.is_dir() {
                return Err(layout(format!("{path} is not a folder")));
            }
            continue;
        }
        let Some(file) = rel
            .strip_prefix(&format!("{name}/"))
            .or_else(|| rel.strip_prefix(&format!("./{name}/")))
        else {
            return Err(layout(format!(
                "entry {path:?} is outside the folder {name}/ (was the archive renamed? restore looks for the folder named after the file)"
            )));
        };
        if !kind.is_file() {
            return Err(layout(format!("{path} is not a regular file")));
        }
        let (index, ext) = file
            .split_once('.')
            .ok_or_else(|| layout(format!("unexpected file {path}")))?;
        let index: u64 = index
            .parse()
            .ok()
            .filter(|_| !index.starts_with('+') && (index == "0" || !index.starts_with('0')))
            .ok_or_else(|| layout(format!("unexpected file {path}")))?;
        let size = entry
            .header()
            .size()
            .map_err(|e| unreadable(e.to_string()))?;
        // Read through, so a truncated stream is noticed here and not at restore.
        let read = std::io::copy(&mut entry, &mut std::io::sink())
            .map_err(|e| unreadable(format!("reading {path}: {e}")))?;
        if read != size {
            return Err(unreadable(format!("{path} is cut short")));
        }
        let fresh = match ext {
            "key" => keys.insert(index),
            "data" => {
                data_bytes += size;
                datas.insert(index)
            }
            _ => return Err(layout(format!("unexpected file {path}"))),
        };
        if !fresh {
            return Err(layout(format!("{path} appears twice")));
        }
    }
    // The gzip trailer (CRC, length) is checked only once the stream is read to its end.
    let mut rest = tar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| unreadable(format!("after the last entry: {e}")))?;
    if rest.limit() == 0 {
        return Err(unreadable(format!(
            "unpacks to more than {MAX_UNPACKED} bytes"
        )));
    }
    if keys != datas {
        let odd = keys
            .symmetric_difference(&datas)
            .next()
            .copied()
            .unwrap_or(0);
        return Err(layout(format!(
            "pair {odd} has a .key or a .data file but not both"
        )));
    }
    let n = keys.len() as u64;
    if keys.iter().copied().ne(0..n) {
        return Err(layout(
            "the pairs are not numbered 0, 1, 2, … without gaps (restore would stop at the gap)"
                .into(),
        ));
    }
    Ok(ArchiveFacts {
        size: archive.len() as u64,
        sha256: sha256_hex(archive),
        keys: n,
        data_bytes,
    })
}

/// Every check an archive must pass before it is kept or restored: the manifest is signed
/// with one of `secrets`, names `cluster_name` (when given), and matches the archive's size,
/// checksum and contents.
pub fn verify_archive(
    manifest: &BackupManifest,
    archive: &[u8],
    secrets: &[ClusterSecret],
    cluster_name: Option<&str>,
) -> Result<ArchiveFacts, ArchiveError> {
    check_name(&manifest.name)?;
    let name = manifest.name.clone();
    if !manifest.signed_by_any(secrets) {
        return Err(ArchiveError::Foreign { name });
    }
    if let Some(expected) = cluster_name {
        if manifest.cluster_name != expected {
            return Err(ArchiveError::OtherCluster {
                name,
                expected: expected.into(),
                found: manifest.cluster_name.clone(),
            });
        }
    }
    if archive.len() as u64 != manifest.size {
        return Err(ArchiveError::Size {
            name,
            expected: manifest.size,
            actual: archive.len() as u64,
        });
    }
    let sha = sha256_hex(archive);
    if sha != manifest.sha256 {
        return Err(ArchiveError::Checksum {
            name,
            expected: manifest.sha256.clone(),
            actual: sha,
        });
    }
    let facts = inspect_archive(&manifest.name, archive)?;
    if facts.keys != manifest.keys {
        return Err(ArchiveError::KeyCount {
            name,
            expected: manifest.keys,
            actual: facts.keys,
        });
    }
    Ok(facts)
}

/// Manifest + archive as one body: magic, the manifest's length (u32 big endian), the
/// manifest's JSON, the archive.
pub fn encode_frame(manifest: &BackupManifest, archive: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(manifest).expect("manifest serialises");
    let mut out = Vec::with_capacity(FRAME_MAGIC.len() + 4 + m.len() + archive.len());
    out.extend_from_slice(FRAME_MAGIC);
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(archive);
    out
}

/// Splits a frame into its manifest and archive (nothing is verified yet).
pub fn decode_frame(frame: &[u8]) -> Result<(BackupManifest, &[u8]), ArchiveError> {
    let bad = |m: &str| ArchiveError::Frame(m.to_string());
    let rest = frame
        .strip_prefix(FRAME_MAGIC.as_slice())
        .ok_or_else(|| bad("it does not start with the backup frame marker"))?;
    if rest.len() < 4 {
        return Err(bad("it ends before the manifest length"));
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if len > MAX_MANIFEST || rest.len() < 4 + len {
        return Err(bad("the manifest length is out of range"));
    }
    let manifest: BackupManifest = serde_json::from_slice(&rest[4..4 + len])
        .map_err(|e| ArchiveError::Frame(format!("manifest: {e}")))?;
    let archive = &rest[4 + len..];
    if archive.len() > MAX_ARCHIVE {
        return Err(ArchiveError::TooLarge {
            name: manifest.name,
        });
    }
    Ok((manifest, archive))
}

/// Where a node keeps archives (the agent's store); the server calls it only with verified
/// archives. Errors are messages for the requester.
pub trait BackupStore: Send + Sync {
    /// The manifests of the archives held, oldest first.
    fn list(&self) -> Result<Vec<BackupManifest>, String>;
    /// One archive with its manifest, `None` when not held.
    fn read(&self, name: &str) -> Result<Option<(BackupManifest, Vec<u8>)>, String>;
    /// Keeps a copy pushed by `from` (already verified by the server).
    fn store(&self, from: &str, manifest: &BackupManifest, archive: &[u8]) -> Result<(), String>;
}

/// A verified archive to restore, and who asked.
#[derive(Debug)]
pub struct RestoreRequest {
    pub from: String,
    pub manifest: BackupManifest,
    pub archive: Vec<u8>,
}

/// What a restore did on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    /// The node that ran `microk8s dbctl restore`.
    pub node: String,
    pub name: String,
    /// Keys the restore reported done (k8s-dqlite's "completed database restore" entries).
    pub restored: u64,
    /// Keys it logged as failed (dbctl still exits 0 for these).
    pub failed: Vec<String>,
}

/// Runs a restore on the node (the agent plugs in `microk8s dbctl restore`).
pub type RestoreHandler =
    Arc<dyn Fn(RestoreRequest) -> BoxFuture<'static, Result<RestoreReport, String>> + Send + Sync>;

/// What the backup routes answer with; installed by the agent.
#[derive(Default)]
pub(super) struct BackupServing {
    pub(super) store: Option<Arc<dyn BackupStore>>,
    pub(super) restore: Option<RestoreHandler>,
}

/// Body of `POST /v1/backup/fetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub name: String,
}

/// Answer of `POST /v1/backup/list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupList {
    pub backups: Vec<BackupManifest>,
}

/// Answer of `POST /v1/backup/push`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushAck {
    pub stored: String,
}

/// The paths of the backup routes.
pub const PUSH_PATH: &str = "/v1/backup/push";
pub const LIST_PATH: &str = "/v1/backup/list";
pub const FETCH_PATH: &str = "/v1/backup/fetch";
pub const RESTORE_PATH: &str = "/v1/backup/restore";

/// Whether `path` is one of the backup routes.
pub fn is_backup_path(path: &str) -> bool {
    matches!(path, PUSH_PATH | LIST_PATH | FETCH_PATH | RESTORE_PATH)
}

/// A server-side answer: status and body, with its content type.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) body: Vec<u8>,
}

impl Answer {
    fn json<T: Serialize>(v: &T) -> Answer {
        Answer {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_vec(v).expect("serialises"),
        }
    }
}

/// Answers an authenticated backup route (the server authenticated `from` already). Errors are
/// `(status, reason)`.
pub(super) async fn answer(
    serving: (Option<Arc<dyn BackupStore>>, Option<RestoreHandler>),
    secrets: Vec<ClusterSecret>,
    from: String,
    path: &str,
    body: Vec<u8>,
) -> Result<Answer, (u16, String)> {
    let (store, restore) = serving;
    let no_store = || {
        (
            503,
            "this node keeps no backups (it is not a control-plane member yet)".to_string(),
        )
    };
    match path {
        PUSH_PATH => {
            let store = store.ok_or_else(no_store)?;
            let (manifest, archive) = decode_frame(&body).map_err(|e| (400, e.to_string()))?;
            verify_archive(&manifest, archive, &secrets, None).map_err(|e| (422, e.to_string()))?;
            let archive = archive.to_vec();
            let name = manifest.name.clone();
            tokio::task::spawn_blocking(move || store.store(&from, &manifest, &archive))
                .await
                .map_err(|e| (503, format!("storing the archive: {e}")))?
                .map_err(|e| (503, e))?;
            Ok(Answer::json(&PushAck { stored: name }))
        }
        LIST_PATH => {
            let store = store.ok_or_else(no_store)?;
            let backups = tokio::task::spawn_blocking(move || store.list())
                .await
                .map_err(|e| (503, e.to_string()))?
                .map_err(|e| (503, e))?;
            Ok(Answer::json(&BackupList { backups }))
        }
        FETCH_PATH => {
            let store = store.ok_or_else(no_store)?;
            let req: FetchRequest = serde_json::from_slice(&body)
                .map_err(|e| (422, format!("expected {{\"name\": NAME}}: {e}")))?;
            check_name(&req.name).map_err(|e| (422, e.to_string()))?;
            let name = req.name.clone();
            let found = tokio::task::spawn_blocking(move || store.read(&req.name))
                .await
                .map_err(|e| (503, e.to_string()))?
                .map_err(|e| (503, e))?;
            let (manifest, archive) =
                found.ok_or_else(|| (404, format!("this node holds no backup {name}")))?;
            Ok(Answer {
                status: 200,
                content_type: "application/octet-stream",
                body: encode_frame(&manifest, &archive),
            })
        }
        RESTORE_PATH => {
            let handler = restore.ok_or_else(|| {
                (
                    503,
                    "this node cannot restore (it is not a running control-plane member)"
                        .to_string(),
                )
            })?;
            let (manifest, archive) = decode_frame(&body).map_err(|e| (400, e.to_string()))?;
            verify_archive(&manifest, archive, &secrets, None).map_err(|e| (422, e.to_string()))?;
            tracing::info!(requester = %from, backup = %manifest.name, "restoring the datastore");
            let req = RestoreRequest {
                from,
                archive: archive.to_vec(),
                manifest,
            };
            match tokio::time::timeout(RESTORE_TIMEOUT, handler(req)).await {
                Ok(Ok(report)) => Ok(Answer::json(&report)),
                Ok(Err(reason)) => Err((503, reason)),
                Err(_) => Err((503, format!("the restore took over {RESTORE_TIMEOUT:?}"))),
            }
        }
        _ => Err((404, format!("no route {path}"))),
    }
}

impl CoordinatorClient {
    /// One small authenticated request (a status read), after which the server takes
    /// archive-sized bodies from this address.
    async fn introduce(&self, peer: SocketAddr, fingerprint: &str) -> Result<(), ClientError> {
        self.status(peer, fingerprint).await.map(|_| ())
    }

    /// Sends a verified archive to the node at `peer` to keep (`POST /v1/backup/push`).
    pub async fn backup_push(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        manifest: &BackupManifest,
        archive: &[u8],
    ) -> Result<PushAck, ClientError> {
        self.transfer(
            peer,
            fingerprint,
            PUSH_PATH,
            manifest,
            archive,
            TRANSFER_TIMEOUT,
        )
        .await
    }

    /// The manifests of the archives the node at `peer` holds.
    pub async fn backup_list(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
    ) -> Result<Vec<BackupManifest>, ClientError> {
        let list: BackupList = self
            .call(peer, fingerprint, ("POST", LIST_PATH), b"{}".to_vec())
            .await?;
        Ok(list.backups)
    }

    /// Fetches one archive with its manifest from the node at `peer`, reporting
    /// `(bytes so far, bytes in all)` to `progress` as it arrives. Nothing is verified here:
    /// callers run [`verify_archive`].
    pub async fn backup_fetch(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        name: &str,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<(BackupManifest, Vec<u8>), ClientError> {
        let body = serde_json::to_vec(&FetchRequest { name: name.into() }).map_err(|e| {
            ClientError::Encode {
                peer,
                reason: e.to_string(),
            }
        })?;
        let mut delivery = Delivery {
            max: MAX_FRAME,
            progress: Some(progress),
            ..Delivery::transfer(TRANSFER_TIMEOUT)
        };
        let frame = self
            .call_with(peer, fingerprint, ("POST", FETCH_PATH), body, &mut delivery)
            .await?;
        let (manifest, archive) = decode_frame(&frame).map_err(|e| ClientError::Decode {
            peer,
            reason: e.to_string(),
        })?;
        Ok((manifest, archive.to_vec()))
    }

    /// Asks the node at `peer` to restore the archive (`POST /v1/backup/restore`).
    pub async fn backup_restore(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        manifest: &BackupManifest,
        archive: &[u8],
    ) -> Result<RestoreReport, ClientError> {
        let timeout = RESTORE_TIMEOUT + TRANSFER_TIMEOUT;
        self.transfer(peer, fingerprint, RESTORE_PATH, manifest, archive, timeout)
            .await
    }

    /// Sends `manifest` and `archive` as one frame to `path` on the node at `peer`, after
    /// [`Self::introduce`], within `timeout`.
    async fn transfer<T: serde::de::DeserializeOwned>(
        &self,
        peer: SocketAddr,
        fingerprint: &str,
        path: &str,
        manifest: &BackupManifest,
        archive: &[u8],
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.introduce(peer, fingerprint).await?;
        let frame = encode_frame(manifest, archive);
        let bytes = self
            .call_with(
                peer,
                fingerprint,
                ("POST", path),
                frame,
                &mut Delivery::transfer(timeout),
            )
            .await?;
        json(peer, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dbctl_archive;

    fn manifest(secret: &ClusterSecret, name: &str, a: &[u8], keys: u64) -> BackupManifest {
        let mut m = BackupManifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            cluster_name: "homelab".into(),
            cluster_id: "1.n1".into(),
            origin: "n1".into(),
            created_unix: 1,
            size: a.len() as u64,
            sha256: sha256_hex(a),
            keys,
            data_bytes: 0,
            suspect: None,
            tag: String::new(),
        };
        m.sign(secret);
        m
    }

    #[test]
    fn a_dbctl_archive_is_counted() {
        let a = dbctl_archive("b1", &[("/registry/a", b"x"), ("/registry/b", b"yy")]);
        let f = inspect_archive("b1", &a).unwrap();
        assert_eq!((f.keys, f.data_bytes), (2, 3));
    }

    #[test]
    fn a_renamed_archive_is_refused() {
        let a = dbctl_archive("b1", &[("/k", b"v")]);
        let e = inspect_archive("b2", &a).unwrap_err();
        assert!(e.to_string().contains("renamed"), "{e}");
    }

    #[test]
    fn truncated_or_flipped_archives_are_refused() {
        let a = dbctl_archive("b1", &[("/k", &[7u8; 5000])]);
        for cut in [10, a.len() / 2, a.len() - 3] {
            assert!(inspect_archive("b1", &a[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = a.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        assert!(inspect_archive("b1", &bad).is_err());
    }

    #[test]
    fn foreign_and_tampered_manifests_are_refused() {
        let ours = ClusterSecret::generate();
        let theirs = ClusterSecret::generate();
        let a = dbctl_archive("b1", &[("/k", b"v")]);
        let m = manifest(&theirs, "b1", &a, 1);
        assert!(matches!(
            verify_archive(&m, &a, std::slice::from_ref(&ours), None),
            Err(ArchiveError::Foreign { .. })
        ));
        let mut m = manifest(&ours, "b1", &a, 1);
        verify_archive(&m, &a, std::slice::from_ref(&ours), Some("homelab")).unwrap();
        assert!(matches!(
            verify_archive(&m, &a, std::slice::from_ref(&ours), Some("other")),
            Err(ArchiveError::OtherCluster { .. })
        ));
        m.keys = 5;
        assert!(matches!(
            verify_archive(&m, &a, std::slice::from_ref(&ours), None),
            Err(ArchiveError::Foreign { .. })
        ));
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let s = ClusterSecret::generate();
        let a = dbctl_archive("b1", &[("/k", b"v")]);
        let m = manifest(&s, "b1", &a, 1);
        let f = encode_frame(&m, &a);
        let (m2, a2) = decode_frame(&f).unwrap();
        assert_eq!((m2, a2), (m, a.as_slice()));
        assert!(decode_frame(b"RSBK1\n\xff\xff\xff\xff").is_err());
        assert!(decode_frame(b"hello").is_err());
    }

    #[test]
    fn names_are_plain() {
        for bad in ["", "../x", "a/b", ".hidden", "x.tar.gz", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("backup-2026-12-07-05-30-00").unwrap();
    }
}
