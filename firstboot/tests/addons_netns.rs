//! The MetalLB auto range with real ARP probing (`arping`) in network namespaces: an address
//! another host already holds is never chosen. Needs root, iproute2 and iputils-arping; fails
//! loudly without them. Bounded: every probe is killed after a few seconds and the whole choice
//! has a 60 s limit.

use std::net::Ipv4Addr;
use std::time::Duration;

use firstboot::addons::autorange::{
    choose_auto_range, interface_ipv4, AddressProber, ArpingProber, AutoRangeRequest,
};
use firstboot::addons::plan::format_block;
use netns_lab::Lab;

const LIMIT: Duration = Duration::from_secs(60);

fn in_lab<T: Send + 'static>(
    lab: &Lab,
    host: usize,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    lab.host(host)
        .spawn_thread(f)
        .join()
        .expect("lab thread panicked")
        .expect("lab thread failed")
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(async { tokio::time::timeout(LIMIT, f).await })?)
}

#[test]
fn arping_tells_held_addresses_from_free_ones() {
    let lab = Lab::new(2).expect("creating the network lab (needs root)");
    let other = lab.host(1).addr;
    let (held, free) = in_lab(&lab, 0, move || {
        block_on(async move {
            let p = ArpingProber::new("eth0");
            (
                p.in_use(other).await.unwrap(),
                p.in_use(Ipv4Addr::new(10, 231, 0, 200)).await.unwrap(),
            )
        })
    });
    assert!(
        held,
        "{other} is held by host 1 and must be reported in use"
    );
    assert!(
        !free,
        "10.231.0.200 is held by nobody and must be reported free"
    );
}

#[test]
fn addresses_held_by_another_host_are_never_chosen() {
    let lab = Lab::new(2).expect("creating the network lab (needs root)");
    // Host 1 also holds two addresses at the top of the subnet, unknown to the chooser.
    for a in ["10.231.0.254/24", "10.231.0.252/24"] {
        lab.host(1)
            .cmd("ip", Duration::from_secs(10))
            .args(["addr", "add", a, "dev", "eth0"])
            .run_blocking()
            .unwrap();
    }
    let nodes = vec![lab.host(0).addr, lab.host(1).addr];
    let started = std::time::Instant::now();
    let got = in_lab(&lab, 0, move || {
        block_on(async move {
            let iface = interface_ipv4("eth0").await?;
            assert_eq!(iface, "10.231.0.1/24".parse().unwrap());
            let req = AutoRangeRequest {
                interface: iface,
                nodes,
                reserved: vec![],
                count: 4,
            };
            anyhow::Ok(choose_auto_range(&ArpingProber::new("eth0"), &req).await?)
        })?
    });
    eprintln!("auto range chosen in {:?}: {got:?}", started.elapsed());
    let held = [
        Ipv4Addr::new(10, 231, 0, 254),
        Ipv4Addr::new(10, 231, 0, 252),
    ];
    for h in held {
        assert!(!got.addresses.contains(&h), "{h} is in use but was chosen");
    }
    assert_eq!(got.in_use, held);
    assert_eq!(
        got.addresses,
        [249, 250, 251, 253].map(|d| Ipv4Addr::new(10, 231, 0, d))
    );
    let blocks: Vec<String> = got.blocks.iter().map(format_block).collect();
    assert_eq!(blocks, ["10.231.0.249-10.231.0.251", "10.231.0.253/32"]);
}
