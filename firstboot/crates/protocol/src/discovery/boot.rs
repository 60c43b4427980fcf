//! The boot counter: a number in the agent's state directory, one higher at each agent start,
//! written before anything is announced. Announcements carry it signed, and peers order a
//! node's boots by it (see [`crate::discovery::record::ReplayGuard`]): a recording of an
//! earlier boot can never pass for the current one.
//!
//! The file ([`BOOT_COUNTER_FILE`]) holds one decimal number and a newline, mode 0600, written
//! with `write_atomic`. A missing file starts at the wall clock's Unix seconds (at least 1):
//! a machine re-flashed with the same node id (an inventory MAC id, or a kept machine id)
//! lost its counter with its state, and peers that saw its earlier life's counter would hold
//! every announcement of the new one stale until they restart; its earlier life started
//! from the clock too, and raised it once per agent start, far fewer times than seconds
//! passed since. (A clock still years behind at that first start, a Pi without RTC before
//! NTP, gives a low counter again: such a node is heard once its peers restart.) An
//! unreadable or damaged file stops the agent instead of restarting: the same staleness.
//! `firstboot reset` keeps the file.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The counter's file name in the state directory.
pub const BOOT_COUNTER_FILE: &str = "boot-counter";

/// Raises the boot counter in `state_dir` by one, persists it, and returns the new value
/// (the clock's Unix seconds on the first start, at least 1).
pub fn advance_boot_counter(state_dir: &Path) -> Result<u64> {
    let path = state_dir.join(BOOT_COUNTER_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let t = text.trim_end_matches('\n');
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                bail!(
                    "{} does not hold a boot counter (one decimal number); restore it, or write a \
                     number higher than any boot this node announced before",
                    path.display()
                );
            }
            t.parse::<u64>()
                .with_context(|| format!("reading the boot counter in {}", path.display()))?
        }
        // `next` below is one higher: the clock's seconds, at least 1.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(1),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let next = last
        .checked_add(1)
        .with_context(|| format!("the boot counter in {} is at its maximum", path.display()))?;
    rackseed_host::fs::write_atomic(&path, format!("{next}\n").as_bytes(), 0o600)
        .with_context(|| format!("persisting the boot counter in {}", path.display()))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn counts_up_from_the_clock_persisted_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let first = advance_boot_counter(dir.path()).unwrap();
        assert!((now..now + 60).contains(&first), "{first} vs clock {now}");
        assert_eq!(advance_boot_counter(dir.path()).unwrap(), first + 1);
        assert_eq!(advance_boot_counter(dir.path()).unwrap(), first + 2);
        let path = dir.path().join(BOOT_COUNTER_FILE);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", first + 2)
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_state_directory_lost_with_a_reflash_starts_above_the_earlier_life() {
        // The earlier life: started a minute ago from the clock, restarted 30 times since.
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let path = dir.path().join(BOOT_COUNTER_FILE);
        std::fs::write(&path, format!("{}\n", now - 60 + 30)).unwrap();
        let earlier = advance_boot_counter(dir.path()).unwrap();
        // Re-flashed: the file is gone with the state.
        std::fs::remove_file(&path).unwrap();
        assert!(advance_boot_counter(dir.path()).unwrap() > earlier);
    }

    #[test]
    fn a_damaged_counter_stops_the_start_instead_of_restarting_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(BOOT_COUNTER_FILE);
        for bad in ["", "x\n", "-3\n", "99999999999999999999\n"] {
            std::fs::write(&path, bad).unwrap();
            let e = advance_boot_counter(dir.path()).unwrap_err();
            assert!(format!("{e:#}").contains("boot-counter"), "{bad:?}: {e:#}");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                bad,
                "left as it was"
            );
        }
        std::fs::write(&path, u64::MAX.to_string()).unwrap();
        assert!(advance_boot_counter(dir.path()).is_err());
    }
}
