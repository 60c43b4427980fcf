//! `imagebuilder build`: base -> disk -> customize -> outputs.
//!
//! [`run`] turns a [`BuildRequest`] into [`BuildOutputs`]. Every output is staged under a
//! temporary name in the output folder and renamed only at the very end, so an error, a full
//! disk or Ctrl-C ([`run_until_ctrl_c`] drops the build future; child programs are killed and
//! blocking work stops at its next chunk) leaves no file under a final name. The scratch
//! folder (bootstrapped tree, generated files) lives next to the outputs and is removed too.
//!
//! The steps run in order, each a function here taking what the earlier ones produced:
//! `check_inputs` (everything that can fail before a byte is written) -> `fetch_base` ->
//! `lay_out_disk` -> `customize_image` -> `write_outputs`. `Plan` carries what the checks
//! found, `Work` the image and its staging, `Built` what disk and customisation produced.
//!
//! To add a build step, give it its own module and a step function here called between the
//! steps it depends on; record what it put in the image in [`manifest`].

pub mod manifest;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rackseed_config::{Base, ClusterConfig, Target};
use rackseed_protocol::secret::ClusterSecret;
use serde::Serialize;

use self::manifest::{BaseRecord, ImageInfo, ImageRecord, Manifest};
use crate::base::{self, bootstrap::BootstrapSpec};
use crate::customize::firstboot_bin::{self, FirstbootBin};
use crate::customize::simulator::{self, Microk8sRecord, Microk8sSource};
use crate::customize::{self, Customized};
use crate::disk::{self, compose, PartitionTable, TableKind};
use crate::outputs::sparse::ImageDigest;
use crate::outputs::{self, bmap, sparse, Compression, Staging};
use crate::tool::{self, Tool};

/// Everything a build needs besides the network and the tools on `PATH`.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub config: ClusterConfig,
    /// The config file's text (copied into the image with `secret-file` rewritten).
    pub config_toml: String,
    /// Overrides `image.target`.
    pub target: Option<Target>,
    pub out_dir: PathBuf,
    /// The `firstboot` binary for the target; default: next to the running imagebuilder.
    pub firstboot_bin: Option<PathBuf>,
    /// The repository's `overlays/` (holding `common/`, `x86_64/`, `rpi/`).
    pub overlays_dir: PathBuf,
    /// Test-only overlays laid after the target's. Never implied.
    pub extra_overlays: Vec<PathBuf>,
    /// Where MicroK8s comes from: the snap (default) or, for QEMU test-cluster images only,
    /// the simulator (see [`crate::customize::simulator`]).
    pub microk8s: Microk8sSource,
    /// Folder with the simulator's `microk8s` and `dqlite` (default: next to imagebuilder).
    pub simulator_bin: Option<PathBuf>,
    /// Download and bootstrap cache; default `~/.cache/rackseed`.
    pub cache_dir: Option<PathBuf>,
    pub compression: Option<Compression>,
    pub qcow2: bool,
    /// Output base name; default `rackseed-<cluster>-<target>`.
    pub name: Option<String>,
    /// Progress bars on stderr.
    pub progress: bool,
}

impl BuildRequest {
    /// A request with the defaults for everything optional.
    pub fn new(
        config: ClusterConfig,
        config_toml: String,
        out_dir: PathBuf,
        overlays_dir: PathBuf,
    ) -> Self {
        BuildRequest {
            config,
            config_toml,
            target: None,
            out_dir,
            firstboot_bin: None,
            overlays_dir,
            extra_overlays: Vec::new(),
            microk8s: Microk8sSource::Snap,
            simulator_bin: None,
            cache_dir: None,
            compression: None,
            qcow2: false,
            name: None,
            progress: false,
        }
    }
}

/// Final paths of what a build produced.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOutputs {
    pub image: PathBuf,
    pub compressed: Option<PathBuf>,
    pub qcow2: Option<PathBuf>,
    pub bmap: PathBuf,
    pub sha256sums: PathBuf,
    pub manifest: PathBuf,
    /// SHA-256 of the raw image.
    pub sha256: String,
    pub warnings: Vec<String>,
    /// Seconds spent in each step, in order: base, disk, customize, outputs.
    pub timings: Vec<(&'static str, f64)>,
}

/// The default cache: `$XDG_CACHE_HOME/rackseed` or `~/.cache/rackseed`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("rackseed");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/rackseed")
}

/// Raises the flag when dropped, so blocking work started by a dropped build stops.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// [`run`], stopped cleanly by Ctrl-C (SIGINT): the error says so and nothing is left behind.
pub async fn run_until_ctrl_c(req: BuildRequest) -> Result<BuildOutputs> {
    tokio::select! {
        r = run(req) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted: the build was stopped and its partial files removed"),
    }
}

fn target_dir(t: Target) -> &'static str {
    match t {
        Target::X86_64Efi => "x86_64",
        Target::Rpi4 | Target::Rpi5 => "rpi",
    }
}

/// Builds the image: checks the inputs, then runs the steps in order.
pub async fn run(req: BuildRequest) -> Result<BuildOutputs> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(Arc::clone(&cancel));
    // Inputs that can fail cheaply come first: nothing is written before they pass.
    let plan = check_inputs(&req).await?;
    let work = Work::start(&req.out_dir, &plan.name, cancel)?;
    let mut timings = Vec::new();
    let base = timed(&mut timings, "base", fetch_base(&req, &plan, &work)).await?;
    // The base's data is only in the page cache now; write it back while customisation and
    // hashing run instead of all at the final sync (the kernel would wait ~30 s to start).
    let writeback = start_writeback(&work.image)?;
    let table = timed(
        &mut timings,
        "disk",
        lay_out_disk(&req.config, plan.target, &work.image),
    )
    .await?;
    let mut info = ImageInfo::new(
        &req.config,
        plan.target,
        &plan.firstboot,
        &plan.secret,
        base,
    );
    info.microk8s = plan.microk8s.clone();
    let custom = timed(
        &mut timings,
        "customize",
        customize_image(&req, &plan, &info, &table, &work),
    )
    .await?;
    let built = Built {
        info,
        table,
        custom,
        writeback,
    };
    let mut out = timed(
        &mut timings,
        "outputs",
        write_outputs(&req, &plan, work, built),
    )
    .await?;
    out.timings = timings;
    Ok(out)
}

/// What the checks established before anything was written.
struct Plan {
    target: Target,
    secret: ClusterSecret,
    firstboot: FirstbootBin,
    /// Overlay roots in the order they are laid.
    overlays: Vec<PathBuf>,
    /// Where MicroK8s comes from, for image.json and the manifest.
    microk8s: Microk8sRecord,
    /// The simulator's generated overlay (binaries, settings, marker), kept until the build ends.
    simulator_tree: Option<tempfile::TempDir>,
    cache: PathBuf,
    /// Output base name.
    name: String,
}

/// The image being built and the output folder's staging, shared by every step.
struct Work {
    /// The raw image, under its staging name.
    image: PathBuf,
    /// The raw image's final file name.
    image_name: String,
    /// Bootstrapped tree and generated files, next to the outputs; removed on drop.
    scratch: tempfile::TempDir,
    staging: Staging,
    /// Raised when the build is dropped; blocking work checks it.
    cancel: Arc<AtomicBool>,
}

impl Work {
    fn start(out_dir: &Path, name: &str, cancel: Arc<AtomicBool>) -> Result<Self> {
        let mut staging = Staging::new(out_dir)?;
        let scratch = tempfile::Builder::new()
            .prefix(".rackseed-work-")
            .tempdir_in(out_dir)
            .with_context(|| format!("creating scratch space in {}", out_dir.display()))?;
        let image_name = format!("{name}.img");
        let image = staging.temp(&image_name);
        Ok(Work {
            image,
            image_name,
            scratch,
            staging,
            cancel,
        })
    }

    fn bail_if_cancelled(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }
}

/// What the disk and customize steps produced, for the outputs step.
struct Built {
    info: ImageInfo,
    table: PartitionTable,
    custom: Customized,
    /// The early writeback of the base's data.
    writeback: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Runs one step, logging its start and end and recording its duration.
async fn timed<T>(
    timings: &mut Vec<(&'static str, f64)>,
    name: &'static str,
    step: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = Instant::now();
    tracing::info!("{name}: starting");
    let out = step.await?;
    tracing::info!("{name}: done in {:.1?}", started.elapsed());
    timings.push((name, started.elapsed().as_secs_f64()));
    Ok(out)
}

/// The tools, the secret, the firstboot binary, the arch and the overlays: everything that
/// can fail without writing a byte.
async fn check_inputs(req: &BuildRequest) -> Result<Plan> {
    let cfg = &req.config;
    let target = req.target.unwrap_or(cfg.image.target);
    let mut needed = vec![
        ("sfdisk", "fdisk"),
        ("debugfs", "e2fsprogs"),
        ("mke2fs", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("mcopy", "mtools"),
        ("mkfs.vfat", "dosfstools"),
    ];
    if target == Target::X86_64Efi {
        needed.push(("sgdisk", "gdisk"));
    }
    if req.qcow2 {
        needed.push(("qemu-img", "qemu-utils"));
    }
    tool::require(&needed)?;
    let secret = ClusterSecret::load(&cfg.cluster.secret_file).with_context(|| {
        format!(
            "loading the cluster secret {}",
            cfg.cluster.secret_file.display()
        )
    })?;
    let fb_path = match &req.firstboot_bin {
        Some(p) => p.clone(),
        None => firstboot_bin::default_path().context(
            "no firstboot binary next to imagebuilder; build it (cargo build -p firstboot) or pass --firstboot-bin",
        )?,
    };
    let firstboot =
        firstboot_bin::inspect(&fb_path, firstboot_bin::arch_for(target.rust_triple())).await?;
    if let Base::Bootstrap { arch, .. } = &cfg.image.base {
        if arch != target.deb_arch() {
            bail!(
                "bootstrap arch {arch:?} does not match target {} (needs {})",
                target.as_str(),
                target.deb_arch()
            );
        }
    }
    let mut overlays = check_overlays(req, target)?;
    let (microk8s, simulator_tree) = match req.microk8s {
        Microk8sSource::Snap => (Microk8sRecord::default(), None),
        Microk8sSource::Simulated => {
            simulator::check_allowed(cfg, target)?;
            let (m, d) = simulator::binaries(req.simulator_bin.as_deref(), target)?;
            let fixed = req.overlays_dir.join(simulator::OVERLAY_DIR);
            if !fixed.is_dir() {
                bail!(
                    "overlay folder {} does not exist; pass the repository's overlays/ folder",
                    fixed.display()
                );
            }
            let tree = tempfile::Builder::new()
                .prefix(".rackseed-sim-")
                .tempdir()
                .context("creating the simulator's overlay")?;
            let record = simulator::overlay(tree.path(), &m, &d)?;
            // After the target's overlay, before any --overlay: the fixed files, then the
            // generated ones.
            let at = 2.min(overlays.len());
            overlays.insert(at, tree.path().to_path_buf());
            overlays.insert(at, fixed);
            (record, Some(tree))
        }
    };
    Ok(Plan {
        target,
        secret,
        firstboot,
        overlays,
        microk8s,
        simulator_tree,
        cache: req.cache_dir.clone().unwrap_or_else(default_cache_dir),
        name: req
            .name
            .clone()
            .unwrap_or_else(|| format!("rackseed-{}-{}", cfg.cluster.name, target.as_str())),
    })
}

/// The overlay roots in order: common, the target's, then the extra ones.
fn check_overlays(req: &BuildRequest, target: Target) -> Result<Vec<PathBuf>> {
    let mut overlays = vec![
        req.overlays_dir.join("common"),
        req.overlays_dir.join(target_dir(target)),
    ];
    if !overlays[0].is_dir() {
        bail!(
            "overlay folder {} does not exist; pass the repository's overlays/ folder",
            overlays[0].display()
        );
    }
    for o in &req.extra_overlays {
        if !o.is_dir() {
            bail!("overlay {} is not a folder", o.display());
        }
        overlays.push(o.clone());
    }
    Ok(overlays)
}

/// Step 1, base: the configured base as a raw image with the official layout.
async fn fetch_base(req: &BuildRequest, plan: &Plan, work: &Work) -> Result<BaseRecord> {
    let started = Instant::now();
    let (image, cancel) = (&work.image, &work.cancel);
    let record = match &req.config.image.base {
        Base::Official { url, sha256 } => {
            let cached = base::download::fetch(url, sha256, &plan.cache, req.progress).await?;
            let format = base::materialize(&cached, image, cancel).await?;
            BaseRecord::Official {
                url: url.clone(),
                sha256: sha256.clone(),
                format,
            }
        }
        Base::Local { path, sha256 } => {
            if let Some(s) = sha256 {
                base::download::verify_file(path, s)?;
            }
            let format = base::materialize(path, image, cancel).await?;
            BaseRecord::Local {
                path: path.clone(),
                sha256: sha256.clone(),
                format,
            }
        }
        Base::Bootstrap {
            suite,
            mirror,
            arch,
            packages,
        } => {
            let spec = BootstrapSpec::new(
                suite,
                mirror.as_deref(),
                arch,
                &crate::customize::storage::bootstrap_packages(packages, req.config.addons.storage),
                Path::new("/etc/apt"),
            )?;
            let composed =
                base::bootstrap::ensure_composed(&spec, plan.target, &plan.cache).await?;
            tracing::info!("base: composed image ready at {:.1?}", started.elapsed());
            base::materialize(&composed, image, cancel).await?;
            let cache_key = spec.key();
            BaseRecord::Bootstrap {
                suite: spec.suite,
                mirror: spec.mirror,
                arch: spec.arch,
                packages: spec.packages,
                foreign: spec.foreign,
                cache_key,
            }
        }
    };
    work.bail_if_cancelled()?;
    Ok(record)
}

/// Starts flushing the image's data to disk in the background.
fn start_writeback(image: &Path) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let f = std::fs::File::open(image)
        .with_context(|| format!("opening {} for writeback", image.display()))?;
    Ok(tokio::task::spawn_blocking(move || f.sync_data()))
}

/// Step 2, disk: checks the base's layout against the target and grows it to the configured
/// size. Returns the grown table.
async fn lay_out_disk(cfg: &ClusterConfig, target: Target, image: &Path) -> Result<PartitionTable> {
    let table = disk::read_table(image)
        .await
        .context("reading the base image")?;
    let want = if target == Target::X86_64Efi {
        TableKind::Gpt
    } else {
        TableKind::Dos
    };
    if table.kind != want {
        bail!(
            "target {} needs a {:?} partition table, the base has {:?}",
            target.as_str(),
            want,
            table.kind
        );
    }
    let l = compose::labels(target);
    table
        .by_label(l.root)
        .context("finding the root filesystem")?;
    table
        .by_label(l.boot)
        .context("finding the boot filesystem")?;
    disk::grow(image, table.kind, cfg.image.disk_size).await?;
    disk::read_table(image).await
}

/// Step 3, customize: puts the config, the secret, firstboot, the overlays and `info` into
/// the image.
async fn customize_image(
    req: &BuildRequest,
    plan: &Plan,
    info: &ImageInfo,
    table: &PartitionTable,
    work: &Work,
) -> Result<Customized> {
    let image_info = serde_json::to_value(info).context("serialising the image info")?;
    let token = plan.secret.microk8s_token();
    let secret_text = plan.secret.to_file_contents();
    let inputs = customize::Inputs {
        config: &req.config,
        config_toml: &req.config_toml,
        target: plan.target,
        secret: secret_text.as_bytes(),
        microk8s_token: &token,
        firstboot: &plan.firstboot,
        overlays: &plan.overlays,
        image_info: &image_info,
    };
    customize::apply(&work.image, table, &inputs, work.scratch.path()).await
}

/// Step 4, outputs: checks and hashes the image, writes the bmap, the optional compressed and
/// qcow2 images, the manifest and `SHA256SUMS`, then gives them all their final names.
async fn write_outputs(
    req: &BuildRequest,
    plan: &Plan,
    mut work: Work,
    built: Built,
) -> Result<BuildOutputs> {
    let started = Instant::now();
    let digest = check_and_hash(&work, plan.target, &built.table).await?;
    tracing::info!("outputs: image hashed in {:.1?}", started.elapsed());
    let name = &plan.name;
    let mut sums = vec![(work.image_name.clone(), digest.sha256.clone())];
    let bmap_name = format!("{name}.bmap");
    let bmap_tmp = work.staging.temp(&bmap_name);
    outputs::write_synced(&bmap_tmp, bmap::render(&digest).as_bytes())?;
    let mut compressed = None;
    if let Some(c) = req.compression {
        let cname = format!("{}.{}", work.image_name, c.extension());
        let (sha256, path) = write_compressed(&mut work, &cname, c).await?;
        sums.push((cname, sha256));
        compressed = Some(path);
        tracing::info!("outputs: compressed at {:.1?}", started.elapsed());
    }
    let mut qcow = None;
    if req.qcow2 {
        let qname = format!("{name}.qcow2");
        let qtmp = work.staging.temp(&qname);
        outputs::qcow2(&work.image, &qtmp).await?;
        sums.push((qname.clone(), sparse::sha256_file(&qtmp)?));
        qcow = Some(work.staging.final_path(&qname));
        tracing::info!("outputs: qcow2 at {:.1?}", started.elapsed());
    }
    let image = ImageRecord {
        file: work.image_name.clone(),
        size: digest.size,
        sha256: digest.sha256.clone(),
        target: plan.target.as_str(),
        partitions: built.table.partitions.clone(),
    };
    // The simulator's generated tree is a temporary folder: the manifest records the
    // simulator under `microk8s` instead.
    let generated = plan.simulator_tree.as_ref().map(|t| t.path().to_path_buf());
    let overlays: Vec<PathBuf> = plan
        .overlays
        .iter()
        .filter(|o| Some(*o) != generated.as_ref())
        .cloned()
        .collect();
    let manifest = Manifest::new(
        built.info,
        image,
        &plan.firstboot,
        &overlays,
        &built.custom,
        &sums,
    );
    let mtmp = work.staging.temp("manifest.json");
    outputs::write_synced(&mtmp, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    sums.push(("manifest.json".into(), sparse::sha256_file(&mtmp)?));
    sums.push((bmap_name.clone(), sparse::sha256_file(&bmap_tmp)?));
    let stmp = work.staging.temp("SHA256SUMS");
    outputs::write_synced(&stmp, outputs::sha256sums(&sums).as_bytes())?;
    work.bail_if_cancelled()?;
    // The early writeback has flushed the base's data; this flushes what customisation wrote.
    built
        .writeback
        .await
        .context("writeback task failed")?
        .with_context(|| format!("writing back {}", work.image.display()))?;
    outputs::sync_file(&work.image)?;
    work.staging.commit()?;
    Ok(BuildOutputs {
        image: req.out_dir.join(&work.image_name),
        compressed,
        qcow2: qcow,
        bmap: req.out_dir.join(&bmap_name),
        sha256sums: req.out_dir.join("SHA256SUMS"),
        manifest: req.out_dir.join("manifest.json"),
        sha256: digest.sha256,
        warnings: built.custom.warnings,
        timings: Vec::new(),
    })
}

/// Checks the root filesystem read-only while hashing the image (both only read).
async fn check_and_hash(
    work: &Work,
    target: Target,
    table: &PartitionTable,
) -> Result<ImageDigest> {
    let root = table.by_label(compose::labels(target).root)?;
    let fsck = Tool::new("e2fsck")
        .args(["-f", "-n"])
        .arg(format!("{}?offset={}", work.image.display(), root.start))
        .timeout(Duration::from_secs(600))
        .run();
    let hashing = {
        let (w, c) = (work.image.clone(), Arc::clone(&work.cancel));
        tokio::task::spawn_blocking(move || sparse::digest_image(&w, 4096, &c))
    };
    let (checked, digest) = tokio::join!(fsck, hashing);
    checked.context("the customised root filesystem does not check clean")?;
    digest.context("hashing task failed")?
}

/// Stages the image compressed with `c` as `cname`; returns its SHA-256 and final path.
async fn write_compressed(
    work: &mut Work,
    cname: &str,
    c: Compression,
) -> Result<(String, PathBuf)> {
    let ctmp = work.staging.temp(cname);
    let cfile =
        std::fs::File::create(&ctmp).with_context(|| format!("creating {}", ctmp.display()))?;
    let (w, t, cc) = (work.image.clone(), ctmp.clone(), Arc::clone(&work.cancel));
    tokio::task::spawn_blocking(move || outputs::compress(&w, cfile, &t, c, &cc))
        .await
        .context("compression task failed")??;
    Ok((sparse::sha256_file(&ctmp)?, work.staging.final_path(cname)))
}

/// Arguments of `imagebuilder build`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// The cluster config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Target, overriding the config's `image.target`: x86_64-efi, rpi4 or rpi5.
    #[arg(long)]
    pub target: Option<Target>,
    /// Output folder.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// The firstboot binary for the target (default: next to imagebuilder; aarch64 targets
    /// need one built for aarch64).
    #[arg(long)]
    pub firstboot_bin: Option<PathBuf>,
    /// The overlays folder holding common/, x86_64/ and rpi/.
    #[arg(long, env = "RACKSEED_OVERLAYS", default_value = "overlays")]
    pub overlays: PathBuf,
    /// An extra overlay tree laid after the target's (test images only). Repeatable.
    #[arg(long = "overlay")]
    pub extra_overlays: Vec<PathBuf>,
    /// Where the nodes get MicroK8s: `snap` (installed at first boot), or `simulated`: rackseed's
    /// MicroK8s simulator, for QEMU test-cluster images where the snap cannot be had (refused
    /// for boards and non-bootstrapped bases; shown as "MicroK8s simulated").
    #[arg(long, value_enum, default_value = "snap")]
    pub microk8s: Microk8sSource,
    /// Folder with the simulator's `microk8s` and `dqlite` for the target (default: next to
    /// imagebuilder; `cargo build --release -p microk8s-sim`).
    #[arg(long)]
    pub simulator_bin: Option<PathBuf>,
    /// Also write a compressed image: xz or zstd.
    #[arg(long)]
    pub compress: Option<Compression>,
    /// Also write a qcow2 image (for QEMU).
    #[arg(long)]
    pub qcow2: bool,
    /// Download and bootstrap cache (default ~/.cache/rackseed).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Output base name (default `rackseed-<cluster>-<target>`).
    #[arg(long)]
    pub name: Option<String>,
}

/// `imagebuilder build`: loads and validates the config, builds, prints what was written.
/// Ctrl-C stops the build and removes its partial files.
pub fn run_cli(args: BuildArgs) -> Result<()> {
    let loaded = rackseed_config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cluster = loaded.config.cluster.name.clone();
    let target = args.target.unwrap_or(loaded.config.image.target);
    let mut req = BuildRequest::new(loaded.config, text, args.out, args.overlays);
    req.target = args.target;
    req.firstboot_bin = args.firstboot_bin;
    req.extra_overlays = args.extra_overlays;
    req.microk8s = args.microk8s;
    req.simulator_bin = args.simulator_bin;
    req.compression = args.compress;
    req.qcow2 = args.qcow2;
    req.cache_dir = args.cache_dir;
    req.name = args.name;
    req.progress = true;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let out = rt.block_on(run_until_ctrl_c(req))?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    println!("image:      {}", out.image.display());
    if let Some(c) = &out.compressed {
        println!("compressed: {}", c.display());
    }
    if let Some(q) = &out.qcow2 {
        println!("qcow2:      {}", q.display());
    }
    println!("bmap:       {}", out.bmap.display());
    println!("sums:       {}", out.sha256sums.display());
    println!("manifest:   {}", out.manifest.display());
    println!("sha256:     {}", out.sha256);
    if let Some(path) = write_os_list(&cluster, target, &out)? {
        println!(
            "os_list:    {} (Raspberry Pi Imager: use custom repository)",
            path.display()
        );
    }
    Ok(())
}

/// Writes `<image>.os_list.json` next to a compressed Raspberry Pi image, so Raspberry Pi
/// Imager can offer it from a custom repository. Nothing for x86 or uncompressed images.
fn write_os_list(cluster: &str, target: Target, out: &BuildOutputs) -> Result<Option<PathBuf>> {
    use sha2::Digest;
    let Some(download) = &out.compressed else {
        return Ok(None);
    };
    let hash_file = |p: &Path| -> Result<(u64, String)> {
        let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        let mut h = sha2::Sha256::new();
        let n = std::io::copy(&mut f, &mut h)?;
        Ok((n, hex::encode(h.finalize())))
    };
    let (download_size, download_sha256) = hash_file(download)?;
    let raw_size = std::fs::metadata(&out.image)?.len();
    let abs = std::fs::canonicalize(download)?;
    let doc = crate::os_list::os_list_for(&crate::os_list::BuiltImage {
        cluster,
        target,
        url: format!("file://{}", abs.display()),
        raw_size,
        raw_sha256: out.sha256.clone(),
        download_size,
        download_sha256,
        release_date: humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10]
            .to_owned(),
    });
    let Some(doc) = doc else {
        return Ok(None);
    };
    let path = out.image.with_extension("os_list.json");
    rackseed_host::fs::write_atomic(&path, &serde_json::to_vec_pretty(&doc)?, 0o644)?;
    Ok(Some(path))
}
