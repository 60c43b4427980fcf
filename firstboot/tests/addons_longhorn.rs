//! Longhorn's (and Rook-Ceph's) node preparation on a fake root with a behaving fake system
//! (`addons::fakes`): staged packages installed offline, iscsid started, `iscsi_tcp` loaded and
//! persisted, the multipath blacklist written and applied, free space checked; a node that
//! cannot meet a prerequisite gets one clear problem with its fix; a second run changes
//! nothing. The install itself against the simulator is in
//! `tests/microk8s-sim/tests/longhorn.rs`.

use std::path::{Path, PathBuf};

use firstboot::addons::fakes::{FakeKernel, FakeRoot, FAKE_DEB};
use firstboot::addons::prep::{
    prepare_node_for, Readiness, LONGHORN_MODULES_CONF, MULTIPATH_BLACKLIST,
    MULTIPATH_BLACKLIST_CONF,
};
use rackseed_config::{Longhorn, Storage, Target};

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn settings(min_gib: u64) -> Longhorn {
    Longhorn {
        data_path: "/srv/longhorn".into(),
        min_free_space: min_gib << 30,
    }
}

fn prepare(
    root: &Path,
    storage: Storage,
    offline: Option<&Path>,
    kernel: &FakeKernel,
) -> Readiness {
    run(prepare_node_for(
        root,
        storage,
        &settings(10),
        offline,
        Target::X86_64Efi,
        kernel,
    ))
    .unwrap()
}

fn root_with(dir: &Path, pkgs: &[&str]) -> PathBuf {
    let root = dir.join("root");
    FakeRoot {
        dpkg_installed: Some(pkgs.iter().map(|p| p.to_string()).collect()),
        ..Default::default()
    }
    .write(&root)
    .unwrap();
    root
}

/// Stages fake `.deb` files in `<root>/var/lib/rackseed/storage`; returns the path on the node.
fn stage(root: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = root.join("var/lib/rackseed/storage");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    PathBuf::from("/var/lib/rackseed/storage")
}

#[test]
fn a_prepared_node_is_ready_and_a_second_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd", "open-iscsi", "nfs-common"]);
    let kernel = FakeKernel::new(&root);
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert_eq!(r, Readiness::default(), "{r:?}");
    assert_eq!(
        kernel.calls(),
        ["systemctl enable --now iscsid", "modprobe iscsi_tcp"]
    );
    assert_eq!(
        std::fs::read_to_string(root.join(LONGHORN_MODULES_CONF)).unwrap(),
        "iscsi_tcp\n"
    );
    // No multipath-tools: no drop-in.
    assert!(!root.join(MULTIPATH_BLACKLIST_CONF).exists());
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        kernel.calls().len(),
        2,
        "nothing more to do: {:?}",
        kernel.calls()
    );
}

#[test]
fn staged_packages_are_installed_offline_in_one_dpkg_call() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd"]);
    let staged = stage(
        &root,
        &[
            ("open-iscsi_2.1.9-3ubuntu5_amd64.deb", FAKE_DEB),
            ("nfs-common_2.6.4-3ubuntu5_amd64.deb", FAKE_DEB),
            ("libopeniscsiusr_2.1.9-3ubuntu5_amd64.deb", FAKE_DEB),
            ("README", b"not a package"),
        ],
    );
    let kernel = FakeKernel::new(&root);
    let r = prepare(&root, Storage::Longhorn, Some(&staged), &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        kernel.calls()[0],
        "dpkg -i libopeniscsiusr_2.1.9-3ubuntu5_amd64.deb nfs-common_2.6.4-3ubuntu5_amd64.deb \
         open-iscsi_2.1.9-3ubuntu5_amd64.deb"
    );
    assert_eq!(kernel.calls()[1], "systemctl enable --now iscsid");
    // Installed now: a second run installs nothing.
    prepare(&root, Storage::Longhorn, Some(&staged), &kernel);
    assert_eq!(
        kernel
            .calls()
            .iter()
            .filter(|c| c.starts_with("dpkg"))
            .count(),
        1
    );
}

#[test]
fn missing_unstaged_or_broken_packages_are_each_a_clear_problem() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd"]);
    // Nothing staged at all.
    let kernel = FakeKernel::new(&root);
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert_eq!(
        r.problems,
        [
            "longhorn: open-iscsi and nfs-common not installed on this node (every longhorn node \
          needs them)"
        ]
    );
    assert!(r.fixes[0].starts_with("apt-get install -y open-iscsi nfs-common"));
    assert!(kernel.calls().iter().all(|c| !c.starts_with("dpkg")));
    // Staged, but not all of them: nothing is installed half.
    let staged = stage(&root, &[("open-iscsi_2.1_amd64.deb", FAKE_DEB)]);
    let r = prepare(&root, Storage::Longhorn, Some(&staged), &kernel);
    assert_eq!(
        r.problems[0],
        "longhorn: open-iscsi and nfs-common not installed on this node and not staged in \
         /var/lib/rackseed/storage"
            .replace(
                "/var/lib/rackseed/storage",
                &root.join("var/lib/rackseed/storage").display().to_string()
            )
    );
    assert!(kernel.calls().iter().all(|c| !c.starts_with("dpkg")));
    // Staged but broken: dpkg's error is the problem.
    stage(&root, &[("nfs-common_2.6_amd64.deb", b"garbage")]);
    let r = prepare(&root, Storage::Longhorn, Some(&staged), &kernel);
    assert!(
        r.problems[0].starts_with("longhorn: installing the staged packages for open-iscsi and nfs-common failed: dpkg-deb: error:"),
        "{r:?}"
    );
}

#[test]
fn iscsid_that_will_not_start_is_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["open-iscsi", "nfs-common"]);
    let kernel = FakeKernel::new(&root).with_failing_unit("iscsid");
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert!(!r.ok);
    assert_eq!(
        r.problems,
        [
            "longhorn: iscsid is not running on this node: Job for iscsid.service failed because \
          the control process exited with error code."
        ]
    );
    assert_eq!(
        r.fixes,
        ["systemctl enable --now iscsid, then read journalctl -u iscsid"]
    );
}

#[test]
fn a_kernel_without_iscsi_tcp_and_a_small_disk_are_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    FakeRoot {
        modules: vec![],
        dpkg_installed: Some(vec!["open-iscsi".into(), "nfs-common".into()]),
        ..Default::default()
    }
    .write(&root)
    .unwrap();
    let kernel = FakeKernel::new(&root).with_free_space(3 << 30);
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert_eq!(r.problems.len(), 2, "{r:?}");
    assert_eq!(
        r.problems[0],
        "longhorn: kernel 6.8.0-49-generic has no iscsi_tcp module"
    );
    assert_eq!(
        r.fixes[0],
        "apt-get install linux-modules-extra-6.8.0-49-generic and reboot"
    );
    assert!(
        r.problems[1]
            .starts_with("longhorn: only 3.0 GiB free for /srv/longhorn (on the filesystem of ")
            && r.problems[1].ends_with("addons.longhorn.min-free-space asks for 10.0 GiB"),
        "{r:?}"
    );
    assert!(!root.join(LONGHORN_MODULES_CONF).exists());
}

#[test]
fn free_space_is_measured_where_the_data_path_will_be() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["open-iscsi", "nfs-common"]);
    std::fs::create_dir_all(root.join("srv")).unwrap();
    let kernel = FakeKernel::new(&root).with_free_space(1 << 30);
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    let want = format!("(on the filesystem of {})", root.join("srv").display());
    assert!(r.problems[0].contains(&want), "{r:?}");
}

#[test]
fn multipathd_is_told_to_leave_longhorns_devices_alone() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["open-iscsi", "nfs-common", "multipath-tools"]);
    let kernel = FakeKernel::new(&root);
    // multipathd runs (Ubuntu server enables it).
    run(async {
        use firstboot::addons::KernelControl;
        kernel.start_service("multipathd").await.unwrap();
    });
    let r = prepare(&root, Storage::Longhorn, None, &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(root.join(MULTIPATH_BLACKLIST_CONF)).unwrap(),
        MULTIPATH_BLACKLIST
    );
    assert!(MULTIPATH_BLACKLIST.contains("devnode \"^sd[a-z0-9]+\""));
    assert!(kernel
        .calls()
        .contains(&"systemctl reload-or-restart multipathd".to_owned()));
    let n = kernel.calls().len();
    prepare(&root, Storage::Longhorn, None, &kernel);
    assert_eq!(kernel.calls().len(), n, "written and reloaded once");
}

#[test]
fn rook_ceph_installs_lvm2_from_the_staged_packages() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with(dir.path(), &["systemd"]);
    let staged = stage(&root, &[("lvm2_2.03.16-3_amd64.deb", FAKE_DEB)]);
    let kernel = FakeKernel::new(&root);
    let r = prepare(&root, Storage::RookCeph, Some(&staged), &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(kernel.calls(), ["dpkg -i lvm2_2.03.16-3_amd64.deb"]);
    let r = prepare(
        &root_with(&dir.path().join("b"), &[]),
        Storage::RookCeph,
        None,
        &kernel,
    );
    assert_eq!(
        r.problems,
        ["rook-ceph: lvm2 not installed on this node (every rook-ceph node needs them)"]
    );
}
