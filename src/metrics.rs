//! Every metric the gateway exports, named once and described once.
//!
//! Invariants: no user id or channel name is ever a label; label values are fixed strings from
//! this crate. Histograms have real buckets (not summaries). The recorder is process-global, so
//! one process is one replica's metrics.

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open streams on this replica.
pub const CONNECTIONS: &str = "sse_gateway_connections";
/// The stream capacity of this replica (`SSE_GATEWAY_MAX_CONNECTIONS`), so that alerts and
/// dashboards divide by the real setting instead of a copy of it.
pub const MAX_CONNECTIONS: &str = "sse_gateway_max_connections";
/// Streams accepted.
pub const CONNECTIONS_OPENED: &str = "sse_gateway_connections_opened_total";
/// Stream requests refused, by error code.
pub const CONNECTIONS_REJECTED: &str = "sse_gateway_connections_rejected_total";
/// Streams ended, by reason.
pub const CONNECTIONS_CLOSED: &str = "sse_gateway_connections_closed_total";
/// Events this replica received from the broker.
pub const EVENTS_RECEIVED: &str = "sse_gateway_events_received_total";
/// Event frames handed to client connections.
pub const EVENTS_DELIVERED: &str = "sse_gateway_events_delivered_total";
/// Events not delivered, by reason.
pub const EVENTS_DROPPED: &str = "sse_gateway_events_dropped_total";
/// Seconds from the replica receiving an event to handing it to a client's connection.
pub const DELIVERY_LATENCY: &str = "sse_gateway_delivery_latency_seconds";
/// Whether the broker's pub/sub connection is up (1) or not (0).
pub const REDIS_CONNECTED: &str = "sse_gateway_redis_connected";
/// Times the pub/sub connection was re-established.
pub const REDIS_RECONNECTS: &str = "sse_gateway_redis_reconnects_total";
/// Channels this replica is subscribed to.
pub const SUBSCRIBED_CHANNELS: &str = "sse_gateway_subscribed_channels";
/// `POST /publish` outcomes.
pub const PUBLISH: &str = "sse_gateway_publish_total";
/// `POST /disconnect` outcomes.
pub const DISCONNECTS: &str = "sse_gateway_disconnects_total";
/// Streams on this replica counted as members of presence channels.
pub const PRESENCE_ENTRIES: &str = "sse_gateway_presence_entries";
/// `gateway.join`/`gateway.leave` this replica stored, by `kind`.
pub const PRESENCE_EVENTS: &str = "sse_gateway_presence_events_total";
/// Channels of dead replicas whose presence this replica cleared.
pub const PRESENCE_SWEEPS: &str = "sse_gateway_presence_sweeps_total";
/// Presence writes that failed and were retried, by `op`.
pub const PRESENCE_ERRORS: &str = "sse_gateway_presence_errors_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// Metric handles used on the hot path, looked up once instead of on every event.
pub struct Hot {
    /// `sse_gateway_events_delivered_total`.
    pub delivered: metrics::Counter,
    /// `sse_gateway_events_received_total`.
    pub received: metrics::Counter,
    /// `sse_gateway_delivery_latency_seconds`.
    pub latency: metrics::Histogram,
}

/// The hot-path handles (bound to the recorder installed first, or no-ops without one).
pub fn hot() -> &'static Hot {
    static HOT: std::sync::OnceLock<Hot> = std::sync::OnceLock::new();
    HOT.get_or_init(|| Hot {
        delivered: metrics::counter!(EVENTS_DELIVERED),
        received: metrics::counter!(EVENTS_RECEIVED),
        latency: metrics::histogram!(DELIVERY_LATENCY),
    })
}

/// The installed recorder: renders the text exposition for `/metrics`.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
}

impl Exporter {
    /// Installs the process-global recorder and describes every metric.
    pub fn install() -> Result<Self, String> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.into()), LATENCY_BUCKETS)
            .map_err(|e| format!("histogram buckets: {e}"))?
            .install_recorder()
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        // Zero-valued series exist from the start, so dashboards and alerts see them.
        metrics::gauge!(CONNECTIONS).set(0.0);
        metrics::counter!(CONNECTIONS_OPENED).absolute(0);
        metrics::counter!(EVENTS_RECEIVED).absolute(0);
        metrics::counter!(EVENTS_DELIVERED).absolute(0);
        metrics::counter!(REDIS_RECONNECTS).absolute(0);
        metrics::gauge!(SUBSCRIBED_CHANNELS).set(0.0);
        metrics::gauge!(PRESENCE_ENTRIES).set(0.0);
        Ok(Self {
            handle,
            process: std::sync::Arc::new(process),
        })
    }

    /// The Prometheus text exposition, with fresh process figures.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }

    /// Drains histogram samples into buckets so memory stays flat between scrapes.
    pub fn spawn_upkeep(&self) {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
}

fn describe() {
    describe_gauge!(CONNECTIONS, "Open SSE streams on this replica.");
    describe_gauge!(
        MAX_CONNECTIONS,
        "Streams this replica admits at most (SSE_GATEWAY_MAX_CONNECTIONS)."
    );
    describe_counter!(CONNECTIONS_OPENED, "SSE streams accepted.");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "SSE stream requests refused, by error code."
    );
    describe_counter!(CONNECTIONS_CLOSED, "SSE streams ended, by reason.");
    describe_counter!(EVENTS_RECEIVED, "Events received from the broker.");
    describe_counter!(EVENTS_DELIVERED, "Event frames handed to client streams.");
    describe_counter!(EVENTS_DROPPED, "Events not delivered, by reason.");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Time from this replica receiving an event to writing it to a client stream."
    );
    describe_gauge!(
        REDIS_CONNECTED,
        "1 while the Redis pub/sub connection is up and subscribed."
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Times the Redis pub/sub connection was re-established."
    );
    describe_gauge!(
        SUBSCRIBED_CHANNELS,
        "Channels this replica is subscribed to."
    );
    describe_counter!(PUBLISH, "POST /publish requests, by result.");
    describe_counter!(DISCONNECTS, "POST /disconnect requests, by result.");
    describe_gauge!(
        PRESENCE_ENTRIES,
        "Streams on this replica counted as members of presence channels."
    );
    describe_counter!(
        PRESENCE_EVENTS,
        "gateway.join and gateway.leave events this replica stored, by kind."
    );
    describe_counter!(
        PRESENCE_SWEEPS,
        "Presence channels of dead replicas cleared by this replica."
    );
    describe_counter!(
        PRESENCE_ERRORS,
        "Presence writes to Redis that failed (and were retried), by operation."
    );
}
