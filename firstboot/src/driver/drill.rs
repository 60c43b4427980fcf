//! The node's side of a failover drill (`imagebuilder drill` against real nodes): the handler
//! of the coordinator's `POST /v1/drill` ([`rackseed_protocol::coordinator::drill`]), which only
//! holders of the cluster secret reach, each request with a single-use nonce.
//!
//! What a node does when asked, exactly (all through [`Cmd`], each step logged; a step that
//! fails is logged and the next one still runs, so a half-stopped MicroK8s still loses its
//! network):
//! - **isolate** (the default of `imagebuilder drill`):
//!   1. `microk8s stop` (stops every MicroK8s service: API server, kubelet, dqlite, the
//!      cluster agent; timeout 3 min);
//!   2. `ip link set dev IF down` for every interface this node announces itself on (the
//!      interfaces discovery uses: `network.interface`, else every non-loopback, non-container
//!      interface with an IPv4 address): keepalived, MetalLB's speaker and the agent itself
//!      are cut off with it;
//!   3. after `restore_after_s` (10 s to 4 h, chosen by the workstation): `ip link set dev IF
//!      up` for the same interfaces, then `microk8s start`. The node is back without a person,
//!      unless it lost power meanwhile (the link comes up at boot anyway; MicroK8s stays
//!      stopped until `microk8s start`, as after any `microk8s stop`).
//! - **power-off**: `systemctl poweroff`. A person powers it on again.
//!
//! The node answers first with what it will do ([`DrillAck`]) and starts
//! [`DRILL_GRACE`] later, so the answer leaves before the network goes. A request naming
//! another node id is refused (a request sent to an address that moved cuts off no other
//! machine), and so is a second drill while one runs on this node.
//!
//! To add a way of cutting a node off: add a [`CutOff`] variant and its steps in
//! [`Cutter::plan`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rackseed_host::command::Cmd;
use rackseed_protocol::coordinator::drill::DRILL_GRACE;
use rackseed_protocol::coordinator::{CutOff, DrillAck, DrillHandler, DrillRequest};
use rackseed_protocol::discovery::InterfaceChoice;

/// Timeouts of the steps.
const MICROK8S_TIMEOUT: Duration = Duration::from_secs(180);
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Programs the cut-off runs (paths configurable for tests).
#[derive(Debug, Clone)]
pub struct CutOffControl {
    /// The `microk8s` command.
    pub microk8s: PathBuf,
    /// `ip` (iproute2).
    pub ip: PathBuf,
    /// `systemctl`.
    pub systemctl: PathBuf,
}

impl Default for CutOffControl {
    fn default() -> Self {
        CutOffControl {
            microk8s: "microk8s".into(),
            ip: "ip".into(),
            systemctl: "systemctl".into(),
        }
    }
}

/// One step: the program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

impl Step {
    fn new(program: &std::path::Path, args: &[&str], timeout: Duration) -> Step {
        Step {
            program: program.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    /// The step in words, as the ack and the log show it.
    pub fn words(&self) -> String {
        let name = self
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::iter::once(name)
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a cut-off runs: now, then (isolate) after a wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub cut: Vec<Step>,
    pub restore_after: Option<Duration>,
    pub restore: Vec<Step>,
}

/// Accepts drill requests and carries them out (see the module docs).
pub struct Cutter {
    node_id: String,
    interfaces: InterfaceChoice,
    control: CutOffControl,
    busy: AtomicBool,
}

impl Cutter {
    pub fn new(node_id: &str, interfaces: InterfaceChoice, control: CutOffControl) -> Cutter {
        Cutter {
            node_id: node_id.to_owned(),
            interfaces,
            control,
            busy: AtomicBool::new(false),
        }
    }

    /// The handler to install on the coordinator.
    pub fn handler(self: Arc<Self>) -> DrillHandler {
        Arc::new(move |req: DrillRequest| {
            let me = self.clone();
            Box::pin(async move { me.accept(req) })
        })
    }

    /// The steps of `cut` for a node announcing itself on `interfaces`.
    pub fn plan(&self, cut: &CutOff, interfaces: &[String]) -> Plan {
        let c = &self.control;
        match cut {
            CutOff::Isolate {
                restore_after_s, ..
            } => {
                let mut cut = vec![Step::new(&c.microk8s, &["stop"], MICROK8S_TIMEOUT)];
                let mut restore = Vec::new();
                for i in interfaces {
                    cut.push(Step::new(
                        &c.ip,
                        &["link", "set", "dev", i, "down"],
                        IP_TIMEOUT,
                    ));
                    restore.push(Step::new(
                        &c.ip,
                        &["link", "set", "dev", i, "up"],
                        IP_TIMEOUT,
                    ));
                }
                restore.push(Step::new(&c.microk8s, &["start"], MICROK8S_TIMEOUT));
                Plan {
                    cut,
                    restore_after: Some(Duration::from_secs(*restore_after_s)),
                    restore,
                }
            }
            CutOff::PowerOff { .. } => Plan {
                cut: vec![Step::new(&c.systemctl, &["poweroff"], IP_TIMEOUT)],
                restore_after: None,
                restore: vec![],
            },
        }
    }

    /// Checks the request, answers what will happen, and starts it in the background.
    fn accept(self: Arc<Self>, req: DrillRequest) -> Result<DrillAck, String> {
        if req.cut.node_id() != self.node_id {
            return Err(format!(
                "this is node {}, not {}: nothing done",
                self.node_id,
                req.cut.node_id()
            ));
        }
        let interfaces = announced_interfaces(&self.interfaces);
        if matches!(req.cut, CutOff::Isolate { .. }) && interfaces.is_empty() {
            return Err("no network interface with an IPv4 address to take down".into());
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("a drill is already running on this node".into());
        }
        let plan = self.plan(&req.cut, &interfaces);
        let ack = DrillAck {
            node_id: self.node_id.clone(),
            steps: plan.cut.iter().map(Step::words).collect(),
            restores_after_s: plan.restore_after.map(|d| d.as_secs()),
        };
        tracing::warn!(
            requester = %req.from,
            cut = req.cut.name(),
            steps = ?ack.steps,
            "failover drill: cutting this node off in {DRILL_GRACE:?}"
        );
        tokio::spawn(async move {
            tokio::time::sleep(DRILL_GRACE).await;
            run_steps(&plan.cut).await;
            if let Some(wait) = plan.restore_after {
                tokio::time::sleep(wait).await;
                run_steps(&plan.restore).await;
                tracing::warn!("failover drill: this node is back (network up, MicroK8s started)");
            }
            self.busy.store(false, Ordering::SeqCst);
        });
        Ok(ack)
    }
}

async fn run_steps(steps: &[Step]) {
    for s in steps {
        let res = Cmd::new(&s.program, s.timeout).args(&s.args).run().await;
        match res {
            Ok(_) => tracing::warn!(step = %s.words(), "failover drill: done"),
            Err(e) => tracing::warn!(step = %s.words(), error = %e, "failover drill: step failed"),
        }
    }
}

/// The interfaces discovery announces this node on: wanted by `choice`, not loopback, with an
/// IPv4 address (sorted, once each).
pub fn announced_interfaces(choice: &InterfaceChoice) -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<String> = addrs
        .filter(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some()
        })
        .filter(|a| {
            let loopback = a
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
            !loopback && choice.wants(&a.interface_name, loopback)
        })
        .map(|a| a.interface_name)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cutter() -> Cutter {
        Cutter::new(
            "node-a",
            InterfaceChoice::Auto,
            CutOffControl {
                microk8s: "/snap/bin/microk8s".into(),
                ..CutOffControl::default()
            },
        )
    }

    #[test]
    fn isolate_stops_microk8s_then_the_links_and_restores_in_reverse() {
        let c = cutter();
        let p = c.plan(
            &CutOff::Isolate {
                node_id: "node-a".into(),
                restore_after_s: 30,
            },
            &["eth0".into(), "wlan0".into()],
        );
        let words: Vec<String> = p.cut.iter().map(Step::words).collect();
        assert_eq!(
            words,
            [
                "microk8s stop",
                "ip link set dev eth0 down",
                "ip link set dev wlan0 down"
            ]
        );
        let back: Vec<String> = p.restore.iter().map(Step::words).collect();
        assert_eq!(
            back,
            [
                "ip link set dev eth0 up",
                "ip link set dev wlan0 up",
                "microk8s start"
            ]
        );
        assert_eq!(p.restore_after, Some(Duration::from_secs(30)));
        let off = c.plan(
            &CutOff::PowerOff {
                node_id: "node-a".into(),
            },
            &[],
        );
        assert_eq!(
            off.cut.iter().map(Step::words).collect::<Vec<_>>(),
            ["systemctl poweroff"]
        );
        assert!(off.restore.is_empty() && off.restore_after.is_none());
    }

    #[tokio::test]
    async fn a_request_for_another_node_changes_nothing() {
        let c = Arc::new(cutter());
        let err = c
            .clone()
            .accept(DrillRequest {
                from: "imagebuilder".into(),
                cut: CutOff::PowerOff {
                    node_id: "node-b".into(),
                },
            })
            .unwrap_err();
        assert!(err.contains("not node-b"), "{err}");
        assert!(!c.busy.load(Ordering::SeqCst));
    }

    #[test]
    fn loopback_is_never_cut() {
        let all = announced_interfaces(&InterfaceChoice::Named(vec!["lo".into()]));
        assert!(all.is_empty(), "{all:?}");
    }
}
