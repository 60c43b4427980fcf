//! How the drill kills the node it chose. Three ways, one trait ([`Killer`]):
//! - [`QemuKiller`]: a VM of a QEMU test cluster (`imagebuilder qemu up`), hard-killed as
//!   `imagebuilder qemu kill` does (QMP `quit`, SIGKILL if that does not end it). The VM is
//!   the one whose management forward served the chosen node's status document
//!   ([`super::on_qemu`]);
//! - [`AgentKiller`]: a real node, asked over its authenticated coordinator (pinned TLS,
//!   the cluster secret's challenge-response, a single-use nonce) to cut itself off
//!   (`POST /v1/drill`: stop MicroK8s and take its network down for a while, or power off;
//!   `firstboot`'s `driver::drill` says exactly what it runs);
//! - [`CommandKiller`]: a program of the user's (`--kill-with PROGRAM`), run as
//!   `PROGRAM NODE_ID ADDRESS`, e.g. a script that switches a PDU outlet off; exit 0 means
//!   the node is dead. The tests use it to kill a network-namespace node's processes.
//!
//! To add a way: implement [`Killer`] and choose it in `drill::run_cli`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_host::command::Cmd;
use rackseed_protocol::coordinator::drill::DRILL_GRACE;
use rackseed_protocol::coordinator::{CoordinatorClient, CutOff};

/// The node to kill, as the drill found it.
#[derive(Debug, Clone)]
pub struct Victim {
    pub node_id: String,
    pub hostname: String,
    pub address: Option<std::net::IpAddr>,
    /// Its coordinator (address and port) and certificate fingerprint.
    pub coordinator: Option<(SocketAddr, String)>,
}

/// What a kill did: when it began (the drill measures from there: the node may stop serving
/// at once, and others may take over before a slow kill returns), in words.
#[derive(Debug, Clone)]
pub struct Killed {
    pub at: Instant,
    pub detail: String,
}

pub type KillFuture<'a> = Pin<Box<dyn Future<Output = Result<Killed>> + Send + 'a>>;

/// A way of killing a node.
pub trait Killer: Send + Sync {
    /// Its name for the report.
    fn name(&self) -> String;
    /// What it will do to `v`, for the confirmation question.
    fn describe(&self, v: &Victim) -> String;
    /// Whether it needs the person's confirmation (it acts on real machines).
    fn needs_confirmation(&self) -> bool;
    fn kill<'a>(&'a self, v: &'a Victim) -> KillFuture<'a>;
}

/// Kills a QEMU test-cluster VM.
pub struct QemuKiller {
    pub dir: PathBuf,
    pub vm: String,
}

impl Killer for QemuKiller {
    fn name(&self) -> String {
        format!("QEMU kill of VM {}", self.vm)
    }
    fn describe(&self, v: &Victim) -> String {
        format!(
            "hard-kill VM {} (node {}) of the QEMU test cluster in {}",
            self.vm,
            v.node_id,
            self.dir.display()
        )
    }
    fn needs_confirmation(&self) -> bool {
        false
    }
    fn kill<'a>(&'a self, _v: &'a Victim) -> KillFuture<'a> {
        Box::pin(async move {
            let mut cluster = qemu::Cluster::open(&self.dir)?;
            let began = Instant::now();
            let was_running = cluster.kill(&self.vm).await?;
            if !was_running {
                bail!("VM {} was not running", self.vm);
            }
            Ok(Killed {
                at: began,
                detail: format!("VM {} hard-killed (QMP quit / SIGKILL)", self.vm),
            })
        })
    }
}

/// Asks a real node to cut itself off.
pub struct AgentKiller {
    pub client: CoordinatorClient,
    /// `None`: power off; else isolate for this long.
    pub isolate_for: Option<Duration>,
}

impl AgentKiller {
    fn cut(&self, v: &Victim) -> CutOff {
        match self.isolate_for {
            Some(d) => CutOff::Isolate {
                node_id: v.node_id.clone(),
                restore_after_s: d.as_secs(),
            },
            None => CutOff::PowerOff {
                node_id: v.node_id.clone(),
            },
        }
    }
}

impl Killer for AgentKiller {
    fn name(&self) -> String {
        match self.isolate_for {
            Some(d) => format!(
                "the node's agent (isolate for {})",
                humantime::format_duration(d)
            ),
            None => "the node's agent (power off)".into(),
        }
    }
    fn describe(&self, v: &Victim) -> String {
        match self.isolate_for {
            Some(d) => format!(
                "ask node {} ({}) to run `microk8s stop` and take its network interfaces down; it brings them up and runs `microk8s start` after {}",
                v.node_id,
                v.hostname,
                humantime::format_duration(d)
            ),
            None => format!(
                "ask node {} ({}) to power off (`systemctl poweroff`); it stays off until someone powers it on",
                v.node_id, v.hostname
            ),
        }
    }
    fn needs_confirmation(&self) -> bool {
        true
    }
    fn kill<'a>(&'a self, v: &'a Victim) -> KillFuture<'a> {
        Box::pin(async move {
            let Some((addr, fp)) = &v.coordinator else {
                bail!("node {} announces no coordinator to ask", v.node_id);
            };
            let ack = self
                .client
                .drill(*addr, fp, &self.cut(v))
                .await
                .with_context(|| format!("asking node {} to cut itself off", v.node_id))?;
            let at = Instant::now() + DRILL_GRACE;
            tokio::time::sleep_until(at.into()).await;
            Ok(Killed {
                at,
                detail: format!("node {} runs: {}", ack.node_id, ack.steps.join("; ")),
            })
        })
    }
}

/// Runs the user's program.
pub struct CommandKiller {
    pub program: PathBuf,
}

impl Killer for CommandKiller {
    fn name(&self) -> String {
        format!("{}", self.program.display())
    }
    fn describe(&self, v: &Victim) -> String {
        format!(
            "run `{} {} {}` to kill it",
            self.program.display(),
            v.node_id,
            v.address.map(|a| a.to_string()).unwrap_or_default()
        )
    }
    fn needs_confirmation(&self) -> bool {
        true
    }
    fn kill<'a>(&'a self, v: &'a Victim) -> KillFuture<'a> {
        Box::pin(async move {
            let addr = v.address.map(|a| a.to_string()).unwrap_or_default();
            // The node may stop serving as soon as the program starts (and others may take
            // over while it still runs): the recovery is timed from the start, and the report
            // says how long the program took.
            let began = Instant::now();
            Cmd::new(&self.program, Duration::from_secs(60))
                .arg(&v.node_id)
                .arg(&addr)
                .run()
                .await
                .with_context(|| {
                    format!("killing node {} with {}", v.node_id, self.program.display())
                })?;
            Ok(Killed {
                at: began,
                detail: format!(
                    "`{} {} {addr}` exited 0 after {:.1} s (times are counted from its start)",
                    self.program.display(),
                    v.node_id,
                    began.elapsed().as_secs_f64()
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A kill program that takes a while (a node's processes killed one by one, then its
    /// addresses): the node stops serving when the program starts, and another node may have
    /// taken over before it returns, so the drill's clock starts with the program, not after.
    #[tokio::test]
    async fn a_slow_kill_program_is_timed_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("kill-node");
        std::fs::write(
            &program,
            "#!/bin/sh\nsleep 1.5\necho \"$1 $2\" > \"$0.log\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = Victim {
            node_id: "n1".into(),
            hostname: "node-1".into(),
            address: Some("10.231.0.2".parse().unwrap()),
            coordinator: None,
        };
        let before = Instant::now();
        let killed = CommandKiller { program }.kill(&victim).await.unwrap();
        let returned = Instant::now();
        assert!(returned.duration_since(before) >= Duration::from_millis(1500));
        assert!(
            killed.at.duration_since(before) < Duration::from_millis(500),
            "timed from the start of the program, not its end"
        );
        assert!(
            killed.detail.contains("exited 0 after"),
            "{}",
            killed.detail
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("kill-node.log")).unwrap(),
            "n1 10.231.0.2\n"
        );
    }
}
