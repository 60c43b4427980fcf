//! `cluster.replace-after`: how long a member may be unseen before the cluster removes and
//! replaces it. Default 15 minutes; a duration from 1 minute to 30 days; anything else is
//! refused at its file:line:col.

use std::path::Path;
use std::time::Duration;

use rackseed_config::{self as config, DEFAULT_REPLACE_AFTER};

fn cluster(extra: &str) -> String {
    format!(
        "[cluster]\nname = \"lab\"\n{extra}\n[image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n"
    )
}

fn load(text: &str) -> Result<config::Loaded, config::ConfigError> {
    config::parse(text, Path::new("/cfg/lab.toml"))
}

#[test]
fn the_default_is_fifteen_minutes_and_a_value_is_read() {
    assert_eq!(DEFAULT_REPLACE_AFTER, Duration::from_secs(900));
    let c = load(&cluster("")).unwrap().config;
    assert_eq!(c.cluster.replace_after, DEFAULT_REPLACE_AFTER);
    let c = load(&cluster("replace-after = \"2m30s\"")).unwrap().config;
    assert_eq!(c.cluster.replace_after, Duration::from_secs(150));
}

#[test]
fn too_short_too_long_or_malformed_is_refused_at_its_position() {
    for (value, needle) in [
        ("\"30s\"", "from 1m to 30 days"),
        ("\"31days\"", "from 1m to 30 days"),
        ("\"soon\"", "expected a duration"),
        ("15", "cluster.replace-after"),
    ] {
        let e = load(&cluster(&format!("replace-after = {value}"))).unwrap_err();
        let d = e
            .diagnostics
            .iter()
            .find(|d| d.field == "cluster.replace-after")
            .unwrap_or_else(|| panic!("{value}: {e}"));
        assert_eq!(d.line, 3, "{value}: {e}");
        assert_eq!(d.col, 17, "{value}: {e}");
        assert!(e.to_string().contains(needle), "{value}: {e}");
        assert!(e.to_string().contains("/cfg/lab.toml:3:17"), "{value}: {e}");
    }
}
