//! `microk8s kubectl label node NODE KEY=VALUE... --overwrite`: Kubernetes labels on a node.
//!
//! From canonical/microk8s `microk8s-resources/wrappers/microk8s-kubectl.wrapper`: on a node
//! that joined as a worker (`$SNAP_DATA/var/lock/clustered.lock`) the wrapper prints "This
//! MicroK8s deployment is acting as a node in a cluster. Please use the microk8s.kubectl on the
//! master." and exits **0** without running kubectl, so labels are put on by a control-plane
//! node, for every node, and that message is a refusal ([`Microk8sError::WorkerNode`]), not a
//! success. `--overwrite` makes the call idempotent and lets a changed config win over an older
//! value (kubectl refuses to change an existing value without it). An unknown node is kubectl's
//! `Error from server (NotFound): nodes "NODE" not found` ([`Microk8sError::UnknownNode`]).
//! The labels were checked by the config loader (`rackseed_config::node_labels`).

use std::collections::BTreeMap;

use super::{detail, refused_on_worker, Microk8sError, RealMicrok8s};

/// Runs the label command on `node` (see the module docs).
pub(super) async fn label_node(
    mk: &RealMicrok8s,
    node: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), Microk8sError> {
    let command = format!("microk8s kubectl label node {node}");
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let out = mk
        .mk(mk.config.query_timeout)
        .args(["kubectl", "label", "node", node])
        .args(&pairs)
        .arg("--overwrite")
        .output()
        .await?;
    if refused_on_worker(&out) {
        return Err(Microk8sError::WorkerNode { command });
    }
    match out.code() {
        Some(0) => Ok(()),
        Some(_) if out.stderr.contains("(NotFound)") => Err(Microk8sError::UnknownNode {
            node: node.to_owned(),
        }),
        code => Err(Microk8sError::Failed {
            command,
            code,
            detail: detail(&out),
        }),
    }
}
