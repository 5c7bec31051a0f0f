//! Local fan-out: which streams on this replica want which channel.
//!
//! Invariants: the hub is the truth about the channels this replica needs; a channel's entry
//! exists exactly while it has a local subscriber, so the map shrinks back to empty. The maps are
//! sharded and no lock is held across an `.await` or while waiting on a client: delivery is a
//! `try_send` of a shared `Bytes` into each subscriber's bounded queue, and a subscriber whose
//! queue is full is cut off (its whole connection is cancelled) instead of slowing anyone down.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

const SHARDS: usize = 64;

const SHUTDOWN_DRAIN: u8 = 1;
const SHUTDOWN_LEASE_LOST: u8 = 2;
const SHUTDOWN_DISCONNECTED: u8 = 3;

/// One frame waiting in a stream's queue, with when the replica received its event.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The encoded frame, shared by every subscriber (without its end for durable events).
    pub bytes: Bytes,
    /// When this replica received the event.
    pub received: Instant,
    /// Where a durable event sits in its channel's history; `None` for fire-and-forget events.
    pub durable: Option<Arc<Durable>>,
}

/// A durable event's place in history, which each stream folds into its own cursor.
#[derive(Debug)]
pub struct Durable {
    /// The channel.
    pub channel: Arc<str>,
    /// Its epoch and position.
    pub mark: crate::core::position::Mark,
    /// `id:` line and end of the event for a stream on this channel alone.
    pub single_id: Bytes,
    /// The frame is a `gateway.gap` that moves the stream's cursor to `mark` (history was lost
    /// and this is where it stands now), so the change of epoch is announced once, not again
    /// with the next event.
    pub reset: bool,
    /// A `gateway.join`/`gateway.leave`: only streams that asked with `?presence=1` get it.
    pub presence: bool,
}

/// Why a stream ended; the `connections_closed_total` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client went away.
    Client = 0,
    /// The client could not keep up with its events.
    SlowConsumer = 1,
    /// The token's `exp` passed.
    TokenExpired = 2,
    /// The replica is draining.
    Shutdown = 3,
    /// Something failed on the gateway's side.
    Error = 4,
    /// The user's slot could not be kept (this replica's lease lapsed and others filled it).
    UserLimit = 5,
    /// The stream reached `SSE_GATEWAY_MAX_STREAM_SECS`.
    MaxAge = 6,
    /// The user was taken off (`POST /disconnect`).
    Disconnected = 7,
}

impl CloseReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
            CloseReason::UserLimit => "user_limit",
            CloseReason::MaxAge => "max_age",
            CloseReason::Disconnected => "disconnected",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => CloseReason::SlowConsumer,
            2 => CloseReason::TokenExpired,
            3 => CloseReason::Shutdown,
            4 => CloseReason::Error,
            5 => CloseReason::UserLimit,
            6 => CloseReason::MaxAge,
            7 => CloseReason::Disconnected,
            _ => CloseReason::Client,
        }
    }
}

/// What operators see of a stream (`GET /connections`); never a token.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// The HTTP connection the stream rides on (also in every log line about it).
    pub conn_id: u64,
    /// The client's address.
    pub remote: std::net::SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// The token's `sub`.
    pub sub: String,
    /// The stream's channels.
    pub channels: Vec<String>,
    /// When the stream opened.
    pub opened_at: std::time::SystemTime,
    /// Whether the stream asked for joins and leaves (`?presence=1`).
    pub presence: bool,
}

/// The hub's handle on one open stream.
pub struct Subscriber {
    /// Stream id, unique in this process.
    pub id: u64,
    /// Who and what the stream is, for diagnostics and for the hub's bookkeeping.
    pub info: StreamInfo,
    delivered: std::sync::atomic::AtomicU64,
    bytes_sent: std::sync::atomic::AtomicU64,
    tx: mpsc::Sender<Queued>,
    /// Cancels the HTTP connection that carries the stream: a client that does not read is
    /// never polled again, so only dropping its connection frees it.
    connection: CancellationToken,
    reason: AtomicU8,
    /// Set by the drain: the stream should say goodbye and end.
    shutdown: AtomicU8,
    waker: AtomicWaker,
}

impl Subscriber {
    /// Creates a subscriber and the receiving end of its queue.
    pub fn new(
        id: u64,
        queue: usize,
        connection: CancellationToken,
        info: StreamInfo,
    ) -> (Arc<Self>, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(queue);
        let sub = Arc::new(Self {
            id,
            info,
            delivered: Default::default(),
            bytes_sent: Default::default(),
            tx,
            connection,
            reason: AtomicU8::new(CloseReason::Client as u8),
            shutdown: AtomicU8::new(0),
            waker: AtomicWaker::new(),
        });
        (sub, rx)
    }

    /// Counts what the stream wrote (events, bytes), for diagnostics.
    pub fn record_write(&self, events: u64, bytes: u64) {
        self.delivered.fetch_add(events, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Events and bytes written so far.
    pub fn written(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.bytes_sent.load(Ordering::Relaxed),
        )
    }

    /// Frames waiting in the stream's queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Why the stream ended (or will end); `Client` unless something else was recorded.
    pub fn close_reason(&self) -> CloseReason {
        CloseReason::from_u8(self.reason.load(Ordering::Acquire))
    }

    /// Records why the stream ends; the first reason recorded wins.
    pub fn set_close_reason(&self, reason: CloseReason) {
        let _ = self.reason.compare_exchange(
            CloseReason::Client as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Registers the stream's task to be woken by [`Subscriber::request_shutdown`].
    pub fn register_waker(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Whether the drain (or the loss of this replica's lease) asked this stream to end.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire) != 0
    }

    /// Why the stream was asked to end: the control event it says goodbye with, that event's
    /// `reason`, and the `connections_closed_total` reason.
    pub fn shutdown_reason(&self) -> (&'static str, &'static str, CloseReason) {
        match self.shutdown.load(Ordering::Acquire) {
            SHUTDOWN_LEASE_LOST => ("gateway.shutdown", "redis_unavailable", CloseReason::Error),
            SHUTDOWN_DISCONNECTED => (
                "gateway.disconnected",
                "disconnected",
                CloseReason::Disconnected,
            ),
            _ => ("gateway.shutdown", "shutdown", CloseReason::Shutdown),
        }
    }

    /// Asks the stream to send `gateway.disconnected` and end: its user was taken off.
    pub fn request_disconnect(&self) {
        self.shutdown
            .store(SHUTDOWN_DISCONNECTED, Ordering::Release);
        self.waker.wake();
    }

    /// Asks the stream to send `gateway.shutdown` and end.
    pub fn request_shutdown(&self) {
        self.shutdown.store(SHUTDOWN_DRAIN, Ordering::Release);
        self.waker.wake();
    }

    /// Asks the stream to end because this replica lost its per-user lease (Redis out of
    /// reach for a lease): its slot may be given to a stream elsewhere.
    pub fn request_close_lease_lost(&self) {
        self.shutdown.store(SHUTDOWN_LEASE_LOST, Ordering::Release);
        self.waker.wake();
    }

    /// Drops the stream's connection at once (used when it cannot be reached politely).
    pub fn kill(&self, reason: CloseReason) {
        self.set_close_reason(reason);
        self.connection.cancel();
    }

    fn offer(&self, frame: &Queued) -> bool {
        match self.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kill(CloseReason::SlowConsumer);
                false
            }
            // The stream is already gone; its guard is removing it from the hub.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

type Shard<V> = Mutex<HashMap<Arc<str>, V>>;
type StreamShard = Mutex<HashMap<u64, Arc<Subscriber>>>;

/// Channel -> local subscribers, plus the registry of open streams.
pub struct Hub {
    hasher: RandomState,
    channels: Box<[Shard<Vec<Arc<Subscriber>>>]>,
    streams: Box<[StreamShard]>,
    channel_count: AtomicUsize,
    stream_count: AtomicUsize,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave the map half-updated in a way that
    // matters more than losing the replica; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            channels: (0..SHARDS).map(|_| Mutex::default()).collect(),
            streams: (0..SHARDS).map(|_| Mutex::default()).collect(),
            channel_count: AtomicUsize::new(0),
            stream_count: AtomicUsize::new(0),
        }
    }

    fn shard(&self, channel: &str) -> &Shard<Vec<Arc<Subscriber>>> {
        &self.channels[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    fn stream_shard(&self, id: u64) -> &StreamShard {
        &self.streams[(id as usize) % SHARDS]
    }

    /// Adds a stream to its channels; returns the channels that had no local subscriber before.
    pub fn subscribe(&self, sub: &Arc<Subscriber>, channels: &[String]) -> Vec<String> {
        if lock(self.stream_shard(sub.id))
            .insert(sub.id, sub.clone())
            .is_none()
        {
            self.stream_count.fetch_add(1, Ordering::Relaxed);
        }
        let mut first = Vec::new();
        for channel in channels {
            let mut shard = lock(self.shard(channel));
            match shard.get_mut(channel.as_str()) {
                Some(list) => list.push(sub.clone()),
                None => {
                    shard.insert(Arc::from(channel.as_str()), vec![sub.clone()]);
                    self.channel_count.fetch_add(1, Ordering::Relaxed);
                    first.push(channel.clone());
                }
            }
        }
        first
    }

    /// Removes a stream from its channels; returns the channels left with no local subscriber.
    pub fn unsubscribe(&self, id: u64, channels: &[String]) -> Vec<String> {
        if lock(self.stream_shard(id)).remove(&id).is_some() {
            self.stream_count.fetch_sub(1, Ordering::Relaxed);
        }
        let mut emptied = Vec::new();
        for channel in channels {
            let mut shard = lock(self.shard(channel));
            let Some(list) = shard.get_mut(channel.as_str()) else {
                continue;
            };
            if let Some(pos) = list.iter().position(|s| s.id == id) {
                list.swap_remove(pos);
            }
            if list.is_empty() {
                shard.remove(channel.as_str());
                self.channel_count.fetch_sub(1, Ordering::Relaxed);
                emptied.push(channel.clone());
            } else if list.capacity() > 64 && list.len() < list.capacity() / 4 {
                list.shrink_to(list.len() * 2);
            }
        }
        emptied
    }

    /// Hands a control frame to every local subscriber of `channel` (e.g. `gateway.gap`).
    pub fn deliver_control(&self, channel: &str, bytes: Bytes) -> usize {
        self.deliver(
            channel,
            &Queued {
                bytes,
                received: Instant::now(),
                durable: None,
            },
        )
    }

    /// Hands a frame to every local subscriber of `channel`; returns how many took it.
    pub fn deliver(&self, channel: &str, frame: &Queued) -> usize {
        let shard = lock(self.shard(channel));
        let Some(list) = shard.get(channel) else {
            return 0;
        };
        let mut delivered = 0;
        let mut slow = 0u64;
        let presence = frame.durable.as_ref().is_some_and(|d| d.presence);
        for sub in list {
            if presence && !sub.info.presence {
                continue;
            }
            if sub.offer(frame) {
                delivered += 1;
            } else if sub.close_reason() == CloseReason::SlowConsumer {
                slow += 1;
            }
        }
        drop(shard);
        if slow > 0 {
            metrics::counter!(m::EVENTS_DROPPED, "reason" => "slow_consumer").increment(slow);
        }
        delivered
    }

    /// Whether any local stream wants `channel`.
    pub fn has_channel(&self, channel: &str) -> bool {
        lock(self.shard(channel)).contains_key(channel)
    }

    /// Channels with their local subscriber counts (for diagnostics).
    pub fn channel_counts(&self) -> Vec<(String, usize)> {
        let mut all = Vec::with_capacity(self.channel_count());
        for shard in self.channels.iter() {
            all.extend(lock(shard).iter().map(|(k, v)| (k.to_string(), v.len())));
        }
        all
    }

    /// Every channel with a local subscriber (for resubscribing after a reconnect).
    pub fn channels(&self) -> Vec<String> {
        let mut all = Vec::with_capacity(self.channel_count());
        for shard in self.channels.iter() {
            all.extend(lock(shard).keys().map(|k| k.to_string()));
        }
        all
    }

    /// Number of channels with a local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channel_count.load(Ordering::Relaxed)
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.stream_count.load(Ordering::Relaxed)
    }

    /// The open stream with this id, if any.
    pub fn stream(&self, id: u64) -> Option<Arc<Subscriber>> {
        lock(self.stream_shard(id)).get(&id).cloned()
    }

    /// The open streams of user `sub` (to take them off).
    pub fn streams_of(&self, sub: &str) -> Vec<Arc<Subscriber>> {
        self.streams()
            .into_iter()
            .filter(|s| s.info.sub == sub)
            .collect()
    }

    /// A snapshot of every open stream (for the drain).
    pub fn streams(&self) -> Vec<Arc<Subscriber>> {
        let mut all = Vec::with_capacity(self.stream_count());
        for shard in self.streams.iter() {
            all.extend(lock(shard).values().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StreamInfo {
        StreamInfo {
            conn_id: 1,
            remote: "127.0.0.1:1".parse().unwrap(),
            protocol: "HTTP/1.1",
            sub: "u".into(),
            channels: vec![],
            opened_at: std::time::SystemTime::now(),
            presence: false,
        }
    }

    fn frame(s: &'static str) -> Queued {
        Queued {
            bytes: Bytes::from_static(s.as_bytes()),
            received: Instant::now(),
            durable: None,
        }
    }

    #[tokio::test]
    async fn fan_out_and_shrink() {
        let hub = Hub::new();
        let (a, mut ra) = Subscriber::new(1, 8, CancellationToken::new(), info());
        let (b, mut rb) = Subscriber::new(2, 8, CancellationToken::new(), info());
        let chans = vec!["x".to_string(), "y".to_string()];
        assert_eq!(hub.subscribe(&a, &chans), chans);
        assert!(hub.subscribe(&b, &chans[..1]).is_empty());
        assert_eq!(hub.deliver("x", &frame("1")), 2);
        assert_eq!(hub.deliver("y", &frame("2")), 1);
        assert_eq!(hub.deliver("z", &frame("3")), 0);
        assert_eq!(&ra.recv().await.unwrap().bytes[..], b"1");
        assert_eq!(&ra.recv().await.unwrap().bytes[..], b"2");
        assert_eq!(&rb.recv().await.unwrap().bytes[..], b"1");
        assert!(hub.unsubscribe(1, &chans) == vec!["y".to_string()]);
        assert_eq!(hub.unsubscribe(2, &chans[..1]), vec!["x".to_string()]);
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(hub.stream_count(), 0);
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_subscriber_off() {
        let hub = Hub::new();
        let conn = CancellationToken::new();
        let (a, _ra) = Subscriber::new(1, 2, conn.clone(), info());
        hub.subscribe(&a, &["x".to_string()]);
        assert_eq!(hub.deliver("x", &frame("1")), 1);
        assert_eq!(hub.deliver("x", &frame("2")), 1);
        assert!(!conn.is_cancelled());
        assert_eq!(hub.deliver("x", &frame("3")), 0);
        assert!(conn.is_cancelled());
        assert_eq!(a.close_reason(), CloseReason::SlowConsumer);
    }
}
