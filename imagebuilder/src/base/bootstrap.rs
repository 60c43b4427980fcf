//! Base (c): a root filesystem bootstrapped from packages with `debootstrap --variant=minbase`
//! plus what a bootable node needs (systemd, dbus, udev, a kernel and, on x86, systemd-boot)
//! and what makes it behave like Ubuntu Server on first boot ([`default_packages`],
//! [`super::server`]), cached as a tarball under `<cache>/bootstrap/<key>.tar`, the key being a
//! hash of every input (distribution, suite, mirror, arch, packages, mode and
//! [`TREE_VERSION`], the version of what this module does to the tree), so a suite pays the
//! bootstrap once. Debian and Ubuntu suites go the same way; [`super::suite`] picks
//! debootstrap's script and the archive keyring.
//!
//! The bootstrap runs in two stages, as debootstrap's `--foreign`/`--second-stage` do: the
//! first unpacks the packages with the build machine's own tools; between the stages
//! [`prepare_second_stage`] tells dpkg to leave out documentation, manual pages and
//! translations (`path-exclude`, as Ubuntu's minimal images do) and removes those the first
//! stage unpacked; for a foreign architecture it stores the packages uncompressed
//! ([`super::deb`]) and, on arm64, limits the initramfs to the Raspberry Pi's boot media
//! ([`super::initramfs`]), the two slowest parts under emulation; the second stage runs the
//! packages' maintainer scripts inside the tree (`chroot`). The tree is built under the
//! temporary folder (`TMPDIR`; in memory in the tests) when a chroot works there
//! ([`work_parent`]), so dpkg's many `fsync`s cost nothing; only the finished tarball goes to
//! the cache.
//!
//! A foreign architecture (arm64 on an x86 build machine) is bootstrapped fully, packages
//! configured and an initramfs built, when the kernel can run its binaries: an enabled
//! binfmt_misc handler matching its ELF header with the `F` (fix-binary) flag, so the
//! interpreter works inside the chroot ([`can_run_arch`]; `scripts/install-deps` registers
//! qemu-user-static's). Without one it gets the first stage only (with a warning):
//! packages are unpacked but not configured, which is right for image-layout tests and not for
//! booting. `foreign` is part of the cache key, so the two never share a tarball. The mirror
//! defaults to the build machine's own apt sources ([`super::apt_sources`]). debootstrap needs
//! root. The image composed from a tarball for a target is cached next to it
//! ([`ensure_composed`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::apt_sources;
use super::suite::{self, Distro};
use crate::disk::compose::{self, Shape};
use crate::tool::Tool;
use rackseed_config::Target;

/// The version of what this module does to a bootstrapped tree besides debootstrap (the
/// stages' preparation, [`super::server`]'s defaults). Part of the cache key: raise it with
/// every change to that code, so no cache holds a tree made the old way.
pub const TREE_VERSION: u32 = 4;

/// What to bootstrap, after defaults are filled in. Everything serialised is part of the
/// cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootstrapSpec {
    pub distro: Distro,
    pub suite: String,
    pub mirror: String,
    pub arch: String,
    /// Sorted, de-duplicated, including the defaults for the distribution and arch.
    pub packages: Vec<String>,
    /// First stage only (arch not runnable on this machine).
    pub foreign: bool,
    pub tree_version: u32,
    /// The keyring verifying the mirror ([`BootstrapSpec::with_keyring`]); `None`: the
    /// distribution's ([`suite::keyring`]).
    /// It checks the download and changes nothing in the tree, so it is not in the key.
    #[serde(skip)]
    pub keyring: Option<PathBuf>,
}

/// The packages every bootstrapped base gets on `arch` besides the configured ones:
///
/// - booting: systemd, dbus, udev, the distribution's kernel, systemd-boot on x86;
/// - behaving like Ubuntu Server on first boot: cloud-init (the NoCloud seed's users, SSH keys
///   and network-config), netplan.io (cloud-init's network renderer here: with no ifupdown its
///   `eni` renderer is unavailable, cloud-init 22.4 `cloudinit/net/renderers.py`), systemd's
///   networkd (enabled by [`super::server`]), resolved and timesyncd (a Raspberry Pi has no
///   clock, and TLS to the snap store needs the time), openssh-server (host keys made at first
///   boot), snapd (real MicroK8s installs on a connected machine), cloud-guest-utils' growpart
///   (cloud-init's growpart module grows the root partition, resizefs the filesystem), sudo
///   (cloud-init's `sudo:` for users), ca-certificates, libpam-systemd (logind sessions for SSH);
/// - the floating API address's keepalived with curl for its health check (`firstboot`'s
///   `system::keepalived`), so a cluster with `cluster.api-address` needs nothing fetched at
///   first boot; and iputils' arping, which MetalLB's `addresses = "auto"` probes candidates
///   with (`firstboot`'s `addons::autorange`; the `arping` package is another program).
pub fn default_packages(distro: Distro, arch: &str) -> Vec<&'static str> {
    let mut p = vec![
        "systemd",
        "systemd-sysv",
        "dbus",
        "udev",
        "cloud-init",
        "netplan.io",
        "systemd-resolved",
        "systemd-timesyncd",
        "openssh-server",
        "snapd",
        "cloud-guest-utils",
        "sudo",
        "ca-certificates",
        "libpam-systemd",
        "keepalived",
        "curl",
        "iputils-arping",
        // debootstrap resolves plain dependencies only, not virtual packages or alternatives:
        // snapd's `default-dbus-session-bus | dbus-session-bus` and python3-cryptography's
        // `python3-cffi-backend-api-min` (cloud-init through python3-oauthlib) are named here,
        // else the second stage leaves those packages unconfigured and fails.
        "dbus-user-session",
        "python3-cffi-backend",
    ];
    p.extend(distro.kernel_package(arch));
    if arch == "amd64" {
        p.push("systemd-boot-efi");
    }
    p
}

/// The Debian architecture of this build machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl BootstrapSpec {
    /// Fills defaults: the mirror from `/etc/apt` when `mirror` is `None`, the distribution
    /// from debootstrap's scripts ([`suite::select`]).
    pub fn new(
        suite: &str,
        mirror: Option<&str>,
        arch: &str,
        packages: &[String],
        etc_apt: &Path,
    ) -> Result<Self> {
        Self::new_with_scripts(
            suite,
            mirror,
            arch,
            packages,
            etc_apt,
            Path::new(suite::SCRIPTS_DIR),
        )
    }

    /// [`BootstrapSpec::new`] with debootstrap's scripts in `scripts_dir`. Without a script
    /// (debootstrap not installed: a cached tarball may still serve) the distribution comes
    /// from the suites rackseed knows.
    pub fn new_with_scripts(
        suite: &str,
        mirror: Option<&str>,
        arch: &str,
        packages: &[String],
        etc_apt: &Path,
        scripts_dir: &Path,
    ) -> Result<Self> {
        let distro = match suite::select(suite, scripts_dir) {
            Ok(sel) => sel.distro,
            Err(e) => suite::known_distro(suite).ok_or(e)?,
        };
        let mirror = match mirror {
            Some(m) => m.to_string(),
            None => apt_sources::mirror_for(&apt_sources::read_sources(etc_apt), suite)
                .with_context(|| {
                    format!(
                        "no apt source in {} serves suite {suite:?}; set image.base.mirror",
                        etc_apt.display()
                    )
                })?,
        };
        if distro.kernel_package(arch).is_none() {
            bail!("bootstrapping {distro:?} for arch {arch:?} is not supported (amd64, arm64)");
        }
        let mut pk: Vec<String> = default_packages(distro, arch)
            .into_iter()
            .map(str::to_string)
            .collect();
        pk.extend(packages.iter().cloned());
        pk.sort();
        pk.dedup();
        for p in &pk {
            if p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
            {
                bail!("invalid package name {p:?}");
            }
        }
        Ok(BootstrapSpec {
            distro,
            suite: suite.into(),
            mirror,
            arch: arch.into(),
            packages: pk,
            foreign: arch != host_arch() && !can_run_arch(arch, BINFMT_DIR),
            tree_version: TREE_VERSION,
            keyring: None,
        })
    }

    /// Verifies the mirror with `keyring` instead of the distribution's keyring.
    pub fn with_keyring(mut self, keyring: Option<PathBuf>) -> Self {
        self.keyring = keyring;
        self
    }

    /// Cache key: hex SHA-256 of the spec (first 24 digits).
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("spec serialises");
        hex::encode(Sha256::digest(json))[..24].to_string()
    }
}

/// Where the kernel lists its binfmt_misc handlers.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// The first 20 bytes of an executable ELF for `arch` (little-endian, 64-bit), which is what
/// binfmt_misc handlers for it match; `None` for an arch this module does not know.
pub fn elf_header(arch: &str) -> Option<[u8; 20]> {
    let machine: u16 = match arch {
        "arm64" => 0xb7,
        "amd64" => 0x3e,
        "riscv64" => 0xf3,
        _ => return None,
    };
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    Some(h)
}

/// Whether one binfmt_misc handler entry (the text of `/proc/sys/fs/binfmt_misc/<name>`) is
/// enabled, has the `F` flag and matches `header` at its offset under its mask.
pub fn binfmt_entry_runs(entry: &str, header: &[u8]) -> bool {
    let mut enabled = false;
    let (mut flags, mut offset, mut magic, mut mask) = ("", 0usize, None, None);
    for line in entry.lines() {
        let line = line.trim();
        if line == "enabled" {
            enabled = true;
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = v.trim();
        } else if let Some(v) = line.strip_prefix("offset ") {
            offset = v.trim().parse().unwrap_or(usize::MAX);
        } else if let Some(v) = line.strip_prefix("magic ") {
            magic = hex::decode(v.trim()).ok();
        } else if let Some(v) = line.strip_prefix("mask ") {
            mask = hex::decode(v.trim()).ok();
        }
    }
    let Some(magic) = magic else { return false };
    let mask = mask.unwrap_or_else(|| vec![0xff; magic.len()]);
    if !enabled || !flags.contains('F') || magic.is_empty() || mask.len() != magic.len() {
        return false;
    }
    let Some(window) = offset
        .checked_add(magic.len())
        .and_then(|end| header.get(offset..end))
    else {
        return false;
    };
    window
        .iter()
        .zip(&magic)
        .zip(&mask)
        .all(|((h, m), k)| h & k == m & k)
}

/// Whether this machine can run `arch`'s binaries, also inside a chroot: natively, or through
/// an enabled binfmt_misc handler with the `F` flag listed in `binfmt_dir`.
pub fn can_run_arch(arch: &str, binfmt_dir: &str) -> bool {
    if arch == host_arch() {
        return true;
    }
    let Some(header) = elf_header(arch) else {
        return false;
    };
    let Ok(rd) = std::fs::read_dir(binfmt_dir) else {
        return false;
    };
    rd.flatten()
        .filter(|e| !matches!(e.file_name().to_str(), Some("register" | "status")))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .any(|text| binfmt_entry_runs(&text, &header))
}

/// Returns the cached tarball for `spec`, bootstrapping it first when absent.
pub async fn ensure_tarball(spec: &BootstrapSpec, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("bootstrap");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join(format!("{}-{}-{}.tar", spec.suite, spec.arch, spec.key()));
    if tar.is_file() {
        return Ok(tar);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bootstrapping a base with debootstrap needs root (or use a cached tarball / an image base)");
    }
    crate::tool::require(&[
        ("debootstrap", "debootstrap"),
        ("tar", "tar"),
        ("chroot", "coreutils"),
        ("systemctl", "systemd"),
    ])?;
    let sel = suite::select(&spec.suite, Path::new(suite::SCRIPTS_DIR))?;
    if sel.distro != spec.distro {
        bail!(
            "debootstrap's script for {} is for {:?}, the spec says {:?}",
            spec.suite,
            sel.distro,
            spec.distro
        );
    }
    let keyring = suite::keyring(spec.distro, spec.keyring.as_deref())?;
    // The tree is built in the temporary folder (in memory in the tests: dpkg's fsyncs are
    // free there) when a chroot works there; only the finished tarball goes to the cache.
    let work = tempfile::Builder::new()
        .prefix("rackseed-bootstrap-")
        .tempdir_in(work_parent(&std::env::temp_dir(), &dir))?;
    let root = work.path().join("root");
    let native = spec.arch == host_arch();
    let started = std::time::Instant::now();
    if spec.foreign {
        tracing::warn!(
            "no binfmt_misc handler (flag F) runs {} binaries here: bootstrapping the first \
             stage only, so packages stay unconfigured and the image will not boot; run \
             scripts/install-deps as root to register qemu-user-static",
            spec.arch
        );
    }
    Tool::new("debootstrap")
        .arg("--variant=minbase")
        .arg("--foreign")
        .arg(format!("--arch={}", spec.arch))
        .arg(format!("--keyring={}", keyring.display()))
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(&spec.suite)
        .arg(&root)
        .arg(&spec.mirror)
        .arg(&sel.script)
        .timeout(Duration::from_secs(1800))
        .run()
        .await
        .with_context(|| {
            format!(
                "bootstrapping {} {} from {} (first stage)",
                spec.suite, spec.arch, spec.mirror
            )
        })?;
    tracing::info!(
        "bootstrap {} {}: first stage done at {:.0?}",
        spec.suite,
        spec.arch,
        started.elapsed()
    );
    if !spec.foreign {
        prepare_second_stage(&root)?;
        let kept = trim_package_lists(&root)?;
        tracing::debug!("bootstrap: package lists trimmed to the {kept} downloaded packages");
        if spec.packages.iter().any(|p| p == "openssh-server") {
            placeholder_ssh_host_keys(&root)?;
        }
        if super::initramfs::applies_to(&spec.arch) {
            super::initramfs::write(&root)?;
        }
        if !native {
            let n = store_archives_uncompressed(&root).await?;
            tracing::info!(
                "bootstrap {} {}: {n} packages stored uncompressed for the emulated dpkg at {:.0?}",
                spec.suite,
                spec.arch,
                started.elapsed()
            );
        }
        let second = Tool::new("chroot")
            .arg(&root)
            .args(["/debootstrap/debootstrap", "--second-stage"])
            // The kernel's postinst hook makes no initramfs (initramfs-tools'
            // `/etc/kernel/postinst.d/initramfs-tools` exits on `INITRD=No`), and so neither
            // does initramfs-tools' trigger at the end (`update-initramfs -u` updates existing
            // ones only): it is built once below, with every package's hooks in place, instead
            // of twice (115-130 s each under emulation).
            .env("INITRD", "No")
            // Under emulation every maintainer script runs through qemu-user.
            .timeout(Duration::from_secs(if native { 1800 } else { 5400 }))
            .run()
            .await;
        if let Err(e) = second {
            // The tree (and its log) goes with the temporary folder: keep the log's end.
            let log = std::fs::read_to_string(root.join("debootstrap/debootstrap.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!(
                "bootstrapping {} {} (second stage, in the tree); the end of its \
                 debootstrap.log:\n{}",
                spec.suite,
                spec.arch,
                tail.join("\n")
            )));
        }
        tracing::info!(
            "bootstrap {} {}: second stage done at {:.0?}",
            spec.suite,
            spec.arch,
            started.elapsed()
        );
        build_initramfs(&root, native).await?;
        // Downloaded packages and the mirror's package lists (trimmed above; stale on a
        // node, where `apt update` fetches them) are not part of the system.
        remove_package_lists(&root)?;
        if let Ok(rd) = std::fs::read_dir(root.join("var/cache/apt/archives")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        super::server::apply(&root).await?;
    }
    remove_ssh_host_keys(&root)?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .suffix(".tar")
        .tempfile_in(&dir)?
        .into_temp_path();
    Tool::new("tar")
        .args(["--numeric-owner", "--xattrs", "--acls", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&*partial)
        .arg(".")
        .timeout(Duration::from_secs(600))
        .run()
        .await
        .context("archiving the bootstrapped tree")?;
    partial
        .persist(&tar)
        .with_context(|| format!("storing {}", tar.display()))?;
    Ok(tar)
}

/// Where to build a tree: `tmp` when its filesystem allows device nodes and running programs
/// (the second stage runs in a chroot that needs `/dev/null`; Debian mounts `/dev/shm` without
/// `nodev` but many systems do not), else `fallback` (the cache folder).
pub fn work_parent(tmp: &Path, fallback: &Path) -> PathBuf {
    use nix::sys::statvfs::{statvfs, FsFlags};
    match statvfs(tmp) {
        Ok(v) if !v.flags().intersects(FsFlags::ST_NODEV | FsFlags::ST_NOEXEC) => tmp.into(),
        _ => fallback.into(),
    }
}

/// What dpkg leaves out of the tree (`/etc/dpkg/dpkg.cfg.d/`, kept in the image so later
/// installs on the node leave them out too): documentation but its copyright files, manual
/// and info pages, translations but `locale.alias`. Nothing a program reads at run time.
pub const DPKG_EXCLUDES: &str = "\
# rackseed: no documentation, manual pages or translations (as in Ubuntu's minimal images).
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
";

/// Where [`DPKG_EXCLUDES`] goes in the tree.
pub const DPKG_EXCLUDES_PATH: &str = "etc/dpkg/dpkg.cfg.d/rackseed-excludes";

/// Between debootstrap's stages: writes [`DPKG_EXCLUDES`] and removes what the first stage
/// unpacked into the excluded folders (the second stage's dpkg would not).
pub fn prepare_second_stage(root: &Path) -> Result<()> {
    let cfg = root.join(DPKG_EXCLUDES_PATH);
    std::fs::create_dir_all(cfg.parent().expect("has a parent"))?;
    std::fs::write(&cfg, DPKG_EXCLUDES).with_context(|| format!("writing {}", cfg.display()))?;
    for (dir, keep) in [
        ("usr/share/doc", Some("copyright")),
        ("usr/share/man", None),
        ("usr/share/info", None),
        ("usr/share/locale", Some("locale.alias")),
        ("usr/share/lintian", None),
    ] {
        prune(&root.join(dir), keep)?;
    }
    Ok(())
}

/// Between debootstrap's stages: cuts the mirror's package lists in the tree
/// (`var/lib/apt/lists/*_Packages`, ~50 MB for bookworm's main) down to the stanzas of the
/// packages the first stage downloaded (`debootstrap/debpaths`). Returns how many stanzas
/// were kept.
///
/// Why: the second stage resolves each pre-dependency's dependencies with debootstrap's
/// `resolve_deps`, which runs its Perl `pkgdetails` over the whole list a few times per
/// pre-dependency (debootstrap's `functions`); under emulation each pass takes about 5 s and
/// a cold arm64 bootstrap spent ~3 minutes there. The result is the same: the second stage can
/// only install the downloaded packages (`debfor` looks them up in `debpaths`), so stanzas of
/// other packages never change what it does.
pub fn trim_package_lists(root: &Path) -> Result<usize> {
    let debpaths = root.join("debootstrap/debpaths");
    let listed = std::fs::read_to_string(&debpaths)
        .with_context(|| format!("reading {}", debpaths.display()))?;
    let wanted: std::collections::HashSet<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let lists = root.join("var/lib/apt/lists");
    let mut kept = 0;
    for e in std::fs::read_dir(&lists).with_context(|| format!("reading {}", lists.display()))? {
        let path = e?.path();
        if !path.to_string_lossy().ends_with("_Packages") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let (trimmed, n) = stanzas_of(&text, &wanted);
        kept += n;
        let tmp = path.with_extension("rackseed-trim");
        std::fs::write(&tmp, trimmed).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(kept)
}

/// The stanzas of a `Packages` list whose `Package:` is in `wanted`, and how many.
fn stanzas_of(text: &str, wanted: &std::collections::HashSet<&str>) -> (String, usize) {
    let mut out = String::new();
    let mut n = 0;
    for stanza in text.split("\n\n") {
        let stanza = stanza.trim_matches('\n');
        let name = stanza
            .lines()
            .find_map(|l| l.strip_prefix("Package:"))
            .map(str::trim);
        if name.is_some_and(|p| wanted.contains(p)) {
            out.push_str(stanza);
            out.push_str("\n\n");
            n += 1;
        }
    }
    (out, n)
}

/// Builds the initramfs of every kernel in the tree (`update-initramfs -c -k <version>`, in
/// the chroot), which the second stage was told not to ([`ensure_tarball`]), then points
/// `/initrd.img` at it as the kernel's postinst would have (`linux-update-symlinks`, which
/// links only an initramfs that exists). Nothing to do in a tree without a kernel.
async fn build_initramfs(root: &Path, native: bool) -> Result<()> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("vmlinuz-").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    for v in &versions {
        Tool::new("chroot")
            .arg(root)
            .args(["update-initramfs", "-c", "-k", v])
            .timeout(Duration::from_secs(if native { 600 } else { 1800 }))
            .run()
            .await
            .with_context(|| format!("building the initramfs of {v} in the bootstrapped tree"))?;
        if root.join("usr/bin/linux-update-symlinks").exists() {
            Tool::new("chroot")
                .arg(root)
                .args(["linux-update-symlinks", "install", v])
                .arg(format!("/boot/vmlinuz-{v}"))
                .timeout(Duration::from_secs(120))
                .run()
                .await
                .with_context(|| format!("linking /initrd.img to {v}'s initramfs"))?;
        }
    }
    Ok(())
}

/// Removes the mirror's package lists from the tree (`var/lib/apt/lists`, but its `partial`
/// folder and lock, which apt expects): a node fetches current ones with `apt update`, as on
/// Ubuntu's cloud images.
pub fn remove_package_lists(root: &Path) -> Result<()> {
    let lists = root.join("var/lib/apt/lists");
    let Ok(rd) = std::fs::read_dir(&lists) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type()?.is_file() && e.file_name() != "lock" {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Rewrites the packages the first stage downloaded (`var/cache/apt/archives/*.deb`) with
/// uncompressed data ([`super::deb`]), two at a time, so the emulated dpkg of the second stage
/// does not decompress them. Returns how many were rewritten.
pub async fn store_archives_uncompressed(root: &Path) -> Result<usize> {
    let dir = root.join("var/cache/apt/archives");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    // Largest first, so the two workers finish together.
    debs.sort_by_key(|p| std::cmp::Reverse(p.metadata().map(|m| m.len()).unwrap_or(0)));
    tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(deb) = debs.get(i) else {
                                return Ok(());
                            };
                            if super::deb::store_data_uncompressed(deb)? {
                                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("worker does not panic")?;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(done.into_inner())
    })
    .await
    .context("package rewrite task failed")?
}

/// Removes everything under `dir` but files named `keep` (at any depth).
fn prune(dir: &Path, keep: Option<&str>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            prune(&p, keep)?;
            // Still holding a kept file: stays.
            let _ = std::fs::remove_dir(&p);
        } else if keep.is_none_or(|k| e.file_name() != k) {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The host keys openssh-server's postinst makes when absent ([`placeholder_ssh_host_keys`]).
const SSH_HOST_KEYS: &[&str] = &[
    "ssh_host_rsa_key",
    "ssh_host_dsa_key",
    "ssh_host_ecdsa_key",
    "ssh_host_ed25519_key",
];

/// Between debootstrap's stages: empty files where openssh-server's postinst would make host
/// keys (it makes only missing ones: `create_key` in bookworm's `openssh-server.postinst`), so
/// the second stage does not generate keys (an RSA key takes seconds under emulation) that
/// [`remove_ssh_host_keys`] deletes anyway: every node makes its own at first boot.
pub fn placeholder_ssh_host_keys(root: &Path) -> Result<()> {
    let dir = root.join("etc/ssh");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for k in SSH_HOST_KEYS {
        let p = dir.join(k);
        std::fs::write(&p, b"").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Removes the SSH host keys openssh-server's installation made in `root` (when it is among
/// the packages): every machine flashed from an image of this tree would share them. The
/// customize step removes them from any base too; this keeps them out of the cache.
pub fn remove_ssh_host_keys(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("etc/ssh");
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(removed);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::customize::is_ssh_host_key(&name) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Returns the cached raw image composed from `spec`'s tree in `target`'s layout
/// (`<cache>/bootstrap/<tarball>.<target>.img`), composing it on first use. Composing means
/// unpacking ~1 GB of files and building filesystems from them, so caching it turns every
/// later build from the same base into a sparse copy.
pub async fn ensure_composed(
    spec: &BootstrapSpec,
    target: Target,
    cache: &Path,
) -> Result<PathBuf> {
    let tar = ensure_tarball(spec, cache).await?;
    let img = tar.with_extension(format!("{}.img", target.as_str()));
    if img.is_file() {
        return Ok(img);
    }
    let work = tempfile::Builder::new()
        .prefix("compose-")
        .tempdir_in(cache.join("bootstrap"))?;
    let tree = work.path().join("tree");
    unpack(&tar, &tree).await?;
    let partial = work.path().join("composed.img");
    compose::compose(&tree, target, Shape::Minimal, &partial).await?;
    std::fs::rename(&partial, &img).with_context(|| format!("storing {}", img.display()))?;
    Ok(img)
}

/// Unpacks `tar` into the empty folder `dest` (owners and modes kept).
pub async fn unpack(tar: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    Tool::new("tar")
        .args(["--numeric-owner", "--xattrs", "--acls", "-xpf"])
        .arg(tar)
        .arg("-C")
        .arg(dest)
        .timeout(Duration::from_secs(600))
        .run()
        .await
        .with_context(|| format!("unpacking {}", tar.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    #[test]
    fn binfmt_entry_matches_only_an_enabled_fixed_handler_for_the_arch() {
        let arm = elf_header("arm64").unwrap();
        let x86 = elf_header("amd64").unwrap();
        assert!(binfmt_entry_runs(QEMU_AARCH64, &arm));
        assert!(!binfmt_entry_runs(QEMU_AARCH64, &x86));
        assert!(!binfmt_entry_runs(
            &QEMU_AARCH64.replace("enabled", "disabled"),
            &arm
        ));
        // Without F the interpreter is looked up inside the chroot, where it is missing.
        assert!(!binfmt_entry_runs(&QEMU_AARCH64.replace("POF", "PO"), &arm));
        assert!(!binfmt_entry_runs(
            &QEMU_AARCH64.replace("offset 0", "offset 4"),
            &arm
        ));
        assert!(!binfmt_entry_runs("enabled\nflags: F\n", &arm));
        assert!(elf_header("mips").is_none());
    }

    #[test]
    fn can_run_arch_reads_handlers_from_the_binfmt_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("status"), "enabled\n").unwrap();
        std::fs::write(dir.path().join("register"), "").unwrap();
        assert!(can_run_arch(host_arch(), d));
        let other = if host_arch() == "arm64" {
            "amd64"
        } else {
            "arm64"
        };
        assert!(!can_run_arch(other, d));
        let entry = if other == "arm64" {
            QEMU_AARCH64.to_string()
        } else {
            QEMU_AARCH64.replace("b700", "3e00")
        };
        std::fs::write(dir.path().join("qemu-x"), entry).unwrap();
        assert!(can_run_arch(other, d));
        assert!(!can_run_arch(other, "/nonexistent"));
    }

    #[test]
    fn spec_fills_mirror_from_apt_and_keys_on_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/x.sources"),
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\nComponents: main\n",
        )
        .unwrap();
        let a =
            BootstrapSpec::new("bookworm", None, "amd64", &["htop".into()], dir.path()).unwrap();
        assert_eq!(a.mirror, "http://m.example/debian");
        assert!(
            a.packages.contains(&"systemd-boot-efi".to_string())
                && a.packages.contains(&"htop".to_string())
                && a.packages.contains(&"iputils-arping".to_string())
        );
        for distro in [Distro::Debian, Distro::Ubuntu] {
            for arch in ["amd64", "arm64"] {
                let p = default_packages(distro, arch);
                for want in [
                    "keepalived",
                    "curl",
                    "iputils-arping",
                    "cloud-init",
                    "openssh-server",
                    "snapd",
                    "netplan.io",
                    "cloud-guest-utils",
                    "systemd-resolved",
                    distro.kernel_package(arch).unwrap(),
                ] {
                    assert!(p.contains(&want), "{distro:?} {arch}: no {want} in {p:?}");
                }
                assert_eq!(p.contains(&"systemd-boot-efi"), arch == "amd64");
            }
        }
        assert_eq!(a.distro, Distro::Debian);
        assert_eq!(a.tree_version, TREE_VERSION);
        let b = BootstrapSpec::new("bookworm", None, "amd64", &[], dir.path()).unwrap();
        assert_ne!(a.key(), b.key());
        assert_eq!(
            b.key(),
            BootstrapSpec::new("bookworm", None, "amd64", &[], dir.path())
                .unwrap()
                .key()
        );
        assert!(BootstrapSpec::new("trixie", None, "amd64", &[], dir.path())
            .unwrap_err()
            .to_string()
            .contains("trixie"));
        assert!(
            BootstrapSpec::new("bookworm", None, "amd64", &["a b".into()], dir.path()).is_err()
        );
        // The keyring verifies the download only: not part of the key.
        let k = b.clone().with_keyring(Some("/k.gpg".into()));
        assert_eq!(k.key(), b.key());
    }

    #[test]
    fn an_ubuntu_suite_gets_ubuntus_script_kernel_and_its_mirror() {
        let apt = tempfile::tempdir().unwrap();
        // The build machine serves Debian only: an Ubuntu suite needs image.base.mirror.
        std::fs::create_dir_all(apt.path().join("sources.list.d")).unwrap();
        std::fs::write(
            apt.path().join("sources.list.d/x.sources"),
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\nComponents: main\n",
        )
        .unwrap();
        let e = BootstrapSpec::new("noble", None, "amd64", &[], apt.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("noble") && e.contains("image.base.mirror"),
            "{e}"
        );
        let scripts = tempfile::tempdir().unwrap();
        std::fs::write(scripts.path().join("gutsy"), "# script\n").unwrap();
        let s = BootstrapSpec::new_with_scripts(
            "noble",
            Some("http://m.example/ubuntu"),
            "arm64",
            &[],
            apt.path(),
            scripts.path(),
        )
        .unwrap();
        assert_eq!(s.distro, Distro::Ubuntu);
        assert_eq!(s.mirror, "http://m.example/ubuntu");
        assert!(s.packages.contains(&"linux-image-raspi".to_string()));
        assert!(!s.packages.iter().any(|p| p == "linux-image-arm64"));
        // Without debootstrap's scripts the distribution comes from the known suites.
        let none = BootstrapSpec::new_with_scripts(
            "noble",
            Some("http://m.example/ubuntu"),
            "arm64",
            &[],
            apt.path(),
            &scripts.path().join("missing"),
        )
        .unwrap();
        assert_eq!(none.key(), s.key());
        assert!(BootstrapSpec::new_with_scripts(
            "mystery",
            Some("http://m.example/x"),
            "amd64",
            &[],
            apt.path(),
            scripts.path(),
        )
        .is_err());
    }

    #[test]
    fn trees_are_built_where_a_chroot_works() {
        let fallback = Path::new("/var/cache/x");
        assert_eq!(work_parent(Path::new("/nonexistent"), fallback), fallback);
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert_eq!(work_parent(d.path(), fallback), d.path());
    }

    #[test]
    fn the_second_stage_leaves_docs_out_but_keeps_copyrights() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in [
            "usr/share/doc/bash/copyright",
            "usr/share/doc/bash/README.gz",
            "usr/share/man/man1/bash.1.gz",
            "usr/share/locale/de/LC_MESSAGES/bash.mo",
            "usr/share/locale/locale.alias",
            "usr/share/i18n/SUPPORTED",
            "usr/bin/bash",
        ] {
            std::fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            std::fs::write(r.join(f), "x").unwrap();
        }
        prepare_second_stage(r).unwrap();
        for kept in [
            "usr/share/doc/bash/copyright",
            "usr/share/locale/locale.alias",
            "usr/share/i18n/SUPPORTED",
            "usr/bin/bash",
        ] {
            assert!(r.join(kept).is_file(), "{kept} removed");
        }
        for gone in [
            "usr/share/doc/bash/README.gz",
            "usr/share/man/man1",
            "usr/share/locale/de",
        ] {
            assert!(!r.join(gone).exists(), "{gone} kept");
        }
        assert_eq!(
            std::fs::read_to_string(r.join(DPKG_EXCLUDES_PATH)).unwrap(),
            DPKG_EXCLUDES
        );
        // dpkg's syntax: every line a comment or a path-exclude/path-include of an absolute glob.
        for l in DPKG_EXCLUDES.lines().filter(|l| !l.starts_with('#')) {
            let (k, v) = l.split_once('=').unwrap();
            assert!(matches!(k, "path-exclude" | "path-include") && v.starts_with("/usr/share/"));
        }
    }

    /// The names in `dir`, sorted.
    fn sorted_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn package_lists_keep_only_the_downloaded_packages_stanzas() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("debootstrap")).unwrap();
        std::fs::write(
            d.path().join("debootstrap/debpaths"),
            "libc6 /var/cache/apt/archives/libc6_2.36_arm64.deb\n\
             systemd /var/cache/apt/archives/systemd_252_arm64.deb\n",
        )
        .unwrap();
        let lists = d.path().join("var/lib/apt/lists");
        std::fs::create_dir_all(lists.join("partial")).unwrap();
        let packages = lists.join("mirror_dists_bookworm_main_binary-arm64_Packages");
        // The last stanza has no blank line after it; a name that only prefixes a wanted one
        // (libc6-dev) and a field that merely mentions one (Depends: systemd) do not count.
        std::fs::write(
            &packages,
            "Package: libc6\nVersion: 2.36\nDepends: libgcc-s1\n\n\
             Package: libc6-dev\nVersion: 2.36\n\n\
             Package: other\nDepends: systemd\n\n\
             Package: systemd\nVersion: 252\nDescription: system\n and service manager\n",
        )
        .unwrap();
        let release = lists.join("mirror_dists_bookworm_Release");
        std::fs::write(&release, "Package: other\n").unwrap();
        assert_eq!(trim_package_lists(d.path()).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&packages).unwrap(),
            "Package: libc6\nVersion: 2.36\nDepends: libgcc-s1\n\n\
             Package: systemd\nVersion: 252\nDescription: system\n and service manager\n\n"
        );
        // Other lists are left alone; no temporary file is left behind.
        assert_eq!(
            std::fs::read_to_string(&release).unwrap(),
            "Package: other\n"
        );
        assert_eq!(
            sorted_names(&lists),
            [
                "mirror_dists_bookworm_Release",
                "mirror_dists_bookworm_main_binary-arm64_Packages",
                "partial"
            ]
        );
        // After the second stage the lists go, apt's partial folder and lock stay.
        std::fs::write(lists.join("lock"), "").unwrap();
        remove_package_lists(d.path()).unwrap();
        assert_eq!(sorted_names(&lists), ["lock", "partial"]);
        // Without debootstrap's list of downloads there is nothing to trim by: a clear error.
        let e = trim_package_lists(&d.path().join("none")).unwrap_err();
        assert!(format!("{e:#}").contains("debpaths"), "{e:#}");
    }

    #[test]
    fn placeholder_host_keys_stop_keygen_and_leave_with_the_keys() {
        let d = tempfile::tempdir().unwrap();
        placeholder_ssh_host_keys(d.path()).unwrap();
        for k in SSH_HOST_KEYS {
            let p = d.path().join("etc/ssh").join(k);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 0, "{}", p.display());
        }
        // openssh-server's postinst adds the .pub only when it generates; placeholders have none.
        assert_eq!(
            remove_ssh_host_keys(d.path()).unwrap().len(),
            SSH_HOST_KEYS.len()
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("etc/ssh")).unwrap().count(),
            0
        );
    }

    #[test]
    fn ssh_host_keys_leave_the_bootstrapped_tree() {
        let d = tempfile::tempdir().unwrap();
        let ssh = d.path().join("etc/ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        for f in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "sshd_config",
            "moduli",
        ] {
            std::fs::write(ssh.join(f), "x").unwrap();
        }
        let removed = remove_ssh_host_keys(d.path()).unwrap();
        assert_eq!(
            removed,
            [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "ssh_host_rsa_key"
            ]
        );
        assert_eq!(sorted_names(&ssh), ["moduli", "sshd_config"]);
        assert!(remove_ssh_host_keys(&d.path().join("none"))
            .unwrap()
            .is_empty());
    }
}
