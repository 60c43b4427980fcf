//! `imagebuilder flash` against a regular file and loop devices (root, as in CI), with images
//! whose block maps come from bmaptool itself, and the refusals attacked with real devices: a
//! mount only another mount namespace sees, a partition node, a regular file without
//! `--allow-file`.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imagebuilder::flash::{flash, Allow, FlashRequest, Refusal, SystemBlockInfo};
use rackseed_host::command::Cmd;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// A sparse 8 MiB image with data at a few places, and its bmap from `bmaptool create`.
fn sample_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("sample.img");
    let mut f = std::fs::File::create(&img).unwrap();
    f.set_len(8 * MIB).unwrap();
    for (off, byte) in [(0u64, 0x11u8), (3 * MIB + 123, 0x22), (8 * MIB - 10, 0x33)] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&vec![byte; 5000.min((8 * MIB - off) as usize)])
            .unwrap();
    }
    drop(f);
    let bmap = dir.join("sample.bmap");
    Cmd::new("bmaptool", Duration::from_secs(60))
        .args(["create", "-o"])
        .arg(&bmap)
        .arg(&img)
        .run_blocking()
        .expect("bmaptool create (Debian package bmap-tools) must be installed");
    (img, bmap)
}

fn sha256_prefix(path: &Path, len: u64) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    h.update(&buf);
    hex::encode(h.finalize())
}

/// A request for a block device (no flags).
fn request(img: &Path, bmap: &Path, device: &Path) -> FlashRequest {
    FlashRequest {
        image: img.into(),
        bmap: Some(bmap.into()),
        device: device.into(),
        yes: true,
        progress: false,
        allow: Allow::default(),
    }
}

/// A request for a regular file, with `--allow-file`.
fn file_request(img: &Path, bmap: &Path, device: &Path) -> FlashRequest {
    FlashRequest {
        allow: Allow {
            partition: false,
            file: true,
        },
        ..request(img, bmap, device)
    }
}

#[test]
fn flashes_a_regular_file_and_reproduces_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let target = dir.path().join("card.bin");
    // Unmapped blocks are not written (bmaptool's semantics), so start from an empty file.
    std::fs::File::create(&target).unwrap();
    let report = flash(&file_request(&img, &bmap, &target), &SystemBlockInfo).unwrap();
    assert_eq!(report.image_size, 8 * MIB);
    assert!(
        report.written_bytes < 8 * MIB,
        "only mapped blocks are written"
    );
    assert_eq!(report.verified_bytes, report.written_bytes);
    assert_eq!(
        sha256_prefix(&target, 8 * MIB),
        sha256_prefix(&img, 8 * MIB)
    );
}

#[test]
fn flashes_compressed_images_as_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    Cmd::new("xz", Duration::from_secs(60))
        .args(["-k", "-T0"])
        .arg(&img)
        .run_blocking()
        .unwrap();
    Cmd::new("zstd", Duration::from_secs(60))
        .args(["-q", "-k"])
        .arg(&img)
        .run_blocking()
        .unwrap();
    for ext in ["xz", "zst"] {
        let target = dir.path().join(format!("card-{ext}.bin"));
        std::fs::File::create(&target).unwrap();
        let compressed = dir.path().join(format!("sample.img.{ext}"));
        flash(&file_request(&compressed, &bmap, &target), &SystemBlockInfo).unwrap();
        assert_eq!(
            sha256_prefix(&target, 8 * MIB),
            sha256_prefix(&img, 8 * MIB)
        );
    }
}

#[test]
fn corrupt_image_fails_naming_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(3 * MIB + 200)).unwrap();
    f.write_all(b"bitrot").unwrap();
    drop(f);
    let target = dir.path().join("card.bin");
    std::fs::File::create(&target).unwrap();
    let err = flash(&file_request(&img, &bmap, &target), &SystemBlockInfo).unwrap_err();
    assert!(format!("{err:#}").contains("image is corrupt"), "{err:#}");
}

struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        Loop::attach_with(file, &[])
    }

    /// `losetup -f --show [extra] FILE`, e.g. `-P` to scan its partition table.
    fn attach_with(file: &Path, extra: &[&str]) -> Loop {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the loop-device flash test needs root (CI runs as root)"
        );
        let out = Cmd::new("losetup", Duration::from_secs(30))
            .args(["-f", "--show"])
            .args(extra)
            .arg(file)
            .run_blocking()
            .expect("losetup must work (root, /dev/loop-control)");
        Loop(out.stdout.trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Cmd::new("losetup", Duration::from_secs(30))
            .args(["-d", &self.0])
            .run_blocking();
    }
}

#[test]
fn flashes_a_loop_device_and_refuses_it_when_mounted_or_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());

    let backing = dir.path().join("disk.bin");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let lo = Loop::attach(&backing);
    let dev = PathBuf::from(&lo.0);
    flash(&request(&img, &bmap, &dev), &SystemBlockInfo).unwrap();
    assert_eq!(sha256_prefix(&dev, 8 * MIB), sha256_prefix(&img, 8 * MIB));

    // Mounted: put a filesystem on it and mount it; flashing must refuse and change nothing.
    // ext4: the one writable filesystem every kernel here can mount (vfat may be a module
    // that is absent in containers).
    Cmd::new("mkfs.ext4", Duration::from_secs(30))
        .args(["-q", "-F"])
        .arg(&dev)
        .run_blocking()
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    Cmd::new("mount", Duration::from_secs(30))
        .arg(&dev)
        .arg(&mnt)
        .run_blocking()
        .unwrap();
    // Mounting writes to the superblock, so take the reference after mounting.
    let before = sha256_prefix(&dev, 8 * MIB);
    let err = flash(&request(&img, &bmap, &dev), &SystemBlockInfo).unwrap_err();
    let after = sha256_prefix(&dev, 8 * MIB);
    Cmd::new("umount", Duration::from_secs(30))
        .arg(&mnt)
        .run_blocking()
        .unwrap();
    assert!(
        matches!(err.downcast_ref::<Refusal>(), Some(Refusal::Mounted { .. })),
        "{err:#}"
    );
    assert_eq!(after, before, "a refused flash wrote nothing");

    // Too small: a 4 MiB device for an 8 MiB image.
    let small = dir.path().join("small.bin");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let lo_small = Loop::attach(&small);
    let err = flash(
        &request(&img, &bmap, Path::new(&lo_small.0)),
        &SystemBlockInfo,
    )
    .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Refusal>(),
            Some(Refusal::TooSmall { .. })
        ),
        "{err:#}"
    );
}

#[test]
fn refuses_the_disk_holding_the_running_system() {
    // The device under / as the kernel numbers it (mountinfo's MAJ:MIN), so this works
    // whatever /dev holds. In a container / may be an overlay without a block device.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = imagebuilder::flash::parse_mountinfo(&mountinfo)
        .into_iter()
        .rfind(|m| m.mountpoint == "/")
        .expect("a mount at /");
    assert!(
        Path::new(&format!("/sys/dev/block/{}:{}", root.dev.0, root.dev.1)).exists(),
        "/ is on {}:{} ({}), not a block device; this test needs a machine whose root is on one",
        root.dev.0,
        root.dev.1,
        root.source
    );
    let allow = Allow {
        partition: true,
        file: false,
    };
    let err = imagebuilder::flash::check_target(
        &SystemBlockInfo,
        &root.source,
        imagebuilder::flash::TargetKind::Block(root.dev),
        allow,
        u64::MAX,
        1,
    )
    .unwrap_err();
    assert!(
        matches!(err, Refusal::Mounted { .. } | Refusal::RunningSystem { .. }),
        "{err}"
    );
}

#[test]
fn refuses_a_regular_file_without_allow_file() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let target = dir.path().join("sdb-typo");
    std::fs::File::create(&target).unwrap();
    let err = flash(&request(&img, &bmap, &target), &SystemBlockInfo).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Refusal>(),
            Some(Refusal::RegularFile { .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("--allow-file"), "{err:#}");
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        0,
        "nothing written"
    );
}

/// Waits up to 10 s for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn refuses_a_partition_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let backing = dir.path().join("disk.bin");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    // One 16 MiB partition at 1 MiB.
    Cmd::new("sfdisk", Duration::from_secs(30))
        .args(["-q", "--label", "dos"])
        .arg(&backing)
        .stdin_bytes(b"start=2048, size=32768, type=83\n".to_vec())
        .run_blocking()
        .unwrap();
    let lo = Loop::attach_with(&backing, &["-P"]);
    let part = PathBuf::from(format!("{}p1", lo.0));
    // Some kernels (this CI's among them) find no partitions in the scan `-P` asks for;
    // partx adds them through BLKPG, the same kernel partitions either way.
    std::thread::sleep(Duration::from_millis(500));
    if !part.exists() {
        Cmd::new("partx", Duration::from_secs(30))
            .arg("-a")
            .arg(&lo.0)
            .run_blocking()
            .unwrap();
    }
    wait_for(&format!("{} to appear", part.display()), || part.exists());

    let before = sha256_prefix(&part, 8 * MIB);
    let err = flash(&request(&img, &bmap, &part), &SystemBlockInfo).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Refusal>(),
            Some(Refusal::Partition { .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("--allow-partition"), "{err:#}");
    assert_eq!(
        sha256_prefix(&part, 8 * MIB),
        before,
        "a refused flash wrote nothing"
    );

    // With the flag, the partition takes the image.
    let allowed = FlashRequest {
        allow: Allow {
            partition: true,
            file: false,
        },
        ..request(&img, &bmap, &part)
    };
    flash(&allowed, &SystemBlockInfo).unwrap();
    assert_eq!(sha256_prefix(&part, 8 * MIB), sha256_prefix(&img, 8 * MIB));
}

#[test]
fn refuses_a_loop_device_mounted_only_in_another_mount_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let backing = dir.path().join("disk.bin");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let lo = Loop::attach(&backing);
    let dev = PathBuf::from(&lo.0);
    Cmd::new("mkfs.ext4", Duration::from_secs(30))
        .args(["-q", "-F"])
        .arg(&dev)
        .run_blocking()
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ready = dir.path().join("ready");
    // A process in its own mount namespace (private propagation: this one never sees the
    // mount) that mounts the device and stays alive; killed when the handle is dropped.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spawned = {
        let _in_rt = rt.enter();
        Cmd::new("unshare", Duration::from_secs(120))
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount '{}' '{}' && touch '{}' && exec sleep 120",
                dev.display(),
                mnt.display(),
                ready.display()
            ))
            .spawn()
    };
    let mut holder = spawned.unwrap();
    wait_for("the other namespace to mount the device", || ready.exists());
    let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !ours.contains(mnt.to_str().unwrap()),
        "the mount must be invisible in this namespace"
    );
    let holder_pid = holder.id().unwrap();

    let before = sha256_prefix(&dev, 8 * MIB);
    let result = flash(&request(&img, &bmap, &dev), &SystemBlockInfo);
    let after = sha256_prefix(&dev, 8 * MIB);
    rt.block_on(holder.kill()).unwrap();
    let err = result.unwrap_err();
    match err.downcast_ref::<Refusal>() {
        Some(Refusal::Mounted {
            pid: Some(pid),
            mountpoint,
            ..
        }) => {
            assert_eq!(*pid, holder_pid, "{err:#}");
            assert_eq!(Path::new(mountpoint), mnt, "{err:#}");
        }
        _ => panic!("expected a refusal naming the other namespace's mount: {err:#}"),
    }
    assert!(
        format!("{err:#}").contains("mount namespace of process"),
        "{err:#}"
    );
    assert_eq!(after, before, "a refused flash wrote nothing");

    // Once that namespace is gone, the same device flashes.
    wait_for("the namespace's mount to go away", || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&dev)
            .is_ok()
    });
    flash(&request(&img, &bmap, &dev), &SystemBlockInfo).unwrap();
}

/// An image of `size` bytes with data in every block, and its bmap from `bmaptool create`.
fn dense_image(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let img = dir.join("dense.img");
    let data: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&img, data).unwrap();
    let bmap = dir.join("dense.bmap");
    Cmd::new("bmaptool", Duration::from_secs(60))
        .args(["create", "-o"])
        .arg(&bmap)
        .arg(&img)
        .run_blocking()
        .expect("bmaptool create (Debian package bmap-tools) must be installed");
    (img, bmap)
}

/// A tmpfs of `size` mounted at `dir/name`, unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(dir: &Path, name: &str, size: &str) -> SmallTmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this flash test mounts a tmpfs and needs root (CI runs as root)"
        );
        let at = dir.join(name);
        std::fs::create_dir(&at).unwrap();
        Cmd::new("mount", Duration::from_secs(30))
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .run_blocking()
            .expect("mounting a tmpfs");
        SmallTmpfs(at)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Cmd::new("umount", Duration::from_secs(30))
            .arg(&self.0)
            .run_blocking();
    }
}

#[test]
fn a_write_that_stops_part_way_says_the_target_holds_part_of_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = dense_image(dir.path(), 8 * MIB);
    // A target with room for 2 MiB of the 8: the write pass fails with ENOSPC part-way.
    let fs = SmallTmpfs::mount(dir.path(), "small", "2m");
    let target = fs.0.join("card.bin");
    std::fs::File::create(&target).unwrap();
    let err = flash(&file_request(&img, &bmap, &target), &SystemBlockInfo).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with(&format!(
            "flashing stopped part-way: {} may hold part of the image",
            target.display()
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("writing {} at byte", target.display())),
        "{msg}"
    );
    assert!(msg.contains("No space left on device"), "{msg}");
}

#[test]
fn a_truncated_compressed_image_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = dense_image(dir.path(), 8 * MIB);
    Cmd::new("xz", Duration::from_secs(60))
        .args(["-k", "-T0"])
        .arg(&img)
        .run_blocking()
        .unwrap();
    let xz = dir.path().join("dense.img.xz");
    let len = std::fs::metadata(&xz).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&xz)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let target = dir.path().join("card.bin");
    std::fs::File::create(&target).unwrap();
    let err = flash(&file_request(&xz, &bmap, &target), &SystemBlockInfo).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.starts_with("flashing stopped part-way"), "{msg}");
    assert!(
        msg.contains(&format!("reading image {} at byte", xz.display()))
            || msg.contains(&format!("image {} is shorter", xz.display())),
        "{msg}"
    );

    // A raw image shorter than its block map is refused before anything is written.
    let short = dir.path().join("short.img");
    std::fs::write(&short, &std::fs::read(&img).unwrap()[..(5 * MIB) as usize]).unwrap();
    let err = flash(&file_request(&short, &bmap, &target), &SystemBlockInfo).unwrap_err();
    assert!(
        format!("{err:#}").contains("is shorter than its block map says"),
        "{err:#}"
    );
}
