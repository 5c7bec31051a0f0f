//! What a run found: the summary printed at the end, the JSON report, the self-contained HTML
//! report with charts, the side-by-side table of several reports, and the capacity estimate.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::clients::Summary;
use crate::stats::{Percentiles, Sample};

/// One run of one scenario against one system.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    /// Which system was measured (`--label`), e.g. `sse-gateway`, `nchan`, `python`.
    pub(crate) system: String,
    /// Unix seconds at the start.
    pub(crate) started: u64,
    pub(crate) params: serde_json::Value,
    pub(crate) streams_requested: u64,
    pub(crate) streams_opened: u64,
    /// Seconds until every stream had its `200` (or failed).
    pub(crate) open_secs: f64,
    pub(crate) rss_per_stream_kib: Option<f64>,
    pub(crate) server_rss_mib: Option<f64>,
    pub(crate) events_published: u64,
    pub(crate) deliveries_expected: u64,
    pub(crate) deliveries: u64,
    /// Deliveries divided by the time from the first publish until the last delivery (or the
    /// deadline).
    pub(crate) deliveries_per_sec: Option<f64>,
    pub(crate) latency_ms: Option<Percentiles>,
    pub(crate) connects_per_sec: Option<f64>,
    pub(crate) connect_ms: Option<Percentiles>,
    pub(crate) server_cpu_secs: Option<f64>,
    pub(crate) cpu_ms_per_1k_deliveries: Option<f64>,
    pub(crate) failed: u64,
    /// Failures by cause (`HTTP 503`, `gateway.refused capacity`, `connect: …`).
    #[serde(default)]
    pub(crate) failures: std::collections::BTreeMap<String, u64>,
    pub(crate) audit: Option<Summary>,
    /// Storm: seconds from the kill until every client was back and caught up.
    pub(crate) storm_recovery_secs: Option<f64>,
    /// Storm: time from losing a stream to the first event published after that, per client.
    pub(crate) recovery_ms: Option<Percentiles>,
    pub(crate) series: Vec<Sample>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The summary printed at the end of a run: one fact per line, grep-able.
    pub(crate) fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== {} on {} ==", self.scenario, self.system);
        let _ = writeln!(
            s,
            "streams: opened {} of {} in {:.2}s, {} failed",
            self.streams_opened, self.streams_requested, self.open_secs, self.failed
        );
        if !self.failures.is_empty() {
            let by_cause: Vec<String> = self
                .failures
                .iter()
                .map(|(cause, n)| format!("{cause} × {n}"))
                .collect();
            let _ = writeln!(s, "failures: {}", by_cause.join(", "));
        }
        if let Some(r) = self.rss_per_stream_kib {
            let _ = writeln!(
                s,
                "memory: {r:.2} KiB per stream (servers' RSS {} MiB)",
                opt(self.server_rss_mib, 1)
            );
        }
        if self.deliveries_expected > 0 {
            let _ = writeln!(
                s,
                "delivered: {} of {} ({:.3}%), {} events published, {} deliveries/s",
                self.deliveries,
                self.deliveries_expected,
                100.0 * self.deliveries as f64 / self.deliveries_expected as f64,
                self.events_published,
                opt(self.deliveries_per_sec, 0)
            );
        }
        if let Some(l) = self.latency_ms {
            let _ = writeln!(
                s,
                "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if let Some(c) = self.connects_per_sec {
            let _ = writeln!(s, "connects: {c:.0}/s");
        }
        if let Some(l) = self.connect_ms {
            let _ = writeln!(
                s,
                "connect ms: p50 {:.2}  p99 {:.2}  max {:.2}",
                l.p50, l.p99, l.max
            );
        }
        if let Some(c) = self.cpu_ms_per_1k_deliveries {
            let _ = writeln!(s, "server CPU: {c:.1} ms per 1,000 deliveries");
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(
                s,
                "audit: {} clients, {} complete; in order {}, repeated {}, silently lost {}, gaps {} covering {}, missing at end {}, reconnects {}",
                a.streams, a.complete, a.in_order, a.repeated, a.lost, a.gaps, a.covered, a.missing_at_end, a.reconnects
            );
        }
        if let Some(secs) = self.storm_recovery_secs {
            let _ = writeln!(
                s,
                "storm: every client back and caught up {secs:.2}s after the kill"
            );
        }
        if let Some(l) = self.recovery_ms {
            let _ = writeln!(
                s,
                "recovery per client ms: p50 {:.0}  p99 {:.0}  max {:.0} ({} clients)",
                l.p50, l.p99, l.max, l.count
            );
        }
        s
    }

    pub(crate) fn write(&self, json: Option<&str>, html: Option<&str>) -> Result<(), String> {
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        if let Some(path) = html {
            std::fs::write(path, self.html()).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        Ok(())
    }

    /// A page that needs nothing else: the summary, and SVG charts of latency percentiles,
    /// delivery rate and open connections over time.
    pub(crate) fn html(&self) -> String {
        let t: Vec<f64> = self.series.iter().map(|s| s.t).collect();
        let lat = |f: fn(&Percentiles) -> f64| -> Vec<Option<f64>> {
            self.series
                .iter()
                .map(|s| s.latency.as_ref().map(f))
                .collect()
        };
        let some = |v: Vec<f64>| v.into_iter().map(Some).collect::<Vec<_>>();
        let latency = chart(
            "Latency per second (ms, log scale)",
            &t,
            &[
                ("p50", "#2b8a3e", lat(|p| p.p50)),
                ("p99", "#e67700", lat(|p| p.p99)),
                ("p99.9", "#c92a2a", lat(|p| p.p999)),
            ],
            true,
        );
        let rate = chart(
            "Deliveries per second",
            &t,
            &[(
                "delivered/s",
                "#1971c2",
                some(self.series.iter().map(|s| s.delivered as f64).collect()),
            )],
            false,
        );
        let conns = chart(
            "Streams",
            &t,
            &[
                (
                    "open",
                    "#5f3dc4",
                    some(self.series.iter().map(|s| s.open as f64).collect()),
                ),
                (
                    "behind",
                    "#c92a2a",
                    some(self.series.iter().map(|s| s.behind as f64).collect()),
                ),
                (
                    "connects/s",
                    "#868e96",
                    some(self.series.iter().map(|s| s.connects as f64).collect()),
                ),
            ],
            false,
        );
        let params = serde_json::to_string_pretty(&self.params).unwrap_or_default();
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>sse-loadtest: {scenario} on {system}</title>\
<style>body{{font:14px system-ui,sans-serif;max-width:980px;margin:2em auto;color:#212529}}\
pre{{background:#f1f3f5;padding:1em;overflow:auto}}svg{{background:#fff;border:1px solid #dee2e6;margin:.5em 0}}\
h1{{font-size:1.4em}}</style></head><body>\
<h1>{scenario} on {system}</h1><pre>{summary}</pre>{latency}{rate}{conns}\
<h2>Parameters</h2><pre>{params}</pre></body></html>",
            scenario = escape(&self.scenario),
            system = escape(&self.system),
            summary = escape(&self.summary()),
            params = escape(&params),
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart as inline SVG. `log` plots on a log10 axis (latency spans decades).
fn chart(title: &str, t: &[f64], lines: &[(&str, &str, Vec<Option<f64>>)], log: bool) -> String {
    let (w, h, left, bottom, top) = (940.0, 260.0, 70.0, 30.0, 30.0);
    let tx = t.last().copied().unwrap_or(1.0).max(1.0);
    let f = |v: f64| if log { v.max(0.001).log10() } else { v };
    let values = lines.iter().flat_map(|l| l.2.iter().flatten().copied());
    let (mut lo, mut hi) =
        values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(f(v)), b.max(f(v))));
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    if !log {
        lo = 0.0;
    } else {
        lo = lo.floor();
        hi = hi.ceil().max(lo + 1.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let x = |v: f64| left + v / tx * (w - left - 10.0);
    let y = |v: f64| top + (1.0 - (f(v) - lo) / (hi - lo)) * (h - top - bottom);
    let mut svg = format!(
        "<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">\
<text x=\"{left}\" y=\"18\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    // Axis labels: bottom and top of the value range, start and end of time.
    let label = |v: f64| {
        if log {
            format!("{}", 10f64.powf(v))
        } else if v >= 10_000.0 {
            format!("{:.0}k", v / 1000.0)
        } else {
            format!("{v:.0}")
        }
    };
    for (v, yy) in [(lo, h - bottom), (hi, top)] {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">{}</text>\
<line x1=\"{left}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#dee2e6\"/>",
            left - 6.0,
            yy + 4.0,
            label(v),
            w - 10.0
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">{tx:.0} s</text>",
        w - 10.0,
        h - 8.0
    );
    for (i, (name, color, values)) in lines.iter().enumerate() {
        let points: Vec<String> = t
            .iter()
            .zip(values)
            .filter_map(|(t, v)| v.map(|v| format!("{:.1},{:.1}", x(*t), y(v))))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" points=\"{}\"/>\
<text x=\"{}\" y=\"18\" fill=\"{color}\" font-size=\"12\">{}</text>",
            points.join(" "),
            w - 320.0 + 100.0 * i as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The side-by-side table of several reports, as Markdown: one row per scenario and system.
pub(crate) fn table(reports: &[Report]) -> String {
    let mut s = String::from(
        "| scenario | system | streams | open s | RSS/stream KiB | deliveries/s | delivered | p50 ms | p99 ms | p99.9 ms | connects/s | connect p50/p99 ms | CPU ms/1k deliveries |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let l = r.latency_ms;
        let delivered = if r.deliveries_expected > 0 {
            format!(
                "{:.2}%",
                100.0 * r.deliveries as f64 / r.deliveries_expected as f64
            )
        } else {
            "-".into()
        };
        let connect = r
            .connect_ms
            .map_or_else(|| "-".into(), |c| format!("{:.2} / {:.2}", c.p50, c.p99));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.system,
            r.streams_opened,
            r.open_secs,
            opt(r.rss_per_stream_kib, 2),
            opt(r.deliveries_per_sec, 0),
            delivered,
            opt(l.map(|l| l.p50), 2),
            opt(l.map(|l| l.p99), 2),
            opt(l.map(|l| l.p999), 2),
            opt(r.connects_per_sec, 0),
            connect,
            opt(r.cpu_ms_per_1k_deliveries, 1),
        );
    }
    s
}

/// The inputs of a capacity estimate.
pub(crate) struct Sizing {
    pub(crate) streams: f64,
    /// Deliveries per second the whole deployment must sustain (events/s × subscribers each).
    pub(crate) deliveries_per_sec: f64,
    pub(crate) memory_per_replica_mib: f64,
    pub(crate) cores_per_replica: f64,
    /// Fraction of a replica's CPU and memory to plan for (headroom for bursts and a drain).
    pub(crate) utilization: f64,
    /// Streams one replica may hold (its open-file limit minus a margin).
    pub(crate) max_streams_per_replica: f64,
}

/// Replicas needed for `sizing`, from an idle report (memory per stream) and a broadcast report
/// (CPU per delivery). An estimate: it assumes cost grows linearly with streams and deliveries,
/// as the measurements on this box suggest, and adds one replica so a drain or a crash leaves
/// enough.
pub(crate) fn capacity(idle: &Report, load: &Report, sizing: &Sizing) -> Result<String, String> {
    let kib = idle
        .rss_per_stream_kib
        .ok_or("the idle report has no memory per stream: run idle with --pids or --admins")?;
    let cpu_ms = load
        .cpu_ms_per_1k_deliveries
        .ok_or("the load report has no CPU per delivery: run it with --pids or --admins")?;
    let per_replica_mem = sizing.memory_per_replica_mib * 1024.0 * sizing.utilization / kib;
    let per_replica_streams = per_replica_mem.min(sizing.max_streams_per_replica);
    let deliveries_per_core = 1_000_000.0 / cpu_ms;
    let per_replica_deliveries =
        deliveries_per_core * sizing.cores_per_replica * sizing.utilization;
    let by_streams = (sizing.streams / per_replica_streams).ceil();
    let by_deliveries = (sizing.deliveries_per_sec / per_replica_deliveries).ceil();
    let replicas = by_streams.max(by_deliveries).max(1.0) + 1.0;
    let bound = if by_streams >= by_deliveries {
        "streams (memory or open files)"
    } else {
        "deliveries (CPU)"
    };
    Ok(format!(
        "capacity estimate: {replicas:.0} replicas ({by_streams:.0} for {} streams, {by_deliveries:.0} for {} deliveries/s, +1 spare); bound by {bound}\n\
  per replica: {per_replica_streams:.0} streams ({kib:.2} KiB each, {} MiB at {:.0}% use, at most {:.0} open files), \
{per_replica_deliveries:.0} deliveries/s ({cpu_ms:.1} ms CPU per 1,000, {} cores at {:.0}%)\n\
  measured: memory from '{}' on {}, CPU from '{}' on {}; an estimate, not a promise: rerun on your hardware",
        sizing.streams,
        sizing.deliveries_per_sec,
        sizing.memory_per_replica_mib,
        sizing.utilization * 100.0,
        sizing.max_streams_per_replica,
        sizing.cores_per_replica,
        sizing.utilization * 100.0,
        idle.scenario,
        idle.system,
        load.scenario,
        load.system,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_bound_by_whichever_resource_runs_out_first() {
        let idle = Report {
            rss_per_stream_kib: Some(8.0),
            ..Report::default()
        };
        let load = Report {
            cpu_ms_per_1k_deliveries: Some(10.0), // 100k deliveries per core-second
            ..Report::default()
        };
        let sizing = Sizing {
            streams: 100_000.0,
            deliveries_per_sec: 100_000.0,
            memory_per_replica_mib: 1024.0,
            cores_per_replica: 1.0,
            utilization: 0.5,
            max_streams_per_replica: 19_500.0,
        };
        // Memory allows 65,536 per replica, open files 19,500: 6 replicas for streams; CPU gives
        // 50k deliveries/s per replica: 2. Plus one spare.
        let text = capacity(&idle, &load, &sizing).unwrap();
        assert!(text.starts_with("capacity estimate: 7 replicas"), "{text}");
        assert!(text.contains("bound by streams"), "{text}");
        let busy = Sizing {
            deliveries_per_sec: 1_000_000.0,
            ..sizing
        };
        let text = capacity(&idle, &load, &busy).unwrap();
        assert!(text.starts_with("capacity estimate: 21 replicas"), "{text}");
    }

    #[test]
    fn the_html_report_stands_alone() {
        let r = Report {
            scenario: "broadcast".into(),
            system: "<x>".into(),
            series: vec![Sample {
                t: 1.0,
                delivered: 5,
                ..Sample::default()
            }],
            ..Report::default()
        };
        let page = r.html();
        assert!(page.contains("<svg") && page.contains("&lt;x&gt;"));
        assert!(
            !page.contains("src=") && !page.contains("href="),
            "nothing to fetch"
        );
    }
}
