//! The copy engine behind both passes of `flash`: the write pass (image to device) and the
//! read-back (device to nowhere). Each pass has three parties, so no one waits on another:
//!
//! - a reader thread fills chunks of at most [`CHUNK`] bytes, range by range. A raw image
//!   and the device are read at each range's offset (`pread`), so the holes between ranges
//!   are never read; a compressed image is a stream, decompressed through its holes;
//! - a hasher thread computes each range's SHA-256 and compares it with the block map;
//! - the calling thread writes each chunk at its offset (`pwrite`; the write pass) and moves
//!   the progress bar. After each chunk it asks the kernel to start writing it back
//!   ([`Medium::written`]), so the device is busy while the next chunks are read, rather than
//!   idle until the final `fsync`, and the page cache does not fill with the image.
//!
//! The read-back has no writer, and SHA-256 on one core is slower than a fast card reads
//! (SHA-256 of one range cannot be split). When more than one core is available it runs
//! [`LANES`] such pipelines (reader and hasher) at once, each over its own contiguous share of
//! the ranges, about equal in bytes (`split`), so hashing keeps up with the device; every
//! range is still read once and checked against its own checksum.
//!
//! At most [`IN_FLIGHT`] chunks exist at once (pools of buffers, reused; the lanes share
//! them out), so memory stays bounded whatever the image size. The first failure (a read, a
//! checksum, a write) stops every party of every lane and is the error returned; a pass that
//! ends without one has hashed every range.
//! bmaptool's `copy` has the same shape (a reader thread that hashes, a writer), which is
//! what the write pass is measured against (`scripts/bench-flash`). To add a kind of source,
//! add a [`Source`] variant and read it in `read_chunks`.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};

use anyhow::{anyhow, ensure, Result};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::bmap::{Bmap, BmapRange};

/// Bytes per chunk: large enough that a syscall per chunk costs nothing, small enough that a
/// 4 KiB range does not hold a large buffer for long.
pub const CHUNK: usize = 4 << 20;

/// Chunks allocated for a pass (24 MiB, split among the read-back's lanes): enough for the reader to stay ahead of the writer.
pub const IN_FLIGHT: usize = 6;

/// Pipelines of the read-back when the machine has more than one core.
pub const LANES: usize = 2;

/// Something written and read at byte offsets: a block device or a file, or, in tests, a
/// fake card.
pub trait Medium: Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `len` bytes at `offset` were just written: a hint to start writing them out.
    fn written(&self, _offset: u64, _len: u64) {}
}

impl Medium for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn written(&self, offset: u64, len: u64) {
        // POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty pages in the range
        // and drops the clean ones. It is advice: if the kernel declines, the final fsync
        // writes everything anyway, so its result changes nothing and is not reported.
        let _ = nix::fcntl::posix_fadvise(
            self,
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// Where a pass reads the mapped ranges from.
pub enum Source<'a> {
    /// Read at each range's offset: a raw image, or the device on read-back.
    At(&'a dyn Medium),
    /// Read in order, every byte: a decompressing reader.
    Stream(Box<dyn Read + Send>),
}

/// Which pass runs, for its error messages.
#[derive(Clone, Copy)]
pub enum Pass<'a> {
    /// The image is read and its checksums checked; the device is written.
    Write { image: &'a Path, device: &'a Path },
    /// The device is read back and checked.
    ReadBack { device: &'a Path },
}

impl Pass<'_> {
    fn read_error(&self, e: io::Error, offset: u64, bmap: &Bmap) -> anyhow::Error {
        match (self, e.kind()) {
            (Pass::Write { image, .. }, io::ErrorKind::UnexpectedEof) => anyhow!(
                "image {} is shorter than its block map says ({} bytes)",
                image.display(),
                bmap.image_size
            ),
            (Pass::Write { image, .. }, _) => {
                anyhow!("reading image {} at byte {offset}: {e}", image.display())
            }
            (Pass::ReadBack { device }, _) => {
                anyhow!("reading back {} at byte {offset}: {e}", device.display())
            }
        }
    }

    fn mismatch(&self, r: &BmapRange, got: &str) -> anyhow::Error {
        match self {
            Pass::Write { image, .. } => anyhow!(
                "image {} blocks {}-{}: checksum {got} does not match the block map's {}; \
                 the image is corrupt",
                image.display(),
                r.first,
                r.last,
                r.sha256
            ),
            Pass::ReadBack { .. } => anyhow!(
                "read-back of blocks {}-{} gives {got}, expected {}; the device did not keep \
                 what was written (a card smaller than it claims, or failing)",
                r.first,
                r.last,
                r.sha256
            ),
        }
    }

    fn write_error(&self, e: io::Error, offset: u64) -> anyhow::Error {
        let device = match self {
            Pass::Write { device, .. } | Pass::ReadBack { device } => device,
        };
        anyhow!("writing {} at byte {offset}: {e}", device.display())
    }
}

/// A filled buffer; it goes back to the pool when both the hasher and the writer dropped it.
struct Chunk {
    range: usize,
    offset: u64,
    len: usize,
    /// The last chunk of its range.
    last: bool,
    buf: Vec<u8>,
    pool: mpsc::Sender<Vec<u8>>,
}

impl Chunk {
    fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // The pool is gone only when the pass is over, and then the buffer is not needed.
        let _ = self.pool.send(std::mem::take(&mut self.buf));
    }
}

/// The first failure of a pass, and the flag that stops its parties.
#[derive(Default)]
struct Failure {
    first: Mutex<Option<anyhow::Error>>,
    stop: AtomicBool,
}

impl Failure {
    fn set(&self, e: anyhow::Error) {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Runs one pass over every mapped range of `bmap`: reads them from `source`, checks each
/// range's SHA-256 and, when `sink` is given, writes them to it at their offsets. Returns the
/// mapped bytes, or the first failure.
pub fn run(
    bmap: &Bmap,
    source: Source<'_>,
    sink: Option<&dyn Medium>,
    pass: Pass<'_>,
    pb: &ProgressBar,
) -> Result<u64> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_lanes(bmap, source, sink, pass, pb, cores.min(LANES))
}

/// [`run`] with at most `lanes` pipelines; more than one only for a read-back at offsets
/// (a stream is read in order, and the write pass keeps the device's writes in order).
fn run_lanes(
    bmap: &Bmap,
    source: Source<'_>,
    sink: Option<&dyn Medium>,
    pass: Pass<'_>,
    pb: &ProgressBar,
    lanes: usize,
) -> Result<u64> {
    let failure = Failure::default();
    match (source, sink) {
        (Source::At(medium), None) if lanes > 1 => {
            let shares = split(bmap, lanes);
            let per_lane = (IN_FLIGHT / shares.len()).max(2);
            std::thread::scope(|s| {
                for share in &shares {
                    let failure = &failure;
                    s.spawn(move || {
                        let lane = Lane {
                            bmap,
                            ranges: share.clone(),
                            buffers: per_lane,
                        };
                        lane.run(Source::At(medium), None, pass, failure, pb);
                    });
                }
            });
        }
        (source, sink) => {
            let lane = Lane {
                bmap,
                ranges: 0..bmap.ranges.len(),
                buffers: IN_FLIGHT,
            };
            lane.run(source, sink, pass, &failure, pb);
        }
    }
    match failure
        .first
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        Some(e) => Err(e),
        None => Ok(bmap.mapped_bytes()),
    }
}

/// Splits the ranges of `bmap` into at most `lanes` contiguous shares of about equal bytes,
/// none empty, together every range once and in order.
fn split(bmap: &Bmap, lanes: usize) -> Vec<std::ops::Range<usize>> {
    let total = bmap.mapped_bytes();
    let mut shares = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, r) in bmap.ranges.iter().enumerate() {
        bytes += r.end - r.start;
        // Share k ends once the bytes so far reach k/lanes of the total.
        let k = shares.len() as u64 + 1;
        if k < lanes as u64 && bytes * lanes as u64 >= total * k {
            shares.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < bmap.ranges.len() {
        shares.push(start..bmap.ranges.len());
    }
    shares
}

/// One pipeline: a reader, a hasher and the writer over a contiguous share of the ranges.
struct Lane<'a> {
    bmap: &'a Bmap,
    ranges: std::ops::Range<usize>,
    buffers: usize,
}

impl Lane<'_> {
    /// Runs the pipeline; its failure, if any, is recorded in `failure`.
    fn run(
        &self,
        source: Source<'_>,
        sink: Option<&dyn Medium>,
        pass: Pass<'_>,
        failure: &Failure,
        pb: &ProgressBar,
    ) {
        let (pool_tx, pool_rx) = mpsc::channel();
        for _ in 0..self.buffers {
            // The receiver is alive: it is right here.
            let _ = pool_tx.send(vec![0u8; CHUNK]);
        }
        let (hash_tx, hash_rx) = mpsc::channel::<Arc<Chunk>>();
        let (sink_tx, sink_rx) = mpsc::channel::<Arc<Chunk>>();
        std::thread::scope(|s| {
            s.spawn(move || {
                let out = Outputs {
                    pool_tx,
                    pool_rx,
                    hash_tx,
                    sink_tx,
                };
                if let Err(e) = read_chunks(self, source, &out, pass, failure) {
                    failure.set(e);
                }
                // Only now, with any failure recorded, the consumers see the end of the chunks.
                drop(out);
            });
            s.spawn(move || {
                if let Err(e) = hash_chunks(self, hash_rx, pass, failure) {
                    failure.set(e);
                }
            });
            if let Err(e) = write_chunks(sink_rx, sink, pass, failure, pb) {
                failure.set(e);
            }
        });
    }
}

/// The reader's channels: buffers come from the pool and go, filled, to both consumers.
struct Outputs {
    pool_tx: mpsc::Sender<Vec<u8>>,
    pool_rx: mpsc::Receiver<Vec<u8>>,
    hash_tx: mpsc::Sender<Arc<Chunk>>,
    sink_tx: mpsc::Sender<Arc<Chunk>>,
}

/// The reader: fills chunks from `source` in range order. Returns early, without an error,
/// when another party failed (it recorded why).
fn read_chunks(
    lane: &Lane<'_>,
    mut source: Source<'_>,
    out: &Outputs,
    pass: Pass<'_>,
    failure: &Failure,
) -> Result<()> {
    let bmap = lane.bmap;
    let mut pos = 0u64;
    for i in lane.ranges.clone() {
        let r = &bmap.ranges[i];
        let mut offset = r.start;
        while offset < r.end {
            // The pool holds a buffer again once the consumers dropped a chunk; its sender
            // lives in `out`, so this waits rather than fails.
            let Ok(mut buf) = out.pool_rx.recv() else {
                return Ok(());
            };
            if failure.stopped() {
                return Ok(());
            }
            let len = (r.end - offset).min(CHUNK as u64) as usize;
            match &mut source {
                Source::At(medium) => medium.read_exact_at(&mut buf[..len], offset),
                Source::Stream(stream) => skip_to(stream, &mut pos, offset, &mut buf)
                    .and_then(|()| stream.read_exact(&mut buf[..len])),
            }
            .map_err(|e| pass.read_error(e, offset, bmap))?;
            pos = offset + len as u64;
            let chunk = Arc::new(Chunk {
                range: i,
                offset,
                len,
                last: pos == r.end,
                buf,
                pool: out.pool_tx.clone(),
            });
            offset = pos;
            if out.hash_tx.send(Arc::clone(&chunk)).is_err() || out.sink_tx.send(chunk).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The writer (the calling thread): writes each chunk to `sink`, if any, and counts it.
fn write_chunks(
    chunks: mpsc::Receiver<Arc<Chunk>>,
    sink: Option<&dyn Medium>,
    pass: Pass<'_>,
    failure: &Failure,
    pb: &ProgressBar,
) -> Result<()> {
    for chunk in chunks {
        if failure.stopped() {
            break;
        }
        if let Some(dev) = sink {
            dev.write_all_at(chunk.data(), chunk.offset)
                .map_err(|e| pass.write_error(e, chunk.offset))?;
            dev.written(chunk.offset, chunk.len as u64);
        }
        pb.inc(chunk.len as u64);
    }
    Ok(())
}

/// Reads and discards a stream's bytes from `pos` up to `offset` (a hole of a compressed
/// image), using `scratch` as the buffer.
fn skip_to(
    stream: &mut Box<dyn Read + Send>,
    pos: &mut u64,
    offset: u64,
    scratch: &mut [u8],
) -> io::Result<()> {
    while *pos < offset {
        let want = (offset - *pos).min(scratch.len() as u64) as usize;
        let n = stream.read(&mut scratch[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        *pos += n as u64;
    }
    Ok(())
}

/// The hasher: checks every range's SHA-256 as its chunks arrive.
fn hash_chunks(
    lane: &Lane<'_>,
    chunks: mpsc::Receiver<Arc<Chunk>>,
    pass: Pass<'_>,
    failure: &Failure,
) -> Result<()> {
    let bmap = lane.bmap;
    let mut hasher = Sha256::new();
    let mut checked = 0usize;
    for chunk in chunks {
        if failure.stopped() {
            return Ok(());
        }
        hasher.update(chunk.data());
        if chunk.last {
            let r = &bmap.ranges[chunk.range];
            let got = hex::encode(hasher.finalize_reset());
            if got != r.sha256 {
                return Err(pass.mismatch(r, &got));
            }
            checked += 1;
        }
    }
    // The reader stops early only after a failure, which is then the error of the pass.
    ensure!(
        failure.stopped() || checked == lane.ranges.len(),
        "internal error: {checked} of {} ranges were checked",
        lane.ranges.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// An in-memory device that records every read.
    struct MemDevice {
        data: Mutex<Vec<u8>>,
        reads: Mutex<Vec<(u64, usize)>>,
    }

    impl MemDevice {
        fn new(data: Vec<u8>) -> MemDevice {
            MemDevice {
                data: Mutex::new(data),
                reads: Mutex::new(Vec::new()),
            }
        }
        fn bytes(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    impl Medium for MemDevice {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.lock().unwrap().push((offset, buf.len()));
            let data = self.data.lock().unwrap();
            let end = offset as usize + buf.len();
            if end > data.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.copy_from_slice(&data[offset as usize..end]);
            Ok(())
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut data = self.data.lock().unwrap();
            let end = offset as usize + buf.len();
            if end > data.len() {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            data[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
    }

    /// A fake card that claims `claimed` bytes but keeps `real`: writes and reads wrap around
    /// (what counterfeit cards do), so a later block overwrites an earlier one silently.
    struct WrappingCard {
        inner: MemDevice,
        real: u64,
    }

    impl WrappingCard {
        /// Splits `len` bytes at `offset` into the pieces that land at wrapped offsets:
        /// (wrapped offset, start in the buffer, length).
        fn pieces(&self, offset: u64, len: usize) -> Vec<(u64, usize, usize)> {
            let mut out = Vec::new();
            let mut done = 0usize;
            while done < len {
                let at = (offset + done as u64) % self.real;
                let n = ((self.real - at) as usize).min(len - done);
                out.push((at, done, n));
                done += n;
            }
            out
        }
    }

    impl Medium for WrappingCard {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            for (at, from, n) in self.pieces(offset, buf.len()) {
                self.inner.read_exact_at(&mut buf[from..from + n], at)?;
            }
            Ok(())
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            for (at, from, n) in self.pieces(offset, buf.len()) {
                self.inner.write_all_at(&buf[from..from + n], at)?;
            }
            Ok(())
        }
    }

    /// A device that fails with EIO once `limit` bytes were written (a card pulled out).
    struct FailingDevice {
        inner: MemDevice,
        limit: u64,
        written: Mutex<u64>,
    }

    impl Medium for FailingDevice {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut written = self.written.lock().unwrap();
            if *written + buf.len() as u64 > self.limit {
                return Err(io::Error::from_raw_os_error(nix::libc::EIO));
            }
            *written += buf.len() as u64;
            self.inner.write_all_at(buf, offset)
        }
    }

    const BLOCK: u64 = 4096;

    /// An image with a different byte in each block, holes included (they must not be read nor
    /// written), and a bmap of `ranges` (inclusive block numbers) with true checksums.
    fn image_and_bmap(size: usize, ranges: &[(u64, u64)]) -> (Vec<u8>, Bmap) {
        let mut image = vec![0u8; size];
        for (i, block) in image.chunks_mut(BLOCK as usize).enumerate() {
            block.fill((i * 7 % 251) as u8 + 1);
        }
        let mut xml = format!(
            "<bmap version=\"2.0\"><ImageSize>{size}</ImageSize><BlockSize>{BLOCK}</BlockSize>\
             <BlocksCount>{}</BlocksCount><ChecksumType>sha256</ChecksumType><BlockMap>",
            (size as u64).div_ceil(BLOCK)
        );
        for (first, last) in ranges {
            let start = (first * BLOCK) as usize;
            let end = (((last + 1) * BLOCK) as usize).min(size);
            let sum = hex::encode(Sha256::digest(&image[start..end]));
            xml.push_str(&format!("<Range chksum=\"{sum}\">{first}-{last}</Range>"));
        }
        xml.push_str("</BlockMap></bmap>");
        (image, Bmap::parse(&xml).unwrap())
    }

    /// Ranges: a single block, one spanning three chunks, and the clipped last block.
    const SIZE: usize = 24 << 20;
    fn ranges() -> Vec<(u64, u64)> {
        let last = (SIZE as u64).div_ceil(BLOCK) - 1;
        vec![
            (1, 1),
            (10, 10 + 2 * CHUNK as u64 / BLOCK + 5),
            (last - 3, last),
        ]
    }

    fn paths() -> (PathBuf, PathBuf) {
        ("img".into(), "/dev/fake".into())
    }

    fn write_pass<'a>(image: &'a Path, device: &'a Path) -> Pass<'a> {
        Pass::Write { image, device }
    }

    /// What the device must hold: the mapped ranges of `image`, zeros elsewhere.
    fn expected(image: &[u8], bmap: &Bmap) -> Vec<u8> {
        let mut want = vec![0u8; image.len()];
        for r in &bmap.ranges {
            want[r.start as usize..r.end as usize]
                .copy_from_slice(&image[r.start as usize..r.end as usize]);
        }
        want
    }

    #[test]
    fn writes_only_mapped_ranges_and_reads_no_hole() {
        let (image, bmap) = image_and_bmap(SIZE - 1000, &ranges());
        let src = MemDevice::new(image.clone());
        let dev = MemDevice::new(vec![0u8; image.len()]);
        let (img, device) = paths();
        let pb = ProgressBar::hidden();
        let n = run(
            &bmap,
            Source::At(&src),
            Some(&dev),
            write_pass(&img, &device),
            &pb,
        )
        .unwrap();
        assert_eq!(n, bmap.mapped_bytes());
        assert_eq!(pb.position(), bmap.mapped_bytes());
        assert!(dev.bytes() == expected(&image, &bmap));
        // Every byte read lies in a mapped range, and each mapped byte was read once.
        let reads = src.reads.lock().unwrap().clone();
        let read_total: u64 = reads.iter().map(|(_, n)| *n as u64).sum();
        assert_eq!(read_total, bmap.mapped_bytes());
        for (off, len) in reads {
            assert!(
                bmap.ranges
                    .iter()
                    .any(|r| off >= r.start && off + len as u64 <= r.end),
                "read {len} bytes at {off}: outside every mapped range"
            );
            assert!(len <= CHUNK);
        }
        // The read-back of the same device passes.
        let verified = run(
            &bmap,
            Source::At(&dev),
            None,
            Pass::ReadBack { device: &device },
            &pb,
        )
        .unwrap();
        assert_eq!(verified, bmap.mapped_bytes());
    }

    #[test]
    fn a_stream_source_is_read_through_its_holes_to_the_same_result() {
        let (image, bmap) = image_and_bmap(SIZE, &ranges());
        let dev = MemDevice::new(vec![0u8; image.len()]);
        let (img, device) = paths();
        let stream: Box<dyn Read + Send> = Box::new(io::Cursor::new(image.clone()));
        run(
            &bmap,
            Source::Stream(stream),
            Some(&dev),
            write_pass(&img, &device),
            &ProgressBar::hidden(),
        )
        .unwrap();
        assert!(dev.bytes() == expected(&image, &bmap));
    }

    #[test]
    fn a_corrupt_image_is_caught_naming_its_blocks() {
        let (mut image, bmap) = image_and_bmap(SIZE, &ranges());
        // Flip a byte in the first chunk of the large range.
        image[10 * BLOCK as usize + 100] ^= 0xff;
        let src = MemDevice::new(image.clone());
        let dev = MemDevice::new(vec![0u8; image.len()]);
        let (img, device) = paths();
        let e = run(
            &bmap,
            Source::At(&src),
            Some(&dev),
            write_pass(&img, &device),
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        let r = &bmap.ranges[1];
        let msg = format!("{e:#}");
        assert!(msg.contains("image is corrupt"), "{msg}");
        assert!(
            msg.contains(&format!("blocks {}-{}", r.first, r.last)),
            "{msg}"
        );
    }

    #[test]
    fn a_card_smaller_than_it_claims_is_caught_by_the_read_back() {
        let (image, bmap) = image_and_bmap(SIZE, &ranges());
        // It keeps 16 MiB and wraps the rest: the last range lands on the large one.
        let card = WrappingCard {
            inner: MemDevice::new(vec![0u8; 16 << 20]),
            real: 16 << 20,
        };
        let src = MemDevice::new(image);
        let (img, device) = paths();
        let pb = ProgressBar::hidden();
        run(
            &bmap,
            Source::At(&src),
            Some(&card),
            write_pass(&img, &device),
            &pb,
        )
        .expect("the write pass cannot see the lie");
        let e = run(
            &bmap,
            Source::At(&card),
            None,
            Pass::ReadBack { device: &device },
            &pb,
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("did not keep what was written"), "{msg}");
        let r = &bmap.ranges[1];
        assert!(
            msg.contains(&format!("blocks {}-{}", r.first, r.last)),
            "{msg}"
        );
    }

    #[test]
    fn lanes_share_the_ranges_in_order_about_equally() {
        let (_, bmap) = image_and_bmap(SIZE, &ranges());
        assert_eq!(split(&bmap, 1), vec![0..3]);
        // The large range is about all the bytes: it ends the first share.
        assert_eq!(split(&bmap, 2), vec![0..2, 2..3]);
        // Eight equal ranges in four shares of two.
        let eight: Vec<(u64, u64)> = (0..8).map(|i| (i * 10, i * 10 + 3)).collect();
        let (_, bmap) = image_and_bmap(SIZE, &eight);
        assert_eq!(split(&bmap, 4), vec![0..2, 2..4, 4..6, 6..8]);
        // Never more shares than ranges, none empty.
        assert_eq!(split(&bmap, 16).len(), 8);
    }

    #[test]
    fn a_read_back_in_two_lanes_reads_every_range_once_and_catches_a_lying_card() {
        let eight: Vec<(u64, u64)> = (0..8).map(|i| (i * 700, i * 700 + 600)).collect();
        let (image, bmap) = image_and_bmap(SIZE, &eight);
        let dev = MemDevice::new(expected(&image, &bmap));
        let (_, device) = paths();
        let pb = ProgressBar::hidden();
        let pass = Pass::ReadBack { device: &device };
        let n = run_lanes(&bmap, Source::At(&dev), None, pass, &pb, 2).unwrap();
        assert_eq!(n, bmap.mapped_bytes());
        assert_eq!(pb.position(), bmap.mapped_bytes());
        let mut reads = dev.reads.lock().unwrap().clone();
        reads.sort();
        let total: u64 = reads.iter().map(|(_, n)| *n as u64).sum();
        assert_eq!(total, bmap.mapped_bytes());
        assert!(reads.windows(2).all(|w| w[0].0 + w[0].1 as u64 <= w[1].0));
        // A card that keeps 16 MiB: the ranges past it (the second lane's) wrap onto the
        // first lane's, so whichever lane reads a clobbered range first reports it.
        let card = WrappingCard {
            inner: MemDevice::new(vec![0u8; 16 << 20]),
            real: 16 << 20,
        };
        let (img, _) = paths();
        run(
            &bmap,
            Source::At(&MemDevice::new(image)),
            Some(&card),
            write_pass(&img, &device),
            &pb,
        )
        .unwrap();
        let e = run_lanes(&bmap, Source::At(&card), None, pass, &pb, 2).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("did not keep what was written"), "{msg}");
        // A bad byte in the last range alone (the second lane's) is caught and named.
        let mut bytes = dev.bytes();
        let r = &bmap.ranges[7];
        bytes[r.end as usize - 1] ^= 0xff;
        let e = run_lanes(
            &bmap,
            Source::At(&MemDevice::new(bytes)),
            None,
            pass,
            &pb,
            2,
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("blocks {}-{}", r.first, r.last)),
            "{msg}"
        );
    }

    #[test]
    fn a_device_error_mid_write_names_the_device_and_offset() {
        let (image, bmap) = image_and_bmap(SIZE, &ranges());
        let dev = FailingDevice {
            inner: MemDevice::new(vec![0u8; image.len()]),
            limit: 5 << 20,
            written: Mutex::new(0),
        };
        let src = MemDevice::new(image);
        let (img, device) = paths();
        let e = run(
            &bmap,
            Source::At(&src),
            Some(&dev),
            write_pass(&img, &device),
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        // Block 1 (4 KiB) and the first 4 MiB chunk fit; the second chunk does not.
        let at = 10 * BLOCK + CHUNK as u64;
        assert!(
            msg.starts_with(&format!("writing /dev/fake at byte {at}:")),
            "{msg}"
        );
        assert!(msg.contains("Input/output error"), "{msg}");
    }

    #[test]
    fn a_truncated_stream_is_an_image_too_short() {
        let (image, bmap) = image_and_bmap(SIZE, &ranges());
        let dev = MemDevice::new(vec![0u8; image.len()]);
        let (img, device) = paths();
        let cut: Box<dyn Read + Send> = Box::new(io::Cursor::new(image[..SIZE - 3000].to_vec()));
        let e = run(
            &bmap,
            Source::Stream(cut),
            Some(&dev),
            write_pass(&img, &device),
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("image img is shorter than its block map says"),
            "{e:#}"
        );
        // A stream that ends inside a hole, before the next range starts.
        let cut: Box<dyn Read + Send> = Box::new(io::Cursor::new(image[..5 * 4096].to_vec()));
        let e = run(
            &bmap,
            Source::Stream(cut),
            Some(&dev),
            write_pass(&img, &device),
            &ProgressBar::hidden(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("shorter"), "{e:#}");
    }
}
