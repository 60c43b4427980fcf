//! The driver's status projection: the status document the coordinator serves (phase, role,
//! members, peers, addons, MicroK8s' own view, the timeline of what happened) and the admin
//! kubeconfig it hands out once this node is a control-plane member.
//!
//! Nothing here decides anything: [`Runtime::publish_status`] copies the formation core's
//! status, the driver's observations and the counters of what discovery and the coordinator
//! refused ([`rejections`]) into the status document after every event (so at least every tick),
//! and hands it to the coordinator only when it changed. To show something new: add a field to
//! `StatusDoc` (in `rackseed-protocol`) and fill it here.

use std::net::IpAddr;
use std::sync::Arc;

use crate::addons::progress::AddonProgress;
use crate::system::microk8s::Status;
use rackseed_config::Role;
use rackseed_formation::{Announcement, Event, NodeId, Phase};
use rackseed_protocol::coordinator::CoordinatorStats;
use rackseed_protocol::discovery::DiscoveryStats;
use rackseed_protocol::status::{
    AddonRow, CoordinatorRejections, DiscoveryRejections, MemberRow, Microk8sView, PeerRow,
    Rejections, TimelineEntry,
};

use super::Runtime;

/// Whether the coordinator hands out the admin kubeconfig (see [`Runtime::serve_kubeconfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KubeconfigServing {
    /// Not a member yet: 503 "not a running control-plane member yet".
    NotYet,
    /// A control-plane member: `microk8s config` on each authenticated request.
    Serving,
    /// A worker member: 503 saying to ask a control-plane member.
    Worker,
}

impl Runtime {
    /// Shows peer `ann.id` at `ip` with its announced phase and role (a row per peer ever
    /// seen, by id); the first sighting goes into the timeline.
    pub(super) fn note_peer_seen(&mut self, ann: &Announcement, ip: IpAddr) {
        let row = PeerRow {
            node_id: ann.id.to_string(),
            address: ip.to_string(),
            phase: ann.phase.name().into(),
            role: ann.role.map(|r| r.name().to_owned()),
        };
        let rows = &mut self.doc.peers;
        match rows.binary_search_by(|r| r.node_id.as_str().cmp(ann.id.as_str())) {
            Ok(i) => rows[i] = row,
            Err(i) => {
                rows.insert(i, row);
                self.timeline(format!("saw {} at {ip}", ann.id));
            }
        }
    }

    /// Shows peer `id` as lost (its row stays, with its last address).
    pub(super) fn note_peer_lost(&mut self, id: &NodeId) {
        if let Ok(i) = self
            .doc
            .peers
            .binary_search_by(|r| r.node_id.as_str().cmp(id.as_str()))
        {
            self.doc.peers[i].phase = "lost".into();
        }
        self.timeline(format!("lost {id}"));
    }

    /// Notes a finished task's outcome in the timeline (and a failure as the last error).
    pub(super) fn note_task_event(&mut self, ev: &Event) {
        let (what, error) = match ev {
            Event::NodePrepared(r) => (
                match r {
                    Ok(()) => "node prepared; microk8s installed and ready".to_owned(),
                    Err(e) => format!("node preparation failed: {e}"),
                },
                r.as_ref().err(),
            ),
            Event::JoinFinished(r) => (
                match r {
                    Ok(()) => "microk8s join finished".to_owned(),
                    Err(e) => format!("microk8s join failed: {e}"),
                },
                r.as_ref().err(),
            ),
            Event::AddonsEnabled(r) => (
                match r {
                    Ok(()) => "addons enabled".to_owned(),
                    Err(e) => format!("addons failed: {e}"),
                },
                r.as_ref().err(),
            ),
            Event::Left(r) => (
                match r {
                    Ok(()) => {
                        "left the cluster as a worker; asking for a control-plane slot".to_owned()
                    }
                    Err(e) => format!("microk8s leave failed: {e}"),
                },
                r.as_ref().err(),
            ),
            _ => return,
        };
        self.timeline(what);
        if let Some(e) = error {
            self.doc.last_error = Some(e.clone());
        }
    }

    /// Appends `what` to the status document's timeline.
    pub(super) fn timeline(&mut self, what: impl Into<String>) {
        let what = what.into();
        // Keep the document small: the first entries tell how formation went, the last ones
        // what happens now.
        if self.doc.timeline.len() >= 200 {
            self.doc.timeline.remove(50);
        }
        self.doc.timeline.push(TimelineEntry {
            at: self.started.elapsed().as_secs_f64(),
            what,
        });
    }

    /// Serves the admin kubeconfig over the coordinator (authenticated requests only) once
    /// this node is a control-plane member: `microk8s config` runs on each request, so the
    /// answer follows MicroK8s (certificate refreshes, a stopped service's error). The text is
    /// never logged or kept here. A worker member refuses with a reason naming where to ask.
    pub(super) fn serve_kubeconfig(&mut self, phase: &Phase) {
        let want = match phase {
            Phase::Member {
                role: Role::ControlPlane,
                ..
            } => KubeconfigServing::Serving,
            Phase::Member {
                role: Role::Worker, ..
            } => KubeconfigServing::Worker,
            _ => KubeconfigServing::NotYet,
        };
        if want == self.kubeconfig {
            return;
        }
        match want {
            KubeconfigServing::Serving => {
                let mk = self.agent.microk8s.clone();
                self.coordinator.set_kubeconfig_provider(Arc::new(move || {
                    let mk = mk.clone();
                    Box::pin(async move { Ok(mk.config().await?) })
                }));
                self.timeline("serving the admin kubeconfig to holders of the cluster secret");
            }
            KubeconfigServing::Worker => self.coordinator.refuse_kubeconfig(
                "this node is a worker and has no admin kubeconfig; ask a control-plane member",
            ),
            KubeconfigServing::NotYet => self.coordinator.clear_kubeconfig_provider(),
        }
        self.kubeconfig = want;
    }

    /// Fills the document's `address`: this node's address on the cluster network, chosen as
    /// for its join point (the local address whose subnet holds the most peers; see
    /// `effects::own_address`). Re-read on every MicroK8s poll: addresses and peers change.
    pub(super) fn note_own_address(&mut self) {
        let local = super::effects::local_addresses(&self.agent.interfaces);
        if let Some(ip) = super::effects::own_address(&local, &self.peer_addrs()) {
            self.doc.address = Some(ip.to_string());
        }
    }

    /// Refreshes the status document served by the coordinator.
    pub(super) fn publish_status(&mut self) {
        let st = self.node.status();
        self.serve_kubeconfig(&st.phase);
        self.doc.phase = st.phase.summary().name().into();
        self.doc.role = st.role.map(|r| r.name().to_owned());
        self.doc.cluster = st.cluster.as_ref().map(|c| c.to_string());
        self.doc.authority = st.authority.as_ref().map(|a| a.to_string());
        if let Some(e) = &st.last_error {
            self.doc.last_error = Some(e.clone());
        }
        self.doc.members = st
            .members_known
            .iter()
            .map(|(id, role)| MemberRow {
                node_id: id.to_string(),
                role: role.name().to_owned(),
            })
            .collect();
        self.doc.healing = (!st.electorate.is_empty()).then(|| healing_view(&st));
        self.doc.rejections = rejections(&self.discovery.stats(), &self.coordinator.stats());
        // The loop calls this after every event; only a changed document is re-encoded.
        if self.published.as_ref() != Some(&self.doc) {
            let _ = self.coordinator.set_status_from(&self.doc);
            self.published = Some(self.doc.clone());
        }
    }
}

/// The record's electorate and removed members, for the status document.
pub(super) fn healing_view(
    st: &rackseed_formation::Status,
) -> rackseed_protocol::status::HealingView {
    let ids = |v: &[rackseed_formation::NodeId]| v.iter().map(|i| i.to_string()).collect();
    rackseed_protocol::status::HealingView {
        electorate: ids(&st.electorate),
        electorate_old: st.electorate_old.as_deref().map(ids),
        replace_after_s: st.replace_after.as_secs(),
        removed: st
            .removed
            .iter()
            .map(|x| rackseed_protocol::status::RemovedRow {
                node_id: x.node.to_string(),
                role: x.role.name().to_owned(),
                reason: x.reason.clone(),
                address: x.ip.map(|ip| ip.to_string()),
                done: x.done,
            })
            .collect(),
    }
}

/// The status document's counters of what this node refused, from discovery's and the
/// coordinator's own counters.
pub(super) fn rejections(d: &DiscoveryStats, c: &CoordinatorStats) -> Rejections {
    Rejections {
        discovery: DiscoveryRejections {
            wrong_version: d.wrong_version,
            wrong_cluster: d.wrong_cluster,
            missing_signature: d.missing_signature,
            bad_signature: d.bad_signature,
            malformed: d.malformed,
            replayed: d.replayed,
            own_id_conflict: d.own_id_conflict,
            unverified_forgotten: d.unverified_forgotten,
            cache_flushes: d.cache_flushes,
            browse_restarts: d.browse_restarts,
            peers_refused: d.peers_refused,
        },
        coordinator: CoordinatorRejections {
            unauthorized: c.unauthorized,
            bad_requests: c.bad_requests,
            unavailable: c.unavailable,
            tls_failures: c.tls_failures,
            connections_refused: c.connections_refused,
            body_timeouts: c.body_timeouts,
        },
    }
}

pub(super) fn addon_rows(p: &AddonProgress) -> Vec<AddonRow> {
    use crate::addons::progress::AddonState;
    let mut rows: Vec<AddonRow> = p
        .addons
        .iter()
        .map(|r| {
            let (state, reason) = match &r.state {
                AddonState::Pending => ("pending", None),
                AddonState::Enabling => ("enabling", r.last_error.clone()),
                AddonState::Enabled => ("enabled", None),
                AddonState::Failed { reason } => ("failed", Some(reason.clone())),
            };
            AddonRow {
                name: r.enable.name.clone(),
                state: state.into(),
                reason,
            }
        })
        .collect();
    rows.extend(p.manual.iter().map(|m| AddonRow {
        name: m.name.clone(),
        state: "manual".into(),
        reason: Some(m.summary.clone()),
    }));
    rows
}

/// MicroK8s' own status as the status document shows it; `ha_size` voters make it HA.
pub(super) fn microk8s_view(status: Status, ha_size: usize) -> Microk8sView {
    match status {
        Status::Stopped => Microk8sView {
            running: false,
            note: Some("microk8s is not running".into()),
            ..Default::default()
        },
        Status::NotReady => Microk8sView {
            running: true,
            note: Some("not ready (starting, or quorum lost)".into()),
            ..Default::default()
        },
        Status::WorkerNode => Microk8sView {
            running: true,
            note: Some("worker node".into()),
            ..Default::default()
        },
        Status::Running(s) => {
            let voters: Vec<String> = s.voters().into_iter().map(String::from).collect();
            Microk8sView {
                running: true,
                ha: voters.len() >= ha_size,
                standby: s.standby().into_iter().map(String::from).collect(),
                voters,
                note: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal counter of discovery and the coordinator lands in its own field of the
    /// status document (distinct values, so a swapped field shows).
    #[test]
    fn rejections_project_every_counter() {
        let d = DiscoveryStats {
            accepted: 100,
            own: 200,
            wrong_version: 1,
            wrong_cluster: 2,
            missing_signature: 3,
            bad_signature: 4,
            malformed: 5,
            replayed: 6,
            own_id_conflict: 7,
            unverified_forgotten: 8,
            cache_flushes: 9,
            browse_restarts: 10,
            peers_refused: 11,
        };
        let c = CoordinatorStats {
            nonces_issued: 300,
            messages: 301,
            status_reads: 302,
            page_reads: 303,
            kubeconfig_reads: 304,
            unauthorized: 21,
            bad_requests: 22,
            unavailable: 23,
            tls_failures: 24,
            connections_refused: 25,
            body_timeouts: 26,
        };
        let r = rejections(&d, &c);
        let counts: Vec<u64> = r.rows().iter().map(|(_, _, n)| *n).collect();
        assert_eq!(
            counts,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 21, 22, 23, 24, 25, 26]
        );
        assert_eq!(r.discovery.replayed, 6);
        assert_eq!(r.coordinator.unauthorized, 21);
        // Successes are not refusals.
        assert_eq!(r.total(), (1..=11).sum::<u64>() + (21..=26).sum::<u64>());
        assert_eq!(
            rejections(&DiscoveryStats::default(), &CoordinatorStats::default()),
            Rejections::default()
        );
    }
}
