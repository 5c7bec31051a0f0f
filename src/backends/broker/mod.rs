//! Brokers carry events between replicas; the hub carries them to local streams.
//!
//! The contract every implementation keeps (and the shared tests check):
//! - `ensure_subscribed` resolves once events published to those channels from then on reach
//!   this replica's hub; it fails fast, rather than hanging, while the broker is unreachable.
//! - `released` is a hint that the hub no longer needs some channels; the broker unsubscribes
//!   after a short grace, and only if the hub still has no subscriber then.
//! - Events of one channel arrive in the order they were published; delivery is at most once
//!   (pub/sub semantics): history, not the broker, makes streams gap-free.
//! - Every payload goes through an [`EventSink`](crate::core::sink::EventSink), so the envelope
//!   rule, limits and metrics are the same whatever path an event took.

pub mod memory;
pub mod redis;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::backends::redis::Failure;

/// What the Redis broker needs besides its connections.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Prefix of every channel and key (`SSE_GATEWAY_CHANNEL_PREFIX`).
    pub prefix: String,
    /// How often the subscription is proven end to end (`SSE_GATEWAY_REDIS_PROBE_SECS`).
    pub probe_every: Duration,
}

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is between connections (Redis unreachable); it retries on its own.
    #[error("Redis pub/sub is unreachable; the broker is reconnecting")]
    Reconnecting,
    /// The broker's task has ended (the replica is stopping).
    #[error("the Redis broker has stopped")]
    Stopped,
    /// A Redis command failed.
    #[error(transparent)]
    Redis(#[from] Failure),
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
    /// Takes user `sub` off every replica (this one included): their streams end with
    /// `gateway.disconnected`.
    fn disconnect(&self, sub: String) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Whether the broker is connected and fully subscribed.
    fn is_ready(&self) -> bool;
}
