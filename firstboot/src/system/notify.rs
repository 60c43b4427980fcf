//! systemd readiness and status notifications (`sd_notify`): `READY=1` once the agent runs,
//! `STATUS=<phase line>` on every phase change, `STOPPING=1` on shutdown. Outside systemd
//! (no `NOTIFY_SOCKET`) the real implementation does nothing. Tests use `RecordingNotifier`.

pub trait Notifier: Send + Sync {
    fn ready(&self);
    fn status(&self, line: &str);
    fn stopping(&self);
}

/// Talks to systemd through `$NOTIFY_SOCKET`.
#[derive(Debug, Default, Clone)]
pub struct SystemdNotifier;

impl Notifier for SystemdNotifier {
    fn ready(&self) {
        send(&[sd_notify::NotifyState::Ready]);
    }
    fn status(&self, line: &str) {
        send(&[sd_notify::NotifyState::Status(line)]);
    }
    fn stopping(&self) {
        send(&[sd_notify::NotifyState::Stopping]);
    }
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Keeps every notification, for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default, Clone)]
pub struct RecordingNotifier {
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[cfg(any(test, feature = "testing"))]
impl Notifier for RecordingNotifier {
    fn ready(&self) {
        self.lines.lock().unwrap().push("READY=1".into());
    }
    fn status(&self, line: &str) {
        self.lines.lock().unwrap().push(format!("STATUS={line}"));
    }
    fn stopping(&self) {
        self.lines.lock().unwrap().push("STOPPING=1".into());
    }
}
