//! A backup copy cut off mid-transfer (issue #20, "a backup node that dies mid-copy"): the
//! sending node dies, or its link does, while the archive is on the wire. Shown over loopback
//! with the agent's real archive store behind a real coordinator, and a TCP relay between the
//! two that cuts the connection once a given number of bytes have passed:
//! - a push cut mid-body is refused by the receiver: no archive, no manifest and no temporary
//!   file in the store's folder, and the archives it already held are untouched;
//! - a fetch cut mid-answer (the workstation's `backup pull`, or a node fetching a copy) is an
//!   error for the client, never a shortened archive;
//! - the same push over an intact connection is kept afterwards (nothing was left in the way).
//!
//! No root needed. Bounded: every transfer has a 30 s timeout.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use firstboot::backup::store::ArchiveStore;
use rackseed_protocol::coordinator::backup::{
    sha256_hex, BackupManifest, BackupStore, MANIFEST_FORMAT,
};
use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorClient, CoordinatorConfig, NodeIdentity,
};
use rackseed_protocol::secret::ClusterSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER: &str = "homelab";
const LIMIT: Duration = Duration::from_secs(30);

/// An archive as `microk8s dbctl backup -o NAME` writes it (the protocol's shared test
/// writer) with one key whose data is `bytes` of incompressible noise, so the archive is about
/// `bytes` long.
fn dbctl_archive(name: &str, bytes: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut data);
    rackseed_protocol::testing::dbctl_archive(
        name,
        &[("/registry/configmaps/default/marker", &data)],
    )
}

fn signed_manifest(
    secret: &ClusterSecret,
    name: &str,
    created_unix: u64,
    archive: &[u8],
) -> BackupManifest {
    let mut m = BackupManifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        cluster_name: CLUSTER.into(),
        cluster_id: "1.n1".into(),
        origin: "n1".into(),
        created_unix,
        size: archive.len() as u64,
        sha256: sha256_hex(archive),
        keys: 1,
        data_bytes: (archive.len() as u64).saturating_sub(200),
        suspect: None,
        tag: String::new(),
    };
    // The data count must match what the receiver counts: take it from the archive itself.
    let facts = rackseed_protocol::coordinator::backup::inspect_archive(name, archive).unwrap();
    m.keys = facts.keys;
    m.data_bytes = facts.data_bytes;
    m.sign(secret);
    m
}

/// A relay from a loopback port to `to`. Every connection is relayed both ways; once
/// `cut_after` bytes have gone in the cut direction on one connection, both sides are closed
/// at once (no orderly end of the body: what a dead sender or a pulled cable leaves).
async fn cutting_relay(to: SocketAddr, cut_after: usize, cut_upstream: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(to).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let (up_limit, down_limit) = if cut_upstream {
                    (Some(cut_after), None)
                } else {
                    (None, Some(cut_after))
                };
                let up = tokio::spawn(pump(cr, sw, up_limit));
                let down = tokio::spawn(pump(sr, cw, down_limit));
                // Whichever side ends (or is cut) first ends the connection both ways.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    addr
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Option<usize>,
) {
    let mut passed = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) if passed + n >= l => {
                let _ = to.write_all(&buf[..l - passed]).await;
                return;
            }
            _ => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        passed += n;
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

struct Receiver {
    _coord: Coordinator<serde_json::Value>,
    addr: SocketAddr,
    fp: String,
    store: Arc<ArchiveStore>,
    dir: tempfile::TempDir,
}

async fn receiver(secret: &ClusterSecret) -> Receiver {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ArchiveStore::open(&dir.path().join("backups"), 8, CLUSTER).unwrap());
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let (coord, mut rx) = Coordinator::<serde_json::Value>::start(CoordinatorConfig {
        secret: secret.clone(),
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();
    // No driver: messages are not part of this test.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    coord.set_backup_store(store.clone());
    let addr = coord.local_addr();
    Receiver {
        _coord: coord,
        addr,
        fp,
        store,
        dir,
    }
}

#[tokio::test]
async fn a_push_cut_mid_copy_leaves_nothing_and_the_next_push_is_kept() {
    let secret = ClusterSecret::generate();
    let r = receiver(&secret).await;
    let folder = r.dir.path().join("backups");
    let client = CoordinatorClient::new(&secret, "n1");

    // An archive the node already holds, pushed intact.
    let old = dbctl_archive("backup-old", 64 * 1024);
    let old_m = signed_manifest(&secret, "backup-old", 1_700_000_000, &old);
    tokio::time::timeout(LIMIT, client.backup_push(r.addr, &r.fp, &old_m, &old))
        .await
        .unwrap()
        .expect("an intact push is kept");
    let before = files_in(&folder);
    assert_eq!(before.len(), 2, "archive and manifest: {before:?}");
    let old_bytes = std::fs::read(folder.join(old_m.archive_file())).unwrap();

    // A 2 MiB archive whose connection dies after 1 MiB of the push went out.
    let new = dbctl_archive("backup-new", 2 << 20);
    let new_m = signed_manifest(&secret, "backup-new", 1_700_003_600, &new);
    let relay = cutting_relay(r.addr, 1 << 20, true).await;
    let cut = tokio::time::timeout(LIMIT, client.backup_push(relay, &r.fp, &new_m, &new))
        .await
        .expect("a cut push must end, not hang");
    assert!(cut.is_err(), "a push cut mid-body must fail: {cut:?}");

    // Give the server a moment to notice the dead connection, then look: nothing new, not
    // even a temporary file, and the old archive byte for byte.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(files_in(&folder), before, "nothing written for a cut push");
    assert_eq!(
        std::fs::read(folder.join(old_m.archive_file())).unwrap(),
        old_bytes
    );
    let held: Vec<String> = r
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(held, vec!["backup-old".to_string()]);

    // The same archive over an intact connection: kept, verified, listed.
    tokio::time::timeout(LIMIT, client.backup_push(r.addr, &r.fp, &new_m, &new))
        .await
        .unwrap()
        .expect("the retried push is kept");
    let listed = client.backup_list(r.addr, &r.fp).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["backup-old", "backup-new"]);
    assert_eq!(
        sha256_hex(&std::fs::read(folder.join(new_m.archive_file())).unwrap()),
        new_m.sha256
    );
}

#[tokio::test]
async fn a_fetch_cut_mid_answer_is_an_error_never_a_short_archive() {
    let secret = ClusterSecret::generate();
    let r = receiver(&secret).await;
    let client = CoordinatorClient::new(&secret, "workstation");
    let a = dbctl_archive("backup-a", 2 << 20);
    let m = signed_manifest(&secret, "backup-a", 1_700_000_000, &a);
    client.backup_push(r.addr, &r.fp, &m, &a).await.unwrap();

    // The answer is cut after 1 MiB of the 2 MiB archive reached the client.
    let relay = cutting_relay(r.addr, 1 << 20, false).await;
    let mut seen = 0u64;
    let got = tokio::time::timeout(
        LIMIT,
        client.backup_fetch(relay, &r.fp, "backup-a", &mut |n, _| seen = n),
    )
    .await
    .expect("a cut fetch must end, not hang");
    assert!(
        got.is_err(),
        "a fetch cut mid-answer must fail, got {} bytes as success",
        got.map(|(_, a)| a.len()).unwrap_or(0)
    );
    assert!(
        seen < a.len() as u64,
        "progress never claimed the whole archive"
    );

    // Intact: the whole archive, as signed.
    let (gm, ga) = client
        .backup_fetch(r.addr, &r.fp, "backup-a", &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(gm.sha256, m.sha256);
    assert_eq!(sha256_hex(&ga), m.sha256);
}
