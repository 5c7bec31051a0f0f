//! SPEC §6.2: deadlines hold whatever the traffic. A slow reader cannot keep its stream past its
//! token, a socket that takes no bytes is cut, a slow HTTP/2 stream loses only itself, idle
//! HTTP/2 connections and spare sockets are bounded.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A stream request on a socket with a small receive buffer, so the gateway's writes block
/// as soon as the client stops keeping up.
async fn slow_socket(gw: &Gateway, path: &str, token: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.client).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Publishes `size`-byte events carrying their sequence number and send time, at about `rate`
/// per second, until `stop` is set.
fn publisher(
    gw: &Gateway,
    channel: &'static str,
    size: usize,
    rate: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let client = gw.client;
    tokio::spawn(async move {
        let tok = publisher_token();
        let pad = "x".repeat(size);
        let mut n = 0u64;
        let every = Duration::from_micros(1_000_000 / rate);
        let mut next = tokio::time::Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let body = json!({"channel": channel, "data": format!("seq={n} t={} {pad}", millis())});
            let r = publish_to(client, &tok, &body).await;
            assert_eq!(r.status, 202);
            n += 1;
            next += every;
            tokio::time::sleep_until(next).await;
        }
        n
    })
}

/// Send times (ms) of every event in `raw`.
fn send_times(raw: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(raw);
    text.split("data: seq=")
        .skip(1)
        .filter_map(|rest| {
            let t = rest.split_once(" t=")?.1;
            t.split(' ').next()?.parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn a_slow_reader_cannot_keep_its_stream_past_its_token() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_CLIENT_QUEUE", "100000"),
        ("SSE_GATEWAY_WRITE_TIMEOUT_SECS", "30"),
    ]);
    let exp = now() + 3;
    let tok = token(json!({"sub": "slow", "exp": exp, "channels": ["busy"]}));
    let mut s = slow_socket(&gw, "/events?channel=busy", &tok).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = publisher(&gw, "busy", 16 * 1024, 90, stop.clone());
    // About 100 KB/s, while the channel carries about 1.4 MB/s.
    let mut raw = Vec::new();
    let mut buf = [0u8; 2048];
    while now() < exp + 4 {
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publishing.await.unwrap();
    // Now read at full speed: whatever the gateway still sends arrives.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    raw.extend_from_slice(&rest);
    let times = send_times(&raw);
    assert!(
        published > 200,
        "the publisher kept the channel busy ({published})"
    );
    let late: Vec<u64> = times
        .iter()
        .copied()
        .filter(|t| *t > exp * 1000 + 1000)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} events received were published more than 1 s after the token expired",
        late.len(),
        times.len()
    );
    let closed = gw
        .metric("sse_gateway_connections_closed_total{reason=\"token_expired\"}")
        .await;
    assert_eq!(closed, 1.0, "the stream ends as token_expired");
}

#[tokio::test]
async fn a_socket_that_takes_no_bytes_is_cut_within_the_write_timeout() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_CLIENT_QUEUE", "100000"),
        ("SSE_GATEWAY_WRITE_TIMEOUT_SECS", "2"),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "1"),
    ]);
    let tok = client_token("stuck", &["heavy"]);
    let s = slow_socket(&gw, "/events?channel=heavy", &tok).await;
    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = publisher(&gw, "heavy", 60 * 1024, 60, stop.clone());
    let metric = "sse_gateway_connections_closed_total{reason=\"slow_consumer\"}";
    // The socket stops taking bytes within a second or two (its buffers fill); the cut must
    // follow within HEARTBEAT + WRITE_TIMEOUT + 2 s of that.
    while gw.metric(metric).await != 1.0 {
        if started.elapsed() > Duration::from_secs(12) {
            let m = gw.metrics().await;
            let lines: Vec<&str> = m
                .lines()
                .filter(|l| l.contains("connections") && !l.starts_with('#'))
                .collect();
            panic!(
                "a client that reads nothing still holds its stream after {:?}: {lines:?}\n{}",
                started.elapsed(),
                gw.logs.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.await.unwrap();
    assert_eq!(gw.metric("sse_gateway_connections").await, 0.0);
    drop(s);
}

#[tokio::test]
async fn a_slow_http2_stream_is_reset_alone_and_its_siblings_keep_going() {
    let gw = Gateway::start(&[("SSE_GATEWAY_CLIENT_QUEUE", "8")]);
    let tcp = TcpStream::connect(gw.client).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_connection_window_size(64 * 1024 * 1024)
            .initial_stream_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let tok = client_token("h2user", &["slow", "fast"]);
    let open = |channel: &str| {
        hyper::Request::get(format!("http://{}/events?channel={channel}", gw.client))
            .header("authorization", format!("Bearer {tok}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let slow = sender.send_request(open("slow")).await.unwrap();
    let fast = sender.send_request(open("fast")).await.unwrap();
    assert_eq!(slow.status(), 200);
    assert_eq!(fast.status(), 200);
    let mut slow = slow.into_body();
    let mut fast = fast.into_body();
    // The slow stream is never read: its window fills, then its queue, and it is cut.
    let pad = "y".repeat(16 * 1024);
    for i in 0..40 {
        let r = gw
            .publish(
                &publisher_token(),
                &json!({"channel": "slow", "data": format!("{i} {pad}")}),
            )
            .await;
        assert_eq!(r.status, 202);
    }
    let metric = "sse_gateway_connections_closed_total{reason=\"slow_consumer\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric(metric).await != 1.0 {
        assert!(Instant::now() < deadline, "the slow stream was never cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = gw
        .publish(
            &publisher_token(),
            &json!({"channel": "fast", "data": "still-here"}),
        )
        .await;
    assert_eq!(r.status, 202);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).contains("data: still-here") {
        match tokio::time::timeout_at(deadline, fast.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                }
            }
            other => panic!(
                "the sibling stream died with the slow one: {:?}",
                other.map(|o| o.map(|r| r.map(|_| ())))
            ),
        }
    }
    assert_eq!(gw.metric("sse_gateway_connections").await, 1.0);
    // The slow stream itself ends with a reset once its buffered data is read.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match slow.frame().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow stream never ended");
}

#[tokio::test]
async fn an_http2_connection_without_a_stream_is_closed_after_the_header_timeout() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_HEADER_TIMEOUT_SECS", "1"),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "60"),
    ]);
    let mut s = TcpStream::connect(gw.client).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut sink)).await;
    assert!(
        r.is_ok(),
        "a stream-less HTTP/2 connection was still open after 8 s"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn client_sockets_are_capped_at_streams_plus_handshakes() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_MAX_CONNECTIONS", "4"),
        ("SSE_GATEWAY_MAX_PENDING_HANDSHAKES", "4"),
        ("SSE_GATEWAY_HEADER_TIMEOUT_SECS", "30"),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "60"),
    ]);
    let before = open_fds(gw.pid());
    // A client with no token floods the port with HTTP/2 prefaces.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(gw.client).await.unwrap();
        let _ = s
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = open_fds(gw.pid());
    assert!(
        during <= before + 8,
        "the replica holds {} more sockets for 40 idle connections; the cap is 8",
        during - before
    );
    drop(held);
    // Once they are gone, streams are served again.
    let tok = client_token("after", &["a"]);
    let c = tokio::time::timeout(
        Duration::from_secs(5),
        SseClient::open(gw.client, "/events?channel=a", Some(&tok)),
    )
    .await;
    assert!(matches!(c, Ok(Ok(_))), "no stream after the flood ended");
}

#[tokio::test]
async fn an_http2_stream_blocked_by_flow_control_still_ends_at_its_token_expiry() {
    let gw = Gateway::start(&[("SSE_GATEWAY_CLIENT_QUEUE", "100000")]);
    let tcp = TcpStream::connect(gw.client).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let exp = now() + 3;
    let tok = token(json!({"sub": "h2slow", "exp": exp, "channels": ["h2busy"]}));
    let req = hyper::Request::get(format!("http://{}/events?channel=h2busy", gw.client))
        .header("authorization", format!("Bearer {tok}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _never_read = resp.into_body();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = publisher(&gw, "h2busy", 16 * 1024, 50, stop.clone());
    let metric = "sse_gateway_connections_closed_total{reason=\"token_expired\"}";
    loop {
        if gw.metric(metric).await == 1.0 {
            break;
        }
        assert!(
            now() <= exp + 3,
            "a stream whose window is full outlived its token by more than 3 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.await.unwrap();
    assert_eq!(gw.metric("sse_gateway_connections").await, 0.0);
}
