//! Per-user connection limits: how many streams one JWT `sub` may hold across every replica.
//!
//! The contract every limiter keeps (the shared tests in `tests/limits.rs` check both):
//! - `acquire` is exact under concurrency: with a limit of N, any number of simultaneous
//!   attempts for one user admits exactly N (one atomic step per admission);
//! - a refused user never affects another user;
//! - `release` never fails from the caller's view: a slot whose release cannot reach its store
//!   now is released later, and never twice (slots are named by a stream id never reused);
//! - the [`Slot`] guard owns the slot, so every way a stream can end gives it back.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use futures_util::future::BoxFuture;

/// What the Redis limiter keeps to (built by the composition root from `SSE_GATEWAY_*`).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Prefix of every key (`SSE_GATEWAY_CHANNEL_PREFIX`).
    pub prefix: String,
    /// Streams per user across every replica (`SSE_GATEWAY_MAX_CONNECTIONS_PER_USER`).
    pub limit: u32,
    /// How long a replica's slots outlive its last renewal (`SSE_GATEWAY_CONNECTION_LEASE_SECS`).
    pub lease: std::time::Duration,
}

/// Why a slot was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// The user already holds `limit` streams.
    UserLimit {
        /// The configured per-user limit.
        limit: u32,
    },
    /// The store of slots (Redis) cannot be reached, so the limit cannot be enforced.
    Unavailable(String),
    /// The user's tokens issued before a revocation (`POST /disconnect` with `revoke_before`)
    /// are refused, and this one is such a token.
    Revoked,
}

/// How long a revocation is kept: tokens issued before it are refused for this long after it
/// was made, which covers any token lifetime up to it.
pub const REVOCATION_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Where per-user slots are kept.
pub trait Limiter: Send + Sync + 'static {
    /// Takes one of `sub`'s slots for stream `stream`, opened with a token issued at
    /// `issued_at` (unix seconds; 0 for a token without `iat`), in the same step as the check
    /// against `sub`'s revocation.
    fn acquire(
        &self,
        sub: &str,
        stream: u64,
        issued_at: u64,
    ) -> BoxFuture<'static, Result<(), LimitError>>;
    /// Refuses, on every replica and for [`REVOCATION_TTL`], `sub`'s tokens issued before
    /// `before` (unix seconds); a later revocation with an earlier time never undoes it.
    fn revoke(&self, sub: &str, before: u64) -> BoxFuture<'static, Result<(), LimitError>>;
    /// How many streams `sub` holds on every replica, as the store knows it.
    fn streams_of(&self, sub: &str) -> BoxFuture<'static, Result<usize, LimitError>>;
    /// Gives the slot back.
    fn release(&self, sub: &str, stream: u64);
    /// Whether admissions can be decided now (a replica that cannot is not ready).
    fn is_ready(&self) -> bool {
        true
    }
    /// Waits (bounded) until every release so far has reached the store: the last step of a
    /// drain, so that a replica leaving on purpose hands its users' slots back at once.
    fn flush(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Owns one slot; dropping it releases the slot.
pub struct Slot {
    limiter: Arc<dyn Limiter>,
    sub: String,
    stream: u64,
}

impl Slot {
    /// Acquires a slot for a token issued at `issued_at`, or says why not.
    pub async fn acquire(
        limiter: Arc<dyn Limiter>,
        sub: &str,
        stream: u64,
        issued_at: u64,
    ) -> Result<Slot, LimitError> {
        limiter.acquire(sub, stream, issued_at).await?;
        Ok(Slot {
            limiter,
            sub: sub.to_string(),
            stream,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(&self.sub, self.stream);
    }
}
