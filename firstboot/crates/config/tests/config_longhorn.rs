//! `[addons.longhorn]` and `addons.offline`: defaults, a configurable data path, and every
//! refusal reported at the value's line and column with its field path.

mod common;

use std::path::PathBuf;

use common::{assert_diag, cluster, parse};
use rackseed_config::{Diagnostic, Storage};

/// A valid config whose `[addons]` section (line 8) holds `addons` from line 9.
fn config(addons: &str) -> String {
    cluster("") + "\n[addons]\n" + addons
}

#[track_caller]
fn assert_error(diags: &[Diagnostic], line: usize, field: &str, needle: &str) {
    assert_diag(diags, line, None, field, needle);
}

#[test]
fn defaults_and_a_configured_data_path() {
    let c = parse(&config("storage = \"longhorn\"\n")).unwrap().config;
    assert_eq!(c.addons.storage, Storage::Longhorn);
    assert_eq!(
        c.addons.longhorn.data_path,
        PathBuf::from("/var/lib/longhorn")
    );
    assert_eq!(c.addons.longhorn.min_free_space, 10 << 30);
    assert_eq!(c.addons.offline, None);
    let c = parse(&config(
        "storage = \"longhorn\"\noffline = \"staged\"\n[addons.longhorn]\ndata-path = \"/srv/longhorn\"\nmin-free-space = \"50GiB\"\n",
    ))
    .unwrap()
    .config;
    assert_eq!(c.addons.longhorn.data_path, PathBuf::from("/srv/longhorn"));
    assert_eq!(c.addons.longhorn.min_free_space, 50 << 30);
    assert_eq!(c.addons.offline, Some(PathBuf::from("/cfg/staged")));
}

#[test]
fn bad_data_paths_are_refused_at_their_line() {
    for (bad, needle) in [
        ("\"var/lib/longhorn\"", "absolute"),
        ("\"/var/lib/../longhorn\"", "normalised"),
        ("\"/\"", "root folder"),
        ("\"/run/longhorn\"", "not persistent"),
        ("\"/proc/x\"", "not persistent"),
        ("\"/srv/a,b\"", "comma"),
        ("42", "expected a string"),
    ] {
        let text = config(&format!(
            "storage = \"longhorn\"\n[addons.longhorn]\ndata-path = {bad}\n"
        ));
        let diags = parse(&text).expect_err(bad);
        assert_error(&diags, 11, "addons.longhorn.data-path", needle);
    }
}

#[test]
fn small_or_malformed_free_space_is_refused() {
    for (bad, needle) in [
        ("\"512MiB\"", "below 1GiB"),
        ("\"lots\"", "expected a size"),
    ] {
        let text = config(&format!(
            "storage = \"longhorn\"\n[addons.longhorn]\nmin-free-space = {bad}\n"
        ));
        assert_error(
            &parse(&text).expect_err(bad),
            11,
            "addons.longhorn.min-free-space",
            needle,
        );
    }
}

#[test]
fn longhorn_settings_without_longhorn_and_unknown_keys_are_refused() {
    let diags = parse(&config(
        "storage = \"mayastor\"\n[addons.longhorn]\ndata-path = \"/srv/l\"\n",
    ))
    .unwrap_err();
    assert_error(
        &diags,
        10,
        "addons.longhorn",
        "only used with storage = \"longhorn\"",
    );
    let diags = parse(&config(
        "storage = \"longhorn\"\n[addons.longhorn]\ndatapath = \"/srv/l\"\n",
    ))
    .unwrap_err();
    assert!(
        diags
            .iter()
            .any(|d| d.line == 11 && d.message.contains("unknown key")),
        "{diags:?}"
    );
}
