//! Deadlines that hold while a stream's writer is blocked (SPEC §6.2), for streams served by
//! hyper (HTTP/2, and HTTP/1.1 that does not take the lean path).
//!
//! A stream's body only runs when its writer asks for more bytes, and a writer whose HTTP/2
//! window (or socket) is full does not ask. So the token's `exp`, the stream's maximum age and
//! the write-progress deadline cannot live in the body alone: such a stream runs inside a
//! [`Watch`] that races the stream's whole future against them and drops that future when one
//! passes. Dropping is the cut: an HTTP/2 stream is reset (RST_STREAM) and its siblings on the
//! connection live on; a hyper HTTP/1.1 connection closes. The lean HTTP/1.1 path needs no
//! watch: its own write loop races a write that has to wait against the same deadlines
//! (`SseStream::write_deadline`).
//!
//! Invariants:
//! - Every hyper-served stream runs inside exactly one watch: the connection's for HTTP/1.1,
//!   its own for each HTTP/2 stream ([`StreamExecutor`] gives every HTTP/2 stream task a fresh
//!   watch, so the hub's slow-consumer cut resets that stream alone).
//! - The body reports progress each time it is polled; a stream is cut when nothing moved for
//!   `HEARTBEAT + WRITE_TIMEOUT` (an idle healthy stream is polled at least every heartbeat),
//!   or one [`GRACE`] after its hard deadline (the body itself ends the stream politely at the
//!   deadline whenever its writer is not blocked).
//! - No timer per write: progress is an atomic store; the watch's one timer is re-armed only
//!   when it fires or the stream is (dis)armed.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::core::hub::{CloseReason, Subscriber};

/// How long past a hard deadline a blocked writer gets before the stream is cut.
pub const GRACE: Duration = Duration::from_secs(1);

/// When a stream whose writer is blocked must be cut, and why: when it has made no progress by
/// `stalled_at`, or one [`GRACE`] past its hard deadline, whichever comes first. The one rule
/// for the watch and for the lean path's waiting writes.
pub fn cut_at(
    stalled_at: Instant,
    hard: Instant,
    hard_reason: CloseReason,
) -> (Instant, CloseReason) {
    let hard_at = hard + GRACE;
    if stalled_at < hard_at {
        (stalled_at, CloseReason::SlowConsumer)
    } else {
        (hard_at, hard_reason)
    }
}

tokio::task_local! {
    static CURRENT: Arc<Watch>;
}

/// What a watch enforces for the stream it guards.
struct Armed {
    sub: Arc<Subscriber>,
    /// `exp` (+ leeway) or the maximum age, whichever comes first.
    hard: Instant,
    hard_reason: CloseReason,
    /// Longest time without progress.
    stall: Duration,
}

/// The deadlines of the stream (or HTTP/1.1 connection) running inside it.
pub struct Watch {
    /// Cuts what the watch guards; also what the hub cancels for a slow consumer.
    kill: CancellationToken,
    armed: Mutex<Option<Armed>>,
    changed: Notify,
    /// Milliseconds since `epoch` of the last progress.
    progress_ms: AtomicU64,
    epoch: Instant,
}

impl Watch {
    /// A watch whose cut is `kill`.
    pub fn new(kill: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            kill,
            armed: Mutex::new(None),
            changed: Notify::new(),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// The watch the current task runs in, if any.
    pub fn current() -> Option<Arc<Watch>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// The token that cuts what this watch guards.
    pub fn kill_token(&self) -> CancellationToken {
        self.kill.clone()
    }

    /// Runs `fut` under this watch: `None` if a deadline or the kill token ended it first.
    pub async fn guard<F: Future>(self: Arc<Self>, fut: F) -> Option<F::Output> {
        let watched = CURRENT.scope(self.clone(), fut);
        tokio::select! {
            out = watched => Some(out),
            _ = self.kill.cancelled() => None,
            _ = self.expired() => None,
        }
    }

    /// Starts enforcing `sub`'s deadlines.
    pub fn arm(
        &self,
        sub: Arc<Subscriber>,
        hard: Instant,
        hard_reason: CloseReason,
        stall: Duration,
    ) {
        self.progress();
        *self.lock() = Some(Armed {
            sub,
            hard,
            hard_reason,
            stall,
        });
        self.changed.notify_one();
    }

    /// Stops enforcing (the stream ended; an HTTP/1.1 connection may carry another request).
    pub fn disarm(&self) {
        if self.lock().take().is_some() {
            self.changed.notify_one();
        }
    }

    /// The stream moved: bytes were taken or the body was asked for more.
    pub fn progress(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.progress_ms.store(ms, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Armed>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes when a deadline of the armed stream has passed (after recording why).
    async fn expired(&self) {
        loop {
            let next = {
                let armed = self.lock();
                armed.as_ref().map(|a| {
                    let moved = self.epoch
                        + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
                    let (at, reason) = cut_at(moved + a.stall, a.hard, a.hard_reason);
                    (at, reason, a.sub.clone())
                })
            };
            let Some((at, reason, sub)) = next else {
                self.changed.notified().await;
                continue;
            };
            if Instant::now() >= at {
                sub.set_close_reason(reason);
                tracing::debug!(
                    stream = sub.id,
                    reason = reason.label(),
                    "stream cut: its writer was blocked past a deadline"
                );
                return;
            }
            drop(sub);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// Open HTTP/2 streams of one connection, so a connection without any can be closed.
#[derive(Default)]
pub struct ConnStreams {
    open: AtomicUsize,
    started: AtomicU64,
    changed: Notify,
}

impl ConnStreams {
    /// Completes once the connection has had no open stream for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            if self.open.load(Ordering::Acquire) > 0 {
                self.changed.notified().await;
                continue;
            }
            let seen = self.started.load(Ordering::Acquire);
            tokio::time::sleep(idle).await;
            if self.open.load(Ordering::Acquire) == 0
                && self.started.load(Ordering::Acquire) == seen
            {
                return;
            }
        }
    }

    fn enter(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        OpenStream(self.clone())
    }
}

struct OpenStream(Arc<ConnStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// hyper's executor for one connection's HTTP/2 stream tasks: each runs under its own watch
/// (so a slow consumer or a deadline resets that stream alone) and counts as open.
#[derive(Clone, Default)]
pub struct StreamExecutor {
    streams: Arc<ConnStreams>,
}

impl StreamExecutor {
    /// The connection's open streams.
    pub fn streams(&self) -> Arc<ConnStreams> {
        self.streams.clone()
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let open = self.streams.enter();
        let watch = Watch::new(CancellationToken::new());
        // Boxed before it is captured: a future captured by value is kept in the task's state
        // for the task's whole life, beside whatever it is moved into (it doubled the memory
        // of an HTTP/2 stream).
        let fut = Box::pin(fut);
        tokio::spawn(
            async move {
                let _open = open;
                watch.guard(fut).await;
            }
            .in_current_span(),
        );
    }
}
