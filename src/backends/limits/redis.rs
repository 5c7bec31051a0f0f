//! Per-user slots in Redis, shared by every replica, healing after crashes.
//!
//! Layout (hash-tagged so that each user's slots sit on one Cluster slot):
//! - `<prefix>{u:<sub>}:slots` — ZSET, member `<replica>:<stream>`, score admission time (ms);
//! - `<prefix>{gateway}:replicas` — ZSET, member replica id, score lease expiry (ms, Redis clock);
//! - `<prefix>{gateway}:replicas:admin` — HASH, replica id -> admin address.
//!
//! Invariants:
//! - Admission is one script (`admit.lua`): it drops members of replicas whose lease passed,
//!   counts the rest, and adds the new member only below the limit — no read-then-write race.
//! - Leases are per replica, not per stream: one registry script per replica every lease/3
//!   keeps every slot of that replica alive, whatever the number of streams.
//! - Members are named by a stream id a process never reuses, so a late release can only remove
//!   its own slot: it cannot free a slot admitted elsewhere.
//! - Fencing is on Redis's clock and a fresh registry, never on a cached view: `admit.lua`
//!   refuses a caller whose own lease has run out by Redis's clock, and removes another
//!   replica's members only when the registry copy it is given is younger than lease/3 (a live
//!   replica renews every lease/3, so it cannot look expired in such a copy); otherwise the
//!   caller reads the registry again (`leases.lua`).
//! - A replica whose lease lapsed (Redis away, the process paused, Redis restarted empty)
//!   admits nothing until it has re-asserted its slots with `reclaim.lua`: slots other replicas
//!   admitted meanwhile count first, and streams of this replica beyond the limit are closed.
//!   The same reconciliation runs every two leases, so slot writes a failover lost are put
//!   back. It runs apart from the lease renewal, many users at once on the multiplexed
//!   connection, in chunks each judged by its own registry read.
//! - Releases are batched: what gathers while one pipeline of `ZREM`s is on its way goes in the
//!   next, so closes cost no task each and a storm of them a few round trips. So are admissions
//!   on one server (one `admit.lua` call decides a batch, stream by stream, in order); on a
//!   Cluster each admission goes alone, since users' keys sit on different slots.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::{Script, Value};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

use super::{LimitError, Limiter, REVOCATION_TTL};
use crate::backends::redis::{deadline, value_int as int, Commands as Pool, Failure};
use crate::core::backoff::Backoff;
use crate::core::hub::{CloseReason, Hub};

/// Redis-backed per-user limiter.
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    prefix: String,
    replica: String,
    limit: u32,
    lease: Duration,
    admin_addr: String,
    /// Every registered replica's lease expiry (ms, Redis clock), and when that was read
    /// (ms, Redis clock), from the last renewal or registry read.
    leases: RwLock<Leases>,
    /// Set when this replica's lease lapsed: no admission until its slots are re-asserted.
    needs_reclaim: std::sync::atomic::AtomicBool,
    /// Bumped on every lapse, so a reclaim that started before one does not clear the flag.
    lapses: std::sync::atomic::AtomicU64,
    /// Wakes the reconciler (after a lapse).
    reconcile_now: Arc<tokio::sync::Notify>,
    /// Until when this replica's own lease is known to hold (local clock, with a margin).
    valid_until: Mutex<Option<Instant>>,
    /// Whether the lease was ever renewed (before that, no stream was admitted).
    registered: std::sync::atomic::AtomicBool,
    /// Slots this replica holds: sub -> stream ids (ascending = oldest first).
    held: Mutex<HashMap<String, BTreeSet<u64>>>,
    /// Releases that could not reach Redis yet.
    pending_release: Mutex<Vec<(String, u64)>>,
    /// Admissions waiting for the next batch (one script call for all of them; one server only).
    admissions: Mutex<Vec<Admission>>,
    /// Wakes the batcher of admissions.
    admit_wake: Arc<tokio::sync::Notify>,
    /// A Redis Cluster: each admission goes alone (users' keys sit on different slots).
    sharded: bool,
    /// Releases waiting for the next batch (one pipeline of `ZREM`s for all of them).
    releases: Mutex<Vec<(String, u64)>>,
    /// Wakes the batcher of releases.
    release_wake: Arc<tokio::sync::Notify>,
    /// Releases queued or on their way to Redis.
    in_flight: std::sync::atomic::AtomicUsize,
    hub: Arc<Hub>,
    admit: Script,
    reclaim: Script,
    registry: Script,
    read_leases: Script,
    revoke: Script,
}

/// A stream waiting for its slot.
struct Admission {
    sub: String,
    stream: u64,
    issued_at: u64,
    tx: oneshot::Sender<Result<(), LimitError>>,
}

/// One user's reclaim: (sub, how many of its streams were sent, members to close).
type Reclaimed = (String, usize, Vec<String>);

/// A copy of the registry: when it was read (ms, Redis clock) and each replica's expiry.
#[derive(Clone, Default)]
struct Leases {
    read_at: i64,
    expiries: Vec<(String, i64)>,
}

/// Users whose slots one reconciliation pass sends to Redis at once (pipelined on the
/// multiplexed connection), and how many users share one registry read.
const RECLAIM_CONCURRENCY: usize = 64;
const RECLAIM_CHUNK: usize = 512;

/// A user's slot set (the one place that names it; `inspect` reads it too).
pub fn slots_key(prefix: &str, sub: &str) -> String {
    format!("{prefix}{{u:{sub}}}:slots")
}

/// A user's revocation (`POST /disconnect` with `revoke_before`), beside their slot set.
pub fn revoked_key(prefix: &str, sub: &str) -> String {
    format!("{prefix}{{u:{sub}}}:revoked")
}

/// The replica registry: replica id -> lease expiry.
pub fn registry_key(prefix: &str) -> String {
    format!("{prefix}{{gateway}}:replicas")
}

/// Replica id -> admin address, beside the registry.
pub fn admin_key(prefix: &str) -> String {
    format!("{prefix}{{gateway}}:replicas:admin")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisLimiter {
    /// Starts lease upkeep; admissions succeed once the first renewal has reached Redis.
    pub fn start(
        pool: Pool,
        settings: &super::LimitSettings,
        hub: Arc<Hub>,
        admin_addr: String,
        replica: String,
    ) -> Self {
        let sharded = pool.topology().sharded();
        let inner = Arc::new(Inner {
            pool,
            prefix: settings.prefix.clone(),
            replica,
            limit: settings.limit,
            lease: settings.lease,
            admin_addr,
            leases: RwLock::new(Leases::default()),
            needs_reclaim: std::sync::atomic::AtomicBool::new(false),
            lapses: std::sync::atomic::AtomicU64::new(0),
            reconcile_now: Arc::new(tokio::sync::Notify::new()),
            valid_until: Mutex::new(None),
            registered: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
            pending_release: Mutex::new(Vec::new()),
            admissions: Mutex::new(Vec::new()),
            admit_wake: Arc::new(tokio::sync::Notify::new()),
            sharded,
            releases: Mutex::new(Vec::new()),
            release_wake: Arc::new(tokio::sync::Notify::new()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            hub,
            admit: Script::new(include_str!("admit.lua")),
            reclaim: Script::new(include_str!("reclaim.lua")),
            registry: Script::new(include_str!("registry.lua")),
            read_leases: Script::new(include_str!("leases.lua")),
            revoke: Script::new(include_str!("revoke.lua")),
        });
        tokio::spawn(upkeep(Arc::downgrade(&inner)));
        tokio::spawn(fence(Arc::downgrade(&inner)));
        tokio::spawn(reconcile(
            Arc::downgrade(&inner),
            inner.reconcile_now.clone(),
        ));
        tokio::spawn(admission_batches(
            Arc::downgrade(&inner),
            inner.admit_wake.clone(),
        ));
        tokio::spawn(release_batches(
            Arc::downgrade(&inner),
            inner.release_wake.clone(),
        ));
        Self { inner }
    }

    /// This replica's id in the registry and in slot members.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
    }

    /// The last copy of the registry: when it was read (ms, Redis clock) and every replica's
    /// lease expiry. Kept current by the lease upkeep (every lease/3), so a live replica never
    /// looks expired in it; presence uses it to leave dead replicas' streams out.
    pub fn leases(&self) -> (i64, Vec<(String, i64)>) {
        let l = self.inner.cached_leases();
        (l.read_at, l.expiries)
    }

    /// Reads the registry now (what a destructive step, such as sweeping a dead replica's
    /// presence, must be judged by), with how old (ms) such a read may be when it is used.
    pub async fn fresh_leases(&self) -> Result<(i64, Vec<(String, i64)>, i64), Failure> {
        let l = self.inner.read_registry().await?;
        Ok((l.read_at, l.expiries, self.inner.fresh_for_ms()))
    }
}

impl Inner {
    fn slots_key(&self, sub: &str) -> String {
        slots_key(&self.prefix, sub)
    }

    fn registry_key(&self) -> String {
        registry_key(&self.prefix)
    }

    fn member(&self, stream: u64) -> String {
        format!("{}:{stream}", self.replica)
    }

    fn lease_valid(&self) -> bool {
        !self.needs_reclaim.load(Ordering::Acquire)
            && lock(&self.valid_until).is_some_and(|t| Instant::now() < t)
    }

    fn cached_leases(&self) -> Leases {
        self.leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How old (ms) a registry read may be for others' leases to be judged by it: a live
    /// replica renews every lease/3, so in that time it cannot look expired.
    fn fresh_for_ms(&self) -> i64 {
        (self.lease.as_millis() / 3) as i64
    }

    /// Reads the registry now, with Redis's clock, and keeps the copy.
    async fn read_registry(&self) -> Result<Leases, Failure> {
        let work = async {
            let mut conn = self.pool.get().await?;
            self.read_leases
                .key(self.registry_key())
                .invoke_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(Failure::command("reading the replica registry"))
        };
        let reply = deadline("reading the replica registry", work).await?;
        let read_at = reply
            .first()
            .and_then(int)
            .ok_or_else(|| Failure::Reply("a registry read without Redis's time".into()))?;
        let leases = Leases {
            read_at,
            expiries: pairs(&reply[1..]),
        };
        *self.leases.write().unwrap_or_else(|p| p.into_inner()) = leases.clone();
        Ok(leases)
    }

    async fn admit(&self, sub: &str, stream: u64, issued_at: u64) -> Result<(), LimitError> {
        if !self.lease_valid() {
            return Err(LimitError::Unavailable(
                "this replica's lease in Redis is not current, so per-user limits cannot be checked"
                    .into(),
            ));
        }
        let work = async {
            let mut leases = self.cached_leases();
            let mut fresh = false;
            for _ in 0..3 {
                let codes = self
                    .run_admissions(&[(sub, stream, issued_at)], &leases, fresh)
                    .await?;
                match codes.first() {
                    Some(-1) => {}
                    Some(n) => return Ok::<i64, Failure>(*n),
                    None => {
                        return Err(Failure::Reply("the slot admission answered no code".into()))
                    }
                }
                // A member's replica looks dead or unknown in a copy that may be old: judge it
                // by a fresh read, never by the cache (it may have renewed since).
                leases = self.read_registry().await?;
                fresh = true;
            }
            Err(Failure::Busy(
                "the replica registry kept changing during the admission",
            ))
        };
        match deadline("the slot admission", work).await {
            Ok(code) => self.decision(code),
            Err(e) => Err(LimitError::Unavailable(e.to_string())),
        }
    }

    /// What an admission code of `admit.lua` means.
    fn decision(&self, code: i64) -> Result<(), LimitError> {
        match code {
            0 => Err(LimitError::UserLimit { limit: self.limit }),
            -3 => Err(LimitError::Revoked),
            -2 => {
                // Our lease ran out by Redis's clock (a pause, a partition): stop admitting
                // until the upkeep has renewed it and re-asserted our slots.
                *lock(&self.valid_until) = None;
                Err(LimitError::Unavailable(
                    "this replica's lease in Redis ran out, so per-user limits cannot be checked"
                        .into(),
                ))
            }
            n if n > 0 => Ok(()),
            _ => Err(LimitError::Unavailable(
                "the replica registry kept changing during the admission".into(),
            )),
        }
    }

    /// One call of `admit.lua` for these admissions (sub, stream, token iat), judged by
    /// `leases` (`fresh`: read just now): one code per admission, in order.
    async fn run_admissions(
        &self,
        admissions: &[(&str, u64, u64)],
        leases: &Leases,
        fresh: bool,
    ) -> Result<Vec<i64>, Failure> {
        let mut invocation = self.admit.prepare_invoke();
        for (sub, _, _) in admissions {
            invocation
                .key(self.slots_key(sub))
                .key(revoked_key(&self.prefix, sub));
        }
        invocation
            .arg(self.limit)
            .arg(if fresh { "1" } else { "0" })
            .arg(leases.read_at)
            .arg(self.fresh_for_ms())
            .arg(admissions.len());
        for (_, stream, issued_at) in admissions {
            invocation.arg(self.member(*stream)).arg(*issued_at);
        }
        for (id, expiry) in &leases.expiries {
            invocation.arg(id).arg(*expiry);
        }
        let mut conn = self.pool.get().await?;
        invocation
            .invoke_async::<Vec<i64>>(&mut conn)
            .await
            .map_err(Failure::command("the slot admission"))
    }

    /// Admits a batch in one script call with the cached registry copy: one code per
    /// admission (`-1`: judge that one again alone, with a fresh read).
    async fn admit_batch(&self, batch: &[Admission]) -> Result<Vec<i64>, Failure> {
        let leases = self.cached_leases();
        let admissions: Vec<(&str, u64, u64)> = batch
            .iter()
            .map(|a| (a.sub.as_str(), a.stream, a.issued_at))
            .collect();
        deadline(
            "the slot admission",
            self.run_admissions(&admissions, &leases, false),
        )
        .await
    }

    /// Hands an admission's outcome to its stream: a granted slot is recorded as held, and one
    /// whose stream went away meanwhile is released at once (never leaked).
    fn deliver(&self, a: Admission, result: Result<(), LimitError>) {
        if result.is_ok() {
            lock(&self.held)
                .entry(a.sub.clone())
                .or_default()
                .insert(a.stream);
        }
        if let Err(Ok(())) = a.tx.send(result) {
            self.forget(&a.sub, a.stream);
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            lock(&self.releases).push((a.sub, a.stream));
            self.release_wake.notify_one();
        }
    }

    async fn remove(&self, sub: &str, stream: u64) -> Result<(), Failure> {
        let work = async {
            let mut conn = self.pool.get().await?;
            redis::cmd("ZREM")
                .arg(self.slots_key(sub))
                .arg(self.member(stream))
                .query_async::<i64>(&mut conn)
                .await
                .map_err(Failure::command("ZREM of a slot"))
        };
        deadline("releasing a slot", work).await.map(|_| ())
    }

    /// Removes many slots in one pipeline (one round trip, one reply to read).
    async fn remove_all(&self, slots: &[(String, u64)]) -> Result<(), Failure> {
        let work = async {
            let mut pipe = redis::pipe();
            for (sub, stream) in slots {
                pipe.cmd("ZREM")
                    .arg(self.slots_key(sub))
                    .arg(self.member(*stream))
                    .ignore();
            }
            let mut conn = self.pool.get().await?;
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(Failure::command("ZREM of released slots"))
        };
        deadline("releasing slots", work).await
    }

    fn forget(&self, sub: &str, stream: u64) {
        let mut held = lock(&self.held);
        if let Some(set) = held.get_mut(sub) {
            set.remove(&stream);
            if set.is_empty() {
                held.remove(sub);
            }
        }
    }

    /// Renews the lease; returns whether it had lapsed (or vanished) before this renewal.
    async fn renew(&self) -> Result<bool, Failure> {
        let lease_ms = self.lease.as_millis() as i64;
        let mut invocation = self.registry.key(self.registry_key());
        invocation
            .key(admin_key(&self.prefix))
            .arg(&self.replica)
            .arg(lease_ms)
            .arg(&self.admin_addr);
        let sent = Instant::now();
        let work = async {
            let mut conn = self.pool.get().await?;
            invocation
                .invoke_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(Failure::command("the lease renewal"))
        };
        let reply = deadline("lease renewal", work).await?;
        let (Some(prev), Some(now)) = (reply.first().and_then(int), reply.get(1).and_then(int))
        else {
            return Err(Failure::Reply(
                "a lease renewal without [previous expiry, time]".into(),
            ));
        };
        *self.leases.write().unwrap_or_else(|p| p.into_inner()) = Leases {
            read_at: now,
            expiries: pairs(&reply[2..]),
        };
        // Others see this lease end at Redis-now + lease; keep a margin for the round trip.
        *lock(&self.valid_until) = Some(sent + self.lease.mul_f64(0.9));
        self.registered.store(true, Ordering::Release);
        tracing::debug!(prev, now, "lease registry read");
        Ok(prev < now)
    }

    /// Re-asserts every slot this replica holds, a bounded number of users at a time, each
    /// chunk judged by its own fresh registry read; closes streams that no longer fit.
    async fn reclaim_all(&self) -> Result<(), Failure> {
        use futures_util::stream::StreamExt;
        let snapshot: Vec<(String, Vec<u64>)> = lock(&self.held)
            .iter()
            .map(|(sub, set)| (sub.clone(), set.iter().copied().collect()))
            .collect();
        let mut closed = 0usize;
        let mut kept = 0usize;
        for chunk in snapshot.chunks(RECLAIM_CHUNK) {
            let leases = self.read_registry().await?;
            // Built up front (not in a stream combinator), so the task stays `Send`.
            let calls: Vec<_> = chunk
                .iter()
                .map(|(sub, streams)| self.reclaim_user(sub, streams, &leases))
                .collect();
            let results: Vec<Result<Reclaimed, Failure>> = futures_util::stream::iter(calls)
                .buffer_unordered(RECLAIM_CONCURRENCY)
                .collect()
                .await;
            for result in results {
                let (sub, held, evicted) = result?;
                kept += held - evicted.len();
                for member in evicted {
                    let Some(id) = member
                        .rsplit(':')
                        .next()
                        .and_then(|s| s.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    self.forget(&sub, id);
                    if let Some(stream) = self.hub.stream(id) {
                        stream.kill(CloseReason::UserLimit);
                        closed += 1;
                    }
                }
            }
        }
        if closed > 0 {
            tracing::warn!(
                kept,
                closed,
                "re-asserted this replica's per-user slots (after a lapsed lease, or slots Redis lost) and closed streams over the limit"
            );
        }
        Ok(())
    }

    /// One user's reclaim: (sub, streams sent, members to close).
    async fn reclaim_user(
        &self,
        sub: &str,
        streams: &[u64],
        leases: &Leases,
    ) -> Result<Reclaimed, Failure> {
        let mut invocation = self.reclaim.key(self.slots_key(sub));
        invocation
            .arg(self.limit)
            .arg(&self.replica)
            .arg(leases.read_at)
            .arg(self.fresh_for_ms())
            // Admissions after this may not be in the snapshot yet: they are kept.
            .arg(leases.read_at - 1000)
            .arg(streams.len());
        for s in streams {
            invocation.arg(self.member(*s));
        }
        for (id, expiry) in &leases.expiries {
            invocation.arg(id).arg(*expiry);
        }
        let work = async {
            let mut conn = self.pool.get().await?;
            invocation
                .invoke_async::<Value>(&mut conn)
                .await
                .map_err(Failure::command("re-asserting slots"))
        };
        let reply = deadline("slot reclaim", work).await?;
        match reply {
            Value::Array(members) => Ok((
                sub.to_string(),
                streams.len(),
                members
                    .iter()
                    .filter_map(|m| match m {
                        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                        _ => None,
                    })
                    .collect(),
            )),
            // The registry read grew old while the chunk was sent: the next pass retries.
            _ => Err(Failure::Busy(
                "the registry read was too old to re-assert slots by",
            )),
        }
    }

    async fn flush_pending_releases(&self) {
        use futures_util::stream::StreamExt;
        let pending = std::mem::take(&mut *lock(&self.pending_release));
        let calls: Vec<_> = pending
            .into_iter()
            .map(|(sub, stream)| async move {
                match self.remove(&sub, stream).await {
                    Ok(()) => None,
                    Err(_) => Some((sub, stream)),
                }
            })
            .collect();
        let failed: Vec<(String, u64)> = futures_util::stream::iter(calls)
            .buffer_unordered(RECLAIM_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        lock(&self.pending_release).extend(failed);
    }
}

/// `id, expiry, id, expiry, …` from a script's reply.
fn pairs(values: &[Value]) -> Vec<(String, i64)> {
    let mut out = Vec::with_capacity(values.len() / 2);
    for pair in values.chunks(2) {
        if let [Value::BulkString(id), expiry] = pair {
            if let (Ok(id), Some(expiry)) = (String::from_utf8(id.clone()), int(expiry)) {
                out.push((id, expiry));
            }
        }
    }
    out
}

/// Closes every stream of this replica the moment its lease can no longer be vouched for
/// (local clock, a tenth of a lease before Redis lets the lease pass): other replicas may then
/// give these users' slots to new streams, and a user must never hold more than the limit at
/// once, counted from the clients' side. Streams get `gateway.shutdown` (reason
/// `redis_unavailable`, with `retry:`) and are cut shortly after if they cannot take it.
async fn fence(weak: std::sync::Weak<Inner>) {
    const EVERY: Duration = Duration::from_millis(200);
    let mut acted_on: Option<Option<Instant>> = None;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let until = *lock(&inner.valid_until);
        let now = Instant::now();
        let lapsed = match until {
            Some(t) => now >= t,
            None => inner.registered.load(Ordering::Acquire),
        };
        if lapsed && acted_on != Some(until) {
            acted_on = Some(until);
            inner.close_all_streams();
        }
        let wait = match until {
            Some(t) if t > now => (t - now).min(EVERY),
            _ => EVERY,
        };
        drop(inner);
        tokio::time::sleep(wait).await;
    }
}

impl Inner {
    fn close_all_streams(&self) {
        let streams = self.hub.streams();
        if streams.is_empty() {
            return;
        }
        tracing::warn!(
            streams = streams.len(),
            "this replica could not renew its per-user lease in Redis in time (SSE_GATEWAY_CONNECTION_LEASE_SECS): closing its streams so that no user exceeds the limit while other replicas take their slots; clients reconnect to a ready replica"
        );
        for sub in &streams {
            sub.request_close_lease_lost();
        }
        let grace = self
            .lease
            .mul_f64(0.05)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let hub = self.hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            for sub in streams {
                if hub.stream(sub.id).is_some() {
                    sub.kill(CloseReason::Error);
                }
            }
        });
    }
}

/// Re-asserts this replica's slots after a lapse (woken by the upkeep) and every two leases
/// (slot writes a failover lost are put back), and sends releases that could not reach Redis.
/// Runs apart from the lease renewal, so a long pass never lets the lease lapse again.
async fn reconcile(weak: std::sync::Weak<Inner>, woken: Arc<tokio::sync::Notify>) {
    let period = {
        let Some(inner) = weak.upgrade() else { return };
        (inner.lease * 2).max(Duration::from_secs(1))
    };
    let mut wait = period;
    loop {
        tokio::select! {
            _ = woken.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(inner) = weak.upgrade() else { return };
        wait = period;
        let lapses = inner.lapses.load(Ordering::Acquire);
        match inner.reclaim_all().await {
            Ok(()) => {
                if inner.lapses.load(Ordering::Acquire) == lapses {
                    inner.needs_reclaim.store(false, Ordering::Release);
                }
            }
            Err(e) => {
                tracing::warn!("re-asserting per-user slots failed: {e}; retrying in a second");
                wait = Duration::from_secs(1);
            }
        }
        inner.flush_pending_releases().await;
    }
}

/// Up to `most` of what waits in `queue`, oldest first.
fn next_batch<T>(queue: &Mutex<Vec<T>>, most: usize) -> Vec<T> {
    let mut queue = lock(queue);
    let n = queue.len().min(most);
    queue.drain(..n).collect()
}

/// Admits streams in batches on one server: whatever gathered while the previous batch was on
/// its way goes as one `admit.lua` call (each stream decided in order), so a storm of connects costs Redis a few calls per millisecond and
/// a connect spawns no task of its own. An admission the cached registry cannot judge (`-1`) is
/// decided again alone with a fresh read, as before.
async fn admission_batches(weak: std::sync::Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    const MOST: usize = 256;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let batch = next_batch(&inner.admissions, MOST);
        if batch.is_empty() {
            drop(inner);
            wake.notified().await;
            continue;
        }
        if !inner.lease_valid() {
            for a in batch {
                let _ = a.tx.send(Err(LimitError::Unavailable(
                    "this replica's lease in Redis is not current, so per-user limits cannot be checked"
                        .into(),
                )));
            }
            continue;
        }
        match inner.admit_batch(&batch).await {
            Ok(codes) if codes.len() == batch.len() => {
                for (a, code) in batch.into_iter().zip(codes) {
                    if code == -1 {
                        let inner = inner.clone();
                        tokio::spawn(async move {
                            let result = inner.admit(&a.sub, a.stream, a.issued_at).await;
                            inner.deliver(a, result);
                        });
                    } else {
                        let result = inner.decision(code);
                        inner.deliver(a, result);
                    }
                }
            }
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(_) => "the batch admission answered a code per stream it was not given"
                        .to_string(),
                };
                for a in batch {
                    let _ = a.tx.send(Err(LimitError::Unavailable(why.clone())));
                }
            }
        }
    }
}

/// Sends releases to Redis in batches: whatever gathered while the previous batch was on its
/// way goes as one pipeline (a storm of closes costs a few round trips, not one per stream, and
/// no task per close). A batch that fails is kept for the reconciler to send again.
async fn release_batches(weak: std::sync::Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    const MOST: usize = 1024;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let batch = next_batch(&inner.releases, MOST);
        if batch.is_empty() {
            drop(inner);
            wake.notified().await;
            continue;
        }
        if inner.remove_all(&batch).await.is_err() {
            lock(&inner.pending_release).extend(batch.iter().cloned());
        }
        inner.in_flight.fetch_sub(batch.len(), Ordering::AcqRel);
    }
}

async fn upkeep(weak: std::sync::Weak<Inner>) {
    let period = {
        let Some(inner) = weak.upgrade() else { return };
        (inner.lease / 3).max(Duration::from_millis(200))
    };
    let mut last_warning: Option<Instant> = None;
    // After a failure, try again soon (doubling up to the period): a replica that started
    // before Redis, or lost it, is ready again moments after Redis is back.
    let mut retry = Backoff::new(
        Duration::from_millis(100),
        period.min(Duration::from_secs(1)),
    );
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = weak.upgrade() else { return };
        wait = period;
        let registered_before = inner.registered.load(Ordering::Acquire);
        match inner.renew().await {
            Ok(lapsed) => {
                tracing::debug!(lapsed, registered_before, "lease renewed");
                if lapsed && registered_before {
                    // Others may have taken our slots while we were away: admit nothing until
                    // the reconciler has re-asserted them.
                    inner.lapses.fetch_add(1, Ordering::AcqRel);
                    inner.needs_reclaim.store(true, Ordering::Release);
                    inner.reconcile_now.notify_one();
                }
                retry.reset();
            }
            Err(e) => {
                wait = retry.next_delay();
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        "per-user slot lease renewal failed: {e}; new streams get 503 once the lease (SSE_GATEWAY_CONNECTION_LEASE_SECS) runs out"
                    );
                    last_warning = Some(Instant::now());
                }
            }
        }
    }
}

impl Limiter for RedisLimiter {
    fn acquire(
        &self,
        sub: &str,
        stream: u64,
        issued_at: u64,
    ) -> BoxFuture<'static, Result<(), LimitError>> {
        let inner = self.inner.clone();
        // The admission is decided away from the request (in the batcher, or in its own task on
        // a Cluster): if the client goes away mid-admission, a slot that Redis granted is still
        // recorded and then released, never leaked.
        let (tx, rx) = oneshot::channel();
        let admission = Admission {
            sub: sub.to_string(),
            stream,
            issued_at,
            tx,
        };
        if inner.sharded {
            tokio::spawn(async move {
                let result = inner
                    .admit(&admission.sub, admission.stream, admission.issued_at)
                    .await;
                inner.deliver(admission, result);
            });
        } else {
            lock(&inner.admissions).push(admission);
            inner.admit_wake.notify_one();
        }
        async move {
            rx.await
                .unwrap_or_else(|_| Err(LimitError::Unavailable("the limiter stopped".into())))
        }
        .boxed()
    }

    fn revoke(&self, sub: &str, before: u64) -> BoxFuture<'static, Result<(), LimitError>> {
        let inner = self.inner.clone();
        let key = revoked_key(&inner.prefix, sub);
        async move {
            let mut invocation = inner.revoke.key(key);
            invocation
                .arg(before)
                .arg(REVOCATION_TTL.as_millis() as u64);
            let work = async {
                let mut conn = inner.pool.get().await?;
                invocation
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(Failure::command("recording a revocation"))
            };
            deadline("recording a revocation", work)
                .await
                .map(|_| ())
                .map_err(|e| LimitError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn streams_of(&self, sub: &str) -> BoxFuture<'static, Result<usize, LimitError>> {
        let inner = self.inner.clone();
        let key = slots_key(&inner.prefix, sub);
        async move {
            let work = async {
                let mut conn = inner.pool.get().await?;
                redis::cmd("ZCARD")
                    .arg(&key)
                    .query_async::<usize>(&mut conn)
                    .await
                    .map_err(Failure::command("counting a user's streams"))
            };
            deadline("counting a user's streams", work)
                .await
                .map_err(|e| LimitError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        self.inner.lease_valid()
    }

    fn release(&self, sub: &str, stream: u64) {
        self.inner.forget(sub, stream);
        let inner = &self.inner;
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        lock(&inner.releases).push((sub.to_string(), stream));
        inner.release_wake.notify_one();
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            while inner.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Whatever the batcher did not get to goes with the retries, now.
            let left: Vec<(String, u64)> = std::mem::take(&mut *lock(&inner.releases));
            lock(&inner.pending_release).extend(left);
            let _ = timeout(Duration::from_secs(3), inner.flush_pending_releases()).await;
        }
        .boxed()
    }
}
