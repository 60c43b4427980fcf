//! `microk8s helm3` and the `microk8s kubectl` calls firstboot makes for Longhorn and CSI
//! snapshots: `helm3 upgrade --install`, `helm3 list`, `kubectl apply -f`, `kubectl wait
//! --for=condition=Established crd/…` and `kubectl get <resource> [-n NS] -o json`.
//!
//! **Every call is recorded** in `$STATE/cluster-tools.jsonl`, one JSON object per line:
//! `{tool, argv, code}` plus, for helm installs, `release`, `namespace`, `chart`, `version`,
//! `source` (`repo` or `archive`), `values` (the merged values files as JSON) and `unchecked`
//! (value paths the simulator does not know); for `apply`, the `objects` applied
//! (`kind/namespace/name`). [`read_calls`] reads it back for tests. The cluster objects live in
//! `$STATE/k8s.json` on the node that ran the command (not replicated to other nodes: a second
//! control-plane node does not see a release the first one installed).
//!
//! What is **checked**, and where the rule comes from:
//! - helm and kubectl on a worker print the wrappers' sentence and exit 0 (canonical/microk8s
//!   `microk8s-resources/wrappers/microk8s-helm3.wrapper` and `microk8s-kubectl.wrapper`;
//!   recorded with `worker: true`; `kubectl get nodes`, answered by `commands`, does not model
//!   this); without a
//!   Kubernetes API (no dqlite quorum) helm and kubectl fail as they do when the API is down.
//! - `upgrade --install`: a release name and a chart; only the flags firstboot uses (others
//!   are refused as `unknown flag`, as helm does for flags that do not exist, and strictly for
//!   real ones the simulator does not model); the namespace must exist unless
//!   `--create-namespace`; values files must exist and be YAML mappings.
//! - Longhorn's chart: from `--repo https://charts.longhorn.io` (name `longhorn`) with a version
//!   the repository has (a short list of real releases, [`LONGHORN_VERSIONS`]; helm fails "not
//!   found in … repository" for others), unreachable when `MICROK8S_SIM_OFFLINE=1` (the error
//!   helm prints without DNS); or a local archive whose file exists (its version is read from
//!   its name `longhorn-<version>.tgz`: the simulator cannot open a real chart). Only into
//!   `longhorn-system` (longhorn/longhorn `chart/README.md`: "install the Longhorn chart in the
//!   `longhorn-system` namespace only"). Value constraints from longhorn/longhorn
//!   `chart/questions.yaml`: `persistence.defaultClassReplicaCount` an integer 1-10,
//!   `persistence.defaultClass` a boolean, `persistence.defaultFsType` `ext4` or `xfs`,
//!   `persistence.reclaimPolicy` `Delete` or `Retain`,
//!   `defaultSettings.storageMinimalAvailablePercentage` 0-100, `csi.*ReplicaCount` 1-10; and
//!   `defaultSettings.defaultDataPath` / `csi.kubeletRootDir` absolute paths (Longhorn's manager
//!   refuses a relative data path; a wrong kubelet dir leaves its CSI driver unregistered).
//!   An install registers Longhorn's CRDs (`volumes.longhorn.io`, …) and its StorageClass.
//! - `kubectl apply -f FILE`: every document needs `apiVersion`, `kind`, `metadata.name`;
//!   built-in kinds must use their API group/version; a CRD needs a group, names, a scope and
//!   served versions with a structural `openAPIV3Schema` (type `object`); a custom object needs
//!   its CRD **Established** (a new CRD becomes Established [`ESTABLISH_DELAY`] after it is
//!   created, so applying a custom object right after its CRD fails with kubectl's "ensure CRDs
//!   are installed first") and must satisfy the schema's `type`, `required` and `enum`
//!   (recursively; `x-kubernetes-preserve-unknown-fields` allows anything); a namespaced object
//!   needs an existing namespace.
//! - `kubectl wait --for=condition=Established`: waits up to `--timeout` for each named CRD;
//!   an unknown CRD fails NotFound.
//!
//! - `--wait` with `MICROK8S_SIM_OFFLINE=1` (a node without registry access) and a chart
//!   archive: the chart's pods start only where their images are in containerd, so helm waits
//!   (polling, up to `MICROK8S_SIM_HELM_WAIT_MS`, default 200 ms, standing for `--timeout`)
//!   until every Ready node (alive in the view, workers included, each asked over its agent)
//!   holds every image the chart runs (`images::chart_images`: the archive's `values.yaml`
//!   merged with the release's values); otherwise it fails as helm does when `--wait` times
//!   out: `Error: context deadline exceeded` (`Error: UPGRADE FAILED: …` for an existing
//!   release), exit 1, the release recorded `failed` (its objects applied), and the call
//!   record names each stuck node's missing images under `image_pull_backoff` (what `kubectl
//!   get pods` would show as ImagePullBackOff). A chart archive whose images cannot be read
//!   then is refused with a simulator message.
//!
//! What it **cannot** check: the chart's templates and every value outside the list above
//! (recorded as `unchecked`), whether pods start for other reasons (online, `--wait` sleeps
//! `MICROK8S_SIM_HELM_WAIT_MS` and succeeds), the images of objects applied with `kubectl
//! apply` (the snapshot controller's Deployment is not waited for), RBAC semantics, and, except
//! offline with `--wait`, whether a real chart archive is valid. Volumes are not created by anything: tests put Longhorn
//! volumes in with `kubectl apply` (the simulator keeps their `status`, which the real API
//! server would ignore on apply).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Daemon, Out};
use crate::now_ms;

/// Longhorn chart versions the simulated repository has.
pub const LONGHORN_VERSIONS: [&str; 6] = ["1.6.0", "1.6.2", "1.7.0", "1.7.1", "1.7.2", "1.8.0"];
/// The chart repository Longhorn publishes.
pub const LONGHORN_REPO: &str = "https://charts.longhorn.io";
/// What the kubectl wrapper prints on a worker (exit 0;
/// `microk8s-resources/wrappers/microk8s-kubectl.wrapper`).
pub const KUBECTL_WORKER_MSG: &str = "This MicroK8s deployment is acting as a node in a cluster. Please use the microk8s.kubectl on the master.\n";
/// What the helm wrapper prints on a worker (exit 0).
pub const HELM_WORKER_MSG: &str = "This MicroK8s deployment is acting as a node in a cluster. Please use the microk8s helm on the master.\n";
/// How long a new CRD takes to become Established.
pub const ESTABLISH_DELAY: Duration = Duration::from_millis(300);

/// Serialises read-modify-write of `k8s.json` and the call log within the daemon.
pub(super) static STATE_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct K8s {
    namespaces: Vec<String>,
    /// By CRD name (`plural.group`).
    crds: BTreeMap<String, Crd>,
    /// By `kind/namespace/name` (namespace empty for cluster objects).
    objects: BTreeMap<String, Value>,
    /// By `namespace/name`.
    releases: BTreeMap<String, Release>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Crd {
    group: String,
    kind: String,
    plural: String,
    namespaced: bool,
    versions: Vec<String>,
    /// `openAPIV3Schema` of the storage version.
    schema: Value,
    established_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Release {
    name: String,
    namespace: String,
    chart: String,
    version: String,
    revision: u32,
    status: String,
}

fn k8s_path(d: &Daemon) -> PathBuf {
    d.env.state_dir.join("k8s.json")
}

/// The call log of a node's state folder.
pub fn calls_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cluster-tools.jsonl")
}

/// Every recorded helm/kubectl call of the node whose state folder is `state_dir`.
pub fn read_calls(state_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(calls_path(state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn load(d: &Daemon) -> K8s {
    let mut k: K8s = std::fs::read(k8s_path(d))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for ns in ["default", "kube-system", "kube-public"] {
        if !k.namespaces.iter().any(|n| n == ns) {
            k.namespaces.push(ns.into());
        }
    }
    k
}

fn store(d: &Daemon, k: &K8s) {
    if let Err(e) = super::write_json(&k8s_path(d), k) {
        eprintln!("microk8s-sim: {e:#}");
    }
}

fn record(d: &Daemon, mut rec: Value, argv: &[&str], out: &Out) {
    rec["argv"] = json!(argv);
    rec["code"] = json!(out.code);
    let path = calls_path(&d.env.state_dir);
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{rec}\n").as_bytes()));
    if let Err(e) = res {
        eprintln!("microk8s-sim: writing {}: {e}", path.display());
    }
}

/// Whether `kubectl ARGS` is one of the calls this module answers.
pub fn handles_kubectl(args: &[&str]) -> bool {
    matches!(args.first(), Some(&"apply") | Some(&"wait"))
        || (args.first() == Some(&"get")
            && !matches!(args.get(1), Some(&"nodes") | Some(&"node") | Some(&"no")))
}

fn api_down() -> Out {
    Out::err(
        1,
        "The connection to the server 127.0.0.1:16443 was refused - did you specify the right host or port?\n",
    )
}

impl Daemon {
    /// `microk8s helm3 …`.
    pub(super) async fn cmd_helm(&self, args: &[&str]) -> Out {
        let mut argv = vec!["helm3"];
        argv.extend_from_slice(args);
        {
            let st = self.lock();
            if st.worker {
                let out = Out::ok(HELM_WORKER_MSG);
                record(self, json!({"tool": "helm", "worker": true}), &argv, &out);
                return out;
            }
            if !st.view.quorum(&self.alive()) {
                let out = Out::err(1, "Error: Kubernetes cluster unreachable: Get \"https://127.0.0.1:16443/version\": dial tcp 127.0.0.1:16443: connect: connection refused\n");
                record(self, json!({"tool": "helm"}), &argv, &out);
                return out;
            }
        }
        let (out, rec) = match args {
            ["upgrade", rest @ ..] => self.helm_upgrade(rest).await,
            ["list" | "ls", rest @ ..] => (self.helm_list(rest), json!({})),
            [other, ..] => (
                Out::err(
                    1,
                    format!("Error: unknown command \"{other}\" for \"helm\" (not simulated)\n"),
                ),
                json!({}),
            ),
            [] => (
                Out::err(1, "Error: a helm command is required\n"),
                json!({}),
            ),
        };
        let mut rec = rec;
        rec["tool"] = json!("helm");
        record(self, rec, &argv, &out);
        out
    }

    async fn helm_upgrade(&self, args: &[&str]) -> (Out, Value) {
        let mut rec = json!({});
        let mut positional = Vec::new();
        let mut version = None;
        let mut namespace = "default".to_owned();
        let mut create_ns = false;
        let mut values_files = Vec::new();
        let mut repo = None;
        let mut install = false;
        let mut wait = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (*a, None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next().map(|v| v.to_string()))
                    .ok_or_else(|| format!("Error: flag needs an argument: {name}\n"))
            };
            let r = match flag {
                "--install" | "-i" => {
                    install = true;
                    Ok(())
                }
                "--create-namespace" => {
                    create_ns = true;
                    Ok(())
                }
                "--wait" => {
                    wait = true;
                    Ok(())
                }
                "--version" => value(flag).map(|v| version = Some(v)),
                "--namespace" | "-n" => value(flag).map(|v| namespace = v),
                "--values" | "-f" => value(flag).map(|v| values_files.push(v)),
                "--repo" => value(flag).map(|v| repo = Some(v)),
                "--timeout" => value(flag).and_then(|v| {
                    parse_go_duration(&v)
                        .map(|_| ())
                        .ok_or_else(|| format!("Error: invalid argument \"{v}\" for \"--timeout\" flag: time: invalid duration \"{v}\"\n"))
                }),
                f if f.starts_with('-') => Err(format!("Error: unknown flag: {f}\n")),
                p => {
                    positional.push(p.to_owned());
                    Ok(())
                }
            };
            if let Err(e) = r {
                return (Out::err(1, e), rec);
            }
        }
        let [release, chart] = positional.as_slice() else {
            return (
                Out::err(
                    1,
                    format!(
                        "Error: \"helm upgrade\" requires 2 arguments\n\nUsage:  helm upgrade [RELEASE] [CHART] [flags]\n(got {})\n",
                        positional.len()
                    ),
                ),
                rec,
            );
        };
        rec["release"] = json!(release);
        rec["namespace"] = json!(namespace);
        // The chart.
        let (source, chart_version) = if let Some(url) = &repo {
            if std::env::var("MICROK8S_SIM_OFFLINE").as_deref() == Ok("1") {
                let host = url.split("//").nth(1).unwrap_or(url).trim_end_matches('/');
                return (Out::err(1, format!("Error: looks like \"{url}\" is not a valid chart repository or cannot be reached: Get \"{url}/index.yaml\": dial tcp: lookup {host}: no such host\n")), rec);
            }
            if url.trim_end_matches('/') != LONGHORN_REPO || chart != "longhorn" {
                return (
                    Out::err(
                        1,
                        format!("Error: chart \"{chart}\" not found in {url} repository\n"),
                    ),
                    rec,
                );
            }
            let Some(v) = version.clone() else {
                return (Out::err(1, "microk8s simulator: a repository chart without --version would take the latest; pin it\n"), rec);
            };
            if !LONGHORN_VERSIONS.contains(&v.as_str()) {
                return (
                    Out::err(
                        1,
                        format!("Error: chart \"longhorn\" version \"{v}\" not found in {url} repository\n"),
                    ),
                    rec,
                );
            }
            ("repo", v)
        } else {
            let path = Path::new(chart.as_str());
            if !path.is_absolute() {
                return (Out::err(1, format!("Error: repo {chart} not found (the simulator takes local charts by absolute path only)\n")), rec);
            }
            if !path.is_file() {
                return (
                    Out::err(1, format!("Error: path \"{chart}\" not found\n")),
                    rec,
                );
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(v) = name
                .strip_prefix("longhorn-")
                .and_then(|n| n.strip_suffix(".tgz"))
            else {
                return (Out::err(1, format!("microk8s simulator: only longhorn-<version>.tgz archives are simulated, got {name}\n")), rec);
            };
            ("archive", v.to_owned())
        };
        rec["chart"] = json!("longhorn");
        rec["source"] = json!(source);
        rec["version"] = json!(chart_version);
        if namespace != "longhorn-system" {
            return (Out::err(1, format!("microk8s simulator: the longhorn chart must be installed in longhorn-system (its README), not {namespace}\n")), rec);
        }
        if !install && !self.release_exists(&namespace, release) {
            return (
                Out::err(
                    1,
                    format!("Error: UPGRADE FAILED: \"{release}\" has no deployed releases\n"),
                ),
                rec,
            );
        }
        // Values.
        let mut values = json!({});
        for f in &values_files {
            let text = match std::fs::read_to_string(f) {
                Ok(t) => t,
                Err(e) => return (Out::err(1, format!("Error: open {f}: {e}\n")), rec),
            };
            let v: Value = match serde_yaml::from_str::<serde_yaml::Value>(&text)
                .map_err(|e| e.to_string())
                .and_then(|y| serde_json::to_value(y).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => {
                    return (
                        Out::err(1, format!("Error: failed to parse {f}: {e}\n")),
                        rec,
                    )
                }
            };
            if !(v.is_object() || v.is_null()) {
                return (Out::err(1, format!("Error: failed to parse {f}: error unmarshaling JSON: json: cannot unmarshal into Go value of type map[string]interface {{}}\n")), rec);
            }
            merge(&mut values, &v);
        }
        rec["values"] = values.clone();
        let mut unchecked = Vec::new();
        if let Err(e) = check_longhorn_values(&values, "", &mut unchecked) {
            return (
                Out::err(
                    1,
                    format!(
                        "Error: values don't meet the specifications of the longhorn chart: {e}\n"
                    ),
                ),
                rec,
            );
        }
        rec["unchecked"] = json!(unchecked);
        // Offline, the pods start only on nodes that imported every image the chart runs.
        let offline = std::env::var("MICROK8S_SIM_OFFLINE").as_deref() == Ok("1");
        let needed = if offline && wait && source == "archive" {
            match super::images::chart_images(Path::new(chart.as_str()), &values) {
                Ok(n) => Some(n),
                Err(e) => return (Out::err(1, format!("microk8s simulator: cannot read the images of chart {chart} (with MICROK8S_SIM_OFFLINE=1 they must have been imported): {e}\n")), rec),
            }
        } else {
            None
        };
        let mut timed_out = false;
        if wait {
            let ms = std::env::var("MICROK8S_SIM_HELM_WAIT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            let deadline = std::time::Instant::now() + Duration::from_millis(ms);
            match &needed {
                None => tokio::time::sleep(Duration::from_millis(ms)).await,
                Some(needed) => loop {
                    let stuck: BTreeMap<String, Vec<String>> = self
                        .ready_nodes_images()
                        .await
                        .into_iter()
                        .filter_map(|(node, have)| {
                            let lack: Vec<String> = needed
                                .iter()
                                .filter(|i| !have.as_ref().is_some_and(|h| h.contains(*i)))
                                .cloned()
                                .collect();
                            (!lack.is_empty()).then_some((node, lack))
                        })
                        .collect();
                    if stuck.is_empty() {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        // What `kubectl get pods` would show: ImagePullBackOff on these nodes.
                        rec["image_pull_backoff"] = json!(stuck);
                        timed_out = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                },
            }
        }
        let _g = STATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut k = load(self);
        if !k.namespaces.contains(&namespace) {
            if !create_ns {
                return (
                    Out::err(1, format!("Error: create: failed to create: namespaces \"{namespace}\" not found\n")),
                    rec,
                );
            }
            k.namespaces.push(namespace.clone());
        }
        let key = format!("{namespace}/{release}");
        let first = !k.releases.contains_key(&key);
        let revision = k.releases.get(&key).map_or(1, |r| r.revision + 1);
        k.releases.insert(
            key,
            Release {
                name: release.clone(),
                namespace: namespace.clone(),
                chart: "longhorn".into(),
                version: chart_version.clone(),
                revision,
                status: if timed_out { "failed" } else { "deployed" }.into(),
            },
        );
        register_longhorn(&mut k, &values);
        store(self, &k);
        let mut stdout = String::new();
        if first {
            stdout.push_str(&format!(
                "Release \"{release}\" does not exist. Installing it now.\n"
            ));
        }
        if timed_out {
            // helm's --wait polls until its context's deadline; a first install returns the
            // bare error, an upgrade wraps it (helm cmd/helm/upgrade.go, pkg/kube/wait.go).
            let err = if first {
                "Error: context deadline exceeded\n"
            } else {
                "Error: UPGRADE FAILED: context deadline exceeded\n"
            };
            return (
                Out {
                    code: 1,
                    stdout,
                    stderr: err.into(),
                },
                rec,
            );
        }
        if !first {
            stdout.push_str(&format!(
                "Release \"{release}\" has been upgraded. Happy Helming!\n"
            ));
        }
        stdout.push_str(&format!(
            "NAME: {release}\nNAMESPACE: {namespace}\nSTATUS: deployed\nREVISION: {revision}\n"
        ));
        (Out::ok(stdout), rec)
    }

    fn release_exists(&self, namespace: &str, release: &str) -> bool {
        load(self)
            .releases
            .contains_key(&format!("{namespace}/{release}"))
    }

    fn helm_list(&self, args: &[&str]) -> Out {
        let mut ns = "default".to_owned();
        let mut json_out = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "-n" | "--namespace" => match it.next() {
                    Some(n) => ns = n.to_string(),
                    None => return Out::err(1, format!("Error: flag needs an argument: {a}\n")),
                },
                "-o" | "--output" => match it.next() {
                    Some(&"json") => json_out = true,
                    Some(other) => {
                        return Out::err(
                            1,
                            format!("microk8s simulator: output {other} is not simulated\n"),
                        )
                    }
                    None => return Out::err(1, format!("Error: flag needs an argument: {a}\n")),
                },
                other => return Out::err(1, format!("Error: unknown flag: {other}\n")),
            }
        }
        let k = load(self);
        let rows: Vec<Value> = k
            .releases
            .values()
            .filter(|r| r.namespace == ns)
            .map(|r| {
                json!({
                    "name": r.name, "namespace": r.namespace,
                    "revision": r.revision.to_string(), "updated": "",
                    "status": r.status,
                    "chart": format!("{}-{}", r.chart, r.version),
                    "app_version": format!("v{}", r.version),
                })
            })
            .collect();
        if json_out {
            Out::ok(format!("{}\n", Value::Array(rows)))
        } else {
            let mut s = String::from("NAME\tNAMESPACE\tREVISION\tSTATUS\tCHART\n");
            for r in rows {
                s.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    r["name"].as_str().unwrap_or(""),
                    r["namespace"].as_str().unwrap_or(""),
                    r["revision"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["chart"].as_str().unwrap_or("")
                ));
            }
            Out::ok(s)
        }
    }

    /// The `microk8s kubectl` calls [`handles_kubectl`] accepts.
    pub(super) async fn cmd_kubectl_tools(&self, args: &[&str]) -> Out {
        let mut argv = vec!["kubectl"];
        argv.extend_from_slice(args);
        let (worker, up) = {
            let st = self.lock();
            (st.worker, st.view.quorum(&self.alive()))
        };
        let (out, rec) = if worker {
            (Out::ok(KUBECTL_WORKER_MSG), json!({"worker": true}))
        } else if !up {
            (api_down(), json!({}))
        } else {
            match args {
                ["apply", "-f", file] => self.kubectl_apply(file),
                ["wait", rest @ ..] => (self.kubectl_wait(rest).await, json!({})),
                ["get", resource, rest @ ..] => (self.kubectl_get(resource, rest), json!({})),
                _ => (
                    Out::err(
                        1,
                        format!(
                            "microk8s simulator: unsupported kubectl command: {}\n",
                            args.join(" ")
                        ),
                    ),
                    json!({}),
                ),
            }
        };
        let mut rec = rec;
        rec["tool"] = json!("kubectl");
        record(self, rec, &argv, &out);
        out
    }

    fn kubectl_apply(&self, file: &str) -> (Out, Value) {
        let mut rec = json!({"file": file});
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(_) => {
                return (
                    Out::err(1, format!("error: the path \"{file}\" does not exist\n")),
                    rec,
                )
            }
        };
        let mut docs = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&text) {
            match serde_yaml::Value::deserialize(d)
                .map_err(|e| e.to_string())
                .and_then(|y| serde_json::to_value(y).map_err(|e| e.to_string()))
            {
                Ok(Value::Null) => {}
                Ok(v) => docs.push(v),
                Err(e) => {
                    return (
                        Out::err(1, format!("error: error parsing {file}: {e}\n")),
                        rec,
                    )
                }
            }
        }
        if docs.is_empty() {
            return (Out::err(1, "error: no objects passed to apply\n"), rec);
        }
        let _g = STATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut k = load(self);
        let mut stdout = String::new();
        let mut applied = Vec::new();
        let mut errors = String::new();
        for doc in docs {
            match apply_one(&mut k, &doc, file) {
                Ok((key, line)) => {
                    stdout.push_str(&line);
                    applied.push(key);
                }
                Err(e) => errors.push_str(&e),
            }
        }
        store(self, &k);
        rec["objects"] = json!(applied);
        if errors.is_empty() {
            (Out::ok(stdout), rec)
        } else {
            (
                Out {
                    code: 1,
                    stdout,
                    stderr: errors,
                },
                rec,
            )
        }
    }

    async fn kubectl_wait(&self, args: &[&str]) -> Out {
        let mut timeout = Duration::from_secs(30);
        let mut crds = Vec::new();
        for a in args {
            if let Some(t) = a.strip_prefix("--timeout=") {
                match parse_go_duration(t) {
                    Some(d) => timeout = d,
                    None => {
                        return Out::err(
                            1,
                            format!("error: invalid argument \"{t}\" for \"--timeout\" flag\n"),
                        )
                    }
                }
            } else if *a == "--for=condition=Established" {
            } else if let Some(n) = a.strip_prefix("crd/") {
                crds.push(n.to_owned());
            } else {
                return Out::err(
                    1,
                    format!("microk8s simulator: unsupported kubectl wait argument {a}\n"),
                );
            }
        }
        if !args.contains(&"--for=condition=Established") || crds.is_empty() {
            return Out::err(
                1,
                "microk8s simulator: only `kubectl wait --for=condition=Established crd/NAME…` is simulated\n",
            );
        }
        let deadline = now_ms() + timeout.as_millis() as u64;
        let mut stdout = String::new();
        for name in crds {
            loop {
                let at = load(self).crds.get(&name).map(|c| c.established_at_ms);
                match at {
                    None => return Out::err(1, format!("Error from server (NotFound): customresourcedefinitions.apiextensions.k8s.io \"{name}\" not found\n")),
                    Some(t) if t <= now_ms() => break,
                    Some(_) if now_ms() >= deadline => {
                        return Out::err(1, format!("error: timed out waiting for the condition on customresourcedefinitions/{name}\n"))
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            stdout.push_str(&format!(
                "customresourcedefinition.apiextensions.k8s.io/{name} condition met\n"
            ));
        }
        Out::ok(stdout)
    }

    fn kubectl_get(&self, resource: &str, rest: &[&str]) -> Out {
        let mut ns: Option<String> = None;
        let mut json_out = false;
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            match *a {
                "-n" | "--namespace" => ns = it.next().map(|s| s.to_string()),
                "-o" => json_out = it.next() == Some(&"json"),
                other => {
                    return Out::err(
                        1,
                        format!("microk8s simulator: unsupported kubectl get argument {other}\n"),
                    )
                }
            }
        }
        if !json_out {
            return Out::err(
                1,
                "microk8s simulator: only `kubectl get RESOURCE -o json` is simulated here\n",
            );
        }
        let k = load(self);
        let Some(crd) = k
            .crds
            .values()
            .find(|c| resource == format!("{}.{}", c.plural, c.group) || resource == c.plural)
        else {
            let short = resource.split('.').next().unwrap_or(resource);
            return Out::err(
                1,
                format!("error: the server doesn't have a resource type \"{short}\"\n"),
            );
        };
        let ns = ns.unwrap_or_else(|| "default".into());
        let items: Vec<Value> = k
            .objects
            .iter()
            .filter(|(key, _)| {
                let mut p = key.splitn(3, '/');
                p.next() == Some(crd.kind.as_str())
                    && (!crd.namespaced || p.next() == Some(ns.as_str()))
            })
            .map(|(_, v)| v.clone())
            .collect();
        Out::ok(format!(
            "{}\n",
            json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}})
        ))
    }
}

/// Built-in kinds firstboot applies: (kind, apiVersion, namespaced).
const BUILTIN: [(&str, &str, bool); 8] = [
    ("Namespace", "v1", false),
    ("ServiceAccount", "v1", true),
    ("ClusterRole", "rbac.authorization.k8s.io/v1", false),
    ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1", false),
    ("Role", "rbac.authorization.k8s.io/v1", true),
    ("RoleBinding", "rbac.authorization.k8s.io/v1", true),
    ("Deployment", "apps/v1", true),
    ("StorageClass", "storage.k8s.io/v1", false),
];

/// Applies one document; returns its key and kubectl's output line, or kubectl's error.
fn apply_one(k: &mut K8s, doc: &Value, file: &str) -> Result<(String, String), String> {
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    let name = doc["metadata"]["name"].as_str().unwrap_or("");
    if api.is_empty() || kind.is_empty() {
        return Err(format!(
            "error: error validating \"{file}\": error validating data: [apiVersion not set, kind not set]\n"
        ));
    }
    if name.is_empty() {
        return Err(format!(
            "error: error when retrieving current configuration of {kind} from {file}: resource name may not be empty\n"
        ));
    }
    let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
    let lower = kind.to_lowercase();
    let (namespaced, resource, schema) = if kind == "CustomResourceDefinition"
        && api == "apiextensions.k8s.io/v1"
    {
        check_crd(doc)
            .map_err(|e| format!("The CustomResourceDefinition \"{name}\" is invalid: {e}\n"))?;
        (
            false,
            "customresourcedefinition.apiextensions.k8s.io".to_owned(),
            None,
        )
    } else if let Some((_, want, ns)) = BUILTIN.iter().find(|(k, _, _)| *k == kind) {
        if *want != api {
            return Err(format!("error: resource mapping not found for name: \"{name}\" namespace: \"\" from \"{file}\": no matches for kind \"{kind}\" in version \"{api}\"\nensure CRDs are installed first\n"));
        }
        let res = if group.is_empty() {
            lower.clone()
        } else {
            format!("{lower}.{}", group)
        };
        (*ns, res, None)
    } else {
        let crd = k.crds.values().find(|c| {
            c.group == group && c.kind == kind && c.versions.iter().any(|v| v == version)
        });
        match crd {
            Some(c) if c.established_at_ms <= now_ms() => {
                (c.namespaced, format!("{lower}.{}", c.group), Some(c.schema.clone()))
            }
            _ => {
                return Err(format!("error: resource mapping not found for name: \"{name}\" namespace: \"\" from \"{file}\": no matches for kind \"{kind}\" in version \"{api}\"\nensure CRDs are installed first\n"))
            }
        }
    };
    let ns = if namespaced {
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
        if !k.namespaces.iter().any(|n| n == ns) {
            return Err(format!(
                "Error from server (NotFound): error when creating \"{file}\": namespaces \"{ns}\" not found\n"
            ));
        }
        ns.to_owned()
    } else {
        String::new()
    };
    if let Some(schema) = schema {
        validate(&schema, doc, "")
            .map_err(|e| format!("The {kind} \"{name}\" is invalid: {e}\n"))?;
    }
    if kind == "CustomResourceDefinition" {
        register_crd(k, doc, now_ms() + ESTABLISH_DELAY.as_millis() as u64);
    }
    if kind == "Namespace" && !k.namespaces.iter().any(|n| n == name) {
        k.namespaces.push(name.to_owned());
    }
    let key = format!("{kind}/{ns}/{name}");
    let verb = match k.objects.get(&key) {
        None => "created",
        Some(old) if old == doc => "unchanged",
        Some(_) => "configured",
    };
    k.objects.insert(key.clone(), doc.clone());
    Ok((key, format!("{resource}/{name} {verb}\n")))
}

fn check_crd(doc: &Value) -> Result<(), String> {
    let spec = &doc["spec"];
    let group = spec["group"].as_str().unwrap_or("");
    let plural = spec["names"]["plural"].as_str().unwrap_or("");
    if group.is_empty() {
        return Err("spec.group: Required value".into());
    }
    if plural.is_empty() || spec["names"]["kind"].as_str().unwrap_or("").is_empty() {
        return Err("spec.names.plural, spec.names.kind: Required value".into());
    }
    let name = doc["metadata"]["name"].as_str().unwrap_or("");
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    if !matches!(spec["scope"].as_str(), Some("Namespaced" | "Cluster")) {
        return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into());
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .into(),
        );
    }
    if versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count()
        != 1
    {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .into(),
        );
    }
    for (i, v) in versions.iter().enumerate() {
        if v["schema"]["openAPIV3Schema"]["type"] != json!("object") {
            return Err(format!(
                "spec.versions[{i}].schema.openAPIV3Schema.type: Required value: must be object"
            ));
        }
    }
    Ok(())
}

fn register_crd(k: &mut K8s, doc: &Value, established_at_ms: u64) {
    let spec = &doc["spec"];
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let storage = versions
        .iter()
        .find(|v| v["storage"] == json!(true))
        .cloned()
        .unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let keep = k.crds.get(&name).map(|c| c.established_at_ms);
    k.crds.insert(
        name,
        Crd {
            group: spec["group"].as_str().unwrap_or("").into(),
            kind: spec["names"]["kind"].as_str().unwrap_or("").into(),
            plural: spec["names"]["plural"].as_str().unwrap_or("").into(),
            namespaced: spec["scope"] == json!("Namespaced"),
            versions: versions
                .iter()
                .filter(|v| v["served"] == json!(true))
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect(),
            schema: storage["schema"]["openAPIV3Schema"].clone(),
            established_at_ms: keep.unwrap_or(established_at_ms),
        },
    );
}

/// What Longhorn's chart creates that firstboot reads: its CRDs (no schema checks on them
/// here) and its default StorageClass.
fn register_longhorn(k: &mut K8s, values: &Value) {
    for (plural, kind) in [
        ("volumes", "Volume"),
        ("replicas", "Replica"),
        ("engines", "Engine"),
        ("nodes", "Node"),
        ("settings", "Setting"),
    ] {
        let name = format!("{plural}.longhorn.io");
        k.crds.entry(name).or_insert(Crd {
            group: "longhorn.io".into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced: true,
            versions: vec!["v1beta2".into()],
            schema: json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            established_at_ms: 0,
        });
    }
    let default = values["persistence"]["defaultClass"] != json!(false);
    let replicas = values["persistence"]["defaultClassReplicaCount"]
        .as_u64()
        .unwrap_or(3);
    k.objects.insert(
        "StorageClass//longhorn".into(),
        json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "longhorn", "annotations": {
                "storageclass.kubernetes.io/is-default-class": default.to_string()}},
            "provisioner": "driver.longhorn.io",
            "parameters": {"numberOfReplicas": replicas.to_string()},
        }),
    );
}

/// Checks `v` against a structural schema: `type`, `required`, `enum`, `properties`,
/// `additionalProperties`, `items`; `x-kubernetes-preserve-unknown-fields` accepts anything
/// below. Errors name the field path as the API server does.
fn validate(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let at = |p: &str| {
        if p.is_empty() {
            "<root>".to_owned()
        } else {
            p.to_owned()
        }
    };
    if schema["x-kubernetes-preserve-unknown-fields"] == json!(true)
        && schema.get("properties").is_none()
    {
        return Ok(());
    }
    let ok_type = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some("array") => v.is_array(),
        _ => true,
    };
    if !ok_type {
        return Err(format!(
            "{}: Invalid value: {v}: {} must be of type {}",
            at(path),
            at(path),
            schema["type"].as_str().unwrap_or("?")
        ));
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!(
                "{}: Unsupported value: {v}: supported values: {}",
                at(path),
                e.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap_or("");
            if !obj.contains_key(r) {
                return Err(format!("{}: Required value", join(path, r)));
            }
        }
        for (key, val) in obj {
            if let Some(s) = schema["properties"].get(key) {
                validate(s, val, &join(path, key))?;
            } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                validate(s, val, &join(path, key))?;
            }
        }
    }
    if let (Some(items), Some(s)) = (v.as_array(), schema.get("items")) {
        for (i, it) in items.iter().enumerate() {
            validate(s, it, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Deep merge of helm values files (later files win).
pub(super) fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The Longhorn values the simulator checks (see the module docs); other leaf paths go into
/// `unchecked`.
fn check_longhorn_values(v: &Value, path: &str, unchecked: &mut Vec<String>) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Ok(());
    };
    for (key, val) in obj {
        let p = join(path, key);
        let int_in = |lo: i64, hi: i64| match val.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(()),
            _ => Err(format!(
                "{p}: must be an integer from {lo} to {hi}, got {val}"
            )),
        };
        let abs_path = || match val.as_str() {
            Some(s) if s.starts_with('/') && !s.split('/').any(|c| c == "..") => Ok(()),
            _ => Err(format!("{p}: must be an absolute path, got {val}")),
        };
        match p.as_str() {
            "persistence.defaultClassReplicaCount" => int_in(1, 10)?,
            "persistence.defaultClass" if !val.is_boolean() => {
                return Err(format!("{p}: must be a boolean, got {val}"))
            }
            "persistence.defaultClass" => {}
            "persistence.defaultFsType" if !matches!(val.as_str(), Some("ext4" | "xfs")) => {
                return Err(format!("{p}: must be ext4 or xfs, got {val}"))
            }
            "persistence.reclaimPolicy" if !matches!(val.as_str(), Some("Delete" | "Retain")) => {
                return Err(format!("{p}: must be Delete or Retain, got {val}"))
            }
            "persistence.defaultFsType" | "persistence.reclaimPolicy" => {}
            "defaultSettings.storageMinimalAvailablePercentage" => int_in(0, 100)?,
            "defaultSettings.defaultDataPath" | "csi.kubeletRootDir" => abs_path()?,
            "csi.attacherReplicaCount"
            | "csi.provisionerReplicaCount"
            | "csi.resizerReplicaCount"
            | "csi.snapshotterReplicaCount" => int_in(1, 10)?,
            _ if val.is_object() => check_longhorn_values(val, &p, unchecked)?,
            _ => unchecked.push(p),
        }
    }
    Ok(())
}

/// A Go duration as helm and kubectl take it: `900s`, `15m`, `1h30m`, `500ms`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..n_end].parse().ok()?;
        let after = &rest[n_end..];
        let (unit, len) = ["ms", "h", "m", "s"]
            .iter()
            .find(|u| after.starts_with(**u))
            .map(|u| (*u, u.len()))?;
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            _ => Duration::from_secs(n * 3600),
        };
        rest = &after[len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("900s"), Some(Duration::from_secs(900)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn longhorn_values_are_checked_and_unknown_ones_listed() {
        let mut u = Vec::new();
        let ok = json!({"persistence": {"defaultClass": true, "defaultClassReplicaCount": 3},
                        "defaultSettings": {"defaultDataPath": "/srv/l", "other": 1}});
        check_longhorn_values(&ok, "", &mut u).unwrap();
        assert_eq!(u, ["defaultSettings.other"]);
        for bad in [
            json!({"persistence": {"defaultClassReplicaCount": 11}}),
            json!({"persistence": {"defaultClassReplicaCount": 0}}),
            json!({"persistence": {"defaultClass": "yes"}}),
            json!({"defaultSettings": {"defaultDataPath": "var/lib"}}),
            json!({"csi": {"kubeletRootDir": "/a/../b"}}),
        ] {
            assert!(check_longhorn_values(&bad, "", &mut u).is_err(), "{bad}");
        }
    }

    #[test]
    fn schemas_check_types_required_and_enums() {
        let s = json!({"type": "object", "required": ["driver"], "properties": {
            "driver": {"type": "string"},
            "deletionPolicy": {"type": "string", "enum": ["Delete", "Retain"]},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}});
        validate(&s, &json!({"driver": "d", "status": {"x": [1]}}), "").unwrap();
        assert!(validate(&s, &json!({}), "")
            .unwrap_err()
            .contains("driver: Required"));
        assert!(validate(&s, &json!({"driver": 1}), "").is_err());
        assert!(
            validate(&s, &json!({"driver": "d", "deletionPolicy": "Keep"}), "")
                .unwrap_err()
                .contains("Unsupported value")
        );
    }
}
