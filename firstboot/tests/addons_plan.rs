//! The exact `microk8s enable` argument lists for each addon configuration, and the
//! prerequisite notes `imagebuilder validate` prints.

use std::path::PathBuf;
use std::time::Duration;

use firstboot::addons::plan::{
    dns_enable, plan_addon_enables, prerequisite_notes, AddonEnable, PlanContext, PlanError,
    MICROK8S_KUBELET_DIR,
};
use firstboot::addons::progress::{next_addon_to_enable, record_result, AddonProgress};
use rackseed_config::*;

fn config(addons: Addons, target: Target, expected_nodes: u32) -> ClusterConfig {
    ClusterConfig {
        cluster: Cluster {
            name: "lab".into(),
            control_plane: 3,
            expected_nodes,
            formation_timeout: Duration::from_secs(600),
            join_parallelism: 8,
            secret_file: PathBuf::from("/etc/rackseed/cluster.secret"),
            api_address: None,
            standbys: 3,
            replace_after: DEFAULT_REPLACE_AFTER,
            api_check_interval: rackseed_config::DEFAULT_API_CHECK_INTERVAL,
        },
        microk8s: Microk8s {
            channel: "1.32/stable".into(),
            offline_snaps: None,
        },
        addons,
        network: Network {
            interface: None,
            addressing: Addressing::Dhcp,
            wifi: None,
        },
        nodes: Vec::new(),
        image: Image {
            target,
            base: Base::Bootstrap {
                suite: "noble".into(),
                mirror: None,
                arch: target.deb_arch().into(),
                packages: vec!["openssh-server".into()],
            },
            disk_size: 8 << 30,
            users: Vec::new(),
            hostname_pattern: "{cluster}-{id}".into(),
        },
        backup: Default::default(),
    }
}

fn addons(dns: &[&str], metallb: Option<Metallb>, storage: Storage) -> Addons {
    Addons {
        dns: Dns {
            enabled: true,
            upstream: dns.iter().map(|s| s.parse().unwrap()).collect(),
        },
        metallb,
        storage,
        longhorn: Default::default(),
        offline: None,
    }
}

fn range(a: &str, b: &str) -> AddressBlock {
    AddressBlock::Range {
        start: a.parse().unwrap(),
        end: b.parse().unwrap(),
    }
}

fn cidr(s: &str) -> AddressBlock {
    AddressBlock::Cidr(s.parse().unwrap())
}

fn argvs(cfg: &ClusterConfig, ctx: &PlanContext) -> Vec<Vec<String>> {
    plan_addon_enables(cfg, ctx)
        .unwrap()
        .enables
        .iter()
        .map(AddonEnable::argv)
        .collect()
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn dns_only_by_default() {
    let cfg = config(addons(&[], None, Storage::None), Target::X86_64Efi, 3);
    assert_eq!(
        argvs(&cfg, &PlanContext::default()),
        vec![v(&["enable", "dns"])]
    );
}

#[test]
fn dns_upstreams_are_one_comma_separated_argument_for_ipv4_and_ipv6() {
    let cfg = config(
        addons(&["1.1.1.1", "8.8.8.8"], None, Storage::None),
        Target::X86_64Efi,
        3,
    );
    assert_eq!(
        argvs(&cfg, &PlanContext::default()),
        vec![v(&["enable", "dns", "1.1.1.1,8.8.8.8"])]
    );
    let cfg = config(
        addons(&["2606:4700:4700::1111", "1.1.1.1"], None, Storage::None),
        Target::X86_64Efi,
        3,
    );
    let got = argvs(&cfg, &PlanContext::default());
    assert_eq!(
        got,
        vec![v(&["enable", "dns", "2606:4700:4700::1111,1.1.1.1"])]
    );
    // Never the inline `dns:...` form, which MicroK8s splits on ':'.
    assert!(got.iter().flatten().all(|a| !a.starts_with("dns:")));
}

#[test]
fn dns_disabled_is_not_enabled() {
    let mut a = addons(&[], None, Storage::None);
    a.dns.enabled = false;
    let cfg = config(a, Target::X86_64Efi, 1);
    assert!(argvs(&cfg, &PlanContext::default()).is_empty());
    assert_eq!(dns_enable(&cfg.addons.dns), None);
}

#[test]
fn metallb_ipv4_ranges_and_cidrs() {
    let cfg = config(
        addons(
            &[],
            Some(Metallb::Blocks {
                blocks: vec![
                    range("10.64.140.43", "10.64.140.49"),
                    range("192.168.0.105", "192.168.0.111"),
                    cidr("192.168.1.240/28"),
                ],
            }),
            Storage::None,
        ),
        Target::X86_64Efi,
        3,
    );
    assert_eq!(
        argvs(&cfg, &PlanContext::default())[1],
        v(&[
            "enable",
            "metallb",
            "10.64.140.43-10.64.140.49,192.168.0.105-192.168.0.111,192.168.1.240/28"
        ])
    );
}

#[test]
fn metallb_ipv6_and_mixed_use_the_separate_argument_form() {
    let cfg = config(
        addons(
            &[],
            Some(Metallb::Blocks {
                blocks: vec![range("fd00:10::10", "fd00:10::1f"), cidr("fd00:20::/120")],
            }),
            Storage::None,
        ),
        Target::X86_64Efi,
        3,
    );
    assert_eq!(
        argvs(&cfg, &PlanContext::default())[1],
        v(&["enable", "metallb", "fd00:10::10-fd00:10::1f,fd00:20::/120"])
    );
    let cfg = config(
        addons(
            &[],
            Some(Metallb::Blocks {
                blocks: vec![range("192.168.1.240", "192.168.1.250"), cidr("fd00::/124")],
            }),
            Storage::None,
        ),
        Target::X86_64Efi,
        3,
    );
    let got = argvs(&cfg, &PlanContext::default());
    assert_eq!(
        got[1],
        v(&[
            "enable",
            "metallb",
            "192.168.1.240-192.168.1.250,fd00::/124"
        ])
    );
    assert!(got.iter().flatten().all(|a| !a.starts_with("metallb:")));
    assert!(prerequisite_notes(&cfg)
        .iter()
        .any(|n| n.starts_with("metallb: IPv6")));
}

#[test]
fn metallb_auto_needs_the_chosen_range() {
    let cfg = config(
        addons(&[], Some(Metallb::Auto { count: 8 }), Storage::None),
        Target::X86_64Efi,
        3,
    );
    assert_eq!(
        plan_addon_enables(&cfg, &PlanContext::default()).unwrap_err(),
        PlanError::AutoRangeUnresolved
    );
    let ctx = PlanContext {
        metallb_auto: Some(vec![
            range("192.168.1.247", "192.168.1.253"),
            cidr("192.168.1.245/32"),
        ]),
    };
    assert_eq!(
        argvs(&cfg, &ctx)[1],
        v(&[
            "enable",
            "metallb",
            "192.168.1.247-192.168.1.253,192.168.1.245/32"
        ])
    );
    let empty = PlanContext {
        metallb_auto: Some(vec![]),
    };
    assert_eq!(
        plan_addon_enables(&cfg, &empty).unwrap_err(),
        PlanError::NoMetallbAddresses
    );
}

#[test]
fn storage_addons_in_order_after_dns_and_metallb() {
    let blocks = Some(Metallb::Blocks {
        blocks: vec![cidr("10.0.0.240/29")],
    });
    let cases = [
        (Storage::Hostpath, v(&["enable", "hostpath-storage"])),
        (
            Storage::Mayastor,
            v(&["enable", "mayastor", "--default-pool-size", "20G"]),
        ),
        (Storage::RookCeph, v(&["enable", "rook-ceph"])),
    ];
    for (storage, want) in cases {
        let cfg = config(
            addons(&["9.9.9.9"], blocks.clone(), storage),
            Target::X86_64Efi,
            3,
        );
        let got = argvs(&cfg, &PlanContext::default());
        assert_eq!(
            got,
            vec![
                v(&["enable", "dns", "9.9.9.9"]),
                v(&["enable", "metallb", "10.0.0.240/29"]),
                want
            ]
        );
    }
}

#[test]
fn longhorn_is_the_agents_own_step_after_dns() {
    let cfg = config(addons(&[], None, Storage::Longhorn), Target::Rpi5, 3);
    let plan = plan_addon_enables(&cfg, &PlanContext::default()).unwrap();
    assert_eq!(
        plan.enables
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["dns", "longhorn"]
    );
    assert!(plan.manual.is_empty());
    assert_eq!(
        MICROK8S_KUBELET_DIR,
        "/var/snap/microk8s/common/var/lib/kubelet"
    );
    // It runs like any other step, once, after dns.
    let mut p = AddonProgress::new(plan);
    for name in ["dns", "longhorn"] {
        assert_eq!(next_addon_to_enable(&p).unwrap().name, name);
        p.mark_enabling(name).unwrap();
        record_result(&mut p, name, Ok(())).unwrap();
    }
    assert!(next_addon_to_enable(&p).is_none());
    assert_eq!(p.status_lines(), ["dns: enabled", "longhorn: enabled"]);
    let notes = prerequisite_notes(&cfg);
    assert!(notes
        .iter()
        .any(|n| n.starts_with("longhorn: installed by firstboot")
            && n.contains("chart 1.7.2")
            && n.contains("iscsid running")
            && n.contains("image archives (*.tar) staged there too")));
    assert!(notes.iter().any(|n| n
        == "packages: open-iscsi and nfs-common are added to the bootstrapped base, so every \
            node has them"));
    let mut official = cfg.clone();
    official.image.base = Base::Official {
        url: "https://example.invalid/ubuntu.img.xz".into(),
        sha256: "0".repeat(64),
    };
    assert!(prerequisite_notes(&official).iter().any(|n| n
        == "packages: open-iscsi and nfs-common are not in an official base and nothing stages \
            them: set addons.offline to a folder of their .deb files, or every node needs a \
            package source at first boot"));
    assert!(notes.iter().any(|n| n.starts_with("rpi:")));
}

#[test]
fn prerequisite_notes_name_what_each_addon_needs() {
    let notes = |storage, nodes| {
        prerequisite_notes(&config(
            addons(&[], None, storage),
            Target::X86_64Efi,
            nodes,
        ))
    };
    assert!(notes(Storage::None, 3).is_empty());
    let rook = notes(Storage::RookCeph, 3);
    assert!(rook
        .iter()
        .any(|n| n.starts_with("rook-ceph: needs internet access at enable time (helm repo)")));
    let maya = notes(Storage::Mayastor, 3);
    assert!(maya
        .iter()
        .any(|n| n.starts_with("mayastor:") && n.contains("nvme-tcp") && n.contains("4 GiB")));
    assert!(notes(Storage::Hostpath, 3)
        .iter()
        .any(|n| n.starts_with("hostpath-storage: meant for single-node")));
    assert!(notes(Storage::Hostpath, 1).is_empty());
    let auto = prerequisite_notes(&config(
        addons(&[], Some(Metallb::Auto { count: 8 }), Storage::None),
        Target::X86_64Efi,
        3,
    ));
    assert!(auto
        .iter()
        .any(|n| n.contains("picks 8 free IPv4 addresses")));
    let v6dns = prerequisite_notes(&config(
        addons(&["2001:4860:4860::8888"], None, Storage::None),
        Target::X86_64Efi,
        3,
    ));
    assert!(v6dns
        .iter()
        .any(|n| n.starts_with("dns:") && n.contains("IPv6")));
}
