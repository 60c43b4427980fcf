//! Base (a): an official image fetched by URL and verified against its SHA-256.
//!
//! The verified file is cached as `<cache>/images/<sha256>`; a later build with the same hash
//! uses it without touching the network (and re-verifies it). A transfer in progress lives in
//! `<sha256>.partial`; a broken transfer resumes from its length with an HTTP `Range` request
//! (a server that ignores the range makes it start over). A hash mismatch deletes the partial
//! file and names both hashes: nothing unverified is ever kept. Progress is an indicatif bar
//! on stderr when requested.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How many times a broken transfer is resumed before giving up.
pub const ATTEMPTS: u32 = 5;

/// Verifies that `sha256` is 64 hex digits; returns it lower-cased.
pub fn normalise_sha256(sha256: &str) -> Result<String> {
    let s = sha256.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{sha256:?} is not a SHA-256 (64 hex digits)");
    }
    Ok(s)
}

/// Hashes `path` and compares; the error names both hashes.
pub fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let expected = normalise_sha256(expected)?;
    let got = crate::outputs::sparse::sha256_file(path)?;
    if got != expected {
        bail!(
            "sha256 mismatch for {}: expected {expected}, got {got}",
            path.display()
        );
    }
    Ok(())
}

/// Returns the verified cached copy of `url`, downloading (and resuming) as needed.
pub async fn fetch(url: &str, sha256: &str, cache: &Path, progress: bool) -> Result<PathBuf> {
    let sha = normalise_sha256(sha256)?;
    let dir = cache.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let done = dir.join(&sha);
    if done.is_file() {
        match verify_file(&done, &sha) {
            Ok(()) => return Ok(done),
            Err(_) => {
                // A damaged cache entry is dropped and fetched again.
                std::fs::remove_file(&done)?;
            }
        }
    }
    let partial = dir.join(format!("{sha}.partial"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .build()
        .context("creating the HTTP client")?;
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message(format!("downloading {url}"));
        b
    });
    let mut last_err = None;
    for attempt in 1..=ATTEMPTS {
        match transfer(&client, url, &partial, bar.as_ref()).await {
            Ok(()) => {
                last_err = None;
                break;
            }
            Err(e) => {
                tracing::warn!("download of {url} broke (attempt {attempt}/{ATTEMPTS}): {e:#}");
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = last_err {
        // The partial file stays for a later resume; it is never used unverified.
        return Err(e.context(format!(
            "downloading {url} failed after {ATTEMPTS} attempts"
        )));
    }
    let got = crate::outputs::sparse::sha256_file(&partial)?;
    if got != sha {
        let _ = std::fs::remove_file(&partial);
        bail!("sha256 mismatch for {url}: expected {sha}, got {got}; the download was deleted");
    }
    std::fs::rename(&partial, &done).with_context(|| format!("storing {}", done.display()))?;
    Ok(done)
}

/// One HTTP transfer into `partial`, resuming from its current length.
async fn transfer(
    client: &reqwest::Client,
    url: &str,
    partial: &Path,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req
        .send()
        .await
        .with_context(|| format!("requesting {url}"))?;
    let status = resp.status();
    let mut file = if status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0 {
        OpenOptions::new().append(true).open(partial)?
    } else if status.is_success() {
        File::create(partial)?
    } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        // Already complete (or longer than the server's file): verification decides.
        return Ok(());
    } else {
        bail!("{url} answered {status}");
    };
    let start = file.metadata()?.len();
    if let Some(b) = bar {
        if let Some(len) = resp.content_length() {
            b.set_length(start + len);
        }
        b.set_position(start);
    }
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("reading {url}"))?
    {
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", partial.display()))?;
        if let Some(b) = bar {
            b.inc(chunk.len() as u64);
        }
    }
    file.sync_all()?;
    Ok(())
}

/// Hashes the first bytes of a file for format detection.
pub fn magic(path: &Path) -> Result<[u8; 8]> {
    let mut m = [0u8; 8];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut m)?;
    if n < 8 {
        bail!("{} is too short to be an image ({n} bytes)", path.display());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn sha_must_be_hex64() {
        assert!(normalise_sha256("abc").is_err());
        assert_eq!(normalise_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
    }

    #[test]
    fn verify_names_both_hashes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let e = verify_file(&p, &"0".repeat(64)).unwrap_err().to_string();
        assert!(
            e.contains(&"0".repeat(64)) && e.contains(&hex::encode(Sha256::digest(b"x"))),
            "{e}"
        );
    }
}
