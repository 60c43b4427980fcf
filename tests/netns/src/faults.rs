//! Network faults on a lab host's link, for chaos tests: loss, duplication, late and reordered
//! packets, multicast dropped while unicast works, and partitions of any shape.
//!
//! Everything is applied inside the host's own namespace on its `eth0`, with the field's
//! standard tools: one nftables table per host (`inet rsfault`, plus `ip rsfault_dup` for
//! duplication, which nftables' `dup` statement supports only in the `ip`/`ip6` families) that
//! [`apply`] replaces atomically (`nft -f`), and one HTB qdisc. Setting [`HostFaults::default`]
//! heals the host.
//!
//! - loss: `numgen random mod 100 < N drop` on packets leaving `eth0`;
//! - duplication: `numgen random mod 100 < N dup to ip daddr device "eth0"` (a copy goes out);
//! - late and reordered packets: `numgen random mod 100 < N meta priority set 1:20` sends that
//!   share of packets through a slow HTB class (64 kbit/s, one packet's burst), so they queue
//!   behind each other and arrive after packets sent later through the fast class. `tc netem`
//!   would be the usual tool, but it is not everywhere: the kernel these tests were written on
//!   has no `sch_netem` (`CONFIG_NET_SCH_NETEM` unset), while nftables and HTB are common;
//! - multicast dropped: IPv4 multicast (224.0.0.0/4) and mDNS over IPv6 (ff02::fb, UDP 5353)
//!   dropped both in and out, so discovery stops while every unicast path still works;
//! - partitions: packets from the listed peers' MAC addresses are dropped on the way in (IPv4
//!   and IPv6 alike, link-local included). Apply the mirror image on the other side too
//!   ([`partition`] does both), so the cut is symmetric.
//!
//! Needs root and `nft` (package nftables) and `tc` (iproute2).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::Host;

const TIMEOUT: Duration = Duration::from_secs(20);

/// The faults one host's link has now. The default is a healthy link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFaults {
    /// Percent of outgoing packets dropped.
    pub loss_pct: u8,
    /// Percent of outgoing IPv4 packets sent twice.
    pub dup_pct: u8,
    /// Percent of outgoing packets sent through the slow lane (late, reordered).
    pub slow_pct: u8,
    /// Drop multicast (mDNS) both ways.
    pub drop_multicast: bool,
    /// Drop every packet from these MAC addresses (the other side of a partition).
    pub blocked_macs: Vec<String>,
}

impl HostFaults {
    pub fn is_healthy(&self) -> bool {
        *self == HostFaults::default()
    }

    /// The nftables script that replaces this host's fault tables.
    pub fn nft_script(&self) -> Result<String> {
        for p in [self.loss_pct, self.dup_pct, self.slow_pct] {
            if p > 100 {
                bail!("a fault share is a percentage (0-100), not {p}");
            }
        }
        for m in &self.blocked_macs {
            let ok = m.len() == 17
                && m.split(':')
                    .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                bail!("{m:?} is not a MAC address");
            }
        }
        // Declaring then deleting makes the script work whether the tables exist or not.
        let mut s = String::from(
            "table inet rsfault {}\ndelete table inet rsfault\n\
             table ip rsfault_dup {}\ndelete table ip rsfault_dup\n",
        );
        if self.is_healthy() {
            return Ok(s);
        }
        s.push_str(
            "table inet rsfault {\n  chain out {\n    type filter hook output priority 0;\n",
        );
        if self.drop_multicast {
            s.push_str("    oifname \"eth0\" ip daddr 224.0.0.0/4 drop\n");
            s.push_str("    oifname \"eth0\" ip6 daddr ff02::fb udp dport 5353 drop\n");
        }
        if self.loss_pct > 0 {
            s.push_str(&format!(
                "    oifname \"eth0\" numgen random mod 100 < {} drop\n",
                self.loss_pct
            ));
        }
        if self.slow_pct > 0 {
            s.push_str(&format!(
                "    oifname \"eth0\" numgen random mod 100 < {} meta priority set 1:20\n",
                self.slow_pct
            ));
        }
        s.push_str("  }\n  chain in {\n    type filter hook input priority 0;\n");
        if self.drop_multicast {
            s.push_str("    iifname \"eth0\" ip daddr 224.0.0.0/4 drop\n");
            s.push_str("    iifname \"eth0\" ip6 daddr ff02::fb udp dport 5353 drop\n");
        }
        if !self.blocked_macs.is_empty() {
            s.push_str(&format!(
                "    iifname \"eth0\" ether saddr {{ {} }} drop\n",
                self.blocked_macs.join(", ")
            ));
        }
        s.push_str("  }\n}\n");
        if self.dup_pct > 0 {
            s.push_str(&format!(
                "table ip rsfault_dup {{\n  chain out {{\n    type filter hook output priority 0;\n    \
                 oifname \"eth0\" numgen random mod 100 < {} dup to ip daddr device \"eth0\"\n  }}\n}}\n",
                self.dup_pct
            ));
        }
        Ok(s)
    }
}

/// The MAC address of a host's `eth0`.
pub fn mac(host: &Host) -> Result<String> {
    let out = host
        .cmd("cat", TIMEOUT)
        .arg("/sys/class/net/eth0/address")
        .output_blocking()
        .with_context(|| format!("reading {}'s MAC address", host.ns))?;
    let m = out.stdout.trim().to_owned();
    if m.len() != 17 {
        bail!("{}: unexpected MAC address {m:?}", host.ns);
    }
    Ok(m)
}

/// Sets up the slow lane (an HTB qdisc on `eth0`: class 1:10 unlimited, the default; class
/// 1:20 64 kbit/s). Idempotent.
fn ensure_lanes(host: &Host) -> Result<()> {
    let tc = |args: &[&str]| {
        host.cmd("tc", TIMEOUT)
            .args(args)
            .run_blocking()
            .map(|_| ())
            .with_context(|| format!("{}: tc {}", host.ns, args.join(" ")))
    };
    let shown = host
        .cmd("tc", TIMEOUT)
        .args(["qdisc", "show", "dev", "eth0"])
        .output_blocking()
        .with_context(|| format!("{}: tc qdisc show", host.ns))?;
    if shown.stdout.contains("htb 1:") {
        return Ok(());
    }
    tc(&[
        "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10", "r2q",
        "100000",
    ])?;
    tc(&[
        "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit",
    ])?;
    tc(&[
        "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", "64kbit",
        "ceil", "64kbit", "burst", "1600", "cburst", "1600", "quantum", "1600",
    ])
}

/// Replaces host's link faults with `faults` (atomically, one `nft -f`).
pub fn apply(host: &Host, faults: &HostFaults) -> Result<()> {
    if faults.slow_pct > 0 {
        ensure_lanes(host)?;
    }
    let script = faults.nft_script()?;
    let path = std::env::temp_dir().join(format!("rsfault-{}-{}.nft", host.ns, std::process::id()));
    std::fs::write(&path, &script).with_context(|| format!("writing {}", path.display()))?;
    let res = host
        .cmd("nft", TIMEOUT)
        .arg("-f")
        .arg(&path)
        .run_blocking()
        .map(|_| ())
        .with_context(|| format!("{}: nft -f (is nftables installed?)\n{script}", host.ns));
    let _ = std::fs::remove_file(&path);
    res
}

/// Cuts the lab into groups: every host drops what comes from hosts outside its group. Hosts
/// in no group keep talking to everyone. `faults[i]` is host `i`'s other faults, kept as they
/// are; returns the new per-host faults (already applied).
pub fn partition(
    hosts: &[Host],
    macs: &[String],
    groups: &[Vec<usize>],
    faults: &mut [HostFaults],
) -> Result<()> {
    let group_of = |i: usize| groups.iter().position(|g| g.contains(&i));
    for (i, host) in hosts.iter().enumerate() {
        let blocked = match group_of(i) {
            None => Vec::new(),
            Some(g) => (0..hosts.len())
                .filter(|&j| j != i && group_of(j).is_some_and(|h| h != g))
                .map(|j| macs[j].clone())
                .collect(),
        };
        if faults[i].blocked_macs != blocked {
            faults[i].blocked_macs = blocked;
            apply(host, &faults[i])?;
        }
    }
    Ok(())
}

/// Whether `host` answers one ping from `from` within a second.
pub fn reaches(from: &Host, to: Ipv4Addr) -> bool {
    from.cmd("ping", Duration::from_secs(5))
        .args(["-c", "1", "-W", "1", &to.to_string()])
        .run_blocking()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lab;

    #[test]
    fn the_script_is_checked_and_healthy_means_no_rules() {
        let s = HostFaults::default().nft_script().unwrap();
        assert!(!s.contains("chain"), "{s}");
        let bad = HostFaults {
            loss_pct: 101,
            ..HostFaults::default()
        };
        assert!(bad.nft_script().is_err());
        let bad = HostFaults {
            blocked_macs: vec!["02:00:00:00:00:0g".into()],
            ..HostFaults::default()
        };
        assert!(bad.nft_script().is_err());
        let f = HostFaults {
            loss_pct: 5,
            dup_pct: 3,
            slow_pct: 10,
            drop_multicast: true,
            blocked_macs: vec!["02:00:00:00:00:01".into()],
        };
        let s = f.nft_script().unwrap();
        for want in [
            "< 5 drop",
            "dup to ip daddr",
            "priority set 1:20",
            "224.0.0.0/4",
            "ether saddr { 02:00:00:00:00:01 }",
        ] {
            assert!(s.contains(want), "{want} missing from\n{s}");
        }
    }

    #[test]
    fn partitions_cut_and_heal_and_loss_is_partial() {
        let lab = Lab::new(3).unwrap();
        let hosts = lab.hosts().to_vec();
        let macs: Vec<String> = hosts.iter().map(|h| mac(h).unwrap()).collect();
        let mut faults = vec![HostFaults::default(); 3];
        partition(&hosts, &macs, &[vec![0, 1], vec![2]], &mut faults).unwrap();
        assert!(reaches(&hosts[0], hosts[1].addr), "same side");
        assert!(!reaches(&hosts[0], hosts[2].addr), "cut");
        assert!(!reaches(&hosts[2], hosts[1].addr), "cut both ways");
        partition(&hosts, &macs, &[], &mut faults).unwrap();
        assert!(reaches(&hosts[0], hosts[2].addr), "healed");
        // 50 % loss one way: of 40 pings, some but not all come back (the odds of all or none
        // are below 1e-11).
        faults[0].loss_pct = 50;
        faults[0].dup_pct = 10;
        faults[0].slow_pct = 20;
        apply(&hosts[0], &faults[0]).unwrap();
        let out = hosts[0]
            .cmd("ping", Duration::from_secs(30))
            .args([
                "-c",
                "40",
                "-i",
                "0.02",
                "-W",
                "1",
                &hosts[1].addr.to_string(),
            ])
            .output_blocking();
        let text = match out {
            Ok(o) => o.stdout,
            Err(e) => format!("{e:#}"),
        };
        let received: u32 = text
            .split(", ")
            .find_map(|p| {
                p.strip_suffix(" received")
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no ping summary in {text}"));
        assert!(received > 0 && received < 40, "{received} of 40: {text}");
        apply(&hosts[0], &HostFaults::default()).unwrap();
        assert!(reaches(&hosts[0], hosts[1].addr));
    }
}
