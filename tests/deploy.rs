//! The local three-replica setup (`deploy/local/run.sh`) end to end: clients connected through
//! nginx to different replicas all get an event published once, and tokens stay out of the
//! access log.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

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
    let base = free_block();
    let redis_port = free_port();
    let dir = std::env::temp_dir().join(format!("sse-gateway-local-{base}"));
    let local = Local {
        dir: dir.clone(),
        env: vec![
            ("SSE_LOCAL_PORT".into(), base.to_string()),
            ("SSE_LOCAL_REDIS_PORT".into(), redis_port.to_string()),
            ("SSE_LOCAL_DIR".into(), dir.display().to_string()),
            (
                "SSE_GATEWAY_BIN".into(),
                env!("CARGO_BIN_EXE_sse-gateway").into(),
            ),
        ],
    };
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
