//! The one way the simulator writes a state file: [`write_atomic`], through a temporary file in
//! the same folder and a rename, so a reader (the CLI, the agent, the soak's checks) sees the
//! old content or the new one, never a half-written file.
//!
//! The temporary name carries the file's own name, this process's id and a per-process
//! counter (`.<name>.<pid>.<n>.tmp`), so no two writers share one: not two files of one
//! install (the key and the certificate once shared `server.tmp`), not two processes writing
//! the same file (two `snap install`s that overlapped on a slow VM renamed each other's
//! `installed.json.tmp`: "renaming …: No such file"), not two tasks of the daemon. Appends to
//! the JSON-lines logs (`commands.jsonl`, `requests.jsonl`) stay appends: one `write` of one
//! line each, which `O_APPEND` keeps whole.
//!
//! To add a state file: write it with [`write_atomic`] (or [`write_json`]) and the mode its
//! real counterpart has (0600 for anything holding a token or a key).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::Serialize;

/// Temporary files made by this process so far (part of each temporary name).
static TEMPS: AtomicU64 = AtomicU64::new(0);

/// The temporary name for a write of `path`: unique per file, process and write.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMPS.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` with `mode`: a new temporary file (mode set, never widened by
/// the umask's absence), synced, then renamed over `path`. On failure the temporary file is
/// removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_path(path);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes `value` as pretty JSON with [`write_atomic`], mode 0600 (the simulator's state files
/// hold the persistent join token and the cluster's view).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(value).with_context(|| format!("encoding {}", path.display()))?;
    write_atomic(path, &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_differ_per_file_and_per_write_and_carry_the_pid() {
        let a = temp_path(Path::new("/x/installed.json"));
        let b = temp_path(Path::new("/x/installed.json"));
        let c = temp_path(Path::new("/x/state.json"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        let pid = std::process::id().to_string();
        for p in [&a, &b, &c] {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with('.') && name.ends_with(".tmp"), "{name}");
            assert!(name.contains(&pid), "{name}");
        }
    }

    #[test]
    fn concurrent_writers_of_one_file_never_lose_a_rename_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("installed.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for k in 0..50 {
                        write_json(&path, &serde_json::json!({ "writer": i, "k": k })).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["k"], 49, "{v}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["installed.json".to_string()]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old", 0o600).unwrap();
        // A folder in the way of the rename.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        assert!(write_atomic(&blocked, b"new", 0o600).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let temps = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().ends_with(".tmp")
            })
            .count();
        assert_eq!(temps, 0);
    }
}
