//! The coordinator's kubeconfig route and `CoordinatorClient::kubeconfig` on loopback: served
//! only with a provider installed, only to holders of the cluster secret, provider failures
//! and timeouts explained, and the provider can be withdrawn or replaced by a stated reason.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rackseed_protocol::coordinator::{
    ClientError, Coordinator, CoordinatorClient, CoordinatorConfig, KubeconfigProvider,
    NodeIdentity,
};
use rackseed_protocol::secret::ClusterSecret;

async fn start(secret: &ClusterSecret) -> (Coordinator<serde_json::Value>, SocketAddr, String) {
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let (coord, mut inbound) = Coordinator::<serde_json::Value>::start(CoordinatorConfig {
        secret: secret.clone(),
        identity,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    })
    .await
    .unwrap();
    tokio::spawn(async move { while inbound.recv().await.is_some() {} });
    let addr = coord.local_addr();
    (coord, addr, fp)
}

fn refused(r: Result<String, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused { status, reason, .. }) => (status, reason),
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|_| "<kubeconfig>")
        ),
    }
}

#[tokio::test]
async fn kubeconfig_route_serves_only_with_a_provider_and_the_secret() {
    let secret = ClusterSecret::from_bytes([1; 32]);
    let (coord, addr, fp) = start(&secret).await;
    let client = CoordinatorClient::new(&secret, "imagebuilder");

    let (status, reason) = refused(client.kubeconfig(addr, &fp).await);
    assert_eq!(status, 503);
    assert!(reason.contains("serves no kubeconfig"), "{reason}");

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let provider: KubeconfigProvider = Arc::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok("apiVersion: v1\nclusters: []\n".to_string()) })
    });
    coord.set_kubeconfig_provider(provider);
    assert_eq!(
        client.kubeconfig(addr, &fp).await.unwrap(),
        "apiVersion: v1\nclusters: []\n"
    );
    assert_eq!(coord.stats().kubeconfig_reads, 1);

    // Another cluster's secret: refused before the provider runs.
    let stranger = CoordinatorClient::new(&ClusterSecret::from_bytes([2; 32]), "imagebuilder");
    let (status, _) = refused(stranger.kubeconfig(addr, &fp).await);
    assert_eq!(status, 401);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the provider ran for a stranger"
    );

    // A pin that does not match the server's certificate fails the handshake.
    let wrong_pin = "ab".repeat(32);
    assert!(matches!(
        client.kubeconfig(addr, &wrong_pin).await,
        Err(ClientError::Transport { .. })
    ));

    let failing: KubeconfigProvider = Arc::new(|| {
        Box::pin(async { Err(anyhow::anyhow!("`microk8s config` failed: not running")) })
    });
    coord.set_kubeconfig_provider(failing);
    let (status, reason) = refused(client.kubeconfig(addr, &fp).await);
    assert_eq!(status, 503);
    assert!(
        reason.contains("microk8s config` failed: not running"),
        "{reason}"
    );

    coord.refuse_kubeconfig("this node is a worker; ask a control-plane member");
    let (status, reason) = refused(client.kubeconfig(addr, &fp).await);
    assert_eq!(
        (status, reason.as_str()),
        (503, "this node is a worker; ask a control-plane member")
    );

    coord.clear_kubeconfig_provider();
    let (status, reason) = refused(client.kubeconfig(addr, &fp).await);
    assert_eq!(status, 503);
    assert!(reason.contains("serves no kubeconfig"), "{reason}");
    assert_eq!(coord.stats().kubeconfig_reads, 1);
}
