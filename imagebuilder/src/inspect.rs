//! `imagebuilder inspect IMAGE`: what is inside a built image, read without mounting: the
//! partitions (found by label), the rackseed files (`/etc/rackseed/image.json`: config summary,
//! firstboot version and arch), whether the secret is present and its mode, and the kernel
//! command line. The secret's content is never read into the report.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::customize::ext4::Ext4;
use crate::customize::{CONFIG_PATH, FIRSTBOOT_PATH, INFO_PATH, LAUNCH_PATH, SECRET_PATH};
use crate::disk::fat::FatVolume;
use crate::disk::{read_table, PartitionTable};

/// What `inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub table: PartitionTable,
    /// Label of the root filesystem (`writable` or `cloudimg-rootfs`).
    pub root_label: String,
    /// `/etc/rackseed/image.json` as written by the build.
    pub info: Option<serde_json::Value>,
    pub config_present: bool,
    /// Permission bits of the secret file, e.g. `0600`; `None` when absent. Never its content.
    pub secret_mode: Option<String>,
    pub launch_config_present: bool,
    pub firstboot_mode: Option<String>,
    pub cmdline: Option<String>,
}

/// Inspects the image at `path`.
pub async fn run(path: &Path) -> Result<Report> {
    let table = read_table(path).await?;
    let root = ["writable", "cloudimg-rootfs"]
        .iter()
        .find_map(|l| table.by_label(l).ok())
        .context("no rackseed root filesystem (labelled writable or cloudimg-rootfs) in the image")?
        .clone();
    let root_label = root.label.clone().unwrap_or_default();
    let scratch = tempfile::tempdir()?;
    let fs = Ext4::new(path, root.start);
    let info = match fs.read(INFO_PATH, scratch.path()).await? {
        Some(b) => Some(
            serde_json::from_slice(&b)
                .with_context(|| format!("parsing {INFO_PATH} in the image"))?,
        ),
        None => None,
    };
    let dirs: BTreeSet<String> = ["/etc/rackseed", "/etc", "/usr/local/bin"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let listing = fs.list(&dirs, scratch.path()).await?;
    let mode_of = |path: &str| -> Option<String> {
        let (dir, name) = path.rsplit_once('/')?;
        listing
            .get(dir)?
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .map(|e| format!("{:04o}", e.mode & 0o7777))
    };
    let cmdline = if let Ok(b) = table.by_label("system-boot") {
        FatVolume::new(path, b.start)
            .read("cmdline.txt", scratch.path())
            .await?
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
    } else if let Ok(b) = table.by_label("UEFI") {
        crate::customize::loader_options(&FatVolume::new(path, b.start), scratch.path()).await?
    } else {
        None
    };
    if info.is_none() && mode_of(FIRSTBOOT_PATH).is_none() {
        bail!(
            "{} has no rackseed files ({INFO_PATH} and {FIRSTBOOT_PATH} are missing)",
            path.display()
        );
    }
    Ok(Report {
        image: path.to_path_buf(),
        root_label,
        info,
        config_present: mode_of(CONFIG_PATH).is_some(),
        secret_mode: mode_of(SECRET_PATH),
        launch_config_present: mode_of(LAUNCH_PATH).is_some(),
        firstboot_mode: mode_of(FIRSTBOOT_PATH),
        cmdline,
        table,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image: {}", self.image.display())?;
        writeln!(f, "partition table: {:?}", self.table.kind)?;
        for p in &self.table.partitions {
            writeln!(
                f,
                "  p{:<3} start {:>12}  size {:>12}  {:<7} {}",
                p.number,
                p.start,
                p.size,
                format!("{:?}", p.fs).to_lowercase(),
                p.label.as_deref().unwrap_or("-")
            )?;
        }
        writeln!(f, "root filesystem: {}", self.root_label)?;
        if let Some(i) = &self.info {
            let g = |a: &str, b: &str| i[a][b].to_string().trim_matches('"').to_string();
            writeln!(f, "target: {}", i["target"].as_str().unwrap_or("?"))?;
            writeln!(
                f,
                "cluster: {} (control plane {}, expected nodes {}, inventory {}, storage {}, metallb {})",
                g("cluster", "name"),
                g("cluster", "control_plane"),
                g("cluster", "expected_nodes"),
                g("cluster", "inventory_nodes"),
                g("cluster", "storage"),
                g("cluster", "metallb")
            )?;
            writeln!(f, "microk8s channel: {}", g("cluster", "microk8s_channel"))?;
            let ver = i["firstboot"]["version"].as_str().unwrap_or("unknown");
            writeln!(
                f,
                "firstboot: version {ver}, arch {}, sha256 {}",
                g("firstboot", "arch"),
                g("firstboot", "sha256")
            )?;
        }
        writeln!(
            f,
            "firstboot binary: {}",
            self.firstboot_mode
                .as_deref()
                .map(|m| format!("present, mode {m}"))
                .unwrap_or("missing".into())
        )?;
        writeln!(
            f,
            "cluster config: {}",
            if self.config_present {
                "present"
            } else {
                "missing"
            }
        )?;
        writeln!(
            f,
            "cluster secret: {}",
            self.secret_mode
                .as_deref()
                .map(|m| format!("present, mode {m}"))
                .unwrap_or("missing".into())
        )?;
        writeln!(
            f,
            "microk8s launch config: {}",
            if self.launch_config_present {
                "present"
            } else {
                "missing"
            }
        )?;
        writeln!(
            f,
            "cmdline: {}",
            self.cmdline
                .as_deref()
                .unwrap_or("(managed by the image's own bootloader)")
        )
    }
}

/// Arguments of `imagebuilder inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// A raw image built by `imagebuilder build`.
    pub image: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `imagebuilder inspect`.
pub fn run_cli(args: InspectArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = rt.block_on(run(&args.image))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
