//! Container images for an offline Longhorn install: which images the staged chart needs, and
//! which images a staged archive holds.
//!
//! **Which images** ([`chart_images`]): read from the chart archive itself
//! (`longhorn-<version>.tgz`, a gzip-compressed tar whose top folder is the chart, as `helm
//! package` writes it), from its top-level `values.yaml`. Longhorn's chart
//! (longhorn/longhorn `chart/values.yaml` at tag v1.7.2) names every image under `image:` as a
//! mapping with `repository` and `tag` (`image.longhorn.{engine,manager,ui,instanceManager,
//! shareManager,backingImageManager,supportBundleKit}`, `image.csi.{attacher,provisioner,
//! nodeDriverRegistrar,resizer,snapshotter,livenessProbe}`, and `image.openshift.oauthProxy`
//! with an empty repository, used on OpenShift only and skipped here). Its templates
//! (`chart/templates/_helpers.tpl`, `registry_url`) put `privateRegistry.registryUrl + "/"`,
//! else `global.cattle.systemDefaultRegistry + "/"`, in front of every repository; both are
//! empty by default. Besides the chart, the agent deploys the CSI snapshot controller
//! ([`rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE`]).
//!
//! **Which images an archive holds** ([`archive_refs`]): the two formats `ctr image import`
//! takes (containerd `core/images/archive/importer.go`, `ImportIndex`):
//! - Docker's (`docker save`): a `manifest.json` listing `{Config, RepoTags, Layers}`; each
//!   `RepoTags` entry becomes an image named by its normalised reference (`longhornio/x:v1` is
//!   `docker.io/longhornio/x:v1`, distribution/reference `ParseDockerRef`); the config and every
//!   layer must be in the archive (`image config %q not found`, `layer %q not found`).
//! - OCI image layout (`ctr image export`, `skopeo copy … oci-archive:`): an `oci-layout` file
//!   (`imageLayoutVersion` 1.0.0) and `index.json`, whose manifests are named by the
//!   `io.containerd.image.name` annotation, else `org.opencontainers.image.ref.name` when that
//!   is a full reference (a bare tag gets ctr's `import-<date>:` prefix, so it names nothing
//!   Longhorn asks for); every manifest blob the index names must be in the archive.
//!
//! Every entry is read to its end, so a truncated archive is an error here and not at a node's
//! first boot. Only uncompressed `.tar` archives are taken: containerd 1.x's `ctr image import`
//! (what MicroK8s ships) reads the file as a plain tar.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// `ref` normalised the way containerd names an imported image (distribution/reference
/// `ParseDockerRef`): the registry `docker.io` when the first component is not a host (no `.`
/// or `:`, not `localhost`), `library/` for a one-component Docker Hub name, the tag `latest`
/// when there is neither tag nor digest.
pub fn normalize_ref(r: &str) -> Result<String> {
    let r = r.trim();
    if r.is_empty() || r.chars().any(char::is_whitespace) {
        bail!("{r:?} is not an image reference");
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if name.is_empty() || tag == Some("") || name.split('/').any(str::is_empty) {
        bail!("{r:?} is not an image reference");
    }
    let (domain, path) = match name.split_once('/') {
        Some((d, p)) if d.contains(['.', ':']) || d == "localhost" => (d.to_owned(), p.to_owned()),
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("{r:?}: repository name must be lowercase");
    }
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    Ok(match (digest, tag) {
        (Some(d), _) => format!("{domain}/{path}@{d}"),
        (None, Some(t)) => format!("{domain}/{path}:{t}"),
        (None, None) => format!("{domain}/{path}:latest"),
    })
}

/// The images the chart archive at `chart` deploys (see the module docs), normalised, sorted.
pub fn chart_images(chart: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(chart).with_context(|| format!("opening {}", chart.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut values = None;
    for entry in tar
        .entries()
        .with_context(|| format!("{}: not a chart archive", chart.display()))?
    {
        let mut entry =
            entry.with_context(|| format!("{}: a damaged chart archive", chart.display()))?;
        let path = entry.path()?.into_owned();
        let parts: Vec<_> = path.components().collect();
        if parts.len() == 2 && path.ends_with("values.yaml") {
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .with_context(|| format!("{}: reading {}", chart.display(), path.display()))?;
            values = Some((path.display().to_string(), text));
        }
    }
    let Some((name, text)) = values else {
        bail!(
            "{}: the chart archive has no values.yaml in its chart folder (not a helm chart?)",
            chart.display()
        );
    };
    images_from_values(&text).with_context(|| format!("{}: {name}", chart.display()))
}

/// The images a chart's `values.yaml` names (see the module docs).
pub fn images_from_values(text: &str) -> Result<Vec<String>> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).context("not YAML")?;
    let s = |v: &serde_yaml::Value| v.as_str().unwrap_or("").trim().to_owned();
    let private = s(&v["privateRegistry"]["registryUrl"]);
    let system = s(&v["global"]["cattle"]["systemDefaultRegistry"]);
    let registry = if !private.is_empty() {
        format!("{private}/")
    } else if !system.is_empty() {
        format!("{system}/")
    } else {
        String::new()
    };
    let mut out = BTreeSet::new();
    collect_images(&v["image"], &registry, "image", &mut out)?;
    if out.is_empty() {
        bail!("no image.*.repository entries");
    }
    Ok(out.into_iter().collect())
}

fn collect_images(
    v: &serde_yaml::Value,
    registry: &str,
    at: &str,
    out: &mut BTreeSet<String>,
) -> Result<()> {
    let Some(map) = v.as_mapping() else {
        return Ok(());
    };
    if let Some(repo) = map.get("repository") {
        let repo = repo.as_str().unwrap_or("").trim();
        if repo.is_empty() {
            return Ok(());
        }
        let tag = match map.get("tag") {
            Some(serde_yaml::Value::String(t)) => t.clone(),
            Some(serde_yaml::Value::Number(n)) => n.to_string(),
            _ => bail!("{at}.tag is missing for repository {repo}"),
        };
        out.insert(
            normalize_ref(&format!("{registry}{repo}:{tag}"))
                .with_context(|| format!("{at}.repository"))?,
        );
        return Ok(());
    }
    for (k, child) in map {
        if let Some(k) = k.as_str() {
            collect_images(child, registry, &format!("{at}.{k}"), out)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The image names an archive holds once imported (see the module docs), normalised and
/// sorted. An archive that `ctr image import` would refuse (not a tar, truncated, neither
/// format, a missing config, layer or manifest blob) is an error saying why.
pub fn archive_refs(path: &Path) -> Result<Vec<String>> {
    archive_refs_inner(path).with_context(|| {
        format!(
            "{}: not a container image archive ctr can import",
            path.display()
        )
    })
}

fn archive_refs_inner(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).context("opening it")?;
    let len = f.metadata()?.len();
    if len == 0 {
        bail!("the file is empty");
    }
    let mut tar = tar::Archive::new(f);
    let mut names = BTreeSet::new();
    let mut manifest: Option<Vec<DockerManifest>> = None;
    let mut layout: Option<OciLayout> = None;
    let mut index: Option<OciIndex> = None;
    let mut entries = 0usize;
    for entry in tar.entries().context("reading it as a tar archive")? {
        let mut entry = entry.context("a damaged tar header (truncated or not a tar file)")?;
        entries += 1;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let want_json = matches!(name.as_str(), "manifest.json" | "oci-layout" | "index.json");
        let mut buf = Vec::new();
        if want_json {
            entry
                .read_to_end(&mut buf)
                .with_context(|| format!("reading {name} (truncated archive?)"))?;
        } else {
            // Read to the end: a truncated blob shows here.
            std::io::copy(&mut entry, &mut std::io::sink())
                .with_context(|| format!("reading {name} (truncated archive?)"))?;
        }
        match name.as_str() {
            "manifest.json" => {
                manifest = Some(
                    serde_json::from_slice(&buf)
                        .context("manifest.json is not Docker's manifest list")?,
                )
            }
            "oci-layout" => {
                layout = Some(serde_json::from_slice(&buf).context("oci-layout is not JSON")?)
            }
            "index.json" => {
                index =
                    Some(serde_json::from_slice(&buf).context("index.json is not an OCI index")?)
            }
            _ => {}
        }
        names.insert(name);
    }
    if entries == 0 {
        bail!("no tar entries (not a tar file)");
    }
    let mut refs = BTreeSet::new();
    if let Some(layout) = layout {
        if layout.version != "1.0.0" {
            bail!("unsupported OCI version {}", layout.version);
        }
        let Some(index) = index else {
            bail!("missing index.json in OCI layout 1.0.0");
        };
        for m in &index.manifests {
            let blob = m.digest.replacen(':', "/", 1);
            if !names.contains(&format!("blobs/{blob}")) {
                bail!(
                    "index.json names manifest {} but the archive lacks it",
                    m.digest
                );
            }
            let name = m.annotations.get("io.containerd.image.name").or_else(|| {
                m.annotations
                    .get("org.opencontainers.image.ref.name")
                    .filter(|r| r.contains(['/', ':', '@']))
            });
            if let Some(n) = name {
                refs.insert(normalize_ref(n)?);
            }
        }
    } else if let Some(manifest) = manifest {
        for m in &manifest {
            if !names.contains(&m.config) {
                bail!("image config {:?} not found", m.config);
            }
            if let Some(l) = m.layers.iter().find(|l| !names.contains(*l)) {
                bail!("layer {l:?} not found");
            }
            for t in m.repo_tags.iter().flatten() {
                refs.insert(normalize_ref(t).map_err(|e| anyhow!("normalize image ref: {e}"))?);
            }
        }
    } else {
        bail!("unrecognized image format (neither a manifest.json nor an oci-layout)");
    }
    if refs.is_empty() {
        bail!("it names no image (no RepoTags, no image name annotations)");
    }
    Ok(refs.into_iter().collect())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Synthetic archives for the tests (here and in `storage`).
    use std::path::Path;

    fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }

    /// A `docker save` archive holding one image tagged with each of `tags`.
    pub fn docker_archive(path: &Path, tags: &[&str]) {
        let mut b = tar::Builder::new(Vec::new());
        let config = "sha256:1111.json";
        let layer = "2222/layer.tar";
        append(&mut b, config, br#"{"architecture":"amd64","os":"linux"}"#);
        append(&mut b, layer, &[0u8; 1024]);
        let manifest = serde_json::json!([{"Config": config, "RepoTags": tags, "Layers": [layer]}]);
        append(&mut b, "manifest.json", manifest.to_string().as_bytes());
        std::fs::write(path, b.into_inner().unwrap()).unwrap();
    }

    /// An OCI layout archive (`ctr image export`) holding images named `names`.
    pub fn oci_archive(path: &Path, names: &[&str]) {
        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let mut manifests = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let hex = format!("{:064x}", i + 1);
            append(&mut b, &format!("blobs/sha256/{hex}"), b"{}");
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{hex}"), "size": 2,
                "annotations": {"io.containerd.image.name": n,
                                "org.opencontainers.image.ref.name": n.rsplit(':').next()}
            }));
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        append(&mut b, "index.json", index.to_string().as_bytes());
        std::fs::write(path, b.into_inner().unwrap()).unwrap();
    }

    /// A chart archive `longhorn/values.yaml` (plus `Chart.yaml`) with `values`.
    pub fn chart_archive(path: &Path, values: &str) {
        let mut b = tar::Builder::new(Vec::new());
        append(
            &mut b,
            "longhorn/Chart.yaml",
            b"name: longhorn\nversion: 1.7.2\n",
        );
        append(&mut b, "longhorn/values.yaml", values.as_bytes());
        append(
            &mut b,
            "longhorn/charts/x/values.yaml",
            b"image: {a: {repository: no, tag: x}}\n",
        );
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        std::fs::write(path, gz.finish().unwrap()).unwrap();
    }

    /// The layout of longhorn 1.7.2's `chart/values.yaml` (`image:` and the registries).
    pub const VALUES_1_7_2: &str = r#"global:
  cattle:
    systemDefaultRegistry: ""
image:
  longhorn:
    engine:
      repository: longhornio/longhorn-engine
      tag: v1.7.2
    manager:
      repository: longhornio/longhorn-manager
      tag: v1.7.2
    ui:
      repository: longhornio/longhorn-ui
      tag: v1.7.2
    instanceManager:
      repository: longhornio/longhorn-instance-manager
      tag: v1.7.2
    shareManager:
      repository: longhornio/longhorn-share-manager
      tag: v1.7.2
    backingImageManager:
      repository: longhornio/backing-image-manager
      tag: v1.7.2
    supportBundleKit:
      repository: longhornio/support-bundle-kit
      tag: v0.0.45
  csi:
    attacher:
      repository: longhornio/csi-attacher
      tag: v4.7.0
    provisioner:
      repository: longhornio/csi-provisioner
      tag: v4.0.1-20241007
    nodeDriverRegistrar:
      repository: longhornio/csi-node-driver-registrar
      tag: v2.12.0
    resizer:
      repository: longhornio/csi-resizer
      tag: v1.12.0
    snapshotter:
      repository: longhornio/csi-snapshotter
      tag: v7.0.2-20241007
    livenessProbe:
      repository: longhornio/livenessprobe
      tag: v2.14.0
  openshift:
    oauthProxy:
      repository: ""
      tag: ""
  pullPolicy: IfNotPresent
privateRegistry:
  registryUrl: ~
"#;
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn references_normalise_like_containerd() {
        for (r, n) in [
            (
                "longhornio/longhorn-engine:v1.7.2",
                "docker.io/longhornio/longhorn-engine:v1.7.2",
            ),
            ("busybox", "docker.io/library/busybox:latest"),
            ("docker.io/library/busybox:1", "docker.io/library/busybox:1"),
            (
                "registry.example:5000/a/b:v1",
                "registry.example:5000/a/b:v1",
            ),
            ("localhost/a", "localhost/a:latest"),
            ("a@sha256:ab", "docker.io/library/a@sha256:ab"),
        ] {
            assert_eq!(normalize_ref(r).unwrap(), n, "{r}");
        }
        for bad in ["", "a b", "A/b:c", "a:", "/a"] {
            assert!(normalize_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_chart_names_its_images_in_values_yaml() {
        let d = tempfile::tempdir().unwrap();
        let chart = d.path().join("longhorn-1.7.2.tgz");
        chart_archive(&chart, VALUES_1_7_2);
        let images = chart_images(&chart).unwrap();
        assert_eq!(images.len(), 13, "{images:?}");
        assert!(images.contains(&"docker.io/longhornio/longhorn-manager:v1.7.2".to_string()));
        assert!(images.contains(&"docker.io/longhornio/csi-snapshotter:v7.0.2-20241007".into()));
        // The subchart's values are not the chart's.
        assert!(!images.iter().any(|i| i.contains("/no:")), "{images:?}");
        // A registry in front of every repository.
        let v = VALUES_1_7_2.replace("registryUrl: ~", "registryUrl: mirror.lan:5000");
        let images = images_from_values(&v).unwrap();
        assert!(
            images
                .iter()
                .all(|i| i.starts_with("mirror.lan:5000/longhornio/")),
            "{images:?}"
        );
        // Not a chart.
        std::fs::write(&chart, [0x1f, 0x8b, 0]).unwrap();
        assert!(chart_images(&chart).is_err());
    }

    #[test]
    fn archives_list_their_images_in_both_formats() {
        let d = tempfile::tempdir().unwrap();
        let docker = d.path().join("docker.tar");
        docker_archive(&docker, &["longhornio/longhorn-ui:v1.7.2", "busybox"]);
        assert_eq!(
            archive_refs(&docker).unwrap(),
            [
                "docker.io/library/busybox:latest",
                "docker.io/longhornio/longhorn-ui:v1.7.2"
            ]
        );
        let oci = d.path().join("oci.tar");
        oci_archive(&oci, &["docker.io/longhornio/csi-resizer:v1.12.0"]);
        assert_eq!(
            archive_refs(&oci).unwrap(),
            ["docker.io/longhornio/csi-resizer:v1.12.0"]
        );
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let docker = d.path().join("images.tar");
        docker_archive(&docker, &["longhornio/longhorn-ui:v1.7.2"]);
        let bytes = std::fs::read(&docker).unwrap();
        let cut = d.path().join("cut.tar");
        std::fs::write(&cut, &bytes[..1500]).unwrap();
        let err = format!("{:#}", archive_refs(&cut).unwrap_err());
        assert!(
            err.contains("cut.tar: not a container image archive"),
            "{err}"
        );
        assert!(err.contains("truncated"), "{err}");
        let html = d.path().join("page.tar");
        std::fs::write(&html, "<html>".repeat(200)).unwrap();
        let err = format!("{:#}", archive_refs(&html).unwrap_err());
        assert!(
            err.contains("page.tar") && err.contains("not a tar"),
            "{err}"
        );
        let empty = d.path().join("empty.tar");
        std::fs::write(&empty, b"").unwrap();
        assert!(format!("{:#}", archive_refs(&empty).unwrap_err()).contains("empty"));
        // A tar of something else.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_cksum();
        b.append_data(&mut h, "notes.txt", &b"hi"[..]).unwrap();
        let other = d.path().join("other.tar");
        std::fs::write(&other, b.into_inner().unwrap()).unwrap();
        let err = format!("{:#}", archive_refs(&other).unwrap_err());
        assert!(err.contains("unrecognized image format"), "{err}");
    }
}
