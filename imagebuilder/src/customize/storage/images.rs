//! Container images for an offline Longhorn install: which images the staged chart needs, and
//! which images a staged archive holds, both read with [`rackseed_host::image_archive`] (the
//! reader the simulator's `ctr image import` and the agent's fakes use too; its module docs
//! give the sources: containerd's importer, distribution/reference, Longhorn's chart).
//!
//! **Which images** ([`chart_images`]): the chart archive (`longhorn-<version>.tgz`, as `helm
//! package` writes it) names them in its top-level `values.yaml`, under `image:` with the
//! registries Longhorn's templates put in front. Besides the chart, the agent deploys the CSI
//! snapshot controller ([`rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE`]).
//!
//! **Which images an archive holds** ([`archive_refs`]): the names `ctr image import` gives
//! them, from Docker's layout (`docker save`) or an OCI image layout (`ctr image export`,
//! `skopeo copy … oci-archive:`). An archive ctr would refuse (not a tar, truncated, neither
//! layout, a missing config, layer or manifest blob) fails the build here with ctr's words and
//! what they mean, and not at a node's first boot; so does an empty file and one that names no
//! image. Only uncompressed `.tar` archives are taken: containerd 1.x's `ctr image import`
//! (what MicroK8s ships) reads the file as a plain tar.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rackseed_host::image_archive;

/// `r` normalised the way containerd names an imported image
/// ([`image_archive::normalize_ref`]).
pub fn normalize_ref(r: &str) -> Result<String> {
    Ok(image_archive::normalize_ref(r)?)
}

/// The images the chart archive at `chart` deploys (see the module docs), normalised, sorted.
pub fn chart_images(chart: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(chart).with_context(|| format!("opening {}", chart.display()))?;
    image_archive::chart_images(f).with_context(|| chart.display().to_string())
}

/// The image names an archive holds once imported (see the module docs), normalised and
/// sorted. An archive that `ctr image import` would refuse is an error saying why.
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
    if f.metadata()?.len() == 0 {
        bail!("the file is empty");
    }
    let mut refs = image_archive::archive_image_names(std::io::BufReader::new(f))
        .map_err(|e| anyhow!(e.explained()))?;
    if refs.is_empty() {
        bail!("it names no image (no RepoTags, no image name annotations)");
    }
    refs.sort();
    refs.dedup();
    Ok(refs)
}

#[cfg(test)]
pub(crate) mod testing {
    //! The shared test archives ([`rackseed_host::image_archive::testing`]) for the tests here
    //! and in `storage`, which write into a test's temporary folder and fail the test if they
    //! cannot.
    use std::path::Path;

    use rackseed_host::image_archive::testing as archives;
    pub use rackseed_host::image_archive::testing::LONGHORN_VALUES_1_7_2 as VALUES_1_7_2;

    /// A `docker save` archive holding one image tagged with each of `tags`.
    pub fn docker_archive(path: &Path, tags: &[&str]) {
        archives::docker_archive(path, tags).expect("writing a test docker archive");
    }

    /// An OCI layout archive (`ctr image export`) holding images named `names`.
    pub fn oci_archive(path: &Path, names: &[&str]) {
        archives::oci_archive(path, names).expect("writing a test OCI archive");
    }

    /// A chart archive `longhorn/values.yaml` (plus `Chart.yaml` and a subchart) with `values`.
    pub fn chart_archive(path: &Path, values: &str) {
        archives::chart_archive(path, values).expect("writing a test chart archive");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn the_chart_and_the_snapshot_controller_name_the_images_longhorn_needs() {
        let d = tempfile::tempdir().unwrap();
        let chart = d.path().join("longhorn-1.7.2.tgz");
        chart_archive(&chart, VALUES_1_7_2);
        let images = chart_images(&chart).unwrap();
        assert_eq!(images.len(), 13, "{images:?}");
        assert_eq!(
            normalize_ref(rackseed_config::LONGHORN_SNAPSHOT_CONTROLLER_IMAGE).unwrap(),
            "docker.io/rancher/mirrored-sig-storage-snapshot-controller:v8.2.0"
        );
        // A bad chart names its file and the entry at fault.
        chart_archive(&chart, "image: {a: {repository: x}}");
        let err = format!("{:#}", chart_images(&chart).unwrap_err());
        assert!(
            err.contains("longhorn-1.7.2.tgz: longhorn/values.yaml: image.a.tag is missing"),
            "{err}"
        );
        std::fs::write(&chart, [0x1f, 0x8b, 0]).unwrap();
        let err = format!("{:#}", chart_images(&chart).unwrap_err());
        assert!(
            err.contains("longhorn-1.7.2.tgz: a damaged chart archive"),
            "{err}"
        );
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
        std::fs::write(&cut, &bytes[..2000]).unwrap();
        let err = format!("{:#}", archive_refs(&cut).unwrap_err());
        assert!(
            err.contains(
                "failed to ingest \"layer.tar\": unexpected EOF (the archive is truncated)"
            ),
            "{err}"
        );
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
        let other = d.path().join("other.tar");
        std::fs::write(
            &other,
            rackseed_host::image_archive::testing::tar_bytes(&[("notes.txt", b"hi")]),
        )
        .unwrap();
        let err = format!("{:#}", archive_refs(&other).unwrap_err());
        assert!(err.contains("unrecognized image format"), "{err}");
        // An archive of images with no name.
        let nameless = d.path().join("nameless.tar");
        docker_archive(&nameless, &[]);
        let err = format!("{:#}", archive_refs(&nameless).unwrap_err());
        assert!(err.contains("it names no image"), "{err}");
    }
}
