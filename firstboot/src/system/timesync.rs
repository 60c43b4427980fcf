//! Waiting, for a bounded time, until the node's clock is synchronised before MicroK8s work.
//!
//! Raspberry Pis have no battery-backed clock: at first boot the wall clock can be years
//! behind, and it jumps when NTP first answers. MicroK8s' install creates the node's CA and
//! certificates with the clock's "now" as their start date, and a join signs this node's
//! certificates on the seed; TLS between nodes whose clocks are years apart can refuse
//! certificates that are "not yet valid". So the agent does not start the MicroK8s install or a
//! `microk8s join` until the clock is synchronised, as a unit ordered after `time-sync.target`
//! would; but only for a bounded time, so a cluster on a LAN without any NTP server still forms.
//!
//! How "synchronised" is known (checked in systemd's `systemd-timesyncd.service(8)` manual,
//! systemd 239 and later, the FILES section): systemd-timesyncd, Ubuntu's default NTP client,
//! touches `/run/systemd/timesync/synchronized` on each successful synchronisation; the same
//! file is what `systemd-time-wait-sync.service` waits for before `time-sync.target` is reached.
//! The daemon is `/usr/lib/systemd/systemd-timesyncd` (the manual's SYNOPSIS; `/lib` on
//! non-merged-/usr systems). So:
//! - the flag file exists under `--root`: synchronised, go ahead;
//! - the kernel set the clock from a real-time clock at boot and that clock reads a plausible
//!   date (below): the clock is already right, go ahead at once and say so in the log and the
//!   status line;
//! - no systemd-timesyncd binary under `--root`: nothing on this node will ever synchronise
//!   the clock (or another NTP client that does not write the flag does); waiting would only
//!   delay formation, so go ahead at once and say so in the log;
//! - otherwise wait, polling every second, with the status line "waiting for time
//!   synchronisation", until the flag appears or [`DEFAULT_WAIT`] (or `--time-sync-wait`) has
//!   passed **since the agent started**: a later wait (the join after the install) never adds
//!   to it, so the bound delays formation once, not once per step.
//!
//! Why 120 s: timesyncd asks its first server as soon as the network is up and retries every
//! 30 s (`ConnectionRetrySec=` in `timesyncd.conf(5)`, default 30 s), so a node that can reach
//! NTP is synchronised after at most a few attempts (DHCP, DNS and three tries fit in 2
//! minutes); an offline cluster pays those 2 minutes once, beside a MicroK8s install that takes
//! several minutes on a Pi.
//!
//! **Clocks that came from a real-time clock.** x86 mini-PCs keep the time in a
//! battery-backed CMOS clock, a Raspberry Pi 5 in its RTC when a battery is fitted, and every
//! QEMU VM gets the host's time through its emulated RTC (`mc146818` on x86, PL031 on `virt`).
//! Such a clock is right at boot, and waiting up to 120 s for timesyncd (which never answers on
//! an offline LAN, and is slow under emulation) only delays formation. How the agent knows
//! (checked in the kernel's `Documentation/ABI/testing/sysfs-class-rtc` and
//! `drivers/rtc/sysfs.c`, `hctosys_show`): `/sys/class/rtc/rtcN/hctosys` reads `1` when that
//! RTC provided the system time at boot through `CONFIG_RTC_HCTOSYS` (the device named by
//! `CONFIG_RTC_HCTOSYS_DEVICE`, `rtc0` on Debian and Ubuntu kernels), `0` otherwise;
//! `/sys/class/rtc/rtcN/since_epoch` is the RTC's own reading in seconds since the epoch. A
//! Raspberry Pi 4 has no RTC at all (no `rtcN`, or none with `hctosys` = 1).
//!
//! But "set from an RTC" is not "right": a Pi 5 RTC without its battery, or a mini-PC whose
//! CMOS battery died, starts from its reset date (1970, 2000, the firmware's date) and the
//! kernel copies that. So the RTC is trusted only when both its own reading and the system
//! clock now are not earlier than a plausibility floor, the later of
//! - [`PLAUSIBLE_FLOOR_SECS`], a date compiled into the agent (before this agent was built, so
//!   no correct clock running it can read earlier), and
//! - the modification time of the image's `/etc/rackseed/image.json` under `--root`: the image
//!   builder writes it into the filesystem with e2fsprogs' `debugfs write`, which stamps the new
//!   inode with the time of the build (`misc/create_inode.c`, `do_write_internal`: atime, ctime
//!   and mtime = `fs->now` or `time(0)`), so it is the image's build date as seen on the node.
//!
//! A clock earlier than the floor falls back to the bounded wait (the 120 s default). The
//! check is made each time the state is asked for, with the clock read then. What it cannot
//! see: an RTC that drifted but still reads after the floor (a few seconds or minutes off does
//! not matter to certificates valid for years), and a reboot of a dead-battery node before
//! it formed, where systemd-timesyncd may have moved the clock forward to its last saved time
//! (`/var/lib/systemd/timesync/clock`) while the RTC itself still reads its reset date: the
//! RTC's own `since_epoch` is checked too, which catches that.
//!
//! Nothing here is a safety rule: the formation core never reads the wall clock (its `now` is
//! the agent's monotonic time since start), and this wait only delays work. A node whose clock
//! jumps after synchronising (backward or forward) goes on as before; the agent's timers use
//! the monotonic clock, which a wall-clock step does not move.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest wait for synchronisation, counted from the agent's start (see the module docs).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);
/// systemd-timesyncd's flag, relative to the root.
pub const SYNCHRONIZED_FLAG: &str = "run/systemd/timesync/synchronized";
/// Where systemd-timesyncd's daemon lives, relative to the root.
pub const TIMESYNCD_BINARIES: [&str; 2] = [
    "usr/lib/systemd/systemd-timesyncd",
    "lib/systemd/systemd-timesyncd",
];
/// The kernel's RTC class folder (one `rtcN` per real-time clock), relative to the root.
pub const RTC_CLASS: &str = "sys/class/rtc";
/// The image's record of its build, relative to the root; its mtime is the build time.
pub const IMAGE_INFO: &str = "etc/rackseed/image.json";
/// 2026-12-01T00:00:00Z: no correct clock running this agent reads earlier (the agent did not
/// exist before). The lowest plausibility floor for an RTC's date (see the module docs).
pub const PLAUSIBLE_FLOOR_SECS: u64 = 1_796_083_200;
/// How often the flag is looked for while waiting.
const POLL: Duration = Duration::from_secs(1);

/// What the node's clock looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockState {
    /// systemd-timesyncd synchronised the clock at least once since boot.
    Synchronized,
    /// The kernel set the clock from a real-time clock at boot, and it reads a plausible date.
    FromRtc(RtcClock),
    /// No systemd-timesyncd on this node: nothing to wait for.
    NoTimeService,
    /// systemd-timesyncd is there but has not synchronised yet.
    NotYet,
}

/// A real-time clock that set the system clock at boot and is trusted (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcClock {
    /// `N` of `/sys/class/rtc/rtcN`.
    pub device: u32,
    /// The system clock when checked, seconds since the epoch.
    pub clock_secs: u64,
    /// The date both the RTC and the system clock were checked against.
    pub floor: Floor,
}

/// The plausibility floor a clock read from an RTC must not be earlier than.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    /// Seconds since the epoch.
    pub secs: u64,
    pub source: FloorSource,
}

/// Where the floor came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorSource {
    /// [`PLAUSIBLE_FLOOR_SECS`], compiled into the agent.
    Agent,
    /// The mtime of the image's `/etc/rackseed/image.json`, written at the image's build.
    ImageBuild,
}

impl FloorSource {
    fn describe(self) -> &'static str {
        match self {
            FloorSource::Agent => "the agent's release",
            FloorSource::ImageBuild => "the image's build",
        }
    }
}

/// What the real-time clocks under a root say about the clock set at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtcCheck {
    /// No RTC set the system clock at boot (a Raspberry Pi 4, a kernel without
    /// `CONFIG_RTC_HCTOSYS`).
    NoRtc,
    /// An RTC set it and both it and the clock read no earlier than the floor.
    Trusted(RtcClock),
    /// An RTC set it, but it or the clock reads earlier than the floor (a dead or missing
    /// battery), or its own reading could not be had.
    Implausible {
        device: u32,
        /// The RTC's own reading (`since_epoch`), if it could be read.
        rtc_secs: Option<u64>,
        clock_secs: u64,
        floor: Floor,
    },
}

fn secs_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn utc(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The plausibility floor for the node under `root` (see the module docs).
pub fn plausibility_floor(root: &Path) -> Floor {
    let built = std::fs::metadata(root.join(IMAGE_INFO))
        .and_then(|m| m.modified())
        .map(secs_since_epoch)
        .ok();
    match built {
        Some(secs) if secs > PLAUSIBLE_FLOOR_SECS => Floor {
            secs,
            source: FloorSource::ImageBuild,
        },
        _ => Floor {
            secs: PLAUSIBLE_FLOOR_SECS,
            source: FloorSource::Agent,
        },
    }
}

/// The RTC that set the system clock at boot (`hctosys` = 1), lowest `N` first.
fn hctosys_device(root: &Path) -> Option<u32> {
    let entries = std::fs::read_dir(root.join(RTC_CLASS)).ok()?;
    let mut devices: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("rtc")?.parse().ok())
        .collect();
    devices.sort_unstable();
    devices.into_iter().find(|n| {
        std::fs::read_to_string(root.join(RTC_CLASS).join(format!("rtc{n}/hctosys")))
            .is_ok_and(|v| v.trim() == "1")
    })
}

/// Whether the clock under `root`, reading `now`, came from a trustworthy RTC at boot.
pub fn check_rtc(root: &Path, now: SystemTime) -> RtcCheck {
    let Some(device) = hctosys_device(root) else {
        return RtcCheck::NoRtc;
    };
    let floor = plausibility_floor(root);
    let clock_secs = secs_since_epoch(now);
    let rtc_secs = std::fs::read_to_string(
        root.join(RTC_CLASS)
            .join(format!("rtc{device}/since_epoch")),
    )
    .ok()
    .and_then(|v| v.trim().parse::<u64>().ok());
    match rtc_secs {
        Some(rtc) if rtc >= floor.secs && clock_secs >= floor.secs => RtcCheck::Trusted(RtcClock {
            device,
            clock_secs,
            floor,
        }),
        _ => RtcCheck::Implausible {
            device,
            rtc_secs,
            clock_secs,
            floor,
        },
    }
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Synchronized {
        waited: Duration,
    },
    /// The clock came from a trusted RTC: no wait.
    FromRtc(RtcClock),
    NoTimeService,
    /// The bound passed without synchronisation: the work goes ahead anyway.
    GaveUp {
        waited: Duration,
    },
}

/// The bounded wait for time synchronisation (see the module docs).
#[derive(Debug, Clone)]
pub struct TimeSyncWait {
    root: PathBuf,
    bound: Duration,
    started: Instant,
}

impl TimeSyncWait {
    /// A wait for the node under `root`, at most `bound` after now (the agent's start).
    pub fn new(root: &Path, bound: Duration) -> TimeSyncWait {
        TimeSyncWait {
            root: root.to_path_buf(),
            bound,
            started: Instant::now(),
        }
    }

    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// The clock's state, with the system clock read now.
    pub fn state(&self) -> ClockState {
        self.state_at(SystemTime::now())
    }

    /// The clock's state if the system clock reads `now`.
    pub fn state_at(&self, now: SystemTime) -> ClockState {
        if self.root.join(SYNCHRONIZED_FLAG).exists() {
            return ClockState::Synchronized;
        }
        if let RtcCheck::Trusted(rtc) = check_rtc(&self.root, now) {
            return ClockState::FromRtc(rtc);
        }
        if TIMESYNCD_BINARIES
            .iter()
            .any(|b| self.root.join(b).exists())
        {
            ClockState::NotYet
        } else {
            ClockState::NoTimeService
        }
    }

    /// What is left of the bound now.
    pub fn remaining(&self) -> Duration {
        self.bound.saturating_sub(self.started.elapsed())
    }

    /// Waits until the clock is synchronised, there is nothing to wait for, or the bound has
    /// passed. `waiting` is called once, with a status line, if the wait has to wait at all.
    pub async fn wait(&self, before: &str, mut waiting: impl FnMut(String)) -> Outcome {
        let t0 = Instant::now();
        let mut told = false;
        loop {
            match self.state() {
                ClockState::Synchronized => {
                    return Outcome::Synchronized {
                        waited: t0.elapsed(),
                    }
                }
                ClockState::FromRtc(rtc) => return Outcome::FromRtc(rtc),
                ClockState::NoTimeService => return Outcome::NoTimeService,
                ClockState::NotYet => {}
            }
            let left = self.remaining();
            if left.is_zero() {
                return Outcome::GaveUp {
                    waited: t0.elapsed(),
                };
            }
            if !told {
                told = true;
                let rtc = match check_rtc(&self.root, SystemTime::now()) {
                    RtcCheck::Implausible {
                        device,
                        rtc_secs,
                        clock_secs,
                        floor,
                    } => format!(
                        "; the real-time clock rtc{device} set the clock at boot but is not \
                         trusted: it reads {}, the clock {}, before {} ({})",
                        rtc_secs.map_or_else(|| "nothing readable".to_string(), utc),
                        utc(clock_secs),
                        floor.source.describe(),
                        utc(floor.secs),
                    ),
                    RtcCheck::NoRtc | RtcCheck::Trusted(_) => String::new(),
                };
                waiting(format!(
                    "waiting for time synchronisation before {before} (systemd-timesyncd has not \
                     synchronised the clock yet{rtc}; going ahead in at most {} s)",
                    left.as_secs().max(1)
                ));
            }
            tokio::time::sleep(POLL.min(left)).await;
        }
    }
}

/// The log and status line for a wait's outcome, if it is worth one.
pub fn describe(outcome: Outcome, before: &str) -> Option<String> {
    match outcome {
        Outcome::Synchronized { waited } if waited >= POLL => Some(format!(
            "clock synchronised after {:.0} s; {before}",
            waited.as_secs_f64()
        )),
        Outcome::Synchronized { .. } | Outcome::NoTimeService => None,
        Outcome::FromRtc(rtc) => Some(format!(
            "clock set at boot from the real-time clock rtc{} ({}, not before {} at {}): \
             {before} without waiting for time synchronisation",
            rtc.device,
            utc(rtc.clock_secs),
            rtc.floor.source.describe(),
            utc(rtc.floor.secs),
        )),
        Outcome::GaveUp { waited } => Some(format!(
            "clock still not synchronised (no NTP server reachable?) after waiting {:.0} s: \
             {before} anyway; certificates made now carry this clock's date",
            waited.as_secs_f64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with_timesyncd() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join(TIMESYNCD_BINARIES[0]);
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"").unwrap();
        d
    }

    fn sync(root: &Path) {
        let flag = root.join(SYNCHRONIZED_FLAG);
        std::fs::create_dir_all(flag.parent().unwrap()).unwrap();
        std::fs::write(flag, b"").unwrap();
    }

    #[test]
    fn states_follow_the_flag_and_the_daemon() {
        let bare = tempfile::tempdir().unwrap();
        let w = TimeSyncWait::new(bare.path(), DEFAULT_WAIT);
        assert_eq!(w.state(), ClockState::NoTimeService);
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), DEFAULT_WAIT);
        assert_eq!(w.state(), ClockState::NotYet);
        sync(d.path());
        assert_eq!(w.state(), ClockState::Synchronized);
        // The flag alone (another client touching it) also counts.
        sync(bare.path());
        assert_eq!(
            TimeSyncWait::new(bare.path(), DEFAULT_WAIT).state(),
            ClockState::Synchronized
        );
    }

    /// An RTC `rtcN` under `root` with its `hctosys` flag and `since_epoch` reading.
    fn rtc(root: &Path, n: u32, hctosys: &str, since_epoch: Option<u64>) {
        let dir = root.join(RTC_CLASS).join(format!("rtc{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hctosys"), format!("{hctosys}\n")).unwrap();
        if let Some(secs) = since_epoch {
            std::fs::write(dir.join("since_epoch"), format!("{secs}\n")).unwrap();
        }
    }

    /// The image's `image.json`, with its mtime (the build time) at `secs`.
    fn image_built_at(root: &Path, secs: u64) {
        let f = root.join(IMAGE_INFO);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"{}").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(at(secs))
            .unwrap();
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// 2027-03-01T12:00:00Z, after the compiled-in floor.
    const LATER: u64 = 1_803_902_400;

    #[test]
    fn a_plausible_rtc_clock_needs_no_wait() {
        let d = root_with_timesyncd();
        rtc(d.path(), 0, "1", Some(LATER));
        let w = TimeSyncWait::new(d.path(), DEFAULT_WAIT);
        let ClockState::FromRtc(r) = w.state_at(at(LATER + 5)) else {
            panic!(
                "expected the RTC to be trusted: {:?}",
                w.state_at(at(LATER + 5))
            );
        };
        assert_eq!(r.device, 0);
        assert_eq!(r.clock_secs, LATER + 5);
        assert_eq!(
            r.floor,
            Floor {
                secs: PLAUSIBLE_FLOOR_SECS,
                source: FloorSource::Agent
            }
        );
        let line = describe(Outcome::FromRtc(r), "installing MicroK8s").unwrap();
        assert!(line.contains("real-time clock rtc0"), "{line}");
        assert!(line.contains("2027-03-01T12:00:05Z"), "{line}");
        assert!(
            line.contains("the agent's release at 2026-12-01T00:00:00Z"),
            "{line}"
        );
        assert!(
            line.ends_with("installing MicroK8s without waiting for time synchronisation"),
            "{line}"
        );
        // The flag still wins: a synchronised clock is reported as such.
        sync(d.path());
        assert_eq!(w.state_at(at(LATER)), ClockState::Synchronized);
    }

    #[test]
    fn no_rtc_or_one_that_did_not_set_the_clock_is_not_trusted() {
        // A Raspberry Pi 4: no RTC at all.
        let pi4 = root_with_timesyncd();
        assert_eq!(check_rtc(pi4.path(), at(LATER)), RtcCheck::NoRtc);
        assert_eq!(
            TimeSyncWait::new(pi4.path(), DEFAULT_WAIT).state_at(at(LATER)),
            ClockState::NotYet
        );
        // An RTC the kernel did not take the time from (hctosys 0), and an empty class
        // folder's neighbour that is not an RTC.
        let d = root_with_timesyncd();
        rtc(d.path(), 0, "0", Some(LATER));
        std::fs::create_dir_all(d.path().join(RTC_CLASS).join("power")).unwrap();
        assert_eq!(check_rtc(d.path(), at(LATER)), RtcCheck::NoRtc);
        // The second RTC did: it is the one checked.
        rtc(d.path(), 1, "1", Some(LATER));
        let RtcCheck::Trusted(r) = check_rtc(d.path(), at(LATER)) else {
            panic!("rtc1 set the clock");
        };
        assert_eq!(r.device, 1);
    }

    #[test]
    fn an_rtc_reading_before_the_image_was_built_is_not_trusted() {
        // A mini-PC with a dead CMOS battery, booted after the image was built: the RTC
        // restarted from its reset date, and so did the clock.
        let d = root_with_timesyncd();
        image_built_at(d.path(), LATER);
        rtc(d.path(), 0, "1", Some(946_684_800)); // 2000-01-01
        let floor = Floor {
            secs: LATER,
            source: FloorSource::ImageBuild,
        };
        assert_eq!(plausibility_floor(d.path()), floor);
        assert_eq!(
            check_rtc(d.path(), at(946_684_830)),
            RtcCheck::Implausible {
                device: 0,
                rtc_secs: Some(946_684_800),
                clock_secs: 946_684_830,
                floor,
            }
        );
        let w = TimeSyncWait::new(d.path(), DEFAULT_WAIT);
        assert_eq!(w.state_at(at(946_684_830)), ClockState::NotYet);
        // Later than the compiled-in floor but before this image's build: still not trusted.
        rtc(d.path(), 0, "1", Some(LATER - 3600));
        assert!(matches!(
            check_rtc(d.path(), at(LATER - 3600)),
            RtcCheck::Implausible { .. }
        ));
        // The RTC reads its reset date although the clock was moved forward since boot
        // (systemd-timesyncd's saved clock): the RTC's own reading decides.
        rtc(d.path(), 0, "1", Some(946_684_800));
        assert!(matches!(
            check_rtc(d.path(), at(LATER + 60)),
            RtcCheck::Implausible { .. }
        ));
        // A good RTC after the build.
        rtc(d.path(), 0, "1", Some(LATER + 60));
        assert!(matches!(
            check_rtc(d.path(), at(LATER + 60)),
            RtcCheck::Trusted(RtcClock { floor: f, .. }) if f == floor
        ));
        // A clock set back after boot (by hand) below the floor is not trusted either.
        assert!(matches!(
            check_rtc(d.path(), at(LATER - 1)),
            RtcCheck::Implausible { .. }
        ));
    }

    #[test]
    fn an_rtc_without_battery_or_reading_is_not_trusted() {
        // A Raspberry Pi 5 without its battery: the RTC starts from 1970 at power-on.
        let d = root_with_timesyncd();
        rtc(d.path(), 0, "1", Some(12));
        assert!(matches!(
            check_rtc(d.path(), at(12)),
            RtcCheck::Implausible {
                rtc_secs: Some(12),
                ..
            }
        ));
        // An RTC whose reading cannot be had (missing or garbled since_epoch).
        rtc(d.path(), 0, "1", None);
        std::fs::remove_file(d.path().join(RTC_CLASS).join("rtc0/since_epoch")).unwrap();
        assert!(matches!(
            check_rtc(d.path(), at(LATER)),
            RtcCheck::Implausible { rtc_secs: None, .. }
        ));
        std::fs::write(d.path().join(RTC_CLASS).join("rtc0/since_epoch"), b"soon\n").unwrap();
        assert!(matches!(
            check_rtc(d.path(), at(LATER)),
            RtcCheck::Implausible { rtc_secs: None, .. }
        ));
        // An image.json older than the compiled-in floor does not lower it.
        image_built_at(d.path(), 1_000_000_000);
        assert_eq!(plausibility_floor(d.path()).source, FloorSource::Agent);
        assert_eq!(plausibility_floor(d.path()).secs, PLAUSIBLE_FLOOR_SECS);
    }

    #[tokio::test]
    async fn an_untrusted_rtc_waits_and_says_why() {
        let d = root_with_timesyncd();
        rtc(d.path(), 0, "1", Some(12));
        let w = TimeSyncWait::new(d.path(), Duration::from_millis(300));
        let mut lines = Vec::new();
        let out = w.wait("joining MicroK8s", |l| lines.push(l)).await;
        assert!(matches!(out, Outcome::GaveUp { .. }), "{out:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("the real-time clock rtc0 set the clock at boot but is not trusted"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("1970-01-01T00:00:12Z"), "{}", lines[0]);
    }

    #[tokio::test]
    async fn a_trusted_rtc_ends_the_wait_at_once() {
        let d = root_with_timesyncd();
        // The host's real clock: an RTC reading now, after the compiled-in floor.
        let now = secs_since_epoch(SystemTime::now());
        assert!(
            now >= PLAUSIBLE_FLOOR_SECS,
            "this machine's clock is before the floor"
        );
        rtc(d.path(), 0, "1", Some(now));
        let w = TimeSyncWait::new(d.path(), Duration::from_secs(60));
        let t = Instant::now();
        let mut lines = Vec::new();
        let out = w.wait("installing MicroK8s", |l| lines.push(l)).await;
        assert!(
            matches!(out, Outcome::FromRtc(RtcClock { device: 0, .. })),
            "{out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[tokio::test]
    async fn no_time_service_means_no_wait() {
        let bare = tempfile::tempdir().unwrap();
        let w = TimeSyncWait::new(bare.path(), Duration::from_secs(60));
        let mut lines = Vec::new();
        let t = Instant::now();
        assert_eq!(
            w.wait("installing", |l| lines.push(l)).await,
            Outcome::NoTimeService
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn waits_until_synchronised_with_a_status_line() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::from_secs(30));
        let root = d.path().to_path_buf();
        let syncer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sync(&root);
        });
        let mut lines = Vec::new();
        let out = w.wait("installing MicroK8s", |l| lines.push(l)).await;
        syncer.await.unwrap();
        let Outcome::Synchronized { waited } = out else {
            panic!("expected synchronised, got {out:?}");
        };
        assert!(waited >= Duration::from_millis(1400), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("waiting for time synchronisation before installing MicroK8s"));
        assert!(describe(out, "installing")
            .unwrap()
            .contains("synchronised after"));
    }

    #[tokio::test]
    async fn the_bound_counts_from_the_start_and_is_paid_once() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::from_millis(1200));
        let t = Instant::now();
        let out = w.wait("installing", |_| {}).await;
        assert!(matches!(out, Outcome::GaveUp { .. }), "{out:?}");
        assert!(t.elapsed() >= Duration::from_millis(1100));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(describe(out, "installing").unwrap().contains("anyway"));
        // A second step (the join) does not wait again.
        let t = Instant::now();
        let mut lines = Vec::new();
        let again = w.wait("joining", |l| lines.push(l)).await;
        assert!(matches!(again, Outcome::GaveUp { .. }));
        assert!(t.elapsed() < Duration::from_millis(200));
        assert!(
            lines.is_empty(),
            "no 'waiting' line once the bound has passed"
        );
    }

    #[tokio::test]
    async fn a_zero_bound_never_waits() {
        let d = root_with_timesyncd();
        let w = TimeSyncWait::new(d.path(), Duration::ZERO);
        let t = Instant::now();
        assert!(matches!(
            w.wait("installing", |_| {}).await,
            Outcome::GaveUp { .. }
        ));
        assert!(t.elapsed() < Duration::from_millis(200));
    }
}
