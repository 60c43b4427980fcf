//! The customize step: puts rackseed into a base image that already has the target's layout,
//! without root, loop devices or mounts.
//!
//! Into the root filesystem (ext4, edited with [`ext4`]): the overlay trees (`overlays/common`,
//! then `overlays/x86_64` or `overlays/rpi`, then any `--overlay` dirs), then the generated
//! files, which win over overlays: `/usr/local/bin/firstboot`, the unit's
//! `multi-user.target.wants` link, `/etc/rackseed/cluster.toml`, `/etc/rackseed/cluster.secret`
//! (0600 root:root), `/etc/microk8s.yaml` (0600: it holds the cluster token),
//! `/etc/rackseed/image.json` (what `inspect` reads), staged offline snaps under
//! `/var/lib/rackseed/snaps/`, the storage's staged packages and chart under
//! `/var/lib/rackseed/storage/` ([`storage`]: the offline folder, also keepalived, curl and arping
//! for official bases), and on x86 the NoCloud seed in `/var/lib/cloud/seed/nocloud/`.
//! Removed from it: the base's SSH host keys (`/etc/ssh/ssh_host_*`), which every machine
//! flashed from the image would otherwise share; each machine makes its own at first boot.
//! `/etc/machine-id` is left empty for the same reason.
//! Into `system-boot` (FAT, Raspberry Pi): the memory-cgroup flags in `cmdline.txt` and the
//! NoCloud seed. To add a file, push an [`ext4::Entry`] in [`root_entries`] (and list it in
//! the manifest through [`Added`]).

pub mod cloudinit;
pub mod cmdline;
pub mod ext4;
pub mod firstboot_bin;
pub mod launch;
pub mod simulator;
pub mod storage;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rackseed_config::{ClusterConfig, Target};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::disk::compose::labels;
use crate::disk::fat::{FatStage, FatVolume};
use crate::disk::PartitionTable;
use crate::tool::{on_path, Tool};
use ext4::{Entry, Ext4};
use firstboot_bin::FirstbootBin;

pub const UNIT: &str = "rackseed-firstboot.service";
pub const SECRET_PATH: &str = "/etc/rackseed/cluster.secret";
pub const CONFIG_PATH: &str = "/etc/rackseed/cluster.toml";
pub const INFO_PATH: &str = "/etc/rackseed/image.json";
pub const LAUNCH_PATH: &str = "/etc/microk8s.yaml";
pub const FIRSTBOOT_PATH: &str = "/usr/local/bin/firstboot";
pub const SNAPS_DIR: &str = "/var/lib/rackseed/snaps";
/// Where OpenSSH keeps its host keys.
pub const SSH_DIR: &str = "/etc/ssh";
/// The overlay unit that makes a machine's own SSH host keys at first boot.
pub const SSH_KEYGEN_UNIT: &str = "rackseed-ssh-hostkeys.service";

/// Whether a file name in [`SSH_DIR`] is a host key or its public half
/// (`ssh_host_<type>_key`, `ssh_host_<type>_key.pub`).
pub fn is_ssh_host_key(name: &str) -> bool {
    name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub"))
}

/// Everything the customisation needs.
pub struct Inputs<'a> {
    pub config: &'a ClusterConfig,
    /// The config file as written by the user; copied in with `secret_file` pointing inside.
    pub config_toml: &'a str,
    pub target: Target,
    pub secret: &'a [u8],
    pub microk8s_token: &'a str,
    pub firstboot: &'a FirstbootBin,
    /// Overlay roots in order; missing ones are skipped (an overlay may be empty).
    pub overlays: &'a [PathBuf],
    /// Content of `/etc/rackseed/image.json`.
    pub image_info: &'a serde_json::Value,
}

/// One file the build put into the image (for the manifest).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Added {
    /// Filesystem label of the partition.
    pub partition: String,
    pub path: String,
    /// Permission bits (ext4 only; FAT has none).
    pub mode: Option<String>,
    pub size: u64,
    /// `None` for files holding secrets (the secret, the token, the Wi-Fi PSK).
    pub sha256: Option<String>,
}

/// What customisation did.
#[derive(Debug, Clone, Serialize)]
pub struct Customized {
    pub files: Vec<Added>,
    /// The kernel command line the image boots with, when rackseed manages it.
    pub cmdline: Option<String>,
    pub warnings: Vec<String>,
}

/// The config text as installed in the image: paths that name files on the build machine are
/// rewritten to where the build put those files, or dropped when the node has no use for them,
/// so the copy stays valid for `firstboot check-config` and names nothing from the host.
///
/// - `cluster.secret-file` -> the in-image secret ([`SECRET_PATH`]).
/// - `microk8s.offline-snaps` -> the staged snaps ([`SNAPS_DIR`]).
/// - `addons.offline` -> the staged storage files ([`storage::STORAGE_DIR`]).
/// - `[network.wifi]` is removed (its `psk-file` is a host file and `firstboot` never uses
///   Wi-Fi: cloud-init's network-config got the SSID and PSK at build time); a closing comment
///   says so, naming the SSID but never the PSK.
///
/// To rewrite another host path, add it here and to the test below.
pub fn in_image_config(toml_text: &str) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = toml_text
        .parse()
        .context("parsing the cluster config as TOML")?;
    let cluster = doc
        .get_mut("cluster")
        .and_then(|c| c.as_table_like_mut())
        .context("the cluster config has no [cluster] table")?;
    cluster.insert("secret-file", toml_edit::value(SECRET_PATH));
    cluster.remove("secret_file");
    if let Some(m) = doc.get_mut("microk8s").and_then(|m| m.as_table_like_mut()) {
        if m.contains_key("offline-snaps") {
            m.insert("offline-snaps", toml_edit::value(SNAPS_DIR));
        }
    }
    if let Some(a) = doc.get_mut("addons").and_then(|a| a.as_table_like_mut()) {
        if a.contains_key("offline") {
            a.insert("offline", toml_edit::value(storage::STORAGE_DIR));
        }
    }
    let wifi = doc
        .get_mut("network")
        .and_then(|n| n.as_table_like_mut())
        .and_then(|n| n.remove("wifi"));
    let mut text = doc.to_string();
    if let Some(w) = wifi {
        let ssid = w
            .as_table_like()
            .and_then(|t| t.get("ssid"))
            .and_then(|s| s.as_str())
            .map(|s| format!(" for SSID {s:?}"))
            .unwrap_or_default();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "\n# [network.wifi]{} was applied at build time: the SSID and passphrase are in\n\
             # /etc/netplan/60-rackseed-wifi.yaml (0600). Its psk-file named a file on the build machine, so the\n\
             # table is left out of this copy.\n",
            ssid.replace('\n', " ")
        ));
    }
    Ok(text)
}

struct Scratch<'a> {
    dir: &'a Path,
    n: usize,
}

impl Scratch<'_> {
    fn file(&mut self, data: &[u8], mode: u32) -> Result<PathBuf> {
        self.n += 1;
        let p = self.dir.join(format!("gen-{}", self.n));
        // Created with its final mode (the secret's 0600 among them), never the umask's.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

/// Walks an overlay root into entries (files keep their permission bits; owner root).
pub fn overlay_entries(root: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut rd: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("reading overlay {}", d.display()))?
            .collect::<std::io::Result<_>>()?;
        rd.sort_by_key(|e| e.file_name());
        for e in rd {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("under root");
            let dest = format!("/{}", rel.to_string_lossy());
            let m = std::fs::symlink_metadata(&p)?;
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&p)?;
                out.push(Entry::Symlink {
                    path: dest,
                    target: target.to_string_lossy().into_owned(),
                });
            } else if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push(Entry::File {
                    path: dest,
                    src: p,
                    mode: m.permissions().mode() & 0o7777,
                    uid: 0,
                    gid: 0,
                });
            } else {
                bail!(
                    "overlay {} holds {}, which is neither file, folder nor symlink",
                    root.display(),
                    p.display()
                );
            }
        }
    }
    Ok(out)
}

fn sha_of(path: &Path) -> Result<String> {
    crate::outputs::sparse::sha256_file(path)
}

/// Entries for the root filesystem, de-duplicated (later wins), with manifest records.
pub fn root_entries(inp: &Inputs<'_>, scratch_dir: &Path) -> Result<(Vec<Entry>, Vec<String>)> {
    let mut sc = Scratch {
        dir: scratch_dir,
        n: 0,
    };
    let mut entries = overlay_trees(inp.overlays)?;
    let unit_path = format!("/etc/systemd/system/{UNIT}");
    if !entries.iter().any(|e| e.path() == unit_path) {
        bail!("no overlay provides {unit_path} (expected in overlays/common)");
    }
    // Paths whose content is secret: the manifest records no hash for them.
    let mut secret_paths: Vec<String> = Vec::new();
    push_generated(inp, &mut sc, unit_path, &mut entries, &mut secret_paths)?;
    if let Some(dir) = &inp.config.microk8s.offline_snaps {
        entries.extend(offline_snap_entries(dir)?);
    }
    entries.extend(storage::storage_entries(inp.config, inp.target)?);
    if inp.target == Target::X86_64Efi {
        push_nocloud_seed(inp, &mut sc, &mut entries, &mut secret_paths)?;
    } else {
        // A Pi's seed is on system-boot (see `write_pi_boot`), its Wi-Fi in the root.
        push_wifi_netplan(
            seed_for(inp.config)?,
            &mut sc,
            &mut entries,
            &mut secret_paths,
        )?;
    }
    Ok((later_wins(entries), secret_paths))
}

/// A regular file owned by root, with its content at `src`.
fn root_file(path: &str, src: PathBuf, mode: u32) -> Entry {
    Entry::File {
        path: path.into(),
        src,
        mode,
        uid: 0,
        gid: 0,
    }
}

/// The entries of every overlay tree in order; refuses an overlay that provides SSH host keys.
fn overlay_trees(overlays: &[PathBuf]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for o in overlays {
        let laid = overlay_entries(o)?;
        if let Some(key) = laid.iter().map(Entry::path).find(|p| {
            p.rsplit_once('/')
                .is_some_and(|(dir, name)| dir == SSH_DIR && is_ssh_host_key(name))
        }) {
            bail!(
                "overlay {} provides {key}: every machine flashed from the image would share \
                 that host key; leave it out (each machine makes its own at first boot)",
                o.display()
            );
        }
        entries.extend(laid);
    }
    Ok(entries)
}

/// Pushes the generated files (firstboot, its unit link, config, secret, launch config, image
/// info, the empty machine id) and records which of them are secret.
fn push_generated(
    inp: &Inputs<'_>,
    sc: &mut Scratch<'_>,
    unit_path: String,
    entries: &mut Vec<Entry>,
    secret_paths: &mut Vec<String>,
) -> Result<()> {
    entries.push(root_file(FIRSTBOOT_PATH, inp.firstboot.path.clone(), 0o755));
    entries.push(Entry::Symlink {
        path: format!("/etc/systemd/system/multi-user.target.wants/{UNIT}"),
        target: unit_path,
    });
    entries.push(Entry::Dir {
        path: "/etc/rackseed".into(),
        mode: 0o755,
        uid: 0,
        gid: 0,
    });
    entries.push(root_file(
        CONFIG_PATH,
        sc.file(in_image_config(inp.config_toml)?.as_bytes(), 0o644)?,
        0o644,
    ));
    entries.push(root_file(SECRET_PATH, sc.file(inp.secret, 0o600)?, 0o600));
    secret_paths.push(SECRET_PATH.into());
    let launch = launch::render(inp.config, inp.microk8s_token)?;
    entries.push(root_file(
        LAUNCH_PATH,
        sc.file(launch.as_bytes(), 0o600)?,
        0o600,
    ));
    secret_paths.push(LAUNCH_PATH.into());
    let info = serde_json::to_vec_pretty(inp.image_info)?;
    entries.push(root_file(INFO_PATH, sc.file(&info, 0o644)?, 0o644));
    // One image, many machines: an empty machine id makes systemd generate a fresh one on each
    // machine's first boot, and with it firstboot's node id. A baked-in id would give every
    // flashed machine the same identity.
    entries.push(root_file("/etc/machine-id", sc.file(b"", 0o444)?, 0o444));
    // systemd initialises an empty machine id from D-Bus' copy when one exists, and a
    // bootstrapped base carries the copy made at bootstrap time: every machine would get the
    // same id. Make it the link Ubuntu's images ship, so there is only one id, made per machine.
    entries.push(Entry::Symlink {
        path: "/var/lib/dbus/machine-id".into(),
        target: "/etc/machine-id".into(),
    });
    Ok(())
}

/// Entries staging the `.snap` and `.assert` files of the offline snaps folder `dir` (at least one).
fn offline_snap_entries(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut found = 0;
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading offline snaps folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap" || x == "assert"))
        .collect();
    names.sort();
    for p in names {
        let name = p.file_name().expect("file").to_string_lossy().into_owned();
        entries.push(root_file(&format!("{SNAPS_DIR}/{name}"), p.clone(), 0o644));
        found += 1;
    }
    if found == 0 {
        bail!(
            "offline snaps folder {} has no .snap or .assert files",
            dir.display()
        );
    }
    Ok(entries)
}

/// Pushes the NoCloud seed files (x86) into the root filesystem; network-config is secret when
/// it holds a Wi-Fi passphrase.
fn push_nocloud_seed(
    inp: &Inputs<'_>,
    sc: &mut Scratch<'_>,
    entries: &mut Vec<Entry>,
    secret_paths: &mut Vec<String>,
) -> Result<()> {
    let seed = seed_for(inp.config)?;
    let base = "/var/lib/cloud/seed/nocloud";
    entries.push(root_file(
        &format!("{base}/user-data"),
        sc.file(seed.user_data.as_bytes(), 0o600)?,
        0o600,
    ));
    entries.push(root_file(
        &format!("{base}/meta-data"),
        sc.file(seed.meta_data.as_bytes(), 0o600)?,
        0o600,
    ));
    entries.push(root_file(
        &format!("{base}/network-config"),
        sc.file(seed.network_config.as_bytes(), 0o600)?,
        0o600,
    ));
    push_wifi_netplan(seed, sc, entries, secret_paths)
}

/// The Wi-Fi netplan file (0600, no hash in the manifest: it holds the PSK), when Wi-Fi is
/// configured; for every target, so the PSK is never on a Raspberry Pi's FAT boot partition.
fn push_wifi_netplan(
    seed: cloudinit::Seed,
    sc: &mut Scratch<'_>,
    entries: &mut Vec<Entry>,
    secret_paths: &mut Vec<String>,
) -> Result<()> {
    if let Some(wifi) = seed.wifi_netplan {
        let path = cloudinit::WIFI_NETPLAN_PATH;
        entries.push(root_file(path, sc.file(wifi.as_bytes(), 0o600)?, 0o600));
        secret_paths.push(path.into());
    }
    Ok(())
}

/// Keeps only the last entry for each path, in the order the kept entries were pushed.
fn later_wins(entries: Vec<Entry>) -> Vec<Entry> {
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        last.insert(e.path().to_string(), i);
    }
    entries
        .into_iter()
        .enumerate()
        .filter(|(i, e)| last[e.path()] == *i)
        .map(|(_, e)| e)
        .collect()
}

fn seed_for(config: &ClusterConfig) -> Result<cloudinit::Seed> {
    let psk = match &config.network.wifi {
        Some(w) => Some(cloudinit::read_psk(&w.psk_file)?),
        None => None,
    };
    cloudinit::seed(config, psk.as_deref())
}

/// Validates `user-data` with `cloud-init schema` when cloud-init is installed; returns a
/// warning when it is not.
pub async fn check_user_data(user_data: &str, scratch: &Path) -> Result<Option<String>> {
    if !on_path("cloud-init") {
        return Ok(Some(
            "cloud-init is not installed here; user-data was not schema-checked".into(),
        ));
    }
    let p = scratch.join("user-data.check");
    std::fs::write(&p, user_data)?;
    Tool::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&p)
        .timeout(Duration::from_secs(120))
        .run()
        .await
        .context("cloud-init schema rejected the generated user-data")?;
    Ok(None)
}

/// The `options` line of rackseed's systemd-boot entry on the ESP, when there is one.
pub async fn loader_options(esp: &FatVolume, scratch: &Path) -> Result<Option<String>> {
    let entry = esp.read("loader/entries/rackseed.conf", scratch).await?;
    Ok(entry.and_then(|e| {
        String::from_utf8_lossy(&e)
            .lines()
            .find_map(|l| l.strip_prefix("options ").map(|s| s.trim().to_string()))
    }))
}

/// Applies everything to `image` (layout in `table`).
pub async fn apply(
    image: &Path,
    table: &PartitionTable,
    inp: &Inputs<'_>,
    scratch: &Path,
) -> Result<Customized> {
    let l = labels(inp.target);
    let root = table.by_label(l.root)?.clone();
    let boot = table.by_label(l.boot)?.clone();
    // What offline staging does and does not cover (container images, an official base's
    // missing packages).
    let mut warnings = storage::staging_notes(inp.config);
    let seed = seed_for(inp.config)?;
    let (mut entries, secret_paths) = root_entries(inp, scratch)?;
    let ext4 = Ext4::new(image, root.start);
    entries.extend(base_host_key_removals(&ext4, scratch).await?);
    // The schema check (a Python start-up) runs next to the ext4 edit; neither needs the other.
    let (checked, applied) = tokio::join!(
        check_user_data(&seed.user_data, scratch),
        ext4.apply(&entries, scratch)
    );
    if let Some(w) = checked? {
        warnings.push(w);
    }
    applied?;
    let mut files = root_manifest(&entries, &secret_paths, l.root)?;
    let cmdline;
    let fat = FatVolume::new(image, boot.start);
    match inp.target {
        Target::Rpi4 | Target::Rpi5 => {
            let (line, added) = write_pi_boot(&fat, seed, l.boot, scratch, &mut warnings).await?;
            files.extend(added);
            cmdline = Some(line);
        }
        Target::X86_64Efi => {
            cmdline = loader_options(&fat, scratch).await?;
        }
    }
    Ok(Customized {
        files,
        cmdline,
        warnings,
    })
}

/// Removals of the SSH host keys the base image carries in its root filesystem.
async fn base_host_key_removals(ext4: &Ext4, scratch: &Path) -> Result<Vec<Entry>> {
    // SSH host keys made when the base was built (debootstrap's openssh-server, or a base
    // image that was booted) would be shared by every machine flashed from this image: they
    // go, and each machine makes its own at first boot (cloud-init's ssh module, or
    // overlays/common's rackseed-ssh-hostkeys.service where there is no cloud-init).
    let ssh = ext4
        .list(
            &std::collections::BTreeSet::from([SSH_DIR.to_string()]),
            scratch,
        )
        .await?;
    let mut removals = Vec::new();
    for e in ssh.values().flatten().flatten() {
        if is_ssh_host_key(&e.name) {
            tracing::info!("customize: removing the base's {SSH_DIR}/{}", e.name);
            removals.push(Entry::Absent {
                path: format!("{SSH_DIR}/{}", e.name),
            });
        }
    }
    Ok(removals)
}

/// Manifest records of the files written into the root filesystem (labelled `partition`);
/// files in `secret_paths` get no hash.
fn root_manifest(
    entries: &[Entry],
    secret_paths: &[String],
    partition: &str,
) -> Result<Vec<Added>> {
    let mut files = Vec::new();
    for e in entries {
        if let Entry::File {
            path, src, mode, ..
        } = e
        {
            let secret = secret_paths.iter().any(|p| p == path);
            files.push(Added {
                partition: partition.into(),
                path: path.clone(),
                mode: Some(format!("{mode:04o}")),
                size: std::fs::metadata(src)?.len(),
                sha256: if secret { None } else { Some(sha_of(src)?) },
            });
        }
    }
    Ok(files)
}

/// Writes the memory-cgroup flags into `cmdline.txt` and the NoCloud seed into the Raspberry
/// Pi's `system-boot` (labelled `partition`); returns the command line and manifest records.
async fn write_pi_boot(
    fat: &FatVolume,
    seed: cloudinit::Seed,
    partition: &str,
    scratch: &Path,
    warnings: &mut Vec<String>,
) -> Result<(String, Vec<Added>)> {
    let cur = fat
        .read("cmdline.txt", scratch)
        .await?
        .context("system-boot has no cmdline.txt; is this a Raspberry Pi image?")?;
    let (line, dropped) =
        cmdline::append_flags(&String::from_utf8_lossy(&cur), &cmdline::MEMORY_CGROUP);
    if dropped {
        warnings.push("cmdline.txt had more than one line; only the first is kept (the firmware ignores the rest)".into());
    }
    // The PSK is not among these: the Wi-Fi settings are in the root filesystem, 0600.
    let written = [
        ("cmdline.txt", line.clone().into_bytes(), false),
        ("user-data", seed.user_data.into_bytes(), false),
        ("meta-data", seed.meta_data.into_bytes(), false),
        ("network-config", seed.network_config.into_bytes(), false),
    ];
    let st = FatStage::new(scratch)?;
    for (name, data, _) in &written {
        st.add(name, data)?;
    }
    st.write_to(fat).await?;
    let mut files = Vec::new();
    for (name, data, secret) in written {
        files.push(Added {
            partition: partition.into(),
            path: format!("/{name}"),
            mode: None,
            size: data.len() as u64,
            sha256: if secret {
                None
            } else {
                Some(hex::encode(Sha256::digest(&data)))
            },
        });
    }
    Ok((line.trim_end().to_string(), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_image_config_points_at_the_image_secret() {
        let t = in_image_config(
            "# mine\n[cluster]\nname = \"lab\"\nsecret-file = \"/home/me/lab.secret\"\n",
        )
        .unwrap();
        assert!(t.contains("# mine"));
        assert!(t.contains("secret-file = \"/etc/rackseed/cluster.secret\""));
        assert!(!t.contains("/home/me"));
        assert!(in_image_config("name = 1").is_err());
    }

    #[test]
    fn in_image_config_drops_wifi_and_rewrites_the_snaps_folder() {
        let src = "[cluster]\nname = \"lab\"\nsecret-file = \"s\"\n\n[microk8s]\noffline-snaps = \"/home/me/snaps\"\n\n[network]\naddressing = \"dhcp\"\n\n[network.wifi]\nssid = \"home\"\npsk-file = \"/home/me/wifi.psk\"\ncountry = \"GB\"\n";
        let t = in_image_config(src).unwrap();
        assert!(!t.contains("/home/me"), "{t}");
        assert!(
            t.contains(&format!("offline-snaps = \"{SNAPS_DIR}\"")),
            "{t}"
        );
        assert!(t.contains("addressing = \"dhcp\""), "{t}");
        assert!(t.contains("# [network.wifi] for SSID \"home\" was applied at build time"));
        let doc: toml_edit::DocumentMut = t.parse().unwrap();
        assert!(doc["network"].get("wifi").is_none());
        // Inline and dotted forms too.
        let t = in_image_config("[cluster]\nname = \"x\"\n[network]\nwifi = { ssid = \"a\", psk-file = \"/p\", country = \"GB\" }\n").unwrap();
        assert!(!t.contains("/p\""), "{t}");
        let t =
            in_image_config("network.wifi.psk-file = \"/p\"\n[cluster]\nname = \"x\"\n").unwrap();
        assert!(!t.contains("/p\""), "{t}");
        // A valid config stays valid for firstboot (check-config), minus Wi-Fi.
        let full = "[cluster]\nname = \"lab\"\n\n[microk8s]\noffline-snaps = \"snaps\"\n\n[network.wifi]\nssid = \"home\"\npsk-file = \"wifi.psk\"\ncountry = \"GB\"\n\n[image]\ntarget = \"rpi5\"\nbase = { kind = \"local\", path = \"base.img\" }\n";
        let before = rackseed_config::parse(full, Path::new("/home/me/lab.toml")).unwrap();
        assert!(before.config.network.wifi.is_some());
        let t = in_image_config(full).unwrap();
        let after = rackseed_config::parse(&t, Path::new(CONFIG_PATH)).unwrap();
        assert!(after.config.network.wifi.is_none());
        assert_eq!(
            after.config.microk8s.offline_snaps.as_deref(),
            Some(Path::new(SNAPS_DIR))
        );
        assert_eq!(after.config.cluster.secret_file, Path::new(SECRET_PATH));
        // No Wi-Fi, no comment.
        let t = in_image_config("[cluster]\nname = \"x\"\n").unwrap();
        assert!(!t.contains("wifi"));
    }

    #[test]
    fn overlay_walk_keeps_modes_and_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/x")).unwrap();
        std::fs::write(d.path().join("etc/x/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            d.path().join("etc/x/run.sh"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/x/run.sh", d.path().join("etc/link")).unwrap();
        let e = overlay_entries(d.path()).unwrap();
        assert!(e.contains(&Entry::Symlink {
            path: "/etc/link".into(),
            target: "/etc/x/run.sh".into()
        }));
        assert!(e.iter().any(
            |x| matches!(x, Entry::File { path, mode: 0o750, .. } if path == "/etc/x/run.sh")
        ));
        assert!(overlay_entries(&d.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}
