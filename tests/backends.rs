//! One contract per backend trait, run against the memory and the Redis implementation: what
//! `lib.rs` may swap one for the other on. (The limiter's contract is in `tests/limits.rs`.)

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sse_gateway::testing::broker::{
    memory::MemoryBroker, redis::RedisBroker, Broker, BrokerError, BrokerSettings,
};
use sse_gateway::testing::history::redis::{Library, RedisHistory};
use sse_gateway::testing::history::{memory::MemoryHistory, History, HistorySettings};
use sse_gateway::testing::position::{Mark, NO_EPOCH};
use sse_gateway::testing::redis::{Commands, Topology};
use sse_gateway::testing::sink::EventSink;
use support::*;

const T: Duration = Duration::from_secs(10);

/// What a sink received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Event(String, Vec<u8>),
    Durable(String, Mark, Vec<u8>),
    Gap(String),
    Disconnect(String),
}

/// A sink that records everything and listens to a set of channels the test controls.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Got>>,
    listening: Mutex<BTreeSet<String>>,
}

impl Recorder {
    fn listen(&self, channel: &str) {
        self.listening.lock().unwrap().insert(channel.into());
    }

    fn forget(&self, channel: &str) {
        self.listening.lock().unwrap().remove(channel);
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` things arrived; what arrived.
    async fn wait_for(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + T;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} arrived: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl EventSink for Recorder {
    fn event(&self, channel: &str, payload: &[u8]) {
        let got = Got::Event(channel.into(), payload.to_vec());
        self.got.lock().unwrap().push(got);
    }
    fn durable(&self, channel: &str, mark: &Mark, payload: &[u8]) {
        let got = Got::Durable(channel.into(), mark.clone(), payload.to_vec());
        self.got.lock().unwrap().push(got);
    }
    fn gap(&self, channel: &str, _mark: &Mark, _gap: Bytes) {
        self.got.lock().unwrap().push(Got::Gap(channel.into()));
    }
    fn control(&self, channel: &str, _frame: Bytes) {
        self.got.lock().unwrap().push(Got::Gap(channel.into()));
    }
    fn channels(&self) -> Vec<String> {
        self.listening.lock().unwrap().iter().cloned().collect()
    }
    fn has_channel(&self, channel: &str) -> bool {
        self.listening.lock().unwrap().contains(channel)
    }
    fn disconnect(&self, sub: &str) -> usize {
        self.got.lock().unwrap().push(Got::Disconnect(sub.into()));
        1
    }
}

fn history_settings() -> HistorySettings {
    HistorySettings {
        prefix: "sse:".into(),
        size: 5,
        ttl: Duration::from_secs(3600),
        max_event_bytes: 65_536,
    }
}

fn pool(redis: &Redis) -> Commands {
    Commands::new(Topology::parse(&redis.url()).expect("a Redis URL"))
}

fn redis_broker(redis: &Redis, sink: Arc<Recorder>) -> RedisBroker {
    let pool = pool(redis);
    RedisBroker::start(
        &BrokerSettings {
            prefix: "sse:".into(),
            probe_every: Duration::from_secs(1),
        },
        sink,
        pool.clone(),
        None,
        Library::new(pool, &history_settings()),
    )
    .expect("the broker starts")
}

/// The broker contract: subscribed channels receive what is published from then on, in order;
/// nothing else is delivered.
async fn broker_contract(broker: Arc<dyn Broker>, sink: Arc<Recorder>) {
    let deadline = Instant::now() + T;
    while !broker.is_ready() {
        assert!(Instant::now() < deadline, "the broker never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.listen("orders");
    broker
        .ensure_subscribed(vec!["orders".into()])
        .await
        .expect("subscribed");
    for i in 0..50 {
        let payload = Bytes::from(format!("{{\"data\":{i}}}"));
        broker
            .publish("orders".into(), payload)
            .await
            .expect("published");
    }
    let got = sink.wait_for(50).await;
    let want: Vec<Got> = (0..50)
        .map(|i| Got::Event("orders".into(), format!("{{\"data\":{i}}}").into_bytes()))
        .collect();
    assert_eq!(got, want, "every event once, in publish order");
    // Taking a user off reaches this replica's sink too (every replica's, through Redis).
    broker
        .disconnect("alice".into())
        .await
        .expect("disconnect sent");
    let got = sink.wait_for(51).await;
    assert_eq!(got[50], Got::Disconnect("alice".into()));
    // The hub's last stream on the channel leaves (the Redis test then checks the unsubscribe).
    sink.forget("orders");
    broker.released(vec!["orders".into()]);
}

#[tokio::test]
async fn the_memory_broker_keeps_the_contract() {
    let sink = Arc::new(Recorder::default());
    broker_contract(Arc::new(MemoryBroker::new(sink.clone())), sink).await;
}

// Multi-threaded: the fixture's NUMSUB wait blocks its thread while the broker unsubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_broker_keeps_the_contract() {
    let redis = Redis::start();
    let sink = Arc::new(Recorder::default());
    let broker = Arc::new(redis_broker(&redis, sink.clone()));
    broker_contract(broker.clone(), sink.clone()).await;
    // A released channel is unsubscribed (after its grace) once the sink no longer needs it.
    redis.wait_numsub("sse:orders", 0, T);
    // A channel published with a raw PUBLISH from any Redis client arrives too.
    sink.listen("raw");
    broker
        .ensure_subscribed(vec!["raw".into()])
        .await
        .expect("subscribed");
    redis.publish("sse:raw", b"{\"data\":\"from redis-cli\"}");
    let got = sink.wait_for(52).await;
    assert_eq!(
        got[51],
        Got::Event("raw".into(), b"{\"data\":\"from redis-cli\"}".to_vec())
    );
}

#[tokio::test]
async fn the_redis_broker_refuses_fast_while_redis_is_down() {
    let mut redis = Redis::start();
    let sink = Arc::new(Recorder::default());
    let broker = redis_broker(&redis, sink.clone());
    let deadline = Instant::now() + T;
    while !broker.is_ready() {
        assert!(Instant::now() < deadline, "the broker never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.kill();
    let deadline = Instant::now() + T;
    while broker.is_ready() {
        assert!(
            Instant::now() < deadline,
            "the broker stayed ready without Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let answer = broker.ensure_subscribed(vec!["late".into()]).await;
    assert_eq!(answer, Err(BrokerError::Reconnecting));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

/// The history contract: appends get increasing positions in one epoch and reach the sink (the
/// Redis one through pub/sub, once a broker listens); reads page in order, bounded by count and
/// bytes; a position from another epoch, beyond the end or trimmed away is a gap.
async fn history_contract(history: Arc<dyn History>, sink: Arc<Recorder>) {
    let fresh = history.marks(vec!["prices".into()]).await.expect("marks");
    assert_eq!(fresh, vec![Mark::empty()]);
    let mut marks = Vec::new();
    for i in 0..8 {
        let payload = Bytes::from(format!("{{\"data\":{i}}}"));
        marks.push(
            history
                .append("prices".into(), payload)
                .await
                .expect("append"),
        );
    }
    let epoch = marks[0].epoch.clone();
    assert_ne!(epoch, NO_EPOCH);
    assert!(marks.iter().all(|m| m.epoch == epoch), "{marks:?}");
    assert!(marks.windows(2).all(|w| w[0].pos < w[1].pos), "{marks:?}");
    // Stored and published in one step: the sink sees each durable event at its mark.
    let got = sink.wait_for(8).await;
    for (i, m) in marks.iter().enumerate() {
        assert_eq!(
            got[i],
            Got::Durable(
                "prices".into(),
                m.clone(),
                format!("{{\"data\":{i}}}").into_bytes()
            )
        );
    }
    assert_eq!(
        history.marks(vec!["prices".into()]).await.expect("marks"),
        vec![marks[7].clone()]
    );
    // Size 5: the last five are kept; from the fourth, the rest in order, two per page.
    let page = history
        .after("prices".into(), marks[3].clone(), 2, 1 << 20)
        .await
        .expect("after");
    assert!(!page.gap);
    assert!(page.more);
    assert_eq!(
        page.events.iter().map(|e| e.pos).collect::<Vec<_>>(),
        vec![marks[4].pos, marks[5].pos]
    );
    assert_eq!(page.events[0].payload, Bytes::from("{\"data\":4}"));
    // A byte bound smaller than one event still returns one.
    let page = history
        .after("prices".into(), marks[5].clone(), 10, 1)
        .await
        .expect("after");
    assert_eq!(page.events.len(), 1);
    assert!(page.more);
    // At the end: nothing, no gap.
    let page = history
        .after("prices".into(), marks[7].clone(), 10, 1 << 20)
        .await
        .expect("after");
    assert!(
        !page.gap && page.events.is_empty() && !page.more,
        "{page:?}"
    );
    // Trimmed away, another epoch, or beyond the end: a gap.
    for from in [
        marks[0].clone(),
        Mark {
            epoch: "other".into(),
            pos: marks[6].pos,
        },
        Mark {
            epoch: epoch.clone(),
            pos: sse_gateway::testing::position::Position {
                ms: marks[7].pos.ms + 1_000_000,
                seq: 0,
            },
        },
    ] {
        let page = history
            .after("prices".into(), from.clone(), 10, 1 << 20)
            .await
            .expect("after");
        assert!(page.gap, "{from:?} must be a gap: {page:?}");
        assert_eq!(page.epoch, epoch);
    }
}

#[tokio::test]
async fn the_memory_history_keeps_the_contract() {
    let sink = Arc::new(Recorder::default());
    let history = MemoryHistory::new(&history_settings(), sink.clone());
    history_contract(history, sink).await;
}

#[tokio::test]
async fn the_redis_history_keeps_the_contract() {
    let redis = Redis::start();
    // A broker listening to the channel is how durable events reach a replica's sink.
    let sink = Arc::new(Recorder::default());
    let pool = pool(&redis);
    let history = RedisHistory::new(pool.clone(), &history_settings());
    let broker = RedisBroker::start(
        &BrokerSettings {
            prefix: "sse:".into(),
            probe_every: Duration::from_secs(1),
        },
        sink.clone(),
        pool.clone(),
        Some(history.clone()),
        Library::new(pool, &history_settings()),
    )
    .expect("the broker starts");
    sink.listen("prices");
    let deadline = Instant::now() + T;
    while broker
        .ensure_subscribed(vec!["prices".into()])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the broker never subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    history_contract(Arc::new(history), sink).await;
}
