//! Coordinator over loopback: message round trip, authentication, replay, pinning, body cap,
//! strict parsing, and that refused requests never reach the driver.

use std::net::SocketAddr;
use std::time::Duration;

use rackseed_protocol::coordinator::{
    Coordinator, CoordinatorClient, CoordinatorConfig, Inbound, NodeIdentity,
};
use rackseed_protocol::secret::ClusterSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Msg {
    RequestSlot { term: u64 },
    Granted { slot: u32 },
    Echo(String),
}

struct Server {
    coord: Coordinator<Msg>,
    addr: SocketAddr,
    fp: String,
    seen: mpsc::UnboundedReceiver<(String, Msg)>,
}

/// A coordinator whose "driver" grants slot 1 to every request and records what it saw.
async fn server(secret: &ClusterSecret) -> Server {
    server_at(secret, "127.0.0.1:0".parse().unwrap()).await
}

async fn server_at(secret: &ClusterSecret, listen: SocketAddr) -> Server {
    let identity = NodeIdentity::generate().unwrap();
    let fp = identity.fingerprint().to_string();
    let (coord, mut rx) = Coordinator::<Msg>::start(CoordinatorConfig {
        secret: secret.clone(),
        identity,
        listen,
    })
    .await
    .unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(inb) = rx.recv().await {
            let inb: Inbound<Msg> = inb;
            let _ = seen_tx.send((inb.from.clone(), inb.message.clone()));
            let reply = match &inb.message {
                Msg::RequestSlot { .. } => vec![Msg::Granted { slot: 1 }],
                Msg::Echo(s) if s == "drop" => {
                    drop(inb);
                    continue;
                }
                other => vec![other.clone()],
            };
            inb.reply(reply);
        }
    });
    let addr = coord.local_addr();
    Server {
        coord,
        addr,
        fp,
        seen,
    }
}

#[tokio::test]
async fn message_round_trip_and_status_need_the_secret() {
    let secret = ClusterSecret::generate();
    let mut s = server(&secret).await;
    s.coord.set_status(serde_json::json!({"phase": "seeding"}));
    let c = CoordinatorClient::new(&secret, "node-b");
    let replies = c
        .send(s.addr, &s.fp, &Msg::RequestSlot { term: 4 })
        .await
        .unwrap();
    assert_eq!(replies, vec![Msg::Granted { slot: 1 }]);
    assert_eq!(
        s.seen.recv().await.unwrap(),
        ("node-b".to_string(), Msg::RequestSlot { term: 4 })
    );
    let status = c.status(s.addr, &s.fp).await.unwrap();
    assert_eq!(status["phase"], "seeding");

    // Another cluster's secret: refused, for messages and status alike, and nothing delivered.
    let stranger = CoordinatorClient::new(&ClusterSecret::generate(), "node-x");
    let e = stranger
        .send(s.addr, &s.fp, &Msg::RequestSlot { term: 9 })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("signature"), "{e}");
    let e = stranger.status(s.addr, &s.fp).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(
        s.seen.try_recv().is_err(),
        "a refused request reached the driver"
    );
    assert_eq!(s.coord.stats().unauthorized, 2);
    assert_eq!(s.coord.stats().messages, 1);
}

/// Each answer carries the nonce for the sender's next message: back-to-back messages cost
/// one `GET /v1/nonce` in all. A peer that restarted (and forgot its nonces) refuses the
/// cached one; the client fetches a fresh nonce and the message still gets through once.
#[tokio::test]
async fn answers_carry_the_next_nonce_and_a_forgotten_one_is_replaced() {
    let secret = ClusterSecret::generate();
    let mut s = server(&secret).await;
    let c = CoordinatorClient::new(&secret, "node-b");
    for term in 0..3 {
        let replies = c
            .send(s.addr, &s.fp, &Msg::RequestSlot { term })
            .await
            .unwrap();
        assert_eq!(replies, vec![Msg::Granted { slot: 1 }]);
        assert_eq!(s.seen.recv().await.unwrap().1, Msg::RequestSlot { term });
    }
    let st = s.coord.stats();
    assert_eq!((st.nonces_issued, st.messages, st.unauthorized), (1, 3, 0));

    let addr = s.addr;
    s.coord.shutdown();
    drop(s);
    // The aborted accept task releases the port when it is next polled.
    for _ in 0..100 {
        if std::net::TcpListener::bind(addr).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut s = server_at(&secret, addr).await;
    let replies = c
        .send(s.addr, &s.fp, &Msg::Echo("again".into()))
        .await
        .unwrap();
    assert_eq!(replies, vec![Msg::Echo("again".into())]);
    assert_eq!(s.seen.recv().await.unwrap().1, Msg::Echo("again".into()));
    assert!(s.seen.try_recv().is_err(), "delivered twice");
    let st = s.coord.stats();
    assert_eq!((st.nonces_issued, st.messages, st.unauthorized), (1, 1, 1));
}

#[tokio::test]
async fn captured_request_replayed_is_rejected() {
    let secret = ClusterSecret::generate();
    let mut s = server(&secret).await;
    let c = CoordinatorClient::new(&secret, "node-b");
    let nonce = c.nonce(s.addr, &s.fp).await.unwrap();
    let req = c
        .sign_message(s.addr, &nonce, &Msg::RequestSlot { term: 1 })
        .unwrap();
    let first: serde_json::Value = c.send_signed(s.addr, &s.fp, &req).await.unwrap();
    assert_eq!(first["replies"][0]["granted"]["slot"], 1);
    s.seen.recv().await.unwrap();
    let e = c
        .send_signed::<serde_json::Value>(s.addr, &s.fp, &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("nonce"), "{e}");
    assert!(s.seen.try_recv().is_err(), "the replay reached the driver");
}

#[tokio::test]
async fn wrong_pin_fails_closed() {
    let secret = ClusterSecret::generate();
    let s = server(&secret).await;
    let other = NodeIdentity::generate().unwrap();
    let c = CoordinatorClient::new(&secret, "node-b").with_timeout(Duration::from_secs(5));
    let e = c
        .send(s.addr, other.fingerprint(), &Msg::Echo("x".into()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    assert!(c
        .send(s.addr, "not-a-pin", &Msg::Echo("x".into()))
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.coord.stats().tls_failures >= 1);
}

/// Sends a hand-made, correctly signed request with an arbitrary body.
async fn signed_raw(
    c: &CoordinatorClient,
    s: &Server,
    secret: &ClusterSecret,
    body: Vec<u8>,
) -> (u16, String) {
    let nonce = c.nonce(s.addr, &s.fp).await.unwrap();
    let auth = rackseed_protocol::coordinator::auth::sign_request(
        &secret.coordinator_key(),
        &nonce,
        "POST",
        "/v1/message",
        &body,
        "node-b",
    );
    let req = rackseed_protocol::coordinator::SignedRequest {
        method: "POST".into(),
        path: "/v1/message".into(),
        node: "node-b".into(),
        nonce,
        auth,
        body,
    };
    match c
        .send_signed::<serde_json::Value>(s.addr, &s.fp, &req)
        .await
    {
        Ok(v) => (200, v.to_string()),
        Err(e) => (e.status().unwrap_or(0), e.to_string()),
    }
}

#[tokio::test]
async fn bad_bodies_get_clear_4xx_and_change_nothing() {
    let secret = ClusterSecret::generate();
    let mut s = server(&secret).await;
    let c = CoordinatorClient::new(&secret, "node-b");
    let (st, why) = signed_raw(&c, &s, &secret, b"{not json".to_vec()).await;
    assert_eq!(st, 400, "{why}");
    assert!(why.contains("malformed json"), "{why}");
    let (st, why) = signed_raw(
        &c,
        &s,
        &secret,
        br#"{"message":{"echo":"a"},"x":1}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 422, "{why}");
    assert!(why.contains("unknown field"), "{why}");
    let (st, why) = signed_raw(
        &c,
        &s,
        &secret,
        br#"{"message":{"request_slot":{"term":1,"evil":2}}}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 422, "{why}");
    let (st, why) = signed_raw(&c, &s, &secret, vec![b' '; 70 * 1024]).await;
    assert_eq!(st, 413, "{why}");
    assert!(
        s.seen.try_recv().is_err(),
        "a refused request reached the driver"
    );
    // The driver dropping a message is a 503, not a hang.
    let e = c
        .send(s.addr, &s.fp, &Msg::Echo("drop".into()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    // And a good one still works afterwards.
    let r = c
        .send(s.addr, &s.fp, &Msg::Echo("hi".into()))
        .await
        .unwrap();
    assert_eq!(r, vec![Msg::Echo("hi".into())]);
    let st = s.coord.stats();
    assert_eq!(st.bad_requests, 4, "{st:?}");
    assert_eq!(st.unavailable, 1, "{st:?}");
}

#[tokio::test]
async fn bad_node_id_unknown_routes_and_methods_are_refused() {
    let secret = ClusterSecret::generate();
    let s = server(&secret).await;
    let c = CoordinatorClient::new(&secret, "node-b");
    let nonce = c.nonce(s.addr, &s.fp).await.unwrap();
    let mut req = c
        .sign_message(s.addr, &nonce, &Msg::Echo("x".into()))
        .unwrap();
    req.node = "node b!".into();
    let e = c
        .send_signed::<serde_json::Value>(s.addr, &s.fp, &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    for (method, path, want) in [("GET", "/nope", 404), ("DELETE", "/v1/message", 405)] {
        let r = rackseed_protocol::coordinator::SignedRequest {
            method: method.into(),
            path: path.into(),
            node: "node-b".into(),
            nonce: "00".into(),
            auth: "00".into(),
            body: vec![],
        };
        let e = c
            .send_signed::<serde_json::Value>(s.addr, &s.fp, &r)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(want), "{method} {path}: {e}");
    }
}
