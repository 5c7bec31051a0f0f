//! The local three-replica setup (`deploy/local/run.sh`) end to end: clients connected through
//! nginx to different replicas all get an event published once, and tokens stay out of the
//! access log.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use support::browser::{chromium, page_server};
use support::*;

const T: Duration = Duration::from_secs(10);

/// A base port with base, base+1..3 and base+1001..1003 all free.
fn free_block() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand_u16() % 20_000);
        let ports = [
            base,
            base + 1,
            base + 2,
            base + 3,
            base + 1001,
            base + 1002,
            base + 1003,
        ];
        if ports
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port block");
}

fn rand_u16() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id()) as u16
}

struct Local {
    dir: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Local {
    /// A local setup on free ports (not started yet); with its nginx port and Redis port.
    fn new() -> (Self, u16, u16) {
        let base = free_block();
        let redis_port = free_port();
        let dir = std::env::temp_dir().join(format!("sse-gateway-local-{base}"));
        let local = Local {
            env: vec![
                ("SSE_LOCAL_PORT".into(), base.to_string()),
                ("SSE_LOCAL_REDIS_PORT".into(), redis_port.to_string()),
                ("SSE_LOCAL_DIR".into(), dir.display().to_string()),
                (
                    "SSE_GATEWAY_BIN".into(),
                    env!("CARGO_BIN_EXE_sse-gateway").into(),
                ),
            ],
            dir,
        };
        (local, base, redis_port)
    }

    fn run(&self, what: &str) -> std::process::Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/run.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script).arg(what);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn an_event_reaches_clients_on_different_replicas_through_nginx() {
    let (local, base, _) = Local::new();
    let dir = local.dir.clone();
    let out = local.run("start");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The printed demo command streams through nginx.
    let stream_line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("curl -N"))
        .expect("demo curl");
    let token = stream_line
        .split("Bearer ")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap()
        .to_string();
    let nginx: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let mut a = SseClient::open(nginx, "/events?channel=demo", Some(&token))
        .await
        .unwrap();
    // A query-string token, as browsers send it.
    let mut b = SseClient::open(
        nginx,
        &format!("/events?channel=demo&access_token={token}"),
        None,
    )
    .await
    .unwrap();
    a.wait_id(T).await;
    b.wait_id(T).await;

    // least_conn put them on different replicas.
    let mut holding = 0;
    for i in 1..=3u16 {
        let admin: SocketAddr = format!("127.0.0.1:{}", base + 1000 + i).parse().unwrap();
        let conns = http(admin, "GET", "/connections?channel=demo", &[], b"")
            .await
            .json();
        if conns["total"].as_u64().unwrap_or(0) > 0 {
            holding += 1;
        }
    }
    assert_eq!(holding, 2, "the two streams share a replica");

    // Published once, with the printed redis-cli command, received by both.
    let publish = printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("redis-cli") && l.contains("FCALL"))
        .expect("durable publish demo");
    let out = Command::new("sh").args(["-c", publish]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in [&mut a, &mut b] {
        let ev = c.next_event(T).await.expect("event through nginx");
        assert_eq!(ev.event.as_deref(), Some("greeting"));
        assert_eq!(ev.data, "hello");
    }
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let access = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    assert!(access.contains("GET /events"), "{access}");
    assert!(
        !access.contains(&token),
        "a token reached the nginx access log"
    );
}

fn fcall(redis_port: u16, payload: &str) {
    fcall_on(redis_port, "web", payload);
}

/// A durable publish on `channel` with `redis-cli`'s equivalent: the publish function.
fn fcall_on(redis_port: u16, channel: &str, payload: &str) {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{redis_port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: Vec<String> = redis::cmd("FCALL")
        .arg("sse_publish")
        .arg(1)
        .arg(format!("{{sse:{channel}}}"))
        .arg(payload)
        .query(&mut conn)
        .unwrap();
}

/// The replica (1–3) of the local setup on `base` that holds the browser's stream.
async fn holding_replica(base: u16) -> u16 {
    for i in 1..=3u16 {
        let admin: SocketAddr = format!("127.0.0.1:{}", base + 1000 + i).parse().unwrap();
        // A killed replica's port refuses: it holds nothing.
        if let Ok(listed) =
            support::http::try_http(admin, "GET", "/connections?user=browser", &[], b"").await
        {
            if listed.status == 200 && listed.json()["total"] == 1 {
                return i;
            }
        }
    }
    panic!("no replica holds the browser's stream");
}

#[tokio::test]
async fn a_browser_through_nginx_resumes_by_itself_when_its_replica_dies() {
    let (local, base, redis_port) = Local::new();
    let dir = local.dir.clone();
    let out = local.run("start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = std::fs::read_to_string(dir.join("jwt-secret")).unwrap();
    let token = token_with(
        serde_json::json!({"sub": "browser", "exp": now() + 600, "channels": ["web"]}),
        secret.trim(),
    );
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let report_port = page_server(String::new(), reports.clone()).await;
    let url = format!(
        "http://127.0.0.1:{base}/demo/#channel=web&token={token}&report=http://127.0.0.1:{report_port}/r"
    );
    let mut browser = chromium(&dir.join("chromium"))
        .arg(&url)
        .spawn()
        .expect("Chromium (scripts/test.sh installs it)");
    // The page's fullest state: reports may arrive out of order, the longest is the newest.
    let latest = |reports: &std::sync::Mutex<Vec<String>>| {
        reports
            .lock()
            .unwrap()
            .iter()
            .max_by_key(|r| r.split('&').next().map_or(0, str::len))
            .cloned()
            .unwrap_or_default()
    };
    let wait_for = |want: &str| {
        let reports = reports.clone();
        let want = want.to_string();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                // Reports are separate requests and may arrive out of order: look at all.
                let seen = reports.lock().unwrap().clone();
                if let Some(hit) = seen.iter().find(|r| r.contains(&want)) {
                    return hit.clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "page never reported {want}; reports: {seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("opened=1").await;
    for i in 0..5 {
        fcall(redis_port, &format!("e{i}"));
    }
    wait_for("events=e0,e1,e2,e3,e4&").await;

    // Kill the replica that holds the browser's stream.
    let victim = holding_replica(base).await;
    let pid = std::fs::read_to_string(dir.join(format!("replica{victim}.pid"))).unwrap();
    Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    for i in 5..10 {
        fcall(redis_port, &format!("e{i}"));
    }
    // The browser reconnects on its own (after the retry hint) with Last-Event-ID, through
    // nginx, to a live replica, and gets exactly the events it missed.
    let last = wait_for("events=e0,e1,e2,e3,e4,e5,e6,e7,e8,e9&").await;
    assert!(last.contains("opened=2"), "{last}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        latest(&reports).starts_with("events=e0,e1,e2,e3,e4,e5,e6,e7,e8,e9&"),
        "a duplicate arrived: {}",
        latest(&reports)
    );

    // Now Redis dies together with the replica holding the stream. The browser comes back
    // through nginx to a replica that cannot reach Redis yet, is told in-band to retry (an
    // EventSource would give up for good on a 503), and once Redis is back it gets every
    // durable event published after that, with no code of its own.
    let holder = holding_replica(base).await;
    let redis_pid = std::fs::read_to_string(dir.join("redis.pid")).unwrap();
    let pid = std::fs::read_to_string(dir.join(format!("replica{holder}.pid"))).unwrap();
    Command::new("kill")
        .args(["-9", redis_pid.trim(), pid.trim()])
        .status()
        .unwrap();
    let refused = wait_for("&refused=1&").await;
    assert!(
        refused.starts_with("events=e0,e1,e2,e3,e4,e5,e6,e7,e8,e9&"),
        "{refused}"
    );
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    std::fs::write(dir.join("redis.pid"), redis.id().to_string()).unwrap();
    for i in (1..=3u16).filter(|i| *i != holder && *i != victim) {
        let admin: SocketAddr = format!("127.0.0.1:{}", base + 1000 + i).parse().unwrap();
        let deadline = std::time::Instant::now() + T;
        while http(admin, "GET", "/readyz", &[], b"").await.status != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} never came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Streams come back within the retry hint; events published from now on are not lost.
    wait_for("&opened=3&").await;
    for i in 10..15 {
        fcall(redis_port, &format!("e{i}"));
    }
    let back = wait_for("e10,e11,e12,e13,e14&").await;
    let events = back
        .split('&')
        .next()
        .unwrap_or("")
        .trim_start_matches("events=");
    let mut list: Vec<&str> = events.split(',').filter(|e| *e != "GAP").collect();
    let all = list.len();
    list.dedup();
    assert_eq!(list.len(), all, "a duplicate arrived: {back}");
    let _ = browser.kill();
    let _ = browser.wait();

    // A screenshot for people: the demo page resumed from the first event's id shows the rest.
    let first = latest(&reports)
        .split('&')
        .find_map(|kv| kv.strip_prefix("first="))
        .map(|v| {
            form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .expect("the page reported its first id");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-resume.png");
    let _ = std::fs::remove_file(&shot);
    let from = form_urlencoded::byte_serialize(first.as_bytes()).collect::<String>();
    let status = chromium(&dir.join("chromium-shot"))
        .args([
            "--window-size=900,600",
            "--timeout=2000",
            &format!("--screenshot={}", shot.display()),
            &format!("http://127.0.0.1:{base}/demo/#channel=web&token={token}&from={from}"),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot at {}", shot.display());
    println!("screenshot: {}", shot.display());
    let _ = redis.kill();
    let _ = redis.wait();
}

/// The chat page (deploy/demo/chat.html) in a real browser through nginx: it lists who is
/// here from `GET /presence`, follows joins and leaves from the snapshot's id, and shows
/// messages — with a second user arriving and leaving on another replica.
#[tokio::test]
async fn the_chat_page_shows_who_is_in_the_room() {
    let (mut local, base, redis_port) = Local::new();
    local
        .env
        .push(("SSE_GATEWAY_PRESENCE_LEAVE_GRACE_SECS".into(), "1".into()));
    let dir = local.dir.clone();
    let out = local.run("start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        printed.contains("/demo/chat.html#channel=room:lobby"),
        "{printed}"
    );
    let secret = std::fs::read_to_string(dir.join("jwt-secret")).unwrap();
    let mint = |sub: &str| {
        token_with(
            serde_json::json!({"sub": sub, "exp": now() + 600, "channels": ["room:*"]}),
            secret.trim(),
        )
    };
    let nginx: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    // Someone is already in the room when the page opens.
    let mut carol = SseClient::open(nginx, "/events?channel=room:lobby", Some(&mint("carol")))
        .await
        .unwrap();
    carol.wait_id(T).await;

    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let report_port = page_server(String::new(), reports.clone()).await;
    let url = format!(
        "http://127.0.0.1:{base}/demo/chat.html#channel=room:lobby&token={}&report=http://127.0.0.1:{report_port}/r",
        mint("ann")
    );
    let mut browser = chromium(&dir.join("chromium"))
        .arg(&url)
        .spawn()
        .expect("Chromium (scripts/test.sh installs it)");
    // The page reports `members=<subs>&log=<lines joined by |>` after every change.
    let decode = |report: &str| -> (String, String) {
        let mut members = String::new();
        let mut log = String::new();
        for (k, v) in form_urlencoded::parse(report.as_bytes()) {
            match &*k {
                "members" => members = v.into_owned(),
                "log" => log = v.into_owned(),
                _ => {}
            }
        }
        (members, log)
    };
    let wait_for = |want: &'static str| {
        let reports = reports.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let seen = reports.lock().unwrap().clone();
                if let Some(hit) = seen.iter().map(|r| decode(r)).find(|(m, _)| m == want) {
                    return hit;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the page never listed {want}; reports: {seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The page joined from the snapshot: carol (already here) and ann (its own join, replayed
    // from the snapshot's id).
    wait_for("ann,carol").await;
    let mut bob = SseClient::open(nginx, "/events?channel=room:lobby", Some(&mint("bob")))
        .await
        .unwrap();
    bob.wait_id(T).await;
    wait_for("ann,bob,carol").await;
    fcall_on(redis_port, "room:lobby", "bob: hello");
    drop(bob);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let log = loop {
        let seen = reports.lock().unwrap().clone();
        if let Some((_, log)) = seen
            .iter()
            .map(|r| decode(r))
            .find(|(m, log)| m == "ann,carol" && log.ends_with("bob left"))
        {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed bob leaving; reports: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(log, "ann joined|bob joined|bob: hello|bob left");
    let _ = browser.kill();
    let _ = browser.wait();
}
