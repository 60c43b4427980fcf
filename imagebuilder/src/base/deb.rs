//! Rewrites a downloaded `.deb` so its files are stored uncompressed (`data.tar` instead of
//! `data.tar.xz` or `data.tar.zst`), with this machine's own decoder.
//!
//! Why: a foreign-architecture bootstrap runs dpkg under user-mode emulation, and dpkg
//! decompresses every package's files with the emulated `dpkg-deb` (the arm64 kernel package
//! alone, 59 MB of xz, took 76 s emulated on a loaded 2-core machine against about 2 s
//! natively). Decompressed here, between debootstrap's stages, the emulated dpkg only copies.
//! The files, control data and checksums inside are unchanged; dpkg reads an uncompressed
//! `data.tar` member since dpkg 1.10 (deb(5): "data.tar", optionally compressed).
//!
//! The format (deb(5), ar(5)): the global header `!<arch>\n`, then members, each a 60-byte
//! header (name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic `` `\n ``) and its data
//! padded to an even length with `\n`; the members are `debian-binary`, `control.tar[.*]`,
//! `data.tar[.*]` in that order. Names may end in `/` (GNU ar) or spaces (dpkg).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"!<arch>\n";
const HEADER: usize = 60;

/// One member header.
struct Member {
    name: String,
    raw: [u8; HEADER],
    size: u64,
}

fn read_header(r: &mut impl Read) -> Result<Option<Member>> {
    let mut raw = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut raw[got..])?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("truncated ar member header");
        }
        got += n;
    }
    if &raw[58..60] != b"`\n" {
        bail!("not an ar member header");
    }
    let name = String::from_utf8_lossy(&raw[..16])
        .trim_end()
        .trim_end_matches('/')
        .to_string();
    let size: u64 = std::str::from_utf8(&raw[48..58])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .context("bad ar member size")?;
    Ok(Some(Member { name, raw, size }))
}

/// The header of `m` renamed to `name` with `size` bytes.
fn header_for(m: &Member, name: &str, size: u64) -> Result<[u8; HEADER]> {
    let size = size.to_string();
    if name.len() > 16 || size.len() > 10 {
        bail!("ar member {name} of {size} bytes does not fit an ar header");
    }
    let mut h = m.raw;
    h[..16].copy_from_slice(format!("{name:<16}").as_bytes());
    h[48..58].copy_from_slice(format!("{size:<10}").as_bytes());
    Ok(h)
}

/// How a `data.tar.*` member is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Xz,
    Zstd,
}

/// Rewrites the `.deb` at `path` in place (atomically: a temporary file in the same folder,
/// renamed over it) with an uncompressed `data.tar`. Returns `false`, leaving the file as it
/// was, when its data is already uncompressed or compressed with another codec (gzip, bzip2).
pub fn store_data_uncompressed(path: &Path) -> Result<bool> {
    let what = || format!("rewriting {}", path.display());
    let mut r = BufReader::new(File::open(path).with_context(what)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).with_context(what)?;
    if &magic != MAGIC {
        bail!("{} is not a .deb (no ar header)", path.display());
    }
    let dir = path.parent().context("a .deb path has a folder")?;
    let tmp = tempfile::Builder::new()
        .prefix(".uncompressed-")
        .tempfile_in(dir)
        .with_context(what)?;
    let mut w = BufWriter::new(tmp.as_file().try_clone()?);
    w.write_all(MAGIC)?;
    let mut changed = false;
    while let Some(m) = read_header(&mut r).with_context(what)? {
        let padded = m.size + (m.size & 1);
        let codec = match m.name.as_str() {
            "data.tar.xz" => Some(Codec::Xz),
            "data.tar.zst" => Some(Codec::Zstd),
            _ => None,
        };
        let Some(codec) = codec else {
            if m.name.starts_with("data.tar") && m.name != "data.tar" {
                return Ok(false);
            }
            w.write_all(&m.raw)?;
            let copied = std::io::copy(&mut (&mut r).take(padded), &mut w)?;
            if copied != padded {
                bail!("{}: member {} is truncated", path.display(), m.name);
            }
            continue;
        };
        w.flush()?;
        let mut out = tmp.as_file().try_clone()?;
        let header_at = out.stream_position()?;
        out.write_all(&[0u8; HEADER])?;
        let mut member = (&mut r).take(m.size);
        let mut sink = BufWriter::new(&mut out);
        let decoded = match codec {
            Codec::Xz => std::io::copy(&mut liblzma::read::XzDecoder::new(&mut member), &mut sink),
            Codec::Zstd => zstd::stream::read::Decoder::new(&mut member)
                .and_then(|mut d| std::io::copy(&mut d, &mut sink)),
        };
        let written =
            decoded.with_context(|| format!("{}: decoding {}", path.display(), m.name))?;
        // Whatever the decoder left of the member (stream padding) is not data.
        std::io::copy(&mut member, &mut std::io::sink())?;
        if written & 1 == 1 {
            sink.write_all(b"\n")?;
        }
        sink.flush()?;
        drop(sink);
        // The padding byte of the compressed member, if any.
        if m.size & 1 == 1 {
            let mut pad = [0u8; 1];
            r.read_exact(&mut pad)?;
        }
        let end = out.stream_position()?;
        out.seek(SeekFrom::Start(header_at))?;
        out.write_all(&header_for(&m, "data.tar", written)?)?;
        out.seek(SeekFrom::Start(end))?;
        w = BufWriter::new(out);
        changed = true;
    }
    w.flush()?;
    drop(w);
    if !changed {
        return Ok(false);
    }
    let mode = std::fs::metadata(path)?.permissions();
    std::fs::set_permissions(tmp.path(), mode)?;
    tmp.persist(path).with_context(what)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Builds a small package with dpkg-deb (the real format), compressed with `z`.
    fn build_deb(dir: &Path, z: &str) -> std::path::PathBuf {
        let root = dir.join(format!("pkg-{z}"));
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/share/t")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: x <x@example.org>\n\
             Description: test\n",
        )
        .unwrap();
        // Odd-sized contents, so the padding paths run.
        std::fs::write(root.join("usr/share/t/a"), "hello\n").unwrap();
        std::fs::write(root.join("usr/share/t/b"), vec![7u8; 12_345]).unwrap();
        let deb = dir.join(format!("t-{z}.deb"));
        let out = rackseed_host::command::Cmd::new("dpkg-deb", Duration::from_secs(60))
            .arg(format!("-Z{z}"))
            .args(["--root-owner-group", "-b"])
            .arg(&root)
            .arg(&deb)
            .output_blocking()
            .unwrap();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        deb
    }

    fn dpkg_deb(args: &[&str], deb: &Path) -> String {
        let out = rackseed_host::command::Cmd::new("dpkg-deb", Duration::from_secs(60))
            .args(args)
            .arg(deb)
            .output_blocking()
            .unwrap();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        out.stdout
    }

    #[test]
    fn xz_and_zstd_packages_keep_their_files_and_control_uncompressed() {
        let d = tempfile::tempdir().unwrap();
        for z in ["xz", "zstd"] {
            let deb = build_deb(d.path(), z);
            let before = dpkg_deb(&["--contents"], &deb);
            let control = dpkg_deb(&["--field"], &deb);
            assert!(store_data_uncompressed(&deb).unwrap(), "{z}");
            assert_eq!(dpkg_deb(&["--contents"], &deb), before, "{z}");
            assert_eq!(dpkg_deb(&["--field"], &deb), control, "{z}");
            let x = d.path().join(format!("x-{z}"));
            let out = rackseed_host::command::Cmd::new("dpkg-deb", Duration::from_secs(60))
                .arg("-x")
                .arg(&deb)
                .arg(&x)
                .output_blocking()
                .unwrap();
            assert_eq!(out.code(), Some(0), "{}", out.stderr);
            assert_eq!(
                std::fs::read(x.join("usr/share/t/b")).unwrap(),
                vec![7u8; 12_345]
            );
            let bytes = std::fs::read(&deb).unwrap();
            assert!(
                bytes.windows(16).any(|w| w == b"data.tar        "),
                "{z}: no plain data.tar member"
            );
            // Already uncompressed: nothing to do, the file stays as it is.
            assert!(!store_data_uncompressed(&deb).unwrap());
            assert_eq!(std::fs::read(&deb).unwrap(), bytes);
        }
    }

    #[test]
    fn gzip_packages_are_left_alone_and_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let deb = build_deb(d.path(), "gzip");
        let bytes = std::fs::read(&deb).unwrap();
        assert!(!store_data_uncompressed(&deb).unwrap());
        assert_eq!(std::fs::read(&deb).unwrap(), bytes);
        let bad = d.path().join("bad.deb");
        std::fs::write(&bad, b"not a package").unwrap();
        let e = store_data_uncompressed(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.deb"), "{e}");
        assert_eq!(std::fs::read(&bad).unwrap(), b"not a package");
        // Nothing left behind in the folder but the packages and their build trees.
        for e in std::fs::read_dir(d.path()).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(!n.starts_with(".uncompressed-"), "{n} left behind");
        }
    }
}
