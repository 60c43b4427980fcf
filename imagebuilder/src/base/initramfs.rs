//! The initramfs of arm64 bases: the drivers the Raspberry Pi 4/5 targets (and QEMU's `virt`
//! machine, where the tests boot them) find their root filesystem with, instead of
//! initramfs-tools' default `MODULES=most`.
//!
//! Why: arm64 bases are bootstrapped under user-mode emulation on x86 build machines, and
//! `MODULES=most` makes mkinitramfs add some thousand modules one emulated process at a time
//! (`copy_modules_dir` of whole driver trees: every network, graphics, bus, PHY, pinctrl...
//! driver; `hook-functions` in initramfs-tools 0.142): more than 15 minutes on a loaded 2-core
//! machine, most of a cold arm64 bootstrap. arm64 bases only serve the Raspberry Pi targets,
//! whose boot media are known, so `HOOK` copies the driver trees those boot from (MMC/SD,
//! USB host and storage, NVMe, the Pi 4's VL805 reset controller, virtio) and the root
//! filesystem's module, and [`CONF`] sets `MODULES=list` (mkinitramfs then adds the modules of
//! `/usr/share/initramfs-tools/modules.d/*`, `/etc/initramfs-tools/modules` and the hooks, and
//! nothing more). amd64 bases, for any x86 machine, keep `MODULES=most` (natively built, fast).
//!
//! Checked in Debian bookworm's arm64 kernel (6.1, `/boot/config-*`): MMC core and `mmc_block`,
//! the Pi 4 PCIe controller (`pcie-brcmstb`) and its firmware interface are built in; the Pi 4 SD
//! host (`sdhci-iproc`, `bcm2835`), xhci, `usb-storage`, `uas`, `dwc2`, `reset-raspberrypi`,
//! NVMe, virtio and ext4 are modules, all under the trees below. The image tests check the
//! built initramfs holds them.
//!
//! Both files are written between debootstrap's stages, outside any package's files (a hook in
//! `/etc/initramfs-tools/hooks`, a setting in `conf.d`), so dpkg never asks about them and the
//! node's later kernel updates build the same initramfs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// The hook (in the tree).
pub const HOOK_PATH: &str = "etc/initramfs-tools/hooks/rackseed-boot-media";

/// The setting (in the tree).
pub const CONF_PATH: &str = "etc/initramfs-tools/conf.d/rackseed-modules.conf";

/// `MODULES=list`; gzip, which the Pi firmware, QEMU and the tests' `gzip -dc` read (bookworm's
/// default zstd needs the `zstd` program in the tree, else mkinitramfs falls back to gzip
/// with a warning anyway).
pub const CONF: &str = "\
# rackseed: only the boot media drivers of the hook rackseed-boot-media (Raspberry Pi 4/5,
# QEMU virt), not MODULES=most's thousand modules.
MODULES=list
COMPRESS=gzip
";

/// The driver trees (under `/lib/modules/<version>/`) and modules the hook adds.
pub const MODULE_DIRS: &[&str] = &[
    "kernel/drivers/mmc",
    "kernel/drivers/usb/host",
    "kernel/drivers/usb/storage",
    "kernel/drivers/usb/dwc2",
    "kernel/drivers/usb/misc",
    "kernel/drivers/reset",
    "kernel/drivers/nvme/host",
    "kernel/drivers/virtio",
    "kernel/drivers/hid/usbhid",
];

/// Single modules the hook adds (with their dependencies): the root filesystem, SCSI disks
/// (USB storage), virtio disks and keyboards for the emergency shell.
pub const MODULES: &[&str] = &["ext4", "sd_mod", "virtio_blk", "virtio_scsi", "hid-generic"];

/// The hook script.
pub fn hook() -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # rackseed: the drivers a Raspberry Pi 4/5 (and QEMU's virt machine) boot from; see\n\
         # conf.d/rackseed-modules.conf (MODULES=list).\n\
         PREREQ=\"\"\n\
         prereqs() { echo \"$PREREQ\"; }\n\
         case \"$1\" in prereqs) prereqs; exit 0 ;; esac\n\
         . /usr/share/initramfs-tools/hook-functions\n",
    );
    for d in MODULE_DIRS {
        s.push_str(&format!("copy_modules_dir {d}\n"));
    }
    s.push_str(&format!("manual_add_modules {}\n", MODULES.join(" ")));
    s
}

/// Writes the hook (0755) and the setting into the tree at `root`.
pub fn write(root: &Path) -> Result<()> {
    for (rel, text, mode) in [
        (HOOK_PATH, hook(), 0o755),
        (CONF_PATH, CONF.to_string(), 0o644),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Whether `arch`'s bases get this initramfs (arm64: the Raspberry Pi targets).
pub fn applies_to(arch: &str) -> bool {
    arch == "arm64"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_is_a_shell_script_sh_accepts_with_every_tree() {
        let d = tempfile::tempdir().unwrap();
        write(d.path()).unwrap();
        let hook_path = d.path().join(HOOK_PATH);
        let text = std::fs::read_to_string(&hook_path).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"));
        for dir in MODULE_DIRS {
            assert!(text.contains(&format!("copy_modules_dir {dir}\n")), "{dir}");
        }
        assert!(text.contains("manual_add_modules ext4 "));
        let mode = std::fs::metadata(&hook_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // The shell parses it, and answers initramfs-tools' prereqs query.
        let out = rackseed_host::command::Cmd::new("sh", std::time::Duration::from_secs(10))
            .arg("-n")
            .arg(&hook_path)
            .output_blocking()
            .unwrap();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let out = rackseed_host::command::Cmd::new("sh", std::time::Duration::from_secs(10))
            .arg(&hook_path)
            .arg("prereqs")
            .output_blocking()
            .unwrap();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        assert_eq!(out.stdout.trim(), "");
        let conf = std::fs::read_to_string(d.path().join(CONF_PATH)).unwrap();
        assert!(conf.lines().any(|l| l == "MODULES=list"), "{conf}");
        assert!(applies_to("arm64") && !applies_to("amd64"));
    }
}
