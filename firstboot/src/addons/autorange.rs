//! `metallb.addresses = "auto"`: choose a few free IPv4 addresses for MetalLB at the top of the
//! node's subnet.
//!
//! Heuristic (the network's DHCP pool is unknowable from a node, so this is a best effort):
//! 1. Candidates are the subnet's host addresses (never the network or broadcast address) from
//!    the top down, **strictly above the highest address any node holds** (DHCP servers
//!    commonly lease upwards from the bottom or the middle of the pool, and a range above every
//!    node is the least likely to collide with the next lease), minus reserved addresses (the
//!    static gateway and DNS servers). At most [`MAX_PROBES`] candidates (or twice the count)
//!    are looked at.
//! 2. Each candidate is probed through an [`AddressProber`] (ARP duplicate-address detection;
//!    IPv6 is not chosen automatically, so no neighbour discovery is needed). An address that
//!    answers is skipped; an address that could not be probed fails the whole choice, so an
//!    unprobed address is never handed out.
//! 3. The first `count` free candidates are collapsed into as few blocks as possible (ranges,
//!    or a `/32` for a lone address).
//!
//! The choice runs once, on the node that enables addons, and is persisted in the addon
//! progress (as the `metallb` arguments), so it is not re-made after a restart.
//!
//! To probe another way (raw socket, IPv6 neighbour discovery), implement [`AddressProber`].

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::future::join_all;
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use rackseed_config::AddressBlock;
use rackseed_host::command::{Cmd, CmdError};

/// How many candidate addresses are probed at most (or twice the count asked for, if larger).
pub const MAX_PROBES: usize = 64;

/// How long one `arping` may run (it stops itself after 2 s).
const ARPING_TIMEOUT: Duration = Duration::from_secs(6);

/// Tells whether an address is in use on the LAN.
#[allow(async_fn_in_trait)] // used through generics only; futures need not be Send
pub trait AddressProber {
    async fn in_use(&self, addr: Ipv4Addr) -> Result<bool, ProbeError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probing {addr} with arping")]
    Command { addr: Ipv4Addr, source: CmdError },
    #[error(
        "probing {addr}: `{cmd}` exited with {code:?} (expected 0 = free or 1 = in use): {stderr}"
    )]
    Unexpected {
        addr: Ipv4Addr,
        cmd: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("probing {addr}: {reason}")]
    Other { addr: Ipv4Addr, reason: String },
    /// The probe program is not on this node (an official Ubuntu image without iputils'
    /// arping): no address can be checked, so none is chosen.
    #[error(
        "`{program}` is not installed on this node: metallb addresses = \"auto\" checks each \
         candidate with iputils' arping (duplicate-address detection); install the \
         `{ARPING_PACKAGE}` package (bootstrapped rackseed bases have it) or list explicit \
         metallb address blocks in the config"
    )]
    Missing { program: String },
}

/// The Debian/Ubuntu package with iputils' `arping` (whose `-D` duplicate-address detection
/// and exit codes the prober relies on; the other `arping` package has different options).
pub const ARPING_PACKAGE: &str = "iputils-arping";

/// ARP duplicate-address detection with iputils `arping -D -c 2 -w 2 -I <iface> <addr>`:
/// exit 0 means nobody answered (free), exit 1 means a host answered (in use).
#[derive(Debug, Clone)]
pub struct ArpingProber {
    pub interface: String,
    /// The program, `arping` (found on `PATH`) unless set with [`ArpingProber::with_program`].
    pub program: std::path::PathBuf,
}

impl ArpingProber {
    pub fn new(interface: impl Into<String>) -> Self {
        ArpingProber {
            interface: interface.into(),
            program: "arping".into(),
        }
    }

    /// Runs `program` instead of `arping` from `PATH`.
    pub fn with_program(mut self, program: impl Into<std::path::PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    fn command(&self, addr: Ipv4Addr) -> Cmd {
        Cmd::new(&self.program, ARPING_TIMEOUT).args([
            "-D",
            "-c",
            "2",
            "-w",
            "2",
            "-I",
            &self.interface,
            &addr.to_string(),
        ])
    }
}

impl AddressProber for ArpingProber {
    async fn in_use(&self, addr: Ipv4Addr) -> Result<bool, ProbeError> {
        let cmd = self.command(addr);
        let display = cmd.display();
        let out = cmd.output().await.map_err(|source| match &source {
            CmdError::Spawn { source: io, .. } if io.kind() == std::io::ErrorKind::NotFound => {
                ProbeError::Missing {
                    program: self.program.display().to_string(),
                }
            }
            _ => ProbeError::Command { addr, source },
        })?;
        match out.code() {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            code => Err(ProbeError::Unexpected {
                addr,
                cmd: display,
                code,
                stderr: out.stderr.trim().to_owned(),
            }),
        }
    }
}

/// What the auto choice needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRangeRequest {
    /// The node's own address on the LAN interface, with its prefix length.
    pub interface: Ipv4Net,
    /// Every known node's address (this node and its peers); the range stays above all of
    /// those inside the subnet.
    pub nodes: Vec<Ipv4Addr>,
    /// Never chosen (static gateway, DNS servers, ...).
    pub reserved: Vec<Ipv4Addr>,
    pub count: u8,
}

/// The chosen addresses, as MetalLB blocks and one by one, and what was found in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRange {
    pub blocks: Vec<AddressBlock>,
    /// Ascending.
    pub addresses: Vec<Ipv4Addr>,
    /// Candidates that answered the probe (skipped).
    pub in_use: Vec<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AutoRangeError {
    #[error("metallb auto range: count must be at least 1")]
    ZeroCount,
    #[error(
        "metallb auto range: only {found} of {wanted} free addresses in {subnet} above {floor} \
         ({in_use} in use); list explicit metallb blocks in the config"
    )]
    NotEnough {
        wanted: usize,
        found: usize,
        subnet: Ipv4Net,
        floor: Ipv4Addr,
        in_use: usize,
    },
    #[error("metallb auto range")]
    Probe(#[from] ProbeError),
}

/// The lowest address a candidate must exceed: the highest node address inside the subnet, or
/// the network address.
pub fn range_floor(interface: Ipv4Net, nodes: &[Ipv4Addr]) -> Ipv4Addr {
    let subnet = interface.trunc();
    nodes
        .iter()
        .copied()
        .chain([interface.addr()])
        .filter(|a| subnet.contains(a))
        .max()
        .unwrap_or(subnet.network())
        .max(subnet.network())
}

/// The candidates, best first (highest address first); see the module docs. Pure.
pub fn candidate_addresses(req: &AutoRangeRequest) -> Vec<Ipv4Addr> {
    let subnet = req.interface.trunc();
    if subnet.prefix_len() > 30 {
        return Vec::new();
    }
    let floor = u32::from(range_floor(req.interface, &req.nodes));
    let top = u32::from(subnet.broadcast()) - 1;
    let limit = MAX_PROBES.max(2 * usize::from(req.count));
    let mut out = Vec::new();
    let mut a = top;
    while a > floor && out.len() < limit {
        let ip = Ipv4Addr::from(a);
        if !req.reserved.contains(&ip) && !req.nodes.contains(&ip) {
            out.push(ip);
        }
        a -= 1;
    }
    out
}

/// Collapses addresses into MetalLB blocks: consecutive runs become `start-end`, a lone
/// address becomes `a/32`. Sorts and de-duplicates first. Pure.
pub fn collapse_to_blocks(addrs: &[Ipv4Addr]) -> Vec<AddressBlock> {
    let mut v: Vec<u32> = addrs.iter().map(|a| u32::from(*a)).collect();
    v.sort_unstable();
    v.dedup();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        let (s, e) = (Ipv4Addr::from(start), Ipv4Addr::from(end));
        blocks.push(if start == end {
            AddressBlock::Cidr(IpNet::V4(
                Ipv4Net::new(s, 32).expect("32 is a valid prefix"),
            ))
        } else {
            AddressBlock::Range {
                start: IpAddr::V4(s),
                end: IpAddr::V4(e),
            }
        });
        i += 1;
    }
    blocks
}

/// Chooses `req.count` free addresses: probes candidates top-down, `count` at a time
/// concurrently, until enough are free or the candidates run out.
pub async fn choose_auto_range<P: AddressProber>(
    prober: &P,
    req: &AutoRangeRequest,
) -> Result<AutoRange, AutoRangeError> {
    let wanted = usize::from(req.count);
    if wanted == 0 {
        return Err(AutoRangeError::ZeroCount);
    }
    let candidates = candidate_addresses(req);
    let mut free = Vec::new();
    let mut in_use = Vec::new();
    for batch in candidates.chunks(wanted) {
        if free.len() >= wanted {
            break;
        }
        let results = join_all(batch.iter().map(|a| prober.in_use(*a))).await;
        for (addr, r) in batch.iter().zip(results) {
            if r? {
                tracing::info!(%addr, "metallb auto range: address in use, skipped");
                in_use.push(*addr);
            } else if free.len() < wanted {
                free.push(*addr);
            }
        }
    }
    if free.len() < wanted {
        return Err(AutoRangeError::NotEnough {
            wanted,
            found: free.len(),
            subnet: req.interface.trunc(),
            floor: range_floor(req.interface, &req.nodes),
            in_use: in_use.len(),
        });
    }
    free.sort_unstable();
    Ok(AutoRange {
        blocks: collapse_to_blocks(&free),
        addresses: free,
        in_use,
    })
}

#[derive(Deserialize)]
struct IpLink {
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    family: String,
    local: Option<String>,
    prefixlen: Option<u8>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    secondary: bool,
}

/// Parses `ip -j -4 addr show dev <iface>`: the global IPv4 addresses, primary ones first.
pub fn parse_ip_addr_json(json: &str) -> Result<Vec<Ipv4Net>, String> {
    let links: Vec<IpLink> =
        serde_json::from_str(json).map_err(|e| format!("parsing `ip -j addr` output: {e}"))?;
    let mut primary = Vec::new();
    let mut secondary = Vec::new();
    for info in links.into_iter().flat_map(|l| l.addr_info) {
        if info.family != "inet" || info.scope.as_deref().is_some_and(|s| s != "global") {
            continue;
        }
        let (Some(local), Some(len)) = (info.local, info.prefixlen) else {
            continue;
        };
        let addr: Ipv4Addr = local
            .parse()
            .map_err(|e| format!("parsing `ip -j addr` address {local:?}: {e}"))?;
        let net =
            Ipv4Net::new(addr, len).map_err(|e| format!("prefix length {len} of {addr}: {e}"))?;
        if info.secondary {
            secondary.push(net);
        } else {
            primary.push(net);
        }
    }
    primary.extend(secondary);
    Ok(primary)
}

/// The primary global IPv4 address of `iface` with its prefix, from `ip -j -4 addr show`.
pub async fn interface_ipv4(iface: &str) -> anyhow::Result<Ipv4Net> {
    use anyhow::Context;
    let out = Cmd::new("ip", Duration::from_secs(10))
        .args(["-j", "-4", "addr", "show", "dev", iface])
        .run()
        .await
        .with_context(|| format!("reading the addresses of {iface}"))?;
    let nets = parse_ip_addr_json(&out.stdout).map_err(anyhow::Error::msg)?;
    nets.into_iter()
        .next()
        .with_context(|| format!("{iface} has no global IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addons::fakes::FakeProber;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn req(iface: &str, nodes: &[&str], count: u8) -> AutoRangeRequest {
        AutoRangeRequest {
            interface: iface.parse().unwrap(),
            nodes: nodes.iter().map(|n| v4(n)).collect(),
            reserved: Vec::new(),
            count,
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn candidates_start_below_broadcast_and_skip_nodes_and_reserved() {
        let mut r = req("192.168.1.10/24", &["192.168.1.10", "192.168.1.11"], 4);
        r.reserved = vec![v4("192.168.1.254")];
        let c = candidate_addresses(&r);
        assert_eq!(c[0], v4("192.168.1.253"));
        assert_eq!(c.len(), MAX_PROBES);
        assert!(!c.contains(&v4("192.168.1.255")));
        assert!(c.iter().all(|a| *a > v4("192.168.1.11")));
    }

    #[test]
    fn candidates_stay_above_every_node_in_the_subnet() {
        let r = req(
            "10.0.0.5/24",
            &["10.0.0.5", "10.0.0.249", "172.16.0.250"],
            4,
        );
        let c = candidate_addresses(&r);
        assert_eq!(
            c,
            [
                "10.0.0.254",
                "10.0.0.253",
                "10.0.0.252",
                "10.0.0.251",
                "10.0.0.250"
            ]
            .map(v4)
        );
    }

    #[test]
    fn tiny_subnets_have_no_candidates() {
        assert!(candidate_addresses(&req("10.0.0.1/31", &[], 1)).is_empty());
        assert!(candidate_addresses(&req("10.0.0.1/32", &[], 1)).is_empty());
        assert_eq!(
            candidate_addresses(&req("10.0.0.1/30", &[], 1)),
            vec![v4("10.0.0.2")]
        );
    }

    #[test]
    fn collapse_makes_ranges_and_single_host_cidrs() {
        let b = collapse_to_blocks(&["10.0.0.9", "10.0.0.7", "10.0.0.8", "10.0.0.3"].map(v4));
        let s: Vec<String> = b.iter().map(crate::addons::plan::format_block).collect();
        assert_eq!(s, ["10.0.0.3/32", "10.0.0.7-10.0.0.9"]);
    }

    #[test]
    fn in_use_addresses_are_skipped_and_the_top_free_ones_chosen() {
        let prober = FakeProber::with_in_use(["10.0.0.253", "10.0.0.250"].map(v4));
        let got = run(choose_auto_range(
            &prober,
            &req("10.0.0.1/24", &["10.0.0.1"], 4),
        ))
        .unwrap();
        assert_eq!(
            got.addresses,
            ["10.0.0.249", "10.0.0.251", "10.0.0.252", "10.0.0.254"].map(v4)
        );
        let s: Vec<String> = got
            .blocks
            .iter()
            .map(crate::addons::plan::format_block)
            .collect();
        assert_eq!(
            s,
            ["10.0.0.249/32", "10.0.0.251-10.0.0.252", "10.0.0.254/32"]
        );
        assert_eq!(got.in_use, ["10.0.0.253", "10.0.0.250"].map(v4));
        for a in prober.probed() {
            assert!(a > v4("10.0.0.1"));
        }
    }

    #[test]
    fn not_enough_room_above_the_nodes_is_an_error() {
        let prober = FakeProber::with_in_use([]);
        let err = run(choose_auto_range(
            &prober,
            &req("10.0.0.1/24", &["10.0.0.1", "10.0.0.251"], 8),
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, AutoRangeError::NotEnough { found: 3, .. }),
            "{msg}"
        );
        assert!(msg.contains("above 10.0.0.251"), "{msg}");
    }

    #[test]
    fn a_failed_probe_fails_the_choice() {
        let prober = FakeProber::with_in_use([]).failing_on(v4("10.0.0.252"));
        let err = run(choose_auto_range(&prober, &req("10.0.0.1/24", &[], 4))).unwrap_err();
        assert!(matches!(err, AutoRangeError::Probe(_)), "{err}");
    }

    #[test]
    fn zero_count_is_refused() {
        let prober = FakeProber::with_in_use([]);
        let err = run(choose_auto_range(&prober, &req("10.0.0.1/24", &[], 0))).unwrap_err();
        assert!(matches!(err, AutoRangeError::ZeroCount));
    }

    #[test]
    fn parses_ip_json_output() {
        let json = r#"[{"ifindex":2,"ifname":"eth0","flags":["BROADCAST","UP"],"mtu":1500,
          "addr_info":[{"family":"inet","local":"10.9.9.9","prefixlen":16,"scope":"global","secondary":true},
                       {"family":"inet","local":"192.168.1.20","prefixlen":24,"broadcast":"192.168.1.255","scope":"global","dynamic":true},
                       {"family":"inet","local":"169.254.1.1","prefixlen":16,"scope":"link"}]}]"#;
        let nets = parse_ip_addr_json(json).unwrap();
        assert_eq!(
            nets,
            vec![
                "192.168.1.20/24".parse::<Ipv4Net>().unwrap(),
                "10.9.9.9/16".parse().unwrap()
            ]
        );
        assert!(parse_ip_addr_json("not json").is_err());
        assert_eq!(parse_ip_addr_json("[]").unwrap(), vec![]);
    }

    #[test]
    fn a_missing_arping_is_a_clear_verdict_naming_the_package() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let prober = ArpingProber::new("eth0").with_program("/nonexistent/rackseed/arping");
        let e = rt.block_on(prober.in_use(v4("192.168.1.200"))).unwrap_err();
        assert!(matches!(e, ProbeError::Missing { .. }), "{e:?}");
        let e = rt
            .block_on(choose_auto_range(&prober, &req("192.168.1.10/24", &[], 2)))
            .unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(
            text.contains("metallb auto range")
                && text.contains("is not installed on this node")
                && text.contains("`iputils-arping`")
                && text.contains("explicit metallb address blocks"),
            "{text}"
        );
    }
}
