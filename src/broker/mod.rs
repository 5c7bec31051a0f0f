//! Brokers carry events between replicas; the hub carries them to local streams.
//!
//! The contract every implementation keeps (and the shared tests check):
//! - `ensure_subscribed` resolves once events published to those channels from then on reach
//!   this replica's hub; it fails fast, rather than hanging, while the broker is unreachable.
//! - `released` is a hint that the hub no longer needs some channels; the broker unsubscribes
//!   after a short grace, and only if the hub still has no subscriber then.
//! - Events of one channel arrive in the order they were published; delivery is at most once
//!   (pub/sub semantics): history, not the broker, makes streams gap-free.
//! - Every payload goes through [`dispatch`], so the envelope rule, limits and metrics are the
//!   same whatever path an event took.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::event::parse_payload;
use crate::history::{Cursor, Mark};
use crate::hub::{Durable, Hub, Queued};
use crate::metrics as m;
use crate::sse::frame;

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError(pub String);

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A way of moving events between replicas.
pub trait Broker: Send + Sync + 'static {
    /// Makes sure this replica receives these channels' events.
    fn ensure_subscribed(
        &self,
        channels: Vec<String>,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Tells the broker the hub has no local subscriber left on these channels.
    fn released(&self, channels: Vec<String>);
    /// Publishes a payload (already checked by the caller) to every replica.
    fn publish(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Whether the broker is connected and fully subscribed.
    fn is_ready(&self) -> bool;
}

/// Turns a publisher's payload into a frame and hands it to the hub: the one hot-path entry.
pub fn dispatch(hub: &Hub, channel: &str, payload: &[u8], max_event_bytes: usize) {
    let received = Instant::now();
    m::hot().received.increment(1);
    let encoded = parse_payload(payload, max_event_bytes)
        .map_err(|e| (e.reason(), e.to_string()))
        .and_then(|event| frame::encode(&event).map_err(|e| ("invalid", e.to_string())));
    match encoded {
        Ok(bytes) => {
            hub.deliver(
                channel,
                &Queued {
                    bytes,
                    received,
                    durable: None,
                },
            );
        }
        Err((reason, why)) => {
            metrics::counter!(m::EVENTS_DROPPED, "reason" => reason).increment(1);
            tracing::debug!(reason, "event dropped: {why}");
        }
    }
}

/// Like [`dispatch`], for a durable event: the frame is left open for each stream's `id:` line.
pub fn dispatch_durable(
    hub: &Hub,
    channel: &str,
    mark: &Mark,
    payload: &[u8],
    max_event_bytes: usize,
) {
    let received = Instant::now();
    m::hot().received.increment(1);
    let encoded = parse_payload(payload, max_event_bytes)
        .map_err(|e| (e.reason(), e.to_string()))
        .and_then(|event| frame::encode_open(&event).map_err(|e| ("invalid", e.to_string())));
    match encoded {
        Ok(bytes) => {
            let channel_arc: Arc<str> = Arc::from(channel);
            let single = Cursor {
                marks: vec![(channel_arc.clone(), mark.clone())],
            };
            hub.deliver(
                channel,
                &Queued {
                    bytes,
                    received,
                    durable: Some(Arc::new(Durable {
                        channel: channel_arc,
                        mark: mark.clone(),
                        single_id: frame::id_line(&single.encode()),
                        reset: false,
                    })),
                },
            );
        }
        Err((reason, why)) => {
            metrics::counter!(m::EVENTS_DROPPED, "reason" => reason).increment(1);
            tracing::debug!(reason, "durable event dropped: {why}");
        }
    }
}

/// Tells every stream on `channel` that its history was lost (`gap`, a complete control frame)
/// and now stands at `mark`: the stream writes the gap once and takes `mark` as its cursor, so
/// the events of the new epoch that follow are not announced as a second gap.
pub fn dispatch_gap(hub: &Hub, channel: &str, mark: &Mark, gap: Bytes) {
    hub.deliver(
        channel,
        &Queued {
            bytes: gap,
            received: Instant::now(),
            durable: Some(Arc::new(Durable {
                channel: Arc::from(channel),
                mark: mark.clone(),
                single_id: Bytes::new(),
                reset: true,
            })),
        },
    );
}
