//! `POST /v1/rotate` over loopback: refused without a handler (503) and without the secret
//! (401, the handler never runs); a malformed step is 422 without echoing the body; and the
//! coordinator authenticates against its keyring as it changes: a staged secret is accepted
//! beside the current one, after a switch the old one only until it is forgotten, and a client
//! built on the same keyring signs with whatever is current.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rackseed_protocol::coordinator::rotation::NO_ROTATION_HANDLER;
use rackseed_protocol::coordinator::{CoordinatorClient, RotationAck, RotationStep};
use rackseed_protocol::secret::ClusterSecret;
use rackseed_protocol::testing::loopback_coordinator;

#[tokio::test]
async fn rotate_route_authenticates_against_the_changing_keyring() {
    let (old, new) = (ClusterSecret::generate(), ClusterSecret::generate());
    let node = loopback_coordinator(&old).await;
    let (coord, fp, ring) = (
        &node.coordinator,
        node.fingerprint.clone(),
        node.keyring.clone(),
    );
    coord.set_status(serde_json::json!({"phase": "member"}));
    let addr = coord.local_addr();
    let with_old = CoordinatorClient::new(&old, "imagebuilder");
    let with_new = CoordinatorClient::new(&new, "imagebuilder");
    let stage = RotationStep::Stage {
        secret: new.to_file_contents().trim().to_string(),
    };

    // No handler yet: 503 with the reason.
    let e = with_old.rotate(addr, &fp, &stage).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains(NO_ROTATION_HANDLER), "{e}");

    // A handler that stages into the ring, counting its calls.
    let calls = Arc::new(AtomicUsize::new(0));
    let (h_ring, h_calls) = (ring.clone(), calls.clone());
    coord.set_rotation_handler(Arc::new(move |req| {
        let (ring, calls) = (h_ring.clone(), h_calls.clone());
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if let RotationStep::Stage { secret } = &req.step {
                let s = ClusterSecret::from_hex(secret).ok_or("bad secret")?;
                ring.accept_also(s, Instant::now() + Duration::from_secs(60));
            }
            let keys = ring.accepted(Instant::now());
            Ok(RotationAck {
                node_id: "node-a".into(),
                current_tag: keys[0].tag().into(),
                accepted_tags: keys.iter().map(|k| k.tag().to_string()).collect(),
                token: None,
            })
        })
    }));

    // Without the secret: 401, and the handler never runs.
    let e = with_new.rotate(addr, &fp, &stage).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        with_new.status(addr, &fp).await.unwrap_err().status(),
        Some(401)
    );

    // A well-formed step reaches the handler; a malformed one is 422, its body (which may
    // hold a secret) not echoed.
    let e = with_old
        .rotate(addr, &fp, &RotationStep::Finish { tag: "x".repeat(3) })
        .await;
    assert!(e.is_ok(), "a finish is well formed: {e:?}");
    let bogus = serde_json::json!({"step": "stage", "secret": "cafe".repeat(16), "x": 1});
    let nonce = with_old.nonce(addr, &fp).await.unwrap();
    let req = rackseed_protocol::coordinator::SignedRequest {
        method: "POST".into(),
        path: "/v1/rotate".into(),
        node: "imagebuilder".into(),
        nonce: nonce.clone(),
        auth: rackseed_protocol::coordinator::auth::sign_request(
            &old.coordinator_key(),
            &nonce,
            "POST",
            "/v1/rotate",
            bogus.to_string().as_bytes(),
            "imagebuilder",
        ),
        body: bogus.to_string().into_bytes(),
    };
    let e = with_old
        .send_signed::<RotationAck>(addr, &fp, &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422), "{e}");
    assert!(!e.to_string().contains("cafecafe"), "{e}");

    // Stage: the new secret is accepted beside the old one.
    let ack = with_old.rotate(addr, &fp, &stage).await.unwrap();
    assert_eq!(ack.accepted_tags, [old.cluster_tag(), new.cluster_tag()]);
    with_new.status(addr, &fp).await.unwrap();
    with_old.status(addr, &fp).await.unwrap();

    // Switch: a client on the same ring signs with the new secret; the old one still passes
    // until it is forgotten, then is refused.
    let own = CoordinatorClient::with_keyring(ring.clone(), "node-a");
    ring.switch_to(new.clone(), Instant::now() + Duration::from_secs(60));
    own.status(addr, &fp).await.unwrap();
    with_old.status(addr, &fp).await.unwrap();
    ring.forget_others();
    assert_eq!(
        with_old.status(addr, &fp).await.unwrap_err().status(),
        Some(401)
    );
    with_new.status(addr, &fp).await.unwrap();
    assert!(coord.stats().unauthorized >= 3, "{:?}", coord.stats());
}
