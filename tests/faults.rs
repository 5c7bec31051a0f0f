//! Faults, for real: Redis killed and restarted, a client that stops reading, a client that
//! vanishes with no traffic flowing.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn streams_survive_a_redis_restart() {
    let mut redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "1"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["live"]);
    let mut c = SseClient::open(gw.client, "/events?channel=live", Some(&tok))
        .await
        .unwrap();
    redis.publish("sse:live", b"before");
    c.expect_data("before").await;

    redis.kill();
    gw.wait_ready(false, T).await;
    assert_eq!(gw.metric("sse_gateway_redis_connected").await, 0.0);
    // New streams are refused while Redis is away; the open one stays open.
    let r = SseClient::open(gw.client, "/events?channel=live", Some(&tok))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "unavailable");
    assert!(r.header("retry-after").is_some());
    let r = gw
        .publish(&publisher_token(), &json!({"channel": "live", "data": "x"}))
        .await;
    assert_eq!(r.status, 503);

    redis.restart();
    gw.wait_ready(true, T).await;
    redis.wait_numsub("sse:live", 1, T);
    assert_eq!(redis.publish("sse:live", b"after"), 1);
    assert_eq!(
        c.next_event(T)
            .await
            .expect("old stream still receives")
            .data,
        "after"
    );
    assert!(!c.closed);
    assert!(gw.metric("sse_gateway_redis_reconnects_total").await >= 1.0);
    assert_eq!(gw.metric("sse_gateway_redis_connected").await, 1.0);
}

#[tokio::test]
async fn a_replica_started_before_redis_is_ready_moments_after_redis_comes_up() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", url.as_str())]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.readyz().await, 503, "no Redis yet");
    let _redis = Redis::start_on(port);
    // Not a lease period (10 s by default) later: the failed renewal is retried with backoff.
    let took = gw.wait_ready(true, Duration::from_secs(4)).await;
    eprintln!("ready {took:?} after Redis came up");
    let tok = client_token("early", &["x"]);
    assert!(SseClient::open(gw.client, "/events?channel=x", Some(&tok))
        .await
        .is_ok());
}

#[tokio::test]
async fn a_dropped_pubsub_connection_is_resubscribed() {
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["dropped"]);
    let mut c = SseClient::open(gw.client, "/events?channel=dropped", Some(&tok))
        .await
        .unwrap();
    // What a proxy restart or a failover looks like to the replica: Redis drops pub/sub clients.
    redis.kill_pubsub_clients();
    redis.wait_numsub("sse:dropped", 1, T);
    gw.wait_ready(true, T).await;
    assert_eq!(redis.publish("sse:dropped", b"again"), 1);
    assert_eq!(
        c.next_event(T).await.expect("delivery resumes").data,
        "again"
    );
}

#[tokio::test]
async fn a_redis_that_stops_answering_is_caught_by_the_probe() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "1"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["stalled"]);
    let mut c = SseClient::open(gw.client, "/events?channel=stalled", Some(&tok))
        .await
        .unwrap();
    // SIGSTOP: every socket stays open, nothing is answered or delivered. Only the probe,
    // published through Redis itself, can tell.
    let noticed = redis.stall_until_unready(&gw).await;
    assert!(
        noticed <= Duration::from_secs(8),
        "stall noticed after {noticed:?}"
    );
    gw.wait_ready(true, T).await;
    redis.wait_numsub("sse:stalled", 1, T);
    assert_eq!(redis.publish("sse:stalled", b"back"), 1);
    assert_eq!(
        c.next_event(T).await.expect("delivery resumes").data,
        "back"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_others_keep_up() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_CLIENT_QUEUE", "64"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["burst"]);
    // The stuck client: opens the stream, reads the head, then never reads again.
    let mut stuck = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let req = format!(
        "GET /events?channel=burst HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\n\r\n"
    );
    stuck.write_all(req.as_bytes()).await.unwrap();
    let mut good = SseClient::open(gw.client, "/events?channel=burst", Some(&tok))
        .await
        .unwrap();
    redis.wait_numsub("sse:burst", 1, T);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.metric("sse_gateway_connections").await, 2.0);

    // 64 KiB events: socket buffers and the stream queue fill quickly for a client that does not read.
    let payload = "x".repeat(60_000);
    let total = 400;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < total {
            match good.next_event(T).await {
                Some(ev) => {
                    assert_eq!(ev.data.len(), 60_000);
                    got += 1;
                }
                None => break,
            }
        }
        (got, good)
    });
    for _ in 0..total {
        redis.publish("sse:burst", payload.as_bytes());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (got, _good) = reader.await.unwrap();
    assert_eq!(got, total, "the reading client lost events");
    let deadline = Instant::now() + T;
    while gw
        .metric("sse_gateway_connections_closed_total{reason=\"slow_consumer\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stuck client was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.metric("sse_gateway_events_dropped_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
    );
    assert_eq!(gw.metric("sse_gateway_connections").await, 1.0);
    // Memory stayed bounded: the replica did not buffer hundreds of 60 KB events for it.
    let rss = gw.metric("process_resident_memory_bytes").await;
    assert!(rss < 200.0 * 1024.0 * 1024.0, "RSS {rss}");
    drop(stuck);
}

#[tokio::test]
async fn a_vanished_client_is_released_within_heartbeat_plus_two_seconds() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "1"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["gone"]);
    let mut c = SseClient::open(gw.client, "/events?channel=gone", Some(&tok))
        .await
        .unwrap();
    assert!(c.read_until_contains(b"\n\n", T).await);
    assert_eq!(redis.numsub("sse:gone"), 1);
    // Go away without a word: no event is flowing.
    drop(c);
    let took = redis.wait_numsub("sse:gone", 0, Duration::from_secs(3));
    assert!(took <= Duration::from_secs(3), "released after {took:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.metric("sse_gateway_connections").await, 0.0);
    assert_eq!(
        gw.metric("sse_gateway_connections_closed_total{reason=\"client\"}")
            .await,
        1.0
    );
}
