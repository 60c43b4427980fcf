//! rackseed's QEMU test-cluster launcher, used by `imagebuilder qemu ...` ([`cli`]) and by the
//! end-to-end tests ([`Cluster`]).
//!
//! A cluster is N QEMU nodes booting copy-on-write overlays of one image. The nodes share a
//! multicast socket network bound to 127.0.0.1 (mDNS works between them, nothing leaves the
//! machine) and each has a management NIC whose only way in is a port forward on 127.0.0.1.
//! Serial consoles go to files; QEMU daemonizes, and the state is kept in `<dir>/cluster.json`.
//!
//! What a guest sees (the image must cope with it):
//! - NIC 1, the cluster network, MAC `52:54:HH:HH:00:II` (`II` = node index): no DHCP server
//!   on it; each node's cloud-init NoCloud seed ([`seed`]) gives it `<subnet> + 10 + II`
//!   (default 192.168.76.(10+II)/24). Multicast works across it.
//! - NIC 2, management, MAC `52:54:HH:HH:01:II`: QEMU's user-mode network, 10.0.2.15 on every
//!   node (static in the seed; QEMU's DHCP would give the same), no route anywhere; the host
//!   reaches the guest's port 7443 through `127.0.0.1:<mgmt port>`. Being the same address on
//!   every node, it must not be announced to peers (discovery should skip this NIC).
//! - a virtio disk (the overlay), a virtio RNG, the serial console on ttyS0 / ttyAMA0.
//!
//! Modules, in the order a node comes to life:
//! - [`accel`]: KVM or TCG, decided by a timed probe;
//! - [`node`]: one node's spec and its QEMU argv (pure);
//! - [`seed`]: the node's NoCloud seed (meta-data, network-config, user-data on a `CIDATA` volume);
//! - [`cluster`]: the life cycle (up, status, stop, kill, start, add, down);
//! - [`qmp`]: the QMP client used to power off and quit nodes;
//! - [`state`]: the state file;
//! - [`cli`]: the clap subcommands.

pub mod accel;
pub mod cli;
pub mod cluster;
pub mod node;
pub mod qmp;
pub mod seed;
pub mod state;

pub use accel::{choose_accel, probe_kvm, AccelChoice, ProbeReport};
pub use cluster::{
    BootSource, Cluster, ClusterError, ClusterSpec, NodeRunState, NodeStatus, StopOutcome,
};
pub use node::{qemu_argv, Accel, Arch, Boot, LbForward, NodeSpec};
pub use state::{ClusterState, NodeState};
