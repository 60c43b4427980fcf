//! Base (c): a root filesystem bootstrapped from packages with `debootstrap --variant=minbase`
//! plus what a bootable node needs (systemd, dbus, udev, a kernel and, on x86, systemd-boot),
//! cached as a tarball under `<cache>/bootstrap/<key>.tar`, the key being a hash of every input
//! (suite, mirror, arch, packages, mode), so a suite pays the ~2 minutes once.
//!
//! Foreign architectures (arm64 on an x86 build machine without binfmt/qemu-user) get the
//! first stage only (`--foreign`): packages are unpacked but not configured. Such a tree is
//! right for image-layout tests and not for booting; real Raspberry Pi images start from the
//! official Ubuntu image (base kind `official`). The mirror defaults to the build machine's own
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
use firstboot::config::Target;

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

/// The packages every bootstrapped base gets on `arch` besides the configured ones.
pub fn default_packages(arch: &str) -> Vec<&'static str> {
    let mut p = vec!["systemd", "systemd-sysv", "dbus", "udev"];
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
            foreign: arch != host_arch(),
        })
    }

    /// Cache key: hex SHA-256 of the spec (first 24 digits).
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("spec serialises");
        hex::encode(Sha256::digest(json))[..24].to_string()
    }
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
        t = t.arg("--foreign");
    }
    t.arg(format!("--include={}", spec.packages.join(",")))
        .arg(&spec.suite)
        .arg(&root)
        .arg(&spec.mirror)
        .timeout(Duration::from_secs(1800))
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
            BootstrapSpec::new("bookworm", None, "amd64", &["curl".into()], dir.path()).unwrap();
        assert_eq!(a.mirror, "http://m.example/debian");
        assert!(
            a.packages.contains(&"systemd-boot-efi".to_string())
                && a.packages.contains(&"curl".to_string())
        );
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
}
