//! The process as an operator meets it: development mode, the token helper, bad settings,
//! and the drain on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(10);

fn printed_command(stdout: &str, prefix: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{stdout}"))
        .to_string()
}

#[tokio::test]
async fn development_mode_prints_commands_that_work_as_printed() {
    let gw = Gateway::start_raw(&[]);
    let deadline = Instant::now() + T;
    while !gw.stdout.lock().unwrap().contains("/publish'") {
        assert!(Instant::now() < deadline, "nothing printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = gw.stdout.lock().unwrap().clone();
    assert!(stdout.contains("DEVELOPMENT MODE"));
    let logs = gw.logs.lock().unwrap().clone();
    assert!(
        logs.contains("DEVELOPMENT MODE"),
        "the mode is logged loudly too"
    );
    // The printed commands target 127.0.0.1:<port> of the real listener.
    let stream_cmd = printed_command(&stdout, "curl -N ");
    let publish_cmd = printed_command(&stdout, "curl -X POST ");
    assert!(stream_cmd.contains(&gw.client.to_string()));

    // Run them exactly as printed, through a shell, as a user pasting them would.
    let mut streaming = Command::new("sh")
        .args(["-c", &format!("exec {stream_cmd} --max-time 10 --silent")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh + curl");
    let received = Arc::new(Mutex::new(String::new()));
    {
        let out = streaming.stdout.take().expect("stdout");
        let received = received.clone();
        std::thread::spawn(move || {
            let mut out = out;
            let mut buf = [0u8; 1024];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                received
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    // Publish once the stream is really open (the prelude arrived).
    let deadline = Instant::now() + T;
    while !received.lock().unwrap().contains(": ok") {
        assert!(
            Instant::now() < deadline,
            "the printed stream command never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let published = Command::new("sh")
        .args([
            "-c",
            &format!("{publish_cmd} --silent --show-error --write-out ' %{{http_code}}'"),
        ])
        .output()
        .expect("sh + curl");
    let answer = String::from_utf8_lossy(&published.stdout).to_string();
    assert!(answer.ends_with(" 202"), "publish answered {answer:?}");
    let deadline = Instant::now() + T;
    while !received
        .lock()
        .unwrap()
        .contains("event: greeting\ndata: hello\nid: ")
    {
        if Instant::now() > deadline {
            panic!("stream got {:?}", received.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = streaming.kill();
    let _ = streaming.wait();
}

#[tokio::test]
async fn the_token_helper_mints_tokens_the_gateway_accepts() {
    let gw = Gateway::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .env("SSE_GATEWAY_JWT_SECRET", SECRET)
        .args([
            "token",
            "--sub",
            "alice",
            "--channel",
            "orders",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let client = String::from_utf8(out.stdout).unwrap();
    let mut c = SseClient::open(gw.client, "/events?channel=orders", Some(client.trim()))
        .await
        .expect("minted client token works");
    let out = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .env("SSE_GATEWAY_JWT_SECRET", SECRET)
        .args(["token", "--publish", "orders*"])
        .output()
        .unwrap();
    let publisher = String::from_utf8(out.stdout).unwrap();
    let r = gw
        .publish(
            publisher.trim(),
            &serde_json::json!({"channel": "orders", "data": "minted"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    c.expect_data("minted").await;

    // Without a key there is nothing to sign with: a clear refusal.
    let out = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .env_remove("SSE_GATEWAY_JWT_SECRET")
        .args(["token", "--sub", "alice"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SSE_GATEWAY_JWT_SECRET"));
}

#[test]
fn bad_settings_stop_start_up_with_one_line_naming_the_setting() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("SSE_GATEWAY_LISTEN", "not-an-address")],
            "SSE_GATEWAY_LISTEN",
        ),
        (
            &[("SSE_GATEWAY_HEARTBEAT_SECS", "0")],
            "SSE_GATEWAY_HEARTBEAT_SECS",
        ),
        (
            &[("SSE_GATEWAY_REDIS_URL", "http://nope")],
            "SSE_GATEWAY_REDIS_URL",
        ),
        (
            &[("SSE_GATEWAY_REDIS_URL", "redis://127.0.0.1:1")],
            "SSE_GATEWAY_JWT_SECRET",
        ),
        (
            &[("SSE_GATEWAY_JWT_SECRET", "short")],
            "SSE_GATEWAY_JWT_SECRET",
        ),
        (
            &[
                ("SSE_GATEWAY_JWT_SECRET", SECRET),
                ("SSE_GATEWAY_JWT_PUBLIC_KEY_FILE", "/x"),
            ],
            "SSE_GATEWAY_JWT_SECRET",
        ),
        (
            &[("SSE_GATEWAY_JWT_PUBLIC_KEY_FILE", "/nonexistent.pem")],
            "SSE_GATEWAY_JWT_PUBLIC_KEY_FILE",
        ),
        (
            &[("SSE_GATEWAY_CORS_ORIGINS", "example.com")],
            "SSE_GATEWAY_CORS_ORIGINS",
        ),
    ];
    for (env, setting) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SSE_GATEWAY_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SSE_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("SSE_GATEWAY_ADMIN_LISTEN", "127.0.0.1:0");
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
    }
    // An unreachable Redis is not bad configuration: the replica starts, not ready.
}

#[tokio::test]
async fn an_unreachable_redis_starts_not_ready() {
    let port = free_port().to_string();
    let url = format!("redis://127.0.0.1:{port}");
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    assert_eq!(gw.readyz().await, 503);
    assert_eq!(
        http(gw.admin, "GET", "/healthz", &[], b"").await.status,
        200
    );
    let tok = client_token("alice", &["x"]);
    let r = SseClient::open(gw.client, "/events?channel=x", Some(&tok))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "unavailable");
}

#[tokio::test]
async fn sigterm_drains_streams_spread_over_the_window_and_exits_zero() {
    let mut gw = Gateway::start(&[("SSE_GATEWAY_DRAIN_SECS", "2")]);
    let tok = client_token("alice", &["d"]);
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(
            SseClient::open(gw.client, "/events?channel=d", Some(&tok))
                .await
                .unwrap(),
        );
    }
    let start = Instant::now();
    gw.signal("TERM");
    gw.wait_ready(false, Duration::from_secs(1)).await;
    let r = SseClient::open(gw.client, "/events?channel=d", Some(&tok))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "draining");
    assert!(r.header("retry-after").is_some());
    let mut closed_at = Vec::new();
    for s in &mut streams {
        let ev = s
            .next_event(Duration::from_secs(5))
            .await
            .expect("goodbye event");
        assert_eq!(ev.event.as_deref(), Some("gateway.shutdown"));
        assert!(s.wait_closed(Duration::from_secs(5)).await);
        closed_at.push(start.elapsed());
    }
    closed_at.sort();
    // Spread: the last close comes well after the first, inside the window plus a margin.
    assert!(
        closed_at[3] - closed_at[0] >= Duration::from_millis(900),
        "{closed_at:?}"
    );
    assert!(closed_at[3] <= Duration::from_millis(4000), "{closed_at:?}");
    assert_eq!(gw.wait_exit(Duration::from_secs(5)), Some(0));
}
