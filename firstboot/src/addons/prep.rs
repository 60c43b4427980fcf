//! Node preparation for the configured addons, run on **every** node before it joins, and the
//! Raspberry Pi boot checks. Idempotent: running it again changes nothing and runs no command
//! that is not needed.
//!
//! Every path is relative to a `root` directory (`/` in production), so tests use a fake root
//! filesystem: `proc/meminfo`, `proc/modules`, `proc/sys/kernel/osrelease`,
//! `lib/modules/<release>/modules.{dep,builtin}`, `sys/fs/cgroup/cgroup.controllers`,
//! `proc/cgroups`, `var/lib/dpkg/status`. Changes to the running system (sysctl, modprobe,
//! systemd units, staged packages) and the free-space query go through [`KernelControl`],
//! whose real implementation runs `sysctl -w` / `modprobe` / `systemctl` / `dpkg -i` through
//! [`Cmd`] (and `statvfs`) and whose fake (`addons::fakes::FakeKernel`) updates the fake root
//! like the real system would.
//!
//! What it does:
//! - mayastor: checks RAM (at least [`MAYASTOR_MIN_RAM_GIB`] GiB installed, i.e. `MemTotal` >=
//!   3.5 GiB: 1024 hugepages of 2 MiB take 2 GiB), persists `vm.nr_hugepages = 1024` in
//!   `etc/sysctl.d/20-microk8s-hugepages.conf` and applies it with `sysctl -w` when fewer are
//!   reserved, then re-reads `HugePages_Total`; checks the kernel has `nvme-tcp`, persists it in
//!   `etc/modules-load.d/microk8s-mayastor.conf` and loads it with `modprobe`.
//! - longhorn ([`prepare_longhorn`]): `open-iscsi` and `nfs-common` installed (dpkg status,
//!   else their binaries), installed first from the image's staged `.deb` files
//!   (`addons.offline`, one `dpkg -i` of every staged package so their dependencies resolve
//!   offline) when missing; `iscsid` active (`systemctl enable --now iscsid` when not); the
//!   `iscsi_tcp` module loaded and persisted in [`LONGHORN_MODULES_CONF`]; multipathd, when
//!   installed, told to leave Longhorn's `sd*` devices alone ([`MULTIPATH_BLACKLIST_CONF`],
//!   the blacklist Longhorn's docs ask for, then `systemctl reload-or-restart multipathd` if it
//!   runs); and at least `addons.longhorn.min-free-space` free on the filesystem that will
//!   hold `addons.longhorn.data-path` (its nearest existing folder). Volume encryption (which
//!   would need `dm_crypt`) is not configurable, so `dm_crypt` is not checked.
//! - rook-ceph: `lvm2` (installed from the staged packages when missing) and the `rbd`
//!   module; notes the raw disks and internet it needs.
//! - rpi4/rpi5: memory cgroup enabled, `vxlan` module available, RAM above MicroK8s'
//!   low-memory guard.
//! - the other features' packages ([`prepare_feature_packages`]): `keepalived` and `curl` for
//!   `cluster.api-address`, `iputils-arping` for MetalLB's `"auto"` range; installed from the
//!   staged folder when missing (official bases), else a problem named after the setting that
//!   says what the node then lacks (it still forms).
//!
//! - longhorn's container images ([`import_staged_images`]): when the staged folder holds image
//!   archives (`*.tar`, checked at build time to hold every image Longhorn needs), each is
//!   imported into this node's containerd with `microk8s ctr image import FILE` once MicroK8s
//!   runs, so Longhorn's pods start without a registry. Done once per archive: each import
//!   that succeeded is recorded in the state folder ([`IMAGES_IMPORTED_FILE`], with the
//!   archive's size and modification time), a failed one is not and is tried again at the next
//!   check (a restart; on the installing node, every install attempt). Until every archive is
//!   imported, the node's verdict has a `longhorn:` problem (`longhorn: image import failed:
//!   FILE: REASON`, or not imported yet while MicroK8s is not installed), so the install's
//!   gate waits for it like for any other unmet prerequisite.
//!
//!   Why `microk8s ctr image import` and not `microk8s images import` (canonical/microk8s
//!   `scripts/wrappers/images.py` and `distributed_op.py`, `do_image_import`): the latter
//!   reads the whole archive into memory and POSTs it to the cluster agent of every node it
//!   knows, printing "Failed to import images on …" but still exiting 0 when a node fails, so
//!   a failure could not be seen, and it works only once the node has joined. `ctr` (the snap's
//!   `microk8s-ctr.wrapper` with `$SNAP_DATA/args/ctr`: `--namespace k8s.io`, kubelet's) streams
//!   the file on this node, exits non-zero with containerd's reason, and works before the join
//!   and on workers; every node imports its own staged copy.
//!
//! The verdict is kept in the agent's state folder ([`VERDICT_FILE`], written atomically by
//! [`prepare_and_record`]): a restarted agent shows it at once and checks again, so a
//! member's unmet prerequisite never disappears from its status while its agent restarts.
//!
//! Files are written atomically (temp file, fsync, rename, fsync of the directory), only when
//! their content changes, and setting lines are never duplicated. Problems the node cannot fix
//! itself are reported in a [`Readiness`] (what is wrong and the fix), never silently ignored.
//!
//! To add a check: write a `check_*`/`prepare_*` function that pushes into a [`Readiness`] and
//! call it from [`prepare_node`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use rackseed_config::{Longhorn, Storage, Target};
use rackseed_host::command::Cmd;

use crate::system::microk8s::helm::ClusterTools;

/// The sysctl.d file MicroK8s' docs name for Mayastor's hugepages.
pub const HUGEPAGES_CONF: &str = "etc/sysctl.d/20-microk8s-hugepages.conf";
/// The modules-load.d file MicroK8s' docs name for Mayastor's `nvme-tcp`.
pub const MAYASTOR_MODULES_CONF: &str = "etc/modules-load.d/microk8s-mayastor.conf";
/// Mayastor refuses to enable below this `HugePages_Total`.
pub const HUGEPAGES_WANTED: u64 = 1024;
/// Installed RAM a Mayastor node needs, in GiB (2 GiB go to hugepages).
pub const MAYASTOR_MIN_RAM_GIB: u64 = 4;
/// `MemTotal` threshold for [`MAYASTOR_MIN_RAM_GIB`]: firmware and kernel keep a few hundred
/// MiB, so a 4 GB machine shows about 3.7-3.8 GiB.
pub const MAYASTOR_MIN_MEMTOTAL_KIB: u64 = 3 * 1024 * 1024 + 512 * 1024;
/// Below this MicroK8s' low-memory guard blocks the control plane.
pub const MICROK8S_MIN_MEMTOTAL_KIB: u64 = 512 * 1024;
/// The kernel command-line flags that turn the memory cgroup on for Raspberry Pi kernels.
pub const PI_CGROUP_FLAGS: [&str; 2] = ["cgroup_enable=memory", "cgroup_memory=1"];
/// Where the Pi's kernel command line lives (relative to root).
pub const PI_CMDLINE: &str = "boot/firmware/cmdline.txt";

/// The modules-load.d file for Longhorn's `iscsi_tcp`.
pub const LONGHORN_MODULES_CONF: &str = "etc/modules-load.d/rackseed-longhorn.conf";
/// The multipath drop-in (multipath.conf's default `config_dir` is `/etc/multipath/conf.d`).
pub const MULTIPATH_BLACKLIST_CONF: &str = "etc/multipath/conf.d/rackseed-longhorn.conf";
/// Its content: Longhorn's documented blacklist, so multipathd does not claim the `sd*`
/// devices Longhorn's iSCSI volumes appear as.
pub const MULTIPATH_BLACKLIST: &str = "# written by firstboot (rackseed): longhorn's volumes are \
iSCSI disks named sd*; multipathd must not claim them\nblacklist {\n    devnode \"^sd[a-z0-9]+\"\n}\n";

const KERNEL_CMD_TIMEOUT: Duration = Duration::from_secs(60);
const DPKG_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Whether this node can host what the configuration asks for. `ok` is true exactly when
/// `problems` is empty; every problem has a matching entry in `fixes` (same index) when a fix is
/// known. `notes` are prerequisites this node cannot check (internet, raw disks, manual steps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ok: bool,
    pub problems: Vec<String>,
    pub fixes: Vec<String>,
    pub notes: Vec<String>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            ok: true,
            problems: Vec::new(),
            fixes: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl Readiness {
    pub fn problem(&mut self, problem: impl Into<String>, fix: impl Into<String>) {
        let problem = problem.into();
        tracing::warn!(%problem, "node preparation");
        self.ok = false;
        self.problems.push(problem);
        self.fixes.push(fix.into());
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn merge(&mut self, other: Readiness) {
        self.ok &= other.ok;
        self.problems.extend(other.problems);
        self.fixes.extend(other.fixes);
        self.notes.extend(other.notes);
    }
}

/// I/O failures of node preparation itself (as opposed to a node that is not ready).
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
}

/// Changes to the running system, and what only it can tell (see the module docs).
#[allow(async_fn_in_trait)] // used through generics only
pub trait KernelControl {
    /// Sets a sysctl now (the persistent setting is a file written separately).
    async fn set_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()>;
    /// Loads a kernel module now.
    async fn load_module(&self, module: &str) -> anyhow::Result<()>;
    /// Whether a systemd unit is active (`systemctl is-active --quiet UNIT`).
    async fn service_active(&self, unit: &str) -> anyhow::Result<bool>;
    /// Enables and starts a unit (`systemctl enable --now UNIT`).
    async fn start_service(&self, unit: &str) -> anyhow::Result<()>;
    /// Makes a running unit read its configuration again (`systemctl reload-or-restart UNIT`).
    async fn reload_service(&self, unit: &str) -> anyhow::Result<()>;
    /// Installs local package files (`dpkg -i FILE…`), never from the network.
    async fn install_debs(&self, debs: &[PathBuf]) -> anyhow::Result<()>;
    /// Bytes available to root on the filesystem holding `path` (`statvfs`).
    fn free_bytes(&self, path: &Path) -> anyhow::Result<u64>;
}

/// The real kernel: `sysctl -w key=value` and `modprobe <module>` through [`Cmd`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HostKernel;

impl KernelControl for HostKernel {
    async fn set_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        Cmd::new("sysctl", KERNEL_CMD_TIMEOUT)
            .args(["-w", &format!("{key}={value}")])
            .run()
            .await?;
        Ok(())
    }

    async fn load_module(&self, module: &str) -> anyhow::Result<()> {
        Cmd::new("modprobe", KERNEL_CMD_TIMEOUT)
            .arg(module)
            .run()
            .await?;
        Ok(())
    }

    async fn service_active(&self, unit: &str) -> anyhow::Result<bool> {
        let out = Cmd::new("systemctl", KERNEL_CMD_TIMEOUT)
            .args(["is-active", "--quiet", unit])
            .output()
            .await?;
        Ok(out.code() == Some(0))
    }

    async fn start_service(&self, unit: &str) -> anyhow::Result<()> {
        Cmd::new("systemctl", KERNEL_CMD_TIMEOUT)
            .args(["enable", "--now", unit])
            .run()
            .await?;
        Ok(())
    }

    async fn reload_service(&self, unit: &str) -> anyhow::Result<()> {
        Cmd::new("systemctl", KERNEL_CMD_TIMEOUT)
            .args(["reload-or-restart", unit])
            .run()
            .await?;
        Ok(())
    }

    async fn install_debs(&self, debs: &[PathBuf]) -> anyhow::Result<()> {
        Cmd::new("dpkg", DPKG_TIMEOUT)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["--force-confold", "-i"])
            .args(debs)
            .run()
            .await?;
        Ok(())
    }

    fn free_bytes(&self, path: &Path) -> anyhow::Result<u64> {
        let st = nix::sys::statvfs::statvfs(path)?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }
}

/// Prepares this node for `storage` with Longhorn's default settings and no staged packages,
/// and runs the boot checks for `target`. See [`prepare_node_for`].
pub async fn prepare_node<K: KernelControl>(
    root: &Path,
    storage: Storage,
    target: Target,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    prepare_node_for(root, storage, &Longhorn::default(), None, target, kernel).await
}

/// Prepares this node for `storage` (Longhorn with `longhorn`'s settings; missing packages
/// from the staged folder `offline`, an absolute path on the node, re-rooted under `root` like
/// every other path) and runs the boot checks for `target`. `Err` only when a file could not
/// be read or written; everything else ends up in the [`Readiness`].
pub async fn prepare_node_for<K: KernelControl>(
    root: &Path,
    storage: Storage,
    longhorn: &Longhorn,
    offline: Option<&Path>,
    target: Target,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    if matches!(target, Target::Rpi4 | Target::Rpi5) {
        r.merge(check_raspberry_pi(root)?);
    }
    let offline = offline.map(|o| under_root(root, o));
    match storage {
        Storage::None | Storage::Hostpath => {}
        Storage::Mayastor => r.merge(prepare_mayastor(root, kernel).await?),
        Storage::Longhorn => {
            r.merge(prepare_longhorn(root, longhorn, offline.as_deref(), kernel).await?)
        }
        Storage::RookCeph => r.merge(prepare_rook_ceph(root, offline.as_deref(), kernel).await?),
    }
    Ok(r)
}

/// `path` (absolute on the node) under `root`.
pub fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Node preparation for everything `config` turns on: [`prepare_node_for`] with its storage,
/// Longhorn settings, staged folder and target, and, when `feature_packages` is set, the
/// packages of its other features ([`prepare_feature_packages`]). `feature_packages` is false
/// only where the agent runs those programs from elsewhere than `root` (tests that give it
/// its own keepalived).
pub async fn prepare_for_config<K: KernelControl>(
    root: &Path,
    config: &rackseed_config::ClusterConfig,
    feature_packages: bool,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let offline = config.addons.offline.as_deref();
    let mut r = prepare_node_for(
        root,
        config.addons.storage,
        &config.addons.longhorn,
        offline,
        config.image.target,
        kernel,
    )
    .await?;
    if feature_packages {
        r.merge(prepare_feature_packages(root, config, offline, kernel).await?);
    }
    Ok(r)
}

/// The packages of the features `config` turns on besides storage
/// ([`rackseed_config::ClusterConfig::feature_packages`]: keepalived and curl for the floating
/// API address, iputils' arping for MetalLB's automatic range). A bootstrapped base has them;
/// an official base gets them from the staged folder `offline` (absolute on the node,
/// re-rooted under `root`) in one offline `dpkg -i`. When they cannot be had, the problem is
/// named after the setting (`api-address: keepalived and curl not installed on this node and
/// not staged in ...: the node cannot hold the floating API address (it forms without it)`);
/// nothing else waits for them.
pub async fn prepare_feature_packages<K: KernelControl>(
    root: &Path,
    config: &rackseed_config::ClusterConfig,
    offline: Option<&Path>,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let offline = offline.map(|o| under_root(root, o));
    let mut r = Readiness::default();
    for f in config.feature_packages() {
        let needs: Vec<PackageProbe> = f.packages.iter().map(|p| feature_probe(p)).collect();
        let name = f
            .setting
            .strip_prefix("cluster.")
            .or_else(|| f.setting.strip_prefix("addons."))
            .and_then(|s| s.split(['.', ' ']).next())
            .unwrap_or(f.setting);
        ensure_packages(
            root,
            name,
            f.without,
            &needs,
            offline.as_deref(),
            kernel,
            &mut r,
        )
        .await?;
    }
    Ok(r)
}

/// The file in the agent's state folder that keeps its last preparation verdict.
pub const VERDICT_FILE: &str = "prerequisites.json";

/// Keeps `verdict` in `state_dir` (atomically, mode 0600), so that a restarted agent reports
/// the same problems until it has checked again: a member's unmet Longhorn prerequisite must
/// not vanish from its status (the installing node reads it there) when its agent restarts.
pub fn store_verdict(state_dir: &Path, verdict: &Readiness) -> Result<(), PrepError> {
    let path = state_dir.join(VERDICT_FILE);
    let json = serde_json::to_vec_pretty(verdict).map_err(|e| PrepError::Write {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    rackseed_host::fs::write_atomic(&path, &json, 0o600).map_err(|e| PrepError::Write {
        path,
        reason: format!("{e:#}"),
    })
}

/// The verdict [`store_verdict`] kept, `None` when there is none yet; a file that is not a
/// verdict is an error naming it (nothing is overwritten until the next check).
pub fn load_verdict(state_dir: &Path) -> Result<Option<Readiness>, PrepError> {
    let path = state_dir.join(VERDICT_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    let v: Readiness = serde_json::from_str(&text).map_err(|e| PrepError::Malformed {
        path,
        reason: e.to_string(),
    })?;
    Ok(Some(v))
}

/// [`prepare_for_config`], then [`store_verdict`]: what the agent runs before it joins, and
/// again when it restarts as a member (idempotent: only what is missing is done). The same as
/// [`prepare_and_record_with`] without MicroK8s' tools (staged images not yet imported are
/// then a problem).
pub async fn prepare_and_record<K: KernelControl>(
    root: &Path,
    config: &rackseed_config::ClusterConfig,
    feature_packages: bool,
    state_dir: &Path,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    prepare_and_record_with(root, config, feature_packages, state_dir, kernel, None).await
}

/// [`prepare_for_config`], plus, for Longhorn with a staged folder, the import of its staged
/// container images with `tools` (MicroK8s' own, `None` while MicroK8s is not installed;
/// [`import_staged_images`]), then [`store_verdict`].
pub async fn prepare_and_record_with<K: KernelControl>(
    root: &Path,
    config: &rackseed_config::ClusterConfig,
    feature_packages: bool,
    state_dir: &Path,
    kernel: &K,
    tools: Option<&dyn ClusterTools>,
) -> Result<Readiness, PrepError> {
    let mut r = prepare_for_config(root, config, feature_packages, kernel).await?;
    if let (Storage::Longhorn, Some(offline)) = (config.addons.storage, &config.addons.offline) {
        r.merge(import_staged_images(&under_root(root, offline), state_dir, tools).await?);
    }
    store_verdict(state_dir, &r)?;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// longhorn's container images

/// The file in the agent's state folder that records the staged image archives imported.
pub const IMAGES_IMPORTED_FILE: &str = "images-imported.json";

/// What [`IMAGES_IMPORTED_FILE`] holds: each imported archive's file name and what it was.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImages {
    pub archives: std::collections::BTreeMap<String, ArchiveStamp>,
}

/// An archive as it was when it was imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStamp {
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: u128,
}

fn stamp(path: &Path) -> Result<ArchiveStamp, PrepError> {
    let md = std::fs::metadata(path).map_err(|source| PrepError::Read {
        path: path.to_owned(),
        source,
    })?;
    let modified_ns = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(ArchiveStamp {
        size: md.len(),
        modified_ns,
    })
}

/// The container image archives (`*.tar`) staged in `dir`, sorted; none when the folder does
/// not exist.
pub fn staged_image_archives(dir: &Path) -> Result<Vec<PathBuf>, PrepError> {
    staged_files(dir, "tar")
}

/// The files named `*.EXT` in `dir`, sorted; none when the folder does not exist.
fn staged_files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, PrepError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PrepError::Read {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext) && p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

/// The imports recorded in `state_dir` (none when there is no record; a record that cannot be
/// read counts as none, so the archives are imported again, which changes nothing).
pub fn load_imported(state_dir: &Path) -> ImportedImages {
    let path = state_dir.join(IMAGES_IMPORTED_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable image import record; importing again");
            ImportedImages::default()
        }),
        Err(_) => ImportedImages::default(),
    }
}

fn store_imported(state_dir: &Path, rec: &ImportedImages) -> Result<(), PrepError> {
    let path = state_dir.join(IMAGES_IMPORTED_FILE);
    std::fs::create_dir_all(state_dir).map_err(|e| PrepError::Write {
        path: path.clone(),
        reason: format!("creating {}: {e}", state_dir.display()),
    })?;
    let json = serde_json::to_vec_pretty(rec).map_err(|e| PrepError::Write {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    rackseed_host::fs::write_atomic(&path, &json, 0o600).map_err(|e| PrepError::Write {
        path,
        reason: format!("{e:#}"),
    })
}

/// Whether `config` stages container images for Longhorn on this node (under `root`).
pub fn has_staged_images(root: &Path, config: &rackseed_config::ClusterConfig) -> bool {
    match (config.addons.storage, &config.addons.offline) {
        (Storage::Longhorn, Some(o)) => {
            staged_image_archives(&under_root(root, o)).is_ok_and(|a| !a.is_empty())
        }
        _ => false,
    }
}

/// Imports the archives staged in `dir` (on this node's filesystem) that are not recorded as
/// imported in `state_dir`, with `tools` (see the module docs). Every archive is tried even
/// when one fails; each failure is a problem naming the file and containerd's reason.
pub async fn import_staged_images(
    dir: &Path,
    state_dir: &Path,
    tools: Option<&dyn ClusterTools>,
) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    let archives = staged_image_archives(dir)?;
    if archives.is_empty() {
        return Ok(r);
    }
    let mut record = load_imported(state_dir);
    let mut pending = Vec::new();
    for a in archives {
        let name = a
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let now = stamp(&a)?;
        if record.archives.get(&name) != Some(&now) {
            pending.push((a, name, now));
        }
    }
    if pending.is_empty() {
        return Ok(r);
    }
    let Some(tools) = tools else {
        let names: Vec<&str> = pending.iter().map(|(_, n, _)| n.as_str()).collect();
        r.problem(
            format!(
                "longhorn: the staged container images ({}) are not imported yet (MicroK8s is \
                 not installed yet)",
                names.join(", ")
            ),
            "wait: the agent imports them with `microk8s ctr image import` once MicroK8s runs",
        );
        return Ok(r);
    };
    for (path, name, now) in pending {
        tracing::info!(archive = %path.display(), "importing staged container images");
        match tools.ctr_image_import(&path).await {
            Ok(()) => {
                record.archives.insert(name, now);
                store_imported(state_dir, &record)?;
            }
            Err(e) => r.problem(
                format!("longhorn: image import failed: {name}: {e}"),
                format!(
                    "run `microk8s ctr image import {}` to see containerd's error; if the \
                     archive is damaged, rebuild the image with a good copy in addons.offline \
                     (the agent tries again when it restarts)",
                    path.display()
                ),
            ),
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// mayastor

/// See the module docs. Writes the two files, applies them, and re-checks.
pub async fn prepare_mayastor<K: KernelControl>(
    root: &Path,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    let mem = read_meminfo(root)?;
    if mem.mem_total_kib < MAYASTOR_MIN_MEMTOTAL_KIB {
        r.problem(
            format!(
                "mayastor: this node has {} MiB of RAM; mayastor needs a node with at least \
                 {MAYASTOR_MIN_RAM_GIB} GiB (it reserves {} MiB as hugepages); hugepages were \
                 not reserved",
                mem.mem_total_kib / 1024,
                HUGEPAGES_WANTED * 2
            ),
            format!(
                "use nodes with at least {MAYASTOR_MIN_RAM_GIB} GB of RAM for mayastor, or choose \
                 another storage (addons.storage)"
            ),
        );
    } else {
        prepare_hugepages(root, kernel, &mem, &mut r).await?;
    }
    prepare_nvme_tcp(root, kernel, &mut r).await?;
    Ok(r)
}

async fn prepare_hugepages<K: KernelControl>(
    root: &Path,
    kernel: &K,
    mem: &MemInfo,
    r: &mut Readiness,
) -> Result<(), PrepError> {
    ensure_setting_line(
        &root.join(HUGEPAGES_CONF),
        &format!("vm.nr_hugepages = {HUGEPAGES_WANTED}"),
        |l| sysctl_key(l) == Some("vm.nr_hugepages"),
        |l| sysctl_value(l).is_some_and(|v| v >= HUGEPAGES_WANTED),
    )?;
    if mem.hugepages_total >= HUGEPAGES_WANTED {
        return Ok(());
    }
    if let Err(e) = kernel
        .set_sysctl("vm.nr_hugepages", &HUGEPAGES_WANTED.to_string())
        .await
    {
        r.problem(
            format!("mayastor: applying vm.nr_hugepages = {HUGEPAGES_WANTED} failed: {e:#}"),
            format!("reboot so /{HUGEPAGES_CONF} applies at boot"),
        );
        return Ok(());
    }
    let after = read_meminfo(root)?;
    if after.hugepages_total < HUGEPAGES_WANTED {
        r.problem(
            format!(
                "mayastor: only {} of {HUGEPAGES_WANTED} hugepages could be reserved (memory is \
                 fragmented or too small)",
                after.hugepages_total
            ),
            format!("reboot so /{HUGEPAGES_CONF} applies at boot, before memory fragments"),
        );
    }
    Ok(())
}

async fn prepare_nvme_tcp<K: KernelControl>(
    root: &Path,
    kernel: &K,
    r: &mut Readiness,
) -> Result<(), PrepError> {
    let release = kernel_release(root)?;
    match module_status(root, &release, "nvme-tcp")? {
        ModuleStatus::Builtin => {}
        ModuleStatus::Loaded | ModuleStatus::Available => {
            ensure_setting_line(
                &root.join(MAYASTOR_MODULES_CONF),
                "nvme-tcp",
                |l| module_name(l.trim()) == "nvme_tcp",
                // `nvme_tcp` and `nvme-tcp` name the same module.
                |_| true,
            )?;
            if module_status(root, &release, "nvme-tcp")? == ModuleStatus::Loaded {
                return Ok(());
            }
            if let Err(e) = kernel.load_module("nvme-tcp").await {
                r.problem(
                    format!("mayastor: loading nvme-tcp failed: {e:#}"),
                    "run `modprobe nvme-tcp` and read the kernel log (journalctl -k)",
                );
            } else if module_status(root, &release, "nvme-tcp")? != ModuleStatus::Loaded {
                r.problem(
                    "mayastor: modprobe nvme-tcp succeeded but the module is not loaded",
                    "run `modprobe nvme-tcp` and read the kernel log (journalctl -k)",
                );
            }
        }
        ModuleStatus::Missing => r.problem(
            format!("mayastor: kernel {release} has no nvme-tcp module"),
            format!("{} and reboot", modules_extra_install(&release)),
        ),
    }
    Ok(())
}

/// The package command that adds the extra kernel modules for `release`.
fn modules_extra_install(release: &str) -> String {
    if release.ends_with("-raspi") {
        "apt-get install linux-modules-extra-raspi".into()
    } else {
        format!("apt-get install linux-modules-extra-{release}")
    }
}

fn sysctl_key(line: &str) -> Option<&str> {
    let l = line.trim();
    if l.starts_with('#') || l.starts_with(';') {
        return None;
    }
    let (k, _) = l.split_once('=')?;
    let k = k.trim().trim_start_matches('-');
    // sysctl.d accepts `/` as the separator too.
    Some(if k == "vm/nr_hugepages" {
        "vm.nr_hugepages"
    } else {
        k
    })
}

fn sysctl_value(line: &str) -> Option<u64> {
    line.split_once('=')?.1.trim().parse().ok()
}

// ---------------------------------------------------------------------------------------------
// longhorn, rook-ceph

/// A package and the binaries that show it is there when the root has no dpkg database.
type PackageProbe = (&'static str, &'static [&'static str]);

const LONGHORN_PACKAGES: [PackageProbe; 2] = [
    ("open-iscsi", &["usr/sbin/iscsiadm", "sbin/iscsiadm"]),
    ("nfs-common", &["usr/sbin/mount.nfs", "sbin/mount.nfs"]),
];
const ROOK_CEPH_PACKAGES: [PackageProbe; 1] = [("lvm2", &["usr/sbin/lvm", "sbin/lvm"])];

/// The probe for a package of [`rackseed_config::ClusterConfig::feature_packages`]: the
/// binaries the agent runs from it (keepalived's daemon, the health check's curl, iputils'
/// arping). A package without known binaries counts as installed only by dpkg's database.
fn feature_probe(package: &'static str) -> PackageProbe {
    match package {
        "keepalived" => (package, &["usr/sbin/keepalived", "sbin/keepalived"]),
        "curl" => (package, &["usr/bin/curl", "bin/curl"]),
        "iputils-arping" => (package, &["usr/bin/arping", "bin/arping"]),
        _ => (package, &[]),
    }
}

/// Which of `needs` are not installed under `root`.
fn missing_packages(root: &Path, needs: &[PackageProbe]) -> Result<Vec<&'static str>, PrepError> {
    let installed = installed_packages(root)?;
    Ok(needs
        .iter()
        .filter(|(pkg, bins)| match &installed {
            Some(set) => !set.contains(*pkg),
            None => !bins.iter().any(|b| root.join(b).exists()),
        })
        .map(|(pkg, _)| *pkg)
        .collect())
}

/// The staged `.deb` files in `dir` (sorted), or none when the folder does not exist.
pub fn staged_debs(dir: &Path) -> Result<Vec<PathBuf>, PrepError> {
    staged_files(dir, "deb")
}

/// The package name of a `.deb` file named the Debian way (`NAME_VERSION_ARCH.deb`).
pub fn deb_package_name(path: &Path) -> Option<&str> {
    path.file_name()?.to_str()?.split('_').next()
}

/// Makes sure `needs` are installed: when some are missing and `offline` holds a staged `.deb`
/// for each of them, installs every staged package in one `dpkg -i` (so their dependencies,
/// staged beside them, resolve without a network) and checks again. What is still missing is
/// a problem for `addon`, followed by `without` (what the node lacks then) when it is not empty.
async fn ensure_packages<K: KernelControl>(
    root: &Path,
    addon: &str,
    without: &str,
    needs: &[PackageProbe],
    offline: Option<&Path>,
    kernel: &K,
    r: &mut Readiness,
) -> Result<(), PrepError> {
    let missing = missing_packages(root, needs)?;
    if missing.is_empty() {
        return Ok(());
    }
    let staged = match offline {
        Some(dir) => staged_debs(dir)?,
        None => Vec::new(),
    };
    let have_all = missing
        .iter()
        .all(|m| staged.iter().any(|d| deb_package_name(d) == Some(m)));
    let mut install_error = None;
    if have_all {
        tracing::info!(packages = ?missing, debs = staged.len(), "installing staged packages");
        if let Err(e) = kernel.install_debs(&staged).await {
            install_error = Some(format!("{e:#}"));
        }
    }
    let missing = missing_packages(root, needs)?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" and ");
    let mut problem = match (&install_error, offline) {
        (Some(e), _) => format!("{addon}: installing the staged packages for {list} failed: {e}"),
        (None, Some(dir)) if !have_all => format!(
            "{addon}: {list} not installed on this node and not staged in {}",
            dir.display()
        ),
        _ => format!("{addon}: {list} not installed on this node (every {addon} node needs them)"),
    };
    if !without.is_empty() {
        problem.push_str(&format!(": {without}"));
    }
    r.problem(
        problem,
        format!(
            "apt-get install -y {} (needs a package source), or rebuild the image so it stages \
             them (addons.offline, or image.base.packages for a bootstrapped base)",
            missing.join(" ")
        ),
    );
    Ok(())
}

/// Longhorn's node prerequisites, prepared where this node can (see the module docs).
pub async fn prepare_longhorn<K: KernelControl>(
    root: &Path,
    settings: &Longhorn,
    offline: Option<&Path>,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    ensure_packages(
        root,
        "longhorn",
        "",
        &LONGHORN_PACKAGES,
        offline,
        kernel,
        &mut r,
    )
    .await?;
    if missing_packages(root, &LONGHORN_PACKAGES[..1])?.is_empty() {
        ensure_iscsid(kernel, &mut r).await;
    }
    ensure_module(
        root,
        kernel,
        "longhorn",
        "iscsi_tcp",
        LONGHORN_MODULES_CONF,
        &mut r,
    )
    .await?;
    blacklist_for_multipath(root, kernel, &mut r).await?;
    check_free_space(root, settings, kernel, &mut r);
    Ok(r)
}

async fn ensure_iscsid<K: KernelControl>(kernel: &K, r: &mut Readiness) {
    if kernel.service_active("iscsid").await.unwrap_or(false) {
        return;
    }
    let started = kernel.start_service("iscsid").await;
    if kernel.service_active("iscsid").await.unwrap_or(false) {
        return;
    }
    let why = match started {
        Err(e) => format!(": {e:#}"),
        Ok(()) => " (it was started but is not active)".into(),
    };
    r.problem(
        format!("longhorn: iscsid is not running on this node{why}"),
        "systemctl enable --now iscsid, then read journalctl -u iscsid",
    );
}

/// Loads `module` (persisting it in `conf`) when the kernel has it; a problem for `addon` when
/// it does not.
async fn ensure_module<K: KernelControl>(
    root: &Path,
    kernel: &K,
    addon: &str,
    module: &str,
    conf: &str,
    r: &mut Readiness,
) -> Result<(), PrepError> {
    let release = kernel_release(root)?;
    match module_status(root, &release, module)? {
        ModuleStatus::Builtin => {}
        ModuleStatus::Loaded | ModuleStatus::Available => {
            let want = module_name(module);
            ensure_setting_line(
                &root.join(conf),
                module,
                |l| module_name(l.trim()) == want,
                |_| true,
            )?;
            if module_status(root, &release, module)? == ModuleStatus::Loaded {
                return Ok(());
            }
            let loaded = kernel.load_module(module).await;
            if module_status(root, &release, module)? != ModuleStatus::Loaded {
                r.problem(
                    format!(
                        "{addon}: the {module} kernel module could not be loaded{}",
                        loaded.err().map(|e| format!(": {e:#}")).unwrap_or_default()
                    ),
                    format!("run `modprobe {module}` and read the kernel log (journalctl -k)"),
                );
            }
        }
        ModuleStatus::Missing => r.problem(
            format!("{addon}: kernel {release} has no {module} module"),
            format!("{} and reboot", modules_extra_install(&release)),
        ),
    }
    Ok(())
}

/// Writes the multipath blacklist drop-in when multipathd is installed, and makes a running
/// multipathd read it.
async fn blacklist_for_multipath<K: KernelControl>(
    root: &Path,
    kernel: &K,
    r: &mut Readiness,
) -> Result<(), PrepError> {
    let installed = match installed_packages(root)? {
        Some(set) => set.contains("multipath-tools"),
        None => ["usr/sbin/multipathd", "sbin/multipathd"]
            .iter()
            .any(|b| root.join(b).exists()),
    };
    if !installed {
        return Ok(());
    }
    let path = root.join(MULTIPATH_BLACKLIST_CONF);
    if read_optional(&path)?.as_deref() == Some(MULTIPATH_BLACKLIST) {
        return Ok(());
    }
    write_atomic(&path, MULTIPATH_BLACKLIST.as_bytes())?;
    if kernel.service_active("multipathd").await.unwrap_or(false) {
        if let Err(e) = kernel.reload_service("multipathd").await {
            r.problem(
                format!("longhorn: multipathd did not reload its blacklist: {e:#}"),
                "systemctl restart multipathd",
            );
        }
    }
    Ok(())
}

/// The nearest folder of `path` (under `root`) that exists.
fn nearest_existing(root: &Path, path: &Path) -> PathBuf {
    let mut p = under_root(root, path);
    while !p.exists() {
        match p.parent() {
            Some(parent) if parent.starts_with(root) => p = parent.to_owned(),
            _ => return root.to_owned(),
        }
    }
    p
}

fn check_free_space<K: KernelControl>(
    root: &Path,
    settings: &Longhorn,
    kernel: &K,
    r: &mut Readiness,
) {
    let at = nearest_existing(root, &settings.data_path);
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    match kernel.free_bytes(&at) {
        Ok(free) if free >= settings.min_free_space => {}
        Ok(free) => r.problem(
            format!(
                "longhorn: only {} free for {} (on the filesystem of {}); \
                 addons.longhorn.min-free-space asks for {}",
                gib(free),
                settings.data_path.display(),
                at.display(),
                gib(settings.min_free_space)
            ),
            "free space there, put addons.longhorn.data-path on a larger disk, or lower \
             addons.longhorn.min-free-space",
        ),
        Err(e) => r.problem(
            format!(
                "longhorn: cannot read the free space at {}: {e:#}",
                at.display()
            ),
            "check that the data path's filesystem is mounted",
        ),
    }
}

/// Rook-Ceph's node prerequisites (see the module docs).
pub async fn prepare_rook_ceph<K: KernelControl>(
    root: &Path,
    offline: Option<&Path>,
    kernel: &K,
) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    ensure_packages(
        root,
        "rook-ceph",
        "",
        &ROOK_CEPH_PACKAGES,
        offline,
        kernel,
        &mut r,
    )
    .await?;
    let release = kernel_release(root)?;
    if module_status(root, &release, "rbd")? == ModuleStatus::Missing {
        r.problem(
            format!("rook-ceph: kernel {release} has no rbd module (ceph block volumes need it)"),
            format!("{} and reboot", modules_extra_install(&release)),
        );
    }
    r.note("rook-ceph: needs internet access when it is enabled (helm repo)");
    r.note(
        "rook-ceph: nodes that host OSDs need a raw, unformatted disk or partition \
         (not checked by firstboot)",
    );
    Ok(r)
}

/// The installed packages according to `var/lib/dpkg/status`, or `None` when there is no dpkg
/// database under `root`.
pub fn installed_packages(root: &Path) -> Result<Option<HashSet<String>>, PrepError> {
    let Some(text) = read_optional(&root.join("var/lib/dpkg/status"))? else {
        return Ok(None);
    };
    Ok(Some(parse_dpkg_status(&text)))
}

/// Names of packages whose `Status:` ends in `installed` in a dpkg status file.
pub fn parse_dpkg_status(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for para in text.split("\n\n") {
        let mut name = None;
        let mut installed = false;
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Status:") {
                installed = v.split_whitespace().last() == Some("installed");
            }
        }
        if let (Some(n), true) = (name, installed) {
            out.insert(n);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Raspberry Pi

/// Memory cgroup, `vxlan` and RAM checks for Raspberry Pi nodes (reference A10).
pub fn check_raspberry_pi(root: &Path) -> Result<Readiness, PrepError> {
    let mut r = Readiness::default();
    if !memory_cgroup_enabled(root)? {
        r.problem(
            "rpi: the memory cgroup is not enabled (kubelet cannot limit memory)",
            format!(
                "add `{}` to the single line of /{PI_CMDLINE} and reboot",
                PI_CGROUP_FLAGS.join(" ")
            ),
        );
    }
    let release = kernel_release(root)?;
    if module_status(root, &release, "vxlan")? == ModuleStatus::Missing {
        r.problem(
            format!(
                "rpi: kernel {release} has no vxlan module (the cluster network needs it; Ubuntu \
                 21.10-23.10 raspi kernels ship it separately)"
            ),
            "apt-get install linux-modules-extra-raspi and reboot",
        );
    }
    let mem = read_meminfo(root)?;
    if mem.mem_total_kib < MICROK8S_MIN_MEMTOTAL_KIB {
        r.problem(
            format!(
                "rpi: this node has {} MiB of RAM; microk8s' low-memory guard blocks the control \
                 plane below 512 MiB",
                mem.mem_total_kib / 1024
            ),
            "use a Raspberry Pi with at least 1 GB (4 GB recommended)",
        );
    }
    Ok(r)
}

/// Whether the memory cgroup controller is available: listed in the cgroup2 root's
/// `cgroup.controllers`, or (cgroup v1) enabled in `proc/cgroups`.
pub fn memory_cgroup_enabled(root: &Path) -> Result<bool, PrepError> {
    if let Some(c) = read_optional(&root.join("sys/fs/cgroup/cgroup.controllers"))? {
        return Ok(c.split_whitespace().any(|w| w == "memory"));
    }
    if let Some(c) = read_optional(&root.join("proc/cgroups"))? {
        return Ok(c.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"memory") && f.get(3) == Some(&"1")
        }));
    }
    Ok(false)
}

/// What a Raspberry Pi node must do about the memory cgroup before installing MicroK8s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiCgroup {
    /// Enabled (or not a Pi boot layout): nothing to do.
    Ready,
    /// The flags were just added to `cmdline.txt`: reboot once so the kernel reads them.
    RebootNeeded,
    /// The flags are on the command line file but the running kernel still has no memory
    /// cgroup (the file is not the one the firmware reads, or the kernel ignores them): a reboot
    /// would not help, so never loop; the readiness check reports the problem.
    FlagsIgnored,
}

/// Decides (and, when needed, fixes `cmdline.txt` for) the Pi memory-cgroup reboot. Bounded: a
/// second boot with the flags present yields [`PiCgroup::FlagsIgnored`], never another reboot.
pub fn pi_cgroup_step(root: &Path) -> Result<PiCgroup, PrepError> {
    if memory_cgroup_enabled(root)? || !root.join(PI_CMDLINE).is_file() {
        return Ok(PiCgroup::Ready);
    }
    Ok(if ensure_pi_cgroup_flags(root)? {
        PiCgroup::RebootNeeded
    } else {
        PiCgroup::FlagsIgnored
    })
}

/// Adds the memory-cgroup flags to the Pi's `cmdline.txt` (one line) when missing. Returns
/// whether the file changed (then a reboot is needed). Idempotent.
pub fn ensure_pi_cgroup_flags(root: &Path) -> Result<bool, PrepError> {
    let path = root.join(PI_CMDLINE);
    let text = read_optional(&path)?.ok_or_else(|| PrepError::Read {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })?;
    let line = text.lines().next().unwrap_or("").trim_end();
    let mut words: Vec<&str> = line.split_whitespace().collect();
    let mut changed = false;
    for f in PI_CGROUP_FLAGS {
        if !words.contains(&f) {
            words.push(f);
            changed = true;
        }
    }
    if changed {
        write_atomic(&path, format!("{}\n", words.join(" ")).as_bytes())?;
    }
    Ok(changed)
}

// ---------------------------------------------------------------------------------------------
// kernel facts from the root filesystem

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub mem_total_kib: u64,
    pub hugepages_total: u64,
}

/// Parses `/proc/meminfo` (`MemTotal` is required; `HugePages_Total` defaults to 0).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let mut total = None;
    let mut huge = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let num = v
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        match k.trim() {
            "MemTotal" => total = num,
            "HugePages_Total" => huge = num.unwrap_or(0),
            _ => {}
        }
    }
    Ok(MemInfo {
        mem_total_kib: total.ok_or("no MemTotal line")?,
        hugepages_total: huge,
    })
}

pub fn read_meminfo(root: &Path) -> Result<MemInfo, PrepError> {
    let path = root.join("proc/meminfo");
    let text = read_required(&path)?;
    parse_meminfo(&text).map_err(|reason| PrepError::Malformed { path, reason })
}

/// The running kernel's release (`uname -r`), from `proc/sys/kernel/osrelease`.
pub fn kernel_release(root: &Path) -> Result<String, PrepError> {
    let path = root.join("proc/sys/kernel/osrelease");
    let rel = read_required(&path)?.trim().to_owned();
    if rel.is_empty() || rel.contains('/') {
        return Err(PrepError::Malformed {
            path,
            reason: format!("not a kernel release: {rel:?}"),
        });
    }
    Ok(rel)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleStatus {
    /// Listed in `proc/modules`.
    Loaded,
    /// Compiled into the kernel (`modules.builtin`).
    Builtin,
    /// In `modules.dep`: `modprobe` can load it.
    Available,
    Missing,
}

/// The kernel's module name for a file name or a `modprobe` argument: basename without
/// `.ko[.xz|.zst|.gz]`, `-` as `_`.
pub fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Where a module stands on this root, for kernel `release`. A missing `modules.dep` counts as
/// no loadable modules (the kernel's modules package is not installed).
pub fn module_status(root: &Path, release: &str, module: &str) -> Result<ModuleStatus, PrepError> {
    let want = module_name(module);
    if let Some(m) = read_optional(&root.join("proc/modules"))? {
        if m.lines()
            .any(|l| l.split_whitespace().next() == Some(want.as_str()))
        {
            return Ok(ModuleStatus::Loaded);
        }
    }
    let dir = root.join("lib/modules").join(release);
    if let Some(b) = read_optional(&dir.join("modules.builtin"))? {
        if b.lines().any(|l| module_name(l.trim()) == want) {
            return Ok(ModuleStatus::Builtin);
        }
    }
    if let Some(d) = read_optional(&dir.join("modules.dep"))? {
        if d.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(file, _)| module_name(file) == want)
        }) {
            return Ok(ModuleStatus::Available);
        }
    }
    Ok(ModuleStatus::Missing)
}

// ---------------------------------------------------------------------------------------------
// files

fn read_optional(path: &Path) -> Result<Option<String>, PrepError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PrepError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_required(path: &Path) -> Result<String, PrepError> {
    std::fs::read_to_string(path).map_err(|source| PrepError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Makes `path` hold exactly one setting line for a key: lines for which `same_key` is true are
/// the key's settings. If there is exactly one and `satisfied` accepts it, nothing changes;
/// otherwise they are all removed and `wanted` is appended. Other lines (comments, other keys)
/// are kept. Returns whether the file was written.
pub fn ensure_setting_line(
    path: &Path,
    wanted: &str,
    same_key: impl Fn(&str) -> bool,
    satisfied: impl Fn(&str) -> bool,
) -> Result<bool, PrepError> {
    let old = read_optional(path)?.unwrap_or_default();
    let matching: Vec<&str> = old.lines().filter(|l| same_key(l)).collect();
    if matching.len() == 1 && satisfied(matching[0]) {
        return Ok(false);
    }
    let mut new: String = old
        .lines()
        .filter(|l| !same_key(l))
        .flat_map(|l| [l, "\n"])
        .collect();
    new.push_str(wanted);
    new.push('\n');
    if new == old {
        return Ok(false);
    }
    write_atomic(path, new.as_bytes())?;
    tracing::info!(path = %path.display(), line = wanted, "wrote setting");
    Ok(true)
}

/// Writes a configuration file atomically (mode 0644) through the shared writer
/// [`rackseed_host::fs::write_atomic`]: temp file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PrepError> {
    rackseed_host::fs::write_atomic(path, bytes, 0o644).map_err(|e| PrepError::Write {
        path: path.to_owned(),
        reason: format!("{e:#}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-tcp.ko.zst"),
            "nvme_tcp"
        );
        assert_eq!(module_name("nvme_tcp"), "nvme_tcp");
        assert_eq!(module_name("kernel/drivers/net/vxlan/vxlan.ko"), "vxlan");
    }

    #[test]
    fn meminfo_parses_and_requires_memtotal() {
        let m = parse_meminfo(
            "MemTotal:        3884524 kB\nMemFree: 1 kB\nHugePages_Total:     512\nHugepagesize:       2048 kB\n",
        )
        .unwrap();
        assert_eq!(
            m,
            MemInfo {
                mem_total_kib: 3884524,
                hugepages_total: 512
            }
        );
        assert!(parse_meminfo("MemFree: 1 kB\n").is_err());
    }

    #[test]
    fn dpkg_status_counts_only_installed_packages() {
        let s = "Package: open-iscsi\nStatus: install ok installed\nVersion: 1\n\n\
                 Package: nfs-common\nStatus: deinstall ok config-files\n\n\
                 Package: lvm2\nArchitecture: arm64\nStatus: install ok installed\n";
        let set = parse_dpkg_status(s);
        assert!(set.contains("open-iscsi"));
        assert!(set.contains("lvm2"));
        assert!(!set.contains("nfs-common"));
    }

    #[test]
    fn setting_lines_are_replaced_not_duplicated_and_other_lines_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.conf");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            &p,
            "# keep me\nvm.nr_hugepages = 1024\nvm.swappiness=10\nvm.nr_hugepages=64\n",
        )
        .unwrap();
        let same = |l: &str| sysctl_key(l) == Some("vm.nr_hugepages");
        let ok = |l: &str| sysctl_value(l).is_some_and(|v| v >= 1024);
        assert!(ensure_setting_line(&p, "vm.nr_hugepages = 1024", same, ok).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "# keep me\nvm.swappiness=10\nvm.nr_hugepages = 1024\n"
        );
        assert!(!ensure_setting_line(&p, "vm.nr_hugepages = 1024", same, ok).unwrap());
        // A larger value set by the administrator is respected.
        std::fs::write(&p, "vm.nr_hugepages = 2048\n").unwrap();
        assert!(!ensure_setting_line(&p, "vm.nr_hugepages = 1024", same, ok).unwrap());
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "vm.nr_hugepages = 2048\n"
        );
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn readiness_ok_follows_problems() {
        let mut r = Readiness::default();
        assert!(r.ok);
        let mut other = Readiness::default();
        other.problem("x: broken", "fix x");
        r.merge(other);
        assert!(!r.ok);
        assert_eq!(r.fixes, ["fix x"]);
    }
}
