//! `microk8s ctr image import FILE` and `microk8s ctr image ls [-q]`: the node's containerd
//! image store, as far as Longhorn's offline install needs it, and the images Longhorn's chart
//! runs (for helm's `--wait`, `helm.rs`).
//!
//! What is modelled, and where it comes from:
//! - `microk8s ctr` is the snap's `ctr` with `--namespace k8s.io` (canonical/microk8s
//!   `microk8s-resources/wrappers/microk8s-ctr.wrapper` and `default-args/ctr`), no worker
//!   check: it answers on every node.
//! - `image import` reads the archive as containerd's importer does (containerd
//!   `core/images/archive/importer.go`, `ImportIndex`): a tar read with Go's `archive/tar`; an
//!   `oci-layout` (`imageLayoutVersion` 1.0.0, else `unsupported OCI version X`) with an
//!   `index.json` (else `missing index.json in OCI layout 1.0.0`), whose manifests are named
//!   by `io.containerd.image.name`, else by `org.opencontainers.image.ref.name` when that is a
//!   full reference; or Docker's `manifest.json` whose `Config` must be in the archive
//!   (`image config %q not found`) and every `Layers` entry too (`layer %q not found`), each
//!   `RepoTags` entry named by its normalised reference (`longhornio/x:v1` =
//!   `docker.io/longhornio/x:v1`); neither: `unrecognized image format`. A file that is not a
//!   tar fails with Go's `archive/tar: invalid tar header`, one cut short with `unexpected
//!   EOF` (`failed to ingest "NAME": unexpected EOF` inside a blob). ctr prints `ctr: ERROR`
//!   on stderr and exits 1 (urfave/cli). On success it prints one `unpacking NAME
//!   (sha256:…)...done` line per image; the digest shown is the SHA-256 of the archive's
//!   manifest file, not the real manifest digest.
//! - The imported names are kept in `$STATE/images.json` (`[{name, archive, imported_ms}]`,
//!   [`read_images`] for tests); `ctr image ls` lists them (`-q`: names only). The agent serves
//!   them to its peers (`GET /sim/v1/images`), so the node running helm can ask every Ready
//!   node what it holds.
//! - Longhorn's images ([`chart_images`]): the chart archive's top-level `values.yaml`, merged
//!   with the release's values, `image.*.{repository,tag}` with `privateRegistry.registryUrl`
//!   or `global.cattle.systemDefaultRegistry` in front (longhorn/longhorn v1.7.2
//!   `chart/values.yaml` and `chart/templates/_helpers.tpl`, `registry_url`); entries with an
//!   empty repository (OpenShift's proxy) are skipped.
//!
//! What it **cannot** check: the layers' contents and digests (a blob is only required to be
//! present and complete), platforms (every image counts as the node's), compressed archives
//! (containerd 1.x's `ctr import` takes plain tar, so they are refused like any non-tar), and
//! garbage collection; archives are read into memory (test archives are small). While
//! MicroK8s is stopped the CLI answers "microk8s is not running" (the real ctr would fail to
//! dial containerd's socket).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// `r` normalised as containerd names images (distribution/reference `ParseDockerRef`).
pub fn normalize_ref(r: &str) -> String {
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[slash..].rfind(':') {
        Some(i) => (&name[..slash + i], Some(&name[slash + i + 1..])),
        None => (name, None),
    };
    let full = match name.split_once('/') {
        Some((d, _)) if d.contains(['.', ':']) || d == "localhost" => name.to_owned(),
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    };
    match (digest, tag) {
        (Some(d), _) => format!("{full}@{d}"),
        (None, Some(t)) => format!("{full}:{t}"),
        (None, None) => format!("{full}:latest"),
    }
}

/// The regular files of a tar archive, read as Go's `archive/tar` reads them (the error is
/// its text).
fn read_tar(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        if at >= bytes.len() {
            return Ok(out);
        }
        let Some(h) = bytes.get(at..at + 512) else {
            return Err("unexpected EOF".into());
        };
        if h.iter().all(|b| *b == 0) {
            return Ok(out);
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            let end = f.iter().position(|b| *b == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).trim().to_owned()
        };
        let octal = |r| u64::from_str_radix(&field(r), 8).ok();
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        match (octal(124..136), octal(148..156)) {
            (Some(_), Some(check)) if check == sum => {}
            _ => return Err("archive/tar: invalid tar header".into()),
        }
        let size = octal(124..136).unwrap_or(0) as usize;
        let mut name = field(0..100);
        if &h[257..262] == b"ustar" && !field(345..500).is_empty() {
            name = format!("{}/{name}", field(345..500));
        }
        let start = at + 512;
        let Some(data) = bytes.get(start..start + size) else {
            return Err(format!("failed to ingest {name:?}: unexpected EOF"));
        };
        if matches!(h[156], b'0' | 0) {
            out.push((name.trim_start_matches("./").to_owned(), data.to_vec()));
        }
        at = start + size.div_ceil(512) * 512;
    }
}

/// `(name, digest shown)` of each image an archive holds (see the module docs); the error is
/// containerd's.
pub fn archive_images(bytes: &[u8]) -> Result<Vec<String>, String> {
    let files = read_tar(bytes)?;
    let get = |n: &str| files.iter().find(|(f, _)| f == n).map(|(_, d)| d);
    let mut names = Vec::new();
    if let Some(layout) = get("oci-layout") {
        let v: Value = serde_json::from_slice(layout)
            .map_err(|e| format!("untar oci layout \"oci-layout\": {e}"))?;
        let version = v["imageLayoutVersion"].as_str().unwrap_or("");
        if version != "1.0.0" {
            return Err(format!("unsupported OCI version {version}"));
        }
        let index = get("index.json").ok_or("missing index.json in OCI layout 1.0.0")?;
        let v: Value = serde_json::from_slice(index).map_err(|e| e.to_string())?;
        for m in v["manifests"].as_array().into_iter().flatten() {
            let blob = m["digest"].as_str().unwrap_or("").replacen(':', "/", 1);
            if get(&format!("blobs/{blob}")).is_none() {
                return Err(format!(
                    "content digest {}: not found",
                    m["digest"].as_str().unwrap_or("")
                ));
            }
            let a = &m["annotations"];
            let name = a["io.containerd.image.name"]
                .as_str()
                .or(a["org.opencontainers.image.ref.name"]
                    .as_str()
                    .filter(|r| r.contains(['/', ':', '@'])));
            names.extend(name.map(normalize_ref));
        }
    } else if let Some(m) = get("manifest.json") {
        let v: Value = serde_json::from_slice(m)
            .map_err(|e| format!("untar manifest \"manifest.json\": {e}"))?;
        for m in v.as_array().into_iter().flatten() {
            let config = m["Config"].as_str().unwrap_or("");
            if get(config).is_none() {
                return Err(format!("image config {config:?} not found"));
            }
            for l in m["Layers"].as_array().into_iter().flatten() {
                let l = l.as_str().unwrap_or("");
                if get(l).is_none() {
                    return Err(format!("failed to resolve layers: layer {l:?} not found"));
                }
            }
            for t in m["RepoTags"].as_array().into_iter().flatten() {
                names.extend(t.as_str().map(normalize_ref));
            }
        }
    } else {
        return Err("unrecognized image format".into());
    }
    Ok(names)
}

/// The images the chart archive `chart` runs with `values` merged over its own (see the
/// module docs).
pub fn chart_images(chart: &Path, values: &Value) -> Result<BTreeSet<String>, String> {
    let f = std::fs::File::open(chart).map_err(|e| format!("open {}: {e}", chart.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut chart_values = None;
    let entries = tar.entries().map_err(|e| e.to_string())?;
    for entry in entries {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path.components().count() == 2 && path.ends_with("values.yaml") {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(|e| e.to_string())?;
            chart_values = Some(text);
        }
    }
    let text = chart_values.ok_or("the chart archive has no values.yaml")?;
    let y: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let mut v = serde_json::to_value(y).map_err(|e| e.to_string())?;
    super::helm::merge(&mut v, values);
    let s = |v: &Value| v.as_str().unwrap_or("").trim().to_owned();
    let private = s(&v["privateRegistry"]["registryUrl"]);
    let system = s(&v["global"]["cattle"]["systemDefaultRegistry"]);
    let registry = [private, system]
        .into_iter()
        .find(|r| !r.is_empty())
        .map(|r| format!("{r}/"))
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    collect(&v["image"], &registry, &mut out);
    Ok(out)
}

fn collect(v: &Value, registry: &str, out: &mut BTreeSet<String>) {
    let Some(map) = v.as_object() else { return };
    if let Some(repo) = map.get("repository") {
        let repo = repo.as_str().unwrap_or("").trim();
        let tag = match map.get("tag") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        if !repo.is_empty() {
            out.insert(normalize_ref(&format!("{registry}{repo}:{tag}")));
        }
        return;
    }
    for child in map.values() {
        collect(child, registry, out);
    }
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
        let names = match archive_images(&bytes) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, size: usize) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, d) in files {
            out.extend(header(n, d.len()));
            out.extend_from_slice(d);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend([0u8; 1024]);
        out
    }

    #[test]
    fn archives_import_like_containerd_and_fail_with_its_errors() {
        let manifest =
            br#"[{"Config":"c.json","RepoTags":["longhornio/longhorn-ui:v1.7.2","busybox"],"Layers":["l.tar"]}]"#;
        let good = tar(&[
            ("c.json", b"{}"),
            ("l.tar", &[1; 600]),
            ("manifest.json", manifest),
        ]);
        assert_eq!(
            archive_images(&good).unwrap(),
            [
                "docker.io/longhornio/longhorn-ui:v1.7.2",
                "docker.io/library/busybox:latest"
            ]
        );
        assert_eq!(
            archive_images(&good[..1800]).unwrap_err(),
            "failed to ingest \"l.tar\": unexpected EOF"
        );
        assert_eq!(archive_images(&good[..1100]).unwrap_err(), "unexpected EOF");
        assert_eq!(
            archive_images(&"<html>".repeat(100).into_bytes()).unwrap_err(),
            "archive/tar: invalid tar header"
        );
        assert_eq!(
            archive_images(b"").unwrap_err(),
            "unrecognized image format"
        );
        let no_layer = tar(&[("c.json", b"{}"), ("manifest.json", manifest)]);
        assert_eq!(
            archive_images(&no_layer).unwrap_err(),
            "failed to resolve layers: layer \"l.tar\" not found"
        );
        let hex = "a".repeat(64);
        let index = format!(
            r#"{{"manifests":[{{"digest":"sha256:{hex}","annotations":{{"io.containerd.image.name":"docker.io/longhornio/csi-resizer:v1.12.0","org.opencontainers.image.ref.name":"v1.12.0"}}}}]}}"#
        );
        let blob = format!("blobs/sha256/{hex}");
        let oci = tar(&[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            (&blob, b"{}"),
            ("index.json", index.as_bytes()),
        ]);
        assert_eq!(
            archive_images(&oci).unwrap(),
            ["docker.io/longhornio/csi-resizer:v1.12.0"]
        );
        let oci2 = tar(&[("oci-layout", br#"{"imageLayoutVersion":"2.0.0"}"#)]);
        assert_eq!(
            archive_images(&oci2).unwrap_err(),
            "unsupported OCI version 2.0.0"
        );
    }
}
