//! Presence: who is on a channel, across every replica (SPEC §6.5).
//!
//! Invariants every implementation keeps (the shared tests in `tests/presence.rs` check both):
//! - one entry per stream; a user is present while they hold an entry, or while their leave is
//!   pending (their last stream went away less than the grace ago);
//! - the user-level transitions are decided and stored in history in one step: a join when a
//!   user's first entry appears and no leave was pending, a leave when a pending leave falls due
//!   and they hold no entry — so several tabs or a quick reconnect never double them, and they
//!   resume like any durable event;
//! - a snapshot and its history position are read in one step, so snapshot + resume from its
//!   position misses no transition;
//! - `leave` never fails from the caller's view: one that cannot reach its store now is retried.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::backends::history::HistoryError;
use crate::backends::redis::Failure;
use crate::core::position::Mark;

/// Most members a snapshot lists (`truncated` past that).
pub const MAX_MEMBERS: usize = 1000;

/// What presence keeps to, whatever its backend (built by the composition root).
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    /// Prefix of every Redis key (`SSE_GATEWAY_CHANNEL_PREFIX`).
    pub prefix: String,
    /// How long a user may be gone before their leave is announced.
    pub grace: Duration,
    /// History kept per channel (`SSE_GATEWAY_HISTORY_SIZE`), passed to the stores.
    pub history_size: u64,
    /// History lifetime after its last event (`SSE_GATEWAY_HISTORY_TTL_SECS`).
    pub history_ttl: Duration,
}

/// Who is on a channel, and where in its history that was true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Users present (those whose leave is pending included).
    pub users: usize,
    /// Their streams on live replicas.
    pub connections: usize,
    /// Up to [`MAX_MEMBERS`] users with their stream counts, ordered by `sub`.
    pub members: Vec<(String, usize)>,
    /// More users are present than listed.
    pub truncated: bool,
    /// The channel's history position at the moment of the snapshot.
    pub mark: Mark,
}

/// Why presence could not be recorded or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// Redis failed, timed out or answered what the gateway cannot read.
    #[error(transparent)]
    Redis(#[from] Failure),
    /// The history a transition is stored in failed.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Where members are kept.
pub trait Presence: Send + Sync + 'static {
    /// Records stream `stream` of `sub` on `channel`; stores the user's join if it is their
    /// first stream there and they were not within the grace of a leave.
    fn join(
        &self,
        channel: &str,
        sub: &str,
        stream: u64,
    ) -> BoxFuture<'static, Result<(), PresenceError>>;
    /// The stream is gone: its entry is removed, and the user's leave is due after the grace
    /// if it was their last.
    fn leave(&self, channel: &str, sub: &str, stream: u64);
    /// Who is on `channel` now, with the history position that goes with it.
    fn snapshot(&self, channel: &str) -> BoxFuture<'static, Result<Snapshot, PresenceError>>;
    /// Waits (bounded) until every leave so far has reached the store: the end of a drain.
    fn flush(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A stream's entries on its presence channels; dropping it removes them.
pub struct Entry {
    presence: Arc<dyn Presence>,
    channels: Vec<String>,
    sub: String,
    stream: u64,
}

impl Entry {
    /// The entry of stream `stream` of `sub` on `channels` (not recorded until [`Entry::join`]).
    pub fn new(presence: Arc<dyn Presence>, channels: Vec<String>, sub: &str, stream: u64) -> Self {
        Self {
            presence,
            channels,
            sub: sub.to_string(),
            stream,
        }
    }

    /// Records the stream on every channel at once. Made before the first await, the entry
    /// already owns the leave: a client gone mid-join never leaves a member behind.
    pub async fn join(&self) -> Result<(), PresenceError> {
        let joins: Vec<_> = self
            .channels
            .iter()
            .map(|c| self.presence.join(c, &self.sub, self.stream))
            .collect();
        for result in futures_util::future::join_all(joins).await {
            result?;
        }
        Ok(())
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        for channel in &self.channels {
            self.presence.leave(channel, &self.sub, self.stream);
        }
    }
}

/// Orders members by `sub` and cuts the list at [`MAX_MEMBERS`]: (members, truncated).
pub fn listing(mut members: Vec<(String, usize)>) -> (Vec<(String, usize)>, bool) {
    members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let truncated = members.len() > MAX_MEMBERS;
    members.truncate(MAX_MEMBERS);
    (members, truncated)
}
