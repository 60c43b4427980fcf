//! The sparse map of an image file (its data ranges, found with `SEEK_DATA`/`SEEK_HOLE`) and a
//! single pass over it that yields both the whole-file SHA-256 (holes hashed as zeros) and a
//! SHA-256 per mapped block range, which is what `.bmap` and `SHA256SUMS` need.
//!
//! Filesystems without hole reporting make the whole file one data range, which is still
//! correct, only less sparse.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};

/// A byte range `[start, end)` holding data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
}

/// Data extents of `file`, in order, merged, clipped to `len`.
pub fn data_extents(file: &File, len: u64) -> Result<Vec<Extent>> {
    let fd = file.as_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let len_i = i64::try_from(len).context("image too large")?;
    while pos < len_i {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                // No hole reporting: everything left is data.
                out.push(Extent {
                    start: pos as u64,
                    end: len,
                });
                return Ok(out);
            }
            Err(e) => return Err(e).context("seeking data in image"),
        };
        let end = match lseek(fd, start, Whence::SeekHole) {
            Ok(e) => e.min(len_i),
            Err(e) => return Err(e).context("seeking hole in image"),
        };
        if end > start {
            out.push(Extent {
                start: start as u64,
                end: end as u64,
            });
        }
        pos = end;
    }
    Ok(out)
}

/// Block ranges (inclusive, in units of `block`) covering `extents`, merging ranges that touch.
pub fn block_ranges(extents: &[Extent], block: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        let first = e.start / block;
        let last = (e.end - 1) / block;
        match out.last_mut() {
            Some((_, l)) if first <= *l + 1 => *l = (*l).max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// What one pass over an image yields.
#[derive(Debug, Clone)]
pub struct ImageDigest {
    pub size: u64,
    pub sha256: String,
    pub block_size: u64,
    /// Inclusive block ranges with the SHA-256 of their bytes (last block clipped to `size`).
    pub ranges: Vec<(u64, u64, String)>,
}

/// Hashes `path`: per mapped range and as a whole, on two threads (each reads the data once
/// more from the page cache; hashing, not reading, is the cost). `cancel` aborts between chunks.
pub fn digest_image(path: &Path, block: u64, cancel: &AtomicBool) -> Result<ImageDigest> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let extents = data_extents(&f, size)?;
    let ranges = block_ranges(&extents, block);
    let (whole, per) = std::thread::scope(|s| {
        let whole = s.spawn(|| whole_hash(path, size, &ranges, block, cancel));
        let per = range_hashes(path, size, &ranges, block, cancel);
        (
            whole.join().expect("the hashing thread does not panic"),
            per,
        )
    });
    Ok(ImageDigest {
        size,
        sha256: whole?,
        block_size: block,
        ranges: per?,
    })
}

fn read_into(
    f: &mut File,
    path: &Path,
    start: u64,
    end: u64,
    buf: &mut [u8],
    cancel: &AtomicBool,
    sinks: &mut [&mut Sha256],
) -> Result<()> {
    f.seek(SeekFrom::Start(start))?;
    let mut left = end - start;
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", path.display()))?;
        for h in sinks.iter_mut() {
            h.update(&buf[..n]);
        }
        left -= n as u64;
    }
    Ok(())
}

fn whole_hash(
    path: &Path,
    size: u64,
    ranges: &[(u64, u64)],
    block: u64,
    cancel: &AtomicBool,
) -> Result<String> {
    let mut f = File::open(path)?;
    let mut whole = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    for &(first, last) in ranges {
        let start = first * block;
        let end = ((last + 1) * block).min(size);
        feed_zeros(&mut whole, &zeros, start - pos, cancel)?;
        read_into(
            &mut f,
            path,
            start,
            end,
            &mut buf,
            cancel,
            &mut [&mut whole],
        )?;
        pos = end;
    }
    feed_zeros(&mut whole, &zeros, size - pos, cancel)?;
    Ok(hex::encode(whole.finalize()))
}

fn range_hashes(
    path: &Path,
    size: u64,
    ranges: &[(u64, u64)],
    block: u64,
    cancel: &AtomicBool,
) -> Result<Vec<(u64, u64, String)>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(ranges.len());
    for &(first, last) in ranges {
        let mut part = Sha256::new();
        read_into(
            &mut f,
            path,
            first * block,
            ((last + 1) * block).min(size),
            &mut buf,
            cancel,
            &mut [&mut part],
        )?;
        out.push((first, last, hex::encode(part.finalize())));
    }
    Ok(out)
}

fn feed_zeros(h: &mut Sha256, zeros: &[u8], mut n: u64, cancel: &AtomicBool) -> Result<()> {
    while n > 0 {
        if cancel.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        let k = n.min(zeros.len() as u64) as usize;
        h.update(&zeros[..k]);
        n -= k as u64;
    }
    Ok(())
}

/// SHA-256 of a whole file, streaming.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn ranges_merge_touching_extents_and_round_to_blocks() {
        let ex = [
            Extent { start: 0, end: 10 },
            Extent {
                start: 4096,
                end: 8192,
            },
            Extent {
                start: 20000,
                end: 20001,
            },
        ];
        assert_eq!(block_ranges(&ex, 4096), vec![(0, 1), (4, 4)]);
    }

    #[test]
    fn digest_of_sparse_file_matches_plain_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(10 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        f.seek(SeekFrom::Start((10 << 20) - 100)).unwrap();
        f.write_all(&[9u8; 100]).unwrap();
        drop(f);
        let d = digest_image(&p, 4096, &AtomicBool::new(false)).unwrap();
        assert_eq!(d.sha256, sha256_file(&p).unwrap());
        assert_eq!(d.size, 10 << 20);
        assert!(d.ranges.iter().any(|r| r.0 == (3 << 20) / 4096));
        let mapped: u64 = d.ranges.iter().map(|r| r.1 - r.0 + 1).sum();
        assert!(
            mapped < 10,
            "the file is mostly holes, mapped {mapped} blocks"
        );
    }
}
