//! Setting the machine's hostname: through systemd-hostnamed (`org.freedesktop.hostname1`) over
//! D-Bus with zbus, and, when there is no system bus or no hostnamed, with the `hostname`
//! command plus `/etc/hostname`. cloud-init must be told `preserve_hostname: true` (the image
//! builder does) or it would revert the name on the next boot.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use rackseed_host::command::Cmd;

#[zbus::proxy(
    interface = "org.freedesktop.hostname1",
    default_service = "org.freedesktop.hostname1",
    default_path = "/org/freedesktop/hostname1"
)]
trait Hostname1 {
    fn set_static_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
    fn set_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
    #[zbus(property)]
    fn static_hostname(&self) -> zbus::Result<String>;
}

pub trait HostnameSetter: Send + Sync {
    /// Sets the static and transient hostname. Returns how it was done, for the log.
    fn set(&self, name: &str) -> impl std::future::Future<Output = Result<&'static str>> + Send;
}

/// hostname1 over D-Bus, falling back to the `hostname` command and `/etc/hostname`.
#[derive(Debug, Clone)]
pub struct SystemHostname {
    pub etc_hostname: PathBuf,
}

impl Default for SystemHostname {
    fn default() -> Self {
        SystemHostname {
            etc_hostname: PathBuf::from("/etc/hostname"),
        }
    }
}

impl SystemHostname {
    async fn via_dbus(name: &str) -> zbus::Result<()> {
        let conn = zbus::Connection::system().await?;
        let proxy = Hostname1Proxy::new(&conn).await?;
        proxy.set_static_hostname(name, false).await?;
        proxy.set_hostname(name, false).await
    }
}

impl HostnameSetter for SystemHostname {
    async fn set(&self, name: &str) -> Result<&'static str> {
        match tokio::time::timeout(Duration::from_secs(10), Self::via_dbus(name)).await {
            Ok(Ok(())) => return Ok("hostname1 over D-Bus"),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "hostname1 unavailable, using the hostname command")
            }
            Err(_) => {
                tracing::info!("hostname1 did not answer in 10 s, using the hostname command")
            }
        }
        rackseed_host::fs::write_atomic(&self.etc_hostname, format!("{name}\n").as_bytes(), 0o644)?;
        Cmd::new("hostname", Duration::from_secs(10))
            .arg(name)
            .run()
            .await
            .context("setting the transient hostname")?;
        Ok("hostname command")
    }
}

/// Remembers the names it was asked to set, for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default, Clone)]
pub struct RecordingHostname {
    pub names: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[cfg(any(test, feature = "testing"))]
impl HostnameSetter for RecordingHostname {
    async fn set(&self, name: &str) -> Result<&'static str> {
        self.names.lock().unwrap().push(name.to_owned());
        Ok("recorded")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn falls_back_to_etc_hostname_without_dbus() {
        // No system bus in this test: point D-Bus at a socket that does not exist.
        // (The process-wide variable is only read by zbus when connecting.)
        let dir = tempfile::tempdir().unwrap();
        let setter = SystemHostname {
            etc_hostname: dir.path().join("hostname"),
        };
        // Setting the transient hostname needs CAP_SYS_ADMIN in the UTS namespace; as root we
        // set it to its current value so the test changes nothing on the machine.
        let current = nix::unistd::gethostname().unwrap().into_string().unwrap();
        std::env::set_var(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}/no-bus", dir.path().display()),
        );
        let how = setter.set(&current).await.unwrap();
        assert_eq!(how, "hostname command");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("hostname")).unwrap(),
            format!("{current}\n")
        );
    }
}
