//! The drain: how a replica leaves without causing a reconnect storm.
//!
//! Invariants: readiness turns off and new streams are refused before anything closes; open
//! streams get `gateway.shutdown` one after another, spread evenly over the drain window; a
//! stream that cannot take its goodbye (its client does not read) has its connection cut at the
//! end; the wait is for the connections themselves (a task tracker, no polling), bounded by the
//! window plus a small margin, whatever clients do.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::hub::CloseReason;
use crate::http::state::AppState;

/// Time past the drain window that streams get to flush their goodbye.
const MARGIN: Duration = Duration::from_secs(2);
/// Time cut connections get to run their guards (release slots) before the process goes on.
const CUT_GRACE: Duration = Duration::from_millis(500);

/// Drains every open stream; returns when every client connection is gone (they run in
/// `connections`), or the deadline passed and what was left has been cut. `stop_accepting` is
/// cancelled once every stream has been asked to leave: until then, new clients get a 503
/// `draining` answer rather than a silent accept queue.
pub async fn drain(
    state: &Arc<AppState>,
    connections: &TaskTracker,
    stop_accepting: &CancellationToken,
) {
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
    stop_accepting.cancel();
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        let left = state.hub.streams();
        tracing::warn!(
            streams = left.len(),
            connections = connections.len(),
            "drain deadline passed; cutting the connections of streams that did not close"
        );
        for sub in left {
            sub.kill(CloseReason::Shutdown);
        }
        // Let the cut connections run their guards (bounded: a connection without a stream,
        // such as a TLS handshake, ends by its own timeout or with the process).
        let _ = tokio::time::timeout(CUT_GRACE, connections.wait()).await;
    }
    tracing::info!(
        elapsed_ms = start.elapsed().as_millis() as u64,
        "drain complete"
    );
}
