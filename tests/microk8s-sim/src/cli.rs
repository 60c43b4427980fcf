//! The `microk8s` and `dqlite` entry points of the simulator.
//!
//! Every invocation is appended to the command log (`MICROK8S_SIM_LOG`, JSON lines: `ts_ms`,
//! `node`, `pid`, `event` = `start`|`end`, `argv` with join tokens redacted, `exit` on `end`) and
//! then, except for the `sim-*` commands, forwarded to the local daemon over loopback. When the
//! daemon is not running, MicroK8s is "stopped": `status` prints "microk8s is not running, try
//! microk8s start" and exits 0 (A5), everything else exits 1, except `config`, which only reads
//! files (as the snap's wrapper) and runs here whether or not the daemon runs.
//!
//! Simulator-only commands: `sim-daemon` (run the node), `sim-install` (what the snap's install
//! hook does: read the launch config, A8) and `sim-snap ARGS` (a fake `snap` CLI: `list`, `ack`,
//! `install microk8s --classic --channel=…`, `install ./x.snap [--classic]`). To add one, match
//! it in [`microk8s_main`].

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::daemon::{self, Installed, LaunchAddon, Out, STOPPED_MSG};
use crate::{now_ms, SimEnv};

/// Replaces secrets in an argv for the log: the token (and fingerprint) of a join URL, and
/// `add-node --token` values.
pub fn redact(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut next_secret = false;
    for a in argv {
        if next_secret {
            out.push("<redacted>".into());
            next_secret = false;
            continue;
        }
        if a == "-t" || a == "--token" {
            next_secret = argv.first().map(String::as_str) == Some("add-node");
            out.push(a.clone());
            continue;
        }
        match a.split_once('/') {
            Some((host, _)) if argv.first().map(String::as_str) == Some("join") => {
                out.push(format!("{host}/<redacted>"))
            }
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Appends one record to the command log; failures go to stderr, never abort the command.
pub fn log_event(env: &SimEnv, program: &str, argv: &[String], event: &str, exit: Option<i32>) {
    let mut rec = json!({
        "ts_ms": now_ms(),
        "node": env.node,
        "pid": std::process::id(),
        "program": program,
        "event": event,
        "argv": redact(argv),
    });
    if let Some(code) = exit {
        rec["exit"] = json!(code);
    }
    let line = format!("{rec}\n");
    if let Some(dir) = env.log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&env.log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        eprintln!(
            "microk8s-sim: writing command log {}: {e}",
            env.log.display()
        );
    }
}

fn print(out: &Out) -> i32 {
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    let _ = std::io::stdout().flush();
    out.code
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

async fn forward(env: &SimEnv, argv: Vec<String>) -> Option<Out> {
    let addr = SocketAddr::from(([127, 0, 0, 1], env.port));
    let body = json!({ "argv": argv });
    match crate::http::request(
        addr,
        None,
        "POST",
        "/local/run",
        Some(&body),
        Duration::from_secs(2),
        Duration::from_secs(24 * 3600),
    )
    .await
    {
        Ok((200, v)) => serde_json::from_value(v).ok(),
        Ok((s, v)) => Some(Out {
            code: 1,
            stdout: String::new(),
            stderr: format!("microk8s-sim: local agent answered {s}: {v}\n"),
        }),
        Err(crate::http::ClientError::Connect(_))
        | Err(crate::http::ClientError::ConnectTimeout) => None,
        Err(e) => Some(Out {
            code: 1,
            stdout: String::new(),
            stderr: format!("microk8s-sim: talking to the local agent: {e}\n"),
        }),
    }
}

/// `microk8s ARGS…`; returns the exit code.
pub fn microk8s_main(argv: Vec<String>) -> i32 {
    let env = match SimEnv::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("microk8s-sim: {e:#}");
            return 2;
        }
    };
    match argv.first().map(String::as_str) {
        Some("sim-daemon") => {
            return match runtime().block_on(daemon::run(env)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("microk8s-sim: {e:#}");
                    1
                }
            }
        }
        Some("sim-snap") => {
            log_event(&env, "snap", &argv[1..], "start", None);
            let out = runtime().block_on(fake_snap(&env, &argv[1..]));
            log_event(&env, "snap", &argv[1..], "end", Some(out.code));
            return print(&out);
        }
        Some("sim-install") => {
            return match runtime().block_on(install(&env)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("microk8s-sim: {e:#}");
                    1
                }
            }
        }
        None | Some("--help" | "-h" | "help") => {
            println!("Usage: microk8s [command] [args]\n\nThe MicroK8s simulator (test-only). Commands: status, add-node, join, enable, disable, leave, stop, remove-node, kubectl get nodes, config, sim-daemon, sim-install, sim-snap.");
            return 0;
        }
        _ => {}
    }
    log_event(&env, "microk8s", &argv, "start", None);
    if argv.first().map(String::as_str) == Some("dbctl") {
        let fwd = |a: Vec<String>| runtime().block_on(forward(&env, a));
        let out = daemon::dbctl_main(&env, &argv[1..], &fwd);
        log_event(&env, "microk8s", &argv, "end", Some(out.code));
        return print(&out);
    }
    if argv.first().map(String::as_str) == Some("config") {
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let out = daemon::cmd_config(&env, &args);
        log_event(&env, "microk8s", &argv, "end", Some(out.code));
        return print(&out);
    }
    let out = runtime()
        .block_on(forward(&env, argv.clone()))
        .unwrap_or_else(|| {
            if argv.first().map(String::as_str) == Some("status") {
                Out {
                    code: 0,
                    stdout: STOPPED_MSG.into(),
                    stderr: String::new(),
                }
            } else {
                Out {
                    code: 1,
                    stdout: STOPPED_MSG.into(),
                    stderr: String::new(),
                }
            }
        });
    log_event(&env, "microk8s", &argv, "end", Some(out.code));
    print(&out)
}

/// The snap's `bin/dqlite` client: only the `.cluster` query is simulated.
pub fn dqlite_main(argv: Vec<String>) -> i32 {
    let env = match SimEnv::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("microk8s-sim: {e:#}");
            return 2;
        }
    };
    log_event(&env, "dqlite", &argv, "start", None);
    let mut fwd = vec!["__dqlite".to_owned()];
    fwd.extend(argv.iter().cloned());
    let out = runtime()
        .block_on(forward(&env, fwd))
        .unwrap_or_else(|| Out {
            code: 1,
            stdout: String::new(),
            stderr: "Error: dial tcp 127.0.0.1:19001: connect: connection refused\n".into(),
        });
    log_event(&env, "dqlite", &argv, "end", Some(out.code));
    print(&out)
}

/// What the snap's install hook does with the launch configuration (A8): the first file found
/// (here only `MICROK8S_SIM_LAUNCH_CONFIG`, else the bundled default) is copied to
/// `launcher/install.yaml` and pre-init takes `persistentClusterToken`; addons are applied later
/// by the running agent. The cluster agent's certificate and key are generated into
/// `$SNAP_DATA/certs` (A1).
pub async fn install(env: &SimEnv) -> Result<()> {
    std::fs::create_dir_all(&env.state_dir)
        .with_context(|| format!("creating {}", env.state_dir.display()))?;
    let text = match std::fs::read_to_string(&env.launch_config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The bundled default (A8).
            "version: 0.1.0\naddons:\n  - name: dns\nextraKubeletArgs:\n  --cluster-domain: cluster.local\n  --cluster-dns: 10.152.183.10\n".into()
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", env.launch_config.display()))
        }
    };
    let mut token = None;
    let mut addons: Vec<LaunchAddon> = Vec::new();
    let mut kubelet_args = std::collections::BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).with_context(|| {
            format!(
                "parsing launch configuration {}",
                env.launch_config.display()
            )
        })?;
        if v.is_null() {
            continue;
        }
        let map = v.as_mapping().with_context(|| {
            format!(
                "launch configuration {} is not a mapping",
                env.launch_config.display()
            )
        })?;
        for (k, val) in map {
            match k.as_str().unwrap_or_default() {
                "version" => {}
                "persistentClusterToken" => {
                    let t = val
                        .as_str()
                        .context("persistentClusterToken is not a string")?;
                    if t.len() < 32 {
                        bail!("persistentClusterToken must be at least 32 characters");
                    }
                    token = Some(t.to_owned());
                }
                "addons" => {
                    addons = serde_yaml::from_value(val.clone()).context("parsing addons")?;
                }
                "extraKubeletArgs" => {
                    kubelet_args =
                        serde_yaml::from_value(val.clone()).context("parsing extraKubeletArgs")?;
                }
                other => eprintln!(
                    "microk8s-sim: launch configuration field {other:?} is not simulated (warning)"
                ),
            }
        }
    }
    let launcher = env.state_dir.join("launcher");
    std::fs::create_dir_all(&launcher)?;
    crate::state_file::write_atomic(&launcher.join("install.yaml"), text.as_bytes(), 0o600)?;
    tokio::time::sleep(env.install_delay).await;
    // The agent's TLS certificate, before installed.json, which marks the install done.
    let cert = crate::agent_cert::generate_and_write(&env.snap_data)?;
    // Pre-init puts the launch config's token where the agent reads it (AddPersistentClusterToken).
    if let Some(t) = &token {
        crate::credentials::add_persistent_token(&env.snap_data, t)?;
    }
    daemon::write_json(
        &daemon::installed_path(env),
        &Installed {
            name: env.node.clone(),
            persistent_token: token,
            cert_hex: hex::encode(cert),
            addons,
            kubelet_args,
        },
    )
}

/// A fake `snap` CLI, enough for the adapter's install paths.
pub async fn fake_snap(env: &SimEnv, args: &[String]) -> Out {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let installed = daemon::installed_path(env).exists();
    match a.as_slice() {
        ["list", "microk8s"] => {
            if installed {
                Out {
                    code: 0,
                    stdout: "Name      Version  Rev   Tracking     Publisher   Notes\nmicrok8s  v1.32.3  7964  1.32/stable  canonical✓  classic\n".into(),
                    stderr: String::new(),
                }
            } else {
                snap_fail("error: no matching snaps installed\n".into())
            }
        }
        // snapd has nothing to seed here.
        ["wait", "system", "seed.loaded"] => Out {
            code: 0,
            stdout: String::new(),
            stderr: String::new(),
        },
        ["ack", file] => snap_ack(env, file),
        ["install", rest @ ..] => snap_install(env, rest, installed).await,
        _ => snap_fail(format!(
            "error: the simulator's snap does not support: snap {}\n",
            a.join(" ")
        )),
    }
}

/// The file where the fake `snap ack` records the stems of acknowledged assertions.
fn snap_acked_path(env: &SimEnv) -> std::path::PathBuf {
    env.state_dir.join("snap-acked.txt")
}

/// Builds a failed `snap` result (exit 1) with `msg` on stderr.
fn snap_fail(msg: String) -> Out {
    Out {
        code: 1,
        stdout: String::new(),
        stderr: msg,
    }
}

/// `snap ack FILE`: records the assertion file's stem as acknowledged, if it can be read.
fn snap_ack(env: &SimEnv, file: &str) -> Out {
    match std::fs::read(file) {
        Ok(_) => {
            let _ = std::fs::create_dir_all(&env.state_dir);
            let line = format!(
                "{}\n",
                std::path::Path::new(file)
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
            );
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(snap_acked_path(env))
                .and_then(|mut f| f.write_all(line.as_bytes()));
            Out {
                code: 0,
                stdout: String::new(),
                stderr: String::new(),
            }
        }
        Err(e) => snap_fail(format!(
            "error: cannot read assertion file: open {file}: {e}\n"
        )),
    }
}

/// `snap install ARGS`: installs MicroK8s (from the store or a `.snap` file) or any other snap.
async fn snap_install(env: &SimEnv, rest: &[&str], installed: bool) -> Out {
    let Some(target) = rest.iter().find(|s| !s.starts_with('-')) else {
        return snap_fail("error: the required argument `<snap>` was not provided\n".into());
    };
    let classic = rest.contains(&"--classic");
    let is_file = target.ends_with(".snap");
    let is_mk = if is_file {
        std::path::Path::new(target)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("microk8s"))
    } else {
        *target == "microk8s"
    };
    if is_file {
        if let Some(refused) = check_snap_file(env, target, rest) {
            return refused;
        }
    }
    if !is_mk {
        return Out {
            code: 0,
            stdout: format!("{target} installed\n"),
            stderr: String::new(),
        };
    }
    if !classic {
        return snap_fail("error: This revision of snap \"microk8s\" was published using classic confinement and thus may\n       perform arbitrary system changes outside of the security sandbox that snaps are usually\n       confined to, which may put your system at risk.\n\n       If you understand and want to proceed repeat the command including --classic.\n".into());
    }
    if installed {
        return Out {
            code: 0,
            stdout: String::new(),
            stderr: "snap \"microk8s\" is already installed, see 'snap help refresh'\n".into(),
        };
    }
    // One change per snap at a time, as snapd refuses a second (below); held until the
    // install ends (the lock goes with this process, also when it is killed).
    let _change = match snap_change_lock(env) {
        Ok(Some(lock)) => lock,
        Ok(None) => return snap_fail(SNAP_INSTALL_IN_PROGRESS.into()),
        Err(e) => return snap_fail(format!("error: {e:#}\n")),
    };
    match install(env).await {
        Ok(()) => Out { code: 0, stdout: "microk8s (1.32/stable) v1.32.3 from Canonical✓ installed\n".into(), stderr: String::new() },
        Err(e) => snap_fail(format!("error: cannot perform the following tasks:\n- Run install hook of \"microk8s\" snap if present ({e:#})\n")),
    }
}

/// What snapd answers a second `snap install microk8s` while the first one's change is not
/// done: `ChangeConflictError` with `Snap: "microk8s"`, `ChangeKind: "install-snap"` (its
/// `Error()` is `snap %q has %q change in progress`; canonical/snapd
/// `overlord/snapstate/conflict.go` at 07b80258), printed by the `snap` client after
/// `error: `, exit 1.
pub const SNAP_INSTALL_IN_PROGRESS: &str =
    "error: snap \"microk8s\" has \"install-snap\" change in progress\n";

/// The file whose lock marks a `snap install microk8s` in progress on this node.
pub fn snap_change_lock_path(env: &SimEnv) -> std::path::PathBuf {
    env.state_dir.join("snap-change.lock")
}

/// Takes the node's snap change lock (an exclusive `flock`, released when the returned value
/// is dropped or the process dies): `None` while another `snap install` holds it.
fn snap_change_lock(env: &SimEnv) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    std::fs::create_dir_all(&env.state_dir)
        .with_context(|| format!("creating {}", env.state_dir.display()))?;
    let path = snap_change_lock_path(env);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

/// Refuses a `.snap` file that is missing, or unacknowledged without `--dangerous`.
fn check_snap_file(env: &SimEnv, target: &str, rest: &[&str]) -> Option<Out> {
    if !std::path::Path::new(target).is_file() {
        return Some(snap_fail(format!(
            "error: cannot open \"{target}\": no such file\n"
        )));
    }
    let stem = std::path::Path::new(target)
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let ok =
        std::fs::read_to_string(snap_acked_path(env)).is_ok_and(|t| t.lines().any(|l| l == stem));
    if !ok && !rest.contains(&"--dangerous") {
        return Some(snap_fail(format!(
            "error: cannot find signatures with metadata for snap \"{target}\"\n"
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_join_tokens_and_add_node_tokens() {
        let argv: Vec<String> = [
            "join",
            "10.0.0.1:25000/secrettokensecrettokensecrettoken/abc",
            "--worker",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact(&argv),
            ["join", "10.0.0.1:25000/<redacted>", "--worker"]
        );
        let argv: Vec<String> = ["add-node", "-t", "sekrit"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(redact(&argv), ["add-node", "-t", "<redacted>"]);
    }
}
