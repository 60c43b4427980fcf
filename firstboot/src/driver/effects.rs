//! The driver's long-running effects: node preparation (storage checks, the Raspberry Pi
//! memory cgroup, the MicroK8s install), `microk8s join`, addon enablement (with the automatic
//! MetalLB range) and the periodic read of MicroK8s' own status.
//!
//! Each `spawn_*` method starts a tokio task that reports back through the task channel as a
//! [`TaskResult`], so the loop in [`super`] never waits on the host. To add an effect: write
//! its async function here, spawn it from a `spawn_*` method, and turn its result into an
//! [`Event`] (or a status update) in [`Runtime::task_result`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::status::{addon_rows, microk8s_view};
use super::{addons_file, Agent, Runtime, TaskResult};
use crate::addons::{self, progress::AddonProgress};
use crate::system::microk8s::{InstallSource, JoinRole, JoinTarget, Microk8s, Status};
use rackseed_config::{Metallb, Target};
use rackseed_formation::Event;

/// Timeout for waiting until MicroK8s is ready after install.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

impl Runtime {
    pub(super) fn spawn_prepare(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.clone();
        tokio::spawn(async move {
            let result = prepare(&agent, &tasks, &lone)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::NodePrepared(result))))
                .await;
        });
    }

    pub(super) fn spawn_join(&self, seed_ip: IpAddr, worker: bool, timeout: Duration) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.swap(false, Ordering::SeqCst);
        tokio::spawn(async move {
            let joining = join(&agent, seed_ip, worker, lone);
            let result = match tokio::time::timeout(timeout, joining).await {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err(format!("join did not finish within {timeout:?}")),
            };
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::JoinFinished(result))))
                .await;
        });
    }

    pub(super) fn spawn_addons(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let peers: Vec<IpAddr> = self
            .discovery
            .peers()
            .iter()
            .filter_map(|p| p.preferred_addr())
            .collect();
        tokio::spawn(async move {
            let result = enable_addons(&agent, &tasks, &peers)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::AddonsEnabled(result))))
                .await;
        });
    }

    pub(super) fn spawn_microk8s_poll(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let ha_size = (agent.config.cluster.control_plane as usize).min(3);
        tokio::spawn(async move {
            let view = agent
                .microk8s
                .status()
                .await
                .ok()
                .map(|st| microk8s_view(st, ha_size));
            let _ = tasks.send(TaskResult::Microk8s(view)).await;
        });
    }
}

/// A Pi booted without the memory cgroup (an image not made by rackseed, or a `cmdline.txt`
/// edited since): add the flags and reboot once; the persisted phase resumes preparation after
/// the reboot. Never reboots twice for this ([`addons::prep::pi_cgroup_step`]), and never when
/// `--root` is not `/` (a test must not reboot its host).
async fn pi_memory_cgroup(agent: &Agent) -> Result<()> {
    use addons::prep::PiCgroup;
    match addons::prep::pi_cgroup_step(&agent.root).context("checking the memory cgroup")? {
        PiCgroup::Ready | PiCgroup::FlagsIgnored => Ok(()),
        PiCgroup::RebootNeeded => {
            let why = "added cgroup_enable=memory cgroup_memory=1 to cmdline.txt; rebooting once \
                       so the kernel reads them";
            if agent.root != std::path::Path::new("/") {
                anyhow::bail!("{why} (not rebooting: --root is {})", agent.root.display());
            }
            tracing::warn!("{why}");
            agent
                .notifier
                .status("rebooting once to enable the memory cgroup");
            rackseed_host::command::Cmd::new("systemctl", Duration::from_secs(30))
                .arg("reboot")
                .run()
                .await
                .context("systemctl reboot")?;
            anyhow::bail!("{why}")
        }
    }
}

/// Node preparation: storage/hardware checks, then install MicroK8s and wait until it is ready.
async fn prepare(agent: &Agent, tasks: &mpsc::Sender<TaskResult>, lone: &AtomicBool) -> Result<()> {
    let readiness = addons::prep::prepare_node(
        &agent.root,
        agent.config.addons.storage,
        agent.config.image.target,
        &addons::prep::HostKernel,
    )
    .await
    .context("preparing the node")?;
    let _ = tasks
        .send(TaskResult::Problems {
            problems: readiness.problems.clone(),
            fixes: readiness.fixes.clone(),
        })
        .await;
    if matches!(agent.config.image.target, Target::Rpi4 | Target::Rpi5) {
        for (p, f) in readiness.problems.iter().zip(&readiness.fixes) {
            tracing::warn!(problem = %p, fix = %f, "raspberry pi check");
        }
        pi_memory_cgroup(agent).await?;
    }
    let source = match &agent.config.microk8s.offline_snaps {
        Some(dir) => InstallSource::Staged(dir.clone()),
        None => InstallSource::Channel(agent.config.microk8s.channel.clone()),
    };
    let outcome = agent
        .microk8s
        .install(&source, &agent.secret)
        .await
        .context("installing microk8s")?;
    tracing::info!(?outcome, "microk8s installed");
    if !agent
        .microk8s
        .wait_ready(READY_TIMEOUT)
        .await
        .context("waiting for microk8s to be ready")?
    {
        anyhow::bail!("microk8s did not become ready within {READY_TIMEOUT:?}");
    }
    // A lone node now is not a member of anything until this agent joins it somewhere.
    let alone =
        matches!(agent.microk8s.status().await, Ok(Status::Running(s)) if s.datastore.len() <= 1);
    lone.store(alone, Ordering::SeqCst);
    Ok(())
}

/// `microk8s join` through the seed, then wait until ready. A node that already is a member
/// (a restart after a join that succeeded) reports success without joining again; that
/// check is skipped only for the first join after preparation found a lone node (`lone`).
async fn join(agent: &Agent, seed_ip: IpAddr, worker: bool, lone: bool) -> Result<()> {
    if !lone && already_joined(agent.microk8s.as_ref(), seed_ip, worker).await {
        tracing::info!(%seed_ip, "already a member; not joining again");
        return Ok(());
    }
    let target = JoinTarget::new(seed_ip, agent.secret.microk8s_token());
    let role = if worker {
        JoinRole::Worker
    } else {
        JoinRole::ControlPlane
    };
    agent
        .microk8s
        .join(&target, role)
        .await
        .with_context(|| format!("microk8s join via {seed_ip}"))?;
    if !worker
        && !agent
            .microk8s
            .wait_ready(READY_TIMEOUT)
            .await
            .context("waiting for microk8s after the join")?
    {
        anyhow::bail!("microk8s was not ready within {READY_TIMEOUT:?} after joining");
    }
    Ok(())
}

async fn already_joined(mk: &dyn Microk8s, seed_ip: IpAddr, worker: bool) -> bool {
    match mk.status().await {
        Ok(Status::WorkerNode) => worker,
        Ok(Status::Running(s)) if !worker => {
            let seed = format!("{seed_ip}:19001");
            s.datastore.len() > 1 && s.datastore.iter().any(|n| n.address == seed)
        }
        _ => false,
    }
}

/// Enables the planned addons one by one, persisting progress so a crash mid-enable resumes.
async fn enable_addons(
    agent: &Agent,
    tasks: &mpsc::Sender<TaskResult>,
    peers: &[IpAddr],
) -> Result<()> {
    let file = addons_file(&agent.state_dir);
    let mut progress: AddonProgress = match file.load()? {
        Some(mut p) => {
            let p: &mut AddonProgress = &mut p;
            p.resume();
            p.clone()
        }
        None => {
            let ctx = addons::plan::PlanContext {
                metallb_auto: auto_metallb(agent, peers).await?,
            };
            let plan =
                addons::plan::plan_addon_enables(&agent.config, &ctx).context("planning addons")?;
            AddonProgress::new(plan)
        }
    };
    file.store(&progress)?;
    let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
    while let Some(next) = addons::progress::next_addon_to_enable(&progress).cloned() {
        progress.mark_enabling(&next.name)?;
        file.store(&progress)?;
        let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
        let result = agent
            .microk8s
            .enable(&next.name, &next.args)
            .await
            .map(|_| ())
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
        addons::progress::record_result(&mut progress, &next.name, result)?;
        file.store(&progress)?;
        let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
    }
    let failed: Vec<String> = progress
        .addons
        .iter()
        .filter(|r| matches!(r.state, addons::progress::AddonState::Failed { .. }))
        .map(|r| r.enable.name.clone())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("addons failed: {}", failed.join(", "))
    }
}

async fn auto_metallb(
    agent: &Agent,
    peers: &[IpAddr],
) -> Result<Option<Vec<rackseed_config::AddressBlock>>> {
    let Some(Metallb::Auto { count }) = &agent.config.addons.metallb else {
        return Ok(None);
    };
    let iface = match &agent.config.network.interface {
        Some(i) => i.clone(),
        None => crate::system::identity::primary_mac(std::path::Path::new("/"), None)?.0,
    };
    let net = addons::autorange::interface_ipv4(&iface).await?;
    let mut nodes: Vec<std::net::Ipv4Addr> = peers
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    nodes.push(net.addr());
    let reserved = match &agent.config.network.addressing {
        rackseed_config::Addressing::Static { gateway, dns } => std::iter::once(gateway)
            .chain(dns.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        rackseed_config::Addressing::Dhcp => Vec::new(),
    };
    let range = addons::autorange::choose_auto_range(
        &addons::autorange::ArpingProber::new(iface),
        &addons::autorange::AutoRangeRequest {
            interface: net,
            nodes,
            reserved,
            count: *count,
        },
    )
    .await?;
    tracing::info!(addresses = ?range.addresses, in_use = ?range.in_use, "metallb auto range");
    Ok(Some(range.blocks))
}
