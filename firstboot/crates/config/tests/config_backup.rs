//! `[backup]`: `interval` (5 s to 30 days, default 6 h) and `keep` (1 to 1000, default 8);
//! anything else is refused at its file:line:col.

mod common;

use std::time::Duration;

use common::{assert_refused_at, cluster, load};
use rackseed_config::{DEFAULT_BACKUP_INTERVAL, DEFAULT_BACKUP_KEEP};

/// A valid config with `section` from line 4 (its first value on line 5).
fn with_backup(section: &str) -> String {
    cluster(&format!("\n{section}"))
}

#[test]
fn defaults_and_values_are_read() {
    assert_eq!(DEFAULT_BACKUP_INTERVAL, Duration::from_secs(6 * 3600));
    let c = load(&with_backup("")).unwrap().config;
    assert_eq!(c.backup.interval, DEFAULT_BACKUP_INTERVAL);
    assert_eq!(c.backup.keep, DEFAULT_BACKUP_KEEP);
    let c = load(&with_backup("[backup]\ninterval = \"90m\"\nkeep = 3\n"))
        .unwrap()
        .config;
    assert_eq!(c.backup.interval, Duration::from_secs(5400));
    assert_eq!(c.backup.keep, 3);
}

#[test]
fn bad_values_and_unknown_keys_are_refused_at_their_position() {
    for (line, field, col, needle) in [
        (
            "interval = \"1s\"",
            "backup.interval",
            12,
            "from 5s to 30 days",
        ),
        (
            "interval = \"31days\"",
            "backup.interval",
            12,
            "from 5s to 30 days",
        ),
        ("interval = \"often\"", "backup.interval", 12, "duration"),
        ("keep = 0", "backup.keep", 8, "backup.keep"),
        ("keep = 1001", "backup.keep", 8, "backup.keep"),
        ("keep = \"all\"", "backup.keep", 8, "backup.keep"),
        ("copies = 3", "backup.copies", 1, "backup.copies"),
    ] {
        let text = with_backup(&format!("[backup]\n{line}\n"));
        assert_refused_at(&text, field, 5, col, needle);
    }
}
