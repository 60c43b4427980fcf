//! Longhorn through firstboot's real adapter against the simulator: the agent's `longhorn`
//! step (`firstboot::addons::run_addon`) on a simulated control-plane node, with the node's
//! prerequisites on a fake root. The simulator records every helm and kubectl call; the tests
//! check the chart, its version and source, the namespace, the values, the order (CRDs
//! Established before the objects that need them), that running the step again changes nothing
//! but the release revision, that nothing at all is applied while a prerequisite is missing,
//! and what the simulator refuses (values the chart refuses, a custom object before its CRD,
//! a repository chart with no network). Needs root (network namespaces); fails loudly
//! otherwise.
//!
//! Run: `cargo test -p microk8s-sim --test longhorn` (as root).

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use firstboot::addons::fakes::{FakeKernel, FakeRoot};
use firstboot::addons::{longhorn, run_addon, AddonEnable};
use firstboot::system::microk8s::{JoinRole, JoinTarget, Microk8s, Microk8sError};
use microk8s_sim::daemon::cluster_tools_calls;
use netns_lab::Lab;
use rackseed_host::command::Cmd;
use serde_json::Value;
use support::*;

fn config(offline: Option<&Path>) -> rackseed_config::ClusterConfig {
    let offline = offline
        .map(|p| format!("offline = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let text = format!(
        "[cluster]\nname = \"lh\"\n\n[addons]\nstorage = \"longhorn\"\n{offline}\n\
         [addons.longhorn]\ndata-path = \"/srv/longhorn\"\nmin-free-space = \"20GiB\"\n\n\
         [image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"noble\" }}\n"
    );
    rackseed_config::parse(&text, Path::new("/cfg/lh.toml"))
        .expect("the test config is valid")
        .config
}

/// A node root with Longhorn's packages installed (iscsid's unit file included).
fn ready_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    FakeRoot {
        dpkg_installed: Some(vec![
            "systemd".into(),
            "open-iscsi".into(),
            "nfs-common".into(),
        ]),
        ..Default::default()
    }
    .write(&root)
    .unwrap();
    root
}

/// Runs the `longhorn` step on `n` with `root` as the host root and `kernel` as its system.
fn run_step(
    n: &SimNode,
    cfg: &rackseed_config::ClusterConfig,
    root: &Path,
    kernel: FakeKernel,
) -> Result<String, String> {
    let cfg = cfg.clone();
    let root = root.to_owned();
    let state = n.dir.join("agent-state");
    n.run(move |a| async move {
        let step = AddonEnable {
            name: "longhorn".into(),
            args: vec![],
        };
        // Every other Ready node reports its prerequisites met (the gate on the members'
        // verdicts is tested in firstboot's addons_longhorn).
        let members = firstboot::addons::fakes::FakeReports::new("");
        for node in a.nodes().await.unwrap_or_default() {
            let doc = firstboot::addons::fakes::member_doc(&node.name, "member", &[]);
            members.set_doc(&node.name, Some(doc));
        }
        run_addon(&a, &cfg, &root, &state, &kernel, &step, &members).await
    })
}

fn calls(n: &SimNode) -> Vec<Value> {
    cluster_tools_calls(&n.dir.join("state"))
}

/// The `tool argv[1]` summary of each call, e.g. `kubectl apply`.
fn summary(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["tool"].as_str().unwrap(),
                c["argv"][1].as_str().unwrap()
            )
        })
        .collect()
}

fn kubectl(n: &SimNode, args: Vec<String>) -> (i32, String, String) {
    let bin = n.dir.join("bin/microk8s");
    n.run(move |_| async move {
        let o = Cmd::new(&bin, Duration::from_secs(20))
            .arg("kubectl")
            .args(&args)
            .output()
            .await
            .unwrap();
        (o.code().unwrap_or(-1), o.stdout, o.stderr)
    })
}

fn helm(n: &SimNode, args: &[&str]) -> (i32, String, String) {
    let bin = n.dir.join("bin/microk8s");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    n.run(move |_| async move {
        let o = Cmd::new(&bin, Duration::from_secs(20))
            .arg("helm3")
            .args(&args)
            .output()
            .await
            .unwrap();
        (o.code().unwrap_or(-1), o.stdout, o.stderr)
    })
}

/// The images the test chart runs (a part of longhorn 1.7.2's `values.yaml`, same layout).
const CHART_IMAGES: [&str; 3] = [
    "longhornio/longhorn-manager:v1.7.2",
    "longhornio/longhorn-engine:v1.7.2",
    "longhornio/csi-attacher:v4.7.0",
];
/// The staged image archive's name.
const IMAGES_TAR: &str = "longhorn-images.tar";

/// A chart archive as `helm package` writes it: `longhorn/Chart.yaml` and `longhorn/values.yaml`
/// naming [`CHART_IMAGES`] (plus OpenShift's empty entry, which runs nothing).
fn write_chart(path: &Path) {
    let values = "image:\n  longhorn:\n    manager:\n      repository: longhornio/longhorn-manager\n      tag: v1.7.2\n    engine:\n      repository: longhornio/longhorn-engine\n      tag: v1.7.2\n  csi:\n    attacher:\n      repository: longhornio/csi-attacher\n      tag: v4.7.0\n  openshift:\n    oauthProxy:\n      repository: \"\"\n      tag: \"\"\n  pullPolicy: IfNotPresent\n";
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("longhorn/Chart.yaml", "name: longhorn\nversion: 1.7.2\n"),
        ("longhorn/values.yaml", values),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    std::fs::write(path, gz.finish().unwrap()).unwrap();
}

/// The staged folder: with the chart, also an image archive holding every image it runs.
fn staged(dir: &Path, with_chart: bool) -> PathBuf {
    let s = dir.join("staged");
    std::fs::create_dir_all(&s).unwrap();
    if with_chart {
        write_chart(&s.join(longhorn::chart_archive_name()));
        firstboot::addons::fakes::write_image_archive(&s.join(IMAGES_TAR), &CHART_IMAGES).unwrap();
    }
    s
}

fn ctr(n: &SimNode, args: &[&str]) -> (i32, String, String) {
    let bin = n.dir.join("bin/microk8s");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    n.run(move |_| async move {
        let o = Cmd::new(&bin, Duration::from_secs(20))
            .arg("ctr")
            .args(&args)
            .output()
            .await
            .unwrap();
        (o.code().unwrap_or(-1), o.stdout, o.stderr)
    })
}

#[test]
fn longhorn_installs_from_the_staged_chart_with_the_values_and_snapshots() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    // No network for the chart repository: only the staged archive can work.
    let mut n = SimNode::new(&lab, 0, dir.path(), &log, &[("MICROK8S_SIM_OFFLINE", "1")]);
    n.install_and_start();
    let root = ready_root(dir.path());
    // The staged folder is a path on the node: under the fake root.
    let on_node = Path::new("/var/lib/rackseed/storage");
    let staged_dir = staged(&root.join("var/lib/rackseed"), true);
    std::fs::rename(&staged_dir, root.join("var/lib/rackseed/storage")).unwrap();
    let cfg = config(Some(on_node));

    let done = run_step(&n, &cfg, &root, FakeKernel::new(&root)).expect("longhorn installs");
    assert!(
        done.contains("1 replicas per volume on 1 ready nodes"),
        "{done}"
    );
    // Offline, it could only because the step imported the staged images first.
    let (code, out, _) = ctr(&n, &["image", "ls", "-q"]);
    assert_eq!(code, 0);
    let mut want: Vec<String> = CHART_IMAGES
        .iter()
        .map(|i| format!("docker.io/{i}"))
        .collect();
    want.sort();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    let c = calls(&n);
    assert_eq!(
        summary(&c),
        [
            "kubectl apply",
            "kubectl wait",
            "kubectl apply",
            "helm upgrade",
            "kubectl apply"
        ],
        "{c:#?}"
    );
    assert!(c.iter().all(|c| c["code"] == 0), "{c:#?}");
    let h = &c[3];
    assert_eq!(h["chart"], "longhorn");
    assert_eq!(h["version"], longhorn::CHART_VERSION);
    assert_eq!(h["source"], "archive");
    assert_eq!(h["namespace"], "longhorn-system");
    assert_eq!(h["values"]["persistence"]["defaultClass"], true);
    assert_eq!(h["values"]["persistence"]["defaultClassReplicaCount"], 1);
    assert_eq!(
        h["values"]["defaultSettings"]["defaultDataPath"],
        "/srv/longhorn"
    );
    assert_eq!(
        h["values"]["csi"]["kubeletRootDir"],
        "/var/snap/microk8s/common/var/lib/kubelet"
    );
    assert_eq!(
        h["unchecked"],
        serde_json::json!([]),
        "every value is checked"
    );
    let argv: Vec<&str> = h["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(argv
        .windows(2)
        .any(|w| w == ["--version", longhorn::CHART_VERSION]));
    assert!(argv.contains(&"--wait"));
    assert_eq!(
        c[0]["objects"],
        serde_json::json!([
            "CustomResourceDefinition//volumesnapshotclasses.snapshot.storage.k8s.io",
            "CustomResourceDefinition//volumesnapshotcontents.snapshot.storage.k8s.io",
            "CustomResourceDefinition//volumesnapshots.snapshot.storage.k8s.io"
        ])
    );
    assert_eq!(
        c[4]["objects"],
        serde_json::json!(["VolumeSnapshotClass//longhorn-snapshot"])
    );
    assert!(c[2]["objects"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(
            "Deployment/kube-system/snapshot-controller"
        )));

    // Once installed, running the step again (a crash after helm) changes nothing but the
    // release revision.
    run_step(&n, &cfg, &root, FakeKernel::new(&root)).expect("again");
    let again = calls(&n);
    assert_eq!(again.len(), 10);
    let (code, out, _) = helm(&n, &["list", "-n", "longhorn-system", "-o", "json"]);
    assert_eq!(code, 0);
    let rel: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rel[0]["revision"], "2");
    assert_eq!(rel[0]["chart"], "longhorn-1.7.2");

    // Snapshots of a claim work against the class (the CRD's schema is enforced).
    let snap = dir.path().join("snap.yaml");
    std::fs::write(
        &snap,
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: s1\n  namespace: default\nspec:\n  volumeSnapshotClassName: longhorn-snapshot\n  source:\n    persistentVolumeClaimName: data\n",
    )
    .unwrap();
    let (code, out, err) = kubectl(
        &n,
        vec!["apply".into(), "-f".into(), snap.display().to_string()],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "volumesnapshot.snapshot.storage.k8s.io/s1 created\n");
    std::fs::write(
        &snap,
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: s2\n  namespace: default\nspec: {}\n",
    )
    .unwrap();
    let (code, _, err) = kubectl(
        &n,
        vec!["apply".into(), "-f".into(), snap.display().to_string()],
    );
    assert_eq!(code, 1);
    assert!(err.contains("spec.source: Required value"), "{err}");

    // Health: no volumes, then one healthy and one degraded.
    let tools = n.adapter.cluster_tools().unwrap();
    let h = n.run(move |_| async move { longhorn::health(tools.as_ref()).await });
    assert!(h.installed && h.problem.is_none(), "{h:?}");
    assert_eq!((h.volumes, h.healthy), (0, 0));
    let vols = dir.path().join("vols.yaml");
    std::fs::write(
        &vols,
        "apiVersion: longhorn.io/v1beta2\nkind: Volume\nmetadata:\n  name: pvc-a\n  namespace: longhorn-system\nspec:\n  numberOfReplicas: 1\nstatus:\n  state: attached\n  robustness: healthy\n---\napiVersion: longhorn.io/v1beta2\nkind: Volume\nmetadata:\n  name: pvc-b\n  namespace: longhorn-system\nspec:\n  numberOfReplicas: 3\nstatus:\n  state: attached\n  robustness: degraded\n",
    )
    .unwrap();
    let (code, _, err) = kubectl(
        &n,
        vec!["apply".into(), "-f".into(), vols.display().to_string()],
    );
    assert_eq!(code, 0, "{err}");
    let tools = n.adapter.cluster_tools().unwrap();
    let h = n.run(move |_| async move { longhorn::health(tools.as_ref()).await });
    assert_eq!((h.volumes, h.healthy), (2, 1), "{h:?}");
    assert_eq!(h.degraded, ["pvc-b (3 replicas wanted)"]);
    assert!(h.summary().contains("1 degraded"), "{}", h.summary());
}

#[test]
fn nothing_is_applied_while_a_prerequisite_is_missing() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut n = SimNode::new(&lab, 0, dir.path(), &log, &[]);
    n.install_and_start();
    let cfg = config(None);

    // iscsid cannot start.
    let root = ready_root(dir.path());
    let err = run_step(
        &n,
        &cfg,
        &root,
        FakeKernel::new(&root).with_failing_unit("iscsid"),
    )
    .unwrap_err();
    assert!(err.starts_with("waiting: this node does not meet"), "{err}");
    assert!(err.contains("iscsid is not running"), "{err}");
    // Short of space under the data path.
    let err = run_step(
        &n,
        &cfg,
        &root,
        FakeKernel::new(&root).with_free_space(5 << 30),
    )
    .unwrap_err();
    assert!(
        err.contains("only 5.0 GiB free for /srv/longhorn") && err.contains("20.0 GiB"),
        "{err}"
    );
    // A kernel without iscsi_tcp.
    let bare = dir.path().join("bare");
    FakeRoot {
        modules: vec![],
        dpkg_installed: Some(vec!["open-iscsi".into(), "nfs-common".into()]),
        ..Default::default()
    }
    .write(&bare)
    .unwrap();
    let err = run_step(&n, &cfg, &bare, FakeKernel::new(&bare)).unwrap_err();
    assert!(err.contains("has no iscsi_tcp module"), "{err}");
    assert!(
        calls(&n).is_empty(),
        "nothing may be applied: {:#?}",
        calls(&n)
    );

    // An image built for offline use without the staged chart never reaches for the network.
    let staged_dir = staged(dir.path(), false);
    let err = run_step(
        &n,
        &config(Some(&staged_dir)),
        &root,
        FakeKernel::new(&root),
    )
    .unwrap_err();
    assert!(
        err.contains("the staged chart") && err.contains("is missing"),
        "{err}"
    );
    assert!(calls(&n).is_empty());

    // With everything in place the chart comes from the repository (the simulator's network).
    let done = run_step(&n, &cfg, &root, FakeKernel::new(&root)).expect("installs");
    assert!(done.contains("installed"), "{done}");
    let c = calls(&n);
    assert_eq!(c[3]["source"], "repo");
    assert!(c[3]["argv"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("https://charts.longhorn.io")));
}

#[test]
fn the_simulator_refuses_what_helm_and_the_api_server_refuse() {
    let lab = Lab::new(1).expect("creating the network lab (this test must run as root)");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut n = SimNode::new(&lab, 0, dir.path(), &log, &[("MICROK8S_SIM_OFFLINE", "1")]);
    n.install_and_start();
    let values = dir.path().join("v.yaml");
    let chart = staged(dir.path(), true).join(longhorn::chart_archive_name());
    let install = |extra: &[&str]| {
        let mut a = vec![
            "upgrade",
            "--install",
            "longhorn",
            chart.to_str().unwrap(),
            "--version",
            "1.7.2",
            "--namespace",
            "longhorn-system",
            "--create-namespace",
            "--values",
            values.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        helm(&n, &a)
    };
    for (bad, needle) in [
        (
            "persistence:\n  defaultClassReplicaCount: 11\n",
            "persistence.defaultClassReplicaCount: must be an integer from 1 to 10",
        ),
        (
            "defaultSettings:\n  defaultDataPath: var/lib/longhorn\n",
            "must be an absolute path",
        ),
        ("- a list\n", "cannot unmarshal"),
    ] {
        std::fs::write(&values, bad).unwrap();
        let (code, _, err) = install(&[]);
        assert_eq!(code, 1, "{bad}");
        assert!(err.contains(needle), "{bad}: {err}");
    }
    std::fs::write(&values, "persistence:\n  defaultClassReplicaCount: 3\n").unwrap();
    let (code, _, err) = install(&["--set", "x=1"]);
    assert_eq!((code, err.as_str()), (1, "Error: unknown flag: --set\n"));
    let (code, _, err) = helm(
        &n,
        &[
            "upgrade",
            "--install",
            "longhorn",
            "longhorn",
            "--repo",
            "https://charts.longhorn.io",
            "--version",
            "1.7.2",
            "-n",
            "longhorn-system",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot be reached"), "{err}");
    // The wrong namespace, and a namespace that does not exist without --create-namespace.
    let (code, _, err) = helm(
        &n,
        &[
            "upgrade",
            "--install",
            "longhorn",
            chart.to_str().unwrap(),
            "-n",
            "storage",
            "--create-namespace",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("must be installed in longhorn-system"),
        "{err}"
    );
    let (code, _, err) = helm(
        &n,
        &[
            "upgrade",
            "--install",
            "longhorn",
            chart.to_str().unwrap(),
            "-n",
            "longhorn-system",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("namespaces \"longhorn-system\" not found"),
        "{err}"
    );

    // A custom object before its CRD, and right after it (not yet Established).
    let class = dir.path().join("class.yaml");
    std::fs::write(&class, longhorn::snapshot_class_manifest()).unwrap();
    let apply = |f: &Path| {
        kubectl(
            &n,
            vec!["apply".into(), "-f".into(), f.display().to_string()],
        )
    };
    let (code, _, err) = apply(&class);
    assert_eq!(code, 1);
    assert!(err.contains("ensure CRDs are installed first"), "{err}");
    let crds = dir.path().join("crds.yaml");
    std::fs::write(&crds, longhorn::snapshot_crds_manifest()).unwrap();
    assert_eq!(apply(&crds).0, 0);
    let (code, _, err) = apply(&class);
    assert_eq!(code, 1, "a CRD is not Established at once");
    assert!(err.contains("ensure CRDs are installed first"), "{err}");
    let (code, out, err) = kubectl(
        &n,
        vec![
            "wait".into(),
            "--for=condition=Established".into(),
            "--timeout=5s".into(),
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io".into(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("condition met"));
    assert_eq!(apply(&class).0, 0);
    // Every call above was recorded, refused ones included.
    let c = calls(&n);
    assert!(c.iter().filter(|c| c["code"] == 1).count() >= 8, "{c:#?}");
    // Nothing was installed by the refused calls.
    let (_, out, _) = helm(&n, &["list", "-n", "longhorn-system", "-o", "json"]);
    assert_eq!(out.trim(), "[]");
}

/// Joins `node` to `seed` as a worker and waits until the seed lists it Ready.
fn join_worker(seed: &SimNode, node: &SimNode) {
    let t = JoinTarget::new(IpAddr::V4(seed.host.addr), secret().microk8s_token());
    node.run(move |a| async move { a.join(&t, JoinRole::Worker).await })
        .unwrap_or_else(|e| panic!("{} joining: {e}", node.name));
    let ip = IpAddr::V4(node.host.addr);
    eventually(Duration::from_secs(10), "the worker to be Ready", || {
        let nodes = seed.run(|a| async move { a.nodes().await }).ok()?;
        nodes
            .iter()
            .find(|n| n.internal_ip == Some(ip))?
            .ready
            .then_some(())
    });
}

#[test]
fn replicas_follow_the_ready_nodes_up_to_three_and_workers_have_no_helm() {
    let lab = Lab::new(4).expect("creating the network lab (this test must run as root)");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let mut nodes: Vec<SimNode> = (0..4)
        .map(|i| SimNode::new(&lab, i, dir.path(), &log, &[]))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    join_worker(&nodes[0], &nodes[1]);
    let root = ready_root(dir.path());
    let cfg = config(None);
    let done = run_step(&nodes[0], &cfg, &root, FakeKernel::new(&root)).expect("2 nodes");
    assert!(
        done.contains("2 replicas per volume on 2 ready nodes"),
        "{done}"
    );
    for n in &nodes[2..] {
        join_worker(&nodes[0], n);
    }
    let done = run_step(&nodes[0], &cfg, &root, FakeKernel::new(&root)).expect("4 nodes");
    assert!(
        done.contains("3 replicas per volume on 4 ready nodes"),
        "{done}"
    );
    let helm_values: Vec<Value> = calls(&nodes[0])
        .into_iter()
        .filter(|c| c["tool"] == "helm")
        .map(|c| c["values"]["persistence"]["defaultClassReplicaCount"].clone())
        .collect();
    assert_eq!(helm_values, [2, 3]);

    // A worker's helm and kubectl are the wrappers' refusal (exit 0), which the adapter reports
    // as such; nothing is installed there.
    let tools = nodes[1].adapter.cluster_tools().unwrap();
    let err = nodes[1]
        .run(move |_| async move { tools.helm_list("longhorn-system").await })
        .unwrap_err();
    assert!(matches!(err, Microk8sError::WorkerNode { .. }), "{err}");
    let err = run_step(&nodes[1], &cfg, &root, FakeKernel::new(&root)).unwrap_err();
    assert!(err.contains("refused: this node is a worker"), "{err}");
    let c = calls(&nodes[1]);
    assert_eq!(summary(&c), ["helm list", "kubectl apply"], "{c:#?}");
    assert!(
        c.iter().all(|c| c["worker"] == true && c["code"] == 0),
        "{c:#?}"
    );
}

#[test]
fn offline_helm_waits_for_the_images_on_every_ready_node_and_ctr_is_strict() {
    let lab = Lab::new(2).expect("creating the network lab (this test must run as root)");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let env = [
        ("MICROK8S_SIM_OFFLINE", "1"),
        ("MICROK8S_SIM_HELM_WAIT_MS", "1500"),
    ];
    let mut nodes: Vec<SimNode> = (0..2)
        .map(|i| SimNode::new(&lab, i, dir.path(), &log, &env))
        .collect();
    for n in &mut nodes {
        n.install_and_start();
    }
    join_worker(&nodes[0], &nodes[1]);
    let staged_dir = staged(dir.path(), true);
    let archive = staged_dir.join(IMAGES_TAR);

    // ctr refuses what containerd's importer refuses, with its words; nothing is imported.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, "<html>".repeat(200)).unwrap();
    let (code, _, err) = ctr(&nodes[0], &["image", "import", junk.to_str().unwrap()]);
    assert_eq!(
        (code, err.as_str()),
        (1, "ctr: archive/tar: invalid tar header\n")
    );
    let good = std::fs::read(&archive).unwrap();
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &good[..2000]).unwrap();
    let (code, _, err) = ctr(&nodes[0], &["image", "import", cut.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err, "ctr: failed to ingest \"layer.tar\": unexpected EOF\n");
    let (code, _, err) = ctr(&nodes[0], &["image", "import", "/nonexistent.tar"]);
    assert_eq!(
        (code, err.as_str()),
        (1, "ctr: open /nonexistent.tar: no such file or directory\n")
    );
    assert_eq!(ctr(&nodes[0], &["image", "ls", "-q"]).1, "");

    // The control-plane node imports; the worker has not: helm's --wait times out.
    let (code, out, err) = ctr(&nodes[0], &["image", "import", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.starts_with("unpacking docker.io/longhornio/"), "{out}");
    let imported = microk8s_sim::daemon::imported_images(&nodes[0].dir.join("state"));
    assert_eq!(imported.len(), 3, "{imported:?}");
    let chart = staged_dir.join(longhorn::chart_archive_name());
    let values = dir.path().join("v.yaml");
    std::fs::write(&values, "persistence:\n  defaultClassReplicaCount: 2\n").unwrap();
    let install = || {
        helm(
            &nodes[0],
            &[
                "upgrade",
                "--install",
                "longhorn",
                chart.to_str().unwrap(),
                "--version",
                "1.7.2",
                "--namespace",
                "longhorn-system",
                "--create-namespace",
                "--values",
                values.to_str().unwrap(),
                "--wait",
                "--timeout",
                "900s",
            ],
        )
    };
    let (code, _, err) = install();
    assert_eq!(
        (code, err.as_str()),
        (1, "Error: context deadline exceeded\n")
    );
    let last = calls(&nodes[0]).pop().unwrap();
    let stuck = &last["image_pull_backoff"];
    assert_eq!(
        stuck.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["node-1"],
        "{last:#}"
    );
    assert_eq!(stuck["node-1"].as_array().unwrap().len(), 3, "{last:#}");
    let (_, out, _) = helm(&nodes[0], &["list", "-n", "longhorn-system", "-o", "json"]);
    let rel: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rel[0]["status"], "failed", "{rel}");

    // Once the worker imported them too, the release comes up (an upgrade of the failed one).
    let (code, _, err) = ctr(&nodes[1], &["images", "import", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = install();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("has been upgraded"), "{out}");
    let (_, out, _) = helm(&nodes[0], &["list", "-n", "longhorn-system", "-o", "json"]);
    let rel: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rel[0]["status"], "deployed", "{rel}");

    // `ctr image ls` without -q is ctr's table.
    let (code, out, _) = ctr(&nodes[1], &["image", "ls"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("REF\tTYPE"), "{out}");
}
