//! `sse-loadtest`: opens many SSE streams against one or more gateway replicas and reports
//! what an SRE sizes a deployment by.
//!
//! - `idle`: N streams that only receive heartbeats; reports each replica's RSS growth per stream
//!   (from its `/metrics`).
//! - `broadcast`: N streams on one channel spread over the replicas; publishes through Redis at a
//!   fixed rate and reports publish-to-receive latency percentiles. Each payload carries its
//!   intended send time, so a stalled publisher cannot hide latency (no coordinated omission).
//!
//! One process holds at most ~19,500 streams (the open-file limit): run several processes and
//! spread them over source addresses with `--source-ips`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

mod more;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(name = "sse-loadtest", about = "Load generator for sse-gateway")]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle streams and report memory per stream on each replica.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold the streams after they are all open.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// Hold idle streams multiplexed over cleartext HTTP/2 connections (prior knowledge) and
    /// report memory per stream.
    IdleH2 {
        #[command(flatten)]
        common: Common,
        /// Streams per HTTP/2 connection (the gateway allows up to 256).
        #[arg(long, default_value_t = 250)]
        per_connection: usize,
        /// Seconds to hold the streams.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// Open and close N streams one after another; report connect latency (to the 200 head).
    Connect {
        #[command(flatten)]
        common: Common,
    },
    /// Durable publish throughput: POST /publish over keep-alive connections, or FCALL on Redis.
    Publish {
        #[command(flatten)]
        common: Common,
        /// `http` (POST /publish on the targets) or `redis` (FCALL on --redis-url).
        #[arg(long, default_value = "http")]
        via: String,
        /// Redis for `--via redis`.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Function name for `--via redis`.
        #[arg(long, default_value = "sse_publish")]
        function: String,
        /// Events to publish in all.
        #[arg(long, default_value_t = 20000)]
        events: usize,
        /// Publishers working at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Resume latency: a stream misses N durable events, reconnects with its id, and is timed
    /// until the last one arrives.
    Resume {
        #[command(flatten)]
        common: Common,
        /// Redis the replicas use (events are published with FCALL).
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Events missed.
        #[arg(long, default_value_t = 1000)]
        missed: usize,
        /// Rounds to time.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// One channel per stream; events to random streams through Redis; delivery latency.
    Private {
        #[command(flatten)]
        common: Common,
        /// Redis the replicas use.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Channel prefix of the replicas.
        #[arg(long, default_value = "sse:")]
        prefix: String,
        /// Events to publish.
        #[arg(long, default_value_t = 2000)]
        events: u64,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
    },
    /// Connect, first bytes, close, as fast as possible: connects per second.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Connecting workers.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// N streams on one channel; publish through Redis; report delivery latency.
    Broadcast {
        #[command(flatten)]
        common: Common,
        /// Redis the replicas use.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Channel prefix of the replicas.
        #[arg(long, default_value = "sse:")]
        prefix: String,
        /// Events to publish.
        #[arg(long, default_value_t = 200)]
        events: u64,
        /// Events per second.
        #[arg(long, default_value_t = 20)]
        rate: u64,
    },
}

#[derive(Args)]
pub(crate) struct Common {
    /// Client addresses of the replicas (streams are spread round-robin).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    targets: Vec<SocketAddr>,
    /// Admin addresses of the replicas, to read their memory from /metrics.
    #[arg(long, value_delimiter = ',')]
    admins: Vec<SocketAddr>,
    /// HS256 secret of the replicas, to mint tokens.
    #[arg(long, env = "SSE_GATEWAY_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Streams to open.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Channel the streams subscribe to.
    #[arg(long, default_value = "load")]
    channel: String,
    /// Local addresses to connect from, round-robin (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

/// Waits until `start + offset` precisely: the timer wheel ticks per millisecond, so it sleeps to
/// just before the slot and yields until it, and timer rounding does not count as latency.
pub(crate) async fn wait_until(start: tokio::time::Instant, offset: Duration) {
    let due = start + offset;
    tokio::time::sleep_until(due - Duration::from_millis(2).min(offset)).await;
    while tokio::time::Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(crate) fn mint(secret: &str, sub: &str, channel: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub,
        "exp": unix_nanos() / 1_000_000_000 + 86_400,
        "channels": [channel],
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

pub(crate) async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    match source {
        None => TcpStream::connect(target).await,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(target).await
        }
    }
}

/// An open stream, past its response head.
pub(crate) struct Stream {
    pub(crate) tcp: TcpStream,
    /// Bytes read past the head (start of the chunked body).
    pub(crate) rest: Vec<u8>,
}

pub(crate) async fn open(
    target: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
    channel: &str,
) -> Result<Stream, String> {
    let mut tcp = connect(target, source)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let req = format!(
        "GET /events?channel={channel} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if !head.starts_with("HTTP/1.1 200") {
                return Err(head.lines().next().unwrap_or("").to_string());
            }
            return Ok(Stream {
                tcp,
                rest: buf[end + 4..].to_vec(),
            });
        }
    }
}

/// Decodes chunked transfer coding and turns each `data: <send time>` line into a latency.
#[derive(Default)]
pub(crate) struct Decoder {
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl Decoder {
    pub(crate) fn feed(&mut self, bytes: &[u8], latencies_us: &mut Vec<u64>) {
        self.raw.extend_from_slice(bytes);
        while let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&self.raw[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0);
            if self.raw.len() < eol + 2 + size + 2 {
                break;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
        let mut consumed = 0;
        while let Some(nl) = self.body[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.body[consumed..consumed + nl];
            if let Some(sent) = line
                .strip_prefix(b"data: ")
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|t| t.parse::<u64>().ok())
            {
                latencies_us.push(unix_nanos().saturating_sub(sent) / 1000);
            }
            consumed += nl + 1;
        }
        self.body.drain(..consumed);
    }
}

/// Opens `n` streams spread over targets and sources; returns them (failures are counted).
async fn open_all(common: &Common) -> Vec<(usize, Stream)> {
    let limit = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(common.streams);
    for i in 0..common.streams {
        let target = common.targets[i % common.targets.len()];
        let source =
            (!common.source_ips.is_empty()).then(|| common.source_ips[i % common.source_ips.len()]);
        let token = mint(&common.secret, &format!("load-{i}"), &common.channel);
        let channel = common.channel.clone();
        let limit = limit.clone();
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.ok()?;
            match open(target, source, &token, &channel).await {
                Ok(s) => Some((i % 1_000_000, s)),
                Err(e) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("stream {i}: {e}");
                    }
                    None
                }
            }
        }));
    }
    let mut streams = Vec::with_capacity(common.streams);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            streams.push(s);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "opened {} of {} streams in {secs:.1}s ({:.0}/s), {} failed",
        streams.len(),
        common.streams,
        streams.len() as f64 / secs.max(0.001),
        failures.load(Ordering::Relaxed)
    );
    streams
}

async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn rss_all(admins: &[SocketAddr]) -> Vec<f64> {
    let mut out = Vec::new();
    for a in admins {
        out.push(
            metric(*a, "process_resident_memory_bytes")
                .await
                .unwrap_or(f64::NAN),
        );
    }
    out
}

async fn idle(common: Common, hold: Duration) {
    let before = rss_all(&common.admins).await;
    let streams = open_all(&common).await;
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(_, mut s)| {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok(n) = s.tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    let open = readers.len();
    tokio::time::sleep(hold).await;
    let after = rss_all(&common.admins).await;
    for (i, admin) in common.admins.iter().enumerate() {
        let conns = metric(*admin, "sse_gateway_connections")
            .await
            .unwrap_or(0.0);
        let delta = after[i] - before[i];
        println!(
            "replica {admin}: {conns:.0} streams, RSS {:.1} MiB -> {:.1} MiB, {:.2} KiB per stream",
            before[i] / 1048576.0,
            after[i] / 1048576.0,
            if conns > 0.0 {
                delta / conns / 1024.0
            } else {
                f64::NAN
            }
        );
    }
    println!("held {open} idle streams for {}s", hold.as_secs());
    for r in readers {
        r.abort();
    }
}

async fn broadcast(common: Common, redis_url: String, prefix: String, events: u64, rate: u64) {
    let streams = open_all(&common).await;
    let n = streams.len() as u64;
    let deadline_after_last = Duration::from_secs(10);
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let total_time = interval * events as u32 + deadline_after_last;
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(_, mut s)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(events as usize);
                let mut decoder = Decoder {
                    raw: Vec::new(),
                    body: Vec::new(),
                };
                let rest = std::mem::take(&mut s.rest);
                decoder.feed(&rest, &mut latencies);
                let mut buf = vec![0u8; 16 * 1024];
                let end = tokio::time::Instant::now() + total_time;
                while (latencies.len() as u64) < events {
                    match tokio::time::timeout_at(end, s.tcp.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => decoder.feed(&buf[..n], &mut latencies),
                        _ => break,
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis::Client::open(redis_url.as_str()).expect("--redis-url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let channel = format!("{prefix}{}", common.channel);
    let start = tokio::time::Instant::now();
    let start_unix = unix_nanos();
    for i in 0..events {
        let offset = interval * i as u32;
        wait_until(start, offset).await;
        // The intended send time, not the actual one: a late publisher shows up as latency.
        let intended = start_unix + offset.as_nanos() as u64;
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(intended.to_string())
            .query_async(&mut conn)
            .await;
    }
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
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "broadcast: {n} streams x {events} events at {rate}/s: received {received} of {} ({:.3}%)",
        n * events,
        100.0 * received as f64 / (n * events).max(1) as f64
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
}

async fn idle_h2(common: Common, per_connection: usize, hold: Duration) {
    use http_body_util::Empty;
    let before = rss_all(&common.admins).await;
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
            let token = mint(&common.secret, &format!("h2-{c}-{i}"), &common.channel);
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
    let after = rss_all(&common.admins).await;
    for (i, admin) in common.admins.iter().enumerate() {
        let conns = metric(*admin, "sse_gateway_connections")
            .await
            .unwrap_or(0.0);
        println!(
            "replica {admin}: {conns:.0} streams, RSS {:.1} MiB -> {:.1} MiB, {:.2} KiB per HTTP/2 stream",
            before[i] / 1048576.0,
            after[i] / 1048576.0,
            (after[i] - before[i]) / conns.max(1.0) / 1024.0
        );
    }
    drop(bodies);
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

async fn connect_latency(common: Common) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut failures = 0;
    let started = Instant::now();
    for i in 0..common.streams {
        let target = common.targets[i % common.targets.len()];
        let source =
            (!common.source_ips.is_empty()).then(|| common.source_ips[i % common.source_ips.len()]);
        let token = mint(&common.secret, &format!("connect-{i}"), &common.channel);
        let t0 = Instant::now();
        match open(target, source, &token, &common.channel).await {
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
}

fn mint_publisher(secret: &str) -> String {
    let claims = serde_json::json!({
        "sub": "loadtest-publisher",
        "exp": unix_nanos() / 1_000_000_000 + 86_400,
        "publish": ["*"],
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// Sends one POST /publish on a keep-alive connection and reads the answer; the status.
async fn post_publish(
    tcp: &mut TcpStream,
    target: SocketAddr,
    token: &str,
    body: &str,
    buf: &mut Vec<u8>,
) -> Result<u16, String> {
    let req = format!(
        "POST /publish HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    buf.clear();
    let mut chunk = [0u8; 2048];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(status);
        }
    }
}

async fn publish_throughput(
    common: Common,
    via: String,
    redis_url: String,
    function: String,
    events: usize,
    concurrency: usize,
) {
    let per = events / concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let target = common.targets[w % common.targets.len()];
        let channel = common.channel.clone();
        let token = mint_publisher(&common.secret);
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
                        .arg(format!("{{c:{channel}}}"))
                        .arg(format!("{{\"data\":\"w{w}-{i}\"}}"))
                        .query_async(&mut conn)
                        .await;
                    ok += usize::from(r.is_ok());
                }
            } else {
                let mut tcp = TcpStream::connect(target).await.expect("connect");
                let _ = tcp.set_nodelay(true);
                let mut buf = Vec::new();
                for i in 0..per {
                    let body = format!("{{\"channel\":\"{channel}\",\"data\":\"w{w}-{i}\"}}");
                    if let Ok(202) = post_publish(&mut tcp, target, &token, &body, &mut buf).await {
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
}

async fn resume_latency(common: Common, redis_url: String, missed: usize, rounds: usize) {
    let client = redis::Client::open(redis_url.as_str()).expect("--redis-url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let target = common.targets[0];
    let token = mint(&common.secret, "resume", &common.channel);
    let mut times = Vec::new();
    for round in 0..rounds {
        // Publish one event and take its id from a first stream.
        let stream = open(target, None, &token, &common.channel)
            .await
            .expect("stream");
        let r: Vec<String> = redis::cmd("FCALL")
            .arg("sse_publish")
            .arg(1)
            .arg(format!("{{c:{}}}", common.channel))
            .arg("mark")
            .query_async(&mut conn)
            .await
            .expect("FCALL");
        drop(stream);
        // The single-channel cursor: channel tag, epoch, position (what POST /publish returns).
        let cursor = format!("{:08x}.{}.{}", fnv(&common.channel), r[0], r[1]);
        for i in 0..missed {
            let _: Vec<String> = redis::cmd("FCALL")
                .arg("sse_publish")
                .arg(1)
                .arg(format!("{{c:{}}}", common.channel))
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
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Scenario::Connect { common } => connect_latency(common).await,
        Scenario::Private {
            common,
            redis_url,
            prefix,
            events,
            rate,
        } => {
            let (received, sent) = more::private(common, redis_url, prefix, events, rate).await;
            if received != sent {
                std::process::exit(1);
            }
        }
        Scenario::Churn {
            common,
            concurrency,
            secs,
        } => {
            if more::churn(common, concurrency, secs).await == 0 {
                std::process::exit(1);
            }
        }
        Scenario::IdleH2 {
            common,
            per_connection,
            hold_secs,
        } => idle_h2(common, per_connection, Duration::from_secs(hold_secs)).await,
        Scenario::Publish {
            common,
            via,
            redis_url,
            function,
            events,
            concurrency,
        } => publish_throughput(common, via, redis_url, function, events, concurrency).await,
        Scenario::Resume {
            common,
            redis_url,
            missed,
            rounds,
        } => resume_latency(common, redis_url, missed, rounds).await,
        Scenario::Idle { common, hold_secs } => idle(common, Duration::from_secs(hold_secs)).await,
        Scenario::Broadcast {
            common,
            redis_url,
            prefix,
            events,
            rate,
        } => broadcast(common, redis_url, prefix, events, rate).await,
    }
}
