//! The simulator's CLI on its own (no adapter): token rules of add-node (A1, A2), join
//! validation and the broken `--controlplane` (A3), the port check (A4), status formats (A5),
//! `microk8s config` as the snap's wrapper prints it.
//! Needs root (network namespaces). Run: `cargo test -p microk8s-sim --test cli`.

mod support;

use std::time::Duration;

use firstboot::system::microk8s::parse::{
    parse_kubeconfig, parse_status_pretty, parse_status_yaml,
};
use firstboot::system::microk8s::{InstallSource, Microk8s};
use microk8s_sim::http;
use netns_lab::Lab;
use support::*;

fn join_url(seed: &SimNode, token: &str) -> String {
    format!("{}:25000/{token}", seed.host.addr)
}

fn pair(extra: &[(&str, &str)]) -> (Lab, tempfile::TempDir, Vec<SimNode>) {
    let lab = Lab::new(3).expect("creating the network lab (run as root)");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("commands.jsonl");
    let nodes = (0..3)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, if i == 2 { extra } else { &[] }))
        .collect();
    (lab, root, nodes)
}

#[test]
fn add_node_tokens_are_one_time_ttl_or_persistent() {
    let rt = runtime();
    let _g = rt.enter();
    let (_lab, _root, mut n) = pair(&[]);
    for x in &mut n {
        x.install_and_start();
    }
    // Too short: refused (A1: at least 32 characters).
    let o = mk(&n[0], &["add-node", "-t", &"s".repeat(31)]);
    assert_eq!(o.code(), Some(1), "{o:?}");
    // One-time token: consumed even by a join that fails later (A2); here by --controlplane.
    let one = "1".repeat(32);
    assert_eq!(mk(&n[0], &["add-node", "-t", &one]).code(), Some(0));
    let o = mk(&n[1], &["join", &join_url(&n[0], &one), "--controlplane"]);
    assert_eq!(o.code(), Some(1), "--controlplane is broken (A3): {o:?}");
    assert!(o.stdout.contains("supports joining worker nodes"), "{o:?}");
    let o = mk(&n[1], &["join", &join_url(&n[0], &one)]);
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(
        o.stdout.contains("Connection failed. invalid token (500)."),
        "{o:?}"
    );
    // TTL token: survives use.
    let ttl = "2".repeat(40);
    assert_eq!(
        mk(&n[0], &["add-node", "-t", &ttl, "-l", "600"]).code(),
        Some(0)
    );
    let o = mk(&n[1], &["join", &join_url(&n[0], &ttl), "--worker"]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    let o = mk(&n[2], &["join", &join_url(&n[0], &ttl), "--worker"]);
    assert_eq!(o.code(), Some(0), "a TTL token is reusable: {o:?}");
    // The add-node output formats carry token/check and IP:25000 URLs.
    let o = mk(&n[0], &["add-node", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let url = v["urls"][0].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}:25000/", n[0].host.addr)),
        "{url}"
    );
    let tc = v["token"].as_str().unwrap();
    assert_eq!(tc.split('/').map(str::len).collect::<Vec<_>>(), [32, 12]);
    assert!(url.ends_with(tc));
}

#[test]
fn join_validation_port_check_and_status_formats() {
    let rt = runtime();
    let _g = rt.enter();
    // Node 2's agent runs on another port: the seed answers 502 (A4 check 3).
    let (_lab, _root, mut n) = pair(&[("MICROK8S_SIM_PORT", "25001")]);
    for x in &mut n {
        x.install_and_start();
    }
    let token = secret().microk8s_token();
    for (url, msg) in [
        (format!("node-0.local:25000/{token}"), "Invalid master IP"),
        (format!("[fd00::1]:25000/{token}"), "Expected format"),
        (format!("{}:70000/{token}", n[0].host.addr), "not in range"),
        (format!("{}:25000/short", n[0].host.addr), "at least 32"),
        (
            format!("{}:25000/{token}/abc", n[0].host.addr),
            "Fingerprint",
        ),
    ] {
        let o = mk(&n[1], &["join", &url]);
        assert_eq!(o.code(), Some(1), "{url}: {o:?}");
        assert!(
            o.stdout.contains("Invalid connection:") && o.stdout.contains(msg),
            "{o:?}"
        );
    }
    let o = mk(&n[2], &["join", &join_url(&n[0], &token)]);
    assert_eq!(o.code(), Some(6), "{o:?}");
    assert!(o.stdout.contains("(502)."), "{o:?}");
    // The persistent token is never consumed: a correct fingerprint from add-node works too.
    let check = mk(&n[0], &["add-node", "--format", "token-check"]).stdout;
    let fp = check.trim().split('/').nth(1).unwrap().to_owned();
    let o = mk(
        &n[1],
        &["join", &format!("{}/{fp}", join_url(&n[0], &token))],
    );
    assert_eq!(o.code(), Some(0), "{o:?}");
    assert!(o.stdout.contains("Successfully joined the cluster."));

    // Status formats agree with the adapter's parsers; -a prints enabled/disabled.
    let yaml = eventually(Duration::from_secs(5), "a ready seed", || {
        let o = mk(&n[0], &["status", "--format", "yaml"]);
        (o.code() == Some(0)).then_some(o.stdout)
    });
    let y = parse_status_yaml(&yaml).unwrap().unwrap();
    let p = parse_status_pretty(&mk(&n[0], &["status", "--format", "pretty"]).stdout)
        .unwrap()
        .unwrap();
    assert_eq!(y.voters(), p.voters());
    assert_eq!(y.voters().len(), 2);
    assert_eq!(mk(&n[0], &["status", "-a", "dns"]).stdout, "enabled\n");
    assert_eq!(mk(&n[0], &["status", "-a", "metallb"]).stdout, "disabled\n");
    let o = mk(&n[0], &["enable", "no-such-addon"]);
    assert_eq!(o.code(), Some(1));
}

#[test]
fn config_prints_the_admin_kubeconfig_on_control_plane_nodes_even_when_stopped() {
    let rt = runtime();
    let _g = rt.enter();
    let root = tempfile::tempdir().unwrap();
    let lab = Lab::new(2).expect("creating the network lab (run as root)");
    let log = root.path().join("commands.jsonl");
    let mut n: Vec<SimNode> = (0..2)
        .map(|i| SimNode::new(&lab, i, root.path(), &log, &[]))
        .collect();
    let o = mk(&n[0], &["config"]);
    assert_eq!(o.code(), Some(1), "not installed: {o:?}");
    assert!(
        o.stdout.is_empty() && o.stderr.contains("not installed"),
        "{o:?}"
    );
    // Installed but its services not started: the wrapper only reads the file.
    n[0].run(|a| async move {
        a.install(&InstallSource::Channel("1.32/stable".into()), &secret())
            .await
    })
    .expect("install");
    let stopped = mk(&n[0], &["config"]);
    assert_eq!(stopped.code(), Some(0), "{stopped:?}");
    let server = format!("    server: https://{}:16443\n", n[0].host.addr);
    assert!(stopped.stdout.contains(&server), "{}", stopped.stdout);
    parse_kubeconfig(&stopped.stdout).unwrap();
    let o = mk(&n[0], &["config", "--use-loopback"]);
    assert!(
        o.stdout.contains("    server: https://127.0.0.1:16443\n"),
        "{o:?}"
    );
    let o = mk(&n[0], &["config", "--bogus"]);
    assert_eq!(o.code(), Some(1), "{o:?}");
    n[0].start();
    n[1].install_and_start();
    eventually(Duration::from_secs(10), "a ready seed", || {
        (mk(&n[0], &["status"]).code() == Some(0)).then_some(())
    });
    // Same CA before and after the daemon first ran.
    let running = mk(&n[0], &["config"]);
    assert_eq!(running.stdout, stopped.stdout);
    let token = secret().microk8s_token();
    let o = mk(&n[1], &["join", &join_url(&n[0], &token), "--worker"]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    // A worker: the wrapper's message, exit 0 (the adapter maps it to WorkerNode).
    let o = mk(&n[1], &["config"]);
    assert_eq!(o.code(), Some(0), "{o:?}");
    assert!(
        o.stdout
            .starts_with("This MicroK8s deployment is acting as a node in a cluster.")
            && !o.stdout.contains("server:"),
        "{o:?}"
    );
    let configs: Vec<_> = log_records(&log)
        .into_iter()
        .filter(|r| r["argv"][0] == "config" && r["event"] == "end")
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_owned(),
                r["exit"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        configs,
        [
            ("node-0".to_owned(), 1),
            ("node-0".to_owned(), 0),
            ("node-0".to_owned(), 0),
            ("node-0".to_owned(), 1),
            ("node-0".to_owned(), 0),
            ("node-1".to_owned(), 0),
        ],
        "every config call is in the command log"
    );
    n[0].kill();
}

#[test]
fn garbage_on_the_agent_port_is_counted_and_ignored() {
    let rt = runtime();
    let _g = rt.enter();
    let (_lab, _root, mut n) = pair(&[]);
    n[0].install_and_start();
    let addr = std::net::SocketAddr::from((n[0].host.addr, 25000));
    let counts = n[1].host.spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let t = Duration::from_secs(5);
            // Bytes on the bare TCP connection: the TLS handshake fails.
            let raw = |bytes: &'static [u8]| async move {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                let _ = s.write_all(bytes).await;
                let _ = s.shutdown().await;
                let mut out = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
                anyhow::Ok(out)
            };
            // Bytes inside TLS.
            let tls = |bytes: Vec<u8>| async move {
                let (mut s, _) = http::connect(addr, t).await?;
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
                let mut out = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
                anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
            };
            let ping = || async move {
                let (_, v) = http::request(addr, None, "GET", "/sim/v1/ping", None, t, t).await?;
                anyhow::Ok(v["bad_requests"].as_u64().unwrap_or(0))
            };
            let before = ping().await?;
            let plain = raw(b"GET /sim/v1/ping HTTP/1.1\r\n\r\n").await?;
            raw(b"\x00\x01\x02garbage").await?;
            tls(b"\x00\x01\x02garbage".to_vec()).await?;
            tls(vec![b'A'; 40_000]).await?;
            tls(b"POST /cluster/api/v2.0/join HTTP/1.1\r\nContent-Length: 5\r\n\r\n{not}".to_vec())
                .await?;
            tls(b"POST /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec()).await?;
            let bad_json = tls(
                b"POST /cluster/api/v2.0/join HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]".to_vec(),
            )
            .await?;
            // The agent counts a bad request when its connection task ends, which may be just
            // after the next ping is answered: wait until the count holds still (bounded).
            let mut after = ping().await?;
            for _ in 0..25 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let again = ping().await?;
                if again == after {
                    break;
                }
                after = again;
            }
            // A handshake and nothing else (a joiner that rejected the certificate) is no request.
            drop(http::connect(addr, t).await?);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let quiet = ping().await?;
            anyhow::Ok((before, after, quiet, plain, bad_json))
        })
    });
    let (before, after, quiet, plain, bad_json) = counts.join().unwrap().unwrap();
    assert!(after >= before + 6, "before {before}, after {after}");
    assert_eq!(quiet, after, "a bare handshake is not counted");
    assert!(
        !String::from_utf8_lossy(&plain).contains("HTTP/1.1"),
        "the agent does not answer plain HTTP: {plain:?}"
    );
    assert!(
        bad_json.starts_with("HTTP/1.1 500"),
        "no token in a JSON array: {bad_json}"
    );
    // Still serving.
    assert!(matches!(
        n[0].status(),
        firstboot::system::microk8s::Status::Running(_)
    ));
}
