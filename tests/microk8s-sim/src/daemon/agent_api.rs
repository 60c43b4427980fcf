//! The cluster agent's HTTPS API: the replication routes (`/sim/v1/ping`, `/sim/v1/view`), the
//! seed's side of a join, and `/local/run`, through which the `microk8s` CLI runs commands.
//!
//! Every request other than the replication chatter (ping, view) is appended to the node's
//! request log, `$STATE/requests.jsonl` (`ts_ms`, `peer`, `method`, `path`, `status`; never a
//! body), so tests can tell which peers reached the agent at all.
//!
//! Join checks run in the reference's order (A2, A4): token (consumed first; `500 invalid
//! token`), `ha-cluster` lock (501), agent port (502), joiner IP equal to the seed's (503),
//! already known to dqlite (500). The simulator adds one check, after those, on the joins in
//! flight anywhere in the cluster (a retry from the same address replaces its own): a
//! control-plane join beside any other join is refused with `500 failed to join dqlite: …`
//! (how the concurrent-join race surfaces here; README), a worker join beside a control-plane
//! join with `500 failed to retrieve list of control plane nodes: …`. Worker joins beside worker
//! joins are accepted: in canonical/microk8s-cluster-agent `pkg/api/v2/join.go` a worker join
//! changes no dqlite membership and every shared file it touches is under a mutex. The first
//! join rebinds the seed's dqlite from 127.0.0.1 to the IP the joiner dialled.
//!
//! Certificate signing (`POST /cluster/api/v1.0/sign-cert`, `pkg/api/v1/sign_cert.go`): a worker
//! join issues the request tokens `<token>-kubelet` and `<token>-proxy`; each signing consumes
//! its token, then signs. The real agent's `SignCertificate` (`pkg/snap/snap.go`) runs the
//! snap's `sign_certificate` (`openssl x509 … -CAcreateserial`) with no lock, so two signings at
//! the same instant can fail on the shared serial file ("unable to load number"). Modelled
//! deterministically: a signing runs for `MICROK8S_SIM_SIGN_RACE_MS`, and one that starts while
//! another runs on this node fails with `500 failed to sign certificate: sign_certificate
//! failed: exit status 1` (the one already running succeeds); the joiner's join is then over
//! (join.py exits 1). One joiner's two signings run one after the other and never race.
//!
//! To add a route, add an arm to [`Daemon::route`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;

use super::{random_hex, Daemon, Persisted};
use crate::http::{self, Request, Response};
use crate::model::{self, InFlight, Role, View};
use crate::now_ms;

impl Daemon {
    /// Answers one request and logs it (see the module docs).
    pub(super) async fn route(self: Arc<Self>, req: Request) -> Response {
        let (method, path, peer) = (req.method.clone(), req.path.clone(), req.peer);
        let resp = self.clone().answer(req).await;
        let chatter = path.starts_with("/sim/v1/ping")
            || path == "/sim/v1/view"
            || path.starts_with("/sim/v1/datastore/");
        if !chatter {
            self.log_request(peer, &method, &path, resp.status);
        }
        resp
    }

    fn log_request(&self, peer: std::net::SocketAddr, method: &str, path: &str, status: u16) {
        let line = format!(
            "{}\n",
            json!({
                "ts_ms": now_ms(),
                "peer": peer.ip().to_string(),
                "method": method,
                "path": path,
                "status": status,
            })
        );
        let log = super::request_log_path(&self.env);
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = res {
            eprintln!("microk8s-sim: writing request log {}: {e}", log.display());
        }
    }

    async fn answer(self: Arc<Self>, req: Request) -> Response {
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
                    // Lock order: state before last_seen.
                    "alive": self.alive(),
                    "bad_requests": http::BAD_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
                }))
            }
            ("GET", "/sim/v1/view") => Response::ok(json!(self.lock().view)),
            // This node's containerd images (`images`), for a peer's helm --wait.
            ("GET", "/sim/v1/images") => Response::ok(json!(self.image_names())),
            ("POST", "/sim/v1/view") => match serde_json::from_value::<View>(body) {
                Ok(v) => Response::ok(json!({"taken": self.offer(v)})),
                Err(e) => Response::error(400, format!("bad view: {e}")),
            },
            ("POST", "/cluster/api/v2.0/join") => self.serve_join(&req, &body).await,
            ("POST", "/sim/v1/join-done") => self.serve_join_done(&req, &body).await,
            ("POST", "/sim/v1/join-abort") => {
                if !self.end_inflight(req.peer.ip()).await {
                    return Response::error(409, "no join in flight from this address");
                }
                Response::ok(json!({}))
            }
            (m, p) if p.starts_with("/sim/v1/datastore/") => {
                self.datastore_route(m, p, &req.body).await
            }
            ("POST", "/cluster/api/v1.0/sign-cert") => self.serve_sign_cert(&req, &body).await,
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
            if let Err(refused) = self.consume_token(&mut st, token) {
                return refused;
            }
            if let Err(refused) = self.check_joiner(&st, body, remote, local, worker) {
                return refused;
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
            st.view.joining.retain(|j| j.ip != remote);
            st.view.joining.push(InFlight {
                ip: remote,
                since_ms: now_ms(),
                worker,
            });
            if worker {
                // AddCertificateRequestToken (join.go), one per certificate to sign.
                let mut tokens = cert_tokens();
                for name in ["kubelet", "proxy"] {
                    *tokens.entry(format!("{token}-{name}")).or_default() += 1;
                }
            }
            let v = self.commit(&mut st);
            (join_answer(&v, remote, worker), v)
        };
        // Every member learns about the in-flight join before the joiner goes on.
        self.push(push).await;
        Response::ok(resp)
    }

    /// Accepts a persistent token (read afresh from `$SNAP_DATA/credentials`, so a revoked one
    /// is refused at once; [`crate::credentials`]) or a valid issued one; a one-time token is
    /// used up even when a later check refuses the join, as in the reference.
    fn consume_token(&self, st: &mut Persisted, token: &str) -> Result<(), Response> {
        if crate::credentials::is_valid_persistent_token(
            &self.env.snap_data,
            token,
            now_ms() / 1000,
        ) {
            return Ok(());
        }
        let now_s = now_ms() / 1000;
        st.tokens.retain(|t| t.expiry_s.is_none_or(|e| e > now_s));
        match st.tokens.iter().position(|t| t.token == token) {
            Some(i) => {
                if st.tokens[i].expiry_s.is_none() {
                    st.tokens.remove(i);
                    self.persist(st);
                }
                Ok(())
            }
            None => Err(Response::error(500, "invalid token")),
        }
    }

    /// The checks after the token, in the reference's order, then the simulator's own ones
    /// (quorum, a join already in flight). `remote` is the joiner, `local` the address it dialled.
    fn check_joiner(
        &self,
        st: &Persisted,
        body: &serde_json::Value,
        remote: IpAddr,
        local: IpAddr,
        worker: bool,
    ) -> Result<(), Response> {
        if st.worker {
            return Err(Response::error(
                500,
                "this node is a worker and cannot accept joins",
            ));
        }
        // 2. HA lock.
        if !st.view.ha_enabled {
            return Err(Response::error(
                501,
                "high availability is not enabled on the node we join",
            ));
        }
        // 3. Port.
        let port = body["port"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| body["port"].as_u64().map(|p| p.to_string()))
            .unwrap_or_default();
        if port != self.env.port.to_string() {
            return Err(Response::error(
                502,
                format!(
                    "the port of the cluster agent has to be set to {}",
                    self.env.port
                ),
            ));
        }
        // 4. Own IP.
        if remote == local {
            return Err(Response::error(
                503,
                "the joining node has the same IP as the node we join",
            ));
        }
        // 6. Already known (5, hostname resolution, is skipped since v1.28).
        if st.view.members().any(|(e, _)| e.ip == Some(remote)) {
            return Err(Response::error(
                500,
                format!("the joining node ({remote}) is already known to dqlite"),
            ));
        }
        if !st.view.quorum(&self.alive()) {
            return Err(Response::error(
                500,
                "failed to get dqlite members: no available dqlite leader server found",
            ));
        }
        // The concurrent-join race, as the simulator models it: a control-plane join changes
        // dqlite's membership, so it runs alone; worker joins run beside each other.
        let current = self.inflight_current(&st.view);
        let mut others = st
            .view
            .joining
            .iter()
            .filter(|j| j.ip != remote && current(j));
        if worker {
            if let Some(j) = others.find(|j| !j.worker) {
                return Err(Response::error(
                    500,
                    format!(
                        "failed to retrieve list of control plane nodes: a control-plane join from {} is still in progress",
                        j.ip
                    ),
                ));
            }
        } else if let Some(j) = others.next() {
            return Err(Response::error(
                500,
                format!(
                    "failed to join dqlite: a join from {} is still in progress",
                    j.ip
                ),
            ));
        }
        Ok(())
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
            if !st.view.joining.iter().any(|j| j.ip == ip) {
                return Response::error(409, format!("no join in flight from {ip}"));
            }
            st.view.joining.retain(|j| j.ip != ip);
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
}

impl Daemon {
    /// Drops the join in flight from `ip`, if any, and tells the members. Returns whether
    /// there was one.
    async fn end_inflight(&self, ip: IpAddr) -> bool {
        let v = {
            let mut st = self.lock();
            if !st.view.joining.iter().any(|j| j.ip == ip) {
                return false;
            }
            st.view.joining.retain(|j| j.ip != ip);
            self.commit(&mut st)
        };
        self.push(v).await;
        true
    }

    /// `POST /cluster/api/v1.0/sign-cert` (`pkg/api/v1/sign_cert.go`): consume the request
    /// token, then sign, failing when another signing started within the race window (see the
    /// module docs). A failed signing ends the requester's join in flight.
    async fn serve_sign_cert(&self, req: &Request, body: &serde_json::Value) -> Response {
        let token = body["token"].as_str().unwrap_or_default();
        if body["request"].as_str().is_none_or(str::is_empty) {
            return Response::error(400, "missing certificate signing request");
        }
        if !consume_cert_token(token) {
            return Response::error(500, "invalid token");
        }
        // openssl fails at once when it cannot read the serial file another run is rewriting;
        // otherwise it runs for the modelled time.
        let raced = {
            let mut running = SIGNINGS.lock().unwrap_or_else(|p| p.into_inner());
            let raced = *running > 0 && !self.env.sign_race.is_zero();
            if !raced {
                *running += 1;
            }
            raced
        };
        if !raced {
            tokio::time::sleep(self.env.sign_race).await;
            *SIGNINGS.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        }
        if raced {
            eprintln!(
                "microk8s-sim: sign_certificate for {}: unable to load number from ca.srl (a concurrent signing rewrote the serial file)",
                req.peer.ip()
            );
            self.end_inflight(req.peer.ip()).await;
            return Response::error(
                500,
                "failed to sign certificate: sign_certificate failed: exit status 1",
            );
        }
        Response::ok(json!({
            "certificate": "-----BEGIN CERTIFICATE-----\nsimulated\n-----END CERTIFICATE-----\n"
        }))
    }
}

/// Certificate-request tokens issued by worker joins, with their count: the reference appends
/// a line to `certs-request-tokens.txt` per join (`AppendToken`) and a signing removes the
/// first matching line only (`RemoveToken` in `pkg/util/token.go`), so workers joining with
/// the same persistent token each have their own. One agent per process, so process-wide.
fn cert_tokens() -> std::sync::MutexGuard<'static, BTreeMap<String, u32>> {
    static TOKENS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());
    TOKENS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes one line of `token` (`ConsumeCertificateRequestToken`); false if there is none.
fn consume_cert_token(token: &str) -> bool {
    let mut tokens = cert_tokens();
    match tokens.get_mut(token) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            tokens.remove(token);
            true
        }
        None => false,
    }
}

/// Signings running on this agent.
static SIGNINGS: Mutex<u32> = Mutex::new(0);

/// The seed's answer to an accepted join: what a worker needs (the control plane's addresses)
/// or what a datastore node needs (the voters, the CA key, the cluster certificate).
fn join_answer(v: &View, remote: IpAddr, worker: bool) -> serde_json::Value {
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
        let cps: Vec<String> = v
            .entries
            .iter()
            .filter(|e| e.role.is_some())
            .filter_map(|e| e.ip.map(|ip| ip.to_string()))
            .collect();
        r["ca_key"] = serde_json::Value::Null;
        r["control_plane_nodes"] = json!(cps);
    } else {
        let voters: Vec<String> = v
            .members()
            .filter(|(_, r)| *r == Role::Voter)
            .map(|(e, _)| v.address(e))
            .collect();
        r["ca_key"] = json!("simulated-ca-key");
        r["voters"] = json!(voters);
        r["cluster_cert"] = json!("simulated");
        r["cluster_key"] = json!("simulated");
    }
    r
}
