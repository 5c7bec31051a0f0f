//! The `private` and `churn` scenarios.
//!
//! - `private`: one channel per stream; events go to random streams at a fixed rate, each
//!   carrying its intended send time, so latency includes any publisher stall.
//! - `churn`: workers that connect, wait for the first bytes and close, as fast as the gateway
//!   lets them: sustained connects per second and connect latency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;

use crate::{mint, open, unix_nanos, wait_until, Common, Decoder};

fn print_latency(label: &str, hist: &Histogram<u64>) {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label} ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
}

/// One channel per stream, events to random streams.
pub async fn private(
    common: Common,
    redis_url: String,
    prefix: String,
    events: u64,
    rate: u64,
) -> (u64, u64) {
    let streams: Vec<_> = {
        let mut opened = Vec::with_capacity(common.streams);
        for i in 0..common.streams {
            let target = common.targets[i % common.targets.len()];
            let channel = format!("{}-{i}", common.channel);
            let token = mint(&common.secret, &format!("private-{i}"), &channel);
            match open(target, None, &token, &channel).await {
                Ok(s) => opened.push((i, s)),
                Err(e) => eprintln!("stream {i}: {e}"),
            }
        }
        opened
    };
    let n = streams.len();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(_, mut s)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut decoder = Decoder::default();
                let rest = std::mem::take(&mut s.rest);
                decoder.feed(&rest, &mut latencies);
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Acquire) {
                    match tokio::time::timeout(Duration::from_millis(200), s.tcp.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => decoder.feed(&buf[..k], &mut latencies),
                        Err(_) => {}
                    }
                }
                latencies
            })
        })
        .collect();
    let client = redis::Client::open(redis_url.as_str()).expect("--redis-url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now();
    let start_unix = unix_nanos();
    let mut target_seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..events {
        let offset = interval * i as u32;
        wait_until(start, offset).await;
        // xorshift: a cheap, reproducible choice of target stream.
        target_seed ^= target_seed << 13;
        target_seed ^= target_seed >> 7;
        target_seed ^= target_seed << 17;
        let target = (target_seed % n.max(1) as u64) as usize;
        let intended = start_unix + offset.as_nanos() as u64;
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(format!("{prefix}{}-{target}", common.channel))
            .arg(intended.to_string())
            .query_async(&mut conn)
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut received = 0u64;
    for r in readers {
        if let Ok(lat) = r.await {
            received += lat.len() as u64;
            for l in lat {
                let _ = hist.record(l.max(1));
            }
        }
    }
    println!("private: {n} streams, {events} events at {rate}/s to random streams: received {received} of {events}");
    print_latency("latency", &hist);
    (received, events)
}

/// Connect, first bytes, close, from `concurrency` workers for `secs` seconds.
pub async fn churn(common: Common, concurrency: usize, secs: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let target = common.targets[w % common.targets.len()];
            let secret = common.secret.clone();
            let channel = common.channel.clone();
            let done = done.clone();
            let failed = failed.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut k = 0u64;
                while Instant::now() < deadline {
                    // Each connect is a new user, so the per-user limit never refuses it.
                    let token = mint(&secret, &format!("churn-{w}-{k}"), &channel);
                    k += 1;
                    let t0 = Instant::now();
                    match open(target, None, &token, &channel).await {
                        Ok(stream) => {
                            latencies.push(t0.elapsed().as_micros() as u64);
                            done.fetch_add(1, Ordering::Relaxed);
                            drop(stream);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for w in workers {
        for l in w.await.unwrap_or_default() {
            let _ = hist.record(l.max(1));
        }
    }
    let total = done.load(Ordering::Relaxed);
    println!(
        "churn: {total} connects in {secs}s = {:.0}/s ({concurrency} workers), {} failed",
        total as f64 / secs.max(1) as f64,
        failed.load(Ordering::Relaxed)
    );
    print_latency("connect to first bytes", &hist);
    total
}
