//! `cluster.api-check-interval`: how often keepalived asks the local API server whether it is
//! ready (the VRRP timings scale with it). Default 1 s; whole seconds from 1 s to 10 s;
//! anything else is refused at its file:line:col.

use std::path::Path;
use std::time::Duration;

use rackseed_config::{self as config, DEFAULT_API_CHECK_INTERVAL};

fn cluster(extra: &str) -> String {
    format!(
        "[cluster]\nname = \"lab\"\n{extra}\n[image]\ntarget = \"x86_64-efi\"\nbase = {{ kind = \"bootstrap\", suite = \"bookworm\" }}\n"
    )
}

fn load(text: &str) -> Result<config::Loaded, config::ConfigError> {
    config::parse(text, Path::new("/cfg/lab.toml"))
}

#[test]
fn the_default_is_one_second_and_a_value_is_read() {
    assert_eq!(DEFAULT_API_CHECK_INTERVAL, Duration::from_secs(1));
    let c = load(&cluster("")).unwrap().config;
    assert_eq!(c.cluster.api_check_interval, DEFAULT_API_CHECK_INTERVAL);
    let c = load(&cluster("api-check-interval = \"5s\""))
        .unwrap()
        .config;
    assert_eq!(c.cluster.api_check_interval, Duration::from_secs(5));
}

#[test]
fn out_of_range_fractional_or_malformed_is_refused_at_its_position() {
    for (value, needle) in [
        ("\"0s\"", "whole seconds from 1s to 10s"),
        ("\"11s\"", "whole seconds from 1s to 10s"),
        ("\"1500ms\"", "whole seconds from 1s to 10s"),
        ("\"often\"", "expected a duration"),
        ("5", "cluster.api-check-interval"),
    ] {
        let e = load(&cluster(&format!("api-check-interval = {value}"))).unwrap_err();
        let d = e
            .diagnostics
            .iter()
            .find(|d| d.field == "cluster.api-check-interval")
            .unwrap_or_else(|| panic!("{value}: {e}"));
        assert_eq!(d.line, 3, "{value}: {e}");
        assert_eq!(d.col, 22, "{value}: {e}");
        assert!(e.to_string().contains(needle), "{value}: {e}");
        assert!(e.to_string().contains("/cfg/lab.toml:3:22"), "{value}: {e}");
    }
}
