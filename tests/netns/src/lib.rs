//! Test-only network lab: N hosts, each in its own network namespace, wired to one bridge that
//! lives in a private "switch" namespace. Multicast (mDNS) works across the bridge; nothing is
//! routed anywhere else, so test traffic never leaves the machine.
//!
//! Hosts get `10.231.0.<i+1>/24` on `eth0`; addresses are only ever used inside the lab's own
//! namespaces (every lab has its own switch, so labs never see each other). Code runs in a host
//! either as a child process ([`Host::cmd`]) or in-process on a thread that has entered the
//! namespace ([`Host::spawn_thread`]), which lets one test binary run many agents.
//! [`Lab::disconnect`] / [`Lab::reconnect`] cut and restore one host's link for partition tests.
//! Dropping the lab deletes every namespace it made, also when the test panics.
//!
//! Needs root and iproute2; [`Lab::new`] fails loudly (never skips) when either is missing.

pub mod faults;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_host::command::Cmd;

const IP_TIMEOUT: Duration = Duration::from_secs(20);
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One host of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Host {
    pub index: usize,
    /// Network namespace name (`ip netns exec <ns> ...`).
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// A set of hosts on one bridge. See the module docs.
#[derive(Debug)]
pub struct Lab {
    id: String,
    switch_ns: String,
    hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<()> {
    Cmd::new("ip", IP_TIMEOUT)
        .args(args)
        .run_blocking()
        .map(|_| ())
        .with_context(|| format!("ip {}", args.join(" ")))
}

/// Fails with a clear message unless this process is root.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (network namespaces); run the test suite as root, as CI does");
    }
    Ok(())
}

impl Lab {
    /// Creates `n` hosts (at most 250) on one bridge. Must not be called from inside a tokio
    /// runtime thread that forbids blocking; call it before starting agents.
    pub fn new(n: usize) -> Result<Lab> {
        require_root("the network lab")?;
        if n == 0 || n > 250 {
            bail!("a lab holds 1 to 250 hosts, not {n}");
        }
        let id = format!(
            "{:x}{:x}",
            std::process::id() % 0xffff,
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let switch_ns = format!("rs{id}-sw");
        let mut lab = Lab {
            id: id.clone(),
            switch_ns: switch_ns.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &switch_ns])?;
        ip(&["-n", &switch_ns, "link", "add", "br0", "type", "bridge"])?;
        // No multicast snooping: mDNS must flood to every port, like a dumb switch.
        ip(&[
            "-n",
            &switch_ns,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &switch_ns, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("rs{id}-h{i}");
            let addr = Ipv4Addr::new(10, 231, 0, (i + 1) as u8);
            ip(&["netns", "add", &ns])?;
            lab.hosts.push(Host {
                index: i,
                ns: ns.clone(),
                addr,
            });
            let outer = format!("r{id}p{i}");
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &outer, "netns", &switch_ns])?;
            ip(&["-n", &switch_ns, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &switch_ns, "link", "set", &outer, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // Multicast leaves through eth0 (there is no default route in a lab host).
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        }
        Ok(lab)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Cuts host `i` off the bridge (its link stays up inside its namespace).
    pub fn disconnect(&self, i: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &format!("r{}p{i}", self.id),
            "down",
        ])
    }

    /// Restores host `i`'s link to the bridge.
    pub fn reconnect(&self, i: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &format!("r{}p{i}", self.id),
            "up",
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        names.push(self.switch_ns.clone());
        // run_blocking builds its own runtime, which is not allowed on a runtime thread: clean up
        // from a plain thread.
        let _ = std::thread::spawn(move || {
            for ns in names {
                let _ = ip(&["netns", "del", &ns]);
            }
        })
        .join();
    }
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn cmd(&self, program: &str, timeout: Duration) -> Cmd {
        Cmd::new("ip", timeout).args(["netns", "exec", &self.ns, program])
    }

    /// The body of `GET url` fetched from this host with curl (`--fail`, one second at most),
    /// or `None` when nothing answered with a success.
    pub fn http_get(&self, url: &str) -> Option<String> {
        let out = self
            .cmd("curl", Duration::from_secs(5))
            .args(["--silent", "--fail", "--max-time", "1", url])
            .output_blocking()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// Runs `f` on a new thread that has entered this host's network namespace; sockets it
    /// opens (and tokio runtimes it builds) live in that namespace.
    pub fn spawn_thread<T, F>(&self, f: F) -> std::thread::JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let ns = self.ns.clone();
        std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn(move || {
                enter_netns(&ns)?;
                f()
            })
            .expect("spawning a lab thread")
    }
}

/// Moves the calling thread into the named network namespace.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_each_other_and_partition_cuts_them_off() {
        let lab = Lab::new(3).unwrap();
        let ping = |from: usize, to: usize| {
            lab.host(from)
                .cmd("ping", Duration::from_secs(5))
                .args(["-c", "1", "-W", "1", &lab.host(to).addr.to_string()])
                .run_blocking()
        };
        ping(0, 2).expect("host 0 reaches host 2");
        lab.disconnect(2).unwrap();
        assert!(
            ping(0, 2).is_err(),
            "a disconnected host must be unreachable"
        );
        lab.reconnect(2).unwrap();
        ping(0, 2).expect("host 0 reaches host 2 again");
    }

    #[test]
    fn threads_in_a_host_see_its_addresses() {
        let lab = Lab::new(1).unwrap();
        let addr = lab.host(0).addr;
        let bound = lab
            .host(0)
            .spawn_thread(move || {
                let s = std::net::UdpSocket::bind((addr, 0))?;
                Ok(s.local_addr()?.ip())
            })
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(bound, std::net::IpAddr::V4(addr));
    }
}
