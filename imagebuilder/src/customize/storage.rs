//! The offline folder (`addons.offline`): a folder on the build machine holding the `.deb`
//! packages the nodes need and cannot fetch without a network (with their dependencies) and,
//! for Longhorn, its chart archive. They are copied into [`STORAGE_DIR`] in the image, the
//! in-image config points `addons.offline` there, and `firstboot` installs the packages at
//! first boot with `dpkg -i` (no network) and helm installs the chart from there. This is how an
//! official Ubuntu base, whose package list the builder cannot change, gets them; a
//! bootstrapped base gets them in its package list instead (`build`, `base::bootstrap`).
//!
//! What the folder must hold ([`StagingNeeds::for_config`]):
//! - the storage's packages ([`rackseed_config::Storage::node_packages`]: `open-iscsi` and
//!   `nfs-common` for Longhorn, `lvm2` for Rook-Ceph), for every base;
//! - for an official (not bootstrapped) base, the packages of the other features the config
//!   turns on ([`rackseed_config::ClusterConfig::feature_packages`]): `keepalived` and `curl`
//!   for `cluster.api-address`, `iputils-arping` for MetalLB's `"auto"` range (bootstrapped
//!   bases always carry these);
//! - for Longhorn, the chart `longhorn-<version>.tgz` of the pinned version.
//!
//! Checked at build time, before anything is written: every needed package has a
//! `NAME_VERSION_ARCH.deb` for the target's architecture (or `all`), every staged `.deb` is an
//! `ar` archive (what a Debian package is) for that architecture, and the chart is gzip data
//! (and, when image archives are staged, a chart whose `values.yaml` names its images).
//! The folder's packages are not resolved against each other (dependencies differ between
//! releases): a missing dependency shows at first boot as dpkg's error in the node's status.
//!
//! To fill the folder on an Ubuntu machine of the nodes' release and architecture:
//! `apt-get download open-iscsi nfs-common keepalived curl` (the packages the error names) plus
//! what `apt-get install --simulate` says is missing on a fresh node, and Longhorn's chart
//! archive from its chart repository.
//!
//! **Container images** (Longhorn only): the folder may also hold image archives (`*.tar`, as
//! `docker save` or `ctr image export` write them; [`images`] reads both formats). When it
//! holds any, every image Longhorn needs must be in one of them: the images the staged chart's
//! own `values.yaml` names ([`images::chart_images`]) plus the CSI snapshot controller's
//! ([`rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE`]), compared by their normalised
//! names (`longhornio/x:v1` = `docker.io/longhornio/x:v1`, as containerd names them); the
//! error names the missing ones. Every archive is read to its end at build time, so a truncated
//! or foreign file fails the build naming the file and why. They are staged beside the chart,
//! and every node imports them at first boot with `microk8s ctr image import` before it reports
//! Longhorn's prerequisites met (`firstboot`'s `addons::prep`), so the install needs no
//! registry. When the folder holds no archive, the build warns that the nodes will pull the
//! images from their registries ([`staging_notes`], printed as warnings), as it says which
//! features an official base without the folder leaves to the nodes' own packages.
//!
//! To fill it on a machine with access to the registries (the nodes' architecture):
//! `docker pull` each image the error names, then `docker save -o longhorn-images.tar IMAGE…`
//! (or `ctr image pull` + `ctr image export`).

pub mod images;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::ext4::Entry;
use rackseed_config::{
    ClusterConfig, Storage, Target, LONGHORN_CHART_VERSION, LONGHORN_SNAPSHOT_CONTROLLER_IMAGE,
};

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

/// What an offline folder must hold for a config (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StagingNeeds {
    /// `(package, the setting that needs it)`, in the config's order.
    pub packages: Vec<(&'static str, String)>,
    /// Longhorn's chart archive ([`longhorn_chart_name`]).
    pub longhorn_chart: bool,
}

impl StagingNeeds {
    /// The needs of `config`'s storage, plus those of its other features when the base is not
    /// bootstrapped (a bootstrapped base has those packages already).
    pub fn for_config(config: &ClusterConfig) -> StagingNeeds {
        let storage = config.addons.storage;
        let mut packages: Vec<(&'static str, String)> = storage
            .node_packages()
            .iter()
            .map(|p| (*p, format!("storage {}", storage_name(storage))))
            .collect();
        if !is_bootstrapped(config) {
            for f in config.feature_packages() {
                packages.extend(f.packages.iter().map(|p| (*p, f.setting.to_string())));
            }
        }
        StagingNeeds {
            packages,
            longhorn_chart: storage == Storage::Longhorn,
        }
    }
}

/// Whether the image's base is bootstrapped from packages (which then include the features'
/// packages) rather than an official or local image.
pub fn is_bootstrapped(config: &ClusterConfig) -> bool {
    matches!(config.image.base, rackseed_config::Base::Bootstrap { .. })
}

/// The files of `dir` to stage for `needs` on `target`, checked (see the module docs).
pub fn staged_files(dir: &Path, needs: &StagingNeeds, target: Target) -> Result<Vec<PathBuf>> {
    let arch = target.deb_arch();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading addons.offline folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut keep = Vec::new();
    let mut packages = Vec::new();
    let mut archives: Vec<(PathBuf, Vec<String>)> = Vec::new();
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
        } else if needs.longhorn_chart && is_image_archive_name(&name) {
            let refs = images::archive_refs(&f)?;
            tracing::info!(archive = %f.display(), images = ?refs, "staging container images");
            archives.push((f.clone(), refs));
            keep.push(f);
        }
    }
    let missing: Vec<&(&str, String)> = needs
        .packages
        .iter()
        .filter(|(p, _)| !packages.iter().any(|q| q == p))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        let why: Vec<String> = missing
            .iter()
            .map(|(p, setting)| format!("{p} for {setting}"))
            .collect();
        bail!(
            "addons.offline folder {} has no {arch} package for {} (every node needs it: {}); \
             add it with its dependencies (apt-get download {} on a machine of the nodes' \
             release)",
            dir.display(),
            names.join(", "),
            why.join(", "),
            names.join(" ")
        );
    }
    if needs.longhorn_chart && !keep.iter().any(|f| f.ends_with(longhorn_chart_name())) {
        bail!(
            "addons.offline folder {} has no {} (the longhorn chart the agent installs)",
            dir.display(),
            longhorn_chart_name()
        );
    }
    if !archives.is_empty() {
        check_longhorn_images(dir, &archives)?;
    }
    Ok(keep)
}

/// Whether a file of the offline folder is taken as a container image archive.
pub fn is_image_archive_name(name: &str) -> bool {
    name.ends_with(".tar")
}

/// The images Longhorn needs (its chart's and the snapshot controller's), normalised.
pub fn longhorn_images(chart: &Path) -> Result<Vec<String>> {
    let mut need = images::chart_images(chart)?;
    need.push(images::normalize_ref(LONGHORN_SNAPSHOT_CONTROLLER_IMAGE)?);
    need.sort();
    need.dedup();
    Ok(need)
}

/// Every image Longhorn needs is in one of `archives` (see the module docs).
fn check_longhorn_images(dir: &Path, archives: &[(PathBuf, Vec<String>)]) -> Result<()> {
    let need = longhorn_images(&dir.join(longhorn_chart_name()))?;
    let missing: Vec<&String> = need
        .iter()
        .filter(|n| !archives.iter().any(|(_, refs)| refs.contains(n)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = archives
        .iter()
        .map(|(f, _)| {
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    bail!(
        "addons.offline folder {} stages container images ({}), but {} of the {} images \
         longhorn needs ({}'s and the CSI snapshot controller's) are in none of them: {}; add \
         them to an archive (docker save -o longhorn-images.tar IMAGE...), or remove every .tar \
         to let the nodes pull the images from their registries",
        dir.display(),
        names.join(", "),
        missing.len(),
        need.len(),
        longhorn_chart_name(),
        missing
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Whether the folder `dir` holds container image archives (unreadable counts as none: the
/// staging step reports the folder's errors).
fn has_image_archives(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|it| {
        it.filter_map(|e| e.ok())
            .any(|e| is_image_archive_name(&e.file_name().to_string_lossy()))
    })
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
    let files = staged_files(dir, &StagingNeeds::for_config(config), target)?;
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

/// What the build says about offline staging (printed as warnings, kept in the build output):
/// with Longhorn and no image archive in the folder, that its chart and packages are staged but
/// its container images are not; and
/// for an official base without `addons.offline`, which packages the nodes must already have
/// and what a node without them lacks (its status then says so).
pub fn staging_notes(config: &ClusterConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let storage = config.addons.storage;
    let images_staged = config
        .addons
        .offline
        .as_deref()
        .is_some_and(has_image_archives);
    if config.addons.offline.is_some() && storage == Storage::Longhorn && !images_staged {
        notes.push(format!(
            "addons.offline stages longhorn's chart ({}) and the nodes' packages, not container \
             images: the folder holds no image archive (*.tar), so the nodes pull Longhorn's and \
             the CSI snapshot controller's images when the agent installs it, which needs access \
             to their registries (or a registry mirror configured in containerd)",
            longhorn_chart_name()
        ));
    }
    if config.addons.offline.is_none() && !is_bootstrapped(config) {
        let mut wants: Vec<String> = Vec::new();
        if !storage.node_packages().is_empty() {
            wants.push(format!(
                "{} (storage {}: the node reports its prerequisites unmet)",
                storage.node_packages().join(", "),
                storage_name(storage)
            ));
        }
        for f in config.feature_packages() {
            wants.push(format!(
                "{} ({}: without them {})",
                f.packages.join(", "),
                f.setting,
                f.without
            ));
        }
        if !wants.is_empty() {
            notes.push(format!(
                "the base is not bootstrapped and addons.offline is not set: the nodes install \
                 nothing at first boot, so they need {} in the base already; stage the .deb \
                 files with addons.offline (or bootstrap the base) to have them without a person",
                wants.join("; ")
            ));
        }
    }
    notes
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

    /// A config with `extra` TOML after `[cluster]` and the base of `base` (TOML lines).
    fn config(cluster: &str, addons: &str, base: &str) -> ClusterConfig {
        let text = format!(
            "[cluster]\nname = \"lab\"\n{cluster}\n[addons]\n{addons}\n[image]\ntarget = \"x86_64-efi\"\n\n[image.base]\n{base}\n"
        );
        rackseed_config::parse(&text, Path::new("/tmp/lab/cluster.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    const OFFICIAL: &str = "kind = \"local\"\npath = \"base.img\"";
    const BOOTSTRAP: &str = "kind = \"bootstrap\"\nsuite = \"noble\"\narch = \"amd64\"";

    fn longhorn() -> StagingNeeds {
        StagingNeeds::for_config(&config("", "storage = \"longhorn\"", OFFICIAL))
    }

    #[test]
    fn longhorn_needs_its_packages_for_the_arch_and_the_chart() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        put(dir, "open-iscsi_2.1.9_amd64.deb", b"!<arch>\nx");
        let err = staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("no amd64 package for nfs-common"),
            "{err:#}"
        );
        put(dir, "nfs-common_2.6.4_amd64.deb", b"!<arch>\nx");
        let err = staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("has no longhorn-1.7.2.tgz"),
            "{err:#}"
        );
        put(dir, &longhorn_chart_name(), &[0x1f, 0x8b, 0]);
        put(dir, "notes.txt", b"ignored");
        let files = staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap();
        assert_eq!(files.len(), 3);
        // The same folder is wrong for a Pi.
        let err = staged_files(dir, &longhorn(), Target::Rpi5).unwrap_err();
        assert!(format!("{err:#}").contains("built for amd64, but rpi5 nodes run arm64"));
        // A file that is not a package.
        put(dir, "lvm2_2.03_all.deb", b"<html>");
        let err = staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a Debian package"),
            "{err:#}"
        );
    }

    #[test]
    fn image_archives_must_hold_every_image_longhorn_needs() {
        use images::testing::*;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        put(dir, "open-iscsi_2.1.9_amd64.deb", b"!<arch>\nx");
        put(dir, "nfs-common_2.6.4_amd64.deb", b"!<arch>\nx");
        chart_archive(&dir.join(longhorn_chart_name()), VALUES_1_7_2);
        // No archive: staged without images (the nodes pull them).
        assert_eq!(
            staged_files(dir, &longhorn(), Target::X86_64Efi)
                .unwrap()
                .len(),
            3
        );
        let need = longhorn_images(&dir.join(longhorn_chart_name())).unwrap();
        assert_eq!(need.len(), 14, "{need:?}");
        assert!(need.contains(
            &"docker.io/rancher/mirrored-sig-storage-snapshot-controller:v8.2.0".to_string()
        ));
        // Some images in a docker archive (short names, as docker save writes them), the rest
        // but two in an OCI archive: the two are named.
        let short: Vec<String> = need[..5]
            .iter()
            .map(|n| n.trim_start_matches("docker.io/").to_owned())
            .collect();
        docker_archive(
            &dir.join("a.tar"),
            &short.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        oci_archive(
            &dir.join("b.tar"),
            &need[5..12].iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let err = format!(
            "{:#}",
            staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap_err()
        );
        assert!(
            err.contains("stages container images (a.tar, b.tar), but 2 of the 14 images")
                && err.contains(&need[12])
                && err.contains(&need[13])
                && !err.contains(&need[11]),
            "{err}"
        );
        // With the last two, everything is staged.
        oci_archive(
            &dir.join("c.tar"),
            &need[12..].iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let files = staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap();
        assert_eq!(files.len(), 6, "{files:?}");
        // The build no longer says images are not staged.
        let cfg = config(
            "",
            &format!("storage = \"longhorn\"\noffline = \"{}\"", dir.display()),
            OFFICIAL,
        );
        assert!(staging_notes(&cfg).is_empty(), "{:?}", staging_notes(&cfg));
        // A truncated archive fails the build naming it.
        let bytes = std::fs::read(dir.join("c.tar")).unwrap();
        std::fs::write(dir.join("c.tar"), &bytes[..700]).unwrap();
        let err = format!(
            "{:#}",
            staged_files(dir, &longhorn(), Target::X86_64Efi).unwrap_err()
        );
        assert!(
            err.contains("c.tar: not a container image archive ctr can import"),
            "{err}"
        );
        // Archives are only taken for longhorn.
        let none = StagingNeeds::default();
        assert!(staged_files(dir, &none, Target::X86_64Efi)
            .unwrap()
            .iter()
            .all(|f| !f.to_string_lossy().ends_with(".tar")));
    }

    #[test]
    fn an_official_base_stages_keepalived_curl_and_arping_for_the_features_that_need_them() {
        let features = (
            "api-address = \"10.0.0.100\"",
            "storage = \"none\"\n\n[addons.metallb]\naddresses = \"auto\"",
        );
        let official = StagingNeeds::for_config(&config(features.0, features.1, OFFICIAL));
        assert_eq!(
            official.packages,
            [
                ("keepalived", "cluster.api-address".to_string()),
                ("curl", "cluster.api-address".to_string()),
                (
                    "iputils-arping",
                    "addons.metallb.addresses = \"auto\"".to_string()
                ),
            ]
        );
        assert!(!official.longhorn_chart);
        // A bootstrapped base has them as packages: nothing to stage for them.
        let boot = StagingNeeds::for_config(&config(features.0, features.1, BOOTSTRAP));
        assert_eq!(boot, StagingNeeds::default());
        // Without the features, nothing either.
        assert_eq!(
            StagingNeeds::for_config(&config("", "storage = \"none\"", OFFICIAL)),
            StagingNeeds::default()
        );

        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        put(dir, "keepalived_2.2.8-1_amd64.deb", b"!<arch>\nx");
        let err = staged_files(dir, &official, Target::X86_64Efi).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("no amd64 package for curl, iputils-arping")
                && msg.contains("curl for cluster.api-address")
                && msg.contains("apt-get download curl iputils-arping"),
            "{msg}"
        );
        put(dir, "curl_8.5.0-2_amd64.deb", b"!<arch>\nx");
        put(dir, "iputils-arping_20240117-1_amd64.deb", b"!<arch>\nx");
        put(dir, "libcurl4t64_8.5.0-2_amd64.deb", b"!<arch>\nx");
        assert_eq!(
            staged_files(dir, &official, Target::X86_64Efi)
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn the_build_says_what_is_and_is_not_staged() {
        let lh = config(
            "",
            "storage = \"longhorn\"\noffline = \"/srv/offline\"",
            OFFICIAL,
        );
        let notes = staging_notes(&lh);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("stages longhorn's chart (longhorn-1.7.2.tgz)")
                && notes[0].contains("not container images"),
            "{notes:?}"
        );
        // An official base without the folder: what the nodes must have already.
        let bare = config(
            "api-address = \"10.0.0.100\"",
            "storage = \"longhorn\"",
            OFFICIAL,
        );
        let notes = staging_notes(&bare);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("open-iscsi, nfs-common (storage longhorn")
                && notes[0].contains("keepalived, curl (cluster.api-address: without them the node cannot hold the floating API address"),
            "{notes:?}"
        );
        // A bootstrapped base carries them: nothing to say.
        let boot = config(
            "api-address = \"10.0.0.100\"",
            "storage = \"none\"",
            BOOTSTRAP,
        );
        assert!(staging_notes(&boot).is_empty());
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
