//! `imagebuilder inspect IMAGE`: what is inside a built image, read without mounting: the
//! partitions (found by label), the rackseed files (`/etc/rackseed/image.json`: config summary,
//! firstboot version and arch), whether the secret is present and its mode, the kernel
//! command line, the image file's own mode (it holds the secret, so anything readable by
//! group or other is warned about) and any SSH host private keys baked in (there should be
//! none: each machine makes its own at first boot). The secret's content is never read into
//! the report.

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
    /// Permission bits of the image file itself, e.g. `0600`.
    pub image_mode: String,
    /// `/etc/ssh/ssh_host_*_key` files in the image (names only); empty when the machines
    /// make their own at first boot, as they should.
    pub ssh_host_private_keys: Vec<String>,
}

/// Whether group or other may read a file of this mode.
pub fn readable_by_others(mode: u32) -> bool {
    mode & 0o044 != 0
}

/// SSH host private key names in a listing of `/etc/ssh`.
pub fn ssh_host_private_keys<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
        .map(str::to_owned)
        .collect()
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
    let image_mode = {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        format!("{:04o}", m.permissions().mode() & 0o7777)
    };
    let dirs: BTreeSet<String> = ["/etc/rackseed", "/etc", "/usr/local/bin", "/etc/ssh"]
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
        image_mode,
        ssh_host_private_keys: ssh_host_private_keys(
            listing
                .get("/etc/ssh")
                .and_then(|l| l.as_ref())
                .into_iter()
                .flatten()
                .filter(|e| e.mode & 0o170000 == 0o100000)
                .map(|e| e.name.as_str()),
        ),
        table,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_partitions(f)?;
        self.write_build_info(f)?;
        self.write_rackseed_files(f)?;
        self.write_image_mode(f)?;
        self.write_ssh_host_keys(f)?;
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

/// The `microk8s:` line from image.json's `microk8s` record (absent in images built before
/// it was recorded: those install the snap).
pub fn microk8s_line(record: &serde_json::Value) -> String {
    match record["source"].as_str() {
        Some("simulated") => format!(
            "{} (QEMU test-cluster image: `microk8s` is rackseed's MicroK8s simulator, sha256 {}; \
             never flash it onto a machine)",
            crate::customize::simulator::SHOWN_AS,
            record["simulator_sha256"].as_str().unwrap_or("unknown")
        ),
        Some("snap") | None => "the MicroK8s snap, installed at first boot".to_string(),
        Some(other) => format!("unknown source {other:?}"),
    }
}

impl Report {
    /// Writes the image path, the partition table and the root filesystem's label.
    fn write_partitions(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        writeln!(f, "root filesystem: {}", self.root_label)
    }

    /// Writes target, cluster, channel and firstboot build lines from `image.json`, if present.
    fn write_build_info(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(i) = &self.info else {
            return Ok(());
        };
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
        writeln!(f, "microk8s: {}", microk8s_line(&i["microk8s"]))?;
        let ver = i["firstboot"]["version"].as_str().unwrap_or("unknown");
        writeln!(
            f,
            "firstboot: version {ver}, arch {}, sha256 {}",
            g("firstboot", "arch"),
            g("firstboot", "sha256")
        )
    }

    /// Writes whether the firstboot binary, cluster config and cluster secret are present.
    fn write_rackseed_files(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        )
    }

    /// Writes the image file's mode, warning when others can read the secrets it holds.
    fn write_image_mode(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = u32::from_str_radix(&self.image_mode, 8).unwrap_or(0o777);
        let holds = match (self.secret_mode.is_some(), self.launch_config_present) {
            (true, true) => "the cluster secret and the MicroK8s token",
            (true, false) => "the cluster secret",
            (false, true) => "the MicroK8s token",
            (false, false) => "",
        };
        if holds.is_empty() {
            writeln!(f, "image file: mode {}", self.image_mode)
        } else if readable_by_others(mode) {
            writeln!(
                f,
                "image file: mode {}: WARNING: group/other can read it, and it holds {holds}; \
                 chmod 600 {}",
                self.image_mode,
                self.image.display()
            )
        } else {
            writeln!(
                f,
                "image file: mode {} (it holds {holds}: keep it private)",
                self.image_mode
            )
        }
    }

    /// Writes the SSH host private keys baked into the image, warning if there are any.
    fn write_ssh_host_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ssh_host_private_keys.is_empty() {
            writeln!(
                f,
                "ssh host keys: none baked in (each machine makes its own at first boot)"
            )
        } else {
            writeln!(
                f,
                "ssh host keys: WARNING: {} baked in, shared by every machine flashed from this image",
                self.ssh_host_private_keys.join(", ")
            )
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::TableKind;

    fn report(image_mode: &str, keys: &[&str]) -> Report {
        Report {
            image: PathBuf::from("out/lab.img"),
            table: PartitionTable {
                kind: TableKind::Gpt,
                partitions: vec![],
            },
            root_label: "cloudimg-rootfs".into(),
            info: None,
            config_present: true,
            secret_mode: Some("0600".into()),
            launch_config_present: true,
            firstboot_mode: Some("0755".into()),
            cmdline: None,
            image_mode: image_mode.into(),
            ssh_host_private_keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn says_the_image_holds_the_secret_and_warns_when_others_can_read_it() {
        let shown = report("0600", &[]).to_string();
        assert!(
            shown.contains(
                "image file: mode 0600 (it holds the cluster secret and the MicroK8s token: keep it private)"
            ),
            "{shown}"
        );
        assert!(!shown.contains("WARNING"), "{shown}");
        for mode in ["0644", "0640", "0604"] {
            let shown = report(mode, &[]).to_string();
            assert!(
                shown.contains(&format!(
                    "image file: mode {mode}: WARNING: group/other can read it"
                )) && shown.contains("chmod 600 out/lab.img"),
                "{shown}"
            );
        }
    }

    #[test]
    fn says_microk8s_simulated_for_simulator_images() {
        let sim = serde_json::json!({"source": "simulated", "simulator_sha256": "ab"});
        assert!(microk8s_line(&sim).starts_with("MicroK8s simulated (QEMU test-cluster image"));
        assert!(microk8s_line(&sim).contains("sha256 ab"));
        let snap = serde_json::json!({"source": "snap"});
        assert!(microk8s_line(&snap).contains("snap"));
        assert!(microk8s_line(&serde_json::Value::Null).contains("snap"));
    }

    #[test]
    fn warns_about_baked_in_ssh_host_keys() {
        assert_eq!(
            ssh_host_private_keys([
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "sshd_config",
                "ssh_host_rsa_key"
            ]),
            vec!["ssh_host_ed25519_key", "ssh_host_rsa_key"]
        );
        let shown = report("0600", &["ssh_host_rsa_key"]).to_string();
        assert!(
            shown.contains("ssh host keys: WARNING: ssh_host_rsa_key baked in"),
            "{shown}"
        );
        let shown = report("0600", &[]).to_string();
        assert!(shown.contains("ssh host keys: none baked in"), "{shown}");
    }
}
