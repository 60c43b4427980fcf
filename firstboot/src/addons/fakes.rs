//! Behaving fakes for the addon module's host interfaces, for tests here and in the driver.
//!
//! - [`FakeProber`]: a LAN where a given set of addresses answers ARP; records what was probed.
//! - [`FakeKernel`]: a kernel whose state is a fake root directory: `sysctl vm.nr_hugepages`
//!   updates `proc/meminfo` (up to an optional limit, to act out fragmented memory), `modprobe`
//!   succeeds only for modules in `modules.dep` and then lists them in `proc/modules`.
//!   systemd: a unit starts only when its unit file is installed (`lib/systemd/system/`) and it
//!   is not made to fail ([`FakeKernel::with_failing_unit`]); active units are marked in
//!   `run/fake-systemd/`. `dpkg -i` installs a staged file named `NAME_VERSION_ARCH.deb` into
//!   `var/lib/dpkg/status` with the files [`package_files`] lists, and fails like dpkg for a
//!   file whose content is not a package (anything but `fake-deb`). Free space is a set figure
//!   (100 GiB unless [`FakeKernel::with_free_space`]).
//! - [`FakeRoot`]: writes such a root directory (kernel release, modules, meminfo, cgroups,
//!   dpkg status).
//! - [`FakeClusterTools`]: MicroK8s' helm and kubectl as seen by the Longhorn install: records
//!   every call (argv after `microk8s`), refuses `kubectl apply` of a missing or non-YAML file,
//!   `kubectl wait` for CRDs it was never given, and a helm install whose values file is
//!   missing; an installed release is then listed as `deployed`.
//! - [`FakeImages`]: the container images on the nodes of a fake cluster (what each node's
//!   `microk8s ctr image import` put into its containerd) and whether the cluster reaches
//!   image registries. `ctr image import` reads the archive like containerd's importer, with
//!   the workspace's one reader ([`rackseed_host::image_archive::archive_image_names`]: a
//!   Docker `manifest.json` with `RepoTags`, names normalised to `docker.io/...`, or an OCI
//!   layout named by its annotations) and fails with ctr's message for a file it refuses
//!   ([`write_image_archive`] writes a real Docker archive). On an offline
//!   cluster a helm install with `--wait` fails as helm does when pods cannot pull their
//!   images (`Error: context deadline exceeded`, the release left `failed`) unless every
//!   image the chart needs was imported on every Ready node.
//! - [`FakeReports`]: the other members' status documents (JSON, as the coordinator serves
//!   them), changeable while a test runs; a document can be made unreadable.
//!
//! To fake another kernel effect, extend [`FakeKernel`] so it changes the same files the real
//! kernel would.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context};
use rackseed_host::image_archive::{archive_image_names, normalize_ref};

use futures_util::future::BoxFuture;

use super::autorange::{AddressProber, ProbeError};
use super::longhorn::{verdict_from_doc, MemberReports, MemberVerdict, Verdict};
use super::prep::{module_name, KernelControl};
use crate::system::microk8s::helm::{ClusterTools, HelmInstall, HelmRelease};
use crate::system::microk8s::Microk8sError;

/// A LAN in which `in_use` addresses answer ARP.
#[derive(Debug, Default)]
pub struct FakeProber {
    in_use: HashSet<Ipv4Addr>,
    failing: HashSet<Ipv4Addr>,
    probed: Mutex<Vec<Ipv4Addr>>,
}

impl FakeProber {
    pub fn with_in_use(addrs: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        FakeProber {
            in_use: addrs.into_iter().collect(),
            ..Default::default()
        }
    }

    /// Probing `addr` fails (as `arping` would on a broken interface).
    pub fn failing_on(mut self, addr: Ipv4Addr) -> Self {
        self.failing.insert(addr);
        self
    }

    /// Every address probed so far, in order.
    pub fn probed(&self) -> Vec<Ipv4Addr> {
        self.probed.lock().expect("probe log lock").clone()
    }
}

impl AddressProber for FakeProber {
    async fn in_use(&self, addr: Ipv4Addr) -> Result<bool, ProbeError> {
        self.probed.lock().expect("probe log lock").push(addr);
        if self.failing.contains(&addr) {
            return Err(ProbeError::Other {
                addr,
                reason: "fake probe failure".into(),
            });
        }
        Ok(self.in_use.contains(&addr))
    }
}

/// A kernel whose state lives in a fake root (see the module docs).
#[derive(Debug)]
pub struct FakeKernel {
    root: PathBuf,
    /// At most this many hugepages can be reserved at run time.
    hugepages_limit: Option<u64>,
    failing_units: Vec<String>,
    free_bytes: u64,
    calls: Mutex<Vec<String>>,
}

/// What a fake package puts on the root: binaries and systemd units.
pub fn package_files(pkg: &str) -> &'static [&'static str] {
    match pkg {
        "open-iscsi" => &["usr/sbin/iscsiadm", "lib/systemd/system/iscsid.service"],
        "nfs-common" => &["usr/sbin/mount.nfs"],
        "lvm2" => &["usr/sbin/lvm"],
        "keepalived" => &[
            "usr/sbin/keepalived",
            "lib/systemd/system/keepalived.service",
        ],
        "curl" => &["usr/bin/curl"],
        "iputils-arping" => &["usr/bin/arping"],
        "multipath-tools" => &[
            "usr/sbin/multipathd",
            "lib/systemd/system/multipathd.service",
        ],
        _ => &[],
    }
}

/// The content of a staged fake `.deb` that `dpkg -i` accepts.
pub const FAKE_DEB: &[u8] = b"fake-deb";

fn install_package(root: &Path, pkg: &str) -> anyhow::Result<()> {
    for f in package_files(pkg) {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().expect("package files have parents"))?;
        std::fs::write(&p, "")?;
    }
    let status = root.join("var/lib/dpkg/status");
    std::fs::create_dir_all(status.parent().expect("has a parent"))?;
    let mut text = std::fs::read_to_string(&status).unwrap_or_default();
    text.push_str(&format!(
        "Package: {pkg}\nStatus: install ok installed\nVersion: 1.0\n\n"
    ));
    std::fs::write(&status, text)?;
    Ok(())
}

impl FakeKernel {
    pub fn new(root: &Path) -> Self {
        FakeKernel {
            root: root.to_owned(),
            hugepages_limit: None,
            failing_units: Vec::new(),
            free_bytes: 100 << 30,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Starting `unit` fails (as a daemon that exits at once would).
    pub fn with_failing_unit(mut self, unit: &str) -> Self {
        self.failing_units.push(unit.to_owned());
        self
    }

    /// Every filesystem has `bytes` available.
    pub fn with_free_space(mut self, bytes: u64) -> Self {
        self.free_bytes = bytes;
        self
    }

    fn log(&self, call: String) {
        self.calls.lock().expect("call log lock").push(call);
    }

    fn active_marker(&self, unit: &str) -> PathBuf {
        self.root
            .join("run/fake-systemd")
            .join(format!("{unit}.active"))
    }

    /// Acts out fragmented memory: no more than `limit` hugepages can be reserved.
    pub fn with_hugepages_limit(mut self, limit: u64) -> Self {
        self.hugepages_limit = Some(limit);
        self
    }

    /// The commands the real implementation would have run, e.g. `sysctl -w vm.nr_hugepages=1024`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("call log lock").clone()
    }

    fn release(&self) -> anyhow::Result<String> {
        let p = self.root.join("proc/sys/kernel/osrelease");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_owned())
    }
}

impl KernelControl for FakeKernel {
    async fn set_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.calls
            .lock()
            .expect("call log lock")
            .push(format!("sysctl -w {key}={value}"));
        if key != "vm.nr_hugepages" {
            bail!(
                "sysctl: cannot stat /proc/sys/{}: no such file",
                key.replace('.', "/")
            );
        }
        let want: u64 = value.parse().context("sysctl: invalid argument")?;
        let got = self.hugepages_limit.map_or(want, |l| want.min(l));
        let path = self.root.join("proc/meminfo");
        let text = std::fs::read_to_string(&path)?;
        let mut out: String = text
            .lines()
            .filter(|l| !l.starts_with("HugePages_Total:"))
            .flat_map(|l| [l, "\n"])
            .collect();
        out.push_str(&format!("HugePages_Total: {got:>7}\n"));
        std::fs::write(&path, out)?;
        Ok(())
    }

    async fn load_module(&self, module: &str) -> anyhow::Result<()> {
        self.calls
            .lock()
            .expect("call log lock")
            .push(format!("modprobe {module}"));
        let rel = self.release()?;
        let dep =
            std::fs::read_to_string(self.root.join("lib/modules").join(&rel).join("modules.dep"))
                .unwrap_or_default();
        let want = module_name(module);
        if !dep.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(f, _)| module_name(f) == want)
        }) {
            bail!("modprobe: FATAL: Module {module} not found in directory /lib/modules/{rel}");
        }
        let path = self.root.join("proc/modules");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!("{want} 53248 0 - Live 0x0000000000000000\n"));
        std::fs::write(&path, text)?;
        Ok(())
    }

    async fn service_active(&self, unit: &str) -> anyhow::Result<bool> {
        Ok(self.active_marker(unit).exists())
    }

    async fn start_service(&self, unit: &str) -> anyhow::Result<()> {
        self.log(format!("systemctl enable --now {unit}"));
        let file = format!("{unit}.service");
        if ![
            "lib/systemd/system",
            "usr/lib/systemd/system",
            "etc/systemd/system",
        ]
        .iter()
        .any(|d| self.root.join(d).join(&file).exists())
        {
            bail!("Failed to enable unit: Unit file {file} does not exist.");
        }
        if self.failing_units.iter().any(|u| u == unit) {
            bail!("Job for {file} failed because the control process exited with error code.");
        }
        let m = self.active_marker(unit);
        std::fs::create_dir_all(m.parent().expect("has a parent"))?;
        std::fs::write(m, "")?;
        Ok(())
    }

    async fn reload_service(&self, unit: &str) -> anyhow::Result<()> {
        self.log(format!("systemctl reload-or-restart {unit}"));
        if !self.active_marker(unit).exists() {
            bail!("Failed to reload-or-restart {unit}.service: Unit not active.");
        }
        Ok(())
    }

    async fn install_debs(&self, debs: &[PathBuf]) -> anyhow::Result<()> {
        let names: Vec<String> = debs
            .iter()
            .map(|d| {
                d.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        self.log(format!("dpkg -i {}", names.join(" ")));
        for d in debs {
            if std::fs::read(d)? != FAKE_DEB {
                bail!(
                    "dpkg-deb: error: '{}' is not a Debian format archive",
                    d.display()
                );
            }
        }
        for d in debs {
            let pkg = super::prep::deb_package_name(d).context("deb file name")?;
            install_package(&self.root, pkg)?;
        }
        Ok(())
    }

    fn free_bytes(&self, path: &Path) -> anyhow::Result<u64> {
        if !path.exists() {
            bail!("statvfs {}: no such file or directory", path.display());
        }
        Ok(self.free_bytes)
    }
}

/// Builds a fake root filesystem for node-preparation tests.
#[derive(Debug, Clone)]
pub struct FakeRoot {
    pub release: String,
    /// Loadable modules (paths as in `modules.dep`, e.g. `kernel/drivers/net/vxlan/vxlan.ko.zst`).
    pub modules: Vec<String>,
    pub builtin: Vec<String>,
    pub loaded: Vec<String>,
    pub mem_total_kib: u64,
    pub hugepages_total: u64,
    /// `sys/fs/cgroup/cgroup.controllers` content; `None` leaves the file out.
    pub cgroup_controllers: Option<String>,
    /// Installed packages for `var/lib/dpkg/status`; `None` leaves the file out.
    pub dpkg_installed: Option<Vec<String>>,
}

impl Default for FakeRoot {
    /// A 4 GB x86 node on Ubuntu 24.04's generic kernel with the usual modules.
    fn default() -> Self {
        FakeRoot {
            release: "6.8.0-49-generic".into(),
            modules: vec![
                "kernel/drivers/nvme/host/nvme-tcp.ko.zst".into(),
                "kernel/drivers/net/vxlan/vxlan.ko.zst".into(),
                "kernel/drivers/block/rbd.ko.zst".into(),
                "kernel/drivers/scsi/iscsi_tcp.ko.zst".into(),
            ],
            builtin: vec!["kernel/fs/ext4/ext4.ko".into()],
            loaded: vec!["overlay".into()],
            mem_total_kib: 3_884_524,
            hugepages_total: 0,
            cgroup_controllers: Some("cpuset cpu io memory hugetlb pids rdma misc".into()),
            dpkg_installed: Some(vec!["bash".into(), "systemd".into()]),
        }
    }
}

impl FakeRoot {
    /// Writes the files under `root`.
    pub fn write(&self, root: &Path) -> anyhow::Result<()> {
        let put = |rel: &str, text: String| -> anyhow::Result<()> {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().expect("relative paths have parents"))?;
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
        };
        put("proc/sys/kernel/osrelease", format!("{}\n", self.release))?;
        let moddir = format!("lib/modules/{}", self.release);
        let dep: String = self.modules.iter().map(|m| format!("{m}:\n")).collect();
        put(&format!("{moddir}/modules.dep"), dep)?;
        let builtin: String = self.builtin.iter().map(|m| format!("{m}\n")).collect();
        put(&format!("{moddir}/modules.builtin"), builtin)?;
        let loaded: String = self
            .loaded
            .iter()
            .map(|m| format!("{m} 4096 0 - Live 0x0000000000000000\n"))
            .collect();
        put("proc/modules", loaded)?;
        put(
            "proc/meminfo",
            format!(
                "MemTotal:       {} kB\nMemFree:         100000 kB\nHugePages_Total: {:>7}\nHugepagesize:       2048 kB\n",
                self.mem_total_kib, self.hugepages_total
            ),
        )?;
        if let Some(c) = &self.cgroup_controllers {
            put("sys/fs/cgroup/cgroup.controllers", format!("{c}\n"))?;
        }
        if let Some(pkgs) = &self.dpkg_installed {
            let status: String = pkgs
                .iter()
                .map(|p| format!("Package: {p}\nStatus: install ok installed\nVersion: 1.0\n\n"))
                .collect();
            put("var/lib/dpkg/status", status)?;
            for p in pkgs {
                for f in package_files(p) {
                    put(f, String::new())?;
                }
            }
        }
        Ok(())
    }
}

/// Behaving helm and kubectl (see the module docs).
#[derive(Debug, Default)]
pub struct FakeClusterTools {
    state: Mutex<ToolsState>,
    /// This node's name in `images` (empty for a lone node).
    node: String,
    images: std::sync::Arc<FakeImages>,
}

/// The container images of a fake cluster (see the module docs).
#[derive(Debug, Default)]
pub struct FakeImages {
    state: Mutex<ImagesState>,
}

#[derive(Debug, Default)]
struct ImagesState {
    offline: bool,
    /// What the chart's pods run (normalised).
    needed: Vec<String>,
    /// The Ready nodes the chart's pods run on.
    nodes: Vec<String>,
    /// Imported image names by node.
    imported: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl FakeImages {
    /// A cluster of `nodes` (all Ready) that reaches no registry, whose chart runs `needed`.
    pub fn offline(needed: &[&str], nodes: &[&str]) -> std::sync::Arc<FakeImages> {
        std::sync::Arc::new(FakeImages {
            state: Mutex::new(ImagesState {
                offline: true,
                needed: needed
                    .iter()
                    .map(|n| normalize_ref(n).expect("a test's image names are references"))
                    .collect(),
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                imported: Default::default(),
            }),
        })
    }

    /// The image names imported on `node`, sorted.
    pub fn imported(&self, node: &str) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.imported
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `(node, images it lacks)` for each Ready node that cannot run the chart's pods.
    fn missing(&self) -> Vec<(String, Vec<String>)> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.offline {
            return Vec::new();
        }
        st.nodes
            .iter()
            .filter_map(|n| {
                let have = st.imported.get(n);
                let lack: Vec<String> = st
                    .needed
                    .iter()
                    .filter(|i| !have.is_some_and(|h| h.contains(*i)))
                    .cloned()
                    .collect();
                (!lack.is_empty()).then(|| (n.clone(), lack))
            })
            .collect()
    }
}

/// Writes a Docker image archive (`docker save`'s format, a real tar) at `path` holding one
/// image tagged `tags` (the workspace's one test-archive writer).
pub use rackseed_host::image_archive::testing::docker_archive as write_image_archive;

#[derive(Debug, Default)]
struct ToolsState {
    calls: Vec<String>,
    crds: HashSet<String>,
    releases: Vec<HelmRelease>,
}

impl FakeClusterTools {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tools of node `node` of the cluster whose images are `images`.
    pub fn on_node(node: &str, images: std::sync::Arc<FakeImages>) -> Self {
        FakeClusterTools {
            node: node.to_owned(),
            images,
            ..Default::default()
        }
    }

    /// Every call so far, argv after `microk8s`, joined by spaces.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ToolsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(command: String, detail: String) -> Microk8sError {
        Microk8sError::Failed {
            command,
            code: Some(1),
            detail,
        }
    }
}

impl ClusterTools for FakeClusterTools {
    fn helm_install<'a>(
        &'a self,
        req: &'a HelmInstall,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let argv = req.argv().join(" ");
            let mut st = self.lock();
            st.calls.push(argv.clone());
            if !req.values_file.is_file() {
                return Err(Self::refuse(
                    argv,
                    format!("Error: open {}: no such file", req.values_file.display()),
                ));
            }
            let offline = self
                .images
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .offline;
            if let (true, crate::system::microk8s::helm::ChartSource::Repo { url, .. }) =
                (offline, &req.chart)
            {
                return Err(Self::refuse(
                    argv,
                    format!("Error: looks like \"{url}\" is not a valid chart repository or cannot be reached"),
                ));
            }
            // Pods that cannot pull their images never become ready: helm's --wait times out.
            let stuck = self.images.missing();
            st.releases.retain(|r| r.name != req.release);
            st.releases.push(HelmRelease {
                name: req.release.clone(),
                namespace: req.namespace.clone(),
                status: if stuck.is_empty() {
                    "deployed"
                } else {
                    "failed"
                }
                .into(),
                chart: format!("{}-{}", req.release, req.version),
                app_version: format!("v{}", req.version),
            });
            if !stuck.is_empty() {
                return Err(Self::refuse(
                    argv,
                    "Error: context deadline exceeded".into(),
                ));
            }
            Ok(())
        })
    }

    fn helm_list<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<HelmRelease>, Microk8sError>> {
        Box::pin(async move {
            let mut st = self.lock();
            st.calls
                .push(format!("helm3 list --namespace {namespace} -o json"));
            Ok(st
                .releases
                .iter()
                .filter(|r| r.namespace == namespace)
                .cloned()
                .collect())
        })
    }

    fn kubectl_apply<'a>(&'a self, file: &'a Path) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let argv = format!("kubectl apply -f {}", file.display());
            let mut st = self.lock();
            st.calls.push(argv.clone());
            let text = std::fs::read_to_string(file)
                .map_err(|e| Self::refuse(argv.clone(), format!("error: {e}")))?;
            let mut names = Vec::new();
            for doc in text.split("\n---\n") {
                let v: serde_yaml::Value = serde_yaml::from_str(doc)
                    .map_err(|e| Self::refuse(argv.clone(), format!("error: {e}")))?;
                if v["kind"].as_str() == Some("CustomResourceDefinition") {
                    if let Some(n) = v["metadata"]["name"].as_str() {
                        names.push(n.to_owned());
                    }
                }
            }
            st.crds.extend(names);
            Ok(())
        })
    }

    fn kubectl_wait_crds<'a>(
        &'a self,
        crds: &'a [&'a str],
        timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let argv = format!(
                "kubectl wait --for=condition=Established --timeout={}s {}",
                timeout.as_secs(),
                crds.iter()
                    .map(|c| format!("crd/{c}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut st = self.lock();
            st.calls.push(argv.clone());
            match crds.iter().find(|c| !st.crds.contains(**c)) {
                Some(c) => Err(Self::refuse(
                    argv,
                    format!(
                        "Error from server (NotFound): customresourcedefinitions \"{c}\" not found"
                    ),
                )),
                None => Ok(()),
            }
        })
    }

    fn kubectl_get_json<'a>(
        &'a self,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Microk8sError>> {
        Box::pin(async move {
            let ns = namespace.map(|n| format!(" -n {n}")).unwrap_or_default();
            self.lock()
                .calls
                .push(format!("kubectl get {resource}{ns} -o json"));
            Ok(r#"{"items":[]}"#.into())
        })
    }

    fn ctr_image_import<'a>(
        &'a self,
        archive: &'a Path,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        Box::pin(async move {
            let argv = format!("ctr image import {}", archive.display());
            self.lock().calls.push(argv.clone());
            let names = std::fs::File::open(archive)
                .map_err(|e| format!("open {}: {e}", archive.display()))
                .and_then(|f| {
                    archive_image_names(std::io::BufReader::new(f)).map_err(|e| e.to_string())
                })
                .map_err(|e| Self::refuse(argv, format!("ctr: {e}")))?;
            let mut st = self.images.state.lock().unwrap_or_else(|p| p.into_inner());
            st.imported
                .entry(self.node.clone())
                .or_default()
                .extend(names);
            Ok(())
        })
    }
}

/// The status document (JSON) of a member `hostname` in phase `phase` whose node preparation
/// reported `problems` (each with a placeholder fix).
pub fn member_doc(hostname: &str, phase: &str, problems: &[&str]) -> serde_json::Value {
    let doc = rackseed_protocol::status::StatusDoc {
        version: env!("CARGO_PKG_VERSION").into(),
        node_id: format!("id-{hostname}"),
        hostname: hostname.into(),
        phase: phase.into(),
        problems: problems.iter().map(|p| p.to_string()).collect(),
        fixes: problems
            .iter()
            .map(|_| "see the problem".to_string())
            .collect(),
        ..Default::default()
    };
    serde_json::to_value(doc).expect("a status document serializes")
}

/// The other members' status documents (see the module docs).
#[derive(Debug)]
pub struct FakeReports {
    this_node: String,
    docs: Mutex<Vec<(String, Option<serde_json::Value>)>>,
}

impl FakeReports {
    /// Reports for the installing node `this_node`, with no peer yet.
    pub fn new(this_node: &str) -> Self {
        FakeReports {
            this_node: this_node.to_owned(),
            docs: Mutex::new(Vec::new()),
        }
    }

    /// Sets (or replaces) the status document of peer `node_id`; `None`: unreadable.
    pub fn set_doc(&self, node_id: &str, doc: Option<serde_json::Value>) {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        docs.retain(|(id, _)| id != node_id);
        docs.push((node_id.to_owned(), doc));
    }
}

impl MemberReports for FakeReports {
    fn this_node(&self) -> &str {
        &self.this_node
    }

    fn verdicts(&self) -> BoxFuture<'_, Vec<MemberVerdict>> {
        let docs = self.docs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            docs.into_iter()
                .map(|(id, doc)| {
                    doc.ok_or_else(|| "connection refused".to_owned())
                        .and_then(|d| verdict_from_doc(&d))
                        .unwrap_or_else(|e| MemberVerdict {
                            node: id,
                            verdict: Verdict::NotReported(format!("its status document: {e}")),
                        })
                })
                .collect()
        })
    }
}
