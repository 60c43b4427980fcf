//! Container image archives and the images a Helm chart runs, read the way the node's
//! containerd and the chart's templates read them. One reader for the image builder's
//! build-time check of `addons.offline` (`imagebuilder::customize::storage::images`), the
//! MicroK8s simulator's `microk8s ctr image import` and the agent's test fakes.
//!
//! **References** ([`normalize_ref`]): named the way containerd names an imported image,
//! distribution/reference `ParseDockerRef` (distribution/reference `normalize.go`,
//! `splitDockerDomain`): the first component is the registry only when it holds a `.` or a
//! `:` or is `localhost`, else the registry is `docker.io`; `index.docker.io` is `docker.io`;
//! a one-component Docker Hub name gets `library/`; no tag and no digest means `:latest`; a
//! digest drops the tag. A reference that is empty, has white space, an empty component or tag,
//! or upper case in its repository is refused with containerd's words (`normalize image ref
//! "X": invalid reference format`, containerd `images/archive/reference.go`,
//! `normalizeReference`). The newest distribution/reference also takes an upper-case first
//! component as a registry; containerd 1.x (what MicroK8s ships) vendors the older rule
//! refused here.
//!
//! **Archives** ([`archive_image_names`]): the two layouts `ctr image import` takes,
//! containerd 1.x `images/archive/importer.go` (`ImportIndex`) and `client/import.go`
//! (`Import`, `imageName`):
//! - the file is read with Go's `archive/tar`, plain (no decompression: a gzip-compressed file
//!   is not a tar). A header that is not one (bad checksum, a number that is not octal) is
//!   `archive/tar: invalid tar header`; the file ending inside a header, or inside the data of
//!   an entry that is not a regular file, is `unexpected EOF`; ending inside a regular file's
//!   data is `failed to ingest "NAME": unexpected EOF` (`untar manifest "NAME": …` for
//!   `manifest.json`, `untar oci layout "NAME": …` for `oci-layout`); ending at a header's
//!   boundary or inside the padding after the last data ends the archive (Go
//!   `src/archive/tar/reader.go`: "it is okay to hit io.EOF in the padding").
//! - Only regular files count, by their cleaned name (`path.Clean`: `./manifest.json` is
//!   `manifest.json`); a symlink stands for its target (Docker's layout shares layers so).
//! - OCI image layout (`ctr image export`, `skopeo copy … oci-archive:`): an `oci-layout` with
//!   a non-empty `imageLayoutVersion`, which must be `1.0.0` (`unsupported OCI version X`), and
//!   an `index.json` (`missing index.json in OCI layout 1.0.0`); each manifest of the index must
//!   be in the archive as `blobs/ALG/HEX` (`content digest ALG:HEX: not found`, what the
//!   content store answers when `ctr` walks the index: containerd `metadata/content.go`). An image is named by its
//!   `io.containerd.image.name` annotation, else by `org.opencontainers.image.ref.name` when
//!   that holds a `/`, `:` or `@`, **as written** ("existing OCI reference names are
//!   untouched"); a bare tag there is named `import-<date>:<tag>` by ctr, which no pod asks
//!   for, and is left out here.
//! - Docker's layout (`docker save`), read when there is no OCI layout: a `manifest.json`
//!   (else `unrecognized image format`) listing `{Config, RepoTags, Layers}`; the config must
//!   be in the archive (`image config "X" not found`), every layer too (`failed to resolve
//!   layers: layer "X" not found`), a symlink must have its target (`no target for symlink
//!   layer from "X" to "Y"`), and each `RepoTags` entry names an image by its normalised
//!   reference.
//!
//! [`ArchiveError`] shows ctr's text (the simulator prints it as ctr would); its
//! [`ArchiveError::explained`] adds what that means for a person. What is **not** checked: the
//! blobs' digests (a blob need only be present and complete), platforms, and the layers'
//! contents. Every entry is read to its end, so a truncated archive is found here; the
//! metadata files (`manifest.json`, `oci-layout`, `index.json`) are read into memory up to
//! [`METADATA_LIMIT`], everything else streams.
//!
//! **Charts** ([`chart_values`], [`chart_images`], [`images_from_values`]): a chart archive is
//! a gzip-compressed tar whose top folder is the chart, as `helm package` writes it; its
//! values are the top folder's `values.yaml` (a subchart's are not). The images are named as
//! in Longhorn's chart (longhorn/longhorn `chart/values.yaml` at tag v1.7.2): every
//! `image.…` mapping with a `repository` holds one, `repository:tag`, with
//! `privateRegistry.registryUrl + "/"`, else `global.cattle.systemDefaultRegistry + "/"`, in
//! front (`chart/templates/_helpers.tpl`, `registry_url`); an empty repository (OpenShift's
//! proxy) is skipped; a repository without a tag is an error.
//!
//! Test archives (Docker, OCI, chart) are written by the `testing` module (feature `testing`),
//! the one place the workspace's tests make them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::rc::Rc;

use serde::Deserialize;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// How much of a metadata file (`manifest.json`, `oci-layout`, `index.json`, `values.yaml`) is
/// read into memory at most; a larger one is refused rather than exhausting memory.
pub const METADATA_LIMIT: u64 = 16 << 20;

/// A reference containerd would refuse (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("normalize image ref {reference:?}: invalid reference format{}", if *.uppercase { ": repository name must be lowercase" } else { "" })]
pub struct RefError {
    pub reference: String,
    /// The repository has upper case in it (else the reference is malformed).
    pub uppercase: bool,
}

/// `r` as containerd names the image (see the module docs): `longhornio/x:v1` is
/// `docker.io/longhornio/x:v1`, `busybox` is `docker.io/library/busybox:latest`.
pub fn normalize_ref(r: &str) -> Result<String, RefError> {
    let refuse = |uppercase| RefError {
        reference: r.to_owned(),
        uppercase,
    };
    let t = r.trim();
    if t.is_empty() || t.chars().any(char::is_whitespace) {
        return Err(refuse(false));
    }
    let (name_tag, digest) = match t.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (t, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if name.is_empty()
        || tag == Some("")
        || digest == Some("")
        || name.split('/').any(str::is_empty)
    {
        return Err(refuse(false));
    }
    let (domain, path) = match name.split_once('/') {
        Some((d, p)) if d.contains(['.', ':']) || d == "localhost" => (d, p),
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(refuse(true));
    }
    let library = if domain == "docker.io" && !path.contains('/') {
        "library/"
    } else {
        ""
    };
    Ok(match (digest, tag) {
        (Some(d), _) => format!("{domain}/{library}{path}@{d}"),
        (None, Some(t)) => format!("{domain}/{library}{path}:{t}"),
        (None, None) => format!("{domain}/{library}{path}:latest"),
    })
}

/// Why `ctr image import` refuses an archive; shown as ctr shows it (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive/tar: invalid tar header")]
    InvalidHeader {
        /// The file starts like gzip (`1f 8b`).
        gzip: bool,
    },
    /// The file ends inside a header or inside a non-regular entry's data.
    #[error("unexpected EOF")]
    Truncated,
    /// The file ends inside the data of the regular file `name` (as the header has it).
    #[error("{}: unexpected EOF", ingest_context(name))]
    TruncatedEntry { name: String },
    /// The file could not be read (`name`: inside that entry's data, empty: at a header).
    #[error("{}", read_context(name, reason))]
    Read { name: String, reason: String },
    #[error("{}: larger than {} MiB", ingest_context(name), METADATA_LIMIT >> 20)]
    TooLarge { name: String },
    #[error("untar oci layout {name:?}: {source}")]
    OciLayoutJson {
        name: String,
        source: serde_json::Error,
    },
    #[error("untar manifest {name:?}: {source}")]
    ManifestJson {
        name: String,
        source: serde_json::Error,
    },
    #[error("unsupported OCI version {0}")]
    OciVersion(String),
    #[error("missing index.json in OCI layout 1.0.0")]
    MissingIndex,
    #[error("{0}")]
    IndexJson(serde_json::Error),
    #[error("content digest {0}: not found")]
    MissingManifest(String),
    #[error("unrecognized image format")]
    UnrecognizedFormat,
    #[error("no target for symlink layer from {name:?} to {target:?}")]
    SymlinkTarget { name: String, target: String },
    #[error("image config {0:?} not found")]
    MissingConfig(String),
    #[error("failed to resolve layers: layer {0:?} not found")]
    MissingLayer(String),
    #[error(transparent)]
    Reference(#[from] RefError),
}

fn read_context(name: &str, reason: &str) -> String {
    match name {
        "" => reason.to_owned(),
        _ => format!("{}: {reason}", ingest_context(name)),
    }
}

/// containerd's wrapping of an error reading the entry `name` (`importer.go`).
fn ingest_context(name: &str) -> String {
    match clean_path(name).as_str() {
        "manifest.json" => format!("untar manifest {name:?}"),
        "oci-layout" => format!("untar oci layout {name:?}"),
        _ => format!("failed to ingest {name:?}"),
    }
}

impl ArchiveError {
    /// What the error means, for a person rather than for ctr's parser.
    pub fn meaning(&self) -> &'static str {
        match self {
            ArchiveError::InvalidHeader { gzip: true } => {
                "gzip-compressed: ctr image import takes an uncompressed tar, gunzip it first"
            }
            ArchiveError::InvalidHeader { gzip: false } => "not a tar file, or a damaged one",
            ArchiveError::Truncated | ArchiveError::TruncatedEntry { .. } => {
                "the archive is truncated"
            }
            ArchiveError::Read { .. } => "the file could not be read",
            ArchiveError::TooLarge { .. } => "an image index too large to be real",
            ArchiveError::OciLayoutJson { .. }
            | ArchiveError::ManifestJson { .. }
            | ArchiveError::IndexJson(_) => "its image index is not valid JSON of its kind",
            ArchiveError::OciVersion(_) => "an OCI layout version ctr does not know",
            ArchiveError::MissingIndex
            | ArchiveError::MissingManifest(_)
            | ArchiveError::SymlinkTarget { .. }
            | ArchiveError::MissingConfig(_)
            | ArchiveError::MissingLayer(_) => "the archive lacks part of an image",
            ArchiveError::UnrecognizedFormat => {
                "neither Docker's manifest.json nor an OCI oci-layout file is in it"
            }
            ArchiveError::Reference(_) => "it names an image by an invalid reference",
        }
    }

    /// ctr's text followed by [`Self::meaning`] in parentheses.
    pub fn explained(&self) -> String {
        format!("{self} ({})", self.meaning())
    }
}

/// Go's `path.Clean` for the `/`-separated names of a tar archive.
fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// What the reader under the tar parser saw: bytes consumed, whether it hit the end of the
/// file, the first bytes (to tell gzip), and a read error's text.
#[derive(Default)]
struct Seen {
    pos: u64,
    eof: bool,
    head: Vec<u8>,
    error: Option<String>,
}

struct Watched<R> {
    inner: R,
    seen: Rc<std::cell::RefCell<Seen>>,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let got = self.inner.read(buf);
        let mut seen = self.seen.borrow_mut();
        match &got {
            Ok(0) if !buf.is_empty() => seen.eof = true,
            Ok(n) => {
                if seen.head.len() < 2 {
                    let take = (2 - seen.head.len()).min(*n);
                    seen.head.extend_from_slice(&buf[..take]);
                }
                seen.pos += *n as u64;
            }
            Err(e) => seen.error = Some(e.to_string()),
        }
        got
    }
}

/// One entry's data (`size` bytes): all of it (`keep`, up to [`METADATA_LIMIT`]) or only
/// counted. `regular`: the entry is a regular file (a short one is named then).
fn read_entry(
    entry: &mut impl Read,
    name: &str,
    size: u64,
    regular: bool,
    keep: bool,
    seen: &std::cell::RefCell<Seen>,
) -> Result<Vec<u8>, ArchiveError> {
    let mut buf = Vec::new();
    let got = if keep {
        entry
            .take(METADATA_LIMIT + 1)
            .read_to_end(&mut buf)
            .map(|n| n as u64)
    } else {
        std::io::copy(entry, &mut std::io::sink())
    };
    match got {
        Ok(n) if keep && n > METADATA_LIMIT => Err(ArchiveError::TooLarge {
            name: name.to_owned(),
        }),
        Ok(n) if n < size && regular => Err(ArchiveError::TruncatedEntry {
            name: name.to_owned(),
        }),
        Ok(n) if n < size => Err(ArchiveError::Truncated),
        Ok(_) => Ok(buf),
        Err(e) => Err(ArchiveError::Read {
            name: name.to_owned(),
            reason: seen.borrow().error.clone().unwrap_or_else(|| e.to_string()),
        }),
    }
}

#[derive(Deserialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion", default)]
    version: String,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config", default)]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Option<Vec<OciDescriptor>>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// What the tar loop collects.
#[derive(Default)]
struct Contents {
    /// Cleaned names of the regular files.
    files: BTreeSet<String>,
    /// `(name as in the header, cleaned target)` of each symlink.
    symlinks: Vec<(String, String)>,
    layout: Option<(String, Vec<u8>)>,
    manifest: Option<(String, Vec<u8>)>,
    index: Option<Vec<u8>>,
}

/// The names `ctr image import` gives the images of the archive read from `archive`, in the
/// archive's order (see the module docs).
pub fn archive_image_names(archive: impl Read) -> Result<Vec<String>, ArchiveError> {
    let c = read_contents(archive)?;
    if let Some((name, bytes)) = &c.layout {
        let layout: OciLayout =
            serde_json::from_slice(bytes).map_err(|source| ArchiveError::OciLayoutJson {
                name: name.clone(),
                source,
            })?;
        if !layout.version.is_empty() {
            return oci_names(&c, &layout.version);
        }
    }
    let Some((name, bytes)) = &c.manifest else {
        return Err(ArchiveError::UnrecognizedFormat);
    };
    let manifests: Option<Vec<DockerManifest>> =
        serde_json::from_slice(bytes).map_err(|source| ArchiveError::ManifestJson {
            name: name.clone(),
            source,
        })?;
    let Some(manifests) = manifests else {
        return Err(ArchiveError::UnrecognizedFormat);
    };
    let mut blobs = c.files.clone();
    for (name, target) in &c.symlinks {
        if !c.files.contains(target) {
            return Err(ArchiveError::SymlinkTarget {
                name: name.clone(),
                target: target.clone(),
            });
        }
        blobs.insert(name.clone());
    }
    let mut names = Vec::new();
    for m in &manifests {
        if !blobs.contains(&m.config) {
            return Err(ArchiveError::MissingConfig(m.config.clone()));
        }
        if let Some(l) = m.layers.iter().flatten().find(|l| !blobs.contains(*l)) {
            return Err(ArchiveError::MissingLayer(l.clone()));
        }
        for t in m.repo_tags.iter().flatten() {
            names.push(normalize_ref(t)?);
        }
    }
    Ok(names)
}

fn oci_names(c: &Contents, version: &str) -> Result<Vec<String>, ArchiveError> {
    if version != "1.0.0" {
        return Err(ArchiveError::OciVersion(version.to_owned()));
    }
    let index = c.index.as_ref().ok_or(ArchiveError::MissingIndex)?;
    let index: OciIndex = serde_json::from_slice(index).map_err(ArchiveError::IndexJson)?;
    let mut names = Vec::new();
    for m in index.manifests.iter().flatten() {
        let annotations = m.annotations.clone().unwrap_or_default();
        let name = annotations
            .get("io.containerd.image.name")
            .filter(|n| !n.is_empty())
            .or_else(|| {
                annotations
                    .get("org.opencontainers.image.ref.name")
                    .filter(|r| r.contains(['/', ':', '@']))
            });
        names.extend(name.cloned());
    }
    // ctr walks the index after naming the images: a manifest it cannot find fails the import.
    for m in index.manifests.iter().flatten() {
        if !c
            .files
            .contains(&format!("blobs/{}", m.digest.replacen(':', "/", 1)))
        {
            return Err(ArchiveError::MissingManifest(m.digest.clone()));
        }
    }
    Ok(names)
}

/// Reads every entry of the tar archive `archive` to its end (see the module docs).
fn read_contents(archive: impl Read) -> Result<Contents, ArchiveError> {
    let seen = Rc::new(std::cell::RefCell::new(Seen::default()));
    let mut tar = tar::Archive::new(Watched {
        inner: archive,
        seen: seen.clone(),
    });
    let mut c = Contents::default();
    // Where the last entry's data and padding end: running out inside the padding ends the
    // archive, as Go's reader has it.
    let mut padded_end = 0u64;
    let mut entries = tar.entries().map_err(|e| ArchiveError::Read {
        name: String::new(),
        reason: e.to_string(),
    })?;
    loop {
        let mut entry = match entries.next() {
            None => return Ok(c),
            Some(Ok(entry)) => entry,
            Some(Err(_)) => {
                let seen = seen.borrow();
                return match (&seen.error, seen.eof) {
                    (Some(reason), _) => Err(ArchiveError::Read {
                        name: String::new(),
                        reason: reason.clone(),
                    }),
                    (None, true) if seen.pos < padded_end => Ok(c),
                    (None, true) => Err(ArchiveError::Truncated),
                    // Anything else the parser refuses is a header that is not one.
                    (None, false) => Err(ArchiveError::InvalidHeader {
                        gzip: seen.head.starts_with(&[0x1f, 0x8b]),
                    }),
                };
            }
        };
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        padded_end = entry.raw_file_position() + entry.size().div_ceil(512) * 512;
        if kind.is_symlink() {
            let link = entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .unwrap_or_default();
            let dir = raw.rsplit_once('/').map_or(".", |(d, _)| d);
            c.symlinks
                .push((raw.clone(), clean_path(&format!("{dir}/{link}"))));
        }
        let name = clean_path(&raw);
        let keep = kind.is_file()
            && matches!(name.as_str(), "manifest.json" | "oci-layout" | "index.json");
        let size = entry.size();
        let data = read_entry(&mut entry, &raw, size, kind.is_file(), keep, &seen)?;
        if !kind.is_file() {
            continue;
        }
        match name.as_str() {
            "manifest.json" => c.manifest = Some((raw, data)),
            "oci-layout" => c.layout = Some((raw, data)),
            "index.json" => c.index = Some(data),
            _ => {}
        }
        c.files.insert(name);
    }
}

/// A chart's own `values.yaml`: the name of its entry in the archive and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartValues {
    pub entry: String,
    pub text: String,
}

/// Why a chart archive's images cannot be read (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("a damaged chart archive (not a gzip-compressed tar?): {0}")]
    Damaged(std::io::Error),
    #[error("reading {entry}: {source}")]
    Reading {
        entry: String,
        source: std::io::Error,
    },
    #[error("{entry}: larger than {} MiB", METADATA_LIMIT >> 20)]
    TooLarge { entry: String },
    #[error("the chart archive has no values.yaml in its chart folder (not a helm chart?)")]
    NoValues,
    #[error("{entry}: not YAML: {source}")]
    Yaml {
        entry: String,
        source: serde_yaml::Error,
    },
    #[error("{entry}: {source}")]
    Values { entry: String, source: ValuesError },
}

/// Why a chart's values name no usable image (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValuesError {
    #[error("{at}.tag is missing for repository {repository}")]
    MissingTag { at: String, repository: String },
    #[error("{at}.repository: {source}")]
    Reference { at: String, source: RefError },
    #[error("no image.*.repository entries")]
    NoImages,
}

/// The top folder's `values.yaml` of the gzip-compressed chart archive read from `chart`
/// (see the module docs).
pub fn chart_values(chart: impl Read) -> Result<ChartValues, ChartError> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(chart));
    let mut values = None;
    for entry in tar.entries().map_err(ChartError::Damaged)? {
        let mut entry = entry.map_err(ChartError::Damaged)?;
        let path = entry.path().map_err(ChartError::Damaged)?.into_owned();
        if path.components().count() != 2 || !path.ends_with("values.yaml") {
            continue;
        }
        let name = path.display().to_string();
        let mut text = String::new();
        entry
            .by_ref()
            .take(METADATA_LIMIT + 1)
            .read_to_string(&mut text)
            .map_err(|source| ChartError::Reading {
                entry: name.clone(),
                source,
            })?;
        if text.len() as u64 > METADATA_LIMIT {
            return Err(ChartError::TooLarge { entry: name });
        }
        values = Some(ChartValues { entry: name, text });
    }
    values.ok_or(ChartError::NoValues)
}

/// The images the chart archive read from `chart` runs with its own values, normalised and
/// sorted (see the module docs).
pub fn chart_images(chart: impl Read) -> Result<Vec<String>, ChartError> {
    let ChartValues { entry, text } = chart_values(chart)?;
    let values: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|source| ChartError::Yaml {
            entry: entry.clone(),
            source,
        })?;
    images_from_values(&values).map_err(|source| ChartError::Values { entry, source })
}

/// The images a chart's values name, normalised and sorted (see the module docs).
pub fn images_from_values(values: &serde_yaml::Value) -> Result<Vec<String>, ValuesError> {
    let text = |v: &serde_yaml::Value| v.as_str().unwrap_or("").trim().to_owned();
    let private = text(&values["privateRegistry"]["registryUrl"]);
    let system = text(&values["global"]["cattle"]["systemDefaultRegistry"]);
    let registry = [private, system]
        .into_iter()
        .find(|r| !r.is_empty())
        .map(|r| format!("{r}/"))
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    collect_images(&values["image"], &registry, "image", &mut out)?;
    if out.is_empty() {
        return Err(ValuesError::NoImages);
    }
    Ok(out.into_iter().collect())
}

fn collect_images(
    v: &serde_yaml::Value,
    registry: &str,
    at: &str,
    out: &mut BTreeSet<String>,
) -> Result<(), ValuesError> {
    let Some(map) = v.as_mapping() else {
        return Ok(());
    };
    if let Some(repo) = map.get("repository") {
        let repo = repo.as_str().unwrap_or("").trim();
        if repo.is_empty() {
            return Ok(());
        }
        let tag = match map.get("tag") {
            Some(serde_yaml::Value::String(t)) if !t.trim().is_empty() => t.trim().to_owned(),
            Some(serde_yaml::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(ValuesError::MissingTag {
                    at: at.to_owned(),
                    repository: repo.to_owned(),
                })
            }
        };
        let image = normalize_ref(&format!("{registry}{repo}:{tag}")).map_err(|source| {
            ValuesError::Reference {
                at: at.to_owned(),
                source,
            }
        })?;
        out.insert(image);
        return Ok(());
    }
    for (k, child) in map {
        if let Some(k) = k.as_str() {
            collect_images(child, registry, &format!("{at}.{k}"), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn names(bytes: &[u8]) -> Result<Vec<String>, String> {
        archive_image_names(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn references_normalise_like_containerd() {
        for (r, n) in [
            (
                "longhornio/longhorn-engine:v1.7.2",
                "docker.io/longhornio/longhorn-engine:v1.7.2",
            ),
            ("busybox", "docker.io/library/busybox:latest"),
            ("docker.io/library/busybox:1", "docker.io/library/busybox:1"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/a/b:1", "docker.io/a/b:1"),
            (
                "registry.example:5000/a/b:v1",
                "registry.example:5000/a/b:v1",
            ),
            ("localhost/a", "localhost/a:latest"),
            ("a@sha256:ab", "docker.io/library/a@sha256:ab"),
            ("a:1@sha256:ab", "docker.io/library/a@sha256:ab"),
        ] {
            assert_eq!(normalize_ref(r).unwrap(), n, "{r}");
        }
        for bad in ["", "a b", "A/b:c", "a:", "/a", "a//b", "a@"] {
            assert!(normalize_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(
            normalize_ref("Longhornio/x:1").unwrap_err().to_string(),
            "normalize image ref \"Longhornio/x:1\": invalid reference format: repository name \
             must be lowercase"
        );
        assert_eq!(
            normalize_ref("a:").unwrap_err().to_string(),
            "normalize image ref \"a:\": invalid reference format"
        );
    }

    #[test]
    fn docker_archives_import_like_containerd_and_fail_with_its_errors() {
        let manifest = br#"[{"Config":"c.json","RepoTags":["longhornio/longhorn-ui:v1.7.2","busybox"],"Layers":["l.tar"]}]"#;
        let good = tar_bytes(&[
            ("c.json", b"{}"),
            ("l.tar", &[1; 600]),
            ("manifest.json", manifest),
        ]);
        // In the archive's order, as ctr prints them.
        assert_eq!(
            names(&good).unwrap(),
            [
                "docker.io/longhornio/longhorn-ui:v1.7.2",
                "docker.io/library/busybox:latest"
            ]
        );
        // Cut inside l.tar's data, inside its header, inside manifest.json's data.
        assert_eq!(
            names(&good[..1800]).unwrap_err(),
            "failed to ingest \"l.tar\": unexpected EOF"
        );
        assert_eq!(names(&good[..1100]).unwrap_err(), "unexpected EOF");
        assert_eq!(
            names(&good[..3100]).unwrap_err(),
            "untar manifest \"manifest.json\": unexpected EOF"
        );
        // Cut at a header's boundary, or in the padding after the last data: the archive ends
        // there (Go's reader), and what is missing is missing.
        assert_eq!(
            names(&good[..1024]).unwrap_err(),
            "unrecognized image format"
        );
        let end = 2560 + 512 + manifest.len();
        assert_eq!(names(&good[..end + 10]).unwrap().len(), 2);
        assert_eq!(
            names(&"<html>".repeat(100).into_bytes()).unwrap_err(),
            "archive/tar: invalid tar header"
        );
        assert_eq!(names(b"").unwrap_err(), "unrecognized image format");
        let no_layer = tar_bytes(&[("c.json", b"{}"), ("manifest.json", manifest)]);
        assert_eq!(
            names(&no_layer).unwrap_err(),
            "failed to resolve layers: layer \"l.tar\" not found"
        );
        let no_config = tar_bytes(&[("l.tar", b"x"), ("./manifest.json", manifest)]);
        assert_eq!(
            names(&no_config).unwrap_err(),
            "image config \"c.json\" not found"
        );
        let bad_tag = br#"[{"Config":"c.json","RepoTags":["Busybox"],"Layers":[]}]"#;
        let bad = tar_bytes(&[("c.json", b"{}"), ("manifest.json", bad_tag)]);
        assert_eq!(
            names(&bad).unwrap_err(),
            "normalize image ref \"Busybox\": invalid reference format: repository name must \
             be lowercase"
        );
        let not_json = tar_bytes(&[("manifest.json", b"{")]);
        assert!(names(&not_json)
            .unwrap_err()
            .starts_with("untar manifest \"manifest.json\": "));
    }

    #[test]
    fn long_entry_names_are_read_whole() {
        // Longer than a header's 100-byte name field: GNU tar and the tar crate write a
        // long-name entry before it, Go's reader merges it, and so does this one.
        let layer = format!("{}/layer.tar", "f".repeat(120));
        let manifest =
            format!(r#"[{{"Config":"c.json","RepoTags":["a:1"],"Layers":["{layer}"]}}]"#);
        let archive = tar_bytes(&[
            ("c.json", b"{}"),
            (&layer, b"L"),
            ("manifest.json", manifest.as_bytes()),
        ]);
        assert_eq!(names(&archive).unwrap(), ["docker.io/library/a:1"]);
    }

    #[test]
    fn a_symlinked_layer_counts_as_its_target() {
        let manifest =
            br#"[{"Config":"c.json","RepoTags":["a:1"],"Layers":["x/layer.tar","y/layer.tar"]}]"#;
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("c.json", &b"{}"[..]),
            ("x/layer.tar", b"L"),
            ("manifest.json", manifest),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        let link = |target: &str| {
            let mut b = tar::Builder::new(b.get_ref().clone());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "y/layer.tar", target).unwrap();
            b.into_inner().unwrap()
        };
        assert_eq!(
            names(&link("../x/layer.tar")).unwrap(),
            ["docker.io/library/a:1"]
        );
        assert_eq!(
            names(&link("../z/layer.tar")).unwrap_err(),
            "no target for symlink layer from \"y/layer.tar\" to \"z/layer.tar\""
        );
    }

    #[test]
    fn oci_archives_name_their_images_as_written() {
        let hex = "a".repeat(64);
        let index = |name: &str| {
            format!(
                r#"{{"manifests":[{{"digest":"sha256:{hex}","annotations":{{{name}"org.opencontainers.image.ref.name":"v1.12.0"}}}}]}}"#
            )
        };
        let blob = format!("blobs/sha256/{hex}");
        let layout: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
        let full =
            index(r#""io.containerd.image.name":"docker.io/longhornio/csi-resizer:v1.12.0","#);
        let oci = tar_bytes(&[
            ("oci-layout", layout),
            (&blob, b"{}"),
            ("index.json", full.as_bytes()),
        ]);
        assert_eq!(
            names(&oci).unwrap(),
            ["docker.io/longhornio/csi-resizer:v1.12.0"]
        );
        // Not normalised: containerd keeps an OCI name as it is.
        let short = index(r#""io.containerd.image.name":"longhornio/csi-resizer:v1.12.0","#);
        let oci = tar_bytes(&[
            ("oci-layout", layout),
            (&blob, b"{}"),
            ("index.json", short.as_bytes()),
        ]);
        assert_eq!(names(&oci).unwrap(), ["longhornio/csi-resizer:v1.12.0"]);
        // A bare tag names nothing here (ctr: import-<date>:v1.12.0).
        let bare = index("");
        let oci = tar_bytes(&[
            ("oci-layout", layout),
            (&blob, b"{}"),
            ("index.json", bare.as_bytes()),
        ]);
        assert_eq!(names(&oci).unwrap(), Vec::<String>::new());
        let no_blob = tar_bytes(&[("oci-layout", layout), ("index.json", full.as_bytes())]);
        assert_eq!(
            names(&no_blob).unwrap_err(),
            format!("content digest sha256:{hex}: not found")
        );
        let no_index = tar_bytes(&[("oci-layout", layout), (&blob, b"{}")]);
        assert_eq!(
            names(&no_index).unwrap_err(),
            "missing index.json in OCI layout 1.0.0"
        );
        let v2 = tar_bytes(&[("oci-layout", br#"{"imageLayoutVersion":"2.0.0"}"#)]);
        assert_eq!(names(&v2).unwrap_err(), "unsupported OCI version 2.0.0");
        let cut = tar_bytes(&[("oci-layout", layout)]);
        assert_eq!(
            names(&cut[..530]).unwrap_err(),
            "untar oci layout \"oci-layout\": unexpected EOF"
        );
    }

    #[test]
    fn the_test_writers_make_archives_the_reader_and_gnu_tar_agree_on() {
        let d = tempfile::tempdir().unwrap();
        let docker = d.path().join("docker.tar");
        docker_archive(&docker, &["longhornio/longhorn-ui:v1.7.2", "busybox"]).unwrap();
        let f = std::fs::File::open(&docker).unwrap();
        assert_eq!(
            archive_image_names(f).unwrap(),
            [
                "docker.io/longhornio/longhorn-ui:v1.7.2",
                "docker.io/library/busybox:latest"
            ]
        );
        // The offsets the module docs of `testing` promise.
        let bytes = std::fs::read(&docker).unwrap();
        assert_eq!(
            names(&bytes[..2000]).unwrap_err(),
            "failed to ingest \"layer.tar\": unexpected EOF"
        );
        assert_eq!(names(&bytes[..1500]).unwrap_err(), "unexpected EOF");
        let oci = d.path().join("oci.tar");
        oci_archive(&oci, &["docker.io/longhornio/csi-resizer:v1.12.0"]).unwrap();
        assert_eq!(
            archive_image_names(std::fs::File::open(&oci).unwrap()).unwrap(),
            ["docker.io/longhornio/csi-resizer:v1.12.0"]
        );
        // A gzip-compressed archive is not a tar, and the explanation says what to do.
        // (Data that does not compress, so the gzip file is longer than a tar header.)
        let mut x = 1u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let e = archive_image_names(&gzip(&tar_bytes(&[("layer.tar", &noise)]))[..]).unwrap_err();
        assert_eq!(e.to_string(), "archive/tar: invalid tar header");
        assert!(
            e.explained().contains("gunzip it first"),
            "{}",
            e.explained()
        );
    }

    #[test]
    fn a_read_error_is_not_taken_for_a_bad_header() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let e = archive_image_names(Failing).unwrap_err();
        assert!(matches!(e, ArchiveError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }

    #[test]
    fn the_chart_names_its_images_in_values_yaml() {
        let d = tempfile::tempdir().unwrap();
        let chart = d.path().join("longhorn-1.7.2.tgz");
        chart_archive(&chart, LONGHORN_VALUES_1_7_2).unwrap();
        let images = chart_images(std::fs::File::open(&chart).unwrap()).unwrap();
        assert_eq!(images.len(), 13, "{images:?}");
        assert!(images.contains(&"docker.io/longhornio/longhorn-manager:v1.7.2".to_string()));
        assert!(images.contains(&"docker.io/longhornio/csi-snapshotter:v7.0.2-20241007".into()));
        // The subchart's values are not the chart's.
        assert!(!images.iter().any(|i| i.contains("/no:")), "{images:?}");
        let values = chart_values(std::fs::File::open(&chart).unwrap()).unwrap();
        assert_eq!(values.entry, "longhorn/values.yaml");
        // A registry in front of every repository.
        let v = LONGHORN_VALUES_1_7_2.replace("registryUrl: ~", "registryUrl: mirror.lan:5000");
        let images = images_from_values(&serde_yaml::from_str(&v).unwrap()).unwrap();
        assert!(
            images
                .iter()
                .all(|i| i.starts_with("mirror.lan:5000/longhornio/")),
            "{images:?}"
        );
        // Values naming no image, or one without a tag.
        let none = serde_yaml::from_str("image: {pullPolicy: Always}").unwrap();
        assert_eq!(images_from_values(&none), Err(ValuesError::NoImages));
        let untagged = serde_yaml::from_str("image: {a: {repository: x}}").unwrap();
        assert_eq!(
            images_from_values(&untagged).unwrap_err().to_string(),
            "image.a.tag is missing for repository x"
        );
        // Not a chart.
        std::fs::write(&chart, [0x1f, 0x8b, 0]).unwrap();
        let e = chart_images(std::fs::File::open(&chart).unwrap()).unwrap_err();
        assert!(e.to_string().contains("a damaged chart archive"), "{e}");
        let plain = d.path().join("plain.tgz");
        std::fs::write(&plain, gzip(&tar_bytes(&[("README", b"hi")]))).unwrap();
        let e = chart_images(std::fs::File::open(&plain).unwrap()).unwrap_err();
        assert!(matches!(e, ChartError::NoValues), "{e}");
    }
}
