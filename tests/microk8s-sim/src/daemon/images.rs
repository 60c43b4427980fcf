//! `microk8s ctr image import FILE` and `microk8s ctr image ls [-q]`: the node's containerd
//! image store, as far as Longhorn's offline install needs it, and the images Longhorn's chart
//! runs (for helm's `--wait`, `helm.rs`).
//!
//! What is modelled, and where it comes from:
//! - `microk8s ctr` is the snap's `ctr` with `--namespace k8s.io` (canonical/microk8s
//!   `microk8s-resources/wrappers/microk8s-ctr.wrapper` and `default-args/ctr`), no worker
//!   check: it answers on every node.
//! - `image import` reads the archive as containerd's importer does, with the workspace's one
//!   reader ([`rackseed_host::image_archive::archive_image_names`], whose module docs give the
//!   sources, containerd `images/archive/importer.go` and `client/import.go`): Docker's
//!   `manifest.json` (each `RepoTags` entry named by its normalised reference,
//!   `longhornio/x:v1` = `docker.io/longhornio/x:v1`) or an OCI layout (named by its
//!   annotations, as written), with every config, layer and manifest blob present and
//!   complete; a refusal is containerd's text (`archive/tar: invalid tar header`,
//!   `unexpected EOF`, `failed to ingest "NAME": unexpected EOF`, `unrecognized image
//!   format`, `image config "X" not found`, …). ctr prints `ctr: ERROR` on stderr and exits 1
//!   (urfave/cli). On success it prints one `unpacking NAME (sha256:…)...done` line per image;
//!   the digest shown is the SHA-256 of the archive file, not the real manifest digest.
//! - The imported names are kept in `$STATE/images.json` (`[{name, archive, imported_ms}]`,
//!   [`read_images`] for tests); `ctr image ls` lists them (`-q`: names only). The agent serves
//!   them to its peers (`GET /sim/v1/images`), so the node running helm can ask every Ready
//!   node what it holds.
//! - Longhorn's images ([`chart_images`]): the chart archive's top-level `values.yaml`, merged
//!   with the release's values, read by [`rackseed_host::image_archive::images_from_values`]
//!   (`image.*.{repository,tag}` with `privateRegistry.registryUrl` or
//!   `global.cattle.systemDefaultRegistry` in front, as longhorn/longhorn v1.7.2's templates
//!   have it; an empty repository, OpenShift's proxy, is skipped). Values naming no image, or a
//!   repository without a tag, are refused with the reason.
//!
//! What it **cannot** check: the layers' contents and digests (a blob is only required to be
//! present and complete), platforms (every image counts as the node's), an OCI image named by
//! a bare tag (ctr names it `import-<date>:<tag>`; it is not listed here), compressed archives
//! (containerd 1.x's `ctr import` takes plain tar, so they are refused like any non-tar), and
//! garbage collection; archives are read into memory (test archives are small). While
//! MicroK8s is stopped the CLI answers "microk8s is not running" (the real ctr would fail to
//! dial containerd's socket).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rackseed_host::image_archive;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Daemon, Out};
use crate::now_ms;

/// One imported image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImage {
    pub name: String,
    /// The archive it came from.
    pub archive: String,
    pub imported_ms: u64,
}

/// Where a node keeps its imported images.
pub fn images_path(state_dir: &Path) -> PathBuf {
    state_dir.join("images.json")
}

/// The images imported on the node whose state folder is `state_dir`.
pub fn read_images(state_dir: &Path) -> Vec<ImportedImage> {
    std::fs::read(images_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The images the chart archive `chart` runs with `values` merged over its own (see the
/// module docs).
pub fn chart_images(chart: &Path, values: &Value) -> Result<BTreeSet<String>, String> {
    let f = std::fs::File::open(chart).map_err(|e| format!("open {}: {e}", chart.display()))?;
    let own = image_archive::chart_values(f).map_err(|e| e.to_string())?;
    let y: serde_yaml::Value =
        serde_yaml::from_str(&own.text).map_err(|e| format!("{}: {e}", own.entry))?;
    let mut v = serde_json::to_value(y).map_err(|e| format!("{}: {e}", own.entry))?;
    super::helm::merge(&mut v, values);
    let merged = serde_yaml::to_value(&v).map_err(|e| e.to_string())?;
    let images = image_archive::images_from_values(&merged)
        .map_err(|e| format!("{} with the release's values: {e}", own.entry))?;
    Ok(images.into_iter().collect())
}

impl Daemon {
    /// `microk8s ctr …` (see the module docs).
    pub(super) async fn cmd_ctr(&self, args: &[&str]) -> Out {
        match args {
            ["image" | "images" | "i", "import", rest @ ..] => self.ctr_import(rest),
            ["image" | "images" | "i", "ls" | "list", rest @ ..] => {
                let quiet = rest.iter().any(|a| matches!(*a, "-q" | "--quiet"));
                if let Some(f) = rest.iter().find(|a| !matches!(**a, "-q" | "--quiet")) {
                    return Out::err(1, format!("ctr: flag provided but not defined: {f}\n"));
                }
                let mut out = String::new();
                if !quiet {
                    out.push_str("REF\tTYPE\tDIGEST\tSIZE\tPLATFORMS\tLABELS\n");
                }
                for i in read_images(&self.env.state_dir) {
                    if quiet {
                        out.push_str(&format!("{}\n", i.name));
                    } else {
                        out.push_str(&format!(
                            "{}\tapplication/vnd.oci.image.index.v1+json\t-\t-\tlinux/amd64\t-\n",
                            i.name
                        ));
                    }
                }
                Out::ok(out)
            }
            _ => Out::err(
                1,
                format!(
                    "microk8s simulator: unsupported ctr command: {}\n",
                    args.join(" ")
                ),
            ),
        }
    }

    fn ctr_import(&self, args: &[&str]) -> Out {
        if let Some(f) = args.iter().find(|a| a.starts_with('-')) {
            return Out::err(1, format!("ctr: flag provided but not defined: {f}\n"));
        }
        let file = args.first().copied().unwrap_or("");
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Out::err(1, format!("ctr: open {file}: no such file or directory\n"))
            }
            Err(e) => return Out::err(1, format!("ctr: open {file}: {e}\n")),
        };
        let names = match image_archive::archive_image_names(&bytes[..]) {
            Ok(n) => n,
            Err(e) => return Out::err(1, format!("ctr: {e}\n")),
        };
        let digest = crate::agent_cert::sha256_hex(&bytes);
        let _g = super::helm::STATE_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut have = read_images(&self.env.state_dir);
        let mut out = String::new();
        for n in names {
            have.retain(|i| i.name != n);
            have.push(ImportedImage {
                name: n.clone(),
                archive: file.to_owned(),
                imported_ms: now_ms(),
            });
            out.push_str(&format!("unpacking {n} (sha256:{digest})...done\n"));
        }
        have.sort_by(|a, b| a.name.cmp(&b.name));
        if let Err(e) = super::write_json(&images_path(&self.env.state_dir), &have) {
            return Out::err(1, format!("ctr: {e:#}\n"));
        }
        Out::ok(out)
    }

    /// This node's imported image names.
    pub(super) fn image_names(&self) -> BTreeSet<String> {
        read_images(&self.env.state_dir)
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    /// Each Ready node's imported images (`None`: its agent could not be asked).
    pub(super) async fn ready_nodes_images(&self) -> Vec<(String, Option<BTreeSet<String>>)> {
        let alive = self.alive();
        let entries: Vec<_> = self
            .lock()
            .view
            .entries
            .iter()
            .filter(|e| alive.contains(&e.name))
            .map(|e| (e.name.clone(), e.ip))
            .collect();
        let mut out = Vec::new();
        for (name, ip) in entries {
            if name == self.name() {
                out.push((name, Some(self.image_names())));
                continue;
            }
            let Some(ip) = ip else {
                out.push((name, None));
                continue;
            };
            let addr = std::net::SocketAddr::new(ip, self.env.port);
            let hb = self.env.heartbeat;
            let got = crate::http::request(addr, None, "GET", "/sim/v1/images", None, hb, hb * 2)
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
                .and_then(|(_, v)| serde_json::from_value::<BTreeSet<String>>(v).ok());
            out.push((name, got));
        }
        out
    }
}
