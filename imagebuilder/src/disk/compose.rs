//! Builds a fresh disk image from a root filesystem tree, in the layout of Ubuntu's official
//! images so the rest of the pipeline treats bootstrapped and official bases alike:
//!
//! - `x86_64-efi`: GPT; p15 ESP (FAT32 labelled `UEFI`), p1 ext4 `cloudimg-rootfs`; with
//!   [`Shape::Official`] also p13 ext4 `BOOT` (type XBOOTLDR) like the noble cloud image. The
//!   ESP gets systemd-boot from the tree (`systemd-boot-efi` package) with one loader entry
//!   booting the tree's kernel and initrd with `root=PARTUUID=<p1>`.
//! - `rpi4`/`rpi5`: MBR; p1 FAT32 `system-boot` (bootable, type 0x0c) with `config.txt`,
//!   `cmdline.txt` and the tree's kernel/initrd; p2 ext4 `writable`.
//!
//! The ext4 filesystem is written straight into the image with `mke2fs -d TREE -E offset=N`,
//! the FAT one with the `fatfs` crate: no loop device, no mount. The tree is modified in place
//! (an `/etc/fstab` is written), so pass a scratch copy.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_config::Target;

use super::fat::{self, FatStage, FatVolume};
use super::{read_table, PartitionTable};
use crate::tool::Tool;

const MIB: u64 = 1 << 20;

/// Whether to mimic the official image exactly (for test fixtures) or make the minimal layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// What a bootstrapped base becomes.
    Minimal,
    /// Also the partitions an official image has that rackseed does not need (x86 `BOOT`).
    Official,
}

/// The filesystem labels of a target's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels {
    pub root: &'static str,
    pub boot: &'static str,
}

pub fn labels(target: Target) -> Labels {
    match target {
        Target::X86_64Efi => Labels {
            root: "cloudimg-rootfs",
            boot: "UEFI",
        },
        Target::Rpi4 | Target::Rpi5 => Labels {
            root: "writable",
            boot: "system-boot",
        },
    }
}

/// The kernel command line the composed images boot with (rpi: `cmdline.txt`).
pub const RPI_CMDLINE: &str =
    "console=serial0,115200 multipath=off dwc_otg.lpm_enable=0 console=tty1 root=LABEL=writable rootfstype=ext4 rootwait fixrtc";

/// Space used by `tree` in bytes (allocated blocks, so sparse files count as they are).
pub fn tree_usage(tree: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = e.metadata()?;
            total += m.blocks() * 512 + 256;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// The newest `boot/vmlinuz-*` and its matching `boot/initrd.img-*` in `tree`.
pub fn find_kernel(tree: &Path) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    let boot = tree.join("boot");
    let mut kernels: Vec<String> = match std::fs::read_dir(&boot) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vmlinuz-"))
            .collect(),
        Err(_) => Vec::new(),
    };
    kernels.sort();
    let Some(k) = kernels.pop() else {
        return Ok((None, None));
    };
    let ver = k.trim_start_matches("vmlinuz-");
    let initrd = boot.join(format!("initrd.img-{ver}"));
    Ok((Some(boot.join(&k)), initrd.is_file().then_some(initrd)))
}

/// Composes `image` (created or replaced) for `target` from `tree`. Returns the table read back.
pub async fn compose(
    tree: &Path,
    target: Target,
    shape: Shape,
    image: &Path,
) -> Result<PartitionTable> {
    let used = tree_usage(tree)?;
    // Room for the customisation, the journal and growth before growpart runs.
    let root_size = ((used + used / 4 + 256 * MIB).div_ceil(MIB)).max(512) * MIB;
    let l = labels(target);
    match target {
        Target::X86_64Efi => compose_x86(tree, shape, image, root_size, l).await,
        Target::Rpi4 | Target::Rpi5 => compose_rpi(tree, image, root_size, l).await,
    }
}

async fn compose_x86(
    tree: &Path,
    shape: Shape,
    image: &Path,
    root_size: u64,
    l: Labels,
) -> Result<PartitionTable> {
    let efi = tree.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !efi.is_file() {
        bail!(
            "{} is missing: a bootstrapped x86_64-efi base needs the systemd-boot-efi package",
            efi.display()
        );
    }
    let (kernel, initrd) = find_kernel(tree)?;
    let Some(kernel) = kernel else {
        bail!(
            "no kernel in {}/boot: add a linux-image package",
            tree.display()
        )
    };
    let esp = 256 * MIB;
    let bootp = if shape == Shape::Official {
        128 * MIB
    } else {
        0
    };
    let total = MIB + esp + bootp + root_size + MIB;
    create_sparse(image, total)?;
    let root_uuid = uuid_v4();
    let mut sg = Tool::new("sgdisk").arg("-o").args([
        "-n",
        "15:2048:+256M",
        "-t",
        "15:ef00",
        "-c",
        "15:UEFI",
    ]);
    if shape == Shape::Official {
        sg = sg.args(["-n", "13:0:+128M", "-t", "13:ea00", "-c", "13:BOOT"]);
    }
    sg = sg
        .args(["-n", "1:0:0", "-t", "1:8300", "-c", "1:cloudimg-rootfs"])
        .arg("-u")
        .arg(format!("1:{root_uuid}"))
        .arg(image)
        .timeout(Duration::from_secs(30));
    sg.run()
        .await
        .with_context(|| format!("partitioning {}", image.display()))?;
    let t = super::read_table(image).await?;
    let p_root = t
        .partitions
        .iter()
        .find(|p| p.number == 1)
        .context("sgdisk made no p1")?
        .clone();
    let p_esp = t
        .partitions
        .iter()
        .find(|p| p.number == 15)
        .context("sgdisk made no p15")?
        .clone();

    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::create_dir_all(tree.join("boot/efi"))?;
    std::fs::write(
        tree.join("etc/fstab"),
        format!("LABEL={} / ext4 discard,errors=remount-ro 0 1\nLABEL={} /boot/efi vfat umask=0077 0 1\n", l.root, l.boot),
    )?;
    mke2fs(image, &p_root, l.root, Some(tree)).await?;
    if shape == Shape::Official {
        let p_boot = t
            .partitions
            .iter()
            .find(|p| p.number == 13)
            .context("sgdisk made no p13")?
            .clone();
        mke2fs(image, &p_boot, "BOOT", None).await?;
    }
    fat::format(image, p_esp.start, p_esp.size, l.boot).await?;
    let scratch = tempfile::tempdir()?;
    let st = FatStage::new(scratch.path())?;
    st.add_file("EFI/BOOT/BOOTX64.EFI", &efi)?;
    st.add_file("EFI/systemd/systemd-bootx64.efi", &efi)?;
    st.add("loader/loader.conf", b"default rackseed.conf\ntimeout 0\n")?;
    st.add_file("vmlinuz", &kernel)?;
    let mut entry = String::from("title rackseed\nlinux /vmlinuz\n");
    if let Some(i) = &initrd {
        st.add_file("initrd.img", i)?;
        entry.push_str("initrd /initrd.img\n");
    }
    entry.push_str(&format!(
        "options root=PARTUUID={} rw console=tty0 console=ttyS0,115200\n",
        root_uuid.to_lowercase()
    ));
    st.add("loader/entries/rackseed.conf", entry.as_bytes())?;
    st.write_to(&FatVolume::new(image, p_esp.start)).await?;
    super::read_table(image).await
}

async fn compose_rpi(
    tree: &Path,
    image: &Path,
    root_size: u64,
    l: Labels,
) -> Result<PartitionTable> {
    let boot = 512 * MIB;
    let total = MIB + boot + root_size;
    create_sparse(image, total)?;
    let boot_lba = u32::try_from(2048 + boot / 512).context("image too large for an MBR")?;
    write_mbr(
        image,
        &[
            (2048, boot / 512, 0x0c, true),
            (boot_lba, root_size / 512, 0x83, false),
        ],
    )?;
    let t = read_table(image).await?;
    let p_boot = t
        .partitions
        .iter()
        .find(|p| p.number == 1)
        .context("no p1 after writing the MBR")?
        .clone();
    let p_root = t
        .partitions
        .iter()
        .find(|p| p.number == 2)
        .context("no p2 after writing the MBR")?
        .clone();
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::create_dir_all(tree.join("boot/firmware"))?;
    std::fs::write(
        tree.join("etc/fstab"),
        format!("LABEL={} / ext4 discard,errors=remount-ro 0 1\nLABEL={} /boot/firmware vfat defaults 0 1\n", l.root, l.boot),
    )?;
    mke2fs(image, &p_root, l.root, Some(tree)).await?;
    fat::format(image, p_boot.start, p_boot.size, l.boot).await?;
    let scratch = tempfile::tempdir()?;
    let st = FatStage::new(scratch.path())?;
    let (kernel, initrd) = find_kernel(tree)?;
    let mut config = String::from("[all]\narm_64bit=1\nkernel=vmlinuz\ncmdline=cmdline.txt\n");
    if let Some(k) = &kernel {
        st.add_file("vmlinuz", k)?;
    }
    if let Some(i) = &initrd {
        st.add_file("initrd.img", i)?;
        config.push_str("initramfs initrd.img followkernel\n");
    }
    st.add("config.txt", config.as_bytes())?;
    st.add("cmdline.txt", format!("{RPI_CMDLINE}\n").as_bytes())?;
    st.write_to(&FatVolume::new(image, p_boot.start)).await?;
    read_table(image).await
}

fn create_sparse(image: &Path, size: u64) -> Result<()> {
    let f = File::create(image).with_context(|| format!("creating {}", image.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", image.display()))?;
    Ok(())
}

/// Writes an MBR with `(start_lba, sectors, type, bootable)` entries.
pub fn write_mbr(image: &Path, parts: &[(u32, u64, u8, bool)]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let mut mbr = mbrman::MBR::new_from(&mut f, 512, rand::random()).context("creating an MBR")?;
    for (i, &(start, sectors, sys, boot)) in parts.iter().enumerate() {
        mbr[i + 1] = mbrman::MBRPartitionEntry {
            boot: if boot {
                mbrman::BOOT_ACTIVE
            } else {
                mbrman::BOOT_INACTIVE
            },
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: start,
            sectors: u32::try_from(sectors).context("partition too large for an MBR")?,
        };
    }
    mbr.write_into(&mut f)
        .with_context(|| format!("writing the MBR of {}", image.display()))?;
    f.seek(SeekFrom::Start(0))?;
    f.flush()?;
    Ok(())
}

/// Creates ext4 labelled `label` in partition `p` of `image`, filled from `tree` when given.
pub async fn mke2fs(
    image: &Path,
    p: &super::Partition,
    label: &str,
    tree: Option<&Path>,
) -> Result<()> {
    let mut t = Tool::new("mke2fs")
        .args(["-F", "-q", "-t", "ext4", "-L", label])
        .arg("-E")
        .arg(format!("offset={}", p.start));
    if let Some(tree) = tree {
        t = t.arg("-d").arg(tree);
    }
    t.arg(image)
        .arg(format!("{}k", p.size / 1024))
        .timeout(Duration::from_secs(600))
        .run()
        .await
        .with_context(|| format!("creating ext4 {label:?} in {}", image.display()))?;
    Ok(())
}

/// A random RFC 4122 version 4 UUID, upper case as sgdisk prints it.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
