//! `cluster.api-address = "auto"`: which address the cluster's floating API address is.
//!
//! Every node must use the same address, and once it is held it answers ARP, so a node cannot
//! simply probe again later. The rule:
//! 1. A choice made before (this node's `api-address.json` in the state folder) is kept.
//! 2. Otherwise the peers' status documents are asked (over the pinned, authenticated
//!    coordinator client): an address one of them reports is adopted (the lowest, should two
//!    ever differ) and persisted.
//! 3. Otherwise a control-plane member chooses, like MetalLB's auto range
//!    ([`crate::addons::autorange`]): the subnet's host addresses from the top down, strictly
//!    above every node's address, never the static gateway or DNS servers, never inside a
//!    configured MetalLB block, each ARP-probed; the first that nobody answers for is taken
//!    and persisted. Workers never choose (they only adopt).
//!
//! A node that becomes a member after the address is held adopts it from a document (it cannot
//! probe for it: the held address answers ARP). Members that become members within the same
//! few seconds (fast joins) may each choose; they see the same subnet, nodes and probe answers
//! (nobody holds the address yet: keepalived claims it 6 s after starting), so they choose the
//! same address. MetalLB's own auto range is chosen later (after HA) and skips the address: it
//! is reserved there and answers ARP.
//!
//! To choose another way, change [`choose`]; the persisted file keeps existing choices.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::Agent;
use crate::addons::autorange::{self, AddressProber, ArpingProber, AutoRangeRequest};
use crate::system::state::StateFile;
use rackseed_config::{Addressing, Metallb};
use rackseed_protocol::coordinator::CoordinatorClient;

/// The persisted choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chosen {
    address: IpAddr,
    /// "chosen" (probed here) or "adopted from <node>".
    how: String,
}

fn chosen_file(agent: &Agent) -> StateFile {
    StateFile::new(agent.state_dir.join("api-address.json"))
}

/// How to reach the peers' status documents: coordinator address and pinned fingerprint.
#[derive(Debug, Clone)]
pub(super) struct PeerDocs {
    pub client: std::sync::Arc<CoordinatorClient>,
    pub peers: Vec<(String, SocketAddr, String)>,
}

/// The address chosen before, adopted from a peer, or (control-plane members only) chosen now.
pub(super) async fn address(
    agent: &Agent,
    docs: &PeerDocs,
    may_choose: bool,
    node_addrs: &[IpAddr],
) -> Result<IpAddr, String> {
    let file = chosen_file(agent);
    if let Ok(Some(c)) = file.load::<Chosen>() {
        return Ok(c.address);
    }
    if let Some((node, ip)) = adopt(docs).await {
        store(&file, ip, format!("adopted from {node}"))?;
        return Ok(ip);
    }
    if !may_choose {
        return Err(
            "\"auto\": not chosen yet (a control-plane member chooses it; this node adopts it)"
                .into(),
        );
    }
    let ip = choose(agent, node_addrs).await?;
    store(&file, ip, "chosen".into())?;
    tracing::info!(address = %ip, "chose the API address");
    Ok(ip)
}

fn store(file: &StateFile, address: IpAddr, how: String) -> Result<(), String> {
    file.store(&Chosen { address, how })
        .map_err(|e| format!("persisting the API address: {e:#}"))
}

/// The lowest address the peers' documents report, with the reporting node.
async fn adopt(docs: &PeerDocs) -> Option<(String, IpAddr)> {
    let mut found = Vec::new();
    for (node, addr, fp) in &docs.peers {
        let Ok(v) = docs.client.status(*addr, fp).await else {
            continue;
        };
        let ip = v["api_address"]["address"]
            .as_str()
            .and_then(|s| s.parse::<IpAddr>().ok());
        if let Some(ip) = ip {
            found.push((ip, node.clone()));
        }
    }
    found.into_iter().min().map(|(ip, node)| (node, ip))
}

/// Chooses a free address on this node's subnet (see the module docs).
async fn choose(agent: &Agent, node_addrs: &[IpAddr]) -> Result<IpAddr, String> {
    let iface = match &agent.config.network.interface {
        Some(i) => i.clone(),
        None => {
            crate::system::identity::primary_mac(std::path::Path::new("/"), None)
                .map_err(|e| format!("finding the LAN interface: {e:#}"))?
                .0
        }
    };
    let net = autorange::interface_ipv4(&iface)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let request = AutoRangeRequest {
        interface: net,
        nodes: node_addrs
            .iter()
            .chain(std::iter::once(&IpAddr::V4(net.addr())))
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        reserved: reserved(agent),
        count: 1,
    };
    let blocks = match &agent.config.addons.metallb {
        Some(Metallb::Blocks { blocks }) => blocks.clone(),
        _ => Vec::new(),
    };
    pick(&ArpingProber::new(iface), &request, &blocks).await
}

/// The first candidate outside MetalLB's `blocks` that nobody answers for.
async fn pick<P: AddressProber>(
    prober: &P,
    request: &AutoRangeRequest,
    blocks: &[rackseed_config::AddressBlock],
) -> Result<IpAddr, String> {
    for candidate in autorange::candidate_addresses(request) {
        let ip = IpAddr::V4(candidate);
        if blocks
            .iter()
            .any(|b| rackseed_config::values::block_contains(b, ip))
        {
            continue;
        }
        match prober.in_use(candidate).await {
            Ok(false) => return Ok(ip),
            Ok(true) => continue,
            Err(e) => return Err(format!("{e:#}")),
        }
    }
    Err(format!(
        "no free address above the nodes' addresses on {}",
        request.interface.trunc()
    ))
}

/// The static gateway and DNS servers.
fn reserved(agent: &Agent) -> Vec<Ipv4Addr> {
    match &agent.config.network.addressing {
        Addressing::Static { gateway, dns } => std::iter::once(gateway)
            .chain(dns.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        Addressing::Dhcp => Vec::new(),
    }
}

/// The API address this node knows already (persisted), for MetalLB's auto range to avoid.
pub(super) fn known(agent: &Agent) -> Option<Ipv4Addr> {
    match agent.config.cluster.api_address? {
        rackseed_config::ApiAddress::Fixed(IpAddr::V4(v4)) => Some(v4),
        rackseed_config::ApiAddress::Fixed(IpAddr::V6(_)) => None,
        rackseed_config::ApiAddress::Auto => match chosen_file(agent).load::<Chosen>() {
            Ok(Some(Chosen {
                address: IpAddr::V4(v4),
                ..
            })) => Some(v4),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addons::fakes::FakeProber;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn request() -> AutoRangeRequest {
        AutoRangeRequest {
            interface: "192.168.1.11/24".parse().unwrap(),
            nodes: vec![v4("192.168.1.11"), v4("192.168.1.12")],
            reserved: vec![v4("192.168.1.254")],
            count: 1,
        }
    }

    #[tokio::test]
    async fn the_first_free_address_from_the_top_outside_metallb_is_picked() {
        let metallb = vec![rackseed_config::AddressBlock::Range {
            start: "192.168.1.240".parse().unwrap(),
            end: "192.168.1.252".parse().unwrap(),
        }];
        // .254 is reserved (gateway), .253 answers ARP, .240-.252 are MetalLB's.
        let prober = FakeProber::with_in_use([v4("192.168.1.253")]);
        let ip = pick(&prober, &request(), &metallb).await.unwrap();
        assert_eq!(ip, "192.168.1.239".parse::<IpAddr>().unwrap());
        assert_eq!(prober.probed(), [v4("192.168.1.253"), v4("192.168.1.239")]);
    }

    #[tokio::test]
    async fn a_probe_that_fails_fails_the_choice() {
        let prober = FakeProber::default().failing_on(v4("192.168.1.253"));
        let e = pick(&prober, &request(), &[]).await.unwrap_err();
        assert!(e.contains("192.168.1.253"), "{e}");
    }
}
