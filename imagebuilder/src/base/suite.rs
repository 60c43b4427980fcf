//! Which distribution a bootstrap suite belongs to, and what that selects: debootstrap's
//! script, the archive keyring that verifies the mirror's `Release` file, and the kernel
//! package.
//!
//! Facts this relies on, checked in debootstrap 1.0.128 (Debian bookworm's package, the files
//! under `/usr/share/debootstrap/scripts/`):
//!
//! - every Ubuntu suite's script is a symlink to `gutsy` (`jammy -> gutsy`), every Debian
//!   one's to `sid` (`bookworm -> sid`, `trixie -> sid`), or `debian-common` in newer releases;
//! - `gutsy` names `keyring /usr/share/keyrings/ubuntu-archive-keyring.gpg` (package
//!   `ubuntu-keyring`), `sid` names `keyring /usr/share/keyrings/debian-archive-keyring.gpg`
//!   (package `debian-archive-keyring`);
//! - a debootstrap older than a suite has no script for it (bookworm's has no `noble`); its
//!   command line takes the script as a fourth argument, so a newer Ubuntu suite is bootstrapped
//!   with `gutsy` and a newer Debian one with `sid`, which is what the suites' own symlinks do.
//!
//! [`select`] always passes the script explicitly and the keyring with `--keyring`, so a
//! missing keyring is a clear error before anything is downloaded, never an unverified
//! bootstrap. To support another suite, add its codename to [`UBUNTU_SUITES`] or
//! [`DEBIAN_SUITES`].
//!
//! What could not be tested here: bootstrapping an Ubuntu suite end to end (the build machines
//! reach Debian's archive only). The script, keyring and package selection for `noble` are
//! unit-tested against a scripts folder laid out like debootstrap's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

/// Where debootstrap keeps its suite scripts.
pub const SCRIPTS_DIR: &str = "/usr/share/debootstrap/scripts";

/// Ubuntu codenames rackseed knows (LTS and interim releases since 14.04).
pub const UBUNTU_SUITES: &[&str] = &[
    "trusty", "xenial", "bionic", "focal", "jammy", "kinetic", "lunar", "mantic", "noble",
    "oracular", "plucky", "questing",
];

/// Debian codenames and aliases rackseed knows.
pub const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "unstable",
    "testing",
    "stable",
    "oldstable",
];

/// The distribution of a bootstrapped base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    Debian,
    Ubuntu,
}

impl Distro {
    /// The keyring debootstrap verifies this distribution's archive with, and its package.
    pub fn default_keyring(self) -> (&'static str, &'static str) {
        match self {
            Distro::Debian => (
                "/usr/share/keyrings/debian-archive-keyring.gpg",
                "debian-archive-keyring",
            ),
            Distro::Ubuntu => (
                "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
                "ubuntu-keyring",
            ),
        }
    }

    /// The kernel package for `arch`. Ubuntu's arm64 images are for the Raspberry Pi targets,
    /// which Ubuntu serves with its `raspi` kernel; Debian's `arm64` kernel boots the Pi 4/5.
    pub fn kernel_package(self, arch: &str) -> Option<&'static str> {
        match (self, arch) {
            (Distro::Debian, "amd64") => Some("linux-image-amd64"),
            (Distro::Debian, "arm64") => Some("linux-image-arm64"),
            (Distro::Ubuntu, "amd64") => Some("linux-image-generic"),
            (Distro::Ubuntu, "arm64") => Some("linux-image-raspi"),
            _ => None,
        }
    }
}

/// What debootstrap is run with for a suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub distro: Distro,
    /// The script, passed as debootstrap's fourth argument.
    pub script: PathBuf,
}

/// The distribution of `suite` from the names rackseed knows, if any.
pub fn known_distro(suite: &str) -> Option<Distro> {
    if UBUNTU_SUITES.contains(&suite) {
        Some(Distro::Ubuntu)
    } else if DEBIAN_SUITES.contains(&suite) {
        Some(Distro::Debian)
    } else {
        None
    }
}

/// The distribution a debootstrap script is for, from the script it resolves to.
fn script_distro(script: &Path) -> Option<Distro> {
    let resolved = std::fs::canonicalize(script).ok()?;
    match resolved.file_name()?.to_str()? {
        "gutsy" => Some(Distro::Ubuntu),
        "sid" | "debian-common" => Some(Distro::Debian),
        _ => None,
    }
}

/// Selects debootstrap's script for `suite` from `scripts_dir`: the suite's own when debootstrap
/// has one (its distribution read from where it points), else the family script of a suite
/// rackseed knows (`gutsy` for Ubuntu, `sid` for Debian).
pub fn select(suite: &str, scripts_dir: &Path) -> Result<Selection> {
    let own = scripts_dir.join(suite);
    if own.is_file() {
        let Some(distro) = script_distro(&own).or_else(|| known_distro(suite)) else {
            bail!(
                "debootstrap's script for suite {suite:?} ({}) is neither a Debian nor an \
                 Ubuntu one; rackseed bootstraps Debian and Ubuntu suites",
                own.display()
            );
        };
        return Ok(Selection {
            distro,
            script: own,
        });
    }
    let Some(distro) = known_distro(suite) else {
        bail!(
            "debootstrap has no script for suite {suite:?} (in {}) and rackseed does not know it \
             as a Debian or Ubuntu suite; check image.base.suite (Ubuntu: noble, jammy, ...; \
             Debian: bookworm, trixie, ...)",
            scripts_dir.display()
        );
    };
    let family = match distro {
        Distro::Ubuntu => "gutsy",
        Distro::Debian => "sid",
    };
    let script = scripts_dir.join(family);
    if !script.is_file() {
        bail!(
            "debootstrap has no script for suite {suite:?} nor its family script {} \
             (install or upgrade debootstrap)",
            script.display()
        );
    }
    Ok(Selection { distro, script })
}

/// The keyring to verify `distro`'s mirror with: `configured` when given
/// ([`super::bootstrap::BootstrapSpec::with_keyring`]), else the distribution's own; an error
/// naming the package to install when the file is missing.
pub fn keyring(distro: Distro, configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(k) = configured {
        if !k.is_file() {
            bail!(
                "the keyring {} does not exist (it verifies the mirror's Release file)",
                k.display()
            );
        }
        return Ok(k.to_path_buf());
    }
    let (path, package) = distro.default_keyring();
    if !Path::new(path).is_file() {
        bail!(
            "bootstrapping {distro:?} needs its archive keyring {path} (package {package}) to \
             verify the mirror; install {package}, or put a keyring holding the archive's \
             signing key at {path}"
        );
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scripts folder laid out like debootstrap 1.0.128's (no `noble`).
    fn scripts() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["gutsy", "sid", "kali"] {
            std::fs::write(d.path().join(f), "# script\n").unwrap();
        }
        for (suite, to) in [
            ("jammy", "gutsy"),
            ("focal", "gutsy"),
            ("bookworm", "sid"),
            ("trixie", "sid"),
            ("kali-rolling", "kali"),
        ] {
            symlink(to, d.path().join(suite)).unwrap();
        }
        d
    }

    #[test]
    fn ubuntu_suites_use_the_gutsy_script_even_when_debootstrap_is_older() {
        let d = scripts();
        let noble = select("noble", d.path()).unwrap();
        assert_eq!(noble.distro, Distro::Ubuntu);
        assert_eq!(noble.script, d.path().join("gutsy"));
        let jammy = select("jammy", d.path()).unwrap();
        assert_eq!(jammy.distro, Distro::Ubuntu);
        assert_eq!(jammy.script, d.path().join("jammy"));
    }

    #[test]
    fn debian_suites_use_their_own_or_the_sid_script() {
        let d = scripts();
        let b = select("bookworm", d.path()).unwrap();
        assert_eq!(
            (b.distro, b.script),
            (Distro::Debian, d.path().join("bookworm"))
        );
        let f = select("forky", d.path()).unwrap();
        assert_eq!((f.distro, f.script), (Distro::Debian, d.path().join("sid")));
    }

    #[test]
    fn unknown_and_foreign_family_suites_are_refused_by_name() {
        let d = scripts();
        let e = select("kali-rolling", d.path()).unwrap_err().to_string();
        assert!(e.contains("kali-rolling") && e.contains("neither"), "{e}");
        let e = select("nobel", d.path()).unwrap_err().to_string();
        assert!(
            e.contains("\"nobel\"") && e.contains("image.base.suite"),
            "{e}"
        );
        std::fs::remove_file(d.path().join("gutsy")).unwrap();
        let e = select("noble", d.path()).unwrap_err().to_string();
        assert!(e.contains("gutsy") && e.contains("debootstrap"), "{e}");
    }

    #[test]
    fn the_installed_debootstrap_selects_bookworm_and_noble() {
        // The build machine's own debootstrap (scripts/install-deps installs it).
        let dir = Path::new(SCRIPTS_DIR);
        assert!(
            dir.is_dir(),
            "{SCRIPTS_DIR} is missing: install debootstrap"
        );
        assert_eq!(select("bookworm", dir).unwrap().distro, Distro::Debian);
        let noble = select("noble", dir).unwrap();
        assert_eq!(noble.distro, Distro::Ubuntu);
        assert_eq!(
            std::fs::canonicalize(&noble.script)
                .unwrap()
                .file_name()
                .unwrap(),
            "gutsy"
        );
    }

    #[test]
    fn keyrings_are_the_distributions_or_the_configured_file() {
        assert_eq!(
            Distro::Ubuntu.default_keyring(),
            (
                "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
                "ubuntu-keyring"
            )
        );
        // Debian's keyring is installed with debootstrap on the build machine.
        assert_eq!(
            keyring(Distro::Debian, None).unwrap(),
            Path::new("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("ubuntu.gpg");
        let e = keyring(Distro::Ubuntu, Some(&k)).unwrap_err().to_string();
        assert!(
            e.contains("does not exist") && e.contains("ubuntu.gpg"),
            "{e}"
        );
        std::fs::write(&k, b"key").unwrap();
        assert_eq!(keyring(Distro::Ubuntu, Some(&k)).unwrap(), k);
        if !Path::new(Distro::Ubuntu.default_keyring().0).exists() {
            let e = keyring(Distro::Ubuntu, None).unwrap_err().to_string();
            assert!(
                e.contains("ubuntu-keyring") && e.contains("ubuntu-archive-keyring.gpg"),
                "{e}"
            );
        }
    }

    #[test]
    fn kernels_follow_the_distribution() {
        assert_eq!(
            Distro::Ubuntu.kernel_package("amd64"),
            Some("linux-image-generic")
        );
        assert_eq!(
            Distro::Ubuntu.kernel_package("arm64"),
            Some("linux-image-raspi")
        );
        assert_eq!(
            Distro::Debian.kernel_package("arm64"),
            Some("linux-image-arm64")
        );
        assert_eq!(Distro::Debian.kernel_package("riscv64"), None);
    }
}
