//! `cluster.api-check-interval`: how often keepalived asks the local API server whether it is
//! ready (the VRRP timings scale with it). Default 1 s; whole seconds from 1 s to 10 s;
//! anything else is refused at its file:line:col.

mod common;

use std::time::Duration;

use common::{assert_refused_at, cluster, load};
use rackseed_config::DEFAULT_API_CHECK_INTERVAL;

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
        let text = cluster(&format!("api-check-interval = {value}"));
        assert_refused_at(&text, "cluster.api-check-interval", 3, 22, needle);
    }
}
