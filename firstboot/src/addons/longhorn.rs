//! Longhorn, installed by the agent (once, on the control-plane node that enables the addons,
//! after HA) with MicroK8s' own helm, and the CSI snapshot support that makes `kubectl`
//! snapshots of its volumes work. Also the storage health shown in status.
//!
//! The install ([`install`]), each step safe to run again after a crash:
//! 1. **Gate**: this node's own prerequisites ([`super::prep`], re-checked now) must be met,
//!    Kubernetes must list at least one Ready node, and **every Ready node** must report its
//!    prerequisites met ([`cluster_gate`]). The other members' verdicts come from their status
//!    documents, read just before over the pinned, authenticated coordinator client
//!    ([`CoordinatorReports`]): a document's `problems` that start with `longhorn:` are that
//!    node's unmet prerequisites ([`verdict_from_doc`]; [`super::prep`] writes them so), and a
//!    node still `preparing`, or whose document cannot be read, has not reported. What counts:
//!    all Ready Kubernetes nodes, workers included (Longhorn's default puts replicas and its
//!    engine on every node, so there is no node that may lack iSCSI); a NotReady node is not
//!    asked (it holds no replica until it is back). Otherwise nothing is applied and the step
//!    fails with the reason, naming each node and its problems (the addon row in status shows
//!    it; the progress retries it, spaced out: [`super::progress::retry_delay`]).
//!    A member's verdict survives its agent's restarts: node preparation keeps it in the
//!    state folder ([`super::prep::VERDICT_FILE`]), a restarted agent reports it at once and
//!    a restarted member checks again in the background (`driver`).
//! 2. The CSI snapshot CRDs (`snapshot.storage.k8s.io/v1`: VolumeSnapshotClass,
//!    VolumeSnapshotContent, VolumeSnapshot), then `kubectl wait` until they are Established,
//!    then the snapshot controller (RBAC + Deployment in `kube-system`). Longhorn's chart ships
//!    the CSI snapshotter sidecar but neither the CRDs nor the controller; its docs ask for
//!    them before snapshots work. Manifests are written by this module (atomically, under the
//!    state folder) and applied with `microk8s kubectl apply -f`.
//! 3. `microk8s helm3 upgrade --install longhorn … --version` [`CHART_VERSION`] in
//!    `longhorn-system` (the chart's README: install in that namespace only) with a values file:
//!    `persistence.defaultClass: true` (Longhorn's StorageClass becomes the default),
//!    `persistence.defaultClassReplicaCount` = min(3, Ready nodes) ([`replica_count`]; the
//!    chart's questions.yaml allows 1-10), `defaultSettings.defaultDataPath` =
//!    `addons.longhorn.data-path`, and `csi.kubeletRootDir` = MicroK8s' kubelet folder (its
//!    kubelet does not use `/var/lib/kubelet`). `--wait` makes helm fail when Longhorn's pods do
//!    not come up, so a release that cannot run is reported, not assumed.
//! 4. A VolumeSnapshotClass `longhorn-snapshot` for `driver.longhorn.io` with
//!    `parameters.type: snap` (a Longhorn in-cluster snapshot; `bak` would be a backup, which
//!    needs a backup target), applied once the CRDs exist.
//!
//! The chart comes from `addons.offline` when the image staged one
//! (`longhorn-<CHART_VERSION>.tgz`, see `imagebuilder`'s customize step), else from
//! Longhorn's chart repository (internet). **Container images**: when the image also staged
//! image archives there (the build checks they hold every image the chart's `values.yaml`
//! names and the snapshot controller's, [`SNAPSHOT_CONTROLLER_IMAGE`]), every node imports
//! them into its containerd with `microk8s ctr image import` before it reports its
//! prerequisites met ([`super::prep::import_staged_images`]; the installing node retries its
//! own failed import at every attempt), so the gate above waits until every Ready node has
//! them and the install needs no registry: the chart's `image.pullPolicy` is `IfNotPresent`
//! (longhorn/longhorn `chart/values.yaml` at v1.7.2), and the snapshot controller's Deployment
//! names a tagged image, whose default policy is the same. Without archives the nodes pull
//! the images from their registries (or a mirror configured in containerd). When pods cannot
//! pull their images, helm's `--wait` ends with `context deadline exceeded`; the error then
//! says so ([`explain_helm_error`]).
//!
//! Health ([`health`]): `helm list` says whether the release is deployed and which chart, and
//! `kubectl get volumes.longhorn.io -n longhorn-system -o json` gives each volume's
//! `status.robustness` (`healthy`, `degraded`, `faulted`, `unknown`) and its
//! `spec.numberOfReplicas`.
//!
//! To change a value: edit [`render_values`] (and the simulator's `daemon/helm.rs`, which checks
//! what the chart would refuse).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use rackseed_config::{ClusterConfig, Longhorn};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::status::{StatusDoc, StorageHealthView};

use super::plan::{LONGHORN_CHART_REPO, MICROK8S_KUBELET_DIR};
use super::prep::Readiness;
use crate::system::microk8s::helm::{ChartSource, ClusterTools, HelmInstall};
use crate::system::microk8s::Microk8s;

/// The pinned chart version.
pub const CHART_VERSION: &str = rackseed_config::LONGHORN_CHART_VERSION;
pub const RELEASE: &str = "longhorn";
pub const NAMESPACE: &str = "longhorn-system";
/// Longhorn's CSI driver name.
pub const CSI_DRIVER: &str = "driver.longhorn.io";
/// The VolumeSnapshotClass this module creates.
pub const SNAPSHOT_CLASS: &str = "longhorn-snapshot";
/// How long helm waits for Longhorn's pods (`--wait --timeout`).
pub const HELM_WAIT: Duration = Duration::from_secs(15 * 60);
/// How long `kubectl wait` waits for the snapshot CRDs to be Established.
pub const CRD_WAIT: Duration = Duration::from_secs(60);
/// The snapshot controller's image (a mirror of the Kubernetes CSI project's
/// `snapshot-controller` that needs no registry host in its name); the image builder asks for
/// the same one among the staged images.
pub const SNAPSHOT_CONTROLLER_IMAGE: &str = rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE;
/// The three CRDs of `snapshot.storage.k8s.io`.
pub const SNAPSHOT_CRDS: [&str; 3] = [
    "volumesnapshotclasses.snapshot.storage.k8s.io",
    "volumesnapshotcontents.snapshot.storage.k8s.io",
    "volumesnapshots.snapshot.storage.k8s.io",
];

/// The staged chart's file name.
pub fn chart_archive_name() -> String {
    format!("longhorn-{CHART_VERSION}.tgz")
}

/// Replicas per volume: one per node that can hold one, at most 3.
pub fn replica_count(nodes: usize) -> u32 {
    nodes.clamp(1, 3) as u32
}

/// The chart: the staged archive when `offline` is set (and then it must be there: an image
/// built for offline use never falls back to the internet), else the public repository.
pub fn chart_source(offline: Option<&Path>) -> Result<ChartSource, String> {
    match offline {
        None => Ok(ChartSource::Repo {
            url: LONGHORN_CHART_REPO.into(),
            name: "longhorn".into(),
        }),
        Some(dir) => {
            let path = dir.join(chart_archive_name());
            if path.is_file() {
                Ok(ChartSource::Archive { path })
            } else {
                Err(format!(
                    "longhorn: the staged chart {} is missing (addons.offline is {}); rebuild \
                     the image with the chart in that folder",
                    path.display(),
                    dir.display()
                ))
            }
        }
    }
}

/// The values file (YAML) for `settings` and `replicas` (see the module docs).
pub fn render_values(settings: &Longhorn, replicas: u32) -> String {
    let v = json!({
        "persistence": {
            "defaultClass": true,
            "defaultClassReplicaCount": replicas,
        },
        "defaultSettings": {
            "defaultDataPath": settings.data_path.display().to_string(),
        },
        "csi": { "kubeletRootDir": MICROK8S_KUBELET_DIR },
    });
    let body = serde_yaml::to_string(&v).expect("a JSON value always renders as YAML");
    format!("# written by firstboot (rackseed): longhorn {CHART_VERSION}\n{body}")
}

/// The snapshot CRDs (structural schemas for the fields Kubernetes' CSI snapshot API defines).
pub fn snapshot_crds_manifest() -> String {
    let status = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let policy = json!({"type": "string", "enum": ["Delete", "Retain"]});
    let class_schema = json!({
        "type": "object",
        "required": ["driver", "deletionPolicy"],
        "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "driver": {"type": "string"},
            "deletionPolicy": policy,
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    });
    let content_schema = json!({
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["deletionPolicy", "driver", "source", "volumeSnapshotRef"],
                "properties": {
                    "deletionPolicy": policy,
                    "driver": {"type": "string"},
                    "volumeSnapshotClassName": {"type": "string"},
                    "sourceVolumeMode": {"type": "string"},
                    "source": {"type": "object", "properties": {
                        "volumeHandle": {"type": "string"},
                        "snapshotHandle": {"type": "string"}}},
                    "volumeSnapshotRef": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                }
            },
            "status": status,
        }
    });
    let snapshot_schema = json!({
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "volumeSnapshotClassName": {"type": "string"},
                    "source": {"type": "object", "properties": {
                        "persistentVolumeClaimName": {"type": "string"},
                        "volumeSnapshotContentName": {"type": "string"}}},
                }
            },
            "status": status,
        }
    });
    let crd = |plural: &str, kind: &str, scope: &str, schema: &serde_json::Value, sub: bool| {
        let mut version = json!({
            "name": "v1", "served": true, "storage": true,
            "schema": {"openAPIV3Schema": schema},
        });
        if sub {
            version["subresources"] = json!({"status": {}});
        }
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.snapshot.storage.k8s.io")},
            "spec": {
                "group": "snapshot.storage.k8s.io",
                "scope": scope,
                "names": {
                    "plural": plural, "singular": kind.to_lowercase(), "kind": kind,
                    "listKind": format!("{kind}List"),
                },
                "versions": [version],
            }
        })
    };
    yaml_docs(&[
        crd(
            "volumesnapshotclasses",
            "VolumeSnapshotClass",
            "Cluster",
            &class_schema,
            false,
        ),
        crd(
            "volumesnapshotcontents",
            "VolumeSnapshotContent",
            "Cluster",
            &content_schema,
            true,
        ),
        crd(
            "volumesnapshots",
            "VolumeSnapshot",
            "Namespaced",
            &snapshot_schema,
            true,
        ),
    ])
}

/// The snapshot controller: its service account, the permissions it needs on volumes, claims,
/// snapshots and its leader-election lease, and a Deployment of one replica in `kube-system`.
pub fn snapshot_controller_manifest() -> String {
    let ns = "kube-system";
    let name = "snapshot-controller";
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| json!({"apiGroups": groups, "resources": resources, "verbs": verbs});
    let read = ["get", "list", "watch"];
    let all = [
        "create", "get", "list", "watch", "update", "patch", "delete",
    ];
    yaml_docs(&[
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": name, "namespace": ns}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            rule(&[""], &["persistentvolumes"], &read),
            rule(&[""], &["persistentvolumeclaims"], &["get", "list", "watch", "update"]),
            rule(&["storage.k8s.io"], &["storageclasses"], &read),
            rule(&[""], &["events"], &["list", "watch", "create", "update", "patch"]),
            rule(&["snapshot.storage.k8s.io"], &["volumesnapshotclasses"], &read),
            rule(&["snapshot.storage.k8s.io"], &["volumesnapshotcontents", "volumesnapshots"], &all),
            rule(&["snapshot.storage.k8s.io"],
                 &["volumesnapshotcontents/status", "volumesnapshots/status"],
                 &["update", "patch"]),
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
               "roleRef": {"kind": "ClusterRole", "name": name,
                           "apiGroup": "rbac.authorization.k8s.io"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": format!("{name}-leaderelection"), "namespace": ns},
               "rules": [rule(&["coordination.k8s.io"], &["leases"], &all)]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": format!("{name}-leaderelection"), "namespace": ns},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
               "roleRef": {"kind": "Role", "name": format!("{name}-leaderelection"),
                           "apiGroup": "rbac.authorization.k8s.io"}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [{
                        "name": name,
                        "image": SNAPSHOT_CONTROLLER_IMAGE,
                        "args": ["--v=2", "--leader-election=true",
                                 format!("--leader-election-namespace={ns}")],
                    }]
                }
            }
        }}),
    ])
}

/// The VolumeSnapshotClass for Longhorn.
pub fn snapshot_class_manifest() -> String {
    yaml_docs(&[json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {
            "name": SNAPSHOT_CLASS,
            "annotations": {"snapshot.storage.kubernetes.io/is-default-class": "true"},
        },
        "driver": CSI_DRIVER,
        "deletionPolicy": "Delete",
        "parameters": {"type": "snap"},
    })])
}

fn yaml_docs(docs: &[serde_json::Value]) -> String {
    let mut out = String::from("# written by firstboot (rackseed)\n");
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d).expect("a JSON value always renders as YAML"));
    }
    out
}

/// One member's Longhorn prerequisites, as its status document reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Met,
    /// Its unmet prerequisites (the `longhorn:` lines of its `problems`).
    Unmet(Vec<String>),
    /// No verdict yet, and why (still preparing, document unreadable).
    NotReported(String),
}

/// A member's verdict; `node` is its hostname (= its Kubernetes node name), or, when its
/// document could not be read, its node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberVerdict {
    pub node: String,
    pub verdict: Verdict,
}

/// The verdict in a peer's status document (JSON, as the coordinator serves it).
pub fn verdict_from_doc(doc: &serde_json::Value) -> Result<MemberVerdict, String> {
    let doc: StatusDoc =
        serde_json::from_value(doc.clone()).map_err(|e| format!("not a status document: {e}"))?;
    let verdict = if doc.phase == "preparing" || doc.phase.is_empty() {
        Verdict::NotReported("it is still preparing".into())
    } else {
        let unmet: Vec<String> = doc
            .problems
            .iter()
            .filter(|p| p.starts_with("longhorn:"))
            .cloned()
            .collect();
        if unmet.is_empty() {
            Verdict::Met
        } else {
            Verdict::Unmet(unmet)
        }
    };
    Ok(MemberVerdict {
        node: doc.hostname,
        verdict,
    })
}

/// Where the installing node gets the other members' verdicts.
pub trait MemberReports: Send + Sync {
    /// This node's Kubernetes node name (its hostname); its own verdict is checked locally.
    fn this_node(&self) -> &str;
    /// The other members' verdicts, read now.
    fn verdicts(&self) -> BoxFuture<'_, Vec<MemberVerdict>>;
}

/// [`MemberReports`] from the peers' status documents over the coordinator client.
pub struct CoordinatorReports {
    pub this_node: String,
    pub client: Arc<CoordinatorClient>,
    /// (node id, coordinator address, pinned fingerprint) of each verified peer.
    pub peers: Vec<(String, SocketAddr, String)>,
}

impl MemberReports for CoordinatorReports {
    fn this_node(&self) -> &str {
        &self.this_node
    }

    fn verdicts(&self) -> BoxFuture<'_, Vec<MemberVerdict>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (id, addr, fp) in &self.peers {
                let read = self
                    .client
                    .status(*addr, fp)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|doc| verdict_from_doc(&doc));
                out.push(read.unwrap_or_else(|e| MemberVerdict {
                    node: id.clone(),
                    verdict: Verdict::NotReported(format!("its status document: {e}")),
                }));
            }
            out
        })
    }
}

/// Whether every node in `ready` (the Ready Kubernetes nodes) meets the prerequisites: this
/// node by `local`, the others by their reported verdicts (see the module docs). The error
/// names each node that blocks the install and why.
pub fn cluster_gate(
    ready: &[String],
    this_node: &str,
    local: &Readiness,
    peers: &[MemberVerdict],
) -> Result<(), String> {
    let mut blockers = Vec::new();
    for name in ready {
        if name.eq_ignore_ascii_case(this_node) {
            if !local.ok {
                blockers.push(format!("{name} (this node): {}", local.problems.join("; ")));
            }
            continue;
        }
        match peers.iter().find(|p| p.node.eq_ignore_ascii_case(name)) {
            Some(MemberVerdict {
                verdict: Verdict::Met,
                ..
            }) => {}
            Some(MemberVerdict {
                verdict: Verdict::Unmet(problems),
                ..
            }) => blockers.push(format!("{name}: {}", problems.join("; "))),
            Some(MemberVerdict {
                verdict: Verdict::NotReported(why),
                ..
            }) => blockers.push(format!(
                "{name}: has not reported its prerequisites ({why})"
            )),
            None => blockers.push(format!(
                "{name}: has not reported its prerequisites (no status document names it)"
            )),
        }
    }
    if blockers.is_empty() {
        return Ok(());
    }
    let unreadable: Vec<String> = peers
        .iter()
        .filter(|p| !ready.iter().any(|n| n.eq_ignore_ascii_case(&p.node)))
        .filter_map(|p| match &p.verdict {
            Verdict::NotReported(why) => Some(format!("{}: {why}", p.node)),
            _ => None,
        })
        .collect();
    let mut msg = format!(
        "waiting: longhorn's prerequisites are not met on every Ready node, nothing was \
         installed: {}",
        blockers.join(" | ")
    );
    if !unreadable.is_empty() {
        msg.push_str(&format!(" (peers not read: {})", unreadable.join(" | ")));
    }
    Err(msg)
}

/// The reason shown for a failed `helm upgrade --install`: helm's own error, and, when its
/// `--wait` timed out (`context deadline exceeded`: Longhorn's pods did not become ready), the
/// likely cause: images that could not be pulled.
pub fn explain_helm_error(error: &str, offline: Option<&Path>) -> String {
    let mut msg = format!("helm install of longhorn: {error}");
    if error.contains("context deadline exceeded") || error.contains("timed out waiting") {
        let staged = offline
            .map(|d| super::prep::staged_image_archives(d).is_ok_and(|a| !a.is_empty()))
            .unwrap_or(false);
        msg.push_str(&format!(
            " (longhorn's pods did not become ready in time, often because a node cannot pull \
             their images (ImagePullBackOff) without registry access: {}; see microk8s kubectl \
             get pods -n longhorn-system)",
            if staged {
                "every Ready node must have imported the staged image archives (a node whose \
                 import failed says so in its status)"
            } else {
                "stage them in the image as *.tar archives in addons.offline"
            }
        ));
    }
    msg
}

/// Where the install's files go: `<state>/storage/`.
pub fn files_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("storage")
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(name);
    rackseed_host::fs::write_atomic(&path, text.as_bytes(), 0o644)
        .map_err(|e| format!("writing {}: {e:#}", path.display()))?;
    Ok(path)
}

/// Installs Longhorn and snapshot support (see the module docs). `local` is this node's
/// prerequisite verdict, checked just before; `members` gives the other members' verdicts.
/// Returns a one-line summary, or why nothing (or not everything) was applied.
pub async fn install(
    mk: &dyn Microk8s,
    tools: &dyn ClusterTools,
    cfg: &ClusterConfig,
    state_dir: &Path,
    local: &Readiness,
    members: &dyn MemberReports,
) -> Result<String, String> {
    if !local.ok {
        return Err(format!(
            "waiting: this node does not meet longhorn's prerequisites, nothing was installed: {}",
            local.problems.join("; ")
        ));
    }
    let chart = chart_source(cfg.addons.offline.as_deref())?;
    let nodes = mk
        .nodes()
        .await
        .map_err(|e| format!("listing kubernetes nodes: {e}"))?;
    let ready_names: Vec<String> = nodes
        .iter()
        .filter(|n| n.ready)
        .map(|n| n.name.clone())
        .collect();
    let ready = ready_names.len();
    if ready == 0 {
        return Err("waiting: kubernetes lists no Ready node; nothing was installed".into());
    }
    let verdicts = members.verdicts().await;
    cluster_gate(&ready_names, members.this_node(), local, &verdicts)?;
    let replicas = replica_count(ready);
    let dir = files_dir(state_dir);
    let crds = write(&dir, "snapshot-crds.yaml", &snapshot_crds_manifest())?;
    let controller = write(
        &dir,
        "snapshot-controller.yaml",
        &snapshot_controller_manifest(),
    )?;
    let class = write(&dir, "snapshot-class.yaml", &snapshot_class_manifest())?;
    let values = write(
        &dir,
        "longhorn-values.yaml",
        &render_values(&cfg.addons.longhorn, replicas),
    )?;
    let step = |what: &'static str| move |e| format!("{what}: {e}");
    tools
        .kubectl_apply(&crds)
        .await
        .map_err(step("applying the snapshot CRDs"))?;
    tools
        .kubectl_wait_crds(&SNAPSHOT_CRDS, CRD_WAIT)
        .await
        .map_err(step("waiting for the snapshot CRDs"))?;
    tools
        .kubectl_apply(&controller)
        .await
        .map_err(step("applying the snapshot controller"))?;
    tools
        .helm_install(&HelmInstall {
            release: RELEASE.into(),
            namespace: NAMESPACE.into(),
            chart,
            version: CHART_VERSION.into(),
            values_file: values,
            wait: HELM_WAIT,
        })
        .await
        .map_err(|e| explain_helm_error(&e.to_string(), cfg.addons.offline.as_deref()))?;
    tools
        .kubectl_apply(&class)
        .await
        .map_err(step("applying the longhorn VolumeSnapshotClass"))?;
    Ok(format!(
        "longhorn {CHART_VERSION} installed: {replicas} replicas per volume on {ready} ready \
         nodes, default StorageClass, snapshot class {SNAPSHOT_CLASS}"
    ))
}

#[derive(Deserialize)]
struct VolumeList {
    items: Vec<RawVolume>,
}

#[derive(Deserialize)]
struct RawVolume {
    metadata: RawMeta,
    #[serde(default)]
    spec: RawSpec,
    #[serde(default)]
    status: RawStatus,
}

#[derive(Deserialize)]
struct RawMeta {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    number_of_replicas: Option<u32>,
}

#[derive(Deserialize, Default)]
struct RawStatus {
    #[serde(default)]
    robustness: String,
    #[serde(default)]
    state: String,
}

/// Folds `kubectl get volumes.longhorn.io -o json` into `view` (volume counts by robustness).
/// A detached volume reports `unknown` robustness: it counts as neither healthy nor degraded.
pub fn fold_volumes(json: &str, view: &mut StorageHealthView) -> Result<(), String> {
    let list: VolumeList =
        serde_json::from_str(json).map_err(|e| format!("longhorn volume list: {e}"))?;
    view.volumes = list.items.len() as u32;
    view.healthy = 0;
    view.degraded.clear();
    view.faulted.clear();
    for v in list.items {
        let replicas = v
            .spec
            .number_of_replicas
            .map(|n| format!(" ({n} replicas wanted)"))
            .unwrap_or_default();
        match v.status.robustness.as_str() {
            "healthy" => view.healthy += 1,
            "degraded" => view.degraded.push(format!("{}{replicas}", v.metadata.name)),
            "faulted" => view.faulted.push(format!("{}{replicas}", v.metadata.name)),
            _ => view.detached += u32::from(v.status.state != "attached"),
        }
    }
    Ok(())
}

/// Longhorn's health as this control-plane node sees it (see the module docs). Never fails:
/// what could not be read is in `problem`.
pub async fn health(tools: &dyn ClusterTools) -> StorageHealthView {
    let mut view = StorageHealthView {
        storage: "longhorn".into(),
        ..Default::default()
    };
    match tools.helm_list(NAMESPACE).await {
        Err(e) => {
            view.problem = Some(format!("helm list: {e}"));
            return view;
        }
        Ok(releases) => match releases.iter().find(|r| r.name == RELEASE) {
            None => {
                view.problem = Some("longhorn is not installed (no helm release)".into());
                return view;
            }
            Some(r) => {
                view.installed = r.status == "deployed";
                view.chart = Some(r.chart.clone());
                if !view.installed {
                    view.problem = Some(format!("helm release longhorn is {}", r.status));
                }
            }
        },
    }
    match tools
        .kubectl_get_json("volumes.longhorn.io", Some(NAMESPACE))
        .await
    {
        Ok(json) => {
            if let Err(e) = fold_volumes(&json, &mut view) {
                view.problem = Some(e);
            }
        }
        Err(e) => view.problem = Some(format!("reading longhorn volumes: {e}")),
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_one_per_node_up_to_three() {
        assert_eq!([0, 1, 2, 3, 4, 50].map(replica_count), [1, 1, 2, 3, 3, 3]);
    }

    #[test]
    fn values_set_the_default_class_replicas_data_path_and_kubelet_dir() {
        let s = Longhorn {
            data_path: "/srv/longhorn data".into(),
            min_free_space: 1 << 30,
        };
        let v: serde_yaml::Value = serde_yaml::from_str(&render_values(&s, 2)).unwrap();
        assert_eq!(
            v["persistence"]["defaultClass"],
            serde_yaml::Value::Bool(true)
        );
        assert_eq!(
            v["persistence"]["defaultClassReplicaCount"].as_u64(),
            Some(2)
        );
        assert_eq!(
            v["defaultSettings"]["defaultDataPath"].as_str(),
            Some("/srv/longhorn data")
        );
        assert_eq!(
            v["csi"]["kubeletRootDir"].as_str(),
            Some(MICROK8S_KUBELET_DIR)
        );
    }

    #[test]
    fn manifests_are_yaml_documents_with_kinds() {
        for (m, n) in [
            (snapshot_crds_manifest(), 3),
            (snapshot_controller_manifest(), 6),
            (snapshot_class_manifest(), 1),
        ] {
            let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&m)
                .map(|d| serde_yaml::Value::deserialize(d).unwrap())
                .filter(|d| !d.is_null())
                .collect();
            assert_eq!(docs.len(), n, "{m}");
            assert!(docs.iter().all(|d| d["kind"].is_string()));
        }
    }

    #[test]
    fn volumes_fold_into_counts() {
        let json = r#"{"items":[
            {"metadata":{"name":"a"},"spec":{"numberOfReplicas":3},"status":{"state":"attached","robustness":"healthy"}},
            {"metadata":{"name":"b"},"spec":{"numberOfReplicas":3},"status":{"state":"attached","robustness":"degraded"}},
            {"metadata":{"name":"c"},"spec":{},"status":{"state":"detached","robustness":"unknown"}},
            {"metadata":{"name":"d"},"status":{"state":"attached","robustness":"faulted"}}]}"#;
        let mut v = StorageHealthView::default();
        fold_volumes(json, &mut v).unwrap();
        assert_eq!((v.volumes, v.healthy, v.detached), (4, 1, 1));
        assert_eq!(v.degraded, ["b (3 replicas wanted)"]);
        assert_eq!(v.faulted, ["d"]);
        assert!(fold_volumes("nope", &mut v).is_err());
    }

    #[test]
    fn verdicts_come_from_the_longhorn_problems_of_a_prepared_member() {
        let doc = |phase: &str, problems: &[&str]| {
            serde_json::to_value(StatusDoc {
                hostname: "n2".into(),
                phase: phase.into(),
                problems: problems.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            })
            .unwrap()
        };
        let v = |d| verdict_from_doc(&d).unwrap().verdict;
        assert_eq!(v(doc("member", &["rpi: no vxlan"])), Verdict::Met);
        assert_eq!(
            v(doc("joining", &["longhorn: no iscsi_tcp", "rpi: x"])),
            Verdict::Unmet(vec!["longhorn: no iscsi_tcp".into()])
        );
        assert!(matches!(v(doc("preparing", &[])), Verdict::NotReported(_)));
        assert!(verdict_from_doc(&json!({"phase": 3})).is_err());
    }

    #[test]
    fn the_gate_asks_every_ready_node_and_names_the_blockers() {
        let ready = ["a".to_string(), "B".into(), "c".into()];
        let met = |n: &str| MemberVerdict {
            node: n.into(),
            verdict: Verdict::Met,
        };
        let ok = Readiness::default();
        assert!(cluster_gate(&ready, "a", &ok, &[met("b"), met("c")]).is_ok());
        let err = cluster_gate(
            &ready,
            "a",
            &ok,
            &[
                met("b"),
                MemberVerdict {
                    node: "id-9".into(),
                    verdict: Verdict::NotReported("refused".into()),
                },
            ],
        )
        .unwrap_err();
        assert!(err.contains("c: has not reported"), "{err}");
        assert!(err.contains("(peers not read: id-9: refused)"), "{err}");
        assert!(!err.contains("B:"), "{err}");
    }

    #[test]
    fn an_offline_image_never_falls_back_to_the_internet() {
        let dir = tempfile::tempdir().unwrap();
        assert!(chart_source(Some(dir.path()))
            .unwrap_err()
            .contains("missing"));
        std::fs::write(dir.path().join(chart_archive_name()), b"x").unwrap();
        assert!(matches!(
            chart_source(Some(dir.path())).unwrap(),
            ChartSource::Archive { .. }
        ));
        assert!(matches!(
            chart_source(None).unwrap(),
            ChartSource::Repo { .. }
        ));
    }
}
