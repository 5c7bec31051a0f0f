//! Presence in Redis, shared by every replica, tied to replica leases instead of heartbeats.
//!
//! Layout (beside the channel's history, on its hash tag and Cluster slot; written only by the
//! presence function of the durable-publish library, so a transition and its history entry are
//! one step):
//! - `{<prefix><channel>}:members` — HASH `<replica>:<stream>` -> sub, one entry per stream;
//! - `{<prefix><channel>}:users` — HASH sub -> entries; `…:reps` — HASH replica -> entries;
//! - `{<prefix><channel>}:away` — ZSET sub -> when their pending leave is due;
//! - `<prefix>{gateway}:presence:<replica>` — SET of the channels a replica holds entries on or
//!   owes a leave to, so that when its lease runs out a live replica knows what to sweep.
//!
//! Invariants:
//! - No per-stream heartbeat: an entry lives as long as its replica's lease (the registry the
//!   limiter renews). A snapshot leaves out entries of replicas whose lease passed; a live replica
//!   sweeps a dead one's channels (judged by a fresh registry read), which makes the leaves due.
//! - Pending leaves are settled by a timer on the replica that made them due, and by whoever
//!   sweeps that replica if it dies first: a leave is told once, late at worst, never lost.
//! - A leave that cannot reach Redis is kept and sent again; a member of a stream that never
//!   joined is a no-op, so the entry can own the leave before the join is sent.
//! - Every two leases a replica re-asserts its entries (idempotent), so presence that Redis
//!   lost in a restart or failover comes back without the clients doing anything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::Value;
use tokio::time::Instant;

use super::{Presence, PresenceError, PresenceSettings, Snapshot, MAX_MEMBERS};
use crate::backends::history::redis::Library;
use crate::backends::limits::redis::RedisLimiter;
use crate::backends::redis::{
    deadline, value_int as int, value_text as text, Commands as Pool, Failure,
};
use crate::core::position::{Mark, Position};
use crate::metrics as m;

/// The set of channels a replica holds presence entries on or owes leaves to.
pub fn replica_channels_key(prefix: &str, replica: &str) -> String {
    format!("{prefix}{{gateway}}:presence:{replica}")
}

/// A channel's presence key `what` (`members`, `users`, `reps`, `away`).
pub fn channel_key(prefix: &str, channel: &str, what: &str) -> String {
    format!("{{{prefix}{channel}}}:{what}")
}

/// Redis-backed presence.
pub struct RedisPresence {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    library: Library,
    limiter: Arc<RedisLimiter>,
    prefix: String,
    replica: String,
    maxlen: String,
    ttl_ms: String,
    grace_ms: String,
    /// Entries this replica holds: channel -> stream -> sub.
    local: Mutex<HashMap<String, HashMap<u64, String>>>,
    /// Channels in this replica's set in Redis (added before any entry or due needs it).
    owned: Mutex<HashSet<String>>,
    /// Settle timers armed here: channel -> when (local clock).
    timers: Mutex<HashMap<String, Instant>>,
    /// Leaves that could not reach Redis yet: (channel, member).
    pending: Mutex<Vec<(String, String)>>,
    in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `leave`, `settle` and `sweep` answer: leaves told, the next due time (ms, Redis clock;
/// negative: none) and Redis's time then.
struct Settled {
    leaves: i64,
    next_due: i64,
    now: i64,
}

fn settled(reply: &[Value]) -> Result<Settled, Failure> {
    match (
        reply.first().and_then(int),
        reply.get(1).and_then(int),
        reply.get(2).and_then(int),
    ) {
        (Some(leaves), Some(next_due), Some(now)) => Ok(Settled {
            leaves,
            next_due,
            now,
        }),
        _ => Err(Failure::Reply(
            "the presence function answered no [leaves, next due, time]".into(),
        )),
    }
}

impl RedisPresence {
    /// Starts the sweeper of dead replicas' presence.
    pub fn start(
        pool: Pool,
        library: Library,
        limiter: Arc<RedisLimiter>,
        settings: &PresenceSettings,
        lease: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            pool,
            library,
            replica: limiter.replica_id().to_string(),
            limiter,
            prefix: settings.prefix.clone(),
            maxlen: settings.history_size.max(1).to_string(),
            ttl_ms: settings.history_ttl.as_millis().to_string(),
            grace_ms: settings.grace.as_millis().to_string(),
            local: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashSet::new()),
            timers: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
        });
        tokio::spawn(upkeep(Arc::downgrade(&inner), lease));
        Self { inner }
    }
}

impl Inner {
    fn member(&self, stream: u64) -> String {
        format!("{}:{stream}", self.replica)
    }

    fn own_key(&self) -> String {
        replica_channels_key(&self.prefix, &self.replica)
    }

    /// One call of the presence function; loads the library once if Redis lost it.
    async fn call(&self, channel: &str, op: &str, extra: &[String]) -> Result<Vec<Value>, Failure> {
        let work = async {
            let mut loaded_again = false;
            loop {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg(self.library.presence_function())
                    .arg(1)
                    .arg(format!("{{{}{channel}}}", self.prefix))
                    .arg(op)
                    .arg(&self.maxlen)
                    .arg(&self.ttl_ms)
                    .arg(&self.grace_ms)
                    .arg(extra);
                let mut conn = self.pool.get().await?;
                match cmd.query_async::<Vec<Value>>(&mut conn).await {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        let failure = Failure::command("FCALL of the presence function")(e);
                        if loaded_again || !failure.is_missing_function() {
                            return Err(failure);
                        }
                        drop(conn);
                        self.library
                            .ensure()
                            .await
                            .map_err(|e| Failure::Reply(e.to_string()))?;
                        loaded_again = true;
                    }
                }
            }
        };
        deadline("the presence function", work).await
    }

    /// Makes sure `channel` is in this replica's set (before it holds an entry or owes a leave
    /// there, so a sweep after its death finds it).
    async fn own(&self, channel: &str) -> Result<(), Failure> {
        if lock(&self.owned).contains(channel) {
            return Ok(());
        }
        let work = async {
            let mut conn = self.pool.get().await?;
            redis::cmd("SADD")
                .arg(self.own_key())
                .arg(channel)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(Failure::command("SADD of a presence channel"))
        };
        deadline("recording a presence channel", work).await?;
        lock(&self.owned).insert(channel.to_string());
        Ok(())
    }

    async fn join(&self, channel: &str, sub: &str, stream: u64) -> Result<(), Failure> {
        self.own(channel).await?;
        let reply = self
            .call(channel, "join", &[self.member(stream), sub.to_string()])
            .await?;
        if reply.first().and_then(int) == Some(1) {
            metrics::counter!(m::PRESENCE_EVENTS, "kind" => "join").increment(1);
        }
        Ok(())
    }

    /// Counts what a leave, settle or sweep told, and arms the timer for the next due leave.
    fn after_settle(self: &Arc<Self>, channel: &str, s: &Settled) {
        if s.leaves > 0 {
            metrics::counter!(m::PRESENCE_EVENTS, "kind" => "leave").increment(s.leaves as u64);
        }
        if s.next_due >= 0 {
            // A little after Redis's due time, so the settle finds it due.
            self.settle_in(
                channel,
                Duration::from_millis((s.next_due - s.now).max(0) as u64 + 20),
            );
        }
    }

    /// Arms the settle timer of `channel` to fire after `wait`, unless one fires sooner.
    fn settle_in(self: &Arc<Self>, channel: &str, wait: Duration) {
        let at = Instant::now() + wait;
        {
            let mut timers = lock(&self.timers);
            match timers.get(channel) {
                Some(t) if *t <= at && *t > Instant::now() => return,
                _ => {
                    timers.insert(channel.to_string(), at);
                }
            }
        }
        let weak = Arc::downgrade(self);
        let channel = channel.to_string();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(inner) = weak.upgrade() else { return };
            {
                let mut timers = lock(&inner.timers);
                if timers.get(&channel) == Some(&at) {
                    timers.remove(&channel);
                }
            }
            inner.settle(&channel).await;
        });
    }

    async fn settle(self: &Arc<Self>, channel: &str) {
        match self
            .call(channel, "settle", &[])
            .await
            .and_then(|r| settled(&r))
        {
            Ok(s) => self.after_settle(channel, &s),
            Err(e) => {
                metrics::counter!(m::PRESENCE_ERRORS, "op" => "settle").increment(1);
                tracing::warn!("announcing due presence leaves failed: {e}; retrying in a second");
                // Try again soon: a leave is late at worst, never lost.
                self.settle_in(channel, Duration::from_secs(1));
            }
        }
    }

    async fn leave(self: &Arc<Self>, channel: &str, member: &str) -> Result<(), Failure> {
        // The channel stays in this replica's set while a leave it made is due.
        self.own(channel).await?;
        let reply = self.call(channel, "leave", &[member.to_string()]).await?;
        let s = settled(&reply)?;
        self.after_settle(channel, &s);
        Ok(())
    }

    async fn flush_pending(self: &Arc<Self>) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (channel, member) in pending {
            if self.leave(&channel, &member).await.is_err() {
                lock(&self.pending).push((channel, member));
            }
        }
    }

    /// Channels of replicas whose lease ran out: swept (each judged by a fresh registry read),
    /// their due leaves settled here from now on.
    async fn sweep_dead(self: &Arc<Self>) -> Result<(), Failure> {
        let (read_at, leases) = self.limiter.leases();
        let candidates: Vec<String> = leases
            .iter()
            .filter(|(id, expiry)| *id != self.replica && *expiry <= read_at)
            .map(|(id, _)| id.clone())
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        for dead in candidates {
            let key = replica_channels_key(&self.prefix, &dead);
            let channels: Vec<String> =
                deadline("reading a dead replica's presence channels", async {
                    redis::cmd("SMEMBERS")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .map_err(Failure::command("SMEMBERS of presence channels"))
                })
                .await?;
            if channels.is_empty() {
                continue;
            }
            let (read_at, leases, fresh_for) = self.limiter.fresh_leases().await?;
            let Some(expiry) = leases.iter().find(|(id, _)| *id == dead).map(|(_, e)| *e) else {
                continue;
            };
            if expiry > read_at {
                continue;
            }
            let mut all_done = true;
            for channel in &channels {
                // Settling these leaves is this replica's duty now.
                self.own(channel).await?;
                let reply = self
                    .call(
                        channel,
                        "sweep",
                        &[
                            dead.clone(),
                            expiry.to_string(),
                            read_at.to_string(),
                            fresh_for.to_string(),
                        ],
                    )
                    .await?;
                let s = settled(&reply)?;
                if s.leaves < 0 {
                    // The read grew old, or the replica renewed after all: judge again later.
                    all_done = false;
                    break;
                }
                metrics::counter!(m::PRESENCE_SWEEPS).increment(1);
                self.after_settle(channel, &s);
            }
            if all_done {
                deadline("forgetting a dead replica's presence channels", async {
                    redis::cmd("SREM")
                        .arg(&key)
                        .arg(&channels)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(Failure::command("SREM of presence channels"))
                })
                .await?;
                tracing::info!(
                    replica = %dead,
                    channels = channels.len(),
                    "cleared the presence of a replica whose lease ran out; its users' leaves follow after the grace unless they are back"
                );
            }
        }
        Ok(())
    }

    /// Puts this replica's entries back where Redis lost them (a restart, a failover to a replica
    /// that had not seen the writes): one call per channel and chunk, a join told for a user who
    /// reappears this way. An entry whose stream left while the call was on its way is removed
    /// again afterwards, so a reassert never leaves a member behind.
    async fn reassert(self: &Arc<Self>) -> Result<(), Failure> {
        const CHUNK: usize = 500;
        let snapshot: Vec<(String, Vec<(u64, String)>)> = lock(&self.local)
            .iter()
            .map(|(c, streams)| {
                (
                    c.clone(),
                    streams.iter().map(|(k, v)| (*k, v.clone())).collect(),
                )
            })
            .collect();
        let mut joins = 0;
        for (channel, streams) in snapshot {
            self.own(&channel).await?;
            for chunk in streams.chunks(CHUNK) {
                let mut args = Vec::with_capacity(chunk.len() * 2);
                for (stream, sub) in chunk {
                    args.push(self.member(*stream));
                    args.push(sub.clone());
                }
                let reply = self.call(&channel, "reassert", &args).await?;
                joins += reply.first().and_then(int).unwrap_or(0);
                let gone: Vec<u64> = {
                    let local = lock(&self.local);
                    let now = local.get(&channel);
                    chunk
                        .iter()
                        .filter(|(stream, _)| !now.is_some_and(|m| m.contains_key(stream)))
                        .map(|(stream, _)| *stream)
                        .collect()
                };
                for stream in gone {
                    let member = self.member(stream);
                    if self.leave(&channel, &member).await.is_err() {
                        lock(&self.pending).push((channel.clone(), member));
                    }
                }
            }
        }
        if joins > 0 {
            metrics::counter!(m::PRESENCE_EVENTS, "kind" => "join").increment(joins as u64);
            tracing::warn!(
                joins,
                "presence entries Redis had lost were put back (a restart or failover lost them); those users were announced again"
            );
        }
        Ok(())
    }

    /// Takes channels this replica neither holds entries on nor owes a leave to out of its set;
    /// one that gained an entry meanwhile is put back.
    async fn prune(self: &Arc<Self>) -> Result<(), Failure> {
        let idle: Vec<String> = {
            let local = lock(&self.local);
            let timers = lock(&self.timers);
            let mut owned = lock(&self.owned);
            let idle: Vec<String> = owned
                .iter()
                .filter(|c| !local.contains_key(*c) && !timers.contains_key(*c))
                .cloned()
                .collect();
            for c in &idle {
                owned.remove(c);
            }
            idle
        };
        if idle.is_empty() {
            return Ok(());
        }
        let work = async {
            let mut conn = self.pool.get().await?;
            redis::cmd("SREM")
                .arg(self.own_key())
                .arg(&idle)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(Failure::command("SREM of presence channels"))
        };
        let removed = deadline("pruning presence channels", work).await;
        for c in &idle {
            let busy = lock(&self.local).contains_key(c) || lock(&self.timers).contains_key(c);
            if busy || removed.is_err() {
                // A join or a due leave came in while it was removed: put it back.
                lock(&self.owned).remove(c);
                self.own(c).await?;
            }
        }
        removed.map(|_| ())
    }
}

/// Every third of a lease: retries leaves that failed and sweeps dead replicas; every two leases
/// puts back entries Redis lost; every three prunes this replica's set of channels.
async fn upkeep(weak: Weak<Inner>, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(200));
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        ticks += 1;
        inner.flush_pending().await;
        if let Err(e) = inner.sweep_dead().await {
            metrics::counter!(m::PRESENCE_ERRORS, "op" => "sweep").increment(1);
            tracing::warn!("sweeping dead replicas' presence failed: {e}; retrying in {every:?}");
        }
        // Every two leases, like the limiter's reconciliation.
        if ticks.is_multiple_of(6) {
            if let Err(e) = inner.reassert().await {
                metrics::counter!(m::PRESENCE_ERRORS, "op" => "reassert").increment(1);
                tracing::warn!("re-asserting presence entries failed: {e}; retrying in two leases");
            }
        }
        if ticks.is_multiple_of(9) {
            if let Err(e) = inner.prune().await {
                tracing::debug!("pruning this replica's presence channels failed: {e}");
            }
        }
    }
}

impl Presence for RedisPresence {
    fn join(
        &self,
        channel: &str,
        sub: &str,
        stream: u64,
    ) -> BoxFuture<'static, Result<(), PresenceError>> {
        let inner = self.inner.clone();
        let (channel, sub) = (channel.to_string(), sub.to_string());
        lock(&inner.local)
            .entry(channel.clone())
            .or_default()
            .insert(stream, sub.clone());
        metrics::gauge!(m::PRESENCE_ENTRIES).increment(1.0);
        async move {
            inner.join(&channel, &sub, stream).await.map_err(|e| {
                metrics::counter!(m::PRESENCE_ERRORS, "op" => "join").increment(1);
                PresenceError::from(e)
            })
        }
        .boxed()
    }

    fn leave(&self, channel: &str, _sub: &str, stream: u64) {
        let inner = self.inner.clone();
        {
            let mut local = lock(&inner.local);
            if let Some(streams) = local.get_mut(channel) {
                streams.remove(&stream);
                if streams.is_empty() {
                    local.remove(channel);
                }
            }
        }
        metrics::gauge!(m::PRESENCE_ENTRIES).decrement(1.0);
        let (channel, member) = (channel.to_string(), inner.member(stream));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                inner.in_flight.fetch_add(1, Ordering::AcqRel);
                handle.spawn(async move {
                    if let Err(e) = inner.leave(&channel, &member).await {
                        metrics::counter!(m::PRESENCE_ERRORS, "op" => "leave").increment(1);
                        tracing::debug!("a presence leave failed: {e}; it is sent again");
                        lock(&inner.pending).push((channel, member));
                    }
                    inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Err(_) => lock(&inner.pending).push((channel, member)),
        }
    }

    fn snapshot(&self, channel: &str) -> BoxFuture<'static, Result<Snapshot, PresenceError>> {
        let inner = self.inner.clone();
        let channel = channel.to_string();
        async move {
            let (_, leases) = inner.limiter.leases();
            let mut extra = vec![MAX_MEMBERS.to_string()];
            for (id, expiry) in leases {
                extra.push(id);
                extra.push(expiry.to_string());
            }
            let reply = inner.call(&channel, "snapshot", &extra).await?;
            let bad = || Failure::Reply("a presence snapshot without its header".into());
            let epoch = reply.first().and_then(text).ok_or_else(bad)?;
            let pos = reply
                .get(1)
                .and_then(text)
                .and_then(|p| Position::parse(&p))
                .ok_or_else(bad)?;
            let users = reply.get(2).and_then(int).ok_or_else(bad)?;
            let connections = reply.get(3).and_then(int).ok_or_else(bad)?;
            let truncated = reply.get(4).and_then(int).ok_or_else(bad)? == 1;
            let mut members = Vec::new();
            for pair in reply.get(5..).unwrap_or(&[]).chunks(2) {
                if let [sub, n] = pair {
                    if let (Some(sub), Some(n)) = (text(sub), int(n)) {
                        members.push((sub, n.max(0) as usize));
                    }
                }
            }
            // Already ordered by sub and cut at MAX_MEMBERS by the snapshot operation.
            Ok(Snapshot {
                users: users.max(0) as usize,
                connections: connections.max(0) as usize,
                members,
                truncated,
                mark: if epoch.is_empty() {
                    Mark::empty()
                } else {
                    Mark { epoch, pos }
                },
            })
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(3);
            while inner.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(3), inner.flush_pending()).await;
        }
        .boxed()
    }
}
