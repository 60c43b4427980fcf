//! Kubernetes labels from the inventory (`[[nodes]] labels = { ... }`), put on each node once
//! it has joined.
//!
//! A control-plane member does it, for every inventory node, on each MicroK8s poll: MicroK8s'
//! kubectl wrapper refuses on workers (see `system::microk8s::labels`), so a worker cannot
//! label itself. The Kubernetes node name is the inventory hostname (the agent sets the
//! machine's hostname to it, and MicroK8s names its Node after the hostname). A node whose
//! Node carries every wanted label is left alone, so a steady cluster runs only `kubectl get
//! nodes`; a missing or changed label is put on with `--overwrite` (the config wins), and a
//! node not in the cluster yet is reported as such. Several members doing the same at once is
//! harmless: the command is idempotent. Labels removed from the config are not taken off.

use std::collections::BTreeMap;

use rackseed_protocol::status::NodeLabelsView;

use super::Agent;

/// What the inventory asks, node by node: `(hostname, labels)` for entries with labels.
pub(super) fn wanted(agent: &Agent) -> Vec<(String, BTreeMap<String, String>)> {
    agent
        .config
        .nodes
        .iter()
        .filter(|n| !n.labels.is_empty())
        .map(|n| (n.hostname.clone(), n.labels.clone()))
        .collect()
}

/// Puts the inventory's labels on the nodes that lack them (see the module docs); returns
/// what each node carries now. Run on a control-plane member only.
pub(super) async fn apply_node_labels(agent: &Agent) -> Vec<NodeLabelsView> {
    let wanted = wanted(agent);
    if wanted.is_empty() {
        return Vec::new();
    }
    let nodes = match agent.microk8s.nodes().await {
        Ok(n) => n,
        Err(e) => {
            let problem = format!("reading the Kubernetes nodes: {e}");
            return wanted
                .into_iter()
                .map(|(node, labels)| NodeLabelsView {
                    node,
                    labels,
                    applied: false,
                    problem: Some(problem.clone()),
                })
                .collect();
        }
    };
    let mut out = Vec::new();
    for (node, labels) in wanted {
        let view = |applied: bool, problem: Option<String>| NodeLabelsView {
            node: node.clone(),
            labels: labels.clone(),
            applied,
            problem,
        };
        let Some(k8s) = nodes.iter().find(|n| n.name == node) else {
            out.push(view(false, Some("not in the cluster yet".into())));
            continue;
        };
        if labels.iter().all(|(k, v)| k8s.labels.get(k) == Some(v)) {
            out.push(view(true, None));
            continue;
        }
        match agent.microk8s.label_node(&node, &labels).await {
            Ok(()) => {
                tracing::info!(%node, ?labels, "node labels put on");
                out.push(view(true, None));
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "could not label the node");
                out.push(view(false, Some(e.to_string())));
            }
        }
    }
    out
}
