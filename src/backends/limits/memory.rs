//! Per-user slots in memory, for single-replica mode.
//!
//! Invariants: one mutex-guarded map from `sub` to its count; an entry exists only while its
//! count is above zero, so the map shrinks back to empty.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{LimitError, Limiter};

/// Exact per-user counting for one process.
pub struct MemoryLimiter {
    limit: u32,
    counts: Mutex<HashMap<String, u32>>,
}

impl MemoryLimiter {
    /// A limiter allowing `limit` streams per user.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl Limiter for MemoryLimiter {
    fn acquire(&self, sub: &str, _stream: u64) -> BoxFuture<'static, Result<(), LimitError>> {
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
