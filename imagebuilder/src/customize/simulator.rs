//! `imagebuilder build --microk8s simulated`: a QEMU test-cluster image whose `microk8s` is
//! rackseed's MicroK8s simulator (`tests/microk8s-sim`), for machines where the MicroK8s snap
//! cannot be had (no Snap Store). It is chosen explicitly, never implied, and never goes into an
//! image for hardware:
//!
//! - refused for the Raspberry Pi targets (`rpi4`, `rpi5`: images for boards) and for bases that
//!   are not bootstrapped (an official Ubuntu image or a local file is what real machines run);
//!   allowed only for `x86_64-efi` from a bootstrapped base, the QEMU test cluster's image
//!   (`configs/qemu-test.toml`). Before this option, nothing in the config told a QEMU test image
//!   from an image for a mini-PC: both are `x86_64-efi`; the option is that distinction.
//! - recorded in `/etc/rackseed/image.json` and `manifest.json` (`"microk8s": {"source":
//!   "simulated", ...}`), shown by `imagebuilder inspect`, on the node's status page and
//!   `/status.json` (`microk8s_simulated`, from the marker file
//!   [`rackseed_protocol::status::SIMULATED_MARKER`]), on the console login banner
//!   (`/etc/issue.d/`) and in the SSH login message (`/etc/update-motd.d/`) as
//!   "MicroK8s simulated".
//!
//! snapd is masked in these images (`/etc/systemd/system/snapd*.{service,socket,timer}` ->
//! `/dev/null`, in the overlay): the simulator's fake `snap` stands in for it, and an unmasked
//! snapd makes `multi-user.target`, which the agent starts after, wait for snapd's seeding
//! (`snapd.seeded.service`) on a software-emulated CPU. Images for hardware keep snapd.
//! Two more units are masked there for the same reason, each idle work on an emulated CPU
//! that nothing in a simulated image needs: `apparmor.service` (it compiles every profile
//! on first boot, ~48 s of a TCG vCPU measured with `systemd-analyze blame`, competing with
//! cloud-init's local stage; with snapd masked and MicroK8s simulated nothing is confined)
//! and `e2scrub_reap.service` (~21 s; it reaps e2scrub snapshots of LVM volumes, and these
//! images have no LVM). Images for hardware keep both, as Ubuntu Server has them.
//!
//! What goes in: the overlay tree `overlays/microk8s-sim` (wrappers at the paths the agent uses
//! for the snap: `/usr/local/bin/microk8s`, `/usr/local/bin/snap` (the simulator's fake snapd:
//! install, wait, ack, list), `/snap/microk8s/current/bin/dqlite`; `microk8s-sim.path` and
//! `.service`, which start the simulator's node daemon once the fake `snap install` has run, as
//! snapd starts the real one; a drop-in scaling the agent's join timeout to the simulator; the
//! banners), then the simulator's binaries (`microk8s` and `dqlite` of the `microk8s-sim` crate,
//! built for the target, checked by their ELF header) under `/usr/local/lib/rackseed-sim/`, its
//! settings (`/etc/rackseed-sim.env`: simulated join/enable delays) and the marker.
//!
//! To change what a simulated image carries, edit `overlays/microk8s-sim` or [`overlay`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rackseed_config::{Base, ClusterConfig, Target};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::customize::firstboot_bin::{arch_for, elf_arch};

/// Where the image's MicroK8s comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Microk8sSource {
    /// The MicroK8s snap, installed by the agent at first boot (the default, and the only
    /// choice for hardware).
    #[default]
    Snap,
    /// The MicroK8s simulator, for QEMU test clusters without the Snap Store.
    Simulated,
}

/// The overlay folder (inside the repository's `overlays/`) with the simulator's fixed files.
pub const OVERLAY_DIR: &str = "microk8s-sim";
/// Simulated MicroK8s timings written into `/etc/rackseed-sim.env`.
pub const JOIN_DELAY_MS: u64 = 3000;
pub const ENABLE_DELAY_MS: u64 = 2000;
pub const HEARTBEAT_MS: u64 = 1000;
/// The words every place that shows it uses.
pub const SHOWN_AS: &str = "MicroK8s simulated";

/// `microk8s` in `image.json` and `manifest.json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Microk8sRecord {
    pub source: Microk8sSource,
    /// SHA-256 of the simulator's `microk8s` binary put in (simulated only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulator_sha256: Option<String>,
}

/// Refuses the simulator where it must never go (see the module docs).
pub fn check_allowed(cfg: &ClusterConfig, target: Target) -> Result<()> {
    if matches!(target, Target::Rpi4 | Target::Rpi5) {
        bail!(
            "--microk8s simulated is for QEMU test-cluster images only; target {} is a board \
             (use x86_64-efi with a bootstrapped base, e.g. configs/qemu-test.toml)",
            target.as_str()
        );
    }
    if !matches!(cfg.image.base, Base::Bootstrap { .. }) {
        bail!(
            "--microk8s simulated is for QEMU test-cluster images only, built from a bootstrapped \
             base (image.base.kind = \"bootstrap\"); an official or local base is for real machines"
        );
    }
    Ok(())
}

/// The simulator's binaries: `microk8s` and `dqlite` in `dir` (default: next to the running
/// imagebuilder, where `cargo build -p microk8s-sim` puts them).
pub fn binaries(dir: Option<&Path>, target: Target) -> Result<(PathBuf, PathBuf)> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()
            .context("locating the running imagebuilder")?
            .parent()
            .context("imagebuilder has no folder")?
            .to_path_buf(),
    };
    let want = arch_for(target.rust_triple());
    let mut found = Vec::new();
    for name in ["microk8s", "dqlite"] {
        let p = dir.join(name);
        let mut head = [0u8; 64];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(&p).with_context(|| {
                format!(
                    "the MicroK8s simulator's `{name}` is not in {} (build it: cargo build \
                     --release -p microk8s-sim, or pass --simulator-bin DIR)",
                    dir.display()
                )
            })?;
            f.read_exact(&mut head)
                .with_context(|| format!("reading {}", p.display()))?;
        }
        let arch = elf_arch(&head).with_context(|| format!("{} is not a program", p.display()))?;
        if arch != want {
            bail!(
                "{} is built for {}, the target needs {}",
                p.display(),
                arch.as_str(),
                want.as_str()
            );
        }
        found.push(p);
    }
    Ok((found[0].clone(), found[1].clone()))
}

/// Writes the generated part of the simulator overlay into `root` (an empty folder): the
/// binaries, the settings and the marker. Returns the record for the manifest.
pub fn overlay(root: &Path, microk8s: &Path, dqlite: &Path) -> Result<Microk8sRecord> {
    let lib = root.join("usr/local/lib/rackseed-sim");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut sha = None;
    for (from, to) in [(microk8s, "microk8s-sim"), (dqlite, "dqlite-sim")] {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        if to == "microk8s-sim" {
            sha = Some(hex::encode(Sha256::digest(&bytes)));
        }
        rackseed_host::fs::write_atomic(&lib.join(to), &bytes, 0o755)?;
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("rackseed"))?;
    rackseed_host::fs::write_atomic(
        &etc.join("rackseed-sim.env"),
        format!(
            "# The MicroK8s simulator's settings (QEMU test-cluster image).\n\
             MICROK8S_SIM_JOIN_DELAY_MS={JOIN_DELAY_MS}\nMICROK8S_SIM_ENABLE_DELAY_MS={ENABLE_DELAY_MS}\n\
             MICROK8S_SIM_HEARTBEAT_MS={HEARTBEAT_MS}\n"
        )
        .as_bytes(),
        0o644,
    )?;
    let marker = rackseed_protocol::status::SIMULATED_MARKER.trim_start_matches('/');
    rackseed_host::fs::write_atomic(
        &root.join(marker),
        format!(
            "{SHOWN_AS}: this image was built with `imagebuilder build --microk8s simulated` for a \
             QEMU test cluster; `microk8s` is rackseed's MicroK8s simulator.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    Ok(Microk8sRecord {
        source: Microk8sSource::Simulated,
        simulator_sha256: sha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(target: &str, base: &str) -> ClusterConfig {
        let text =
            format!("[cluster]\nname = \"t\"\n\n[image]\ntarget = \"{target}\"\nbase = {base}\n");
        rackseed_config::parse(&text, Path::new("/c/t.toml"))
            .unwrap()
            .config
    }

    #[test]
    fn only_bootstrapped_x86_images_may_carry_the_simulator() {
        let boot = "{ kind = \"bootstrap\", suite = \"bookworm\" }";
        let local = "{ kind = \"local\", path = \"b.img\" }";
        check_allowed(&cfg("x86_64-efi", boot), Target::X86_64Efi).unwrap();
        for t in [Target::Rpi4, Target::Rpi5] {
            let e = check_allowed(&cfg("x86_64-efi", boot), t).unwrap_err();
            assert!(e.to_string().contains("is a board"), "{e}");
        }
        let e = check_allowed(&cfg("x86_64-efi", local), Target::X86_64Efi).unwrap_err();
        assert!(e.to_string().contains("bootstrapped"), "{e}");
    }

    #[test]
    fn the_repository_overlay_has_the_wrappers_units_and_banners() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../overlays")
            .join(OVERLAY_DIR);
        for (path, exec) in [
            ("usr/local/bin/microk8s", true),
            ("usr/local/bin/snap", true),
            ("snap/microk8s/current/bin/dqlite", true),
            ("usr/local/lib/rackseed-sim/env.sh", false),
            ("etc/systemd/system/microk8s-sim.path", false),
            ("etc/systemd/system/microk8s-sim.service", false),
            (
                "etc/systemd/system/rackseed-firstboot.service.d/50-simulator.conf",
                false,
            ),
            ("etc/issue.d/50-rackseed-microk8s-simulated.issue", false),
            ("etc/update-motd.d/50-rackseed-microk8s-simulated", true),
        ] {
            use std::os::unix::fs::PermissionsExt;
            let p = root.join(path);
            let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(m.permissions().mode() & 0o111 != 0, exec, "{path}");
        }
        // snapd is masked: the fake `snap` stands in for it, and multi-user.target (which the
        // agent starts after) would otherwise wait for snapd's seeding on an emulated CPU.
        for unit in [
            "snapd.service",
            "snapd.socket",
            "snapd.seeded.service",
            "apparmor.service",
            "e2scrub_reap.service",
        ] {
            let link = root.join("etc/systemd/system").join(unit);
            assert_eq!(
                std::fs::read_link(&link).unwrap_or_else(|e| panic!("{unit}: {e}")),
                Path::new("/dev/null"),
                "{unit} must be masked in simulated images"
            );
        }
        let wants = root.join("etc/systemd/system/multi-user.target.wants/microk8s-sim.path");
        assert_eq!(
            std::fs::read_link(&wants).unwrap(),
            Path::new("../microk8s-sim.path")
        );
        for banner in [
            "etc/issue.d/50-rackseed-microk8s-simulated.issue",
            "etc/update-motd.d/50-rackseed-microk8s-simulated",
        ] {
            let text = std::fs::read_to_string(root.join(banner)).unwrap();
            assert!(text.contains(SHOWN_AS), "{banner}: {text}");
        }
    }

    #[test]
    fn the_generated_part_holds_binaries_settings_and_marker() {
        let d = tempfile::tempdir().unwrap();
        let (m, q) = (d.path().join("m"), d.path().join("q"));
        std::fs::write(&m, b"\x7fELF microk8s").unwrap();
        std::fs::write(&q, b"\x7fELF dqlite").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let rec = overlay(&root, &m, &q).unwrap();
        assert_eq!(rec.source, Microk8sSource::Simulated);
        assert_eq!(
            rec.simulator_sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"\x7fELF microk8s")).as_str())
        );
        use std::os::unix::fs::PermissionsExt;
        let bin = root.join("usr/local/lib/rackseed-sim/microk8s-sim");
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF microk8s");
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let env = std::fs::read_to_string(root.join("etc/rackseed-sim.env")).unwrap();
        assert!(env.contains("MICROK8S_SIM_JOIN_DELAY_MS=3000"), "{env}");
        let marker = std::fs::read_to_string(root.join("etc/rackseed/microk8s-simulated")).unwrap();
        assert!(marker.contains(SHOWN_AS));
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["source"], "simulated");
        let snap = serde_json::to_value(Microk8sRecord::default()).unwrap();
        assert_eq!(snap, serde_json::json!({"source": "snap"}));
    }

    #[test]
    fn binaries_of_the_wrong_arch_or_missing_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = binaries(Some(d.path()), Target::X86_64Efi).unwrap_err();
        assert!(
            format!("{e:#}").contains("cargo build --release -p microk8s-sim"),
            "{e:#}"
        );
        // This test binary is an x86_64 (or aarch64) ELF: as `microk8s` and `dqlite` it is
        // accepted for the matching target only.
        let me = std::env::current_exe().unwrap();
        std::fs::copy(&me, d.path().join("microk8s")).unwrap();
        std::fs::copy(&me, d.path().join("dqlite")).unwrap();
        let (native, foreign) = if cfg!(target_arch = "x86_64") {
            (Target::X86_64Efi, Target::Rpi4)
        } else {
            (Target::Rpi4, Target::X86_64Efi)
        };
        binaries(Some(d.path()), native).unwrap();
        let e = binaries(Some(d.path()), foreign).unwrap_err();
        assert!(e.to_string().contains("the target needs"), "{e}");
    }
}
