//! Choosing KVM or TCG. `/dev/kvm` can exist and still be unusable: on the build machines a
//! KVM guest ran but about ten times slower than software emulation, so a Linux kernel seemed
//! to hang. The probe therefore measures instead of asking: it boots QEMU's own SeaBIOS with
//! no disks, once under TCG and once under KVM, and times how long each takes to print
//! `No bootable device` on the debug console (port 0x402). KVM is chosen only when it gets
//! there, within its hard timeout, and is not slower than TCG. Every probe child is killed when
//! its timeout passes (the runner kills on drop). The result is cached per process.
//!
//! To probe another architecture, add a firmware whose progress can be observed the same way
//! and route it in [`choose_accel`].

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rackseed_host::command::Cmd;
use tokio::sync::OnceCell;

use crate::node::{Accel, Arch};

/// What SeaBIOS prints on the debug console when it has nothing to boot.
const SEABIOS_DONE: &str = "No bootable device";
/// Hard limit for each probe boot.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccelChoice {
    /// Probe, use KVM if it works well, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}` (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// The measurements behind a probe decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Time to SeaBIOS' end under TCG, `None` if it did not get there in time.
    pub tcg: Option<Duration>,
    /// Same under KVM; `None` also when `/dev/kvm` is absent.
    pub kvm: Option<Duration>,
    pub chosen: Accel,
}

static X86_PROBE: OnceCell<ProbeReport> = OnceCell::const_new();

/// The accelerator for `arch` given the user's choice; `Auto` probes once per process.
pub async fn choose_accel(arch: Arch, choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto if arch == Arch::X86_64 && arch.is_host() => {
            X86_PROBE
                .get_or_init(|| async {
                    let r = probe_kvm(
                        Path::new(Arch::X86_64.qemu_binary()),
                        Path::new("/dev/kvm"),
                        PROBE_TIMEOUT,
                    )
                    .await;
                    tracing::info!(tcg = ?r.tcg, kvm = ?r.kvm, chosen = %r.chosen, "kvm probe");
                    r
                })
                .await
                .chosen
        }
        AccelChoice::Auto => Accel::Tcg,
    }
}

/// Times SeaBIOS under TCG and under KVM with `qemu` (an x86_64 system emulator) and decides.
/// Never takes much longer than twice `timeout`.
pub async fn probe_kvm(qemu: &Path, kvm_device: &Path, timeout: Duration) -> ProbeReport {
    let tcg = time_seabios(qemu, Accel::Tcg, timeout).await;
    let kvm = if kvm_device.exists() {
        time_seabios(qemu, Accel::Kvm, timeout).await
    } else {
        None
    };
    let chosen = match (tcg, kvm) {
        // Slack for scheduling noise; a broken KVM is many times slower.
        (Some(t), Some(k)) if k <= t + t / 4 + Duration::from_millis(50) => Accel::Kvm,
        // TCG itself could not be measured (loaded machine): trust a KVM that finished quickly.
        (None, Some(k)) if k < timeout / 3 => Accel::Kvm,
        _ => Accel::Tcg,
    };
    ProbeReport { tcg, kvm, chosen }
}

/// How long SeaBIOS takes to give up booting under `accel`, or `None` if it did not within
/// `timeout` (or QEMU could not start). The child is always killed before returning.
async fn time_seabios(qemu: &Path, accel: Accel, timeout: Duration) -> Option<Duration> {
    let dir = tempfile::tempdir().ok()?;
    let log = dir.path().join("debugcon.log");
    let start = Instant::now();
    let mut child = Cmd::new(qemu, timeout)
        .args(["-accel", &accel.to_string()])
        .args([
            "-machine",
            "q35",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-chardev"])
        .arg(format!("file,id=dbg,path={}", log.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .spawn_with(Stdio::null(), Stdio::null())
        .map_err(|e| {
            let e = format!("{:#}", anyhow::Error::from(e));
            tracing::debug!(error = %e, "kvm probe: qemu did not start")
        })
        .ok()?;
    let mut result = None;
    while start.elapsed() < timeout {
        if std::fs::read_to_string(&log).is_ok_and(|s| s.contains(SEABIOS_DONE)) {
            result = Some(start.elapsed());
            break;
        }
        if let Ok(Some(_exited)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_qemu(dir: &Path, body: &str) -> std::path::PathBuf {
        let p = dir.join("fake-qemu");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn hanging_qemu_falls_back_to_tcg_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        // A QEMU that hangs without ever printing, like a stuck KVM guest.
        let qemu = fake_qemu(dir.path(), "exec sleep 60");
        let kvm_dev = dir.path().join("kvm");
        std::fs::write(&kvm_dev, "").unwrap();
        let t = Instant::now();
        let r = probe_kvm(&qemu, &kvm_dev, Duration::from_millis(700)).await;
        assert_eq!(r.chosen, Accel::Tcg);
        assert_eq!((r.tcg, r.kvm), (None, None));
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn slow_kvm_loses_to_tcg_and_fast_kvm_wins() {
        let dir = tempfile::tempdir().unwrap();
        // Prints SeaBIOS' last words after a delay that depends on the accelerator.
        let delay_file = dir.path().join("kvm-delay");
        let qemu = fake_qemu(
            dir.path(),
            &format!(
                r#"delay=0.1; [ "$2" = kvm ] && delay=$(cat {})
for a in "$@"; do case "$a" in file,id=dbg,path=*) log=${{a#file,id=dbg,path=}} ;; esac; done
sleep $delay; echo "No bootable device." > "$log"; exec sleep 60"#,
                delay_file.display()
            ),
        );
        let kvm_dev = dir.path().join("kvm");
        std::fs::write(&kvm_dev, "").unwrap();
        std::fs::write(&delay_file, "1.0").unwrap();
        let slow = probe_kvm(&qemu, &kvm_dev, Duration::from_secs(3)).await;
        assert_eq!(slow.chosen, Accel::Tcg, "{slow:?}");
        assert!(slow.kvm.is_some() && slow.tcg.is_some(), "{slow:?}");
        std::fs::write(&delay_file, "0.05").unwrap();
        let fast = probe_kvm(&qemu, &kvm_dev, Duration::from_secs(3)).await;
        assert_eq!(fast.chosen, Accel::Kvm, "{fast:?}");
    }

    #[tokio::test]
    async fn missing_kvm_device_means_tcg_without_trying() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "exit 1");
        let r = probe_kvm(&qemu, &dir.path().join("no-kvm"), Duration::from_secs(1)).await;
        assert_eq!(
            r,
            ProbeReport {
                tcg: None,
                kvm: None,
                chosen: Accel::Tcg
            }
        );
    }

    /// The real probe on this machine: whatever it decides, it decides in bounded time and
    /// SeaBIOS finishes under TCG (which proves the probe observes progress at all).
    #[tokio::test]
    async fn real_probe_is_bounded_and_sees_tcg_finish() {
        let t = Instant::now();
        let r = probe_kvm(
            Path::new(Arch::X86_64.qemu_binary()),
            Path::new("/dev/kvm"),
            PROBE_TIMEOUT,
        )
        .await;
        let elapsed = t.elapsed();
        println!("kvm probe: {r:?} in {elapsed:?}");
        assert!(
            r.tcg.is_some(),
            "SeaBIOS did not finish under TCG; is qemu-system-x86 installed? {r:?}"
        );
        assert!(
            elapsed < PROBE_TIMEOUT * 2 + Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
}
