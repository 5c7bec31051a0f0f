//! Per-user slots in memory, for single-replica mode.
//!
//! Invariants: one mutex-guarded map from `sub` to its count; an entry exists only while its
//! count is above zero, so the map shrinks back to empty. Revocations expire after
//! `REVOCATION_TTL` and are swept when a new one is made, so they are bounded by their rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{LimitError, Limiter, REVOCATION_TTL};

/// Exact per-user counting for one process.
pub struct MemoryLimiter {
    limit: u32,
    counts: Mutex<HashMap<String, u32>>,
    /// `sub` -> (tokens issued before this are refused, until when).
    revoked: Mutex<HashMap<String, (u64, Instant)>>,
}

impl MemoryLimiter {
    /// A limiter allowing `limit` streams per user.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            counts: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
        }
    }
}

impl Limiter for MemoryLimiter {
    fn acquire(
        &self,
        sub: &str,
        _stream: u64,
        issued_at: u64,
    ) -> BoxFuture<'static, Result<(), LimitError>> {
        let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((before, until)) = revoked.get(sub) {
            if issued_at < *before && Instant::now() < *until {
                return future::ready(Err(LimitError::Revoked)).boxed();
            }
        }
        drop(revoked);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(sub.to_string()).or_insert(0);
        let result = if *count >= self.limit {
            Err(LimitError::UserLimit { limit: self.limit })
        } else {
            *count += 1;
            Ok(())
        };
        if *count == 0 {
            counts.remove(sub);
        }
        future::ready(result).boxed()
    }

    fn revoke(&self, sub: &str, before: u64) -> BoxFuture<'static, Result<(), LimitError>> {
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        revoked.retain(|_, (_, until)| *until > now);
        let entry = revoked.entry(sub.to_string()).or_insert((0, now));
        *entry = (entry.0.max(before), now + REVOCATION_TTL);
        future::ready(Ok(())).boxed()
    }

    fn streams_of(&self, sub: &str) -> BoxFuture<'static, Result<usize, LimitError>> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        future::ready(Ok(counts.get(sub).copied().unwrap_or(0) as usize)).boxed()
    }

    fn release(&self, sub: &str, _stream: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(sub) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(sub);
            }
        }
    }
}
