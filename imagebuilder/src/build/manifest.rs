//! What a build records about itself: [`ImageInfo`] goes into the image as
//! `/etc/rackseed/image.json` (read back by `imagebuilder inspect`), [`Manifest`] is written
//! next to the image as `manifest.json`.
//!
//! Both are plain serde structs, so the field names are the JSON keys; readers parse the files
//! as untyped JSON, so a renamed field breaks them silently. To record something new, add a
//! field here and to the expected JSON in the tests below.

use std::path::PathBuf;

use rackseed_config::{ClusterConfig, Storage, Target};
use rackseed_protocol::secret::ClusterSecret;
use serde::Serialize;

use crate::base::Format;
use crate::customize::firstboot_bin::{ElfArch, FirstbootBin};
use crate::customize::simulator::Microk8sRecord;
use crate::customize::{Added, Customized};
use crate::disk::Partition;

/// `/etc/rackseed/image.json`: who built the image, for which cluster, from which base.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub builder: BuilderName,
    pub target: &'static str,
    pub firstboot: FirstbootRecord,
    pub cluster: ClusterRecord,
    pub base: BaseRecord,
    /// Where MicroK8s comes from: `{"source": "snap"}`, or the simulator (QEMU test-cluster
    /// images only) with its binary's SHA-256.
    pub microk8s: Microk8sRecord,
}

impl ImageInfo {
    pub fn new(
        cfg: &ClusterConfig,
        target: Target,
        firstboot: &FirstbootBin,
        secret: &ClusterSecret,
        base: BaseRecord,
    ) -> Self {
        ImageInfo {
            builder: BuilderName {
                name: "rackseed imagebuilder",
                version: env!("CARGO_PKG_VERSION"),
            },
            target: target.as_str(),
            firstboot: FirstbootRecord::of(firstboot),
            cluster: ClusterRecord::new(cfg, secret),
            base,
            microk8s: Microk8sRecord::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BuilderName {
    pub name: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuilderVersion {
    pub version: &'static str,
}

/// The firstboot binary put into the image.
#[derive(Debug, Clone, Serialize)]
pub struct FirstbootRecord {
    /// `None` when the binary does not run on the build machine.
    pub version: Option<String>,
    pub arch: ElfArch,
    pub sha256: String,
}

impl FirstbootRecord {
    pub fn of(fb: &FirstbootBin) -> Self {
        FirstbootRecord {
            version: fb.version.clone(),
            arch: fb.arch,
            sha256: fb.sha256.clone(),
        }
    }
}

/// The cluster config, summarised; never the secret, only its public tag.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRecord {
    pub name: String,
    pub control_plane: u8,
    pub expected_nodes: u32,
    pub inventory_nodes: usize,
    pub microk8s_channel: String,
    pub storage: Storage,
    pub metallb: bool,
    pub cluster_tag: String,
}

impl ClusterRecord {
    pub fn new(cfg: &ClusterConfig, secret: &ClusterSecret) -> Self {
        ClusterRecord {
            name: cfg.cluster.name.clone(),
            control_plane: cfg.cluster.control_plane,
            expected_nodes: cfg.cluster.expected_nodes,
            inventory_nodes: cfg.nodes.len(),
            microk8s_channel: cfg.microk8s.channel.clone(),
            storage: cfg.addons.storage,
            metallb: cfg.addons.metallb.is_some(),
            cluster_tag: secret.cluster_tag(),
        }
    }
}

/// Where the base image came from, tagged by `kind`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BaseRecord {
    Official {
        url: String,
        sha256: String,
        format: Format,
    },
    Local {
        path: PathBuf,
        sha256: Option<String>,
        format: Format,
    },
    Bootstrap {
        suite: String,
        mirror: String,
        arch: String,
        packages: Vec<String>,
        /// First stage only (the arch does not run on the build machine).
        foreign: bool,
        cache_key: String,
    },
}

/// `manifest.json`: the image, what went into it and the hashes of every output.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub image: ImageRecord,
    pub builder: BuilderVersion,
    pub base: BaseRecord,
    pub firstboot: FirstbootSource,
    pub cluster: ClusterRecord,
    pub microk8s: Microk8sRecord,
    pub overlays: Vec<PathBuf>,
    pub files: Vec<Added>,
    pub cmdline: Option<String>,
    pub outputs: Vec<OutputRecord>,
    pub warnings: Vec<String>,
}

impl Manifest {
    /// `outputs` are (file name, SHA-256) pairs, in the order they were written.
    pub fn new(
        info: ImageInfo,
        image: ImageRecord,
        firstboot: &FirstbootBin,
        overlays: &[PathBuf],
        custom: &Customized,
        outputs: &[(String, String)],
    ) -> Self {
        Manifest {
            image,
            builder: BuilderVersion {
                version: info.builder.version,
            },
            base: info.base,
            firstboot: FirstbootSource {
                binary: info.firstboot,
                source: firstboot.path.clone(),
            },
            cluster: info.cluster,
            microk8s: info.microk8s,
            overlays: overlays.to_vec(),
            files: custom.files.clone(),
            cmdline: custom.cmdline.clone(),
            outputs: outputs
                .iter()
                .map(|(file, sha256)| OutputRecord {
                    file: file.clone(),
                    sha256: sha256.clone(),
                })
                .collect(),
            warnings: custom.warnings.clone(),
        }
    }
}

/// The raw image file.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub target: &'static str,
    pub partitions: Vec<Partition>,
}

/// [`FirstbootRecord`] plus the path it was copied from on the build machine.
#[derive(Debug, Clone, Serialize)]
pub struct FirstbootSource {
    #[serde(flatten)]
    pub binary: FirstbootRecord,
    pub source: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputRecord {
    pub file: String,
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::disk::FsKind;

    const CONFIG: &str = "[cluster]\nname = \"lab\"\n\n[image]\ntarget = \"rpi5\"\nbase = { kind = \"local\", path = \"base.img\" }\n";

    fn firstboot() -> FirstbootBin {
        FirstbootBin {
            path: PathBuf::from("/build/firstboot"),
            arch: ElfArch::Aarch64,
            sha256: "ab".repeat(32),
            version: None,
        }
    }

    fn customized() -> Customized {
        Customized {
            files: vec![Added {
                partition: "writable".into(),
                path: "/etc/rackseed/cluster.secret".into(),
                mode: Some("0600".into()),
                size: 44,
                sha256: None,
            }],
            cmdline: Some("console=tty1 root=LABEL=writable".into()),
            warnings: vec!["one warning".into()],
        }
    }

    fn partition() -> Partition {
        Partition {
            number: 2,
            start: 1 << 20,
            size: 1 << 30,
            part_type: "83".into(),
            uuid: None,
            fs: FsKind::Ext4,
            label: Some("writable".into()),
        }
    }

    /// The JSON the build wrote with `serde_json::json!` before the records were typed,
    /// built the same way from the same inputs.
    fn untyped(
        cfg: &ClusterConfig,
        secret: &ClusterSecret,
        fb: &FirstbootBin,
        custom: &Customized,
        base: serde_json::Value,
    ) -> (serde_json::Value, serde_json::Value) {
        let image_info = json!({
            "builder": {"name": "rackseed imagebuilder", "version": env!("CARGO_PKG_VERSION")},
            "target": "rpi5",
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
            "base": base,
            "microk8s": {"source": "snap"},
        });
        let overlays = vec![
            PathBuf::from("overlays/common"),
            PathBuf::from("overlays/rpi"),
        ];
        let sums = [("lab.img".to_owned(), "cd".repeat(32))];
        let manifest = json!({
            "image": {"file": "lab.img", "size": 1u64 << 31, "sha256": "cd".repeat(32), "target": "rpi5",
                      "partitions": [partition()]},
            "builder": {"version": env!("CARGO_PKG_VERSION")},
            "base": image_info["base"],
            "firstboot": {"version": fb.version, "arch": fb.arch, "sha256": fb.sha256, "source": fb.path},
            "cluster": image_info["cluster"],
            "microk8s": image_info["microk8s"],
            "overlays": overlays,
            "files": custom.files,
            "cmdline": custom.cmdline,
            "outputs": sums.iter().map(|(n, s)| json!({"file": n, "sha256": s})).collect::<Vec<_>>(),
            "warnings": custom.warnings,
        });
        (image_info, manifest)
    }

    fn typed(
        cfg: &ClusterConfig,
        secret: &ClusterSecret,
        fb: &FirstbootBin,
        custom: &Customized,
        base: BaseRecord,
    ) -> (serde_json::Value, serde_json::Value) {
        let info = ImageInfo::new(cfg, Target::Rpi5, fb, secret, base);
        let info_json = serde_json::to_value(&info).unwrap();
        let image = ImageRecord {
            file: "lab.img".into(),
            size: 1 << 31,
            sha256: "cd".repeat(32),
            target: Target::Rpi5.as_str(),
            partitions: vec![partition()],
        };
        let overlays = [
            PathBuf::from("overlays/common"),
            PathBuf::from("overlays/rpi"),
        ];
        let sums = [("lab.img".to_owned(), "cd".repeat(32))];
        let manifest = Manifest::new(info, image, fb, &overlays, custom, &sums);
        (info_json, serde_json::to_value(&manifest).unwrap())
    }

    #[test]
    fn typed_records_serialise_to_the_keys_and_values_of_the_untyped_json() {
        let cfg = rackseed_config::parse(CONFIG, Path::new("/home/me/lab.toml"))
            .unwrap()
            .config;
        let secret = ClusterSecret::from_bytes([7; 32]);
        let fb = firstboot();
        let custom = customized();
        let bases = [
            (
                BaseRecord::Official {
                    url: "https://example.org/base.img.xz".into(),
                    sha256: "ef".repeat(32),
                    format: Format::Xz,
                },
                json!({"kind": "official", "url": "https://example.org/base.img.xz",
                       "sha256": "ef".repeat(32), "format": Format::Xz}),
            ),
            (
                BaseRecord::Local {
                    path: PathBuf::from("/images/base.img"),
                    sha256: None,
                    format: Format::Raw,
                },
                json!({"kind": "local", "path": Path::new("/images/base.img"),
                       "sha256": Option::<String>::None, "format": Format::Raw}),
            ),
            (
                BaseRecord::Bootstrap {
                    suite: "noble".into(),
                    mirror: "http://archive.ubuntu.com/ubuntu".into(),
                    arch: "arm64".into(),
                    packages: vec!["dbus".into(), "systemd".into()],
                    foreign: true,
                    cache_key: "0123".into(),
                },
                json!({"kind": "bootstrap", "suite": "noble", "mirror": "http://archive.ubuntu.com/ubuntu",
                       "arch": "arm64", "packages": ["dbus", "systemd"], "foreign": true,
                       "cache_key": "0123"}),
            ),
        ];
        for (typed_base, untyped_base) in bases {
            let (want_info, want_manifest) = untyped(&cfg, &secret, &fb, &custom, untyped_base);
            let (info, manifest) = typed(&cfg, &secret, &fb, &custom, typed_base);
            assert_eq!(info, want_info);
            assert_eq!(manifest, want_manifest);
        }
    }

    #[test]
    fn manifest_keys_are_the_ones_readers_look_up() {
        let cfg = rackseed_config::parse(CONFIG, Path::new("/home/me/lab.toml"))
            .unwrap()
            .config;
        let base = BaseRecord::Local {
            path: PathBuf::from("base.img"),
            sha256: None,
            format: Format::Raw,
        };
        let secret = ClusterSecret::from_bytes([7; 32]);
        let (info, manifest) = typed(&cfg, &secret, &firstboot(), &customized(), base);
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&info),
            [
                "base",
                "builder",
                "cluster",
                "firstboot",
                "microk8s",
                "target"
            ]
        );
        assert_eq!(
            keys(&manifest),
            [
                "base",
                "builder",
                "cluster",
                "cmdline",
                "files",
                "firstboot",
                "image",
                "microk8s",
                "outputs",
                "overlays",
                "warnings"
            ]
        );
        assert_eq!(
            keys(&manifest["firstboot"]),
            ["arch", "sha256", "source", "version"]
        );
        assert_eq!(manifest["base"]["kind"], "local");
        assert_eq!(manifest["image"]["target"], "rpi5");
        assert!(manifest["files"][0]["sha256"].is_null());
    }
}
