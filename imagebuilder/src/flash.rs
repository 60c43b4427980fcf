//! `imagebuilder flash IMAGE DEVICE`: write an image to an SD card, USB stick or disk safely.
//!
//! - Only the blocks listed in the image's `.bmap` (bmaptool's format, version 2.x) are written,
//!   and each range is checked against the bmap's SHA-256 while it is read from the image, so a
//!   corrupt image is caught before the device is trusted with it.
//! - After writing, the device's page cache is flushed and dropped and every mapped range is read
//!   back and compared with the bmap checksum.
//! - Refused: a device that is mounted (itself or any partition, or used as swap), a device
//!   that holds the running system (the disk under `/`), a device smaller than the image, and a
//!   target that is neither a block device nor a regular file.
//! - It asks for confirmation unless `--yes`; without a terminal and without `--yes` it refuses.
//!
//! The image may be a raw `.img`, or `.img.xz` / `.img.zst` (decompressed as a stream: bmap
//! ranges are in ascending order, so no temporary file is needed). To support another
//! compression, add a reader in [`open_image`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// One mapped range of blocks, inclusive, with the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

/// A parsed `.bmap` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub blocks_count: u64,
    pub ranges: Vec<BmapRange>,
}

impl Bmap {
    /// Parses bmaptool's XML format (version 2.x, sha256 checksums).
    pub fn parse(xml: &str) -> Result<Bmap> {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut path: Vec<String> = Vec::new();
        let mut fields = std::collections::BTreeMap::<String, String>::new();
        let mut ranges = Vec::new();
        let mut range_sum: Option<String> = None;
        let mut version_ok = false;
        loop {
            match reader.read_event().context("bmap: malformed XML")? {
                Event::Start(e) => {
                    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                    for a in e.attributes() {
                        let a = a.context("bmap: malformed attribute")?;
                        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                        let val = a.unescape_value().context("bmap: attribute")?.into_owned();
                        if name == "bmap" && key == "version" {
                            ensure!(
                                val.starts_with("2."),
                                "bmap: version {val} is not supported (2.x expected)"
                            );
                            version_ok = true;
                        }
                        if name == "Range" && key == "chksum" {
                            range_sum = Some(val);
                        }
                    }
                    path.push(name);
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Text(t) => {
                    let text = t.decode().context("bmap: text")?.trim().to_owned();
                    if text.is_empty() {
                        continue;
                    }
                    match path.last().map(String::as_str) {
                        Some("Range") => {
                            let sum = range_sum
                                .take()
                                .context("bmap: a Range has no chksum attribute")?;
                            let (a, b) = text.split_once('-').unwrap_or((&text, &text));
                            let first: u64 = a.trim().parse().context("bmap: Range start")?;
                            let last: u64 = b.trim().parse().context("bmap: Range end")?;
                            ensure!(first <= last, "bmap: Range {text} is reversed");
                            ranges.push(BmapRange {
                                first,
                                last,
                                sha256: sum,
                            });
                        }
                        Some(name) => {
                            fields.insert(name.to_owned(), text);
                        }
                        None => {}
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        ensure!(version_ok, "bmap: missing <bmap version=\"2.x\">");
        let num = |k: &str| -> Result<u64> {
            fields
                .get(k)
                .with_context(|| format!("bmap: missing <{k}>"))?
                .parse()
                .with_context(|| format!("bmap: <{k}> is not a number"))
        };
        let checksum_type = fields.get("ChecksumType").map(String::as_str);
        ensure!(
            checksum_type == Some("sha256"),
            "bmap: checksum type {checksum_type:?} is not supported (sha256 expected)"
        );
        let bmap = Bmap {
            image_size: num("ImageSize")?,
            block_size: num("BlockSize")?,
            blocks_count: num("BlocksCount")?,
            ranges,
        };
        ensure!(bmap.block_size > 0, "bmap: BlockSize is 0");
        let mut prev_end = None;
        for r in &bmap.ranges {
            ensure!(
                r.last < bmap.blocks_count,
                "bmap: range {}-{} beyond BlocksCount {}",
                r.first,
                r.last,
                bmap.blocks_count
            );
            ensure!(
                prev_end.is_none_or(|p| r.first > p),
                "bmap: ranges overlap or are out of order at {}",
                r.first
            );
            prev_end = Some(r.last);
        }
        Ok(bmap)
    }

    /// Byte span of a range, clipped to the image size (the last block may be partial).
    fn span(&self, r: &BmapRange) -> (u64, u64) {
        let start = r.first * self.block_size;
        let end = ((r.last + 1) * self.block_size).min(self.image_size);
        (start, end)
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| {
                let (s, e) = self.span(r);
                e - s
            })
            .sum()
    }
}

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

/// Why a target device is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{device} is mounted at {mountpoint} ({source_dev}); unmount it first")]
    Mounted {
        device: String,
        source_dev: String,
        mountpoint: String,
    },
    #[error("{device} is in use as swap ({source_dev}); swapoff it first")]
    Swap { device: String, source_dev: String },
    #[error("{device} holds the running system (the disk under /); refusing to overwrite it")]
    RunningSystem { device: String },
    #[error("{device} is in use by {holder} (device-mapper/LVM/RAID); release it first")]
    Held { device: String, holder: String },
    #[error("{device} is {device_size} bytes, smaller than the image ({image_size} bytes)")]
    TooSmall {
        device: String,
        device_size: u64,
        image_size: u64,
    },
    #[error("{device} is neither a block device nor a regular file")]
    NotADevice { device: String },
}

/// Block-device facts read from the running system; a trait so the checks are testable.
pub trait BlockInfo {
    /// Mount table lines as in `/proc/self/mounts`.
    fn mounts(&self) -> String;
    /// `/proc/swaps`.
    fn swaps(&self) -> String;
    /// `(major, minor)` of a block device node, `None` if not a block device.
    fn rdev(&self, path: &Path) -> Option<(u64, u64)>;
    /// `(major, minor)` of the device holding the filesystem at `path`.
    fn dev_of(&self, path: &Path) -> Option<(u64, u64)>;
    /// The whole-disk `(major, minor)` for a partition or disk `(major, minor)`.
    fn disk_of(&self, dev: (u64, u64)) -> (u64, u64);
    /// Kernel names of devices holding this one (dm, md).
    fn holders(&self, dev: (u64, u64)) -> Vec<String>;
}

/// [`BlockInfo`] from `/proc` and `/sys`.
#[derive(Debug, Default)]
pub struct SystemBlockInfo;

fn split_dev(d: u64) -> (u64, u64) {
    (nix::sys::stat::major(d), nix::sys::stat::minor(d))
}

impl BlockInfo for SystemBlockInfo {
    fn mounts(&self) -> String {
        std::fs::read_to_string("/proc/self/mounts").unwrap_or_default()
    }
    fn swaps(&self) -> String {
        std::fs::read_to_string("/proc/swaps").unwrap_or_default()
    }
    fn rdev(&self, path: &Path) -> Option<(u64, u64)> {
        let m = std::fs::metadata(path).ok()?;
        m.file_type().is_block_device().then(|| split_dev(m.rdev()))
    }
    fn dev_of(&self, path: &Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|m| split_dev(m.dev()))
    }
    fn disk_of(&self, dev: (u64, u64)) -> (u64, u64) {
        // /sys/dev/block/M:m is a symlink into .../block/<disk>/<part>; a partition has a
        // `partition` file and its parent directory is the disk.
        let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
        if sys.join("partition").exists() {
            if let Ok(text) = std::fs::read_to_string(sys.join("../dev")) {
                if let Some((a, b)) = text.trim().split_once(':') {
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        return (a, b);
                    }
                }
            }
        }
        dev
    }
    fn holders(&self, dev: (u64, u64)) -> Vec<String> {
        let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
        let mut out = Vec::new();
        let mut dirs = vec![sys.join("holders")];
        // Partitions' holders count for the disk too.
        if let Ok(entries) = std::fs::read_dir(&sys) {
            for e in entries.flatten() {
                if e.path().join("partition").exists() {
                    dirs.push(e.path().join("holders"));
                }
            }
        }
        for d in dirs {
            if let Ok(entries) = std::fs::read_dir(d) {
                out.extend(
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into()),
                );
            }
        }
        out
    }
}

/// Checks a target device against the refusal rules. `image_size` is the bytes it must hold.
pub fn check_target(
    info: &dyn BlockInfo,
    device: &Path,
    device_size: u64,
    image_size: u64,
) -> Result<(), Refusal> {
    let shown = device.display().to_string();
    let Some(target) = info.rdev(device) else {
        return match std::fs::metadata(device) {
            Ok(m) if m.file_type().is_file() => Ok(()),
            _ => Err(Refusal::NotADevice { device: shown }),
        };
    };
    let target_disk = info.disk_of(target);
    let same_disk = |source: &str| -> bool {
        info.rdev(Path::new(source))
            .map(|d| d == target || info.disk_of(d) == target_disk || d == target_disk)
            .unwrap_or(false)
    };
    for line in info.mounts().lines() {
        let mut parts = line.split_whitespace();
        let (Some(source), Some(mountpoint)) = (parts.next(), parts.next()) else {
            continue;
        };
        if source.starts_with('/') && same_disk(source) {
            return Err(Refusal::Mounted {
                device: shown,
                source_dev: source.into(),
                mountpoint: mountpoint.replace("\\040", " "),
            });
        }
    }
    for line in info.swaps().lines().skip(1) {
        if let Some(source) = line.split_whitespace().next() {
            if source.starts_with('/') && same_disk(source) {
                return Err(Refusal::Swap {
                    device: shown,
                    source_dev: source.into(),
                });
            }
        }
    }
    if let Some(root) = info.dev_of(Path::new("/")) {
        if info.disk_of(root) == target_disk {
            return Err(Refusal::RunningSystem { device: shown });
        }
    }
    if let Some(holder) = info.holders(target_disk).into_iter().next() {
        return Err(Refusal::Held {
            device: shown,
            holder,
        });
    }
    if device_size < image_size {
        return Err(Refusal::TooSmall {
            device: shown,
            device_size,
            image_size,
        });
    }
    Ok(())
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
    let bmap_text = std::fs::read_to_string(&bmap_path).with_context(|| {
        format!(
            "reading block map {} (written by `imagebuilder build` next to the image)",
            bmap_path.display()
        )
    })?;
    let bmap =
        Bmap::parse(&bmap_text).with_context(|| format!("parsing {}", bmap_path.display()))?;

    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&req.device)
        .with_context(|| format!("opening {}", req.device.display()))?;
    let meta = dev.metadata()?;
    let is_file = meta.file_type().is_file();
    let device_size = if is_file {
        // A regular file grows to hold the image.
        bmap.image_size.max(meta.len())
    } else {
        dev.seek(SeekFrom::End(0))
            .with_context(|| format!("sizing {}", req.device.display()))?
    };
    check_target(info, &req.device, device_size, bmap.image_size)?;
    if !req.yes
        && !rackseed_host::terminal::confirm(&format!(
            "This overwrites {} ({} bytes) with {} ({} bytes, {} mapped).",
            req.device.display(),
            device_size,
            req.image.display(),
            bmap.image_size,
            bmap.mapped_bytes()
        ))?
    {
        bail!("not confirmed; {} was not touched", req.device.display());
    }
    if is_file && meta.len() < bmap.image_size {
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
        let (start, end) = bmap.span(r);
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
        let (start, end) = bmap.span(r);
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

    const SAMPLE: &str = r#"<?xml version="1.0" ?>
<bmap version="2.0">
    <ImageSize> 10000 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 3 </BlocksCount>
    <MappedBlocksCount> 2 </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> 0000 </BmapFileChecksum>
    <BlockMap>
        <Range chksum="aa"> 0 </Range>
        <Range chksum="bb"> 2-2 </Range>
    </BlockMap>
</bmap>"#;

    #[test]
    fn parses_bmaptool_format_and_clips_the_last_block() {
        let b = Bmap::parse(SAMPLE).unwrap();
        assert_eq!(b.image_size, 10000);
        assert_eq!(b.ranges.len(), 2);
        assert_eq!(b.span(&b.ranges[1]), (8192, 10000));
        assert_eq!(b.mapped_bytes(), 4096 + 1808);
    }

    #[test]
    fn rejects_bad_bmaps_with_reasons() {
        let e = Bmap::parse(&SAMPLE.replace("version=\"2.0\"", "version=\"1.4\"")).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = Bmap::parse(&SAMPLE.replace("2-2", "2-9")).unwrap_err();
        assert!(e.to_string().contains("beyond BlocksCount"), "{e}");
        let e =
            Bmap::parse(&SAMPLE.replace("<Range chksum=\"bb\"> 2-2", "<Range chksum=\"bb\"> 0-0"))
                .unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        assert!(Bmap::parse("<bmap").is_err());
    }

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

    /// A fake system: one disk 8:0 with partitions 8:1, 8:2; root on 9:0.
    struct FakeInfo {
        mounts: &'static str,
        swaps: &'static str,
        root: (u64, u64),
        holders: Vec<String>,
    }

    impl BlockInfo for FakeInfo {
        fn mounts(&self) -> String {
            self.mounts.into()
        }
        fn swaps(&self) -> String {
            self.swaps.into()
        }
        fn rdev(&self, path: &Path) -> Option<(u64, u64)> {
            match path.to_str()? {
                "/dev/sdb" => Some((8, 0)),
                "/dev/sdb1" => Some((8, 1)),
                "/dev/sdb2" => Some((8, 2)),
                "/dev/vda1" => Some((9, 1)),
                _ => None,
            }
        }
        fn dev_of(&self, _: &Path) -> Option<(u64, u64)> {
            Some(self.root)
        }
        fn disk_of(&self, d: (u64, u64)) -> (u64, u64) {
            (d.0, 0)
        }
        fn holders(&self, _: (u64, u64)) -> Vec<String> {
            self.holders.clone()
        }
    }

    fn fake() -> FakeInfo {
        FakeInfo {
            mounts: "/dev/vda1 / ext4 rw 0 0\nproc /proc proc rw 0 0\n",
            swaps: "Filename Type Size Used Priority\n",
            root: (9, 1),
            holders: vec![],
        }
    }

    #[test]
    fn refusals() {
        let dev = Path::new("/dev/sdb");
        assert_eq!(check_target(&fake(), dev, 100, 50), Ok(()));
        let f = FakeInfo {
            mounts: "/dev/sdb2 /media/my\\040card vfat rw 0 0\n",
            ..fake()
        };
        assert!(matches!(
            check_target(&f, dev, 100, 50),
            Err(Refusal::Mounted { ref mountpoint, .. }) if mountpoint == "/media/my card"
        ));
        let f = FakeInfo {
            swaps: "Filename Type Size Used Priority\n/dev/sdb1 partition 1 0 -2\n",
            ..fake()
        };
        assert!(matches!(
            check_target(&f, dev, 100, 50),
            Err(Refusal::Swap { .. })
        ));
        let f = FakeInfo {
            root: (8, 2),
            mounts: "",
            ..fake()
        };
        assert!(matches!(
            check_target(&f, dev, 100, 50),
            Err(Refusal::RunningSystem { .. })
        ));
        let f = FakeInfo {
            holders: vec!["dm-0".into()],
            ..fake()
        };
        assert!(matches!(
            check_target(&f, dev, 100, 50),
            Err(Refusal::Held { .. })
        ));
        assert!(matches!(
            check_target(&fake(), dev, 10, 50),
            Err(Refusal::TooSmall { .. })
        ));
        assert!(matches!(
            check_target(&fake(), Path::new("/nonexistent/dev"), 100, 50),
            Err(Refusal::NotADevice { .. })
        ));
    }
}
