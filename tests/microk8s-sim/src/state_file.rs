//! The one way the simulator writes a state file: [`write_atomic`], through a temporary file in
//! the same folder and a rename, so a reader (the CLI, the agent, the soak's checks) sees the
//! old content or the new one, never a half-written file.
//!
//! It is the project's own [`rackseed_host::fs::write_atomic`]: its temporary file has an
//! unpredictable name created exclusively beside the target, so no two writers share one: not
//! two files of one install (the key and the certificate once shared `server.tmp`), not two
//! processes writing the same file (two `snap install`s that overlapped on a slow VM renamed
//! each other's `installed.json.tmp`: "renaming …: No such file"), not two tasks of the
//! daemon. Appends to the JSON-lines logs (`commands.jsonl`, `requests.jsonl`) stay appends:
//! one `write` of one line each, which `O_APPEND` keeps whole.
//!
//! To add a state file: write it with [`write_atomic`] (or [`write_json`]) and the mode its
//! real counterpart has (0600 for anything holding a token or a key).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Writes `bytes` to `path` with `mode`: a new temporary file, synced, then renamed over
/// `path` ([`rackseed_host::fs::write_atomic`]). On failure `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    rackseed_host::fs::write_atomic(path, bytes, mode)
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
    use std::os::unix::fs::PermissionsExt;

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
        // Nothing but the two files and the folder: no temporary file left, whatever its name.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["blocked".to_string(), "state.json".to_string()]);
    }
}
