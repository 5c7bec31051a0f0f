//! The in-process broker of single-replica mode: publishing is dispatching to the local hub.
//!
//! Invariants: always ready; subscriptions cost nothing because the hub already is the
//! subscription table; events go through the same sink as Redis messages.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::{Broker, BrokerError};
use crate::core::sink::EventSink;

/// Single-replica broker.
pub struct MemoryBroker {
    sink: Arc<dyn EventSink>,
}

impl MemoryBroker {
    /// A broker that delivers straight into `sink`.
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        Self { sink }
    }
}

impl Broker for MemoryBroker {
    fn ensure_subscribed(
        &self,
        _channels: Vec<String>,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        future::ready(Ok(())).boxed()
    }

    fn released(&self, _channels: Vec<String>) {}

    fn publish(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.sink.event(&channel, &payload);
        future::ready(Ok(())).boxed()
    }

    fn disconnect(&self, sub: String) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.sink.disconnect(&sub);
        future::ready(Ok(())).boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }
}
