//! `rediss://`: the gateway talks to a Redis that only speaks TLS, verifying its certificate
//! against the system roots (here a test CA given through `SSL_CERT_FILE`).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(10);

struct TlsRedis {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsRedis {
    fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "sse-gateway-redis-tls-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        let path = |f: &str| dir.join(f).display().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &path("cert.pem"),
                "--tls-key-file",
                &path("key.pem"),
            ])
            .args([
                "--tls-ca-cert-file",
                &path("cert.pem"),
                "--tls-auth-clients",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let r = TlsRedis { child, dir, port };
        let deadline = Instant::now() + T;
        while r.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "TLS redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &self.dir.join("cert.pem").display().to_string(),
            ])
            .args(["-h", "localhost", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[tokio::test]
async fn the_gateway_runs_on_a_tls_only_redis() {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}", redis.port);
    let (_gw, mut c) = durable_events_flow(&redis, &url, "secure").await;
    // And a raw PUBLISH from redis-cli.
    assert_eq!(redis.cli(&["PUBLISH", "sse:secure", "raw"]).trim(), "1");
    c.expect_data("raw").await;
}

#[tokio::test]
async fn an_untrusted_redis_certificate_is_refused() {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}", redis.port);
    // No SSL_CERT_FILE: the self-signed certificate is not trusted, so the replica never
    // becomes ready and says why.
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", &url)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gw.readyz().await, 503);
    let logs = gw.logs.lock().unwrap().clone();
    assert!(logs.contains("Redis pub/sub unavailable"), "{logs}");
}

/// A replica on `url` trusting the test CA: an event published through it (a Redis Function
/// call over TLS) reaches a stream on it.
async fn durable_events_flow(redis: &TlsRedis, url: &str, channel: &str) -> (Gateway, SseClient) {
    let ca = redis.dir.join("cert.pem").display().to_string();
    let gw = Gateway::start(&[("SSE_GATEWAY_REDIS_URL", url), ("SSL_CERT_FILE", &ca)]);
    gw.wait_ready(true, T).await;
    let mut c = gw.subscribe("alice", channel).await;
    gw.publish_data(channel, "durable").await;
    c.expect_data("durable").await;
    (gw, c)
}

/// A Sentinel that only speaks TLS, watching `master` (over TLS too) as `mymaster`.
struct TlsSentinel {
    child: Child,
    port: u16,
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsSentinel {
    fn start(master: &TlsRedis) -> Self {
        let port = free_port();
        let path = |f: &str| master.dir.join(f).display().to_string();
        let conf = master.dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor mymaster 127.0.0.1 {} 1\n",
                path("cert.pem"),
                path("key.pem"),
                path("cert.pem"),
                master.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let s = TlsSentinel { child, port };
        let deadline = Instant::now() + T;
        loop {
            let out = Command::new("redis-cli")
                .args(["--tls", "--cacert", &path("cert.pem")])
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["SENTINEL", "get-master-addr-by-name", "mymaster"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&master.port.to_string()) {
                break;
            }
            assert!(Instant::now() < deadline, "the TLS Sentinel did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }
}

#[tokio::test]
async fn sentinels_are_spoken_to_over_tls_with_rediss_sentinel() {
    let redis = TlsRedis::start();
    let sentinel = TlsSentinel::start(&redis);
    let url = format!("rediss+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
    durable_events_flow(&redis, &url, "sentinel-tls").await;
}
