//! The datastore behind the simulated API server: kine's key/value table in dqlite, reduced to
//! what the tests need (ConfigMap objects under kine's `/registry/configmaps/<ns>/<name>` keys)
//! with dqlite's quorum rules.
//!
//! What is modelled, and from where:
//! - **Writes are acknowledged only with quorum.** dqlite is Raft: an entry is committed once a
//!   majority of the *voters* stored it; standbys receive the log but do not count
//!   (canonical/dqlite `src/replication.c`, roles in `include/dqlite.h`; MicroK8s keeps 3 voters,
//!   the reference facts A5). Here one node serialises the writes, the *leader*: the live voter
//!   with the lowest dqlite id in this node's [`View`], the same rule the simulator's role
//!   adjustment uses (`replication`). A write that reaches another node is forwarded to it over
//!   the cluster agent's port (`POST /sim/v1/datastore/write`). The leader applies the write to a
//!   copy, sends the resulting snapshot to every live datastore member (voters and standbys)
//!   and answers only when a majority of all voters (itself included) has stored it.
//! - **Reads and writes are refused without quorum**, as kube-apiserver's are when kine cannot
//!   reach a dqlite leader: 500 `etcdserver: request timed out`.
//! - **An acknowledged write survives a voter's death.** Before it serves a read, and before
//!   the leader applies a write, a node fetches the snapshots of the live voters, needs answers
//!   from a majority of the voters, and takes the newest: any majority overlaps the one that
//!   acknowledged the last write (Raft's leader-completeness, done here as a read-index).
//! - Followers take a snapshot only of their own cluster (the [`View`]'s cluster id) and only
//!   when it is newer; a node that joined another cluster drops its own one-node data, as a
//!   MicroK8s join replaces the joiner's dqlite.
//!
//! Where this guesses (no MicroK8s source says it, or it is simplified):
//! - whole snapshots are sent, not Raft log entries; the store is therefore capped
//!   ([`MAX_OBJECTS`], [`MAX_TOTAL_BYTES`]) and refuses more with kube's quota error
//!   (`etcdserver: mvcc: database space exceeded`, 507 here);
//! - a write whose snapshot reached some followers but not a majority is answered 500 and not
//!   kept by the leader, yet may survive on those followers (Raft allows an uncommitted entry to
//!   survive or vanish; here it can reappear once such a follower's snapshot is the newest);
//! - a node's `alive` set (heartbeats, 3 missed = dead) decides who is asked, as everywhere in
//!   the simulator.
//!
//! For `dbctl` (backup/restore of the datastore's real contents): [`Daemon::datastore_dump`]
//! gives every key with its value after a quorum read, and [`Daemon::datastore_put`] creates or
//! overwrites one key through the leader (restore never deletes, as MicroK8s' does not).
//!
//! Persisted in `$STATE/datastore.json` (written through a temporary file and a rename).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{write_json, Daemon};
use crate::http::{self, Response};
use crate::model::Role;

/// Most objects the simulated store holds.
pub const MAX_OBJECTS: usize = 2000;
/// Most bytes of values (JSON) it holds, so a snapshot stays under the agent's body limit.
pub const MAX_TOTAL_BYTES: usize = 512 * 1024;
/// Largest single value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// One stored object: its value and kine's revisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub value: serde_json::Value,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// The whole store as one node holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub cluster_id: String,
    pub revision: u64,
    pub objects: BTreeMap<String, Object>,
}

/// A change asked of the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Create; refused when the key exists.
    Create {
        key: String,
        value: serde_json::Value,
    },
    /// Overwrite; refused when the key does not exist.
    Update {
        key: String,
        value: serde_json::Value,
    },
    /// Create or overwrite (what `dbctl restore` does with each key).
    Put {
        key: String,
        value: serde_json::Value,
    },
    Delete {
        key: String,
    },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Create { key, .. }
            | Op::Update { key, .. }
            | Op::Put { key, .. }
            | Op::Delete { key } => key,
        }
    }
}

/// Why the store refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: request timed out ({0})")]
    NoQuorum(String),
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("etcdserver: mvcc: database space exceeded")]
    Full,
    #[error("value over {MAX_VALUE_BYTES} bytes")]
    TooLarge,
    #[error("this node runs no datastore (a worker)")]
    Worker,
}

impl StoreError {
    /// The HTTP status kube-apiserver would answer.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::NoQuorum(_) => 500,
            StoreError::NotFound => 404,
            StoreError::Exists => 409,
            StoreError::Full => 507,
            StoreError::TooLarge => 413,
            StoreError::Worker => 503,
        }
    }

    fn from_response(status: u16, body: &serde_json::Value) -> StoreError {
        let msg = body["error"].as_str().unwrap_or_default().to_owned();
        match status {
            404 => StoreError::NotFound,
            409 => StoreError::Exists,
            507 => StoreError::Full,
            413 => StoreError::TooLarge,
            _ => StoreError::NoQuorum(format!("forwarded write: {status} {msg}")),
        }
    }
}

/// Applies `op` to `snap` (revision bumped); the caller keeps the old one on an error.
pub fn apply(snap: &mut Snapshot, op: &Op) -> Result<Option<Object>, StoreError> {
    let rev = snap.revision + 1;
    let out = match op {
        Op::Create { key, value } | Op::Update { key, value } | Op::Put { key, value } => {
            if serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0) > MAX_VALUE_BYTES {
                return Err(StoreError::TooLarge);
            }
            let existing = snap.objects.get(key).cloned();
            match (op, &existing) {
                (Op::Create { .. }, Some(_)) => return Err(StoreError::Exists),
                (Op::Update { .. }, None) => return Err(StoreError::NotFound),
                _ => {}
            }
            if existing.is_none() && snap.objects.len() >= MAX_OBJECTS {
                return Err(StoreError::Full);
            }
            let obj = Object {
                value: value.clone(),
                create_revision: existing.map(|o| o.create_revision).unwrap_or(rev),
                mod_revision: rev,
            };
            snap.objects.insert(key.clone(), obj.clone());
            if total_bytes(snap) > MAX_TOTAL_BYTES {
                return Err(StoreError::Full);
            }
            Some(obj)
        }
        Op::Delete { key } => match snap.objects.remove(key) {
            Some(o) => Some(o),
            None => return Err(StoreError::NotFound),
        },
    };
    snap.revision = rev;
    Ok(out)
}

fn total_bytes(snap: &Snapshot) -> usize {
    snap.objects
        .values()
        .map(|o| serde_json::to_vec(&o.value).map(|v| v.len()).unwrap_or(0))
        .sum()
}

/// The node's copy of the store plus the lock that serialises the leader's writes.
pub(super) struct Store {
    snap: std::sync::Mutex<Snapshot>,
    writes: tokio::sync::Mutex<()>,
}

impl Store {
    /// Loads `$STATE/datastore.json`, or starts empty.
    pub(super) fn load(state_dir: &std::path::Path) -> Store {
        let snap = std::fs::read(state_dir.join("datastore.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Store {
            snap: std::sync::Mutex::new(snap),
            writes: tokio::sync::Mutex::new(()),
        }
    }
}

/// Members the store talks to: (name, agent address, is a voter).
type Member = (String, SocketAddr, bool);

impl Daemon {
    fn store_snap(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.store.snap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's snapshot, as the cluster sees it: empty when it still holds another
    /// cluster's (its own before it joined).
    fn own_snapshot(&self) -> Snapshot {
        let cid = self.lock().view.cluster_id.clone();
        let s = self.store_snap().clone();
        if s.cluster_id == cid {
            s
        } else {
            Snapshot {
                cluster_id: cid,
                ..Snapshot::default()
            }
        }
    }

    /// Takes `snap` when it is this cluster's and newer than ours; persists it.
    pub(super) fn store_offer(&self, snap: Snapshot) -> bool {
        let cid = self.lock().view.cluster_id.clone();
        if snap.cluster_id != cid {
            return false;
        }
        let mut mine = self.store_snap();
        if mine.cluster_id == cid && snap.revision <= mine.revision {
            return false;
        }
        *mine = snap;
        if let Err(e) = write_json(&self.env.state_dir.join("datastore.json"), &*mine) {
            eprintln!("microk8s-sim: {e:#}");
        }
        true
    }

    /// (live datastore peers, number of voters in all, whether this node votes, the leader).
    fn store_members(&self) -> Result<(Vec<Member>, usize, bool, String), StoreError> {
        let alive = self.alive();
        let st = self.lock();
        if st.worker {
            return Err(StoreError::Worker);
        }
        if !st.view.quorum(&alive) {
            return Err(StoreError::NoQuorum("no dqlite quorum".into()));
        }
        let mut peers = Vec::new();
        let mut voters = 0;
        let mut me_voter = false;
        let mut leader: Option<(u64, String)> = None;
        for (e, role) in st.view.members() {
            let voter = role == Role::Voter;
            voters += usize::from(voter);
            if !alive.contains(&e.name) {
                continue;
            }
            if voter
                && leader
                    .as_ref()
                    .is_none_or(|l| (e.id, &e.name) < (l.0, &l.1))
            {
                leader = Some((e.id, e.name.clone()));
            }
            if e.name == self.name() {
                me_voter = voter;
            } else if let Some(ip) = e.ip {
                peers.push((e.name.clone(), SocketAddr::new(ip, self.env.port), voter));
            }
        }
        let leader = leader
            .map(|l| l.1)
            .ok_or_else(|| StoreError::NoQuorum("no live voter".into()))?;
        Ok((peers, voters, me_voter, leader))
    }

    fn store_timeout(&self) -> Duration {
        self.env.heartbeat.max(Duration::from_millis(500)) * 2
    }

    /// Brings this node's copy up to the newest a majority of the voters holds.
    async fn store_sync(&self) -> Result<(), StoreError> {
        let (peers, voters, me_voter, _) = self.store_members()?;
        let t = self.store_timeout();
        let mut tasks = Vec::new();
        for (_, addr, voter) in peers.into_iter().filter(|p| p.2) {
            tasks.push(tokio::spawn(async move {
                let r = http::request(addr, None, "GET", "/sim/v1/datastore/snapshot", None, t, t)
                    .await;
                (voter, r)
            }));
        }
        let mut answered = usize::from(me_voter);
        let mut newest: Option<Snapshot> = None;
        for task in tasks {
            let Ok((_, Ok((200, body)))) = task.await else {
                continue;
            };
            let Ok(s) = serde_json::from_value::<Snapshot>(body) else {
                continue;
            };
            answered += 1;
            if newest.as_ref().is_none_or(|n| s.revision > n.revision) {
                newest = Some(s);
            }
        }
        if answered * 2 <= voters {
            return Err(StoreError::NoQuorum(format!(
                "{answered} of {voters} voters answered"
            )));
        }
        if let Some(s) = newest {
            self.store_offer(s);
        }
        Ok(())
    }

    /// Reads one key after a quorum read.
    pub(super) async fn datastore_get(&self, key: &str) -> Result<Object, StoreError> {
        self.store_sync().await?;
        self.own_snapshot()
            .objects
            .get(key)
            .cloned()
            .ok_or(StoreError::NotFound)
    }

    /// Every key under `prefix` (in key order) after a quorum read, and the store's revision.
    pub(super) async fn datastore_list(
        &self,
        prefix: &str,
    ) -> Result<(u64, Vec<(String, Object)>), StoreError> {
        self.store_sync().await?;
        let s = self.own_snapshot();
        let items = s
            .objects
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        Ok((s.revision, items))
    }

    /// Every key with its value after a quorum read (for `dbctl backup`).
    pub async fn datastore_dump(&self) -> Result<BTreeMap<String, serde_json::Value>, StoreError> {
        let (_, items) = self.datastore_list("").await?;
        Ok(items.into_iter().map(|(k, o)| (k, o.value)).collect())
    }

    /// Creates or overwrites `key` (for `dbctl restore`).
    pub async fn datastore_put(
        &self,
        key: &str,
        value: serde_json::Value,
    ) -> Result<Object, StoreError> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
        };
        self.datastore_write(op).await?.ok_or(StoreError::NotFound)
    }

    /// Carries out a write: on the leader, or forwarded to it. Returns the object written (or
    /// deleted).
    pub(super) async fn datastore_write(&self, op: Op) -> Result<Option<Object>, StoreError> {
        let (_, _, _, leader) = self.store_members()?;
        if leader == self.name() {
            return self.lead_write(op).await;
        }
        let addr = {
            let st = self.lock();
            st.view
                .entry(&leader)
                .and_then(|e| e.ip)
                .map(|ip| SocketAddr::new(ip, self.env.port))
        };
        let Some(addr) = addr else {
            return Err(StoreError::NoQuorum(format!(
                "leader {leader} has no address"
            )));
        };
        let body = serde_json::to_value(&op).expect("ops serialise");
        let t = self.store_timeout();
        match http::request(
            addr,
            None,
            "POST",
            "/sim/v1/datastore/write",
            Some(&body),
            t,
            t * 3,
        )
        .await
        {
            Ok((200, b)) => Ok(serde_json::from_value(b["object"].clone()).ok()),
            Ok((status, b)) => Err(StoreError::from_response(status, &b)),
            Err(e) => Err(StoreError::NoQuorum(format!("leader {leader}: {e}"))),
        }
    }

    /// The leader's write: sync, apply to a copy, replicate, commit on a majority of voters.
    async fn lead_write(&self, op: Op) -> Result<Option<Object>, StoreError> {
        let _one_at_a_time = self.store.writes.lock().await;
        self.store_sync().await?;
        let (peers, voters, me_voter, leader) = self.store_members()?;
        if leader != self.name() {
            return Err(StoreError::NoQuorum("leader changed".into()));
        }
        let mut next = self.own_snapshot();
        let out = apply(&mut next, &op)?;
        let body = serde_json::to_value(&next).expect("snapshots serialise");
        let t = self.store_timeout();
        let mut tasks = Vec::new();
        for (_, addr, voter) in peers {
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let r = http::request(
                    addr,
                    None,
                    "POST",
                    "/sim/v1/datastore/snapshot",
                    Some(&body),
                    t,
                    t,
                )
                .await;
                voter && matches!(r, Ok((200, ref b)) if b["stored"] == true)
            }));
        }
        let mut stored = usize::from(me_voter);
        for task in tasks {
            if task.await.unwrap_or(false) {
                stored += 1;
            }
        }
        if stored * 2 <= voters {
            return Err(StoreError::NoQuorum(format!(
                "{stored} of {voters} voters stored revision {} of {}",
                next.revision,
                op.key()
            )));
        }
        self.store_offer(next);
        Ok(out)
    }

    /// The replication routes on the cluster agent's port (see the module docs).
    pub(super) async fn datastore_route(&self, method: &str, path: &str, body: &[u8]) -> Response {
        match (method, path) {
            ("GET", "/sim/v1/datastore/snapshot") => {
                if self.lock().worker {
                    return Response::error(503, StoreError::Worker.to_string());
                }
                Response::ok(json!(self.own_snapshot()))
            }
            ("POST", "/sim/v1/datastore/snapshot") => {
                match serde_json::from_slice::<Snapshot>(body) {
                    Ok(s) => {
                        let rev = s.revision;
                        self.store_offer(s);
                        // Stored when we now hold that revision (or a newer one).
                        let mine = self.own_snapshot().revision;
                        Response::ok(json!({"stored": mine >= rev, "revision": mine}))
                    }
                    Err(e) => Response::error(400, format!("bad snapshot: {e}")),
                }
            }
            ("POST", "/sim/v1/datastore/write") => match serde_json::from_slice::<Op>(body) {
                Ok(op) => {
                    let (_, _, _, leader) = match self.store_members() {
                        Ok(m) => m,
                        Err(e) => return Response::error(e.status(), e.to_string()),
                    };
                    if leader != self.name() {
                        return Response::error(503, "etcdserver: leader changed");
                    }
                    match self.lead_write(op).await {
                        Ok(obj) => Response::ok(json!({ "object": obj })),
                        Err(e) => Response::error(e.status(), e.to_string()),
                    }
                }
                Err(e) => Response::error(400, format!("bad write: {e}")),
            },
            _ => Response::error(404, format!("no route {method} {path}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, v: i64) -> Op {
        Op::Put {
            key: key.into(),
            value: json!(v),
        }
    }

    #[test]
    fn apply_keeps_kine_revisions_and_refuses_without_changing_anything() {
        let mut s = Snapshot::default();
        apply(&mut s, &put("/a", 1)).unwrap();
        apply(&mut s, &put("/b", 2)).unwrap();
        apply(&mut s, &put("/a", 3)).unwrap();
        assert_eq!(s.revision, 3);
        assert_eq!(s.objects["/a"].create_revision, 1);
        assert_eq!(s.objects["/a"].mod_revision, 3);
        let before = s.clone();
        let create = Op::Create {
            key: "/a".into(),
            value: json!(0),
        };
        assert_eq!(apply(&mut s.clone(), &create), Err(StoreError::Exists));
        let update = Op::Update {
            key: "/z".into(),
            value: json!(0),
        };
        assert_eq!(apply(&mut s.clone(), &update), Err(StoreError::NotFound));
        let del = Op::Delete { key: "/z".into() };
        assert_eq!(apply(&mut s.clone(), &del), Err(StoreError::NotFound));
        let big = Op::Put {
            key: "/big".into(),
            value: json!("x".repeat(MAX_VALUE_BYTES + 1)),
        };
        assert_eq!(apply(&mut s.clone(), &big), Err(StoreError::TooLarge));
        assert_eq!(s, before);
        apply(&mut s, &Op::Delete { key: "/a".into() }).unwrap();
        assert!(!s.objects.contains_key("/a"));
        assert_eq!(s.revision, 4);
    }

    #[test]
    fn the_store_is_capped() {
        let mut s = Snapshot::default();
        for i in 0..MAX_OBJECTS {
            apply(&mut s, &put(&format!("/k{i:05}"), 1)).unwrap();
        }
        assert_eq!(
            apply(&mut s.clone(), &put("/one-more", 1)),
            Err(StoreError::Full)
        );
        // Overwriting an existing key is still allowed.
        apply(&mut s, &put("/k00000", 2)).unwrap();
        let mut t = Snapshot::default();
        let v = json!("y".repeat(MAX_VALUE_BYTES - 10));
        let mut refused = false;
        for i in 0..20 {
            let op = Op::Put {
                key: format!("/v{i}"),
                value: v.clone(),
            };
            if apply(&mut t, &op) == Err(StoreError::Full) {
                refused = true;
                break;
            }
        }
        assert!(refused, "the byte cap holds");
    }
}
