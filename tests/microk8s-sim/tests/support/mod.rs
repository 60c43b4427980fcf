//! Harness for the adapter-against-simulator tests: one simulated MicroK8s node per network
//! namespace of a `netns_lab::Lab`, driven by firstboot's real adapter (`RealMicrok8s`) through
//! the one command runner.
//!
//! Each node gets a folder with wrapper scripts that set the simulator's environment and exec
//! the simulator binaries (like the snap's own `/snap/bin/microk8s` wrapper): `bin/microk8s`,
//! `bin/dqlite` and `bin/snap` (the simulator's fake snap). The adapter is configured with those
//! paths and its launch config path under the node's folder; it runs on a thread that entered
//! the node's namespace, so its children (the CLI) talk to that node's daemon over loopback and
//! joins cross the lab bridge. The daemon (`microk8s sim-daemon`) is started with
//! `ip netns exec` and killed when the node is dropped or [`SimNode::kill`] is called.

#![allow(dead_code)]

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use firstboot::system::microk8s::{
    InstallSource, Microk8s, RealMicrok8s, RealMicrok8sConfig, Status,
};
use netns_lab::{Host, Lab};
use rackseed_host::command::Output;
use rackseed_protocol::secret::ClusterSecret;

pub const SIM: &str = env!("CARGO_BIN_EXE_microk8s");
pub const DQLITE: &str = env!("CARGO_BIN_EXE_dqlite");
pub const HEARTBEAT_MS: u64 = 200;

/// How long one CLI run of [`mk`] may take before it is killed (the test then fails).
pub const CLI_BOUND: Duration = Duration::from_secs(60);

/// Runs `microk8s ARGS…` (the node's wrapper) in `node`'s namespace, at most [`CLI_BOUND`].
pub fn mk(node: &SimNode, args: &[&str]) -> Output {
    node.host
        .cmd(&node.dir.join("bin/microk8s").to_string_lossy(), CLI_BOUND)
        .args(args)
        .output_blocking()
        .expect("running the simulator")
}

/// A fixed cluster secret for the tests.
pub fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes([42; 32])
}

/// One simulated node.
pub struct SimNode {
    pub name: String,
    pub host: Host,
    pub dir: PathBuf,
    pub adapter: RealMicrok8s,
    daemon: Option<tokio::process::Child>,
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl SimNode {
    /// Prepares node `i` of `lab` under `root`, logging commands to `log`; `extra_env` adds
    /// simulator settings (e.g. delays).
    pub fn new(lab: &Lab, i: usize, root: &Path, log: &Path, extra_env: &[(&str, &str)]) -> Self {
        let name = format!("node-{i}");
        let dir = root.join(&name);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let mut env = format!(
            "export MICROK8S_SIM_STATE='{state}' MICROK8S_SIM_NODE='{name}' MICROK8S_SIM_LOG='{log}' \
             MICROK8S_SIM_LAUNCH_CONFIG='{lc}' MICROK8S_SIM_HEARTBEAT_MS={HEARTBEAT_MS} \
             MICROK8S_SIM_CONNECT_TIMEOUT_MS=1500\n",
            state = dir.join("state").display(),
            log = log.display(),
            lc = dir.join("etc/microk8s.yaml").display(),
        );
        for (k, v) in extra_env {
            env.push_str(&format!("export {k}='{v}'\n"));
        }
        write_exec(
            &dir.join("bin/microk8s"),
            &format!("#!/bin/sh\n{env}exec '{SIM}' \"$@\"\n"),
        );
        write_exec(
            &dir.join("bin/dqlite"),
            &format!("#!/bin/sh\n{env}exec '{DQLITE}' \"$@\"\n"),
        );
        write_exec(
            &dir.join("bin/snap"),
            &format!("#!/bin/sh\n{env}exec '{SIM}' sim-snap \"$@\"\n"),
        );
        let config = RealMicrok8sConfig {
            binary: dir.join("bin/microk8s"),
            snap: dir.join("bin/snap"),
            dqlite: dir.join("bin/dqlite"),
            launch_config: dir.join("etc/microk8s.yaml"),
            // `$SNAP_DATA` is the parent of the state folder.
            cluster_agent_cert: dir.join("certs/server.crt"),
            install_timeout: Duration::from_secs(30),
            join_timeout: Duration::from_secs(40),
            enable_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(15),
            ..RealMicrok8sConfig::default()
        };
        SimNode {
            name,
            host: lab.host(i).clone(),
            dir,
            adapter: RealMicrok8s::new(config),
            daemon: None,
        }
    }

    /// Runs an async operation on a thread inside this node's namespace.
    pub fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(RealMicrok8s) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let adapter = self.adapter.clone();
        self.host
            .spawn_thread(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(f(adapter)))
            })
            .join()
            .expect("the namespace thread panicked")
            .expect("entering the namespace")
    }

    /// Starts the node's daemon (what snapd does after install). Needs a tokio runtime context.
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let child = self
            .host
            .cmd(
                &self.dir.join("bin/microk8s").to_string_lossy(),
                Duration::from_secs(1),
            )
            .arg("sim-daemon")
            .spawn_with(log.try_clone().unwrap(), log)
            .expect("starting the simulator daemon");
        self.daemon = Some(child);
    }

    /// Kills the node's daemon, as if the machine died.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.start_kill();
        }
    }

    /// SIGTERM to the node's daemon (a clean stop, as systemd's), then waits up to `bound` for
    /// it to exit. Returns whether it exited.
    pub fn terminate(&mut self, bound: Duration) -> bool {
        let Some(mut c) = self.daemon.take() else {
            return false;
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.start_kill();
        false
    }

    /// Installs through the adapter and starts the daemon, then waits until ready.
    pub fn install_and_start(&mut self) {
        let out = self.run(|a| async move {
            a.install(&InstallSource::Channel("1.32/stable".into()), &secret())
                .await
        });
        out.expect("install");
        self.start();
        let ready = self.run(|a| async move { a.wait_ready(Duration::from_secs(15)).await });
        assert!(
            ready.expect("wait_ready"),
            "{} not ready; daemon log: {}",
            self.name,
            self.daemon_log()
        );
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Status {
        self.run(|a| async move { a.status().await })
            .expect("status")
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A runtime for spawning daemons (their `Child` handles need one).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The command log's records.
pub fn log_records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("command log lines are json"))
        .collect()
}

/// (node, start, end) of every `microk8s join` in the log.
pub fn join_intervals(log: &Path) -> Vec<(String, u64, u64)> {
    let recs = log_records(log);
    let mut out = Vec::new();
    for r in &recs {
        if r["program"] == "microk8s" && r["argv"][0] == "join" && r["event"] == "start" {
            let end = recs
                .iter()
                .find(|e| e["event"] == "end" && e["pid"] == r["pid"] && e["argv"] == r["argv"])
                .expect("every join has an end record");
            out.push((
                r["node"].as_str().unwrap().to_owned(),
                r["ts_ms"].as_u64().unwrap(),
                end["ts_ms"].as_u64().unwrap(),
            ));
        }
    }
    out
}
