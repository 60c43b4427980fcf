//! FAT filesystems inside an image file, edited in-process with the `fatfs` crate over a byte
//! range of the file (no mtools, no mounts): format, write a file (creating parent folders),
//! read a file, list a folder.
//!
//! FAT has no owners or modes, so callers pass only paths and bytes. Paths use `/` and are
//! relative to the filesystem root.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use fatfs::{FileSystem, FormatVolumeOptions, FsOptions};
use fscommon::{BufStream, StreamSlice};

type Slice = BufStream<StreamSlice<File>>;

fn open_slice(image: &Path, start: u64, size: u64) -> Result<Slice> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let s = StreamSlice::new(f, start, start + size).context("addressing the FAT partition")?;
    Ok(BufStream::new(s))
}

/// A FAT filesystem at `[start, start+size)` of `image`.
pub struct FatVolume {
    fs: FileSystem<Slice>,
    what: String,
}

/// Formats FAT32 with `label` (kept as given, e.g. lower-case `system-boot` like Ubuntu's).
pub fn format(image: &Path, start: u64, size: u64, label: &str) -> Result<()> {
    if label.len() > 11 {
        bail!("FAT label {label:?} is longer than 11 bytes");
    }
    let mut l = [b' '; 11];
    l[..label.len()].copy_from_slice(label.as_bytes());
    let slice = open_slice(image, start, size)?;
    let opts = FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_cluster(2048)
        .volume_label(l)
        .volume_id(u32::from_le_bytes(rand::random()));
    fatfs::format_volume(slice, opts)
        .with_context(|| format!("formatting FAT {label:?} at byte {start} of {}", image.display()))?;
    Ok(())
}

impl FatVolume {
    pub fn open(image: &Path, start: u64, size: u64) -> Result<Self> {
        let what = format!("FAT filesystem at byte {start} of {}", image.display());
        let fs = FileSystem::new(open_slice(image, start, size)?, FsOptions::new())
            .with_context(|| format!("opening the {what}"))?;
        Ok(FatVolume { fs, what })
    }

    /// Writes `data` at `path`, replacing an existing file and creating parent folders.
    pub fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        let path = path.trim_start_matches('/');
        let root = self.fs.root_dir();
        let mut dir = root.clone();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, parents)) = parts.split_last() else { bail!("empty FAT path") };
        for p in parents {
            dir = match dir.open_dir(p) {
                Ok(d) => d,
                Err(_) => dir.create_dir(p).with_context(|| format!("creating {p} in the {}", self.what))?,
            };
        }
        let mut f = dir.create_file(name).with_context(|| format!("creating {path} in the {}", self.what))?;
        f.truncate()?;
        f.write_all(data).with_context(|| format!("writing {path} in the {}", self.what))?;
        f.flush()?;
        Ok(())
    }

    /// Copies a host file to `path` (streaming).
    pub fn copy_from(&self, path: &str, src: &Path) -> Result<()> {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.write(path, &data)
    }

    /// Reads `path`; `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let path = path.trim_start_matches('/');
        match self.fs.root_dir().open_file(path) {
            Ok(mut f) => {
                let mut v = Vec::new();
                f.read_to_end(&mut v).with_context(|| format!("reading {path} in the {}", self.what))?;
                Ok(Some(v))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("opening {path} in the {}", self.what)),
        }
    }

    /// Names in the root folder (for inspect).
    pub fn list_root(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in self.fs.root_dir().iter() {
            let e = e?;
            let n = e.file_name();
            if n != "." && n != ".." {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Flushes and closes the filesystem.
    pub fn close(self) -> Result<()> {
        self.fs.unmount().with_context(|| format!("closing the {}", self.what))
    }
}
