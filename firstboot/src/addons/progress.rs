//! How far enabling the addons got, persisted by the driver so a crash mid-enable resumes
//! safely. Pure: no I/O.
//!
//! Protocol for the driver (on the one control-plane node that enables addons, after HA):
//! 1. Build [`AddonProgress::new`] from the plan once and persist it; on later boots load it and
//!    call [`AddonProgress::resume`].
//! 2. Loop: `let Some(addon) = next_addon_to_enable(&p)` -> [`AddonProgress::mark_enabling`] ->
//!    **persist** -> run `microk8s enable ...` -> [`record_result`] -> **persist**.
//!
//! A crash between `mark_enabling` and `record_result` leaves the addon `enabling`; it is the
//! next one returned and is simply run again (MicroK8s' enable is idempotent: "already enabled"
//! exits 0). Each start counts as an attempt, so an addon whose enable keeps killing the agent
//! (or keeps failing) ends `failed` after [`max_attempts`] instead of looping forever. One failed
//! addon does not block the others.
//!
//! Spacing: a failed `microk8s enable` is run again at once ([`MAX_ATTEMPTS`] starts). The
//! `longhorn` step mostly fails by *waiting* (a member's prerequisites are not met yet, or it
//! has not reported): it gets [`LONGHORN_MAX_ATTEMPTS`] starts, and the driver sleeps
//! [`wait_before_retry`] between them: 15 s, doubling, at most 5 min (about 18 min in all).
//!
//! To change the retry policy, change [`max_attempts`], [`retry_delay`] or [`record_result`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::plan::{AddonEnable, AddonPlan, ManualStep, LONGHORN};

/// Starts of one addon's enable before it is given up as failed.
pub const MAX_ATTEMPTS: u32 = 3;
/// Starts of the `longhorn` step (it waits for every member's prerequisites).
pub const LONGHORN_MAX_ATTEMPTS: u32 = 8;
/// The `longhorn` step's first wait before a retry; it doubles up to [`LONGHORN_MAX_DELAY`].
pub const LONGHORN_FIRST_DELAY: Duration = Duration::from_secs(15);
pub const LONGHORN_MAX_DELAY: Duration = Duration::from_secs(5 * 60);

/// Starts of step `name` before it is given up as failed.
pub fn max_attempts(name: &str) -> u32 {
    if name == LONGHORN {
        LONGHORN_MAX_ATTEMPTS
    } else {
        MAX_ATTEMPTS
    }
}

/// How long to wait before starting step `name` again after its `attempts`-th start failed:
/// nothing for `microk8s enable`, 15 s * 2^(attempts-1) (at most 5 min) for `longhorn`.
pub fn retry_delay(name: &str, attempts: u32) -> Duration {
    if name != LONGHORN || attempts == 0 {
        return Duration::ZERO;
    }
    let doubled = LONGHORN_FIRST_DELAY.saturating_mul(1u32 << (attempts - 1).min(16));
    doubled.min(LONGHORN_MAX_DELAY)
}

/// For the driver, after [`record_result`]: how long to sleep before the next start of
/// `name` ([`retry_delay`] when it failed and will be retried, else nothing).
pub fn wait_before_retry(progress: &AddonProgress, name: &str) -> Duration {
    match progress.addons.iter().find(|r| r.enable.name == name) {
        Some(r) if r.state == AddonState::Pending && r.last_error.is_some() => {
            retry_delay(name, r.attempts)
        }
        _ => Duration::ZERO,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum AddonState {
    Pending,
    Enabling,
    Enabled,
    Failed { reason: String },
}

/// One addon's enable call and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonRecord {
    pub enable: AddonEnable,
    pub state: AddonState,
    /// How many times the enable was started.
    pub attempts: u32,
    /// The last failure, kept while the addon is retried.
    pub last_error: Option<String>,
}

/// The persisted progress: serde-serializable, written atomically by the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonProgress {
    pub addons: Vec<AddonRecord>,
    /// Steps MicroK8s cannot do (shown in status, never run by the agent).
    pub manual: Vec<ManualStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    #[error("addon {0} is not in the plan")]
    Unknown(String),
    #[error("addon {name} cannot go from {from:?} to {to}")]
    BadTransition {
        name: String,
        from: AddonState,
        to: &'static str,
    },
}

impl AddonProgress {
    pub fn new(plan: AddonPlan) -> Self {
        AddonProgress {
            addons: plan
                .enables
                .into_iter()
                .map(|enable| AddonRecord {
                    enable,
                    state: AddonState::Pending,
                    attempts: 0,
                    last_error: None,
                })
                .collect(),
            manual: plan.manual,
        }
    }

    /// Call once after loading persisted progress: an addon left `enabling` that has used all
    /// its attempts becomes `failed` (its enable kept being interrupted); others stay
    /// `enabling` and are run again.
    pub fn resume(&mut self) {
        for r in &mut self.addons {
            if r.state == AddonState::Enabling && r.attempts >= max_attempts(&r.enable.name) {
                r.state = AddonState::Failed {
                    reason: format!(
                        "enable was interrupted or failed {} times{}",
                        r.attempts,
                        r.last_error
                            .as_deref()
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default()
                    ),
                };
            }
        }
    }

    fn record_mut(&mut self, name: &str) -> Result<&mut AddonRecord, ProgressError> {
        self.addons
            .iter_mut()
            .find(|r| r.enable.name == name)
            .ok_or_else(|| ProgressError::Unknown(name.to_owned()))
    }

    /// `pending` or `enabling` (resumed) -> `enabling`, counting an attempt. Persist after this,
    /// before running the enable.
    pub fn mark_enabling(&mut self, name: &str) -> Result<(), ProgressError> {
        let r = self.record_mut(name)?;
        match r.state {
            AddonState::Pending | AddonState::Enabling => {
                r.state = AddonState::Enabling;
                r.attempts += 1;
                Ok(())
            }
            _ => Err(ProgressError::BadTransition {
                name: name.to_owned(),
                from: r.state.clone(),
                to: "enabling",
            }),
        }
    }

    /// True when no addon is left to run (all enabled or failed).
    pub fn is_finished(&self) -> bool {
        next_addon_to_enable(self).is_none()
    }

    pub fn state_of(&self, name: &str) -> Option<&AddonState> {
        self.addons
            .iter()
            .find(|r| r.enable.name == name)
            .map(|r| &r.state)
    }

    /// One line per addon and manual step, for status (`sd_notify STATUS=`, the status API).
    pub fn status_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .addons
            .iter()
            .map(|r| {
                let n = &r.enable.name;
                match &r.state {
                    AddonState::Pending => match &r.last_error {
                        Some(e) => format!(
                            "{n}: pending (attempt {} of {} failed: {e})",
                            r.attempts,
                            max_attempts(n)
                        ),
                        None => format!("{n}: pending"),
                    },
                    AddonState::Enabling => format!("{n}: enabling"),
                    AddonState::Enabled => format!("{n}: enabled"),
                    AddonState::Failed { reason } => format!("{n}: failed: {reason}"),
                }
            })
            .collect();
        for m in &self.manual {
            lines.push(format!(
                "{}: manual step{}: {}",
                m.name,
                if m.needs_internet {
                    " (needs internet)"
                } else {
                    ""
                },
                m.commands.join(" && ")
            ));
        }
        lines
    }
}

/// The addon to run next: one left `enabling` by a crash first, then the first `pending` one,
/// in plan order. `None` when every addon is enabled or failed.
pub fn next_addon_to_enable(progress: &AddonProgress) -> Option<&AddonEnable> {
    progress
        .addons
        .iter()
        .find(|r| r.state == AddonState::Enabling)
        .or_else(|| {
            progress
                .addons
                .iter()
                .find(|r| r.state == AddonState::Pending)
        })
        .map(|r| &r.enable)
}

/// Records how `microk8s enable <name>` ended. `Ok` -> `enabled`. `Err(reason)` -> back to
/// `pending` for another attempt, or `failed` once [`max_attempts`] starts are used up.
/// Only an `enabling` addon accepts a result.
pub fn record_result(
    progress: &mut AddonProgress,
    name: &str,
    result: Result<(), String>,
) -> Result<(), ProgressError> {
    let r = progress.record_mut(name)?;
    if r.state != AddonState::Enabling {
        return Err(ProgressError::BadTransition {
            name: name.to_owned(),
            from: r.state.clone(),
            to: if result.is_ok() { "enabled" } else { "failed" },
        });
    }
    match result {
        Ok(()) => {
            r.state = AddonState::Enabled;
            r.last_error = None;
        }
        Err(reason) if r.attempts >= max_attempts(name) => {
            r.state = AddonState::Failed {
                reason: format!("{reason} (after {} attempts)", r.attempts),
            };
            r.last_error = Some(reason);
        }
        Err(reason) => {
            r.state = AddonState::Pending;
            r.last_error = Some(reason);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> AddonPlan {
        AddonPlan {
            enables: vec![
                AddonEnable {
                    name: "dns".into(),
                    args: vec![],
                },
                AddonEnable {
                    name: "metallb".into(),
                    args: vec!["10.0.0.250-10.0.0.254".into()],
                },
                AddonEnable {
                    name: "mayastor".into(),
                    args: vec!["--default-pool-size".into(), "20G".into()],
                },
            ],
            manual: vec![],
        }
    }

    fn step(p: &mut AddonProgress, result: Result<(), String>) -> String {
        let name = next_addon_to_enable(p).unwrap().name.clone();
        p.mark_enabling(&name).unwrap();
        record_result(p, &name, result).unwrap();
        name
    }

    #[test]
    fn runs_in_plan_order_and_finishes() {
        let mut p = AddonProgress::new(plan());
        assert_eq!(step(&mut p, Ok(())), "dns");
        assert_eq!(step(&mut p, Ok(())), "metallb");
        assert_eq!(step(&mut p, Ok(())), "mayastor");
        assert!(p.is_finished());
        assert!(p.addons.iter().all(|r| r.state == AddonState::Enabled));
    }

    #[test]
    fn crash_mid_enable_resumes_that_addon_after_a_serde_round_trip() {
        let mut p = AddonProgress::new(plan());
        step(&mut p, Ok(()));
        p.mark_enabling("metallb").unwrap();
        // Crash here: the driver had persisted the progress.
        let saved = serde_json::to_string(&p).unwrap();
        let mut back: AddonProgress = serde_json::from_str(&saved).unwrap();
        back.resume();
        assert_eq!(back, p);
        assert_eq!(next_addon_to_enable(&back).unwrap().name, "metallb");
        back.mark_enabling("metallb").unwrap();
        record_result(&mut back, "metallb", Ok(())).unwrap();
        assert_eq!(back.addons[1].attempts, 2);
        assert_eq!(back.state_of("metallb"), Some(&AddonState::Enabled));
    }

    #[test]
    fn an_enabling_addon_comes_before_earlier_pending_ones() {
        let mut p = AddonProgress::new(plan());
        p.mark_enabling("mayastor").unwrap();
        assert_eq!(next_addon_to_enable(&p).unwrap().name, "mayastor");
    }

    #[test]
    fn failures_retry_then_fail_with_reason_and_others_continue() {
        let mut p = AddonProgress::new(plan());
        for attempt in 1..=MAX_ATTEMPTS {
            assert_eq!(step(&mut p, Err(format!("boom {attempt}"))), "dns");
        }
        match p.state_of("dns").unwrap() {
            AddonState::Failed { reason } => assert!(reason.contains("boom 3"), "{reason}"),
            s => panic!("expected failed, got {s:?}"),
        }
        assert_eq!(step(&mut p, Ok(())), "metallb");
        assert!(p.status_lines()[0].starts_with("dns: failed: boom 3"));
        assert_eq!(p.status_lines()[1], "metallb: enabled");
        assert_eq!(p.status_lines()[2], "mayastor: pending");
    }

    #[test]
    fn a_crash_loop_ends_failed() {
        let mut p = AddonProgress::new(plan());
        for _ in 0..MAX_ATTEMPTS {
            p.resume();
            let name = next_addon_to_enable(&p).unwrap().name.clone();
            assert_eq!(name, "dns");
            p.mark_enabling(&name).unwrap(); // and the agent dies
        }
        p.resume();
        assert!(matches!(p.state_of("dns"), Some(AddonState::Failed { .. })));
        assert_eq!(next_addon_to_enable(&p).unwrap().name, "metallb");
    }

    #[test]
    fn only_longhorn_retries_are_spaced_and_it_gets_more_starts() {
        assert_eq!(retry_delay("dns", 1), Duration::ZERO);
        let delays: Vec<u64> = (1..LONGHORN_MAX_ATTEMPTS)
            .map(|a| retry_delay(LONGHORN, a).as_secs())
            .collect();
        assert_eq!(delays, [15, 30, 60, 120, 240, 300, 300]);
        assert_eq!(retry_delay(LONGHORN, 40), LONGHORN_MAX_DELAY);
        let mut p = AddonProgress::new(AddonPlan {
            enables: vec![AddonEnable {
                name: LONGHORN.into(),
                args: vec![],
            }],
            manual: vec![],
        });
        assert_eq!(wait_before_retry(&p, LONGHORN), Duration::ZERO);
        for attempt in 1..LONGHORN_MAX_ATTEMPTS {
            step(&mut p, Err("waiting: node-b".into()));
            assert_eq!(p.state_of(LONGHORN), Some(&AddonState::Pending));
            assert_eq!(
                wait_before_retry(&p, LONGHORN),
                retry_delay(LONGHORN, attempt)
            );
        }
        assert!(p.status_lines()[0].contains("attempt 7 of 8 failed: waiting: node-b"));
        step(&mut p, Err("waiting: node-b".into()));
        assert!(matches!(
            p.state_of(LONGHORN),
            Some(AddonState::Failed { .. })
        ));
        assert_eq!(wait_before_retry(&p, LONGHORN), Duration::ZERO);
    }

    #[test]
    fn transitions_are_checked() {
        let mut p = AddonProgress::new(plan());
        assert!(matches!(
            record_result(&mut p, "dns", Ok(())),
            Err(ProgressError::BadTransition { .. })
        ));
        step(&mut p, Ok(()));
        assert!(p.mark_enabling("dns").is_err());
        assert!(matches!(
            p.mark_enabling("nope"),
            Err(ProgressError::Unknown(_))
        ));
    }

    #[test]
    fn state_serializes_with_a_tag() {
        let s = serde_json::to_string(&AddonState::Failed {
            reason: "no internet".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"state":"failed","reason":"no internet"}"#);
        assert_eq!(
            serde_json::to_string(&AddonState::Pending).unwrap(),
            r#"{"state":"pending"}"#
        );
    }
}
