//! The archives a control-plane node holds: `<state>/backups/NAME.tar.gz` with
//! `NAME.manifest.json` beside it, both mode 0600 in a 0700 folder, each written atomically
//! ([`rackseed_host::fs::write_atomic`]); the archive first, the manifest last, so a manifest
//! present means a complete archive. Archives keep their original name: `dbctl restore` finds
//! the folder inside by the file's name.
//!
//! Pruning keeps the newest `keep` archives by (creation time, name), and never removes the
//! newest archive that is not suspect (a near-empty backup never pushes the last good one out).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use rackseed_protocol::coordinator::backup::{check_name, BackupManifest, BackupStore};

/// Mode of archives and manifests.
pub const FILE_MODE: u32 = 0o600;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ArchiveStore {
    dir: PathBuf,
    keep: usize,
    cluster_name: String,
}

impl ArchiveStore {
    /// Opens (creating it 0700 when missing) the store in `dir`, through
    /// [`rackseed_host::fs::create_private_dir`]: an existing folder that is already 0700 and
    /// ours is not chmod-ed (a read-only filesystem refuses even that); one with another mode
    /// is made 0700; a file or another user's folder is refused.
    pub fn open(dir: &Path, keep: u32, cluster_name: &str) -> Result<ArchiveStore> {
        rackseed_host::fs::create_private_dir(dir)?;
        Ok(ArchiveStore {
            dir: dir.to_path_buf(),
            keep: keep.max(1) as usize,
            cluster_name: cluster_name.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifests of the complete archives held, oldest first. Unreadable manifests are
    /// skipped (and logged).
    pub fn manifests(&self) -> Result<Vec<BackupManifest>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("listing {}", self.dir.display()))?;
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".manifest.json") else {
                continue;
            };
            if check_name(name).is_err() || !self.dir.join(format!("{name}.tar.gz")).is_file() {
                continue;
            }
            let parsed = std::fs::read(e.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<BackupManifest>(&b)?));
            match parsed {
                Ok(m) if m.name == name => out.push(m),
                Ok(_) => tracing::warn!(file, "backup manifest names another archive; ignored"),
                Err(e) => tracing::warn!(file, error = %e, "unreadable backup manifest; ignored"),
            }
        }
        out.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        Ok(out)
    }

    /// The newest archive held.
    pub fn newest(&self) -> Result<Option<BackupManifest>> {
        Ok(self.manifests()?.pop())
    }

    /// The newest archive that is not suspect: what a new backup is compared with.
    pub fn newest_good(&self) -> Result<Option<BackupManifest>> {
        Ok(self
            .manifests()?
            .into_iter()
            .rev()
            .find(|m| m.suspect.is_none()))
    }

    /// One archive with its manifest.
    pub fn read(&self, name: &str) -> Result<Option<(BackupManifest, Vec<u8>)>> {
        check_name(name)?;
        let mpath = self.dir.join(format!("{name}.manifest.json"));
        let manifest: BackupManifest = match std::fs::read(&mpath) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", mpath.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", mpath.display())),
        };
        let apath = self.dir.join(manifest.archive_file());
        let archive =
            std::fs::read(&apath).with_context(|| format!("reading {}", apath.display()))?;
        Ok(Some((manifest, archive)))
    }

    /// Keeps a verified archive (see the module docs), then prunes.
    pub fn keep_archive(&self, manifest: &BackupManifest, archive: &[u8]) -> Result<()> {
        check_name(&manifest.name)?;
        if manifest.cluster_name != self.cluster_name {
            anyhow::bail!(
                "{} is a backup of cluster {:?}, this node belongs to {:?}",
                manifest.name,
                manifest.cluster_name,
                self.cluster_name
            );
        }
        rackseed_host::fs::write_atomic(
            &self.dir.join(manifest.archive_file()),
            archive,
            FILE_MODE,
        )?;
        rackseed_host::fs::write_atomic(
            &self.dir.join(manifest.manifest_file()),
            &serde_json::to_vec_pretty(manifest)?,
            FILE_MODE,
        )?;
        self.prune()?;
        Ok(())
    }

    /// Removes all but the newest `keep` archives, never the newest good one. Returns the
    /// names removed.
    pub fn prune(&self) -> Result<Vec<String>> {
        let all = self.manifests()?;
        let good = all
            .iter()
            .rev()
            .find(|m| m.suspect.is_none())
            .map(|m| m.name.clone());
        let excess = all.len().saturating_sub(self.keep);
        let mut removed = Vec::new();
        for m in all.iter().take(excess) {
            if Some(&m.name) == good.as_ref() {
                continue;
            }
            // Manifest first: without it the archive no longer counts as held.
            for f in [m.manifest_file(), m.archive_file()] {
                let p = self.dir.join(&f);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
                }
            }
            removed.push(m.name.clone());
        }
        Ok(removed)
    }
}

impl BackupStore for ArchiveStore {
    fn list(&self) -> Result<Vec<BackupManifest>, String> {
        self.manifests().map_err(|e| format!("{e:#}"))
    }

    fn read(&self, name: &str) -> Result<Option<(BackupManifest, Vec<u8>)>, String> {
        ArchiveStore::read(self, name).map_err(|e| format!("{e:#}"))
    }

    fn store(&self, from: &str, manifest: &BackupManifest, archive: &[u8]) -> Result<(), String> {
        self.keep_archive(manifest, archive)
            .map_err(|e| format!("{e:#}"))?;
        tracing::info!(from, backup = %manifest.name, size = manifest.size, "kept a backup copy");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_store_folder_is_made_private_and_an_existing_private_one_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("state/backups");
        ArchiveStore::open(&fresh, 3, "homelab").unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        ArchiveStore::open(&open, 3, "homelab").unwrap();
        assert_eq!(mode(&open), 0o700);
        // Opened again (0700 already): nothing to change, and it still lists.
        let store = ArchiveStore::open(&open, 3, "homelab").unwrap();
        assert!(store.manifests().unwrap().is_empty());
        let file = d.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(ArchiveStore::open(&file, 3, "homelab").is_err());
    }
}
