//! The client side of every streaming scenario: one task per stream, as a browser would hold it.
//!
//! Depending on the plan a stream only holds (idle), times each event from its intended send time
//! (broadcast, private), or also checks the sequence of durable events and reconnects with
//! `Last-Event-ID` like an `EventSource` (audit, storm). The same code runs inside the main process
//! or in worker processes; either way it reports through [`Msg`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Semaphore};

use sse_testkit::sse::{Block, Decoder};

use crate::net::{mint, open, stamp, unix_nanos, Signer};
use crate::stats::{add_buckets, buckets, histogram, Buckets, Stats, Tick};

/// What the streams do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Plan {
    /// Hold the stream, read heartbeats.
    Idle,
    /// All streams on one channel; time every event.
    Broadcast,
    /// Stream i on channel `<channel>-i`; time every event.
    Private,
    /// One channel of durable, numbered events; check each arrives once and in order; reconnect
    /// with `Last-Event-ID` when the stream ends.
    Audit,
    /// Connect, first bytes, close, again, as fast as the target lets us.
    Churn,
}

/// Everything a client process needs; passed to worker processes as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ClientConfig {
    pub(crate) plan: Plan,
    pub(crate) targets: Vec<SocketAddr>,
    pub(crate) source_ips: Vec<IpAddr>,
    pub(crate) signer: Signer,
    pub(crate) streams: usize,
    pub(crate) channel: String,
    pub(crate) connect_concurrency: usize,
    /// Longest random wait before a reconnect, in milliseconds (an SDK's jitter).
    pub(crate) reconnect_jitter_ms: u64,
    /// This process takes streams `i` with `i % count == index`.
    pub(crate) index: usize,
    pub(crate) count: usize,
    /// Churn: each loop reconnects as the same user instead of a new one every time.
    #[serde(default)]
    pub(crate) returning_users: bool,
    /// First connects spread evenly over this many milliseconds (0: at once).
    #[serde(default)]
    pub(crate) ramp_ms: u64,
}

impl ClientConfig {
    pub(crate) fn channel_of(&self, stream: usize) -> String {
        match self.plan {
            Plan::Private => format!("{}-{stream}", self.channel),
            _ => self.channel.clone(),
        }
    }
}

/// What a client process says to the driver.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Msg {
    /// Every stream of this process has made its first attempt; this many are open.
    Ready(usize),
    Tick(Tick),
    Done(Box<Summary>),
}

/// A process's totals at the end of a run; merged by addition.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) streams: u64,
    pub(crate) received: u64,
    pub(crate) in_order: u64,
    /// Events received again or out of order.
    pub(crate) repeated: u64,
    /// Events skipped without a `gateway.gap` before them: silent losses.
    pub(crate) lost: u64,
    /// `gateway.gap` events received.
    pub(crate) gaps: u64,
    /// Events skipped after a `gateway.gap`: honest losses.
    pub(crate) covered: u64,
    /// Events never received by the end of the run.
    pub(crate) missing_at_end: u64,
    /// Streams that got every published event exactly once, in order.
    pub(crate) complete: u64,
    pub(crate) reconnects: u64,
    /// Time from losing a stream to receiving the first event published after that (µs).
    pub(crate) recovery: Buckets,
    /// Unix ns when the last client to recover did (the end of a storm).
    pub(crate) last_recovered_ns: u64,
    /// Unix ns of the last delivery anywhere: the end of the delivery window.
    pub(crate) last_delivery_ns: u64,
}

impl Summary {
    pub(crate) fn merge(&mut self, o: &Summary) {
        self.streams += o.streams;
        self.received += o.received;
        self.in_order += o.in_order;
        self.repeated += o.repeated;
        self.lost += o.lost;
        self.gaps += o.gaps;
        self.covered += o.covered;
        self.missing_at_end += o.missing_at_end;
        self.complete += o.complete;
        self.reconnects += o.reconnects;
        self.last_recovered_ns = self.last_recovered_ns.max(o.last_recovered_ns);
        self.last_delivery_ns = self.last_delivery_ns.max(o.last_delivery_ns);
        let mut h = histogram();
        add_buckets(&mut h, &self.recovery);
        add_buckets(&mut h, &o.recovery);
        self.recovery = buckets(&h);
    }
}

/// Checks one stream's sequence of numbered events.
#[derive(Default)]
struct Sequence {
    next: u64,
    gap_pending: bool,
}

impl Sequence {
    fn observe(&mut self, seq: u64, s: &mut Summary) {
        if seq == self.next {
            s.in_order += 1;
        } else if seq < self.next {
            s.repeated += 1;
            return;
        } else if self.gap_pending {
            s.covered += seq - self.next;
        } else {
            s.lost += seq - self.next;
        }
        self.next = seq + 1;
        self.gap_pending = false;
    }
}

/// Runs this process's share of the streams until `stop` carries the number of events published
/// (or anything, for plans without numbered events); reports through `out`.
pub(crate) async fn run(
    cfg: Arc<ClientConfig>,
    out: mpsc::UnboundedSender<Msg>,
    stop: watch::Receiver<Option<u64>>,
) {
    let stats = Arc::new(Stats::new());
    let ticker = {
        let (stats, out) = (stats.clone(), out.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                if out.send(Msg::Tick(stats.tick())).is_err() {
                    break;
                }
            }
        })
    };
    let mine: Vec<usize> = (0..cfg.streams)
        .filter(|i| i % cfg.count.max(1) == cfg.index)
        .collect();
    let limit = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<bool>();
    let tasks: Vec<_> = mine
        .iter()
        .map(|&id| {
            let (cfg, stats, stop) = (cfg.clone(), stats.clone(), stop.clone());
            let (limit, first) = (limit.clone(), first_tx.clone());
            tokio::spawn(async move {
                if cfg.plan == Plan::Churn {
                    churn_worker(id, &cfg, &stats, stop, first).await
                } else {
                    stream_task(id, &cfg, &stats, stop, &limit, first).await
                }
            })
        })
        .collect();
    drop(first_tx);
    let mut opened = 0;
    while let Some(ok) = first_rx.recv().await {
        opened += usize::from(ok);
    }
    let _ = out.send(Msg::Ready(opened));
    let mut total = Summary::default();
    for t in tasks {
        if let Ok(s) = t.await {
            total.merge(&s);
        }
    }
    ticker.abort();
    let _ = out.send(Msg::Tick(stats.tick()));
    let _ = out.send(Msg::Done(Box::new(total)));
}

/// The published count once the driver stops the run.
async fn stopped(stop: &mut watch::Receiver<Option<u64>>) -> u64 {
    loop {
        if let Some(n) = *stop.borrow_and_update() {
            return n;
        }
        if stop.changed().await.is_err() {
            return 0;
        }
    }
}

async fn stream_task(
    id: usize,
    cfg: &ClientConfig,
    stats: &Stats,
    mut stop: watch::Receiver<Option<u64>>,
    limit: &Semaphore,
    first: mpsc::UnboundedSender<bool>,
) -> Summary {
    let channel = cfg.channel_of(id);
    let token = mint(&cfg.signer, &format!("load-{id}"), &channel);
    let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[id % cfg.source_ips.len()]);
    let reconnect = cfg.plan == Plan::Audit;
    let mut summary = Summary {
        streams: 1,
        ..Summary::default()
    };
    let mut target = id % cfg.targets.len();
    let mut cursor: Option<String> = None;
    let mut sequence = Sequence::default();
    // Usually empty or one entry: a histogram per stream would cost ~150 KB each.
    let mut recovery: Vec<u64> = Vec::new();
    // Unix ns when the stream was lost, until an event published after that arrives.
    let mut down_since: Option<u64> = None;
    let mut first = Some(first);
    let mut latencies = Vec::with_capacity(64);
    let mut buf = vec![0u8; 8 * 1024];
    let mut t0;
    if cfg.ramp_ms > 0 {
        let at = cfg.ramp_ms * id as u64 / cfg.streams.max(1) as u64;
        tokio::time::sleep(Duration::from_millis(at)).await;
    }
    'connect: loop {
        let attempt = {
            let _permit = if first.is_some() {
                limit.acquire().await.ok()
            } else {
                None
            };
            t0 = Instant::now();
            tokio::select! {
                r = open(cfg.targets[target], source, &token, &channel, cursor.as_deref()) => Some(r),
                n = stopped(&mut stop) => { finish(&mut summary, &sequence, n, cfg.plan); None }
            }
        };
        let Some(attempt) = attempt else {
            break 'connect;
        };
        let mut stream = match attempt {
            Ok(s) => s,
            Err(e) => {
                stats.fail(&e);
                if let Some(f) = first.take() {
                    if id < 5 {
                        eprintln!("stream {id}: {e}");
                    }
                    let _ = f.send(false);
                }
                if !reconnect {
                    let _ = stopped(&mut stop).await;
                    break 'connect;
                }
                target = (target + 1) % cfg.targets.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'connect;
            }
        };
        stats.connected(t0.elapsed().as_micros() as u64);
        if let Some(f) = first.take() {
            let _ = f.send(true);
        } else {
            summary.reconnects += 1;
        }
        let mut decoder = Decoder::new(stream.chunked);
        let mut pending = std::mem::take(&mut stream.rest);
        loop {
            let mut on_event = |e: Block| {
                if e.event.as_deref() == Some("gateway.gap") {
                    summary.gaps += 1;
                    sequence.gap_pending = true;
                } else if let Some((sent, seq)) = e.data.as_deref().and_then(stamp) {
                    let now = unix_nanos();
                    latencies.push(now.saturating_sub(sent) / 1000);
                    summary.received += 1;
                    summary.last_delivery_ns = now;
                    if let Some(seq) = seq {
                        sequence.observe(seq, &mut summary);
                    }
                    if down_since.is_some_and(|d| sent >= d) {
                        recovery.push(((now - down_since.unwrap_or(now)) / 1000).max(1));
                        summary.last_recovered_ns = summary.last_recovered_ns.max(now);
                        down_since = None;
                        stats
                            .behind
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                if e.id.is_some() {
                    cursor = e.id;
                }
            };
            decoder.feed(&pending, &mut on_event);
            stats.deliveries(id, &latencies);
            latencies.clear();
            tokio::select! {
                r = stream.tcp.read(&mut buf) => match r {
                    Ok(n) if n > 0 => pending = buf[..n].to_vec(),
                    _ => break,
                },
                n = stopped(&mut stop) => {
                    finish(&mut summary, &sequence, n, cfg.plan);
                    stats.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    break 'connect;
                }
            }
        }
        stats
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !reconnect {
            stats.fail("stream ended by the server");
            let _ = stopped(&mut stop).await;
            break 'connect;
        }
        if down_since.is_none() {
            down_since = Some(unix_nanos());
            stats
                .behind
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // A load balancer would send the reconnect elsewhere; so does this client.
        target = (target + 1) % cfg.targets.len();
        let jitter = unix_nanos() % (cfg.reconnect_jitter_ms.max(1) * 1_000_000);
        tokio::time::sleep(Duration::from_nanos(jitter)).await;
    }
    if !recovery.is_empty() {
        let mut h = histogram();
        for r in recovery {
            let _ = h.record(r.min(60_000_000));
        }
        summary.recovery = buckets(&h);
    }
    summary
}

fn finish(summary: &mut Summary, sequence: &Sequence, published: u64, plan: Plan) {
    if plan != Plan::Audit {
        return;
    }
    summary.missing_at_end += published.saturating_sub(sequence.next);
    if summary.in_order == published && summary.repeated == 0 {
        summary.complete += 1;
    }
}

async fn churn_worker(
    id: usize,
    cfg: &ClientConfig,
    stats: &Stats,
    stop: watch::Receiver<Option<u64>>,
    first: mpsc::UnboundedSender<bool>,
) -> Summary {
    let _ = first.send(true);
    drop(first);
    let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[id % cfg.source_ips.len()]);
    let target = cfg.targets[id % cfg.targets.len()];
    let mut k = 0u64;
    // A returning user is the loop's own, with its one token, as a client keeps it.
    let returning = cfg
        .returning_users
        .then(|| mint(&cfg.signer, &format!("churn-{id}"), &cfg.channel));
    while stop.borrow().is_none() {
        // Each connect is a new user (and token), so the per-user limit never refuses it.
        let token = match &returning {
            Some(t) => t.clone(),
            None => mint(&cfg.signer, &format!("churn-{id}-{k}"), &cfg.channel),
        };
        k += 1;
        let t0 = Instant::now();
        match open(target, source, &token, &cfg.channel, None).await {
            Ok(stream) => {
                stats.connected(t0.elapsed().as_micros() as u64);
                stats
                    .open
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                drop(stream);
            }
            Err(e) => {
                stats.fail(&e);
            }
        }
    }
    Summary::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_tells_silent_losses_from_covered_ones() {
        let mut s = Summary::default();
        let mut q = Sequence::default();
        for seq in [0, 1, 1, 3] {
            q.observe(seq, &mut s);
        }
        q.gap_pending = true;
        q.observe(6, &mut s);
        q.observe(7, &mut s);
        assert_eq!(
            (s.in_order, s.repeated, s.lost, s.covered),
            (3, 1, 1, 2),
            "0 1 in order, 1 again, 2 lost silently, 4 5 covered by the gap, 3 6 7 counted"
        );
        finish(&mut s, &q, 10, Plan::Audit);
        assert_eq!((s.missing_at_end, s.complete), (2, 0));
    }
}
