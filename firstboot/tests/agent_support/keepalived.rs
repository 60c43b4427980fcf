//! Agent tests with the floating API address: agents started with `--keepalived-bin`, so each
//! runs a real keepalived in its node's network namespace; which node holds the address; the
//! address's API readiness seen from another lab host; a node's death (processes killed,
//! cable pulled) and a partition by routes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::AgentCluster;
use rackseed_host::command::Cmd;

/// The packaged keepalived (Debian/Ubuntu): a missing one is a loud failure.
pub fn keepalived_bin() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/keepalived");
    assert!(
        p.exists(),
        "{} is missing: install keepalived (scripts/install-deps installs it)",
        p.display()
    );
    p
}

/// Kills every keepalived the agents started when dropped (they outlive a killed agent, as
/// under systemd). Declare it after the [`AgentCluster`] so it is dropped first.
pub struct KeepalivedGuard {
    pub run_dirs: Vec<PathBuf>,
}

impl Drop for KeepalivedGuard {
    fn drop(&mut self) {
        for d in &self.run_dirs {
            kill_keepalived_in(d);
        }
    }
}

/// SIGKILL keepalived's VRRP child and its parent (a power cut: no goodbye advert). Returns
/// whether one was running.
fn kill_keepalived_in(run_dir: &Path) -> bool {
    let mut any = false;
    for f in ["vrrp.pid", "keepalived.pid"] {
        let Ok(text) = std::fs::read_to_string(run_dir.join(f)) else {
            continue;
        };
        if let Ok(pid) = text.trim().parse::<i32>() {
            any |= nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok();
        }
    }
    any
}

impl AgentCluster {
    /// Adds `api-address = "<address>"` to the cluster config (before the agents start).
    pub fn set_api_address(&self, address: &str) {
        let path = self.dir.path().join("cluster.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replacen(
            "[cluster]\n",
            &format!("[cluster]\napi-address = \"{address}\"\n"),
            1,
        );
        std::fs::write(&path, text).unwrap();
    }

    /// Drops the harness's `standbys = 0`, so the config's default standbys apply.
    pub fn use_default_standbys(&self) {
        let path = self.dir.path().join("cluster.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("standbys = 0\n"), "{text}");
        std::fs::write(&path, text.replacen("standbys = 0\n", "", 1)).unwrap();
    }

    /// Node `i`'s keepalived folder (pid files, log).
    pub fn keepalived_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("state/keepalived")
    }

    /// A guard that kills every node's keepalived at the end of the test.
    pub fn keepalived_guard(&self) -> KeepalivedGuard {
        KeepalivedGuard {
            run_dirs: (0..self.nodes.len())
                .map(|i| self.keepalived_dir(i))
                .collect(),
        }
    }

    /// Starts (or restarts) node `i`'s agent with a real keepalived of its own.
    pub fn start_with_keepalived(&mut self, i: usize) {
        let cfg = self.dir.path().join("cluster.toml");
        let cmd = self
            .agent_command(i, &cfg)
            .arg("--keepalived-bin")
            .arg(keepalived_bin());
        self.spawn_agent(i, cmd);
    }

    /// Whether node `i`'s interface carries `address` now.
    pub fn holds_address(&self, i: usize, address: Ipv4Addr) -> bool {
        let out = Cmd::new("ip", Duration::from_secs(5))
            .args([
                "-n",
                &self.nodes[i].ns,
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ])
            .output_blocking()
            .expect("ip addr show");
        out.stdout
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(&address.to_string()))
    }

    /// The nodes holding `address` now.
    pub fn address_holders(&self, address: Ipv4Addr) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.holds_address(i, address))
            .collect()
    }

    /// Whether `GET https://<address>:16443/readyz` answers 200 from lab host `host`.
    pub fn api_ready_via(&self, host: usize, address: Ipv4Addr) -> bool {
        let url = format!("https://{address}:16443/readyz");
        Cmd::new("ip", Duration::from_secs(5))
            .args(["netns", "exec", &self.lab.host(host).ns])
            .args([
                "curl",
                "--fail",
                "--silent",
                "--insecure",
                "--max-time",
                "1",
            ])
            .args(["--output", "/dev/null", &url])
            .output_blocking()
            .is_ok_and(|o| o.status.success())
    }

    /// Node `i` dies like a machine losing power: its keepalived (no goodbye advert) and agent
    /// are SIGKILLed, its cable is pulled (lab host `lab_host`) and the address a dead
    /// keepalived left on its interface is dropped (a powered-off machine holds nothing). Its
    /// simulated MicroK8s keeps running, cut off.
    pub fn power_off(&mut self, i: usize, lab_host: usize, address: Ipv4Addr) {
        kill_keepalived_in(&self.keepalived_dir(i));
        self.lab.disconnect(lab_host).expect("pulling the cable");
        self.kill_agent(i);
        let _ = Cmd::new("ip", Duration::from_secs(5))
            .args([
                "-n",
                &self.nodes[i].ns,
                "addr",
                "del",
                &format!("{address}/24"),
            ])
            .args(["dev", "eth0"])
            .output_blocking();
    }

    /// Node `i` comes back from [`AgentCluster::power_off`]: the cable is back and the agent
    /// restarts (and with it keepalived).
    pub fn power_on(&mut self, i: usize, lab_host: usize) {
        self.lab.reconnect(lab_host).expect("reconnecting");
        self.start_with_keepalived(i);
    }

    /// Cuts (or, with `cut == false`, heals) all IP traffic between node `i` and nodes
    /// `others`, both ways: each side's policy routing drops whatever arrives from the other
    /// (`ip rule ... iif eth0 blackhole`, which raw sockets such as VRRP's cannot bypass). The
    /// links stay up, so only missing packets tell the nodes apart.
    pub fn partition(&self, i: usize, others: &[usize], cut: bool) {
        let verb = if cut { "add" } else { "del" };
        let rule = |ns: &str, from: Ipv4Addr| {
            let from = from.to_string();
            Cmd::new("ip", Duration::from_secs(5))
                .args(["-n", ns, "rule", verb, "from", &from, "iif", "eth0"])
                .args(["priority", "10", "blackhole"])
                .run_blocking()
                .unwrap_or_else(|e| panic!("ip rule {verb} from {from} in {ns}: {e:#}"));
        };
        // Locally addressed packets match the `local` table's rule (preference 0) before any
        // other: it moves behind the blackhole rules first (once per namespace).
        let local_last = |ns: &str| {
            let rules = Cmd::new("ip", Duration::from_secs(5))
                .args(["-n", ns, "rule", "show", "pref", "0"])
                .output_blocking()
                .expect("ip rule show");
            if rules.stdout.contains("lookup local") {
                for args in [["add", "pref", "100"], ["del", "pref", "0"]] {
                    Cmd::new("ip", Duration::from_secs(5))
                        .args(["-n", ns, "rule"])
                        .args(args)
                        .args(["lookup", "local"])
                        .run_blocking()
                        .unwrap_or_else(|e| panic!("moving the local rule in {ns}: {e:#}"));
                }
            }
        };
        for &o in others {
            local_last(&self.nodes[i].ns);
            local_last(&self.nodes[o].ns);
            rule(&self.nodes[i].ns, self.nodes[o].addr);
            rule(&self.nodes[o].ns, self.nodes[i].addr);
        }
    }
}
