//! The Redis broker: one dedicated pub/sub connection, commands through a pool.
//!
//! Invariants:
//! - One task (the manager) owns the pub/sub connection's sink and the set of channels Redis
//!   has confirmed; requests queue up while a (UN)SUBSCRIBE is in flight and go out together as
//!   the next batch, so a thousand clients arriving at once cost a handful of round trips.
//! - A separate reader task drains the pub/sub stream into the hub and never waits on a client.
//! - Unsubscribing waits a grace period and re-checks the hub, so a flapping client does not
//!   churn Redis, and a channel that found a new subscriber meanwhile stays subscribed.
//! - Any failure (stream ended, command error, or a probe published through the command connection
//!   that does not come back on the subscription) is an outage: not ready, reconnect with capped
//!   jittered backoff, resubscribe everything the hub holds in batches, then ready again.
//! - No catch-all pattern subscription is ever made.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{Broker, BrokerError, BrokerSettings};
use crate::backends::history::redis::{Library, RedisHistory, LIBRARY_VERSION};
use crate::backends::history::HistoryError;
use crate::backends::history::{History, PAGE, PAGE_BYTES};
use crate::backends::redis::{deadline, Commands as Pool, Failure, Topology};
use crate::core::backoff::Backoff;
use crate::core::position::Incoming::{Durable, Forged, Plain};
use crate::core::position::{
    decode_durable, encode_durable, DurableKey, Mark, Position, ANY_EPOCH,
};
use crate::core::sink::EventSink;
use crate::metrics as m;

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const BATCH: usize = 1000;
/// How long a channel stays subscribed after its last local subscriber left.
const UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Shortest time between two looks at the library after messages that did not verify.
const LIBRARY_CHECK_EVERY: Duration = Duration::from_secs(5);

enum Request {
    Subscribe(Vec<String>, oneshot::Sender<Result<(), BrokerError>>),
    Released(Vec<String>),
}

/// Multi-replica broker over Redis pub/sub.
pub struct RedisBroker {
    requests: mpsc::UnboundedSender<Request>,
    ready: Arc<AtomicBool>,
    pool: Pool,
    prefix: String,
    publish_command: &'static str,
    /// The key of the current session: it signs the users this replica takes off.
    key: SessionKey,
}

/// The durable-event key of the broker's current session (none before the first, or when no
/// history library is installed anywhere).
type SessionKey = Arc<Mutex<Option<DurableKey>>>;

struct Manager {
    topology: Topology,
    pool: Pool,
    key: SessionKey,
    sink: Arc<dyn EventSink>,
    prefix: String,
    probe_channel: String,
    probe_every: Duration,
    /// `PUBLISH`, or `SPUBLISH` on a cluster.
    publish_command: &'static str,
    history: Option<RedisHistory>,
    /// The durable-publish library, whose key verifies durable events.
    library: Library,
    /// Last durable event seen live per channel: where to fill from after an outage.
    last_seen: Arc<Mutex<HashMap<String, Mark>>>,
    /// When a message last arrived (unix ms): where to fill from for channels with no mark.
    last_contact_ms: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    requests: mpsc::UnboundedReceiver<Request>,
}

/// Why a connected session ended (each is logged once, then the broker reconnects).
#[derive(Debug, thiserror::Error)]
enum Outage {
    /// Redis failed or stopped answering.
    #[error(transparent)]
    Redis(#[from] Failure),
    /// The durable-publish library could not be loaded or read.
    #[error("the durable-publish function: {0}")]
    Library(#[from] HistoryError),
    /// The pub/sub connection ended.
    #[error("the pub/sub connection closed")]
    Closed,
    /// A probe published on this replica's channel did not come back in time.
    #[error("the subscription stopped delivering (probe {probe} not back after {after:?})")]
    ProbeLost { probe: u64, after: Duration },
    /// Redis counts no subscriber on a probe channel this replica subscribed to.
    #[error("Redis reports no subscriber on this replica's probe channel {0:?}")]
    ProbeUnheard(String),
    /// Durable events arrive signed with another key.
    #[error("the durable-publish library changed; resynchronising from history")]
    LibraryChanged,
    /// Redis dropped a shard channel's subscription (its slot moved).
    #[error("Redis dropped the subscription of shard channel {0:?} (its slot moved)")]
    ShardMoved(String),
    /// The topology gave nothing to subscribe on.
    #[error("{0}")]
    NoMaster(&'static str),
}

impl RedisBroker {
    /// Starts the manager; the replica is not ready until the first connection is subscribed.
    pub fn start(
        settings: &BrokerSettings,
        sink: Arc<dyn EventSink>,
        pool: Pool,
        history: Option<RedisHistory>,
        library: Library,
    ) -> Result<Self, String> {
        let topology = pool.topology().clone();
        let publish_command = topology.publish_command();
        let (tx, rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let replica: u64 = rand::random();
        let key: SessionKey = Arc::default();
        let manager = Manager {
            key: key.clone(),
            topology,
            publish_command,
            pool: pool.clone(),
            sink,
            prefix: settings.prefix.clone(),
            probe_channel: format!("{}{{gateway}}:probe:{replica:016x}", settings.prefix),
            probe_every: settings.probe_every,
            history,
            library,
            last_seen: Arc::new(Mutex::new(HashMap::new())),
            last_contact_ms: Arc::new(AtomicU64::new(0)),
            ready: ready.clone(),
            requests: rx,
        };
        metrics::gauge!(m::REDIS_CONNECTED).set(0.0);
        tokio::spawn(manager.run());
        Ok(Self {
            requests: tx,
            ready,
            pool,
            prefix: settings.prefix.clone(),
            publish_command,
            key,
        })
    }
}

impl Broker for RedisBroker {
    fn ensure_subscribed(
        &self,
        channels: Vec<String>,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(Request::Subscribe(channels, tx));
        async move {
            sent.map_err(|_| BrokerError::Stopped)?;
            rx.await.unwrap_or(Err(BrokerError::Stopped))
        }
        .boxed()
    }

    fn released(&self, channels: Vec<String>) {
        let _ = self.requests.send(Request::Released(channels));
    }

    fn publish(
        &self,
        channel: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let sent = publish_raw(
            self.pool.clone(),
            self.publish_command,
            format!("{}{}", self.prefix, channel),
            payload,
        );
        async move { sent.await.map(|_| ()).map_err(BrokerError::from) }.boxed()
    }

    fn disconnect(&self, sub: String) -> BoxFuture<'static, Result<(), BrokerError>> {
        let channel = disconnect_channel(&self.prefix);
        // Signed like a durable event, so a raw PUBLISH cannot take users off; unsigned only
        // where no replica has a key to check it with (no history library anywhere).
        let payload = match &*lock(&self.key) {
            Some(key) => Bytes::from(encode_durable(
                key,
                &channel,
                DISCONNECT_EPOCH,
                Position::default(),
                sub.as_bytes(),
            )),
            None => Bytes::from(sub),
        };
        let sent = publish_raw(self.pool.clone(), self.publish_command, channel, payload);
        async move { sent.await.map(|_| ()).map_err(BrokerError::from) }.boxed()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What a signed disconnect carries where a durable event carries its epoch.
const DISCONNECT_EPOCH: &str = "disconnect";

/// The channel every replica listens to for users to take off (`POST /disconnect`); its hash
/// tag puts it beside the replica registry on a cluster.
pub fn disconnect_channel(prefix: &str) -> String {
    format!("{prefix}{{gateway}}:disconnect")
}

impl Manager {
    async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX).jittered();
        let mut connected_before = false;
        loop {
            match self.connect_and_serve(&mut connected_before).await {
                Ok(()) => return, // every broker handle is gone: the process is stopping
                Err(why) => {
                    self.ready.store(false, Ordering::Release);
                    metrics::gauge!(m::REDIS_CONNECTED).set(0.0);
                    let wait = backoff.next_delay();
                    tracing::warn!(
                        retry_in_ms = wait.as_millis() as u64,
                        "Redis pub/sub unavailable: {why}; open streams stay open (for up to 0.9 of SSE_GATEWAY_CONNECTION_LEASE_SECS), new ones get 503 until it is back (check SSE_GATEWAY_REDIS_URL and Redis health)"
                    );
                    let deadline = tokio::time::Instant::now() + wait;
                    // Meanwhile, refuse subscriptions at once instead of letting clients hang.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => break,
                            req = self.requests.recv() => match req {
                                None => return,
                                Some(Request::Subscribe(_, reply)) => {
                                    let _ = reply.send(Err(BrokerError::Reconnecting));
                                }
                                Some(Request::Released(_)) => {}
                            }
                        }
                    }
                }
            }
            if self.ready.load(Ordering::Acquire) {
                backoff.reset();
            }
        }
    }

    /// One connected session: returns `Ok` only when the broker is dropped.
    async fn connect_and_serve(&mut self, connected_before: &mut bool) -> Result<(), Outage> {
        let (mut sink, source) = match &self.topology {
            Topology::Cluster(cluster) => {
                let (conn, pushes) = crate::backends::redis::sharded_pubsub(cluster).await?;
                (Sink::Sharded(conn), Source::Sharded(pushes))
            }
            topology => {
                let client = topology
                    .master()
                    .await?
                    .ok_or(Outage::NoMaster("no master to subscribe on"))?;
                let pubsub = deadline("connecting for pub/sub", async {
                    client
                        .get_async_pubsub()
                        .await
                        .map_err(|e| Failure::Unreachable(e.to_string()))
                })
                .await?;
                let (sink, stream) = pubsub.split();
                (Sink::Classic(sink), Source::Classic(stream))
            }
        };
        // The key that verifies durable events: the library's, loaded first if this replica
        // writes history; read only (if any) if it does not.
        let key = if self.history.is_some() {
            Some(self.library.ensure().await?)
        } else {
            self.library.installed().await?.map(|(_, key)| key)
        };
        lock(&self.key).clone_from(&key);
        // Probes carry a nonce of this session, so that nothing published by others can
        // answer (or switch off) the probe.
        let nonce = format!("{:016x}", rand::random::<u64>());
        let probe_sent_shared = Arc::new(AtomicU64::new(0));
        // Messages that look durable but do not verify: the library may have changed under us.
        let (suspect_tx, mut suspect_rx) = mpsc::channel::<()>(1);
        // One probe channel per master on a cluster, so a shard whose subscription went quiet
        // (a master that stopped answering and was replaced) is caught too.
        let probes = match &self.topology {
            Topology::Cluster(_) => self.probe_channels_per_master().await?,
            _ => vec![self.probe_channel.clone()],
        };
        let probe_seen: Arc<HashMap<String, AtomicU64>> = Arc::new(
            probes
                .iter()
                .map(|p| (p.clone(), AtomicU64::new(0)))
                .collect(),
        );
        let (reader_done_tx, mut reader_done) = oneshot::channel::<()>();
        // Shard channels Redis dropped on its own (their slot moved): resubscribe.
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<String>();
        // Live messages wait (in the connection's buffer) until the gap of the outage has been
        // filled from history: an event written live before the older missed ones would move
        // the streams' cursors past them, and they would be dropped as duplicates.
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let reader = {
            let incoming = Incoming {
                sink: self.sink.clone(),
                prefix: self.prefix.clone(),
                disconnect: disconnect_channel(&self.prefix),
                probe_seen: probe_seen.clone(),
                probe_nonce: nonce.clone(),
                probe_sent: probe_sent_shared.clone(),
                key: key.clone(),
                suspect: suspect_tx,
                last_seen: self.last_seen.clone(),
                last_contact: self.last_contact_ms.clone(),
            };
            tokio::spawn(async move {
                if go_rx.await.is_err() {
                    return;
                }
                match source {
                    Source::Classic(mut stream) => {
                        while let Some(msg) = stream.next().await {
                            incoming.message(msg.get_channel_name(), msg.get_payload_bytes());
                        }
                    }
                    Source::Sharded(mut pushes) => {
                        while let Some(push) = pushes.recv().await {
                            match push.kind {
                                redis::PushKind::SMessage => {
                                    if let Some((name, payload)) = shard_message(&push.data) {
                                        incoming.message(&name, payload);
                                    }
                                }
                                redis::PushKind::SUnsubscribe => {
                                    if let Some(name) = push.data.first().and_then(bulk) {
                                        let _ = lost_tx
                                            .send(String::from_utf8_lossy(name).into_owned());
                                    }
                                }
                                // A node connection dropped: the session is over.
                                redis::PushKind::Disconnection => break,
                                _ => {}
                            }
                        }
                    }
                }
                let _ = reader_done_tx.send(());
            })
        };
        let _abort_reader = AbortOnDrop(reader);

        // Resubscribe everything the hub holds, in batches, before reporting ready.
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut control = probes.clone();
        control.push(disconnect_channel(&self.prefix));
        sink.subscribe(control).await?;
        let wanted = self.sink.channels();
        for batch in wanted.chunks(BATCH) {
            let names = batch.iter().map(|c| self.name(c)).collect();
            sink.subscribe(names).await?;
            subscribed.extend(batch.iter().cloned());
        }
        metrics::gauge!(m::SUBSCRIBED_CHANNELS).set(subscribed.len() as f64);
        self.ready.store(true, Ordering::Release);
        metrics::gauge!(m::REDIS_CONNECTED).set(1.0);
        if *connected_before {
            metrics::counter!(m::REDIS_RECONNECTS).increment(1);
            tracing::info!(
                channels = subscribed.len(),
                "Redis pub/sub reconnected and resubscribed"
            );
            self.fill_after_outage(&wanted).await;
            let _ = go_tx.send(());
        } else {
            tracing::info!("Redis pub/sub connected");
            let _ = go_tx.send(());
        }
        *connected_before = true;

        let mut pending_unsubscribe: HashMap<String, Instant> = HashMap::new();
        let mut unsubscribe_tick = tokio::time::interval(UNSUBSCRIBE_GRACE / 4);
        let mut probe_tick = tokio::time::interval(self.probe_every);
        let mut probe_sent: u64 = 0;
        let mut probe_sent_at = Instant::now();
        let mut checked_library_at: Option<Instant> = None;
        // Probes are published in the background: a command that hangs (Redis partitioned
        // away) must not hold this loop; a probe not back by the next tick is the verdict.
        let (probe_failed_tx, mut probe_failed) = mpsc::unbounded_channel::<Outage>();
        loop {
            tokio::select! {
                req = self.requests.recv() => {
                    let Some(first) = req else { return Ok(()) };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match self.requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    self.handle(batch, &mut sink, &mut subscribed, &mut pending_unsubscribe).await?;
                }
                _ = unsubscribe_tick.tick() => {
                    let now = Instant::now();
                    let due: Vec<String> = pending_unsubscribe
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(c, _)| c.clone())
                        .collect();
                    let mut gone = Vec::new();
                    for c in due {
                        pending_unsubscribe.remove(&c);
                        if !self.sink.has_channel(&c) && subscribed.remove(&c) {
                            // No local stream needs this channel's history mark any more.
                            lock(&self.last_seen).remove(&c);
                            gone.push(c);
                        }
                    }
                    for batch in gone.chunks(BATCH) {
                        let names: Vec<String> = batch.iter().map(|c| self.name(c)).collect();
                        sink.unsubscribe(names).await?;
                    }
                    if pending_unsubscribe.is_empty() {
                        pending_unsubscribe.shrink_to_fit();
                    }
                    metrics::gauge!(m::SUBSCRIBED_CHANNELS).set(subscribed.len() as f64);
                }
                _ = probe_tick.tick() => {
                    let seen = probe_seen
                        .values()
                        .map(|s| s.load(Ordering::Acquire))
                        .min()
                        .unwrap_or(0);
                    if probe_sent > seen && probe_sent_at.elapsed() >= self.probe_every.mul_f64(0.9) {
                        return Err(Outage::ProbeLost {
                            probe: probe_sent,
                            after: probe_sent_at.elapsed(),
                        });
                    }
                    if probe_sent == seen {
                        probe_sent += 1;
                        probe_sent_shared.store(probe_sent, Ordering::Release);
                        probe_sent_at = Instant::now();
                        for channel in &probes {
                            let send = publish_raw(
                                self.pool.clone(),
                                self.publish_command,
                                channel.clone(),
                                Bytes::from(format!("{nonce}:{probe_sent}")),
                            );
                            let failed = probe_failed_tx.clone();
                            let channel = channel.clone();
                            tokio::spawn(async move {
                                let why = match send.await {
                                    Ok(0) => Outage::ProbeUnheard(channel),
                                    Ok(_) => return,
                                    Err(e) => Outage::Redis(e),
                                };
                                let _ = failed.send(why);
                            });
                        }
                    }
                }
                _ = &mut reader_done => {
                    return Err(Outage::Closed);
                }
                Some(why) = probe_failed.recv() => return Err(why),
                Some(()) = suspect_rx.recv() => {
                    // At most one look every few seconds, whatever a forger publishes.
                    if checked_library_at.is_some_and(|t| t.elapsed() < LIBRARY_CHECK_EVERY) {
                        continue;
                    }
                    checked_library_at = Some(Instant::now());
                    let installed = self.library.installed().await?;
                    let current = installed.as_ref().map(|(_, k)| k);
                    let outdated = installed
                        .as_ref()
                        .is_some_and(|(v, _)| *v < LIBRARY_VERSION);
                    if current != key.as_ref() || outdated {
                        // Durable events signed with another key (Redis lost its library, an
                        // older replica replaced it): load ours again and fill from history.
                        return Err(Outage::LibraryChanged);
                    }
                }
                Some(name) = lost_rx.recv() => {
                    let wanted = name
                        .strip_prefix(self.prefix.as_str())
                        .is_some_and(|c| subscribed.contains(c))
                        || probe_seen.contains_key(&name);
                    if wanted {
                        return Err(Outage::ShardMoved(name));
                    }
                }
            }
        }
    }

    async fn handle(
        &self,
        batch: Vec<Request>,
        sink: &mut Sink,
        subscribed: &mut HashSet<String>,
        pending_unsubscribe: &mut HashMap<String, Instant>,
    ) -> Result<(), Outage> {
        let mut replies = Vec::new();
        let mut wanted: Vec<String> = Vec::new();
        let mut wanted_set: HashSet<String> = HashSet::new();
        for req in batch {
            match req {
                Request::Subscribe(channels, reply) => {
                    for c in channels {
                        pending_unsubscribe.remove(&c);
                        if !subscribed.contains(&c) && wanted_set.insert(c.clone()) {
                            wanted.push(c);
                        }
                    }
                    replies.push(reply);
                }
                Request::Released(channels) => {
                    let at = Instant::now() + UNSUBSCRIBE_GRACE;
                    for c in channels {
                        if subscribed.contains(&c) {
                            pending_unsubscribe.insert(c, at);
                        }
                    }
                }
            }
        }
        let result = async {
            for chunk in wanted.chunks(BATCH) {
                let names = chunk.iter().map(|c| self.name(c)).collect();
                sink.subscribe(names).await?;
                subscribed.extend(chunk.iter().cloned());
            }
            Ok::<(), Failure>(())
        }
        .await;
        metrics::gauge!(m::SUBSCRIBED_CHANNELS).set(subscribed.len() as f64);
        for reply in replies {
            let _ = reply.send(result.clone().map_err(BrokerError::from));
        }
        result.map_err(Outage::from)
    }

    /// Delivers the durable events published while the subscription was down, from history:
    /// streams drop what they already have (by position), and a history that no longer
    /// reaches back is announced with `gateway.gap`.
    async fn fill_after_outage(&self, channels: &[String]) {
        let Some(history) = &self.history else { return };
        // Channels with no durable event seen yet are filled from shortly before the last
        // message this replica received; duplicates are dropped by the streams.
        let since = Position {
            ms: self
                .last_contact_ms
                .load(Ordering::Relaxed)
                .saturating_sub(5_000),
            seq: 0,
        };
        let mut filled = 0usize;
        for channel in channels {
            let mut from = lock(&self.last_seen).get(channel).cloned().unwrap_or(Mark {
                epoch: ANY_EPOCH.to_string(),
                pos: since,
            });
            if from.epoch != ANY_EPOCH {
                // The last event delivered here may be missing from the history now (a
                // failover to a replica that had not received it): record that, so that older
                // cursors resume with a gap instead of silently missing it.
                if let Err(e) = history.mark_lost(channel.clone(), from.clone()).await {
                    tracing::warn!(
                        "checking the history for lost events after the outage failed: {e}"
                    );
                }
            }
            let mut first = true;
            loop {
                let page = match history
                    .after(channel.clone(), from.clone(), PAGE, PAGE_BYTES)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("filling channel history after the outage failed: {e}; its streams get gateway.gap");
                        self.sink.control(channel, gap_frame());
                        break;
                    }
                };
                if first && page.gap {
                    // The streams take the history's current epoch with the gap, so the events
                    // of that epoch that follow are not a second gap.
                    let now = Mark {
                        epoch: page.epoch.clone(),
                        pos: Position::default(),
                    };
                    self.sink.gap(channel, &now, gap_frame());
                    lock(&self.last_seen).insert(channel.clone(), now);
                }
                first = false;
                for e in &page.events {
                    let mark = Mark {
                        epoch: page.epoch.clone(),
                        pos: e.pos,
                    };
                    self.sink.durable(channel, &mark, &e.payload);
                    filled += 1;
                    from = mark;
                }
                if let Some(last) = page.events.last() {
                    lock(&self.last_seen).insert(
                        channel.clone(),
                        Mark {
                            epoch: page.epoch.clone(),
                            pos: last.pos,
                        },
                    );
                }
                if !page.more {
                    break;
                }
            }
        }
        if filled > 0 {
            tracing::info!(
                events = filled,
                "filled durable events missed during the Redis outage from history"
            );
        }
    }

    /// A probe channel on a slot of each master, from `CLUSTER SLOTS`.
    async fn probe_channels_per_master(&self) -> Result<Vec<String>, Outage> {
        let work = async {
            let mut conn = self.pool.get().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut conn)
                .await
                .map_err(Failure::command("CLUSTER SLOTS"))
        };
        let slots = deadline("CLUSTER SLOTS", work).await?;
        // Each entry: start, end, [master ip, port, …], replicas…
        let mut masters: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
        if let redis::Value::Array(entries) = slots {
            for e in entries {
                let redis::Value::Array(f) = e else { continue };
                let (
                    Some(redis::Value::Int(a)),
                    Some(redis::Value::Int(b)),
                    Some(redis::Value::Array(node)),
                ) = (f.first(), f.get(1), f.get(2))
                else {
                    continue;
                };
                let addr = format!("{:?}:{:?}", node.first(), node.get(1));
                masters
                    .entry(addr)
                    .or_default()
                    .push((*a as u16, *b as u16));
            }
        }
        if masters.is_empty() {
            return Err(Outage::NoMaster("CLUSTER SLOTS named no master"));
        }
        let mut probes = Vec::new();
        for ranges in masters.values() {
            let name = (0..100_000u32)
                .map(|k| {
                    self.probe_channel
                        .replacen("{gateway}", &format!("{{gateway-{k}}}"), 1)
                })
                .find(|n| {
                    let s = crate::backends::redis::slot(n.as_bytes());
                    ranges.iter().any(|(a, b)| *a <= s && s <= *b)
                })
                .ok_or(Outage::NoMaster(
                    "no probe channel name lands on a master's slots",
                ))?;
            probes.push(name);
        }
        probes.sort();
        Ok(probes)
    }

    fn name(&self, channel: &str) -> String {
        format!("{}{}", self.prefix, channel)
    }
}

/// `PUBLISH` (or `SPUBLISH`) of `payload` on `channel`, for fire-and-forget events and probes;
/// how many subscribers Redis reports.
async fn publish_raw(
    pool: Pool,
    command: &'static str,
    channel: String,
    payload: Bytes,
) -> Result<i64, Failure> {
    let work = async {
        let mut conn = pool.get().await?;
        redis::cmd(command)
            .arg(&channel)
            .arg(&payload[..])
            .query_async::<i64>(&mut conn)
            .await
            .map_err(Failure::command(command))
    };
    deadline(command, work).await
}

/// Where a session's messages come from.
enum Source {
    Classic(redis::aio::PubSubStream),
    Sharded(mpsc::UnboundedReceiver<redis::PushInfo>),
}

/// Where a session's (un)subscriptions go: `SUBSCRIBE` on one connection, or `SSUBSCRIBE` per
/// slot on a cluster (a shard channel command may only name channels of one slot).
enum Sink {
    Classic(redis::aio::PubSubSink),
    Sharded(redis::cluster_async::ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, names: Vec<String>) -> Result<(), Failure> {
        self.change(names, true).await
    }

    async fn unsubscribe(&mut self, names: Vec<String>) -> Result<(), Failure> {
        self.change(names, false).await
    }

    async fn change(&mut self, names: Vec<String>, on: bool) -> Result<(), Failure> {
        let verb = if on { "SUBSCRIBE" } else { "UNSUBSCRIBE" };
        let work = async {
            match self {
                Sink::Classic(sink) if on => sink.subscribe(names).await,
                Sink::Classic(sink) => sink.unsubscribe(names).await,
                Sink::Sharded(conn) => {
                    let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
                    for n in names {
                        by_slot
                            .entry(crate::backends::redis::slot(n.as_bytes()))
                            .or_default()
                            .push(n);
                    }
                    let calls = by_slot.into_values().map(|group| {
                        let mut conn = conn.clone();
                        async move {
                            if on {
                                conn.ssubscribe(group).await
                            } else {
                                conn.sunsubscribe(group).await
                            }
                        }
                    });
                    futures_util::future::try_join_all(calls).await.map(|_| ())
                }
            }
        };
        deadline(verb, async { work.await.map_err(Failure::command(verb)) }).await
    }
}

/// What the reader needs to hand a message on.
struct Incoming {
    sink: Arc<dyn EventSink>,
    prefix: String,
    /// Users to take off arrive here (their `sub` as the payload).
    disconnect: String,
    /// Probe channels and the highest probe seen back on each.
    probe_seen: Arc<HashMap<String, AtomicU64>>,
    /// This session's probe nonce, and the highest probe sent so far.
    probe_nonce: String,
    probe_sent: Arc<AtomicU64>,
    /// Verifies durable events.
    key: Option<DurableKey>,
    /// Told (without waiting) when a marked message does not verify.
    suspect: mpsc::Sender<()>,
    last_seen: Arc<Mutex<HashMap<String, Mark>>>,
    last_contact: Arc<AtomicU64>,
}

impl Incoming {
    fn message(&self, name: &str, payload: &[u8]) {
        self.last_contact.store(unix_ms(), Ordering::Relaxed);
        if let Some(seen) = self.probe_seen.get(name) {
            let text = std::str::from_utf8(payload).unwrap_or("");
            let seq = text
                .strip_prefix(self.probe_nonce.as_str())
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|seq| seq.parse::<u64>().ok());
            // Never past what was sent: a replayed or invented number cannot end the probe.
            if let Some(seq) = seq.filter(|s| *s <= self.probe_sent.load(Ordering::Acquire)) {
                seen.fetch_max(seq, Ordering::AcqRel);
            }
        } else if name == self.disconnect {
            let sub = match decode_durable(self.key.as_ref(), name, payload) {
                Durable(DISCONNECT_EPOCH, _, sub) => Some(sub),
                Plain(sub) if self.key.is_none() => Some(sub),
                _ => None,
            };
            match sub.and_then(|s| std::str::from_utf8(s).ok()) {
                Some(sub) => {
                    let streams = self.sink.disconnect(sub);
                    tracing::info!(streams, "a user was taken off (POST /disconnect)");
                }
                None => {
                    metrics::counter!(m::EVENTS_DROPPED, "reason" => "forged").increment(1);
                    tracing::debug!("a disconnect that does not verify was dropped");
                }
            }
        } else if let Some(channel) = name.strip_prefix(self.prefix.as_str()) {
            match decode_durable(self.key.as_ref(), channel, payload) {
                Durable(epoch, pos, body) => {
                    let mark = Mark {
                        epoch: epoch.to_string(),
                        pos,
                    };
                    self.sink.durable(channel, &mark, body);
                    lock(&self.last_seen).insert(channel.to_string(), mark);
                }
                Plain(payload) => self.sink.event(channel, payload),
                Forged => {
                    metrics::counter!(m::EVENTS_DROPPED, "reason" => "forged").increment(1);
                    tracing::debug!(channel, "a message marked durable did not verify: dropped");
                    let _ = self.suspect.try_send(());
                }
            }
        }
    }
}

/// The channel and payload of a sharded pub/sub message (`smessage <channel> <payload>`), as
/// Redis pushes it; `None` for anything else (it is ignored, never a panic).
pub fn shard_message(data: &[redis::Value]) -> Option<(String, &[u8])> {
    let [name, payload, ..] = data else {
        return None;
    };
    let (name, payload) = (bulk(name)?, bulk(payload)?);
    Some((String::from_utf8_lossy(name).into_owned(), payload))
}

fn bulk(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        _ => None,
    }
}

fn gap_frame() -> Bytes {
    crate::core::frame::control("gateway.gap", "{\"reason\":\"redis_outage\"}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
