//! Edits an ext4 filesystem inside an image file without mounting it: `debugfs -w` on
//! `IMAGE?offset=N` (libext2fs' unix_io offset option), driven by a command file.
//!
//! debugfs exits 0 even when a command fails, so every [`Ext4::apply`] is followed by a
//! verification pass that lists the touched folders (`ls -p`, parsed by [`parse_ls_p`]) and
//! checks each entry's type, mode, owner and size. To add an operation, extend [`Entry`],
//! emit its debugfs commands in [`script`] and check it in [`verify`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::tool::Tool;

/// One thing to put into the filesystem. Paths are absolute inside the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        path: String,
        src: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Removed if present (a file or symlink; never a folder). Its parent is not created.
    Absent {
        path: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Absent { path } => path,
        }
    }
}

/// One line of `ls -p`: `/inode/mode/uid/gid/name/size/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub inode: u64,
    /// Full st_mode (type bits included), e.g. `0o100644`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub size: Option<u64>,
}

/// Parses debugfs `ls -p` output. Lines that are not entries are ignored.
pub fn parse_ls_p(text: &str) -> Vec<DirEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix('/') else {
            continue;
        };
        let f: Vec<&str> = rest.split('/').collect();
        if f.len() < 6 {
            continue;
        }
        let (Ok(inode), Ok(mode), Ok(uid), Ok(gid)) = (
            f[0].parse(),
            u32::from_str_radix(f[1], 8),
            f[2].parse(),
            f[3].parse(),
        ) else {
            continue;
        };
        out.push(DirEntry {
            inode,
            mode,
            uid,
            gid,
            name: f[4].to_string(),
            size: f[5].parse().ok(),
        });
    }
    out
}

/// Splits debugfs `-f` stdout into per-command sections keyed by the echoed command line.
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(cmd) = line.strip_prefix("debugfs: ") {
            out.push((cmd.to_string(), String::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

fn check_path(p: &str) -> Result<()> {
    if !p.starts_with('/')
        || p.chars()
            .any(|c| c.is_whitespace() || c == '"' || c.is_control())
        || p.contains("/../")
    {
        bail!("unsupported path {p:?} for the ext4 editor (absolute, no spaces, quotes or ..)");
    }
    Ok(())
}

fn parent(p: &str) -> String {
    match p.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => p[..i].to_string(),
    }
}

fn name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// An ext4 filesystem at byte `offset` of `image`.
#[derive(Debug, Clone)]
pub struct Ext4 {
    pub image: PathBuf,
    pub offset: u64,
}

impl Ext4 {
    pub fn new(image: &Path, offset: u64) -> Self {
        Ext4 {
            image: image.to_path_buf(),
            offset,
        }
    }

    fn dev(&self) -> String {
        format!("{}?offset={}", self.image.display(), self.offset)
    }

    async fn debugfs_script(&self, script: &str, write: bool, scratch: &Path) -> Result<String> {
        let file = scratch.join(format!("debugfs-{}.cmd", rand::random::<u32>()));
        std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
        let mut t = Tool::new("debugfs");
        if write {
            t = t.arg("-w");
        }
        let out = t
            .arg("-f")
            .arg(&file)
            .arg(self.dev())
            .timeout(Duration::from_secs(600))
            .run()
            .await
            .with_context(|| format!("editing ext4 in {}", self.image.display()));
        let _ = std::fs::remove_file(&file);
        out
    }

    /// Lists `dirs`; a folder that does not exist maps to `None`.
    pub async fn list(
        &self,
        dirs: &BTreeSet<String>,
        scratch: &Path,
    ) -> Result<BTreeMap<String, Option<Vec<DirEntry>>>> {
        let mut script = String::new();
        for d in dirs {
            check_path(d)?;
            script.push_str(&format!("ls -p {d}\n"));
        }
        let out = self.debugfs_script(&script, false, scratch).await?;
        let mut res: BTreeMap<String, Option<Vec<DirEntry>>> =
            dirs.iter().map(|d| (d.clone(), None)).collect();
        for (cmd, body) in sections(&out) {
            if let Some(d) = cmd.strip_prefix("ls -p ") {
                let entries = parse_ls_p(&body);
                // Every existing folder lists at least `.` and `..`.
                if !entries.is_empty() {
                    res.insert(d.to_string(), Some(entries));
                }
            }
        }
        Ok(res)
    }

    /// Writes `entries` (creating missing parent folders root:root 0755), then verifies them.
    pub async fn apply(&self, entries: &[Entry], scratch: &Path) -> Result<()> {
        for e in entries {
            check_path(e.path())?;
        }
        // Folders to create when missing, and (with the parents of removals) to list.
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        let mut listed: BTreeSet<String> = BTreeSet::new();
        for e in entries {
            if let Entry::Absent { path } = e {
                listed.insert(parent(path));
                continue;
            }
            let mut p = parent(e.path());
            loop {
                dirs.insert(p.clone());
                if p == "/" {
                    break;
                }
                p = parent(&p);
            }
            if let Entry::Dir { path, .. } = e {
                dirs.insert(path.clone());
            }
        }
        listed.extend(dirs.iter().cloned());
        let before = self.list(&listed, scratch).await?;
        let s = script(entries, &dirs, &before)?;
        self.debugfs_script(&s, true, scratch).await?;
        let after = self.list(&listed, scratch).await?;
        verify(entries, &after).with_context(|| {
            format!(
                "verifying edits of ext4 at byte {} of {}",
                self.offset,
                self.image.display()
            )
        })
    }

    /// Reads a regular file; `None` when it does not exist.
    pub async fn read(&self, path: &str, scratch: &Path) -> Result<Option<Vec<u8>>> {
        check_path(path)?;
        let listing = self.list(&BTreeSet::from([parent(path)]), scratch).await?;
        let exists = listing
            .values()
            .flatten()
            .flatten()
            .any(|e| e.name == name(path) && e.mode & 0o170000 == 0o100000);
        if !exists {
            return Ok(None);
        }
        let out = scratch.join(format!("dump-{}", rand::random::<u32>()));
        self.debugfs_script(&format!("dump {path} {}\n", out.display()), false, scratch)
            .await?;
        let data = std::fs::read(&out)
            .with_context(|| format!("reading {path} dumped from {}", self.image.display()));
        let _ = std::fs::remove_file(&out);
        data.map(Some)
    }
}

fn lookup<'a>(
    listing: &'a BTreeMap<String, Option<Vec<DirEntry>>>,
    path: &str,
) -> Option<&'a DirEntry> {
    listing
        .get(&parent(path))?
        .as_ref()?
        .iter()
        .find(|e| e.name == name(path))
}

/// The debugfs command file for `entries`, given the folders' listings before the edit.
pub fn script(
    entries: &[Entry],
    dirs: &BTreeSet<String>,
    before: &BTreeMap<String, Option<Vec<DirEntry>>>,
) -> Result<String> {
    let mut s = String::new();
    // Missing folders, parents first (BTreeSet order puts "/a" before "/a/b").
    let explicit: BTreeMap<&str, &Entry> = entries
        .iter()
        .filter(|e| matches!(e, Entry::Dir { .. }))
        .map(|e| (e.path(), e))
        .collect();
    let mut by_depth: Vec<&String> = dirs.iter().collect();
    by_depth.sort_by_key(|d| d.matches('/').count());
    for d in by_depth {
        if d == "/" {
            continue;
        }
        let existing = before.get(d).and_then(|x| x.as_ref()).is_some();
        if !existing {
            if let Some(e) = lookup(before, d) {
                bail!(
                    "{d} exists in the image and is not a folder (mode {:o})",
                    e.mode
                );
            }
            s.push_str(&format!("mkdir {d}\n"));
            let (mode, uid, gid) = match explicit.get(d.as_str()) {
                Some(Entry::Dir { mode, uid, gid, .. }) => (*mode, *uid, *gid),
                _ => (0o755, 0, 0),
            };
            s.push_str(&format!(
                "sif {d} mode 0{:o}\nsif {d} uid {uid}\nsif {d} gid {gid}\n",
                0o040000 | mode
            ));
        } else if let Some(Entry::Dir { mode, uid, gid, .. }) = explicit.get(d.as_str()) {
            s.push_str(&format!(
                "sif {d} mode 0{:o}\nsif {d} uid {uid}\nsif {d} gid {gid}\n",
                0o040000 | mode
            ));
        }
    }
    for e in entries {
        match e {
            Entry::Dir { .. } => {}
            Entry::File {
                path,
                src,
                mode,
                uid,
                gid,
            } => {
                if src
                    .to_string_lossy()
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"')
                {
                    bail!(
                        "unsupported source path {} (no spaces or quotes)",
                        src.display()
                    );
                }
                if let Some(old) = lookup(before, path) {
                    if old.mode & 0o170000 == 0o040000 {
                        bail!(
                            "{path} is a folder in the image; refusing to replace it with a file"
                        );
                    }
                    s.push_str(&format!("rm {path}\n"));
                }
                s.push_str(&format!("write {} {path}\n", src.display()));
                s.push_str(&format!(
                    "sif {path} mode 0{:o}\nsif {path} uid {uid}\nsif {path} gid {gid}\n",
                    0o100000 | mode
                ));
            }
            Entry::Symlink { path, target } => {
                if target.chars().any(|c| c.is_whitespace() || c == '"') {
                    bail!("unsupported symlink target {target:?}");
                }
                if let Some(old) = lookup(before, path) {
                    if old.mode & 0o170000 == 0o040000 {
                        bail!("{path} is a folder in the image; refusing to replace it with a symlink");
                    }
                    s.push_str(&format!("rm {path}\n"));
                }
                s.push_str(&format!("symlink {path} {target}\n"));
            }
            Entry::Absent { path } => {
                if let Some(old) = lookup(before, path) {
                    if old.mode & 0o170000 == 0o040000 {
                        bail!("{path} is a folder in the image; refusing to remove it");
                    }
                    s.push_str(&format!("rm {path}\n"));
                }
            }
        }
    }
    Ok(s)
}

/// Checks that every entry is present as asked.
pub fn verify(entries: &[Entry], after: &BTreeMap<String, Option<Vec<DirEntry>>>) -> Result<()> {
    for e in entries {
        let path = e.path();
        if let Entry::Absent { .. } = e {
            if let Some(left) = lookup(after, path) {
                bail!(
                    "{path} is still there after its removal (mode {:o})",
                    left.mode
                );
            }
            continue;
        }
        let got =
            lookup(after, path).with_context(|| format!("{path} is missing after the edit"))?;
        match e {
            Entry::Dir { mode, uid, gid, .. } => {
                if got.mode != 0o040000 | mode || got.uid != *uid || got.gid != *gid {
                    bail!(
                        "{path}: expected folder {mode:o} {uid}:{gid}, found {:o} {}:{}",
                        got.mode,
                        got.uid,
                        got.gid
                    );
                }
            }
            Entry::File {
                src,
                mode,
                uid,
                gid,
                ..
            } => {
                let size = std::fs::metadata(src)?.len();
                if got.mode != 0o100000 | mode
                    || got.uid != *uid
                    || got.gid != *gid
                    || got.size != Some(size)
                {
                    bail!(
                        "{path}: expected file {mode:o} {uid}:{gid} of {size} bytes, found {:o} {}:{} of {:?} bytes",
                        got.mode,
                        got.uid,
                        got.gid,
                        got.size
                    );
                }
            }
            Entry::Absent { .. } => unreachable!("handled above"),
            Entry::Symlink { .. } => {
                if got.mode & 0o170000 != 0o120000 {
                    bail!("{path}: expected a symlink, found mode {:o}", got.mode);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LS: &str = "/2/040755/0/0/.//\n/2/040755/0/0/..//\n/11/040700/0/0/lost+found//\n/12/100644/0/0/h.txt/6/\n/14/120777/0/0/l/6/\n\n";

    #[test]
    fn parses_ls_p() {
        let e = parse_ls_p(LS);
        assert_eq!(e.len(), 5);
        assert_eq!(
            e[3],
            DirEntry {
                inode: 12,
                mode: 0o100644,
                uid: 0,
                gid: 0,
                name: "h.txt".into(),
                size: Some(6)
            }
        );
        assert_eq!(e[2].size, None);
    }

    #[test]
    fn script_replaces_files_and_creates_missing_parents() {
        let entries = vec![
            Entry::File {
                path: "/h.txt".into(),
                src: "/tmp/x".into(),
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            Entry::File {
                path: "/etc/rackseed/a".into(),
                src: "/tmp/y".into(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        ];
        let dirs: BTreeSet<String> = ["/", "/etc", "/etc/rackseed"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut before = BTreeMap::new();
        before.insert("/".to_string(), Some(parse_ls_p(LS)));
        before.insert("/etc".to_string(), None);
        before.insert("/etc/rackseed".to_string(), None);
        let s = script(&entries, &dirs, &before).unwrap();
        let mk_etc = s.find("mkdir /etc\n").unwrap();
        let mk_rs = s.find("mkdir /etc/rackseed\n").unwrap();
        assert!(mk_etc < mk_rs);
        assert!(s.contains("rm /h.txt\nwrite /tmp/x /h.txt\nsif /h.txt mode 0100600\n"));
        assert!(!s.contains("rm /etc/rackseed/a"));
    }

    #[test]
    fn refuses_to_replace_a_folder_and_odd_paths() {
        let entries = vec![Entry::File {
            path: "/lost+found".into(),
            src: "/tmp/x".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }];
        let dirs: BTreeSet<String> = ["/".to_string()].into();
        let before = BTreeMap::from([("/".to_string(), Some(parse_ls_p(LS)))]);
        assert!(script(&entries, &dirs, &before)
            .unwrap_err()
            .to_string()
            .contains("folder"));
        assert!(check_path("/a b").is_err());
        assert!(check_path("relative").is_err());
    }

    #[test]
    fn verify_reports_wrong_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s");
        std::fs::write(&src, "hello\n").unwrap();
        let after = BTreeMap::from([("/".to_string(), Some(parse_ls_p(LS)))]);
        let ok = vec![Entry::File {
            path: "/h.txt".into(),
            src: src.clone(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }];
        verify(&ok, &after).unwrap();
        let bad = vec![Entry::File {
            path: "/h.txt".into(),
            src,
            mode: 0o600,
            uid: 0,
            gid: 0,
        }];
        assert!(verify(&bad, &after)
            .unwrap_err()
            .to_string()
            .contains("expected file 600"));
    }

    #[test]
    fn absent_entries_remove_what_is_there_and_nothing_else() {
        let before = BTreeMap::from([
            ("/".to_string(), Some(parse_ls_p(LS))),
            ("/etc/ssh".to_string(), None),
        ]);
        let absent = |p: &str| Entry::Absent { path: p.into() };
        let entries = vec![
            absent("/h.txt"),
            absent("/l"),
            absent("/etc/ssh/ssh_host_rsa_key"),
        ];
        let s = script(&entries, &BTreeSet::from(["/".to_string()]), &before).unwrap();
        assert_eq!(
            s, "rm /h.txt\nrm /l\n",
            "no mkdir for a removal's missing parent"
        );
        assert!(script(&[absent("/lost+found")], &BTreeSet::new(), &before).is_err());
        // Verified gone.
        let after = BTreeMap::from([("/".to_string(), Some(parse_ls_p(LS)))]);
        let e = verify(&[absent("/h.txt")], &after).unwrap_err();
        assert!(e.to_string().contains("still there"), "{e}");
        verify(&[absent("/gone")], &after).unwrap();
    }
}
