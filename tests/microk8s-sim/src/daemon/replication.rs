//! Replication: members share one [`View`] (the highest version wins) and heartbeat each other
//! every `MICROK8S_SIM_HEARTBEAT_MS`; a peer silent for 3 intervals is dead. The lowest-id live
//! voter replaces dead voters by live standbys while a majority of voters is alive; without that
//! majority, status is not ready and kubectl/dqlite/enable fail.
//!
//! A change is made under the state lock, versioned by [`Daemon::commit`] and sent with
//! [`Daemon::push`]; a node takes a pushed or fetched view through [`Daemon::offer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Daemon;
use crate::http;
use crate::model::{Role, View};

impl Daemon {
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

    /// Sends `view` to the datastore (non-worker) peers and waits (bounded) for them to take
    /// it. Workers are not sent it: they run no dqlite (in MicroK8s they learn the control
    /// plane through their API server proxy), and here they fetch a newer view at their next
    /// heartbeat to the control plane, so a push to every worker on every change (twice per
    /// join, a TLS handshake each) would only load the machine running a large test rack.
    pub(super) async fn push(&self, view: View) {
        let body = serde_json::to_value(&view).expect("views serialise");
        let mut tasks = Vec::new();
        for (_, addr, worker) in self.peers(&view) {
            if worker {
                continue;
            }
            let body = body.clone();
            let t = self.env.heartbeat;
            tasks.push(tokio::spawn(async move {
                let _ =
                    http::request(addr, None, "POST", "/sim/v1/view", Some(&body), t, t * 2).await;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Takes a view from a peer of the same cluster when it is newer.
    pub(super) fn offer(&self, view: View) -> bool {
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
    pub(super) async fn heartbeat_once(self: &Arc<Self>) {
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
                let Ok((200, pong)) = http::request(addr, None, "GET", &ping, None, hb, hb).await
                else {
                    return;
                };
                if pong["cluster_id"] != cid.as_str() || pong["name"] != name.as_str() {
                    return;
                }
                d.last_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, Instant::now());
                // Who the control plane sees alive: a worker's only news of other workers
                // (MetalLB's speakers know every node; module `metallb`).
                if let Some(alive) = pong["alive"].as_array() {
                    let now = Instant::now();
                    let mut rep = d.reported.lock().unwrap_or_else(|p| p.into_inner());
                    for n in alive.iter().filter_map(|n| n.as_str()) {
                        rep.insert(n.to_owned(), now);
                    }
                }
                let theirs = pong["version"].as_u64().unwrap_or(0);
                if theirs > version {
                    if let Ok((200, v)) =
                        http::request(addr, None, "GET", "/sim/v1/view", None, hb, hb * 2).await
                    {
                        if let Ok(v) = serde_json::from_value::<View>(v) {
                            d.offer(v);
                        }
                    }
                } else if theirs < version {
                    let body = serde_json::to_value(d.lock().view.clone()).expect("serialises");
                    let _ =
                        http::request(addr, None, "POST", "/sim/v1/view", Some(&body), hb, hb * 2)
                            .await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        self.maintain().await;
    }

    /// Leader duties: role adjustment and expiring stale in-flight joins.
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
            let current = self.inflight_current(&st.view);
            let before = st.view.joining.len();
            st.view.joining.retain(current);
            if st.view.joining.len() != before {
                st.view.version += 1;
                changed = true;
            }
            if !changed {
                return;
            }
            self.persist(&st);
            st.view.clone()
        };
        self.push(pushed).await;
    }
}
