//! Cross-replica delivery: one Redis, two gateway processes.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn one_publish_reaches_every_replica_once_in_order() {
    let redis = Redis::start();
    let env = [("SSE_GATEWAY_REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Gateway::start(&env);
    let b = Gateway::start(&env);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    assert_eq!(redis.numsub("sse:orders"), 0);

    let tok = client_token("alice", &["orders"]);
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..3 {
        on_a.push(
            SseClient::open(a.client, "/events?channel=orders", Some(&tok))
                .await
                .unwrap(),
        );
        on_b.push(
            SseClient::open(b.client, "/events?channel=orders", Some(&tok))
                .await
                .unwrap(),
        );
    }
    // One subscription per replica, however many local clients.
    assert_eq!(redis.numsub("sse:orders"), 2);
    assert_eq!(a.metric("sse_gateway_subscribed_channels").await, 1.0);

    for i in 0..50 {
        assert_eq!(redis.publish("sse:orders", format!("e{i}").as_bytes()), 2);
    }
    // And through POST /publish on replica A: it reaches B's clients too.
    let r = a
        .publish(
            &publisher_token(),
            &json!({"channel": "orders", "data": "via-http"}),
        )
        .await;
    assert_eq!(r.status, 202);
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        for i in 0..50 {
            let ev = c.next_event(T).await.expect("event");
            assert_eq!(ev.data, format!("e{i}"));
        }
        c.expect_data("via-http").await;
        // Exactly once: nothing else is pending.
        assert!(c.next_event(Duration::from_millis(200)).await.is_none());
    }

    // A channel nobody on B wants is subscribed on A only.
    let solo = client_token("bob", &["solo"]);
    let s = SseClient::open(a.client, "/events?channel=solo", Some(&solo))
        .await
        .unwrap();
    assert_eq!(redis.numsub("sse:solo"), 1);

    // When the last local client leaves, the replica unsubscribes (after a short grace).
    drop(on_b);
    redis.wait_numsub("sse:orders", 1, T);
    drop(on_a);
    redis.wait_numsub("sse:orders", 0, T);
    drop(s);
    redis.wait_numsub("sse:solo", 0, T);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.metric("sse_gateway_subscribed_channels").await, 0.0);
    assert_eq!(a.metric("sse_gateway_connections").await, 0.0);
    // No catch-all pattern subscription, ever.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let patterns: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query(&mut conn).unwrap();
    assert_eq!(patterns, 0);
}

#[tokio::test]
async fn a_thousand_streams_subscribe_in_few_round_trips() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "1000"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = token(json!({"sub": "u", "exp": now() + 600, "channels": ["*"]}));
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let stats = |conn: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_subscribe:calls="))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = stats(&mut conn);
    let opens = (0..1000).map(|i| {
        let tok = tok.clone();
        let addr = gw.client;
        tokio::spawn(async move {
            SseClient::open(addr, &format!("/events?channel=c{i}"), Some(&tok))
                .await
                .ok()
        })
    });
    let streams: Vec<SseClient> = futures_util::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("stream opens"))
        .collect();
    assert_eq!(streams.len(), 1000);
    let calls = stats(&mut conn) - before;
    assert!(calls < 200, "{calls} SUBSCRIBE commands for 1000 channels");
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("sse:c*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(channels.len(), 1000);
}
