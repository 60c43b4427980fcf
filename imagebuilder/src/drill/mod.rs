//! `imagebuilder drill`: kill one node of a running cluster on purpose and measure what that
//! cost: how long the API, dqlite quorum and a LoadBalancer address were unavailable (RTO),
//! and what data was lost (RPO).
//!
//! Steps:
//! 1. Find the cluster (signed mDNS announcements, as `imagebuilder status`) and read every
//!    node's status document over its authenticated coordinator: roles, dqlite voters and
//!    standbys, who holds the API address, backups. A QEMU test cluster (`--qemu-dir`) is
//!    read through the launcher's 127.0.0.1 forwards instead ([`on_qemu`]: no announcement
//!    and no cluster address reaches the workstation there).
//! 2. Choose the node (`--kill seed|voter|api-holder|worker|random`, [`choose`]) and the way to
//!    kill it ([`killer`]: a QEMU VM, the node's own agent, or `--kill-with PROGRAM`); ask for
//!    confirmation on a terminal unless `--yes` (never for a QEMU test cluster).
//! 3. Fetch the admin kubeconfig (over the coordinator) and start the probe ([`probe`]): once
//!    a second it creates a ConfigMap `rackseed-drill-<run>-<counter>` through the API address
//!    when the cluster has one, else through any control-plane node (the first that answers);
//!    asks every control-plane node's `/readyz` (200 = that node has quorum); and, with
//!    `--lb-url`, fetches that URL (a LoadBalancer service's address).
//! 4. After `--baseline` of good rounds, kill the node; keep probing until the API and quorum
//!    (and the LoadBalancer, when probed) have answered in 3 rounds running and at least
//!    [`MIN_OBSERVE`] passed, or `--timeout`.
//! 5. RPO: list the probe's ConfigMaps; every counter acknowledged before the kill and missing
//!    now is lost data. Then delete them. The newest backup's age comes from the status
//!    documents (`backup.newest.age_s`); when no node reports one it is "unknown".
//! 6. Report ([`report`]): Markdown on stdout (or JSON with `--json`), and with `--out DIR`
//!    `drill-<run>.md`, `.json` and `.svg` (the timeline). `--max-rto SECONDS` exits 1 when the
//!    API's recovery took longer (or it never recovered).
//!
//! The LoadBalancer RTO is "not measured" without `--lb-url`, or when nothing answered there
//! before the kill: never a made-up figure. The MicroK8s simulator models MetalLB's layer-2
//! address (a demo LoadBalancer service on the pool's first address, answering HTTP on port
//! 80 from the node MetalLB would pick), so `--lb-url http://<that address>/` is measured
//! against it too (`firstboot/tests/agent_drill.rs`). On a QEMU test cluster booted with
//! `qemu up --lb-forward ADDRESS:PORT` it is measured without `--lb-url`, through each VM's
//! forward of that address ([`on_qemu`]).

pub mod api;
pub mod killer;
pub mod on_qemu;
pub mod probe;
pub mod report;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::status::StatusDoc;

use crate::kubeconfig::API_SERVER_PORT;
use crate::status::{workstation_client, AnnouncedNode, ClusterBrowser};
use killer::{AgentKiller, CommandKiller, Killer, Victim};
use report::{Holdings, Report};

/// Least time the probe watches after the kill (keepalived needs up to 6.5 s to move the
/// address; a worker's loss may show nowhere).
pub const MIN_OBSERVE: Duration = Duration::from_secs(15);

/// Which node to kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The seed: the node the cluster record names as its slot authority (the seed until a
    /// takeover).
    Seed,
    /// A dqlite voter (one that does not hold the API address, when there is one).
    Voter,
    /// The control-plane node holding the floating API address.
    ApiHolder,
    /// A worker.
    Worker,
    /// Any member.
    Random,
}

/// How a real node cuts itself off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cut {
    /// Stop MicroK8s and take the network down; both come back after --restore-after.
    Isolate,
    /// Power off (a person powers it on again).
    PowerOff,
}

#[derive(Debug, Args)]
pub struct DrillArgs {
    #[command(flatten)]
    pub cluster: crate::cli::ClusterArgs,
    /// Which node to kill.
    #[arg(long, value_enum)]
    pub kill: Target,
    /// A QEMU test cluster (`imagebuilder qemu up --dir`): read through the launcher's
    /// 127.0.0.1 forwards instead of mDNS, and kill the chosen node's VM.
    #[arg(long, value_name = "DIR")]
    pub qemu_dir: Option<PathBuf>,
    /// With --qemu-dir: kill this VM's node (it must fit --kill); default: chosen by --kill.
    #[arg(long, requires = "qemu_dir")]
    pub vm: Option<String>,
    /// Kill the node by running `PROGRAM NODE_ID ADDRESS` (exit 0 = dead), e.g. a PDU script.
    #[arg(long, value_name = "PROGRAM", conflicts_with = "qemu_dir")]
    pub kill_with: Option<PathBuf>,
    /// How a real node cuts itself off (without --qemu-dir or --kill-with).
    #[arg(long, value_enum, default_value = "isolate")]
    pub cut: Cut,
    /// With --cut isolate: when the node restores its network and MicroK8s (10s to 4h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub restore_after: Duration,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Print the report as JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// Also write `drill-<run>.md`, `.json` and `.svg` into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Exit 1 when the API's recovery took longer than this many seconds (or never came).
    #[arg(long, value_name = "SECONDS")]
    pub max_rto: Option<f64>,
    /// A LoadBalancer service's URL to poll (http:// or https://; any answer counts as up).
    #[arg(long, value_name = "URL")]
    pub lb_url: Option<String>,
    /// Good probe rounds before the kill, as a duration.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub baseline: Duration,
    /// Longest the probe waits for recovery after the kill.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long to listen for announcements (less once every expected node was seen).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub discover: Duration,
}

/// One node as the status documents describe it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub announced: AnnouncedNode,
    pub address: Option<IpAddr>,
    pub doc: Option<StatusDoc>,
    /// The document as JSON (fields this build does not know, e.g. backups).
    pub raw: serde_json::Value,
}

/// The cluster as the drill sees it before the kill.
#[derive(Debug, Clone, Default)]
pub struct Picture {
    pub holdings: Vec<Holdings>,
    /// The slot authority most documents name (the seed until a takeover).
    pub authority: Option<String>,
    pub api_address: Option<IpAddr>,
    pub metallb: bool,
    pub newest_backup_age_s: Option<u64>,
    pub backup_note: String,
}

fn voter_addresses(docs: &[&StatusDoc]) -> (Vec<String>, Vec<String>) {
    let host = |s: &String| {
        s.rsplit_once(':')
            .map(|(h, _)| h.to_owned())
            .unwrap_or(s.clone())
    };
    let best = docs
        .iter()
        .filter_map(|d| d.microk8s.as_ref())
        .max_by_key(|m| m.voters.len());
    match best {
        Some(m) => (
            m.voters.iter().map(host).collect(),
            m.standby.iter().map(host).collect(),
        ),
        None => (vec![], vec![]),
    }
}

/// What each node holds, from the status documents (pure).
pub fn picture(nodes: &[NodeView]) -> Picture {
    let docs: Vec<&StatusDoc> = nodes.iter().filter_map(|n| n.doc.as_ref()).collect();
    let (voters, standbys) = voter_addresses(&docs);
    let mut authorities: Vec<&str> = docs.iter().filter_map(|d| d.authority.as_deref()).collect();
    authorities.sort();
    let authority = authorities
        .iter()
        .max_by_key(|a| authorities.iter().filter(|b| b == a).count())
        .map(|s| s.to_string());
    let api_address = docs
        .iter()
        .filter_map(|d| d.api_address.as_ref()?.address.as_deref()?.parse().ok())
        .next();
    let metallb = docs
        .iter()
        .any(|d| d.addons.iter().any(|a| a.name == "metallb"));
    let mut newest: Option<u64> = None;
    let mut reported = false;
    let holdings = nodes
        .iter()
        .map(|n| {
            let doc = n.doc.as_ref();
            let addr = n
                .address
                .map(|a| a.to_string())
                .or_else(|| doc.and_then(|d| d.address.clone()));
            let role = match (doc.and_then(|d| d.role.as_deref()), &addr) {
                (Some("worker"), _) => "worker".to_owned(),
                (_, Some(a)) if voters.contains(a) => "voter".to_owned(),
                (_, Some(a)) if standbys.contains(a) => "standby".to_owned(),
                (Some(r), _) => r.to_owned(),
                (None, _) => n.announced.role.clone().unwrap_or_else(|| "unknown".into()),
            };
            let backup = &n.raw["backup"];
            let copies = if backup.is_object() {
                reported = true;
                if let Some(age) = backup["newest"]["age_s"].as_u64() {
                    newest = Some(newest.map_or(age, |n: u64| n.min(age)));
                }
                Some(u32::from(backup["newest"].is_object()))
            } else {
                None
            };
            Holdings {
                node_id: n.announced.node_id.clone(),
                hostname: doc.map(|d| d.hostname.clone()).unwrap_or_default(),
                address: addr,
                role,
                api_address: doc
                    .and_then(|d| d.api_address.as_ref())
                    .is_some_and(|a| a.held_here),
                backup_copies: copies,
                metallb_speaker: metallb,
                storage_replicas: None,
            }
        })
        .collect();
    let backup_note = match (reported, newest) {
        (false, _) => "no node reports datastore backups".into(),
        (true, None) => "no backup taken yet".into(),
        (true, Some(_)) => "from the status documents".into(),
    };
    Picture {
        holdings,
        authority,
        api_address,
        metallb,
        newest_backup_age_s: newest,
        backup_note,
    }
}

/// The node to kill and why (pure; `pick` chooses among equals, e.g. at random).
pub fn choose(p: &Picture, t: Target, pick: impl Fn(usize) -> usize) -> Result<(usize, String)> {
    let h = &p.holdings;
    let among = |idx: Vec<usize>, why: &str| -> Result<(usize, String)> {
        if idx.is_empty() {
            bail!("no node to kill: {why}");
        }
        Ok((idx[pick(idx.len()) % idx.len()], why.to_owned()))
    };
    let idx = |f: &dyn Fn(&Holdings) -> bool| -> Vec<usize> {
        (0..h.len()).filter(|&i| f(&h[i])).collect()
    };
    match t {
        Target::Seed => {
            let Some(a) = &p.authority else {
                bail!("no node names a slot authority (the seed); is the cluster formed?");
            };
            among(
                idx(&|n| &n.node_id == a),
                "--kill seed: it is the cluster record's slot authority (the seed, unless taken over)",
            )
        }
        Target::ApiHolder => {
            if p.api_address.is_none() {
                bail!("--kill api-holder: the cluster has no API address (cluster.api-address)");
            }
            among(
                idx(&|n| n.api_address),
                "--kill api-holder: it holds the floating API address",
            )
        }
        Target::Voter => {
            let preferred = idx(&|n| n.role == "voter" && !n.api_address);
            if preferred.is_empty() {
                among(
                    idx(&|n| n.role == "voter"),
                    "--kill voter: it is a dqlite voter",
                )
            } else {
                among(
                    preferred,
                    "--kill voter: it is a dqlite voter not holding the API address",
                )
            }
        }
        Target::Worker => among(
            idx(&|n| n.role == "worker"),
            "--kill worker: it is a worker",
        ),
        Target::Random => among((0..h.len()).collect(), "--kill random: picked at random"),
    }
}

/// `imagebuilder drill`.
pub fn run_cli(args: DrillArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the drill knows once it has read the cluster and chosen its victim: the same for a
/// cluster found over mDNS and for a QEMU test cluster ([`on_qemu`]).
pub struct Prepared {
    pub pic: Picture,
    /// The chosen node's index in `pic.holdings`.
    pub index: usize,
    pub why: String,
    pub victim: Victim,
    pub killer: Box<dyn Killer>,
    /// The admin kubeconfig (its credentials; the probe's endpoints are `write_to`/`readyz`).
    pub kubeconfig: String,
    /// Where probe writes go, in order of preference.
    pub write_to: Vec<SocketAddr>,
    /// Control-plane API endpoints asked for `/readyz`.
    pub readyz: Vec<SocketAddr>,
    pub probe_target: String,
    /// Why a LoadBalancer address cannot be probed from here (without `--lb-url`).
    pub lb_unreachable: Option<String>,
    /// Without `--lb-url`: each VM's forward of the LoadBalancer address (a QEMU test
    /// cluster booted with `qemu up --lb-forward`), see [`probe::ProbePlan::lb_forwards`].
    pub lb_forwards: Vec<SocketAddr>,
    /// Ask the agents who holds the API address (where it cannot be probed directly).
    pub holder: Option<probe::HolderProbe>,
    pub notes: Vec<String>,
}

fn run(args: &DrillArgs) -> Result<ExitCode> {
    let (secret, expect) = crate::status::load_access(
        args.cluster.config.as_deref(),
        args.cluster.secret.as_deref(),
    )?;
    if let Some(u) = &args.lb_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--lb-url {u:?}: give an http:// or https:// URL");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let prepared = match &args.qemu_dir {
            Some(dir) => on_qemu::prepare(args, dir, &secret).await?,
            None => prepare_announced(args, &secret, expect.nodes).await?,
        };
        let Prepared {
            pic,
            index,
            why,
            victim,
            killer,
            kubeconfig,
            write_to,
            readyz,
            probe_target,
            lb_unreachable,
            lb_forwards,
            holder,
            mut notes,
        } = prepared;
        if killer.needs_confirmation() && !args.yes {
            let q = format!("The drill will {} ({why}).", killer.describe(&victim));
            let yes = tokio::task::block_in_place(|| rackseed_host::terminal::confirm(&q))?;
            if !yes {
                bail!("not confirmed; nothing was done");
            }
        }
        let creds = api::Credentials::from_kubeconfig(&kubeconfig)?;
        let api = api::ApiClient::new(&creds, Duration::from_millis(2500))?;
        let plan = probe::ProbePlan {
            run_id: run_id(),
            write_to,
            readyz,
            lb_url: args.lb_url.clone(),
            lb_forwards,
            holder,
            baseline: args.baseline,
            min_observe: MIN_OBSERVE,
            timeout: args.timeout,
        };
        let mut report = probe::run(&plan, Arc::new(api), killer.as_ref(), &victim).await?;
        report.target = pic.holdings[index].clone();
        report.chosen_because = why;
        report.probe_target = probe_target;
        report.rpo.newest_backup_age_s = pic.newest_backup_age_s;
        report.rpo.backup_note = pic.backup_note.clone();
        report.spof = report::spof_table(&pic.holdings, pic.api_address.is_some(), pic.metallb);
        if let (None, Some(why)) = (&args.lb_url, lb_unreachable) {
            report.rto_loadbalancer = report::Measure::NotMeasured { why };
        }
        if !report.tls_verified {
            notes.push("the API server's certificate was not checked: the kubeconfig's CA is no certificate (the MicroK8s simulator)".into());
        }
        report.notes.append(&mut notes);
        finish(args, &report)
    })
}

/// Finds the cluster over mDNS, reads every node's status over its coordinator, chooses the
/// victim and the way to kill it (a `--kill-with` program or the node's own agent).
async fn prepare_announced(
    args: &DrillArgs,
    secret: &rackseed_protocol::secret::ClusterSecret,
    expected_nodes: Option<usize>,
) -> Result<Prepared> {
    let interfaces = if args.cluster.interfaces.is_empty() {
        InterfaceChoice::Auto
    } else {
        InterfaceChoice::Named(args.cluster.interfaces.clone())
    };
    let client = workstation_client(secret, Duration::from_secs(10));
    let mut browser = ClusterBrowser::start(secret, interfaces.clone())?;
    let want = expected_nodes.unwrap_or(1).max(1);
    browser.collect_until(args.discover, |n| n >= want).await;
    // The documents may lag (e.g. the address just moved): read again for a while.
    let deadline = Instant::now() + args.discover;
    let (nodes, pic, index, why) = loop {
        browser.drain();
        let announced = browser.nodes();
        if announced.is_empty() {
            bail!(
                "no node of this cluster announced itself within {:?}",
                args.discover
            );
        }
        let nodes = read_nodes(&client, announced).await;
        let pic = picture(&nodes);
        match choose(&pic, args.kill, |n| rand::random_range(0..n)) {
            Ok((i, why)) => break (nodes, pic, i, why),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let target = &pic.holdings[index];
    let node = &nodes[index];
    let victim = Victim {
        node_id: target.node_id.clone(),
        hostname: target.hostname.clone(),
        address: target.address.as_deref().and_then(|a| a.parse().ok()),
        coordinator: node.address.map(|a| {
            (
                SocketAddr::new(a, node.announced.port),
                node.announced.fingerprint.clone(),
            )
        }),
    };
    let killer: Box<dyn Killer> = if let Some(p) = &args.kill_with {
        Box::new(CommandKiller { program: p.clone() })
    } else {
        Box::new(AgentKiller {
            client: workstation_client(secret, Duration::from_secs(10)),
            isolate_for: match args.cut {
                Cut::Isolate => Some(args.restore_after),
                Cut::PowerOff => None,
            },
        })
    };
    let mut kopts = crate::kubeconfig::KubeconfigOptions::new(secret.clone());
    kopts.interfaces = interfaces;
    kopts.timeout = Duration::from_secs(60);
    let fetched = crate::kubeconfig::fetch(&kopts).await?;
    let cp: Vec<SocketAddr> = pic
        .holdings
        .iter()
        .filter(|h| h.role != "worker")
        .filter_map(|h| h.address.as_deref()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, API_SERVER_PORT))
        .collect();
    let (write_to, probe_target) = match pic.api_address {
        Some(a) => (
            vec![SocketAddr::new(a, API_SERVER_PORT)],
            format!("the API address {a}:{API_SERVER_PORT}"),
        ),
        None => (cp.clone(), "any control-plane node".to_owned()),
    };
    Ok(Prepared {
        pic,
        index,
        why,
        victim,
        killer,
        kubeconfig: fetched.kubeconfig,
        write_to,
        readyz: cp,
        probe_target,
        lb_unreachable: None,
        lb_forwards: vec![],
        holder: None,
        notes: vec![],
    })
}

/// Prints and writes the report; the exit code follows `--max-rto`.
fn finish(args: &DrillArgs, report: &Report) -> Result<ExitCode> {
    let md = report::render_markdown(report);
    let json = serde_json::to_string_pretty(report).expect("reports serialise");
    if args.json {
        println!("{json}");
    } else {
        print!("{md}");
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (ext, text) in [
            ("md", md.clone()),
            ("json", json),
            ("svg", report::render_svg(report)),
        ] {
            let path = dir.join(format!("drill-{}.{ext}", report.run_id));
            rackseed_host::fs::write_atomic(&path, text.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if let Some(max) = args.max_rto {
        let got = report.rto_api.seconds_for_bound().unwrap_or(f64::INFINITY);
        if got > max {
            eprintln!(
                "error: the API's recovery ({}) exceeds --max-rto {max} s",
                report.rto_api.words()
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = [0u8; 2];
    rand::fill(&mut r);
    format!("{secs}-{}", hex::encode(r))
}

/// Reads every node's status document (keeping the raw JSON), each with its own deadline.
async fn read_nodes(
    client: &rackseed_protocol::coordinator::CoordinatorClient,
    announced: Vec<AnnouncedNode>,
) -> Vec<NodeView> {
    let mut out = Vec::new();
    for a in announced {
        let mut view = NodeView {
            address: a.addresses.first().copied(),
            announced: a.clone(),
            doc: None,
            raw: serde_json::Value::Null,
        };
        for ip in &a.addresses {
            let peer = SocketAddr::new(*ip, a.port);
            let started = Instant::now();
            if let Ok(v) = client.status(peer, &a.fingerprint).await {
                view.doc = serde_json::from_value(v.clone()).ok();
                view.raw = v;
                view.address = Some(*ip);
                break;
            }
            tracing::debug!(node = %a.node_id, %peer, elapsed = ?started.elapsed(), "no status");
        }
        out.push(view);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackseed_protocol::status::{ApiAddressView, Microk8sView};

    fn node(id: &str, ip: &str, role: &str, holder: bool, authority: &str) -> NodeView {
        let doc = StatusDoc {
            node_id: id.into(),
            hostname: format!("h-{id}"),
            role: Some(role.into()),
            authority: Some(authority.into()),
            microk8s: (role != "worker").then(|| Microk8sView {
                running: true,
                voters: vec![
                    "10.0.0.1:19001".into(),
                    "10.0.0.2:19001".into(),
                    "10.0.0.3:19001".into(),
                ],
                ..Default::default()
            }),
            api_address: Some(ApiAddressView {
                address: Some("10.0.0.100".into()),
                held_here: holder,
                ..Default::default()
            }),
            ..Default::default()
        };
        NodeView {
            announced: AnnouncedNode {
                node_id: id.into(),
                addresses: vec![ip.parse().unwrap()],
                port: 7443,
                fingerprint: "00".repeat(32),
                phase: Some("member".into()),
                role: Some(role.into()),
            },
            address: Some(ip.parse().unwrap()),
            raw: serde_json::to_value(&doc).unwrap(),
            doc: Some(doc),
        }
    }

    #[test]
    fn targets_are_chosen_by_what_nodes_hold() {
        let mut nodes = vec![
            node("a", "10.0.0.1", "control-plane", false, "a"),
            node("b", "10.0.0.2", "control-plane", true, "a"),
            node("c", "10.0.0.3", "control-plane", false, "a"),
            node("w", "10.0.0.4", "worker", false, "a"),
        ];
        let p = picture(&nodes);
        assert_eq!(
            p.holdings
                .iter()
                .map(|h| h.role.as_str())
                .collect::<Vec<_>>(),
            ["voter", "voter", "voter", "worker"]
        );
        assert_eq!(p.api_address, Some("10.0.0.100".parse().unwrap()));
        assert_eq!(p.newest_backup_age_s, None);
        assert_eq!(p.backup_note, "no node reports datastore backups");
        let first = |_| 0;
        assert_eq!(choose(&p, Target::Seed, first).unwrap().0, 0);
        assert_eq!(choose(&p, Target::ApiHolder, first).unwrap().0, 1);
        // A voter that does not hold the address.
        assert_eq!(choose(&p, Target::Voter, |_| 1).unwrap().0, 2);
        assert_eq!(choose(&p, Target::Worker, first).unwrap().0, 3);
        assert_eq!(choose(&p, Target::Random, |_| 3).unwrap().0, 3);
        // No worker, no address holder: clear errors.
        nodes.pop();
        for n in &mut nodes {
            n.doc.as_mut().unwrap().api_address = None;
        }
        let p = picture(&nodes);
        let e = choose(&p, Target::Worker, first).unwrap_err().to_string();
        assert!(e.contains("worker"), "{e}");
        let e = choose(&p, Target::ApiHolder, first)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no API address"), "{e}");
    }

    #[test]
    fn backup_age_comes_from_the_documents_and_is_unknown_otherwise() {
        let mut nodes = vec![
            node("a", "10.0.0.1", "control-plane", false, "a"),
            node("b", "10.0.0.2", "control-plane", true, "a"),
        ];
        nodes[0].raw["backup"] = serde_json::json!({"newest": {"age_s": 300}});
        nodes[1].raw["backup"] = serde_json::json!({"newest": {"age_s": 120}});
        let p = picture(&nodes);
        assert_eq!(p.newest_backup_age_s, Some(120));
        assert_eq!(p.holdings[0].backup_copies, Some(1));
        nodes[1].raw["backup"] = serde_json::json!({"newest": null});
        nodes[0].raw["backup"] = serde_json::json!({});
        let p = picture(&nodes);
        assert_eq!(p.newest_backup_age_s, None);
        assert_eq!(p.backup_note, "no backup taken yet");
        assert_eq!(p.holdings[1].backup_copies, Some(0));
    }
}
