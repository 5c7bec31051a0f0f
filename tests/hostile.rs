//! Trust boundaries (SPEC §6.2, §6.3, §6.6): slow publishers, crafted ids, tokens missing
//! required claims, and answers that must never carry Redis's own words.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

async fn half_sent_publish(gw: &Gateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.client).await.unwrap();
    let head = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"chan",
        publisher_token()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn slow_publish_bodies_never_keep_streams_out() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_MAX_PENDING_HANDSHAKES", "2"),
        ("SSE_GATEWAY_HEADER_TIMEOUT_SECS", "2"),
    ]);
    let mut a = half_sent_publish(&gw).await;
    let mut b = half_sent_publish(&gw).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tok = client_token("alice", &["x"]);
    let c = SseClient::open(gw.client, "/events?channel=x", Some(&tok)).await;
    assert!(
        c.is_ok(),
        "two half-sent publish bodies kept a stream out: {:?}",
        c.err().map(|r| (r.status, r.text()))
    );
    // The slow bodies themselves get 408 once the header timeout has passed.
    let started = Instant::now();
    for s in [&mut a, &mut b] {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "a body that never arrives is answered 408, got {text:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn capacity_refusals_are_listed_in_rejections() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_MAX_PENDING_HANDSHAKES", "1"),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "30"),
    ]);
    gw.wait_ready(true, T).await;
    // Redis stops answering: the first handshake waits on its admission, holding the permit.
    redis.signal("STOP");
    let tok = client_token("alice", &["x"]);
    let client = gw.client;
    let waiting = tokio::spawn({
        let tok = tok.clone();
        async move { SseClient::open(client, "/events?channel=x", Some(&tok)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = SseClient::open_with(
        gw.client,
        "/events?channel=x",
        &[("Authorization", &format!("Bearer {tok}"))],
    )
    .await;
    let refused = refused.err().expect("the second handshake is refused");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "capacity");
    redis.signal("CONT");
    let _ = waiting.await;
    let list = http(gw.admin, "GET", "/rejections", &[], b"").await.json();
    let reasons: Vec<&str> = list["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"capacity"),
        "capacity refusals missing from /rejections: {reasons:?}"
    );
}

#[tokio::test]
async fn a_crafted_last_event_id_is_a_gap_never_an_error() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    gw.wait_ready(true, T).await;
    let r = gw
        .publish(
            &publisher_token(),
            &json!({"channel": "crafted", "data": 1}),
        )
        .await;
    assert_eq!(r.status, 202);
    let id = r.json()["ids"]["crafted"].as_str().unwrap().to_string();
    let mut parts = id.split('.');
    let (tag, epoch) = (parts.next().unwrap(), parts.next().unwrap());
    let tok = client_token("alice", &["crafted"]);
    let auth = format!("Bearer {tok}");
    let hostile = [
        format!("{tag}.{epoch}.18446744073709551615-18446744073709551615"),
        format!("{tag}.{epoch}.18446744073709551615-0"),
        format!("{tag}.{epoch}.99999999999999-0"),
        format!("{tag}.18446744073709551615.18446744073709551615-18446744073709551615"),
        format!("{tag}.{epoch}.1-99999999999999999999999999"),
        format!("{tag}.-1.-5"),
        format!("{tag}...."),
    ];
    for last in &hostile {
        let c = SseClient::open_with(
            gw.client,
            "/events?channel=crafted",
            &[("Authorization", &auth), ("Last-Event-ID", last)],
        )
        .await;
        let mut c = match c {
            Ok(c) => c,
            Err(reply) => panic!(
                "Last-Event-ID {last:?} answered {} {}",
                reply.status,
                reply.text()
            ),
        };
        let gap = c.next_event(T).await.expect("an event");
        assert_eq!(
            gap.event.as_deref(),
            Some("gateway.gap"),
            "Last-Event-ID {last:?}"
        );
        let text = c.text();
        assert!(!text.to_lowercase().contains("err"), "{text}");
    }
}

#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_JWT_ISSUER", "https://issuer.example"),
        ("SSE_GATEWAY_JWT_AUDIENCE", "sse"),
    ]);
    let exp = now() + 600;
    let cases = [
        (
            json!({"sub": "a", "exp": exp, "aud": "sse", "channels": ["x"]}),
            401,
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": "https://issuer.example", "channels": ["x"]}),
            401,
        ),
        (
            json!({"sub": "a", "exp": exp, "iss": "https://issuer.example", "aud": "sse", "channels": ["x"]}),
            200,
        ),
    ];
    for (claims, status) in cases {
        let tok = token(claims.clone());
        let got = match SseClient::open(gw.client, "/events?channel=x", Some(&tok)).await {
            Ok(_) => 200,
            Err(r) => r.status,
        };
        assert_eq!(got, status, "claims {claims}");
    }
}

#[tokio::test]
async fn publish_with_history_off_still_answers_a_position_per_channel() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_HISTORY_SIZE", "0"),
    ]);
    gw.wait_ready(true, T).await;
    let r = gw
        .publish(
            &publisher_token(),
            &json!({"channels": ["p", "q"], "data": 1}),
        )
        .await;
    assert_eq!(r.status, 202);
    let ids = r.json()["ids"].clone();
    for c in ["p", "q"] {
        let id = ids[c]
            .as_str()
            .unwrap_or_else(|| panic!("no id for {c}: {ids}"));
        // The stand-in resumes as an honest gap.
        let tok = client_token("alice", &[c]);
        let auth = format!("Bearer {tok}");
        let mut s = SseClient::open_with(
            gw.client,
            &format!("/events?channel={c}"),
            &[("Authorization", &auth), ("Last-Event-ID", id)],
        )
        .await
        .unwrap();
        let gap = s.next_event(T).await.unwrap();
        assert_eq!(gap.event.as_deref(), Some("gateway.gap"));
    }
}
