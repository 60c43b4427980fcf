//! Atomic state files: write a temporary file beside the target, fsync it, rename it over the
//! target, then fsync the directory. A power cut at any instant leaves either the old or the new
//! content under the final name, never a torn file.
//!
//! Used for the agent's persisted formation phase (`/var/lib/rackseed/state.json`) and anything
//! else that must survive a crash. Reading a corrupt file is an error naming the path, so the
//! caller can decide (the agent refuses to guess and reports it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rackseed_host::fs::write_atomic;
use serde::{de::DeserializeOwned, Serialize};

/// A JSON document stored atomically at one path.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the document; `Ok(None)` when the file does not exist.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match std::fs::read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("parsing state file {}", self.path.display())),
        }
    }

    /// Replaces the document atomically (temp file, fsync, rename, fsync directory).
    pub fn store<T: Serialize>(&self, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).context("serialising state")?;
        write_atomic(&self.path, &bytes, 0o600)
    }

    /// Removes the document (used by `firstboot reset`).
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_load_round_trips_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("sub/state.json"));
        assert_eq!(f.load::<Vec<u32>>().unwrap(), None);
        f.store(&vec![1u32, 2, 3]).unwrap();
        f.store(&vec![4u32]).unwrap();
        assert_eq!(f.load::<Vec<u32>>().unwrap(), Some(vec![4]));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{ torn").unwrap();
        let err = StateFile::new(&path).load::<Vec<u32>>().unwrap_err();
        assert!(format!("{err:#}").contains("state.json"), "{err:#}");
    }
}
