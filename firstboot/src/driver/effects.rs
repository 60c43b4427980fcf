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
use rackseed_config::{Metallb, Storage, Target};
use rackseed_formation::{Event, JoinPoint};

/// Timeout for waiting until MicroK8s is ready after install.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

impl Runtime {
    /// Starts node preparation, unless one is still running: then the running one's result
    /// answers this request too (never two MicroK8s installs at once).
    pub(super) fn spawn_prepare(&mut self) {
        let Some(running) = OneAtATime::start(&self.preparing) else {
            tracing::info!(
                "node preparation (the MicroK8s install) is still running; not started again, \
                 its result will answer"
            );
            self.timeline("node preparation still running; waiting for it (not started twice)");
            return;
        };
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.clone();
        let peers = self.peer_addrs();
        tokio::spawn(async move {
            let result = prepare(&agent, &tasks, &lone)
                .await
                .map_err(|e| format!("{e:#}"));
            // Done: a later request may start a new preparation (before the result is seen,
            // so a failure's retry is never refused).
            drop(running);
            // MicroK8s is installed now: the join point is known before the core hears that
            // preparation is done, so this node may grant slots as soon as it is authority.
            if let Some(jp) = learn_join_point(&agent, &peers).await {
                let _ = tasks
                    .send(TaskResult::Event(Box::new(Event::JoinPointKnown(jp))))
                    .await;
            }
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::NodePrepared(result))))
                .await;
        });
    }

    pub(super) fn spawn_join(&self, via: JoinPoint, worker: bool, timeout: Duration) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let lone = self.lone.swap(false, Ordering::SeqCst);
        tokio::spawn(async move {
            let joining = join(&agent, &tasks, via, worker, lone);
            let result = match tokio::time::timeout(timeout, joining).await {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err(format!("join did not finish within {timeout:?}")),
            };
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::JoinFinished(result))))
                .await;
        });
    }

    /// What the MicroK8s poll depends on, for its cadence (`driver/cadence.rs`).
    fn poll_key(&self) -> super::cadence::PollKey {
        super::cadence::PollKey {
            phase: self.doc.phase.clone(),
            role: self.doc.role.clone(),
            microk8s: self.doc.microk8s.clone(),
            peers: self.discovery.peers().len(),
        }
    }

    /// The verified peers' addresses (one each, IPv4 first).
    pub(super) fn peer_addrs(&self) -> Vec<IpAddr> {
        self.discovery
            .peers()
            .iter()
            .filter_map(|p| p.preferred_addr())
            .collect()
    }

    pub(super) fn spawn_addons(&self) {
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let peers = self.peer_addrs();
        // Longhorn's install reads the members' prerequisite verdicts from their documents.
        let members = addons::longhorn::CoordinatorReports {
            this_node: agent.hostname.clone(),
            client: self.client.clone(),
            peers: (self.discovery.peers().iter())
                .filter_map(|p| {
                    let addr = std::net::SocketAddr::new(p.preferred_addr()?, p.port);
                    Some((p.node_id.clone(), addr, p.fingerprint.clone()))
                })
                .collect(),
        };
        tokio::spawn(async move {
            let result = enable_addons(&agent, &tasks, &peers, &members)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::AddonsEnabled(result))))
                .await;
        });
    }

    pub(super) fn spawn_microk8s_poll(&self) {
        if !self.poll_cadence.due(self.poll_key()) {
            return;
        }
        let agent = self.agent.clone();
        let tasks = self.tasks.clone();
        let ha_size = (agent.config.cluster.control_plane as usize).min(3);
        let peers = self.peer_addrs();
        let api = self.api_address_job();
        // Node labels go on once this node is a control-plane member (see `labels`).
        let labeller = self.doc.phase == "member"
            && self.doc.role.as_deref() == Some("control-plane")
            && !super::labels::wanted(&agent).is_empty();
        tokio::spawn(async move {
            let status = agent.microk8s.status().await.ok();
            let view = status.clone().map(|st| microk8s_view(st, ha_size));
            let _ = tasks.send(TaskResult::Microk8s(view)).await;
            if labeller && matches!(status, Some(Status::Running(_))) {
                let rows = super::labels::apply_node_labels(&agent).await;
                let _ = tasks.send(TaskResult::NodeLabels(rows)).await;
            }
            // Longhorn's health, where helm and kubectl answer: a running control-plane node.
            if let (Storage::Longhorn, Some(Status::Running(_)), Some(tools)) = (
                agent.config.addons.storage,
                status.as_ref(),
                agent.microk8s.cluster_tools(),
            ) {
                let health = addons::longhorn::health(tools.as_ref()).await;
                let _ = tasks.send(TaskResult::Storage(health)).await;
            }
            if let Some((keeper, cp_member, docs)) = api {
                let view = keeper
                    .maintain(&agent, cp_member, status.as_ref(), &peers, &docs)
                    .await;
                let _ = tasks.send(TaskResult::ApiAddress(view)).await;
            }
            // A restarted member prepares nothing, and an address can change: re-learnt on
            // every poll (the core acts only on a change).
            if let Some(jp) = learn_join_point(&agent, &peers).await {
                let _ = tasks
                    .send(TaskResult::Event(Box::new(Event::JoinPointKnown(jp))))
                    .await;
            }
        });
    }
}

/// A task of which at most one runs at a time: [`OneAtATime::start`] claims the flag (or
/// finds it claimed), and dropping the returned value (also when the task panics or is
/// cancelled) frees it.
pub(super) struct OneAtATime(std::sync::Arc<AtomicBool>);

impl OneAtATime {
    /// Claims `flag`; `None` while another holder runs.
    pub(super) fn start(flag: &std::sync::Arc<AtomicBool>) -> Option<OneAtATime> {
        (!flag.swap(true, Ordering::SeqCst)).then(|| OneAtATime(flag.clone()))
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Where other nodes join this one: its own address on the cluster network and its MicroK8s
/// cluster agent's certificate fingerprint. `None` until MicroK8s is installed.
async fn learn_join_point(agent: &Agent, peers: &[IpAddr]) -> Option<JoinPoint> {
    let fingerprint = match agent.microk8s.cluster_agent_fingerprint().await {
        Ok(fp) => fp,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "cluster agent fingerprint not known yet");
            return None;
        }
    };
    let ip = own_address(&local_addresses(&agent.interfaces), peers)?;
    JoinPoint::new(ip, fingerprint)
}

/// One address of this node: interface name, address, prefix length.
type LocalAddr = (String, IpAddr, u8);

/// This node's addresses on the interfaces discovery uses (no IPv6 link-local ones).
pub(super) fn local_addresses(
    interfaces: &rackseed_protocol::discovery::InterfaceChoice,
) -> Vec<LocalAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            let mask = ifa.netmask;
            let (ip, prefix) = if let Some(v4) = addr.as_sockaddr_in() {
                let bits = mask
                    .and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones()))
                    .unwrap_or(32);
                (IpAddr::V4(v4.ip()), bits as u8)
            } else {
                let v6 = addr.as_sockaddr_in6()?.ip();
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    return None;
                }
                let bits = mask
                    .and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                    .unwrap_or(128);
                (IpAddr::V6(v6), bits as u8)
            };
            interfaces
                .wants(&ifa.interface_name, ip.is_loopback())
                .then(|| (ifa.interface_name.clone(), ip, prefix))
        })
        .collect()
}

/// The address joiners should dial: the local address whose subnet holds the most verified
/// peers (a VM's cluster NIC rather than its management NIC, whose address every VM shares),
/// then IPv4 before IPv6, then by interface name. The joiner dials the address the
/// authenticated grant names, never one read from an (unsigned) mDNS address record.
pub(super) fn own_address(local: &[LocalAddr], peers: &[IpAddr]) -> Option<IpAddr> {
    let in_subnet = |ip: IpAddr, prefix: u8, peer: IpAddr| match (ip, peer) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    };
    local
        .iter()
        .min_by_key(|(name, ip, prefix)| {
            let near = peers
                .iter()
                .filter(|p| in_subnet(*ip, *prefix, **p))
                .count();
            (std::cmp::Reverse(near), !ip.is_ipv4(), name.clone(), *ip)
        })
        .map(|(_, ip, _)| *ip)
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

/// The node's prerequisites prepared and checked ([`addons::prep::prepare_and_record_with`]:
/// the storage's, the Pi's, and the packages of the API address and MetalLB's auto range, the
/// last only on a node whose keepalived is the packaged one; Longhorn's staged container
/// images imported once MicroK8s is installed), the verdict kept in the state folder.
pub(super) async fn check_prerequisites(agent: &Agent) -> Result<addons::Readiness> {
    let on_node = agent.keepalived == crate::system::keepalived::KeepalivedControl::Systemd;
    // MicroK8s' tools import Longhorn's staged images, once MicroK8s is installed; asked only
    // on a node that stages some.
    let tools = if addons::prep::has_staged_images(&agent.root, &agent.config) {
        match agent.microk8s.is_installed().await {
            Ok(true) => agent.microk8s.cluster_tools(),
            _ => None,
        }
    } else {
        None
    };
    addons::prep::prepare_and_record_with(
        &agent.root,
        &agent.config,
        on_node,
        &agent.state_dir,
        &addons::prep::HostKernel,
        tools.as_deref(),
    )
    .await
    .context("preparing the node")
}

/// Node preparation: storage/hardware checks, then install MicroK8s and wait until it is ready.
async fn prepare(agent: &Agent, tasks: &mpsc::Sender<TaskResult>, lone: &AtomicBool) -> Result<()> {
    let readiness = check_prerequisites(agent).await?;
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
    wait_for_clock(agent, tasks, "installing MicroK8s").await;
    let source = match &agent.config.microk8s.offline_snaps {
        Some(dir) => InstallSource::Staged(dir.clone()),
        None => InstallSource::Channel(agent.config.microk8s.channel.clone()),
    };
    let outcome = agent
        .microk8s
        .install(&source, agent.keyring.current().secret())
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
    // Longhorn's staged container images go into containerd now that MicroK8s runs.
    if addons::prep::has_staged_images(&agent.root, &agent.config) {
        let readiness = check_prerequisites(agent).await?;
        let _ = tasks
            .send(TaskResult::Problems {
                problems: readiness.problems,
                fixes: readiness.fixes,
            })
            .await;
    }
    // A lone node now is not a member of anything until this agent joins it somewhere.
    let alone =
        matches!(agent.microk8s.status().await, Ok(Status::Running(s)) if s.datastore.len() <= 1);
    lone.store(alone, Ordering::SeqCst);
    Ok(())
}

/// `microk8s join` through the granter's join point, then wait until ready. The join URL
/// carries the granter's cluster agent fingerprint, so `microk8s join` refuses any other
/// endpoint before it sends the token. A node that already is a member (a restart after a
/// join that succeeded) reports success without joining again; that check is skipped only
/// for the first join after preparation found a lone node (`lone`).
async fn join(
    agent: &Agent,
    tasks: &mpsc::Sender<TaskResult>,
    via: JoinPoint,
    worker: bool,
    lone: bool,
) -> Result<()> {
    let seed_ip = via.ip;
    if !lone && already_joined(agent.microk8s.as_ref(), seed_ip, worker).await {
        tracing::info!(%seed_ip, "already a member; not joining again");
        return Ok(());
    }
    wait_for_clock(agent, tasks, "joining MicroK8s").await;
    let mut target = JoinTarget::new(seed_ip, agent.keyring.current().secret().microk8s_token());
    target.fingerprint = Some(via.fingerprint);
    let role = if worker {
        JoinRole::Worker
    } else {
        JoinRole::ControlPlane
    };
    join_with_retries(agent.microk8s.as_ref(), &target, role).await?;
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

/// Waits (bounded, [`crate::system::timesync`]) until the clock is synchronised before
/// MicroK8s work; the wait shows in the status line and the status document's problems.
async fn wait_for_clock(agent: &Agent, tasks: &mpsc::Sender<TaskResult>, before: &str) {
    let mut waited = false;
    let outcome = agent
        .time_sync
        .wait(before, |line| {
            waited = true;
            tracing::info!(status = %line);
            agent.notifier.status(&line);
            let _ = tasks.try_send(TaskResult::TimeSync(Some(line)));
        })
        .await;
    if let Some(line) = crate::system::timesync::describe(outcome, before) {
        match outcome {
            crate::system::timesync::Outcome::GaveUp { .. } => tracing::warn!("{line}"),
            _ => tracing::info!("{line}"),
        }
        agent.notifier.status(&line);
    }
    if waited {
        let _ = tasks.send(TaskResult::TimeSync(None)).await;
    }
}

/// Most attempts of one granted join when it fails transiently.
const JOIN_ATTEMPTS: u32 = 6;
/// The first retry's delay; each next one doubles, up to [`JOIN_RETRY_MAX`].
const JOIN_RETRY_FIRST: Duration = Duration::from_millis(100);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(3);

/// `microk8s join`, run again (up to [`JOIN_ATTEMPTS`] times in all) while it fails
/// transiently ([`crate::system::microk8s::JoinError::is_transient`]: two workers' certificate
/// signings collided on the seed). Each retry waits a random delay of up to the current backoff
/// (100 ms doubling, at most 3 s), so workers that collided spread out. The whole join stays
/// bounded by the caller's join timeout; any other failure ends it at once (it needs a new
/// grant).
async fn join_with_retries(mk: &dyn Microk8s, target: &JoinTarget, role: JoinRole) -> Result<()> {
    let mut backoff = JOIN_RETRY_FIRST;
    let mut attempt = 1;
    loop {
        match mk.join(target, role).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && attempt < JOIN_ATTEMPTS => {
                let wait = backoff.mul_f64(rand::random::<f64>());
                tracing::info!(seed = %target.seed, attempt, ?wait, "join failed transiently, retrying: {e}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(JOIN_RETRY_MAX);
                attempt += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("microk8s join via {} (attempt {attempt})", target.seed)
                })
            }
        }
    }
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
    members: &addons::longhorn::CoordinatorReports,
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
        let result = addons::run_addon(
            agent.microk8s.as_ref(),
            &agent.config,
            &agent.root,
            &agent.state_dir,
            &addons::prep::HostKernel,
            &next,
            members,
        )
        .await
        .map(|done| tracing::info!(addon = %next.name, %done, "addon enabled"));
        addons::progress::record_result(&mut progress, &next.name, result)?;
        file.store(&progress)?;
        let _ = tasks.send(TaskResult::Addons(addon_rows(&progress))).await;
        tokio::time::sleep(addons::progress::wait_before_retry(&progress, &next.name)).await;
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
    let mut reserved: Vec<std::net::Ipv4Addr> = match &agent.config.network.addressing {
        rackseed_config::Addressing::Static { gateway, dns } => std::iter::once(gateway)
            .chain(dns.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        rackseed_config::Addressing::Dhcp => Vec::new(),
    };
    // The floating API address is never handed to MetalLB (it answers ARP only while held).
    reserved.extend(super::api_auto::known(agent));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn la(name: &str, ip: &str, prefix: u8) -> LocalAddr {
        (name.into(), ip.parse().unwrap(), prefix)
    }

    #[test]
    fn one_preparation_at_a_time_and_the_next_once_it_ended_or_panicked() {
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let first = OneAtATime::start(&flag).expect("nothing runs yet");
        assert!(
            OneAtATime::start(&flag).is_none(),
            "a second while the first runs"
        );
        drop(first);
        let again = OneAtATime::start(&flag).expect("the first ended");
        // A panicking task frees it too (the guard drops while unwinding).
        let f = flag.clone();
        let res = std::thread::spawn(move || {
            let _held = again;
            assert!(OneAtATime::start(&f).is_none());
            panic!("the preparation task panicked");
        })
        .join();
        assert!(res.is_err());
        assert!(OneAtATime::start(&flag).is_some());
    }

    #[test]
    fn the_join_address_is_the_one_on_the_peers_network() {
        // A QEMU VM: the management NIC (same address on every VM) sorts first by name.
        let local = [
            la("enp0s2", "10.0.2.15", 24),
            la("enp0s3", "192.168.76.12", 24),
        ];
        let peers = [
            "192.168.76.11".parse().unwrap(),
            "192.168.76.13".parse().unwrap(),
        ];
        assert_eq!(
            own_address(&local, &peers),
            Some("192.168.76.12".parse().unwrap())
        );
        // No peer seen yet: IPv4 first, then by name.
        let local = [la("eth1", "fd00::5", 64), la("eth0", "10.0.0.5", 24)];
        assert_eq!(own_address(&local, &[]), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(own_address(&[], &peers), None);
        // A peer on the IPv6 network only.
        let peers = ["fd00::9".parse().unwrap()];
        assert_eq!(
            own_address(&local, &peers),
            Some("fd00::5".parse().unwrap())
        );
    }
}
