//! The config loader end to end: the shipped examples, defaults, every-error reporting,
//! locations and field paths, cross-field rules and warnings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rackseed_config::{
    self as config, AddressBlock, Addressing, Base, ConfigError, Diagnostic, Metallb, Role,
    Storage, Target,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/config").join(name)
}

/// A valid base config; tests append or replace sections.
const HEAD: &str = r#"[cluster]
name = "lab"

[image]
target = "x86_64-efi"
base = { kind = "bootstrap", suite = "bookworm" }
"#;

fn errors(text: &str) -> Vec<Diagnostic> {
    match config::parse(text, Path::new("/cfg/lab.toml")) {
        Ok(l) => panic!("expected errors, config was accepted: {:?}", l.config),
        Err(e) => e.diagnostics,
    }
}

fn ok(text: &str) -> config::Loaded {
    match config::parse(text, Path::new("/cfg/lab.toml")) {
        Ok(l) => l,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn has(diags: &[Diagnostic], line: usize, field: &str, needle: &str) -> bool {
    diags
        .iter()
        .any(|d| d.line == line && d.field == field && d.message.contains(needle))
}

#[track_caller]
fn assert_has(diags: &[Diagnostic], line: usize, field: &str, needle: &str) {
    assert!(
        has(diags, line, field, needle),
        "no diagnostic at line {line} for {field} containing {needle:?}; got:\n{}",
        ConfigError {
            diagnostics: diags.to_vec()
        }
    );
}

#[test]
fn every_example_config_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = config::load(&path) {
                panic!("{} does not validate:\n{e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 4, "expected the four example configs, found {n}");
}

#[test]
fn examples_mean_what_their_comments_say() {
    let qemu = config::load(&repo().join("configs/qemu-test.toml"))
        .unwrap()
        .config;
    assert_eq!(qemu.image.target, Target::X86_64Efi);
    assert_eq!(qemu.cluster.control_plane, 3);
    match &qemu.image.base {
        Base::Bootstrap { mirror, arch, .. } => {
            assert_eq!(
                *mirror, None,
                "mirror omitted means: from the build machine"
            );
            assert_eq!(arch, "amd64");
        }
        other => panic!("qemu-test should bootstrap, got {other:?}"),
    }

    let rack = config::load(&repo().join("configs/rack.toml"))
        .unwrap()
        .config;
    assert_eq!(rack.nodes.len(), 5);
    assert_eq!(rack.addons.storage, Storage::Mayastor);
    assert!(matches!(rack.network.addressing, Addressing::Static { .. }));
    assert!(rack
        .nodes
        .iter()
        .all(|n| n.address.is_some() && n.role.is_some()));
    assert_eq!(rack.nodes[0].role, Some(Role::ControlPlane));

    let pi = config::load(&repo().join("configs/rpi-homelab.toml")).unwrap();
    assert_eq!(pi.config.image.target, Target::Rpi4);
    let wifi = pi.config.network.wifi.as_ref().expect("wifi configured");
    assert!(wifi.psk_file.is_absolute() && wifi.psk_file.ends_with("configs/homelab-wifi.psk"));
    assert!(pi
        .warnings
        .iter()
        .any(|w| w.field == "addons.storage" && w.message.contains("multi-node")));
}

#[test]
fn minimal_config_gets_defaults() {
    let l = config::load(&fixture("minimal.toml")).unwrap();
    let c = l.config;
    assert_eq!(c.cluster.control_plane, 3);
    assert_eq!(c.cluster.expected_nodes, 3);
    assert_eq!(c.cluster.formation_timeout, Duration::from_secs(600));
    assert_eq!(c.microk8s.channel, "1.32/stable");
    assert!(c.addons.dns.enabled);
    assert_eq!(c.addons.metallb, None);
    assert_eq!(c.addons.storage, Storage::None);
    assert_eq!(c.network.addressing, Addressing::Dhcp);
    assert_eq!(c.image.disk_size, 8 << 30);
    assert_eq!(c.image.hostname_pattern, "{cluster}-{id}");
    // Relative paths resolve against the config file's directory.
    let dir = fixture("");
    assert_eq!(c.cluster.secret_file, dir.join("cluster.secret"));
    assert!(
        matches!(&c.image.base, Base::Local { path, sha256: None } if *path == dir.join("images/base.img.xz"))
    );
    assert!(l.warnings.iter().any(|w| w.field == "image.users"));
}

#[test]
fn relative_and_absolute_paths() {
    let l = ok(
        &format!("{HEAD}\n[microk8s]\noffline-snaps = \"snaps\"\n").replace(
            "name = \"lab\"",
            "name = \"lab\"\nsecret-file = \"/etc/rackseed/cluster.secret\"",
        ),
    );
    assert_eq!(
        l.config.cluster.secret_file,
        Path::new("/etc/rackseed/cluster.secret")
    );
    assert_eq!(
        l.config.microk8s.offline_snaps.as_deref(),
        Some(Path::new("/cfg/snaps"))
    );
}

#[test]
fn unknown_top_level_key_names_its_line() {
    let e = config::load(&fixture("unknown-top-level.toml")).unwrap_err();
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    let d = &e.diagnostics[0];
    assert_eq!((d.line, d.field.as_str()), (8, "extras"));
    assert!(d.message.contains("unknown key"));
    assert!(e.to_string().starts_with(&format!(
        "{}:8:",
        fixture("unknown-top-level.toml").display()
    )));
}

#[test]
fn invalid_value_names_its_line_and_expectation() {
    let e = config::load(&fixture("invalid-value.toml")).unwrap_err();
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    let d = &e.diagnostics[0];
    assert_eq!(
        (d.line, d.col, d.field.as_str()),
        (3, 17, "cluster.control-plane")
    );
    assert!(d.message.contains("expected 1, 3, 5 or 7"), "{d}");
}

#[test]
fn a_file_with_several_errors_reports_all_of_them() {
    let e = config::load(&fixture("many-errors.toml")).unwrap_err();
    let d = &e.diagnostics;
    assert_has(d, 3, "cluster.name", "capital");
    assert_has(d, 4, "cluster.control-plane", "1, 3, 5 or 7");
    assert_has(d, 5, "cluster.formation-timeout", "duration");
    assert_has(d, 8, "microk8s.channel", "snap channel");
    assert_has(d, 11, "addons.storage", "hostpath, mayastor");
    assert_has(
        d,
        14,
        "addons.metallb.addresses[1]",
        "overlaps addons.metallb.addresses[0]",
    );
    assert_has(
        d,
        14,
        "addons.metallb.addresses[3]",
        "overlaps addons.metallb.addresses[2]",
    );
    assert_has(d, 21, "nodes[1].mac", "duplicate MAC");
    assert_has(d, 22, "nodes[1].hostname", "duplicate hostname");
    assert_has(d, 25, "image.target", "x86_64-efi, rpi4, rpi5");
    assert_has(d, 26, "image.disk-size", "size");
    assert_has(d, 27, "image.base.mirrors", "did you mean `mirror`");
    assert_eq!(d.len(), 12, "exactly the mistakes in the file:\n{e}");
    // In file order.
    assert!(d
        .windows(2)
        .all(|w| (w[0].line, w[0].col) <= (w[1].line, w[1].col)));
}

#[test]
fn syntax_errors_and_unreadable_files() {
    let d = errors("[cluster\nname = \"a\"\n");
    assert_eq!((d.len(), d[0].line), (1, 1));
    assert!(d[0].message.contains("invalid TOML"));
    let d = errors("[cluster]\nname = \"a\"\nname = \"b\"\n");
    assert_eq!(d[0].line, 3);

    let missing = Path::new("/nonexistent/rackseed.toml");
    let e = config::load(missing).unwrap_err();
    assert_eq!(e.diagnostics.len(), 1);
    assert_eq!(e.diagnostics[0].line, 0);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/rackseed.toml: cannot read config file"),
        "{e}"
    );
}

#[test]
fn missing_sections_and_keys() {
    let d = errors("");
    assert!(has(&d, 1, "cluster", "missing required table"));
    assert!(has(&d, 1, "image", "missing required table"));
    let d = errors("[cluster]\n[image]\ntarget = \"rpi4\"\n");
    assert_has(&d, 1, "cluster.name", "missing required key");
    assert_has(&d, 2, "image.base", "missing required key");
    let d = errors(&HEAD.replace(
        "suite = \"bookworm\"",
        "mirror = \"http://mirror.invalid/debian\"",
    ));
    assert_has(&d, 6, "image.base.suite", "missing required key");
}

#[test]
fn kebab_case_and_spelling_hints() {
    let d = errors(&HEAD.replace(
        "name = \"lab\"",
        "name = \"lab\"\nexpected_nodes = 3\nformation-timout = \"1m\"",
    ));
    assert_has(
        &d,
        3,
        "cluster.expected_nodes",
        "kebab-case: did you mean `expected-nodes`",
    );
    assert_has(
        &d,
        4,
        "cluster.formation-timout",
        "did you mean `formation-timeout`",
    );
}

#[test]
fn secrets_are_never_inline() {
    let d = errors(&HEAD.replace("name = \"lab\"", "name = \"lab\"\nsecret = \"abc\""));
    assert_has(&d, 3, "cluster.secret", "never written inline");
    let d = errors(&format!(
        "{HEAD}[network.wifi]\nssid = \"home\"\npsk = \"hunter2\"\ncountry = \"gb\"\n"
    ));
    assert_has(&d, 9, "network.wifi.psk", "psk-file");
    assert_has(&d, 7, "network.wifi.psk-file", "missing required key");
    assert!(
        d.iter().all(|x| !x.message.contains("hunter2")),
        "never echo a secret"
    );
    let l = ok(&format!(
        "{HEAD}[network.wifi]\nssid = \"home\"\npsk-file = \"wifi.psk\"\ncountry = \"gb\"\n"
    ));
    assert_eq!(l.config.network.wifi.unwrap().country, "GB");
}

#[test]
fn metallb_blocks_auto_and_overlaps() {
    let l = ok(&format!(
        "{HEAD}[addons.metallb]\naddresses = [\"192.168.1.240/28\", \"192.168.1.10-192.168.1.20\", \"fd00::/120\", \"10.1.1.1\"]\n"
    ));
    let Some(Metallb::Blocks { blocks }) = l.config.addons.metallb else {
        panic!()
    };
    assert_eq!(blocks.len(), 4);
    assert!(matches!(blocks[1], AddressBlock::Range { .. }));

    let l = ok(&format!("{HEAD}[addons.metallb]\naddresses = \"auto\"\n"));
    assert_eq!(l.config.addons.metallb, Some(Metallb::Auto { count: 8 }));

    let d = errors(&format!("{HEAD}[addons.metallb]\naddresses = []\n"));
    assert_has(&d, 8, "addons.metallb.addresses", "at least one");
    let d = errors(&format!(
        "{HEAD}[addons.metallb]\naddresses = [\"10.0.0.0/24\", \"10.0.0.128/25\"]\n"
    ));
    assert_has(
        &d,
        8,
        "addons.metallb.addresses[1]",
        "overlaps addons.metallb.addresses[0]",
    );
    let d = errors(&format!(
        "{HEAD}[addons.metallb]\naddresses = [\"fd00::1-10.0.0.1\"]\ncount = 3\n"
    ));
    assert_has(&d, 8, "addons.metallb.addresses[0]", "same address family");
    assert_has(
        &d,
        9,
        "addons.metallb.count",
        "only used with addresses = \"auto\"",
    );
    let d = errors(&format!("{HEAD}[addons.metallb]\n"));
    assert_has(&d, 7, "addons.metallb.addresses", "missing required key");
}

#[test]
fn inventory_rules() {
    let nodes = |extra: &str| {
        format!(
            "{HEAD}[[nodes]]\nmac = \"dc:a6:32:00:00:01\"\nhostname = \"pi-1\"\n[[nodes]]\nmac = \"DC-A6-32-00-00-01\"\nhostname = \"pi-2\"\n{extra}"
        )
    };
    // Same MAC written differently is still the same MAC.
    let d = errors(&nodes(""));
    assert_has(&d, 11, "nodes[1].mac", "duplicate MAC dc:a6:32:00:00:01");
    let d = errors(&format!(
        "{HEAD}[[nodes]]\nmac = \"dc:a6:32:00:00:01\"\nhostname = \"Pi-1\"\npriority = -1\nrole = \"leader\"\nextra = 1\n"
    ));
    assert_has(&d, 9, "nodes[0].hostname", "capital");
    assert_has(&d, 10, "nodes[0].priority", "from 0 to");
    assert_has(&d, 11, "nodes[0].role", "\"control-plane\" or \"worker\"");
    assert_has(&d, 12, "nodes[0].extra", "unknown key");
    let d = errors(&format!("{HEAD}[[nodes]]\nhostname = \"a\"\n"));
    assert_has(&d, 7, "nodes[0].mac", "missing required key");
    let d = errors(&format!("nodes = 3\n{HEAD}"));
    assert!(d
        .iter()
        .any(|x| x.field == "nodes" && x.message.contains("array of tables")));
}

#[test]
fn static_addressing_rules() {
    let net = "[network]\naddressing = \"static\"\ngateway = \"10.0.0.1\"\n";
    let d = errors(&format!("{HEAD}{net}"));
    assert_has(&d, 8, "network.addressing", "needs an inventory");

    let d = errors(&format!(
        "{HEAD}{net}[addons.metallb]\naddresses = [\"10.0.0.200-10.0.0.250\"]\n[[nodes]]\nmac = \"02:00:00:00:00:01\"\nhostname = \"a\"\naddress = \"10.0.0.210/24\"\n[[nodes]]\nmac = \"02:00:00:00:00:02\"\nhostname = \"b\"\n[[nodes]]\nmac = \"02:00:00:00:00:03\"\nhostname = \"c\"\naddress = \"10.0.0.210/24\"\n"
    ));
    assert_has(
        &d,
        15,
        "nodes[0].address",
        "inside addons.metallb.addresses[0]",
    );
    assert_has(&d, 16, "nodes[1].address", "missing required key");
    assert_has(&d, 22, "nodes[2].address", "duplicate address 10.0.0.210");

    let l = ok(&format!(
        "{HEAD}{net}[[nodes]]\nmac = \"02:00:00:00:00:01\"\nhostname = \"a\"\naddress = \"10.0.0.11/24\"\n"
    ));
    assert!(
        l.warnings
            .iter()
            .any(|w| w.field == "cluster.expected-nodes"
                && w.message.contains("only to the 1 inventory nodes")),
        "{:?}",
        l.warnings
    );
    assert_eq!(
        l.config.network.addressing,
        Addressing::Static {
            gateway: "10.0.0.1".parse().unwrap(),
            dns: vec!["10.0.0.1".parse().unwrap()]
        }
    );
    let d = errors(&format!(
        "{HEAD}[network]\ngateway = \"10.0.0.1\"\n[[nodes]]\nmac = \"02:00:00:00:00:01\"\nhostname = \"a\"\naddress = \"10.0.0.11/24\"\n"
    ));
    assert_has(
        &d,
        8,
        "network.gateway",
        "only used with addressing = \"static\"",
    );
    assert_has(
        &d,
        12,
        "nodes[0].address",
        "only used with network.addressing",
    );
}

#[test]
fn warnings_come_with_a_valid_config() {
    let w = ok(&format!("{HEAD}[addons]\nstorage = \"hostpath\"\n")).warnings;
    assert!(w.iter().any(|x| x.line == 8
        && x.field == "addons.storage"
        && x.message.contains("not suitable for multi-node")));
    let w = ok(&format!("{HEAD}[addons]\nstorage = \"rook-ceph\"\n")).warnings;
    assert!(w.iter().any(|x| x.message.contains("internet")));
    let w = ok(&format!("{HEAD}[addons]\nstorage = \"longhorn\"\n")).warnings;
    assert!(w.iter().any(|x| x.message.contains("internet")));
    let single = HEAD.replace("name = \"lab\"", "name = \"lab\"\ncontrol-plane = 1");
    let w = ok(&format!("{single}[addons]\nstorage = \"hostpath\"\n")).warnings;
    assert!(
        !w.iter().any(|x| x.field == "addons.storage"),
        "hostpath is fine on one node: {w:?}"
    );
    let w = ok(&HEAD.replace(
        "name = \"lab\"",
        "name = \"lab\"\ncontrol-plane = 5\nexpected-nodes = 2",
    ))
    .warnings;
    assert!(w
        .iter()
        .any(|x| x.field == "cluster.expected-nodes" && x.line == 4));
    let w = ok(&HEAD.replace(
        "name = \"lab\"",
        "name = \"lab\"\ncontrol-plane = 1\nexpected-nodes = 4",
    ))
    .warnings;
    assert!(w
        .iter()
        .any(|x| x.field == "cluster.control-plane" && x.message.contains("no high availability")));
}

#[test]
fn image_section_rules() {
    let img = |base: &str, extra: &str| {
        format!("[cluster]\nname = \"lab\"\n[image]\ntarget = \"rpi4\"\nbase = {base}\n{extra}")
    };
    let l = ok(&img(
        "{ kind = \"bootstrap\", suite = \"noble\", packages = [\"openssh-server\"] }",
        "disk-size = \"4096MiB\"\nhostname-pattern = \"node-{mac}\"\n",
    ));
    assert_eq!(l.config.image.disk_size, 4 << 30);
    assert!(matches!(&l.config.image.base, Base::Bootstrap { arch, .. } if arch == "arm64"));

    let d = errors(&img(
        "{ kind = \"bootstrap\", suite = \"noble\", arch = \"amd64\" }",
        "",
    ));
    assert_has(&d, 5, "image.base.arch", "\"arm64\" for target rpi4");
    let d = errors(&img(
        "{ kind = \"official\", url = \"https://example.invalid/x.img.xz\", sha256 = \"abc\" }",
        "",
    ));
    assert_has(&d, 5, "image.base.sha256", "64 hex digits");
    let d = errors(&img("{ kind = \"cloud\" }", ""));
    assert_has(
        &d,
        5,
        "image.base.kind",
        "\"official\", \"local\" or \"bootstrap\"",
    );
    let d = errors(&img(
        "{ kind = \"local\", path = \"x.img\" }",
        "disk-size = \"1GiB\"\nhostname-pattern = \"{cluster}\"\n",
    ));
    assert_has(&d, 6, "image.disk-size", "at least 2GiB");
    assert_has(&d, 7, "image.hostname-pattern", "same hostname");
    let long = format!("[cluster]\nname = \"{}\"\n[image]\ntarget = \"rpi4\"\nbase = {{ kind = \"local\", path = \"x.img\" }}\n", "a".repeat(60));
    let d = errors(&long);
    assert_has(&d, 3, "image.hostname-pattern", "shorten cluster.name");
    let d = errors(&img(
        "{ kind = \"local\", path = \"x.img\" }",
        "[[image.users]]\nname = \"ubuntu\"\nssh-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\", \"not a key\"]\npassword = \"x\"\n[[image.users]]\nname = \"ubuntu\"\nssh-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"]\n",
    ));
    assert_has(&d, 8, "image.users[0].ssh-keys[1]", "OpenSSH public key");
    assert_has(&d, 9, "image.users[0].password", "no password login");
    assert_has(&d, 11, "image.users[1].name", "duplicate user");
}

#[test]
fn type_errors_name_what_was_expected() {
    let d = errors(&HEAD.replace("name = \"lab\"", "name = 7\ncontrol-plane = \"3\""));
    assert_has(&d, 2, "cluster.name", "expected a string, found an integer");
    assert_has(
        &d,
        3,
        "cluster.control-plane",
        "expected an integer, found a string",
    );
    let d = errors(&format!("microk8s = \"1.32\"\n{HEAD}"));
    assert!(d
        .iter()
        .any(|x| x.field == "microk8s" && x.message.contains("expected a table")));
}

#[test]
fn dotted_and_inline_tables_read_the_same() {
    let a = ok("cluster.name = \"lab\"\nimage.target = \"rpi5\"\nimage.base.kind = \"local\"\nimage.base.path = \"/x.img\"\n");
    let b = ok("[cluster]\nname = \"lab\"\n[image]\ntarget = \"rpi5\"\nbase = { kind = \"local\", path = \"/x.img\" }\n");
    assert_eq!(a.config, b.config);
    let d = errors("cluster.name = \"lab\"\ncluster.bogus = 1\nimage.target = \"rpi5\"\nimage.base.kind = \"local\"\nimage.base.path = \"/x.img\"\n");
    assert_has(&d, 2, "cluster.bogus", "unknown key");
}
