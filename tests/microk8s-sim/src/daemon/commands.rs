//! The CLI commands a node answers by itself or by pushing a change to its peers: `status`,
//! `add-node`, `enable`/`disable`, `leave`, `stop`, `remove-node`, `kubectl get nodes`, the `dqlite`
//! client's `.cluster` query, and `config` (which runs in the CLI process).
//!
//! To add a command, add an arm to [`Daemon::run_command`] and a `cmd_` method here.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{
    fingerprint_of, first_cluster_id, installed_path, random_hex, state_path, Daemon, Installed,
    Out, Persisted, Token, CONFIG_WORKER_MSG, NOT_READY_MSG, TOKEN_MIN_LEN, WORKER_MSG,
};
use crate::model::{self, AddonRecord, Role, View};
use crate::{now_ms, SimEnv};

impl Daemon {
    /// Runs one CLI command (`argv` without the program name; `__dqlite` for the dqlite client).
    pub async fn run_command(&self, argv: &[String]) -> Out {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["status", rest @ ..] => self.cmd_status(rest).await,
            ["add-node", rest @ ..] => self.cmd_add_node(rest),
            ["join", rest @ ..] => self.cmd_join(rest).await,
            ["enable", rest @ ..] => self.cmd_enable(rest, true).await,
            ["disable", rest @ ..] => self.cmd_enable(rest, false).await,
            ["leave", ..] => self.cmd_leave().await,
            ["stop", rest @ ..] => self.cmd_stop(rest).await,
            ["remove-node", rest @ ..] => self.cmd_remove_node(rest).await,
            ["helm3", rest @ ..] => self.cmd_helm(rest).await,
            ["ctr", rest @ ..] => self.cmd_ctr(rest).await,
            ["kubectl", rest @ ..] if super::helm::handles_kubectl(rest) => {
                self.cmd_kubectl_tools(rest).await
            }
            ["kubectl", "label", rest @ ..] => self.cmd_kubectl_label(rest).await,
            ["kubectl", rest @ ..] => self.cmd_kubectl(rest),
            ["__dqlite", rest @ ..] => self.cmd_dqlite(rest),
            ["__dbctl", rest @ ..] => self.cmd_dbctl(rest).await,
            [other, ..] => Out::fail(
                1,
                format!("'{other}' is not a command the microk8s simulator knows\n"),
            ),
            [] => Out::fail(1, "Usage: microk8s [command]\n"),
        }
    }

    async fn cmd_status(&self, args: &[&str]) -> Out {
        let mut format = "short";
        let mut wait = false;
        let mut timeout = 0u64;
        let mut addon: Option<&str> = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "--format" => match it.next().copied() {
                    Some(f @ ("yaml" | "pretty" | "short")) => format = f,
                    other => {
                        return Out::err(
                            2,
                            format!(
                                "status: error: argument --format: invalid choice: {other:?}\n"
                            ),
                        )
                    }
                },
                "--yaml" => format = "yaml",
                "-w" | "--wait-ready" => wait = true,
                "-t" | "--timeout" => match it.next().and_then(|t| t.parse().ok()) {
                    Some(t) => timeout = t,
                    None => {
                        return Out::err(
                            2,
                            "status: error: argument -t/--timeout: expected an integer\n",
                        )
                    }
                },
                "-a" | "--addon" => addon = it.next().copied(),
                other => {
                    return Out::err(
                        2,
                        format!("status: error: unrecognized arguments: {other}\n"),
                    )
                }
            }
        }
        if self.lock().worker {
            return Out::fail(1, WORKER_MSG);
        }
        let deadline = Instant::now() + Duration::from_secs(timeout);
        let view = loop {
            {
                let st = self.lock();
                if self.ready(&st) {
                    break Some(st.view.clone());
                }
            }
            if !wait || (timeout > 0 && Instant::now() >= deadline) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let Some(v) = view else {
            return match format {
                "yaml" => Out::fail(1, model::render_not_ready_yaml()),
                _ => Out::fail(1, NOT_READY_MSG),
            };
        };
        if let Some(a) = addon {
            return Out::ok(if v.addon_enabled(a) {
                "enabled\n"
            } else {
                "disabled\n"
            });
        }
        Out::ok(match format {
            "yaml" => model::render_status_yaml(&v),
            "pretty" => model::render_status_pretty(&v),
            _ => model::render_status_short(&v),
        })
    }

    fn cmd_add_node(&self, args: &[&str]) -> Out {
        let mut ttl: i64 = -1;
        let mut token: Option<String> = None;
        let mut format = "pretty";
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "-l" | "--token-ttl" => match it.next().and_then(|t| t.parse().ok()) {
                    Some(t) => ttl = t,
                    None => return Out::err(2, "Error: Invalid value for '-l' / '--token-ttl'\n"),
                },
                "-t" | "--token" => token = it.next().map(|t| t.to_string()),
                "--format" => match it.next().copied() {
                    Some(f @ ("pretty" | "short" | "token" | "token-check" | "json" | "yaml")) => {
                        format = f
                    }
                    _ => return Out::err(2, "Error: Invalid value for '--format'\n"),
                },
                other => return Out::err(2, format!("Error: No such option: {other}\n")),
            }
        }
        let mut st = self.lock();
        if st.worker {
            return Out::fail(1, WORKER_MSG);
        }
        let token = token.unwrap_or_else(|| random_hex(16));
        if token.len() < TOKEN_MIN_LEN {
            return Out::fail(
                1,
                "Invalid token size. It should be at least 32 characters long.\n",
            );
        }
        let expiry_s = (ttl >= 0).then(|| now_ms() / 1000 + ttl as u64);
        st.tokens.push(Token {
            token: token.clone(),
            expiry_s,
        });
        self.persist(&st);
        let check = self.fingerprint();
        let mut ips: Vec<IpAddr> = st.my_ip.into_iter().collect();
        for ip in crate::local_ipv4s() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let port = self.env.port;
        let urls: Vec<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{port}/{token}/{check}"))
            .collect();
        let out = match format {
            "token" => format!("{token}\n"),
            "token-check" => format!("{token}/{check}\n"),
            "json" => format!(
                "{}\n",
                json!({"token": format!("{token}/{check}"), "urls": urls})
            ),
            "yaml" => {
                let mut s = format!("token: {token}/{check}\nurls:\n");
                for u in &urls {
                    s.push_str(&format!("- {u}\n"));
                }
                s
            }
            "short" => urls
                .iter()
                .map(|u| format!("microk8s join {u}\n"))
                .collect(),
            _ => {
                let mut s = String::from(
                    "From the node you wish to join to this cluster, run the following:\n",
                );
                if let Some(u) = urls.first() {
                    s.push_str(&format!("microk8s join {u}\n\n"));
                    s.push_str("Use the '--worker' flag to join a node as a worker not running the control plane, eg:\n");
                    s.push_str(&format!("microk8s join {u} --worker\n\n"));
                }
                s.push_str("If the node you are adding is not reachable through the default interface you can use one of the following:\n");
                for u in &urls {
                    s.push_str(&format!("microk8s join {u}\n"));
                }
                s
            }
        };
        Out::ok(out)
    }

    fn fingerprint(&self) -> String {
        fingerprint_of(&self.installed.cert_hex)
    }

    async fn cmd_enable(&self, args: &[&str], enable: bool) -> Out {
        let verb = if enable { "enable" } else { "disable" };
        let Some((first, rest)) = args.split_first() else {
            return Out::err(2, format!("Usage: microk8s {verb} [OPTIONS] ADDONS...\n"));
        };
        let (name, inline) = match first.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (*first, None),
        };
        let name = name.strip_prefix("core/").unwrap_or(name);
        let mut addon_args: Vec<String> = inline.map(|a| vec![a.to_owned()]).unwrap_or_default();
        addon_args.extend(rest.iter().map(|s| s.to_string()));
        {
            let st = self.lock();
            if st.worker {
                return Out::fail(1, WORKER_MSG);
            }
            if !self.ready(&st) {
                return Out::fail(1, NOT_READY_MSG);
            }
            if !model::ADDONS.iter().any(|(n, _)| *n == name) {
                return Out::fail(1, format!("Addon {name} was not found in any repository\n"));
            }
            if st.view.addon_enabled(name) == enable {
                return Out::ok(format!("Addon core/{name} is already {verb}d\n"));
            }
            if name == "ha-cluster" && !enable {
                if !addon_args.iter().any(|a| a == "--force") {
                    return Out::fail(1, "Please use --force to disable the ha-cluster addon.\n");
                }
                if st.view.members().count() > 1 {
                    return Out::fail(1, "Please leave the cluster before disabling ha-cluster.\n");
                }
            }
        }
        let mut stdout = format!("Infer repository core for addon {name}\n");
        tokio::time::sleep(self.env.enable_delay).await;
        let v = {
            let mut st = self.lock();
            st.view.addons.insert(
                name.to_owned(),
                AddonRecord {
                    enabled: enable,
                    args: addon_args,
                },
            );
            if name == "ha-cluster" {
                st.view.ha_enabled = enable;
            }
            self.commit(&mut st)
        };
        self.push(v).await;
        stdout.push_str(&format!("Addon core/{name} is {verb}d\n"));
        Out::ok(stdout)
    }

    /// `leave`, as canonical/microk8s `microk8s-resources/wrappers/microk8s-leave.wrapper`
    /// and `scripts/wrappers/leave.py` (read at 0b9852c0) do it: a node not in a cluster (the
    /// wrapper finds no `no-cert-reissue` lock; here: no other node in its view and not a
    /// worker) is refused with exit 1; the only voter refuses with exit 3 while other dqlite
    /// members depend on it; otherwise the node leaves dqlite (a worker holds no entry), its
    /// Node object stays in the old cluster until `remove-node`, and it starts over as a fresh
    /// single node (no longer "in a cluster": a second `leave` is refused with exit 1).
    async fn cmd_leave(&self) -> Out {
        let old = {
            let mut st = self.lock();
            if !st.worker && st.view.entries.len() <= 1 {
                return Out::fail(
                    1,
                    "This MicroK8s deployment is not acting as a node in a cluster.\n",
                );
            }
            let voters: Vec<String> = st
                .view
                .members()
                .filter(|(_, r)| *r == Role::Voter)
                .map(|(e, _)| e.name.clone())
                .collect();
            // `is_leader_without_successor` in canonical/microk8s `scripts/wrappers/leave.py`
            // (read at 0b9852c0): the only voter refuses only while other dqlite members
            // depend on it; a lone node (never joined, or left before) re-initialises, exit 0.
            let others = st.view.members().count() > 1;
            if !st.worker && voters == [self.name().to_owned()] && others {
                // leave.py's three lines, on stdout (`print`).
                return Out::fail(
                    3,
                    "This node currently holds the only copy of the Kubernetes database so it \
                     cannot leave the cluster.\n\
                     To remove this node you can either first remove all other nodes with \
                     'microk8s remove-node' or\n\
                     form a highly available cluster by adding at least three nodes.\n",
                );
            }
            // The old cluster's view without this node in dqlite; its Node object stays (A6).
            let mut old = st.view.clone();
            let me = self.name().to_owned();
            if let Some(e) = old.entry_mut(&me) {
                e.role = None;
            }
            old.version += 1;
            // This node starts over as a fresh single-node cluster.
            st.worker = false;
            st.view = View::single(random_hex(8), self.name(), st.my_ip.or(self.env.own_ip()));
            self.persist(&st);
            old
        };
        self.push(old).await;
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Out::ok("Generating new cluster certificates.\nWaiting for node to start.\n")
    }

    /// `stop`, as canonical/microk8s `microk8s-resources/wrappers/microk8s-stop.wrapper` (read
    /// at d099c907): on a worker (the wrapper's `clustered.lock`, checked before the options) it
    /// prints that `snap stop microk8s` is the way and exits 0 having stopped nothing; an
    /// unknown option is
    /// `microk8s stop: invalid option -- X`, exit 1; otherwise the services stop and the pods
    /// with them (`remove_all_containers`, `kill_all_container_shims`), so MetalLB's speaker
    /// ends and this node stops announcing (module `metallb`). Here the node drops its
    /// LoadBalancer address, answers, and its daemon exits: a node whose daemon is not running
    /// is stopped (the CLI's "microk8s is not running"). `microk8s start` is not modelled (a
    /// stopped node is started again by starting its daemon).
    async fn cmd_stop(&self, args: &[&str]) -> Out {
        if self.lock().worker {
            return Out::ok(
                "This MicroK8s deployment is acting as a node in a cluster.\nUse 'snap stop microk8s' to stop services on this node.\n",
            );
        }
        // The wrapper's getopt loop ends at the first option it does not know (or `--help`).
        match args.first().copied() {
            None => {}
            Some("-h" | "--help") => {
                return Out::ok(
                    "Usage: microk8s stop [OPTIONS]\n\nStop Kubernetes services\n\nOptions:\n -h, --help          Show this help\n",
                )
            }
            Some(other) => {
                return Out::fail(1, format!("microk8s stop: invalid option -- {other}\n"))
            }
        }
        self.metallb_stop("microk8s stop").await;
        // The answer goes out before the daemon ends.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::process::exit(0);
        });
        Out::ok("")
    }

    /// `remove-node NODE [--force]`, as canonical/microk8s `scripts/wrappers/remove_node.py`
    /// (read at d099c907) does it: an IP is looked up to the Kubernetes node with that
    /// `InternalIP`; a node Kubernetes does not know (or any node while the API is down) is
    /// "does not exist in Kubernetes", exit 1, after `--force` removed a dqlite endpoint at
    /// that address; a node still in dqlite is refused without `--force` ("run first
    /// 'microk8s leave'"), whether or not it is reachable; with `--force` its endpoint is
    /// removed and its Node deleted, exit 0. This node's own endpoint is never removed (the
    /// script skips the local addresses): exit 0 with dqlite unchanged. Every call is in the
    /// command log.
    async fn cmd_remove_node(&self, args: &[&str]) -> Out {
        let force = args.contains(&"--force");
        let Some(node) = args.iter().find(|a| !a.starts_with('-')).copied() else {
            return Out::err(2, "Error: Missing argument 'NODE'.\n");
        };
        let as_ip: Option<IpAddr> = node.parse().ok();
        let (out, v) = 'removal: {
            let mut st = self.lock();
            if st.worker {
                return Out::fail(1, WORKER_MSG);
            }
            let api_up = self.ready(&st);
            let found = api_up
                .then(|| {
                    st.view
                        .entries
                        .iter()
                        .position(|e| e.name == node)
                        .or_else(|| {
                            as_ip.and_then(|ip| {
                                st.view.entries.iter().position(|e| e.ip == Some(ip))
                            })
                        })
                })
                .flatten();
            let me = self.name().to_owned();
            let i = match found {
                Some(i) => i,
                None => {
                    // Not in Kubernetes: with --force a dqlite endpoint at that address goes.
                    let mut text = format!("Node {node} does not exist in Kubernetes.\n");
                    let mut changed = false;
                    if force {
                        text.push_str(&format!("Attempting to remove {node} from dqlite.\n"));
                        if let Some(e) = st.view.entries.iter_mut().find(|e| {
                            e.role.is_some() && e.name != me && as_ip.is_some() && e.ip == as_ip
                        }) {
                            text.push_str("Removing node entry found in dqlite.\n");
                            e.role = None;
                            changed = true;
                        }
                    }
                    let out = Out::fail(1, text);
                    if !changed {
                        return out;
                    }
                    // An early value for the block: the view to push and the answer.
                    let v = self.commit(&mut st);
                    break 'removal (out, v);
                }
            };
            let name = st.view.entries[i].name.clone();
            let in_dqlite = st.view.entries[i].role.is_some() && name != me;
            if in_dqlite && !force {
                return Out::fail(1, format!("Removal failed. Node {name} is registered with dqlite. Please, run first 'microk8s leave' on the departing node. \nIf the node is not available anymore and will never attempt to join the cluster in the future use the '--force' flag \nto unregister the node while removing it.\n"));
            }
            if in_dqlite {
                st.view.entries[i].role = None;
            }
            if name == me {
                // The script deletes only this node's Node object; it stays in dqlite. The
                // simulator holds one entry per node for both, so it keeps the entry (a guess
                // at the visible outcome: the kubelet registers the Node again).
                return Out::ok("");
            }
            st.view.entries.remove(i);
            (Out::ok(""), self.commit(&mut st))
        };
        self.push(v).await;
        out
    }

    fn cmd_kubectl(&self, args: &[&str]) -> Out {
        let st = self.lock();
        if !st.view.quorum(&self.alive()) {
            return Out::err(1, "The connection to the server 127.0.0.1:16443 was refused - did you specify the right host or port?\n");
        }
        match args {
            ["get", "nodes" | "node" | "no", "-o", "json"] => {
                Out::ok(model::render_nodes_json(&st.view, &self.alive()) + "\n")
            }
            ["get", "nodes" | "node" | "no"] => {
                let alive = self.alive();
                let mut s = String::from("NAME       STATUS     ROLES    AGE   VERSION\n");
                for e in &st.view.entries {
                    let status = if alive.contains(&e.name) {
                        "Ready"
                    } else {
                        "NotReady"
                    };
                    s.push_str(&format!(
                        "{:<10} {:<10} <none>   1m    v1.32.3\n",
                        e.name, status
                    ));
                }
                Out::ok(s)
            }
            _ => Out::err(
                1,
                format!(
                    "microk8s simulator: unsupported kubectl command: {}\n",
                    args.join(" ")
                ),
            ),
        }
    }

    fn cmd_dqlite(&self, args: &[&str]) -> Out {
        let st = self.lock();
        if st.worker {
            return Out::err(1, "Error: open /var/snap/microk8s/current/var/kubernetes/backend/cluster.crt: no such file or directory\n");
        }
        let json_format = args.windows(2).any(|w| w == ["-f", "json"]);
        match args.last() {
            Some(&".cluster") => {}
            _ => {
                return Out::err(
                    1,
                    format!(
                        "microk8s simulator: unsupported dqlite query: {}\n",
                        args.join(" ")
                    ),
                )
            }
        }
        if !st.view.quorum(&self.alive()) {
            return Out::err(1, "Error: no available dqlite leader server found\n");
        }
        if json_format {
            Out::ok(model::render_dqlite_json(&st.view) + "\n")
        } else {
            let mut s = String::new();
            for (e, r) in st.view.members() {
                s.push_str(&format!("{}|{}|{}\n", e.id, st.view.address(e), r.number()));
            }
            Out::ok(s)
        }
    }
}

/// `microk8s config [-l|--use-loopback]`, as the snap's wrapper: it only reads files, so it
/// runs in the CLI process and answers whether or not the daemon runs. On a worker it prints
/// [`CONFIG_WORKER_MSG`] and exits 0 (before looking at options); otherwise the admin kubeconfig
/// with the default interface address (`MICROK8S_SIM_IP`, else the first IPv4; `none` if there
/// is none, as `get_default_ip`), or `127.0.0.1` with `--use-loopback`.
pub fn cmd_config(env: &SimEnv, args: &[&str]) -> Out {
    let ipath = installed_path(env);
    let installed: Installed = match std::fs::read(&ipath)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
    {
        Ok(i) => i,
        Err(e) => {
            return Out::err(
                1,
                format!(
                    "microk8s-sim: microk8s is not installed ({}: {e})\n",
                    ipath.display()
                ),
            )
        }
    };
    let st: Option<Persisted> = std::fs::read(state_path(env))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if st.as_ref().is_some_and(|s| s.worker) {
        return Out::ok(CONFIG_WORKER_MSG);
    }
    let mut loopback = false;
    for a in args {
        match *a {
            "-l" | "--use-loopback" => loopback = true,
            "-h" | "--help" => {
                return Out::ok("Usage: microk8s config [OPTIONS]\n\nRetrieve the client config, similar to microk8s kubectl config view --raw\n\nOptions:\n -h, --help          Show this help\n -l, --use-loopback  Report the cluster address using the loopback address\n                     (127.0.0.1) rather than the default interface address\n")
            }
            other => return Out::fail(1, format!("microk8s config: invalid option -- {other}\n")),
        }
    }
    let host = if loopback {
        "127.0.0.1".to_owned()
    } else {
        env.own_ip()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "none".into())
    };
    let cluster = st
        .map(|s| s.view.cluster_id)
        .unwrap_or_else(|| first_cluster_id(&installed));
    Out::ok(model::render_kubeconfig(&host, &cluster, &installed.name))
}
