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

// --- The install's gate on every Ready member's prerequisites -------------------------------

mod cluster_gate {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;

    use firstboot::addons::fakes::{member_doc, FakeClusterTools, FakeReports};
    use firstboot::addons::longhorn;
    use firstboot::addons::prep::Readiness;
    use firstboot::system::fakes::{FakeMicrok8s, FakeWorld};
    use firstboot::system::microk8s::{InstallSource, JoinRole, JoinTarget, Microk8s};
    use rackseed_protocol::secret::ClusterSecret;

    const ISCSID_DOWN: &str =
        "longhorn: iscsid is not running on this node (it was started but is not active)";

    fn ip(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, d))
    }

    fn config() -> rackseed_config::ClusterConfig {
        let text = "[cluster]\nname = \"lh\"\n\n[addons]\nstorage = \"longhorn\"\n\n\
             [addons.longhorn]\ndata-path = \"/srv/longhorn\"\nmin-free-space = \"20GiB\"\n\n\
             [image]\ntarget = \"x86_64-efi\"\nbase = { kind = \"bootstrap\", suite = \"noble\" }\n";
        rackseed_config::parse(text, Path::new("/cfg/lh.toml"))
            .expect("the test config is valid")
            .config
    }

    /// cp-a (installs), cp-b (control plane) and wk-c (worker), all Ready.
    async fn cluster() -> (FakeWorld, Vec<FakeMicrok8s>) {
        let secret = ClusterSecret::from_bytes([9; 32]);
        let world = FakeWorld::new();
        let mut nodes = Vec::new();
        for (i, name) in ["cp-a", "cp-b", "wk-c"].iter().enumerate() {
            let n = world.node(name, ip(i as u8 + 1));
            n.install(&InstallSource::Channel("1.32/stable".into()), &secret)
                .await
                .unwrap();
            nodes.push(n);
        }
        let to = JoinTarget::new(ip(1), secret.microk8s_token());
        nodes[1].join(&to, JoinRole::ControlPlane).await.unwrap();
        nodes[2].join(&to, JoinRole::Worker).await.unwrap();
        let ready: Vec<_> = nodes[0].nodes().await.unwrap();
        assert_eq!(ready.iter().filter(|n| n.ready).count(), 3, "{ready:?}");
        (world, nodes)
    }

    async fn install(
        mk: &FakeMicrok8s,
        tools: &FakeClusterTools,
        state: &Path,
        local: &Readiness,
        reports: &FakeReports,
    ) -> Result<String, String> {
        longhorn::install(mk, tools, &config(), state, local, reports).await
    }

    #[tokio::test]
    async fn a_peer_without_iscsid_blocks_the_install_until_it_is_fixed() {
        let (_world, nodes) = cluster().await;
        let dir = tempfile::tempdir().unwrap();
        let tools = FakeClusterTools::new();
        let reports = FakeReports::new("cp-a");
        reports.set_doc("cp-b", Some(member_doc("cp-b", "member", &[])));
        // A Raspberry Pi problem is not Longhorn's: it does not block.
        let pi = "vxlan: kernel module missing";
        reports.set_doc(
            "wk-c",
            Some(member_doc("wk-c", "member", &[pi, ISCSID_DOWN])),
        );
        let local = Readiness::default();

        let err = install(&nodes[0], &tools, dir.path(), &local, &reports)
            .await
            .unwrap_err();
        assert!(err.starts_with("waiting: "), "{err}");
        assert!(err.contains("nothing was installed"), "{err}");
        assert!(err.contains(&format!("wk-c: {ISCSID_DOWN}")), "{err}");
        assert!(!err.contains("cp-b") && !err.contains(pi), "{err}");
        assert!(tools.calls().is_empty(), "{:?}", tools.calls());
        assert!(!longhorn::files_dir(dir.path()).exists());

        // Unreadable, and still preparing: not reported, still nothing applied.
        reports.set_doc("wk-c", None);
        reports.set_doc("cp-b", Some(member_doc("cp-b", "preparing", &[])));
        let err = install(&nodes[0], &tools, dir.path(), &local, &reports)
            .await
            .unwrap_err();
        assert!(
            err.contains("wk-c: has not reported its prerequisites (its status document: connection refused)"),
            "{err}"
        );
        assert!(
            err.contains("cp-b: has not reported its prerequisites (it is still preparing)"),
            "{err}"
        );
        assert!(tools.calls().is_empty(), "{:?}", tools.calls());

        // This node's own problem names it too.
        reports.set_doc("cp-b", Some(member_doc("cp-b", "member", &[])));
        reports.set_doc("wk-c", Some(member_doc("wk-c", "member", &[])));
        let mut bad = Readiness::default();
        bad.problem(ISCSID_DOWN, "systemctl enable --now iscsid");
        let err = install(&nodes[0], &tools, dir.path(), &bad, &reports)
            .await
            .unwrap_err();
        assert!(
            err.contains(ISCSID_DOWN) && err.contains("nothing was installed"),
            "{err}"
        );
        assert!(tools.calls().is_empty(), "{:?}", tools.calls());

        // Fixed everywhere: it installs, with a replica per Ready node (3).
        let done = install(&nodes[0], &tools, dir.path(), &local, &reports)
            .await
            .unwrap();
        assert!(
            done.contains("3 replicas per volume on 3 ready nodes"),
            "{done}"
        );
        let calls = tools.calls();
        assert_eq!(calls.len(), 5, "{calls:?}");
        assert!(calls[0].starts_with("kubectl apply -f "), "{calls:?}");
        assert!(calls[1].starts_with("kubectl wait --for=condition=Established"));
        assert!(calls[3].starts_with("helm3 upgrade --install longhorn longhorn --repo"));
        let values =
            std::fs::read_to_string(longhorn::files_dir(dir.path()).join("longhorn-values.yaml"))
                .unwrap();
        assert!(values.contains("defaultClassReplicaCount: 3"), "{values}");
    }

    #[tokio::test]
    async fn a_peer_that_never_reported_blocks_and_a_not_ready_one_is_not_asked() {
        let (world, nodes) = cluster().await;
        let dir = tempfile::tempdir().unwrap();
        let tools = FakeClusterTools::new();
        let reports = FakeReports::new("cp-a");
        reports.set_doc("cp-b", Some(member_doc("cp-b", "member", &[])));
        let local = Readiness::default();
        let err = install(&nodes[0], &tools, dir.path(), &local, &reports)
            .await
            .unwrap_err();
        assert!(
            err.contains("wk-c: has not reported its prerequisites (no status document names it)"),
            "{err}"
        );
        assert!(tools.calls().is_empty());

        // wk-c's host is down: Kubernetes lists it NotReady, it holds no replica now.
        world.set_up(ip(3), false);
        let done = install(&nodes[0], &tools, dir.path(), &local, &reports)
            .await
            .unwrap();
        assert!(
            done.contains("2 replicas per volume on 2 ready nodes"),
            "{done}"
        );
    }
}

// --- Offline: the staged container images imported on every node -----------------------------

mod offline_images {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use firstboot::addons::fakes::{
        member_doc, write_image_archive, FakeClusterTools, FakeImages, FakeKernel, FakeReports,
    };
    use firstboot::addons::longhorn;
    use firstboot::addons::prep::{
        load_imported, load_verdict, prepare_and_record_with, Readiness, IMAGES_IMPORTED_FILE,
    };
    use firstboot::system::fakes::{FakeMicrok8s, FakeWorld};
    use firstboot::system::microk8s::helm::ClusterTools;
    use firstboot::system::microk8s::{InstallSource, JoinRole, JoinTarget, Microk8s};
    use rackseed_protocol::secret::ClusterSecret;

    const NODES: [&str; 3] = ["cp-a", "cp-b", "wk-c"];
    /// What the chart's pods and the snapshot controller run (a part of longhorn 1.7.2's).
    const NEEDED: [&str; 4] = [
        "longhornio/longhorn-manager:v1.7.2",
        "longhornio/longhorn-engine:v1.7.2",
        "longhornio/csi-attacher:v4.7.0",
        "rancher/mirrored-sig-storage-snapshot-controller:v8.2.0",
    ];
    const ARCHIVE: &str = "longhorn-images.tar";

    fn config() -> rackseed_config::ClusterConfig {
        let text = "[cluster]\nname = \"lh\"\n\n[addons]\nstorage = \"longhorn\"\n\
             offline = \"/var/lib/rackseed/storage\"\n\n\
             [addons.longhorn]\ndata-path = \"/srv/longhorn\"\nmin-free-space = \"20GiB\"\n\n\
             [image]\ntarget = \"x86_64-efi\"\nbase = { kind = \"bootstrap\", suite = \"noble\" }\n";
        rackseed_config::parse(text, Path::new("/cfg/lh.toml"))
            .expect("the test config is valid")
            .config
    }

    struct Node {
        name: &'static str,
        root: PathBuf,
        state: PathBuf,
        kernel: FakeKernel,
        tools: FakeClusterTools,
        mk: FakeMicrok8s,
    }

    impl Node {
        fn staged(&self) -> PathBuf {
            self.root.join("var/lib/rackseed/storage")
        }

        /// The agent's node preparation with MicroK8s' tools (`None`: not installed yet).
        async fn prepare(&self, with_tools: bool) -> Readiness {
            let tools = with_tools.then_some(&self.tools as &dyn ClusterTools);
            prepare_and_record_with(
                &self.root,
                &config(),
                false,
                &self.state,
                &self.kernel,
                tools,
            )
            .await
            .unwrap()
        }

        /// This node's status document as its peers read it: its kept verdict.
        fn doc(&self) -> serde_json::Value {
            let v = load_verdict(&self.state).unwrap().unwrap_or_default();
            let problems: Vec<&str> = v.problems.iter().map(String::as_str).collect();
            member_doc(self.name, "member", &problems)
        }
    }

    /// Three Ready fake nodes (two control plane, one worker) of an offline cluster, each with
    /// Longhorn's packages, the chart and an image archive of `NEEDED` staged.
    async fn cluster(dir: &Path, images: &Arc<FakeImages>) -> (FakeWorld, Vec<Node>) {
        let secret = ClusterSecret::from_bytes([7; 32]);
        let world = FakeWorld::new();
        let mut nodes = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8 + 1));
            let mk = world.node(name, ip);
            mk.install(&InstallSource::Channel("1.32/stable".into()), &secret)
                .await
                .unwrap();
            let root = super::root_with(&dir.join(name), &["systemd", "open-iscsi", "nfs-common"]);
            super::stage(&root, &[(&longhorn::chart_archive_name(), b"chart")]);
            let node = Node {
                name,
                kernel: FakeKernel::new(&root),
                state: dir.join(name).join("state"),
                root,
                tools: FakeClusterTools::on_node(name, images.clone()),
                mk,
            };
            std::fs::create_dir_all(&node.state).unwrap();
            write_image_archive(&node.staged().join(ARCHIVE), &NEEDED).unwrap();
            nodes.push(node);
        }
        let to = JoinTarget::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            secret.microk8s_token(),
        );
        nodes[1].mk.join(&to, JoinRole::ControlPlane).await.unwrap();
        nodes[2].mk.join(&to, JoinRole::Worker).await.unwrap();
        (world, nodes)
    }

    /// Longhorn's install from cp-a, with the members' kept verdicts as their documents.
    async fn install(nodes: &[Node], local: &Readiness) -> Result<String, String> {
        let reports = FakeReports::new("cp-a");
        for n in &nodes[1..] {
            reports.set_doc(n.name, Some(n.doc()));
        }
        let mut cfg = config();
        cfg.addons.offline = Some(nodes[0].staged());
        longhorn::install(
            &nodes[0].mk,
            &nodes[0].tools,
            &cfg,
            &nodes[0].state,
            local,
            &reports,
        )
        .await
    }

    fn helm_calls(n: &Node) -> usize {
        n.tools
            .calls()
            .iter()
            .filter(|c| c.starts_with("helm3 upgrade"))
            .count()
    }

    #[tokio::test]
    async fn an_offline_cluster_installs_longhorn_only_once_every_node_imported_its_images() {
        let dir = tempfile::tempdir().unwrap();
        let images = FakeImages::offline(&NEEDED, &NODES);
        let (_world, nodes) = cluster(dir.path(), &images).await;

        // Before MicroK8s is installed nothing can be imported: each node says so, and the
        // gate waits without running anything.
        for n in &nodes {
            let r = n.prepare(false).await;
            assert_eq!(
                r.problems,
                [format!(
                    "longhorn: the staged container images ({ARCHIVE}) are not imported yet \
                     (MicroK8s is not installed yet)"
                )]
            );
        }
        let local = nodes[0].prepare(false).await;
        let err = install(&nodes, &local).await.unwrap_err();
        assert!(
            err.contains("nothing was installed") && err.contains("not imported yet"),
            "{err}"
        );
        assert!(nodes[0].tools.calls().is_empty());

        // Were the gate passed without the imports (every member claiming it is ready), helm's
        // --wait would time out: the pods cannot pull their images offline.
        // (This node alone being ready changes nothing: the members' kept verdicts block.)
        let gated = install(&nodes, &Readiness::default()).await;
        let reports_ok = FakeReports::new("cp-a");
        for n in NODES[1..].iter() {
            reports_ok.set_doc(n, Some(member_doc(n, "member", &[])));
        }
        let mut cfg = config();
        cfg.addons.offline = Some(nodes[0].staged());
        let err2 = longhorn::install(
            &nodes[0].mk,
            &nodes[0].tools,
            &cfg,
            &nodes[0].state,
            &Readiness::default(),
            &reports_ok,
        )
        .await
        .unwrap_err();
        assert!(gated
            .unwrap_err()
            .contains("cp-b: longhorn: the staged container images"));
        assert!(
            err2.contains("Error: context deadline exceeded")
                && err2.contains("ImagePullBackOff")
                && err2.contains("must have imported the staged image archives"),
            "{err2}"
        );
        let listed = nodes[0].tools.helm_list("longhorn-system").await.unwrap();
        assert_eq!(listed[0].status, "failed", "{listed:?}");

        // With MicroK8s running, every node imports its staged archive once.
        for n in &nodes {
            assert_eq!(n.prepare(true).await, Readiness::default());
            assert_eq!(
                images.imported(n.name).len(),
                NEEDED.len(),
                "{:?}",
                images.imported(n.name)
            );
            assert!(load_imported(&n.state).archives.contains_key(ARCHIVE));
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(n.state.join(IMAGES_IMPORTED_FILE))
                    .unwrap()
                    .permissions(),
            );
            assert_eq!(mode & 0o777, 0o600);
            // A second check imports nothing again.
            assert_eq!(n.prepare(true).await, Readiness::default());
            let imports = n
                .tools
                .calls()
                .iter()
                .filter(|c| c.starts_with("ctr image import"))
                .count();
            assert_eq!(imports, 1, "{:?}", n.tools.calls());
        }
        let before = helm_calls(&nodes[0]);
        let done = install(&nodes, &Readiness::default()).await.unwrap();
        assert!(done.contains("longhorn 1.7.2 installed"), "{done}");
        assert_eq!(helm_calls(&nodes[0]), before + 1);
        let listed = nodes[0].tools.helm_list("longhorn-system").await.unwrap();
        assert_eq!(listed[0].status, "deployed", "{listed:?}");
    }

    #[tokio::test]
    async fn a_node_whose_import_fails_says_so_in_its_status_and_the_install_waits() {
        let dir = tempfile::tempdir().unwrap();
        let images = FakeImages::offline(&NEEDED, &NODES);
        let (_world, nodes) = cluster(dir.path(), &images).await;
        // wk-c's copy of the archive is cut short (a damaged card, say).
        let archive = nodes[2].staged().join(ARCHIVE);
        let good = std::fs::read(&archive).unwrap();
        std::fs::write(&archive, &good[..2000]).unwrap();

        for n in &nodes[..2] {
            assert_eq!(n.prepare(true).await, Readiness::default());
        }
        let r = nodes[2].prepare(true).await;
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            r.problems[0].starts_with(&format!("longhorn: image import failed: {ARCHIVE}: "))
                && r.problems[0].contains("ctr: failed to ingest \"layer.tar\": unexpected EOF"),
            "{r:?}"
        );
        assert!(r.fixes[0].contains("microk8s ctr image import"), "{r:?}");
        assert!(images.imported("wk-c").is_empty());
        assert!(!load_imported(&nodes[2].state)
            .archives
            .contains_key(ARCHIVE));
        // The verdict is in wk-c's status document; the gate names it and installs nothing.
        let local = nodes[0].prepare(true).await;
        let err = install(&nodes, &local).await.unwrap_err();
        assert!(
            err.contains(&format!("wk-c: longhorn: image import failed: {ARCHIVE}")),
            "{err}"
        );
        assert_eq!(helm_calls(&nodes[0]), 0);

        // A good copy (the image rebuilt) is imported at the next check, then it installs.
        std::fs::write(&archive, &good).unwrap();
        assert_eq!(nodes[2].prepare(true).await, Readiness::default());
        assert_eq!(images.imported("wk-c").len(), NEEDED.len());
        install(&nodes, &local).await.unwrap();
    }
}
