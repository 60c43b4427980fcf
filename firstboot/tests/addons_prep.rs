//! Node preparation against fake root filesystems: the files written, idempotence (a second
//! run writes the same bytes and runs no command), and the readiness reports.

use std::path::Path;

use firstboot::addons::fakes::{FakeKernel, FakeRoot};
use firstboot::addons::prep::{
    ensure_pi_cgroup_flags, pi_cgroup_step, prepare_node, PiCgroup, Readiness, HUGEPAGES_CONF,
    MAYASTOR_MODULES_CONF, PI_CMDLINE,
};
use rackseed_config::{Storage, Target};

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn prepare(root: &Path, storage: Storage, target: Target, kernel: &FakeKernel) -> Readiness {
    run(prepare_node(root, storage, target, kernel)).unwrap()
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn hugepages(root: &Path) -> String {
    read(root, "proc/meminfo")
        .lines()
        .find(|l| l.starts_with("HugePages_Total:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[test]
fn mayastor_persists_and_applies_hugepages_and_nvme_tcp_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot::default().write(root).unwrap();
    let kernel = FakeKernel::new(root);

    let r = prepare(root, Storage::Mayastor, Target::X86_64Efi, &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(read(root, HUGEPAGES_CONF), "vm.nr_hugepages = 1024\n");
    assert_eq!(read(root, MAYASTOR_MODULES_CONF), "nvme-tcp\n");
    assert_eq!(
        kernel.calls(),
        ["sysctl -w vm.nr_hugepages=1024", "modprobe nvme-tcp"]
    );
    assert_eq!(hugepages(root), "1024");
    assert!(read(root, "proc/modules").contains("nvme_tcp "));

    // Second run: same bytes, nothing applied again.
    let before = (
        read(root, HUGEPAGES_CONF),
        read(root, MAYASTOR_MODULES_CONF),
    );
    let r2 = prepare(root, Storage::Mayastor, Target::X86_64Efi, &kernel);
    assert!(r2.ok, "{r2:?}");
    assert_eq!(
        (
            read(root, HUGEPAGES_CONF),
            read(root, MAYASTOR_MODULES_CONF)
        ),
        before
    );
    assert_eq!(kernel.calls().len(), 2, "{:?}", kernel.calls());
}

#[test]
fn mayastor_after_reboot_rewrites_nothing_but_reloads_the_module() {
    // After a reboot the files are there; /proc is fresh: hugepages applied at boot by
    // systemd-sysctl, module loaded by systemd-modules-load. Act out only the sysctl part.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        hugepages_total: 1024,
        ..Default::default()
    }
    .write(root)
    .unwrap();
    std::fs::create_dir_all(root.join("etc/sysctl.d")).unwrap();
    std::fs::create_dir_all(root.join("etc/modules-load.d")).unwrap();
    std::fs::write(
        root.join(HUGEPAGES_CONF),
        "# added by hand\nvm.nr_hugepages = 1024\n",
    )
    .unwrap();
    std::fs::write(root.join(MAYASTOR_MODULES_CONF), "nvme_tcp\n").unwrap();
    let kernel = FakeKernel::new(root);
    let r = prepare(root, Storage::Mayastor, Target::X86_64Efi, &kernel);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        read(root, HUGEPAGES_CONF),
        "# added by hand\nvm.nr_hugepages = 1024\n"
    );
    // `nvme_tcp` is the same module: kept, not duplicated.
    assert_eq!(read(root, MAYASTOR_MODULES_CONF), "nvme_tcp\n");
    assert_eq!(kernel.calls(), ["modprobe nvme-tcp"]);
}

#[test]
fn mayastor_on_a_small_node_reports_why_and_reserves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        mem_total_kib: 1_917_292, // a 2 GB machine
        ..Default::default()
    }
    .write(root)
    .unwrap();
    let kernel = FakeKernel::new(root);
    let r = prepare(root, Storage::Mayastor, Target::X86_64Efi, &kernel);
    assert!(!r.ok);
    assert!(
        r.problems[0].contains("1872 MiB of RAM") && r.problems[0].contains("at least 4 GiB"),
        "{r:?}"
    );
    assert!(r.fixes[0].contains("4 GB"), "{r:?}");
    assert!(!root.join(HUGEPAGES_CONF).exists());
    assert!(!kernel.calls().iter().any(|c| c.starts_with("sysctl")));
}

#[test]
fn mayastor_reports_fragmented_memory_and_a_kernel_without_nvme_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        release: "6.8.0-1015-raspi".into(),
        modules: vec!["kernel/drivers/net/vxlan/vxlan.ko.zst".into()],
        ..Default::default()
    }
    .write(root)
    .unwrap();
    let kernel = FakeKernel::new(root).with_hugepages_limit(300);
    let r = prepare(root, Storage::Mayastor, Target::Rpi4, &kernel);
    assert!(!r.ok);
    assert_eq!(r.problems.len(), 2, "{r:?}");
    assert!(
        r.problems[0].contains("only 300 of 1024 hugepages"),
        "{r:?}"
    );
    assert!(r.fixes[0].contains("reboot"), "{r:?}");
    assert!(
        r.problems[1].contains("kernel 6.8.0-1015-raspi has no nvme-tcp module"),
        "{r:?}"
    );
    assert_eq!(
        r.fixes[1],
        "apt-get install linux-modules-extra-raspi and reboot"
    );
    // Persisted for the next boot, but no module line for a module that does not exist.
    assert_eq!(read(root, HUGEPAGES_CONF), "vm.nr_hugepages = 1024\n");
    assert!(!root.join(MAYASTOR_MODULES_CONF).exists());
    assert_eq!(kernel.calls(), ["sysctl -w vm.nr_hugepages=1024"]);
}

// Longhorn's preparation is tested in addons_longhorn.rs.

#[test]
fn rook_ceph_names_its_prerequisites() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        modules: vec![],
        ..Default::default()
    }
    .write(root)
    .unwrap();
    let r = prepare(
        root,
        Storage::RookCeph,
        Target::X86_64Efi,
        &FakeKernel::new(root),
    );
    assert!(!r.ok);
    assert!(r.problems[0].contains("lvm2"), "{r:?}");
    assert!(r.problems[1].contains("no rbd module"), "{r:?}");
    assert!(
        r.fixes[1].contains("linux-modules-extra-6.8.0-49-generic"),
        "{r:?}"
    );
    assert!(r.notes.iter().any(|n| n.contains("internet")));
    assert!(r.notes.iter().any(|n| n.contains("raw, unformatted disk")));
}

#[test]
fn pi_checks_pass_on_a_good_pi() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        release: "6.8.0-1015-raspi".into(),
        ..Default::default()
    }
    .write(root)
    .unwrap();
    let r = prepare(root, Storage::None, Target::Rpi5, &FakeKernel::new(root));
    assert_eq!(r, Readiness::default());
}

#[test]
fn pi_without_memory_cgroup_or_vxlan_gets_both_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        release: "5.13.0-1008-raspi".into(),
        modules: vec![],
        cgroup_controllers: Some("cpuset cpu io pids".into()),
        ..Default::default()
    }
    .write(root)
    .unwrap();
    let r = prepare(root, Storage::None, Target::Rpi4, &FakeKernel::new(root));
    assert!(!r.ok);
    assert_eq!(r.problems.len(), 2, "{r:?}");
    assert!(r.problems[0].contains("memory cgroup is not enabled"));
    assert_eq!(
        r.fixes[0],
        "add `cgroup_enable=memory cgroup_memory=1` to the single line of /boot/firmware/cmdline.txt and reboot"
    );
    assert!(r.problems[1].contains("kernel 5.13.0-1008-raspi has no vxlan module"));
    assert_eq!(
        r.fixes[1],
        "apt-get install linux-modules-extra-raspi and reboot"
    );
    // The same root is fine for an x86 target: the Pi checks run only for Pis.
    let r = prepare(
        root,
        Storage::None,
        Target::X86_64Efi,
        &FakeKernel::new(root),
    );
    assert!(r.ok);
}

#[test]
fn pi_with_cgroup_v1_memory_and_builtin_vxlan_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot {
        release: "5.4.0-1080-raspi".into(),
        modules: vec![],
        builtin: vec!["kernel/drivers/net/vxlan.ko".into()],
        cgroup_controllers: None,
        ..Default::default()
    }
    .write(root)
    .unwrap();
    std::fs::write(
        root.join("proc/cgroups"),
        "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\nmemory\t0\t80\t1\n",
    )
    .unwrap();
    let r = prepare(root, Storage::None, Target::Rpi4, &FakeKernel::new(root));
    assert!(r.ok, "{r:?}");
    std::fs::write(root.join("proc/cgroups"), "memory\t0\t80\t0\n").unwrap();
    let r = prepare(root, Storage::None, Target::Rpi4, &FakeKernel::new(root));
    assert!(!r.ok);
}

#[test]
fn pi_cmdline_flags_are_added_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("boot/firmware")).unwrap();
    std::fs::write(
        root.join(PI_CMDLINE),
        "console=serial0,115200 root=LABEL=writable rootwait cgroup_memory=1\n",
    )
    .unwrap();
    assert!(ensure_pi_cgroup_flags(root).unwrap());
    let once = read(root, PI_CMDLINE);
    assert_eq!(
        once,
        "console=serial0,115200 root=LABEL=writable rootwait cgroup_memory=1 cgroup_enable=memory\n"
    );
    assert!(!ensure_pi_cgroup_flags(root).unwrap());
    assert_eq!(read(root, PI_CMDLINE), once);
}

#[test]
fn pi_cgroup_step_reboots_once_and_never_loops() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("boot/firmware")).unwrap();
    std::fs::create_dir_all(root.join("sys/fs/cgroup")).unwrap();
    // Not a Pi layout: nothing to do, even without the memory controller.
    std::fs::write(
        root.join("sys/fs/cgroup/cgroup.controllers"),
        "cpu io pids\n",
    )
    .unwrap();
    assert_eq!(pi_cgroup_step(root).unwrap(), PiCgroup::Ready);
    // A Pi without the flags: they are added and one reboot is asked for.
    std::fs::write(
        root.join(PI_CMDLINE),
        "console=tty1 root=LABEL=writable rootwait\n",
    )
    .unwrap();
    assert_eq!(pi_cgroup_step(root).unwrap(), PiCgroup::RebootNeeded);
    assert!(read(root, PI_CMDLINE).contains("cgroup_enable=memory cgroup_memory=1"));
    // Booted again and the kernel still has no memory cgroup: no second reboot.
    assert_eq!(pi_cgroup_step(root).unwrap(), PiCgroup::FlagsIgnored);
    // Booted with the flags honoured.
    std::fs::write(
        root.join("sys/fs/cgroup/cgroup.controllers"),
        "cpu memory io pids\n",
    )
    .unwrap();
    assert_eq!(pi_cgroup_step(root).unwrap(), PiCgroup::Ready);
}

#[test]
fn a_root_without_proc_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(prepare_node(
        dir.path(),
        Storage::Mayastor,
        Target::X86_64Efi,
        &FakeKernel::new(dir.path()),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("proc/meminfo"), "{err}");
}

#[test]
fn files_are_world_readable_and_a_write_failure_names_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot::default().write(root).unwrap();
    let r = prepare(
        root,
        Storage::Mayastor,
        Target::X86_64Efi,
        &FakeKernel::new(root),
    );
    assert!(r.ok, "{r:?}");
    for f in [HUGEPAGES_CONF, MAYASTOR_MODULES_CONF] {
        let mode = std::fs::metadata(root.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{f}");
    }

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    FakeRoot::default().write(root).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/sysctl.d"), "not a directory").unwrap();
    let err = run(prepare_node(
        root,
        Storage::Mayastor,
        Target::X86_64Efi,
        &FakeKernel::new(root),
    ))
    .unwrap_err();
    assert!(
        err.to_string().contains("20-microk8s-hugepages.conf"),
        "{err}"
    );
}
