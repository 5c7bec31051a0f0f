//! The drain: how a replica leaves without causing a reconnect storm.
//!
//! Invariants: readiness turns off and new streams are refused before anything closes; open
//! streams get `gateway.shutdown` one after another, spread evenly over the drain window; a
//! stream that cannot take its goodbye (its client does not read) has its connection cut at the
//! end; the wait is bounded by the window plus a small margin, whatever clients do.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::hub::CloseReason;
use crate::state::AppState;

/// Time past the drain window that streams get to flush their goodbye.
const MARGIN: Duration = Duration::from_secs(2);

/// Drains every open stream; returns when all are closed or the deadline passed.
pub async fn drain(state: &Arc<AppState>) {
    state.start_draining();
    let window = state.config.drain;
    let start = Instant::now();
    let streams = state.hub.streams();
    let n = streams.len();
    tracing::info!(
        streams = n,
        window_secs = window.as_secs(),
        "draining: readiness off, closing streams spread over SSE_GATEWAY_DRAIN_SECS"
    );
    for (i, sub) in streams.iter().enumerate() {
        let at = start + window.mul_f64(i as f64 / n.max(1) as f64);
        tokio::time::sleep_until(at).await;
        sub.request_shutdown();
    }
    let deadline = start + window + MARGIN;
    while state.hub.stream_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = state.hub.streams();
    if !left.is_empty() {
        tracing::warn!(
            streams = left.len(),
            "drain deadline passed; cutting the connections of streams that did not close"
        );
        for sub in left {
            sub.kill(CloseReason::Shutdown);
        }
        // Let the cut connections run their guards.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(
        elapsed_ms = start.elapsed().as_millis() as u64,
        "drain complete"
    );
}
