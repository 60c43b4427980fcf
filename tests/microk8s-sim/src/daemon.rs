//! The simulated node: its cluster agent (TCP, plain HTTP JSON) and the behaviour of every CLI
//! command, which the `microk8s` CLI forwards here over loopback.
//!
//! Join checks run in the reference's order (A2, A4): token (consumed first; `500 invalid
//! token`), `ha-cluster` lock (501), agent port (502), joiner IP equal to the seed's (503),
//! already known to dqlite (500). The simulator adds one check, after those: while another join
//! is in flight anywhere in the cluster, the join is refused with `500 failed to join dqlite: …`
//! (how the concurrent-join race surfaces here; README). The first join rebinds the seed's dqlite
//! from 127.0.0.1 to the IP the joiner dialled.
//!
//! Members replicate one [`View`] (highest version wins) and heartbeat each other every
//! `MICROK8S_SIM_HEARTBEAT_MS`; a peer silent for 3 intervals is dead. The lowest-id live voter
//! replaces dead voters by live standbys while a majority of voters is alive; without that
//! majority, status is not ready and kubectl/dqlite/enable fail.
//!
//! To add a command, add an arm to [`Daemon::run_command`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::http::{self, ClientError, Request, Response};
use crate::model::{self, AddonRecord, InFlight, Role, View};
use crate::{now_ms, SimEnv};

/// Printed by `is_cluster_locked` on worker nodes (A5).
pub const WORKER_MSG: &str =
    "This MicroK8s deployment is acting as a node in a cluster.\nPlease use the control plane node.\n";
/// Printed by `status` when the node is not ready.
pub const NOT_READY_MSG: &str =
    "microk8s is not running. Use microk8s inspect for a deeper inspection.\n";
/// Printed when MicroK8s is stopped (A5).
pub const STOPPED_MSG: &str = "microk8s is not running, try microk8s start\n";
/// Printed (exit 0) by `microk8s config` on a worker (the snap's `microk8s-config.wrapper`).
pub const CONFIG_WORKER_MSG: &str = "This MicroK8s deployment is acting as a node in a cluster. Please use the microk8s config on the master.\n";
const TOKEN_MIN_LEN: usize = 32;
const FINGERPRINT_MIN_LEN: usize = 12;

/// An addon entry of the launch configuration (A8).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchAddon {
    pub name: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub disable: bool,
}

/// What `snap install` left behind (`$STATE/installed.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub persistent_token: Option<String>,
    /// Stand-in for the agent's DER certificate; its SHA-256 prefix is the join fingerprint.
    pub cert_hex: String,
    pub addons: Vec<LaunchAddon>,
    pub kubelet_args: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    token: String,
    /// Unix seconds; `None` = one-time.
    expiry_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    view: View,
    my_ip: Option<IpAddr>,
    worker: bool,
    tokens: Vec<Token>,
    launch_applied: bool,
}

/// A command's result as the CLI prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn ok(stdout: impl Into<String>) -> Out {
        Out {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    fn fail(code: i32, stdout: impl Into<String>) -> Out {
        Out {
            code,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    fn err(code: i32, stderr: impl Into<String>) -> Out {
        Out {
            code,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

pub fn installed_path(env: &SimEnv) -> PathBuf {
    env.state_dir.join("installed.json")
}

fn state_path(env: &SimEnv) -> PathBuf {
    env.state_dir.join("state.json")
}

/// Writes JSON through a temporary file and a rename.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// One simulated node.
pub struct Daemon {
    env: SimEnv,
    installed: Installed,
    st: Mutex<Persisted>,
    last_seen: Mutex<BTreeMap<String, Instant>>,
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Persisted> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.installed.name
    }

    fn persist(&self, st: &Persisted) {
        if let Err(e) = write_json(&state_path(&self.env), st) {
            eprintln!("microk8s-sim: {e:#}");
        }
    }

    fn dead_after(&self) -> Duration {
        self.env.heartbeat * 3
    }

    /// Names of the nodes alive in this node's view: itself plus peers heard from recently.
    fn alive(&self) -> BTreeSet<String> {
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut a: BTreeSet<String> = seen
            .iter()
            .filter(|(_, t)| t.elapsed() < self.dead_after())
            .map(|(n, _)| n.clone())
            .collect();
        a.insert(self.name().to_owned());
        a
    }

    /// The other nodes of `view` with an address: (name, agent address, is a worker).
    fn peers(&self, view: &View) -> Vec<(String, SocketAddr, bool)> {
        view.entries
            .iter()
            .filter(|e| e.name != self.name())
            .filter_map(|e| {
                let addr = SocketAddr::new(e.ip?, self.env.port);
                Some((e.name.clone(), addr, e.worker))
            })
            .collect()
    }

    fn ready(&self, st: &Persisted) -> bool {
        !st.worker && st.view.quorum(&self.alive())
    }

    fn inflight_timeout(&self) -> u64 {
        self.env.join_delay.as_millis() as u64 + 30_000
    }

    /// Bumps the version, persists and returns the view to push.
    fn commit(&self, st: &mut Persisted) -> View {
        st.view.version += 1;
        self.persist(st);
        st.view.clone()
    }

    /// Sends `view` to every peer; waits (bounded) for the datastore nodes to take it. Workers
    /// run no dqlite, so a datastore change does not wait for them (in MicroK8s they learn the
    /// control plane through their API server proxy): they are sent the view in the background.
    async fn push(&self, view: View) {
        let body = serde_json::to_value(&view).expect("views serialise");
        let mut tasks = Vec::new();
        for (_, addr, worker) in self.peers(&view) {
            let body = body.clone();
            let t = self.env.heartbeat;
            let task = tokio::spawn(async move {
                let _ = http::request(addr, "POST", "/sim/v1/view", Some(&body), t, t * 2).await;
            });
            if !worker {
                tasks.push(task);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Takes a view from a peer of the same cluster when it is newer.
    fn offer(&self, view: View) -> bool {
        let mut st = self.lock();
        if view.cluster_id != st.view.cluster_id || view.version <= st.view.version {
            return false;
        }
        if let Some(me) = view.entry(self.name()) {
            st.worker = me.worker;
            if me.ip.is_some() {
                st.my_ip = me.ip;
            }
        }
        st.view = view;
        self.persist(&st);
        true
    }

    // ---- heartbeats ----

    /// Pings the datastore (non-worker) nodes and syncs views with them. Workers are not
    /// pinged: like kubelets, they report to the control plane (their pings, which name the
    /// sender, count as their heartbeat there), so the cost grows with nodes × control plane,
    /// not with the square of the cluster.
    async fn heartbeat_once(self: &Arc<Self>) {
        let (view, version, cid) = {
            let st = self.lock();
            (st.view.clone(), st.view.version, st.view.cluster_id.clone())
        };
        let hb = self.env.heartbeat;
        let ping = format!("/sim/v1/ping?from={}", self.name());
        let mut tasks = Vec::new();
        for (name, addr, worker) in self.peers(&view) {
            if worker {
                continue;
            }
            let d = self.clone();
            let cid = cid.clone();
            let ping = ping.clone();
            tasks.push(tokio::spawn(async move {
                let Ok((200, pong)) = http::request(addr, "GET", &ping, None, hb, hb).await else {
                    return;
                };
                if pong["cluster_id"] != cid.as_str() || pong["name"] != name.as_str() {
                    return;
                }
                d.last_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, Instant::now());
                let theirs = pong["version"].as_u64().unwrap_or(0);
                if theirs > version {
                    if let Ok((200, v)) =
                        http::request(addr, "GET", "/sim/v1/view", None, hb, hb * 2).await
                    {
                        if let Ok(v) = serde_json::from_value::<View>(v) {
                            d.offer(v);
                        }
                    }
                } else if theirs < version {
                    let body = serde_json::to_value(d.lock().view.clone()).expect("serialises");
                    let _ =
                        http::request(addr, "POST", "/sim/v1/view", Some(&body), hb, hb * 2).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        self.maintain().await;
    }

    /// Leader duties: role adjustment and expiring a stale in-flight join.
    async fn maintain(&self) {
        let alive = self.alive();
        let pushed = {
            let mut st = self.lock();
            if st.worker {
                return;
            }
            let leader = st
                .view
                .members()
                .filter(|(e, r)| *r == Role::Voter && alive.contains(&e.name))
                .map(|(e, _)| (e.id, e.name.clone()))
                .min();
            if leader.map(|l| l.1).as_deref() != Some(self.name()) {
                return;
            }
            let mut changed = st.view.rebalance(&alive);
            if let Some(j) = &st.view.joining {
                if now_ms().saturating_sub(j.since_ms) > self.inflight_timeout() {
                    st.view.joining = None;
                    st.view.version += 1;
                    changed = true;
                }
            }
            if !changed {
                return;
            }
            self.persist(&st);
            st.view.clone()
        };
        self.push(pushed).await;
    }

    // ---- the agent's HTTP API ----

    async fn route(self: Arc<Self>, req: Request) -> Response {
        let body: serde_json::Value = if req.body.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(_) => {
                    http::BAD_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Response::error(400, "body is not json");
                }
            }
        };
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", p) if p == "/sim/v1/ping" || p.starts_with("/sim/v1/ping?") => {
                let st = self.lock();
                // A member's ping is its heartbeat (a kubelet reporting to the control plane).
                if let Some(from) = p.strip_prefix("/sim/v1/ping?from=") {
                    let member = st.view.entries.iter().any(|e| e.name == from);
                    if member && from != self.name() {
                        // Lock order: state before last_seen.
                        self.last_seen
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(from.to_owned(), Instant::now());
                    }
                }
                Response::ok(json!({
                    "name": self.name(),
                    "cluster_id": st.view.cluster_id,
                    "version": st.view.version,
                    "bad_requests": http::BAD_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
                }))
            }
            ("GET", "/sim/v1/view") => Response::ok(json!(self.lock().view)),
            ("POST", "/sim/v1/view") => match serde_json::from_value::<View>(body) {
                Ok(v) => Response::ok(json!({"taken": self.offer(v)})),
                Err(e) => Response::error(400, format!("bad view: {e}")),
            },
            ("GET", "/sim/v1/certificate") => {
                Response::ok(json!({"cert": self.installed.cert_hex}))
            }
            ("POST", "/cluster/api/v2.0/join") => self.serve_join(&req, &body).await,
            ("POST", "/sim/v1/join-done") => self.serve_join_done(&req, &body).await,
            ("POST", "/sim/v1/join-abort") => {
                let v = {
                    let mut st = self.lock();
                    if st.view.joining.as_ref().map(|j| j.ip) != Some(req.peer.ip()) {
                        return Response::error(409, "no join in flight from this address");
                    }
                    st.view.joining = None;
                    self.commit(&mut st)
                };
                self.push(v).await;
                Response::ok(json!({}))
            }
            ("POST", "/local/run") => {
                if !req.peer.ip().is_loopback() {
                    return Response::error(403, "local commands only over loopback");
                }
                let argv: Vec<String> = match serde_json::from_value(body["argv"].clone()) {
                    Ok(a) => a,
                    Err(e) => return Response::error(400, format!("bad argv: {e}")),
                };
                Response::ok(json!(self.run_command(&argv).await))
            }
            _ => Response::error(404, format!("no route {} {}", req.method, req.path)),
        }
    }

    /// `POST /cluster/api/v2.0/join`, checks in the reference's order (A2, A4).
    async fn serve_join(&self, req: &Request, body: &serde_json::Value) -> Response {
        let remote = req.peer.ip();
        let local = req.local.ip();
        let token = body["token"].as_str().unwrap_or_default();
        // "as-worker" and true are workers; "as-master" (from --controlplane) is not (A3).
        let worker = body["worker"] == json!(true) || body["worker"] == json!("as-worker");
        let (resp, push) = {
            let mut st = self.lock();
            // 1. Token, consumed before anything else.
            let persistent = self.installed.persistent_token.as_deref() == Some(token);
            if !persistent {
                let now_s = now_ms() / 1000;
                st.tokens.retain(|t| t.expiry_s.is_none_or(|e| e > now_s));
                match st.tokens.iter().position(|t| t.token == token) {
                    Some(i) => {
                        if st.tokens[i].expiry_s.is_none() {
                            st.tokens.remove(i);
                            self.persist(&st);
                        }
                    }
                    None => return Response::error(500, "invalid token"),
                }
            }
            if st.worker {
                return Response::error(500, "this node is a worker and cannot accept joins");
            }
            // 2. HA lock.
            if !st.view.ha_enabled {
                return Response::error(
                    501,
                    "high availability is not enabled on the node we join",
                );
            }
            // 3. Port.
            let port = body["port"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| body["port"].as_u64().map(|p| p.to_string()))
                .unwrap_or_default();
            if port != self.env.port.to_string() {
                return Response::error(
                    502,
                    format!(
                        "the port of the cluster agent has to be set to {}",
                        self.env.port
                    ),
                );
            }
            // 4. Own IP.
            if remote == local {
                return Response::error(
                    503,
                    "the joining node has the same IP as the node we join",
                );
            }
            // 6. Already known (5, hostname resolution, is skipped since v1.28).
            if st.view.members().any(|(e, _)| e.ip == Some(remote)) {
                return Response::error(
                    500,
                    format!("the joining node ({remote}) is already known to dqlite"),
                );
            }
            if !st.view.quorum(&self.alive()) {
                return Response::error(
                    500,
                    "failed to get dqlite members: no available dqlite leader server found",
                );
            }
            // The concurrent-join race, as the simulator models it.
            if let Some(j) = &st.view.joining {
                if now_ms().saturating_sub(j.since_ms) <= self.inflight_timeout() {
                    return Response::error(
                        500,
                        format!(
                            "failed to join dqlite: a join from {} is still in progress",
                            j.ip
                        ),
                    );
                }
            }
            if !st.view.bound {
                // MaybeUpdateDqliteBindAddress: the seed learns the IP the joiner dialled.
                st.view.bound = true;
                st.my_ip = Some(local);
                let me = self.name().to_owned();
                if let Some(e) = st.view.entry_mut(&me) {
                    e.ip = Some(local);
                }
            }
            st.view.joining = Some(InFlight {
                ip: remote,
                since_ms: now_ms(),
            });
            let v = self.commit(&mut st);
            let voters: Vec<String> = v
                .members()
                .filter(|(_, r)| *r == Role::Voter)
                .map(|(e, _)| v.address(e))
                .collect();
            let cps: Vec<String> = v
                .entries
                .iter()
                .filter(|e| e.role.is_some())
                .filter_map(|e| e.ip.map(|ip| ip.to_string()))
                .collect();
            let mut r = json!({
                "ca": "-----BEGIN CERTIFICATE-----\nsimulated\n-----END CERTIFICATE-----\n",
                "callback_token": random_hex(16),
                "apiport": "16443",
                "api_authz_mode": "AlwaysAllow",
                "kubelet_args": "",
                "hostname_override": remote.to_string(),
                "cluster_cidr": "10.1.0.0/16",
                "cluster_id": v.cluster_id,
            });
            if worker {
                r["ca_key"] = serde_json::Value::Null;
                r["control_plane_nodes"] = json!(cps);
            } else {
                r["ca_key"] = json!("simulated-ca-key");
                r["voters"] = json!(voters);
                r["cluster_cert"] = json!("simulated");
                r["cluster_key"] = json!("simulated");
            }
            (r, v)
        };
        // Every member learns about the in-flight join before the joiner goes on.
        self.push(push).await;
        Response::ok(resp)
    }

    /// The joiner finished `update_dqlite`: add it to the cluster.
    async fn serve_join_done(&self, req: &Request, body: &serde_json::Value) -> Response {
        let ip = req.peer.ip();
        let Some(name) = body["name"].as_str().filter(|n| !n.is_empty()) else {
            return Response::error(400, "missing name");
        };
        let worker = body["worker"].as_bool().unwrap_or(false);
        let v = {
            let mut st = self.lock();
            if st.view.joining.as_ref().map(|j| j.ip) != Some(ip) {
                return Response::error(409, format!("no join in flight from {ip}"));
            }
            st.view.joining = None;
            st.view
                .entries
                .retain(|e| e.name != name && e.ip != Some(ip));
            let role = if worker {
                None
            } else {
                Some(st.view.next_role())
            };
            let mut id = 0;
            while id == 0 || id == model::BOOTSTRAP_ID {
                id = rand::random::<u64>() >> 1;
            }
            st.view.entries.push(model::Entry {
                name: name.to_owned(),
                ip: Some(ip),
                id,
                role,
                worker,
            });
            self.commit(&mut st)
        };
        // It just talked to us.
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Instant::now());
        self.push(v.clone()).await;
        Response::ok(json!(v))
    }

    // ---- commands ----

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
            ["remove-node", rest @ ..] => self.cmd_remove_node(rest).await,
            ["kubectl", rest @ ..] => self.cmd_kubectl(rest),
            ["__dqlite", rest @ ..] => self.cmd_dqlite(rest),
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

    async fn cmd_join(&self, args: &[&str]) -> Out {
        let mut url: Option<&str> = None;
        let (mut worker, mut controlplane, mut skip_verify) = (false, false, false);
        for a in args {
            match *a {
                "--worker" => worker = true,
                "--controlplane" => controlplane = true,
                "--skip-verify" => skip_verify = true,
                "--disable-low-memory-guard" => {}
                s if !s.starts_with('-') && url.is_none() => url = Some(s),
                other => return Out::err(2, format!("Error: No such option: {other}\n")),
            }
        }
        let Some(url) = url else {
            return Out::err(2, "Error: Missing argument 'CONNECTION'.\n");
        };
        let (seed, port, token, fp) = match valid_connection_parts(url) {
            Ok(p) => p,
            Err(e) => return Out::fail(1, format!("Invalid connection: {e}\n")),
        };
        let mut stdout = format!("Contacting cluster at {seed}\n");
        let addr = SocketAddr::new(seed, port);
        let ct = self.env.connect_timeout;
        let total = ct + Duration::from_secs(30);
        let unreachable = |e: ClientError, stdout: String| {
            let line = match e {
                ClientError::ConnectTimeout => {
                    "TimeoutError: [Errno 110] Connection timed out".to_owned()
                }
                ClientError::Connect(e) => match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => {
                        "ConnectionRefusedError: [Errno 111] Connection refused".to_owned()
                    }
                    _ => format!("OSError: [Errno {}] {e}", e.raw_os_error().unwrap_or(0)),
                },
                ClientError::Protocol(p) => {
                    return Out {
                        code: 5,
                        stdout: format!("{stdout}Connecting to cluster failed with {p}.\n"),
                        stderr: String::new(),
                    }
                }
            };
            Out {
                code: 1,
                stdout,
                stderr: format!("Traceback (most recent call last):\n  File \"/snap/microk8s/current/scripts/wrappers/join.py\", in get_connection_info\n    conn.connect()\n{line}\n"),
            }
        };
        if let (Some(fp), false) = (&fp, skip_verify) {
            match http::request(addr, "GET", "/sim/v1/certificate", None, ct, total).await {
                Ok((200, c)) => {
                    let cert = c["cert"].as_str().unwrap_or_default();
                    if !sha256_hex(cert).starts_with(fp.as_str()) {
                        stdout.push_str(&format!("Joining cluster failed. Could not verify the identity of {seed}. Use '--skip-verify' to skip server certificate check.\n"));
                        return Out::fail(4, stdout);
                    }
                }
                Ok((s, _)) => {
                    return Out::fail(4, format!("{stdout}Peer node verification failed ({s}).\n"))
                }
                Err(e) => return unreachable(e, stdout),
            }
        }
        let worker_field = if worker {
            json!(true)
        } else if controlplane {
            json!("as-master")
        } else {
            json!(false)
        };
        let req = json!({
            "token": token,
            "hostname": self.name().to_lowercase(),
            "port": self.env.port.to_string(),
            "worker": worker_field,
            "can_handle_x509_auth": true,
            "can_handle_custom_etcd": true,
        });
        let resp = match http::request(
            addr,
            "POST",
            "/cluster/api/v2.0/join",
            Some(&req),
            ct,
            total,
        )
        .await
        {
            Ok((200, r)) => r,
            Ok((status, r)) => {
                let msg = match r["error"].as_str() {
                    Some(e) => format!("Connection failed. {e}"),
                    None => "Connection failed.".to_owned(),
                };
                stdout.push_str(&format!("{msg} ({status}).\n"));
                return Out::fail(6, stdout);
            }
            Err(e) => return unreachable(e, stdout),
        };
        if controlplane {
            // join.py takes the worker path ("as-master" is truthy), sees ca_key and gives up
            // after the token was consumed (A3).
            let _ = http::request(
                addr,
                "POST",
                "/sim/v1/join-abort",
                Some(&json!({})),
                ct,
                total,
            )
            .await;
            stdout
                .push_str("Make sure the cluster you connect to supports joining worker nodes.\n");
            return Out::fail(1, stdout);
        }
        // update_dqlite / worker configuration (A4), modelled as a delay.
        tokio::time::sleep(self.env.join_delay).await;
        let done = json!({"name": self.name(), "worker": worker});
        let view =
            match http::request(addr, "POST", "/sim/v1/join-done", Some(&done), ct, total).await {
                Ok((200, v)) => match serde_json::from_value::<View>(v) {
                    Ok(v) => v,
                    Err(e) => {
                        return Out::fail(1, format!("{stdout}Joining the cluster failed: {e}\n"))
                    }
                },
                Ok((s, r)) => {
                    return Out::fail(
                        1,
                        format!(
                            "{stdout}Waiting for node to join the cluster failed ({s}): {}\n",
                            r["error"]
                        ),
                    )
                }
                Err(e) => return unreachable(e, stdout),
            };
        {
            let mut st = self.lock();
            st.my_ip = resp["hostname_override"]
                .as_str()
                .and_then(|s| s.parse().ok());
            st.worker = worker;
            st.view = view;
            self.persist(&st);
        }
        // The seed just answered. (Lock order: state before last_seen, never the reverse.)
        let seed_name = self
            .lock()
            .view
            .entries
            .iter()
            .find(|e| e.ip == Some(seed))
            .map(|e| e.name.clone());
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.clear();
            if let Some(n) = seed_name {
                seen.insert(n, Instant::now());
            }
        }
        if worker {
            stdout.push_str("The node has joined the cluster and will appear in the nodes list in a few seconds.\n\nThis worker node gets automatically configured with the API server endpoints.\nIf the API servers are behind a loadbalancer please set the '--refresh-interval' to '0s' in:\n    /var/snap/microk8s/current/args/apiserver-proxy\n");
        } else {
            stdout.push_str("Successfully joined the cluster.\n");
        }
        Out::ok(stdout)
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

    async fn cmd_leave(&self) -> Out {
        let old = {
            let mut st = self.lock();
            let voters: Vec<String> = st
                .view
                .members()
                .filter(|(_, r)| *r == Role::Voter)
                .map(|(e, _)| e.name.clone())
                .collect();
            if !st.worker && voters == [self.name().to_owned()] {
                return Out::fail(
                    3,
                    "This node holds the only copy of the Kubernetes database. Refusing to leave.\n",
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

    async fn cmd_remove_node(&self, args: &[&str]) -> Out {
        let force = args.contains(&"--force");
        let Some(node) = args.iter().find(|a| !a.starts_with('-')).copied() else {
            return Out::err(2, "Error: Missing argument 'NODE'.\n");
        };
        let (out, v) = {
            let mut st = self.lock();
            if st.worker {
                return Out::fail(1, WORKER_MSG);
            }
            if !self.ready(&st) {
                return Out::fail(1, NOT_READY_MSG);
            }
            let by_name = st.view.entries.iter().position(|e| e.name == node);
            let ip: Option<IpAddr> = match by_name {
                Some(i) => st.view.entries[i].ip,
                None => node.parse().ok(),
            };
            let in_dqlite = st
                .view
                .entries
                .iter()
                .position(|e| e.role.is_some() && ip.is_some() && e.ip == ip);
            if in_dqlite.is_some() && !force {
                return Out::fail(1, format!("Node {node} is part of the cluster datastore. Please, run first 'microk8s leave' on the departing node.\nIf the node is not available anymore and will never attempt to join the cluster in the future use the '--force' flag.\n"));
            }
            if let Some(i) = in_dqlite {
                st.view.entries[i].role = None;
            }
            let out = match by_name {
                Some(i) => {
                    st.view.entries.remove(i);
                    Out::ok("")
                }
                None => Out::fail(1, format!("Node {node} does not exist in Kubernetes.\n")),
            };
            if in_dqlite.is_none() && by_name.is_none() {
                return out;
            }
            (out, self.commit(&mut st))
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

/// The first 12 hex digits of the SHA-256 of the (stand-in) certificate, as `server_cert_check`.
pub fn fingerprint_of(cert_hex: &str) -> String {
    sha256_hex(cert_hex)[..FINGERPRINT_MIN_LEN].to_owned()
}

fn sha256_hex(cert_hex: &str) -> String {
    let der = hex::decode(cert_hex).unwrap_or_default();
    hex::encode(Sha256::digest(&der))
}

/// join.py's `get_valid_connection_parts` (A3): `IP:PORT/TOKEN[/FINGERPRINT]`, IP literal only
/// (the host part is split on ':', so IPv6 never passes), port 1–65535, token >= 32, fingerprint
/// >= 12. Errors carry join.py's messages.
pub fn valid_connection_parts(
    connection: &str,
) -> Result<(IpAddr, u16, String, Option<String>), String> {
    const FORMAT: &str = "Expected format: <master_IP>:<master_PORT>/<token>[/<fingerprint>]";
    let parts: Vec<&str> = connection.split('/').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(FORMAT.into());
    }
    let ep: Vec<&str> = parts[0].split(':').collect();
    if ep.len() != 2 {
        return Err(FORMAT.into());
    }
    let ip: IpAddr = ep[0].parse().map_err(|_| "Invalid master IP".to_owned())?;
    let port: i64 = ep[1]
        .parse()
        .map_err(|_| "Master PORT not a number".to_owned())?;
    if !(1..=65535).contains(&port) {
        return Err("Master PORT not in range 1:65535".into());
    }
    if parts[1].len() < TOKEN_MIN_LEN {
        return Err(format!(
            "Cluster token size should be at least {TOKEN_MIN_LEN} bytes"
        ));
    }
    if parts.len() == 3 && parts[2].len() < FINGERPRINT_MIN_LEN {
        return Err(format!(
            "Fingerprint should be at least {FINGERPRINT_MIN_LEN} bytes"
        ));
    }
    Ok((
        ip,
        port as u16,
        parts[1].to_owned(),
        parts.get(2).map(|s| s.to_string()),
    ))
}

/// The cluster id a node starts with (its own one-node cluster). Derived from the random
/// stand-in certificate written at install, so `microk8s config` shows the same CA before and
/// after the daemon first ran, as the real install hook creates the CA once.
fn first_cluster_id(installed: &Installed) -> String {
    installed.cert_hex.chars().take(16).collect()
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

/// Runs the node until killed: loads `installed.json` (and `state.json` when present), serves
/// the agent on `0.0.0.0:PORT`, heartbeats, and applies the launch config's addons once.
pub async fn run(env: SimEnv) -> Result<()> {
    let ipath = installed_path(&env);
    let installed: Installed = match std::fs::read(&ipath) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", ipath.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "microk8s is not installed ({} is missing); run `snap install` first",
                ipath.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", ipath.display())),
    };
    let spath = state_path(&env);
    let st: Persisted = match std::fs::read(&spath) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", spath.display()))?
        }
        Err(_) => Persisted {
            view: View::single(first_cluster_id(&installed), &installed.name, env.own_ip()),
            my_ip: env.own_ip(),
            worker: false,
            tokens: vec![],
            launch_applied: false,
        },
    };
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", env.port))
        .await
        .with_context(|| format!("binding the cluster agent to 0.0.0.0:{}", env.port))?;
    let d = Arc::new(Daemon {
        env,
        installed,
        st: Mutex::new(st),
        last_seen: Mutex::new(BTreeMap::new()),
    });
    d.persist(&d.lock());
    // Launch-config addons are applied by the running agent (A8).
    let launch = d.clone();
    tokio::spawn(async move {
        if launch.lock().launch_applied {
            return;
        }
        for a in launch.installed.addons.clone() {
            let mut argv = vec![
                if a.disable { "disable" } else { "enable" }.to_owned(),
                a.name.clone(),
            ];
            argv.extend(a.args.clone());
            let out = launch.run_command(&argv).await;
            if out.code != 0 {
                eprintln!(
                    "microk8s-sim: launch config addon {}: {}{}",
                    a.name, out.stdout, out.stderr
                );
            }
        }
        let mut st = launch.lock();
        st.launch_applied = true;
        launch.persist(&st);
    });
    let hb = d.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(hb.env.heartbeat).await;
            hb.heartbeat_once().await;
        }
    });
    let handler = {
        let d = d.clone();
        move |req| d.clone().route(req)
    };
    http::serve(listener, handler).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_parts_follow_join_py() {
        let t = "a".repeat(32);
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}")).is_ok());
        assert_eq!(
            valid_connection_parts(&format!("node-a.local:25000/{t}")).unwrap_err(),
            "Invalid master IP"
        );
        assert!(valid_connection_parts(&format!("[fd00::1]:25000/{t}")).is_err());
        assert!(valid_connection_parts(&format!("fd00::1:25000/{t}")).is_err());
        assert_eq!(
            valid_connection_parts(&format!("10.0.0.1:0/{t}")).unwrap_err(),
            "Master PORT not in range 1:65535"
        );
        assert_eq!(
            valid_connection_parts(&format!("10.0.0.1:x/{t}")).unwrap_err(),
            "Master PORT not a number"
        );
        assert!(valid_connection_parts("10.0.0.1:25000/short")
            .unwrap_err()
            .contains("at least 32"));
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/abc"))
            .unwrap_err()
            .contains("Fingerprint"));
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/0123456789ab")).is_ok());
        assert!(valid_connection_parts(&format!("10.0.0.1:25000/{t}/a/b")).is_err());
    }
}
