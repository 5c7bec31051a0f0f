//! History: durable events per channel, stored and read back for resuming streams.
//!
//! Invariants:
//! - A durable event is stored and published in one atomic step, and its position is the
//!   history's own id, so a reader can never see an event live that history lacks, or the reverse.
//! - A read from a position of another epoch, or older than what is kept, is a gap.

pub mod memory;
pub mod redis;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::backends::redis::Failure;
use crate::core::position::{Mark, Position};

/// What a history keeps, whatever its backend (built from `SSE_GATEWAY_*` by the composition
/// root, so a backend can be built and tested without the command line).
#[derive(Debug, Clone)]
pub struct HistorySettings {
    /// Prefix of every Redis key and channel (`SSE_GATEWAY_CHANNEL_PREFIX`).
    pub prefix: String,
    /// Events kept per channel (`SSE_GATEWAY_HISTORY_SIZE`, at least 1 here).
    pub size: u64,
    /// How long a channel's history lives after its last event.
    pub ttl: Duration,
    /// Largest payload stored (`SSE_GATEWAY_MAX_EVENT_BYTES`).
    pub max_event_bytes: usize,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its position.
    pub pos: Position,
    /// The publisher's payload, as published.
    pub payload: Bytes,
}

/// A page of events after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The history no longer reaches back to the position asked (trimmed, expired or lost).
    pub gap: bool,
    /// The channel's current epoch.
    pub epoch: String,
    /// Events after the position, in order.
    pub events: Vec<Stored>,
    /// More events follow this page.
    pub more: bool,
}

/// Why history could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// Redis failed, timed out or answered what the gateway cannot read.
    #[error(transparent)]
    Redis(#[from] Failure),
    /// The installed durable-publish library holds no usable key.
    #[error(
        "{0} holds no usable durable-event key (delete it and let a replica agree on a new one)"
    )]
    NoKey(String),
    /// The in-memory history lost an entry while writing it.
    #[error("the history entry vanished while it was written")]
    Vanished,
}

/// Stored, resumable events.
pub trait History: Send + Sync + 'static {
    /// Stores a checked payload and publishes it to every replica, atomically; its mark.
    fn append(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Mark, HistoryError>>;
    /// Where each channel's history stands now.
    fn marks(&self, channels: Vec<String>) -> BoxFuture<'static, Result<Vec<Mark>, HistoryError>>;
    /// Up to `limit` events after `from` in `channel`, if `from` is still of the current epoch,
    /// and no more payload bytes than `max_bytes` (but at least one event when `limit` > 0):
    /// what a page holds in memory is bounded whatever the events' sizes.
    fn after(
        &self,
        channel: String,
        from: Mark,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Page, HistoryError>>;
    /// Records that `mark`, a durable event this replica delivered live, is beyond the end of
    /// `channel`'s history (it lost its tail in a failover), so that every older cursor resumes
    /// with a gap instead of silently missing it. Only history that can lose writes needs it.
    fn mark_lost(
        &self,
        channel: String,
        mark: Mark,
    ) -> BoxFuture<'static, Result<(), HistoryError>> {
        let _ = (channel, mark);
        Box::pin(async { Ok(()) })
    }
}

/// Events per page when replaying.
pub const PAGE: usize = 200;

/// Payload bytes per page when replaying: with the event frames built from it, a replaying
/// stream holds well under a MiB whatever its `Last-Event-ID` asks for.
pub const PAGE_BYTES: usize = 256 * 1024;
