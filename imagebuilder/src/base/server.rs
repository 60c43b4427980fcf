//! What makes a bootstrapped tree behave like Ubuntu Server on first boot, beyond its packages
//! ([`super::bootstrap::default_packages`]), applied to the tree after debootstrap with the
//! build machine's own tools (no emulation):
//!
//! - **wired DHCP by default**: [`WIRED_DHCP_PATH`], a systemd-networkd file matching wired
//!   interfaces (`en*`, `eth*`). networkd uses the first file in lexical order that matches a
//!   link, across `/etc`, `/run` and `/usr/lib/systemd/network` (systemd.network(5)); netplan
//!   writes cloud-init's network-config as `/run/systemd/network/10-netplan-*.network`, which
//!   sorts first, so a seed's network-config wins and this file only serves machines without one.
//! - **the units enabled** ([`ENABLED_UNITS`]): systemd-networkd and systemd-resolved
//!   (Debian's systemd leaves networkd disabled; netplan's generator writes networkd files but
//!   does not enable it), with `systemctl --root` so their own `[Install]` sections decide the
//!   links.
//! - **resolv.conf** points at resolved's stub (`/run/systemd/resolve/stub-resolv.conf`), as on
//!   Ubuntu Server, so DNS servers from DHCP or network-config reach every program.
//!
//! Made on each machine's first boot, never in the image: the machine id (`/etc/machine-id`
//! empty, [`crate::customize`]), the SSH host keys (removed here and by `customize`; cloud-init's
//! `ssh` module or `rackseed-ssh-hostkeys.service` make them). The root partition and filesystem
//! are grown by cloud-init's `growpart` and `resizefs` modules (Debian's `/etc/cloud/cloud.cfg`
//! runs both in its init stage; `user-data` asks for `growpart: {mode: auto, devices: [/]}`).
//! Each item is checked on a built image by `imagebuilder/tests/image_bootstrap_server.rs`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::tool::Tool;

/// The fallback wired DHCP network file (in the tree).
pub const WIRED_DHCP_PATH: &str = "etc/systemd/network/90-rackseed-wired-dhcp.network";

/// Its content: DHCP (v4 and v6) on every wired interface; not required for
/// `network-online.target`, like netplan's `optional: true` in rackseed's network-config, so a
/// machine with an unplugged second port does not wait at boot.
pub const WIRED_DHCP: &str = "\
# rackseed: DHCP on wired interfaces when nothing else configures them (Ubuntu Server's
# default). cloud-init's network-config, written by netplan as 10-netplan-*.network, sorts
# first and wins.
[Match]
Name=en* eth*
Type=ether

[Link]
RequiredForOnline=no

[Network]
DHCP=yes
";

/// Units enabled in the tree.
pub const ENABLED_UNITS: &[&str] = &["systemd-networkd.service", "systemd-resolved.service"];

/// Where `/etc/resolv.conf` points.
pub const RESOLV_CONF_TARGET: &str = "../run/systemd/resolve/stub-resolv.conf";

/// Applies the defaults to the bootstrapped tree at `root`.
pub async fn apply(root: &Path) -> Result<()> {
    let net = root.join(WIRED_DHCP_PATH);
    std::fs::create_dir_all(net.parent().expect("has a parent"))?;
    std::fs::write(&net, WIRED_DHCP).with_context(|| format!("writing {}", net.display()))?;
    Tool::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .arg("enable")
        .args(ENABLED_UNITS)
        .timeout(Duration::from_secs(120))
        .run()
        .await
        .context("enabling systemd-networkd and systemd-resolved in the bootstrapped tree")?;
    let resolv = root.join("etc/resolv.conf");
    match std::fs::symlink_metadata(&resolv) {
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => std::fs::remove_file(&resolv)
            .with_context(|| format!("removing {}", resolv.display()))?,
        Err(_) => {}
    }
    if std::fs::symlink_metadata(&resolv).is_err() {
        std::os::unix::fs::symlink(RESOLV_CONF_TARGET, &resolv)
            .with_context(|| format!("linking {}", resolv.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree with the two units laid out as Debian's systemd packages install them.
    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let units = d.path().join("usr/lib/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::create_dir_all(d.path().join("etc/systemd/system")).unwrap();
        std::fs::write(
            units.join("systemd-networkd.service"),
            "[Unit]\nDescription=n\n[Service]\nExecStart=/bin/true\n\
             [Install]\nWantedBy=multi-user.target\nAlso=systemd-networkd.socket\n",
        )
        .unwrap();
        std::fs::write(
            units.join("systemd-networkd.socket"),
            "[Socket]\nListenNetlink=route 1361\n[Install]\nWantedBy=sockets.target\n",
        )
        .unwrap();
        std::fs::write(
            units.join("systemd-resolved.service"),
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n\
             Alias=dbus-org.freedesktop.resolve1.service\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/resolv.conf"), "nameserver 10.0.2.3\n").unwrap();
        d
    }

    #[tokio::test]
    async fn apply_enables_networkd_and_resolved_and_writes_the_fallback() {
        let d = tree();
        apply(d.path()).await.unwrap();
        let wants = d.path().join("etc/systemd/system/multi-user.target.wants");
        for u in ENABLED_UNITS {
            assert!(
                wants.join(u).symlink_metadata().is_ok(),
                "{u} not enabled: {:?}",
                std::fs::read_dir(&wants).map(|r| r.count())
            );
        }
        assert!(d
            .path()
            .join("etc/systemd/system/sockets.target.wants/systemd-networkd.socket")
            .symlink_metadata()
            .is_ok());
        assert_eq!(
            std::fs::read_to_string(d.path().join(WIRED_DHCP_PATH)).unwrap(),
            WIRED_DHCP
        );
        assert_eq!(
            std::fs::read_link(d.path().join("etc/resolv.conf")).unwrap(),
            Path::new(RESOLV_CONF_TARGET)
        );
        // Applying twice changes nothing and does not fail.
        apply(d.path()).await.unwrap();
    }

    #[test]
    fn the_fallback_matches_wired_names_only_and_sorts_after_netplans_files() {
        let m: Vec<&str> = WIRED_DHCP
            .lines()
            .find_map(|l| l.strip_prefix("Name="))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(m, ["en*", "eth*"]);
        let name = Path::new(WIRED_DHCP_PATH).file_name().unwrap();
        assert!(name.to_str().unwrap() > "10-netplan-wired.network");
    }
}
