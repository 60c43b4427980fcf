//! The outputs step. Everything is written under a temporary name in the output folder
//! (`.NAME.partial-XXXX`) through a [`Staging`]; only [`Staging::commit`], after every output
//! is complete, renames them to their final names. Dropping a `Staging` (an error, Ctrl-C, a
//! full disk) deletes the temporary files, so no half-written file ever has a final name.
//!
//! Outputs: the raw `.img`, optionally `.img.xz` / `.img.zst` (multi-threaded) and `.qcow2`,
//! a `.bmap` ([`bmap`]), `SHA256SUMS` and `manifest.json`. To add an output, create it with
//! [`Staging::temp`], then add it to the sums in `build`.

pub mod bmap;
pub mod sparse;

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::tool::Tool;

/// Compression of the flashable image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zst",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xz" => Ok(Compression::Xz),
            "zstd" | "zst" => Ok(Compression::Zstd),
            _ => Err(format!("expected xz or zstd, got {s:?}")),
        }
    }
}

/// Temporary files in `dir` that become final only together.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    pending: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl Staging {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating output folder {}", dir.display()))?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            pending: Vec::new(),
            committed: false,
        })
    }

    /// A fresh temporary path that [`commit`](Self::commit) will rename to `dir/name`.
    pub fn temp(&mut self, name: &str) -> PathBuf {
        let tmp = self
            .dir
            .join(format!(".{name}.partial-{:08x}", rand::random::<u32>()));
        self.pending.push((tmp.clone(), self.dir.join(name)));
        tmp
    }

    /// Final path of a staged name.
    pub fn final_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Renames every temporary file to its final name and syncs the folder.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        for (tmp, fin) in &self.pending {
            if !tmp.exists() {
                bail!("output {} was never written", fin.display());
            }
        }
        let mut out = Vec::new();
        for (tmp, fin) in &self.pending {
            std::fs::rename(tmp, fin)
                .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
            out.push(fin.clone());
        }
        self.committed = true;
        File::open(&self.dir).and_then(|d| d.sync_all()).ok();
        Ok(out)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.pending {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// Compresses `src` into `dest` using every core.
/// `dest` is the already created file at `dest_path` (created by the caller before any
/// blocking task starts, so a dropped build cannot recreate a removed temporary name).
pub fn compress(
    src: &Path,
    dest: File,
    dest_path: &Path,
    how: Compression,
    cancel: &AtomicBool,
) -> Result<()> {
    let dest_name = dest_path.display().to_string();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let out = BufWriter::with_capacity(1 << 20, dest);
    let mut input = File::open(src)?;
    let mut buf = vec![0u8; 1 << 20];
    macro_rules! pump {
        ($w:expr) => {{
            loop {
                if cancel.load(Ordering::Relaxed) {
                    bail!("interrupted");
                }
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                $w.write_all(&buf[..n])
                    .with_context(|| format!("writing {dest_name}"))?;
            }
        }};
    }
    match how {
        Compression::Xz => {
            let stream = liblzma::stream::MtStreamBuilder::new()
                .threads(threads)
                .preset(6)
                .check(liblzma::stream::Check::Crc64)
                .encoder()
                .context("creating the xz encoder")?;
            let mut w = liblzma::write::XzEncoder::new_stream(out, stream);
            pump!(w);
            let mut inner = w
                .finish()
                .with_context(|| format!("finishing {dest_name}"))?;
            inner.flush()?;
            inner.get_ref().sync_all()?;
        }
        Compression::Zstd => {
            let mut w = zstd::stream::write::Encoder::new(out, 3)?;
            w.multithread(threads).context("enabling zstd threads")?;
            pump!(w);
            let mut inner = w
                .finish()
                .with_context(|| format!("finishing {dest_name}"))?;
            inner.flush()?;
            inner.get_ref().sync_all()?;
        }
    }
    Ok(())
}

/// Converts the raw image to qcow2 with qemu-img.
pub async fn qcow2(src: &Path, dest: &Path) -> Result<()> {
    Tool::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(src)
        .arg(dest)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .with_context(|| format!("converting {} to qcow2", src.display()))?;
    Ok(())
}

/// `SHA256SUMS` in `sha256sum` format (`HASH  NAME`).
pub fn sha256sums(entries: &[(String, String)]) -> String {
    entries
        .iter()
        .map(|(name, sum)| format!("{sum}  {name}\n"))
        .collect()
}

/// Writes `data` to `path` and syncs it.
pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Syncs a file's data (the raw image after editing by external tools).
pub fn sync_file(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    f.seek(SeekFrom::Start(0))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_renames_only_on_commit() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Staging::new(d.path()).unwrap();
        let t = s.temp("a.img");
        std::fs::write(&t, "x").unwrap();
        drop(s);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "dropped staging leaves nothing"
        );
        let mut s = Staging::new(d.path()).unwrap();
        let t = s.temp("a.img");
        std::fs::write(&t, "x").unwrap();
        let done = s.commit().unwrap();
        assert_eq!(done, vec![d.path().join("a.img")]);
        assert!(!t.exists());
    }

    #[test]
    fn commit_refuses_missing_outputs() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Staging::new(d.path()).unwrap();
        let _ = s.temp("never");
        assert!(s.commit().is_err());
    }

    #[test]
    fn compressors_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("img");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let no = AtomicBool::new(false);
        for (name, how) in [("img.xz", Compression::Xz), ("img.zst", Compression::Zstd)] {
            let p = d.path().join(name);
            compress(&src, File::create(&p).unwrap(), &p, how, &no).unwrap();
        }
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new_multi_decoder(File::open(d.path().join("img.xz")).unwrap())
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        let back = zstd::decode_all(File::open(d.path().join("img.zst")).unwrap()).unwrap();
        assert_eq!(back, data);
    }
}
