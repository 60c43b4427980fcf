//! `microk8s dbctl backup` / `restore`: MicroK8s' own datastore backup ([`Datastore`]).
//!
//! What this relies on, read from canonical/microk8s `scripts/wrappers/dbctl.py` (with
//! `microk8s-resources/wrappers/microk8s-dbctl.wrapper`, which only checks root and runs it)
//! and canonical/k8s-dqlite `pkg/migrator/migrator.go`, `pkg/migrator/util.go` and
//! `cmd/migrator.go`:
//! - `microk8s dbctl backup -o NAME` writes `NAME.tar.gz` (a given `.tar.gz` suffix is stripped
//!   and added back; the path may be absolute: `tarfile.open(fname_tar)` takes it as given and
//!   the folder inside is `os.path.basename` of it). Inside: one folder `NAME/` with `<i>.key`
//!   and `<i>.data` files, every kine key under `/` (`client.List(ctx, "/", 0)`) and its
//!   value. Success prints "The backup is: NAME.tar.gz", exit 0; a migrator failure exits 1
//!   ("Backup process failed. N"), a `CalledProcessError` exit 2;
//! - both commands exit 1 on a worker (`is_cluster_locked`: "…acting as a node in a
//!   cluster.\nPlease use the master node.") and 10 when `kine.sock` or the ha-cluster lock is
//!   missing ("Please ensure the kubernetes apiserver is running and HA is enabled.");
//! - `microk8s dbctl restore FILE` extracts the tarball and restores from the folder named
//!   after FILE's base name without `.tar.gz`: **a renamed archive restores nothing and exits
//!   0** (the migrator stops at the first missing `0.key` and logs "completed database
//!   restore" entries=0). So the archive is restored only under its original name, in a
//!   private folder of its own, and the `entries=` count is compared with the manifest's;
//! - each key is created, or overwritten when it exists (`putKey`: Create, then up to 5 Puts);
//!   keys not in the backup are **not deleted**; a key that fails is only logged
//!   (`level=error msg="failed to restore key" … key=K`) and restore still exits 0; the
//!   migrator logs through logrus on stderr, which `run_command` does not capture, so those
//!   lines reach our stderr. Restore therefore reads stderr for failed keys and reports them
//!   ([`RestoreOutcome::failed`]) instead of trusting the exit code. Failures exit 3 (migrator)
//!   or 4.
//! - MicroK8s #4259/#4308 report near-empty backups since 1.27: the caller compares key counts
//!   and sizes with the previous backup (`firstboot::backup`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;

use rackseed_host::command::Cmd;

use super::{detail, refused_on_worker, Microk8sError};

/// How long `dbctl backup` may take (a large datastore is listed and written key by key).
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long `dbctl restore` may take.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// `entries=` of "completed database restore": keys read from the archive.
    pub entries: u64,
    /// Keys logged as "failed to restore key".
    pub failed: Vec<String>,
}

/// The datastore's backup and restore. Object safe.
pub trait Datastore: Send + Sync {
    /// `microk8s dbctl backup -o DIR/NAME`: returns the path of `DIR/NAME.tar.gz`.
    fn backup<'a>(
        &'a self,
        dir: &'a Path,
        name: &'a str,
    ) -> BoxFuture<'a, Result<PathBuf, Microk8sError>>;
    /// `microk8s dbctl restore ARCHIVE` (ARCHIVE must be `NAME.tar.gz` holding `NAME/`).
    fn restore<'a>(
        &'a self,
        archive: &'a Path,
    ) -> BoxFuture<'a, Result<RestoreOutcome, Microk8sError>>;
}

/// [`Datastore`] through the `microk8s` CLI.
#[derive(Debug, Clone)]
pub struct RealDatastore {
    binary: PathBuf,
}

impl RealDatastore {
    pub fn new(binary: &Path) -> Self {
        RealDatastore {
            binary: binary.to_path_buf(),
        }
    }
}

fn refusal(command: &str, out: &rackseed_host::command::Output) -> Microk8sError {
    if refused_on_worker(out) || out.stdout.contains("Please use the master node") {
        return Microk8sError::WorkerNode {
            command: command.into(),
        };
    }
    if out.code() == Some(10) {
        return Microk8sError::NotRunning {
            command: command.into(),
            detail: detail(out),
        };
    }
    Microk8sError::Failed {
        command: command.into(),
        code: out.code(),
        detail: detail(out),
    }
}

/// Reads the migrator's log lines: `(entries, failed keys)`; `entries` is `None` when the
/// "completed database restore" line is missing.
pub fn parse_restore_log(stderr: &str) -> (Option<u64>, Vec<String>) {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        Some(match rest.strip_prefix('"') {
            Some(q) => q.split('"').next().unwrap_or_default().to_owned(),
            None => rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        })
    };
    let mut entries = None;
    let mut failed = Vec::new();
    for line in stderr.lines() {
        if line.contains("msg=\"completed database restore\"") {
            entries = field(line, "entries").and_then(|e| e.parse().ok());
        } else if line.contains("msg=\"failed to restore key\"") {
            failed.push(field(line, "key").unwrap_or_else(|| "<unnamed key>".into()));
        }
    }
    (entries, failed)
}

impl Datastore for RealDatastore {
    fn backup<'a>(
        &'a self,
        dir: &'a Path,
        name: &'a str,
    ) -> BoxFuture<'a, Result<PathBuf, Microk8sError>> {
        Box::pin(async move {
            let target = dir.join(name);
            let command = "microk8s dbctl backup";
            let out = Cmd::new(&self.binary, BACKUP_TIMEOUT)
                .args(["dbctl", "backup", "-o"])
                .arg(&target)
                .current_dir(dir)
                .output()
                .await?;
            if out.code() != Some(0) {
                return Err(refusal(command, &out));
            }
            let archive = dir.join(format!("{name}.tar.gz"));
            if !out.stdout.contains("The backup is:") || !archive.is_file() {
                return Err(Microk8sError::Failed {
                    command: command.into(),
                    code: out.code(),
                    detail: format!(
                        "it exited 0 but {} was not written: {}",
                        archive.display(),
                        detail(&out)
                    ),
                });
            }
            Ok(archive)
        })
    }

    fn restore<'a>(
        &'a self,
        archive: &'a Path,
    ) -> BoxFuture<'a, Result<RestoreOutcome, Microk8sError>> {
        Box::pin(async move {
            let command = "microk8s dbctl restore";
            let mut cmd = Cmd::new(&self.binary, RESTORE_TIMEOUT)
                .args(["dbctl", "restore"])
                .arg(archive);
            if let Some(dir) = archive.parent() {
                cmd = cmd.current_dir(dir);
            }
            let out = cmd.output().await?;
            if out.code() != Some(0) {
                return Err(refusal(command, &out));
            }
            let (entries, failed) = parse_restore_log(&out.stderr);
            let entries = entries.ok_or_else(|| Microk8sError::Failed {
                command: command.into(),
                code: out.code(),
                detail: format!(
                    "it exited 0 without reporting a completed restore: {}",
                    detail(&out)
                ),
            })?;
            Ok(RestoreOutcome { entries, failed })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrator_log_gives_entries_and_failed_keys() {
        let log = "time=\"2026-12-07T05:00:00Z\" level=error msg=\"failed to restore key\" index=3 key=/registry/pods/default/x\n\
                   time=\"2026-12-07T05:00:00Z\" level=info msg=\"completed database restore\" entries=7\n";
        let (entries, failed) = parse_restore_log(log);
        assert_eq!(entries, Some(7));
        assert_eq!(failed, vec!["/registry/pods/default/x".to_string()]);
        let quoted =
            "time=1 level=error msg=\"failed to restore key\" index=0 key=\"/a b\" error=\"x\"\n";
        assert_eq!(parse_restore_log(quoted).1, vec!["/a b".to_string()]);
        assert_eq!(parse_restore_log("nothing").0, None);
    }
}
