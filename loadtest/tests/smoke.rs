//! The load tool checks itself against a real gateway and Redis, with small numbers: every
//! scenario runs, and what it reports adds up. Not a speed test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "smoke-secret-0123456789abcdef";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway_binary() -> PathBuf {
    // Built beside this tool by `cargo test --workspace`.
    let tool = PathBuf::from(env!("CARGO_BIN_EXE_sse-loadtest"));
    tool.with_file_name("sse-gateway")
}

fn wait_http(url_port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("curl")
            .args([
                "-fsS",
                "-o",
                "/dev/null",
                &format!("http://127.0.0.1:{url_port}{path}"),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "gateway not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

fn start_redis(port: u16) -> Killed {
    Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    )
}

/// A replica: its client port, admin port and process.
fn start_gateway(redis_url: &str) -> (u16, u16, Killed) {
    let (client, admin) = (free_port(), free_port());
    let child = Killed(
        Command::new(gateway_binary())
            .env("SSE_GATEWAY_JWT_SECRET", SECRET)
            .env("SSE_GATEWAY_REDIS_URL", redis_url)
            .env("SSE_GATEWAY_LISTEN", format!("127.0.0.1:{client}"))
            .env("SSE_GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sse-gateway binary beside the tool"),
    );
    wait_http(admin, "/readyz");
    (client, admin, child)
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_scenario_runs_and_adds_up() {
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    std::thread::sleep(Duration::from_millis(300));
    let (client, admin, gateway) = start_gateway(&redis_url);
    let pid = gateway.0.id().to_string();
    let target = format!("127.0.0.1:{client}");
    let admins = format!("127.0.0.1:{admin}");
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

    let out = tool(&[
        "private",
        "--targets",
        &target,
        "--redis-url",
        &redis_url,
        "--streams",
        "10",
        "--events",
        "40",
        "--rate",
        "100",
    ]);
    assert!(out.contains("delivered: 40 of 40"), "{out}");

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

    let out = tool(&["connect", "--targets", &target, "--streams", "20"]);
    assert!(
        out.contains("20 sequential streams") && out.contains("0 failed"),
        "{out}"
    );

    let out = tool(&[
        "churn",
        "--targets",
        &target,
        "--concurrency",
        "2",
        "--secs",
        "1",
    ]);
    assert!(
        out.contains("connects: ") && out.contains(", 0 failed"),
        "{out}"
    );

    let out = tool(&[
        "audit",
        "--targets",
        &target,
        "--redis-url",
        &redis_url,
        "--streams",
        "10",
        "--secs",
        "2",
        "--rate",
        "20",
    ]);
    assert!(
        out.contains("audit: 10 clients, 10 complete; in order 400, repeated 0, silently lost 0"),
        "{out}"
    );

    let out = tool(&[
        "publish",
        "--targets",
        &target,
        "--via",
        "http",
        "--events",
        "40",
        "--concurrency",
        "2",
    ]);
    assert!(out.contains("40 of 40 accepted"), "{out}");
    let out = tool(&[
        "publish",
        "--via",
        "redis",
        "--redis-url",
        &redis_url,
        "--events",
        "40",
        "--concurrency",
        "2",
    ]);
    assert!(out.contains("40 of 40 accepted"), "{out}");

    let out = tool(&[
        "resume",
        "--targets",
        &target,
        "--redis-url",
        &redis_url,
        "--missed",
        "30",
        "--rounds",
        "2",
    ]);
    assert!(out.contains("resume of 30 missed events"), "{out}");

    let out = tool(&[
        "idle-h2",
        "--targets",
        &target,
        "--admins",
        &admins,
        "--streams",
        "30",
        "--per-connection",
        "10",
        "--hold-secs",
        "1",
    ]);
    assert!(
        out.contains("opened 30 HTTP/2 streams over 3 connections"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The storm kills a replica mid-run: its clients come back through the other one, resume, and
/// the audit still finds every event once and in order.
#[test]
fn the_storm_kills_a_replica_and_every_client_catches_up() {
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    std::thread::sleep(Duration::from_millis(300));
    let (a, _, _keep) = start_gateway(&redis_url);
    let (b, _, victim) = start_gateway(&redis_url);
    let targets = format!("127.0.0.1:{a},127.0.0.1:{b}");
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
        &victim.0.id().to_string(),
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
