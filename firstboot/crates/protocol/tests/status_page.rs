//! The node's public status page, as a person sees it: a coordinator on loopback serves a
//! hand-made status document, headless Chromium opens `https://127.0.0.1:PORT/` and dumps the
//! DOM it rendered, and the test checks what is shown (node ids, phases, roles, timeline
//! entries) and that a hostile host name is shown as text, not run as markup.
//!
//! Needs Debian's `chromium` package (`apt-get install --no-install-recommends chromium`);
//! fails loudly without it. Also checks the same document at `/status.json` without
//! authentication, and that `/v1/status` still refuses an unauthenticated reader.

use std::net::SocketAddr;
use std::time::Duration;

use rackseed_host::command::Cmd;
use rackseed_protocol::coordinator::{Coordinator, CoordinatorConfig, NodeIdentity};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::status::{
    AddonRow, CoordinatorRejections, MemberRow, Microk8sView, PeerRow, Rejections, StatusDoc,
    TimelineEntry,
};
use rackseed_protocol::tls::PeerCertVerifier;

const HOSTILE: &str = "<img src=x onerror=alert(1)><script>document.title='pwned'</script>";

fn doc() -> StatusDoc {
    StatusDoc {
        version: "0.1.0".into(),
        node_id: "node-a1".into(),
        hostname: HOSTILE.into(),
        address: Some("10.0.0.11".into()),
        phase: "member".into(),
        role: Some("control-plane".into()),
        cluster: Some("1.node-a1".into()),
        authority: Some("node-a1".into()),
        peers: vec![
            PeerRow {
                node_id: "node-b2".into(),
                address: "10.0.0.12".into(),
                phase: "joining".into(),
                role: Some("control-plane".into()),
            },
            PeerRow {
                node_id: "node-c3".into(),
                address: "10.0.0.13".into(),
                phase: "waiting".into(),
                role: None,
            },
        ],
        members: vec![MemberRow {
            node_id: "node-a1".into(),
            role: "control-plane".into(),
        }],
        microk8s: Some(Microk8sView {
            running: true,
            voters: vec!["10.0.0.11:19001".into()],
            standby: vec![],
            ha: false,
            note: None,
        }),
        addons: vec![AddonRow {
            name: "metallb".into(),
            state: "pending".into(),
            reason: Some("waiting for HA".into()),
        }],
        problems: vec!["hugepages not reserved".into()],
        fixes: vec!["add hugepages=1024 to the kernel command line".into()],
        last_error: None,
        timeline: vec![
            TimelineEntry {
                at: 0.4,
                what: "discovering peers".into(),
            },
            TimelineEntry {
                at: 31.7,
                what: "bootstrapped cluster as seed".into(),
            },
        ],
        control_plane_size: Some(3),
        rejections: Rejections {
            coordinator: CoordinatorRejections {
                unauthorized: 3,
                ..CoordinatorRejections::default()
            },
            ..Rejections::default()
        },
        // Sections this page test does not cover (the API address, storage health).
        ..StatusDoc::default()
    }
}

async fn start() -> (Coordinator<serde_json::Value>, NodeIdentity) {
    let identity = NodeIdentity::generate().expect("identity");
    let (coord, mut inbound) = Coordinator::<serde_json::Value>::start(CoordinatorConfig {
        secret: ClusterSecret::from_bytes([5; 32]),
        identity: identity.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    })
    .await
    .expect("coordinator starts on loopback");
    tokio::spawn(async move { while inbound.recv().await.is_some() {} });
    (coord, identity)
}

async fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("temp dir");
    let out = Cmd::new("chromium", Duration::from_secs(90))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .env("HOME", profile.path())
        .run()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "headless chromium could not render {url}: {:#}\n\
                 install it with: apt-get install --no-install-recommends chromium",
                anyhow::Error::from(e)
            )
        });
    out.stdout
}

#[tokio::test]
async fn chromium_shows_the_status_page_with_hostile_values_escaped() {
    let (coord, _id) = start().await;
    coord.set_status_from(&doc()).unwrap();
    let url = format!("https://{}/", coord.local_addr());
    let dom = chromium_dom(&url).await;

    assert!(
        dom.contains("<span id=\"node-id\">node-a1</span>"),
        "node id heading missing:\n{dom}"
    );
    for want in [
        "<td>node-b2</td><td>10.0.0.12</td><td>joining</td><td>control-plane</td>",
        "<td>node-c3</td><td>10.0.0.13</td><td>waiting</td><td>-</td>",
        "<th>phase</th><td>member</td>",
        "<td>+0.4</td><td>discovering peers</td>",
        "<td>+31.7</td><td>bootstrapped cluster as seed</td>",
        "<td>metallb</td><td>pending</td><td>waiting for HA</td>",
        "hugepages not reserved",
        "10.0.0.11:19001",
        "<td>coordinator</td><td>unauthorized (401)</td><td>3</td>",
    ] {
        assert!(dom.contains(want), "page lacks {want:?}:\n{dom}");
    }
    // The hostile host name is text in the host-name cell: Chromium re-escapes text nodes
    // when it serialises the DOM, and no element of it exists.
    assert!(
        dom.contains(
            "<th>host name</th><td>&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;document.title='pwned'&lt;/script&gt;</td>"
        ),
        "hostile host name not shown as text:\n{dom}"
    );
    assert!(!dom.contains("<img"), "an img element was created:\n{dom}");
    assert!(
        !dom.contains("<script"),
        "a script element was created:\n{dom}"
    );
    assert!(
        !dom.contains("<title>pwned</title>"),
        "a script ran:\n{dom}"
    );
    assert!(coord.stats().page_reads >= 1);
}

#[tokio::test]
async fn chromium_shows_a_notice_before_the_first_status() {
    let (coord, _id) = start().await;
    let dom = chromium_dom(&format!("https://{}/", coord.local_addr())).await;
    assert!(
        dom.contains("has not published its status yet"),
        "no notice:\n{dom}"
    );
}

#[tokio::test]
async fn json_is_public_but_the_authenticated_routes_stay_closed() {
    let (coord, id) = start().await;
    coord.set_status_from(&doc()).unwrap();
    let tls = PeerCertVerifier::pinned(id.fingerprint())
        .unwrap()
        .client_config()
        .unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://{}", coord.local_addr());

    let resp = http
        .get(format!("{base}/status.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: StatusDoc = resp.json().await.unwrap();
    assert_eq!(got, doc());

    let resp = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    let r = http.get(format!("{base}/v1/status")).send().await.unwrap();
    assert_eq!(r.status(), 401, "status over /v1 needs authentication");
    let r = http
        .post(format!("{base}/v1/kubeconfig"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the kubeconfig needs authentication");
    let r = http.post(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(coord.stats().unauthorized, 2);
}
