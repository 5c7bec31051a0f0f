//! Per-user connection limits: the same contract for the memory and the Redis limiter, then the
//! cross-replica behaviour with real gateway processes — races, every close path, crashes,
//! partitions and per-replica capacity.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sse_gateway::testing::hub::Hub;
use sse_gateway::testing::limits::{
    memory::MemoryLimiter, redis::RedisLimiter, LimitError, LimitSettings, Limiter, Slot,
};
use support::*;

const T: Duration = Duration::from_secs(10);

async fn contract(limiter: Arc<dyn Limiter>, limit: usize) {
    // Exact under concurrency: 50 simultaneous attempts, `limit` admitted.
    let attempts = (0..50u64).map(|i| Slot::acquire(limiter.clone(), "alice", 1000 + i, 0));
    let results = futures_util::future::join_all(attempts).await;
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(LimitError::UserLimit { .. })))
        .count();
    let mut admitted: Vec<Slot> = results.into_iter().filter_map(Result::ok).collect();
    assert_eq!(admitted.len(), limit);
    assert_eq!(refused, 50 - limit);
    // Another user is not affected.
    let bob = Slot::acquire(limiter.clone(), "bob", 5000, 0)
        .await
        .expect("bob admitted");
    // A released slot can be taken again, soon.
    drop(admitted.pop());
    let deadline = Instant::now() + Duration::from_secs(1);
    let again = loop {
        match Slot::acquire(limiter.clone(), "alice", 6000, 0).await {
            Ok(slot) => break slot,
            Err(e) => assert!(
                Instant::now() < deadline,
                "slot not freed within 1 s: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(Slot::acquire(limiter.clone(), "alice", 6001, 0)
        .await
        .is_err());
    drop(again);
    drop(admitted);
    drop(bob);
    limiter.flush().await;
    // Everything released: the full limit is available again.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let round: Vec<_> = futures_util::future::join_all((0..limit as u64).map(|i| {
            Slot::acquire(
                limiter.clone(),
                "alice",
                7000 + i * 10 + Instant::now().elapsed().as_nanos() as u64 % 7,
                0,
            )
        }))
        .await;
        if round.iter().all(Result::is_ok) {
            break;
        }
        drop(round);
        limiter.flush().await;
        assert!(Instant::now() < deadline, "slots leaked");
    }
    revocation_contract(limiter).await;
}

/// A revocation refuses the user's older tokens and only those, never another user's, and an
/// older revocation never undoes a newer one.
async fn revocation_contract(limiter: Arc<dyn Limiter>) {
    let (old, new) = (1_000_000, 2_000_000);
    assert_eq!(limiter.streams_of("carol").await, Ok(0));
    let held = Slot::acquire(limiter.clone(), "carol", 9000, old)
        .await
        .unwrap();
    assert_eq!(limiter.streams_of("carol").await, Ok(1));
    limiter.revoke("carol", new).await.unwrap();
    limiter.revoke("carol", old).await.unwrap();
    assert_eq!(
        Slot::acquire(limiter.clone(), "carol", 9001, new - 1)
            .await
            .err(),
        Some(LimitError::Revoked)
    );
    assert_eq!(
        Slot::acquire(limiter.clone(), "carol", 9002, 0).await.err(),
        Some(LimitError::Revoked),
        "a token without iat cannot prove it is newer"
    );
    let fresh = Slot::acquire(limiter.clone(), "carol", 9003, new).await;
    assert!(fresh.is_ok(), "{:?}", fresh.err());
    assert!(Slot::acquire(limiter.clone(), "dave", 9004, old)
        .await
        .is_ok());
    drop(held);
}

#[tokio::test]
async fn the_memory_limiter_keeps_the_contract() {
    contract(Arc::new(MemoryLimiter::new(3)), 3).await;
}

#[tokio::test]
async fn the_redis_limiter_keeps_the_contract() {
    let redis = Redis::start();
    let settings = LimitSettings {
        prefix: "sse:".into(),
        limit: 3,
        lease: Duration::from_secs(15),
    };
    let pool = sse_gateway::testing::redis::Commands::new(
        sse_gateway::testing::redis::Topology::parse(&redis.url()).unwrap(),
    );
    let limiter = RedisLimiter::start(
        pool,
        &settings,
        Arc::new(Hub::new()),
        "test".into(),
        "0123456789abcdef".into(),
    );
    let deadline = Instant::now() + T;
    while !limiter.is_ready() {
        assert!(Instant::now() < deadline, "limiter never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    contract(Arc::new(limiter), 3).await;
}

/// `n` replicas on `redis` with `extra` settings, once all are ready.
async fn ready_replicas(redis: &Redis, n: usize, extra: &[(&str, &str)]) -> Vec<Gateway> {
    let url = redis.url();
    let gws: Vec<Gateway> = (0..n)
        .map(|_| {
            let mut env = vec![("SSE_GATEWAY_REDIS_URL", url.as_str())];
            env.extend_from_slice(extra);
            Gateway::start(&env)
        })
        .collect();
    for g in &gws {
        g.wait_ready(true, T).await;
    }
    gws
}

/// One stream per user and a lease short enough to lapse within a test.
const ONE_SLOT_SHORT_LEASE: [(&str, &str); 2] = [
    ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "1"),
    ("SSE_GATEWAY_CONNECTION_LEASE_SECS", "3"),
];

async fn try_open(gw: &Gateway, token: &str) -> Result<SseClient, Reply> {
    SseClient::open(gw.client, "/events?channel=l", Some(token)).await
}

fn live_slots(redis: &Redis, sub: &str) -> i64 {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("ZCARD")
        .arg(format!("sse:{{u:{sub}}}:slots"))
        .query(&mut conn)
        .unwrap()
}

#[tokio::test]
async fn fifty_racing_connects_over_three_replicas_admit_exactly_the_limit() {
    let redis = Redis::start();
    let gws = ready_replicas(&redis, 3, &[("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "3")]).await;
    let tok = client_token("alice", &["l"]);
    let attempts = (0..50).map(|i| {
        let addr = gws[i % 3].client;
        let tok = tok.clone();
        tokio::spawn(async move { SseClient::open(addr, "/events?channel=l", Some(&tok)).await })
    });
    let results: Vec<_> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let admitted: Vec<&SseClient> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(admitted.len(), 3);
    for refusal in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refusal.status, 429, "{}", refusal.text());
        assert_eq!(refusal.json()["error"], "user_limit");
        assert!(refusal.header("retry-after").is_some());
    }
    let mut rejected = 0.0;
    for g in &gws {
        rejected += g
            .metric("sse_gateway_connections_rejected_total{reason=\"user_limit\"}")
            .await;
    }
    assert_eq!(rejected, 47.0);
    // Another user is never affected.
    let bob = client_token("bob", &["l"]);
    assert!(try_open(&gws[0], &bob).await.is_ok());
    assert_eq!(live_slots(&redis, "alice"), 3);

    // A closed stream's slot is free again within a second.
    drop(results);
    let deadline = Instant::now() + Duration::from_secs(1);
    while live_slots(&redis, "alice") != 0 {
        assert!(Instant::now() < deadline, "slots not freed within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again: Vec<_> =
        futures_util::future::join_all((0..3).map(|i| try_open(&gws[i], &tok))).await;
    assert!(again.iter().all(Result::is_ok));
}

#[tokio::test]
async fn every_close_path_gives_the_slot_back() {
    let redis = Redis::start();
    let mut gws = ready_replicas(
        &redis,
        2,
        &[
            ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "1"),
            ("SSE_GATEWAY_DRAIN_SECS", "0"),
        ],
    )
    .await;
    // Token expiry.
    let short = token(serde_json::json!({"sub": "carol", "exp": now() + 2, "channels": ["l"]}));
    let mut s = try_open(&gws[0], &short).await.unwrap();
    assert_eq!(
        try_open(&gws[1], &client_token("carol", &["l"]))
            .await
            .err()
            .unwrap()
            .status,
        429
    );
    assert_eq!(
        s.next_event(Duration::from_secs(5))
            .await
            .unwrap()
            .event
            .as_deref(),
        Some("gateway.token-expired")
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while live_slots(&redis, "carol") != 0 {
        assert!(Instant::now() < deadline, "expiry did not free the slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Drain: a replica shut down on purpose hands its slots back before it exits.
    let tok = client_token("dave", &["l"]);
    let _s = try_open(&gws[1], &tok).await.unwrap();
    assert_eq!(live_slots(&redis, "dave"), 1);
    gws[1].signal("TERM");
    assert_eq!(gws[1].wait_exit(T), Some(0));
    assert_eq!(live_slots(&redis, "dave"), 0);
    assert!(try_open(&gws[0], &tok).await.is_ok());
}

#[tokio::test]
async fn a_killed_replica_frees_its_slots_within_the_lease() {
    let redis = Redis::start();
    let mut gws = ready_replicas(
        &redis,
        3,
        &[
            ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "2"),
            ("SSE_GATEWAY_CONNECTION_LEASE_SECS", "2"),
        ],
    )
    .await;
    let tok = client_token("erin", &["l"]);
    let _on_a = try_open(&gws[0], &tok).await.unwrap();
    let _on_b = try_open(&gws[1], &tok).await.unwrap();
    assert_eq!(try_open(&gws[2], &tok).await.err().unwrap().status, 429);

    gws[1].signal("KILL");
    gws[1].wait_exit(T);
    let killed = Instant::now();
    let on_c = loop {
        match try_open(&gws[2], &tok).await {
            Ok(s) => break s,
            Err(r) => assert_eq!(r.status, 429),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "slots not healed within lease + margin"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Replica A's slot is still counted: A + C is the limit.
    assert_eq!(try_open(&gws[2], &tok).await.err().unwrap().status, 429);
    assert_eq!(live_slots(&redis, "erin"), 2);
    drop(on_c);
}

#[tokio::test]
async fn a_replica_paused_past_its_lease_does_not_corrupt_counts() {
    let redis = Redis::start();
    let gws = ready_replicas(
        &redis,
        2,
        &[
            ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "2"),
            ("SSE_GATEWAY_CONNECTION_LEASE_SECS", "2"),
        ],
    )
    .await;
    let tok = client_token("frank", &["l"]);
    let mut on_b = try_open(&gws[1], &tok).await.unwrap();
    assert_eq!(live_slots(&redis, "frank"), 1);
    // B is frozen (a long GC pause, a partitioned node): its lease runs out, A takes the slots.
    gws[1].signal("STOP");
    let paused = Instant::now();
    let mut on_a = Vec::new();
    while on_a.len() < 2 {
        if let Ok(s) = try_open(&gws[0], &tok).await {
            on_a.push(s);
        }
        assert!(
            paused.elapsed() < Duration::from_secs(6),
            "B's slot never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B's slot counted until its lease ran out, even though A had never seen B renew: A
    // re-reads the registry rather than take an unknown replica for dead.
    assert!(
        paused.elapsed() >= Duration::from_millis(1000),
        "B's slot was taken after {:?}",
        paused.elapsed()
    );
    gws[1].signal("CONT");
    // B comes back, sees its lease lapsed, and closes the stream that no longer fits.
    assert!(on_b.wait_closed(T).await, "B kept a stream over the limit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(live_slots(&redis, "frank"), 2);
    // Closed either by the reclaim (it no longer fits) or, first, by the fence (B's lease had
    // lapsed while it was paused, so it closes what it held).
    let closed = gws[1]
        .metric("sse_gateway_connections_closed_total{reason=\"user_limit\"}")
        .await
        + gws[1]
            .metric("sse_gateway_connections_closed_total{reason=\"error\"}")
            .await;
    assert_eq!(closed, 1.0);
    assert_eq!(try_open(&gws[1], &tok).await.err().unwrap().status, 429);
    // And once everything closes, nothing is left behind.
    drop(on_a);
    let deadline = Instant::now() + Duration::from_secs(2);
    while live_slots(&redis, "frank") != 0 {
        assert!(Instant::now() < deadline, "slots left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_pause_shorter_than_the_lease_never_takes_a_live_replicas_slot() {
    let redis = Redis::start();
    let gws = ready_replicas(&redis, 2, &ONE_SLOT_SHORT_LEASE).await;
    let tok = client_token("gina", &["l"]);
    let _on_b = try_open(&gws[1], &tok).await.unwrap();
    let mut refused = 0;
    for _ in 0..6 {
        // A freezes for most of a lease, wakes up with its registry copy out of date, and is
        // asked for a stream at once.
        gws[0].signal("STOP");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        gws[0].signal("CONT");
        match try_open(&gws[0], &tok).await {
            Ok(_) => panic!("A took B's live slot: user over the limit"),
            Err(r) if r.status == 429 => refused += 1,
            // A's own lease ran out during the pause: it may not admit at all yet.
            Err(r) => assert_eq!(r.status, 503, "{}", r.text()),
        }
        gws[0].wait_ready(true, T).await;
    }
    assert!(refused > 0, "every attempt met a lapsed lease");
    assert_eq!(live_slots(&redis, "gina"), 1);
}

#[tokio::test]
async fn slots_lost_by_redis_are_put_back_by_reconciliation() {
    let redis = Redis::start();
    let gws = ready_replicas(&redis, 2, &ONE_SLOT_SHORT_LEASE).await;
    let tok = client_token("hank", &["l"]);
    let _on_a = try_open(&gws[0], &tok).await.unwrap();
    // A failover to a replica that had not seen the write: the slot is gone, leases are not.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg("sse:{u:hank}:slots")
        .query(&mut conn)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    while live_slots(&redis, "hank") != 1 {
        assert!(
            Instant::now() < deadline,
            "the lost slot was never put back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(try_open(&gws[1], &tok).await.err().unwrap().status, 429);
}

#[tokio::test]
async fn a_full_replica_answers_503_capacity() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_CONNECTIONS", "2")]);
    let a = client_token("a", &["l"]);
    let _one = try_open(&gw, &a).await.unwrap();
    let _two = try_open(&gw, &client_token("b", &["l"])).await.unwrap();
    let r = try_open(&gw, &client_token("c", &["l"]))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "capacity");
    assert!(r.header("retry-after").is_some());
}
