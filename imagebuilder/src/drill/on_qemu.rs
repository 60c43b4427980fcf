//! The drill on a QEMU test cluster (`--qemu-dir DIR`, made by `imagebuilder qemu up`).
//!
//! The VMs talk to each other on a QEMU socket network (UDP multicast on 127.0.0.1 carrying
//! their Ethernet frames). The workstation is not on that network: their mDNS announcements,
//! their cluster addresses (192.168.76.x), the floating API address and MetalLB's addresses
//! never reach it. What reaches it are the ports the launcher has QEMU forward from 127.0.0.1
//! to each VM (`qemu status` lists them): the agent's coordinator (management port) and
//! MicroK8s' API (16443). So here the drill
//! - reads every running VM's public `/status.json` through its management forward (as
//!   `qemu status` and `qemu watch` do), which also tells which VM runs which node;
//! - fetches the admin kubeconfig over a control-plane VM's forwarded coordinator, signed with
//!   the cluster secret ([`crate::qemu_cluster::kubeconfig_via_forward`]);
//! - probes the API through every control-plane VM's forwarded API port: a write goes to the
//!   first that acknowledges it (a client knowing every control-plane node), and quorum is
//!   `/readyz` = 200 on any of them. The floating address cannot be probed from here; the
//!   report says so in its probe target;
//! - with an API address configured, asks every agent each round whether it holds it (the
//!   address is keepalived's; the agent reports whether it is on one of its interfaces), so
//!   the report has when a live node held it again;
//! - kills the chosen node's VM ([`QemuKiller`]: QMP `quit`, SIGKILL if that does not end it).
//!
//! - the LoadBalancer: when the cluster was booted with `qemu up --lb-forward ADDRESS:PORT`
//!   (MetalLB's address and a port its service answers on; `qemu status` lists each VM's
//!   forward in column LB) and no `--lb-url` is given, asks every VM's forward each round
//!   ([`super::probe::lb_forwards_once`]): the LoadBalancer is up when any of them gives an
//!   HTTP answer. QEMU's user-mode network ARPs for the address on that VM's management NIC
//!   and the VM answers only while it holds the address (`qemu::node::LbForward` has what
//!   libslirp does, with its files), so this sees the address answering from whichever live
//!   VM MetalLB's speaker put it on. It measures MetalLB's takeover on the VMs, not what a
//!   client on the LAN sees: that client's ARP cache (refreshed by the new holder's gratuitous
//!   ARP) and its switch are not part of it.
//!
//! Without `--lb-forward` (or `--lb-url`) the LoadBalancer RTO is "not measured": MetalLB's
//! addresses live on the VMs' socket network, which the workstation is not on.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu::{Cluster, NodeRunState};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;

use super::killer::{QemuKiller, Victim};
use super::probe::HolderProbe;
use super::{choose, picture, DrillArgs, NodeView, Prepared};
use crate::status::AnnouncedNode;

/// How long the drill keeps reading the documents until the `--kill` target shows (the
/// address holder or the voters can lag behind a restart).
const READ_FOR_AT_LEAST: Duration = Duration::from_secs(30);

/// One VM's status document, as JSON, through its management forward (loopback only).
async fn fetch_raw(client: &reqwest::Client, addr: SocketAddr) -> Result<serde_json::Value> {
    crate::qemu_cluster::fetch_status_json(client, addr).await
}

/// Whether the agent behind management forward `at` reports holding the floating API address
/// (no answer: no).
pub async fn holds_api_address(client: &reqwest::Client, at: SocketAddr) -> bool {
    match fetch_raw(client, at).await {
        Ok(v) => v["api_address"]["held_here"].as_bool() == Some(true),
        Err(_) => false,
    }
}

/// A VM and the node its agent says it runs.
#[derive(Debug, Clone)]
pub struct VmNode {
    pub vm: String,
    /// Its MicroK8s API, forwarded to 127.0.0.1.
    pub api: Option<SocketAddr>,
    pub view: NodeView,
}

/// A node as the drill sees it from its document (pure): the agent's own address and role;
/// no announcement reached the workstation, so no fingerprint.
pub fn view_of(raw: serde_json::Value) -> Result<NodeView> {
    let doc: StatusDoc =
        serde_json::from_value(raw.clone()).context("the status document does not parse")?;
    let address: Option<IpAddr> = doc.address.as_deref().and_then(|a| a.parse().ok());
    Ok(NodeView {
        announced: AnnouncedNode {
            node_id: doc.node_id.clone(),
            addresses: address.into_iter().collect(),
            port: 7443,
            fingerprint: String::new(),
            phase: Some(doc.phase.clone()),
            role: doc.role.clone(),
        },
        address,
        doc: Some(doc),
        raw,
    })
}

/// Every running VM's node; VMs whose agent does not answer are listed in the error text
/// when none answers.
async fn read_vms(client: &reqwest::Client, cluster: &Cluster) -> Result<Vec<VmNode>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for s in cluster.status() {
        if s.state != NodeRunState::Running {
            errors.push(format!("{}: VM not running", s.name));
            continue;
        }
        match fetch_raw(client, s.mgmt_addr).await.and_then(view_of) {
            Ok(view) => out.push(VmNode {
                vm: s.name.clone(),
                api: s.api_addr,
                view,
            }),
            Err(e) => errors.push(format!("{}: {e:#}", s.name)),
        }
    }
    if out.is_empty() {
        bail!(
            "no VM of the QEMU test cluster in {} answers on its management forward:\n  {}",
            cluster.dir().display(),
            errors.join("\n  ")
        );
    }
    Ok(out)
}

/// The node to kill among `vms` (pure apart from `pick`): `--kill`'s rule over every node,
/// or, with `--vm`, that VM's node if it fits the rule.
pub fn choose_vm(
    vms: &[VmNode],
    kill: super::Target,
    only_vm: Option<&str>,
    pick: impl Fn(usize) -> usize,
) -> Result<(super::Picture, usize, String)> {
    let views: Vec<NodeView> = vms.iter().map(|v| v.view.clone()).collect();
    let pic = picture(&views);
    let Some(vm) = only_vm else {
        let (i, why) = choose(&pic, kill, pick)?;
        return Ok((pic, i, why));
    };
    let Some(i) = vms.iter().position(|v| v.vm == vm) else {
        bail!(
            "--vm {vm}: no running VM of that name answers (running and answering: {})",
            vms.iter()
                .map(|v| v.vm.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let only = super::Picture {
        holdings: vec![pic.holdings[i].clone()],
        ..pic.clone()
    };
    let (_, why) = choose(&only, kill, |_| 0)
        .with_context(|| format!("--vm {vm} runs node {}", pic.holdings[i].node_id))?;
    Ok((pic, i, format!("{why} (--vm {vm})")))
}

/// Reads the QEMU test cluster in `dir`, chooses the victim and prepares the probe.
pub async fn prepare(args: &DrillArgs, dir: &Path, secret: &ClusterSecret) -> Result<Prepared> {
    let mut cluster = Cluster::open(dir)
        .with_context(|| format!("reading the QEMU test cluster in {}", dir.display()))?;
    let client = crate::qemu_cluster::loopback_client()?;
    let deadline = Instant::now() + args.discover.max(READ_FOR_AT_LEAST);
    let (vms, pic, index, why) = loop {
        cluster.reload()?;
        let vms = read_vms(&client, &cluster).await?;
        match choose_vm(&vms, args.kill, args.vm.as_deref(), |n| {
            rand::random_range(0..n)
        }) {
            Ok((pic, i, why)) => break (vms, pic, i, why),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    };
    let target = &pic.holdings[index];
    let vm = vms[index].vm.clone();
    let victim = Victim {
        node_id: target.node_id.clone(),
        hostname: target.hostname.clone(),
        address: target.address.as_deref().and_then(|a| a.parse().ok()),
        coordinator: None,
    };
    let (kubeconfig, _, _) = crate::qemu_cluster::kubeconfig_via_forward(&cluster, secret)
        .await
        .context("fetching the admin kubeconfig through a forwarded coordinator")?;
    let control_plane: Vec<(String, SocketAddr)> = vms
        .iter()
        .zip(&pic.holdings)
        .filter(|(_, h)| h.role != "worker")
        .filter_map(|(v, _)| Some((v.vm.clone(), v.api?)))
        .collect();
    if control_plane.is_empty() {
        bail!("no control-plane VM has its API port forwarded (qemu up forwards 16443)");
    }
    let endpoints: Vec<SocketAddr> = control_plane.iter().map(|(_, a)| *a).collect();
    let listed = control_plane
        .iter()
        .map(|(vm, a)| format!("{vm} {a}"))
        .collect::<Vec<_>>()
        .join(", ");
    let probe_target = match pic.api_address {
        Some(a) => format!(
            "any control-plane node through its forwarded API port ({listed}); the floating address {a} is on the VMs' network, which the workstation is not on"
        ),
        None => format!("any control-plane node through its forwarded API port ({listed})"),
    };
    let (lb_forwards, lb_unreachable, lb_note) =
        lb_plan(cluster.state().lb_forward, &cluster.status());
    // Keepalived's address is only seen from the agents here: ask them each round.
    let holder = pic.api_address.map(|_| HolderProbe {
        client: client.clone(),
        mgmt: cluster.status().iter().map(|s| s.mgmt_addr).collect(),
    });
    let mut notes = vec![format!(
        "QEMU test cluster {}: node {} runs in VM {vm}",
        dir.display(),
        target.node_id
    )];
    if args.lb_url.is_none() {
        notes.extend(lb_note);
    }
    Ok(Prepared {
        pic,
        index,
        why,
        victim,
        killer: Box::new(QemuKiller {
            dir: dir.to_path_buf(),
            vm,
        }),
        kubeconfig,
        write_to: endpoints.clone(),
        readyz: endpoints,
        probe_target,
        lb_unreachable,
        lb_forwards: if args.lb_url.is_none() {
            lb_forwards
        } else {
            vec![]
        },
        holder,
        notes,
    })
}

/// How the LoadBalancer is probed on this cluster (pure): every VM's forward of the
/// cluster's `--lb-forward` address, with a note for the report; or, without one, why it
/// cannot be.
pub fn lb_plan(
    forward: Option<qemu::node::LbForward>,
    vms: &[qemu::NodeStatus],
) -> (Vec<SocketAddr>, Option<String>, Option<String>) {
    let listed: Vec<(String, SocketAddr)> = vms
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.lb_addr?)))
        .collect();
    match forward {
        Some(f) if !listed.is_empty() => (
            listed.iter().map(|(_, a)| *a).collect(),
            None,
            Some(format!(
                "LoadBalancer probed at {f} through each VM's 127.0.0.1 forward to it ({}): up when any VM answers HTTP there, which a VM does only while it holds {}; this measures MetalLB's takeover on the VMs, not a LAN client's ARP cache",
                listed
                    .iter()
                    .map(|(vm, a)| format!("{vm} {a}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                f.address
            )),
        ),
        _ => (
            vec![],
            Some(
                "QEMU test cluster: MetalLB's addresses are on the VMs' socket network, which the workstation is not on; boot the cluster with `qemu up --lb-forward ADDRESS:PORT` (MetalLB's address, e.g. 192.168.76.200:80) to probe it through each VM's forward, or give --lb-url for an address reachable from here"
                    .to_owned(),
            ),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::Target;
    use rackseed_protocol::status::{ApiAddressView, Microk8sView};

    fn vm(name: &str, id: &str, ip: &str, role: &str, holder: bool) -> VmNode {
        let doc = StatusDoc {
            node_id: id.into(),
            hostname: format!("h-{id}"),
            phase: "member".into(),
            address: Some(ip.into()),
            role: Some(role.into()),
            authority: Some("a".into()),
            microk8s: Some(Microk8sView {
                running: true,
                voters: vec![
                    "192.168.76.10:19001".into(),
                    "192.168.76.11:19001".into(),
                    "192.168.76.12:19001".into(),
                ],
                ha: true,
                ..Default::default()
            }),
            api_address: Some(ApiAddressView {
                address: Some("192.168.76.100".into()),
                held_here: holder,
                ..Default::default()
            }),
            ..Default::default()
        };
        VmNode {
            vm: name.into(),
            api: Some("127.0.0.1:40000".parse().unwrap()),
            view: view_of(serde_json::to_value(&doc).unwrap()).unwrap(),
        }
    }

    fn three() -> Vec<VmNode> {
        vec![
            vm("node0", "a", "192.168.76.10", "control-plane", false),
            vm("node1", "b", "192.168.76.11", "control-plane", true),
            vm("node2", "c", "192.168.76.12", "control-plane", false),
        ]
    }

    #[test]
    fn documents_give_each_vm_its_node_and_role() {
        let vms = three();
        let (pic, i, why) = choose_vm(&vms, Target::ApiHolder, None, |_| 0).unwrap();
        assert_eq!(
            (vms[i].vm.as_str(), pic.holdings[i].node_id.as_str()),
            ("node1", "b")
        );
        assert!(why.contains("floating API address"), "{why}");
        assert!(pic.holdings.iter().all(|h| h.role == "voter"));
        // A voter not holding the address: node0 or node2, never node1.
        for k in 0..4 {
            let (_, i, _) = choose_vm(&vms, Target::Voter, None, |_| k).unwrap();
            assert_ne!(vms[i].vm, "node1");
        }
        assert!(vms[0].view.announced.fingerprint.is_empty());
        assert_eq!(
            vms[2].view.address,
            Some("192.168.76.12".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn a_named_vm_must_fit_the_kill_rule() {
        let vms = three();
        let (_, i, why) = choose_vm(&vms, Target::Voter, Some("node2"), |_| 0).unwrap();
        assert_eq!(vms[i].vm, "node2");
        assert!(why.ends_with("(--vm node2)"), "{why}");
        let e = choose_vm(&vms, Target::Worker, Some("node2"), |_| 0).unwrap_err();
        assert!(format!("{e:#}").contains("--vm node2 runs node c"), "{e:#}");
        let e = choose_vm(&vms, Target::Voter, Some("node9"), |_| 0).unwrap_err();
        assert!(e.to_string().contains("node0, node1, node2"), "{e}");
    }

    fn status(name: &str, lb: Option<&str>) -> qemu::NodeStatus {
        qemu::NodeStatus {
            name: name.into(),
            state: NodeRunState::Running,
            pid: Some(1),
            mac: String::new(),
            mgmt_addr: "127.0.0.1:40000".parse().unwrap(),
            api_addr: None,
            ssh_addr: None,
            lb_addr: lb.map(|a| a.parse().unwrap()),
            address: None,
            serial_log: "/x".into(),
        }
    }

    #[test]
    fn the_lb_is_probed_through_every_vms_forward_when_the_cluster_has_one() {
        let vms = [
            status("node0", Some("127.0.0.1:41000")),
            status("node1", Some("127.0.0.1:41001")),
            status("node2", Some("127.0.0.1:41002")),
        ];
        let f = Some("192.168.76.200:80".parse().unwrap());
        let (forwards, unreachable, note) = lb_plan(f, &vms);
        assert_eq!(forwards.len(), 3);
        assert_eq!(forwards[2], "127.0.0.1:41002".parse().unwrap());
        assert!(unreachable.is_none());
        let note = note.unwrap();
        assert!(note.contains("192.168.76.200:80"), "{note}");
        assert!(note.contains("node1 127.0.0.1:41001"), "{note}");
        assert!(note.contains("not a LAN client's ARP cache"), "{note}");
        // No --lb-forward at `qemu up`: not measured, and the report says how to get it.
        let plain = [status("node0", None)];
        let (forwards, unreachable, note) = lb_plan(None, &plain);
        assert!(forwards.is_empty() && note.is_none());
        assert!(unreachable.unwrap().contains("--lb-forward"));
    }

    #[test]
    fn an_unreadable_document_is_an_error() {
        assert!(view_of(serde_json::json!({"phase": 3})).is_err());
    }

    #[tokio::test]
    async fn documents_are_read_only_through_loopback_forwards() {
        let c = crate::qemu_cluster::loopback_client().unwrap();
        let e = fetch_raw(&c, "192.0.2.1:7443".parse().unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a loopback"), "{e}");
    }
}
