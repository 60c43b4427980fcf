//! The cluster agent's persistent join tokens, where and as the real snap keeps them:
//! `$SNAP_DATA/credentials/persistent-cluster-tokens.txt`, one token per line, optionally
//! `token|<unix-expiry>`.
//!
//! From canonical/microk8s-cluster-agent: the launch config's `persistentClusterToken` is
//! appended to this file (`pkg/k8sinit/apply.go` → `AddPersistentClusterToken`,
//! `pkg/snap/snap.go`); `ConsumeClusterToken` (`pkg/snap/snap.go`) checks it first on every join
//! and never consumes from it; `IsValidToken` (`pkg/util/token.go`) reads the file afresh at
//! each check, trims each line and compares the part before `|` (a TTL line is valid until its
//! expiry). So the simulator reads the file at every join too: a token an operator (or a
//! rackseed secret rotation) removes from the file is refused at once, `500 invalid token`, as
//! the real agent answers, and one added is accepted without a restart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `$SNAP_DATA/credentials/persistent-cluster-tokens.txt`.
pub fn persistent_tokens_path(snap_data: &Path) -> PathBuf {
    snap_data.join("credentials/persistent-cluster-tokens.txt")
}

/// Appends `token` as `AppendToken` does (one line; the file created if missing).
pub fn add_persistent_token(snap_data: &Path, token: &str) -> Result<()> {
    let path = persistent_tokens_path(snap_data);
    let dir = path.parent().expect("the path has a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o660)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{token}").with_context(|| format!("appending to {}", path.display()))
}

/// Whether `token` is a valid persistent token right now (`IsValidToken` on the file; a
/// missing or unreadable file holds none).
pub fn is_valid_persistent_token(snap_data: &Path, token: &str, now_s: u64) -> bool {
    let token = token.trim();
    if token.is_empty() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(persistent_tokens_path(snap_data)) else {
        return false;
    };
    for line in text.split('\n') {
        let mut parts = line.trim().splitn(2, '|');
        if parts.next() != Some(token) {
            continue;
        }
        return match parts.next() {
            None => true,
            Some(expiry) => expiry.parse::<u64>().is_ok_and(|e| now_s < e),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_afresh_with_ttl_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let t = "t".repeat(32);
        assert!(
            !is_valid_persistent_token(dir.path(), &t, 0),
            "no file, no token"
        );
        add_persistent_token(dir.path(), &t).unwrap();
        assert!(is_valid_persistent_token(dir.path(), &t, 0));
        assert!(!is_valid_persistent_token(dir.path(), "", 0));
        let path = persistent_tokens_path(dir.path());
        std::fs::write(&path, format!("other\n{t}|100\n")).unwrap();
        assert!(is_valid_persistent_token(dir.path(), &t, 99));
        assert!(!is_valid_persistent_token(dir.path(), &t, 100), "expired");
        std::fs::write(&path, "other\n").unwrap();
        assert!(
            !is_valid_persistent_token(dir.path(), &t, 0),
            "removed: refused at once"
        );
    }
}
