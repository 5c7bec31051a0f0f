//! Scenarios that need no fleet of streams: connect latency one at a time, durable publish
//! throughput, resume of missed events, and idle streams over HTTP/2.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::{connect, mint, mint_publisher, open, post};
use crate::Common;
use sse_gateway::testing::position::{Cursor, Mark, Position};

/// Passes when every stream opened.
pub(crate) async fn idle_h2(
    common: Common,
    per_connection: usize,
    hold: Duration,
) -> Result<bool, String> {
    use http_body_util::Empty;
    let signer = common.signer()?;
    let servers = common.servers();
    let before = servers.rss().await;
    let connections = common.streams.div_ceil(per_connection.max(1));
    let started = Instant::now();
    let mut bodies = Vec::with_capacity(common.streams);
    let mut opened = 0usize;
    for c in 0..connections {
        let target = common.targets[c % common.targets.len()];
        let tcp = match connect(target, None).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("connect {target}: {e}");
                continue;
            }
        };
        let Ok((sender, conn)) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        else {
            eprintln!("HTTP/2 handshake with {target} failed");
            continue;
        };
        tokio::spawn(conn);
        let n = per_connection.min(common.streams - opened);
        let requests = (0..n).map(|i| {
            let mut sender = sender.clone();
            let token = mint(&signer, &format!("h2-{c}-{i}"), &common.channel);
            let req =
                hyper::Request::get(format!("http://{target}/events?channel={}", common.channel))
                    .header("authorization", format!("Bearer {token}"))
                    .body(Empty::<bytes::Bytes>::new());
            async move {
                let req = req.ok()?;
                let resp = sender.send_request(req).await.ok()?;
                (resp.status() == 200).then(|| resp.into_body())
            }
        });
        for body in futures_join(requests).await.into_iter().flatten() {
            bodies.push(body);
        }
        opened += n;
    }
    println!(
        "opened {} HTTP/2 streams over {connections} connections in {:.1}s",
        bodies.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(hold).await;
    let after = servers.rss().await;
    if let (Some(a), Some(b)) = (after, before) {
        println!(
            "servers: RSS {:.1} MiB -> {:.1} MiB, {:.2} KiB per HTTP/2 stream",
            b / 1048576.0,
            a / 1048576.0,
            (a - b) / bodies.len().max(1) as f64 / 1024.0
        );
    }
    let all = bodies.len() == common.streams;
    drop(bodies);
    Ok(all)
}

async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Passes when every connect succeeded.
pub(crate) async fn connect_latency(common: Common) -> Result<bool, String> {
    let signer = common.signer()?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut failures = 0;
    let started = Instant::now();
    for i in 0..common.streams {
        let target = common.targets[i % common.targets.len()];
        let source =
            (!common.source_ips.is_empty()).then(|| common.source_ips[i % common.source_ips.len()]);
        let token = mint(&signer, &format!("connect-{i}"), &common.channel);
        let t0 = Instant::now();
        match open(target, source, &token, &common.channel, None).await {
            Ok(stream) => {
                let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                drop(stream);
            }
            Err(e) => {
                failures += 1;
                if failures <= 5 {
                    eprintln!("connect {i}: {e}");
                }
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "connect: {} sequential streams in {:.1}s, {failures} failed; time to 200 ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        common.streams,
        started.elapsed().as_secs_f64(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(failures == 0)
}

pub(crate) async fn publish_throughput(
    common: Common,
    via: String,
    redis_url: String,
    function: String,
    events: usize,
    concurrency: usize,
) -> Result<bool, String> {
    let signer = common.signer()?;
    let per = events / concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let target = common.targets[w % common.targets.len()];
        let channel = common.channel.clone();
        let token = mint_publisher(&signer);
        let via = via.clone();
        let redis_url = redis_url.clone();
        let function = function.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            if via == "redis" {
                let client = redis::Client::open(redis_url.as_str()).expect("--redis-url");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to Redis");
                for i in 0..per {
                    let r: Result<Vec<String>, _> = redis::cmd("FCALL")
                        .arg(&function)
                        .arg(1)
                        .arg(format!("{{sse:{channel}}}"))
                        .arg(format!("{{\"data\":\"w{w}-{i}\"}}"))
                        .query_async(&mut conn)
                        .await;
                    ok += usize::from(r.is_ok());
                }
            } else {
                let mut tcp = TcpStream::connect(target).await.expect("connect");
                let _ = tcp.set_nodelay(true);
                let mut buf = Vec::new();
                let auth = format!("Bearer {token}");
                for i in 0..per {
                    let body = format!("{{\"channel\":\"{channel}\",\"data\":\"w{w}-{i}\"}}");
                    if let Ok(202) = post(
                        &mut tcp,
                        &target.to_string(),
                        "/publish",
                        &[
                            ("Authorization", auth.as_str()),
                            ("Content-Type", "application/json"),
                        ],
                        &body,
                        &mut buf,
                    )
                    .await
                    {
                        ok += 1;
                    }
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap_or(0);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "durable publish via {via}: {ok} of {} accepted in {secs:.2}s = {:.0} events/s ({} publishers)",
        per * concurrency.max(1),
        ok as f64 / secs,
        concurrency
    );
    Ok(ok == per * concurrency.max(1))
}

pub(crate) async fn resume_latency(
    common: Common,
    redis_url: String,
    missed: usize,
    rounds: usize,
) -> Result<bool, String> {
    let client = redis::Client::open(redis_url.as_str()).expect("--redis-url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let target = common.targets[0];
    let token = mint(&common.signer()?, "resume", &common.channel);
    let mut times = Vec::new();
    for round in 0..rounds {
        // Publish one event and take its id from a first stream.
        let stream = open(target, None, &token, &common.channel, None)
            .await
            .expect("stream");
        let r: Vec<String> = redis::cmd("FCALL")
            .arg("sse_publish")
            .arg(1)
            .arg(format!("{{sse:{}}}", common.channel))
            .arg("mark")
            .query_async(&mut conn)
            .await
            .expect("FCALL");
        drop(stream);
        // The single-channel cursor the gateway itself would write (what POST /publish returns).
        let cursor = Cursor {
            marks: vec![(
                common.channel.as_str().into(),
                Mark {
                    epoch: r[0].clone(),
                    pos: Position::parse(&r[1]).expect("FCALL answers a stream position"),
                },
            )],
        }
        .encode();
        for i in 0..missed {
            let _: Vec<String> = redis::cmd("FCALL")
                .arg("sse_publish")
                .arg(1)
                .arg(format!("{{sse:{}}}", common.channel))
                .arg(format!("{round}-{i}"))
                .query_async(&mut conn)
                .await
                .expect("FCALL");
        }
        let t0 = Instant::now();
        let mut tcp = connect(target, None).await.expect("connect");
        let req = format!(
            "GET /events?channel={} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\nLast-Event-ID: {cursor}\r\n\r\n",
            common.channel
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let last = format!("data: {round}-{}\n", missed - 1);
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream closed before the last missed event");
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(last.len()).any(|w| w == last.as_bytes()) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "resume of {missed} missed events (connect to last event), {rounds} rounds: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        times[0].as_secs_f64() * 1000.0,
        times[times.len() / 2].as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0
    );
    Ok(true)
}
