//! What a browser's `EventSource` needs, at the HTTP level (SPEC §6.3–6.4): passing refusals
//! in-band, the token sources and their order, query tokens switched off, credentialed CORS,
//! token refresh through the cookie without a gap, and taking users off every replica.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(10);

/// Reads the in-band refusal off a stream opened as an EventSource: its `retry:` (ms) and its
/// `gateway.refused` data, after which the stream must end.
async fn in_band(mut c: SseClient) -> (u64, serde_json::Value) {
    assert_eq!(c.status, 200);
    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    let ev = c.next_event(T).await.expect("a gateway.refused event");
    assert_eq!(ev.event.as_deref(), Some("gateway.refused"), "{ev:?}");
    assert!(c.wait_closed(T).await, "the refusal must end the stream");
    let retry = c
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("retry: ")?.parse().ok())
        .expect("a retry: line");
    (retry, serde_json::from_str(&ev.data).expect("JSON data"))
}

#[tokio::test]
async fn passing_refusals_reach_an_eventsource_in_band_and_are_still_counted() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "1")]);
    let tok = client_token("ann", &["a"]);
    let _first = gw.subscribe("ann", "a").await;
    // A plain client keeps the status code.
    let plain = SseClient::open(gw.client, "/events?channel=a", Some(&tok)).await;
    assert_eq!(plain.err().map(|r| r.status), Some(429));
    // An EventSource is told in-band, with the Retry-After (10 s) in ms, jittered ±20 %.
    let mut retries = Vec::new();
    for _ in 0..5 {
        let c = SseClient::open_event_source(gw.client, "/events?channel=a", Some(&tok))
            .await
            .expect("200 in-band");
        let (retry, data) = in_band(c).await;
        assert_eq!(data["error"], "user_limit", "{data}");
        assert!((8_000..=12_000).contains(&retry), "retry {retry}");
        retries.push(retry);
    }
    retries.dedup();
    assert!(retries.len() > 1, "the retry is jittered: {retries:?}");
    assert_eq!(
        gw.metric("sse_gateway_connections_rejected_total{reason=\"user_limit\"}")
            .await,
        6.0
    );
    let listed = http(gw.admin, "GET", "/rejections", &[], b"").await.json();
    assert_eq!(
        listed["rejections"].as_array().map(Vec::len),
        Some(6),
        "{listed}"
    );
    // A lasting refusal keeps its status even for an EventSource: retrying cannot help.
    let bad = SseClient::open_event_source(gw.client, "/events?channel=a", Some("not-a-jwt")).await;
    assert_eq!(bad.err().map(|r| r.status), Some(401));
    let forbidden = SseClient::open_event_source(gw.client, "/events?channel=b", Some(&tok)).await;
    assert_eq!(forbidden.err().map(|r| r.status), Some(403));
}

#[tokio::test]
async fn an_eventsource_reaching_a_replica_without_redis_is_told_to_retry() {
    let mut redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    redis.kill();
    gw.wait_ready(false, T).await;
    let tok = client_token("bo", &["r"]);
    let c = SseClient::open_event_source(gw.client, "/events?channel=r", Some(&tok))
        .await
        .expect("200 in-band");
    let (retry, data) = in_band(c).await;
    assert_eq!(data["error"], "unavailable", "{data}");
    assert!((4_000..=6_000).contains(&retry), "retry {retry}");
    assert!(
        !data["message"].as_str().unwrap_or("").contains("ERR"),
        "{data}"
    );
}

#[tokio::test]
async fn tokens_come_from_the_header_then_the_cookie_then_the_query() {
    let gw = Gateway::start(&[("SSE_GATEWAY_AUTH_COOKIE", "sse_token")]);
    let tok = client_token("cy", &["c"]);
    let cookie = format!("theme=dark; sse_token={tok}");
    let by_cookie =
        SseClient::open_with(gw.client, "/events?channel=c", &[("Cookie", &cookie)]).await;
    assert!(by_cookie.is_ok(), "{:?}", by_cookie.err().map(|r| r.text()));
    // The header wins over the cookie, even when the header's token is bad.
    let bad_header = SseClient::open_with(
        gw.client,
        "/events?channel=c",
        &[("Cookie", &cookie), ("Authorization", "Bearer not-a-jwt")],
    )
    .await;
    assert_eq!(bad_header.err().map(|r| r.status), Some(401));
    // The cookie wins over the query.
    let path = "/events?channel=c&access_token=not-a-jwt";
    assert!(
        SseClient::open_with(gw.client, path, &[("Cookie", &cookie)])
            .await
            .is_ok()
    );
    // A cookie never authenticates a publish (a forged cross-site POST would carry it).
    let publisher = format!("sse_token={}", publisher_token());
    let r = http(
        gw.client,
        "POST",
        "/publish",
        &[("Cookie", &publisher), ("Content-Type", "application/json")],
        json!({"channel": "c", "data": 1}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    // Without SSE_GATEWAY_AUTH_COOKIE a cookie is not a token.
    let plain = Gateway::start(&[]);
    let r = SseClient::open_with(plain.client, "/events?channel=c", &[("Cookie", &cookie)]).await;
    assert_eq!(r.err().map(|r| r.status), Some(401));
}

#[tokio::test]
async fn query_tokens_can_be_switched_off() {
    let gw = Gateway::start(&[("SSE_GATEWAY_QUERY_TOKEN", "false")]);
    let tok = client_token("di", &["q"]);
    let path = format!("/events?channel=q&access_token={tok}");
    let r = SseClient::open_with(gw.client, &path, &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(&tok), "the answer echoes the token");
    // Even beside a good header: the URL has leaked the token already.
    let auth = format!("Bearer {tok}");
    let r = SseClient::open_with(gw.client, &path, &[("Authorization", &auth)]).await;
    assert_eq!(r.err().map(|r| r.status), Some(400));
    let publish = format!("/publish?access_token={}", publisher_token());
    let r = http(
        gw.client,
        "POST",
        &publish,
        &[],
        br#"{"channel":"q","data":1}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    // The header still works.
    assert!(SseClient::open(gw.client, "/events?channel=q", Some(&tok))
        .await
        .is_ok());
    assert!(
        !gw.logs.lock().unwrap().contains(&tok),
        "a token reached the log"
    );
}

#[tokio::test]
async fn credentials_are_allowed_for_listed_origins_only() {
    let listed = Gateway::start(&[
        ("SSE_GATEWAY_CORS_ORIGINS", "https://app.example.com"),
        ("SSE_GATEWAY_AUTH_COOKIE", "sse_token"),
    ]);
    let cookie = format!("sse_token={}", client_token("ed", &["o"]));
    let c = SseClient::open_with(
        listed.client,
        "/events?channel=o",
        &[("Cookie", &cookie), ("Origin", "https://app.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(
        c.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(c.header("access-control-allow-credentials"), Some("true"));
    let other = SseClient::open_with(
        listed.client,
        "/events?channel=o",
        &[("Cookie", &cookie), ("Origin", "https://evil.example.net")],
    )
    .await
    .unwrap();
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(other.header("access-control-allow-credentials"), None);
    let any = Gateway::start(&[("SSE_GATEWAY_CORS_ORIGINS", "*")]);
    let c = SseClient::open_with(
        any.client,
        "/events?channel=o",
        &[
            (
                "Authorization",
                &format!("Bearer {}", client_token("ed", &["o"])),
            ),
            ("Origin", "https://app.example.com"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(c.header("access-control-allow-origin"), Some("*"));
    assert_eq!(c.header("access-control-allow-credentials"), None);
}

/// What a browser does with a cookie its own origin refreshes: at each expiry close it
/// reconnects with the new cookie and `Last-Event-ID`, and misses nothing.
#[tokio::test]
async fn a_refreshed_cookie_carries_a_stream_across_token_expiries_without_a_gap() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_AUTH_COOKIE", "sse_token"),
    ]);
    gw.wait_ready(true, T).await;
    let subscribed = std::sync::Arc::new(tokio::sync::Notify::new());
    let publisher = {
        let client = gw.client;
        let subscribed = subscribed.clone();
        tokio::spawn(async move {
            subscribed.notified().await;
            for i in 0..60 {
                let body = json!({"channel": "live", "data": format!("e{i}")});
                let r = publish_to(client, &publisher_token(), &body).await;
                assert_eq!(r.status, 202);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut expiries = 0;
    let started = Instant::now();
    while !seen.contains(&"e59".to_string()) {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "stalled: {seen:?}"
        );
        // The page's origin hands out a token valid for two seconds.
        let tok =
            token(json!({"sub": "fay", "exp": now() + 2, "iat": now(), "channels": ["live"]}));
        let cookie = format!("sse_token={tok}");
        let mut headers = vec![("Cookie", cookie.as_str()), ("Accept", "text/event-stream")];
        if let Some(id) = &last_id {
            headers.push(("Last-Event-ID", id));
        }
        let mut c = SseClient::open_with(gw.client, "/events?channel=live", &headers)
            .await
            .expect("the refreshed cookie is accepted");
        if last_id.is_none() {
            // The first stream is live (its cursor arrived): the publisher may start.
            last_id = Some(c.wait_id(T).await);
            subscribed.notify_one();
        }
        while let Some(ev) = c.next_event(Duration::from_secs(5)).await {
            match ev.event.as_deref() {
                None => seen.push(ev.data),
                Some("gateway.token-expired") => expiries += 1,
                Some(other) => panic!("unexpected {other}: {ev:?}"),
            }
            if seen.last().is_some_and(|d| d == "e59") {
                break;
            }
        }
        last_id = c.last_id.clone().or(last_id);
    }
    publisher.await.unwrap();
    let want: Vec<String> = (0..60).map(|i| format!("e{i}")).collect();
    assert_eq!(seen, want, "every event exactly once, in order");
    assert!(expiries >= 2, "only {expiries} expiries in the run");
}

/// A publisher token that may take `sub` off (its personal channel is granted).
fn operator_for(sub: &str) -> String {
    token(json!({"sub": "ops", "exp": now() + 600, "publish": [format!("user:{sub}")]}))
}

async fn disconnect(gw: &Gateway, token: &str, body: serde_json::Value) -> Reply {
    let auth = format!("Bearer {token}");
    http(
        gw.client,
        "POST",
        "/disconnect",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn a_disconnect_closes_every_stream_of_the_user_on_every_replica_and_revokes_old_tokens() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    let b = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let issued = now() - 5;
    let old = token(json!({"sub": "gus", "exp": now() + 600, "iat": issued, "channels": ["d"]}));
    let mut on_a = SseClient::open(a.client, "/events?channel=d", Some(&old))
        .await
        .unwrap();
    let mut on_b = SseClient::open(b.client, "/events?channel=d", Some(&old))
        .await
        .unwrap();
    let mut bystander = b.subscribe("hal", "d").await;
    on_a.wait_id(T).await;
    on_b.wait_id(T).await;
    // Refused without a grant for the user's personal channel.
    let r = disconnect(
        &a,
        &publisher_token_for(&["user:someone-else"]),
        json!({"sub": "gus"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let asked = Instant::now();
    let r = disconnect(
        &a,
        &operator_for("gus"),
        json!({"sub": "gus", "revoke_before": now()}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["streams"], 2, "{}", r.text());
    for c in [&mut on_a, &mut on_b] {
        let ev = c
            .next_event(Duration::from_secs(1))
            .await
            .expect("gateway.disconnected");
        assert_eq!(ev.event.as_deref(), Some("gateway.disconnected"), "{ev:?}");
        assert!(c.wait_closed(Duration::from_secs(1)).await);
    }
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // Another user's stream is untouched.
    b.publish_data("d", "still here").await;
    bystander.expect_data("still here").await;
    // The old token is refused on both replicas, EventSource or not; a new one gets in.
    for gw in [&a, &b] {
        let r = SseClient::open_event_source(gw.client, "/events?channel=d", Some(&old)).await;
        assert_eq!(r.err().map(|r| r.status), Some(401));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = token(json!({"sub": "gus", "exp": now() + 600, "iat": now(), "channels": ["d"]}));
    assert!(SseClient::open(a.client, "/events?channel=d", Some(&fresh))
        .await
        .is_ok());
    // The revocation outlives a replica: a new one on the same Redis refuses the old token.
    drop(b);
    let c = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    c.wait_ready(true, T).await;
    let r = SseClient::open(c.client, "/events?channel=d", Some(&old)).await;
    assert_eq!(r.err().map(|r| r.status), Some(401));
    assert_eq!(
        a.metric("sse_gateway_connections_closed_total{reason=\"disconnected\"}")
            .await,
        1.0
    );
}

/// A publisher token granting `grants`.
fn publisher_token_for(grants: &[&str]) -> String {
    token(json!({"sub": "ops", "exp": now() + 600, "publish": grants}))
}

#[tokio::test]
async fn single_replica_mode_takes_users_off_and_revokes_in_memory() {
    let gw = Gateway::start(&[]);
    let old = token(json!({"sub": "ivy", "exp": now() + 600, "iat": now() - 5, "channels": ["m"]}));
    let mut c = SseClient::open(gw.client, "/events?channel=m", Some(&old))
        .await
        .unwrap();
    c.wait_id(T).await;
    let r = disconnect(
        &gw,
        &operator_for("ivy"),
        json!({"sub": "ivy", "revoke_before": now()}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["streams"], 1);
    let ev = c
        .next_event(Duration::from_secs(1))
        .await
        .expect("gateway.disconnected");
    assert_eq!(ev.event.as_deref(), Some("gateway.disconnected"));
    let r = SseClient::open(gw.client, "/events?channel=m", Some(&old)).await;
    assert_eq!(r.err().map(|r| r.status), Some(401));
    // Malformed requests are refused with a clear 400.
    for body in [
        json!({}),
        json!({"sub": ""}),
        json!({"sub": "ivy", "extra": 1}),
        json!({"sub": "a b"}),
    ] {
        let r = disconnect(&gw, &operator_for("ivy"), body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
}
