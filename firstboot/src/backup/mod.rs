//! Scheduled datastore backups, kept off the node that took them, and restore.
//!
//! **Who backs up.** Exactly one node runs the schedule: the cluster record's slot authority,
//! as this node saw it *chosen* (and only while the newest record it heard of does not name
//! someone else). The record is changed only by Paxos rounds, so at most one authority is
//! chosen at a time; when the authority is unseen for `takeover_after`, the best visible
//! control-plane member takes it over (the formation core's Takeover) and with it the
//! schedule. An old authority cut off in a minority may still believe it holds the duty
//! until it hears of the newer record, but `microk8s dbctl backup` needs the datastore's
//! quorum, which a minority does not have, so its attempts fail and are shown as errors.
//!
//! **When.** Every `backup.interval` (default 6 h, see `rackseed_config::DEFAULT_BACKUP_INTERVAL`),
//! measured from the newest archive this node holds (by its creation time, the taking node's
//! clock: the schedule is not a safety rule, so clock skew between nodes only moves a backup
//! earlier or later; a creation time in this node's future falls back to this node's own
//! monotonic clock). A failed attempt is retried after [`RETRY_AFTER`] (or the interval if
//! shorter).
//!
//! **What.** `microk8s dbctl backup -o <state>/backups/.work/NAME` ([`crate::system::microk8s::dbctl`]),
//! then checks: the archive opens as the tar.gz dbctl writes, with its pairs complete
//! ([`rackseed_protocol::coordinator::backup::inspect_archive`]), and it is not near-empty
//! compared with the newest good backup ([`near_empty`]: MicroK8s #4259/#4308). A near-empty
//! archive is kept and copied (nothing is thrown away), but marked suspect in its signed
//! manifest, raised as an alarm in the status, never counted as the newest good backup, and
//! never allowed to prune the last good one out.
//!
//! **Where copies go.** The archive and its signed manifest go to every other control-plane
//! member of the record over the authenticated coordinator (`POST /v1/backup/push`); each
//! receiver verifies signature, size, SHA-256 and contents before keeping it (0600, atomic).
//! Every control-plane node keeps the newest `backup.keep`. The status ([`BackupView`]) shows
//! the newest archive's age and which nodes hold it, and names the members a copy failed to.
//!
//! **Restore** (`imagebuilder restore`, [`restore_handler`]): the node asked writes the
//! verified archive under its original name into a private folder and runs `microk8s dbctl
//! restore`; the other nodes do nothing, as the restored keys reach them through dqlite's
//! replication. The agent's own cluster record (membership, slots, authority) is not in the
//! datastore and is not touched by a restore.

pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use rackseed_protocol::coordinator::backup::{
    inspect_archive, BackupManifest, RestoreHandler, RestoreReport, MANIFEST_FORMAT,
};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::secret::Keyring;
use rackseed_protocol::status::{BackupArchiveView, BackupView};

use crate::system::microk8s::dbctl::Datastore;
pub use store::ArchiveStore;

/// A failed attempt is retried this long after.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Unix seconds by this node's clock.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// dbctl's default name, `backup-YYYY-MM-DD-HH-MM-SS` (UTC here; dbctl uses local time).
pub fn backup_name(unix: u64) -> String {
    let (days, rem) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "backup-{y:04}-{m:02}-{d:02}-{:02}-{:02}-{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Why a new backup of `keys` pairs and `data_bytes` looks near-empty next to `previous` (the
/// newest good one), if it does: no key at all, fewer than half the keys, or under a quarter
/// of the data of a backup that held at least 4 keys. Datastores shrink slowly; a backup that
/// lost most of its keys between two runs is MicroK8s #4259/#4308 or worse.
pub fn near_empty(previous: Option<&BackupManifest>, keys: u64, data_bytes: u64) -> Option<String> {
    if keys == 0 {
        return Some("the backup holds no key at all".into());
    }
    let prev = previous?;
    if prev.keys < 4 {
        return None;
    }
    if keys * 2 < prev.keys {
        return Some(format!(
            "the backup holds {keys} keys where {} held {}: near-empty (MicroK8s #4259/#4308)",
            prev.name, prev.keys
        ));
    }
    if data_bytes * 4 < prev.data_bytes {
        return Some(format!(
            "the backup holds {data_bytes} bytes of data where {} held {}: near-empty (MicroK8s #4259/#4308)",
            prev.name, prev.data_bytes
        ));
    }
    None
}

/// Whether a backup is due: none held; or the newest is `interval` old by this node's clock;
/// or (its date lies in this node's future) this node's own last attempt is `interval` ago or
/// there was none. After a failure, [`RETRY_AFTER`] (at most `interval`) must have passed.
pub fn is_due(
    newest: Option<&BackupManifest>,
    now_unix: u64,
    interval: Duration,
    since_last_attempt: Option<Duration>,
    last_failed: bool,
) -> bool {
    if let Some(since) = since_last_attempt {
        let wait = if last_failed {
            RETRY_AFTER.min(interval)
        } else {
            interval
        };
        if since < wait && (last_failed || newest.is_some()) {
            return false;
        }
    }
    match newest {
        None => true,
        Some(m) if m.created_unix > now_unix => since_last_attempt.is_none_or(|s| s >= interval),
        Some(m) => now_unix - m.created_unix >= interval.as_secs(),
    }
}

/// A control-plane peer to copy archives to.
#[derive(Debug, Clone)]
pub struct CopyTarget {
    pub node: String,
    pub addr: std::net::SocketAddr,
    pub fingerprint: String,
}

/// What one backup run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub manifest: Option<BackupManifest>,
    /// Nodes holding the archive (this one included).
    pub copies: Vec<String>,
    pub copy_failures: Vec<String>,
    pub error: Option<String>,
}

/// Everything a backup run needs.
#[derive(Clone)]
pub struct BackupJob {
    pub datastore: Arc<dyn Datastore>,
    pub store: ArchiveStore,
    pub keyring: Arc<Keyring>,
    pub client: Arc<CoordinatorClient>,
    pub node_id: String,
    pub cluster_name: String,
    pub cluster_id: String,
    pub targets: Vec<CopyTarget>,
}

impl BackupJob {
    /// Takes, checks, signs, keeps and copies one backup (see the module docs).
    pub async fn run(self) -> Outcome {
        let mut outcome = Outcome {
            manifest: None,
            copies: Vec::new(),
            copy_failures: Vec::new(),
            error: None,
        };
        let (manifest, archive) = match self.take().await {
            Ok(x) => x,
            Err(e) => {
                outcome.error = Some(format!("{e:#}"));
                return outcome;
            }
        };
        outcome.copies.push(self.node_id.clone());
        for t in &self.targets {
            match self
                .client
                .backup_push(t.addr, &t.fingerprint, &manifest, &archive)
                .await
            {
                Ok(_) => outcome.copies.push(t.node.clone()),
                Err(e) => outcome.copy_failures.push(format!("{}: {e}", t.node)),
            }
        }
        tracing::info!(
            backup = %manifest.name,
            keys = manifest.keys,
            size = manifest.size,
            copies = ?outcome.copies,
            failures = outcome.copy_failures.len(),
            suspect = manifest.suspect.is_some(),
            "datastore backup taken"
        );
        outcome.manifest = Some(manifest);
        outcome
    }

    async fn take(&self) -> Result<(BackupManifest, Vec<u8>)> {
        let created = now_unix();
        let mut name = backup_name(created);
        if self.store.read(&name)?.is_some() {
            name = format!("{name}-{}", rand::random::<u16>());
        }
        let work = self.store.dir().join(".work");
        let _ = std::fs::remove_dir_all(&work);
        rackseed_host::fs::create_private_dir(&work)?;
        let path = self
            .datastore
            .backup(&work, &name)
            .await
            .context("microk8s dbctl backup")?;
        let read = std::fs::read(&path).with_context(|| format!("reading {}", path.display()));
        let _ = std::fs::remove_dir_all(&work);
        let archive = read?;
        let facts = inspect_archive(&name, &archive)?;
        let previous = self.store.newest_good()?;
        let suspect = near_empty(previous.as_ref(), facts.keys, facts.data_bytes);
        let mut manifest = BackupManifest {
            format: MANIFEST_FORMAT,
            name,
            cluster_name: self.cluster_name.clone(),
            cluster_id: self.cluster_id.clone(),
            origin: self.node_id.clone(),
            created_unix: created,
            size: facts.size,
            sha256: facts.sha256,
            keys: facts.keys,
            data_bytes: facts.data_bytes,
            suspect,
            tag: String::new(),
        };
        manifest.sign(self.keyring.current().secret());
        self.store.keep_archive(&manifest, &archive)?;
        Ok((manifest, archive))
    }
}

/// The node's side of `POST /v1/backup/restore`: the archive (verified by the coordinator)
/// is written as `NAME.tar.gz` into a private folder under `work_root` and restored with
/// `microk8s dbctl restore`; the count of restored entries must equal the manifest's key
/// count (a renamed or emptied archive restores nothing and dbctl still exits 0), and failed
/// keys are reported. The folder is removed afterwards.
pub fn restore_handler(
    datastore: Arc<dyn Datastore>,
    work_root: PathBuf,
    node_id: String,
    cluster_name: String,
) -> RestoreHandler {
    Arc::new(move |req| {
        let datastore = datastore.clone();
        let work_root = work_root.clone();
        let node_id = node_id.clone();
        let cluster_name = cluster_name.clone();
        Box::pin(async move {
            let m = &req.manifest;
            if m.cluster_name != cluster_name {
                return Err(format!(
                    "{} is a backup of cluster {:?}, this node belongs to {:?}; nothing was changed",
                    m.name, m.cluster_name, cluster_name
                ));
            }
            let dir = work_root.join(format!(".restore-{}", rand::random::<u64>()));
            let res = async {
                rackseed_host::fs::create_private_dir(&dir)?;
                let path = dir.join(m.archive_file());
                rackseed_host::fs::write_atomic(&path, &req.archive, 0o600)?;
                let out = datastore
                    .restore(&path)
                    .await
                    .context("microk8s dbctl restore")?;
                if out.entries != m.keys {
                    bail!(
                        "microk8s dbctl restore read {} keys from {}, its manifest holds {}",
                        out.entries,
                        m.name,
                        m.keys
                    );
                }
                Ok(out)
            }
            .await;
            let _ = std::fs::remove_dir_all(&dir);
            let out = res.map_err(|e| format!("{e:#}"))?;
            tracing::info!(
                requester = %req.from,
                backup = %m.name,
                restored = out.entries,
                failed = out.failed.len(),
                "datastore restored"
            );
            Ok(RestoreReport {
                node: node_id,
                name: m.name.clone(),
                restored: out.entries - out.failed.len() as u64,
                failed: out.failed,
            })
        })
    })
}

/// The scheduler's memory between runs (in the driver), and the status it shows.
#[derive(Debug, Default)]
pub struct Schedule {
    pub running: bool,
    pub last_attempt: Option<Instant>,
    pub last_error: Option<String>,
    /// The copies of the newest archive this node took.
    pub copies: Vec<String>,
    pub copy_failures: Vec<String>,
    pub copies_of: Option<String>,
}

impl Schedule {
    /// Records a run's outcome.
    pub fn finished(&mut self, o: Outcome) {
        self.running = false;
        self.last_error = o.error;
        if let Some(m) = o.manifest {
            self.copies_of = Some(m.name);
            self.copies = o.copies;
            self.copy_failures = o.copy_failures;
        }
    }

    /// The status view: this node's archives, and the copies when it took the newest one.
    pub fn view(
        &self,
        store: &ArchiveStore,
        node_id: &str,
        scheduler: bool,
        interval: Duration,
    ) -> BackupView {
        let all = store.manifests().unwrap_or_default();
        let now = now_unix();
        let newest = all.last().map(|m| BackupArchiveView {
            name: m.name.clone(),
            origin: m.origin.clone(),
            created_unix: m.created_unix,
            age_s: now.saturating_sub(m.created_unix),
            size: m.size,
            keys: m.keys,
            sha256: m.sha256.clone(),
            suspect: m.suspect.clone(),
        });
        let (copies, copy_failures) = match (&newest, &self.copies_of) {
            (Some(n), Some(c)) if *c == n.name => (self.copies.clone(), self.copy_failures.clone()),
            (Some(_), _) => (vec![node_id.to_owned()], Vec::new()),
            (None, _) => (Vec::new(), Vec::new()),
        };
        let alarm = match (&newest, &self.last_error) {
            (
                Some(BackupArchiveView {
                    suspect: Some(why),
                    name,
                    ..
                }),
                _,
            ) => Some(format!("backup {name} is suspect: {why}")),
            (_, Some(e)) if scheduler => Some(format!("the last backup failed: {e}")),
            _ => None,
        };
        BackupView {
            scheduler,
            interval_s: interval.as_secs(),
            newest,
            copies,
            copy_failures,
            held: all.len() as u32,
            alarm,
            last_attempt_s: self.last_attempt.map(|t| t.elapsed().as_secs()),
            last_error: self.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(keys: u64, data: u64, created: u64) -> BackupManifest {
        BackupManifest {
            format: 1,
            name: "b".into(),
            cluster_name: "c".into(),
            cluster_id: "1.a".into(),
            origin: "a".into(),
            created_unix: created,
            size: 1,
            sha256: String::new(),
            keys,
            data_bytes: data,
            suspect: None,
            tag: String::new(),
        }
    }

    #[test]
    fn names_follow_dbctl() {
        assert_eq!(backup_name(0), "backup-1970-01-01-00-00-00");
        assert_eq!(backup_name(1_796_621_400), "backup-2026-12-07-05-30-00");
    }

    #[test]
    fn near_empty_backups_are_flagged() {
        assert!(near_empty(None, 0, 0).is_some());
        assert!(near_empty(None, 3, 10).is_none());
        let prev = m(100, 10_000, 0);
        assert!(near_empty(Some(&prev), 49, 9_000).is_some());
        assert!(near_empty(Some(&prev), 60, 2_000).is_some());
        assert!(near_empty(Some(&prev), 95, 9_500).is_none());
        assert!(near_empty(Some(&m(2, 10, 0)), 1, 1).is_none());
    }

    #[test]
    fn due_follows_interval_and_retry() {
        let h = Duration::from_secs(3600);
        assert!(is_due(None, 1000, h, None, false));
        assert!(!is_due(Some(&m(1, 1, 1000)), 1000 + 3599, h, None, false));
        assert!(is_due(Some(&m(1, 1, 1000)), 1000 + 3600, h, None, false));
        // A failure is retried after a minute, not at once.
        assert!(!is_due(None, 1000, h, Some(Duration::from_secs(10)), true));
        assert!(is_due(None, 1000, h, Some(Duration::from_secs(61)), true));
        // A date in this node's future: the node's own clock decides.
        assert!(is_due(Some(&m(1, 1, 9999)), 1000, h, None, false));
        assert!(!is_due(
            Some(&m(1, 1, 9999)),
            1000,
            h,
            Some(Duration::from_secs(60)),
            false
        ));
    }
}
