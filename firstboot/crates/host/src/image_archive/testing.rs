//! Test archives, the one place the workspace's tests write them (feature `testing`; a
//! release build never turns it on): a `docker save` archive ([`docker_archive`]), an OCI
//! layout archive ([`oci_archive`]), a Helm chart archive ([`chart_archive`]) with the layout
//! of Longhorn 1.7.2's values ([`LONGHORN_VALUES_1_7_2`]), and any plain tar in memory
//! ([`tar_bytes`], [`gzip`] to compress it). They are real archives (the `tar` crate's GNU headers), read by GNU tar,
//! Go's `archive/tar` and this module's reader alike.
//!
//! Offsets the workspace's truncation tests rely on: in a [`docker_archive`], `config.json`'s
//! header and data take bytes 0..1024, `layer.tar`'s header 1024..1536 and its 1024 bytes of
//! data 1536..2560, then `manifest.json`.

use std::io::Write;
use std::path::Path;

/// A plain tar of `files` (name, content), regular files of mode 0644, with the end-of-archive
/// blocks.
pub fn tar_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data)
            .expect("appending to a tar in memory");
    }
    b.into_inner().expect("finishing a tar in memory")
}

/// Writes at `path` a `docker save` archive holding one image tagged with each of `tags`
/// (layout in the module docs).
pub fn docker_archive(path: &Path, tags: &[&str]) -> std::io::Result<()> {
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": tags,
        "Layers": ["layer.tar"],
    }])
    .to_string();
    std::fs::write(
        path,
        tar_bytes(&[
            ("config.json", br#"{"architecture":"amd64","os":"linux"}"#),
            ("layer.tar", &[0u8; 1024]),
            ("manifest.json", manifest.as_bytes()),
        ]),
    )
}

/// Writes at `path` an OCI layout archive (`ctr image export`'s) holding one image named by
/// each of `names`: `io.containerd.image.name` the full name, `org.opencontainers.image.ref.name`
/// its tag, as containerd writes them.
pub fn oci_archive(path: &Path, names: &[&str]) -> std::io::Result<()> {
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let hex = format!("{:064x}", i + 1);
        blobs.push((format!("blobs/sha256/{hex}"), b"{}".to_vec()));
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": 2,
            "annotations": {
                "io.containerd.image.name": n,
                "org.opencontainers.image.ref.name": n.rsplit(':').next(),
            },
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests}).to_string();
    let mut files: Vec<(&str, &[u8])> = vec![("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)];
    files.extend(blobs.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
    files.push(("index.json", index.as_bytes()));
    std::fs::write(path, tar_bytes(&files))
}

/// Writes at `path` a chart archive as `helm package` lays it out: `longhorn/Chart.yaml`,
/// `longhorn/values.yaml` holding `values`, and a subchart whose values name an image that is
/// not the chart's (`no:x`).
pub fn chart_archive(path: &Path, values: &str) -> std::io::Result<()> {
    let tar = tar_bytes(&[
        ("longhorn/Chart.yaml", b"name: longhorn\nversion: 1.7.2\n"),
        ("longhorn/values.yaml", values.as_bytes()),
        (
            "longhorn/charts/x/values.yaml",
            b"image: {a: {repository: no, tag: x}}\n",
        ),
    ]);
    std::fs::write(path, gzip(&tar))
}

/// `bytes` gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes)
        .and_then(|()| gz.finish())
        .expect("compressing in memory")
}

/// The layout of longhorn 1.7.2's `chart/values.yaml` (`image:` and the registries): 13
/// images, and OpenShift's proxy with an empty repository.
pub const LONGHORN_VALUES_1_7_2: &str = r#"global:
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
