//! The load tool checks itself against a real gateway and Redis, with small numbers: every
//! scenario runs, and what it reports adds up. Not a speed test.

use std::process::Command;
use std::time::Duration;

use sse_testkit::{Gateway, Redis, SECRET};

fn tool(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sse-loadtest"))
        .env("SSE_GATEWAY_JWT_SECRET", SECRET)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs the tool with `args` (split at spaces) and fails unless its output holds every one of
/// `wants`.
fn says(args: &str, wants: &[&str]) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = tool(&args);
    for want in wants {
        assert!(out.contains(want), "{args:?}: no {want:?} in {out}");
    }
}

/// A ready replica on `redis`.
async fn start_gateway(redis: &Redis) -> Gateway {
    let gateway = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &redis.url())]);
    gateway.wait_ready(true, Duration::from_secs(20)).await;
    gateway
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn every_scenario_runs_and_adds_up() {
    let redis = Redis::start();
    let redis_url = redis.url();
    let gateway = start_gateway(&redis).await;
    let pid = gateway.pid().to_string();
    let target = gateway.client.to_string();
    let admins = gateway.admin.to_string();
    let dir = std::env::temp_dir().join(format!("sse-loadtest-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name).to_string_lossy().to_string();

    let out = tool(&[
        "idle",
        "--targets",
        &target,
        "--admins",
        &admins,
        "--streams",
        "50",
        "--hold-secs",
        "1",
        "--json",
        &file("idle.json"),
    ]);
    assert!(out.contains("streams: opened 50 of 50"), "{out}");
    assert!(out.contains("KiB per stream"), "{out}");
    assert_eq!(json(&dir.join("idle.json"))["streams_opened"], 50);

    // Two worker processes, merged into one report.
    let out = tool(&[
        "broadcast",
        "--targets",
        &target,
        "--pids",
        &pid,
        "--redis-url",
        &redis_url,
        "--streams",
        "20",
        // Enough deliveries to cost the replica several CPU ticks (/proc counts in 10 ms):
        // with 200 the figure was sometimes zero ticks, and so missing.
        "--events",
        "50",
        "--rate",
        "100",
        "--workers",
        "2",
        "--json",
        &file("broadcast.json"),
        "--html",
        &file("broadcast.html"),
    ]);
    assert!(out.contains("delivered: 1000 of 1000"), "{out}");
    let report = json(&dir.join("broadcast.json"));
    assert_eq!(report["deliveries"], 1000);
    assert_eq!(report["latency_ms"]["count"], 1000);
    assert!(report["cpu_ms_per_1k_deliveries"].as_f64().unwrap() > 0.0);
    let page = std::fs::read_to_string(dir.join("broadcast.html")).unwrap();
    assert!(page.contains("<svg") && page.contains("delivered: 1000 of 1000"));

    let private = "--streams 10 --events 40 --rate 100";
    says(
        &format!("private --targets {target} --redis-url {redis_url} {private}"),
        &["delivered: 40 of 40"],
    );

    let out = tool(&["table", &file("idle.json"), &file("broadcast.json")]);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("| broadcast | sse-gateway | 20 |"), "{out}");

    let out = tool(&[
        "capacity",
        "--idle",
        &file("idle.json"),
        "--load",
        &file("broadcast.json"),
        "--streams",
        "100000",
        "--events-per-sec",
        "10",
        "--fanout",
        "1000",
    ]);
    assert!(out.starts_with("capacity estimate: "), "{out}");

    says(
        &format!("connect --targets {target} --streams 20"),
        &["20 sequential streams", "0 failed"],
    );

    says(
        &format!("churn --targets {target} --concurrency 2 --secs 1"),
        &["connects: ", ", 0 failed"],
    );

    says(
        &format!(
            "audit --targets {target} --redis-url {redis_url} --streams 10 --secs 2 --rate 20"
        ),
        &["audit: 10 clients, 10 complete; in order 400, repeated 0, silently lost 0"],
    );

    says(
        &format!("publish --targets {target} --via http --events 40 --concurrency 2"),
        &["40 of 40 accepted"],
    );
    says(
        &format!("publish --via redis --redis-url {redis_url} --events 40 --concurrency 2"),
        &["40 of 40 accepted"],
    );

    says(
        &format!("resume --targets {target} --redis-url {redis_url} --missed 30 --rounds 2"),
        &["resume of 30 missed events"],
    );

    let h2 = "--streams 30 --per-connection 10 --hold-secs 1";
    says(
        &format!("idle-h2 --targets {target} --admins {admins} {h2}"),
        &["opened 30 HTTP/2 streams over 3 connections"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The storm kills a replica mid-run: its clients come back through the other one, resume, and
/// the audit still finds every event once and in order.
#[tokio::test]
async fn the_storm_kills_a_replica_and_every_client_catches_up() {
    let redis = Redis::start();
    let redis_url = redis.url();
    let _keep = start_gateway(&redis).await;
    let victim = start_gateway(&redis).await;
    let targets = format!("{},{}", _keep.client, victim.client);
    let out = tool(&[
        "storm",
        "--targets",
        &targets,
        "--redis-url",
        &redis_url,
        "--streams",
        "20",
        "--secs",
        "5",
        "--rate",
        "20",
        "--kill-after-secs",
        "2",
        "--kill-pid",
        &victim.pid().to_string(),
    ]);
    assert!(
        out.contains("audit: 20 clients, 20 complete; in order 2000, repeated 0, silently lost 0"),
        "{out}"
    );
    assert!(
        out.contains("reconnects 10"),
        "half the clients were on the killed replica: {out}"
    );
    assert!(
        out.contains("storm: every client back and caught up"),
        "{out}"
    );
}
