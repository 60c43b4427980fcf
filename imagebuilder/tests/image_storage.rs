//! The nodes' offline packages in an image built from an official-shaped base (whose package
//! list the builder cannot change): the config asks for Longhorn, a floating API address and
//! MetalLB's automatic range, so `addons.offline` holds real `.deb` files (made with
//! `dpkg-deb --build`) of Longhorn's prerequisites, keepalived, curl and iputils-arping, and
//! Longhorn's chart with an archive of the container images it runs (made with `tar` in
//! `docker save`'s layout); the image carries them under `/var/lib/rackseed/storage` (0644,
//! byte for byte, still packages dpkg reads), the in-image config points there, and the build
//! no longer warns that the nodes will pull the images (the refusals of an archive missing an
//! image or cut short are unit tests in `customize::storage`). A folder missing a package the nodes need fails the build
//! before any output exists, naming the package and the setting that needs it. Needs root and the image tools (`common::require_all_tools`);
//! the official-shaped fixture is cached across runs.
//!
//! Run: `cargo test -p imagebuilder --test image_storage` (as root).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use imagebuilder::customize::storage::STORAGE_DIR;
use imagebuilder::disk;
use rackseed_config::{ApiAddress, Base, Metallb, Storage, Target};

/// A real Debian package `name_1.0-test_amd64.deb` in `dir`.
async fn make_deb(dir: &Path, name: &str) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: 1.0-test\nArchitecture: amd64\nMaintainer: rackseed tests <tests@example.invalid>\nDescription: stand-in for {name}\n"
        ),
    )
    .unwrap();
    let deb = dir.join(format!("{name}_1.0-test_amd64.deb"));
    run(
        "dpkg-deb",
        &["--build", tree.to_str().unwrap(), deb.to_str().unwrap()],
    )
    .await;
    deb
}

async fn staged_folder(dir: &Path, packages: &[&str]) -> PathBuf {
    let work = dir.join("debs");
    let staged = dir.join("storage-offline");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&staged).unwrap();
    for p in packages {
        let deb = make_deb(&work, p).await;
        std::fs::copy(&deb, staged.join(deb.file_name().unwrap())).unwrap();
    }
    // A chart archive as `helm package` lays it out, whose values name two images (the
    // layout of longhorn's `chart/values.yaml`).
    let chart = staged.join("longhorn-1.7.2.tgz");
    let chart_dir = dir.join("chart/longhorn");
    std::fs::create_dir_all(&chart_dir).unwrap();
    std::fs::write(
        chart_dir.join("Chart.yaml"),
        "name: longhorn\nversion: 1.7.2\n",
    )
    .unwrap();
    std::fs::write(
        chart_dir.join("values.yaml"),
        "image:\n  longhorn:\n    manager:\n      repository: longhornio/longhorn-manager\n      \
         tag: v1.7.2\n  csi:\n    attacher:\n      repository: longhornio/csi-attacher\n      \
         tag: v4.7.0\n",
    )
    .unwrap();
    let chart_root = dir.join("chart");
    run(
        "tar",
        &[
            "-czf",
            chart.to_str().unwrap(),
            "-C",
            chart_root.to_str().unwrap(),
            "longhorn",
        ],
    )
    .await;
    // Their container images (and the snapshot controller's) in a Docker archive made with
    // tar, as `docker save` lays it out.
    let img = dir.join("image-archive");
    std::fs::create_dir_all(img.join("layer1")).unwrap();
    std::fs::write(
        img.join("config.json"),
        r#"{"architecture":"amd64","os":"linux"}"#,
    )
    .unwrap();
    std::fs::write(img.join("layer1/layer.tar"), vec![0u8; 4096]).unwrap();
    std::fs::write(
        img.join("manifest.json"),
        serde_json::json!([{
            "Config": "config.json",
            "RepoTags": IMAGES,
            "Layers": ["layer1/layer.tar"],
        }])
        .to_string(),
    )
    .unwrap();
    run(
        "tar",
        &[
            "-cf",
            staged.join("longhorn-images.tar").to_str().unwrap(),
            "-C",
            img.to_str().unwrap(),
            "config.json",
            "layer1/layer.tar",
            "manifest.json",
        ],
    )
    .await;
    staged
}

/// What the stand-in chart and the agent's snapshot controller run.
const IMAGES: [&str; 3] = [
    "longhornio/longhorn-manager:v1.7.2",
    "longhornio/csi-attacher:v4.7.0",
    rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE,
];

fn sample_with_storage(dir: &Path, staged: &Path) -> Sample {
    let fixture_copy = dir.join("base.img");
    let mut s = sample(
        dir,
        Target::X86_64Efi,
        Base::Local {
            path: fixture_copy,
            sha256: None,
        },
    );
    s.config.addons.storage = Storage::Longhorn;
    s.config.addons.offline = Some(staged.to_owned());
    s.config.cluster.api_address = Some(ApiAddress::Fixed("192.168.50.10".parse().unwrap()));
    s.config.addons.metallb = Some(Metallb::Auto { count: 8 });
    s.toml = s.toml.replacen(
        "[cluster]\n",
        "[cluster]\napi-address = \"192.168.50.10\"\n",
        1,
    );
    s.toml.push_str(&format!(
        "\n[addons]\nstorage = \"longhorn\"\noffline = \"{}\"\n\n[addons.metallb]\naddresses = \"auto\"\n",
        staged.display()
    ));
    s
}

async fn debugfs(image: &Path, offset: u64, request: &str) -> String {
    run(
        "debugfs",
        &[
            "-R",
            request,
            &format!("{}?offset={offset}", image.display()),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_official_shaped_base_carries_the_staged_storage_packages() {
    require_all_tools();
    require_tools(&[("dpkg-deb", "dpkg")]);
    let dir = tempfile::tempdir().unwrap();
    let fixture = official_fixture(Target::X86_64Efi).await;
    run(
        "cp",
        &[
            "--sparse=always",
            fixture.to_str().unwrap(),
            dir.path().join("base.img").to_str().unwrap(),
        ],
    )
    .await;
    let staged = staged_folder(
        dir.path(),
        &[
            "open-iscsi",
            "nfs-common",
            "libisns0",
            "keepalived",
            "curl",
            "iputils-arping",
        ],
    )
    .await;
    let s = sample_with_storage(dir.path(), &staged);
    let out = imagebuilder::build::run(request(&s, &dir.path().join("out"), x86_firstboot()))
        .await
        .expect("build with staged storage packages");
    // Container images are staged too: no warning that the nodes will pull them.
    assert!(
        !out.warnings
            .iter()
            .any(|w| w.contains("not container images")),
        "{:?}",
        out.warnings
    );
    let t = disk::read_table(&out.image).await.unwrap();
    let root = t.by_label("cloudimg-rootfs").unwrap().start;

    let listing = debugfs(&out.image, root, &format!("ls -l {STORAGE_DIR}")).await;
    let extract = dir.path().join("extracted");
    std::fs::create_dir_all(&extract).unwrap();
    for f in std::fs::read_dir(&staged).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(listing.contains(&name), "{name} not staged:\n{listing}");
        let st = debugfs(&out.image, root, &format!("stat {STORAGE_DIR}/{name}")).await;
        assert!(
            st.contains("Mode:  0644") && st.contains("User:     0"),
            "{st}"
        );
        let got = extract.join(&name);
        debugfs(
            &out.image,
            root,
            &format!("dump {STORAGE_DIR}/{name} {}", got.display()),
        )
        .await;
        assert_eq!(
            std::fs::read(&got).unwrap(),
            std::fs::read(&f).unwrap(),
            "{name} byte for byte"
        );
        if name.ends_with(".deb") {
            let pkg = run("dpkg-deb", &["-f", got.to_str().unwrap(), "Package"]).await;
            assert!(
                name.starts_with(&format!("{}_", pkg.trim())),
                "{name}: {pkg}"
            );
        }
    }
    let cfg = debugfs(&out.image, root, "cat /etc/rackseed/cluster.toml").await;
    assert!(
        cfg.contains(&format!("offline = \"{STORAGE_DIR}\"")),
        "the in-image config points at the staged folder:\n{cfg}"
    );
    assert!(!cfg.contains(staged.to_str().unwrap()), "{cfg}");
    // The manifest lists the staged files.
    let manifest = std::fs::read_to_string(&out.manifest).unwrap();
    assert!(
        manifest.contains(&format!("{STORAGE_DIR}/open-iscsi_1.0-test_amd64.deb"))
            && manifest.contains(&format!("{STORAGE_DIR}/longhorn-images.tar")),
        "{manifest}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_without_a_needed_package_fails_before_any_output() {
    require_all_tools();
    require_tools(&[("dpkg-deb", "dpkg")]);
    let dir = tempfile::tempdir().unwrap();
    let fixture = official_fixture(Target::X86_64Efi).await;
    run(
        "cp",
        &[
            "--sparse=always",
            fixture.to_str().unwrap(),
            dir.path().join("base.img").to_str().unwrap(),
        ],
    )
    .await;
    let staged = staged_folder(dir.path(), &["open-iscsi"]).await;
    let s = sample_with_storage(dir.path(), &staged);
    let outdir = dir.path().join("out");
    let err = imagebuilder::build::run(request(&s, &outdir, x86_firstboot()))
        .await
        .expect_err("nfs-common is missing");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("has no amd64 package for nfs-common, keepalived, curl, iputils-arping")
            && msg.contains("keepalived for cluster.api-address")
            && msg.contains("apt-get download"),
        "{msg}"
    );
    assert!(
        listing(&outdir)
            .iter()
            .all(|n| !n.ends_with(".img") && !n.ends_with(".bmap")),
        "{:?}",
        listing(&outdir)
    );
}
