//! What the client side counts while it runs, and how counts from several worker processes are
//! merged into one time series.
//!
//! Readers record into sharded histograms (one lock per read batch, never per process), and a
//! ticker closes an interval every second into a [`Tick`]. Ticks travel as JSON lines when the
//! clients run in worker processes, so a run of 50,000 streams over three processes still gives
//! one report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const SHARDS: usize = 64;

/// A histogram of microseconds, up to a minute.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid")
}

/// A histogram as (value, count) pairs: small, and exact to its 3 significant digits.
pub(crate) type Buckets = Vec<(u64, u64)>;

pub(crate) fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub(crate) fn add_buckets(h: &mut Histogram<u64>, b: &Buckets) {
    for &(v, c) in b {
        let _ = h.record_n(v.max(1), c);
    }
}

/// Percentiles in milliseconds, as reports show them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        })
    }
}

/// Counters shared by every stream task of one process.
pub(crate) struct Stats {
    /// Streams open now.
    pub(crate) open: AtomicI64,
    /// Streams that are not caught up: closed and not yet back, or back but still replaying.
    pub(crate) behind: AtomicI64,
    pub(crate) delivered: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Failures by cause (`HTTP 503`, `gateway.refused capacity`, `connect: refused`, …).
    causes: Mutex<BTreeMap<String, u64>>,
    latency: Vec<Mutex<Histogram<u64>>>,
    connect: Mutex<Histogram<u64>>,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            open: AtomicI64::new(0),
            behind: AtomicI64::new(0),
            delivered: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            causes: Mutex::new(BTreeMap::new()),
            latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            connect: Mutex::new(histogram()),
        }
    }

    /// Records one read batch of latencies (µs) for stream `id`.
    pub(crate) fn deliveries(&self, id: usize, latencies_us: &[u64]) {
        if latencies_us.is_empty() {
            return;
        }
        self.delivered
            .fetch_add(latencies_us.len() as u64, Ordering::Relaxed);
        if let Ok(mut h) = self.latency[id % SHARDS].lock() {
            for &l in latencies_us {
                let _ = h.record(l.clamp(1, 60_000_000));
            }
        }
    }

    /// Records one failed attempt and why (the text of the error: its cause is the part before
    /// any detail after a colon and space, so `HTTP 503` and `connect: …` group together).
    pub(crate) fn fail(&self, why: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.causes.lock() {
            *c.entry(cause(why)).or_insert(0) += 1;
        }
    }

    /// Records one successful connect (to the `200` head).
    pub(crate) fn connected(&self, micros: u64) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.connect.lock() {
            let _ = h.record(micros.clamp(1, 60_000_000));
        }
    }

    /// Closes the current interval.
    pub(crate) fn tick(&self) -> Tick {
        let mut latency = histogram();
        for shard in &self.latency {
            if let Ok(mut h) = shard.lock() {
                let _ = latency.add(&*h);
                h.reset();
            }
        }
        let connect = match self.connect.lock() {
            Ok(mut h) => {
                let b = buckets(&h);
                h.reset();
                b
            }
            Err(_) => Vec::new(),
        };
        Tick {
            open: self.open.load(Ordering::Relaxed),
            behind: self.behind.load(Ordering::Relaxed),
            delivered: self.delivered.swap(0, Ordering::Relaxed),
            connects: self.connects.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            causes: self
                .causes
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default(),
            latency: buckets(&latency),
            connect,
        }
    }
}

/// One second of one process's client side.
#[derive(Serialize, Deserialize, Default, Debug)]
pub(crate) struct Tick {
    pub(crate) open: i64,
    pub(crate) behind: i64,
    pub(crate) delivered: u64,
    pub(crate) connects: u64,
    pub(crate) failed: u64,
    #[serde(default)]
    pub(crate) causes: BTreeMap<String, u64>,
    pub(crate) latency: Buckets,
    pub(crate) connect: Buckets,
}

/// One second of the whole run, as the report charts it.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub(crate) struct Sample {
    /// Seconds since the run started.
    pub(crate) t: f64,
    pub(crate) open: i64,
    pub(crate) behind: i64,
    pub(crate) delivered: u64,
    pub(crate) connects: u64,
    pub(crate) failed: u64,
    pub(crate) latency: Option<Percentiles>,
}

/// Merges ticks from every source into samples and run totals.
pub(crate) struct Aggregate {
    sources: Vec<(i64, i64)>,
    interval: Tick,
    interval_latency: Histogram<u64>,
    pub(crate) latency: Histogram<u64>,
    pub(crate) connect: Histogram<u64>,
    pub(crate) delivered: u64,
    pub(crate) connects: u64,
    pub(crate) failed: u64,
    /// Failures by cause over the whole run.
    pub(crate) causes: BTreeMap<String, u64>,
    pub(crate) series: Vec<Sample>,
}

impl Aggregate {
    pub(crate) fn new(sources: usize) -> Self {
        Self {
            sources: vec![(0, 0); sources],
            interval: Tick::default(),
            interval_latency: histogram(),
            latency: histogram(),
            connect: histogram(),
            delivered: 0,
            connects: 0,
            failed: 0,
            causes: BTreeMap::new(),
            series: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, source: usize, tick: &Tick) {
        if let Some(s) = self.sources.get_mut(source) {
            *s = (tick.open, tick.behind);
        }
        self.interval.delivered += tick.delivered;
        self.interval.connects += tick.connects;
        self.interval.failed += tick.failed;
        add_buckets(&mut self.interval_latency, &tick.latency);
        add_buckets(&mut self.latency, &tick.latency);
        add_buckets(&mut self.connect, &tick.connect);
        self.delivered += tick.delivered;
        self.connects += tick.connects;
        self.failed += tick.failed;
        for (cause, n) in &tick.causes {
            *self.causes.entry(cause.clone()).or_insert(0) += n;
        }
    }

    /// Streams open now, over every source.
    pub(crate) fn open(&self) -> i64 {
        self.sources.iter().map(|s| s.0).sum()
    }

    /// Streams not caught up now, over every source.
    pub(crate) fn behind(&self) -> i64 {
        self.sources.iter().map(|s| s.1).sum()
    }

    /// Closes one second of the run.
    pub(crate) fn close(&mut self, t: f64) -> Sample {
        let sample = Sample {
            t,
            open: self.open(),
            behind: self.behind(),
            delivered: self.interval.delivered,
            connects: self.interval.connects,
            failed: self.interval.failed,
            latency: Percentiles::of(&self.interval_latency),
        };
        self.interval = Tick::default();
        self.interval_latency.reset();
        self.series.push(sample.clone());
        sample
    }
}

/// The cause of a failure from its error text: `HTTP 503` stays, `connect 127.0.0.1:8080:
/// Connection refused (os error 111)` becomes `connect: Connection refused`.
pub(crate) fn cause(why: &str) -> String {
    if let Some(rest) = why.strip_prefix("connect ") {
        let detail = rest.split_once(": ").map_or(rest, |(_, d)| d);
        let detail = detail.split(" (os error").next().unwrap_or(detail);
        return format!("connect: {detail}");
    }
    why.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_group_by_cause() {
        let stats = Stats::new();
        stats.fail("HTTP 503");
        stats.fail("HTTP 503");
        stats.fail("connect 127.0.0.1:1: Connection refused (os error 111)");
        stats.fail("gateway.refused capacity");
        let mut agg = Aggregate::new(1);
        agg.add(0, &stats.tick());
        assert_eq!(agg.failed, 4);
        assert_eq!(agg.causes["HTTP 503"], 2);
        assert_eq!(agg.causes["connect: Connection refused"], 1);
        assert_eq!(agg.causes["gateway.refused capacity"], 1);
    }

    #[test]
    fn ticks_from_two_sources_merge_into_one_sample() {
        let (a, b) = (Stats::new(), Stats::new());
        a.connected(500);
        b.connected(700);
        a.deliveries(1, &[1000, 2000]);
        b.deliveries(2, &[3000]);
        let mut agg = Aggregate::new(2);
        agg.add(0, &a.tick());
        agg.add(1, &b.tick());
        let s = agg.close(1.0);
        assert_eq!((s.open, s.delivered, s.connects), (2, 3, 2));
        let l = s.latency.unwrap();
        assert!(
            (l.max - 3.0).abs() < 0.01 && (l.p50 - 2.0).abs() < 0.01,
            "{l:?}"
        );
        // The interval resets; the totals do not.
        agg.add(0, &a.tick());
        assert_eq!(agg.close(2.0).delivered, 0);
        assert_eq!(agg.latency.len(), 3);
    }
}
