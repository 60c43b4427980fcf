//! FAT filesystems inside an image file, formatted with `mkfs.vfat --offset` and edited with
//! mtools addressing the partition as `IMAGE@@OFFSET` (no loop device, no mount).
//!
//! Writes are batched: files are staged in a scratch folder mirroring the FAT tree and copied
//! with one `mcopy -s -o` (which creates folders and replaces files). FAT has no owners or
//! modes. Paths use `/` and are relative to the filesystem root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::tool::Tool;

const T: Duration = Duration::from_secs(300);

fn mtool(program: &str) -> Tool {
    // The partition is addressed by byte offset, so mtools' drive geometry checks do not apply.
    Tool::new(program).env("MTOOLS_SKIP_CHECK", "1").timeout(T)
}

/// Formats FAT32 labelled `label` (kept as given, e.g. lower-case `system-boot` like Ubuntu's)
/// in `[start, start+size)` of `image`. 1 KiB clusters keep even a 64 MiB volume above FAT32's
/// minimum cluster count, which mtools relies on to recognise FAT32.
pub async fn format(image: &Path, start: u64, size: u64, label: &str) -> Result<()> {
    if label.len() > 11 {
        bail!("FAT label {label:?} is longer than 11 bytes");
    }
    if start % 512 != 0 || size % 1024 != 0 {
        bail!("FAT partition at byte {start} size {size} is not sector aligned");
    }
    Tool::new("mkfs.vfat")
        .args(["-F", "32", "-s", "2", "-n", label, "--offset"])
        .arg((start / 512).to_string())
        .arg(image)
        .arg((size / 1024).to_string())
        .timeout(T)
        .run()
        .await
        .with_context(|| {
            format!(
                "formatting FAT {label:?} at byte {start} of {}",
                image.display()
            )
        })?;
    Ok(())
}

/// A FAT filesystem at byte `offset` of `image`.
#[derive(Debug, Clone)]
pub struct FatVolume {
    image: PathBuf,
    offset: u64,
}

impl FatVolume {
    pub fn new(image: &Path, offset: u64) -> Self {
        FatVolume {
            image: image.to_path_buf(),
            offset,
        }
    }

    fn dev(&self) -> String {
        format!("{}@@{}", self.image.display(), self.offset)
    }

    fn what(&self) -> String {
        format!(
            "FAT filesystem at byte {} of {}",
            self.offset,
            self.image.display()
        )
    }

    /// Copies the contents of `staged` (a folder mirroring the FAT tree) into the root,
    /// replacing files and creating folders.
    pub async fn write_tree(&self, staged: &Path) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(staged)
            .with_context(|| format!("reading {}", staged.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        if entries.is_empty() {
            return Ok(());
        }
        entries.sort();
        mtool("mcopy")
            .args(["-s", "-o", "-Q", "-i"])
            .arg(self.dev())
            .args(entries)
            .arg("::/")
            .run()
            .await
            .with_context(|| format!("writing into the {}", self.what()))?;
        Ok(())
    }

    /// Reads `path`; `None` when it does not exist.
    pub async fn read(&self, path: &str, scratch: &Path) -> Result<Option<Vec<u8>>> {
        let dest = scratch.join(format!("fat-read-{:08x}", rand::random::<u32>()));
        let out = mtool("mcopy")
            .args(["-n", "-i"])
            .arg(self.dev())
            .arg(format!("::/{}", path.trim_start_matches('/')))
            .arg(&dest)
            .output()
            .await?;
        if !out.status.success() {
            if out.stderr.contains("not found") {
                return Ok(None);
            }
            bail!(
                "reading {path} from the {}: {}",
                self.what(),
                out.stderr.trim()
            );
        }
        let data = std::fs::read(&dest).with_context(|| format!("reading {}", dest.display()));
        let _ = std::fs::remove_file(&dest);
        data.map(Some)
    }

    /// Every path in the filesystem (`::/a/b`), folders ending in `/`.
    pub async fn list(&self) -> Result<Vec<String>> {
        let out = mtool("mdir")
            .args(["-/", "-b", "-i"])
            .arg(self.dev())
            .arg("::/")
            .run()
            .await?;
        Ok(out.lines().map(str::to_string).collect())
    }
}

/// Files to put on a FAT volume, staged in a scratch folder.
pub struct FatStage {
    root: tempfile::TempDir,
}

impl FatStage {
    pub fn new(scratch: &Path) -> Result<Self> {
        Ok(FatStage {
            root: tempfile::Builder::new()
                .prefix("fat-")
                .tempdir_in(scratch)?,
        })
    }

    pub fn add(&self, path: &str, data: &[u8]) -> Result<()> {
        let p = self.root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::write(&p, data).with_context(|| format!("staging {}", p.display()))
    }

    pub fn add_file(&self, path: &str, src: &Path) -> Result<()> {
        let p = self.root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::copy(src, &p).with_context(|| format!("staging {}", src.display()))?;
        Ok(())
    }

    pub async fn write_to(self, v: &FatVolume) -> Result<()> {
        v.write_tree(self.root.path()).await
    }
}
