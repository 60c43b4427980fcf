//! Addons and the node preparation they need: what to pass to `microk8s enable`, how far the
//! enabling got, and whether this node can host the chosen storage.
//!
//! The pieces, in the order the agent uses them:
//! - [`prep`]: runs on **every** node before it joins. Persists and applies hugepages and the
//!   `nvme-tcp` module for Mayastor, checks Longhorn's and Rook-Ceph's prerequisites and, on
//!   Raspberry Pis, the memory cgroup and the `vxlan` module. Returns a [`prep::Readiness`]
//!   (problems + fixes) instead of failing silently. All paths are relative to a root directory
//!   so tests use a fake root filesystem.
//! - [`autorange`]: for `metallb.addresses = "auto"`, picks free IPv4 addresses at the top of the
//!   node's subnet and ARP-probes each one through an [`autorange::AddressProber`].
//! - [`plan`]: turns the configuration (plus the resolved auto range) into the exact
//!   `microk8s enable` argument lists, in order, and the `longhorn` step MicroK8s has no addon
//!   for. Also [`plan::prerequisite_notes`] for `imagebuilder validate`.
//! - [`longhorn`]: that step (Longhorn with MicroK8s' helm, CSI snapshots) and its health;
//!   [`run_addon`] runs one planned step, `longhorn` through it and the rest through
//!   `microk8s enable`.
//! - [`progress`]: the persisted per-addon state (`pending` / `enabling` / `enabled` /
//!   `failed`) that lets the driver resume after a crash mid-enable (enable is idempotent in
//!   MicroK8s, so the addon that was `enabling` is simply run again).
//! - `fakes`: behaving fakes of the two host interfaces for tests of this module and of the
//!   driver.
//!
//! To add an addon: add its config in `config::model`, its argv in [`plan::plan_addon_enables`],
//! its node preparation (if any) in [`prep`], and a line in [`plan::prerequisite_notes`].

pub mod autorange;
#[cfg(any(test, feature = "testing"))]
pub mod fakes;
pub mod longhorn;
pub mod plan;
pub mod prep;
pub mod progress;

pub use autorange::{
    choose_auto_range, AddressProber, ArpingProber, AutoRange, AutoRangeError, AutoRangeRequest,
};
pub use plan::{
    plan_addon_enables, prerequisite_notes, AddonEnable, AddonPlan, ManualStep, PlanContext,
    PlanError,
};
pub use prep::{prepare_node, KernelControl, Readiness};
pub use progress::{next_addon_to_enable, record_result, AddonProgress, AddonState};

use std::path::Path;

use rackseed_config::ClusterConfig;

use crate::system::microk8s::Microk8s;

/// Runs one planned step on this (control-plane) node: [`plan::LONGHORN`] re-checks this
/// node's Longhorn prerequisites through `kernel` (preparing what it can, and importing its
/// staged container images not imported yet, [`prep::import_staged_images`]) and then runs
/// [`longhorn::install`] with MicroK8s' helm and kubectl; every other step is `microk8s enable`.
/// `root` is the host's root (`/` on a node); the staged folder `addons.offline` is found under
/// it. `members` gives the other members' prerequisite verdicts (read only for `longhorn`).
/// The error is the reason shown in status.
pub async fn run_addon<K: KernelControl>(
    mk: &dyn Microk8s,
    cfg: &ClusterConfig,
    root: &Path,
    state_dir: &Path,
    kernel: &K,
    step: &AddonEnable,
    members: &dyn longhorn::MemberReports,
) -> Result<String, String> {
    if step.name != plan::LONGHORN {
        return mk
            .enable(&step.name, &step.args)
            .await
            .map(|o| format!("{o:?}"))
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    }
    let tools = mk
        .cluster_tools()
        .ok_or("longhorn: this microk8s adapter has no helm or kubectl")?;
    let offline = cfg
        .addons
        .offline
        .as_deref()
        .map(|o| prep::under_root(root, o));
    let mut local = prep::prepare_longhorn(root, &cfg.addons.longhorn, offline.as_deref(), kernel)
        .await
        .map_err(|e| format!("longhorn: checking this node: {:#}", anyhow::Error::from(e)))?;
    // This node's staged container images, imported now if an earlier import failed.
    if let Some(dir) = &offline {
        local.merge(
            prep::import_staged_images(dir, state_dir, Some(tools.as_ref()))
                .await
                .map_err(|e| {
                    format!(
                        "longhorn: importing this node's images: {:#}",
                        anyhow::Error::from(e)
                    )
                })?,
        );
    }
    let mut cfg = cfg.clone();
    cfg.addons.offline = offline;
    longhorn::install(mk, tools.as_ref(), &cfg, state_dir, &local, members).await
}
