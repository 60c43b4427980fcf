//! `microk8s kubectl label node NAME KEY=VALUE... [--overwrite]`, as kubectl and the API server
//! answer it, strictly:
//! - on a worker the snap's `microk8s-kubectl.wrapper` prints "This MicroK8s deployment is
//!   acting as a node in a cluster. Please use the microk8s.kubectl on the master." and exits
//!   **0** without running kubectl (canonical/microk8s
//!   `microk8s-resources/wrappers/microk8s-kubectl.wrapper`), so nothing is labelled;
//! - without API quorum the connection is refused (exit 1), as every kubectl call here;
//! - an unknown node: `Error from server (NotFound): nodes "NAME" not found`, exit 1;
//! - a key or value outside Kubernetes' label syntax (apimachinery `IsQualifiedName`,
//!   `IsValidLabelValue`): refused with the API server's `Invalid value` message, exit 1, nothing
//!   changed;
//! - a key that already has another value without `--overwrite`: kubectl's
//!   `error: 'KEY' already has a value (OLD), and --overwrite is false`, exit 1;
//! - `KEY-` removes the label;
//! - success prints `node/NAME labeled`, or `node/NAME not labeled` when nothing changed
//!   (both exit 0). Messages are kubectl's as remembered, not checked against its source.
//!
//! Labels live in the replicated view ([`crate::model::View::node_labels`]), so every member
//! shows them in `kubectl get nodes -o json`.

use std::collections::BTreeMap;

use super::{Daemon, Out};

/// The kubectl wrapper's message on a worker (exit 0).
pub const KUBECTL_WORKER_MSG: &str =
    "This MicroK8s deployment is acting as a node in a cluster. Please use the microk8s.kubectl on the master.\n";

fn name_form(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_some_and(alnum)
        && s.chars().last().is_some_and(alnum)
}

/// Kubernetes' qualified name: `[prefix/]name`, the prefix a DNS-1123 subdomain.
pub fn valid_key(key: &str) -> bool {
    match key.split_once('/') {
        None => name_form(key),
        Some((prefix, name)) => {
            name_form(name)
                && !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|p| {
                    !p.is_empty()
                        && p.len() <= 63
                        && p.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !p.starts_with('-')
                        && !p.ends_with('-')
                })
        }
    }
}

/// Kubernetes' label value: empty or a name's form.
pub fn valid_value(v: &str) -> bool {
    v.is_empty() || name_form(v)
}

enum Change {
    Set(String, String),
    Remove(String),
}

impl Daemon {
    /// `kubectl label node|nodes|no NAME ARGS...` (see the module docs).
    pub(super) async fn cmd_kubectl_label(&self, args: &[&str]) -> Out {
        let (kind, rest) = match args.split_first() {
            Some((k, rest)) => (*k, rest),
            None => {
                return Out::err(
                    1,
                    "error: You must provide one or more resources by argument or filename.\n",
                )
            }
        };
        if !matches!(kind, "node" | "nodes" | "no") {
            return Out::err(
                1,
                format!("microk8s simulator: unsupported kubectl label resource: {kind}\n"),
            );
        }
        let overwrite = rest.contains(&"--overwrite");
        let mut positional = rest.iter().filter(|a| !a.starts_with("--"));
        let Some(node) = positional.next().copied() else {
            return Out::err(
                1,
                "error: resource(s) were provided, but no name was specified\n",
            );
        };
        let mut changes = Vec::new();
        for spec in positional {
            if let Some(key) = spec.strip_suffix('-') {
                changes.push(Change::Remove(key.to_owned()));
                continue;
            }
            let Some((k, v)) = spec.split_once('=') else {
                return Out::err(1, format!("error: at least one label update is required; invalid label spec: {spec}\n"));
            };
            if !valid_key(k) {
                return Out::err(1, format!("The Node \"{node}\" is invalid: metadata.labels: Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character\n"));
            }
            if !valid_value(v) {
                return Out::err(1, format!("The Node \"{node}\" is invalid: metadata.labels: Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character\n"));
            }
            changes.push(Change::Set(k.to_owned(), v.to_owned()));
        }
        if changes.is_empty() {
            return Out::err(1, "error: at least one label update is required\n");
        }
        let v = {
            let mut st = self.lock();
            if st.worker {
                return Out::ok(KUBECTL_WORKER_MSG);
            }
            if !st.view.quorum(&self.alive()) {
                return Out::err(1, "The connection to the server 127.0.0.1:16443 was refused - did you specify the right host or port?\n");
            }
            if st.view.entry(node).is_none() {
                return Out::err(
                    1,
                    format!("Error from server (NotFound): nodes \"{node}\" not found\n"),
                );
            }
            let current: BTreeMap<String, String> =
                st.view.node_labels.get(node).cloned().unwrap_or_default();
            let mut next = current.clone();
            for c in &changes {
                match c {
                    Change::Set(k, v) => {
                        if let Some(old) = current.get(k) {
                            if old != v && !overwrite {
                                return Out::err(1, format!("error: '{k}' already has a value ({old}), and --overwrite is false\n"));
                            }
                        }
                        next.insert(k.clone(), v.clone());
                    }
                    Change::Remove(k) => {
                        next.remove(k);
                    }
                }
            }
            if next == current {
                return Out::ok(format!("node/{node} not labeled\n"));
            }
            st.view.node_labels.insert(node.to_owned(), next);
            self.commit(&mut st)
        };
        self.push(v).await;
        Out::ok(format!("node/{node} labeled\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_kubernetes_syntax() {
        for k in [
            "zone",
            "example.com/rack",
            "node-role.kubernetes.io/x",
            "A_b.c",
        ] {
            assert!(valid_key(k), "{k}");
        }
        for k in ["", "-a", "a-", "a b", "Ex.com/a", "/a", "a/", "a/b/c"] {
            assert!(!valid_key(k), "{k}");
        }
        assert!(valid_value("") && valid_value("ssd") && !valid_value("a b"));
    }
}
