//! Durable events and resume: what a client that reconnects (often to another replica) gets.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(10);

async fn publish(gw: &Gateway, channel: &str, data: &str) {
    gw.publish_data(channel, data).await;
}

fn fcall(redis: &Redis, channel: &str, payload: &str) -> Result<Vec<String>, redis::RedisError> {
    let mut conn = redis::Client::open(redis.url())?.get_connection()?;
    redis::cmd("FCALL")
        .arg("sse_publish")
        .arg(1)
        .arg(format!("{{sse:{channel}}}"))
        .arg(payload)
        .query(&mut conn)
}

async fn open(gw: &Gateway, channels: &[&str], last_id: Option<&str>) -> SseClient {
    let tok = client_token("alice", channels);
    let auth = format!("Bearer {tok}");
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let path = format!("/events?{}", query.join("&"));
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(id) = last_id {
        headers.push(("Last-Event-ID", id));
    }
    SseClient::open_with(gw.client, &path, &headers)
        .await
        .unwrap_or_else(|r| panic!("{}: {}", r.status, r.text()))
}

/// The resume contract, for any pair of replicas (the same one twice in single-replica mode).
async fn resume_contract(a: &Gateway, b: &Gateway) {
    let mut c = open(a, &["orders"], None).await;
    c.wait_id(T).await;
    publish(a, "orders", "before").await;
    let ev = c.next_event(T).await.unwrap();
    assert_eq!(ev.data, "before");
    assert!(ev.id.is_some(), "durable events carry an id");
    let last = c.last_id.clone().unwrap();
    drop(c);
    for i in 0..100 {
        publish(b, "orders", &format!("e{i}")).await;
    }
    let mut c = open(b, &["orders"], Some(&last)).await;
    for i in 0..100 {
        let ev = c.next_event(T).await.expect("missed event");
        assert_eq!(ev.event, None, "no gap expected");
        assert_eq!(ev.data, format!("e{i}"));
    }
    publish(a, "orders", "live").await;
    c.expect_data("live").await;
    c.expect_nothing(Duration::from_millis(300), "a duplicate arrived")
        .await;
}

#[tokio::test]
async fn resume_on_another_replica_gets_exactly_what_was_missed() {
    let redis = Redis::start();
    let a = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    let b = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    resume_contract(&a, &b).await;
}

#[tokio::test]
async fn single_replica_mode_resumes_the_same_way() {
    let gw = Gateway::start(&[]);
    resume_contract(&gw, &gw).await;
}

#[tokio::test]
async fn a_three_channel_stream_resumes_every_channel() {
    let redis = Redis::start();
    let a = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    let b = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let chans = ["x", "y", "z"];
    let mut c = open(&a, &chans, None).await;
    publish(&a, "y", "y-before").await;
    c.expect_data("y-before").await;
    let last = c.last_id.clone().unwrap();
    drop(c);
    for i in 0..99 {
        let ch = chans[i % 3];
        publish(&b, ch, &format!("{ch}-{i}")).await;
    }
    let mut c = open(&b, &chans, Some(&last)).await;
    let mut got: Vec<String> = Vec::new();
    for _ in 0..99 {
        let ev = c.next_event(T).await.expect("missed event");
        assert_eq!(ev.event, None, "no gap expected: {ev:?}");
        got.push(ev.data);
    }
    for ch in chans {
        let mine: Vec<&String> = got.iter().filter(|d| d.starts_with(ch)).collect();
        let expected: Vec<String> = (0..99)
            .filter(|i| chans[i % 3] == ch)
            .map(|i| format!("{ch}-{i}"))
            .collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>(), "channel {ch}");
    }
    for ch in chans {
        publish(&a, ch, &format!("{ch}-live")).await;
        c.expect_data(&format!("{ch}-live")).await;
    }
    // The id of the last event resumes all three channels: nothing more to replay.
    let last = c.last_id.clone().unwrap();
    drop(c);
    let mut c = open(&a, &chans, Some(&last)).await;
    assert!(c.next_event(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn reconnecting_while_a_publisher_runs_flat_out_loses_and_repeats_nothing() {
    let redis = Redis::start();
    let a = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    let b = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let mut c = open(&a, &["flood"], None).await;
    c.wait_id(T).await;
    let total = 2000;
    let url = redis.url();
    let publisher = std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        for i in 0..total {
            let _: Vec<String> = redis::cmd("FCALL")
                .arg("sse_publish")
                .arg(1)
                .arg("{sse:flood}")
                .arg(format!("{i}"))
                .query(&mut conn)
                .unwrap();
        }
    });
    let mut got: Vec<u32> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    while got.len() < 300 {
        let ev = c.next_event(T).await.expect("event");
        got.push(ev.data.parse().unwrap());
        ids.push(ev.id.unwrap());
    }
    let last = c.last_id.clone().unwrap();
    drop(c);
    let mut c = open(&b, &["flood"], Some(&last)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < total as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} arrived",
            got.len()
        );
        let ev = c.next_event(T).await.expect("event");
        assert_ne!(ev.event.as_deref(), Some("gateway.gap"));
        got.push(ev.data.parse().unwrap());
        ids.push(ev.id.unwrap());
    }
    publisher.join().unwrap();
    assert_eq!(
        got,
        (0..total).collect::<Vec<u32>>(),
        "every event once, in order"
    );
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "every id once");
}

#[tokio::test]
async fn trimmed_history_is_an_honest_gap_then_what_is_left() {
    let redis = Redis::start();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_HISTORY_SIZE", "10"),
    ]);
    gw.wait_ready(true, T).await;
    trimmed_contract(&gw).await;
}

#[tokio::test]
async fn single_replica_mode_reports_trimmed_history_the_same_way() {
    let gw = Gateway::start(&[("SSE_GATEWAY_HISTORY_SIZE", "10")]);
    trimmed_contract(&gw).await;
}

async fn trimmed_contract(gw: &Gateway) {
    let mut c = open(gw, &["t"], None).await;
    publish(gw, "t", "first").await;
    c.expect_data("first").await;
    let last = c.last_id.clone().unwrap();
    drop(c);
    for i in 0..50 {
        publish(gw, "t", &format!("e{i}")).await;
    }
    let mut c = open(gw, &["t"], Some(&last)).await;
    let gap = c.next_event(T).await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gateway.gap"));
    for i in 40..50 {
        c.expect_data(&format!("e{i}")).await;
    }
    publish(gw, "t", "live").await;
    c.expect_data("live").await;
    c.expect_nothing(Duration::from_millis(200), "only one gap")
        .await;
}

#[tokio::test]
async fn redis_restarted_empty_is_a_gap() {
    let mut redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["r"], None).await;
    publish(&gw, "r", "first").await;
    c.expect_data("first").await;
    let last = c.last_id.clone().unwrap();
    drop(c);
    redis.restart();
    gw.wait_ready(true, T).await;
    publish(&gw, "r", "after").await;
    let mut c = open(&gw, &["r"], Some(&last)).await;
    assert_eq!(
        c.next_event(T).await.unwrap().event.as_deref(),
        Some("gateway.gap")
    );
    c.expect_data("after").await;
}

#[tokio::test]
async fn an_open_stream_gets_one_gap_when_redis_returns_without_its_data() {
    let mut redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["once"], None).await;
    publish(&gw, "once", "first").await;
    c.expect_data("first").await;
    redis.restart();
    gw.wait_ready(true, T).await;
    redis.wait_numsub("sse:once", 1, T);
    publish(&gw, "once", "after").await;
    publish(&gw, "once", "later").await;
    let mut seen = Vec::new();
    while let Some(e) = c.next_event(Duration::from_secs(2)).await {
        seen.push(e.event.unwrap_or_default() + ":" + &e.data);
        if e.data == "later" {
            break;
        }
    }
    let gaps = seen.iter().filter(|e| e.starts_with("gateway.gap")).count();
    assert_eq!(gaps, 1, "{seen:?}");
    assert_eq!(&seen[seen.len() - 2..], [":after", ":later"], "{seen:?}");
}

#[tokio::test]
async fn redis_restarted_with_its_data_loses_nothing() {
    let mut redis = Redis::start_persistent();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["p"], None).await;
    publish(&gw, "p", "first").await;
    c.expect_data("first").await;
    let last = c.last_id.clone().unwrap();
    drop(c);
    for i in 0..20 {
        publish(&gw, "p", &format!("e{i}")).await;
    }
    redis.restart();
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["p"], Some(&last)).await;
    for i in 0..20 {
        let ev = c.next_event(T).await.unwrap();
        assert_eq!(ev.data, format!("e{i}"), "{ev:?}");
    }
    assert!(c.next_event(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn hostile_ids_get_a_gap_or_400_never_a_5xx() {
    let gw = Gateway::start(&[]);
    let mut other = open(&gw, &["other"], None).await;
    publish(&gw, "other", "x").await;
    other.next_event(T).await.unwrap();
    let foreign = other.last_id.clone().unwrap();
    let long = "7".repeat(20_000);
    let ids = [
        "garbage",
        "00000000.e.1-1",
        "ffffffff.zz.99999999999999999999999-1",
        long.as_str(),
        foreign.as_str(),
        "a_b_c_d",
        "..",
    ];
    let tok = client_token("alice", &["mine"]);
    let auth = format!("Bearer {tok}");
    for id in ids {
        let r = SseClient::open_with(
            gw.client,
            "/events?channel=mine",
            &[("Authorization", &auth), ("Last-Event-ID", id)],
        )
        .await;
        match r {
            Ok(mut c) => {
                let ev = c.next_event(T).await.expect("gap event");
                assert_eq!(ev.event.as_deref(), Some("gateway.gap"), "{id:.40}");
            }
            Err(reply) => assert!(
                reply.status == 400 || reply.status == 431,
                "{id:.40}: {}",
                reply.status
            ),
        }
    }
    for q in ["%00", "%FF%FE", "%E2%80%AE"] {
        let mut c = SseClient::open(
            gw.client,
            &format!("/events?channel=mine&last_event_id={q}"),
            Some(&tok),
        )
        .await
        .unwrap();
        assert_eq!(
            c.next_event(T).await.unwrap().event.as_deref(),
            Some("gateway.gap")
        );
    }
}

#[tokio::test]
async fn the_readme_redis_cli_example_publishes_durably() {
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("redis-cli FCALL sse_publish"))
        .expect("the README shows a redis-cli FCALL example");
    let mut c = open(&gw, &["orders"], None).await;
    c.wait_id(T).await;
    let command = line.replacen("redis-cli", &format!("redis-cli -p {}", redis.port), 1);
    stdout_of(std::process::Command::new("sh").args(["-c", &command]));
    let ev = c.next_event(T).await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("created"));
    assert_eq!(ev.data, r#"{"id":42}"#);
    assert!(ev.id.is_some());
    // Bad input through the function is refused by Redis with a clear error, and not stored.
    let err = fcall(&redis, "orders", r#"{"event":"gateway.x","data":1}"#).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    let err = fcall(&redis, "bad name", "x").unwrap_err();
    assert!(err.to_string().contains("{sse:<channel>}"), "{err}");
}

#[tokio::test]
async fn durable_events_published_during_a_pubsub_drop_are_filled_from_history() {
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["fill"], None).await;
    c.wait_id(T).await;
    redis.kill_pubsub_clients();
    for i in 0..20 {
        fcall(&redis, "fill", &i.to_string()).unwrap();
    }
    for i in 0..20 {
        let ev = c.next_event(T).await.expect("filled event");
        assert_eq!(ev.data, i.to_string());
    }
    c.expect_nothing(Duration::from_millis(300), "a duplicate arrived")
        .await;
    // Raw publishes stay fire-and-forget and do not move the cursor.
    let before = c.last_id.clone();
    redis.publish("sse:fill", b"raw");
    let ev = c.next_event(T).await.unwrap();
    assert_eq!((ev.data.as_str(), ev.id), ("raw", None));
    assert_eq!(c.last_id, before);
}

#[tokio::test]
async fn the_outage_fill_comes_before_live_events_that_follow_it() {
    // A publisher that never stops: after the pub/sub connection drops, events keep coming, so
    // live ones arrive right after the resubscribe. The older missed ones must still come first
    // (a live event written before them would move the cursor past them).
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let mut c = open(&gw, &["steady"], None).await;
    c.wait_id(T).await;
    let url = redis.url();
    let publisher = std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        for i in 0..400 {
            let _: Vec<String> = redis::cmd("FCALL")
                .arg("sse_publish")
                .arg(1)
                .arg("{sse:steady}")
                .arg(i.to_string())
                .query(&mut conn)
                .unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    // Keep the replica out for a while (new connections refused), so that history piles up.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10000)
        .query(&mut conn)
        .unwrap();
    publisher.join().unwrap();
    for i in 0..400 {
        let ev = c.next_event(T).await.expect("event");
        assert_eq!(ev.data, i.to_string(), "event {i} lost or out of order");
    }
}

fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Reads `GET /events` with `Last-Event-ID` as raw chunks; the size of each of the first
/// `chunks` chunks (one chunk per frame the gateway writes).
async fn chunk_sizes(gw: &Gateway, last: &str, chunks: usize) -> Vec<usize> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let tok = client_token("alice", &["big"]);
    let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let req = format!(
        "GET /events?channel=big HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\nLast-Event-ID: {last}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut sizes = Vec::new();
    while sizes.len() < chunks {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let size = usize::from_str_radix(line.trim(), 16).unwrap();
        let mut body = vec![0; size + 2];
        r.read_exact(&mut body).await.unwrap();
        sizes.push(size);
    }
    sizes
}

#[tokio::test]
async fn a_resume_from_far_back_is_written_in_bounded_pages() {
    let gw = Gateway::start(&[]);
    let mut first = None;
    let pad = "z".repeat(60 * 1024);
    for i in 0..300 {
        let r = gw
            .publish(
                &publisher_token(),
                &json!({"channel": "big", "data": format!("{i} {pad}")}),
            )
            .await;
        assert_eq!(r.status, 202);
        first.get_or_insert_with(|| r.json()["ids"]["big"].as_str().unwrap().to_string());
    }
    let first = first.unwrap();
    let sizes = tokio::time::timeout(T, chunk_sizes(&gw, &first, 20))
        .await
        .expect("20 frames of replay");
    let largest = sizes.iter().max().copied().unwrap_or(0);
    assert!(
        largest <= 512 * 1024,
        "a replay frame of {largest} bytes (frames: {sizes:?})"
    );
    // Eight clients resuming from the start again and again: the replica's memory stays flat.
    let before = peak_rss_kib(gw.pid());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let gw_client = gw.client;
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tok = client_token("alice", &["big"]);
            for _ in 0..5 {
                let mut s = tokio::net::TcpStream::connect(gw_client).await.unwrap();
                let req = format!(
                    "GET /events?channel=big HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\nLast-Event-ID: {first}\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.unwrap();
                let mut buf = vec![0; 64 * 1024];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grown = peak_rss_kib(gw.pid()).saturating_sub(before);
    assert!(
        grown < 48 * 1024,
        "peak RSS grew by {grown} KiB for 8 resuming clients"
    );
}

/// The history function (Lua) and the gateway (Rust) apply the same rules to channel names,
/// event names and reserved payloads: whatever one accepts, the other does.
#[tokio::test]
async fn the_function_and_the_gateway_agree_on_every_rule() {
    use sse_gateway::testing::channel::{validate_name, MAX_CHANNEL_BYTES};
    use sse_gateway::testing::event::{validate_event_name, MAX_EVENT_NAME_BYTES, RESERVED_PREFIX};
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    let long = "c".repeat(MAX_CHANNEL_BYTES);
    let too_long = "c".repeat(MAX_CHANNEL_BYTES + 1);
    let channels = [
        "orders",
        "a",
        "!~",
        "with space",
        "star*",
        "com,ma",
        "br{ace",
        "br}ace",
        "del\u{7f}",
        "caf\u{e9}",
        "tab\there",
        &long,
        &too_long,
        "user:alice",
        "x:y:z",
    ];
    for c in channels {
        let rust = validate_name(c).is_ok();
        let lua = fcall(&redis, c, "{\"data\":1}").is_ok();
        assert_eq!(rust, lua, "channel {c:?}: gateway {rust}, function {lua}");
    }
    let name_ok = "e".repeat(MAX_EVENT_NAME_BYTES);
    let name_long = "e".repeat(MAX_EVENT_NAME_BYTES + 1);
    let reserved = format!("{RESERVED_PREFIX}x");
    let events = [
        "created",
        &name_ok,
        &name_long,
        "cr\rhere",
        "lf\nhere",
        "nul\0here",
        &reserved,
        "gateway",
        "Gateway.x",
        "gatewayx",
    ];
    for e in events {
        let rust = validate_event_name(e).is_ok();
        let payload = serde_json::json!({"event": e, "data": 1}).to_string();
        let lua = fcall(&redis, "events", &payload).is_ok();
        assert_eq!(
            rust, lua,
            "event name {e:?}: gateway {rust}, function {lua}"
        );
    }
    // Payloads that start with NUL are the gateway's own, on every path.
    assert!(fcall(&redis, "events", "\0D2\0forged").is_err());
    let r = gw
        .publish(
            &publisher_token(),
            &json!({"channel": "events", "data": "\u{0}x"}),
        )
        .await;
    assert_eq!(
        r.status,
        202,
        "a NUL inside a JSON string is fine: {}",
        r.text()
    );
}

/// After a failover to a replica whose clock is behind, a position recorded as lost may lie
/// ahead of the server's clock: new events still sort after it, so streams that saw the lost
/// event do not take them for duplicates.
#[tokio::test]
async fn new_events_sort_after_a_lost_position_ahead_of_the_clock() {
    let redis = Redis::start();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gw.wait_ready(true, T).await;
    publish(&gw, "ahead", "first").await;
    let ahead_ms = now() * 1000 + 60_000;
    let lost = format!("{ahead_ms}-3");
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("{sse:ahead}:lost")
        .arg(&lost)
        .query(&mut conn)
        .unwrap();
    let reply = fcall(&redis, "ahead", "after the failover").unwrap();
    let (ms, seq) = reply[1].split_once('-').unwrap();
    let (ms, seq): (u64, u64) = (ms.parse().unwrap(), seq.parse().unwrap());
    assert!(
        (ms, seq) > (ahead_ms, 3),
        "new event {} sorts before the lost position {lost}",
        reply[1]
    );
    // And the next one after it.
    let next = fcall(&redis, "ahead", "and the next").unwrap();
    let (nms, nseq) = next[1].split_once('-').unwrap();
    assert!((nms.parse::<u64>().unwrap(), nseq.parse::<u64>().unwrap()) > (ms, seq));
}
