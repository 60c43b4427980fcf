//! The sparse map of an image file (its data ranges, found with `SEEK_DATA`/`SEEK_HOLE`) and a
//! single read over it that yields both the whole-file SHA-256 (holes hashed as zeros, never
//! read) and a SHA-256 per mapped block range, which is what `.bmap` and `SHA256SUMS` need.
//! The two hashes run on two threads over the same buffers ([`digest_image`]).
//!
//! Filesystems without hole reporting make the whole file one data range, which is still
//! correct, only less sparse.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

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

/// Bytes read per step of [`digest_image`].
const CHUNK: usize = 4 << 20;
/// Buffers in flight between the reader and the whole-file hasher (memory: `DEPTH * CHUNK`).
const DEPTH: usize = 4;

/// What the reader hands the whole-file hasher.
enum Piece {
    /// A buffer and how many of its bytes are image data.
    Data(Arc<Vec<u8>>, usize),
    /// A hole of this many bytes (hashed as zeros, never read).
    Zeros(u64),
}

/// Hashes `path` in one read of its mapped ranges: this thread reads each range and hashes it
/// for the bmap while a second thread hashes the same buffers, and the holes as zeros, into
/// the whole-file SHA-256. Holes are never read. Memory stays at `DEPTH` buffers of `CHUNK`
/// bytes, recycled. `cancel` aborts between chunks.
pub fn digest_image(path: &Path, block: u64, cancel: &AtomicBool) -> Result<ImageDigest> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let extents = data_extents(&f, size)?;
    let ranges = block_ranges(&extents, block);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(DEPTH);
    let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(DEPTH);
    std::thread::scope(|s| {
        let whole = s.spawn(move || {
            let mut h = Sha256::new();
            let zeros = vec![0u8; 1 << 20];
            for piece in rx {
                match piece {
                    Piece::Data(buf, n) => {
                        h.update(&buf[..n]);
                        // Capacity DEPTH holds every buffer, so this never blocks.
                        let _ = back_tx.send(buf);
                    }
                    Piece::Zeros(mut n) => {
                        while n > 0 {
                            let k = n.min(zeros.len() as u64) as usize;
                            h.update(&zeros[..k]);
                            n -= k as u64;
                        }
                    }
                }
            }
            hex::encode(h.finalize())
        });
        let per = read_ranges(&f, path, size, &ranges, block, cancel, &tx, &back_rx);
        drop(tx);
        let whole = whole.join().expect("the hashing thread does not panic");
        Ok(ImageDigest {
            size,
            sha256: whole,
            block_size: block,
            ranges: per?,
        })
    })
}

/// The reader side of [`digest_image`]: range hashes, feeding `tx` as it goes.
#[allow(clippy::too_many_arguments)]
fn read_ranges(
    f: &File,
    path: &Path,
    size: u64,
    ranges: &[(u64, u64)],
    block: u64,
    cancel: &AtomicBool,
    tx: &SyncSender<Piece>,
    back: &Receiver<Arc<Vec<u8>>>,
) -> Result<Vec<(u64, u64, String)>> {
    let hasher_gone = || anyhow::anyhow!("the hashing thread stopped");
    let mut free: Vec<Arc<Vec<u8>>> = (0..DEPTH).map(|_| Arc::new(vec![0u8; CHUNK])).collect();
    let mut out = Vec::with_capacity(ranges.len());
    let mut pos = 0u64;
    for &(first, last) in ranges {
        let start = first * block;
        let end = ((last + 1) * block).min(size);
        if start > pos {
            tx.send(Piece::Zeros(start - pos))
                .map_err(|_| hasher_gone())?;
        }
        let mut part = Sha256::new();
        let mut off = start;
        while off < end {
            if cancel.load(Ordering::Relaxed) {
                anyhow::bail!("interrupted");
            }
            let mut buf = match free.pop() {
                Some(b) => b,
                None => back.recv().map_err(|_| hasher_gone())?,
            };
            let n = (end - off).min(CHUNK as u64) as usize;
            let b = Arc::get_mut(&mut buf).expect("a returned buffer is no longer shared");
            f.read_exact_at(&mut b[..n], off)
                .with_context(|| format!("reading {}", path.display()))?;
            tx.send(Piece::Data(Arc::clone(&buf), n))
                .map_err(|_| hasher_gone())?;
            part.update(&buf[..n]);
            off += n as u64;
        }
        out.push((first, last, hex::encode(part.finalize())));
        pos = end;
    }
    if size > pos {
        tx.send(Piece::Zeros(size - pos))
            .map_err(|_| hasher_gone())?;
    }
    Ok(out)
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
    use std::io::{Seek, SeekFrom, Write};

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

    #[test]
    fn digest_recycles_buffers_over_many_chunks_and_hashes_each_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        // Two ranges, each more chunks than there are buffers, with a hole between.
        let a: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..(18u32 << 20) + 123).map(|i| (i % 241) as u8).collect();
        f.write_all(&a).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&b).unwrap();
        drop(f);
        let d = digest_image(&p, 4096, &AtomicBool::new(false)).unwrap();
        assert_eq!(d.sha256, sha256_file(&p).unwrap());
        let data = std::fs::read(&p).unwrap();
        for (first, last, sum) in &d.ranges {
            let (s, e) = (
                (*first * 4096) as usize,
                (((*last + 1) * 4096) as usize).min(data.len()),
            );
            assert_eq!(*sum, hex::encode(Sha256::digest(&data[s..e])));
        }
        let covered: u64 = d.ranges.iter().map(|r| r.1 - r.0 + 1).sum();
        assert!(covered * 4096 >= (38 << 20), "both ranges mapped");
        assert!(digest_image(&p, 4096, &AtomicBool::new(true))
            .unwrap_err()
            .to_string()
            .contains("interrupted"));
    }
}
