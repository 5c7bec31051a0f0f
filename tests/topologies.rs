//! Beyond one Redis: a real 3-master Redis Cluster (sharded pub/sub) and a Sentinel-watched
//! master, each with two gateway replicas, and what survives losing a master.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::topology::{Cluster, Sentinels};
use support::*;

const T: Duration = Duration::from_secs(10);

async fn open(gw: &Gateway, channel: &str, sub: &str) -> SseClient {
    let tok = client_token(sub, &[channel]);
    let mut c = SseClient::open(gw.client, &format!("/events?channel={channel}"), Some(&tok))
        .await
        .expect("stream opens");
    c.wait_id(T).await;
    c
}

async fn resume(gw: &Gateway, channel: &str, sub: &str, id: &str) -> SseClient {
    let auth = format!("Bearer {}", client_token(sub, &[channel]));
    SseClient::open_with(
        gw.client,
        &format!("/events?channel={channel}"),
        &[("Authorization", &auth), ("Last-Event-ID", id)],
    )
    .await
    .expect("stream resumes")
}

/// `POST /publish`, retried while the topology heals; the reply of the accepted one.
async fn publish(gw: &Gateway, channel: &str, data: &str, within: Duration) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let r = gw
            .publish(
                &publisher_token(),
                &json!({"channel": channel, "data": data}),
            )
            .await;
        if r.status == 202 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Channel names whose slots fall on each master: one per master.
fn one_channel_per_master(cluster: &Cluster, prefix: &str) -> Vec<String> {
    cluster
        .channel_per_master(prefix)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Two ready replicas on `url` with `extra` settings, and a stream on a channel of every master
/// on each (channel names from `prefix`, users from `tag`).
async fn two_replicas_streaming(
    cluster: &Cluster,
    extra: &[(&str, &str)],
    prefix: &str,
    tag: &str,
) -> (Gateway, Gateway, Vec<String>, Vec<(String, SseClient)>) {
    let url = cluster.url();
    let mut env = vec![("SSE_GATEWAY_REDIS_URL", url.as_str())];
    env.extend_from_slice(extra);
    let a = Gateway::start(&env);
    let b = Gateway::start(&env);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let channels = one_channel_per_master(cluster, prefix);
    let mut streams = Vec::new();
    for (i, c) in channels.iter().enumerate() {
        streams.push((c.clone(), open(&a, c, &format!("{tag}a{i}")).await));
        streams.push((c.clone(), open(&b, c, &format!("{tag}b{i}")).await));
    }
    (a, b, channels, streams)
}

#[tokio::test]
async fn a_cluster_carries_events_resumes_and_limits_across_replicas() {
    let cluster = Cluster::start();
    // Channels on every shard, a stream for each on each replica.
    let (a, b, channels, mut streams) = two_replicas_streaming(
        &cluster,
        &[("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "2")],
        "orders-",
        "u",
    )
    .await;
    // Raw events: SPUBLISH on the channel's shard reaches both replicas' streams.
    for c in &channels {
        assert_eq!(
            cluster.spublish(&format!("sse:{c}"), &format!("raw-{c}")),
            2
        );
    }
    // Durable events through either replica reach every stream of the channel, with ids.
    for (i, c) in channels.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            publish(via, c, &format!("durable-{c}"), T).await.status,
            202
        );
    }
    for (c, s) in streams.iter_mut() {
        assert_eq!(
            s.next_event(T).await.expect("raw event").data,
            format!("raw-{c}")
        );
        let ev = s.next_event(T).await.expect("durable event");
        assert_eq!(ev.data, format!("durable-{c}"));
        assert!(ev.id.is_some(), "durable events carry ids");
    }

    // Resume: a stream leaves, misses three events, and comes back on the other replica.
    let (channel, gone) = streams.remove(0);
    let id = gone.last_id.clone().expect("an id");
    drop(gone);
    for k in 0..3 {
        assert_eq!(
            publish(&a, &channel, &format!("missed-{k}"), T)
                .await
                .status,
            202
        );
    }
    let mut back = resume(&b, &channel, "ua0", &id).await;
    for k in 0..3 {
        assert_eq!(
            back.next_event(T).await.expect("replayed").data,
            format!("missed-{k}")
        );
    }

    // The per-user limit holds across replicas: two streams, the third is refused.
    let tok = client_token("limited", &["solo"]);
    let _one = SseClient::open(a.client, "/events?channel=solo", Some(&tok))
        .await
        .unwrap();
    let _two = SseClient::open(b.client, "/events?channel=solo", Some(&tok))
        .await
        .unwrap();
    let refused = SseClient::open(a.client, "/events?channel=solo", Some(&tok))
        .await
        .err()
        .expect("a third stream is refused");
    assert_eq!(refused.status, 429, "{}", refused.text());
}

#[tokio::test]
async fn streams_keep_receiving_after_a_cluster_master_dies() {
    let mut cluster = Cluster::start();
    let (a, b, channels, mut streams) = two_replicas_streaming(&cluster, &[], "live-", "k").await;
    for c in &channels {
        assert_eq!(publish(&a, c, "before", T).await.status, 202);
    }
    for (_, s) in streams.iter_mut() {
        assert_eq!(s.next_event(T).await.expect("before").data, "before");
    }

    // Kill the master of the first channel; its replica takes over.
    let victim = cluster.owner(sse_gateway::testing::redis::slot(
        format!("sse:{}", channels[0]).as_bytes(),
    ));
    cluster.node(victim).kill();
    let started = Instant::now();
    cluster.wait_failover_from(victim).await;
    cluster.wait_healthy(Duration::from_secs(30));
    let failover = started.elapsed();

    // Every stream, on every shard, gets the events published after the failover; a stream may
    // see a gateway.gap first if events were lost with the master, never a silent hole.
    for c in &channels {
        assert_eq!(
            publish(&b, c, "after", Duration::from_secs(30))
                .await
                .status,
            202,
            "{c}"
        );
    }
    for (c, s) in streams.iter_mut() {
        let mut ev = s
            .next_event(Duration::from_secs(30))
            .await
            .expect("after the failover");
        while ev.event.as_deref() == Some("gateway.gap") {
            ev = s.next_event(T).await.expect("the event after the gap");
        }
        assert_eq!(ev.data, "after", "stream on {c}");
    }
    eprintln!("failover took {failover:?}");
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
}

/// A master that stops answering keeps its connections open: no disconnection says anything.
/// Only a probe through that master's slots finds the subscription gone quiet once its replica
/// has taken over.
#[tokio::test]
async fn a_cluster_master_that_stops_answering_is_caught_by_the_probe() {
    let mut cluster = Cluster::start();
    let url = cluster.url();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", url.as_str()),
        ("SSE_GATEWAY_REDIS_PROBE_SECS", "1"),
    ]);
    gw.wait_ready(true, T).await;
    // A channel on a master other than the one holding the replica's own {gateway} keys.
    let gateway_master = cluster.owner(sse_gateway::testing::redis::slot(b"{gateway}"));
    let channel = (0..)
        .map(|i| format!("quiet-{i}"))
        .find(|c| {
            cluster.owner(sse_gateway::testing::redis::slot(
                format!("sse:{c}").as_bytes(),
            )) != gateway_master
        })
        .expect("a channel elsewhere");
    let victim = cluster.owner(sse_gateway::testing::redis::slot(
        format!("sse:{channel}").as_bytes(),
    ));
    let mut s = open(&gw, &channel, "quiet").await;
    assert_eq!(publish(&gw, &channel, "before", T).await.status, 202);
    assert_eq!(s.next_event(T).await.expect("before").data, "before");

    cluster.node(victim).signal("STOP");
    cluster.wait_failover_from(victim).await;
    let r = publish(&gw, &channel, "after", Duration::from_secs(30)).await;
    assert_eq!(
        r.status,
        202,
        "{}\n{}",
        r.text(),
        gw.logs
            .lock()
            .unwrap()
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut ev = s
        .next_event(Duration::from_secs(30))
        .await
        .expect("the event published after the failover arrives");
    while ev.event.as_deref() == Some("gateway.gap") {
        ev = s.next_event(T).await.expect("the event after the gap");
    }
    assert_eq!(ev.data, "after");
    cluster.node(victim).signal("CONT");
}

#[tokio::test]
async fn a_slot_moving_to_another_master_is_followed() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", url.as_str())]);
    gw.wait_ready(true, T).await;
    let mut s = open(&gw, "moving", "mover").await;
    assert_eq!(publish(&gw, "moving", "before", T).await.status, 202);
    assert_eq!(s.next_event(T).await.expect("before").data, "before");

    let slot = sse_gateway::testing::redis::slot(b"sse:moving");
    let from = cluster.owner(slot);
    let to = *cluster
        .masters()
        .iter()
        .find(|m| **m != from)
        .expect("another master");
    cluster.move_slot(slot, to);
    assert_eq!(cluster.owner(slot), to);

    // Redis drops the shard subscription of a moved slot; the replica subscribes again on the
    // new owner, and history (moved with the slot) still resumes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "the moved channel was never resubscribed"
        );
        gw.wait_ready(true, T).await;
        if cluster.spublish("sse:moving", "raw-after") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gw.logs.lock().unwrap().contains("its slot moved"),
        "the replica noticed the move"
    );
    assert_eq!(publish(&gw, "moving", "after", T).await.status, 202);
    let mut seen = Vec::new();
    while !seen.iter().any(|d: &String| d == "after") {
        let ev = s.next_event(T).await.expect("events after the move");
        if ev.event.as_deref() != Some("gateway.gap") {
            seen.push(ev.data);
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("after"), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|d| *d == "before").count(),
        0,
        "nothing delivered twice: {seen:?}"
    );
}

#[test]
fn channel_names_spread_evenly_over_the_masters() {
    let cluster = Cluster::start();
    let masters = cluster.masters();
    let ranges = cluster.slot_ranges();
    let mut count = std::collections::HashMap::new();
    let n = 10_000;
    for i in 0..n {
        // The shard channel of a channel, and its history keys, share this slot.
        let slot = sse_gateway::testing::redis::slot(format!("sse:user-{i}").as_bytes());
        let owner = ranges
            .iter()
            .find(|r| r.1 <= slot && slot <= r.2)
            .map(|r| r.0)
            .expect("owned");
        *count.entry(owner).or_insert(0usize) += 1;
    }
    let shares: Vec<f64> = masters
        .iter()
        .map(|m| count.get(m).copied().unwrap_or(0) as f64 / n as f64)
        .collect();
    eprintln!("10,000 channels over 3 masters: {shares:?}");
    for s in shares {
        assert!((0.30..0.37).contains(&s), "uneven spread: {s}");
    }
}

#[tokio::test]
async fn a_sentinel_failover_is_followed_and_delivery_resumes() {
    let mut set = Sentinels::start();
    let url = set.url();
    let first_master = set.master.port;
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", url.as_str())]);
    gw.wait_ready(true, T).await;
    let mut s = open(&gw, "news", "reader").await;
    assert_eq!(publish(&gw, "news", "one", T).await.status, 202);
    assert_eq!(s.next_event(T).await.expect("one").data, "one");

    set.master.kill();
    // Readiness shows the gap while there is no master.
    gw.wait_ready(false, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while set.master_port() == Some(first_master) {
        assert!(Instant::now() < deadline, "Sentinel never failed over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(set.master_port(), Some(set.replica.port));
    gw.wait_ready(true, Duration::from_secs(30)).await;

    // The same stream, still open, gets what is published to the new master.
    assert_eq!(publish(&gw, "news", "two", T).await.status, 202);
    let mut ev = s.next_event(T).await.expect("after the failover");
    while ev.event.as_deref() == Some("gateway.gap") {
        ev = s.next_event(T).await.expect("the event after the gap");
    }
    assert_eq!(ev.data, "two");
}
