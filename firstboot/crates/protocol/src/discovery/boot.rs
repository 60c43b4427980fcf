//! The boot counter: a number in the agent's state directory, one higher at each agent start,
//! written before anything is announced. Announcements carry it signed, and peers order a
//! node's boots by it (see [`crate::discovery::record::ReplayGuard`]): a recording of an
//! earlier boot can never pass for the current one.
//!
//! The file ([`BOOT_COUNTER_FILE`]) holds one decimal number and a newline, mode 0600, written
//! with `write_atomic`. A missing file starts at 1. An unreadable or damaged file stops the
//! agent instead of restarting at 1: peers that saw a higher counter would hold every
//! announcement of this node stale until they restart. `firstboot reset` keeps the file.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The counter's file name in the state directory.
pub const BOOT_COUNTER_FILE: &str = "boot-counter";

/// Raises the boot counter in `state_dir` by one, persists it, and returns the new value
/// (1 on the first start).
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
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
    fn counts_up_from_one_persisted_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(advance_boot_counter(dir.path()).unwrap(), 1);
        assert_eq!(advance_boot_counter(dir.path()).unwrap(), 2);
        assert_eq!(advance_boot_counter(dir.path()).unwrap(), 3);
        let path = dir.path().join(BOOT_COUNTER_FILE);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
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
