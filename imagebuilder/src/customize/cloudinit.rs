//! The cloud-init NoCloud seed: `user-data` (users, SSH keys, `preserve_hostname: true` so
//! cloud-init does not undo the hostname `firstboot` sets), `meta-data` (`instance-id`) and
//! `network-config` (netplan v2: wired DHCP or per-MAC static addresses from the inventory,
//! plus Wi-Fi with the PSK read from the configured file at build time).
//!
//! Raspberry Pi images carry the seed on `system-boot` (Ubuntu's `fs_label: system-boot`);
//! x86 images carry it in `/var/lib/cloud/seed/nocloud/`. To add a cloud-config key, add it to
//! [`user_data`] and keep `cloud-init schema` passing in the image tests.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rackseed_config::{Addressing, ClusterConfig};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The three seed files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    /// Wired networking only: on a Raspberry Pi this file sits on the FAT boot partition,
    /// which Ubuntu mounts readable by every user, so it never holds the Wi-Fi PSK.
    pub network_config: String,
    /// The Wi-Fi netplan file ([`WIFI_NETPLAN_PATH`], mode 0600 in the root filesystem), when
    /// Wi-Fi is configured: the only place the PSK is written.
    pub wifi_netplan: Option<String>,
}

/// Where the Wi-Fi settings go: a netplan file of the root filesystem, 0600 (netplan itself
/// warns about PSKs in files others can read). netplan merges it with cloud-init's
/// `50-cloud-init.yaml` made from `network-config`.
pub const WIFI_NETPLAN_PATH: &str = "/etc/netplan/60-rackseed-wifi.yaml";

/// Reads a Wi-Fi PSK file: one line, 8-63 printable ASCII characters or 64 hex digits.
pub fn read_psk(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the Wi-Fi PSK file {}", path.display()))?;
    let psk = raw.trim_end_matches(['\n', '\r']);
    let ok_pass = (8..=63).contains(&psk.len()) && psk.chars().all(|c| (' '..='~').contains(&c));
    let ok_hex = psk.len() == 64 && psk.chars().all(|c| c.is_ascii_hexdigit());
    if psk.contains('\n') || !(ok_pass || ok_hex) {
        bail!(
            "Wi-Fi PSK in {} must be one line of 8-63 printable ASCII characters or 64 hex digits",
            path.display()
        );
    }
    Ok(psk.to_string())
}

fn yaml(v: &Value) -> Result<String> {
    Ok(serde_yaml::to_string(v)?)
}

/// `user-data` (`#cloud-config`).
pub fn user_data(config: &ClusterConfig) -> Result<String> {
    let users: Vec<Value> = config
        .image
        .users
        .iter()
        .map(|u| {
            let mut m = Map::new();
            m.insert("name".into(), json!(u.name));
            m.insert("shell".into(), json!("/bin/bash"));
            m.insert("lock_passwd".into(), json!(true));
            m.insert("ssh_authorized_keys".into(), json!(u.ssh_keys));
            if u.sudo {
                m.insert("sudo".into(), json!("ALL=(ALL) NOPASSWD:ALL"));
                m.insert("groups".into(), json!("sudo"));
            }
            Value::Object(m)
        })
        .collect();
    let mut doc = json!({
        "preserve_hostname": true,
        "ssh_pwauth": false,
        "growpart": {"mode": "auto", "devices": ["/"]},
    });
    // No configured users: leave `users` out, which keeps the image's default user (cloud-init
    // rejects an empty list).
    if !users.is_empty() {
        doc["users"] = Value::Array(users);
    }
    Ok(format!("#cloud-config\n{}", yaml(&doc)?))
}

/// Whether `name` is a wireless interface: the kernel's `wlan*` or systemd's predictable `wl*`
/// names (`wlp2s0`), the `wl` prefix systemd's naming scheme gives WLAN devices.
pub fn is_wireless(name: &str) -> bool {
    name.starts_with("wl")
}

/// The Wi-Fi interface the Wi-Fi file configures: `network.interface` when it is wireless,
/// else `wlan0` (the Raspberry Pi's).
fn wifi_interface(config: &ClusterConfig) -> String {
    match &config.network.interface {
        Some(i) if is_wireless(i) => i.clone(),
        _ => "wlan0".to_owned(),
    }
}

/// Static addressing over Wi-Fi (a wireless `network.interface`, Wi-Fi configured) cannot be
/// written into one image: the inventory's addresses are per MAC, and netplan's networkd
/// backend matches Wi-Fi devices by interface name only (`netplan generate`: "networkd backend
/// does not support wifi with match:, only by interface name").
fn refuse_static_over_wifi(config: &ClusterConfig) -> Result<()> {
    let net = &config.network;
    if matches!(net.addressing, Addressing::Static { .. })
        && net.wifi.is_some()
        && net.interface.as_deref().is_some_and(is_wireless)
    {
        bail!(
            "network.addressing = \"static\" over Wi-Fi (interface {:?}) is not supported: netplan \
             matches Wi-Fi devices by name only, so per-machine addresses cannot go into one image; \
             use DHCP with address reservations on the router, or a wired interface",
            net.interface.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

/// One node's static netplan entry, matched by its MAC.
fn static_entries(config: &ClusterConfig) -> Result<Vec<(String, Map<String, Value>)>> {
    let Addressing::Static { gateway, dns } = &config.network.addressing else {
        return Ok(Vec::new());
    };
    let dns: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
    let mut out = Vec::new();
    for n in &config.nodes {
        let Some(addr) = n.address else {
            bail!(
                "node {} has no address but network.addressing is static",
                n.hostname
            );
        };
        let Value::Object(entry) = json!({
            "match": {"macaddress": n.mac.to_string()},
            "addresses": [addr.to_string()],
            "routes": [{"to": "default", "via": gateway.to_string()}],
            "nameservers": {"addresses": dns},
            "optional": true,
        }) else {
            unreachable!("a JSON object literal");
        };
        out.push((n.hostname.clone(), entry));
    }
    Ok(out)
}

/// `network-config` (netplan v2): the wired interfaces; Wi-Fi is in [`wifi_netplan`]. A
/// wireless `network.interface` never goes under `ethernets` (netplan would configure it twice,
/// as an ethernet and as a Wi-Fi device): wired DHCP then covers the wired `e*` interfaces.
pub fn network_config(config: &ClusterConfig) -> Result<String> {
    let net = &config.network;
    let mut ethernets = Map::new();
    match &net.addressing {
        Addressing::Dhcp => {
            let matcher = match &net.interface {
                Some(i) if !is_wireless(i) => json!({"name": i}),
                _ => json!({"name": "e*"}),
            };
            ethernets.insert(
                "wired".into(),
                json!({"match": matcher, "dhcp4": true, "dhcp6": true, "optional": true}),
            );
        }
        Addressing::Static { .. } => {
            refuse_static_over_wifi(config)?;
            for (name, entry) in static_entries(config)? {
                ethernets.insert(name, Value::Object(entry));
            }
        }
    }
    let mut network = Map::new();
    network.insert("version".into(), json!(2));
    if !ethernets.is_empty() {
        network.insert("ethernets".into(), Value::Object(ethernets));
    }
    yaml(&json!({"network": network}))
}

/// The Wi-Fi netplan file (v2) when Wi-Fi is configured; `psk` is its PSK: DHCP on the Wi-Fi
/// interface (`network.interface` when wireless, else `wlan0`).
pub fn wifi_netplan(config: &ClusterConfig, psk: Option<&str>) -> Result<Option<String>> {
    let Some(w) = &config.network.wifi else {
        return Ok(None);
    };
    let psk = psk.context("Wi-Fi is configured but no PSK was read")?;
    let mut aps = Map::new();
    aps.insert(w.ssid.clone(), json!({"password": psk}));
    refuse_static_over_wifi(config)?;
    let mut wifis = Map::new();
    wifis.insert(
        wifi_interface(config),
        json!({"dhcp4": true, "optional": true, "regulatory-domain": w.country, "access-points": aps}),
    );
    yaml(&json!({"network": {"version": 2, "wifis": wifis}})).map(Some)
}

/// All three files; the instance id changes whenever the seed's content changes, so cloud-init
/// applies a changed seed on a re-flashed machine.
pub fn seed(config: &ClusterConfig, psk: Option<&str>) -> Result<Seed> {
    let user_data = user_data(config)?;
    let network_config = network_config(config)?;
    let wifi_netplan = wifi_netplan(config, psk)?;
    let mut h = Sha256::new();
    h.update(user_data.as_bytes());
    h.update(network_config.as_bytes());
    let id = hex::encode(h.finalize());
    let meta_data = format!(
        "instance-id: rackseed-{}-{}\n",
        config.cluster.name,
        &id[..12]
    );
    Ok(Seed {
        user_data,
        meta_data,
        network_config,
        wifi_netplan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ClusterConfig {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[image]\ntarget = \"rpi4\"\n\
             base = {{ kind = \"local\", path = \"b.img\" }}\n{extra}"
        );
        rackseed_config::parse(&text, Path::new("/cfg/lab.toml"))
            .unwrap_or_else(|e| panic!("{e:?}"))
            .config
    }

    /// One systemd-networkd `.network` file netplan generated: its name and its `[Match]`.
    #[derive(Debug)]
    struct NetworkFile {
        file: String,
        names: Vec<String>,
        macs: Vec<String>,
    }

    /// What netplan itself makes of the files (Debian package netplan.io): both files
    /// together, as cloud-init leaves them on the node. Fails the test when `netplan generate
    /// --root-dir` refuses them; returns the networkd files it wrote.
    fn netplan_generate(files: &[(&str, &str)]) -> Vec<NetworkFile> {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc/netplan");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let out = rackseed_host::command::Cmd::new("netplan", std::time::Duration::from_secs(60))
            .args(["generate", "--root-dir"])
            .arg(root.path())
            .output_blocking()
            .expect("netplan is installed (scripts/install-deps: netplan.io)");
        assert_eq!(
            out.code(),
            Some(0),
            "netplan generate: {}\n{files:#?}",
            out.stderr
        );
        let mut found = Vec::new();
        let net = root.path().join("run/systemd/network");
        for e in std::fs::read_dir(&net).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_none_or(|x| x != "network") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut f = NetworkFile {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                names: vec![],
                macs: vec![],
            };
            let mut section = "";
            for line in text.lines().map(str::trim) {
                if line.starts_with('[') {
                    section = line;
                } else if section == "[Match]" {
                    if let Some(v) = line.strip_prefix("Name=") {
                        f.names.extend(v.split_whitespace().map(str::to_owned));
                    } else if let Some(v) = line
                        .strip_prefix("MACAddress=")
                        .or_else(|| line.strip_prefix("PermanentMACAddress="))
                    {
                        f.macs.extend(v.split_whitespace().map(str::to_owned));
                    }
                }
            }
            found.push(f);
        }
        found.sort_by(|a, b| a.file.cmp(&b.file));
        found
    }

    /// systemd's `Name=` globs (`*`, `?`), enough for what netplan writes.
    fn glob(pattern: &str, name: &str) -> bool {
        match (pattern.chars().next(), name.chars().next()) {
            (None, None) => true,
            (Some('*'), _) => {
                glob(&pattern[1..], name)
                    || name
                        .chars()
                        .next()
                        .is_some_and(|c| glob(pattern, &name[c.len_utf8()..]))
            }
            (Some('?'), Some(c)) => glob(&pattern[1..], &name[c.len_utf8()..]),
            (Some(p), Some(c)) if p == c => glob(&pattern[1..], &name[c.len_utf8()..]),
            _ => false,
        }
    }

    /// Interface names a machine of the examples has: wired (kernel and predictable names)
    /// and wireless.
    const NAMES: &[&str] = &["eth0", "end0", "enp1s0", "eno1", "wlan0", "wlp2s0"];

    /// netplan accepted the files and configures no interface twice: each interface name, and
    /// each inventory MAC, is matched by at most one networkd file (networkd would apply only
    /// the first, silently), and the Wi-Fi interface by the Wi-Fi file's entry only.
    fn check_network(cfg: &ClusterConfig, seed: &Seed, what: &str) {
        let mut files = vec![("50-cloud-init.yaml", seed.network_config.as_str())];
        if let Some(w) = &seed.wifi_netplan {
            files.push(("60-rackseed-wifi.yaml", w.as_str()));
        }
        let generated = netplan_generate(&files);
        let mut names: Vec<&str> = NAMES.to_vec();
        if let Some(i) = &cfg.network.interface {
            names.push(i);
        }
        for name in names {
            let by_name: Vec<&str> = generated
                .iter()
                .filter(|f| f.names.iter().any(|p| glob(p, name)))
                .map(|f| f.file.as_str())
                .collect();
            assert!(
                by_name.len() <= 1,
                "{what}: {name} is configured by {by_name:?}:\n{}\n{:?}",
                seed.network_config,
                seed.wifi_netplan.as_deref().map(|_| "(wifi file)")
            );
            // A wireless name is never configured as an ethernet, and a wired one never as Wi-Fi.
            let from_wifi = seed.wifi_netplan.is_some()
                && by_name
                    .first()
                    .is_some_and(|f| *f == format!("10-netplan-{name}.network"))
                && !seed.network_config.contains(&format!("{name}:"));
            if is_wireless(name) && !by_name.is_empty() {
                assert!(
                    from_wifi,
                    "{what}: wireless {name} configured by {by_name:?}"
                );
            }
        }
        for n in &cfg.nodes {
            let mac = n.mac.to_string();
            let by_mac: Vec<&str> = generated
                .iter()
                .filter(|f| f.macs.iter().any(|m| m.eq_ignore_ascii_case(&mac)))
                .map(|f| f.file.as_str())
                .collect();
            assert!(
                by_mac.len() <= 1,
                "{what}: {mac} is configured by {by_mac:?}"
            );
        }
    }

    #[test]
    fn every_example_config_gives_files_netplan_accepts_with_no_interface_twice() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut checked = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let cfg = rackseed_config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .config;
            let psk = cfg.network.wifi.as_ref().map(|_| "correct horse battery");
            let seed = seed(&cfg, psk).unwrap();
            check_network(&cfg, &seed, &path.display().to_string());
            checked += 1;
        }
        assert!(
            checked >= 4,
            "only {checked} example configs in {}",
            dir.display()
        );
    }

    #[test]
    fn every_addressing_mode_with_and_without_wifi_gives_files_netplan_accepts() {
        let nodes = |with_address: bool| {
            let mut t = String::new();
            for i in 1..=2 {
                t.push_str(&format!(
                    "[[nodes]]\nmac = \"dc:a6:32:00:00:0{i}\"\nhostname = \"n{i}\"\n"
                ));
                if with_address {
                    t.push_str(&format!("address = \"192.168.1.1{i}/24\"\n"));
                }
            }
            t
        };
        let wifi =
            "[network.wifi]\nssid = \"homelab\"\npsk-file = \"/cfg/w.psk\"\ncountry = \"GB\"\n";
        let mut checked = 0;
        for addressing in [
            "addressing = \"dhcp\"\n",
            "addressing = \"static\"\ngateway = \"192.168.1.1\"\n",
        ] {
            for interface in [
                "",
                "interface = \"eth0\"\n",
                "interface = \"wlan0\"\n",
                "interface = \"wlp2s0\"\n",
            ] {
                for with_wifi in [false, true] {
                    let extra = format!(
                        "[network]\n{interface}{addressing}{}\n{}",
                        if with_wifi { wifi } else { "" },
                        nodes(addressing.contains("static"))
                    );
                    let cfg = config(&extra);
                    let made = seed(&cfg, with_wifi.then_some("correct horse battery"));
                    if with_wifi && addressing.contains("static") && interface.contains("\"wl") {
                        let e = made.unwrap_err().to_string();
                        assert!(e.contains("over Wi-Fi") && e.contains("DHCP"), "{e}");
                    } else {
                        check_network(&cfg, &made.unwrap(), &extra);
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 16);
    }

    #[test]
    fn a_wireless_interface_is_never_an_ethernet() {
        let cfg = config(
            "[network]\ninterface = \"wlan0\"\naddressing = \"dhcp\"\n\
             [network.wifi]\nssid = \"homelab\"\npsk-file = \"/cfg/w.psk\"\ncountry = \"GB\"\n",
        );
        let seed = seed(&cfg, Some("correct horse battery")).unwrap();
        let generated = netplan_generate(&[
            ("50-cloud-init.yaml", &seed.network_config),
            (
                "60-rackseed-wifi.yaml",
                seed.wifi_netplan.as_deref().unwrap(),
            ),
        ]);
        let wlan: Vec<&NetworkFile> = generated
            .iter()
            .filter(|f| f.names.iter().any(|p| glob(p, "wlan0")))
            .collect();
        assert_eq!(wlan.len(), 1, "{generated:?}");
        assert_eq!(wlan[0].file, "10-netplan-wlan0.network");
        assert!(generated
            .iter()
            .any(|f| f.names.iter().any(|p| glob(p, "eth0"))));
        assert!(glob("e*", "enp1s0") && !glob("e*", "wlan0") && glob("wl?n0", "wlan0"));
    }

    #[test]
    fn the_psk_is_only_in_the_wifi_file_and_netplan_accepts_both() {
        let cfg = config(
            "[network.wifi]\nssid = \"homelab\"\npsk-file = \"/cfg/w.psk\"\ncountry = \"GB\"\n",
        );
        let psk = "correct horse battery";
        let seed = seed(&cfg, Some(psk)).unwrap();
        assert!(
            !seed.network_config.contains(psk),
            "{}",
            seed.network_config
        );
        assert!(!seed.user_data.contains(psk) && !seed.meta_data.contains(psk));
        let wifi = seed.wifi_netplan.expect("wifi file");
        assert!(wifi.contains("homelab") && wifi.contains(psk), "{wifi}");
        netplan_generate(&[
            ("50-cloud-init.yaml", &seed.network_config),
            ("60-rackseed-wifi.yaml", &wifi),
        ]);
        // Without Wi-Fi there is no such file, and the wired config stands alone.
        let wired = seed_without_wifi();
        assert!(wired.wifi_netplan.is_none());
        netplan_generate(&[("50-cloud-init.yaml", &wired.network_config)]);
    }

    fn seed_without_wifi() -> Seed {
        seed(&config(""), None).unwrap()
    }
}
