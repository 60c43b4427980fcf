//! `imagebuilder flash IMAGE DEVICE`: write an image to an SD card, USB stick or disk safely.
//!
//! - Only the blocks listed in the image's `.bmap` ([`bmap`]: bmaptool's format, version 2.x,
//!   every number checked) are written, and each range is checked against the bmap's SHA-256
//!   while it is read from the image, so a corrupt image is caught before the device is
//!   trusted with it. A raw image is read only at its mapped ranges (its holes are skipped);
//!   reading, hashing and writing run on three threads ([`copy`]), so the write pass goes at
//!   the pace of the slowest of them, which for a card is the card.
//! - After writing, the device's page cache is flushed and dropped and every mapped range is read
//!   back and compared with the bmap checksum (the same engine, without the writer): this
//!   catches a card that claims more room than it has, which wraps writes around and keeps
//!   only the last.
//! - The device is opened exclusively and checked through that descriptor ([`target`]):
//!   refused when mounted in any mount namespace, swap, held by LVM/RAID/dm, under the running
//!   system, smaller than the image, a partition (unless `--allow-partition`) or a regular
//!   file (unless `--allow-file`). The checks run again after the confirmation prompt, right
//!   before the first write.
//! - It asks for confirmation unless `--yes`; without a terminal and without `--yes` it refuses.
//! - A write pass that stops part-way (a device error, a truncated or corrupt image) says that
//!   the device holds part of the image and must be flashed again.
//!
//! The image may be a raw `.img`, or `.img.xz` / `.img.zst` (decompressed as a stream: bmap
//! ranges are in ascending order, so no temporary file is needed). To support another
//! compression, add a reader in [`open_image`].

pub mod bmap;
pub mod copy;
pub mod target;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// The write pass, from the first read of the image to the end of the device's `fsync`.
    pub write_time: Duration,
    /// The read-back, from dropping the device's cached pages to the last range checked.
    pub verify_time: Duration,
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

/// An opened image: a raw one is read at each range's offset, so its holes are skipped; a
/// compressed one is a stream, decompressed through its holes.
pub enum ImageReader {
    Raw(File),
    Stream(Box<dyn Read + Send>),
}

/// Opens an image by its name: `.xz` and `.zst` are decompressed on the fly, anything else
/// is raw.
pub fn open_image(path: &Path) -> Result<ImageReader> {
    let f = File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let name = path.to_string_lossy();
    let compressed = name.ends_with(".xz") || name.ends_with(".zst");
    if !compressed {
        // Ranges are read in ascending order: let the kernel read ahead generously.
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        )
        .with_context(|| format!("advising the kernel on {}", path.display()))?;
        return Ok(ImageReader::Raw(f));
    }
    let f = std::io::BufReader::with_capacity(1 << 20, f);
    Ok(ImageReader::Stream(if name.ends_with(".xz") {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(f))
    } else {
        Box::new(zstd::stream::read::Decoder::with_buffer(f).context("reading zstd header")?)
    }))
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
    let dev = target.file;
    if is_file && target.size < bmap.image_size {
        dev.set_len(bmap.image_size)?;
    }

    write_and_read_back(&bmap, req, &dev)
}

/// The write pass (ending with the device's `fsync`), then the read-back, timed.
fn write_and_read_back(bmap: &Bmap, req: &FlashRequest, dev: &File) -> Result<FlashReport> {
    let started = Instant::now();
    let written = write_ranges(bmap, &req.image, &req.device, dev, req.progress)
        .and_then(|n| {
            dev.sync_all()
                .with_context(|| format!("flushing {}", req.device.display()))?;
            Ok(n)
        })
        .with_context(|| {
            format!(
                "flashing stopped part-way: {} may hold part of the image and will not boot \
                 until it is flashed completely",
                req.device.display()
            )
        })?;
    let write_time = started.elapsed();
    let started = Instant::now();
    // Drop the cached pages so the read-back comes from the device, not from memory.
    nix::fcntl::posix_fadvise(
        dev,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("dropping cached pages of {}", req.device.display()))?;
    let verified = verify_ranges(bmap, &req.device, dev, req.progress)
        .with_context(|| format!("verifying {}", req.device.display()))?;
    Ok(FlashReport {
        written_bytes: written,
        verified_bytes: verified,
        image_size: bmap.image_size,
        write_time,
        verify_time: started.elapsed(),
    })
}

/// Reads the image's mapped ranges, checks their checksums and writes them to `dev`.
fn write_ranges(
    bmap: &Bmap,
    image: &Path,
    device: &Path,
    dev: &File,
    progress: bool,
) -> Result<u64> {
    let raw;
    let source = match open_image(image)? {
        ImageReader::Raw(f) => {
            let len = f.metadata()?.len();
            ensure!(
                len >= bmap.image_size,
                "image {} is shorter than its block map says ({} bytes, the file has {len})",
                image.display(),
                bmap.image_size
            );
            raw = f;
            copy::Source::At(&raw)
        }
        ImageReader::Stream(s) => copy::Source::Stream(s),
    };
    let pb = progress_bar(progress, bmap.mapped_bytes(), "writing");
    let pass = copy::Pass::Write { image, device };
    let written = copy::run(bmap, source, Some(dev), pass, &pb)?;
    pb.finish_and_clear();
    Ok(written)
}

/// Reads every mapped range back from `dev` and checks its checksum.
fn verify_ranges(bmap: &Bmap, device: &Path, dev: &File, progress: bool) -> Result<u64> {
    let pb = progress_bar(progress, bmap.mapped_bytes(), "verifying");
    let pass = copy::Pass::ReadBack { device };
    let verified = copy::run(bmap, copy::Source::At(dev), None, pass, &pb)?;
    pb.finish_and_clear();
    Ok(verified)
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
