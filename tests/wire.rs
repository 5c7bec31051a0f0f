//! What a client sees on the wire: headers, first bytes, frames for every kind of payload,
//! heartbeats, and refused events that never arrive.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn frames_headers_and_heartbeats_over_redis() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "1"),
        ("SSE_GATEWAY_RETRY_MS", "1500"),
        ("SSE_GATEWAY_MAX_EVENT_BYTES", "1024"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("alice", &["wire"]);
    let mut c = SseClient::open(gw.client, "/events?channel=wire", Some(&tok))
        .await
        .expect("stream opens");

    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.header("cache-control"), Some("no-cache"));
    assert_eq!(c.header("x-accel-buffering"), Some("no"));
    // The first bytes arrive at once, before any event.
    assert!(
        c.read_until_contains(b"\n\n", Duration::from_millis(500))
            .await
    );
    assert!(c.text().starts_with("retry: 1500\n:"), "{:?}", c.text());

    // Heartbeats: with a 1 s interval and no events, comments keep coming.
    let start = Instant::now();
    assert!(
        c.read_until_contains(b": heartbeat\n\n", Duration::from_millis(1800))
            .await
    );
    let first = start.elapsed();
    let before = c.text().matches(": heartbeat").count();
    assert!(
        c.read_until_contains(
            b": heartbeat\n\n: heartbeat\n\n",
            Duration::from_millis(2500)
        )
        .await
    );
    assert!(c.text().matches(": heartbeat").count() > before);
    assert!(
        first <= Duration::from_millis(1500),
        "first heartbeat after {first:?}"
    );

    let mark = c.raw.len();
    let publish = |p: &[u8]| assert_eq!(redis.publish("sse:wire", p), 1);
    publish(b"plain text");
    publish(b"a\r\nb\rc\nd");
    publish(br#"{"event":"price","data":{"sym": "X", "px": [1, 2]}, "id":"forged"}"#);
    publish(br#"{"data":"line1\nline2"}"#);
    publish(br#"{"x": 1}"#);
    // Refused: injection in the name, reserved name, oversize. None may reach the client.
    publish(br#"{"event":"evil\ndata: injected","data":"x"}"#);
    publish(br#"{"event":"gateway.shutdown","data":"x"}"#);
    publish(&[b'z'; 1025]);
    publish(b"last");

    assert!(
        c.read_until_contains(b"data: last\n\n", T).await,
        "{}",
        c.text()
    );
    let body = String::from_utf8_lossy(&c.raw[mark..]).replace(": heartbeat\n\n", "");
    assert_eq!(
        body,
        "data: plain text\n\n\
         data: a\ndata: b\ndata: c\ndata: d\n\n\
         event: price\ndata: {\"sym\":\"X\",\"px\":[1,2]}\n\n\
         data: line1\ndata: line2\n\n\
         data: {\"x\": 1}\n\n\
         data: last\n\n"
    );
    assert_eq!(
        gw.metric("sse_gateway_events_dropped_total{reason=\"invalid\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("sse_gateway_events_dropped_total{reason=\"oversize\"}")
            .await,
        1.0
    );
    assert!(gw.metric("sse_gateway_events_delivered_total").await >= 6.0);
    let metrics = gw.metrics().await;
    assert!(metrics.contains("sse_gateway_delivery_latency_seconds_bucket{le=\"0.001\"}"));
    assert!(metrics.contains("process_resident_memory_bytes"));
    assert!(metrics.contains("process_open_fds"));
    assert!(metrics.contains("sse_gateway_redis_connected 1"));
}

#[tokio::test]
async fn publish_over_http_checks_its_input() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_EVENT_BYTES", "256")]);
    let tok = client_token("alice", &["news"]);
    let mut c = SseClient::open(gw.client, "/events?channel=news", Some(&tok))
        .await
        .unwrap();
    let p = token(json!({"exp": now() + 60, "publish": ["news"]}));

    let ok = gw
        .publish(
            &p,
            &json!({"channel": "news", "event": "headline", "data": {"t": "a b"}}),
        )
        .await;
    assert_eq!(ok.status, 202, "{}", ok.text());
    assert!(ok.json()["ids"]["news"].is_string(), "{}", ok.text());
    let ev = c.next_event(T).await.expect("event");
    assert_eq!(ev.event.as_deref(), Some("headline"));
    assert_eq!(ev.data, r#"{"t":"a b"}"#);
    let ok = gw
        .publish(&p, &json!({"channels": ["news"], "data": "x\r\ny"}))
        .await;
    assert_eq!(ok.status, 202);
    c.expect_data("x\ny").await;

    let cases = [
        (json!({"channel": "sports", "data": "x"}), 403),
        (json!({"channel": "news"}), 400),
        (
            json!({"channel": "news", "event": "a\nb", "data": "x"}),
            400,
        ),
        (
            json!({"channel": "news", "event": "gateway.gap", "data": "x"}),
            400,
        ),
        (json!({"channel": "bad name", "data": "x"}), 400),
        (json!({"data": "x"}), 400),
        (
            json!({"channel": "news", "chanel": "typo", "data": "x"}),
            400,
        ),
        (json!({"channel": "news", "data": "x".repeat(300)}), 413),
    ];
    for (body, status) in cases {
        let r = gw.publish(&p, &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["error"].is_string());
    }
    let r = http(
        gw.client,
        "POST",
        "/publish",
        &[("Authorization", &format!("Bearer {p}"))],
        b"{not json",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = gw
        .publish("nope", &json!({"channel": "news", "data": "x"}))
        .await;
    assert_eq!(r.status, 401);
    let sub_only = client_token("alice", &["news"]);
    let r = gw
        .publish(&sub_only, &json!({"channel": "news", "data": "x"}))
        .await;
    assert_eq!(r.status, 403);

    // Nothing refused reached the stream.
    let ok = gw
        .publish(&p, &json!({"channel": "news", "data": "end"}))
        .await;
    assert_eq!(ok.status, 202);
    c.expect_data("end").await;
    assert_eq!(
        gw.metric("sse_gateway_publish_total{result=\"accepted\"}")
            .await,
        3.0
    );
    assert_eq!(
        gw.metric("sse_gateway_publish_total{result=\"rejected\"}")
            .await,
        11.0
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let gw = Gateway::start(&[]);
    let r = http(gw.client, "GET", "/nope", &[], b"").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    let r = http(gw.client, "DELETE", "/events", &[], b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"], "method_not_allowed");
    let r = http(gw.client, "GET", "/publish", &[], b"").await;
    assert_eq!(r.status, 405);
    let r = http(gw.admin, "GET", "/nope", &[], b"").await;
    assert_eq!(r.status, 404);
    let r = http(gw.admin, "POST", "/metrics", &[], b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(
        http(gw.admin, "GET", "/healthz", &[], b"").await.status,
        200
    );
    assert_eq!(gw.readyz().await, 200);
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let gw = Gateway::start(&[(
        "SSE_GATEWAY_CORS_ORIGINS",
        "https://app.example, https://admin.example",
    )]);
    let tok = client_token("alice", &["c"]);
    let auth = format!("Bearer {tok}");
    let c = SseClient::open_with(
        gw.client,
        "/events?channel=c",
        &[("Authorization", &auth), ("Origin", "https://app.example")],
    )
    .await
    .unwrap();
    assert_eq!(
        c.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(c.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(c.header("vary"), Some("Origin"));
    let c = SseClient::open_with(
        gw.client,
        "/events?channel=c",
        &[("Authorization", &auth), ("Origin", "https://evil.example")],
    )
    .await
    .unwrap();
    assert_eq!(c.header("access-control-allow-origin"), None);

    let pre = |origin: &'static str, method: &'static str| {
        let addr = gw.client;
        async move {
            http(
                addr,
                "OPTIONS",
                "/publish",
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", method),
                ],
                b"",
            )
            .await
        }
    };
    let r = pre("https://admin.example", "POST").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://admin.example")
    );
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    assert_eq!(pre("https://evil.example", "POST").await.status, 403);
    assert_eq!(pre("https://admin.example", "DELETE").await.status, 403);

    // "*": any origin, never with credentials.
    let any = Gateway::start(&[("SSE_GATEWAY_CORS_ORIGINS", "*")]);
    let c = SseClient::open_with(
        any.client,
        "/events?channel=c",
        &[("Authorization", &auth), ("Origin", "https://x.example")],
    )
    .await
    .unwrap();
    assert_eq!(c.header("access-control-allow-origin"), Some("*"));
    assert_eq!(c.header("access-control-allow-credentials"), None);
    // No setting: no CORS headers, and OPTIONS is not a method here.
    let none = Gateway::start(&[]);
    let c = SseClient::open_with(
        none.client,
        "/events?channel=c",
        &[("Authorization", &auth), ("Origin", "https://x.example")],
    )
    .await
    .unwrap();
    assert_eq!(c.header("access-control-allow-origin"), None);
    assert_eq!(
        http(none.client, "OPTIONS", "/events", &[], b"")
            .await
            .status,
        405
    );
}

#[tokio::test]
async fn an_expiring_token_ends_its_stream_with_a_control_event() {
    let gw = Gateway::start(&[]);
    let exp = now() + 2;
    let tok = token(json!({"sub": "alice", "exp": exp, "channels": ["e"]}));
    let mut c = SseClient::open(gw.client, "/events?channel=e", Some(&tok))
        .await
        .unwrap();
    let ev = c
        .next_event(Duration::from_secs(5))
        .await
        .expect("control event");
    assert_eq!(ev.event.as_deref(), Some("gateway.token-expired"));
    assert!(now() >= exp, "closed before exp");
    assert!(c.wait_closed(Duration::from_secs(2)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        gw.metric("sse_gateway_connections_closed_total{reason=\"token_expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn last_event_id_without_history_is_an_honest_gap() {
    let gw = Gateway::start(&[]);
    let tok = client_token("alice", &["g"]);
    let auth = format!("Bearer {tok}");
    let mut c = SseClient::open_with(
        gw.client,
        "/events?channel=g",
        &[("Authorization", &auth), ("Last-Event-ID", "123")],
    )
    .await
    .unwrap();
    let ev = c.next_event(T).await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("gateway.gap"));
    let mut c = SseClient::open(gw.client, "/events?channel=g&last_event_id=x", Some(&tok))
        .await
        .unwrap();
    assert_eq!(
        c.next_event(T).await.unwrap().event.as_deref(),
        Some("gateway.gap")
    );
    // Without one, no gap.
    let mut c = SseClient::open(gw.client, "/events?channel=g", Some(&tok))
        .await
        .unwrap();
    assert!(c.next_event(Duration::from_millis(300)).await.is_none());
}
