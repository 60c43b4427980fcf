//! The system locale of every image: `/etc/default/locale` with `LANG=C.UTF-8`, as Ubuntu's
//! cloud and server images ship it, laid in at image-build time by the overlay file
//! `overlays/common/etc/default/locale` ([`OVERLAY_FILE`]).
//!
//! **Why.** A tree bootstrapped from packages has no `LANG` in `/etc/default/locale`. On its
//! first boot cloud-init's `locale` module then generated `en_US.UTF-8` with `locale-gen`
//! (slow under emulation) and failed in `update-locale`. What cloud-init does (read in
//! canonical/cloud-init):
//! - `cloudinit/config/cc_locale.py`, `handle`: the locale is the config's `locale:` or else
//!   `cloud.get_locale()`; a false value skips the module; then
//!   `distro.apply_locale(locale, locale_configfile)`;
//! - `cloudinit/sources/__init__.py`, `DataSource.get_locale`: the distro's `get_locale()`;
//! - `cloudinit/distros/debian.py`: `get_locale` returns `LANG` read from
//!   `/etc/default/locale` (`read_system_locale`, shell syntax through `util.load_shell_content`)
//!   or, when unset, the default `en_US.UTF-8`. `apply_locale` regenerates when the requested
//!   locale differs from that, or the file is missing, or `LANG` is unset in it
//!   (`regenerate_locale`: `locale-gen LOCALE`, skipped for `C`, `C.UTF-8` and `POSIX`), and
//!   rewrites the file with `update-locale --locale-file=… LANG=…` in the same cases.
//!
//! So with `LANG=C.UTF-8` in the file and no `locale:` in the config (rackseed's user-data sets
//! none), the module runs neither program. `C.UTF-8` needs no generating: it comes with the C
//! library (`libc-bin` ships `/usr/lib/locale/C.utf8`). [`cloud_init_locale_steps`] restates
//! that decision, and the tests hold the overlay file to it.
//!
//! **Why an overlay, at image build, and not in the bootstrapped tree.** The tree is cached
//! under a key that includes [`super::bootstrap::TREE_VERSION`]; changing the tree means raising
//! it, which rebuilds every cached base (a cold arm64 bootstrap costs about 30 minutes under
//! emulation). The overlay costs nothing, reaches every image built from now on (also from a
//! cached base or a local image without the file), and on official Ubuntu images it writes the
//! content they already have. A `--overlay` of one's own, laid after `overlays/common`, can
//! set another locale (cloud-init then generates it, as on Ubuntu).

/// The file, relative to the root filesystem.
pub const LOCALE_FILE: &str = "etc/default/locale";
/// The overlay that lays it into every image, relative to the repository.
pub const OVERLAY_FILE: &str = "overlays/common/etc/default/locale";
/// The locale set.
pub const LOCALE: &str = "C.UTF-8";
/// cloud-init's Debian distro's locale when the file sets none (`debian.py`, `default_locale`).
pub const CLOUD_INIT_DEFAULT: &str = "en_US.UTF-8";

/// What cloud-init's `locale` module runs on first boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocaleSteps {
    /// `locale-gen LOCALE`, if run.
    pub locale_gen: Option<String>,
    /// `update-locale … LANG=LOCALE`, if run.
    pub update_locale: Option<String>,
}

/// `LANG` as cloud-init's `read_system_locale` reads it from the file's text: the last
/// `LANG=` assignment, quotes removed, comments and blank lines skipped; `None` when unset or
/// empty.
pub fn lang_of(text: &str) -> Option<String> {
    let mut lang = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some(v) = line.strip_prefix("LANG=") {
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            lang = (!v.is_empty()).then(|| v.to_string());
        }
    }
    lang
}

/// What cloud-init's `locale` module does on a Debian/Ubuntu system whose
/// `/etc/default/locale` holds `file` (`None`: missing), with the config's `locale:`
/// `configured` (see the module docs for the source).
pub fn cloud_init_locale_steps(file: Option<&str>, configured: Option<&str>) -> LocaleSteps {
    let system = file.and_then(lang_of);
    let distro = system
        .clone()
        .unwrap_or_else(|| CLOUD_INIT_DEFAULT.to_string());
    let wanted = configured.map(str::to_string).unwrap_or(distro.clone());
    let need_regen =
        wanted.to_lowercase() != distro.to_lowercase() || file.is_none() || system.is_none();
    let no_regen = ["c", "c.utf-8", "posix"].contains(&wanted.to_lowercase().as_str());
    LocaleSteps {
        locale_gen: (need_regen && !no_regen).then(|| wanted.clone()),
        update_locale: need_regen.then_some(wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLAY: &str = include_str!("../../../overlays/common/etc/default/locale");

    #[test]
    fn the_overlay_sets_c_utf8_and_cloud_init_leaves_it_alone() {
        assert_eq!(lang_of(OVERLAY).as_deref(), Some(LOCALE));
        assert_eq!(
            cloud_init_locale_steps(Some(OVERLAY), None),
            LocaleSteps {
                locale_gen: None,
                update_locale: None
            }
        );
        // Even a config asking for C.UTF-8 changes nothing.
        assert_eq!(
            cloud_init_locale_steps(Some(OVERLAY), Some("c.utf-8")).update_locale,
            None
        );
    }

    #[test]
    fn without_the_file_cloud_init_generates_en_us() {
        // What a bootstrapped tree did before: no file, or one without LANG.
        for file in [None, Some("# nothing\n"), Some("LANG=\n")] {
            assert_eq!(
                cloud_init_locale_steps(file, None),
                LocaleSteps {
                    locale_gen: Some(CLOUD_INIT_DEFAULT.into()),
                    update_locale: Some(CLOUD_INIT_DEFAULT.into())
                },
                "{file:?}"
            );
        }
        // A user's own locale is generated, as on Ubuntu.
        assert_eq!(
            cloud_init_locale_steps(Some(OVERLAY), Some("de_DE.UTF-8")).locale_gen,
            Some("de_DE.UTF-8".into())
        );
    }

    #[test]
    fn lang_is_read_like_a_shell_assignment() {
        assert_eq!(
            lang_of("# c\nLANG=\"en_GB.UTF-8\"\nLC_TIME=C\n").as_deref(),
            Some("en_GB.UTF-8")
        );
        assert_eq!(lang_of("LANGUAGE=en\n"), None);
        assert_eq!(lang_of("LANG=a\nLANG=b\n").as_deref(), Some("b"));
    }

    /// The image gets the file: `overlays/common` is walked into a root-owned 0644 file at
    /// `/etc/default/locale` (what the customize step writes into every image).
    #[test]
    fn the_common_overlay_lays_the_file_into_every_image() {
        let overlay = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("overlays/common");
        let entries = crate::customize::overlay_entries(&overlay).unwrap();
        let file = entries
            .iter()
            .find_map(|e| match e {
                crate::customize::ext4::Entry::File {
                    path,
                    src,
                    mode,
                    uid,
                    gid,
                } if path == &format!("/{LOCALE_FILE}") => Some((src, *mode, *uid, *gid)),
                _ => None,
            })
            .expect("overlays/common provides /etc/default/locale");
        assert_eq!(file.1 & 0o777, 0o644);
        assert_eq!((file.2, file.3), (0, 0));
        assert_eq!(std::fs::read_to_string(file.0).unwrap(), OVERLAY);
        assert!(file.0.ends_with(OVERLAY_FILE));
    }
}
