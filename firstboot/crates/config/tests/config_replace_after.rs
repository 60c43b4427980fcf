//! `cluster.replace-after`: how long a member may be unseen before the cluster removes and
//! replaces it. Default 15 minutes; a duration from 1 minute to 30 days; anything else is
//! refused at its file:line:col.

mod common;

use std::time::Duration;

use common::{assert_refused_at, cluster, load};
use rackseed_config::DEFAULT_REPLACE_AFTER;

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
        let text = cluster(&format!("replace-after = {value}"));
        assert_refused_at(&text, "cluster.replace-after", 3, 17, needle);
    }
}
