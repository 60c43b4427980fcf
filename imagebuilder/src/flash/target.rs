//! Which devices `flash` may overwrite. The device is opened once, exclusively (`O_EXCL`: for
//! a block device the kernel refuses it while the device or any of its partitions is mounted,
//! used as swap, a RAID/LVM/device-mapper member, a ZFS vdev, or opened exclusively by another
//! program), and every check runs on that open descriptor, never on the path again:
//!
//! - its type (`fstat`): a block device, or a regular file only with `--allow-file`;
//! - a whole disk, not a partition (`/sys/dev/block/MAJ:MIN/partition`), unless
//!   `--allow-partition`;
//! - not mounted in any mount namespace: every `/proc/*/mountinfo` is read (one per
//!   namespace) and matched by device number, so a mount in a container, a `unshare -m`
//!   shell, or a filesystem whose source is not a path (ZFS datasets, `/dev/root`) is seen;
//!   path sources (btrfs, whose device number is anonymous) are resolved inside that
//!   process's root;
//! - not swap, not held (`holders/` of the device and of its partitions: LVM, MD, dm-crypt);
//! - not the disk under the running root (this process's `/` and PID 1's);
//! - large enough for the image.
//!
//! `flash` runs the checks when it opens the device and again after the confirmation prompt,
//! right before writing. When the exclusive open itself is refused, the checks run on a
//! read-only descriptor to name the reason. To add a rule, add a [`Refusal`] and test it in
//! [`check_target`] against [`BlockInfo`] fakes.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Why a target device is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{device} is mounted at {mountpoint} ({source_dev}{}); unmount it first",
        match pid { Some(p) => format!(", in the mount namespace of process {p}"), None => String::new() })]
    Mounted {
        device: String,
        source_dev: String,
        mountpoint: String,
        /// A process in the mount namespace holding the mount, when it is not ours.
        pid: Option<u32>,
    },
    #[error("{device} is in use as swap ({source_dev}); swapoff it first")]
    Swap { device: String, source_dev: String },
    #[error("{device} holds the running system (the disk under /); refusing to overwrite it")]
    RunningSystem { device: String },
    #[error("{device} is in use by {holder} (device-mapper/LVM/RAID); release it first")]
    Held { device: String, holder: String },
    #[error(
        "{device} is in use: the kernel refused to open it exclusively (mounted, swap, a \
         RAID/LVM/ZFS member or opened by another program), though no mount or holder was found"
    )]
    Busy { device: String },
    #[error("{device} is {device_size} bytes, smaller than the image ({image_size} bytes)")]
    TooSmall {
        device: String,
        device_size: u64,
        image_size: u64,
    },
    #[error(
        "{device} is a partition (of disk {disk}); flash the whole disk, or pass \
         --allow-partition to write the image into this partition"
    )]
    Partition { device: String, disk: String },
    #[error(
        "{device} is a regular file, not a device; pass --allow-file to write the image into it"
    )]
    RegularFile { device: String },
    #[error("{device} is neither a block device nor a regular file")]
    NotADevice { device: String },
    #[error(
        "{device} changed while flash was asking (was {before}, now {after}); nothing was written"
    )]
    Changed {
        device: String,
        before: String,
        after: String,
    },
}

/// What the open descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A block device `(major, minor)`.
    Block((u64, u64)),
    /// A regular file, identified by `(st_dev, st_ino)`.
    File((u64, u64)),
    Other,
}

impl TargetKind {
    /// `fstat` of an open descriptor.
    pub fn of(f: &File) -> std::io::Result<TargetKind> {
        let m = f.metadata()?;
        let t = m.file_type();
        Ok(if t.is_block_device() {
            TargetKind::Block(split_dev(m.rdev()))
        } else if t.is_file() {
            TargetKind::File((m.dev(), m.ino()))
        } else {
            TargetKind::Other
        })
    }

    fn describe(&self) -> String {
        match self {
            TargetKind::Block((a, b)) => format!("block device {a}:{b}"),
            TargetKind::File((d, i)) => format!("file {i} on device {d}"),
            TargetKind::Other => "neither block device nor file".into(),
        }
    }
}

/// What the user allowed besides whole disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allow {
    /// `--allow-partition`
    pub partition: bool,
    /// `--allow-file`
    pub file: bool,
}

/// One mount namespace's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountTable {
    /// A process in that namespace.
    pub pid: u32,
    /// Whether it is this process's namespace.
    pub ours: bool,
    /// Its `/proc/PID/mountinfo`.
    pub mountinfo: String,
}

/// One line of `mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: (u64, u64),
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
}

/// Block-device facts read from the running system; a trait so the checks are testable.
pub trait BlockInfo {
    /// The mount table of every mount namespace on the machine.
    fn mount_tables(&self) -> Vec<MountTable>;
    /// `/proc/swaps`.
    fn swaps(&self) -> String;
    /// `(major, minor)` of the block device at `path` as process `pid` sees it (`None`: this
    /// process); `None` when it is not a block device.
    fn source_rdev(&self, pid: Option<u32>, path: &str) -> Option<(u64, u64)>;
    /// Devices under the running root: this process's `/` and PID 1's.
    fn root_devs(&self) -> Vec<(u64, u64)>;
    /// Whether the block device is a partition.
    fn is_partition(&self, dev: (u64, u64)) -> bool;
    /// The whole-disk `(major, minor)` for a partition or disk `(major, minor)`.
    fn disk_of(&self, dev: (u64, u64)) -> (u64, u64);
    /// Kernel names of devices holding this one or, for a disk, any of its partitions.
    fn holders(&self, dev: (u64, u64)) -> Vec<String>;
}

/// [`BlockInfo`] from `/proc` and `/sys`.
#[derive(Debug, Default)]
pub struct SystemBlockInfo;

fn split_dev(d: u64) -> (u64, u64) {
    (nix::sys::stat::major(d), nix::sys::stat::minor(d))
}

fn sys_block(dev: (u64, u64)) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1))
}

impl BlockInfo for SystemBlockInfo {
    fn mount_tables(&self) -> Vec<MountTable> {
        let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let own = ns_of("self");
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        // Ours first, so a mount visible here is reported without a namespace note.
        let own_pid = std::process::id();
        let mut pids = vec![own_pid];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            pids.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|p| *p != own_pid),
            );
        }
        for pid in pids {
            let ns = ns_of(&pid.to_string());
            // Kernel threads and vanished processes have no readable namespace link; they
            // share PID 1's namespace, which is read through PID 1.
            let Some(ns) = ns else { continue };
            if !seen.insert(ns.clone()) {
                continue;
            }
            if let Ok(mountinfo) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
                out.push(MountTable {
                    pid,
                    ours: Some(&ns) == own.as_ref(),
                    mountinfo,
                });
            }
        }
        out
    }
    fn swaps(&self) -> String {
        std::fs::read_to_string("/proc/swaps").unwrap_or_default()
    }
    fn source_rdev(&self, pid: Option<u32>, path: &str) -> Option<(u64, u64)> {
        let full = match pid {
            Some(p) => format!("/proc/{p}/root{path}"),
            None => path.to_owned(),
        };
        let m = std::fs::metadata(full).ok()?;
        m.file_type().is_block_device().then(|| split_dev(m.rdev()))
    }
    fn root_devs(&self) -> Vec<(u64, u64)> {
        ["/", "/proc/1/root"]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| split_dev(m.dev()))
            .collect()
    }
    fn is_partition(&self, dev: (u64, u64)) -> bool {
        sys_block(dev).join("partition").exists()
    }
    fn disk_of(&self, dev: (u64, u64)) -> (u64, u64) {
        // /sys/dev/block/M:m links into .../block/<disk>/<part>; a partition's parent
        // folder is its disk.
        let sys = sys_block(dev);
        if sys.join("partition").exists() {
            if let Ok(text) = std::fs::read_to_string(sys.join("../dev")) {
                if let Some(d) = parse_dev(text.trim()) {
                    return d;
                }
            }
        }
        dev
    }
    fn holders(&self, dev: (u64, u64)) -> Vec<String> {
        let sys = sys_block(dev);
        let mut dirs = vec![sys.join("holders")];
        if let Ok(entries) = std::fs::read_dir(&sys) {
            for e in entries.flatten() {
                if e.path().join("partition").exists() {
                    dirs.push(e.path().join("holders"));
                }
            }
        }
        let mut out = Vec::new();
        for d in dirs {
            if let Ok(entries) = std::fs::read_dir(d) {
                out.extend(
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into()),
                );
            }
        }
        out
    }
}

fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/PID/mountinfo`: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS...] - FSTYPE
/// SOURCE SUPEROPTS`. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: parse_dev(l.get(2)?)?,
                mountpoint: unescape(l.get(4)?),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// Checks a target against the refusal rules. `shown` names it in messages, `device_size`
/// is what it can hold and `image_size` what it must.
pub fn check_target(
    info: &dyn BlockInfo,
    shown: &str,
    kind: TargetKind,
    allow: Allow,
    device_size: u64,
    image_size: u64,
) -> Result<(), Refusal> {
    let device = shown.to_owned();
    let target = match kind {
        TargetKind::Block(dev) => dev,
        TargetKind::File(_) if allow.file => return check_size(shown, device_size, image_size),
        TargetKind::File(_) => return Err(Refusal::RegularFile { device }),
        TargetKind::Other => return Err(Refusal::NotADevice { device }),
    };
    let target_disk = info.disk_of(target);
    let partition = info.is_partition(target);
    if partition && !allow.partition {
        return Err(Refusal::Partition {
            device,
            disk: format!("{}:{}", target_disk.0, target_disk.1),
        });
    }
    // A whole disk is in use when any of its partitions is; a partition when it, or the
    // whole disk it is carved from, is.
    let overlaps = |d: (u64, u64)| -> bool {
        if partition {
            d == target || d == target_disk
        } else {
            d == target || info.disk_of(d) == target
        }
    };
    for table in info.mount_tables() {
        let pid = (!table.ours).then_some(table.pid);
        for m in parse_mountinfo(&table.mountinfo) {
            let by_path = m
                .source
                .starts_with('/')
                .then(|| info.source_rdev(pid, &m.source))
                .flatten();
            if overlaps(m.dev) || by_path.is_some_and(overlaps) {
                return Err(Refusal::Mounted {
                    device,
                    source_dev: if m.source.starts_with('/') {
                        m.source
                    } else {
                        format!("{} {} on {}:{}", m.fstype, m.source, m.dev.0, m.dev.1)
                    },
                    mountpoint: m.mountpoint,
                    pid,
                });
            }
        }
    }
    for line in info.swaps().lines().skip(1) {
        if let Some(source) = line.split_whitespace().next() {
            let source = unescape(source);
            if source.starts_with('/') && info.source_rdev(None, &source).is_some_and(overlaps) {
                return Err(Refusal::Swap {
                    device,
                    source_dev: source,
                });
            }
        }
    }
    for root in info.root_devs() {
        if root == target || info.disk_of(root) == target_disk {
            return Err(Refusal::RunningSystem { device });
        }
    }
    if let Some(holder) = info.holders(target).into_iter().next() {
        return Err(Refusal::Held { device, holder });
    }
    check_size(shown, device_size, image_size)
}

fn check_size(shown: &str, device_size: u64, image_size: u64) -> Result<(), Refusal> {
    if device_size < image_size {
        return Err(Refusal::TooSmall {
            device: shown.to_owned(),
            device_size,
            image_size,
        });
    }
    Ok(())
}

/// The flash target, open for writing and checked.
#[derive(Debug)]
pub struct OpenTarget {
    pub file: File,
    pub kind: TargetKind,
    /// Bytes it holds now (a regular file: its length).
    pub size: u64,
    shown: String,
    allow: Allow,
}

impl OpenTarget {
    /// Opens `path` exclusively for writing and checks the descriptor.
    pub fn open(
        path: &Path,
        allow: Allow,
        info: &dyn BlockInfo,
        image_size: u64,
    ) -> Result<OpenTarget> {
        let shown = path.display().to_string();
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_EXCL | nix::libc::O_CLOEXEC)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                // Name the reason: run the checks on a read-only descriptor.
                let ro = File::open(path).with_context(|| format!("opening {shown}"))?;
                let kind = TargetKind::of(&ro).with_context(|| format!("inspecting {shown}"))?;
                check_target(info, &shown, kind, allow, u64::MAX, 0)?;
                return Err(Refusal::Busy { device: shown }.into());
            }
            Err(e) => return Err(e).with_context(|| format!("opening {shown} exclusively")),
        };
        let kind = TargetKind::of(&file).with_context(|| format!("inspecting {shown}"))?;
        let mut t = OpenTarget {
            file,
            kind,
            size: 0,
            shown,
            allow,
        };
        t.size = t.current_size()?;
        t.check(info, image_size)?;
        Ok(t)
    }

    fn current_size(&mut self) -> Result<u64> {
        Ok(match self.kind {
            TargetKind::File(_) => self.file.metadata()?.len(),
            _ => self
                .file
                .seek(SeekFrom::End(0))
                .with_context(|| format!("sizing {}", self.shown))?,
        })
    }

    /// Runs every check on the open descriptor (again): it must still be what was opened.
    pub fn check(&mut self, info: &dyn BlockInfo, image_size: u64) -> Result<()> {
        let now =
            TargetKind::of(&self.file).with_context(|| format!("inspecting {}", self.shown))?;
        if now != self.kind {
            return Err(Refusal::Changed {
                device: self.shown.clone(),
                before: self.kind.describe(),
                after: now.describe(),
            }
            .into());
        }
        let size = self.current_size()?;
        // A regular file grows to hold the image.
        let room = match self.kind {
            TargetKind::File(_) => size.max(image_size),
            _ => size,
        };
        check_target(info, &self.shown, now, self.allow, room, image_size)?;
        self.size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake system: disk 8:0 with partitions 8:1, 8:2 (`/dev/sdb*`); root on 9:1.
    struct FakeInfo {
        tables: Vec<MountTable>,
        swaps: &'static str,
        roots: Vec<(u64, u64)>,
        holders: Vec<String>,
    }

    impl BlockInfo for FakeInfo {
        fn mount_tables(&self) -> Vec<MountTable> {
            self.tables.clone()
        }
        fn swaps(&self) -> String {
            self.swaps.into()
        }
        fn source_rdev(&self, _pid: Option<u32>, path: &str) -> Option<(u64, u64)> {
            match path {
                "/dev/sdb" => Some((8, 0)),
                "/dev/sdb1" => Some((8, 1)),
                "/dev/sdb2" => Some((8, 2)),
                "/dev/vda1" => Some((9, 1)),
                _ => None,
            }
        }
        fn root_devs(&self) -> Vec<(u64, u64)> {
            self.roots.clone()
        }
        fn is_partition(&self, d: (u64, u64)) -> bool {
            d.1 != 0
        }
        fn disk_of(&self, d: (u64, u64)) -> (u64, u64) {
            if d.0 == 0 {
                d
            } else {
                (d.0, 0)
            }
        }
        fn holders(&self, _: (u64, u64)) -> Vec<String> {
            self.holders.clone()
        }
    }

    const HOST: &str = "22 1 9:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                        23 22 0:21 / /proc rw shared:2 - proc proc rw\n";

    fn table(pid: u32, ours: bool, mountinfo: &str) -> MountTable {
        MountTable {
            pid,
            ours,
            mountinfo: mountinfo.into(),
        }
    }

    fn fake() -> FakeInfo {
        FakeInfo {
            tables: vec![table(100, true, HOST)],
            swaps: "Filename Type Size Used Priority\n",
            roots: vec![(9, 1)],
            holders: vec![],
        }
    }

    const SDB: TargetKind = TargetKind::Block((8, 0));

    fn check(f: &FakeInfo, kind: TargetKind, allow: Allow) -> Result<(), Refusal> {
        check_target(f, "/dev/sdb", kind, allow, 100, 50)
    }

    #[test]
    fn parses_mountinfo_with_escapes_and_non_path_sources() {
        let text = "36 35 98:0 /mnt1 /media/my\\040card rw,noatime master:1 - ext3 /dev/root rw\n\
                    40 22 0:45 / /srv rw shared:9 - zfs rpool/srv rw,xattr\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].mountpoint, "/media/my card");
        assert_eq!(
            (m[1].fstype.as_str(), m[1].source.as_str()),
            ("zfs", "rpool/srv")
        );
    }

    #[test]
    fn a_free_whole_disk_is_accepted() {
        assert_eq!(check(&fake(), SDB, Allow::default()), Ok(()));
    }

    #[test]
    fn mounts_are_found_in_every_namespace_by_device_number() {
        // A partition mounted in another namespace, with a source that is no path.
        let f = FakeInfo {
            tables: vec![
                table(100, true, HOST),
                table(4242, false, "50 49 8:2 / /mnt rw - ext4 none rw\n"),
            ],
            ..fake()
        };
        let e = check(&f, SDB, Allow::default()).unwrap_err();
        assert!(
            matches!(e, Refusal::Mounted { pid: Some(4242), ref mountpoint, .. } if mountpoint == "/mnt"),
            "{e}"
        );
        assert!(
            e.to_string().contains("mount namespace of process 4242"),
            "{e}"
        );
        // btrfs-like: anonymous device number, the path source names the partition.
        let f = FakeInfo {
            tables: vec![table(
                100,
                true,
                "60 22 0:50 / /media/my\\040card rw - btrfs /dev/sdb1 rw\n",
            )],
            ..fake()
        };
        let e = check(&f, SDB, Allow::default()).unwrap_err();
        assert!(
            matches!(e, Refusal::Mounted { pid: None, ref mountpoint, .. } if mountpoint == "/media/my card"),
            "{e}"
        );
    }

    #[test]
    fn swap_root_holders_and_size_refuse() {
        let f = FakeInfo {
            swaps: "Filename Type Size Used Priority\n/dev/sdb1 partition 1 0 -2\n",
            ..fake()
        };
        assert!(matches!(
            check(&f, SDB, Allow::default()),
            Err(Refusal::Swap { .. })
        ));
        let f = FakeInfo {
            roots: vec![(9, 1), (8, 2)],
            ..fake()
        };
        assert!(matches!(
            check(&f, SDB, Allow::default()),
            Err(Refusal::RunningSystem { .. })
        ));
        let f = FakeInfo {
            holders: vec!["dm-0".into()],
            ..fake()
        };
        assert!(matches!(
            check(&f, SDB, Allow::default()),
            Err(Refusal::Held { .. })
        ));
        assert!(matches!(
            check_target(&fake(), "/dev/sdb", SDB, Allow::default(), 10, 50),
            Err(Refusal::TooSmall { .. })
        ));
    }

    #[test]
    fn partitions_and_files_need_their_flag() {
        let p = TargetKind::Block((8, 1));
        let e = check(&fake(), p, Allow::default()).unwrap_err();
        assert!(
            matches!(e, Refusal::Partition { ref disk, .. } if disk == "8:0"),
            "{e}"
        );
        assert!(e.to_string().contains("--allow-partition"), "{e}");
        let allow = Allow {
            partition: true,
            file: false,
        };
        assert_eq!(check(&fake(), p, allow), Ok(()));
        // Allowed, yet still refused while mounted or on the running system's disk.
        let f = FakeInfo {
            tables: vec![table(
                100,
                true,
                "70 22 8:1 / /boot rw - vfat /dev/sdb1 rw\n",
            )],
            ..fake()
        };
        assert!(matches!(check(&f, p, allow), Err(Refusal::Mounted { .. })));
        let f = FakeInfo {
            tables: vec![table(
                100,
                true,
                "70 22 8:2 / /data rw - ext4 /dev/sdb2 rw\n",
            )],
            ..fake()
        };
        assert_eq!(
            check(&f, p, allow),
            Ok(()),
            "a sibling partition is not this one"
        );
        let f = FakeInfo {
            roots: vec![(8, 2)],
            ..fake()
        };
        assert!(matches!(
            check(&f, p, allow),
            Err(Refusal::RunningSystem { .. })
        ));

        let file = TargetKind::File((1, 2));
        let e = check(&fake(), file, Allow::default()).unwrap_err();
        assert!(matches!(e, Refusal::RegularFile { .. }), "{e}");
        assert!(e.to_string().contains("--allow-file"), "{e}");
        let allow = Allow {
            partition: false,
            file: true,
        };
        assert_eq!(check(&fake(), file, allow), Ok(()));
        assert!(matches!(
            check(&fake(), TargetKind::Other, allow),
            Err(Refusal::NotADevice { .. })
        ));
    }
}
