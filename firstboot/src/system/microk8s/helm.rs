//! MicroK8s' bundled Helm and kubectl, for what MicroK8s has no addon for (Longhorn, the CSI
//! snapshot controller): [`ClusterTools`] is what firstboot asks of them, [`RealClusterTools`]
//! runs `microk8s helm3 …` and `microk8s kubectl …` through [`Cmd`].
//!
//! Facts this relies on, from canonical/microk8s:
//! - `microk8s-resources/wrappers/microk8s-helm3.wrapper`: `microk8s helm3` runs the snap's own
//!   `$SNAP/bin/helm` with `--kubeconfig=$SNAP_DATA/credentials/client.config` and the caller's
//!   arguments, so no `microk8s enable helm3` and no kubeconfig of ours is needed. On a worker
//!   (`$SNAP_DATA/var/lock/clustered.lock`) it prints "This MicroK8s deployment is acting as a
//!   node in a cluster. Please use the microk8s helm on the master." and exits **0**, so the
//!   output is checked for that sentence ([`super::parse::WORKER_MARKER`]) before the exit code
//!   is trusted; on a stopped node `exit_if_stopped` refuses.
//! - `microk8s kubectl` is the snap's kubectl with the same client config (A5 uses it for
//!   `get nodes -o json`).
//!
//! From Helm's own CLI: `helm upgrade --install` installs a release that does not exist and
//! upgrades one that does, so running it again after a crash is safe; `--version` pins a repo
//! chart's version; `--repo URL` names the repository without a `helm repo add`; a path to a
//! `.tgz` is a local chart archive (what the image stages for offline installs); `--wait` with
//! `--timeout` makes the command fail when the release's pods are not ready in time, so a
//! release that cannot start is reported, not assumed; `helm list -o json` prints the releases
//! as a JSON array of `{name, namespace, revision, status, chart, app_version}`.
//!
//! `microk8s ctr image import FILE` (the snap's `microk8s-ctr.wrapper` runs its own `ctr` with
//! `$SNAP_DATA/args/ctr`: `--address=${SNAP_COMMON}/run/containerd.sock --namespace k8s.io`, the
//! namespace kubelet's images live in; no worker check, so it works on every node) imports a
//! container image archive into this node's containerd; see `addons::prep` for why this and
//! not `microk8s images import`.
//!
//! Values always go in a file (`--values FILE`, written atomically by the caller), never as
//! `--set` strings, whose escaping rules (commas, dots, brackets) would bend paths.
//!
//! To add a call: add a method to [`ClusterTools`] and implement it on [`RealClusterTools`] (and
//! in the MicroK8s simulator's `daemon/helm.rs`, which records and checks every call).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use rackseed_host::command::{Cmd, Output};

use super::{detail, refused_on_worker, Microk8sError};

/// Where a chart comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ChartSource {
    /// `NAME --repo URL --version V`: needs the repository to be reachable.
    Repo { url: String, name: String },
    /// A chart archive on this node (`longhorn-1.7.2.tgz`), staged in the image.
    Archive { path: PathBuf },
}

/// One `helm upgrade --install`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelmInstall {
    pub release: String,
    pub namespace: String,
    pub chart: ChartSource,
    /// The pinned chart version.
    pub version: String,
    /// The values file (YAML).
    pub values_file: PathBuf,
    /// `--wait --timeout`: how long the release's pods may take to become ready.
    pub wait: Duration,
}

impl HelmInstall {
    /// Everything after `microk8s`.
    pub fn argv(&self) -> Vec<String> {
        let mut v: Vec<String> = ["helm3", "upgrade", "--install", &self.release]
            .map(String::from)
            .to_vec();
        match &self.chart {
            ChartSource::Repo { url, name } => {
                v.push(name.clone());
                v.extend(["--repo".into(), url.clone()]);
            }
            ChartSource::Archive { path } => v.push(path.display().to_string()),
        }
        v.extend([
            "--version".into(),
            self.version.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--create-namespace".into(),
            "--values".into(),
            self.values_file.display().to_string(),
            "--wait".into(),
            "--timeout".into(),
            format!("{}s", self.wait.as_secs()),
        ]);
        v
    }
}

/// One row of `helm list -o json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelmRelease {
    pub name: String,
    pub namespace: String,
    /// `deployed`, `failed`, `pending-install`, …
    pub status: String,
    /// `<chart name>-<chart version>`.
    pub chart: String,
    #[serde(default)]
    pub app_version: String,
}

/// What firstboot asks of MicroK8s' helm and kubectl. Object safe.
pub trait ClusterTools: Send + Sync {
    /// `microk8s helm3 upgrade --install …` ([`HelmInstall::argv`]).
    fn helm_install<'a>(&'a self, req: &'a HelmInstall)
        -> BoxFuture<'a, Result<(), Microk8sError>>;
    /// `microk8s helm3 list --namespace NS -o json`.
    fn helm_list<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<HelmRelease>, Microk8sError>>;
    /// `microk8s kubectl apply -f FILE`.
    fn kubectl_apply<'a>(&'a self, file: &'a Path) -> BoxFuture<'a, Result<(), Microk8sError>>;
    /// `microk8s kubectl wait --for=condition=Established --timeout=Ns crd/NAME…`.
    fn kubectl_wait_crds<'a>(
        &'a self,
        crds: &'a [&'a str],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), Microk8sError>>;
    /// `microk8s kubectl get RESOURCE [-n NS] -o json`: the raw JSON list.
    fn kubectl_get_json<'a>(
        &'a self,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Microk8sError>>;
    /// `microk8s ctr image import FILE`: a container image archive into this node's containerd.
    fn ctr_image_import<'a>(
        &'a self,
        archive: &'a Path,
    ) -> BoxFuture<'a, Result<(), Microk8sError>>;
}

/// How long one `ctr image import` may take (Longhorn's images are about a gigabyte; a
/// Raspberry Pi's SD card writes a few MB/s).
pub const IMAGE_IMPORT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// [`ClusterTools`] through the `microk8s` CLI.
#[derive(Debug, Clone)]
pub struct RealClusterTools {
    /// The `microk8s` CLI.
    pub binary: PathBuf,
    /// Timeout of quick queries (list, get, apply).
    pub query_timeout: Duration,
}

impl RealClusterTools {
    pub fn new(binary: impl Into<PathBuf>, query_timeout: Duration) -> Self {
        RealClusterTools {
            binary: binary.into(),
            query_timeout,
        }
    }

    async fn run(&self, args: &[String], timeout: Duration) -> Result<Output, Microk8sError> {
        let out = Cmd::new(&self.binary, timeout).args(args).output().await?;
        let command = format!("microk8s {}", args[..args.len().min(3)].join(" "));
        if refused_on_worker(&out) {
            return Err(Microk8sError::WorkerNode { command });
        }
        if out.code() != Some(0) {
            return Err(Microk8sError::Failed {
                command,
                code: out.code(),
                detail: detail(&out),
            });
        }
        Ok(out)
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl ClusterTools for RealClusterTools {
    fn helm_install<'a>(
        &'a self,
        req: &'a HelmInstall,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            // Helm's own --timeout bounds the wait; ours leaves it a minute to report.
            self.run(&req.argv(), req.wait + Duration::from_secs(60))
                .await
                .map(|_| ())
        })
    }

    fn helm_list<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<HelmRelease>, Microk8sError>> {
        Box::pin(async move {
            let out = self
                .run(
                    &strings(&["helm3", "list", "--namespace", namespace, "-o", "json"]),
                    self.query_timeout,
                )
                .await?;
            parse_helm_list(&out.stdout).map_err(|e| Microk8sError::Failed {
                command: "microk8s helm3 list".into(),
                code: Some(0),
                detail: e,
            })
        })
    }

    fn kubectl_apply<'a>(&'a self, file: &'a Path) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let file = file.display().to_string();
            self.run(
                &strings(&["kubectl", "apply", "-f", &file]),
                self.query_timeout,
            )
            .await
            .map(|_| ())
        })
    }

    fn kubectl_wait_crds<'a>(
        &'a self,
        crds: &'a [&'a str],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let mut args = strings(&["kubectl", "wait", "--for=condition=Established"]);
            args.push(format!("--timeout={}s", timeout.as_secs()));
            args.extend(crds.iter().map(|c| format!("crd/{c}")));
            self.run(&args, timeout + self.query_timeout)
                .await
                .map(|_| ())
        })
    }

    fn kubectl_get_json<'a>(
        &'a self,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Microk8sError>> {
        Box::pin(async move {
            let mut args = strings(&["kubectl", "get", resource]);
            if let Some(ns) = namespace {
                args.extend(strings(&["-n", ns]));
            }
            args.extend(strings(&["-o", "json"]));
            Ok(self.run(&args, self.query_timeout).await?.stdout)
        })
    }

    fn ctr_image_import<'a>(
        &'a self,
        archive: &'a Path,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let file = archive.display().to_string();
            self.run(
                &strings(&["ctr", "image", "import", &file]),
                IMAGE_IMPORT_TIMEOUT,
            )
            .await
            .map(|_| ())
        })
    }
}

/// Parses `helm list -o json` (an array; helm prints `[]` when there is none).
pub fn parse_helm_list(text: &str) -> Result<Vec<HelmRelease>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(t).map_err(|e| format!("helm list output is not a release list: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_argv_pins_the_version_and_names_the_values_file() {
        let req = HelmInstall {
            release: "longhorn".into(),
            namespace: "longhorn-system".into(),
            chart: ChartSource::Archive {
                path: "/var/lib/rackseed/storage/longhorn-1.7.2.tgz".into(),
            },
            version: "1.7.2".into(),
            values_file: "/var/lib/rackseed/longhorn-values.yaml".into(),
            wait: Duration::from_secs(900),
        };
        assert_eq!(
            req.argv().join(" "),
            "helm3 upgrade --install longhorn /var/lib/rackseed/storage/longhorn-1.7.2.tgz \
             --version 1.7.2 --namespace longhorn-system --create-namespace --values \
             /var/lib/rackseed/longhorn-values.yaml --wait --timeout 900s"
        );
    }

    #[test]
    fn helm_list_parses_and_refuses_garbage() {
        let l = parse_helm_list(
            r#"[{"name":"longhorn","namespace":"longhorn-system","revision":"1","updated":"x","status":"deployed","chart":"longhorn-1.7.2","app_version":"v1.7.2"}]"#,
        )
        .unwrap();
        assert_eq!(l[0].status, "deployed");
        assert_eq!(l[0].chart, "longhorn-1.7.2");
        assert!(parse_helm_list("[]").unwrap().is_empty());
        assert!(parse_helm_list("Error: boom").is_err());
    }
}
