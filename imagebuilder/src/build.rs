//! `imagebuilder build`: base -> disk -> customize -> outputs.
//!
//! [`run`] turns a [`BuildRequest`] into [`BuildOutputs`]. Every output is staged under a
//! temporary name in the output folder and renamed only at the very end, so an error, a full
//! disk or Ctrl-C ([`run_until_ctrl_c`] drops the build future; child programs are killed and
//! blocking work stops at its next chunk) leaves no file under a final name. The scratch
//! folder (bootstrapped tree, generated files) lives next to the outputs and is removed too.
//!
//! To add a build step, give it its own module and call it here between the steps it depends
//! on; record what it put in the image in the manifest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_config::{Base, ClusterConfig, Target};
use rackseed_protocol::secret::ClusterSecret;
use serde::Serialize;
use serde_json::json;

use crate::base::{self, bootstrap::BootstrapSpec};
use crate::customize::{self, firstboot_bin};
use crate::disk::{self, compose, TableKind};
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
    /// Test-only overlays laid after the target's (e.g. the MicroK8s simulator). Never implied.
    pub extra_overlays: Vec<PathBuf>,
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

/// Builds the image.
pub async fn run(req: BuildRequest) -> Result<BuildOutputs> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(Arc::clone(&cancel));
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

    // Inputs that can fail cheaply come first: nothing is written before they pass.
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
    let fb =
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
    let cache = req.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("rackseed-{}-{}", cfg.cluster.name, target.as_str()));

    let mut staging = Staging::new(&req.out_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix(".rackseed-work-")
        .tempdir_in(&req.out_dir)
        .with_context(|| format!("creating scratch space in {}", req.out_dir.display()))?;
    let img_name = format!("{name}.img");
    let work = staging.temp(&img_name);

    // base -> raw image with the official layout
    let mut timings = Vec::new();
    let step = std::time::Instant::now();
    tracing::info!("base: starting");
    let base_record = match &cfg.image.base {
        Base::Official { url, sha256 } => {
            let cached = base::download::fetch(url, sha256, &cache, req.progress).await?;
            let fmt = base::materialize(&cached, &work, &cancel).await?;
            json!({"kind": "official", "url": url, "sha256": sha256, "format": fmt})
        }
        Base::Local { path, sha256 } => {
            if let Some(s) = sha256 {
                base::download::verify_file(path, s)?;
            }
            let fmt = base::materialize(path, &work, &cancel).await?;
            json!({"kind": "local", "path": path, "sha256": sha256, "format": fmt})
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
                packages,
                Path::new("/etc/apt"),
            )?;
            let composed = base::bootstrap::ensure_composed(&spec, target, &cache).await?;
            tracing::info!("base: composed image ready at {:.1?}", step.elapsed());
            base::materialize(&composed, &work, &cancel).await?;
            json!({"kind": "bootstrap", "suite": spec.suite, "mirror": spec.mirror, "arch": spec.arch,
                   "packages": spec.packages, "foreign": spec.foreign, "cache_key": spec.key()})
        }
    };
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }

    tracing::info!("base: done in {:.1?}", step.elapsed());
    timings.push(("base", step.elapsed().as_secs_f64()));
    // The base's data is only in the page cache now; write it back while customisation and
    // hashing run instead of all at the final sync (the kernel would wait ~30 s to start).
    let early_writeback = {
        let f = std::fs::File::open(&work)
            .with_context(|| format!("opening {} for writeback", work.display()))?;
        tokio::task::spawn_blocking(move || f.sync_data())
    };
    // disk: layout check, grow
    let step = std::time::Instant::now();
    tracing::info!("disk: starting");
    let table = disk::read_table(&work)
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
    disk::grow(&work, table.kind, cfg.image.disk_size).await?;
    let table = disk::read_table(&work).await?;

    tracing::info!("disk: done in {:.1?}", step.elapsed());
    timings.push(("disk", step.elapsed().as_secs_f64()));
    // customize
    let step = std::time::Instant::now();
    tracing::info!("customize: starting");
    let image_info = json!({
        "builder": {"name": "rackseed imagebuilder", "version": env!("CARGO_PKG_VERSION")},
        "target": target.as_str(),
        "firstboot": {"version": fb.version, "arch": fb.arch, "sha256": fb.sha256},
        "cluster": {
            "name": cfg.cluster.name,
            "control_plane": cfg.cluster.control_plane,
            "expected_nodes": cfg.cluster.expected_nodes,
            "inventory_nodes": cfg.nodes.len(),
            "microk8s_channel": cfg.microk8s.channel,
            "storage": cfg.addons.storage,
            "metallb": cfg.addons.metallb.is_some(),
            "cluster_tag": secret.cluster_tag(),
        },
        "base": base_record,
    });
    let token = secret.microk8s_token();
    let secret_text = secret.to_file_contents();
    let inputs = customize::Inputs {
        config: cfg,
        config_toml: &req.config_toml,
        target,
        secret: secret_text.as_bytes(),
        microk8s_token: &token,
        firstboot: &fb,
        overlays: &overlays,
        image_info: &image_info,
    };
    let custom = customize::apply(&work, &table, &inputs, scratch.path()).await?;
    tracing::info!("customize: done in {:.1?}", step.elapsed());
    timings.push(("customize", step.elapsed().as_secs_f64()));

    // outputs; the read-only filesystem check runs next to the hashing (both only read).
    let step = std::time::Instant::now();
    tracing::info!("outputs: starting");
    let root = table.by_label(l.root)?;
    let fsck = Tool::new("e2fsck")
        .args(["-f", "-n"])
        .arg(format!("{}?offset={}", work.display(), root.start))
        .timeout(Duration::from_secs(600))
        .run();
    let hashing = {
        let (w, c) = (work.clone(), Arc::clone(&cancel));
        tokio::task::spawn_blocking(move || sparse::digest_image(&w, 4096, &c))
    };
    let (checked, digest) = tokio::join!(fsck, hashing);
    checked.context("the customised root filesystem does not check clean")?;
    let digest = digest.context("hashing task failed")??;
    tracing::info!("outputs: image hashed in {:.1?}", step.elapsed());
    let mut sums = vec![(img_name.clone(), digest.sha256.clone())];
    let bmap_name = format!("{name}.bmap");
    let bmap_tmp = staging.temp(&bmap_name);
    outputs::write_synced(&bmap_tmp, bmap::render(&digest).as_bytes())?;
    let mut compressed = None;
    if let Some(c) = req.compression {
        let cname = format!("{img_name}.{}", c.extension());
        let ctmp = staging.temp(&cname);
        let cfile =
            std::fs::File::create(&ctmp).with_context(|| format!("creating {}", ctmp.display()))?;
        let (w, t, cc) = (work.clone(), ctmp.clone(), Arc::clone(&cancel));
        tokio::task::spawn_blocking(move || outputs::compress(&w, cfile, &t, c, &cc))
            .await
            .context("compression task failed")??;
        sums.push((cname.clone(), sparse::sha256_file(&ctmp)?));
        compressed = Some(staging.final_path(&cname));
        tracing::info!("outputs: compressed at {:.1?}", step.elapsed());
    }
    let mut qcow = None;
    if req.qcow2 {
        let qname = format!("{name}.qcow2");
        let qtmp = staging.temp(&qname);
        outputs::qcow2(&work, &qtmp).await?;
        sums.push((qname.clone(), sparse::sha256_file(&qtmp)?));
        qcow = Some(staging.final_path(&qname));
        tracing::info!("outputs: qcow2 at {:.1?}", step.elapsed());
    }
    let manifest = json!({
        "image": {"file": img_name, "size": digest.size, "sha256": digest.sha256, "target": target.as_str(),
                  "partitions": table.partitions},
        "builder": {"version": env!("CARGO_PKG_VERSION")},
        "base": image_info["base"],
        "firstboot": {"version": fb.version, "arch": fb.arch, "sha256": fb.sha256, "source": fb.path},
        "cluster": image_info["cluster"],
        "overlays": overlays,
        "files": custom.files,
        "cmdline": custom.cmdline,
        "outputs": sums.iter().map(|(n, s)| json!({"file": n, "sha256": s})).collect::<Vec<_>>(),
        "warnings": custom.warnings,
    });
    let mtmp = staging.temp("manifest.json");
    outputs::write_synced(&mtmp, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    sums.push(("manifest.json".into(), sparse::sha256_file(&mtmp)?));
    sums.push((bmap_name.clone(), sparse::sha256_file(&bmap_tmp)?));
    let stmp = staging.temp("SHA256SUMS");
    outputs::write_synced(&stmp, outputs::sha256sums(&sums).as_bytes())?;
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    // The early writeback has flushed the base's data; this flushes what customisation wrote.
    early_writeback
        .await
        .context("writeback task failed")?
        .with_context(|| format!("writing back {}", work.display()))?;
    outputs::sync_file(&work)?;
    staging.commit()?;
    tracing::info!("outputs: done in {:.1?}", step.elapsed());
    timings.push(("outputs", step.elapsed().as_secs_f64()));
    Ok(BuildOutputs {
        image: req.out_dir.join(&img_name),
        compressed,
        qcow2: qcow,
        bmap: req.out_dir.join(&bmap_name),
        sha256sums: req.out_dir.join("SHA256SUMS"),
        manifest: req.out_dir.join("manifest.json"),
        sha256: digest.sha256,
        warnings: custom.warnings,
        timings,
    })
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
