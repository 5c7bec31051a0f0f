//! Cleartext HTTP/2 with prior knowledge: many streams over one connection, each its own
//! subscription, and a reset stream freed at once.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

const T: Duration = Duration::from_secs(5);

/// An HTTP/2 connection with prior knowledge to the replica's client port.
async fn h2(gw: &Gateway) -> SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake with prior knowledge");
    tokio::spawn(conn);
    sender
}

async fn read_until(body: &mut Incoming, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let deadline = tokio::time::Instant::now() + T;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    buf.extend_from_slice(data);
                }
            }
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn many_streams_share_one_http2_connection() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "64")]);
    let mut sender = h2(&gw).await;
    let tok = client_token("alice", &["h2"]);
    let mut bodies = Vec::new();
    for _ in 0..50 {
        let req = hyper::Request::get(format!("http://{}/events?channel=h2", gw.client))
            .header("authorization", format!("Bearer {tok}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("stream");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        bodies.push((resp.into_body(), Vec::new()));
    }
    assert_eq!(gw.metric("sse_gateway_connections").await, 50.0);
    let r = gw
        .publish(
            &publisher_token(),
            &serde_json::json!({"channel": "h2", "data": "to-all"}),
        )
        .await;
    assert_eq!(r.status, 202);
    for (body, buf) in &mut bodies {
        assert!(read_until(body, buf, b"data: to-all\n").await);
    }
    // Resetting one stream (dropping its body) frees it at once; the others stay.
    bodies.truncate(49);
    let deadline = Instant::now() + T;
    while gw.metric("sse_gateway_connections").await != 49.0 {
        assert!(Instant::now() < deadline, "reset stream not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw
        .publish(
            &publisher_token(),
            &serde_json::json!({"channel": "h2", "data": "again"}),
        )
        .await;
    assert_eq!(r.status, 202);
    for (body, buf) in &mut bodies {
        assert!(read_until(body, buf, b"data: again\n").await);
    }
}

#[tokio::test]
async fn a_draining_replica_sends_goaway_so_http2_clients_open_new_streams_elsewhere() {
    let gw = Gateway::start(&[("SSE_GATEWAY_DRAIN_SECS", "4")]);
    let mut sender = h2(&gw).await;
    let tok = client_token("alice", &["goaway"]);
    let open = || {
        hyper::Request::get(format!("http://{}/events?channel=goaway", gw.client))
            .header("authorization", format!("Bearer {tok}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // Several streams, so the drain (which closes them one after another over its window)
    // keeps the connection busy for seconds.
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let r = sender.send_request(open()).await.expect("stream");
        assert_eq!(r.status(), 200);
        let mut body = r.into_body();
        let mut buf = Vec::new();
        assert!(read_until(&mut body, &mut buf, b"id:").await);
        bodies.push((body, buf));
    }
    gw.signal("TERM");
    gw.wait_ready(false, T).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The connection itself refuses new streams (GOAWAY) instead of answering each with 503,
    // so a client or proxy opens them on another connection, to another replica.
    match sender.send_request(open()).await {
        Err(_) => {}
        Ok(r) => panic!(
            "a draining connection still took a new stream (status {})",
            r.status()
        ),
    }
    // The open streams still get their goodbye from the drain.
    for (body, buf) in &mut bodies {
        assert!(read_until(body, buf, b"gateway.shutdown").await);
    }
}
