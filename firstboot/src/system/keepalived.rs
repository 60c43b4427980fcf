//! The floating Kubernetes API address (`cluster.api-address`) through keepalived: VRRP among
//! the control-plane members, unicast to each other, the address held by exactly one node
//! whose local API server is ready.
//!
//! What the agent does (from `driver/effects.rs`, on every MicroK8s poll once this node is a
//! control-plane member):
//! 1. [`VrrpSettings::new`] takes the address, the local interface whose subnet holds it, and
//!    the datastore members MicroK8s lists (voters, standbys and spares all run an API
//!    server); [`render`] turns them into `keepalived.conf`.
//! 2. [`Keepalived::apply`] writes it atomically to `<root>/etc/keepalived/keepalived.conf`
//!    (mode 0600: it holds the VRRP password) when it changed, and starts or reloads
//!    keepalived: `systemctl reload-or-restart keepalived.service`, then once `systemctl enable
//!    --no-reload` (see `apply_systemd` for why in that order and without a reload) on a
//!    node ([`KeepalivedControl::Systemd`]), or, in tests, a `keepalived` process of its own in
//!    the node's network namespace ([`KeepalivedControl::Direct`], `firstboot run
//!    --keepalived-bin`), reloaded with SIGHUP as systemd's unit does.
//! 3. [`holds`] says whether this node holds the address now (its interfaces carry it).
//!
//! The VRRP instance: every node starts `BACKUP` with `nopreempt` (a recovered node does not
//! take the address back, so it moves only when its holder fails), distinct priorities by the
//! members' address order (the highest backup claims first, so two never claim at once), and
//! `advert_int 2`: a backup claims when no advert came for the master-down interval, 3 adverts
//! plus the priority skew ((256 - priority) / 256 of an advert), 6.44 s at priority 200 and
//! 6.52 s at 190. That interval runs from the *last advert received*, which left the holder
//! 0-2 s before it died, so the claim comes 4.4-6.5 s after the death (what
//! `scripts/bench-failover` measures). The health check ([`HEALTH_CHECK`]) asks the local
//! kube-apiserver's `/readyz` every second; two failures in a row put the instance in `FAULT`,
//! which releases the address. Readiness includes the datastore (kine over dqlite), so a node
//! that lost dqlite quorum (a partitioned minority) gives the address up. The two timings are
//! chosen together: a minority's holder must let go (quorum loss noticed + 2 s of failed
//! checks) before the majority's backups claim, which can be as early as 4.4 s after the cut,
//! so a partition never shows the address on both sides. `advert_int 1` would claim 2.2-3.2 s
//! after the cut, too close to that; the price of 2 s is a failover of 4.4-6.5 s instead of
//! 2.2-3.2 s (target: 10 s). The simulator's `/readyz` fails within a second of losing
//! quorum; how fast a real kube-apiserver's readiness fails when dqlite loses its leader is
//! not measured here (the QEMU test is where it shows).
//!
//! `cluster.api-check-interval` (default 1 s) scales all of it: check interval I, check
//! timeout 2I, `advert_int` 2I, so the release (quorum loss + 2 failed checks) still comes
//! before the earliest claim (3 adverts + skew) and failover takes I × 4.4-6.5 s. Emulated
//! QEMU test clusters need it: under TCG one `curl` of `/readyz` takes over a second, so a
//! check every second never passed (keepalived stayed in FAULT, nobody held the address) and
//! starting `curl` every second used most of the VM's CPU (the end-to-end test sets 5 s).
//!
//! Authentication: the virtual router id (1–255) and the 8-character VRRP password are
//! derived from the cluster secret ([`rackseed_protocol::secret::ClusterSecret::keepalived_key`]),
//! so another cluster's or a stranger's adverts (without the secret) are ignored. VRRPv2's
//! `PASS` type sends the password in each advert: it proves nothing against someone who
//! sniffs the LAN (it is not the secret, only derived from it), and it is the password field
//! keepalived has; the address is an availability aid, the API itself is TLS with client
//! certificates.
//!
//! Facts relied on (keepalived's documentation, `keepalived.conf(5)` of keepalived 2.2, and
//! MicroK8s' `microk8s-resources/default-args/kube-apiserver` in canonical/microk8s):
//! - `auth_pass` is at most 8 characters; `virtual_router_id` 1–255; a `vrrp_script` with no
//!   `weight` puts the instance in FAULT state while it fails; `nopreempt` needs initial state
//!   `BACKUP`; `unicast_src_ip`/`unicast_peer` replace multicast adverts; `enable_script_security`
//!   with `script_user root` runs the check as root only if no non-root user can write it;
//! - kube-apiserver listens on `--secure-port=16443` with no `--anonymous-auth` flag (the
//!   upstream default `true`) and `--authorization-mode=AlwaysAllow`, so `/readyz` answers
//!   without credentials;
//! - Debian and Ubuntu's `keepalived` package ships `keepalived.service`, reads
//!   `/etc/keepalived/keepalived.conf`, and its unit reloads with SIGHUP.
//!
//! IPv6 addresses are refused here (VRRPv3 has no authentication); MicroK8s joins are IPv4
//! anyway. To change the instance, change [`render`] and its test.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_host::command::Cmd;

/// Where keepalived reads its configuration, under the agent's `--root`.
pub const CONFIG_PATH: &str = "etc/keepalived/keepalived.conf";
/// The health check: the local API server's readiness, without credentials (see the module docs).
pub const HEALTH_CHECK: &str = "/usr/bin/curl --fail --silent --insecure --max-time 1 --output /dev/null https://127.0.0.1:16443/readyz";
/// The readiness check for a check interval of `interval_s` seconds: [`HEALTH_CHECK`] with
/// curl's own bound at the interval (a slower check is for slower machines).
pub fn health_check(interval_s: u32) -> String {
    HEALTH_CHECK.replace(
        "--max-time 1 ",
        &format!("--max-time {} ", interval_s.max(1)),
    )
}

/// The program [`HEALTH_CHECK`] runs (Debian and Ubuntu's `curl` package).
pub const HEALTH_CHECK_PROGRAM: &str = "/usr/bin/curl";
/// Where Debian and Ubuntu's `keepalived` package puts the daemon, under `--root`.
pub const PACKAGED_BINARY: &str = "usr/sbin/keepalived";
/// The systemd unit of that package.
pub const UNIT: &str = "keepalived.service";
/// Name of the VRRP instance and of its health-check script.
const INSTANCE: &str = "RACKSEED_API";
const SCRIPT: &str = "rackseed_api_ready";

/// How keepalived is started and reloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepalivedControl {
    /// A node: the packaged `keepalived.service`, through `systemctl`.
    Systemd,
    /// Tests: this `keepalived` binary run by the agent itself (VRRP only, not forked, its log
    /// and pid files in `run_dir`), reloaded with SIGHUP.
    Direct { binary: PathBuf, run_dir: PathBuf },
}

/// One node's VRRP instance. `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct VrrpSettings {
    pub address: IpAddr,
    /// The prefix length of the interface's subnet (the address is added with it).
    pub prefix: u8,
    pub interface: String,
    /// This node's own address on that interface (`unicast_src_ip`).
    pub own: IpAddr,
    /// The other control-plane members, sorted.
    pub peers: Vec<IpAddr>,
    pub router_id: u8,
    /// 8 characters, `[A-Za-z0-9]`, derived from the cluster secret. Never logged.
    password: String,
    pub priority: u8,
    /// The health check's interval in seconds (`cluster.api-check-interval`, default 1).
    /// Every timing scales with it: check timeout 2×, advert interval 2×, so the partition
    /// argument in the module docs holds at any setting.
    pub check_interval_s: u32,
}

impl std::fmt::Debug for VrrpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VrrpSettings")
            .field("address", &self.address)
            .field("prefix", &self.prefix)
            .field("interface", &self.interface)
            .field("own", &self.own)
            .field("peers", &self.peers)
            .field("router_id", &self.router_id)
            .field("password", &"<redacted>")
            .field("priority", &self.priority)
            .field("check_interval_s", &self.check_interval_s)
            .finish()
    }
}

impl VrrpSettings {
    /// The instance for `address` on this node. `local` are this node's (interface, address,
    /// prefix) triples; `members` the control-plane members' addresses (this node's among
    /// them or not); `key` is [`rackseed_protocol::secret::ClusterSecret::keepalived_key`].
    /// Errors say why the address cannot be held here.
    pub fn new(
        key: &[u8; 32],
        address: IpAddr,
        local: &[(String, IpAddr, u8)],
        members: &[IpAddr],
    ) -> Result<VrrpSettings, String> {
        if !address.is_ipv4() {
            return Err(format!(
                "{address} is IPv6: keepalived's VRRPv3 has no authentication, so rackseed holds only IPv4 API addresses"
            ));
        }
        let (interface, own, prefix) = local
            .iter()
            .filter(|(_, ip, prefix)| *ip != address && same_subnet(*ip, address, *prefix))
            .min_by_key(|(name, ip, _)| (name.clone(), *ip))
            .cloned()
            .ok_or_else(|| format!("no interface of this node is on {address}'s subnet"))?;
        if !keepalived_safe_name(&interface) {
            return Err(format!(
                "interface {interface:?} holds characters keepalived.conf would read as syntax (only letters, digits, '.', '_' and '-' are written there)"
            ));
        }
        let mut all: Vec<IpAddr> = members.iter().copied().filter(|ip| ip.is_ipv4()).collect();
        all.push(own);
        all.sort();
        all.dedup();
        let rank = all.iter().position(|ip| *ip == own).unwrap_or(0);
        let peers = all.iter().copied().filter(|ip| *ip != own).collect();
        Ok(VrrpSettings {
            address,
            prefix,
            interface,
            own,
            peers,
            router_id: 1 + key[31] % 255,
            password: password(key),
            // Distinct per member (address order), so backups never claim at the same moment.
            priority: 200u8.saturating_sub(10u8.saturating_mul(rank.min(19) as u8)),
            check_interval_s: 1,
        })
    }
}

/// Whether an interface name can be written into `keepalived.conf` as one plain word: Linux
/// allows any bytes but `/`, `:` and white space, and keepalived's parser treats `{`, `}`, `"`,
/// `#` and `!` as syntax, so only `[A-Za-z0-9._-]` (every name Linux and udev make) passes.
fn keepalived_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 8 characters of `[A-Za-z0-9]` from the key (keepalived's `auth_pass` holds 8).
fn password(key: &[u8; 32]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    key[..8]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// `keepalived.conf` for `s`, with `health_check` as the readiness command.
pub fn render(s: &VrrpSettings, health_check: &str) -> String {
    let mut peers = String::new();
    if !s.peers.is_empty() {
        peers.push_str("    unicast_peer {\n");
        for p in &s.peers {
            peers.push_str(&format!("        {p}\n"));
        }
        peers.push_str("    }\n");
    }
    format!(
        "# Written by rackseed's firstboot agent: the floating Kubernetes API address.\n\
         # Rewritten whenever the control-plane members change; do not edit.\n\
         global_defs {{\n    \
             enable_script_security\n    \
             script_user root\n    \
             vrrp_garp_master_refresh 10\n\
         }}\n\n\
         vrrp_script {SCRIPT} {{\n    \
             script \"{health_check}\"\n    \
             interval {check}\n    \
             timeout {check_timeout}\n    \
             fall 2\n    \
             rise 2\n\
         }}\n\n\
         vrrp_instance {INSTANCE} {{\n    \
             state BACKUP\n    \
             nopreempt\n    \
             interface {iface}\n    \
             virtual_router_id {vrid}\n    \
             priority {prio}\n    \
             advert_int {advert}\n    \
             unicast_src_ip {own}\n\
         {peers}    \
             authentication {{\n        \
                 auth_type PASS\n        \
                 auth_pass {pass}\n    \
             }}\n    \
             virtual_ipaddress {{\n        \
                 {vip}/{prefix} dev {iface}\n    \
             }}\n    \
             track_script {{\n        \
                 {SCRIPT}\n    \
             }}\n\
         }}\n",
        iface = s.interface,
        vrid = s.router_id,
        prio = s.priority,
        own = s.own,
        pass = s.password,
        vip = s.address,
        prefix = s.prefix,
        check = s.check_interval_s.max(1),
        check_timeout = 2 * s.check_interval_s.max(1),
        advert = 2 * s.check_interval_s.max(1),
    )
}

/// What [`Keepalived::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Started,
    Reloaded,
}

/// keepalived on this node: its configuration file and how it runs. `Debug` shows whether a
/// configuration was applied, not its text (it holds the VRRP password).
pub struct Keepalived {
    control: KeepalivedControl,
    root: PathBuf,
    /// The configuration this agent process last applied.
    applied: Option<String>,
    /// `keepalived.service` enabled for the next boots (Systemd only).
    enabled: bool,
    /// The `systemctl enable` running in the background, if any (Systemd only).
    enabling: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The keepalived process (Direct only).
    child: Option<tokio::process::Child>,
}

impl std::fmt::Debug for Keepalived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keepalived")
            .field("control", &self.control)
            .field("root", &self.root)
            .field("applied", &self.applied.is_some())
            .field("child", &self.child.as_ref().and_then(|c| c.id()))
            .finish()
    }
}

impl Keepalived {
    pub fn new(control: KeepalivedControl, root: &Path) -> Keepalived {
        Keepalived {
            control,
            root: root.to_owned(),
            applied: None,
            enabled: false,
            enabling: None,
            child: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_PATH)
    }

    /// Why keepalived cannot run here (not installed, or its health check's program missing),
    /// if so.
    ///
    /// keepalived 2.2 starts without a `vrrp_script` whose program it cannot find ("Disabling
    /// track script … since not found/accessible") and then runs the instance with no health
    /// check at all: the node would hold the address without the API being ready, a cut-off
    /// minority included. So a missing program keeps keepalived from being configured.
    pub fn missing(&self) -> Option<String> {
        let (binary, check) = match &self.control {
            KeepalivedControl::Systemd => (
                self.root.join(PACKAGED_BINARY),
                self.root.join(HEALTH_CHECK_PROGRAM.trim_start_matches('/')),
            ),
            // Tests: keepalived runs on this machine's file system.
            KeepalivedControl::Direct { binary, .. } => {
                (binary.clone(), PathBuf::from(HEALTH_CHECK_PROGRAM))
            }
        };
        if !binary.exists() {
            return Some(format!(
                "keepalived is not installed ({} is missing): this node cannot hold the API address; install the keepalived package (bootstrapped rackseed bases include it; for an official base, stage its .deb with addons.offline so the agent installs it at first boot)",
                binary.display()
            ));
        }
        (!check.exists()).then(|| {
            format!(
                "the API health check's program {} is missing: keepalived would drop the check and hold the address without the API being ready, so this node does not hold it; install the curl package (bootstrapped rackseed bases include it; for an official base, stage its .deb with addons.offline)",
                check.display()
            )
        })
    }

    /// Writes `config` (0600, atomically) when it differs from the file, and makes keepalived
    /// run with it: started when it is not running, reloaded when the file changed.
    pub async fn apply(&mut self, config: &str) -> Result<Applied> {
        if let Some(why) = self.missing() {
            bail!("{why}");
        }
        let path = self.config_path();
        let on_disk = std::fs::read_to_string(&path).ok();
        let changed = on_disk.as_deref() != Some(config);
        if changed {
            rackseed_host::fs::write_atomic(&path, config.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let first = self.applied.is_none();
        let outcome = match self.control.clone() {
            KeepalivedControl::Systemd => self.apply_systemd(first, changed).await?,
            KeepalivedControl::Direct { binary, run_dir } => {
                self.apply_direct(&binary, &run_dir, changed).await?
            }
        };
        self.applied = Some(config.to_owned());
        Ok(outcome)
    }

    async fn apply_systemd(&mut self, first: bool, changed: bool) -> Result<Applied> {
        let outcome = if first || changed {
            // Running: SIGHUP (the unit's ExecReload); stopped: start. A first call after a
            // restart of the agent with an unchanged file makes sure it runs.
            systemctl(&["reload-or-restart", UNIT], RELOAD_TIMEOUT).await?;
            if changed {
                Applied::Reloaded
            } else {
                Applied::Started
            }
        } else {
            Applied::Unchanged
        };
        // Enabled for the boots to come only after it runs: the address must not wait for it.
        // `--no-reload`: enabling only adds the [Install] links, read at the next boot; the
        // unit is loaded already. The implicit daemon-reload re-runs every generator, and with
        // Debian's SysV compatibility (`systemd-sysv-install`, update-rc.d in Perl) one
        // `systemctl enable` took over 60 s on a loaded emulated VM, every try (QEMU
        // end-to-end test; with --no-reload still over 300 s). Installing the package
        // enables it already (its postinst), so normally nothing is asked. A failure is said
        // and tried again at the next apply.
        // It runs in the background: the address and the status never wait for it.
        if let Some(task) = self.enabling.take_if(|t| t.is_finished()) {
            match task.await {
                Ok(Ok(())) => self.enabled = true,
                Ok(Err(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "keepalived runs but is not enabled for the next boot; trying again"
                ),
                Err(e) => tracing::warn!(error = %e, "enabling keepalived: task failed"),
            }
        }
        // The package's own postinst (deb-systemd-helper) enables it: nothing to ask systemd.
        if !self.enabled && std::fs::symlink_metadata(self.root.join(ENABLED_LINK)).is_ok() {
            self.enabled = true;
        }
        if !self.enabled && self.enabling.is_none() {
            self.enabling = Some(tokio::spawn(systemctl(
                &["enable", "--no-reload", UNIT],
                ENABLE_TIMEOUT,
            )));
        }
        Ok(outcome)
    }

    async fn apply_direct(
        &mut self,
        binary: &Path,
        run_dir: &Path,
        changed: bool,
    ) -> Result<Applied> {
        let pid_file = run_dir.join("keepalived.pid");
        if let Some(pid) = running_pid(&pid_file) {
            if !changed {
                return Ok(Applied::Unchanged);
            }
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)
                .with_context(|| format!("reloading keepalived (pid {pid})"))?;
            return Ok(Applied::Reloaded);
        }
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("keepalived.log"))
            .with_context(|| format!("opening {}", run_dir.join("keepalived.log").display()))?;
        let child = Cmd::new(binary, Duration::from_secs(10))
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .arg("--use-file")
            .arg(self.config_path())
            .arg("--pid")
            .arg(&pid_file)
            .arg("--vrrp_pid")
            .arg(run_dir.join("vrrp.pid"))
            .spawn_with(log.try_clone()?, log)
            .context("starting keepalived")?;
        self.child = Some(child);
        Ok(Applied::Started)
    }
}

/// The pid in `pid_file` when that process is alive.
fn running_pid(pid_file: &Path) -> Option<nix::unistd::Pid> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, None).ok().map(|()| pid)
}

/// The link `systemctl enable` (or the package's postinst, through deb-systemd-helper)
/// makes from the unit's `WantedBy=multi-user.target`, relative to the root.
const ENABLED_LINK: &str = "etc/systemd/system/multi-user.target.wants/keepalived.service";
/// Bound on `systemctl reload-or-restart` (a start job of keepalived).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on `systemctl enable --no-reload` (SysV compatibility runs update-rc.d).
const ENABLE_TIMEOUT: Duration = Duration::from_secs(300);

fn systemctl(
    args: &[&str],
    timeout: Duration,
) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
    let what = format!("systemctl {}", args.join(" "));
    let cmd = Cmd::new("systemctl", timeout).args(args);
    async move { cmd.run().await.map(|_| ()).context(what) }
}

/// Whether one of this node's interfaces carries `address` now.
pub fn holds(address: IpAddr) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs.filter_map(|ifa| ifa.address).any(|a| {
        a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(address)
            || a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(address)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn local() -> Vec<(String, IpAddr, u8)> {
        vec![
            ("enp0s2".into(), ip("10.0.2.15"), 24),
            ("enp0s3".into(), ip("192.168.76.12"), 24),
        ]
    }

    #[test]
    fn the_instance_is_on_the_addresses_subnet_with_the_other_members_as_peers() {
        let key = [7u8; 32];
        let members = [
            ip("192.168.76.13"),
            ip("192.168.76.11"),
            ip("192.168.76.12"),
        ];
        let s = VrrpSettings::new(&key, ip("192.168.76.100"), &local(), &members).unwrap();
        assert_eq!(s.interface, "enp0s3");
        assert_eq!(s.own, ip("192.168.76.12"));
        assert_eq!(s.prefix, 24);
        assert_eq!(s.peers, vec![ip("192.168.76.11"), ip("192.168.76.13")]);
        assert_eq!(s.priority, 190, "second in address order");
        assert!((1..=255).contains(&s.router_id));
        let text = render(&s, HEALTH_CHECK);
        for line in [
            "state BACKUP",
            "nopreempt",
            "interface enp0s3",
            "unicast_src_ip 192.168.76.12",
            "        192.168.76.11\n        192.168.76.13\n",
            "auth_type PASS",
            "192.168.76.100/24 dev enp0s3",
            "script \"/usr/bin/curl --fail",
            "https://127.0.0.1:16443/readyz",
            "fall 2",
            "interval 1\n",
            "timeout 2\n",
            "advert_int 2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        // A slower check scales the timeout and the adverts with it.
        let slow = VrrpSettings {
            check_interval_s: 5,
            ..s.clone()
        };
        assert_eq!(health_check(1), HEALTH_CHECK);
        assert!(
            health_check(5).contains("--max-time 5 "),
            "{}",
            health_check(5)
        );
        let slow_text = render(&slow, &health_check(5));
        for line in [
            "interval 5\n",
            "timeout 10\n",
            "advert_int 10\n",
            "fall 2",
            "--max-time 5 ",
        ] {
            assert!(
                slow_text.contains(line),
                "{line:?} missing from:\n{slow_text}"
            );
        }
        let pass = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("auth_pass "))
            .unwrap();
        assert_eq!(pass.len(), 8);
        assert!(pass.chars().all(|c| c.is_ascii_alphanumeric()));
        let debug = format!("{s:?}");
        assert!(
            !debug.contains(pass) && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn members_agree_on_the_router_and_password_but_not_on_priority() {
        let key = [42u8; 32];
        let members = [ip("10.0.0.11"), ip("10.0.0.12"), ip("10.0.0.13")];
        let mut prios = Vec::new();
        for own in members {
            let l = vec![("eth0".to_string(), own, 24)];
            let s = VrrpSettings::new(&key, ip("10.0.0.100"), &l, &members).unwrap();
            assert_eq!(s.peers.len(), 2);
            assert!(!s.peers.contains(&own));
            prios.push((s.priority, s.router_id, s.password.clone()));
        }
        assert!(prios
            .windows(2)
            .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2));
        assert!(prios.windows(2).all(|w| w[0].0 > w[1].0), "{prios:?}");
        let other = VrrpSettings::new(
            &[43u8; 32],
            ip("10.0.0.100"),
            &[("eth0".into(), ip("10.0.0.11"), 24)],
            &members,
        )
        .unwrap();
        assert_ne!(
            other.password, prios[0].2,
            "another secret, another password"
        );
    }

    #[test]
    fn an_address_this_node_cannot_hold_is_refused_with_the_reason() {
        let e = VrrpSettings::new(&[1; 32], ip("172.16.0.5"), &local(), &[]).unwrap_err();
        assert!(e.contains("no interface"), "{e}");
        let e = VrrpSettings::new(&[1; 32], ip("fd00::5"), &local(), &[]).unwrap_err();
        assert!(e.contains("IPv6"), "{e}");
        // An interface name keepalived would parse as syntax is never written.
        for name in ["br}x", "eth0#", "a\"b", "x{", "v!1", ""] {
            let l = vec![(name.to_string(), ip("10.0.2.15"), 24)];
            let e = VrrpSettings::new(&[1; 32], ip("10.0.2.100"), &l, &[]).unwrap_err();
            assert!(
                e.contains("keepalived.conf would read as syntax"),
                "{name:?}: {e}"
            );
        }
        for name in ["enp0s31f6", "eth0.100", "br_lan", "wlan-0"] {
            let l = vec![(name.to_string(), ip("10.0.2.15"), 24)];
            VrrpSettings::new(&[1; 32], ip("10.0.2.100"), &l, &[]).unwrap();
        }
        // A lone member has no peers and no empty unicast_peer block.
        let s = VrrpSettings::new(&[1; 32], ip("10.0.2.100"), &local(), &[]).unwrap();
        assert!(!render(&s, HEALTH_CHECK).contains("unicast_peer"));
    }

    #[tokio::test]
    async fn the_configuration_is_written_private_and_only_when_it_changes() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mut k = Keepalived::new(KeepalivedControl::Systemd, root.path());
        let e = k.apply("x").await.unwrap_err().to_string();
        assert!(e.contains("keepalived is not installed"), "{e}");
        assert!(
            !k.config_path().exists(),
            "nothing written without keepalived"
        );
        // keepalived without the health check's program: refused, nothing written (keepalived
        // would run the instance with no check at all).
        let sbin = root.path().join("usr/sbin");
        std::fs::create_dir_all(&sbin).unwrap();
        std::fs::write(sbin.join("keepalived"), "").unwrap();
        let e = k.apply("x").await.unwrap_err().to_string();
        assert!(e.contains("/usr/bin/curl is missing"), "{e}");
        assert!(HEALTH_CHECK.starts_with(&format!("{HEALTH_CHECK_PROGRAM} ")));
        assert!(!k.config_path().exists());
        // A fake keepalived that records its arguments and stays up until killed.
        let bin = root.path().join("keepalived");
        let args = root.path().join("args");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\ntrap 'echo HUP >> {1}' HUP\necho \"$@\" >> '{0}'\nwhile :; do sleep 0.05; done\n",
                args.display(),
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = root.path().join("run");
        let mut k = Keepalived::new(
            KeepalivedControl::Direct {
                binary: bin,
                run_dir: run_dir.clone(),
            },
            root.path(),
        );
        assert_eq!(k.apply("one\n").await.unwrap(), Applied::Started);
        let path = k.config_path();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The fake writes no pid file; keepalived does. Give it one, as keepalived would.
        let pid = k.child.as_ref().unwrap().id().unwrap();
        std::fs::write(run_dir.join("keepalived.pid"), format!("{pid}\n")).unwrap();
        // A reload before the fake has set its trap would kill it: wait until it has started
        // (it sets the trap before it records its arguments), however loaded the machine.
        wait_for_text(&args, "--use-file").await;
        assert_eq!(k.apply("one\n").await.unwrap(), Applied::Unchanged);
        assert_eq!(k.apply("two\n").await.unwrap(), Applied::Reloaded);
        assert_eq!(
            k.apply("auth_pass Zq8Xw3Lp\n").await.unwrap(),
            Applied::Reloaded
        );
        assert!(!format!("{k:?}").contains("Zq8Xw3Lp"), "{k:?}");
        assert_eq!(k.apply("two\n").await.unwrap(), Applied::Reloaded);
        wait_for_text(&args, "HUP").await;
        let recorded = std::fs::read_to_string(&args).unwrap();
        assert!(recorded.contains("--use-file"), "{recorded}");
        assert!(recorded.contains("HUP"), "{recorded}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }

    /// Waits (up to 20 s) until `path` contains `text`; panics with what it holds otherwise.
    async fn wait_for_text(path: &std::path::Path, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = std::fs::read_to_string(path).unwrap_or_default();
            if got.contains(text) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never contained {text:?}: {got:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
