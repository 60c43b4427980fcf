//! `imagebuilder flash IMAGE DEVICE`: write an image to an SD card, USB stick or disk safely.
//!
//! - Only the blocks listed in the image's `.bmap` ([`bmap`]: bmaptool's format, version 2.x,
//!   every number checked) are written, and each range is checked against the bmap's SHA-256
//!   while it is read from the image, so a corrupt image is caught before the device is
//!   trusted with it.
//! - After writing, the device's page cache is flushed and dropped and every mapped range is read
//!   back and compared with the bmap checksum.
//! - The device is opened exclusively and checked through that descriptor ([`target`]):
//!   refused when mounted in any mount namespace, swap, held by LVM/RAID/dm, under the running
//!   system, smaller than the image, a partition (unless `--allow-partition`) or a regular
//!   file (unless `--allow-file`). The checks run again after the confirmation prompt, right
//!   before the first write.
//! - It asks for confirmation unless `--yes`; without a terminal and without `--yes` it refuses.
//!
//! The image may be a raw `.img`, or `.img.xz` / `.img.zst` (decompressed as a stream: bmap
//! ranges are in ascending order, so no temporary file is needed). To support another
//! compression, add a reader in [`open_image`].

pub mod bmap;
pub mod target;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

pub use bmap::{Bmap, BmapRange};
pub use target::{
    check_target, parse_mountinfo, Allow, BlockInfo, MountEntry, MountTable, OpenTarget, Refusal,
    SystemBlockInfo, TargetKind,
};

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashRequest {
    pub image: PathBuf,
    /// Defaults to the image path with its compression suffix replaced by `.bmap`.
    pub bmap: Option<PathBuf>,
    pub device: PathBuf,
    /// Skip the confirmation prompt.
    pub yes: bool,
    /// Show progress bars (off in tests).
    pub progress: bool,
    /// Targets besides whole disks that the user asked for.
    pub allow: Allow,
}

/// What a flash did, for the summary line and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashReport {
    pub written_bytes: u64,
    pub verified_bytes: u64,
    pub image_size: u64,
}

/// The bmap path next to an image: `x.img`, `x.img.xz`, `x.img.zst` -> `x.img.bmap`... as
/// written by `imagebuilder build` (`<name>.bmap` beside `<name>.img`).
pub fn default_bmap_path(image: &Path) -> PathBuf {
    let s = image.to_string_lossy();
    let base = s
        .strip_suffix(".xz")
        .or_else(|| s.strip_suffix(".zst"))
        .unwrap_or(&s);
    let base = base.strip_suffix(".img").unwrap_or(base);
    PathBuf::from(format!("{base}.bmap"))
}

/// Opens an image for sequential reading, decompressing `.xz` / `.zst` on the fly.
pub fn open_image(path: &Path) -> Result<Box<dyn Read>> {
    let f = File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let f = std::io::BufReader::with_capacity(1 << 20, f);
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".xz") {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(f))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::with_buffer(f).context("reading zstd header")?)
    } else {
        Box::new(f)
    })
}

fn progress_bar(enabled: bool, total: u64, msg: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Flashes an image. See the module docs for what is checked and refused.
pub fn flash(req: &FlashRequest, info: &dyn BlockInfo) -> Result<FlashReport> {
    let bmap_path = req
        .bmap
        .clone()
        .unwrap_or_else(|| default_bmap_path(&req.image));
    let bmap_bytes = std::fs::read(&bmap_path).with_context(|| {
        format!(
            "reading block map {} (written by `imagebuilder build` next to the image)",
            bmap_path.display()
        )
    })?;
    let bmap = Bmap::parse_bytes(&bmap_bytes)
        .with_context(|| format!("parsing {}", bmap_path.display()))?;

    let mut target = OpenTarget::open(&req.device, req.allow, info, bmap.image_size)?;
    if !req.yes
        && !rackseed_host::terminal::confirm(&format!(
            "This overwrites {} ({} bytes) with {} ({} bytes, {} mapped).",
            req.device.display(),
            target.size,
            req.image.display(),
            bmap.image_size,
            bmap.mapped_bytes()
        ))?
    {
        bail!("not confirmed; {} was not touched", req.device.display());
    }
    // The answer may have taken minutes: check again, on the same descriptor, right before
    // the first write.
    target.check(info, bmap.image_size)?;
    let is_file = matches!(target.kind, TargetKind::File(_));
    let mut dev = target.file;
    if is_file && target.size < bmap.image_size {
        dev.set_len(bmap.image_size)?;
    }

    let written = write_ranges(&bmap, &req.image, &mut dev, req.progress)?;
    dev.sync_all()
        .with_context(|| format!("flushing {}", req.device.display()))?;
    // Drop the cached pages so the read-back comes from the device, not from memory.
    nix::fcntl::posix_fadvise(
        &dev,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("dropping cached pages of {}", req.device.display()))?;
    let verified = verify_ranges(&bmap, &mut dev, req.progress)
        .with_context(|| format!("verifying {}", req.device.display()))?;
    Ok(FlashReport {
        written_bytes: written,
        verified_bytes: verified,
        image_size: bmap.image_size,
    })
}

fn write_ranges(bmap: &Bmap, image: &Path, dev: &mut File, progress: bool) -> Result<u64> {
    let mut src = open_image(image)?;
    let pb = progress_bar(progress, bmap.mapped_bytes(), "writing");
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for r in &bmap.ranges {
        let (start, end) = (r.start, r.end);
        // Skip the unmapped gap in the (possibly compressed) stream.
        let skipped = std::io::copy(&mut (&mut src).take(start - pos), &mut std::io::sink())?;
        ensure!(
            skipped == start - pos,
            "image {} ends at byte {} but the block map expects {} bytes",
            image.display(),
            pos + skipped,
            bmap.image_size
        );
        dev.seek(SeekFrom::Start(start))?;
        let mut hasher = Sha256::new();
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..n]).with_context(|| {
                format!(
                    "image {} is shorter than its block map says ({} bytes)",
                    image.display(),
                    bmap.image_size
                )
            })?;
            hasher.update(&buf[..n]);
            dev.write_all(&buf[..n])?;
            left -= n as u64;
            pb.inc(n as u64);
        }
        let got = hex::encode(hasher.finalize());
        ensure!(
            got == r.sha256,
            "image {} blocks {}-{}: checksum {got} does not match the block map's {}; the image is corrupt",
            image.display(),
            r.first,
            r.last,
            r.sha256
        );
        pos = end;
    }
    pb.finish_and_clear();
    Ok(bmap.mapped_bytes())
}

fn verify_ranges(bmap: &Bmap, dev: &mut File, progress: bool) -> Result<u64> {
    let pb = progress_bar(progress, bmap.mapped_bytes(), "verifying");
    let mut buf = vec![0u8; 1 << 20];
    for r in &bmap.ranges {
        let (start, end) = (r.start, r.end);
        dev.seek(SeekFrom::Start(start))?;
        let mut hasher = Sha256::new();
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            dev.read_exact(&mut buf[..n])?;
            hasher.update(&buf[..n]);
            left -= n as u64;
            pb.inc(n as u64);
        }
        let got = hex::encode(hasher.finalize());
        ensure!(
            got == r.sha256,
            "read-back of blocks {}-{} gives {got}, expected {}; the device did not keep what was written",
            r.first,
            r.last,
            r.sha256
        );
    }
    pb.finish_and_clear();
    Ok(bmap.mapped_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_bmap_path_strips_compression() {
        assert_eq!(
            default_bmap_path(Path::new("o/x.img.xz")),
            PathBuf::from("o/x.bmap")
        );
        assert_eq!(
            default_bmap_path(Path::new("o/x.img")),
            PathBuf::from("o/x.bmap")
        );
    }
}
