//! Base (c): a root filesystem bootstrapped from packages with `debootstrap --variant=minbase`
//! plus what a bootable node needs (systemd, dbus, udev, a kernel and, on x86, systemd-boot),
//! cached as a tarball under `<cache>/bootstrap/<key>.tar`, the key being a hash of every input
//! (suite, mirror, arch, packages, mode), so a suite pays the ~2 minutes once.
//!
//! A foreign architecture (arm64 on an x86 build machine) is bootstrapped fully, packages
//! configured and an initramfs built, when the kernel can run its binaries: an enabled
//! binfmt_misc handler matching its ELF header with the `F` (fix-binary) flag, so the
//! interpreter works inside the chroot ([`can_run_arch`]; `scripts/install-deps` registers
//! qemu-user-static's). Without one it gets the first stage only (`--foreign`, with a warning):
//! packages are unpacked but not configured, which is right for image-layout tests and not for
//! booting. `foreign` is part of the cache key, so the two never share a tarball. The mirror defaults to the build machine's own
//! apt sources ([`super::apt_sources`]). debootstrap needs root. The image composed from a
//! tarball for a target is cached next to it ([`ensure_composed`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::apt_sources;
use crate::disk::compose::{self, Shape};
use crate::tool::Tool;
use rackseed_config::Target;

/// What to bootstrap, after defaults are filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootstrapSpec {
    pub suite: String,
    pub mirror: String,
    pub arch: String,
    /// Sorted, de-duplicated, including the defaults for the arch.
    pub packages: Vec<String>,
    /// First stage only (arch not runnable on this machine).
    pub foreign: bool,
}

/// The packages every bootstrapped base gets on `arch` besides the configured ones:
/// booting (systemd, dbus, udev, a kernel, systemd-boot on x86), and the floating API
/// address's keepalived with curl for its health check (`firstboot`'s `system::keepalived`),
/// so a cluster with `cluster.api-address` needs nothing fetched at first boot; and iputils'
/// arping, which MetalLB's `addresses = "auto"` probes candidates with (`firstboot`'s
/// `addons::autorange`; the `arping` package is another program with other options).
pub fn default_packages(arch: &str) -> Vec<&'static str> {
    let mut p = vec![
        "systemd",
        "systemd-sysv",
        "dbus",
        "udev",
        "keepalived",
        "curl",
        "iputils-arping",
    ];
    match arch {
        "amd64" => p.extend(["linux-image-amd64", "systemd-boot-efi"]),
        "arm64" => p.push("linux-image-arm64"),
        _ => {}
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
    /// Fills defaults: the mirror from `/etc/apt` when `mirror` is `None`.
    pub fn new(
        suite: &str,
        mirror: Option<&str>,
        arch: &str,
        packages: &[String],
        etc_apt: &Path,
    ) -> Result<Self> {
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
        let mut pk: Vec<String> = default_packages(arch)
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
            suite: suite.into(),
            mirror,
            arch: arch.into(),
            packages: pk,
            foreign: arch != host_arch() && !can_run_arch(arch, BINFMT_DIR),
        })
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
    crate::tool::require(&[("debootstrap", "debootstrap"), ("tar", "tar")])?;
    let work = tempfile::Builder::new()
        .prefix("bootstrap-")
        .tempdir_in(&dir)?;
    let root = work.path().join("root");
    let mut t = Tool::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--arch={}", spec.arch));
    if spec.foreign {
        tracing::warn!(
            "no binfmt_misc handler (flag F) runs {} binaries here: bootstrapping with --foreign, \
             so packages stay unconfigured and the image will not boot; run scripts/install-deps \
             as root to register qemu-user-static",
            spec.arch
        );
        t = t.arg("--foreign");
    }
    t.arg(format!("--include={}", spec.packages.join(",")))
        .arg(&spec.suite)
        .arg(&root)
        .arg(&spec.mirror)
        // A full foreign bootstrap runs every maintainer script under emulation (mkinitramfs
        // alone took ~25 min on a loaded 2-core machine).
        .timeout(Duration::from_secs(if spec.arch == host_arch() {
            1800
        } else {
            7200
        }))
        .run()
        .await
        .with_context(|| {
            format!(
                "bootstrapping {} {} from {}",
                spec.suite, spec.arch, spec.mirror
            )
        })?;
    if !spec.foreign {
        // Downloaded packages are not part of the system.
        if let Ok(rd) = std::fs::read_dir(root.join("var/cache/apt/archives")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    remove_ssh_host_keys(&root)?;
    let partial = work.path().join("tree.tar");
    Tool::new("tar")
        .args(["--numeric-owner", "--xattrs", "--acls", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg(".")
        .timeout(Duration::from_secs(600))
        .run()
        .await
        .context("archiving the bootstrapped tree")?;
    std::fs::rename(&partial, &tar).with_context(|| format!("storing {}", tar.display()))?;
    Ok(tar)
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
        for arch in ["amd64", "arm64"] {
            let p = default_packages(arch);
            assert!(
                p.contains(&"keepalived") && p.contains(&"curl"),
                "{arch}: {p:?}"
            );
            assert!(p.contains(&"iputils-arping"), "{arch}: {p:?}");
        }
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
        let mut left: Vec<_> = std::fs::read_dir(&ssh)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["moduli", "sshd_config"]);
        assert!(remove_ssh_host_keys(&d.path().join("none"))
            .unwrap()
            .is_empty());
    }
}
