//! One QEMU process: [`NodeSpec`] describes a node completely and [`qemu_argv`] turns it into
//! the command line, as a pure function so the network and firmware rules can be unit-tested.
//!
//! Rules the argv keeps, whatever the spec says:
//! - the cluster NIC is a `-netdev socket` multicast group whose outgoing interface is
//!   127.0.0.1 (`localaddr`), so traffic never leaves the machine;
//! - the management NIC is user-mode networking with `restrict=on` (no route out) and host
//!   forwards bound to 127.0.0.1 only (management, API, SSH and, if asked for, the
//!   LoadBalancer forward: see [`LbForward`]);
//! - the serial console is appended to a file, there is no display, QMP is a unix socket, and
//!   QEMU daemonizes (writing its pid file) so the caller can exit.
//!
//! To add a device, add a field to [`NodeSpec`] and emit it in [`qemu_argv`]; keep the
//! `argv_*` tests in this module up to date.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The multicast group every cluster network uses; clusters differ by port.
pub const MCAST_GROUP: &str = "230.0.0.1";
/// The only host address anything is bound to.
pub const LOOPBACK: &str = "127.0.0.1";
/// The guest port the management forward reaches by default (the firstboot status service).
pub const DEFAULT_GUEST_MGMT_PORT: u16 = 7443;
/// MicroK8s' API server port, the second management forward's guest port.
pub const GUEST_API_PORT: u16 = 16443;
/// SSH, the third management forward's guest port.
pub const GUEST_SSH_PORT: u16 = 22;

/// A host forward to an address the guest may hold besides its own (`qemu up --lb-forward
/// ADDRESS:PORT`): MetalLB's layer-2 LoadBalancer address, for the drill to see which VM
/// announces it.
///
/// How it works, from libslirp's source (the version QEMU links here, 4.7; files as in
/// libslirp's `src/`):
/// - `slirp.c`, `slirp_add_hostfwd`: the guest address of a host forward is taken as given;
///   only `0.0.0.0` is replaced by the DHCP start address (10.0.2.15). Unlike guest forwards
///   (`check_guestfwd`), nothing requires it to lie in slirp's 10.0.2.0/24 network.
/// - `tcp_subr.c`, `tcp_connect`: a connection to the host port is accepted at once, then
///   slirp sends the guest a SYN from its own address (10.0.2.2, `sotranslate_accept`) to the
///   forward's guest address and port. The host side is connected before the guest answers,
///   so only an application answer (an HTTP response) says the guest took the connection.
/// - `slirp.c`, `if_encap4`: the frame's destination MAC comes from `arp_table_search`; for an
///   address not in the table slirp broadcasts an ARP request for it on the VM's management
///   NIC (whatever network it is in), holds the packet for 1 s and drops it if no reply came
///   (TCP retransmits and asks again).
/// - `slirp.c`, `arp_input`: any ARP reply is added to the table (`arp_table.c`,
///   `arp_table_add`: no expiry, 16 entries, updated in place). So once the VM has answered,
///   slirp keeps sending to the VM's management MAC: always the right MAC (one guest per
///   slirp), and the guest's IP layer alone decides whether the address is still its own.
/// - `tcp_input.c`: `restrict=on` only drops connections the guest opens; the guest's replies
///   on a host forward's connection pass.
///
/// On the guest side, Linux with `arp_ignore=0` (the default) answers an ARP request on any
/// interface for an address held on any interface, and takes a packet for a local address
/// arriving on any interface. So the forward of VM X reaches the service exactly while X
/// holds the address (MetalLB's speaker puts it on the cluster NIC of the node it elects);
/// on the other VMs the SYN goes unanswered and the request times out. (A VM that held the
/// address before keeps slirp's ARP entry, so its SYNs still reach it; without the address
/// it drops them, or with `ip_forward=1` routes them onto the cluster network, where the
/// holder's reply goes to its own slirp and is dropped: no false "up" either way.)
///
/// Checked on a VM of this launcher (QEMU 7.2 with libslirp 4.7.0, the QEMU test-cluster
/// image, TCG; `arp_ignore=0`, `ip_forward=0`): forward added at run time with HMP
/// `hostfwd_add m0 tcp:127.0.0.1:47080-192.168.76.230:80`, `python3 -m http.server 80` in
/// the guest, `curl -m 8 http://127.0.0.1:47080/` from the host: timed out (8 s) before
/// `ip addr add 192.168.76.230/32 dev enp0s1` (the cluster NIC), HTTP 200 in 0.14–0.49 s
/// after it, timed out again after `ip addr del`, 200 again after re-adding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbForward {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for LbForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

impl FromStr for LbForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let a: SocketAddrV4 = s.parse().map_err(|_| {
            format!("`{s}`: give the guest address and port, e.g. 192.168.76.200:80")
        })?;
        let ip = *a.ip();
        let slirp_net = Ipv4Addr::new(10, 0, 2, 0);
        if ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_multicast()
            || ip.is_broadcast()
            || u32::from(ip) & 0xffff_ff00 == u32::from(slirp_net)
        {
            return Err(format!(
                "`{s}`: {ip} cannot be a LoadBalancer address here (not 0.0.0.0, loopback, multicast, broadcast or QEMU's own 10.0.2.0/24)"
            ));
        }
        if a.port() == 0 {
            return Err(format!("`{s}`: port 0"));
        }
        Ok(LbForward {
            address: ip,
            port: a.port(),
        })
    }
}

/// Guest architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The `qemu-system-*` program for this architecture.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// Whether the host can run this guest with hardware virtualization at all.
    pub fn is_host(self) -> bool {
        matches!(
            (self, std::env::consts::ARCH),
            (Arch::X86_64, "x86_64") | (Arch::Aarch64, "aarch64")
        )
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown architecture `{other}` (expected x86_64 or aarch64)"
            )),
        }
    }
}

/// The accelerator a node actually runs with (see [`crate::accel`] for choosing it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How a node boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// UEFI firmware from the disk: `code` is mapped read-only, `vars` is this node's own copy.
    Uefi { code: PathBuf, vars: PathBuf },
    /// Direct kernel boot (`-kernel/-initrd/-append`), e.g. a Pi image's kernel from `system-boot`.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
}

/// Everything one QEMU process needs. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// `rackseed-<cluster>-<node>`, shown by `ps` and QMP.
    pub name: String,
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The node's qcow2 overlay.
    pub disk: PathBuf,
    /// The node's cloud-init NoCloud seed volume (see [`crate::seed`]), attached read-only.
    pub seed: Option<PathBuf>,
    pub boot: Boot,
    /// MAC of the cluster NIC (the first NIC).
    pub mac: String,
    /// MAC of the management NIC.
    pub mgmt_mac: String,
    /// The cluster's multicast port.
    pub mcast_port: u16,
    /// Host port on 127.0.0.1 forwarded to `guest_mgmt_port`.
    pub mgmt_host_port: u16,
    pub guest_mgmt_port: u16,
    /// Host port on 127.0.0.1 forwarded to the guest's MicroK8s API ([`GUEST_API_PORT`]).
    pub api_host_port: Option<u16>,
    /// Host port on 127.0.0.1 forwarded to the guest's SSH server ([`GUEST_SSH_PORT`]).
    pub ssh_host_port: Option<u16>,
    /// Host port on 127.0.0.1 forwarded to an extra guest address and port ([`LbForward`]).
    pub lb_forward: Option<(u16, LbForward)>,
    /// The management NIC may reach beyond the host (QEMU's NAT; `restrict=off`), e.g. for
    /// the nodes to install the MicroK8s snap. Off by default: nothing leaves the machine.
    pub uplink: bool,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub pid_file: PathBuf,
    /// Exit QEMU instead of rebooting the guest.
    pub no_reboot: bool,
}

/// The argv (program first) that starts `spec` as a daemonized QEMU.
pub fn qemu_argv(spec: &NodeSpec) -> Vec<String> {
    let mut a: Vec<String> = vec![spec.arch.qemu_binary().into()];
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push_machine_args(spec, &mut push);
    push_control_args(spec, &mut push);
    push_network_args(spec, &mut push);
    push_disk_args(spec, &mut push);
    push_boot_args(spec, &mut push);
    if spec.no_reboot {
        push(&["-no-reboot"]);
    }
    a
}

/// Pushes the name, machine type, accelerator, CPU model, memory, CPU count and UUID.
fn push_machine_args(spec: &NodeSpec, push: &mut impl FnMut(&[&str])) {
    push(&["-name", &spec.name]);
    match spec.arch {
        Arch::X86_64 => push(&["-machine", "q35"]),
        Arch::Aarch64 => push(&["-machine", "virt"]),
    }
    push(&["-accel", &spec.accel.to_string()]);
    let cpu = match (spec.accel, spec.arch) {
        (Accel::Kvm, _) => "host",
        (Accel::Tcg, Arch::X86_64) => "max",
        // pauth-impdef: the architected pointer-auth algorithm is very slow under TCG.
        (Accel::Tcg, Arch::Aarch64) => "max,pauth-impdef=on",
    };
    push(&["-cpu", cpu]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.cpus.to_string()]);
    // A machine UUID of its own per node (SMBIOS): systemd derives a VM's machine id from it
    // on first boot, so without it every node would get the same identity.
    push(&["-uuid", &node_uuid(&spec.mac)]);
}

/// Pushes the headless daemon options: pid file, QMP socket and the serial log.
fn push_control_args(spec: &NodeSpec, push: &mut impl FnMut(&[&str])) {
    push(&["-nodefaults", "-display", "none", "-daemonize"]);
    push(&["-pidfile", &path_arg(&spec.pid_file)]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", path_arg(&spec.qmp_socket)),
    ]);
    push(&[
        "-chardev",
        &format!(
            "file,id=serial0,path={},append=on",
            path_arg(&spec.serial_log)
        ),
        "-serial",
        "chardev:serial0",
    ]);
}

/// Pushes the two NICs: the cluster network (loopback multicast) and the management network.
fn push_network_args(spec: &NodeSpec, push: &mut impl FnMut(&[&str])) {
    // Cluster network: multicast over loopback only.
    push(&[
        "-netdev",
        &format!(
            "socket,id=n0,mcast={MCAST_GROUP}:{},localaddr={LOOPBACK}",
            spec.mcast_port
        ),
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={}", spec.mac),
    ]);
    // Management network: no route out (unless asked for), forwards from 127.0.0.1 only.
    let mut user = format!(
        "user,id=m0,{}hostfwd=tcp:{LOOPBACK}:{}-:{}",
        if spec.uplink { "" } else { "restrict=on," },
        spec.mgmt_host_port,
        spec.guest_mgmt_port
    );
    if let Some(api) = spec.api_host_port {
        user.push_str(&format!(",hostfwd=tcp:{LOOPBACK}:{api}-:{GUEST_API_PORT}"));
    }
    if let Some(ssh) = spec.ssh_host_port {
        user.push_str(&format!(",hostfwd=tcp:{LOOPBACK}:{ssh}-:{GUEST_SSH_PORT}"));
    }
    if let Some((host, to)) = spec.lb_forward {
        user.push_str(&format!(
            ",hostfwd=tcp:{LOOPBACK}:{host}-{}:{}",
            to.address, to.port
        ));
    }
    push(&[
        "-netdev",
        &user,
        "-device",
        &format!("virtio-net-pci,netdev=m0,mac={}", spec.mgmt_mac),
    ]);
}

/// Pushes the node's disk and the virtio RNG device.
fn push_disk_args(spec: &NodeSpec, push: &mut impl FnMut(&[&str])) {
    push(&[
        "-drive",
        &format!(
            "if=none,id=disk0,format=qcow2,file={}",
            path_arg(&spec.disk)
        ),
        "-device",
        // With -kernel, QEMU's linuxboot option ROM holds boot index 0.
        match spec.boot {
            Boot::Uefi { .. } => "virtio-blk-pci,drive=disk0,bootindex=0",
            Boot::Kernel { .. } => "virtio-blk-pci,drive=disk0",
        },
    ]);
    if let Some(seed) = &spec.seed {
        push(&[
            "-drive",
            &format!(
                "if=none,id=seed0,format=raw,readonly=on,file={}",
                path_arg(seed)
            ),
            "-device",
            "virtio-blk-pci,drive=seed0",
        ]);
    }
    push(&[
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]);
}

/// Pushes the firmware flash drives (UEFI) or the kernel, initrd and command line.
fn push_boot_args(spec: &NodeSpec, push: &mut impl FnMut(&[&str])) {
    match &spec.boot {
        Boot::Uefi { code, vars } => push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                path_arg(code)
            ),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", path_arg(vars)),
        ]),
        Boot::Kernel {
            kernel,
            initrd,
            append,
        } => {
            push(&["-kernel", &path_arg(kernel)]);
            if let Some(initrd) = initrd {
                push(&["-initrd", &path_arg(initrd)]);
            }
            push(&["-append", append]);
        }
    }
}

/// A path inside a QEMU `key=value,...` option: commas are doubled, QEMU's escape.
fn path_arg(p: &std::path::Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Locally administered, deterministic MACs: `52:54:HH:HH:RR:II` where `HH:HH` derives from
/// the cluster id, `RR` is 00 for the cluster NIC and 01 for the management NIC, and `II` is
/// the node index. 0x52 has the locally-administered bit set and the multicast bit clear.
pub fn node_macs(cluster_id: &str, index: u8) -> (String, String) {
    let h = fnv1a(cluster_id.as_bytes());
    let (a, b) = ((h >> 8) as u8, h as u8);
    (
        format!("52:54:{a:02x}:{b:02x}:00:{index:02x}"),
        format!("52:54:{a:02x}:{b:02x}:01:{index:02x}"),
    )
}

/// A deterministic RFC 4122 version-4-shaped UUID from the node's (unique) cluster MAC.
pub fn node_uuid(mac: &str) -> String {
    let hi = fnv1a(mac.as_bytes());
    let lo = fnv1a(format!("{mac}/rackseed").as_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xfff,
        lo >> 52,
        lo & 0xffff_ffff_ffff
    )
}

/// 64-bit FNV-1a: a stable, dependency-free hash for deterministic MACs and ports.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(i: u8) -> NodeSpec {
        let (mac, mgmt_mac) = node_macs("/var/tmp/cluster-a", i);
        NodeSpec {
            name: format!("rackseed-a-node{i}"),
            arch: Arch::X86_64,
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            disk: format!("/s/node{i}.qcow2").into(),
            seed: Some(format!("/s/node{i}.seed.img").into()),
            boot: Boot::Uefi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                vars: format!("/s/node{i}.vars.fd").into(),
            },
            mac,
            mgmt_mac,
            mcast_port: 41000,
            mgmt_host_port: 45000 + u16::from(i),
            guest_mgmt_port: DEFAULT_GUEST_MGMT_PORT,
            api_host_port: Some(46000 + u16::from(i)),
            ssh_host_port: Some(47000 + u16::from(i)),
            lb_forward: None,
            uplink: false,
            serial_log: format!("/s/node{i}.serial.log").into(),
            qmp_socket: format!("/s/node{i}.qmp").into(),
            pid_file: format!("/s/node{i}.pid").into(),
            no_reboot: false,
        }
    }

    fn values_after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn argv_binds_every_network_to_loopback() {
        let argv = qemu_argv(&spec(0));
        let netdevs = values_after(&argv, "-netdev");
        assert_eq!(netdevs.len(), 2, "{argv:?}");
        assert_eq!(
            netdevs[0],
            "socket,id=n0,mcast=230.0.0.1:41000,localaddr=127.0.0.1"
        );
        assert_eq!(
            netdevs[1],
            "user,id=m0,restrict=on,hostfwd=tcp:127.0.0.1:45000-:7443,\
             hostfwd=tcp:127.0.0.1:46000-:16443,hostfwd=tcp:127.0.0.1:47000-:22"
        );
        // No other address appears anywhere on the command line.
        for a in &argv {
            for word in a.split([',', '=', ':', ' ']) {
                let dots = word.chars().filter(|c| *c == '.').count();
                if dots == 3 && word.chars().all(|c| c.is_ascii_digit() || c == '.') {
                    assert!(
                        word == "127.0.0.1" || word == "230.0.0.1",
                        "unexpected address {word} in {a}"
                    );
                }
            }
        }
    }

    #[test]
    fn argv_forwards_the_lb_address_from_loopback_only_when_asked() {
        let mut s = spec(1);
        s.lb_forward = Some((48001, "192.168.76.200:80".parse().unwrap()));
        let argv = qemu_argv(&s);
        let user = values_after(&argv, "-netdev")[1];
        assert_eq!(
            user,
            "user,id=m0,restrict=on,hostfwd=tcp:127.0.0.1:45001-:7443,\
             hostfwd=tcp:127.0.0.1:46001-:16443,hostfwd=tcp:127.0.0.1:47001-:22,\
             hostfwd=tcp:127.0.0.1:48001-192.168.76.200:80"
        );
        // Still no route out, and nothing else names the address.
        assert!(user.contains("restrict=on"));
        assert_eq!(
            argv.iter().filter(|a| a.contains("192.168.76.200")).count(),
            1
        );
        assert!(!values_after(&qemu_argv(&spec(1)), "-netdev")[1].contains("192.168.76.200"));
    }

    #[test]
    fn lb_forwards_parse_and_refuse_what_slirp_or_a_lan_cannot_use() {
        let f: LbForward = "192.168.76.200:80".parse().unwrap();
        assert_eq!((f.address, f.port), (Ipv4Addr::new(192, 168, 76, 200), 80));
        assert_eq!(f.to_string(), "192.168.76.200:80");
        for bad in [
            "192.168.76.200",
            "192.168.76.200:0",
            "0.0.0.0:80",
            "127.0.0.1:80",
            "10.0.2.15:80",
            "10.0.2.200:80",
            "224.0.0.251:80",
            "255.255.255.255:80",
            "[::1]:80",
            "lb:80",
        ] {
            let e = bad.parse::<LbForward>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!("10.0.3.1:80".parse::<LbForward>().is_ok());
    }

    #[test]
    fn argv_uplink_lifts_the_restriction_only_when_asked() {
        let mut s = spec(0);
        s.uplink = true;
        s.api_host_port = None;
        s.ssh_host_port = None;
        let argv = qemu_argv(&s);
        assert_eq!(
            values_after(&argv, "-netdev")[1],
            "user,id=m0,hostfwd=tcp:127.0.0.1:45000-:7443"
        );
    }

    #[test]
    fn argv_has_serial_file_qmp_daemonize_and_no_display() {
        let argv = qemu_argv(&spec(1));
        assert_eq!(argv[0], "qemu-system-x86_64");
        assert!(argv.contains(&"-daemonize".to_string()));
        assert!(argv.contains(&"-nodefaults".to_string()));
        assert_eq!(values_after(&argv, "-display"), ["none"]);
        assert_eq!(
            values_after(&argv, "-qmp"),
            ["unix:/s/node1.qmp,server=on,wait=off"]
        );
        assert_eq!(
            values_after(&argv, "-chardev"),
            ["file,id=serial0,path=/s/node1.serial.log,append=on"]
        );
        assert_eq!(values_after(&argv, "-pidfile"), ["/s/node1.pid"]);
        assert_eq!(values_after(&argv, "-cpu"), ["max"]);
        assert!(!argv.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn argv_uefi_maps_code_read_only_and_vars_per_node() {
        let argv = qemu_argv(&spec(2));
        let drives = values_after(&argv, "-drive");
        assert!(drives.contains(
            &"if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ));
        assert!(drives.contains(&"if=pflash,format=raw,unit=1,file=/s/node2.vars.fd"));
        assert!(drives.contains(&"if=none,id=disk0,format=qcow2,file=/s/node2.qcow2"));
    }

    #[test]
    fn argv_attaches_the_seed_read_only_and_never_boots_from_it() {
        let argv = qemu_argv(&spec(2));
        let drives = values_after(&argv, "-drive");
        assert!(
            drives.contains(&"if=none,id=seed0,format=raw,readonly=on,file=/s/node2.seed.img"),
            "{argv:?}"
        );
        let devices = values_after(&argv, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=seed0"), "{argv:?}");
        assert_eq!(
            devices.iter().filter(|d| d.contains("bootindex")).count(),
            1,
            "only the disk boots: {argv:?}"
        );
        let mut s = spec(2);
        s.seed = None;
        assert!(!qemu_argv(&s).iter().any(|a| a.contains("seed0")));
    }

    #[test]
    fn argv_kernel_boot_for_aarch64_virt() {
        let mut s = spec(0);
        s.arch = Arch::Aarch64;
        s.boot = Boot::Kernel {
            kernel: "/b/vmlinuz".into(),
            initrd: Some("/b/initrd.img".into()),
            append: "console=ttyAMA0 root=LABEL=writable".into(),
        };
        s.no_reboot = true;
        let argv = qemu_argv(&s);
        assert_eq!(argv[0], "qemu-system-aarch64");
        assert_eq!(values_after(&argv, "-machine"), ["virt"]);
        assert_eq!(values_after(&argv, "-cpu"), ["max,pauth-impdef=on"]);
        assert_eq!(values_after(&argv, "-kernel"), ["/b/vmlinuz"]);
        assert_eq!(values_after(&argv, "-initrd"), ["/b/initrd.img"]);
        assert_eq!(
            values_after(&argv, "-append"),
            ["console=ttyAMA0 root=LABEL=writable"]
        );
        assert!(argv.contains(&"-no-reboot".to_string()));
        assert!(!values_after(&argv, "-drive")
            .iter()
            .any(|d| d.contains("pflash")));
    }

    #[test]
    fn argv_kvm_uses_host_cpu() {
        let mut s = spec(0);
        s.accel = Accel::Kvm;
        let argv = qemu_argv(&s);
        assert_eq!(values_after(&argv, "-accel"), ["kvm"]);
        assert_eq!(values_after(&argv, "-cpu"), ["host"]);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec(0);
        s.disk = "/odd,dir/node0.qcow2".into();
        let argv = qemu_argv(&s);
        assert!(values_after(&argv, "-drive")
            .contains(&"if=none,id=disk0,format=qcow2,file=/odd,,dir/node0.qcow2"));
    }

    #[test]
    fn node_uuids_are_distinct_well_formed_and_deterministic() {
        let ids: std::collections::BTreeSet<String> = (0..=255u8)
            .map(|i| node_uuid(&node_macs("/var/tmp/cluster-a", i).0))
            .collect();
        assert_eq!(ids.len(), 256);
        for id in &ids {
            let parts: Vec<&str> = id.split('-').collect();
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
            assert!(
                parts[2].starts_with('4') && parts[3].starts_with('8'),
                "{id}"
            );
        }
        let mac = node_macs("/var/tmp/cluster-a", 7).0;
        assert_eq!(node_uuid(&mac), node_uuid(&mac));
        let argv = qemu_argv(&spec(1));
        assert_eq!(values_after(&argv, "-uuid").len(), 1, "{argv:?}");
    }

    #[test]
    fn macs_are_unique_locally_administered_and_deterministic() {
        let mut seen = HashSet::new();
        for i in 0..=255u8 {
            let (a, b) = node_macs("/var/tmp/cluster-a", i);
            for m in [&a, &b] {
                let first = u8::from_str_radix(&m[0..2], 16).unwrap();
                assert_eq!(first & 0b10, 0b10, "not locally administered: {m}");
                assert_eq!(first & 0b01, 0, "multicast bit set: {m}");
                assert!(seen.insert(m.clone()), "duplicate MAC {m}");
            }
        }
        assert_eq!(
            node_macs("/var/tmp/cluster-a", 3),
            node_macs("/var/tmp/cluster-a", 3)
        );
        assert_ne!(
            node_macs("/var/tmp/cluster-a", 3).0,
            node_macs("/var/tmp/cluster-b", 3).0
        );
    }

    #[test]
    fn arch_parses_debian_and_kernel_names() {
        assert_eq!("arm64".parse::<Arch>(), Ok(Arch::Aarch64));
        assert_eq!("x86_64".parse::<Arch>(), Ok(Arch::X86_64));
        assert!("riscv64".parse::<Arch>().unwrap_err().contains("riscv64"));
    }
}
