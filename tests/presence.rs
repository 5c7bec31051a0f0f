//! Presence (SPEC §6.5): who is on a channel across replicas, joins and leaves told once,
//! resumable, absorbed by the grace, and cleared when a replica dies — in single-replica mode,
//! with one Redis and several replicas, and on a Redis Cluster.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::topology::Cluster;
use support::*;

const T: Duration = Duration::from_secs(10);
const ROOM: &str = "room:lobby";

/// Settings of a replica tracking `room:*` with `grace` seconds of grace (and `extra`).
fn settings<'a>(grace: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("SSE_GATEWAY_PRESENCE_CHANNELS", "room:*"),
        ("SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS", grace),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "1"),
    ];
    env.extend_from_slice(extra);
    env
}

fn redis_settings<'a>(url: &'a str, grace: &'a str, lease: &'a str) -> Vec<(&'a str, &'a str)> {
    settings(
        grace,
        &[
            ("SSE_GATEWAY_REDIS_URL", url),
            ("SSE_GATEWAY_CONNECTION_LEASE_SECS", lease),
        ],
    )
}

/// A stream of `sub` on `channel` (`?presence=1` when `presence`), live once its first id is in.
async fn open(gw: &Gateway, channel: &str, sub: &str, presence: bool) -> SseClient {
    let token = client_token(sub, &[channel]);
    let flag = if presence { "&presence=1" } else { "" };
    let path = format!("/events?channel={channel}{flag}");
    let mut s = SseClient::open(gw.client, &path, Some(&token))
        .await
        .unwrap_or_else(|r| panic!("{path} refused: {} {}", r.status, r.text()));
    s.wait_id(T).await;
    s
}

/// A stream resuming from `id`.
async fn resume(gw: &Gateway, channel: &str, sub: &str, id: &str, presence: bool) -> SseClient {
    let auth = format!("Bearer {}", client_token(sub, &[channel]));
    let flag = if presence { "&presence=1" } else { "" };
    SseClient::open_with(
        gw.client,
        &format!("/events?channel={channel}{flag}"),
        &[("Authorization", &auth), ("Last-Event-ID", id)],
    )
    .await
    .unwrap_or_else(|r| panic!("resume refused: {} {}", r.status, r.text()))
}

/// `GET /presence?channel=…` with a token that may subscribe to it.
async fn snapshot(gw: &Gateway, channel: &str) -> Value {
    let auth = format!("Bearer {}", client_token("observer", &[channel]));
    let r = http(
        gw.client,
        "GET",
        &format!("/presence?channel={channel}"),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// (sub, connections) of a snapshot's members.
fn members(snap: &Value) -> Vec<(String, u64)> {
    snap["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["sub"].as_str().unwrap_or_default().to_string(),
                m["connections"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// A presence event as (`join`|`leave`, sub); other events as ("data", their data).
fn describe(e: &SseEvent) -> (String, String) {
    match e.event.as_deref() {
        Some(kind @ ("gateway.join" | "gateway.leave")) => {
            let v: Value = serde_json::from_str(&e.data).expect("presence data is JSON");
            (
                kind.trim_start_matches("gateway.").to_string(),
                v["sub"].as_str().unwrap_or_default().to_string(),
            )
        }
        _ => ("data".to_string(), e.data.clone()),
    }
}

/// Publishes a marker and reads `s` up to it: what arrived before (marker excluded).
async fn until_marker(
    gw: &Gateway,
    s: &mut SseClient,
    channel: &str,
    marker: &str,
) -> Vec<(String, String)> {
    gw.publish_data(channel, marker).await;
    let mut seen = Vec::new();
    loop {
        let e = s
            .next_event(T)
            .await
            .unwrap_or_else(|| panic!("marker {marker} never came; got {seen:?}"));
        let d = describe(&e);
        if d == ("data".to_string(), marker.to_string()) {
            return seen;
        }
        seen.push(d);
    }
}

/// Waits up to `within` for a presence event on `s`; None when none came.
async fn next_presence(s: &mut SseClient, within: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = s.next_event(left).await?;
        let d = describe(&e);
        if d.0 != "data" {
            return Some(d);
        }
    }
}

fn j(kind: &str, sub: &str) -> (String, String) {
    (kind.to_string(), sub.to_string())
}

/// Two tabs of one user: one join, one leave after the grace, in every mode given.
async fn two_tabs_join_once_and_leave_once(a: &Gateway, b: &Gateway) {
    let mut watcher = open(a, ROOM, "watcher", true).await;
    // A stream starting without Last-Event-ID starts after its own join.
    let tab1 = open(a, ROOM, "alice", false).await;
    let tab2 = open(b, ROOM, "alice", false).await;
    assert_eq!(
        until_marker(a, &mut watcher, ROOM, "m1").await,
        vec![j("join", "alice")],
        "two tabs join once"
    );
    let snap = snapshot(b, ROOM).await;
    assert_eq!(
        members(&snap),
        vec![("alice".into(), 2), ("watcher".into(), 1)]
    );
    assert_eq!(snap["connections"], 3);
    assert_eq!(snap["users"], 2);
    drop(tab2);
    // One tab left: no leave, even well past the grace.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(until_marker(a, &mut watcher, ROOM, "m2").await, vec![]);
    drop(tab1);
    let started = Instant::now();
    assert_eq!(
        next_presence(&mut watcher, T).await,
        Some(j("leave", "alice")),
        "the last tab's close is a leave"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "the leave waited for the grace (1 s): {took:?}"
    );
    assert_eq!(
        until_marker(a, &mut watcher, ROOM, "m3").await,
        vec![],
        "one leave only"
    );
    let snap = snapshot(a, ROOM).await;
    assert_eq!(members(&snap), vec![("watcher".into(), 1)]);
}

#[tokio::test]
async fn single_replica_two_tabs_join_once_and_leave_once() {
    let gw = Gateway::start(&settings("1", &[]));
    two_tabs_join_once_and_leave_once(&gw, &gw).await;
}

#[tokio::test]
async fn two_replicas_two_tabs_join_once_and_leave_once() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Gateway::start(&redis_settings(&url, "1", "30"));
    let b = Gateway::start(&redis_settings(&url, "1", "30"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    two_tabs_join_once_and_leave_once(&a, &b).await;
    assert_eq!(
        a.metric("sse_gateway_presence_events_total{kind=\"join\"}")
            .await
            + b.metric("sse_gateway_presence_events_total{kind=\"join\"}")
                .await,
        2.0,
        "watcher and alice joined once each"
    );
}

/// A user back within the grace: no leave, no second join.
async fn back_within_the_grace(gw: &Gateway, other: &Gateway) {
    let mut watcher = open(gw, ROOM, "watcher", true).await;
    let tab = open(gw, ROOM, "bob", false).await;
    assert_eq!(
        until_marker(gw, &mut watcher, ROOM, "m1").await,
        vec![j("join", "bob")]
    );
    drop(tab);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Reconnects (to another replica when there is one) well within the 3 s grace.
    let _tab = open(other, ROOM, "bob", false).await;
    // Past the grace: still nothing.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        until_marker(gw, &mut watcher, ROOM, "m2").await,
        vec![],
        "a reconnect within the grace is neither a leave nor a join"
    );
    assert_eq!(
        members(&snapshot(other, ROOM).await),
        vec![("bob".into(), 1), ("watcher".into(), 1)]
    );
}

#[tokio::test]
async fn single_replica_leave_is_withdrawn_when_the_user_is_back_within_the_grace() {
    let gw = Gateway::start(&settings("3", &[]));
    back_within_the_grace(&gw, &gw).await;
}

#[tokio::test]
async fn leave_is_withdrawn_when_the_user_is_back_on_another_replica_within_the_grace() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Gateway::start(&redis_settings(&url, "3", "30"));
    let b = Gateway::start(&redis_settings(&url, "3", "30"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    back_within_the_grace(&a, &b).await;
}

/// Only `?presence=1` streams get joins and leaves, live and in replay; ids still move.
async fn only_streams_that_ask(gw: &Gateway) {
    let mut asked = open(gw, ROOM, "asked", true).await;
    let mut plain = open(gw, ROOM, "plain", false).await;
    let start_id = plain.last_id.clone().expect("an id");
    let _carol = open(gw, ROOM, "carol", false).await;
    gw.publish_data(ROOM, "after-carol").await;
    assert_eq!(next_presence(&mut asked, T).await, Some(j("join", "plain")));
    assert_eq!(next_presence(&mut asked, T).await, Some(j("join", "carol")));
    let e = plain.next_event(T).await.expect("the published event");
    assert_eq!(
        e.data, "after-carol",
        "no join for a stream without ?presence=1"
    );
    // Replay from before carol's join: the same rule.
    let mut replay_plain = resume(gw, ROOM, "plain", &start_id, false).await;
    let first = replay_plain.next_event(T).await.expect("replayed event");
    assert_eq!(describe(&first), j("data", "after-carol"));
    let mut replay_asked = resume(gw, ROOM, "asked", &start_id, true).await;
    let got: Vec<_> = [
        replay_asked.next_event(T).await.expect("replayed"),
        replay_asked.next_event(T).await.expect("replayed"),
    ]
    .iter()
    .map(describe)
    .collect();
    assert_eq!(got, vec![j("join", "carol"), j("data", "after-carol")]);
    // A bad flag is a clear 400.
    let token = client_token("x", &[ROOM]);
    let refused = SseClient::open(
        gw.client,
        &format!("/events?channel={ROOM}&presence=yes"),
        Some(&token),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.status, 400);
}

#[tokio::test]
async fn single_replica_sends_presence_only_to_streams_that_ask() {
    let gw = Gateway::start(&settings("1", &[]));
    only_streams_that_ask(&gw).await;
}

#[tokio::test]
async fn redis_sends_presence_only_to_streams_that_ask() {
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(&redis_settings(&url, "1", "30"));
    gw.wait_ready(true, T).await;
    only_streams_that_ask(&gw).await;
}

#[tokio::test]
async fn a_sigkilled_replicas_members_leave_within_lease_and_grace_and_a_snapshot_resumes_without_loss(
) {
    let redis = Redis::start();
    let url = redis.url();
    // Lease 3 s, grace 1 s.
    let a = Gateway::start(&redis_settings(&url, "1", "3"));
    let mut b = Gateway::start(&redis_settings(&url, "1", "3"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let _alice = open(&b, ROOM, "alice", false).await;
    let _dave = open(&a, ROOM, "dave", false).await;
    // The snapshot, then more happens before anyone opens a stream from it.
    let snap = snapshot(&a, ROOM).await;
    assert_eq!(
        members(&snap),
        vec![("alice".into(), 1), ("dave".into(), 1)]
    );
    let id = snap["id"].as_str().expect("an id").to_string();
    let _bob = open(&b, ROOM, "bob", false).await;
    let _carol = open(&a, ROOM, "carol", false).await;
    assert_eq!(snapshot(&b, ROOM).await["users"], 4);

    let mut watcher = open(&a, ROOM, "watcher", true).await;
    b.signal("KILL");
    let killed = Instant::now();
    b.wait_exit(T);
    // Within a lease the snapshot no longer counts b's streams.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let during = snapshot(&a, ROOM).await;
    assert_eq!(during["connections"], 3, "{during}");
    let mut left = Vec::new();
    while left.len() < 2 {
        match next_presence(&mut watcher, Duration::from_secs(8)).await {
            Some((kind, sub)) if kind == "leave" => left.push(sub),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("only {left:?} left within {:?}", killed.elapsed()),
        }
    }
    left.sort();
    assert_eq!(left, vec!["alice", "bob"]);
    let took = killed.elapsed();
    // Lease 3 s + a sweep every lease/3 + grace 1 s, with room for a busy machine.
    assert!(took < Duration::from_secs(8), "leaves took {took:?}");
    assert_eq!(
        members(&snapshot(&a, ROOM).await),
        vec![
            ("carol".into(), 1),
            ("dave".into(), 1),
            ("watcher".into(), 1)
        ]
    );

    // Snapshot + resume from its id: every change since, in order, none missed, none doubled.
    let mut from_snap = resume(&a, ROOM, "late", &id, true).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        match next_presence(&mut from_snap, T).await {
            Some(p) => got.push(p),
            None => panic!("only {got:?} after the snapshot"),
        }
    }
    assert_eq!(
        &got[..3],
        &[j("join", "bob"), j("join", "carol"), j("join", "watcher")]
    );
    let mut leaves = got[3..].to_vec();
    leaves.sort();
    assert_eq!(leaves, vec![j("leave", "alice"), j("leave", "bob")]);
    assert_eq!(
        until_marker(&a, &mut from_snap, ROOM, "end").await,
        vec![j("join", "late")],
        "nothing else: only the resuming stream's own join follows"
    );
    assert!(a.metric("sse_gateway_presence_sweeps_total").await >= 1.0);
}

#[tokio::test]
async fn presence_lives_on_the_channels_cluster_slot() {
    let mut cluster = Cluster::start();
    let url = cluster.url();
    let a = Gateway::start(&redis_settings(&url, "1", "30"));
    let b = Gateway::start(&redis_settings(&url, "1", "30"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    // Rooms on every master.
    let rooms = cluster.channel_per_master("room:");
    for (room, master) in &rooms {
        let mut watcher = open(&a, room, "watcher", true).await;
        let tab = open(&b, room, "erin", false).await;
        assert_eq!(
            until_marker(&a, &mut watcher, room, "m").await,
            vec![j("join", "erin")]
        );
        let key = format!("{{sse:{room}}}:members");
        assert_eq!(
            *master,
            cluster.owner(sse_gateway::testing::redis::slot(key.as_bytes())),
            "the gateway puts the channel's presence on the same slot as Redis does"
        );
        let hlen = cluster
            .node(*master)
            .cmd(&["HLEN", &key])
            .unwrap_or_default();
        assert_eq!(
            hlen.trim(),
            "2",
            "both streams' entries sit on the channel's master"
        );
        assert_eq!(
            members(&snapshot(&b, room).await),
            vec![("erin".into(), 1), ("watcher".into(), 1)]
        );
        drop(tab);
        assert_eq!(
            next_presence(&mut watcher, T).await,
            Some(j("leave", "erin"))
        );
    }
}

#[tokio::test]
async fn presence_requests_are_checked() {
    let gw = Gateway::start(&settings("1", &[]));
    let get = |path: String, token: Option<String>| {
        let addr = gw.client;
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("Authorization", a)])
                .unwrap_or_default();
            http(addr, "GET", &path, &headers, b"").await
        }
    };
    let room = format!("/presence?channel={ROOM}");
    assert_eq!(get(room.clone(), None).await.status, 401);
    let other = client_token("x", &["elsewhere"]);
    let r = get(room.clone(), Some(other)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    // A publisher may look too.
    let publisher = token(json!({"exp": now() + 60, "publish": ["room:*"]}));
    let r = get(room.clone(), Some(publisher)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["users"], 0);
    assert_eq!(r.json()["truncated"], false);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let any = client_token("x", &["*"]);
    let r = get("/presence?channel=orders".into(), Some(any.clone())).await;
    assert_eq!(r.status, 400, "not a presence channel");
    assert!(
        r.text().contains("SSE_GATEWAY_PRESENCE_CHANNELS"),
        "{}",
        r.text()
    );
    assert_eq!(get("/presence".into(), Some(any.clone())).await.status, 400);
    let r = get("/presence?channel=a%20b".into(), Some(any)).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn presence_without_history_is_refused_at_start() {
    let (code, logs) = Gateway::try_start(&[
        ("SSE_GATEWAY_JWT_SECRET", SECRET),
        ("SSE_GATEWAY_PRESENCE_CHANNELS", "room:*"),
        ("SSE_GATEWAY_HISTORY_SIZE", "0"),
    ])
    .err()
    .expect("refused");
    assert_eq!(code, Some(2), "{logs}");
    assert!(logs.contains("SSE_GATEWAY_HISTORY_SIZE"), "{logs}");
    let (_, logs) = Gateway::try_start(&[
        ("SSE_GATEWAY_JWT_SECRET", SECRET),
        ("SSE_GATEWAY_PRESENCE_CHANNELS", "room:{x}*"),
    ])
    .err()
    .expect("refused");
    assert!(logs.contains("SSE_GATEWAY_PRESENCE_CHANNELS"), "{logs}");
}

#[tokio::test]
async fn inspect_shows_a_channels_members_and_pending_leaves() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Gateway::start(&redis_settings(&url, "30", "30"));
    let b = Gateway::start(&redis_settings(&url, "30", "30"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let _alice1 = open(&a, ROOM, "alice", false).await;
    let _alice2 = open(&b, ROOM, "alice", false).await;
    let bob = open(&b, ROOM, "bob", false).await;
    drop(bob);
    // Bob's leave is pending (30 s grace) once the replica has noticed the close.
    let deadline = Instant::now() + T;
    let report = loop {
        let report = stdout_of(
            std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
                .env_remove("SSE_GATEWAY_JWT_SECRET")
                .args(["--redis-url", &url, "inspect", "--channel", ROOM]),
        );
        if report.contains("1 leave(s) pending") || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        report.contains("presence: 1 user(s) with 2 stream(s), 1 leave(s) pending"),
        "{report}"
    );
    assert!(report.contains("member \"alice\": 2 stream(s)"), "{report}");
    assert!(
        report.contains("member \"bob\": no stream; leave announced in"),
        "{report}"
    );
    assert_eq!(report.matches("entr(ies), live").count(), 2, "{report}");
}

#[tokio::test]
async fn members_come_back_after_redis_restarts_empty() {
    let mut redis = Redis::start();
    let url = redis.url();
    // Lease 3 s: entries are re-asserted every two leases.
    let a = Gateway::start(&redis_settings(&url, "1", "3"));
    let b = Gateway::start(&redis_settings(&url, "1", "3"));
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let _alice = open(&a, ROOM, "alice", false).await;
    let _bob = open(&b, ROOM, "bob", false).await;
    assert_eq!(snapshot(&a, ROOM).await["users"], 2);
    redis.restart();
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    // Streams stayed open; within two leases (plus a renewal) both users are listed again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let snap = snapshot(&b, ROOM).await;
        if members(&snap) == vec![("alice".into(), 1), ("bob".into(), 1)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members did not come back after Redis restarted empty: {snap}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
