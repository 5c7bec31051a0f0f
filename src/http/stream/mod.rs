//! The body of one SSE response: queue, heartbeat, token expiry and drain in one small state
//! machine polled by hyper.
//!
//! Invariants:
//! - One timer per stream serves the heartbeat and the token expiry; it is re-armed only when it
//!   fires, never on every write.
//! - Frames already waiting are written together (one buffer, one write) up to a bound.
//! - The [`StreamGuard`] owns the stream's place in the hub: however the body ends — finished,
//!   dropped by hyper on a client reset, or its connection cancelled — its drop removes the
//!   subscriptions, tells the broker which channels emptied, and counts the close once.

pub mod resume;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::backends::broker::Broker;
use crate::backends::limits::Slot;
use crate::backends::presence::Entry;
use crate::core::frame;
use crate::core::hub::{CloseReason, Hub, Queued, Subscriber};
use crate::http::stream::resume::{gap_frame, Fold, Replayer, Tracker};
use crate::http::watchdog::Watch;
use crate::metrics as m;

/// Most frames written in one go.
const MAX_BATCH: usize = 64;
/// A batch stops growing past this many bytes, so one write never holds a slow socket long.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Owns a stream's subscriptions; releasing them is its drop.
pub struct StreamGuard {
    /// The hub's handle on the stream.
    pub sub: Arc<Subscriber>,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    /// The stream's presence entries, removed (leaves) when the guard's fields drop.
    presence: Option<Entry>,
    /// Released after the subscriptions, when the guard's fields drop.
    _slot: Slot,
}

impl StreamGuard {
    /// Registers the stream in the hub; returns the guard and the channels that are new here.
    pub fn subscribe(
        sub: Arc<Subscriber>,
        slot: Slot,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
    ) -> (Self, Vec<String>) {
        let first = hub.subscribe(&sub, &sub.info.channels);
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        (
            Self {
                sub,
                hub,
                broker,
                presence: None,
                _slot: slot,
            },
            first,
        )
    }

    /// Hands the stream's presence entries to the guard: whatever ends the stream removes them.
    pub fn track_presence(&mut self, entry: Entry) {
        self.presence = Some(entry);
    }

    /// The stream's channels.
    pub fn channels(&self) -> &[String] {
        &self.sub.info.channels
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let emptied = self.hub.unsubscribe(self.sub.id, &self.sub.info.channels);
        if !emptied.is_empty() {
            self.broker.released(emptied);
        }
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        let reason = self.sub.close_reason();
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
        tracing::debug!(
            stream = self.sub.id,
            reason = reason.label(),
            "stream closed"
        );
    }
}

/// When a stream must say or do something regardless of traffic.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    /// A comment after this long without a write.
    pub heartbeat: Duration,
    /// The token's `exp` + leeway: `gateway.token-expired`, then the end.
    pub expires_at: Instant,
    /// When to send `gateway.token-expiring` (off when `None`).
    pub warn_at: Option<Instant>,
    /// The stream's maximum age (off when `None`): `gateway.shutdown`, then the end, so that
    /// clients rebalance onto replicas added since they connected.
    pub max_age_at: Option<Instant>,
    /// `SSE_GATEWAY_WRITE_TIMEOUT_SECS`: how long the socket may take no bytes.
    pub write_timeout: Duration,
}

impl Lifetime {
    /// The deadline no backlog may push back, and why the stream ends there.
    fn hard(&self) -> (Instant, CloseReason) {
        match self.max_age_at {
            Some(at) if at < self.expires_at => (at, CloseReason::MaxAge),
            _ => (self.expires_at, CloseReason::TokenExpired),
        }
    }

    fn next(&self, heartbeat_at: Instant) -> Instant {
        [
            Some(heartbeat_at),
            Some(self.expires_at),
            self.warn_at,
            self.max_age_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(heartbeat_at)
    }
}

/// A live SSE response body.
pub struct SseStream {
    pending: Option<Bytes>,
    rx: mpsc::Receiver<Queued>,
    timer: Pin<Box<Sleep>>,
    lifetime: Lifetime,
    last_write: Instant,
    retry_ms: u64,
    done: bool,
    /// The stream's cursor, when history is on.
    tracker: Option<Tracker>,
    /// History pages still to write before live events.
    replayer: Option<Replayer>,
    /// Enforces the deadlines while the writer is blocked (see `watchdog`).
    watch: Option<Arc<Watch>>,
    guard: StreamGuard,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.disarm();
        }
    }
}

impl SseStream {
    /// A stream that first writes `prelude`, then events from `rx`.
    pub fn new(
        guard: StreamGuard,
        rx: mpsc::Receiver<Queued>,
        prelude: Bytes,
        lifetime: Lifetime,
        retry_ms: u64,
        resumed: Option<(Tracker, Option<Replayer>)>,
    ) -> Self {
        let now = Instant::now();
        let (tracker, replayer) = match resumed {
            Some((t, r)) => (Some(t), r),
            None => (None, None),
        };
        let first_deadline = lifetime.next(now + lifetime.heartbeat);
        let watch = Watch::current();
        if let Some(watch) = &watch {
            let (hard, reason) = lifetime.hard();
            watch.arm(
                guard.sub.clone(),
                hard,
                reason,
                lifetime.heartbeat + lifetime.write_timeout,
            );
        }
        Self {
            pending: Some(prelude),
            rx,
            timer: Box::pin(tokio::time::sleep_until(first_deadline)),
            lifetime,
            last_write: now,
            retry_ms,
            done: false,
            tracker,
            replayer,
            watch,
            guard,
        }
    }

    /// For a write that starts waiting at `since`: the moment it must have made progress by
    /// (`SSE_GATEWAY_WRITE_TIMEOUT_SECS` later, or one `GRACE` past the stream's hard deadline,
    /// whichever is first), and the close reason if it has not.
    pub fn write_deadline(&self, since: Instant) -> (Instant, CloseReason) {
        let (hard, reason) = self.lifetime.hard();
        crate::http::watchdog::cut_at(since + self.lifetime.write_timeout, hard, reason)
    }

    /// Records why the stream ends (the first reason recorded wins).
    pub fn close_as(&self, reason: CloseReason) {
        self.guard.sub.set_close_reason(reason);
    }

    /// `retry:` and a control event (`gateway.shutdown`, `gateway.disconnected`): the last
    /// bytes of a stream the gateway closes on purpose.
    fn goodbye(&self, event: &'static str, reason: &str) -> Bytes {
        let mut goodbye = BytesMut::new();
        goodbye.extend_from_slice(format!("retry: {}\n", self.retry_ms).as_bytes());
        goodbye.extend_from_slice(&frame::control(
            event,
            &format!("{{\"reason\":\"{reason}\",\"retry_ms\":{}}}", self.retry_ms),
        ));
        goodbye.freeze()
    }

    fn finish(
        &mut self,
        reason: CloseReason,
        last: Bytes,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.done = true;
        self.guard.sub.set_close_reason(reason);
        Poll::Ready(Some(Ok(Frame::data(last))))
    }

    /// Writes the frames waiting (up to a bound) as one buffer; durable events get the
    /// stream's cursor as their id, and duplicates of what replay already wrote are dropped.
    fn batch(&mut self, first: Queued) -> Option<Bytes> {
        let hot = m::hot();
        hot.latency.record(first.received.elapsed().as_secs_f64());
        if first.durable.is_none() {
            if let Ok(second) = self.rx.try_recv() {
                return self.concat(first, second);
            }
            hot.delivered.increment(1);
            self.guard.sub.record_write(1, first.bytes.len() as u64);
            return Some(first.bytes);
        }
        let mut buf = BytesMut::new();
        let mut count = self.append(&mut buf, first);
        while count < MAX_BATCH && buf.len() < MAX_BATCH_BYTES {
            match self.rx.try_recv() {
                Ok(next) => count += self.append(&mut buf, next),
                Err(_) => break,
            }
        }
        hot.delivered.increment(count as u64);
        self.guard.sub.record_write(count as u64, buf.len() as u64);
        (!buf.is_empty()).then(|| buf.freeze())
    }

    fn concat(&mut self, first: Queued, second: Queued) -> Option<Bytes> {
        let mut buf = BytesMut::with_capacity((first.bytes.len() + second.bytes.len()) * 2);
        let mut count = self.append(&mut buf, first) + self.append(&mut buf, second);
        while count < MAX_BATCH && buf.len() < MAX_BATCH_BYTES {
            match self.rx.try_recv() {
                Ok(next) => count += self.append(&mut buf, next),
                Err(_) => break,
            }
        }
        m::hot().delivered.increment(count as u64);
        self.guard.sub.record_write(count as u64, buf.len() as u64);
        (!buf.is_empty()).then(|| buf.freeze())
    }

    /// Appends one queued frame; returns 1 if it was written, 0 if it was a duplicate.
    fn append(&mut self, buf: &mut BytesMut, q: Queued) -> usize {
        let Some(durable) = q.durable else {
            buf.extend_from_slice(&q.bytes);
            return 1;
        };
        let Some(tracker) = self.tracker.as_mut() else {
            // History is off for this stream: write the event without an id.
            buf.extend_from_slice(&q.bytes);
            if !durable.reset {
                buf.extend_from_slice(b"\n");
            }
            return 1;
        };
        if durable.reset {
            tracker.reset(&durable.channel, &durable.mark);
            buf.extend_from_slice(&q.bytes);
            return 1;
        }
        match tracker.fold(&durable.channel, &durable.mark) {
            Fold::Duplicate => 0,
            Fold::New { gap } => {
                if gap {
                    buf.extend_from_slice(&gap_frame("history_lost"));
                }
                buf.extend_from_slice(&q.bytes);
                buf.extend_from_slice(&tracker.id_line(Some(&durable.single_id)));
                1
            }
        }
    }
}

impl Body for SseStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(watch) = &this.watch {
            watch.progress();
        }
        if let Some(bytes) = this.pending.take() {
            this.guard.sub.record_write(0, bytes.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        this.guard.sub.register_waker(cx.waker());
        if this.guard.sub.shutdown_requested() {
            let (event, why, reason) = this.guard.sub.shutdown_reason();
            let goodbye = this.goodbye(event, why);
            return this.finish(reason, goodbye);
        }
        // Deadlines before data: a backlog never pushes back expiry, maximum age or a
        // heartbeat (SPEC §6.2).
        if let Some(ready) = this.poll_timer(cx) {
            return ready;
        }
        if let (Some(replayer), Some(tracker)) = (this.replayer.as_mut(), this.tracker.as_mut()) {
            match replayer.poll_next(cx, tracker) {
                Poll::Ready(Some((bytes, events))) => {
                    this.last_write = Instant::now();
                    this.guard
                        .sub
                        .record_write(events as u64, bytes.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Poll::Ready(None) => this.replayer = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        while let Poll::Ready(next) = this.rx.poll_recv(cx) {
            // The hub holds the sender until the guard drops, so this is a defensive end.
            let Some(first) = next else {
                this.done = true;
                return Poll::Ready(None);
            };
            if let Some(bytes) = this.batch(first) {
                this.last_write = Instant::now();
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
        }
        Poll::Pending
    }
}

impl SseStream {
    /// Whatever the stream's timer says is due now (expiry, maximum age, the expiry warning, a
    /// heartbeat); `None` when nothing is, with the timer re-armed for the next deadline.
    #[allow(clippy::type_complexity)]
    fn poll_timer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Option<Result<Frame<Bytes>, Infallible>>>> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            let life = self.lifetime;
            if now >= life.expires_at {
                let last =
                    frame::control("gateway.token-expired", "{\"reason\":\"token_expired\"}");
                return Some(self.finish(CloseReason::TokenExpired, last));
            }
            if life.max_age_at.is_some_and(|t| now >= t) {
                let goodbye = self.goodbye("gateway.shutdown", "max_age");
                return Some(self.finish(CloseReason::MaxAge, goodbye));
            }
            if life.warn_at.is_some_and(|t| now >= t) {
                self.lifetime.warn_at = None;
                self.last_write = now;
                let left = life.expires_at.saturating_duration_since(now).as_millis();
                let warning = frame::control(
                    "gateway.token-expiring",
                    &format!("{{\"expires_in_ms\":{left}}}"),
                );
                self.timer
                    .as_mut()
                    .reset(self.lifetime.next(now + life.heartbeat));
                return Some(Poll::Ready(Some(Ok(Frame::data(warning)))));
            }
            let heartbeat_at = self.last_write + life.heartbeat;
            if now >= heartbeat_at {
                self.last_write = now;
                self.timer.as_mut().reset(life.next(now + life.heartbeat));
                return Some(Poll::Ready(Some(Ok(Frame::data(frame::HEARTBEAT)))));
            }
            self.timer.as_mut().reset(life.next(heartbeat_at));
        }
    }
}
