//! `imagebuilder qemu ...`: the launcher's commands ([`qemu::cli`]) plus what needs the
//! image builder's knowledge of images and agents:
//!
//! - `qemu up` / `qemu add` give each VM a cloud-init NoCloud seed ([`qemu::seed`]) whose
//!   `user-data` is the image's own (read from `/var/lib/cloud/seed/nocloud/user-data` in the
//!   root filesystem, or `user-data` on a Pi image's `system-boot`), because cloud-init lets the
//!   seed volume's user-data replace the image's (see [`qemu::seed`]); the VM keeps its users and
//!   SSH keys and gets its address from the volume's `network-config`.
//! - `qemu status` adds each agent's view (phase, role, MicroK8s voters) read from
//!   `/status.json` through the VM's management port forward on 127.0.0.1.
//! - `qemu watch` follows formation live from those documents: each agent's new timeline lines
//!   (peers seen, the election, each join), phase and HA changes and addon states, until
//!   "HA formed: N voters" (and, with `--until addons`, the addons settled) or a clear failure
//!   with the serial-log tail of every node that did not get there.
//!
//! The status document is public (the coordinator serves `/status.json` to anyone without the
//! secret: ids, addresses, phases, no secrets), so it is read without the cluster secret. The
//! TLS certificate is not pinned (the fingerprint is known only from mDNS announcements, which
//! do not reach the workstation from the VMs' loopback multicast network); the connection goes
//! to a port QEMU forwards on 127.0.0.1 to the VM, so nothing crosses a real network.
//!
//! To follow a new kind of event, add it to [`Follower::observe`] and its tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use qemu::cli::{DirArg, QemuCommand};
use qemu::Cluster;
use rackseed_protocol::coordinator::fingerprint_of;
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::StatusDoc;
use rackseed_protocol::tls::PeerCertVerifier;

use crate::customize::ext4::Ext4;
use crate::disk::fat::FatVolume;
use crate::disk::read_table;
use crate::status::{summarize, AnnouncedNode, Expectations, NodeReport};

/// Where an x86 image's seed lives in its root filesystem.
pub const ROOT_SEED_USER_DATA: &str = "/var/lib/cloud/seed/nocloud/user-data";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// With `--until addons`: seconds after HA with no node listing any addon (none configured).
const NO_ADDONS_AFTER: f64 = 120.0;

/// `imagebuilder qemu ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum QemuCli {
    #[command(flatten)]
    Launcher(QemuCommand),
    /// Follow the agents of a running test cluster until HA (or failure), printing who is
    /// seen, the election, each join, HA and the addons as they happen.
    Watch(WatchArgs),
    /// Fetch the admin kubeconfig from a control-plane VM over its forwarded coordinator port,
    /// with `server:` pointing at its forwarded API port on 127.0.0.1.
    Kubeconfig(KubeconfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KubeconfigArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The cluster config (its `secret-file` names the secret the request is signed with).
    #[arg(long, required_unless_present = "secret")]
    pub config: Option<PathBuf>,
    /// The cluster secret file (overrides the config's `secret-file`).
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// Write it to this file (mode 0600) instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// Until when `qemu watch` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Until {
    /// MicroK8s reports HA on the expected control-plane nodes.
    Ha,
    /// HA, then every addon enabled (or failed).
    Addons,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Nodes that must be control-plane members with MicroK8s HA (default: every VM, at most 3).
    #[arg(long)]
    pub voters: Option<usize>,
    #[arg(long, value_enum, default_value = "ha")]
    pub until: Until,
    /// Give up after this long (e.g. 20m).
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Seconds between polls.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
}

/// Runs one `imagebuilder qemu` command.
pub fn run(cmd: QemuCli) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: QemuCli) -> Result<()> {
    match cmd {
        QemuCli::Launcher(QemuCommand::Up(mut up)) => {
            up.user_data = match (up.user_data.take(), up.no_seed) {
                (Some(p), _) => Some(p),
                (None, true) => None,
                (None, false) => match image_user_data(&up.image).await? {
                    Some(text) => {
                        println!("seeds carry the image's user-data ({ROOT_SEED_USER_DATA})");
                        let tmp = tempfile::Builder::new()
                            .prefix(".rackseed-user-data-")
                            .tempfile()
                            .context("creating a temporary file for the image's user-data")?;
                        rackseed_host::fs::write_atomic(tmp.path(), text.as_bytes(), 0o600)?;
                        let (_, p) = tmp.keep().context("keeping the user-data file")?;
                        Some(p)
                    }
                    None => {
                        println!("the image has no cloud-init user-data; seeds carry an empty one");
                        None
                    }
                },
            };
            let cleanup = up.user_data.clone();
            let r = qemu::cli::run_async(QemuCommand::Up(up)).await;
            if let Some(p) = cleanup.filter(|p| p.starts_with(std::env::temp_dir())) {
                let _ = std::fs::remove_file(p);
            }
            r
        }
        QemuCli::Launcher(QemuCommand::Status { dir }) => {
            let c = Cluster::open(&dir.dir)?;
            qemu::cli::print_status(&c);
            println!();
            print!("{}", agents_table(&c).await);
            Ok(())
        }
        QemuCli::Launcher(other) => qemu::cli::run_async(other).await,
        QemuCli::Kubeconfig(args) => {
            let (secret, _) =
                crate::status::load_access(args.config.as_deref(), args.secret.as_deref())?;
            let cluster = Cluster::open(&args.dir.dir)?;
            let (k, vm, api) = kubeconfig_via_forward(&cluster, &secret).await?;
            match &args.output {
                Some(p) => {
                    crate::kubeconfig::write_private(p, &k)?;
                    eprintln!(
                        "wrote the kubeconfig of {vm} (API server https://{api}) to {}",
                        p.display()
                    );
                }
                None => print!("{k}"),
            }
            Ok(())
        }
        QemuCli::Watch(args) => {
            let report = watch(&args, &mut std::io::stdout()).await?;
            if report.is_none() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The image's cloud-init user-data: from the root filesystem's NoCloud seed directory, else
/// from a FAT `system-boot` partition (Raspberry Pi images). `None` when it has neither; a
/// qcow2 image is not read (pass `--user-data`).
pub async fn image_user_data(image: &Path) -> Result<Option<String>> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(image)
            .with_context(|| format!("reading image {}", image.display()))?;
        let _ = f.read(&mut magic);
    }
    if &magic == b"QFI\xfb" {
        eprintln!(
            "warning: {} is qcow2; its user-data is not read (pass --user-data to keep its users)",
            image.display()
        );
        return Ok(None);
    }
    let table = read_table(image).await?;
    let scratch = tempfile::tempdir()?;
    if let Some(root) = ["writable", "cloudimg-rootfs"]
        .iter()
        .find_map(|l| table.by_label(l).ok())
    {
        if let Some(b) = Ext4::new(image, root.start)
            .read(ROOT_SEED_USER_DATA, scratch.path())
            .await?
        {
            return Ok(Some(
                String::from_utf8(b).context("the image's user-data is not UTF-8")?,
            ));
        }
    }
    if let Ok(boot) = table.by_label("system-boot") {
        if let Some(b) = FatVolume::new(image, boot.start)
            .read("user-data", scratch.path())
            .await?
        {
            return Ok(Some(
                String::from_utf8(b).context("the image's user-data is not UTF-8")?,
            ));
        }
    }
    Ok(None)
}

/// A client for `https://127.0.0.1:<forwarded port>/status.json`.
pub fn loopback_client() -> Result<reqwest::Client> {
    loopback_client_seeing(Arc::new(Mutex::new(None)))
}

/// [`loopback_client`] that also records the fingerprint of the last certificate it was shown.
fn loopback_client_seeing(seen: Arc<Mutex<Option<String>>>) -> Result<reqwest::Client> {
    // The VM's self-signed certificate is accepted (module docs) and its fingerprint noted;
    // the handshake must still be signed by it.
    let tls = PeerCertVerifier::new(move |cert| {
        *seen.lock().expect("fingerprint lock") = Some(fingerprint_of(cert));
        Ok(())
    })
    .client_config()?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the status client")
}

/// One VM's status document through its management forward (`addr` must be on loopback).
pub async fn fetch_doc(client: &reqwest::Client, addr: SocketAddr) -> Result<StatusDoc> {
    fetch_status_json(client, addr).await
}

/// [`fetch_doc`] as any JSON shape (the drill reads fields a [`StatusDoc`] does not keep).
pub async fn fetch_status_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    addr: SocketAddr,
) -> Result<T> {
    anyhow::ensure!(addr.ip().is_loopback(), "{addr} is not a loopback forward");
    let url = format!("https://{addr}/status.json");
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    let bytes = resp.bytes().await.context("reading the status document")?;
    anyhow::ensure!(bytes.len() <= 4 << 20, "{url}: status document over 4 MiB");
    serde_json::from_slice(&bytes).with_context(|| format!("{url}: unreadable status document"))
}

/// Every running VM's document, by VM name (VMs that do not answer are left out).
pub async fn fetch_docs(
    client: &reqwest::Client,
    cluster: &Cluster,
) -> (BTreeMap<String, StatusDoc>, BTreeMap<String, String>) {
    let mut docs = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for s in cluster.status() {
        if s.state != qemu::NodeRunState::Running {
            errors.insert(s.name.clone(), "VM not running".to_string());
            continue;
        }
        match fetch_doc(client, s.mgmt_addr).await {
            Ok(d) => {
                docs.insert(s.name.clone(), d);
            }
            Err(e) => {
                errors.insert(s.name.clone(), format!("{e:#}"));
            }
        }
    }
    (docs, errors)
}

/// The `qemu status` table of the agents.
async fn agents_table(cluster: &Cluster) -> String {
    let client = match loopback_client() {
        Ok(c) => c,
        Err(e) => return format!("agents: {e:#}\n"),
    };
    let (docs, errors) = fetch_docs(&client, cluster).await;
    let mut out = format!(
        "{:<8} {:<15} {:<10} {:<14} {:<8} {:<9} {}\n",
        "NODE", "ADDRESS", "PHASE", "ROLE", "VOTERS", "API-ADDR", "MICROK8S"
    );
    for name in cluster.node_names() {
        match docs.get(&name) {
            Some(d) => out.push_str(&format!(
                "{:<8} {:<15} {:<10} {:<14} {:<8} {:<9} {}\n",
                name,
                crate::status::terminal_safe(d.address.as_deref().unwrap_or("-")),
                crate::status::terminal_safe(&d.phase),
                crate::status::terminal_safe(d.role.as_deref().unwrap_or("-")),
                d.microk8s
                    .as_ref()
                    .map(|m| m.voters.len().to_string())
                    .unwrap_or_else(|| "-".into()),
                api_address_word(d),
                microk8s_words(d)
            )),
            None => out.push_str(&format!(
                "{:<8} agent not answering: {}\n",
                name,
                errors.get(&name).map(String::as_str).unwrap_or("-")
            )),
        }
    }
    let reports = reports(&docs);
    if !reports.is_empty() {
        out.push_str(&summarize(&reports, Expectations::default()).line);
        out.push('\n');
    }
    out
}

/// The `API-ADDR` column: `holds` where the node carries the floating API address now,
/// `standby` on a node that may take it over (or cannot: its state says why), `-` without one.
fn api_address_word(d: &StatusDoc) -> &'static str {
    match &d.api_address {
        None => "-",
        Some(a) if a.held_here => "holds",
        Some(_) => "standby",
    }
}

fn microk8s_words(d: &StatusDoc) -> String {
    let flavour = if d.microk8s_simulated {
        " (MicroK8s simulated)"
    } else {
        ""
    };
    match &d.microk8s {
        None => format!("-{flavour}"),
        Some(m) if m.ha => format!("running, HA{flavour}"),
        Some(m) if m.running => format!("running{flavour}"),
        Some(m) => format!(
            "{}{flavour}",
            crate::status::terminal_safe(m.note.as_deref().unwrap_or("not running"))
        ),
    }
}

/// The documents as `imagebuilder status` reports, for its verdict ([`summarize`]).
fn reports(docs: &BTreeMap<String, StatusDoc>) -> Vec<NodeReport> {
    docs.values()
        .map(|d| NodeReport {
            node_id: d.node_id.clone(),
            address: d.address.as_deref().and_then(|a| a.parse().ok()),
            announced: AnnouncedNode {
                node_id: d.node_id.clone(),
                addresses: d.address.iter().filter_map(|a| a.parse().ok()).collect(),
                port: 7443,
                fingerprint: String::new(),
                phase: Some(d.phase.clone()),
                role: d.role.clone(),
            },
            status: Some(d.clone()),
            error: None,
        })
        .collect()
}

/// Turns successive documents into the lines `qemu watch` prints.
#[derive(Debug, Default)]
pub struct Follower {
    /// Per VM: the agent's id, the last timeline time printed, phase, HA, voters, addons.
    seen: BTreeMap<String, Seen>,
}

#[derive(Debug, Default, Clone)]
struct Seen {
    node_id: String,
    last_at: f64,
    phase: String,
    role: Option<String>,
    voters: usize,
    ha: bool,
    addons: BTreeMap<String, String>,
}

impl Follower {
    /// The new lines for `vm`'s latest document (each without the time prefix).
    pub fn observe(&mut self, vm: &str, d: &StatusDoc) -> Vec<String> {
        let safe = crate::status::terminal_safe;
        let mut lines = Vec::new();
        let prev = self.seen.get(vm).cloned();
        let mut now = prev.clone().unwrap_or_default();
        let restarted = prev
            .as_ref()
            .is_some_and(|p| d.timeline.last().map(|e| e.at).unwrap_or(0.0) < p.last_at);
        if prev.is_none() || restarted {
            lines.push(format!(
                "{vm}: agent {} answering{} as {}{}",
                if restarted { "restarted," } else { "up," },
                d.address
                    .as_deref()
                    .map(|a| format!(" on {}", safe(a)))
                    .unwrap_or_default(),
                safe(&d.node_id),
                if d.microk8s_simulated {
                    " (MicroK8s simulated)"
                } else {
                    ""
                }
            ));
            now.last_at = -1.0;
        }
        now.node_id = d.node_id.clone();
        let from = now.last_at;
        for e in d.timeline.iter().filter(|e| e.at > from) {
            lines.push(format!("{vm}: {} (+{:.1} s)", safe(&e.what), e.at));
            now.last_at = e.at;
        }
        if d.phase != now.phase || d.role != now.role {
            lines.push(format!(
                "{vm}: phase {}{}",
                safe(&d.phase),
                d.role
                    .as_deref()
                    .map(|r| format!(" ({})", safe(r)))
                    .unwrap_or_default()
            ));
            now.phase = d.phase.clone();
            now.role = d.role.clone();
        }
        let (voters, ha) = d
            .microk8s
            .as_ref()
            .map(|m| (m.voters.len(), m.ha))
            .unwrap_or((0, false));
        if (voters, ha) != (now.voters, now.ha) && d.microk8s.is_some() {
            lines.push(format!(
                "{vm}: MicroK8s {} voter{}{}",
                voters,
                if voters == 1 { "" } else { "s" },
                if ha { ", HA" } else { "" }
            ));
            now.voters = voters;
            now.ha = ha;
        }
        for a in &d.addons {
            if now.addons.get(&a.name) != Some(&a.state) {
                lines.push(format!(
                    "{vm}: addon {} {}{}",
                    safe(&a.name),
                    safe(&a.state),
                    a.reason
                        .as_deref()
                        .map(|r| format!(": {}", safe(r)))
                        .unwrap_or_default()
                ));
                now.addons.insert(a.name.clone(), a.state.clone());
            }
        }
        self.seen.insert(vm.to_string(), now);
        lines
    }
}

/// Whether `docs` show `voters` control-plane members with MicroK8s HA, and how many.
fn ha_members(docs: &BTreeMap<String, StatusDoc>) -> usize {
    docs.values()
        .filter(|d| {
            d.phase == "member"
                && d.role.as_deref() == Some("control-plane")
                && d.microk8s.as_ref().is_some_and(|m| m.running && m.ha)
        })
        .count()
}

/// Addons settled: a node lists addons and none of its rows is still pending or enabling.
fn addons_settled(docs: &BTreeMap<String, StatusDoc>) -> bool {
    docs.values().any(|d| {
        !d.addons.is_empty()
            && d.addons
                .iter()
                .all(|a| matches!(a.state.as_str(), "enabled" | "failed" | "manual"))
    })
}

/// Follows the cluster in `args.dir`, printing to `out`. Returns the verdict line when the
/// goal was reached, `None` after printing why not (timeout, or a VM stopped).
pub async fn watch(args: &WatchArgs, out: &mut dyn Write) -> Result<Option<String>> {
    let mut cluster = Cluster::open(&args.dir.dir)?;
    let client = loopback_client()?;
    let want = args
        .voters
        .unwrap_or_else(|| cluster.node_names().len().min(3));
    if want == 0 {
        bail!("nothing to watch: the cluster has no nodes");
    }
    let start = Instant::now();
    let mut follower = Follower::default();
    let mut ha_at: Option<f64> = None;
    writeln!(
        out,
        "watching {} VMs in {} until {} (timeout {})",
        cluster.node_names().len(),
        cluster.dir().display(),
        match args.until {
            Until::Ha => format!("HA with {want} voters"),
            Until::Addons => format!("HA with {want} voters and the addons settled"),
        },
        humantime::format_duration(args.timeout)
    )?;
    let mut last_errors: BTreeMap<String, String> = BTreeMap::new();
    loop {
        cluster.reload()?;
        let (docs, errors) = fetch_docs(&client, &cluster).await;
        let t = start.elapsed().as_secs_f64();
        for (vm, d) in &docs {
            for line in follower.observe(vm, d) {
                writeln!(out, "[{t:7.1} s] {line}")?;
            }
        }
        for (vm, e) in &errors {
            if e == "VM not running" && last_errors.get(vm) != Some(e) {
                writeln!(out, "[{t:7.1} s] {vm}: VM not running")?;
            }
        }
        last_errors = errors.clone();
        out.flush()?;
        let ha = ha_members(&docs);
        if ha >= want && ha_at.is_none() {
            let line = summarize(&reports(&docs), Expectations::default()).line;
            writeln!(out, "[{t:7.1} s] HA formed: {ha} voters ({line})")?;
            ha_at = Some(t);
        }
        if let Some(at) = ha_at {
            let no_addons = t - at > NO_ADDONS_AFTER && docs.values().all(|d| d.addons.is_empty());
            if args.until == Until::Ha || addons_settled(&docs) || no_addons {
                let line = summarize(&reports(&docs), Expectations::default()).line;
                if args.until == Until::Addons {
                    writeln!(out, "[{t:7.1} s] addons settled: {line}")?;
                }
                writeln!(out, "formation took {at:.1} s after the watch started")?;
                return Ok(Some(line));
            }
        }
        let stopped: Vec<_> = errors
            .iter()
            .filter(|(_, e)| e.as_str() == "VM not running")
            .map(|(n, _)| n.clone())
            .collect();
        let timed_out = start.elapsed() >= args.timeout;
        if timed_out || (ha_at.is_none() && stopped.len() > cluster.node_names().len() - want) {
            writeln!(
                out,
                "FAILED: {} ({} of {want} control-plane members with HA after {t:.0} s)",
                if timed_out {
                    "not formed in time"
                } else {
                    "too many VMs stopped"
                },
                ha
            )?;
            for name in cluster.node_names() {
                let ok = docs.get(&name).is_some_and(|d| {
                    d.phase == "member" && d.microk8s.as_ref().is_some_and(|m| m.ha)
                });
                if ok {
                    continue;
                }
                let why = match docs.get(&name) {
                    Some(d) => format!(
                        "phase {}{}",
                        crate::status::terminal_safe(&d.phase),
                        d.last_error
                            .as_deref()
                            .map(|e| format!(", last error: {}", crate::status::terminal_safe(e)))
                            .unwrap_or_default()
                    ),
                    None => errors.get(&name).cloned().unwrap_or_default(),
                };
                writeln!(
                    out,
                    "---- {name}: {why}; serial log tail ({}):",
                    cluster
                        .node(&name)
                        .map(|n| n.serial_log.display().to_string())
                        .unwrap_or_default()
                )?;
                let tail = cluster.serial_tail(&name, 200).unwrap_or_default();
                writeln!(out, "{}", last_lines(&plain_text(&tail), 40))?;
            }
            out.flush()?;
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
    }
}

/// The admin kubeconfig from the first control-plane member VM that hands one out, with
/// `server:` at its forwarded API port; returns (kubeconfig, VM, API address). The request is
/// the coordinator's authenticated `POST /v1/kubeconfig` (signed with the cluster secret), over
/// TLS pinned to the certificate the VM showed on its forwarded port a moment before (the
/// forward is QEMU's, on 127.0.0.1).
pub async fn kubeconfig_via_forward(
    cluster: &Cluster,
    secret: &ClusterSecret,
) -> Result<(String, String, SocketAddr)> {
    let (docs, errors) = fetch_docs(&loopback_client()?, cluster).await;
    let client = crate::status::workstation_client(secret, Duration::from_secs(30));
    let mut failures = Vec::new();
    for s in cluster.status() {
        let Some(d) = docs.get(&s.name) else {
            failures.push(format!(
                "{}: {}",
                s.name,
                errors.get(&s.name).map(String::as_str).unwrap_or("-")
            ));
            continue;
        };
        if !(d.phase == "member" && d.role.as_deref() == Some("control-plane")) {
            failures.push(format!(
                "{}: not a control-plane member ({})",
                s.name, d.phase
            ));
            continue;
        }
        let Some(api) = s.api_addr else {
            failures.push(format!("{}: no API port forwarded", s.name));
            continue;
        };
        // A new client (its own connections and TLS session cache) per VM: a pooled
        // connection or a resumed TLS session would show no certificate.
        let seen = Arc::new(Mutex::new(None));
        let probe = loopback_client_seeing(seen.clone())?;
        if let Err(e) = fetch_doc(&probe, s.mgmt_addr).await {
            failures.push(format!("{}: {e:#}", s.name));
            continue;
        }
        let Some(fp) = seen.lock().expect("fingerprint lock").clone() else {
            failures.push(format!("{}: no certificate seen", s.name));
            continue;
        };
        match client.kubeconfig(s.mgmt_addr, &fp).await {
            Ok(k) => {
                let k = crate::kubeconfig::point_at(&k, api.ip())?;
                let k = with_server_port(&k, api.port());
                let k =
                    crate::kubeconfig::name_tls_server(&k, crate::kubeconfig::CERTIFICATE_NAME)?;
                return Ok((k, s.name.clone(), api));
            }
            Err(e) => failures.push(format!("{}: {e}", s.name)),
        }
    }
    bail!(
        "no control-plane VM handed out a kubeconfig:\n  {}",
        failures.join("\n  ")
    )
}

/// Sets the port of every `server: https://host:port` line. Pure.
pub fn with_server_port(kubeconfig: &str, port: u16) -> String {
    kubeconfig
        .split_inclusive('\n')
        .map(|line| {
            let body = line.trim_end_matches(['\n', '\r']);
            let Some(at) = body.find("server: https://") else {
                return line.to_string();
            };
            let url_start = at + "server: https://".len();
            let url = &body[url_start..];
            let host_end = url.find('/').unwrap_or(url.len());
            let host = &url[..host_end];
            let host = match host.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
                _ => host,
            };
            format!(
                "{}{host}:{port}{}{}",
                &body[..url_start],
                &url[host_end..],
                &line[body.len()..]
            )
        })
        .collect()
}

/// A console log as plain text: ANSI escape sequences (systemd's colours and progress
/// spinner) and other control characters removed, carriage-return redraws reduced to their
/// last state. Pure.
pub fn plain_text(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters intermediates final (0x40..=0x7e); OSC: ESC ] ... BEL.
                match chars.peek() {
                    Some('[') => {
                        chars.next();
                        for c in chars.by_ref() {
                            if ('\x40'..='\x7e').contains(&c) {
                                break;
                            }
                        }
                    }
                    Some(']') => {
                        for c in chars.by_ref() {
                            if c == '\x07' {
                                break;
                            }
                        }
                    }
                    _ => {
                        chars.next();
                    }
                }
            }
            '\r' => {
                // A redraw: keep only what follows on this line.
                if chars.peek() != Some(&'\n') {
                    let start = out.rfind('\n').map_or(0, |i| i + 1);
                    out.truncate(start);
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The last `n` non-empty lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Path of a VM's serial log, for messages.
pub fn serial_log(cluster: &Cluster, vm: &str) -> Result<PathBuf> {
    Ok(cluster.node(vm)?.serial_log.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackseed_protocol::status::{AddonRow, Microk8sView, TimelineEntry};

    fn doc(phase: &str, timeline: &[(f64, &str)]) -> StatusDoc {
        StatusDoc {
            node_id: "n-a".into(),
            phase: phase.into(),
            address: Some("192.168.76.10".into()),
            timeline: timeline
                .iter()
                .map(|(at, w)| TimelineEntry {
                    at: *at,
                    what: w.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_api_address_column_names_the_holder() {
        use rackseed_protocol::status::ApiAddressView;
        let mut d = doc("member", &[]);
        assert_eq!(api_address_word(&d), "-");
        let view = |held_here| ApiAddressView {
            address: Some("192.168.76.100".into()),
            held_here,
            state: String::new(),
            peers: Vec::new(),
            problem: None,
            in_certificate: true,
        };
        d.api_address = Some(view(false));
        assert_eq!(api_address_word(&d), "standby");
        d.api_address = Some(view(true));
        assert_eq!(api_address_word(&d), "holds");
    }

    #[test]
    fn the_follower_prints_each_new_event_once() {
        let mut f = Follower::default();
        let l = f.observe("node0", &doc("discovering", &[(0.1, "agent started")]));
        assert_eq!(
            l,
            [
                "node0: agent up, answering on 192.168.76.10 as n-a",
                "node0: agent started (+0.1 s)",
                "node0: phase discovering"
            ]
        );
        assert!(f
            .observe("node0", &doc("discovering", &[(0.1, "agent started")]))
            .is_empty());
        let mut d = doc(
            "member",
            &[(0.1, "agent started"), (5.0, "saw n-b at 192.168.76.11")],
        );
        d.role = Some("control-plane".into());
        d.microk8s = Some(Microk8sView {
            running: true,
            voters: vec!["a".into(), "b".into(), "c".into()],
            ha: true,
            ..Default::default()
        });
        d.addons = vec![AddonRow {
            name: "metallb".into(),
            state: "enabled".into(),
            reason: None,
        }];
        let l = f.observe("node0", &d);
        assert_eq!(
            l,
            [
                "node0: saw n-b at 192.168.76.11 (+5.0 s)",
                "node0: phase member (control-plane)",
                "node0: MicroK8s 3 voters, HA",
                "node0: addon metallb enabled"
            ]
        );
        // A restarted agent (its timeline starts again) is announced and followed afresh.
        let l = f.observe("node0", &doc("member", &[(0.2, "resumed")]));
        assert_eq!(
            l[0],
            "node0: agent restarted, answering on 192.168.76.10 as n-a"
        );
        assert!(l.contains(&"node0: resumed (+0.2 s)".to_string()), "{l:?}");
    }

    #[test]
    fn node_strings_cannot_drive_the_terminal() {
        let mut f = Follower::default();
        let l = f.observe(
            "node0",
            &doc("disc\x1b[2Jovering", &[(0.1, "x\x1b]0;t\x07y")]),
        );
        assert!(l.iter().all(|s| !s.contains('\x1b')), "{l:?}");
    }

    #[test]
    fn ha_needs_control_plane_members_with_microk8s_ha() {
        let mut docs = BTreeMap::new();
        let mut d = doc("member", &[]);
        d.role = Some("control-plane".into());
        d.microk8s = Some(Microk8sView {
            running: true,
            voters: vec!["a".into(); 3],
            ha: true,
            ..Default::default()
        });
        docs.insert("node0".to_string(), d.clone());
        let mut w = d.clone();
        w.role = Some("worker".into());
        docs.insert("node1".to_string(), w);
        assert_eq!(ha_members(&docs), 1);
        docs.insert("node2".to_string(), d);
        assert_eq!(ha_members(&docs), 2);
    }

    #[derive(clap::Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: QemuCli,
    }

    #[test]
    fn launcher_and_builder_commands_parse_side_by_side() {
        use clap::Parser;
        let t = Top::try_parse_from(["x", "up", "--subnet", "10.9.0.0/24", "out/a.img"]).unwrap();
        match t.cmd {
            QemuCli::Launcher(QemuCommand::Up(up)) => {
                assert_eq!(up.subnet.to_string(), "10.9.0.0/24");
                assert!(!up.no_seed);
            }
            other => panic!("{other:?}"),
        }
        let t = Top::try_parse_from([
            "x",
            "watch",
            "--dir",
            "c",
            "--until",
            "addons",
            "--timeout",
            "5m",
        ])
        .unwrap();
        match t.cmd {
            QemuCli::Watch(w) => {
                assert_eq!(w.until, Until::Addons);
                assert_eq!(w.timeout, Duration::from_secs(300));
                assert_eq!(w.dir.dir, PathBuf::from("c"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Top::try_parse_from(["x", "kubeconfig", "--dir", "c"]).is_err());
        assert!(Top::try_parse_from(["x", "kubeconfig", "--config", "q.toml"]).is_ok());
        assert!(Top::try_parse_from(["x", "up", "--subnet", "10.0.2.0/24", "a.img"]).is_err());
        assert!(matches!(
            Top::try_parse_from(["x", "status"]).unwrap().cmd,
            QemuCli::Launcher(QemuCommand::Status { .. })
        ));
    }

    #[test]
    fn console_logs_are_shown_as_plain_text() {
        let log = "\x1b[0;32m  OK  \x1b[0m] Started udev.\r\n\x1b[0;31m*\x1b[0m] (1 of 2) Job \
                   running\r\x1b[K[  OK  ] Reached target.\n\x1b]0;title\x07login: \x07\n";
        let plain = plain_text(log);
        assert_eq!(
            plain,
            "  OK  ] Started udev.\n[  OK  ] Reached target.\nlogin: \n"
        );
        assert!(plain.chars().all(|c| c == '\n' || !c.is_control()));
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b\nc");
    }

    #[test]
    fn server_ports_are_rewritten_and_nothing_else() {
        let k = "clusters:\n- cluster:\n    certificate-authority-data: AB\n    server: https://127.0.0.1:16443\n  name: microk8s-cluster\n";
        let out = with_server_port(k, 41234);
        assert_eq!(out, k.replace(":16443", ":41234"));
        assert_eq!(
            with_server_port("    server: https://127.0.0.1\n", 5),
            "    server: https://127.0.0.1:5\n"
        );
    }

    #[tokio::test]
    async fn fetch_doc_refuses_addresses_off_loopback() {
        let c = loopback_client().unwrap();
        let e = fetch_doc(&c, "192.0.2.1:7443".parse().unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a loopback"), "{e}");
    }
}
