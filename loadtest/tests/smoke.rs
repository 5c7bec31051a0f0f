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

#[test]
fn every_scenario_runs_and_adds_up() {
    let redis_port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
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
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let (client, admin) = (free_port(), free_port());
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    std::thread::sleep(Duration::from_millis(300));
    let _gateway = Killed(
        Command::new(gateway_binary())
            .env("SSE_GATEWAY_JWT_SECRET", SECRET)
            .env("SSE_GATEWAY_REDIS_URL", &redis_url)
            .env("SSE_GATEWAY_LISTEN", format!("127.0.0.1:{client}"))
            .env("SSE_GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sse-gateway binary beside the tool"),
    );
    wait_http(admin, "/readyz");
    let target = format!("127.0.0.1:{client}");
    let admins = format!("127.0.0.1:{admin}");

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
    ]);
    assert!(out.contains("opened 50 of 50 streams"), "{out}");
    assert!(out.contains("50 streams, RSS"), "{out}");

    let out = tool(&[
        "broadcast",
        "--targets",
        &target,
        "--redis-url",
        &redis_url,
        "--streams",
        "20",
        "--events",
        "10",
        "--rate",
        "50",
    ]);
    assert!(out.contains("received 200 of 200"), "{out}");

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
    assert!(out.contains("received 40 of 40"), "{out}");

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
    assert!(out.contains(", 0 failed"), "{out}");

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
}
