//! Presence in memory, for single-replica mode: the same behaviour as the Redis store.
//!
//! Invariants: decisions and the history append happen under one lock, so transitions are stored
//! in the order they were decided and a snapshot's position matches its members exactly (the
//! in-memory history appends and reads synchronously). A pending leave is a due time per user,
//! fired by a timer that checks it is still the pending one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use tokio::time::Instant;

use super::{listing, Presence, PresenceError, PresenceSettings, Snapshot};
use crate::backends::history::History;
use crate::core::event::{presence_payload, Presence as Kind};
use crate::metrics as m;

#[derive(Default)]
struct Channel {
    /// Streams present, by id, with their user.
    streams: HashMap<u64, String>,
    /// Streams per user.
    users: HashMap<String, usize>,
    /// Users whose leave is pending, with when it is due (a fresh instant per pending leave,
    /// so a timer can tell its own from a later one).
    away: HashMap<String, Instant>,
}

/// Single-replica presence.
pub struct MemoryPresence {
    this: Weak<MemoryPresence>,
    grace: Duration,
    history: Arc<dyn History>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl MemoryPresence {
    /// Presence whose transitions are stored in `history`.
    pub fn new(settings: &PresenceSettings, history: Arc<dyn History>) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            this: this.clone(),
            grace: settings.grace,
            history,
            channels: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a transition (the in-memory history appends at once, in call order).
    fn announce(&self, channel: &str, kind: Kind, sub: &str) {
        let payload = Bytes::from(presence_payload(kind, sub));
        drop(self.history.append(channel.to_string(), payload));
        metrics::counter!(m::PRESENCE_EVENTS, "kind" => kind.word()).increment(1);
    }

    /// Announces `sub`'s leave from `channel` if the pending leave due at `due` still stands.
    fn settle(&self, channel: &str, sub: &str, due: Instant) {
        let mut map = self.lock();
        let Some(c) = map.get_mut(channel) else {
            return;
        };
        if c.away.get(sub) != Some(&due) {
            return;
        }
        c.away.remove(sub);
        if !c.users.contains_key(sub) {
            self.announce(channel, Kind::Leave, sub);
        }
        if c.streams.is_empty() && c.away.is_empty() {
            map.remove(channel);
        }
    }
}

impl Presence for MemoryPresence {
    fn join(
        &self,
        channel: &str,
        sub: &str,
        stream: u64,
    ) -> BoxFuture<'static, Result<(), PresenceError>> {
        let mut map = self.lock();
        let c = map.entry(channel.to_string()).or_default();
        if c.streams.insert(stream, sub.to_string()).is_none() {
            metrics::gauge!(m::PRESENCE_ENTRIES).increment(1.0);
            let n = c.users.entry(sub.to_string()).or_insert(0);
            *n += 1;
            // Back within the grace: the pending leave is withdrawn and nobody saw them go.
            if *n == 1 && c.away.remove(sub).is_none() {
                self.announce(channel, Kind::Join, sub);
            }
        }
        future::ready(Ok(())).boxed()
    }

    fn leave(&self, channel: &str, sub: &str, stream: u64) {
        let mut map = self.lock();
        let Some(c) = map.get_mut(channel) else {
            return;
        };
        if c.streams.remove(&stream).is_none() {
            return;
        }
        metrics::gauge!(m::PRESENCE_ENTRIES).decrement(1.0);
        let last = match c.users.get_mut(sub) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                c.users.remove(sub);
                true
            }
        };
        if !last {
            return;
        }
        if self.grace.is_zero() {
            self.announce(channel, Kind::Leave, sub);
            if c.streams.is_empty() && c.away.is_empty() {
                map.remove(channel);
            }
            return;
        }
        let due = Instant::now() + self.grace;
        c.away.insert(sub.to_string(), due);
        drop(map);
        let (this, channel, sub) = (self.this.clone(), channel.to_string(), sub.to_string());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep_until(due).await;
                if let Some(presence) = this.upgrade() {
                    presence.settle(&channel, &sub, due);
                }
            });
        }
    }

    fn snapshot(&self, channel: &str) -> BoxFuture<'static, Result<Snapshot, PresenceError>> {
        let map = self.lock();
        let mut members: Vec<(String, usize)> = Vec::new();
        let mut connections = 0;
        let mut seen = HashSet::new();
        if let Some(c) = map.get(channel) {
            for (sub, n) in &c.users {
                connections += n;
                seen.insert(sub.as_str());
                members.push((sub.clone(), *n));
            }
            for sub in c.away.keys() {
                if !seen.contains(sub.as_str()) {
                    members.push((sub.clone(), 0));
                }
            }
        }
        // Read under the same lock as the members: no transition can fall in between.
        let marks = self.history.marks(vec![channel.to_string()]);
        drop(map);
        async move {
            let mark = marks
                .await?
                .pop()
                .unwrap_or_else(crate::core::position::Mark::empty);
            let users = members.len();
            let (members, truncated) = listing(members);
            Ok(Snapshot {
                users,
                connections,
                members,
                truncated,
                mark,
            })
        }
        .boxed()
    }
}
