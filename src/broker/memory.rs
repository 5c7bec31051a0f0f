//! The in-process broker of single-replica mode: publishing is dispatching to the local hub.
//!
//! Invariants: always ready; subscriptions cost nothing because the hub already is the
//! subscription table; events go through the same [`super::dispatch`] as Redis messages.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::{dispatch, Broker, BrokerError};
use crate::hub::Hub;

/// Single-replica broker.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    max_event_bytes: usize,
}

impl MemoryBroker {
    /// A broker that delivers straight into `hub`.
    pub fn new(hub: Arc<Hub>, max_event_bytes: usize) -> Self {
        Self {
            hub,
            max_event_bytes,
        }
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
        dispatch(&self.hub, &channel, &payload, self.max_event_bytes);
        future::ready(Ok(())).boxed()
    }

    fn is_ready(&self) -> bool {
        true
    }
}
