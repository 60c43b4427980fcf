//! The in-process `FakeMicrok8s` (used by agent tests) and the real adapter driving the
//! simulator across network namespaces go through one scenario, written against
//! `Arc<dyn Microk8s>`, and must produce the same transcript. This keeps the fake honest.
//! Needs root. Run: `cargo test -p microk8s-sim --test parity`.

mod support;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use firstboot::system::fakes::FakeWorld;
use firstboot::system::microk8s::{
    DqliteMember, EnableOutcome, InstallOutcome, InstallSource, JoinError, JoinRole, JoinTarget,
    K8sNode, Microk8s, Microk8sError, RealMicrok8s, Status,
};
use futures_util::future::BoxFuture;
use netns_lab::{Host, Lab};
use rackseed_protocol::secret::ClusterSecret;
use support::*;

/// The real adapter, each call run on a thread inside the node's namespace.
struct InNamespace {
    host: Host,
    inner: RealMicrok8s,
}

impl InNamespace {
    fn call<T, F, Fut>(&self, f: F) -> BoxFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(RealMicrok8s) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        drop(self.host.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _ = tx.send(rt.block_on(f(inner)));
            Ok(())
        }));
        Box::pin(async move { rx.await.expect("the namespace thread answered") })
    }
}

impl Microk8s for InNamespace {
    fn is_installed(&self) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        self.call(|a| async move { a.is_installed().await })
    }
    fn install<'a>(
        &'a self,
        source: &'a InstallSource,
        secret: &'a ClusterSecret,
    ) -> BoxFuture<'a, Result<InstallOutcome, Microk8sError>> {
        let (source, secret) = (source.clone(), secret.clone());
        self.call(move |a| async move { a.install(&source, &secret).await })
    }
    fn status(&self) -> BoxFuture<'_, Result<Status, Microk8sError>> {
        self.call(|a| async move { a.status().await })
    }
    fn wait_ready(&self, timeout: Duration) -> BoxFuture<'_, Result<bool, Microk8sError>> {
        self.call(move |a| async move { a.wait_ready(timeout).await })
    }
    fn join<'a>(
        &'a self,
        target: &'a JoinTarget,
        role: JoinRole,
    ) -> BoxFuture<'a, Result<(), JoinError>> {
        let t = target.clone();
        self.call(move |a| async move { a.join(&t, role).await })
    }
    fn dqlite_members(&self) -> BoxFuture<'_, Result<Vec<DqliteMember>, Microk8sError>> {
        self.call(|a| async move { a.dqlite_members().await })
    }
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<K8sNode>, Microk8sError>> {
        self.call(|a| async move { a.nodes().await })
    }
    fn enable<'a>(
        &'a self,
        addon: &'a str,
        args: &'a [String],
    ) -> BoxFuture<'a, Result<EnableOutcome, Microk8sError>> {
        let (addon, args) = (addon.to_owned(), args.to_vec());
        self.call(move |a| async move { a.enable(&addon, &args).await })
    }
    fn label_node<'a>(
        &'a self,
        node: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        let (node, labels) = (node.to_owned(), labels.clone());
        self.call(move |a| async move { a.label_node(&node, &labels).await })
    }
    fn leave(&self) -> BoxFuture<'_, Result<(), Microk8sError>> {
        self.call(|a| async move { a.leave().await })
    }
    fn remove_node<'a>(
        &'a self,
        name_or_ip: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<(), Microk8sError>> {
        let n = name_or_ip.to_owned();
        self.call(move |a| async move { a.remove_node(&n, force).await })
    }
    fn config(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        self.call(|a| async move { a.config().await })
    }
    fn cluster_agent_fingerprint(&self) -> BoxFuture<'_, Result<String, Microk8sError>> {
        self.call(|a| async move { a.cluster_agent_fingerprint().await })
    }
}

/// A short, comparable description of an outcome.
fn kind<T: std::fmt::Debug, E: std::fmt::Debug>(r: &Result<T, E>) -> String {
    let s = format!("{r:?}");
    // Keep the variant and, for rejections, the status; drop free text.
    match r {
        Ok(_) => s,
        Err(_) => s
            .split(['{', '('])
            .take(2)
            .collect::<Vec<_>>()
            .join("(")
            .trim()
            .to_owned(),
    }
}

fn join_kind(r: &Result<(), JoinError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(JoinError::Rejected { status, .. }) => format!("rejected {status}"),
        Err(e) => kind::<(), _>(&Err::<(), _>(e)),
    }
}

async fn settle(seed: &dyn Microk8s, ip: IpAddr) {
    for _ in 0..100 {
        if let Ok(nodes) = seed.nodes().await {
            if nodes.iter().any(|n| n.internal_ip == Some(ip) && n.ready) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{ip} never became a Ready node");
}

/// One scenario for both implementations; returns what happened, step by step.
async fn scenario(n: &[Arc<dyn Microk8s>], ips: &[IpAddr]) -> Vec<String> {
    let mut t = Vec::new();
    let token = secret().microk8s_token();
    let to = |i: usize| JoinTarget::new(ips[i], token.clone());
    let status = |s: Status| match s {
        Status::Running(r) => format!(
            "running voters={:?} standby={:?} ha={} dns={}",
            r.voters(),
            r.standby(),
            r.ha_formed(),
            r.addon_enabled("dns")
        ),
        other => format!("{other:?}"),
    };
    t.push(status(n[0].status().await.unwrap()));
    let mut bad = to(0);
    bad.token = "f".repeat(64);
    t.push(format!(
        "bad token: {}",
        join_kind(&n[1].join(&bad, JoinRole::ControlPlane).await)
    ));
    t.push(format!(
        "self: {}",
        join_kind(&n[0].join(&to(0), JoinRole::ControlPlane).await)
    ));
    for (i, role) in [
        (1, JoinRole::ControlPlane),
        (2, JoinRole::ControlPlane),
        (3, JoinRole::Worker),
    ] {
        t.push(format!(
            "join {i}: {}",
            join_kind(&n[i].join(&to(0), role).await)
        ));
        settle(n[0].as_ref(), ips[i]).await;
    }
    t.push(format!(
        "again: {}",
        join_kind(&n[1].join(&to(0), JoinRole::ControlPlane).await)
    ));
    for _ in 0..50 {
        if n[1]
            .wait_ready(Duration::from_secs(1))
            .await
            .unwrap_or(false)
            && n[2]
                .wait_ready(Duration::from_secs(1))
                .await
                .unwrap_or(false)
        {
            break;
        }
    }
    for (i, node) in n.iter().enumerate() {
        t.push(format!(
            "status {i}: {}",
            status(node.status().await.unwrap())
        ));
    }
    let m = n[2].dqlite_members().await.unwrap();
    t.push(format!(
        "dqlite: {:?}",
        m.iter().map(|m| (&m.address, m.role)).collect::<Vec<_>>()
    ));
    let mut k = n[1].nodes().await.unwrap();
    k.sort_by_key(|n| n.internal_ip);
    t.push(format!(
        "nodes: {:?}",
        k.iter()
            .map(|n| (n.internal_ip, n.role))
            .collect::<Vec<_>>()
    ));
    t.push(format!(
        "enable: {:?}",
        n[1].enable("metallb", &[]).await.ok()
    ));
    t.push(format!(
        "enable again: {:?}",
        n[2].enable("metallb", &[]).await.ok()
    ));
    t.push(format!(
        "enable worker: {}",
        kind(&n[3].enable("metallb", &[]).await)
    ));
    // The admin kubeconfig: each control-plane node names itself, all share the cluster's CA;
    // a worker has none.
    let line = |k: &str, key: &str| {
        k.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.trim().to_owned())
            .unwrap_or_default()
    };
    let k0 = n[0].config().await.unwrap();
    for (i, node) in n.iter().enumerate().take(3) {
        let k = node.config().await.unwrap();
        t.push(format!(
            "config {i}: {} same-ca={} kind={}",
            line(&k, "server:"),
            line(&k, "certificate-authority-data:") == line(&k0, "certificate-authority-data:"),
            line(&k, "kind:")
        ));
    }
    t.push(format!("config worker: {}", kind(&n[3].config().await)));
    // Node labels: put on by a control-plane node, any node by name; not by a worker, not on
    // an unknown node.
    let want: std::collections::BTreeMap<String, String> =
        [("example.com/rack".to_owned(), "r1".to_owned())].into();
    let target = k[2].name.clone();
    t.push(format!(
        "label: {}",
        kind(&n[0].label_node(&target, &want).await)
    ));
    let mut labelled = n[1].nodes().await.unwrap();
    labelled.sort_by_key(|x| x.internal_ip);
    t.push(format!(
        "labels: {:?}",
        labelled
            .iter()
            .map(|x| x.labels.get("example.com/rack").cloned())
            .collect::<Vec<_>>()
    ));
    t.push(format!(
        "label unknown: {}",
        kind(&n[0].label_node("ghost", &want).await)
    ));
    t.push(format!(
        "label from worker: {}",
        kind(&n[3].label_node(&target, &want).await)
    ));
    let ip1 = ips[1].to_string();
    t.push(format!(
        "remove member: {}",
        kind(&n[0].remove_node(&ip1, false).await)
    ));
    t.push(format!(
        "remove unknown: {}",
        kind(&n[0].remove_node("ghost", true).await)
    ));
    t
}

#[test]
fn fake_and_simulator_tell_the_same_story() {
    let lab = Lab::new(4).expect("creating the network lab (run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let rt = runtime();
    let _g = rt.enter();
    let ips: Vec<IpAddr> = (0..4).map(|i| IpAddr::V4(lab.host(i).addr)).collect();

    let mut sims: Vec<SimNode> = (0..4)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    for s in &mut sims {
        s.install_and_start();
    }
    let real: Vec<Arc<dyn Microk8s>> = sims
        .iter()
        .map(|s| {
            Arc::new(InNamespace {
                host: s.host.clone(),
                inner: s.adapter.clone(),
            }) as Arc<dyn Microk8s>
        })
        .collect();
    let sim_story = rt.block_on(scenario(&real, &ips));

    let world = FakeWorld::new();
    let fakes: Vec<Arc<dyn Microk8s>> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Arc::new(world.node(&format!("node-{i}"), *ip)) as Arc<dyn Microk8s>)
        .collect();
    let fake_story = rt.block_on(async {
        for f in &fakes {
            f.install(&InstallSource::Channel("1.32/stable".into()), &secret())
                .await
                .unwrap();
        }
        scenario(&fakes, &ips).await
    });
    eprintln!("simulator transcript:\n{}", sim_story.join("\n"));
    // The story itself is the expected one (so both cannot agree on nonsense).
    let expect = [
        "bad token: rejected 500",
        "self: rejected 503",
        "join 1: ok",
        "join 3: ok",
        "again: rejected 500",
        "ha=true",
        "status 3: WorkerNode",
        "enable: Some(Enabled)",
        "enable again: Some(AlreadyEnabled)",
        "enable worker: Err(WorkerNode",
        "same-ca=true kind=kind: Config",
        "config worker: Err(WorkerNode",
        "remove member: Err(StillInDqlite",
        "remove unknown: Err(UnknownNode",
    ];
    for e in expect {
        assert!(sim_story.iter().any(|l| l.contains(e)), "missing {e:?}");
    }
    let own = format!(
        "config 1: server: https://{}:16443 same-ca=true kind=kind: Config",
        ips[1]
    );
    assert!(sim_story.contains(&own), "missing {own:?}");
    for (i, (s, f)) in sim_story.iter().zip(&fake_story).enumerate() {
        assert_eq!(s, f, "step {i} differs");
    }
    assert_eq!(sim_story.len(), fake_story.len());
}
