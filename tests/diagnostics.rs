//! Connection diagnostics: who is connected where, and why someone was refused.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(10);

async fn get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let r = http(addr, "GET", path, &[], b"").await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

fn inspect(redis: &Redis, args: &[&str]) -> String {
    stdout_of(
        Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .env_remove("SSE_GATEWAY_JWT_SECRET")
            .args(["--redis-url", &redis.url(), "inspect"])
            .args(args),
    )
}

#[tokio::test]
async fn an_sre_can_find_a_users_streams_and_refusals() {
    let redis = Redis::start();
    let env = [
        ("SSE_GATEWAY_REDIS_URL", redis.url()),
        ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "2".to_string()),
        ("SSE_GATEWAY_CONNECTION_LEASE_SECS", "4".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Gateway::start(&env);
    let mut b = Gateway::start(&env);
    a.wait_ready(true, T).await;
    b.wait_ready(true, T).await;
    let tok = client_token("alice", &["x", "y", "z"]);
    let _on_a = SseClient::open(a.client, "/events?channel=x&channel=y", Some(&tok))
        .await
        .unwrap();
    let _on_b = SseClient::open(b.client, "/events?channel=z", Some(&tok))
        .await
        .unwrap();

    // Each replica lists its own stream, with the right channels; tokens never appear.
    let on_a = get_json(a.admin, "/connections?user=alice").await;
    assert_eq!(on_a["total"], 1);
    let conn = &on_a["connections"][0];
    assert_eq!(conn["sub"], "alice");
    assert_eq!(conn["channels"], serde_json::json!(["x", "y"]));
    assert_eq!(conn["protocol"], "HTTP/1.1");
    assert!(conn["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    let replica_a = on_a["replica"].as_str().unwrap().to_string();
    let on_b = get_json(b.admin, "/connections?user=alice").await;
    assert_eq!(on_b["connections"][0]["channels"], serde_json::json!(["z"]));
    let replica_b = on_b["replica"].as_str().unwrap().to_string();
    assert_eq!(get_json(a.admin, "/connections?user=bob").await["total"], 0);
    assert_eq!(
        get_json(a.admin, "/connections?channel=y").await["total"],
        1
    );
    let chans = get_json(a.admin, "/channels").await;
    assert_eq!(chans["total"], 2);
    assert_eq!(
        chans["channels"][0],
        serde_json::json!({"channel": "x", "subscribers": 1})
    );

    // inspect --user lists both replicas; --details adds their connections.
    let report = inspect(&redis, &["--user", "alice", "--details"]);
    println!("{report}");
    assert!(report.contains("2 slot(s) counted"), "{report}");
    assert!(
        report.contains(&replica_a) && report.contains(&replica_b),
        "{report}"
    );
    assert!(report.contains("[\"x\",\"y\"]"), "{report}");
    assert_eq!(report.matches("live, lease renewed").count(), 2, "{report}");
    let report = inspect(&redis, &["--channel", "z"]);
    assert!(report.contains("1 replica(s) subscribed"), "{report}");

    // A refusal shows in /rejections and in the log, with the reason and the user.
    let r = SseClient::open(a.client, "/events?channel=x", Some(&tok))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 429);
    let rej = get_json(a.admin, "/rejections").await;
    let first = &rej["rejections"][0];
    assert_eq!(first["reason"], "user_limit");
    assert_eq!(first["sub"], "alice");
    assert_eq!(first["status"], 429);
    let r = SseClient::open(a.client, "/events?channel=x", Some("not-a-token"))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 401);
    let rej = get_json(a.admin, "/rejections").await;
    assert_eq!(rej["rejections"][0]["reason"], "unauthorized");
    assert!(rej["rejections"][0]["sub"].is_null());
    let logs = a.logs.lock().unwrap().clone();
    assert!(
        logs.lines().any(|l| l.contains("stream refused")
            && l.contains("user_limit")
            && l.contains("alice")),
        "no refusal log line"
    );
    for text in [logs.as_str(), &rej.to_string(), &report] {
        assert!(!text.contains(&tok), "a token leaked");
        assert!(!text.contains(SECRET), "the secret leaked");
    }

    // After SIGKILL, the dead replica's slot shows as held until its lease runs out.
    b.signal("KILL");
    b.wait_exit(T);
    let report = inspect(&redis, &["--user", "alice"]);
    assert!(report.contains("NOT ANSWERING"), "{report}");
    assert!(report.contains("lease expires in"), "{report}");
    let deadline = Instant::now() + T;
    loop {
        let report = inspect(&redis, &["--user", "alice"]);
        if report.contains("lease EXPIRED") {
            assert!(report.contains("1 slot(s) counted"), "{report}");
            break;
        }
        assert!(Instant::now() < deadline, "lease never expired: {report}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_flood_of_refusals_is_logged_at_a_bounded_rate() {
    let gw = Gateway::start(&[]);
    for _ in 0..150 {
        let _ = SseClient::open(gw.client, "/events?channel=x", Some("bad")).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _ = SseClient::open(gw.client, "/events?channel=x", Some("bad")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = gw.logs.lock().unwrap().clone();
    let lines = logs
        .lines()
        .filter(|l| l.contains("\"stream refused"))
        .count();
    assert!(lines < 150, "{lines} refusal lines for 151 refusals");
    assert!(
        logs.contains("were not logged"),
        "no summary of the suppressed lines"
    );
    let rej = get_json(gw.admin, "/rejections").await;
    assert_eq!(rej["rejections"].as_array().unwrap().len(), 151);
}

#[tokio::test]
async fn the_stream_capacity_is_exported_for_alerts_to_divide_by() {
    let gw = Gateway::start(&[("SSE_GATEWAY_MAX_CONNECTIONS", "1234")]);
    assert_eq!(gw.metric("sse_gateway_max_connections").await, 1234.0);
    let text = gw.metrics().await;
    assert!(text.contains("process_max_fds"), "{text}");
    assert!(text.contains("process_open_fds"), "{text}");
}

#[tokio::test]
async fn the_admin_token_guards_every_listing_but_not_the_probes() {
    let gw = Gateway::start(&[("SSE_GATEWAY_ADMIN_TOKEN", "admin-s3cret-token")]);
    for path in ["/connections", "/channels", "/rejections"] {
        let none = http(gw.admin, "GET", path, &[], b"").await;
        assert_eq!(none.status, 401, "{path} without the token");
        let wrong = http(
            gw.admin,
            "GET",
            path,
            &[("Authorization", "Bearer admin-s3cret-tokeX")],
            b"",
        )
        .await;
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        let right = http(
            gw.admin,
            "GET",
            path,
            &[("Authorization", "Bearer admin-s3cret-token")],
            b"",
        )
        .await;
        assert_eq!(right.status, 200, "{path} with the token");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            http(gw.admin, "GET", path, &[], b"").await.status,
            200,
            "{path}"
        );
    }
    assert!(!gw.logs.lock().unwrap().contains("admin-s3cret-token"));
}
