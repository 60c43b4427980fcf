//! `microk8s dbctl`: backup and restore of the datastore, as MicroK8s does them.
//!
//! What MicroK8s does (read from canonical/microk8s `scripts/wrappers/dbctl.py` and
//! `microk8s-resources/wrappers/microk8s-dbctl.wrapper`, and canonical/k8s-dqlite
//! `pkg/migrator/migrator.go`, `pkg/migrator/util.go`, `cmd/migrator.go`):
//! - usage `microk8s dbctl [--debug] backup [-o FILE]` / `microk8s dbctl [--debug] restore FILE`
//!   (argparse: errors exit 2 with `usage:` on stderr; no subcommand prints the help, exit 0);
//! - first `is_cluster_locked()`: on a worker "This MicroK8s deployment is acting as a node in a
//!   cluster.\nPlease use the master node." exit 1; then without `kine.sock` or the ha-cluster
//!   lock "Please ensure the kubernetes apiserver is running and HA is enabled." exit 10;
//! - backup: the name defaults to `backup-YYYY-MM-DD-HH-MM-SS` (local time); a `.tar.gz`
//!   suffix is stripped and added back; `k8s-dqlite migrator --mode backup-dqlite` lists every
//!   key under `/` and writes `<i>.key`/`<i>.data` (0640) into a folder named after the
//!   backup's base name (0700), which is tarred (gzip) to `NAME.tar.gz` relative to the
//!   current directory; prints "The backup is: NAME.tar.gz". A migrator failure (no dqlite
//!   leader) prints "Backup process failed. 1" and exits 1;
//! - restore: opens the tarball (a damaged one raises a Python exception: traceback, exit 1),
//!   refuses path traversal ("Attempted Path Traversal in Tar File"), extracts, and restores
//!   from the folder named after the file's base name: if the tarball was renamed that folder
//!   does not exist and the migrator restores **nothing and exits 0** ("completed database
//!   restore" entries=0). Each key is created, or overwritten when it exists; keys absent from
//!   the backup are **not deleted**; a key that fails is only logged (`level=error msg="failed
//!   to restore key"`) and restore still exits 0. Migrator logs go to stderr (logrus).
//!
//! The simulator's kine keys: the API's objects (`datastore`: `/registry/configmaps/<ns>/<name>`,
//! read with a quorum read, written through the leader), plus what the replicated view holds
//! that Kubernetes keeps in kine: `/registry/minions/<node>` (the Node: name, address, labels)
//! and `/registry/microk8s-sim/addons/<addon>` (and `/registry/microk8s-sim/<field>/<key>` for
//! any other map the view holds). Membership (dqlite roles, joins in flight) is not in kine
//! and is neither backed up nor restored; a restored Node of a node that is gone comes back
//! as a Node that is no datastore member, as in Kubernetes. Restoring a key needs quorum, as a
//! write through kine does: without it every key fails (logged), and the command still exits
//! 0, as the migrator does.
//!
//! Knob for MicroK8s #4259/#4308 (near-empty backups since 1.27): with
//! `MICROK8S_SIM_DBCTL_NEAR_EMPTY=1` in the environment or a file `dbctl-near-empty` in the
//! state folder, a backup holds only the first key.
//!
//! The CLI process does the file work (the archive lives in its current directory) and asks
//! the daemon for the keys (`__dbctl dump`) or to write them (`__dbctl restore JSON`).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{Daemon, Out};
use crate::SimEnv;

const LOCKED_MSG: &str =
    "This MicroK8s deployment is acting as a node in a cluster.\nPlease use the master node.\n";
const NOT_RUNNING_MSG: &str =
    "Please ensure the kubernetes apiserver is running and HA is enabled.\n";
const USAGE: &str = "usage: microk8s dbctl [-h] [--debug] {restore,backup} ...\n";
const MINIONS: &str = "/registry/minions/";
const ADDONS: &str = "/registry/microk8s-sim/addons/";
const OTHER: &str = "/registry/microk8s-sim/";

fn logrus(level: &str, msg: &str, fields: &str) -> String {
    let t = crate::now_ms() / 1000;
    format!("time=\"{t}\" level={level} msg=\"{msg}\"{fields}\n")
}

/// `microk8s dbctl ARGS…` in the CLI process (see the module docs).
pub fn dbctl_main(
    env: &SimEnv,
    args: &[String],
    forward: &dyn Fn(Vec<String>) -> Option<Out>,
) -> Out {
    let mut it = args.iter().map(String::as_str).peekable();
    let mut debug = false;
    while it.peek() == Some(&"--debug") {
        debug = true;
        it.next();
    }
    let _ = debug;
    let rest: Vec<&str> = it.collect();
    // The wrapper checks the lock and kine before argparse runs.
    let dump = forward(vec!["__dbctl".into(), "check".into()]);
    match dump {
        None => return Out::fail(10, NOT_RUNNING_MSG),
        Some(o) if o.code == 1 && o.stdout == LOCKED_MSG => return o,
        Some(o) if o.code != 0 => return Out::fail(10, NOT_RUNNING_MSG),
        Some(_) => {}
    }
    match rest.as_slice() {
        ["backup"] => backup(env, None, forward),
        ["backup", "-o", name] => backup(env, Some(name), forward),
        ["backup", ..] => Out::err(
            2,
            format!("{USAGE}microk8s dbctl: error: unrecognized arguments\n"),
        ),
        ["restore", file] => restore(env, file, forward),
        ["restore"] => Out::err(
            2,
            format!("{USAGE}microk8s dbctl restore: error: the following arguments are required: backup-file\n"),
        ),
        ["restore", ..] => Out::err(
            2,
            format!("{USAGE}microk8s dbctl: error: unrecognized arguments\n"),
        ),
        [] | ["-h" | "--help"] => Out::ok(format!("{USAGE}\nbackup and restore the Kubernetes datastore.\n")),
        [other, ..] => Out::err(
            2,
            format!("{USAGE}microk8s dbctl: error: argument command: invalid choice: '{other}' (choose from 'restore', 'backup')\n"),
        ),
    }
}

fn near_empty(env: &SimEnv) -> bool {
    std::env::var("MICROK8S_SIM_DBCTL_NEAR_EMPTY").is_ok_and(|v| v == "1")
        || env.state_dir.join("dbctl-near-empty").exists()
}

/// `backup-YYYY-MM-DD-HH-MM-SS`; the simulator takes UTC for local time (nodes and tests
/// run in UTC).
fn default_name() -> String {
    let secs = crate::now_ms() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "backup-{y:04}-{m:02}-{d:02}-{:02}-{:02}-{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn backup(env: &SimEnv, name: Option<&str>, forward: &dyn Fn(Vec<String>) -> Option<Out>) -> Out {
    let mut fname = name.map(str::to_owned).unwrap_or_else(default_name);
    if let Some(s) = fname.strip_suffix(".tar.gz") {
        fname = s.to_owned();
    }
    let tar_path = PathBuf::from(format!("{fname}.tar.gz"));
    let base = Path::new(&fname)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut stdout = String::from("Backing up the datastore\n");
    let mut stderr = logrus(
        "info",
        "starting migrator",
        &format!(" dir=/tmp/tmpsim/{base} endpoint=\"unix:///var/snap/microk8s/current/var/kubernetes/backend/kine.sock:12379\" mode=backup-dqlite"),
    );
    let pairs = match forward(vec!["__dbctl".into(), "dump".into()]) {
        Some(o) if o.code == 0 => match serde_json::from_str::<Vec<(String, String)>>(&o.stdout) {
            Ok(p) => p,
            Err(e) => return Out::fail(1, format!("microk8s-sim: bad dump: {e}\n")),
        },
        Some(o) => {
            stderr.push_str(&logrus(
                "fatal",
                "failed to backup dqlite",
                &format!(
                    " error=\"failed to list keys from dqlite: {}\"",
                    o.stderr.trim()
                ),
            ));
            stdout.push_str("Backup process failed. 1\n");
            return Out {
                code: 1,
                stdout,
                stderr,
            };
        }
        None => return Out::fail(10, NOT_RUNNING_MSG),
    };
    let pairs: Vec<(String, String)> = if near_empty(env) {
        pairs.into_iter().take(1).collect()
    } else {
        pairs
    };
    for (i, (k, v)) in pairs.iter().enumerate() {
        stderr.push_str(&logrus(
            "info",
            "writing key",
            &format!(" index={i} key=\"{k}\" len={}", v.len()),
        ));
    }
    if let Err(e) = write_tarball(&tar_path, &base, &pairs) {
        return Out {
            code: 1,
            stdout,
            stderr: format!("{stderr}Traceback (most recent call last):\n  File \"/snap/microk8s/current/scripts/wrappers/dbctl.py\", line 95, in backup\n    with tarfile.open(fname_tar, \"w:gz\") as tar:\n{e}\n"),
        };
    }
    stdout.push_str(&format!("The backup is: {}\n", tar_path.display()));
    Out {
        code: 0,
        stdout,
        stderr,
    }
}

fn write_tarball(path: &Path, base: &str, pairs: &[(String, String)]) -> std::io::Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o700);
    dir.set_size(0);
    tar.append_data(&mut dir, format!("{base}/"), std::io::empty())?;
    for (i, (k, v)) in pairs.iter().enumerate() {
        for (ext, bytes) in [("key", k.as_bytes()), ("data", v.as_bytes())] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o640);
            h.set_size(bytes.len() as u64);
            tar.append_data(&mut h, format!("{base}/{i}.{ext}"), bytes)?;
        }
    }
    tar.into_inner()?.finish()?.sync_all()
}

/// Reads the tarball as Python's tarfile + `safe_extract` would, then the pairs from the folder
/// named after the file's base name.
fn read_tarball(file: &str) -> Result<Vec<(String, String)>, String> {
    let bytes = std::fs::read(file).map_err(|e| {
        format!("FileNotFoundError: [Errno 2] No such file or directory: '{file}' ({e})")
    })?;
    let mut folder = file.strip_suffix(".tar.gz").unwrap_or(file).to_owned();
    folder = Path::new(&folder)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gz = flate2::read::GzDecoder::new(&bytes[..]);
    let mut tar = tar::Archive::new(gz);
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let entries = tar
        .entries()
        .map_err(|e| format!("tarfile.ReadError: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("tarfile.ReadError: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("tarfile.ReadError: {e}"))?
            .to_string_lossy()
            .into_owned();
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err("Exception: Attempted Path Traversal in Tar File".into());
        }
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("tarfile.ReadError: {e}"))?;
        files.insert(path.trim_start_matches("./").to_owned(), data);
    }
    let mut pairs = Vec::new();
    for i in 0.. {
        let Some(k) = files.get(&format!("{folder}/{i}.key")) else {
            break;
        };
        let Some(v) = files.get(&format!("{folder}/{i}.data")) else {
            return Err(format!(
                "failed to read value file: open {folder}/{i}.data: no such file or directory"
            ));
        };
        pairs.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    Ok(pairs)
}

fn restore(_env: &SimEnv, file: &str, forward: &dyn Fn(Vec<String>) -> Option<Out>) -> Out {
    let stdout = format!("Restoring from {file}\n");
    let pairs = match read_tarball(file) {
        Ok(p) => p,
        Err(e) if e.starts_with("failed to read value file") => {
            return Out {
                code: 3,
                stdout: format!("{stdout}Restore process failed. 1\n"),
                stderr: logrus("fatal", "failed to restore to etcd", &format!(" error=\"{e}\"")),
            }
        }
        Err(e) => {
            return Out {
                code: 1,
                stdout,
                stderr: format!("Traceback (most recent call last):\n  File \"/snap/microk8s/current/scripts/wrappers/dbctl.py\", line 117, in restore\n{e}\n"),
            }
        }
    };
    let body = serde_json::to_string(&pairs).expect("pairs serialise");
    match forward(vec!["__dbctl".into(), "restore".into(), body]) {
        Some(o) => Out {
            code: o.code,
            stdout: format!("{stdout}{}", o.stdout),
            stderr: o.stderr,
        },
        None => Out::fail(10, NOT_RUNNING_MSG),
    }
}

/// The view's kine keys, sorted (see the module docs).
fn kine_pairs(view: &crate::model::View) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in &view.entries {
        let labels = view.node_labels.get(&e.name).cloned().unwrap_or_default();
        out.push((
            format!("{MINIONS}{}", e.name),
            json!({"kind": "Node", "name": e.name, "ip": e.ip, "worker": e.worker, "labels": labels})
                .to_string(),
        ));
    }
    for (name, rec) in &view.addons {
        out.push((
            format!("{ADDONS}{name}"),
            serde_json::to_string(rec).expect("addon record serialises"),
        ));
    }
    if let Ok(Value::Object(fields)) = serde_json::to_value(view) {
        for (field, value) in fields {
            if matches!(field.as_str(), "addons" | "node_labels") {
                continue;
            }
            if let Value::Object(map) = value {
                for (k, v) in map {
                    out.push((format!("{OTHER}{field}/{k}"), v.to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Applies one restored key to the view JSON; `Err` is why it failed.
fn apply_pair(view: &mut Value, key: &str, value: &str) -> Result<(), String> {
    let parsed: Value = serde_json::from_str(value).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(name) = key.strip_prefix(MINIONS) {
        let entries = view["entries"].as_array_mut().ok_or("no entries")?;
        if !entries.iter().any(|e| e["name"] == json!(name)) {
            // The Node object comes back; the node is no dqlite member.
            entries.push(json!({"name": name, "ip": parsed["ip"], "id": 0, "role": null, "worker": parsed["worker"].as_bool().unwrap_or(false)}));
        }
        let labels = view["node_labels"]
            .as_object_mut()
            .ok_or("no node_labels")?;
        match parsed["labels"].as_object() {
            Some(l) if !l.is_empty() => {
                labels.insert(name.to_owned(), Value::Object(l.clone()));
            }
            _ => {}
        }
        return Ok(());
    }
    if let Some(addon) = key.strip_prefix(ADDONS) {
        view["addons"]
            .as_object_mut()
            .ok_or("no addons")?
            .insert(addon.to_owned(), parsed);
        return Ok(());
    }
    if let Some((field, k)) = key.strip_prefix(OTHER).and_then(|r| r.split_once('/')) {
        let map = view
            .get_mut(field)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| format!("no table {field}"))?;
        map.insert(k.to_owned(), parsed);
        return Ok(());
    }
    Err("unknown key".into())
}

impl Daemon {
    /// The daemon's side of `dbctl`: `check`, `dump` and `restore JSON`.
    pub(super) async fn cmd_dbctl(&self, args: &[&str]) -> Out {
        {
            let st = self.lock();
            if st.worker {
                return Out::fail(1, LOCKED_MSG);
            }
            if !st.view.ha_enabled {
                return Out::fail(10, NOT_RUNNING_MSG);
            }
        }
        match args {
            ["check"] => Out::ok(""),
            ["dump"] => self.dbctl_dump().await,
            ["restore", body] => match serde_json::from_str::<Vec<(String, String)>>(body) {
                Ok(pairs) => self.dbctl_restore(&pairs).await,
                Err(e) => Out::fail(1, format!("microk8s-sim: bad restore body: {e}\n")),
            },
            _ => Out::fail(1, "microk8s-sim: unknown __dbctl request\n"),
        }
    }

    /// Every kine key: the view's (Nodes, addons) and the API's objects, after a quorum read.
    async fn dbctl_dump(&self) -> Out {
        let view_pairs = {
            let st = self.lock();
            if !st.view.quorum(&self.alive()) {
                return Out::err(
                    1,
                    "context deadline exceeded: no available dqlite leader server found",
                );
            }
            kine_pairs(&st.view)
        };
        let objects = match self.datastore_dump().await {
            Ok(o) => o,
            Err(e) => return Out::err(1, e.to_string()),
        };
        let mut pairs = view_pairs;
        pairs.extend(objects.into_iter().map(|(k, v)| (k, v.to_string())));
        pairs.sort();
        Out::ok(serde_json::to_string(&pairs).expect("pairs serialise"))
    }

    /// Creates or overwrites each key, logging the ones that fail; exits 0 (see the module
    /// docs).
    async fn dbctl_restore(&self, pairs: &[(String, String)]) -> Out {
        let mut stderr = String::new();
        let mut view_changed = false;
        for (i, (k, v)) in pairs.iter().enumerate() {
            let res = if k.starts_with(MINIONS) || k.starts_with(OTHER) {
                let mut st = self.lock();
                if st.view.quorum(&self.alive()) {
                    let mut view = serde_json::to_value(&st.view).expect("views serialise");
                    apply_pair(&mut view, k, v).and_then(|()| {
                        st.view = serde_json::from_value(view).map_err(|e| e.to_string())?;
                        view_changed = true;
                        Ok(())
                    })
                } else {
                    Err("context deadline exceeded".into())
                }
            } else {
                match serde_json::from_str::<Value>(v) {
                    Ok(value) => self
                        .datastore_put(k, value)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("value is not JSON: {e}")),
                }
            };
            if let Err(e) = res {
                stderr.push_str(&logrus(
                    "error",
                    "failed to restore key",
                    &format!(" index={i} key=\"{k}\" error=\"{e}\""),
                ));
            }
        }
        stderr.push_str(&logrus(
            "info",
            "completed database restore",
            &format!(" entries={}", pairs.len()),
        ));
        if view_changed {
            let v = {
                let mut st = self.lock();
                self.commit(&mut st)
            };
            self.push(v).await;
        }
        Out {
            code: 0,
            stdout: String::new(),
            stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tarball_round_trips_and_a_renamed_one_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b1.tar.gz");
        let pairs = vec![
            ("/a".to_owned(), "1".to_owned()),
            ("/b".to_owned(), "2".to_owned()),
        ];
        write_tarball(&p, "b1", &pairs).unwrap();
        assert_eq!(read_tarball(p.to_str().unwrap()).unwrap(), pairs);
        let q = dir.path().join("renamed.tar.gz");
        std::fs::rename(&p, &q).unwrap();
        assert!(read_tarball(q.to_str().unwrap()).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_tarball_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b1.tar.gz");
        std::fs::write(&p, b"not a tarball").unwrap();
        assert!(read_tarball(p.to_str().unwrap()).is_err());
    }
}
