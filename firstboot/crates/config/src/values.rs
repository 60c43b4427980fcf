//! Parsers and checks for single config values: sizes, durations, hostnames, MACs, MetalLB
//! address blocks, snap channels, SSH keys, hostname patterns.
//!
//! Every function here is pure and returns `Err(message)` where the message says what was
//! expected; the loader attaches file, line, column and field path. To support a new value
//! shape, add a function here with unit tests, then call it from the loader.

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{AddressBlock, MacAddr};

/// Parses a disk size such as `"8GiB"`, `"512MiB"`, `"8G"` (binary) or `"8GB"` (decimal).
/// A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a size like \"8GiB\" or \"512MiB\", got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(expected());
    }
    let n: u64 = num.parse().map_err(|_| expected())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(expected()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration such as `"10m"`, `"90s"` or `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("expected a duration like \"10m\", \"90s\" or \"1h30m\", got {s:?}"))
}

/// Checks a lowercase RFC 1123 label (hostnames, the cluster name): 1 to 63 of `a-z`, `0-9`
/// and `-`, neither starting nor ending with `-`. MicroK8s rejects capitals and `_`.
pub fn check_label(s: &str) -> Result<(), String> {
    let what = "a lowercase RFC 1123 label (a-z, 0-9 and '-', 1 to 63 characters, not starting or ending with '-')";
    if s.is_empty() {
        return Err(format!("expected {what}, got an empty string"));
    }
    if s.len() > 63 {
        return Err(format!("expected {what}, got {} characters", s.len()));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "expected {what}, got {s:?}: capital letters are not allowed (MicroK8s rejects them)"
        ));
    }
    if s.contains('_') {
        return Err(format!(
            "expected {what}, got {s:?}: '_' is not allowed (MicroK8s rejects it)"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!("expected {what}, got {s:?}: {c:?} is not allowed"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "expected {what}, got {s:?}: it must not start or end with '-'"
        ));
    }
    Ok(())
}

/// Parses a node MAC address (`aa:bb:cc:dd:ee:ff` or with `-`), which must be unicast.
pub fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = s.trim().parse()?;
    if mac.0 == [0; 6] {
        return Err(format!(
            "expected a node's MAC address, got the all-zero address {s:?}"
        ));
    }
    if mac.0[0] & 1 == 1 {
        return Err(format!(
            "expected a node's (unicast) MAC address, got the multicast/broadcast address {s:?}"
        ));
    }
    Ok(mac)
}

/// Parses one MetalLB block: `start-end` (same family, start <= end), a CIDR with no host bits
/// set, or a single address (taken as a /32 or /128).
pub fn parse_block(s: &str) -> Result<AddressBlock, String> {
    let t = s.trim();
    let expected = "expected an address range like \"192.168.1.240-192.168.1.250\", a CIDR like \"192.168.1.240/28\" or \"fd00::/120\", or one address";
    if let Some((a, b)) = t.split_once('-') {
        let start: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{expected}; {:?} is not an IP address", a.trim()))?;
        let end: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| format!("{expected}; {:?} is not an IP address", b.trim()))?;
        if start.is_ipv4() != end.is_ipv4() {
            return Err(format!(
                "range {t:?} mixes IPv4 and IPv6: start and end must be the same address family"
            ));
        }
        if ip_to_u128(start) > ip_to_u128(end) {
            return Err(format!(
                "range {t:?} is backwards: start must be less than or equal to end"
            ));
        }
        return Ok(AddressBlock::Range { start, end });
    }
    if t.contains('/') {
        let net: IpNet = t.parse().map_err(|_| format!("{expected}, got {t:?}"))?;
        if net.trunc() != net {
            return Err(format!(
                "CIDR {t:?} has host bits set; did you mean \"{}\"?",
                net.trunc()
            ));
        }
        return Ok(AddressBlock::Cidr(net));
    }
    let ip: IpAddr = t.parse().map_err(|_| format!("{expected}, got {t:?}"))?;
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let net = IpNet::new(ip, prefix).map_err(|e| format!("{t:?}: {e}"))?;
    Ok(AddressBlock::Cidr(net))
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The family (`true` for IPv4) and the inclusive numeric bounds of a block.
pub fn block_bounds(block: &AddressBlock) -> (bool, u128, u128) {
    match block {
        AddressBlock::Range { start, end } => {
            (start.is_ipv4(), ip_to_u128(*start), ip_to_u128(*end))
        }
        AddressBlock::Cidr(net) => (
            net.addr().is_ipv4(),
            ip_to_u128(net.network()),
            ip_to_u128(net.broadcast()),
        ),
    }
}

/// Whether `ip` lies inside `block`.
pub fn block_contains(block: &AddressBlock, ip: IpAddr) -> bool {
    let (v4, lo, hi) = block_bounds(block);
    let x = ip_to_u128(ip);
    v4 == ip.is_ipv4() && lo <= x && x <= hi
}

/// Every pair `(earlier, later)` of indexes whose blocks share at least one address.
/// IPv4 and IPv6 blocks never overlap each other.
pub fn find_overlaps(blocks: &[AddressBlock]) -> Vec<(usize, usize)> {
    let bounds: Vec<_> = blocks.iter().map(block_bounds).collect();
    let mut out = Vec::new();
    for (j, b) in bounds.iter().enumerate() {
        for (i, a) in bounds.iter().enumerate().take(j) {
            if a.0 == b.0 && a.1 <= b.2 && b.1 <= a.2 {
                out.push((i, j));
            }
        }
    }
    out
}

/// Renders a block the way `microk8s enable metallb` takes it.
pub fn format_block(block: &AddressBlock) -> String {
    match block {
        AddressBlock::Range { start, end } => format!("{start}-{end}"),
        AddressBlock::Cidr(net) => net.to_string(),
    }
}

/// Checks a snap channel: `<risk>` or `<track>/<risk>` with track `latest` or `1.NN` (1.27 or
/// later: rackseed relies on MicroK8s launch configurations) and risk
/// stable|candidate|beta|edge.
pub fn check_channel(s: &str) -> Result<(), String> {
    let expected = "expected a snap channel like \"1.32/stable\" (track latest or 1.NN, risk stable, candidate, beta or edge)";
    let risks = ["stable", "candidate", "beta", "edge"];
    let (track, risk) = match s.split_once('/') {
        Some((t, r)) => (Some(t), r),
        None => (None, s),
    };
    if !risks.contains(&risk) {
        return Err(format!("{expected}, got {s:?}"));
    }
    if let Some(track) = track {
        if track == "latest" {
            return Ok(());
        }
        let Some((major, minor)) = track.split_once('.') else {
            return Err(format!("{expected}, got {s:?}"));
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            return Err(format!("{expected}, got {s:?}"));
        };
        if (major, minor) < (1, 27) {
            return Err(format!(
                "channel {s:?} is too old: rackseed needs MicroK8s 1.27 or later (launch configurations)"
            ));
        }
    }
    Ok(())
}

/// Checks one OpenSSH public key line: `<type> <base64> [comment]`.
pub fn check_ssh_key(s: &str) -> Result<(), String> {
    let kinds = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let mut parts = s.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(
            "expected an OpenSSH public key line like \"ssh-ed25519 AAAA... user@host\"".into(),
        );
    };
    if kind.contains("PRIVATE") || s.contains("PRIVATE KEY") {
        return Err(
            "this looks like a private key: give the public key (the .pub file's line)".into(),
        );
    }
    if !kinds.contains(&kind) {
        return Err(format!(
            "expected an OpenSSH public key starting with one of {}, got {kind:?}",
            kinds.join(", ")
        ));
    }
    use base64::Engine as _;
    if !blob.starts_with("AAAA")
        || base64::engine::general_purpose::STANDARD
            .decode(blob)
            .is_err()
    {
        return Err(format!(
            "the key data of this {kind} key is not valid base64"
        ));
    }
    if s.contains('\n') {
        return Err("expected one key per list entry, got several lines".into());
    }
    Ok(())
}

/// Checks a `hostname-pattern`: only the placeholders `{cluster}`, `{id}` and `{mac}`, at least
/// one of `{id}`/`{mac}` (so hostnames differ), and every rendering a valid label.
pub fn check_hostname_pattern(pattern: &str, cluster: &str) -> Result<(), String> {
    let mut rest = pattern;
    let mut has_unique = false;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("unclosed '{{' in {pattern:?}"));
        };
        let name = &rest[open + 1..open + close];
        match name {
            "cluster" => {}
            "id" | "mac" => has_unique = true,
            _ => {
                return Err(format!(
                    "unknown placeholder {{{name}}} in {pattern:?}; expected {{cluster}}, {{id}} or {{mac}}"
                ))
            }
        }
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') || pattern.matches('}').count() != pattern.matches('{').count() {
        return Err(format!("unbalanced '}}' in {pattern:?}"));
    }
    if !has_unique {
        return Err(format!(
            "pattern {pattern:?} gives every node the same hostname; include {{id}} or {{mac}}"
        ));
    }
    let sample = render_hostname_pattern(pattern, cluster, "0a1b2c", "0a1b2c3d4e5f");
    check_label(&sample).map_err(|e| format!("pattern {pattern:?} renders as {sample:?}: {e}"))
}

/// Fills a hostname pattern's placeholders.
pub fn render_hostname_pattern(pattern: &str, cluster: &str, id: &str, mac: &str) -> String {
    pattern
        .replace("{cluster}", cluster)
        .replace("{id}", id)
        .replace("{mac}", mac)
}

/// Checks a SHA-256 written as 64 hex digits and returns it lowercased.
pub fn parse_sha256(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "expected a SHA-256 as 64 hex digits, got {} characters",
            s.chars().count()
        ))
    }
}

/// Checks a Linux network interface name (1 to 15 bytes, no '/', ':' or whitespace).
pub fn check_interface(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 || s == "." || s == ".." {
        return Err(format!(
            "expected an interface name of 1 to 15 characters like \"eth0\", got {s:?}"
        ));
    }
    if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!(
            "expected an interface name like \"eth0\", got {s:?}: '/', ':' and spaces are not allowed"
        ));
    }
    Ok(())
}

/// Checks a login name: `[a-z_][a-z0-9_-]*`, at most 32 characters.
pub fn check_username(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        return Err(format!(
            "expected a login name (lowercase letters, digits, '_' and '-', starting with a letter, at most 32), got {s:?}"
        ));
    }
    if s == "root" {
        return Err("expected a regular user: root logins are disabled in images".into());
    }
    Ok(())
}

/// Checks an `http://` or `https://` URL with a host.
pub fn check_http_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !s.contains(char::is_whitespace) => {
            Ok(())
        }
        _ => Err(format!("expected an http:// or https:// URL, got {s:?}")),
    }
}

/// Checks a Debian package or suite name.
pub fn check_debian_name(s: &str) -> Result<(), String> {
    let ok = s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a Debian name (lowercase letters, digits, '+', '-', '.'), got {s:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("8 gib"), Ok(8 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("8 gigs").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("10m"),
            Ok(std::time::Duration::from_secs(600))
        );
        assert_eq!(
            parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn hostname_rules() {
        assert!(check_label("pi-1").is_ok());
        assert!(check_label("a").is_ok());
        assert!(check_label(&"a".repeat(63)).is_ok());
        assert!(check_label(&"a".repeat(64)).is_err());
        assert!(check_label("").is_err());
        assert!(check_label("Pi-1").unwrap_err().contains("capital"));
        assert!(check_label("pi_1").unwrap_err().contains("'_'"));
        assert!(check_label("-pi").is_err());
        assert!(check_label("pi-").is_err());
        assert!(check_label("pi.local").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("DC:A6:32:01:02:03").unwrap().to_string(),
            "dc:a6:32:01:02:03"
        );
        assert_eq!(
            parse_mac("dc-a6-32-01-02-03").unwrap().to_string(),
            "dc:a6:32:01:02:03"
        );
        assert!(parse_mac("dc:a6:32:01:02").is_err());
        assert!(parse_mac("ff:ff:ff:ff:ff:ff")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert!(parse_mac("zz:a6:32:01:02:03").is_err());
    }

    fn blocks(xs: &[&str]) -> Vec<AddressBlock> {
        xs.iter().map(|x| parse_block(x).unwrap()).collect()
    }

    #[test]
    fn block_parsing() {
        assert!(matches!(
            parse_block("10.0.0.1-10.0.0.9"),
            Ok(AddressBlock::Range { .. })
        ));
        assert!(matches!(
            parse_block(" 10.0.0.1 - 10.0.0.1 "),
            Ok(AddressBlock::Range { .. })
        ));
        assert!(parse_block("10.0.0.9-10.0.0.1")
            .unwrap_err()
            .contains("backwards"));
        assert!(parse_block("10.0.0.1-fd00::1")
            .unwrap_err()
            .contains("same address family"));
        assert!(parse_block("10.0.0.5/28")
            .unwrap_err()
            .contains("10.0.0.0/28"));
        assert_eq!(
            format_block(&parse_block("10.0.0.7").unwrap()),
            "10.0.0.7/32"
        );
        assert_eq!(
            format_block(&parse_block("fd00::/120").unwrap()),
            "fd00::/120"
        );
        assert!(parse_block("fd00::10-fd00::20").is_ok());
        assert!(parse_block("auto").is_err());
        assert!(parse_block("10.0.0.300-10.0.0.301").is_err());
    }

    #[test]
    fn overlaps_v4() {
        assert_eq!(
            find_overlaps(&blocks(&["10.0.0.1-10.0.0.9", "10.0.0.10-10.0.0.20"])),
            vec![]
        );
        assert_eq!(
            find_overlaps(&blocks(&["10.0.0.1-10.0.0.10", "10.0.0.10-10.0.0.20"])),
            vec![(0, 1)]
        );
        assert_eq!(
            find_overlaps(&blocks(&[
                "192.168.1.240/28",
                "10.0.0.1",
                "192.168.1.250-192.168.1.251"
            ])),
            vec![(0, 2)]
        );
        assert_eq!(
            find_overlaps(&blocks(&["10.0.0.0/24", "10.0.1.0/24"])),
            vec![]
        );
    }

    #[test]
    fn overlaps_v6_and_mixed() {
        assert_eq!(
            find_overlaps(&blocks(&["fd00::/120", "fd00::ff-fd00::1ff"])),
            vec![(0, 1)]
        );
        assert_eq!(
            find_overlaps(&blocks(&["fd00::/120", "fd00::100-fd00::1ff"])),
            vec![]
        );
        // ::a00:1 is numerically equal to 10.0.0.1 but is another family.
        assert_eq!(
            find_overlaps(&blocks(&["10.0.0.0/24", "::a00:0/120"])),
            vec![]
        );
    }

    #[test]
    fn contains() {
        let b = parse_block("192.168.1.240/28").unwrap();
        assert!(block_contains(&b, "192.168.1.241".parse().unwrap()));
        assert!(!block_contains(&b, "192.168.1.1".parse().unwrap()));
    }

    #[test]
    fn channels() {
        assert!(check_channel("1.32/stable").is_ok());
        assert!(check_channel("latest/edge").is_ok());
        assert!(check_channel("stable").is_ok());
        assert!(check_channel("1.26/stable").unwrap_err().contains("1.27"));
        assert!(check_channel("1.32").is_err());
        assert!(check_channel("1.32/production").is_err());
    }

    #[test]
    fn ssh_keys() {
        assert!(check_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx8 me@laptop").is_ok());
        assert!(check_ssh_key("ssh-ed25519").is_err());
        assert!(check_ssh_key("ssh-dss AAAAB3Nza me").is_err());
        assert!(check_ssh_key("ssh-ed25519 !!notbase64").is_err());
        assert!(check_ssh_key("-----BEGIN OPENSSH PRIVATE KEY----- abc")
            .unwrap_err()
            .contains("private"));
    }

    #[test]
    fn hostname_patterns() {
        assert!(check_hostname_pattern("{cluster}-{id}", "lab").is_ok());
        assert!(check_hostname_pattern("node-{mac}", "lab").is_ok());
        assert!(check_hostname_pattern("{cluster}", "lab")
            .unwrap_err()
            .contains("same hostname"));
        assert!(check_hostname_pattern("{cluster}-{serial}", "lab")
            .unwrap_err()
            .contains("{serial}"));
        assert!(check_hostname_pattern("{cluster-{id}", "lab").is_err());
        assert!(check_hostname_pattern("Node-{id}", "lab")
            .unwrap_err()
            .contains("capital"));
        assert!(check_hostname_pattern("{cluster}-{id}", &"a".repeat(60)).is_err());
        assert_eq!(
            render_hostname_pattern("{cluster}-{id}", "lab", "0a1b2c", "x"),
            "lab-0a1b2c"
        );
    }

    #[test]
    fn small_checks() {
        assert_eq!(parse_sha256(&"AB".repeat(32)), Ok("ab".repeat(32)));
        assert!(parse_sha256("abc").is_err());
        assert!(check_interface("eth0").is_ok());
        assert!(check_interface("a-very-long-interface-name").is_err());
        assert!(check_username("ubuntu").is_ok());
        assert!(check_username("root").is_err());
        assert!(check_username("Ubuntu").is_err());
        assert!(check_http_url("https://example.invalid/x.img.xz").is_ok());
        assert!(check_http_url("ftp://x").is_err());
        assert!(check_debian_name("openssh-server").is_ok());
        assert!(check_debian_name("Bad_Name").is_err());
    }
}
