//! The storage's offline files: `addons.offline` names a folder on the build machine holding
//! the `.deb` packages the chosen storage needs on every node (with their dependencies) and,
//! for Longhorn, its chart archive. They are copied into [`STORAGE_DIR`] in the image, the
//! in-image config points `addons.offline` there, and `firstboot` installs the packages at
//! first boot with `dpkg -i` (no network) and helm installs the chart from there. This is how an
//! official Ubuntu base, whose package list the builder cannot change, gets them; a
//! bootstrapped base gets the packages in its package list instead (`build`).
//!
//! Checked at build time, before anything is written: every package
//! [`rackseed_config::Storage::node_packages`] names has a `NAME_VERSION_ARCH.deb` for the
//! target's architecture (or `all`), every staged `.deb` is an `ar` archive (what a Debian
//! package is) for that architecture, and for Longhorn the chart `longhorn-<version>.tgz` of
//! the pinned version is there and is gzip data. The folder's packages are not resolved
//! against each other (the dependencies of `open-iscsi` differ between releases): a missing
//! dependency shows at first boot as dpkg's error in the node's status.
//!
//! To fill the folder on an Ubuntu machine of the nodes' release and architecture:
//! `apt-get download open-iscsi nfs-common` plus what `apt-get install --simulate` says is
//! missing on a fresh node, and Longhorn's chart archive from its chart repository.
//!
//! Container images are **not** staged: Longhorn's and the snapshot controller's images are
//! still pulled by the nodes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::ext4::Entry;
use rackseed_config::{ClusterConfig, Storage, Target, LONGHORN_CHART_VERSION};

/// Where the staged storage files go in the image.
pub const STORAGE_DIR: &str = "/var/lib/rackseed/storage";

/// The chart archive's file name.
pub fn longhorn_chart_name() -> String {
    format!("longhorn-{LONGHORN_CHART_VERSION}.tgz")
}

/// `(package, version, arch)` of a file named the Debian way.
pub fn deb_name_parts(name: &str) -> Option<(&str, &str, &str)> {
    let stem = name.strip_suffix(".deb")?;
    let mut it = stem.splitn(3, '_');
    Some((it.next()?, it.next()?, it.next()?))
}

fn starts_with(path: &Path, magic: &[u8]) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = vec![0u8; magic.len()];
    Ok(f.read_exact(&mut head).is_ok() && head == magic)
}

/// The files of `dir` to stage for `storage` on `target`, checked (see the module docs).
pub fn staged_files(dir: &Path, storage: Storage, target: Target) -> Result<Vec<PathBuf>> {
    let arch = target.deb_arch();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading addons.offline folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut keep = Vec::new();
    let mut packages = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".deb") {
            let Some((pkg, _, a)) = deb_name_parts(&name) else {
                bail!("{}: not named NAME_VERSION_ARCH.deb", f.display());
            };
            if a != arch && a != "all" {
                bail!(
                    "{}: built for {a}, but {} nodes run {arch}",
                    f.display(),
                    target.as_str()
                );
            }
            if !starts_with(&f, b"!<arch>\n")? {
                bail!(
                    "{}: not a Debian package (no ar archive header)",
                    f.display()
                );
            }
            packages.push(pkg.to_owned());
            keep.push(f);
        } else if name == longhorn_chart_name() {
            if !starts_with(&f, &[0x1f, 0x8b])? {
                bail!("{}: not a gzip-compressed chart archive", f.display());
            }
            keep.push(f);
        }
    }
    let missing: Vec<&str> = storage
        .node_packages()
        .iter()
        .copied()
        .filter(|p| !packages.iter().any(|q| q == p))
        .collect();
    if !missing.is_empty() {
        bail!(
            "addons.offline folder {} has no {arch} package for {} (storage {} needs it on \
             every node); add it with its dependencies (apt-get download {} on a machine of \
             the nodes' release)",
            dir.display(),
            missing.join(", "),
            storage_name(storage),
            missing.join(" ")
        );
    }
    if storage == Storage::Longhorn && !keep.iter().any(|f| f.ends_with(longhorn_chart_name())) {
        bail!(
            "addons.offline folder {} has no {} (the longhorn chart the agent installs)",
            dir.display(),
            longhorn_chart_name()
        );
    }
    Ok(keep)
}

fn storage_name(s: Storage) -> &'static str {
    match s {
        Storage::None => "none",
        Storage::Hostpath => "hostpath",
        Storage::Mayastor => "mayastor",
        Storage::RookCeph => "rook-ceph",
        Storage::Longhorn => "longhorn",
    }
}

/// The root-filesystem entries staging `addons.offline` (none when it is not set).
pub fn storage_entries(config: &ClusterConfig, target: Target) -> Result<Vec<Entry>> {
    let Some(dir) = &config.addons.offline else {
        return Ok(Vec::new());
    };
    let files = staged_files(dir, config.addons.storage, target)?;
    let mut entries = vec![Entry::Dir {
        path: STORAGE_DIR.into(),
        mode: 0o755,
        uid: 0,
        gid: 0,
    }];
    for f in files {
        let name = f
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        entries.push(Entry::File {
            path: format!("{STORAGE_DIR}/{name}"),
            src: f,
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
    }
    Ok(entries)
}

/// The packages a bootstrapped base adds for the storage: the configured ones plus
/// [`Storage::node_packages`].
pub fn bootstrap_packages(configured: &[String], storage: Storage) -> Vec<String> {
    let mut p = configured.to_vec();
    p.extend(storage.node_packages().iter().map(|s| s.to_string()));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn longhorn_needs_its_packages_for_the_arch_and_the_chart() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        put(dir, "open-iscsi_2.1.9_amd64.deb", b"!<arch>\nx");
        let err = staged_files(dir, Storage::Longhorn, Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("no amd64 package for nfs-common"),
            "{err:#}"
        );
        put(dir, "nfs-common_2.6.4_amd64.deb", b"!<arch>\nx");
        let err = staged_files(dir, Storage::Longhorn, Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("has no longhorn-1.7.2.tgz"),
            "{err:#}"
        );
        put(dir, &longhorn_chart_name(), &[0x1f, 0x8b, 0]);
        put(dir, "notes.txt", b"ignored");
        let files = staged_files(dir, Storage::Longhorn, Target::X86_64Efi).unwrap();
        assert_eq!(files.len(), 3);
        // The same folder is wrong for a Pi.
        let err = staged_files(dir, Storage::Longhorn, Target::Rpi5).unwrap_err();
        assert!(format!("{err:#}").contains("built for amd64, but rpi5 nodes run arm64"));
        // A file that is not a package.
        put(dir, "lvm2_2.03_all.deb", b"<html>");
        let err = staged_files(dir, Storage::Longhorn, Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a Debian package"),
            "{err:#}"
        );
    }

    #[test]
    fn the_in_image_config_points_at_the_staged_folder() {
        let src = "[cluster]\nname = \"lab\"\n\n[addons]\nstorage = \"longhorn\"\noffline = \"/home/me/storage\"\n";
        let t = super::super::in_image_config(src).unwrap();
        assert!(t.contains(&format!("offline = \"{STORAGE_DIR}\"")), "{t}");
        assert!(!t.contains("/home/me"), "{t}");
    }

    #[test]
    fn bootstrapped_bases_get_the_storage_packages() {
        assert_eq!(
            bootstrap_packages(&["htop".into()], Storage::Longhorn),
            ["htop", "open-iscsi", "nfs-common"]
        );
        assert_eq!(bootstrap_packages(&[], Storage::None), Vec::<String>::new());
    }
}
