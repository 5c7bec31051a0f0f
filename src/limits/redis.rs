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
//! - A replica whose lease lapsed (Redis away, the process paused, Redis restarted empty)
//!   re-asserts its slots with `reclaim.lua` on its next renewal: slots other replicas admitted
//!   meanwhile count first, and streams of this replica beyond the limit are closed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::{Script, Value};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

use super::{LimitError, Limiter};
use crate::backend::{Commands as Pool, COMMAND_TIMEOUT};
use crate::hub::{CloseReason, Hub};

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
    /// Every registered replica's lease expiry (ms, Redis clock), from the last renewal.
    leases: RwLock<Vec<(String, i64)>>,
    /// Until when this replica's own lease is known to hold (local clock, with a margin).
    valid_until: Mutex<Option<Instant>>,
    /// Slots this replica holds: sub -> stream ids (ascending = oldest first).
    held: Mutex<HashMap<String, BTreeSet<u64>>>,
    /// Releases that could not reach Redis yet.
    pending_release: Mutex<Vec<(String, u64)>>,
    /// Releases on their way to Redis.
    in_flight: std::sync::atomic::AtomicUsize,
    hub: Arc<Hub>,
    admit: Script,
    reclaim: Script,
    registry: Script,
}

/// A user's slot set (the one place that names it; `inspect` reads it too).
pub fn slots_key(prefix: &str, sub: &str) -> String {
    format!("{prefix}{{u:{sub}}}:slots")
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
        config: &crate::config::Config,
        hub: Arc<Hub>,
        admin_addr: String,
        replica: String,
    ) -> Self {
        let inner = Arc::new(Inner {
            pool,
            prefix: config.channel_prefix.clone(),
            replica,
            limit: config.max_connections_per_user,
            lease: config.connection_lease,
            admin_addr,
            leases: RwLock::new(Vec::new()),
            valid_until: Mutex::new(None),
            held: Mutex::new(HashMap::new()),
            pending_release: Mutex::new(Vec::new()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            hub,
            admit: Script::new(include_str!("admit.lua")),
            reclaim: Script::new(include_str!("reclaim.lua")),
            registry: Script::new(include_str!("registry.lua")),
        });
        tokio::spawn(upkeep(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// This replica's id in the registry and in slot members.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
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
        lock(&self.valid_until).is_some_and(|t| Instant::now() < t)
    }

    fn lease_args(&self) -> Vec<(String, i64)> {
        self.leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn admit(&self, sub: &str, stream: u64) -> Result<(), LimitError> {
        if !self.lease_valid() {
            return Err(LimitError::Unavailable(
                "this replica's lease in Redis is not current, so per-user limits cannot be checked"
                    .into(),
            ));
        }
        let work = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            let mut strict = false;
            loop {
                let mut invocation = self.admit.key(self.slots_key(sub));
                invocation
                    .arg(self.limit)
                    .arg(self.member(stream))
                    .arg(if strict { "1" } else { "0" });
                for (id, expiry) in self.lease_args() {
                    invocation.arg(id).arg(expiry);
                }
                let n = invocation
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if n >= 0 || strict {
                    return Ok::<i64, String>(n);
                }
                // A replica registered after our last read holds a slot of this user: read the
                // registry again rather than take it for dead.
                let fresh: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(self.registry_key())
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                *self.leases.write().unwrap_or_else(|p| p.into_inner()) =
                    fresh.into_iter().map(|(id, e)| (id, e as i64)).collect();
                strict = true;
            }
        };
        match timeout(COMMAND_TIMEOUT, work).await {
            Ok(Ok(0)) => Err(LimitError::UserLimit { limit: self.limit }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(LimitError::Unavailable(format!(
                "Redis refused the slot admission: {e}"
            ))),
            Err(_) => Err(LimitError::Unavailable(
                "Redis did not answer the slot admission in time".into(),
            )),
        }
    }

    async fn remove(&self, sub: &str, stream: u64) -> Result<(), String> {
        let work = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            redis::cmd("ZREM")
                .arg(self.slots_key(sub))
                .arg(self.member(stream))
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        timeout(COMMAND_TIMEOUT, work)
            .await
            .map_err(|_| "timed out".to_string())?
            .map(|_| ())
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
    async fn renew(&self) -> Result<bool, String> {
        let lease_ms = self.lease.as_millis() as i64;
        let mut invocation = self.registry.key(self.registry_key());
        invocation
            .key(admin_key(&self.prefix))
            .arg(&self.replica)
            .arg(lease_ms)
            .arg(&self.admin_addr);
        let sent = Instant::now();
        let work = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            invocation
                .invoke_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        let reply = timeout(COMMAND_TIMEOUT, work)
            .await
            .map_err(|_| "lease renewal timed out".to_string())??;
        let int = |v: &Value| -> Option<i64> {
            match v {
                Value::Int(i) => Some(*i),
                Value::BulkString(b) => std::str::from_utf8(b)
                    .ok()?
                    .parse::<f64>()
                    .ok()
                    .map(|f| f as i64),
                _ => None,
            }
        };
        let (Some(prev), Some(now)) = (reply.first().and_then(int), reply.get(1).and_then(int))
        else {
            return Err("unexpected lease renewal reply".into());
        };
        let mut leases = Vec::with_capacity(reply.len() / 2);
        for pair in reply[2..].chunks(2) {
            if let [Value::BulkString(id), expiry] = pair {
                if let (Ok(id), Some(expiry)) = (String::from_utf8(id.clone()), int(expiry)) {
                    leases.push((id, expiry));
                }
            }
        }
        *self.leases.write().unwrap_or_else(|p| p.into_inner()) = leases;
        // Others see this lease end at Redis-now + lease; keep a margin for the round trip.
        *lock(&self.valid_until) = Some(sent + self.lease.mul_f64(0.9));
        tracing::debug!(prev, now, "lease registry read");
        Ok(prev < now)
    }

    /// Re-asserts every slot this replica holds; closes streams that no longer fit.
    async fn reclaim_all(&self) -> Result<(), String> {
        let snapshot: Vec<(String, Vec<u64>)> = lock(&self.held)
            .iter()
            .map(|(sub, set)| (sub.clone(), set.iter().copied().collect()))
            .collect();
        let leases = self.lease_args();
        let mut closed = 0usize;
        let mut kept = 0usize;
        for (sub, streams) in snapshot {
            let mut invocation = self.reclaim.key(self.slots_key(&sub));
            invocation
                .arg(self.limit)
                .arg(&self.replica)
                .arg(streams.len());
            for s in &streams {
                invocation.arg(self.member(*s));
            }
            for (id, expiry) in &leases {
                invocation.arg(id).arg(*expiry);
            }
            let work = async {
                let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
                invocation
                    .invoke_async::<Vec<String>>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            let evicted = timeout(COMMAND_TIMEOUT, work)
                .await
                .map_err(|_| "slot reclaim timed out".to_string())??;
            kept += streams.len() - evicted.len();
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
        if kept + closed > 0 {
            tracing::warn!(
                kept,
                closed,
                "this replica's lease had lapsed (Redis away, process paused, or Redis restarted empty); re-asserted its per-user slots and closed streams over the limit"
            );
        }
        Ok(())
    }

    async fn flush_pending_releases(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending_release));
        for (i, (sub, stream)) in pending.iter().enumerate() {
            if self.remove(sub, *stream).await.is_err() {
                lock(&self.pending_release).extend_from_slice(&pending[i..]);
                return;
            }
        }
    }
}

async fn upkeep(weak: std::sync::Weak<Inner>) {
    let period = {
        let Some(inner) = weak.upgrade() else { return };
        (inner.lease / 3).max(Duration::from_millis(200))
    };
    let mut registered_once = false;
    let mut last_warning: Option<Instant> = None;
    // After a failure, try again soon (doubling up to the period): a replica that started
    // before Redis, or lost it, is ready again moments after Redis is back.
    let mut retry = Duration::from_millis(100);
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = weak.upgrade() else { return };
        wait = period;
        match inner.renew().await {
            Ok(lapsed) => {
                tracing::debug!(lapsed, registered_once, "lease renewed");
                if lapsed && registered_once {
                    if let Err(e) = inner.reclaim_all().await {
                        tracing::warn!("re-asserting per-user slots failed: {e}; retrying shortly");
                        *lock(&inner.valid_until) = None;
                        wait = retry;
                        retry = (retry * 2).min(period).min(Duration::from_secs(1));
                        continue;
                    }
                }
                registered_once = true;
                retry = Duration::from_millis(100);
                inner.flush_pending_releases().await;
            }
            Err(e) => {
                wait = retry;
                retry = (retry * 2).min(period).min(Duration::from_secs(1));
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
    fn acquire(&self, sub: &str, stream: u64) -> BoxFuture<'static, Result<(), LimitError>> {
        let inner = self.inner.clone();
        let sub = sub.to_string();
        // The admission runs in its own task: if the client goes away mid-admission, a slot
        // that Redis granted is still recorded and then released, never leaked.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = inner.admit(&sub, stream).await;
            if result.is_ok() {
                lock(&inner.held)
                    .entry(sub.clone())
                    .or_default()
                    .insert(stream);
            }
            if let Err(Ok(())) = tx.send(result) {
                inner.forget(&sub, stream);
                if inner.remove(&sub, stream).await.is_err() {
                    lock(&inner.pending_release).push((sub, stream));
                }
            }
        });
        async move {
            rx.await
                .unwrap_or_else(|_| Err(LimitError::Unavailable("the limiter stopped".into())))
        }
        .boxed()
    }

    fn is_ready(&self) -> bool {
        self.inner.lease_valid()
    }

    fn release(&self, sub: &str, stream: u64) {
        self.inner.forget(sub, stream);
        let inner = self.inner.clone();
        let sub = sub.to_string();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                inner.in_flight.fetch_add(1, Ordering::AcqRel);
                handle.spawn(async move {
                    if inner.remove(&sub, stream).await.is_err() {
                        lock(&inner.pending_release).push((sub, stream));
                    }
                    inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Err(_) => lock(&inner.pending_release).push((sub, stream)),
        }
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            while inner.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = timeout(Duration::from_secs(3), inner.flush_pending_releases()).await;
        }
        .boxed()
    }
}
