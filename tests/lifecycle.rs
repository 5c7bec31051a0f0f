//! Lifecycle under real operations: token expiry with warning and resume, stream lifetime,
//! the second signal, and hostile input that must harm nothing.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn an_expiring_token_is_warned_cut_and_resumed_without_loss() {
    let gw = Gateway::start(&[("SSE_GATEWAY_TOKEN_EXPIRY_WARNING_SECS", "2")]);
    // Whole seconds: leave room for a second boundary between here and the gateway's clock.
    let exp = now() + 5;
    let short = token(json!({"sub": "alice", "exp": exp, "channels": ["e"]}));
    let mut c = SseClient::open(gw.client, "/events?channel=e", Some(&short))
        .await
        .unwrap();
    let warning = c.next_event(T).await.unwrap();
    assert_eq!(warning.event.as_deref(), Some("gateway.token-expiring"));
    assert!(now() < exp, "the warning came after exp");
    let expired = c.next_event(T).await.unwrap();
    assert_eq!(expired.event.as_deref(), Some("gateway.token-expired"));
    assert!(c.wait_closed(T).await);
    let last = c.last_id.clone().expect("the stream gave a cursor");
    // Events published while the client fetches a new token are not lost.
    for i in 0..5 {
        let r = gw
            .publish(
                &publisher_token(),
                &json!({"channel": "e", "data": format!("m{i}")}),
            )
            .await;
        assert_eq!(r.status, 202);
    }
    let fresh = client_token("alice", &["e"]);
    let auth = format!("Bearer {fresh}");
    let mut c = SseClient::open_with(
        gw.client,
        "/events?channel=e",
        &[("Authorization", &auth), ("Last-Event-ID", &last)],
    )
    .await
    .unwrap();
    for i in 0..5 {
        c.expect_data(&format!("m{i}")).await;
    }
}

#[tokio::test]
async fn streams_past_their_maximum_age_are_closed_so_clients_rebalance() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_STREAM_SECS", "1")]);
    let tok = client_token("alice", &["a"]);
    let start = Instant::now();
    let mut c = SseClient::open(gw.client, "/events?channel=a", Some(&tok))
        .await
        .unwrap();
    let ev = c.next_event(T).await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("gateway.shutdown"));
    assert!(ev.data.contains("max_age"));
    assert!(c.text().contains("retry: "));
    assert!(c.wait_closed(T).await);
    let age = start.elapsed();
    assert!(
        age >= Duration::from_millis(850) && age < Duration::from_secs(3),
        "{age:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        gw.metric("sse_gateway_connections_closed_total{reason=\"max_age\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut gw = Gateway::start(&[("SSE_GATEWAY_DRAIN_SECS", "30")]);
    let tok = client_token("alice", &["a"]);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = SseClient::open(gw.client, "/events?channel=a", Some(&tok))
            .await
            .unwrap_or_else(|r| panic!("{}: {}", r.status, r.text()));
        s.wait_id(T).await;
        streams.push(s);
    }
    gw.signal("TERM");
    gw.wait_ready(false, T).await;
    let start = Instant::now();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(3)), Some(1));
    assert!(start.elapsed() < Duration::from_secs(2));
}

async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hostile_input_is_answered_cleanly_and_harms_nothing() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_HEADER_TIMEOUT_SECS", "1"),
        ("SSE_GATEWAY_MAX_PENDING_HANDSHAKES", "1"),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "30"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["h"]);
    let mut good = SseClient::open(gw.client, "/events?channel=h", Some(&tok))
        .await
        .unwrap();

    // Garbage, binary, and a request line that never ends.
    let answer = raw_exchange(
        gw.client,
        b"\x00\xff\xfe garbage \r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:.80}"
    );
    let huge_line = format!("GET /events?channel={} HTTP/1.1\r\n", "a".repeat(200_000));
    let answer = raw_exchange(gw.client, huge_line.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer:.80}"
    );
    let huge_header = format!(
        "GET /events HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(200_000)
    );
    let answer = raw_exchange(gw.client, huge_header.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.80}"
    );
    // Non-UTF-8 everywhere: a 4xx, never a 5xx.
    let answer = raw_exchange(
        gw.client,
        b"GET /events?channel=%FF%FE&access_token=%C3%28 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nLast-Event-ID: \xc3\x28\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer:.80}");

    // Slow headers: the connection is dropped once the header timeout passes.
    let mut slow = TcpStream::connect(gw.client).await.unwrap();
    slow.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    assert!(n.is_ok(), "a slow-header connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(800));

    // Handshakes at once are capped: while one is stuck on a frozen Redis, the next is refused.
    redis.signal("STOP");
    let addr = gw.client;
    let tok2 = client_token("bob", &["h"]);
    let stuck = tokio::spawn(async move {
        SseClient::open(addr, "/events?channel=h", Some(&tok2))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = SseClient::open(gw.client, "/events?channel=h", Some(&tok))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "capacity");
    redis.signal("CONT");
    let _ = stuck.await;

    // Oversized publish bodies are refused before they are read whole.
    let big = vec![b'x'; 200_000];
    let auth = format!("Bearer {}", publisher_token());
    let r = http(
        gw.client,
        "POST",
        "/publish",
        &[("Authorization", &auth)],
        &big,
    )
    .await;
    assert_eq!(r.status, 413);

    // The process is alive, the old stream still works, and memory stayed small.
    gw.wait_ready(true, T).await;
    redis.publish("sse:h", b"still here");
    good.expect_data("still here").await;
    let rss = gw.metric("process_resident_memory_bytes").await;
    assert!(rss < 100.0 * 1024.0 * 1024.0, "RSS {rss}");
}
