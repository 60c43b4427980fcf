//! Carrying out the record's removal of a member: `microk8s remove-node <ip> [--force]` on
//! this node (the slot authority; the formation core decided the removal by a round of the
//! cluster record and issues [`rackseed_formation::Action::RemoveNode`] on one node only),
//! with `--force` for a dead or re-flashed member, without it for a worker that left to be
//! converted to control plane; and the own `microk8s leave` of that worker, or of a node the
//! record removed while it was away ([`rackseed_formation::Action::Leave`]).
//!
//! What the command does, read in canonical/microk8s `scripts/wrappers/remove_node.py` (at
//! d099c907): given an IP, it looks the Kubernetes node up by its `InternalIP`
//! (`kubectl get no -o json`); with the node found and `--force`, it deletes the node's
//! dqlite endpoint (`dqlite … ".remove <ip>:19001"`, skipped for this node's own addresses),
//! removes its kubelet and callback tokens and runs `kubectl delete no <name>`, exit 0. When
//! Kubernetes does not know the node (already deleted, or the API is down), it prints "does
//! not exist in Kubernetes", still removes a dqlite endpoint starting with that IP when
//! `--force` is given, and exits 1; the adapter reports that as
//! [`Microk8sError::UnknownNode`], which counts as removed here: nothing of the member is left
//! that MicroK8s knows by that address. Any other failure is reported back and retried by the
//! core after a pause.

use std::net::IpAddr;

use rackseed_formation::{Event, NodeId};

use super::{Runtime, TaskResult};
use crate::system::microk8s::Microk8sError;

impl Runtime {
    /// Runs `microk8s remove-node <ip>` (with `--force` when `force`) for the removed member
    /// `node`; the result comes back as [`Event::NodeRemoved`].
    pub(super) fn spawn_remove_node(&self, node: NodeId, ip: IpAddr, force: bool) {
        let microk8s = self.agent.microk8s.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let target = ip.to_string();
            let result = match microk8s.remove_node(&target, force).await {
                Ok(()) | Err(Microk8sError::UnknownNode { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
            match &result {
                Ok(()) => tracing::info!(%node, %ip, force, "member removed from microk8s"),
                Err(e) => tracing::warn!(%node, %ip, error = %e, "removing a member failed"),
            }
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::NodeRemoved {
                    node,
                    result,
                })))
                .await;
        });
    }
}

impl Runtime {
    /// Runs `microk8s leave` on this node (a worker being converted to a control-plane
    /// member, or a node the cluster record removed while it was away, which MicroK8s still
    /// thinks joined: `leave.py` resets it to a lone node, for a control-plane node after
    /// asking dqlite for endpoints, in which its own is no longer listed); the result comes
    /// back as [`Event::Left`]. A node no longer in a cluster
    /// ([`Microk8sError::NotInCluster`]) left already (a restart after its leave).
    pub(super) fn spawn_leave(&self) {
        let microk8s = self.agent.microk8s.clone();
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let result = match microk8s.leave().await {
                Ok(()) | Err(Microk8sError::NotInCluster) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
            let _ = tasks
                .send(TaskResult::Event(Box::new(Event::Left(result))))
                .await;
        });
    }
}
