//! `os_list` JSON for Raspberry Pi Imager: written next to Raspberry Pi images so that Imager's
//! "custom repository" option (`rpi-imager --repo <file or URL>`) offers them.
//!
//! The entry carries the sizes and SHA-256 of both the download (`.img.xz`) and the extracted
//! raw image, which Imager checks while writing. `init_format` is left out on purpose: with it,
//! Imager offers its "OS customisation" and would write its own cloud-init `user-data` over the
//! seed rackseed put on `system-boot`.

use serde::Serialize;

use rackseed_config::Target;

/// One downloadable image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OsEntry {
    pub name: String,
    pub description: String,
    /// Where Imager downloads the image from: `https://...` or `file:///abs/path.img.xz`.
    pub url: String,
    pub extract_size: u64,
    pub extract_sha256: String,
    pub image_download_size: u64,
    pub image_download_sha256: String,
    /// `YYYY-MM-DD`.
    pub release_date: String,
    /// Imager's device tags.
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OsList {
    pub os_list: Vec<OsEntry>,
}

/// Imager's device tag for a target; `None` for targets Imager does not write (x86).
pub fn imager_device(target: Target) -> Option<&'static str> {
    match target {
        Target::Rpi4 => Some("pi4-64bit"),
        Target::Rpi5 => Some("pi5-64bit"),
        Target::X86_64Efi => None,
    }
}

/// Facts about a built image that the entry needs.
#[derive(Debug, Clone)]
pub struct BuiltImage<'a> {
    pub cluster: &'a str,
    pub target: Target,
    pub url: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub download_size: u64,
    pub download_sha256: String,
    pub release_date: String,
}

/// The `os_list` document for one image, or `None` for a non-Pi target.
pub fn os_list_for(img: &BuiltImage<'_>) -> Option<OsList> {
    let device = imager_device(img.target)?;
    Some(OsList {
        os_list: vec![OsEntry {
            name: format!("rackseed {} ({})", img.cluster, img.target.as_str()),
            description: format!(
                "Ubuntu Server with rackseed: joins MicroK8s cluster '{}' by itself on first boot",
                img.cluster
            ),
            url: img.url.clone(),
            extract_size: img.raw_size,
            extract_sha256: img.raw_sha256.clone(),
            image_download_size: img.download_size,
            image_download_sha256: img.download_sha256.clone(),
            release_date: img.release_date.clone(),
            devices: vec![device.to_owned()],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pi_images_get_an_entry_with_both_checksums_and_no_init_format() {
        let img = BuiltImage {
            cluster: "homelab",
            target: Target::Rpi4,
            url: "file:///out/homelab-rpi4.img.xz".into(),
            raw_size: 4 << 30,
            raw_sha256: "a".repeat(64),
            download_size: 600 << 20,
            download_sha256: "b".repeat(64),
            release_date: "2026-11-25".into(),
        };
        let doc = serde_json::to_value(os_list_for(&img).unwrap()).unwrap();
        let e = &doc["os_list"][0];
        assert_eq!(e["devices"][0], "pi4-64bit");
        assert_eq!(e["extract_sha256"], "a".repeat(64));
        assert_eq!(e["image_download_size"], 600u64 << 20);
        assert!(e.get("init_format").is_none());
        let x86 = BuiltImage {
            target: Target::X86_64Efi,
            ..img
        };
        assert!(os_list_for(&x86).is_none());
    }
}
