//! The disk step: the partition table of an image file and the filesystems in it, found by
//! their labels (never by partition number: Ubuntu renumbered the cloud image's BOOT partition
//! from 16 to 13 in 2024).
//!
//! The table is read with `sfdisk --json` ([`parse_sfdisk_json`] is tested on captured output);
//! filesystem type and label come from the superblock / boot sector ([`probe_fs`]), so nothing
//! is mounted. [`compose`] builds a fresh layout from a root tree; [`grow`] enlarges an image.
//! To support a new layout, add its labels to [`compose::labels`] and teach [`compose`] to create it.

pub mod compose;
pub mod fat;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::tool::Tool;

/// Kind of partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Dos,
}

/// Filesystem found at a partition's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Vfat,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Number as in the table (informational only; never used to pick a partition).
    pub number: u32,
    /// Byte offset in the image.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// GPT type GUID or MBR type byte, as sfdisk prints it.
    pub part_type: String,
    /// GPT partition GUID (PARTUUID) when present.
    pub uuid: Option<String>,
    pub fs: FsKind,
    /// Filesystem label (ext4 volume name or FAT volume label).
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    /// The partition whose filesystem has `label` (case-insensitive, as FAT labels are upper
    /// case on disk). Two partitions with the label is an error: the choice would be a guess.
    pub fn by_label(&self, label: &str) -> Result<&Partition> {
        let found: Vec<&Partition> = self
            .partitions
            .iter()
            .filter(|p| {
                p.label
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(label))
            })
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no partition labelled {label:?} (labels found: {})",
                self.partitions
                    .iter()
                    .map(|p| p.label.clone().unwrap_or_else(|| "-".into()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => bail!(
                "{} partitions are labelled {label:?}; refusing to guess",
                found.len()
            ),
        }
    }
}

#[derive(Deserialize)]
struct SfdiskDoc {
    partitiontable: SfdiskTable,
}

#[derive(Deserialize)]
struct SfdiskTable {
    label: String,
    #[serde(default)]
    sectorsize: Option<u64>,
    #[serde(default)]
    partitions: Vec<SfdiskPart>,
}

#[derive(Deserialize)]
struct SfdiskPart {
    node: String,
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    part_type: String,
    #[serde(default)]
    uuid: Option<String>,
}

/// Parses `sfdisk --json IMAGE`. Filesystem fields are left `Unknown` for [`probe_fs`].
pub fn parse_sfdisk_json(text: &str) -> Result<PartitionTable> {
    let doc: SfdiskDoc = serde_json::from_str(text).context("parsing sfdisk --json output")?;
    let t = doc.partitiontable;
    let kind = match t.label.as_str() {
        "gpt" => TableKind::Gpt,
        "dos" => TableKind::Dos,
        other => bail!("unsupported partition table type {other:?} (expected gpt or dos)"),
    };
    let sector = t.sectorsize.unwrap_or(512);
    let mut partitions = Vec::new();
    for p in t.partitions {
        let digits: String = p
            .node
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let number: u32 = digits
            .chars()
            .rev()
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        partitions.push(Partition {
            number,
            start: p.start * sector,
            size: p.size * sector,
            part_type: p.part_type,
            uuid: p.uuid,
            fs: FsKind::Unknown,
            label: None,
        });
    }
    Ok(PartitionTable { kind, partitions })
}

/// Reads the filesystem type and label at `offset` of `file`.
pub fn probe_fs(file: &mut File, offset: u64) -> Result<(FsKind, Option<String>)> {
    let mut buf = vec![0u8; 2048];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)
        .context("reading a partition's first sectors")?;
    Ok(probe_fs_bytes(&buf))
}

/// [`probe_fs`] on the first 2 KiB of a partition.
pub fn probe_fs_bytes(buf: &[u8]) -> (FsKind, Option<String>) {
    // ext2/3/4: superblock at 1024, magic 0xEF53 at +56, volume name (16 bytes) at +120.
    if buf.len() >= 2048 && buf[1024 + 56] == 0x53 && buf[1024 + 57] == 0xEF {
        return (FsKind::Ext4, clean_label(&buf[1024 + 120..1024 + 136]));
    }
    // FAT boot sector: 0x55AA signature; FAT32 label at 0x47 ("FAT32   " at 0x52),
    // FAT12/16 label at 0x2B ("FAT" at 0x36).
    if buf.len() >= 512 && buf[510] == 0x55 && buf[511] == 0xAA {
        if &buf[0x52..0x57] == b"FAT32" {
            return (FsKind::Vfat, clean_label(&buf[0x47..0x52]));
        }
        if &buf[0x36..0x39] == b"FAT" {
            return (FsKind::Vfat, clean_label(&buf[0x2B..0x36]));
        }
    }
    (FsKind::Unknown, None)
}

fn clean_label(raw: &[u8]) -> Option<String> {
    let s: String = String::from_utf8_lossy(raw)
        .trim_end_matches(['\0', ' '])
        .to_string();
    if s.is_empty() || s == "NO NAME" {
        None
    } else {
        Some(s)
    }
}

/// Reads the partition table and probes each partition. Fails when a partition lies beyond the
/// end of the file (a truncated image).
pub async fn read_table(image: &Path) -> Result<PartitionTable> {
    let len = std::fs::metadata(image)
        .with_context(|| format!("reading {}", image.display()))?
        .len();
    let json = Tool::new("sfdisk")
        .arg("--json")
        .arg(image)
        .timeout(Duration::from_secs(30))
        .run()
        .await
        .with_context(|| format!("reading the partition table of {}", image.display()))?;
    let mut t = parse_sfdisk_json(&json).with_context(|| format!("reading {}", image.display()))?;
    check_within(&t, len).with_context(|| format!("checking {}", image.display()))?;
    let mut f = File::open(image)?;
    for p in &mut t.partitions {
        let (fs, label) = probe_fs(&mut f, p.start)?;
        p.fs = fs;
        p.label = label;
    }
    Ok(t)
}

/// Every partition must end within `len` bytes.
pub fn check_within(t: &PartitionTable, len: u64) -> Result<()> {
    for p in &t.partitions {
        if p.start + p.size > len {
            bail!(
                "image is truncated: partition {} ends at byte {} but the file has {len} bytes",
                p.number,
                p.start + p.size
            );
        }
    }
    if t.partitions.is_empty() {
        bail!("image has a partition table but no partitions");
    }
    Ok(())
}

/// Grows `image` to `size` bytes (never shrinks). A GPT gets its backup header moved to the
/// new end; partitions are left as they are (growpart takes the disk at first boot).
pub async fn grow(image: &Path, kind: TableKind, size: u64) -> Result<()> {
    let len = std::fs::metadata(image)?.len();
    if size < len {
        bail!("configured disk size {size} bytes is smaller than the base image ({len} bytes)");
    }
    if size == len {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    f.set_len(size)
        .with_context(|| format!("growing {} to {size} bytes", image.display()))?;
    drop(f);
    if kind == TableKind::Gpt {
        Tool::new("sgdisk")
            .arg("-e")
            .arg(image)
            .timeout(Duration::from_secs(30))
            .run()
            .await
            .with_context(|| format!("moving the GPT backup header of {}", image.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT: &str = include_str!("../../../tests/fixtures/image/sfdisk-gpt.json");
    const DOS: &str = include_str!("../../../tests/fixtures/image/sfdisk-dos.json");

    #[test]
    fn parses_gpt_with_high_partition_numbers() {
        let t = parse_sfdisk_json(GPT).unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        let nums: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
        assert!(nums.contains(&15) && nums.contains(&1), "{nums:?}");
        assert!(t.partitions.iter().all(|p| p.uuid.is_some()));
        assert_eq!(t.partitions[0].start % 512, 0);
    }

    #[test]
    fn parses_dos() {
        let t = parse_sfdisk_json(DOS).unwrap();
        assert_eq!(t.kind, TableKind::Dos);
        assert_eq!(t.partitions.len(), 2);
        assert_eq!(t.partitions[0].part_type, "c");
    }

    #[test]
    fn truncation_is_detected() {
        let t = parse_sfdisk_json(DOS).unwrap();
        let end = t.partitions.iter().map(|p| p.start + p.size).max().unwrap();
        assert!(check_within(&t, end).is_ok());
        let e = check_within(&t, end - 1).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn labels_from_superblocks() {
        let mut ext = vec![0u8; 2048];
        ext[1024 + 56] = 0x53;
        ext[1024 + 57] = 0xEF;
        ext[1024 + 120..1024 + 128].copy_from_slice(b"writable");
        assert_eq!(
            probe_fs_bytes(&ext),
            (FsKind::Ext4, Some("writable".into()))
        );
        let mut fat = vec![0u8; 2048];
        fat[510] = 0x55;
        fat[511] = 0xAA;
        fat[0x52..0x5A].copy_from_slice(b"FAT32   ");
        fat[0x47..0x52].copy_from_slice(b"SYSTEM-BOOT");
        assert_eq!(
            probe_fs_bytes(&fat),
            (FsKind::Vfat, Some("SYSTEM-BOOT".into()))
        );
        assert_eq!(probe_fs_bytes(&[0u8; 2048]), (FsKind::Unknown, None));
    }

    #[test]
    fn by_label_refuses_duplicates_and_names_what_exists() {
        let mut t = parse_sfdisk_json(DOS).unwrap();
        t.partitions[0].label = Some("system-boot".into());
        t.partitions[1].label = Some("writable".into());
        assert_eq!(t.by_label("SYSTEM-BOOT").unwrap().number, 1);
        let e = t.by_label("cloudimg-rootfs").unwrap_err().to_string();
        assert!(e.contains("writable"), "{e}");
        t.partitions[0].label = Some("writable".into());
        assert!(t.by_label("writable").is_err());
    }
}
