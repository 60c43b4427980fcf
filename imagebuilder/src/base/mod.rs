//! The base step: turns the configured base into a raw disk image (the build's working file)
//! laid out like Ubuntu's official images.
//!
//! - `official`: [`download::fetch`] (cache, resume, verify), then [`materialize`].
//! - `local`: verified when a SHA-256 is given, then [`materialize`].
//! - `bootstrap`: [`bootstrap::ensure_tarball`] (cached), unpacked into scratch space, then
//!   composed into the target's layout by [`crate::disk::compose`].
//!
//! [`materialize`] accepts raw images, `.xz` and `.zst` streams (decoded in-process, holes kept
//! sparse) and qcow2 (`qemu-img convert`); the format comes from the file's magic bytes, not its
//! name. To add a format, detect it in [`Format::detect`] and decode it in [`materialize`].

pub mod apt_sources;
pub mod bootstrap;
pub mod deb;
pub mod download;
pub mod initramfs;
pub mod locale;
pub mod server;
pub mod suite;

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::tool::Tool;

/// Container format of a base image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Xz,
    Zstd,
    Qcow2,
}

impl Format {
    pub fn detect(magic: &[u8; 8]) -> Format {
        if magic[..6] == [0xFD, b'7', b'z', b'X', b'Z', 0x00] {
            Format::Xz
        } else if magic[..4] == [0x28, 0xB5, 0x2F, 0xFD] {
            Format::Zstd
        } else if magic[..4] == [b'Q', b'F', b'I', 0xFB] {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }
}

/// Writes the raw disk image held in `src` (any [`Format`]) to `dest`, sparse.
pub async fn materialize(src: &Path, dest: &Path, cancel: &Arc<AtomicBool>) -> Result<Format> {
    let fmt = Format::detect(&download::magic(src)?);
    match fmt {
        Format::Qcow2 => {
            // The work image gets the secret next: 0600 before qemu-img (which keeps an
            // existing file's mode) writes a byte.
            drop(crate::outputs::create_private(dest)?);
            Tool::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(src)
                .arg(dest)
                .timeout(Duration::from_secs(1800))
                .run()
                .await
                .with_context(|| format!("converting qcow2 base {}", src.display()))?;
        }
        Format::Raw | Format::Xz | Format::Zstd => {
            // Created here, not in the blocking task, so a dropped build cannot create it after
            // its staging removed the name.
            // 0600 (explicit, not the umask's): the work image gets the secret next.
            let out = crate::outputs::create_private(dest)?;
            let (s, d) = (src.to_path_buf(), dest.to_path_buf());
            let cancel = Arc::clone(cancel);
            tokio::task::spawn_blocking(move || copy_sparse(&s, out, &d, fmt, &cancel))
                .await
                .context("base copy task failed")?
                .with_context(|| format!("reading base image {}", src.display()))?;
        }
    }
    Ok(fmt)
}

/// Copies a raw image's data extents (found with `SEEK_DATA`/`SEEK_HOLE`); holes stay holes
/// and are never read. The kernel copies (`copy_file_range`, no user-space buffer); where it
/// cannot, positioned 4 MiB reads and writes do.
fn copy_raw(src: &Path, out: &File, cancel: &AtomicBool) -> Result<u64> {
    use nix::errno::Errno;
    use std::os::unix::fs::FileExt;
    let f = File::open(src)?;
    let len = f.metadata()?.len();
    let mut buf: Vec<u8> = Vec::new();
    let mut in_kernel = true;
    for e in crate::outputs::sparse::data_extents(&f, len)? {
        let mut pos = e.start;
        while pos < e.end {
            if cancel.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let want = ((e.end - pos) as usize).min(64 << 20);
            if in_kernel {
                let (mut off_in, mut off_out) = (pos as i64, pos as i64);
                match nix::fcntl::copy_file_range(
                    &f,
                    Some(&mut off_in),
                    out,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(0) => bail!("the base image shrank while it was being copied"),
                    Ok(n) => {
                        pos += n as u64;
                        continue;
                    }
                    Err(Errno::EXDEV | Errno::ENOSYS | Errno::EINVAL | Errno::EOPNOTSUPP) => {
                        in_kernel = false
                    }
                    Err(e) => return Err(e).context("copying image data"),
                }
            }
            if buf.is_empty() {
                buf = vec![0u8; 4 << 20];
            }
            let n = want.min(buf.len());
            f.read_exact_at(&mut buf[..n], pos)
                .context("reading image data (is the base image truncated?)")?;
            out.write_all_at(&buf[..n], pos)
                .context("writing image data")?;
            pos += n as u64;
        }
    }
    // No fsync here: the build syncs the finished image once, before the final rename.
    out.set_len(len)?;
    Ok(len)
}

/// Copies (decoding) `src` to `dest`, keeping holes: raw images by their data extents,
/// compressed streams by turning all-zero 1 MiB blocks into holes.
pub fn copy_sparse(
    src: &Path,
    mut out: File,
    dest: &Path,
    fmt: Format,
    cancel: &AtomicBool,
) -> Result<u64> {
    if fmt == Format::Raw {
        return copy_raw(src, &out, cancel);
    }
    let f = File::open(src)?;
    let mut reader: Box<dyn Read> = match fmt {
        Format::Raw => unreachable!("handled above"),
        Format::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(
            BufReader::with_capacity(1 << 20, f),
        )),
        Format::Zstd => Box::new(zstd::stream::read::Decoder::new(f)?),
        Format::Qcow2 => bail!("qcow2 is converted with qemu-img"),
    };
    let mut buf = vec![0u8; 1 << 20];
    // Slice equality compiles to memcmp, fast even in debug builds.
    let zeros = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let n = read_full(&mut reader, &mut buf)
            .map_err(|e| anyhow::anyhow!("the base image is truncated or corrupt: {e}"))?;
        if n == 0 {
            break;
        }
        if buf[..n] == zeros[..n] {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        total += n as u64;
    }
    out.set_len(total)?;
    Ok(total)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_by_magic() {
        assert_eq!(
            Format::detect(&[0xFD, b'7', b'z', b'X', b'Z', 0, 0, 4]),
            Format::Xz
        );
        assert_eq!(
            Format::detect(&[0x28, 0xB5, 0x2F, 0xFD, 0, 0, 0, 0]),
            Format::Zstd
        );
        assert_eq!(Format::detect(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
        assert_eq!(Format::detect(&[0; 8]), Format::Raw);
    }

    #[test]
    fn raw_copy_keeps_holes_and_bytes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("raw");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        let mut f = f;
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[1u8; 300_000]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 10)).unwrap();
        f.write_all(b"end-marker").unwrap();
        drop(f);
        let out = d.path().join("out");
        let never = AtomicBool::new(false);
        assert_eq!(
            copy_sparse(&src, File::create(&out).unwrap(), &out, Format::Raw, &never).unwrap(),
            64 << 20
        );
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 < 4 << 20,
            "holes kept"
        );
    }

    #[test]
    fn xz_roundtrip_is_sparse_and_truncation_fails() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw");
        let mut data = vec![0u8; 4 << 20];
        data[1 << 20..(1 << 20) + 10].copy_from_slice(b"0123456789");
        std::fs::write(&raw, &data).unwrap();
        let xz = d.path().join("raw.xz");
        let mut enc = liblzma::write::XzEncoder::new(File::create(&xz).unwrap(), 1);
        enc.write_all(&data).unwrap();
        enc.finish().unwrap();
        let out = d.path().join("out");
        let never = AtomicBool::new(false);
        assert_eq!(
            copy_sparse(&xz, File::create(&out).unwrap(), &out, Format::Xz, &never).unwrap(),
            4 << 20
        );
        assert_eq!(std::fs::read(&out).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 < 3 << 20,
            "zero blocks became holes"
        );
        let cut = d.path().join("cut.xz");
        let bytes = std::fs::read(&xz).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
        let e = copy_sparse(&cut, File::create(&out).unwrap(), &out, Format::Xz, &never)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
    }
}
