//! `imagebuilder backup pull` and `imagebuilder restore`: the cluster's datastore backups on
//! the workstation, and the guided restore.
//!
//! Both find the control-plane members over mDNS (announcing nothing,
//! [`crate::status::ClusterBrowser`]) and talk to their coordinators over TLS pinned to the
//! announced fingerprint, every request signed with the cluster secret
//! (`rackseed_protocol::coordinator::backup`).
//!
//! **pull** lists what every control-plane member holds, and fetches each archive this folder
//! does not hold yet from a member that has it, with a progress bar. Each is verified against
//! its signed manifest (this cluster's secret and name, size, SHA-256, the tar.gz layout
//! `microk8s dbctl backup` writes) before it is written: archive then manifest, each through a
//! temporary file renamed into place (mode 0600), so nothing is ever half-written under a
//! final name. An archive that fails the checks is reported and not written. The folder is
//! made private first ([`rackseed_host::fs::create_private_dir`]): created 0700, or an
//! existing one of the user's made 0700; a file there, or another user's folder, is refused
//! before any node is contacted.
//!
//! **restore** first checks the archive on the workstation (manifest beside it,
//! `NAME.manifest.json`): a damaged, truncated, renamed or foreign archive (another cluster's
//! secret or name) is refused with the reason before any node is contacted, so nothing
//! changes. Then one control-plane member restores: `--node`, else the node that takes the
//! backups (the record's slot authority, as its status says), else the first by id. It runs
//! `microk8s dbctl restore` on its own datastore; the other nodes do nothing, as the keys
//! reach them through dqlite's replication. What MicroK8s' restore does, and what the
//! confirmation says: every key in the archive is created or overwritten; keys created after
//! the backup are **not** deleted; the agents' cluster record (membership, join slots) is not
//! in the datastore and stays as it is. Keys MicroK8s failed to write are listed and make the
//! command fail.
//!
//! **Backups signed before a secret rotation.** Manifests are signed with the secret the node
//! held when it took the backup. `imagebuilder secret rotate` keeps the workstation's previous
//! secret as `S.old` (and a rotation under way keeps the new one as `S.new`) beside the
//! config's `secret-file` `S`; the nodes keep only the secret they sign with once a rotation
//! finished (`firstboot`'s `rotate` module), plus, during one, the other secret for a grace
//! period. So both commands check a manifest with the current secret, then the pending one,
//! then the previous one ([`workstation_keys`]), and say which verified it when it was not the
//! current one. `pull` writes the manifest as the node sent it. `restore`, given a manifest
//! verified here with a secret other than the current one, signs a copy with the current
//! secret before sending it (the workstation holds every one of these secrets; after a
//! finished rotation the node would refuse the old signature), and the confirmation says so.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_protocol::coordinator::backup::{
    verify_archive, ArchiveError, ArchiveFacts, BackupManifest, RestoreReport,
};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::secret::ClusterSecret;

use crate::status::{workstation_client, AnnouncedNode, ClusterBrowser};

/// What both commands need.
#[derive(Debug, Clone)]
pub struct BackupAccess {
    /// The current secret: requests are signed with it.
    pub secret: ClusterSecret,
    /// Every secret manifests are checked with, the current one first ([`workstation_keys`]).
    pub keys: Vec<WorkstationKey>,
    pub cluster_name: String,
    /// Control-plane members expected (stop browsing once this many are seen).
    pub control_plane: usize,
    pub interfaces: InterfaceChoice,
    /// How long to look for control-plane members.
    pub timeout: Duration,
}

impl BackupAccess {
    /// From the cluster config: its name, its secret file and its control-plane size.
    pub fn from_config(config: &Path, interfaces: InterfaceChoice) -> Result<Self> {
        let loaded = rackseed_config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = &loaded.config.cluster;
        let secret = ClusterSecret::load(&c.secret_file)
            .context("reading the cluster secret (the file that went into the images)")?;
        let keys = workstation_keys(&c.secret_file, &secret)?;
        Ok(BackupAccess {
            secret,
            keys,
            cluster_name: c.name.clone(),
            control_plane: usize::from(c.control_plane),
            interfaces,
            timeout: Duration::from_secs(20),
        })
    }
}

/// Which of the workstation's secrets a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The config's `secret-file`.
    Current,
    /// The new secret of a rotation not finished yet (`S.new`).
    Pending,
    /// The secret before the last finished rotation (`S.old`).
    Previous,
}

/// A secret the workstation holds, and the file it came from.
#[derive(Debug, Clone)]
pub struct WorkstationKey {
    pub role: KeyRole,
    pub file: PathBuf,
    pub secret: ClusterSecret,
}

impl WorkstationKey {
    /// "the previous cluster secret (PATH)" and the like; never the secret itself.
    pub fn describe(&self) -> String {
        let what = match self.role {
            KeyRole::Current => "the current cluster secret",
            KeyRole::Pending => "the new secret of an unfinished rotation",
            KeyRole::Previous => "the previous cluster secret (kept by `secret rotate`)",
        };
        format!("{what} ({})", self.file.display())
    }
}

/// The secrets manifests are checked with: the current one (`secret_file`, already loaded as
/// `current`), then `S.new` and `S.old` beside it when they exist (see the module docs). A
/// file that exists but cannot be used (unreadable, readable by others, malformed) is an
/// error naming it; a copy of a secret already listed is left out.
pub fn workstation_keys(
    secret_file: &Path,
    current: &ClusterSecret,
) -> Result<Vec<WorkstationKey>> {
    let mut keys = vec![WorkstationKey {
        role: KeyRole::Current,
        file: secret_file.to_path_buf(),
        secret: current.clone(),
    }];
    for (role, suffix) in [(KeyRole::Pending, "new"), (KeyRole::Previous, "old")] {
        let file = crate::secret::suffixed(secret_file, suffix);
        if !file.exists() {
            continue;
        }
        let key = WorkstationKey {
            role,
            file: file.clone(),
            secret: ClusterSecret::load(&file).with_context(|| {
                format!(
                    "reading {} (kept to check backups signed before a rotation): fix or remove it",
                    file.display()
                )
            })?,
        };
        if !keys.iter().any(|k| k.secret == key.secret) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// [`verify_archive`] with each of `keys` in turn: the first whose secret signed the manifest
/// decides, and is returned with the archive's facts. A manifest none of them signed is
/// refused with every key tried named.
pub fn verify_with_keys<'k>(
    manifest: &BackupManifest,
    archive: &[u8],
    keys: &'k [WorkstationKey],
    cluster_name: &str,
) -> Result<(ArchiveFacts, &'k WorkstationKey)> {
    for key in keys {
        if manifest.signed_by_any(std::slice::from_ref(&key.secret)) {
            let facts = verify_archive(
                manifest,
                archive,
                std::slice::from_ref(&key.secret),
                Some(cluster_name),
            )?;
            return Ok((facts, key));
        }
    }
    let secrets: Vec<ClusterSecret> = keys.iter().map(|k| k.secret.clone()).collect();
    let err = match verify_archive(manifest, archive, &secrets, Some(cluster_name)) {
        Err(e) => e,
        Ok(_) => ArchiveError::Foreign {
            name: manifest.name.clone(),
        },
    };
    Err(anyhow::Error::new(err).context(format!(
        "checked with {}",
        keys.iter()
            .map(WorkstationKey::describe)
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The manifest to send with a restore: as it is when `key` is the current secret, else a copy
/// signed with `current` (see the module docs), with a line saying so.
pub fn manifest_for_node(
    manifest: &BackupManifest,
    key: &WorkstationKey,
    current: &ClusterSecret,
) -> (BackupManifest, Option<String>) {
    if key.role == KeyRole::Current {
        return (manifest.clone(), None);
    }
    let mut copy = manifest.clone();
    copy.sign(current);
    (
        copy,
        Some(format!(
            "its manifest is signed with {}: verified with it here, and sent signed with the \
             current secret (a node accepts only the secret it signs with once a rotation \
             finished)",
            key.describe()
        )),
    )
}

/// Browses until `expected` control-plane members are seen or `timeout` passes; returns them
/// sorted by id.
async fn control_plane_members(access: &BackupAccess) -> Result<Vec<AnnouncedNode>> {
    let mut browser = ClusterBrowser::start(&access.secret, access.interfaces.clone())?;
    let deadline = Instant::now() + access.timeout;
    loop {
        browser.drain();
        let mut cps: Vec<AnnouncedNode> = browser
            .nodes()
            .into_iter()
            .filter(|n| n.is_control_plane_member() && !n.addresses.is_empty())
            .collect();
        cps.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        if cps.len() >= access.control_plane || Instant::now() >= deadline {
            if cps.is_empty() {
                bail!(
                    "no control-plane member of cluster {:?} announced itself over mDNS within {}s",
                    access.cluster_name,
                    access.timeout.as_secs()
                );
            }
            return Ok(cps);
        }
        let pause =
            Duration::from_millis(300).min(deadline.saturating_duration_since(Instant::now()));
        browser.collect_for(pause).await;
    }
}

/// The first address of `node` that answers `f`.
fn addrs(node: &AnnouncedNode) -> Vec<SocketAddr> {
    node.addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, node.port))
        .collect()
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    rackseed_host::fs::write_atomic(path, bytes, 0o600)
}

/// What `pull` did.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Archives written.
    pub written: Vec<String>,
    /// Archives written whose manifest a secret other than the current one signed, with it
    /// described ([`WorkstationKey::describe`]).
    pub older_key: BTreeMap<String, String>,
    /// Archives already in the folder with the same checksum.
    pub present: Vec<String>,
    /// Archives that could not be fetched or failed the checks, with the reason.
    pub failed: Vec<(String, String)>,
    /// Archives listed but pruned by every holder before they could be fetched (a newer
    /// backup replaced them): not an error.
    pub gone: Vec<String>,
}

/// `imagebuilder backup pull`: see the module docs.
pub async fn pull(access: &BackupAccess, out_dir: &Path, progress: bool) -> Result<Pulled> {
    rackseed_host::fs::create_private_dir(out_dir)?;
    let members = control_plane_members(access).await?;
    let client = workstation_client(&access.secret, Duration::from_secs(30));
    // Which node holds which archive.
    let mut holders: BTreeMap<String, (BackupManifest, Vec<(SocketAddr, String)>)> =
        BTreeMap::new();
    let mut list_errors = Vec::new();
    for node in &members {
        let mut listed = false;
        for peer in addrs(node) {
            match client.backup_list(peer, &node.fingerprint).await {
                Ok(list) => {
                    for m in list {
                        let e = holders.entry(m.name.clone()).or_insert((m, Vec::new()));
                        e.1.push((peer, node.fingerprint.clone()));
                    }
                    listed = true;
                    break;
                }
                Err(e) => list_errors.push(format!("{}: {e}", node.node_id)),
            }
        }
        if !listed {
            tracing::warn!(node = %node.node_id, "could not list its backups");
        }
    }
    if holders.is_empty() {
        let mut msg = format!(
            "no backup found on the control-plane members ({})",
            members
                .iter()
                .map(|n| n.node_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for e in &list_errors {
            msg.push_str(&format!("\n  {e}"));
        }
        bail!(msg);
    }
    let mut pulled = Pulled::default();
    for (name, (listed, sources)) in holders {
        let apath = out_dir.join(listed.archive_file());
        if let Ok(existing) = std::fs::read(&apath) {
            if rackseed_protocol::coordinator::backup::sha256_hex(&existing) == listed.sha256 {
                pulled.present.push(name);
                continue;
            }
        }
        match fetch_one(&client, access, &name, listed.size, &sources, progress).await {
            Ok((manifest, archive, key)) => {
                if key.role != KeyRole::Current {
                    pulled.older_key.insert(name.clone(), key.describe());
                }
                write_private(&apath, &archive)?;
                write_private(
                    &out_dir.join(manifest.manifest_file()),
                    &serde_json::to_vec_pretty(&manifest)?,
                )?;
                pulled.written.push(name);
            }
            Err(FetchError::Gone) => pulled.gone.push(name),
            Err(FetchError::Failed(e)) => pulled.failed.push((name, format!("{e:#}"))),
        }
    }
    Ok(pulled)
}

async fn fetch_one(
    client: &CoordinatorClient,
    access: &BackupAccess,
    name: &str,
    size: u64,
    sources: &[(SocketAddr, String)],
    progress: bool,
) -> Result<(BackupManifest, Vec<u8>, WorkstationKey), FetchError> {
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message(name.to_string());
        b
    });
    let mut last = None;
    let mut all_404 = true;
    for (peer, fp) in sources {
        let b = bar.clone();
        let mut report = move |got: u64, _total: Option<u64>| {
            if let Some(b) = &b {
                b.set_position(got);
            }
        };
        match client.backup_fetch(*peer, fp, name, &mut report).await {
            Ok((manifest, archive)) => {
                if manifest.name != name {
                    all_404 = false;
                    last = Some(anyhow::anyhow!("{peer} answered with {}", manifest.name));
                    continue;
                }
                match verify_with_keys(&manifest, &archive, &access.keys, &access.cluster_name) {
                    Ok((_, key)) => {
                        if let Some(b) = &bar {
                            b.finish_with_message(format!("{name} (checksum verified)"));
                        }
                        let key = key.clone();
                        return Ok((manifest, archive, key));
                    }
                    Err(e) => {
                        all_404 = false;
                        last = Some(anyhow::anyhow!("from {peer}: {e:#}"))
                    }
                }
            }
            Err(e) => {
                all_404 &= e.status() == Some(404);
                last = Some(anyhow::anyhow!("{e}"))
            }
        }
    }
    if let Some(b) = &bar {
        b.abandon_with_message(format!("{name}: not pulled"));
    }
    if all_404 && !sources.is_empty() {
        return Err(FetchError::Gone);
    }
    Err(FetchError::Failed(
        last.unwrap_or_else(|| anyhow::anyhow!("no node holds it")),
    ))
}

enum FetchError {
    Gone,
    Failed(anyhow::Error),
}

/// The manifest beside an archive: `NAME.manifest.json` for `NAME.tar.gz`.
pub fn manifest_path(archive: &Path) -> Result<PathBuf> {
    let file = archive
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .with_context(|| format!("{} names no file", archive.display()))?;
    let Some(name) = file.strip_suffix(".tar.gz") else {
        bail!(
            "{} is not a .tar.gz as `microk8s dbctl backup` writes",
            archive.display()
        );
    };
    Ok(archive.with_file_name(format!("{name}.manifest.json")))
}

/// Reads an archive and the manifest beside it and runs every check
/// ([`verify_with_keys`]): signed with one of `keys`, this cluster's name, size, checksum,
/// layout, key count, and that the file still has its original name (restore finds the folder
/// inside by it). Returns the key that verified the manifest too.
pub fn verify_local<'k>(
    archive_path: &Path,
    keys: &'k [WorkstationKey],
    cluster_name: &str,
) -> Result<(BackupManifest, Vec<u8>, &'k WorkstationKey)> {
    let mpath = manifest_path(archive_path)?;
    let manifest: BackupManifest =
        serde_json::from_slice(&std::fs::read(&mpath).with_context(|| {
            format!(
                "reading the manifest {} (pulled with the archive by `imagebuilder backup pull`)",
                mpath.display()
            )
        })?)
        .with_context(|| format!("{} is not a backup manifest", mpath.display()))?;
    let file = archive_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if file != manifest.archive_file() {
        bail!(
            "{} was renamed (its manifest names {}): MicroK8s restores from the folder named after the file, so a renamed archive would restore nothing; rename it back",
            archive_path.display(),
            manifest.archive_file()
        );
    }
    let archive = std::fs::read(archive_path)
        .with_context(|| format!("reading {}", archive_path.display()))?;
    let (_, key) = verify_with_keys(&manifest, &archive, keys, cluster_name)
        .with_context(|| format!("refusing to restore {}", archive_path.display()))?;
    Ok((manifest, archive, key))
}

/// What the person confirms before a restore.
pub fn restore_plan(m: &BackupManifest, node: &str) -> String {
    let mut s = format!(
        "Restore backup {} of cluster {:?} (taken by {}, {} keys, {} bytes) on {node}:\n\
         - {node} runs `microk8s dbctl restore {}`: every key in the archive is created or overwritten;\n\
         - objects created after the backup are NOT deleted (MicroK8s' restore deletes nothing);\n\
         - the other nodes do nothing: dqlite replicates the restored keys to them;\n\
         - the agents' cluster record (membership, join slots, backup schedule) is not in the datastore and stays as it is.",
        m.name, m.cluster_name, m.origin, m.keys, m.size, m.archive_file()
    );
    if let Some(why) = &m.suspect {
        s.push_str(&format!(
            "\nWARNING: this backup was flagged as suspect: {why}"
        ));
    }
    s
}

/// An archive checked on the workstation, with the manifest to send for it.
#[derive(Debug)]
pub struct PreparedRestore {
    /// Signed with the current secret ([`manifest_for_node`]).
    pub manifest: BackupManifest,
    pub archive: Vec<u8>,
    /// Said in the confirmation when the manifest was re-signed.
    pub signed_note: Option<String>,
}

/// [`verify_local`] with every secret the workstation holds, then [`manifest_for_node`].
pub fn prepare_restore(archive_path: &Path, access: &BackupAccess) -> Result<PreparedRestore> {
    let (manifest, archive, key) = verify_local(archive_path, &access.keys, &access.cluster_name)?;
    let (manifest, signed_note) = manifest_for_node(&manifest, key, &access.secret);
    Ok(PreparedRestore {
        manifest,
        archive,
        signed_note,
    })
}

/// `imagebuilder restore`: see the module docs. `confirm` is asked with the plan and must say
/// yes.
pub async fn restore(
    access: &BackupAccess,
    archive_path: &Path,
    node: Option<&str>,
    confirm: &mut dyn FnMut(&str) -> Result<bool>,
) -> Result<RestoreReport> {
    let PreparedRestore {
        manifest,
        archive,
        signed_note,
    } = prepare_restore(archive_path, access)?;
    let members = control_plane_members(access).await?;
    let client = workstation_client(&access.secret, Duration::from_secs(30));
    let chosen = match node {
        Some(id) => members
            .iter()
            .find(|n| n.node_id == id)
            .with_context(|| {
                format!(
                    "{id} is not a control-plane member seen on the network (seen: {})",
                    members
                        .iter()
                        .map(|n| n.node_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
            .clone(),
        None => {
            let mut scheduler = None;
            for n in &members {
                for peer in addrs(n) {
                    if let Ok(doc) = client.status(peer, &n.fingerprint).await {
                        if doc["backup"]["scheduler"] == serde_json::json!(true) {
                            scheduler = Some(n.clone());
                        }
                        break;
                    }
                }
                if scheduler.is_some() {
                    break;
                }
            }
            scheduler.unwrap_or_else(|| members[0].clone())
        }
    };
    let mut plan = restore_plan(&manifest, &chosen.node_id);
    if let Some(note) = &signed_note {
        plan.push_str(&format!("\nNOTE: {note}."));
    }
    if !confirm(&plan)? {
        bail!("not confirmed; nothing was changed");
    }
    let mut last = None;
    for peer in addrs(&chosen) {
        match client
            .backup_restore(peer, &chosen.fingerprint, &manifest, &archive)
            .await
        {
            Ok(report) => {
                if !report.failed.is_empty() {
                    let shown: Vec<&str> =
                        report.failed.iter().take(20).map(String::as_str).collect();
                    bail!(
                        "{} restored {} of {} keys; MicroK8s failed to write {}: {}{}",
                        report.node,
                        report.restored,
                        manifest.keys,
                        report.failed.len(),
                        shown.join(", "),
                        if report.failed.len() > shown.len() {
                            ", …"
                        } else {
                            ""
                        }
                    );
                }
                return Ok(report);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "restore on {} failed: {}",
        chosen.node_id,
        last.map(|e| e.to_string())
            .unwrap_or_else(|| "no address".into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_sits_beside_the_archive() {
        assert_eq!(
            manifest_path(Path::new("/x/backup-1.tar.gz")).unwrap(),
            PathBuf::from("/x/backup-1.manifest.json")
        );
        assert!(manifest_path(Path::new("/x/backup-1.zip")).is_err());
    }

    /// A `dbctl backup`-shaped archive (folder `NAME/`, pairs 0 and 1), made with GNU tar.
    const ARCHIVE: &[u8] = include_bytes!("../tests/fixtures/backup-2026-12-01-00-00-00.tar.gz");
    const NAME: &str = "backup-2026-12-01-00-00-00";

    fn manifest(secret: &ClusterSecret) -> BackupManifest {
        let mut m = BackupManifest {
            format: rackseed_protocol::coordinator::backup::MANIFEST_FORMAT,
            name: NAME.into(),
            cluster_name: "homelab".into(),
            cluster_id: "1.n1".into(),
            origin: "n1".into(),
            created_unix: 1_796_083_200,
            size: ARCHIVE.len() as u64,
            sha256: rackseed_protocol::coordinator::backup::sha256_hex(ARCHIVE),
            keys: 2,
            data_bytes: 3,
            suspect: None,
            tag: String::new(),
        };
        m.sign(secret);
        m
    }

    /// A workstation folder after `secret rotate`: `S` (new), `S.old` (previous), and
    /// optionally `S.new` (a rotation under way).
    struct Workstation {
        dir: tempfile::TempDir,
        current: ClusterSecret,
        previous: ClusterSecret,
    }

    impl Workstation {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (current, previous) = (ClusterSecret::generate(), ClusterSecret::generate());
            current.write_new(&dir.path().join("c.secret")).unwrap();
            previous
                .write_new(&dir.path().join("c.secret.old"))
                .unwrap();
            Workstation {
                dir,
                current,
                previous,
            }
        }

        fn secret_file(&self) -> PathBuf {
            self.dir.path().join("c.secret")
        }

        fn keys(&self) -> Vec<WorkstationKey> {
            workstation_keys(&self.secret_file(), &self.current).unwrap()
        }

        /// The archive and its manifest (signed with `secret`) in a folder, as pulled.
        fn pulled(&self, secret: &ClusterSecret) -> PathBuf {
            let d = self.dir.path().join("pulled");
            std::fs::create_dir_all(&d).unwrap();
            let archive = d.join(format!("{NAME}.tar.gz"));
            std::fs::write(&archive, ARCHIVE).unwrap();
            std::fs::write(
                d.join(format!("{NAME}.manifest.json")),
                serde_json::to_vec(&manifest(secret)).unwrap(),
            )
            .unwrap();
            archive
        }
    }

    #[test]
    fn the_workstation_checks_with_the_current_then_the_pending_then_the_previous_secret() {
        let w = Workstation::new();
        let keys = w.keys();
        let roles: Vec<KeyRole> = keys.iter().map(|k| k.role).collect();
        assert_eq!(roles, [KeyRole::Current, KeyRole::Previous]);
        let pending = ClusterSecret::generate();
        pending
            .write_new(&w.dir.path().join("c.secret.new"))
            .unwrap();
        let keys = w.keys();
        let roles: Vec<KeyRole> = keys.iter().map(|k| k.role).collect();
        assert_eq!(
            roles,
            [KeyRole::Current, KeyRole::Pending, KeyRole::Previous]
        );
        assert_eq!(keys[1].secret, pending);
        assert!(keys[2].describe().contains("c.secret.old"));
        // A previous secret readable by others is refused with its name, not skipped.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            w.dir.path().join("c.secret.old"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = format!(
            "{:#}",
            workstation_keys(&w.secret_file(), &w.current).unwrap_err()
        );
        assert!(e.contains("c.secret.old"), "{e}");
        // No rotation ever: the current secret only.
        let fresh = tempfile::tempdir().unwrap();
        let s = ClusterSecret::generate();
        s.write_new(&fresh.path().join("x.secret")).unwrap();
        assert_eq!(
            workstation_keys(&fresh.path().join("x.secret"), &s)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_backup_signed_before_the_rotation_verifies_with_the_previous_secret() {
        let w = Workstation::new();
        let keys = w.keys();
        // Signed with the current secret: verified, nothing to re-sign.
        let (m, _, key) = verify_local(&w.pulled(&w.current), &keys, "homelab").unwrap();
        assert_eq!(key.role, KeyRole::Current);
        let (sent, note) = manifest_for_node(&m, key, &w.current);
        assert_eq!(sent, m);
        assert!(note.is_none());
        // Signed before the rotation: verified with S.old, and said so.
        let (m, archive, key) = verify_local(&w.pulled(&w.previous), &keys, "homelab").unwrap();
        assert_eq!(key.role, KeyRole::Previous);
        assert_eq!(archive, ARCHIVE);
        let (sent, note) = manifest_for_node(&m, key, &w.current);
        let note = note.unwrap();
        assert!(note.contains("previous cluster secret"), "{note}");
        assert!(note.contains("c.secret.old"), "{note}");
        // What the node gets verifies with the secret it signs with after the rotation, and
        // differs from the original only in its signature.
        verify_archive(
            &sent,
            ARCHIVE,
            std::slice::from_ref(&w.current),
            Some("homelab"),
        )
        .unwrap();
        assert!(!m.signed_by_any(std::slice::from_ref(&w.current)));
        assert_eq!(
            BackupManifest {
                tag: String::new(),
                ..sent
            },
            BackupManifest {
                tag: String::new(),
                ..m
            }
        );
    }

    /// A node that finished a rotation (it accepts only the new secret) restores a backup
    /// signed before it, as `restore` prepares it; the original manifest alone is refused.
    #[tokio::test]
    async fn a_node_after_the_rotation_restores_a_backup_signed_before_it() {
        use rackseed_protocol::coordinator::backup::{RestoreHandler, RestoreRequest};
        use std::sync::{Arc, Mutex};
        let w = Workstation::new();
        let node = rackseed_protocol::testing::loopback_coordinator(&w.previous).await;
        node.keyring.switch_to(
            w.current.clone(),
            std::time::Instant::now() + Duration::from_secs(600),
        );
        node.keyring.forget_others();
        let got: Arc<Mutex<Vec<RestoreRequest>>> = Arc::default();
        let seen = got.clone();
        let handler: RestoreHandler = Arc::new(move |req: RestoreRequest| {
            let seen = seen.clone();
            Box::pin(async move {
                let report = RestoreReport {
                    node: "n1".into(),
                    name: req.manifest.name.clone(),
                    restored: req.manifest.keys,
                    failed: Vec::new(),
                };
                seen.lock().unwrap().push(req);
                Ok(report)
            })
        });
        node.coordinator.set_restore_handler(handler);
        let peer = node.coordinator.local_addr();
        let access = BackupAccess {
            secret: w.current.clone(),
            keys: w.keys(),
            cluster_name: "homelab".into(),
            control_plane: 1,
            interfaces: InterfaceChoice::Auto,
            timeout: Duration::from_secs(1),
        };
        let client = workstation_client(&access.secret, Duration::from_secs(10));
        let archive_path = w.pulled(&w.previous);
        // As pulled: signed with the previous secret, which the node no longer accepts.
        let (original, _, _) = verify_local(&archive_path, &access.keys, "homelab").unwrap();
        let refused = client
            .backup_restore(peer, &node.fingerprint, &original, ARCHIVE)
            .await
            .unwrap_err();
        assert_eq!(refused.status(), Some(422), "{refused}");
        assert!(got.lock().unwrap().is_empty());
        // As `restore` sends it.
        let prepared = prepare_restore(&archive_path, &access).unwrap();
        assert!(prepared.signed_note.is_some());
        let report = client
            .backup_restore(
                peer,
                &node.fingerprint,
                &prepared.manifest,
                &prepared.archive,
            )
            .await
            .unwrap();
        assert_eq!((report.name.as_str(), report.restored), (NAME, 2));
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].archive, ARCHIVE);
        assert_eq!(got[0].manifest.sha256, original.sha256);
        node.coordinator.shutdown();
    }

    #[test]
    fn a_foreign_or_altered_backup_is_refused_naming_every_secret_tried() {
        let w = Workstation::new();
        let keys = w.keys();
        let stranger = ClusterSecret::generate();
        let e = format!(
            "{:#}",
            verify_local(&w.pulled(&stranger), &keys, "homelab").unwrap_err()
        );
        assert!(e.contains("not signed with this cluster's secret"), "{e}");
        assert!(
            e.contains("c.secret)") && e.contains("c.secret.old)"),
            "every secret tried is named: {e}"
        );
        // Signed with the previous secret, then edited: refused, not re-signed.
        let archive = w.pulled(&w.previous);
        let mpath = manifest_path(&archive).unwrap();
        let mut m: BackupManifest =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m.keys = 7;
        std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(verify_local(&archive, &keys, "homelab").is_err());
        // Signed with the previous secret but the archive damaged: the checksum says so.
        let archive = w.pulled(&w.previous);
        let mut bytes = ARCHIVE.to_vec();
        bytes[40] ^= 0x55;
        std::fs::write(&archive, bytes).unwrap();
        let e = format!(
            "{:#}",
            verify_local(&archive, &keys, "homelab").unwrap_err()
        );
        assert!(e.contains("SHA-256"), "{e}");
        // Another cluster's name under the previous secret.
        let archive = w.pulled(&w.previous);
        let e = format!("{:#}", verify_local(&archive, &keys, "other").unwrap_err());
        assert!(e.contains("not of \"other\""), "{e}");
    }
}

/// `imagebuilder backup …`.
#[derive(Debug, clap::Subcommand)]
pub enum BackupCli {
    /// Copy the cluster's datastore backups to this machine (only those not already in DIR),
    /// each checked against its signed manifest; files mode 0600.
    Pull(PullArgs),
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The cluster config (name, secret file, control-plane size).
    #[arg(long)]
    pub config: PathBuf,
    /// The folder to copy the archives into: yours, made 0700 (created when missing).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Browse mDNS only on this interface (repeatable; default: every physical interface).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// How long to look for the control-plane members, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The cluster config (name, secret file, control-plane size).
    #[arg(long)]
    pub config: PathBuf,
    /// The archive, `NAME.tar.gz`, with `NAME.manifest.json` beside it (as `backup pull`
    /// writes them).
    pub archive: PathBuf,
    /// The control-plane node that restores (default: the one that takes the backups).
    #[arg(long)]
    pub node: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Browse mDNS only on this interface (repeatable; default: every physical interface).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// How long to look for the control-plane members, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn interfaces(names: &[String]) -> InterfaceChoice {
    if names.is_empty() {
        InterfaceChoice::Auto
    } else {
        InterfaceChoice::Named(names.to_vec())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `imagebuilder backup …`.
pub fn run_cli(cmd: BackupCli) -> Result<()> {
    let BackupCli::Pull(args) = cmd;
    let mut access = BackupAccess::from_config(&args.config, interfaces(&args.interfaces))?;
    access.timeout = args.timeout;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let pulled = runtime()?.block_on(pull(&access, &args.output, progress))?;
    for n in &pulled.written {
        match pulled.older_key.get(n) {
            Some(key) => println!("pulled {n} (checksum verified; manifest signed with {key})"),
            None => println!("pulled {n} (checksum verified)"),
        }
    }
    for n in &pulled.present {
        println!("already here: {n}");
    }
    for n in &pulled.gone {
        println!("pruned by the nodes before it could be pulled: {n}");
    }
    for (n, why) in &pulled.failed {
        eprintln!("not pulled: {n}: {why}");
    }
    if !pulled.failed.is_empty() {
        bail!(
            "{} backup(s) could not be pulled; nothing half-written was left in {}",
            pulled.failed.len(),
            args.output.display()
        );
    }
    Ok(())
}

/// Runs `imagebuilder restore`.
pub fn run_restore_cli(args: RestoreArgs) -> Result<()> {
    let mut access = BackupAccess::from_config(&args.config, interfaces(&args.interfaces))?;
    access.timeout = args.timeout;
    let yes = args.yes;
    let mut confirm = |plan: &str| -> Result<bool> {
        eprintln!("{plan}");
        if yes {
            Ok(true)
        } else {
            rackseed_host::terminal::confirm("Restore this backup?")
        }
    };
    let report = runtime()?.block_on(restore(
        &access,
        &args.archive,
        args.node.as_deref(),
        &mut confirm,
    ))?;
    println!(
        "{} restored {} keys from {}",
        report.node, report.restored, report.name
    );
    Ok(())
}
