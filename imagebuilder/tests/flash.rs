//! `imagebuilder flash` against a regular file and a loop device (root, as in CI), with images
//! whose block maps come from bmaptool itself.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use imagebuilder::flash::{flash, FlashRequest, Refusal, SystemBlockInfo};
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

fn request(img: &Path, bmap: &Path, device: &Path) -> FlashRequest {
    FlashRequest {
        image: img.into(),
        bmap: Some(bmap.into()),
        device: device.into(),
        yes: true,
        progress: false,
    }
}

#[test]
fn flashes_a_regular_file_and_reproduces_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bmap) = sample_image(dir.path());
    let target = dir.path().join("card.bin");
    // Unmapped blocks are not written (bmaptool's semantics), so start from an empty file.
    std::fs::File::create(&target).unwrap();
    let report = flash(&request(&img, &bmap, &target), &SystemBlockInfo).unwrap();
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
        flash(&request(&compressed, &bmap, &target), &SystemBlockInfo).unwrap();
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
    let err = flash(&request(&img, &bmap, &target), &SystemBlockInfo).unwrap_err();
    assert!(format!("{err:#}").contains("image is corrupt"), "{err:#}");
}

struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the loop-device flash test needs root (CI runs as root)"
        );
        let out = Cmd::new("losetup", Duration::from_secs(30))
            .args(["-f", "--show"])
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
    // Whatever / lives on here, flashing it must be refused before anything is opened for
    // writing. In a container / may be an overlay without a block device: then the check is
    // done against the device of /proc/self/mounts' root entry if it is one.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root_source = mounts.lines().find_map(|l| {
        let mut p = l.split_whitespace();
        let (s, m) = (p.next()?, p.next()?);
        (m == "/" && s.starts_with("/dev/")).then(|| s.to_owned())
    });
    let Some(root_dev) = root_source else {
        panic!("cannot find the block device under / in /proc/self/mounts; this test needs a machine whose root is on a block device");
    };
    let err =
        imagebuilder::flash::check_target(&SystemBlockInfo, Path::new(&root_dev), u64::MAX, 1)
            .unwrap_err();
    assert!(
        matches!(err, Refusal::Mounted { .. } | Refusal::RunningSystem { .. }),
        "{err}"
    );
}
