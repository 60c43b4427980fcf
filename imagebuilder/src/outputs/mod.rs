//! The outputs step. Everything is written under a temporary name in the output folder
//! (`.NAME.partial-XXXX`) through a [`Staging`]; only [`Staging::commit`], after every output
//! is complete, renames them to their final names. Dropping a `Staging` (an error, Ctrl-C, a
//! full disk) deletes the temporary files, so no half-written file ever has a final name.
//!
//! Outputs: the raw `.img`, optionally `.img.xz` / `.img.zst` (multi-threaded) and `.qcow2`,
//! a `.bmap` ([`bmap`]), `SHA256SUMS` and `manifest.json`. To add an output, create it with
//! [`Staging::temp`], then add it to the sums in `build`.
//!
//! Every form of the image holds the cluster secret, the MicroK8s token and any Wi-Fi PSK, so
//! image files are mode 0600 from the moment they exist, whatever the umask: [`Staging::temp`]
//! creates each temporary file with an explicit mode ([`mode_for`]), the writers here
//! ([`create_private`], [`compress`], [`qcow2`]) set 0600 on what they write, and
//! [`Staging::commit`] sets the mode again before the rename. The block map, sums and manifest
//! hold no secret and are 0644.

pub mod bmap;
pub mod sparse;

use std::fs::{File, OpenOptions, Permissions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

/// Mode of files that hold the image (and so the cluster secret).
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of outputs that hold no secret (block map, sums, manifest).
pub const PUBLIC_MODE: u32 = 0o644;

/// Whether an output name is a form of the image: raw, compressed or qcow2.
pub fn holds_image(name: &str) -> bool {
    [".img", ".img.xz", ".img.zst", ".qcow2", ".raw"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The mode an output is created with: [`PRIVATE_MODE`] for image forms, else [`PUBLIC_MODE`].
pub fn mode_for(name: &str) -> u32 {
    if holds_image(name) {
        PRIVATE_MODE
    } else {
        PUBLIC_MODE
    }
}

/// Opens `path` for writing (created or truncated) with mode 0600: given at creation, so
/// the umask cannot widen it, and set again on a file that already existed.
pub fn create_private(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_MODE)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(Permissions::from_mode(PRIVATE_MODE))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(f)
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

    /// A fresh temporary file that [`commit`](Self::commit) will rename to `dir/name`,
    /// created empty here (exclusively) with the mode [`mode_for`] gives its name, so writers
    /// that open it by path (`File::create`, `qemu-img`) keep that mode.
    ///
    /// Should that creation fail, the writer's own open reports the error (the folder is the
    /// same), and [`commit`](Self::commit) sets the mode before any final name exists.
    pub fn temp(&mut self, name: &str) -> PathBuf {
        let tmp = self
            .dir
            .join(format!(".{name}.partial-{:08x}", rand::random::<u32>()));
        let mode = mode_for(name);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            // The umask may only have narrowed it; make it exact.
            .and_then(|f| f.set_permissions(Permissions::from_mode(mode)));
        if let Err(e) = created {
            tracing::warn!("creating {} with mode {mode:04o}: {e}", tmp.display());
        }
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
            // Every output has content; an empty one was reserved and never written.
            if std::fs::metadata(tmp).map(|m| m.len() == 0).unwrap_or(true) {
                bail!("output {} was never written", fin.display());
            }
        }
        let mut out = Vec::new();
        for (tmp, fin) in &self.pending {
            let name = fin.file_name().unwrap_or_default().to_string_lossy();
            std::fs::set_permissions(tmp, Permissions::from_mode(mode_for(&name)))
                .with_context(|| format!("setting the mode of {}", tmp.display()))?;
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
    // The compressed image holds the secret like the raw one.
    dest.set_permissions(Permissions::from_mode(PRIVATE_MODE))
        .with_context(|| format!("setting mode 0600 on {dest_name}"))?;
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
    // qemu-img opens an existing target without changing its mode.
    drop(create_private(dest)?);
    Tool::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(src)
        .arg(dest)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .with_context(|| format!("converting {} to qcow2", src.display()))?;
    std::fs::set_permissions(dest, Permissions::from_mode(PRIVATE_MODE))
        .with_context(|| format!("setting mode 0600 on {}", dest.display()))?;
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

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

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

    /// The image, its compressed forms and qcow2 hold the secret: 0600 from creation on,
    /// whatever the umask (the default 022 would give 0644) and however the writer opens
    /// them; the block map, sums and manifest stay 0644.
    #[test]
    fn image_outputs_are_private_from_creation_to_commit() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Staging::new(d.path()).unwrap();
        let names = [
            "n.img",
            "n.img.xz",
            "n.img.zst",
            "n.qcow2",
            "n.bmap",
            "SHA256SUMS",
            "manifest.json",
        ];
        let mut temps = Vec::new();
        for name in names {
            let t = s.temp(name);
            assert_eq!(mode(&t), mode_for(name), "{name} as created");
            // Written the way build writes them: File::create keeps the mode.
            File::create(&t).unwrap().write_all(b"data").unwrap();
            assert_eq!(mode(&t), mode_for(name), "{name} after File::create");
            temps.push(t);
        }
        // A writer that widened a temporary file's mode is corrected at commit.
        std::fs::set_permissions(&temps[0], Permissions::from_mode(0o644)).unwrap();
        for p in s.commit().unwrap() {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            let want = if holds_image(&name) { 0o600 } else { 0o644 };
            assert_eq!(mode(&p), want, "{name} committed");
        }
    }

    #[test]
    fn private_writers_set_0600_on_existing_world_readable_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("old.img");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&p).unwrap());
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0, "truncated");

        let src = d.path().join("src");
        std::fs::write(&src, vec![7u8; 100_000]).unwrap();
        let no = AtomicBool::new(false);
        for (name, how) in [
            ("c.img.xz", Compression::Xz),
            ("c.img.zst", Compression::Zstd),
        ] {
            let dest = d.path().join(name);
            let f = File::create(&dest).unwrap();
            std::fs::set_permissions(&dest, Permissions::from_mode(0o644)).unwrap();
            compress(&src, f, &dest, how, &no).unwrap();
            assert_eq!(mode(&dest), 0o600, "{name}");
        }
    }

    #[tokio::test]
    async fn qcow2_output_is_private() {
        if !crate::tool::on_path("qemu-img") {
            eprintln!("qemu-img not installed; skipping");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("raw.img");
        File::create(&src).unwrap().set_len(1 << 20).unwrap();
        let dest = d.path().join("out.qcow2");
        qcow2(&src, &dest).await.unwrap();
        assert_eq!(mode(&dest), 0o600);
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
