//! Chaos with a loss audit: three replicas and Redis, 100 clients that reconnect with
//! `Last-Event-ID` like browsers, a publisher sending numbered durable events steadily — while a
//! replica is SIGKILLed, another SIGTERMed, and Redis stopped and restarted. Then every client's
//! record is checked: no duplicate, no reordering, and every event either received or covered by
//! a `gateway.gap`. `CHAOS_SECS` (default 24) sets how long the publisher runs; the CI run is the
//! short default, a longer one is `CHAOS_SECS=300 cargo test --test chaos -- --nocapture`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const CLIENTS: usize = 100;

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event(u64),
    Gap,
}

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    reconnects: u64,
}

async fn client(
    i: usize,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    record: Arc<Mutex<Record>>,
    last_published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let tok = client_token(&format!("chaos-{i}"), &["chaos"]);
    let auth = format!("Bearer {tok}");
    let mut last_id: Option<String> = None;
    let mut attempt = i;
    loop {
        let done = |r: &Record| {
            stop.load(Ordering::Acquire)
                && r.seen.iter().rev().find_map(|s| match s {
                    Seen::Event(n) => Some(*n),
                    Seen::Gap => None,
                }) == Some(last_published.load(Ordering::Acquire))
        };
        if done(&record.lock().unwrap()) {
            return;
        }
        let target = {
            let t = targets.lock().unwrap();
            attempt += 1;
            t[attempt % t.len()]
        };
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(id) = &last_id {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        if let Ok(mut c) = SseClient::open_with(target, "/events?channel=chaos", &headers).await {
            loop {
                match c.next_event(Duration::from_millis(500)).await {
                    Some(ev) => {
                        let mut r = record.lock().unwrap();
                        match ev.event.as_deref() {
                            Some("gateway.gap") => r.seen.push(Seen::Gap),
                            Some(_) => {}
                            None => {
                                if let Ok(n) = ev.data.parse() {
                                    r.seen.push(Seen::Event(n));
                                }
                            }
                        }
                        if done(&r) {
                            return;
                        }
                    }
                    None if c.closed => break,
                    None => {
                        if done(&record.lock().unwrap()) {
                            return;
                        }
                    }
                }
                if c.last_id.is_some() {
                    last_id = c.last_id.clone();
                }
            }
            if c.last_id.is_some() {
                last_id = c.last_id.clone();
            }
        }
        record.lock().unwrap().reconnects += 1;
        // Like EventSource: wait the retry hint (shortened), then reconnect.
        tokio::time::sleep(Duration::from_millis(100 + (i as u64 % 10) * 20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_silently_lost_through_kills_drains_and_a_redis_restart() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut redis = Redis::start_persistent();
    let env = [
        ("SSE_GATEWAY_REDIS_URL", redis.url()),
        ("SSE_GATEWAY_DRAIN_SECS", "2".to_string()),
        ("SSE_GATEWAY_RETRY_MS", "200".to_string()),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "2".to_string()),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "1".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut replicas: Vec<Gateway> = (0..3).map(|_| Gateway::start(&env)).collect();
    for r in &replicas {
        r.wait_ready(true, Duration::from_secs(10)).await;
    }
    let targets = Arc::new(Mutex::new(
        replicas.iter().map(|r| r.client).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let last_published = Arc::new(AtomicU64::new(u64::MAX));
    let records: Vec<Arc<Mutex<Record>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            tokio::spawn(client(
                i,
                targets.clone(),
                rec.clone(),
                last_published.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The publisher: numbered durable events every 20 ms; a failed publish is retried with
    // the same number, so history holds 0..=last without holes.
    let url = redis.url();
    let publisher_stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let publisher_stop = publisher_stop.clone();
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            let mut conn: Option<redis::Connection> = None;
            while !publisher_stop.load(Ordering::Acquire) {
                if conn.is_none() {
                    conn = redis::Client::open(url.as_str())
                        .ok()
                        .and_then(|c| c.get_connection().ok());
                }
                let ok = conn.as_mut().is_some_and(|c| {
                    redis::cmd("FCALL")
                        .arg("sse_publish")
                        .arg(1)
                        .arg("{c:chaos}")
                        .arg(n.to_string())
                        .query::<Vec<String>>(c)
                        .is_ok()
                });
                if ok {
                    n += 1;
                } else {
                    conn = None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };

    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s * secs / 24);
    tokio::time::sleep_until(at(5).into()).await;
    targets.lock().unwrap().retain(|a| *a != replicas[0].client);
    replicas[0].signal("KILL");
    tokio::time::sleep_until(at(10).into()).await;
    targets.lock().unwrap().retain(|a| *a != replicas[1].client);
    replicas[1].signal("TERM");
    tokio::time::sleep_until(at(15).into()).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    tokio::time::sleep_until(at(24).into()).await;
    publisher_stop.store(true, Ordering::Release);
    let published = publisher.join().unwrap();
    assert!(published > 100, "only {published} events published");
    last_published.store(published - 1, Ordering::Release);
    stop.store(true, Ordering::Release);

    let deadline = Instant::now() + Duration::from_secs(60);
    for c in clients {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, c).await;
    }
    assert_eq!(
        replicas[1].wait_exit(Duration::from_secs(10)),
        Some(0),
        "the drained replica exits 0"
    );

    let mut received = 0u64;
    let mut reconnects = 0u64;
    let mut gaps = 0u64;
    let mut silent_losses = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        let r = rec.lock().unwrap();
        reconnects += r.reconnects;
        let mut expected = 0u64;
        let mut gap_pending = false;
        for s in &r.seen {
            match s {
                Seen::Gap => {
                    gaps += 1;
                    gap_pending = true;
                }
                Seen::Event(n) => {
                    assert!(
                        *n >= expected,
                        "client {i}: {n} after {} (duplicate or reordering)",
                        expected.wrapping_sub(1)
                    );
                    if *n > expected && !gap_pending {
                        silent_losses.push((i, expected, *n));
                    }
                    received += 1;
                    expected = n + 1;
                    gap_pending = false;
                }
            }
        }
        assert_eq!(
            expected, published,
            "client {i} stopped at {expected} of {published}"
        );
    }
    println!(
        "chaos: {published} events published, {CLIENTS} clients, {received} received, {reconnects} reconnects, {gaps} gaps, {} silent losses",
        silent_losses.len()
    );
    if !silent_losses.is_empty() {
        for (i, r) in replicas.iter().enumerate() {
            eprintln!("--- replica {i} log ---\n{}", r.logs.lock().unwrap());
        }
    }
    assert!(
        silent_losses.is_empty(),
        "events lost without a gap: {silent_losses:?}"
    );
    drop(replicas);
}
