//! Files that must never be seen half-written: [`write_atomic`] writes a temporary file beside
//! the target, fsyncs it, renames it over the target, then fsyncs the directory. A power cut at
//! any instant leaves either the old or the new content under the final name.
//!
//! The temporary file has an unpredictable name and is created exclusively (`O_EXCL`, which
//! also refuses to follow a symlink planted under that name), mode 0600 from its first
//! instant, and gets its final mode before any byte is written: a secret is never readable by
//! others, not even for a moment, whoever else can write to the directory.
//!
//! Folders that hold secrets (the agent's state, backup archives, pulled backups) come from
//! [`create_private_dir`]: mode 0700 and owned by this process's user, or a clear error.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically with exactly the given mode, creating parent
/// directories.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    // Dropped on any error before the rename: the temporary file is removed.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", name.to_string_lossy()))
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let shown = tmp.path().display().to_string();
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {shown}"))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {shown}"))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming {shown} to {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Makes sure `dir` exists and is private: a folder owned by this process's user, mode 0700.
///
/// A missing folder is created 0700, with its missing parents. An existing one that is
/// already 0700 and ours is taken as it is, without a chmod: it may sit on a filesystem
/// mounted read-only, where even a chmod to the mode it already has fails (`EROFS`). An
/// existing one with another mode is made 0700; if that fails, the error names the folder,
/// its mode and why. Something else at the path, or a folder owned by another user, is
/// refused: it would hold secrets where that user can reach them.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if !meta.is_dir() {
        anyhow::bail!("{} exists but is not a folder", dir.display());
    }
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me {
        anyhow::bail!(
            "{} is owned by uid {}, not by this process's user (uid {me}): it would hold \
             secrets where another user can reach them; give it to uid {me} or choose another \
             folder",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    if mode == 0o700 {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "{} is mode {mode:04o}, and making it private (0700) failed; make it 0700 (or \
             mount its filesystem writable) and try again",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_private_folder_is_made_new_or_existing_and_others_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("var/lib/rackseed");
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let me = nix::unistd::Uid::effective().as_raw();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&fresh).unwrap()),
            me
        );
        // Taken again as it is.
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let old = root.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        // Something else at the path, and a folder of another user, are refused untouched.
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = format!("{:#}", create_private_dir(&file).unwrap_err());
        assert!(e.contains("is not a folder"), "{e}");
        assert!(std::fs::metadata(&file).unwrap().is_file());
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        let other = nix::unistd::Uid::from_raw(me + 4242);
        nix::unistd::chown(&theirs, Some(other), None)
            .expect("this test changes a folder's owner: run it as root");
        let e = format!("{:#}", create_private_dir(&theirs).unwrap_err());
        assert!(e.contains(&format!("is owned by uid {}", me + 4242)), "{e}");
        assert_eq!(
            mode(&theirs),
            0o755,
            "another user's folder is not chmod-ed"
        );
    }

    /// A folder on a filesystem mounted read-only (a tmpfs in a mount namespace of this
    /// test's own thread): an existing 0700 folder of ours is used as it is, one with another
    /// mode is an error naming its mode and the cause, a missing one an error naming the
    /// creation. Needs root (mounts); fails loudly without it.
    #[test]
    fn an_existing_private_folder_on_a_read_only_filesystem_is_accepted() {
        use anyhow::Context as _;
        use nix::mount::{mount, MsFlags};
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let result = std::thread::spawn(move || -> Result<(String, String)> {
            // unshare(CLONE_NEWNS) on this thread only: its mounts vanish with it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .context("unshare(CLONE_NEWNS): this test needs root")?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .context("making mounts private")?;
            mount(
                Some("tmpfs"),
                &mnt,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .context("mounting a tmpfs")?;
            let private = mnt.join("state");
            let open = mnt.join("open");
            create_private_dir(&private)?;
            std::fs::create_dir(&open)?;
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755))?;
            mount(
                None::<&str>,
                &mnt,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .context("remounting read-only")?;
            // Read-only indeed: a chmod to the same mode fails here.
            let chmod = std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
                .expect_err("chmod on a read-only filesystem must fail");
            anyhow::ensure!(
                chmod.raw_os_error() == Some(nix::libc::EROFS),
                "chmod failed with {chmod}, not EROFS"
            );
            create_private_dir(&private).context("the existing 0700 folder")?;
            let err = format!("{:#}", create_private_dir(&open).unwrap_err());
            let again = format!("{:#}", create_private_dir(&mnt.join("new")).unwrap_err());
            Ok((err, again))
        })
        .join()
        .unwrap();
        let (err, missing) = result.unwrap();
        assert!(err.contains("is mode 0755"), "{err}");
        assert!(err.contains("making it private (0700) failed"), "{err}");
        assert!(err.contains("Read-only file system"), "{err}");
        assert!(missing.starts_with("creating "), "{missing}");
    }

    #[test]
    fn writes_with_the_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.txt");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path().join("a")).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"old", 0o644).unwrap();
        // A directory under the final name cannot be replaced by a file.
        let target = dir.path().join("d");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"").unwrap();
        assert!(write_atomic(&target, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_planted_symlink_or_file_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The names the old code used (pid-based) and a few more: none is followed.
        for i in 0..8 {
            let planted = dir
                .path()
                .join(format!(".secret.tmp-{}", std::process::id() + i));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        let path = dir.path().join("secret");
        write_atomic(&path, b"s3cret", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask_allows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("public");
        write_atomic(&path, b"x", 0o644).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        write_atomic(&path, b"y", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
