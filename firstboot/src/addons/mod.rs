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
//!   `microk8s enable` argument lists, in order, and the manual steps MicroK8s has no addon for
//!   (Longhorn). Also [`plan::prerequisite_notes`] for `imagebuilder validate`.
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
