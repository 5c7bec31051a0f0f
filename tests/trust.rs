//! SPEC §6.6: only the gateway's own durable path moves a stream's position; nothing published
//! on Redis switches off the probe; replicas of different settings or versions never fight
//! over the history function.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(10);

fn conn(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// The history library as a replica of `version` holding `key_hex` would load it.
fn library(redis: &Redis, version: i64, key_hex: &str) -> String {
    use sse_gateway::testing::history::{redis::Library, HistorySettings};
    use sse_gateway::testing::position::DurableKey;
    use sse_gateway::testing::redis::{Commands, Topology};
    let pool = Commands::new(Topology::parse(&redis.url()).unwrap());
    let settings = HistorySettings {
        prefix: "sse:".into(),
        size: 1000,
        ttl: Duration::from_secs(600),
        max_event_bytes: 65536,
    };
    Library::new(pool, &settings).source_as(version, &DurableKey::from_hex(key_hex).unwrap())
}

#[tokio::test]
async fn a_raw_publish_of_the_durable_marker_cannot_suppress_durable_events() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    gw.wait_ready(true, T).await;
    let first = gw.publish_data("trust", "first").await;
    let epoch = first.split('.').nth(1).unwrap().to_string();
    let tok = client_token("alice", &["trust"]);
    let auth = format!("Bearer {tok}");
    let mut c = SseClient::open_with(
        gw.client,
        "/events?channel=trust",
        &[("Authorization", &auth), ("Last-Event-ID", &first)],
    )
    .await
    .unwrap();
    let opened_at = c.wait_id(T).await;
    // Anyone who can PUBLISH: the old unsigned marker with a position far in the future, and
    // the new marker with a made-up MAC.
    let huge = "18446744073709551615-0";
    let forged_old = format!("\0D1\0{epoch}\0{huge}\0{{\"data\":\"forged-1\"}}");
    let forged_new = format!(
        "\0D2\0{}\0{epoch}\0{huge}\0{{\"data\":\"forged-2\"}}",
        "0".repeat(40)
    );
    assert_eq!(redis.publish("sse:trust", forged_old.as_bytes()), 1);
    assert_eq!(redis.publish("sse:trust", forged_new.as_bytes()), 1);
    gw.publish_data("trust", "real").await;
    let got = c.next_event(T).await.expect("the real event arrives");
    assert_eq!(
        got.data, "real",
        "a forged marker suppressed or preceded it"
    );
    let forged = gw
        .metric("sse_gateway_events_dropped_total{reason=\"forged\"}")
        .await;
    assert_eq!(forged, 2.0, "both forgeries dropped and counted");
    // A resume from before still replays the real event, with nothing forged in between.
    let mut again = SseClient::open_with(
        gw.client,
        "/events?channel=trust",
        &[("Authorization", &auth), ("Last-Event-ID", &opened_at)],
    )
    .await
    .unwrap();
    again.expect_data("real").await;
    assert!(!again.text().contains("forged"));
}

#[tokio::test]
async fn a_number_published_on_the_probe_channel_does_not_switch_the_probe_off() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "1"),
        // Only the probe may notice the stall below, not the lease renewal.
        ("SSE_GATEWAY_CONNECTION_LEASE_SECS", "3600"),
    ]);
    gw.wait_ready(true, T).await;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("sse:{gateway}:probe:*")
        .query(&mut conn(&redis))
        .unwrap();
    assert_eq!(channels.len(), 1, "{channels:?}");
    for forged in ["99999999999", "18446744073709551615"] {
        redis.publish(&channels[0], forged.as_bytes());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let noticed = redis.stall_until_unready(&gw).await;
    assert!(
        noticed <= Duration::from_secs(8),
        "stall noticed after {noticed:?}"
    );
}

#[tokio::test]
async fn replicas_pass_their_own_history_settings() {
    let redis = Redis::start();
    let url = redis.url();
    let small = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_HISTORY_SIZE", "5"),
    ]);
    small.wait_ready(true, T).await;
    // The second replica connects last: before, its settings were baked into the function.
    let large = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_HISTORY_SIZE", "1000"),
    ]);
    large.wait_ready(true, T).await;
    for i in 0..10 {
        small.publish_data("sized", &format!("s{i}")).await;
    }
    let len: i64 = redis::cmd("XLEN")
        .arg("{sse:sized}:history")
        .query(&mut conn(&redis))
        .unwrap();
    assert_eq!(len, 5, "the publishing replica's HISTORY_SIZE applies");
    for i in 0..10 {
        large.publish_data("sized", &format!("l{i}")).await;
    }
    let len: i64 = redis::cmd("XLEN")
        .arg("{sse:sized}:history")
        .query(&mut conn(&redis))
        .unwrap();
    assert_eq!(len, 15);
}

#[tokio::test]
async fn a_newer_library_is_never_replaced_by_an_older_replica() {
    let redis = Redis::start();
    let url = redis.url();
    // A library from a later version (same calling convention, higher version number).
    let newer = library(&redis, 99, &"ab".repeat(32));
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&newer)
        .query(&mut conn(&redis))
        .unwrap();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    gw.wait_ready(true, T).await;
    let (version, key): (i64, String) = redis::cmd("FCALL_RO")
        .arg("sse_publish_info")
        .arg(0)
        .query(&mut conn(&redis))
        .expect("the newer library is still in place");
    assert_eq!(version, 99);
    assert_eq!(key, "ab".repeat(32));
    // And the replica works with it: its events verify under the newer library's key.
    let tok = client_token("alice", &["newer"]);
    let mut c = SseClient::open(gw.client, "/events?channel=newer", Some(&tok))
        .await
        .unwrap();
    c.wait_id(T).await;
    gw.publish_data("newer", "works").await;
    c.expect_data("works").await;
}

#[tokio::test]
async fn a_library_replaced_under_a_running_replica_is_resynchronised_without_loss() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["swap"]);
    let mut c = SseClient::open(gw.client, "/events?channel=swap", Some(&tok))
        .await
        .unwrap();
    c.wait_id(T).await;
    gw.publish_data("swap", "before").await;
    c.expect_data("before").await;
    // Someone loads the library again with another key (as after a FUNCTION FLUSH and a new
    // replica): events published now are signed with a key this replica does not hold yet.
    let other = library(&redis, 2, &"cd".repeat(32));
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&other)
        .query(&mut conn(&redis))
        .unwrap();
    for i in 0..3 {
        gw.publish_data("swap", &format!("after-{i}")).await;
    }
    // The replica notices, adopts the key and fills what it dropped from history.
    for i in 0..3 {
        let e = c
            .next_event(Duration::from_secs(20))
            .await
            .expect("no loss");
        assert_eq!(e.data, format!("after-{i}"));
    }
}

#[tokio::test]
async fn a_raw_publish_on_the_disconnect_channel_takes_nobody_off() {
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = gw.subscribe("mia", "kept").await;
    // Anyone who can PUBLISH: the user's name, plain or dressed as a signed message.
    let forged = format!("\0D2\0{}\0disconnect\x000-0\0mia", "0".repeat(40));
    for payload in ["mia", forged.as_str()] {
        redis.publish("sse:{gateway}:disconnect", payload.as_bytes());
    }
    gw.publish_data("kept", "still open").await;
    c.expect_data("still open").await;
    assert!(
        gw.metric("sse_gateway_events_dropped_total{reason=\"forged\"}")
            .await
            >= 2.0
    );
    // The gateway's own disconnect, signed, does.
    let ops = token(json!({"sub": "ops", "exp": now() + 60, "publish": ["user:mia"]}));
    let r = http(
        gw.client,
        "POST",
        "/disconnect",
        &[("Authorization", &format!("Bearer {ops}"))],
        br#"{"sub": "mia"}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = c.next_event(T).await.expect("gateway.disconnected");
    assert_eq!(ev.event.as_deref(), Some("gateway.disconnected"));
}
