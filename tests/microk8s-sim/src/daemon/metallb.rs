//! MetalLB in layer-2 mode, as the `metallb` addon runs it, and one demo LoadBalancer service:
//! the simulator's stand-in for a user's service behind a MetalLB address.
//!
//! What MicroK8s does (canonical/microk8s-core-addons, read at f6898115): `addons/metallb/enable`
//! splits its argument on `,` into blocks (IPv4/IPv6 ranges `a-b` and CIDRs `a/n`), applies
//! `metallb.yaml` (controller and speaker `quay.io/metallb/*:v0.15.3`; the speaker DaemonSet
//! runs on every node with `METALLB_ML_BIND_ADDR`/`METALLB_ML_LABELS` set, so memberlist is on)
//! and `addresspool.yaml`: one `IPAddressPool` `default-addresspool` with those blocks and one
//! `L2Advertisement` `default-advertise-all-pools` (no node selector, no interfaces: every node,
//! every interface).
//!
//! What MetalLB v0.15.3 does with a Service of type LoadBalancer (metallb/metallb at 85bfb4f0):
//! - the controller gives it the first free address of the pool, in the pool's order, of the
//!   Service's family (`internal/allocator/allocator.go`, `getIPFromCIDR` walks each CIDR from
//!   its first address; `avoidBuggyIPs` is off by default). A Service is single-stack IPv4 by
//!   default in MicroK8s, so here: the first IPv4 address of the pool; with no IPv4 block it
//!   stays pending (no address, nobody announces);
//! - every speaker decides alone whether it announces (`speaker/layer2_controller.go`,
//!   `ShouldAnnounce`): the candidates are the nodes whose speaker is in this speaker's
//!   memberlist (`internal/speakerlist/speakerlist.go`, `UsableSpeakers`), minus nodes with the
//!   `NetworkUnavailable` condition or the label
//!   `node.kubernetes.io/exclude-from-external-load-balancers` (`speakersForPool`); they are
//!   sorted by `sha256(node name + "#" + first address)` and the first one announces. The rule
//!   is [`announcing_node`];
//! - on taking an address the speaker sends gratuitous ARP, a request and a reply, at once and
//!   then every 1.1 s for 5 s (`internal/layer2/announcer.go` `spamLoop`, `arp.go`
//!   `Gratuitous`), so neighbours' ARP caches move to its MAC.
//!
//! How the simulator models it: each node's daemon (its "speaker") re-decides every heartbeat
//! from its own view: `metallb` enabled in its replicated view, the pool from the addon's
//! arguments, and as memberlist the nodes alive in its own view ([`Daemon::alive`]: a peer
//! silent for 3 heartbeats is dead, the simulator's stand-in for memberlist's failure
//! detection). Workers heartbeat only the control plane, so a worker learns which other workers
//! are alive from the control plane's pong (`alive`), as memberlist learns members through
//! peers. The winner adds the address to the interface holding its cluster address (`ip addr
//! add ADDR/32 dev IF`), sends gratuitous ARP with `arping -U` and `arping -A` (at once, then
//! every 1.1 s for 5 s) and answers HTTP on `ADDR:80` with one line naming the node; a node
//! that no longer wins drops the address and closes the port. Real MetalLB adds no address: its
//! speaker answers ARP for it and kube-proxy takes the traffic to a pod. The kernel answering
//! for an address on the interface is the same thing seen from the LAN, and the daemon's own
//! answer stands for the service's pod (it always has an endpoint: `activeEndpointExists` holds).
//!
//! A node whose processes are SIGKILLed cannot drop the address (a test that kills a node must
//! drop it, as a machine losing power holds nothing); the others take over once it is dead in
//! their views. A daemon stopped with SIGTERM or `microk8s stop` drops it before it exits (the
//! real speaker ends with the node's pods) and takes nothing after. A daemon finding the
//! address on its interface without holding it (left from a killed run in the same namespace)
//! drops it: a booted machine holds no LoadBalancer address. One simulated node per network
//! namespace: two daemons in one namespace would share the interface.
//!
//! Every change is recorded in `$STATE/metallb.jsonl` ([`events_path`], [`read_events`]):
//! `{"ts_ms","node","event","service","ip","iface","speakers","reason"}` with `event` one of
//! `announce` (the address is on the interface and the port open), `gratuitous-arp` (the first
//! round's `result`: `sent` or the error), `release`, or `error` (the address could not be
//! taken; written once per distinct error).
//!
//! Not modelled: BGP mode, several pools or services, `L2Advertisement` selectors and
//! interfaces, `externalTrafficPolicy: Local`, IPv6/NDP, memberlist's own timings
//! (`DefaultLANConfig`), the optional lease-based leader election, and the split-brain of a
//! partition beyond what each side's view gives (each side elects its own announcer, as real
//! speakers would).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rackseed_host::command::Cmd;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::Daemon;
use crate::now_ms;

/// The demo service's namespace/name.
pub const SERVICE: &str = "default/rackseed-demo-lb";
/// The demo service's port.
pub const SERVICE_PORT: u16 = 80;
/// The label that keeps a node out of every announcement (`speakersForPool`).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// Gratuitous ARP: every 1.1 s for 5 s after taking an address (`spamLoop`).
const GARP_EVERY: Duration = Duration::from_millis(1100);
const GARP_FOR: Duration = Duration::from_secs(5);
const IP_TIMEOUT: Duration = Duration::from_secs(5);
const ARPING_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest request head the demo service reads, and how long it waits for it.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One address block of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Range(IpAddr, IpAddr),
    Cidr(IpAddr, u8),
}

impl Block {
    /// The block's first address (a CIDR's network address, as MetalLB's cursor starts there).
    pub fn first(&self) -> IpAddr {
        match *self {
            Block::Range(a, _) => a,
            Block::Cidr(IpAddr::V4(a), n) => {
                let mask = if n == 0 { 0 } else { u32::MAX << (32 - n) };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            Block::Cidr(IpAddr::V6(a), n) => {
                let mask = if n == 0 { 0 } else { u128::MAX << (128 - n) };
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

fn parse_block(text: &str) -> Result<Block, String> {
    let bad = || format!("Your input value ({text}) is not a valid IP Range");
    if let Some((a, b)) = text.split_once('-') {
        let a: IpAddr = a.parse().map_err(|_| bad())?;
        let b: IpAddr = b.parse().map_err(|_| bad())?;
        let ordered = match (a, b) {
            (IpAddr::V4(x), IpAddr::V4(y)) => x <= y,
            (IpAddr::V6(x), IpAddr::V6(y)) => x <= y,
            _ => false,
        };
        if !ordered {
            return Err(bad());
        }
        Ok(Block::Range(a, b))
    } else if let Some((a, n)) = text.split_once('/') {
        let a: IpAddr = a.parse().map_err(|_| bad())?;
        let n: u8 = n.parse().map_err(|_| bad())?;
        let max = if a.is_ipv4() { 32 } else { 128 };
        if n > max {
            return Err(bad());
        }
        Ok(Block::Cidr(a, n))
    } else {
        Err(bad())
    }
}

/// The pool the addon's arguments describe: blocks separated by `,` (and, as the enable
/// script's `read -ra` splits them, blanks), in order. An empty pool or a block that is no
/// range or CIDR is an error naming it (the enable script's message).
pub fn parse_pool(args: &[String]) -> Result<Vec<Block>, String> {
    let blocks: Vec<Block> = args
        .iter()
        .flat_map(|a| a.split([',', ' ', '\t']))
        .filter(|b| !b.is_empty())
        .map(parse_block)
        .collect::<Result<_, _>>()?;
    if blocks.is_empty() {
        return Err("metallb has no address range".into());
    }
    Ok(blocks)
}

/// The demo service's address: the first IPv4 address of the pool (see the module docs);
/// `None` when the pool holds no IPv4 block (the service stays pending).
pub fn service_address(args: &[String]) -> Result<Option<Ipv4Addr>, String> {
    Ok(parse_pool(args)?.iter().find_map(|b| match b.first() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }))
}

/// The node that announces `ip` among `speakers`: the one whose `sha256(name + "#" + ip)` is
/// smallest (MetalLB's `ShouldAnnounce`). `None` without speakers.
pub fn announcing_node<'a, I>(speakers: I, ip: &str) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    speakers
        .into_iter()
        .map(|n| {
            let h: [u8; 32] = Sha256::digest(format!("{n}#{ip}").as_bytes()).into();
            (h, n)
        })
        .min()
        .map(|(_, n)| n)
}

/// The speaker's event log.
pub fn events_path(state_dir: &Path) -> PathBuf {
    state_dir.join("metallb.jsonl")
}

/// Every event of a node's speaker, oldest first (unreadable lines are skipped).
pub fn read_events(state_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(events_path(state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An address this node announces now.
pub(super) struct Held {
    ip: Ipv4Addr,
    iface: String,
    server: JoinHandle<()>,
    garp: JoinHandle<()>,
}

/// The speaker's state: what it holds, the last error written (to write each once), and
/// whether the node is stopping.
#[derive(Default)]
pub(super) struct Speaker {
    held: Option<Held>,
    last_error: Option<String>,
    /// The node is stopping: the speaker takes nothing any more.
    stopped: bool,
}

/// What this node's view says about the service now.
struct Decision {
    /// The service's address (None: metallb off or no IPv4 pool).
    ip: Option<Ipv4Addr>,
    why_none: String,
    speakers: Vec<String>,
    winner: Option<String>,
    my_ip: Option<IpAddr>,
}

/// The interface carrying `ip` in this network namespace.
fn interface_with(ip: IpAddr) -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(s) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) else {
            continue;
        };
        if IpAddr::V4(s.ip()) == ip {
            return Some(a.interface_name);
        }
    }
    None
}

async fn ip_addr(verb: &str, ip: Ipv4Addr, iface: &str) -> Result<(), String> {
    Cmd::new("ip", IP_TIMEOUT)
        .args(["addr", verb, &format!("{ip}/32"), "dev", iface])
        .run()
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// One round of gratuitous ARP: a request (`arping -U`) and a reply (`arping -A`), together.
async fn gratuitous_arp(ip: Ipv4Addr, iface: &str) -> Result<(), String> {
    let send = |mode: &'static str| {
        Cmd::new("arping", ARPING_TIMEOUT)
            .args([mode, "-c", "1", "-I", iface, &ip.to_string()])
            .run()
    };
    let (request, reply) = tokio::join!(send("-U"), send("-A"));
    request.and(reply).map(|_| ()).map_err(|e| format!("{e:#}"))
}

/// The demo service's answer to one connection: `200` with one line naming the node for
/// `GET`/`HEAD`, `405` for other methods, `400` for a request that is no HTTP.
async fn answer(mut sock: tokio::net::TcpStream, node: String) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default();
    let http = parts.nth(1).is_some_and(|v| v.starts_with("HTTP/1."));
    let (status, body) = match (method, http) {
        ("GET" | "HEAD", true) => (
            "200 OK",
            format!("LoadBalancer {SERVICE} (MicroK8s simulator) answered by {node}\n"),
        ),
        (_, true) => ("405 Method Not Allowed", "method not allowed\n".to_owned()),
        _ => ("400 Bad Request", "bad request\n".to_owned()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.shutdown().await;
}

impl Daemon {
    /// The nodes whose speaker this node counts as alive (its memberlist): the nodes alive in
    /// its view, and on a worker also the other workers the control plane reported alive within
    /// two heartbeats (workers do not heartbeat each other).
    fn speakers_alive(&self) -> BTreeSet<String> {
        let mut alive = self.alive();
        let st = self.lock();
        if st.worker {
            let fresh = self.env.heartbeat * 2;
            let reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            alive.extend(
                reported
                    .iter()
                    .filter(|(n, t)| {
                        t.elapsed() < fresh && st.view.entry(n).is_some_and(|e| e.worker)
                    })
                    .map(|(n, _)| n.clone()),
            );
        }
        alive
    }

    fn metallb_decision(&self) -> Decision {
        let alive = self.speakers_alive();
        let st = self.lock();
        let my_ip = st.my_ip.or(self.env.own_ip());
        let none = |why: String| Decision {
            ip: None,
            why_none: why,
            speakers: vec![],
            winner: None,
            my_ip,
        };
        let Some(addon) = st.view.addons.get("metallb").filter(|a| a.enabled) else {
            return none("metallb is not enabled".into());
        };
        let ip = match service_address(&addon.args) {
            Ok(Some(ip)) => ip,
            Ok(None) => {
                return none("the pool holds no IPv4 address: the service is pending".into())
            }
            Err(e) => return none(format!("the pool is not valid: {e}")),
        };
        let speakers: Vec<String> = st
            .view
            .entries
            .iter()
            .filter(|e| alive.contains(&e.name))
            .filter(|e| {
                !st.view
                    .node_labels
                    .get(&e.name)
                    .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
            })
            .map(|e| e.name.clone())
            .collect();
        let winner =
            announcing_node(speakers.iter().map(String::as_str), &ip.to_string()).map(String::from);
        Decision {
            ip: Some(ip),
            why_none: String::new(),
            speakers,
            winner,
            my_ip,
        }
    }

    fn metallb_record(&self, event: &str, fields: serde_json::Value) {
        let mut rec = json!({
            "ts_ms": now_ms(),
            "node": self.name(),
            "event": event,
            "service": SERVICE,
        });
        if let (Some(r), Some(f)) = (rec.as_object_mut(), fields.as_object()) {
            for (k, v) in f {
                r.insert(k.clone(), v.clone());
            }
        }
        let path = events_path(&self.env.state_dir);
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{rec}\n").as_bytes()));
        if let Err(e) = res {
            eprintln!("microk8s-sim: writing {}: {e}", path.display());
        }
    }

    /// One decision of the speaker (see the module docs): take, keep or drop the address.
    pub(super) async fn metallb_tick(self: &Arc<Self>) {
        let d = self.metallb_decision();
        let mine = d.winner.as_deref() == Some(self.name());
        let want = d.ip.filter(|_| mine);
        let mut sp = self.speaker.lock().await;
        if sp.stopped {
            return;
        }
        if let Some(h) = &sp.held {
            if Some(h.ip) == want {
                return;
            }
            let reason = match (&d.ip, &d.winner) {
                (None, _) => d.why_none.clone(),
                (Some(ip), _) if *ip != h.ip => format!("the service's address is now {ip}"),
                (_, Some(w)) => format!("{w} announces it now"),
                (_, None) => "no live speaker".into(),
            };
            let h = sp.held.take().expect("checked above");
            self.metallb_release(h, &reason, &d.speakers).await;
        }
        // A leftover of an earlier run in this namespace (never held by this daemon).
        if let Some(ip) = d.ip.filter(|ip| Some(*ip) != want) {
            if let Some(iface) = interface_with(IpAddr::V4(ip)) {
                let res = ip_addr("del", ip, &iface).await;
                self.metallb_record(
                    "release",
                    json!({"ip": ip.to_string(), "iface": iface, "speakers": d.speakers,
                           "reason": format!("left on the interface by an earlier run: {}",
                               res.err().unwrap_or_else(|| "dropped".into()))}),
                );
            }
        }
        let Some(ip) = want else {
            return;
        };
        match self.metallb_take(ip, d.my_ip).await {
            Ok(held) => {
                sp.last_error = None;
                self.metallb_record(
                    "announce",
                    json!({"ip": ip.to_string(), "iface": held.iface, "speakers": d.speakers,
                           "reason": "first of the live speakers by sha256(node#ip)"}),
                );
                sp.held = Some(held);
            }
            Err(e) => {
                if sp.last_error.as_deref() != Some(e.as_str()) {
                    eprintln!("microk8s-sim: metallb: cannot announce {ip}: {e}");
                    self.metallb_record(
                        "error",
                        json!({"ip": ip.to_string(), "speakers": d.speakers, "reason": e}),
                    );
                    sp.last_error = Some(e);
                }
            }
        }
    }

    /// Adds the address, opens the service's port and starts the gratuitous ARP (at once,
    /// then every 1.1 s for 5 s; the first round's outcome is recorded).
    async fn metallb_take(
        self: &Arc<Self>,
        ip: Ipv4Addr,
        my_ip: Option<IpAddr>,
    ) -> Result<Held, String> {
        let my_ip = my_ip.ok_or("this node has no cluster address")?;
        let iface = interface_with(my_ip)
            .ok_or_else(|| format!("no interface carries this node's address {my_ip}"))?;
        if interface_with(IpAddr::V4(ip)).is_none() {
            ip_addr("add", ip, &iface).await?;
        }
        let listener = match tokio::net::TcpListener::bind(SocketAddr::new(
            IpAddr::V4(ip),
            SERVICE_PORT,
        ))
        .await
        {
            Ok(l) => l,
            Err(e) => {
                let _ = ip_addr("del", ip, &iface).await;
                return Err(format!("binding {ip}:{SERVICE_PORT}: {e}"));
            }
        };
        let node = self.name().to_owned();
        let server = tokio::spawn(async move {
            loop {
                if let Ok((sock, _)) = listener.accept().await {
                    tokio::spawn(answer(sock, node.clone()));
                }
            }
        });
        let (d, spam_iface) = (self.clone(), iface.clone());
        let garp = tokio::spawn(async move {
            // Rounds start every 1.1 s for 5 s; each runs on its own (an `arping` takes a
            // second), and all stop when the task is aborted (the set is dropped).
            let mut rounds = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(GARP_EVERY);
            let until = tokio::time::Instant::now() + GARP_FOR;
            let mut first = true;
            while tick.tick().await <= until {
                let (d, iface) = (d.clone(), spam_iface.clone());
                let record = std::mem::take(&mut first);
                rounds.spawn(async move {
                    let res = gratuitous_arp(ip, &iface).await;
                    if record {
                        d.metallb_record(
                            "gratuitous-arp",
                            json!({"ip": ip.to_string(), "iface": iface,
                                   "result": res.err().unwrap_or_else(|| "sent".into())}),
                        );
                    } else if let Err(e) = res {
                        eprintln!("microk8s-sim: metallb: gratuitous ARP for {ip}: {e}");
                    }
                });
            }
            while rounds.join_next().await.is_some() {}
        });
        Ok(Held {
            ip,
            iface,
            server,
            garp,
        })
    }

    async fn metallb_release(&self, h: Held, reason: &str, speakers: &[String]) {
        h.server.abort();
        h.garp.abort();
        let _ = h.server.await;
        let res = ip_addr("del", h.ip, &h.iface).await;
        self.metallb_record(
            "release",
            json!({"ip": h.ip.to_string(), "iface": h.iface, "speakers": speakers,
            "reason": match res {
                Ok(()) => reason.to_owned(),
                Err(e) => format!("{reason} (dropping the address: {e})"),
            }}),
        );
    }

    /// Drops the address this node announces, if any, and takes none after (the daemon is
    /// stopping).
    pub(super) async fn metallb_stop(&self, reason: &str) {
        let mut sp = self.speaker.lock().await;
        sp.stopped = true;
        if let Some(h) = sp.held.take() {
            self.metallb_release(h, reason, &[]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_service_gets_the_first_ipv4_address_of_the_pool() {
        let a = |args: &[&str]| service_address(&s(args));
        assert_eq!(
            a(&["10.231.0.240-10.231.0.250,fd00::10-fd00::20"]),
            Ok(Some(Ipv4Addr::new(10, 231, 0, 240)))
        );
        assert_eq!(
            a(&["fd00::10-fd00::20,192.168.1.240/28"]),
            Ok(Some(Ipv4Addr::new(192, 168, 1, 240)))
        );
        // A CIDR starts at its network address.
        assert_eq!(a(&["10.0.0.77/24"]), Ok(Some(Ipv4Addr::new(10, 0, 0, 0))));
        assert_eq!(a(&["fd00::/120"]), Ok(None), "IPv6 only: pending");
        assert_eq!(
            a(&["10.0.0.5-10.0.0.9", "10.0.1.1-10.0.1.2"]),
            Ok(Some(Ipv4Addr::new(10, 0, 0, 5)))
        );
    }

    #[test]
    fn a_pool_that_is_no_range_is_refused_naming_the_block() {
        for bad in [
            "10.0.0.9-10.0.0.5",
            "10.0.0.1-fd00::1",
            "10.0.0.1",
            "10.0.0.0/33",
            "nope",
        ] {
            let e = parse_pool(&s(&[bad])).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(parse_pool(&[]).is_err());
        assert!(parse_pool(&s(&[","])).is_err());
    }

    fn hash_order(nodes: &[&str], ip: &str) -> Vec<String> {
        let mut v: Vec<(Vec<u8>, String)> = nodes
            .iter()
            .map(|n| {
                (
                    Sha256::digest(format!("{n}#{ip}").as_bytes()).to_vec(),
                    n.to_string(),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn the_announcer_is_the_smallest_hash_of_name_and_address() {
        let nodes = ["node-0", "node-1", "node-2", "node-3"];
        let ip = "10.231.0.240";
        let order = hash_order(&nodes, ip);
        assert_eq!(announcing_node(nodes, ip), Some(order[0].as_str()));
        // Input order does not matter.
        let mut rev = nodes;
        rev.reverse();
        assert_eq!(announcing_node(rev, ip), Some(order[0].as_str()));
        // Without the winner, the next in the order takes over; the rest keep their order.
        let rest: Vec<&str> = nodes.iter().copied().filter(|n| *n != order[0]).collect();
        assert_eq!(announcing_node(rest, ip), Some(order[1].as_str()));
        assert_eq!(announcing_node(Vec::<&str>::new(), ip), None);
        // Another address orders the same nodes differently (spreads services over nodes).
        let spread: BTreeSet<String> = (0..32)
            .filter_map(|i| announcing_node(nodes, &format!("10.0.0.{i}")).map(String::from))
            .collect();
        assert!(spread.len() > 1, "{spread:?}");
    }

    #[test]
    fn the_order_matches_sha256sum() {
        // printf 'NODE#10.231.0.240' | sha256sum: node-2 a9b4db1e…, node-1 b5c6db8b…,
        // node-0 d710a2f0…; and 'a#1.2.3.4' 31b45efa…, 'b#1.2.3.4' 061abf0c….
        let ip = "10.231.0.240";
        assert_eq!(
            announcing_node(["node-0", "node-1", "node-2"], ip),
            Some("node-2")
        );
        assert_eq!(announcing_node(["node-0", "node-1"], ip), Some("node-1"));
        assert_eq!(announcing_node(["node-0"], ip), Some("node-0"));
        assert_eq!(announcing_node(["a", "b"], "1.2.3.4"), Some("b"));
    }
}
