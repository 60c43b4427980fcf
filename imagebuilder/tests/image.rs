//! Image builds checked with standard tools. Needs root and the Debian packages listed in
//! `common::require_all_tools`; the first run bootstraps the bases (~2.5 min), later runs use
//! the cached tarballs.

mod common;

use std::path::Path;

use common::*;
use imagebuilder::disk::{self, compose, TableKind};
use imagebuilder::outputs::Compression;
use rackseed_config::{Base, Target};

async fn stat(image: &Path, offset: u64, path: &str) -> String {
    run(
        "debugfs",
        &[
            "-R",
            &format!("stat {path}"),
            &format!("{}?offset={offset}", image.display()),
        ],
    )
    .await
}

async fn cat(image: &Path, offset: u64, path: &str) -> String {
    run(
        "debugfs",
        &[
            "-R",
            &format!("cat {path}"),
            &format!("{}?offset={offset}", image.display()),
        ],
    )
    .await
}

fn mode_owner(stat: &str) -> (String, String, String) {
    let mode = stat
        .split("Mode:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let user = stat
        .split("User:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let group = stat
        .split("Group:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (mode, user, group)
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Names of SSH host keys (`ssh_host_*_key` and `.pub`) in the image's `/etc/ssh`.
async fn ssh_host_keys_in(image: &Path, offset: u64) -> Vec<String> {
    let (_, text) = output(
        "debugfs",
        &[
            "-R",
            "ls -p /etc/ssh",
            &format!("{}?offset={offset}", image.display()),
        ],
    )
    .await;
    imagebuilder::customize::ext4::parse_ls_p(&text)
        .into_iter()
        .map(|e| e.name)
        .filter(|n| imagebuilder::customize::is_ssh_host_key(n))
        .collect()
}

/// Checks shared by every built image: layout, clean filesystems, rackseed files with the
/// right owner and mode, bmap round trip, SHA256SUMS, inspect never printing the secret.
async fn check_common(
    out: &imagebuilder::build::BuildOutputs,
    s: &Sample,
    target: Target,
    work: &Path,
) -> disk::PartitionTable {
    let img = &out.image;
    // Every form of the image holds the secret: owner-only, whatever the umask.
    for p in [Some(img), out.compressed.as_ref(), out.qcow2.as_ref()]
        .into_iter()
        .flatten()
    {
        assert_eq!(file_mode(p), 0o600, "{} must be 0600", p.display());
    }
    assert_eq!(file_mode(&out.bmap), 0o644, "the block map holds no secret");
    let t = disk::read_table(img).await.unwrap();
    let l = compose::labels(target);
    let root = t.by_label(l.root).unwrap().clone();
    let boot = t.by_label(l.boot).unwrap().clone();
    assert_eq!(
        std::fs::metadata(img).unwrap().len(),
        s.config.image.disk_size,
        "grown to the configured size"
    );

    // Layout as the standard tools see it.
    let sf = run("sfdisk", &["--dump", img.to_str().unwrap()]).await;
    match target {
        Target::X86_64Efi => {
            assert_eq!(t.kind, TableKind::Gpt);
            assert!(sf.contains("label: gpt"), "{sf}");
            let sg = run("sgdisk", &["-v", img.to_str().unwrap()]).await;
            assert!(sg.contains("No problems found"), "sgdisk -v: {sg}");
            assert!(
                boot.part_type
                    .eq_ignore_ascii_case("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
                "ESP type"
            );
        }
        _ => {
            assert_eq!(t.kind, TableKind::Dos);
            assert!(sf.contains("label: dos"), "{sf}");
            assert_eq!(boot.part_type, "c");
        }
    }
    let blkid_root = run(
        "blkid",
        &[
            "-p",
            "-O",
            &root.start.to_string(),
            "-o",
            "export",
            img.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        blkid_root.contains(&format!("LABEL={}", l.root)),
        "{blkid_root}"
    );

    // Filesystems check clean.
    run(
        "e2fsck",
        &[
            "-f",
            "-n",
            &format!("{}?offset={}", img.display(), root.start),
        ],
    )
    .await;
    let fat = work.join("boot.fat");
    extract(img, boot.start, boot.size, &fat);
    let (code, text) = output("fsck.vfat", &["-n", fat.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "fsck.vfat -n: {text}");
    let blkid_boot = run("blkid", &["-o", "export", fat.to_str().unwrap()]).await;
    assert!(
        blkid_boot.contains(&format!("LABEL={}", l.boot)),
        "{blkid_boot}"
    );

    // rackseed files, owners and modes.
    for (path, mode) in [
        ("/etc/rackseed/cluster.secret", "0600"),
        ("/etc/microk8s.yaml", "0600"),
        ("/etc/rackseed/cluster.toml", "0644"),
        ("/etc/rackseed/image.json", "0644"),
        ("/usr/local/bin/firstboot", "0755"),
        ("/etc/systemd/system/rackseed-firstboot.service", "0644"),
        ("/etc/netplan/60-rackseed-wifi.yaml", "0600"),
    ] {
        let st = stat(img, root.start, path).await;
        assert_eq!(
            mode_owner(&st),
            (mode.to_string(), "0".into(), "0".into()),
            "{path}: {st}"
        );
    }
    let wifi = cat(img, root.start, "/etc/netplan/60-rackseed-wifi.yaml").await;
    assert!(
        wifi.contains("wifis") && wifi.contains("homelab") && wifi.contains(s.psk),
        "the Wi-Fi netplan file holds the SSID and PSK: {wifi}"
    );
    let link = stat(
        img,
        root.start,
        "/etc/systemd/system/multi-user.target.wants/rackseed-firstboot.service",
    )
    .await;
    assert!(
        link.contains("Type: symlink")
            && link.contains("/etc/systemd/system/rackseed-firstboot.service"),
        "{link}"
    );
    // One image, many machines: no identity is baked in. No SSH host key (each machine makes
    // its own at first boot: the overlay's unit, enabled, or cloud-init's ssh module), and an
    // empty machine id.
    assert_eq!(
        ssh_host_keys_in(img, root.start).await,
        Vec::<String>::new(),
        "SSH host keys in the image"
    );
    let keygen = cat(
        img,
        root.start,
        "/etc/systemd/system/rackseed-ssh-hostkeys.service",
    )
    .await;
    assert!(
        keygen.contains("ExecStart=/usr/bin/ssh-keygen -A")
            && keygen.contains("ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key")
            && keygen.contains("Before=ssh.service"),
        "{keygen}"
    );
    for wants in ["multi-user.target.wants", "ssh.service.wants"] {
        let link = stat(
            img,
            root.start,
            &format!("/etc/systemd/system/{wants}/rackseed-ssh-hostkeys.service"),
        )
        .await;
        assert!(link.contains("Type: symlink"), "{wants}: {link}");
    }
    let machine_id = stat(img, root.start, "/etc/machine-id").await;
    assert_eq!(
        machine_id
            .split("Size:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()),
        Some("0"),
        "/etc/machine-id must be empty: {machine_id}"
    );
    let secret = cat(img, root.start, "/etc/rackseed/cluster.secret").await;
    assert_eq!(secret, s.secret.to_file_contents());
    let launch = cat(img, root.start, "/etc/microk8s.yaml").await;
    assert!(launch.contains("version: 0.2.0"), "{launch}");
    assert!(
        launch.contains(&s.secret.microk8s_token()),
        "token baked in"
    );
    assert!(
        launch.contains("--cluster-dns: 10.152.183.10") && launch.contains("name: dns"),
        "{launch}"
    );
    let cfg = cat(img, root.start, "/etc/rackseed/cluster.toml").await;
    assert!(
        cfg.contains("secret-file = \"/etc/rackseed/cluster.secret\""),
        "{cfg}"
    );
    // No build-machine path in the installed config (the Wi-Fi psk-file went with its table),
    // and firstboot still accepts it.
    let wifi = s.config.network.wifi.as_ref().unwrap();
    let host_dir = s.config.cluster.secret_file.parent().unwrap();
    assert!(
        !cfg.contains(host_dir.to_str().unwrap())
            && !cfg.lines().any(|l| l.trim_start().starts_with("psk-file")),
        "{cfg}"
    );
    assert!(!cfg.contains(s.psk), "{cfg}");
    assert!(
        cfg.contains("[network.wifi] for SSID \"homelab\" was applied at build time"),
        "{cfg}"
    );
    assert!(wifi.psk_file.starts_with(host_dir));
    let loaded = rackseed_config::parse(&cfg, Path::new("/etc/rackseed/cluster.toml"))
        .unwrap_or_else(|e| panic!("the installed config does not load: {e:?}\n{cfg}"));
    assert!(loaded.config.network.wifi.is_none());
    let unit = cat(
        img,
        root.start,
        "/etc/systemd/system/rackseed-firstboot.service",
    )
    .await;
    assert!(
        unit.contains("Type=notify") && unit.contains("ExecStart=/usr/local/bin/firstboot run"),
        "{unit}"
    );
    let nocloud = cat(
        img,
        root.start,
        "/etc/cloud/cloud.cfg.d/90-rackseed-nocloud.cfg",
    )
    .await;
    assert!(
        nocloud.contains("NoCloud"),
        "target overlay laid: {nocloud}"
    );
    let sim = stat_exists(img, root.start, "/usr/local/bin/microk8s").await;
    assert!(!sim, "nothing test-only goes into images by default");

    // bmaptool reproduces the image exactly.
    let copy = work.join("copy.img");
    run(
        "bmaptool",
        &[
            "copy",
            "--bmap",
            out.bmap.to_str().unwrap(),
            img.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    )
    .await;
    let copy_sum = imagebuilder::outputs::sparse::sha256_file(&copy).unwrap();
    assert_eq!(copy_sum, out.sha256);
    assert_eq!(
        imagebuilder::outputs::sparse::sha256_file(img).unwrap(),
        out.sha256
    );
    std::fs::remove_file(&copy).unwrap();

    // SHA256SUMS verifies with sha256sum.
    let dir = img.parent().unwrap();
    let (code, text) = output(
        "sh",
        &[
            "-c",
            &format!("cd '{}' && sha256sum -c SHA256SUMS", dir.display()),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "sha256sum -c: {text}");

    // The manifest lists the files with hashes, never the secret's.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out.manifest).unwrap()).unwrap();
    assert_eq!(m["image"]["target"], target.as_str());
    let files = m["files"].as_array().unwrap();
    let secret_rec = files
        .iter()
        .find(|f| f["path"] == "/etc/rackseed/cluster.secret")
        .unwrap();
    assert!(secret_rec["sha256"].is_null());
    let fb = files
        .iter()
        .find(|f| f["path"] == "/usr/local/bin/firstboot")
        .unwrap();
    assert_eq!(fb["sha256"].as_str().unwrap().len(), 64);
    let mtext = std::fs::read_to_string(&out.manifest).unwrap();
    assert!(
        !mtext.contains(s.secret.to_file_contents().trim())
            && !mtext.contains(&s.secret.microk8s_token())
    );
    assert!(
        !mtext.contains(s.psk),
        "the Wi-Fi PSK stays out of the manifest"
    );

    // inspect shows what is inside and never the secret.
    let rep = imagebuilder::inspect::run(img).await.unwrap();
    let shown = rep.to_string();
    assert!(
        shown.contains(&format!("target: {}", target.as_str())),
        "{shown}"
    );
    assert!(shown.contains("cluster: lab"), "{shown}");
    assert!(
        shown.contains("cluster secret: present, mode 0600"),
        "{shown}"
    );
    assert!(
        shown.contains("image file: mode 0600 (it holds the cluster secret"),
        "{shown}"
    );
    assert!(shown.contains("ssh host keys: none baked in"), "{shown}");
    assert!(
        !shown.contains(s.secret.to_file_contents().trim())
            && !shown.contains(&s.secret.microk8s_token()),
        "{shown}"
    );
    let json = serde_json::to_string(&rep).unwrap();
    assert!(!json.contains(s.secret.to_file_contents().trim()));
    t
}

async fn stat_exists(image: &Path, offset: u64, path: &str) -> bool {
    let (_, text) = output(
        "debugfs",
        &[
            "-R",
            &format!("stat {path}"),
            &format!("{}?offset={offset}", image.display()),
        ],
    )
    .await;
    text.contains("Inode:")
}

#[tokio::test(flavor = "multi_thread")]
async fn x86_64_efi_from_a_bootstrapped_base() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let s = sample(
        dir.path(),
        Target::X86_64Efi,
        bootstrap_base(Target::X86_64Efi),
    );
    let mut req = request(&s, &out_dir, x86_firstboot());
    req.qcow2 = true;
    let out = imagebuilder::build::run(req).await.expect("x86 build");
    let t = check_common(&out, &s, Target::X86_64Efi, dir.path()).await;
    let root = t.by_label("cloudimg-rootfs").unwrap();
    check_ubuntu_server_behaviour(&out.image, root.start).await;

    // The bootstrapped base got systemd-boot with an entry for the tree's kernel and p1.
    let esp = t.by_label("UEFI").unwrap();
    let fat = dir.path().join("esp.fat");
    extract(&out.image, esp.start, esp.size, &fat);
    let listing = run("mdir", &["-/", "-b", "-i", fat.to_str().unwrap(), "::"]).await;
    for f in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/vmlinuz",
        "::/initrd.img",
        "::/loader/entries/rackseed.conf",
    ] {
        assert!(
            listing.lines().any(|l| l.eq_ignore_ascii_case(f)),
            "{f} missing from ESP: {listing}"
        );
    }
    let entry = run(
        "mtype",
        &[
            "-i",
            fat.to_str().unwrap(),
            "::/loader/entries/rackseed.conf",
        ],
    )
    .await;
    let uuid = root.uuid.as_ref().unwrap().to_lowercase();
    assert!(entry.contains(&format!("root=PARTUUID={uuid}")), "{entry}");

    // x86 carries its NoCloud seed in the root filesystem; cloud-init accepts the user-data.
    let ud = cat(
        &out.image,
        root.start,
        "/var/lib/cloud/seed/nocloud/user-data",
    )
    .await;
    assert!(
        ud.starts_with("#cloud-config") && ud.contains("preserve_hostname: true"),
        "{ud}"
    );
    let udf = dir.path().join("ud");
    std::fs::write(&udf, &ud).unwrap();
    run(
        "cloud-init",
        &["schema", "--config-file", udf.to_str().unwrap()],
    )
    .await;

    // The qcow2 output holds the same disk.
    assert!(out.compressed.is_none());
    let q = out.qcow2.as_ref().unwrap();
    run("qemu-img", &["check", q.to_str().unwrap()]).await;
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            q.to_str().unwrap(),
            out.image.to_str().unwrap(),
        ],
    )
    .await;
    assert!(cmp.contains("identical"), "{cmp}");
    let names = listing_names(&out_dir);
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "no temporary files left: {names:?}"
    );
}

fn listing_names(dir: &Path) -> Vec<String> {
    common::listing(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn rpi4_from_an_official_image_downloaded_over_a_broken_link() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    // An image shaped like ubuntu-24.04-preinstalled-server-arm64+raspi.img.xz.
    let cached = official_rpi_xz().await;
    let xz = dir.path().join("preinstalled-server-arm64+raspi.img.xz");
    std::fs::copy(&cached, &xz).unwrap();
    let sha = imagebuilder::outputs::sparse::sha256_file(&xz).unwrap();
    let server = serve(xz.clone(), Serve::BreakFirst).await;
    let cache = dir.path().join("cache");
    let base = Base::Official {
        url: server.url.clone(),
        sha256: sha.clone(),
    };
    let s = sample(dir.path(), Target::Rpi4, base);
    let out_dir = dir.path().join("out");
    let mut req = request(&s, &out_dir, aarch64_stand_in(dir.path()).await);
    req.cache_dir = Some(cache.clone());
    req.compression = Some(Compression::Zstd);
    let out = imagebuilder::build::run(req).await.expect("rpi4 build");
    assert!(
        server.ranged.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the broken transfer was resumed with a Range request"
    );
    assert!(
        cache.join("images").join(&sha).is_file(),
        "verified download cached by sha256"
    );
    let t = check_common(&out, &s, Target::Rpi4, dir.path()).await;

    // system-boot: one-line cmdline with the cgroup flags once, and the NoCloud seed.
    let boot = t.by_label("system-boot").unwrap();
    let fat = dir.path().join("sb.fat");
    extract(&out.image, boot.start, boot.size, &fat);
    let cmdline = run("mtype", &["-i", fat.to_str().unwrap(), "::/cmdline.txt"]).await;
    assert_eq!(cmdline.lines().count(), 1, "{cmdline:?}");
    assert!(cmdline.contains("root=LABEL=writable"));
    assert_eq!(cmdline.matches("cgroup_enable=memory").count(), 1);
    assert_eq!(cmdline.matches("cgroup_memory=1").count(), 1);
    let ud = run("mtype", &["-i", fat.to_str().unwrap(), "::/user-data"]).await;
    let md = run("mtype", &["-i", fat.to_str().unwrap(), "::/meta-data"]).await;
    let nc = run("mtype", &["-i", fat.to_str().unwrap(), "::/network-config"]).await;
    assert!(
        ud.contains("preserve_hostname: true") && ud.contains("ssh-ed25519"),
        "{ud}"
    );
    assert!(md.starts_with("instance-id: rackseed-lab-"), "{md}");
    // system-boot is FAT, readable by every user once mounted: no PSK there.
    assert!(nc.contains("version: 2") && !nc.contains(s.psk), "{nc}");
    let udf = dir.path().join("ud");
    std::fs::write(&udf, &ud).unwrap();
    run(
        "cloud-init",
        &["schema", "--config-file", udf.to_str().unwrap()],
    )
    .await;
    let zst = out.compressed.as_ref().unwrap();
    assert!(zst.to_string_lossy().ends_with(".img.zst"));
    run("zstd", &["-t", "-q", zst.to_str().unwrap()]).await;

    // Rebuilding from the built image (a local base) adds nothing twice.
    let again_dir = dir.path().join("again");
    let base = Base::Local {
        path: out.image.clone(),
        sha256: Some(out.sha256.clone()),
    };
    let mut s2 = sample(dir.path(), Target::Rpi4, base);
    s2.config.image.disk_size = 3 << 30;
    let req = request(&s2, &again_dir, aarch64_stand_in(dir.path()).await);
    let out2 = imagebuilder::build::run(req)
        .await
        .expect("rebuild from a local base");
    let t2 = disk::read_table(&out2.image).await.unwrap();
    let boot2 = t2.by_label("system-boot").unwrap();
    let fat2 = dir.path().join("sb2.fat");
    extract(&out2.image, boot2.start, boot2.size, &fat2);
    let cmdline2 = run("mtype", &["-i", fat2.to_str().unwrap(), "::/cmdline.txt"]).await;
    assert_eq!(cmdline2, cmdline, "the flags are not added twice");
}

/// Where a symlink in the image points (debugfs' `Fast link dest:`), `None` when `path` is
/// missing or not a symlink.
async fn link_target(image: &Path, offset: u64, path: &str) -> Option<String> {
    let text = stat(image, offset, path).await;
    if !text.contains("Type: symlink") {
        return None;
    }
    let rest = text.split("link dest: \"").nth(1)?;
    Some(rest.split('"').next()?.to_string())
}

/// A bootstrapped base behaves like Ubuntu Server on first boot: cloud-init with the NoCloud
/// datasource and its growpart/resizefs modules, netplan, networkd (enabled, with the wired
/// DHCP fallback), resolved, openssh-server (no host keys: checked by `check_common`), snapd,
/// growpart, sudo; no documentation (dpkg excludes). The empty machine id and the absent
/// host keys are checked by `check_common`.
async fn check_ubuntu_server_behaviour(image: &Path, offset: u64) {
    use imagebuilder::base::{bootstrap, server};
    let status = cat(image, offset, "/var/lib/dpkg/status").await;
    let installed = |name: &str| {
        status.split("\n\n").any(|para| {
            para.lines().any(|l| l == format!("Package: {name}"))
                && para.lines().any(|l| l == "Status: install ok installed")
        })
    };
    for p in [
        "cloud-init",
        "netplan.io",
        "openssh-server",
        "snapd",
        "cloud-guest-utils",
        "systemd-resolved",
        "systemd-timesyncd",
        "sudo",
        "ca-certificates",
    ] {
        assert!(
            installed(p),
            "{p} is not installed in the bootstrapped base"
        );
    }
    for f in [
        "/usr/bin/cloud-init",
        "/usr/sbin/netplan",
        "/usr/sbin/sshd",
        "/usr/bin/ssh-keygen",
        "/usr/bin/snap",
        "/usr/bin/growpart",
        "/usr/sbin/resize2fs",
        "/usr/bin/sudo",
    ] {
        assert!(stat_exists(image, offset, f).await, "{f} missing");
    }
    // Enabled units: the links systemd follows at boot.
    let wants = "/etc/systemd/system";
    for (link, unit) in [
        (
            "multi-user.target.wants/systemd-networkd.service",
            "systemd-networkd.service",
        ),
        (
            "sockets.target.wants/systemd-networkd.socket",
            "systemd-networkd.socket",
        ),
        (
            // systemd 252's resolved and timesyncd are WantedBy=sysinit.target.
            "sysinit.target.wants/systemd-resolved.service",
            "systemd-resolved.service",
        ),
        (
            "sysinit.target.wants/systemd-timesyncd.service",
            "systemd-timesyncd.service",
        ),
        ("multi-user.target.wants/ssh.service", "ssh.service"),
        ("multi-user.target.wants/snapd.service", "snapd.service"),
        ("sockets.target.wants/snapd.socket", "snapd.socket"),
        (
            "cloud-init.target.wants/cloud-init.service",
            "cloud-init.service",
        ),
        (
            "cloud-init.target.wants/cloud-init-local.service",
            "cloud-init-local.service",
        ),
        (
            "cloud-init.target.wants/cloud-config.service",
            "cloud-config.service",
        ),
        (
            "cloud-init.target.wants/cloud-final.service",
            "cloud-final.service",
        ),
    ] {
        let path = format!("{wants}/{link}");
        let target = link_target(image, offset, &path)
            .await
            .unwrap_or_else(|| panic!("{path}: not enabled (no link)"));
        assert!(target.ends_with(&format!("/{unit}")), "{path} -> {target}");
        assert!(
            stat_exists(image, offset, &target).await,
            "{path} -> {target}, which is missing"
        );
    }
    // cloud-init.target joins the boot through cloud-init's generator (when ds-identify finds
    // a datasource: the NoCloud seed), not through a link in the image.
    assert!(
        stat_exists(
            image,
            offset,
            "/usr/lib/systemd/system-generators/cloud-init-generator"
        )
        .await,
        "cloud-init's systemd generator is missing"
    );
    // Wired DHCP when no seed configures the network; netplan's files sort first.
    assert_eq!(
        cat(image, offset, &format!("/{}", server::WIRED_DHCP_PATH)).await,
        server::WIRED_DHCP
    );
    assert_eq!(
        link_target(image, offset, "/etc/resolv.conf")
            .await
            .as_deref(),
        Some(server::RESOLV_CONF_TARGET)
    );
    // cloud-init reads a NoCloud seed only, and grows the root partition and filesystem.
    let ds = cat(
        image,
        offset,
        "/etc/cloud/cloud.cfg.d/90-rackseed-nocloud.cfg",
    )
    .await;
    assert!(ds.contains("datasource_list: [ NoCloud, None ]"), "{ds}");
    let cfg = cat(image, offset, "/etc/cloud/cloud.cfg").await;
    let init_modules: Vec<&str> = cfg
        .split("cloud_init_modules:")
        .nth(1)
        .expect("cloud.cfg lists cloud_init_modules")
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('-'))
        .map(|l| l.trim_start().trim_start_matches('-').trim())
        .collect();
    for m in ["growpart", "resizefs", "users-groups", "ssh"] {
        assert!(
            init_modules.contains(&m),
            "cloud-init's init stage lacks {m}: {init_modules:?}"
        );
    }
    // dpkg left documentation out (copyright files kept).
    assert_eq!(
        cat(
            image,
            offset,
            &format!("/{}", bootstrap::DPKG_EXCLUDES_PATH)
        )
        .await,
        bootstrap::DPKG_EXCLUDES
    );
    assert!(!stat_exists(image, offset, "/usr/share/man/man8").await);
    assert!(stat_exists(image, offset, "/usr/share/doc/openssh-server/copyright").await);
}

/// Status lines in a dpkg status file that are not "install ok installed" (unpacked,
/// half-installed, half-configured, trigger states...), with their package names.
fn unfinished_packages(status: &str) -> Vec<String> {
    status
        .split("\n\n")
        .filter_map(|para| {
            let name = para.lines().find_map(|l| l.strip_prefix("Package: "))?;
            let st = para.lines().find_map(|l| l.strip_prefix("Status: "))?;
            (st != "install ok installed").then(|| format!("{name}: {st}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rpi5_from_a_full_arm64_bootstrap_carries_its_kernel_on_system_boot() {
    require_all_tools();
    require_tools(&[("cpio", "cpio"), ("gzip", "gzip")]);
    assert!(
        imagebuilder::base::bootstrap::can_run_arch("arm64", imagebuilder::base::bootstrap::BINFMT_DIR),
        "this test needs arm64 binaries to run here (a binfmt_misc handler with flag F): run scripts/install-deps as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let s = sample(dir.path(), Target::Rpi5, bootstrap_base(Target::Rpi5));
    let out_dir = dir.path().join("out");
    let req = request(&s, &out_dir, aarch64_stand_in(dir.path()).await);
    let out = imagebuilder::build::run(req).await.expect("rpi5 build");
    let t = check_common(&out, &s, Target::Rpi5, dir.path()).await;
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out.manifest).unwrap()).unwrap();
    assert_eq!(m["base"]["kind"], "bootstrap");
    assert_eq!(m["base"]["foreign"], false, "a full, configured bootstrap");
    let writable = t.by_label("writable").unwrap();
    check_ubuntu_server_behaviour(&out.image, writable.start).await;

    // system-boot like Ubuntu's Pi images: kernel, initrd, config.txt, one-line cmdline.txt.
    let boot = t.by_label("system-boot").unwrap();
    let fat = dir.path().join("sb.fat");
    extract(&out.image, boot.start, boot.size, &fat);
    let f = fat.to_str().unwrap();
    let listing = run("mdir", &["-/", "-b", "-i", f, "::"]).await;
    for want in [
        "::/vmlinuz",
        "::/initrd.img",
        "::/config.txt",
        "::/cmdline.txt",
    ] {
        assert!(
            listing.lines().any(|l| l.eq_ignore_ascii_case(want)),
            "{want} missing from system-boot: {listing}"
        );
    }
    let config = run("mtype", &["-i", f, "::/config.txt"]).await;
    assert!(
        config.contains("kernel=vmlinuz") && config.contains("initramfs initrd.img followkernel"),
        "{config}"
    );
    let cmdline = run("mtype", &["-i", f, "::/cmdline.txt"]).await;
    assert_eq!(cmdline.lines().count(), 1, "{cmdline:?}");
    assert!(cmdline.contains("root=LABEL=writable"), "{cmdline}");

    // The kernel is an arm64 Image (Debian ships it uncompressed; Ubuntu gzip'd, which QEMU's
    // -kernel and the Pi firmware also take).
    let vmlinuz = dir.path().join("vmlinuz");
    run("mcopy", &["-i", f, "::/vmlinuz", vmlinuz.to_str().unwrap()]).await;
    let mut kernel = std::fs::read(&vmlinuz).unwrap();
    if kernel.starts_with(&[0x1f, 0x8b]) {
        let image = dir.path().join("Image");
        let sh = format!("gzip -dc '{}' > '{}'", vmlinuz.display(), image.display());
        run("sh", &["-c", &sh]).await;
        kernel = std::fs::read(&image).unwrap();
    }
    assert_eq!(&kernel[56..60], b"ARM\x64", "arm64 Image magic");

    // The initramfs can find root by label over virtio-blk: the driver and udev are in it.
    let initrd = dir.path().join("initrd.img");
    run(
        "mcopy",
        &["-i", f, "::/initrd.img", initrd.to_str().unwrap()],
    )
    .await;
    let files = run(
        "sh",
        &[
            "-c",
            &format!("gzip -dc '{}' | cpio -it --quiet", initrd.display()),
        ],
    )
    .await;
    // MODULES=list with the Pi's boot media (base::initramfs): SD, USB disks, NVMe, virtio.
    for want in [
        "/virtio_blk.ko",
        "/ext4.ko",
        "/udevadm",
        "scripts/local",
        "/sdhci-iproc.ko",
        "/xhci-pci.ko",
        "/usb-storage.ko",
        "/uas.ko",
        "/nvme.ko",
        "/reset-raspberrypi.ko",
        "/sd_mod.ko",
    ] {
        assert!(
            files
                .lines()
                .any(|l| l.ends_with(want) || l.contains(&format!("{want}."))),
            "{want} missing from the initramfs ({} entries)",
            files.lines().count()
        );
    }

    // The root filesystem holds arm64 binaries, every package configured.
    let root = t.by_label("writable").unwrap();
    let dpkg = dir.path().join("dpkg");
    run(
        "debugfs",
        &[
            "-R",
            &format!("dump /usr/bin/dpkg {}", dpkg.display()),
            &format!("{}?offset={}", out.image.display(), root.start),
        ],
    )
    .await;
    let elf = std::fs::read(&dpkg).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 0xb7, "EM_AARCH64");
    let status = cat(&out.image, root.start, "/var/lib/dpkg/status").await;
    assert!(
        status.contains("Package: linux-image-"),
        "kernel package installed"
    );
    let unfinished = unfinished_packages(&status);
    assert!(
        unfinished.is_empty(),
        "packages left unconfigured: {unfinished:?}"
    );
    let fstab = cat(&out.image, root.start, "/etc/fstab").await;
    assert!(fstab.contains("LABEL=writable / ext4"), "{fstab}");
}

#[test]
fn unfinished_packages_reads_dpkg_status() {
    let st = "Package: a\nStatus: install ok installed\n\nPackage: b\nStatus: install ok unpacked\n\nPackage: c\nStatus: install ok half-configured\n";
    assert_eq!(
        unfinished_packages(st),
        vec!["b: install ok unpacked", "c: install ok half-configured"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn x86_64_efi_from_an_official_shaped_qcow2() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let fixture = official_fixture(Target::X86_64Efi).await;
    // A base that was booted once carries SSH host keys, as any image made by installing
    // openssh-server does: plant some in a copy, so the build has to take them out.
    let raw = dir.path().join("base.raw");
    run(
        "cp",
        &[
            "--sparse=always",
            fixture.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    )
    .await;
    let base_root = disk::read_table(&raw)
        .await
        .unwrap()
        .by_label("cloudimg-rootfs")
        .unwrap()
        .start;
    let key = dir.path().join("fake-host-key");
    std::fs::write(
        &key,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nshared by every machine\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let cmds = dir.path().join("plant.cmd");
    let mut plant = String::from("mkdir /etc/ssh\n");
    for name in [
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "ssh_host_rsa_key",
    ] {
        plant.push_str(&format!("write {} /etc/ssh/{name}\n", key.display()));
    }
    std::fs::write(&cmds, plant).unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-f",
            cmds.to_str().unwrap(),
            &format!("{}?offset={base_root}", raw.display()),
        ],
    )
    .await;
    assert_eq!(
        ssh_host_keys_in(&raw, base_root).await.len(),
        3,
        "keys planted in the base"
    );
    let q = dir.path().join("noble-server-cloudimg-amd64.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    )
    .await;
    let sha = imagebuilder::outputs::sparse::sha256_file(&q).unwrap();
    let s = sample(
        dir.path(),
        Target::X86_64Efi,
        Base::Local {
            path: q,
            sha256: Some(sha),
        },
    );
    // A test-only overlay (how the MicroK8s simulator gets into test images) is laid on request.
    let extra = dir.path().join("test-overlay");
    std::fs::create_dir_all(extra.join("usr/local/sbin")).unwrap();
    std::fs::write(
        extra.join("usr/local/sbin/test-marker"),
        "#!/bin/sh\necho test image\n",
    )
    .unwrap();
    std::fs::set_permissions(
        extra.join("usr/local/sbin/test-marker"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    let mut req = request(&s, &dir.path().join("out"), x86_firstboot());
    req.extra_overlays = vec![extra];
    let out = imagebuilder::build::run(req).await.expect("x86 from qcow2");
    let t = check_common(&out, &s, Target::X86_64Efi, dir.path()).await;
    let root = t.by_label("cloudimg-rootfs").unwrap();
    let st = stat(&out.image, root.start, "/usr/local/sbin/test-marker").await;
    assert_eq!(
        mode_owner(&st),
        ("0750".into(), "0".into(), "0".into()),
        "{st}"
    );
    // The official layout is kept: BOOT is still there, found by label.
    assert_eq!(t.by_label("BOOT").unwrap().fs, disk::FsKind::Ext4);
}

/// Output folder must hold nothing at all: no final names and no temporary files.
fn assert_empty(dir: &Path) {
    let names = listing(dir);
    assert!(
        names.is_empty(),
        "a failed build left files behind in {}: {names:?}",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_download_fails_naming_both_hashes_and_keeps_nothing() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.img.xz");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let good = imagebuilder::outputs::sparse::sha256_file(&file).unwrap();
    let server = serve(file, Serve::Corrupt).await;
    let cache = dir.path().join("cache");
    let s = sample(
        dir.path(),
        Target::Rpi4,
        Base::Official {
            url: server.url.clone(),
            sha256: good.clone(),
        },
    );
    let out_dir = dir.path().join("out");
    let mut req = request(&s, &out_dir, aarch64_stand_in(dir.path()).await);
    req.cache_dir = Some(cache.clone());
    let e = format!("{:#}", imagebuilder::build::run(req).await.unwrap_err());
    assert!(e.contains("sha256 mismatch") && e.contains(&good), "{e}");
    let got = e
        .split("got ")
        .nth(1)
        .unwrap()
        .get(..64)
        .unwrap()
        .to_string();
    assert!(
        got.chars().all(|c| c.is_ascii_hexdigit()) && got != good,
        "{e}"
    );
    assert_empty(&cache.join("images"));
    assert_empty(&out_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_sha256_for_a_local_base_fails_before_writing() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let raw = official_fixture(Target::Rpi4).await;
    let wrong = "ab".repeat(32);
    let s = sample(
        dir.path(),
        Target::Rpi4,
        Base::Local {
            path: raw.clone(),
            sha256: Some(wrong.clone()),
        },
    );
    let out_dir = dir.path().join("out");
    let e = format!(
        "{:#}",
        imagebuilder::build::run(request(&s, &out_dir, aarch64_stand_in(dir.path()).await))
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("sha256 mismatch")
            && e.contains(&wrong)
            && e.contains(&raw.display().to_string()),
        "{e}"
    );
    assert_empty(&out_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_base_fails_clearly_and_leaves_nothing() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let raw = official_fixture(Target::Rpi4).await;
    let cut = dir.path().join("cut.img");
    run(
        "cp",
        &[
            "--sparse=always",
            raw.to_str().unwrap(),
            cut.to_str().unwrap(),
        ],
    )
    .await;
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let s = sample(
        dir.path(),
        Target::Rpi4,
        Base::Local {
            path: cut,
            sha256: None,
        },
    );
    let out_dir = dir.path().join("out");
    let e = format!(
        "{:#}",
        imagebuilder::build::run(request(&s, &out_dir, aarch64_stand_in(dir.path()).await))
            .await
            .unwrap_err()
    );
    assert!(e.contains("truncated"), "{e}");
    assert_empty(&out_dir);
    // A truncated .xz stream fails the same way.
    let xz = official_rpi_xz().await;
    let bytes = std::fs::read(&xz).unwrap();
    let cutxz = dir.path().join("cut.img.xz");
    std::fs::write(&cutxz, &bytes[..bytes.len() / 3]).unwrap();
    let s = sample(
        dir.path(),
        Target::Rpi4,
        Base::Local {
            path: cutxz,
            sha256: None,
        },
    );
    let e = format!(
        "{:#}",
        imagebuilder::build::run(request(&s, &out_dir, aarch64_stand_in(dir.path()).await))
            .await
            .unwrap_err()
    );
    assert!(e.contains("truncated or corrupt"), "{e}");
    assert_empty(&out_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_build_leaves_no_file_under_a_final_name() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let raw = official_fixture(Target::X86_64Efi).await;
    let s = sample(
        dir.path(),
        Target::X86_64Efi,
        Base::Local {
            path: raw,
            sha256: None,
        },
    );
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let build = tokio::spawn(imagebuilder::build::run(request(
        &s,
        &out_dir,
        x86_firstboot(),
    )));
    // Stop it once it is writing the image (what Ctrl-C does to the CLI: the future is dropped).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let writing = listing(&out_dir)
            .iter()
            .any(|n| n.contains(".img.partial-"));
        if writing || build.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started writing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !build.is_finished(),
        "the build finished before it could be interrupted"
    );
    build.abort();
    assert!(build.await.unwrap_err().is_cancelled());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_empty(&out_dir);
}

/// A small tmpfs mounted for one test and unmounted when dropped (even when the test fails).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mounting a tmpfs (the ENOSPC test needs root)");
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_clearly_and_leaves_nothing() {
    require_all_tools();
    let dir = tempfile::tempdir().unwrap();
    let raw = official_fixture(Target::X86_64Efi).await;
    let s = sample(
        dir.path(),
        Target::X86_64Efi,
        Base::Local {
            path: raw,
            sha256: None,
        },
    );
    let disk = SmallDisk::mount(&dir.path().join("small"), "300m");
    let out_dir = disk.0.join("out");
    let e = format!(
        "{:#}",
        imagebuilder::build::run(request(&s, &out_dir, x86_firstboot()))
            .await
            .unwrap_err()
    );
    assert!(e.to_lowercase().contains("no space left"), "{e}");
    assert_empty(&out_dir);
}
