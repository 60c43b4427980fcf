//! `imagebuilder kubeconfig` for a cluster with a floating API address: the member's status
//! document names the address, and the kubeconfig's `server:` is that address, not the node's;
//! an `"auto"` address (not in the API certificate) also gets `tls-server-name: kubernetes`.
//! A stand-in control-plane node (real coordinator and mDNS discovery, a fake kubeconfig
//! provider) and the workstation in network namespaces. Needs root; fails loudly without.

mod status_support;

use std::time::Duration;

use netns_lab::Lab;
use rackseed_config::Role::ControlPlane;
use rackseed_formation::PhaseSummary::Member;
use rackseed_protocol::status::ApiAddressView;
use status_support::{member_doc, spawn, Kubeconfig, CP};

const RUN: Duration = Duration::from_secs(90);

/// What the stand-in's `microk8s config` answers (the kubeconfig tests' one fixture).
const FAKE: &str = include_str!("fixtures/microk8s-config.yaml");

#[test]
fn the_kubeconfig_names_the_floating_api_address() {
    let lab = Lab::new(2).expect("creating the network lab (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let (secret, secret_path) = status_support::secret_file(dir.path(), "cluster.secret");
    let sp = secret_path.to_str().unwrap();
    let ip = lab.host(0).addr;
    let ws = lab.host(1).clone();
    let members = [("node-a", CP)];
    let mut doc = member_doc("node-a", ip, CP, &members, &[ip]);
    doc.api_address = Some(ApiAddressView {
        address: Some("10.231.0.100".into()),
        held_here: false,
        state: "standing by".into(),
        in_certificate: true,
        ..ApiAddressView::default()
    });
    let mut node = spawn(
        lab.host(0),
        "node-a",
        &secret,
        doc.clone(),
        Member,
        Some(ControlPlane),
        Kubeconfig::Serve(FAKE.into()),
    )
    .unwrap();

    let kubeconfig = |ws: &netns_lab::Host| {
        let out = status_support::imagebuilder_in(
            ws,
            &["kubeconfig", "--secret", sp, "--timeout", "30s"],
            RUN,
        )
        .unwrap();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        out.stdout
    };
    // A fixed address is in the certificate: only server: changes.
    assert_eq!(
        kubeconfig(&ws),
        FAKE.replace("https://127.0.0.1:16443", "https://10.231.0.100:16443")
    );

    // An "auto" address is not: the certificate's kubernetes name is checked instead.
    doc.api_address.as_mut().unwrap().in_certificate = false;
    node.set_status(doc);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        kubeconfig(&ws),
        FAKE.replace(
            "    server: https://127.0.0.1:16443\n",
            "    server: https://10.231.0.100:16443\n    tls-server-name: kubernetes\n"
        )
    );
    node.stop().unwrap();
}
