//! Harness for agent tests: real `firstboot run` processes, each in its own network namespace
//! (netns-lab) with its own simulated MicroK8s node (tests/microk8s-sim), all on one bridge.
//!
//! Per node a folder holds: `bin/{microk8s,dqlite,snap}` wrappers that set the simulator's
//! environment (the fake `snap install` also starts the node's simulator daemon, as snapd would
//! start the snap's services), `root/etc/machine-id` (the node's identity), `state/` (the
//! agent's state), `agent.log` and `daemon.log`. Every simulator command of every node goes to
//! one shared command log, which the tests read to check what the agents did.
//!
//! The binaries are the ones cargo built for this test run: `firstboot` (this crate) and
//! `microk8s`/`dqlite` (the microk8s-sim crate, built by `cargo test --workspace` or
//! `cargo build --workspace --bins`); a missing simulator is a loud failure.

#![allow(dead_code)]

pub mod keepalived;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns_lab::Lab;
use rackseed_host::command::{Cmd, Output};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;

pub const FIRSTBOOT: &str = env!("CARGO_BIN_EXE_firstboot");

/// The simulator binaries next to ours in the target directory.
pub fn sim_bin(name: &str) -> PathBuf {
    let p = Path::new(FIRSTBOOT).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the MicroK8s simulator first (cargo build -p microk8s-sim, or run the whole workspace's tests)",
        p.display()
    );
    p
}

/// The `imagebuilder` binary next to ours in the target directory; a missing one fails the
/// test naming how to build it.
pub fn imagebuilder_bin() -> PathBuf {
    let p = Path::new(FIRSTBOOT).with_file_name("imagebuilder");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p imagebuilder, or run the whole workspace's tests)",
        p.display()
    );
    p
}

/// How long one `imagebuilder` run of a test may take before it is killed.
pub const IMAGEBUILDER_BOUND: Duration = Duration::from_secs(120);

/// Runs `imagebuilder ARGS…` on lab host `host` ([`imagebuilder_bin`], at most
/// [`IMAGEBUILDER_BOUND`]).
pub fn imagebuilder_on(host: &netns_lab::Host, args: &[&std::ffi::OsStr]) -> Output {
    host.cmd(&imagebuilder_bin().to_string_lossy(), IMAGEBUILDER_BOUND)
        .args(args)
        .output_blocking()
        .expect("running imagebuilder")
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Settings shared by the nodes of one test cluster.
#[derive(Clone)]
pub struct ClusterSpec {
    pub control_plane: u8,
    pub expected_nodes: u32,
    pub formation_timeout: &'static str,
    /// Extra TOML appended to the `[addons]` section's siblings.
    pub addons_toml: String,
    /// Simulated join duration.
    pub join_delay_ms: u64,
    /// Simulated `microk8s enable` duration.
    pub enable_delay_ms: u64,
    /// Simulated `snap install microk8s` duration.
    pub install_delay_ms: u64,
    /// `--sim-join-timeout` for the agents (slot reclaim and takeover scale with it).
    pub join_timeout_s: u64,
    /// `cluster.join-parallelism`: worker joins at once.
    pub join_parallelism: u32,
    /// The simulator's heartbeat interval (a node is dead after 3 missed): short for the
    /// failure tests, the simulator's default 1 s for the scale runs, where every worker's
    /// heartbeat to every control-plane node is a TLS handshake on the one test machine.
    pub heartbeat_ms: u64,
    pub secret: ClusterSecret,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            control_plane: 3,
            expected_nodes: 3,
            formation_timeout: "2m",
            addons_toml: "[addons]\nstorage = \"none\"\n\n[addons.metallb]\naddresses = [\"10.231.0.240-10.231.0.250\", \"fd00::10-fd00::20\"]\n".into(),
            join_delay_ms: 300,
            enable_delay_ms: 0,
            install_delay_ms: 0,
            join_timeout_s: 20,
            join_parallelism: rackseed_config::DEFAULT_JOIN_PARALLELISM,
            heartbeat_ms: 300,
            secret: ClusterSecret::from_bytes([7; 32]),
        }
    }
}

/// One machine: namespace, simulator and agent.
pub struct AgentNode {
    pub index: usize,
    pub ns: String,
    pub addr: std::net::Ipv4Addr,
    pub dir: PathBuf,
    agent: Option<tokio::process::Child>,
}

/// A lab of agent nodes. Dropping it kills every agent and simulator daemon.
pub struct AgentCluster {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<AgentNode>,
    pub spec: ClusterSpec,
    pub log: PathBuf,
    pub rt: tokio::runtime::Runtime,
    started: Instant,
}

impl AgentCluster {
    /// Prepares `n` hosts (agents not started yet).
    pub fn new(n: usize, spec: ClusterSpec) -> AgentCluster {
        AgentCluster::after_spare_hosts(0, n, spec)
    }

    /// Prepares `n` agent nodes on lab hosts `spare..spare + n` of a lab of `spare + n` hosts;
    /// hosts `0..spare` (the lowest addresses) get no node and are the test's, e.g. for an
    /// attacker on the same bridge. Node `i` is `nodes[i]` on `lab.host(spare + i)`.
    pub fn after_spare_hosts(spare: usize, n: usize, spec: ClusterSpec) -> AgentCluster {
        let lab = Lab::new(spare + n).expect("network lab (needs root)");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("commands.jsonl");
        let secret_path = dir.path().join("cluster.secret");
        spec.secret.write_new(&secret_path).unwrap();
        let config = format!(
            "[cluster]\nname = \"agents\"\ncontrol-plane = {cp}\nexpected-nodes = {en}\nformation-timeout = \"{ft}\"\njoin-parallelism = {jp}\nstandbys = 0\nsecret-file = \"cluster.secret\"\n\n{addons}\n[network]\naddressing = \"dhcp\"\n\n[image]\ntarget = \"x86_64-efi\"\n\n[image.base]\nkind = \"local\"\npath = \"base.img\"\n",
            cp = spec.control_plane,
            en = spec.expected_nodes,
            ft = spec.formation_timeout,
            jp = spec.join_parallelism,
            addons = spec.addons_toml,
        );
        std::fs::write(dir.path().join("cluster.toml"), config).unwrap();
        let mut c = AgentCluster {
            lab,
            dir,
            nodes: Vec::new(),
            spec,
            log,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            started: Instant::now(),
        };
        for i in 0..n {
            c.prepare_node(i, spare + i);
        }
        c
    }

    fn prepare_node(&mut self, i: usize, lab_host: usize) {
        let host = self.lab.host(lab_host).clone();
        let dir = self.dir.path().join(format!("node-{i}"));
        for sub in ["bin", "etc", "root/etc", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("root/etc/machine-id"),
            format!("{:032x}\n", 0xabc0_0000u64 + i as u64 * 7919),
        )
        .unwrap();
        let sim = sim_bin("microk8s");
        let dqlite = sim_bin("dqlite");
        let env = format!(
            "export MICROK8S_SIM_STATE='{state}' MICROK8S_SIM_NODE='node-{i}' MICROK8S_SIM_LOG='{log}' \
             MICROK8S_SIM_LAUNCH_CONFIG='{lc}' MICROK8S_SIM_HEARTBEAT_MS={hb} \
             MICROK8S_SIM_CONNECT_TIMEOUT_MS=1500 MICROK8S_SIM_JOIN_DELAY_MS={jd} MICROK8S_SIM_ENABLE_DELAY_MS={ed} MICROK8S_SIM_INSTALL_DELAY_MS={id} MICROK8S_SIM_IP={ip}\n",
            state = dir.join("sim").display(),
            log = self.log.display(),
            lc = dir.join("etc/microk8s.yaml").display(),
            jd = self.spec.join_delay_ms,
            hb = self.spec.heartbeat_ms,
            ed = self.spec.enable_delay_ms,
            id = self.spec.install_delay_ms,
            ip = host.addr,
        );
        write_exec(
            &dir.join("bin/microk8s"),
            &format!("#!/bin/sh\n{env}exec '{}' \"$@\"\n", sim.display()),
        );
        write_exec(
            &dir.join("bin/dqlite"),
            &format!("#!/bin/sh\n{env}exec '{}' \"$@\"\n", dqlite.display()),
        );
        // The fake snapd: after a successful install, start the node's MicroK8s services.
        write_exec(
            &dir.join("bin/snap"),
            &format!(
                "#!/bin/sh\n{env}'{sim}' sim-snap \"$@\" || exit $?\n\
                 if [ \"$1\" = install ] && [ ! -s '{pid}' ]; then\n\
                 setsid '{sim}' sim-daemon >>'{dlog}' 2>&1 </dev/null &\n\
                 echo $! > '{pid}'\nfi\n",
                sim = sim.display(),
                pid = dir.join("daemon.pid").display(),
                dlog = dir.join("daemon.log").display(),
            ),
        );
        self.nodes.push(AgentNode {
            index: i,
            ns: host.ns.clone(),
            addr: host.addr,
            dir,
            agent: None,
        });
    }

    /// Starts (or restarts) node `i`'s agent.
    pub fn start(&mut self, i: usize) {
        let cfg = self.dir.path().join("cluster.toml");
        self.start_with_config(i, &cfg);
    }

    /// Starts node `i`'s agent with another config file (e.g. another secret).
    pub fn start_with_config(&mut self, i: usize, cfg: &Path) {
        let cmd = self.agent_command(i, cfg);
        self.spawn_agent(i, cmd);
    }

    /// Node `i`'s `firstboot run` command line with the config `cfg`, run in its namespace
    /// against its own simulated MicroK8s, state and root folders. Callers add arguments
    /// (e.g. `--keepalived-bin`) and start it with [`AgentCluster::spawn_agent`].
    pub fn agent_command(&self, i: usize, cfg: &Path) -> Cmd {
        let node = &self.nodes[i];
        let d = &node.dir;
        Cmd::new("ip", Duration::from_secs(1))
            .args(["netns", "exec", &node.ns])
            .arg(FIRSTBOOT)
            .args(["-v", "run", "--no-hostname", "--listen", "0.0.0.0:7443"])
            .arg("--config")
            .arg(cfg)
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--microk8s-bin")
            .arg(d.join("bin/microk8s"))
            .arg("--snap-bin")
            .arg(d.join("bin/snap"))
            .arg("--dqlite-bin")
            .arg(d.join("bin/dqlite"))
            .arg("--launch-config")
            .arg(d.join("etc/microk8s.yaml"))
            // The simulator's $SNAP_DATA is its state folder's parent.
            .arg("--cluster-agent-cert")
            .arg(d.join("certs/server.crt"))
            .args(["--sim-join-timeout", &self.spec.join_timeout_s.to_string()])
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/nonexistent/rackseed-test-bus",
            )
            .env(
                "RUST_LOG",
                std::env::var("RACKSEED_AGENT_LOG")
                    .unwrap_or_else(|_| "info,firstboot=debug,rackseed_host::command=info".into()),
            )
            .env("NO_COLOR", "1")
    }

    /// Starts `cmd` (from [`AgentCluster::agent_command`]) as node `i`'s agent, its output
    /// appended to the node's `agent.log`.
    pub fn spawn_agent(&mut self, i: usize, cmd: Cmd) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("agent.log"))
            .unwrap();
        let _guard = self.rt.enter();
        let child = cmd
            .spawn_with(log.try_clone().unwrap(), log)
            .expect("starting firstboot");
        node.agent = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// kill -9 of node `i`'s agent (its MicroK8s keeps running, as after a crash of the
    /// service). Returns whether it was running.
    pub fn kill_agent(&mut self, i: usize) -> bool {
        let Some(mut child) = self.nodes[i].agent.take() else {
            return false;
        };
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _guard = self.rt.enter();
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        });
        true
    }

    /// kill -9 of node `i`'s simulated MicroK8s (the machine is off); its pid file is removed,
    /// so a later start writes a new one. Returns whether one was running.
    pub fn kill_microk8s(&self, i: usize) -> bool {
        let pid_file = self.nodes[i].dir.join("daemon.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            return false;
        };
        let killed = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_file(&pid_file);
        killed.is_ok()
    }

    /// SIGTERM and wait (clean stop).
    pub fn stop_agent(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes[i].agent.take()?;
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(15), child.wait()).await })
            .ok()
            .and_then(|r| r.ok())
    }

    /// Whether node `i`'s persisted formation phase is `member`.
    pub fn persisted_member(&self, i: usize) -> bool {
        std::fs::read_to_string(self.nodes[i].dir.join("state/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["phase"]["phase"] == "member")
    }

    /// Whether some node's persisted addon progress shows every addon enabled.
    pub fn addons_enabled_somewhere(&self) -> bool {
        self.nodes.iter().any(|n| {
            std::fs::read_to_string(n.dir.join("state/addons.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    v["addons"].as_array().map(|a| {
                        !a.is_empty() && a.iter().all(|r| r["state"]["state"] == "enabled")
                    })
                })
                .unwrap_or(false)
        })
    }

    /// Peak resident memory (VmHWM) of node `i`'s running agent, in KiB.
    pub fn agent_peak_rss_kib(&self, i: usize) -> Option<u64> {
        let pid = self.nodes[i].agent.as_ref()?.id()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// CPU time node `i`'s agent used so far, in seconds: (its own, with the children it
    /// waited for, e.g. `microk8s status` polls). From `/proc/PID/stat` (USER_HZ = 100).
    pub fn agent_cpu_seconds(&self, i: usize) -> Option<(f64, f64)> {
        let pid = self.nodes[i].agent.as_ref()?.id()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3.
        let rest = text.rsplit_once(')')?.1;
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime, stime, cutime, cstime are fields 14-17, i.e. 11-14 after ')'.
        let own = (f.get(11)? + f.get(12)?) as f64 / 100.0;
        let children = (f.get(13)? + f.get(14)?) as f64 / 100.0;
        Some((own, own + children))
    }

    /// Node `i`'s agent's resident set now (VmRSS), in KiB.
    pub fn agent_rss_kib(&self, i: usize) -> Option<u64> {
        let pid = self.nodes[i].agent.as_ref()?.id()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// The status document of node `i` (`firstboot status --json` run in its namespace).
    pub fn status(&self, i: usize) -> Option<StatusDoc> {
        let node = &self.nodes[i];
        let out = Cmd::new("ip", Duration::from_secs(15))
            .args(["netns", "exec", &node.ns])
            .arg(FIRSTBOOT)
            .args(["status", "--json", "--port", "7443"])
            .arg("--config")
            .arg(self.dir.path().join("cluster.toml"))
            .arg("--state-dir")
            .arg(node.dir.join("state"))
            .output_blocking()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let doc: StatusDoc = serde_json::from_str(&out.stdout).ok()?;
        // A document rebuilt from the state file (agent down) has no node id.
        (!doc.node_id.is_empty()).then_some(doc)
    }

    /// Forms an ordinary cluster of `n` control-plane nodes (no attacker, no faults): the
    /// seconds from starting the agents to HA, the reference an attack test compares with.
    pub fn formation_seconds(n: usize, timeout: Duration) -> f64 {
        let mut c = AgentCluster::new(n, ClusterSpec::default());
        let t = Instant::now();
        c.start_all();
        c.wait_formed(&(0..n).collect::<Vec<_>>(), n.min(3), timeout);
        t.elapsed().as_secs_f64()
    }

    /// Waits until every node in `which` is a member and reports HA with `voters` voters.
    pub fn wait_formed(&self, which: &[usize], voters: usize, timeout: Duration) -> Vec<StatusDoc> {
        let deadline = Instant::now() + timeout;
        loop {
            let docs: Vec<Option<StatusDoc>> = which.iter().map(|&i| self.status(i)).collect();
            let done = docs.iter().all(|d| {
                d.as_ref().is_some_and(|d| {
                    d.phase == "member"
                        && d.microk8s.as_ref().is_some_and(|m| {
                            m.voters.len() == voters || m.note.as_deref() == Some("worker node")
                        })
                })
            });
            if done {
                return docs.into_iter().map(Option::unwrap).collect();
            }
            if Instant::now() > deadline {
                self.dump();
                panic!(
                    "cluster did not form within {timeout:?}; phases: {:?}",
                    docs.iter()
                        .map(|d| d.as_ref().map(|d| (d.phase.clone(), d.role.clone())))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Seconds since the cluster object was made.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Prints the tail of every agent and daemon log (on failure).
    pub fn dump(&self) {
        for n in &self.nodes {
            for f in ["agent.log", "daemon.log"] {
                let text = std::fs::read_to_string(n.dir.join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(25)..];
                eprintln!("---- node-{} {f} (last {} lines)", n.index, tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }

    /// Every simulator command record, in order.
    pub fn commands(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for AgentCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
        }
        // For profiling: `RACKSEED_KEEP_LOGS=<dir>` keeps the agent logs and the command log.
        if let Some(keep) = std::env::var_os("RACKSEED_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(&self.log, keep.join("commands.jsonl"));
            for n in &self.nodes {
                let _ = std::fs::copy(
                    n.dir.join("agent.log"),
                    keep.join(format!("node-{}.log", n.index)),
                );
            }
        }
        for n in &self.nodes {
            if let Ok(pid) = std::fs::read_to_string(n.dir.join("daemon.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// The argv of one command-log record.
pub fn argv(r: &serde_json::Value) -> Vec<String> {
    r["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the simulator's command log with the default join parallelism: see
/// [`check_command_log_with`].
pub fn check_command_log(records: &[serde_json::Value]) -> Result<(), String> {
    check_command_log_with(records, rackseed_config::DEFAULT_JOIN_PARALLELISM as usize)
}

/// Checks the simulator's command log: a control-plane join never overlapped another join, a
/// worker join never overlapped a control-plane join, never more than `parallelism` joins at
/// once; never by hostname, never with `--controlplane`.
pub fn check_command_log_with(
    records: &[serde_json::Value],
    parallelism: usize,
) -> Result<(), String> {
    // key (node/pid) -> is a worker join
    let mut open: std::collections::BTreeMap<String, bool> = Default::default();
    for r in records {
        let argv = argv(r);
        if r["program"] != "microk8s" || argv.first().map(String::as_str) != Some("join") {
            continue;
        }
        if argv.iter().any(|a| a == "--controlplane") {
            return Err(format!("a join used --controlplane: {argv:?}"));
        }
        let url = argv.get(1).cloned().unwrap_or_default();
        let host = url.split(':').next().unwrap_or_default();
        if host.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("a join did not use an IP literal: {url}"));
        }
        let key = format!("{}/{}", r["node"], r["pid"]);
        let worker = argv.iter().any(|a| a == "--worker");
        match r["event"].as_str() {
            Some("start") => {
                let clash = open.iter().find(|(_, w)| !worker || !**w);
                if let Some((other, w)) = clash {
                    return Err(format!(
                        "join {key} (worker: {worker}) started while join {other} (worker: {w}) was running"
                    ));
                }
                if open.len() + 1 > parallelism {
                    return Err(format!(
                        "join {key} made {} joins at once, limit {parallelism}",
                        open.len() + 1
                    ));
                }
                open.insert(key, worker);
            }
            Some("end") => {
                open.remove(&key);
            }
            _ => {}
        }
    }
    Ok(())
}
