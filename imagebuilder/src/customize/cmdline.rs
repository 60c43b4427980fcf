//! The Raspberry Pi kernel command line (`cmdline.txt` on `system-boot`): the firmware reads
//! only the first line, so the file stays one line; flags are appended once.

/// Flags MicroK8s needs on Raspberry Pi kernels that do not enable the memory cgroup.
pub const MEMORY_CGROUP: [&str; 2] = ["cgroup_enable=memory", "cgroup_memory=1"];

/// Returns the new one-line `cmdline.txt` (with a trailing newline) with `flags` appended where
/// missing, and whether extra lines were dropped (the firmware ignores them anyway).
pub fn append_flags(current: &str, flags: &[&str]) -> (String, bool) {
    let mut lines = current.lines();
    let first = lines.next().unwrap_or("");
    let dropped = lines.any(|l| !l.trim().is_empty());
    let mut words: Vec<&str> = first.split_whitespace().collect();
    for f in flags {
        if !words.contains(f) {
            words.push(f);
        }
    }
    (format!("{}\n", words.join(" ")), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_once_and_stays_one_line() {
        let (once, dropped) = append_flags(
            "console=tty1 root=LABEL=writable rootwait\n",
            &MEMORY_CGROUP,
        );
        assert_eq!(
            once,
            "console=tty1 root=LABEL=writable rootwait cgroup_enable=memory cgroup_memory=1\n"
        );
        assert!(!dropped);
        let (twice, _) = append_flags(&once, &MEMORY_CGROUP);
        assert_eq!(twice, once);
        assert_eq!(twice.lines().count(), 1);
    }

    #[test]
    fn keeps_a_partly_present_flag_single() {
        let (s, _) = append_flags("a cgroup_memory=1", &MEMORY_CGROUP);
        assert_eq!(s, "a cgroup_memory=1 cgroup_enable=memory\n");
    }

    #[test]
    fn extra_lines_are_dropped_and_reported() {
        let (s, dropped) = append_flags("a b\r\nignored by firmware\n", &MEMORY_CGROUP);
        assert_eq!(s.lines().count(), 1);
        assert!(dropped);
        let (s, _) = append_flags("", &MEMORY_CGROUP);
        assert_eq!(s, "cgroup_enable=memory cgroup_memory=1\n");
    }
}
