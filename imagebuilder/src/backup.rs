//! `imagebuilder backup pull` and `imagebuilder restore`: the cluster's datastore backups on
//! the workstation, and the guided restore.
//!
//! Both find the control-plane members over mDNS (announcing nothing,
//! [`crate::status::ClusterBrowser`]) and talk to their coordinators over TLS pinned to the
//! announced fingerprint, every request signed with the cluster secret
//! (`rackseed_protocol::coordinator::backup`).
//!
//! **pull** lists what every control-plane member holds, and fetches each archive this folder
//! does not hold yet from a member that has it, with a progress bar. Each is verified against
//! its signed manifest (this cluster's secret and name, size, SHA-256, the tar.gz layout
//! `microk8s dbctl backup` writes) before it is written: archive then manifest, each through a
//! temporary file renamed into place (mode 0600, in a 0700 folder), so nothing is ever
//! half-written under a final name. An archive that fails the checks is reported and not
//! written.
//!
//! **restore** first checks the archive on the workstation (manifest beside it,
//! `NAME.manifest.json`): a damaged, truncated, renamed or foreign archive (another cluster's
//! secret or name) is refused with the reason before any node is contacted, so nothing
//! changes. Then one control-plane member restores: `--node`, else the node that takes the
//! backups (the record's slot authority, as its status says), else the first by id. It runs
//! `microk8s dbctl restore` on its own datastore; the other nodes do nothing, as the keys
//! reach them through dqlite's replication. What MicroK8s' restore does, and what the
//! confirmation says: every key in the archive is created or overwritten; keys created after
//! the backup are **not** deleted; the agents' cluster record (membership, join slots) is not
//! in the datastore and stays as it is. Keys MicroK8s failed to write are listed and make the
//! command fail.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_protocol::coordinator::backup::{verify_archive, BackupManifest, RestoreReport};
use rackseed_protocol::coordinator::CoordinatorClient;
use rackseed_protocol::discovery::InterfaceChoice;
use rackseed_protocol::secret::ClusterSecret;

use crate::status::{workstation_client, AnnouncedNode, ClusterBrowser};

/// What both commands need.
#[derive(Debug, Clone)]
pub struct BackupAccess {
    pub secret: ClusterSecret,
    pub cluster_name: String,
    /// Control-plane members expected (stop browsing once this many are seen).
    pub control_plane: usize,
    pub interfaces: InterfaceChoice,
    /// How long to look for control-plane members.
    pub timeout: Duration,
}

impl BackupAccess {
    /// From the cluster config: its name, its secret file and its control-plane size.
    pub fn from_config(config: &Path, interfaces: InterfaceChoice) -> Result<Self> {
        let loaded = rackseed_config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = &loaded.config.cluster;
        let secret = ClusterSecret::load(&c.secret_file)
            .context("reading the cluster secret (the file that went into the images)")?;
        Ok(BackupAccess {
            secret,
            cluster_name: c.name.clone(),
            control_plane: usize::from(c.control_plane),
            interfaces,
            timeout: Duration::from_secs(20),
        })
    }
}

/// Browses until `expected` control-plane members are seen or `timeout` passes; returns them
/// sorted by id.
async fn control_plane_members(access: &BackupAccess) -> Result<Vec<AnnouncedNode>> {
    let mut browser = ClusterBrowser::start(&access.secret, access.interfaces.clone())?;
    let deadline = Instant::now() + access.timeout;
    loop {
        browser.drain();
        let mut cps: Vec<AnnouncedNode> = browser
            .nodes()
            .into_iter()
            .filter(|n| n.is_control_plane_member() && !n.addresses.is_empty())
            .collect();
        cps.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        if cps.len() >= access.control_plane || Instant::now() >= deadline {
            if cps.is_empty() {
                bail!(
                    "no control-plane member of cluster {:?} announced itself over mDNS within {}s",
                    access.cluster_name,
                    access.timeout.as_secs()
                );
            }
            return Ok(cps);
        }
        let pause =
            Duration::from_millis(300).min(deadline.saturating_duration_since(Instant::now()));
        browser.collect_for(pause).await;
    }
}

/// The first address of `node` that answers `f`.
fn addrs(node: &AnnouncedNode) -> Vec<SocketAddr> {
    node.addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, node.port))
        .collect()
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    rackseed_host::fs::write_atomic(path, bytes, 0o600)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// What `pull` did.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Archives written.
    pub written: Vec<String>,
    /// Archives already in the folder with the same checksum.
    pub present: Vec<String>,
    /// Archives that could not be fetched or failed the checks, with the reason.
    pub failed: Vec<(String, String)>,
    /// Archives listed but pruned by every holder before they could be fetched (a newer
    /// backup replaced them): not an error.
    pub gone: Vec<String>,
}

/// `imagebuilder backup pull`: see the module docs.
pub async fn pull(access: &BackupAccess, out_dir: &Path, progress: bool) -> Result<Pulled> {
    create_private_dir(out_dir)?;
    let members = control_plane_members(access).await?;
    let client = workstation_client(&access.secret, Duration::from_secs(30));
    // Which node holds which archive.
    let mut holders: BTreeMap<String, (BackupManifest, Vec<(SocketAddr, String)>)> =
        BTreeMap::new();
    let mut list_errors = Vec::new();
    for node in &members {
        let mut listed = false;
        for peer in addrs(node) {
            match client.backup_list(peer, &node.fingerprint).await {
                Ok(list) => {
                    for m in list {
                        let e = holders.entry(m.name.clone()).or_insert((m, Vec::new()));
                        e.1.push((peer, node.fingerprint.clone()));
                    }
                    listed = true;
                    break;
                }
                Err(e) => list_errors.push(format!("{}: {e}", node.node_id)),
            }
        }
        if !listed {
            tracing::warn!(node = %node.node_id, "could not list its backups");
        }
    }
    if holders.is_empty() {
        let mut msg = format!(
            "no backup found on the control-plane members ({})",
            members
                .iter()
                .map(|n| n.node_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for e in &list_errors {
            msg.push_str(&format!("\n  {e}"));
        }
        bail!(msg);
    }
    let mut pulled = Pulled::default();
    for (name, (listed, sources)) in holders {
        let apath = out_dir.join(listed.archive_file());
        if let Ok(existing) = std::fs::read(&apath) {
            if rackseed_protocol::coordinator::backup::sha256_hex(&existing) == listed.sha256 {
                pulled.present.push(name);
                continue;
            }
        }
        match fetch_one(&client, access, &name, listed.size, &sources, progress).await {
            Ok((manifest, archive)) => {
                write_private(&apath, &archive)?;
                write_private(
                    &out_dir.join(manifest.manifest_file()),
                    &serde_json::to_vec_pretty(&manifest)?,
                )?;
                pulled.written.push(name);
            }
            Err(FetchError::Gone) => pulled.gone.push(name),
            Err(FetchError::Failed(e)) => pulled.failed.push((name, format!("{e:#}"))),
        }
    }
    Ok(pulled)
}

async fn fetch_one(
    client: &CoordinatorClient,
    access: &BackupAccess,
    name: &str,
    size: u64,
    sources: &[(SocketAddr, String)],
    progress: bool,
) -> Result<(BackupManifest, Vec<u8>), FetchError> {
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message(name.to_string());
        b
    });
    let mut last = None;
    let mut all_404 = true;
    for (peer, fp) in sources {
        let b = bar.clone();
        let mut report = move |got: u64, _total: Option<u64>| {
            if let Some(b) = &b {
                b.set_position(got);
            }
        };
        match client.backup_fetch(*peer, fp, name, &mut report).await {
            Ok((manifest, archive)) => {
                if manifest.name != name {
                    all_404 = false;
                    last = Some(anyhow::anyhow!("{peer} answered with {}", manifest.name));
                    continue;
                }
                match verify_archive(
                    &manifest,
                    &archive,
                    std::slice::from_ref(&access.secret),
                    Some(&access.cluster_name),
                ) {
                    Ok(_) => {
                        if let Some(b) = &bar {
                            b.finish_with_message(format!("{name} (checksum verified)"));
                        }
                        return Ok((manifest, archive));
                    }
                    Err(e) => {
                        all_404 = false;
                        last = Some(anyhow::anyhow!("from {peer}: {e}"))
                    }
                }
            }
            Err(e) => {
                all_404 &= e.status() == Some(404);
                last = Some(anyhow::anyhow!("{e}"))
            }
        }
    }
    if let Some(b) = &bar {
        b.abandon_with_message(format!("{name}: not pulled"));
    }
    if all_404 && !sources.is_empty() {
        return Err(FetchError::Gone);
    }
    Err(FetchError::Failed(
        last.unwrap_or_else(|| anyhow::anyhow!("no node holds it")),
    ))
}

enum FetchError {
    Gone,
    Failed(anyhow::Error),
}

/// The manifest beside an archive: `NAME.manifest.json` for `NAME.tar.gz`.
pub fn manifest_path(archive: &Path) -> Result<PathBuf> {
    let file = archive
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .with_context(|| format!("{} names no file", archive.display()))?;
    let Some(name) = file.strip_suffix(".tar.gz") else {
        bail!(
            "{} is not a .tar.gz as `microk8s dbctl backup` writes",
            archive.display()
        );
    };
    Ok(archive.with_file_name(format!("{name}.manifest.json")))
}

/// Reads an archive and the manifest beside it and runs every check
/// ([`verify_archive`]): this cluster's secret and name, size, checksum, layout, key count, and
/// that the file still has its original name (restore finds the folder inside by it).
pub fn verify_local(
    archive_path: &Path,
    secret: &ClusterSecret,
    cluster_name: &str,
) -> Result<(BackupManifest, Vec<u8>)> {
    let mpath = manifest_path(archive_path)?;
    let manifest: BackupManifest =
        serde_json::from_slice(&std::fs::read(&mpath).with_context(|| {
            format!(
                "reading the manifest {} (pulled with the archive by `imagebuilder backup pull`)",
                mpath.display()
            )
        })?)
        .with_context(|| format!("{} is not a backup manifest", mpath.display()))?;
    let file = archive_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if file != manifest.archive_file() {
        bail!(
            "{} was renamed (its manifest names {}): MicroK8s restores from the folder named after the file, so a renamed archive would restore nothing; rename it back",
            archive_path.display(),
            manifest.archive_file()
        );
    }
    let archive = std::fs::read(archive_path)
        .with_context(|| format!("reading {}", archive_path.display()))?;
    verify_archive(
        &manifest,
        &archive,
        std::slice::from_ref(secret),
        Some(cluster_name),
    )
    .with_context(|| format!("refusing to restore {}", archive_path.display()))?;
    Ok((manifest, archive))
}

/// What the person confirms before a restore.
pub fn restore_plan(m: &BackupManifest, node: &str) -> String {
    let mut s = format!(
        "Restore backup {} of cluster {:?} (taken by {}, {} keys, {} bytes) on {node}:\n\
         - {node} runs `microk8s dbctl restore {}`: every key in the archive is created or overwritten;\n\
         - objects created after the backup are NOT deleted (MicroK8s' restore deletes nothing);\n\
         - the other nodes do nothing: dqlite replicates the restored keys to them;\n\
         - the agents' cluster record (membership, join slots, backup schedule) is not in the datastore and stays as it is.",
        m.name, m.cluster_name, m.origin, m.keys, m.size, m.archive_file()
    );
    if let Some(why) = &m.suspect {
        s.push_str(&format!(
            "\nWARNING: this backup was flagged as suspect: {why}"
        ));
    }
    s
}

/// `imagebuilder restore`: see the module docs. `confirm` is asked with the plan and must say
/// yes.
pub async fn restore(
    access: &BackupAccess,
    archive_path: &Path,
    node: Option<&str>,
    confirm: &mut dyn FnMut(&str) -> Result<bool>,
) -> Result<RestoreReport> {
    let (manifest, archive) = verify_local(archive_path, &access.secret, &access.cluster_name)?;
    let members = control_plane_members(access).await?;
    let client = workstation_client(&access.secret, Duration::from_secs(30));
    let chosen = match node {
        Some(id) => members
            .iter()
            .find(|n| n.node_id == id)
            .with_context(|| {
                format!(
                    "{id} is not a control-plane member seen on the network (seen: {})",
                    members
                        .iter()
                        .map(|n| n.node_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
            .clone(),
        None => {
            let mut scheduler = None;
            for n in &members {
                for peer in addrs(n) {
                    if let Ok(doc) = client.status(peer, &n.fingerprint).await {
                        if doc["backup"]["scheduler"] == serde_json::json!(true) {
                            scheduler = Some(n.clone());
                        }
                        break;
                    }
                }
                if scheduler.is_some() {
                    break;
                }
            }
            scheduler.unwrap_or_else(|| members[0].clone())
        }
    };
    if !confirm(&restore_plan(&manifest, &chosen.node_id))? {
        bail!("not confirmed; nothing was changed");
    }
    let mut last = None;
    for peer in addrs(&chosen) {
        match client
            .backup_restore(peer, &chosen.fingerprint, &manifest, &archive)
            .await
        {
            Ok(report) => {
                if !report.failed.is_empty() {
                    let shown: Vec<&str> =
                        report.failed.iter().take(20).map(String::as_str).collect();
                    bail!(
                        "{} restored {} of {} keys; MicroK8s failed to write {}: {}{}",
                        report.node,
                        report.restored,
                        manifest.keys,
                        report.failed.len(),
                        shown.join(", "),
                        if report.failed.len() > shown.len() {
                            ", …"
                        } else {
                            ""
                        }
                    );
                }
                return Ok(report);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "restore on {} failed: {}",
        chosen.node_id,
        last.map(|e| e.to_string())
            .unwrap_or_else(|| "no address".into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_sits_beside_the_archive() {
        assert_eq!(
            manifest_path(Path::new("/x/backup-1.tar.gz")).unwrap(),
            PathBuf::from("/x/backup-1.manifest.json")
        );
        assert!(manifest_path(Path::new("/x/backup-1.zip")).is_err());
    }
}

/// `imagebuilder backup …`.
#[derive(Debug, clap::Subcommand)]
pub enum BackupCli {
    /// Copy the cluster's datastore backups to this machine (only those not already in DIR),
    /// each checked against its signed manifest; files mode 0600.
    Pull(PullArgs),
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The cluster config (name, secret file, control-plane size).
    #[arg(long)]
    pub config: PathBuf,
    /// The folder to copy the archives into (created 0700).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Browse mDNS only on this interface (repeatable; default: every physical interface).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// How long to look for the control-plane members, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The cluster config (name, secret file, control-plane size).
    #[arg(long)]
    pub config: PathBuf,
    /// The archive, `NAME.tar.gz`, with `NAME.manifest.json` beside it (as `backup pull`
    /// writes them).
    pub archive: PathBuf,
    /// The control-plane node that restores (default: the one that takes the backups).
    #[arg(long)]
    pub node: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Browse mDNS only on this interface (repeatable; default: every physical interface).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// How long to look for the control-plane members, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn interfaces(names: &[String]) -> InterfaceChoice {
    if names.is_empty() {
        InterfaceChoice::Auto
    } else {
        InterfaceChoice::Named(names.to_vec())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `imagebuilder backup …`.
pub fn run_cli(cmd: BackupCli) -> Result<()> {
    let BackupCli::Pull(args) = cmd;
    let mut access = BackupAccess::from_config(&args.config, interfaces(&args.interfaces))?;
    access.timeout = args.timeout;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let pulled = runtime()?.block_on(pull(&access, &args.output, progress))?;
    for n in &pulled.written {
        println!("pulled {n} (checksum verified)");
    }
    for n in &pulled.present {
        println!("already here: {n}");
    }
    for n in &pulled.gone {
        println!("pruned by the nodes before it could be pulled: {n}");
    }
    for (n, why) in &pulled.failed {
        eprintln!("not pulled: {n}: {why}");
    }
    if !pulled.failed.is_empty() {
        bail!(
            "{} backup(s) could not be pulled; nothing half-written was left in {}",
            pulled.failed.len(),
            args.output.display()
        );
    }
    Ok(())
}

/// Runs `imagebuilder restore`.
pub fn run_restore_cli(args: RestoreArgs) -> Result<()> {
    let mut access = BackupAccess::from_config(&args.config, interfaces(&args.interfaces))?;
    access.timeout = args.timeout;
    let yes = args.yes;
    let mut confirm = |plan: &str| -> Result<bool> {
        eprintln!("{plan}");
        if yes {
            Ok(true)
        } else {
            rackseed_host::terminal::confirm("Restore this backup?")
        }
    };
    let report = runtime()?.block_on(restore(
        &access,
        &args.archive,
        args.node.as_deref(),
        &mut confirm,
    ))?;
    println!(
        "{} restored {} keys from {}",
        report.node, report.restored, report.name
    );
    Ok(())
}
