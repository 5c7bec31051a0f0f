//! Real processes for tests and load runs: a `redis-server` on a free port and gateway
//! processes, each killed by PID when dropped, so tests run in parallel and can crash and
//! restart what they depend on.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{http, Reply, SseClient};
use crate::tokens::{client_token, publisher_token, SECRET};

/// The `sse-gateway` binary: `SSE_GATEWAY_BIN` when set, else the one cargo built beside the
/// running test or tool (`target/<profile>/sse-gateway`; test binaries sit one level deeper, in
/// `deps/`).
pub fn gateway_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SSE_GATEWAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the running executable's path");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("sse-gateway")
}

/// Runs `cmd` to the end; its standard output. Fails the test, with the command's standard
/// error, if it does not succeed.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port nobody listens on right now.
///
/// Ports come from below the kernel's ephemeral range (where `bind(:0)` and outgoing
/// connections take theirs), and none is handed out twice in one process: a Redis killed and
/// restarted on its port cannot lose it to another test's server in between.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const LOW: u32 = 10_000;
    const SPAN: u32 = 20_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    // Processes that run one after another start at different places of the range.
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id() % SPAN));
    for _ in 0..SPAN {
        let port = (LOW + next.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        // Bindable on loopback and on every address (Redis binds one, lab hosts the other).
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN)
}

/// A `redis-server` owned by one test.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Data directory, when persistence is on (removed on drop).
    dir: Option<std::path::PathBuf>,
    /// Address it binds (loopback unless it runs on a lab host).
    pub host: String,
    /// Network namespace it runs in, if any.
    netns: Option<String>,
}

impl Redis {
    pub fn start() -> Self {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: None,
            host: "127.0.0.1".into(),
            netns: None,
        };
        r.spawn();
        r
    }

    /// A Redis on a lab host: inside network namespace `netns`, bound to `host`.
    pub fn start_in(netns: &str, host: &str) -> Self {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: None,
            host: host.into(),
            netns: Some(netns.into()),
        };
        r.spawn();
        r
    }

    /// A Redis on a port chosen beforehand (e.g. one a gateway already points at).
    pub fn start_on(port: u16) -> Self {
        let mut r = Redis {
            port,
            child: None,
            dir: None,
            host: "127.0.0.1".into(),
            netns: None,
        };
        r.spawn();
        r
    }

    /// A Redis that keeps its data across restarts (AOF, fsync on every write).
    pub fn start_persistent() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "sse-gateway-test-redis-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut r = Redis {
            port,
            child: None,
            dir: Some(dir),
            host: "127.0.0.1".into(),
            netns: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let host = self.host.clone();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            host.as_str(),
            "--save",
            "",
            "--protected-mode",
            "no",
        ];
        let dir = self.dir.as_ref().map(|d| d.to_string_lossy().into_owned());
        match &dir {
            Some(d) => args.extend([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                d.as_str(),
            ]),
            None => args.extend(["--appendonly", "no"]),
        }
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-server"]);
                c
            }
            None => Command::new("redis-server"),
        };
        let child = cmd
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A plain connection, for commands a test sends itself.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    /// Freezes the server (SIGSTOP: sockets stay open, nothing is answered) until `gw` turns
    /// unready, then thaws it; how long the replica took to notice.
    pub async fn stall_until_unready(&self, gw: &Gateway) -> Duration {
        self.signal("STOP");
        let noticed = gw.wait_ready(false, Duration::from_secs(15)).await;
        self.signal("CONT");
        noticed
    }

    /// Drops every pub/sub client, as a proxy restart or a failover does to the replicas.
    pub fn kill_pubsub_clients(&self) {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut self.conn())
            .expect("CLIENT KILL TYPE pubsub");
    }

    /// `PUBLISH` from outside the gateway; how many subscribers Redis counted.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn())
            .expect("PUBLISH")
    }

    pub fn numsub(&self, channel: &str) -> i64 {
        let v: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.conn())
            .expect("PUBSUB NUMSUB");
        v.1
    }

    /// Waits until `PUBSUB NUMSUB channel` equals `n`; returns how long it took.
    pub fn wait_numsub(&self, channel: &str, n: i64, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.numsub(channel);
            if got == n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "NUMSUB {channel} stayed {got}, wanted {n} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A gateway process built from this crate.
pub struct Gateway {
    child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub stdout: Arc<Mutex<String>>,
    pub logs: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts with the test secret and these extra `SSE_GATEWAY_*` settings.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut all = vec![("SSE_GATEWAY_JWT_SECRET", SECRET)];
        all.extend_from_slice(env);
        Self::start_raw(&all)
    }

    /// Starts with exactly these settings (plus loopback ports and JSON logs).
    pub fn start_raw(env: &[(&str, &str)]) -> Self {
        Self::try_start(env).expect("gateway starts")
    }

    /// Starts, or returns the exit status and stderr of a process that refused to start.
    pub fn try_start(env: &[(&str, &str)]) -> Result<Self, (Option<i32>, String)> {
        Self::try_start_in(None, env)
    }

    /// Starts with the test secret inside network namespace `netns` (a lab host).
    pub fn start_in(netns: &str, env: &[(&str, &str)]) -> Self {
        let mut all = vec![("SSE_GATEWAY_JWT_SECRET", SECRET)];
        all.extend_from_slice(env);
        Self::try_start_in(Some(netns), &all).expect("gateway starts")
    }

    fn try_start_in(
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self, (Option<i32>, String)> {
        let binary = gateway_binary();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        for (k, _) in std::env::vars() {
            if k.starts_with("SSE_GATEWAY_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SSE_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("SSE_GATEWAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("SSE_GATEWAY_LOG_FORMAT", "json")
            .env("SSE_GATEWAY_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let stdout = Arc::new(Mutex::new(String::new()));
        let logs = Arc::new(Mutex::new(String::new()));
        {
            let out = child.stdout.take().expect("stdout");
            let sink = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        {
            let err = child.stderr.take().expect("stderr");
            let sink = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "listening" {
                            // Where others reach the admin port (the bound address unless
                            // that is unspecified).
                            let admin = v["advertised"].as_str().or(v["admin"].as_str());
                            let _ = tx.send((
                                v["client"].as_str().unwrap_or("").to_string(),
                                admin.unwrap_or("").to_string(),
                            ));
                        }
                    }
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((client, admin)) => Ok(Gateway {
                child,
                client: client.parse().expect("client addr"),
                admin: admin.parse().expect("admin addr"),
                stdout,
                logs,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok().and_then(|s| s.code());
                std::thread::sleep(Duration::from_millis(100));
                let text = logs.lock().unwrap().clone();
                Err((status, text))
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if start.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn readyz(&self) -> u16 {
        http(self.admin, "GET", "/readyz", &[], b"").await.status
    }

    pub async fn wait_ready(&self, ready: bool, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if (self.readyz().await == 200) == ready {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "readiness did not become {ready} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics", &[], b"").await.text()
    }

    /// The value of one metric line (name with labels, exactly as rendered); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        crate::metrics::sample(&self.metrics().await, series).unwrap_or(0.0)
    }

    pub async fn publish(&self, token: &str, body: &serde_json::Value) -> Reply {
        publish_to(self.client, token, body).await
    }

    /// Opens a stream for `sub` on `channel` (a token granting it) and waits until it is live
    /// (its first `id:` arrived).
    pub async fn subscribe(&self, sub: &str, channel: &str) -> SseClient {
        let token = client_token(sub, &[channel]);
        let path = format!("/events?channel={channel}");
        let mut stream = SseClient::open(self.client, &path, Some(&token))
            .await
            .unwrap_or_else(|r| panic!("{path} refused: {} {}", r.status, r.text()));
        stream.wait_id(Duration::from_secs(10)).await;
        stream
    }

    /// Publishes `data` on `channel` with a publisher token (must be accepted); its id there.
    pub async fn publish_data(&self, channel: &str, data: &str) -> String {
        let r = self
            .publish(
                &publisher_token(),
                &serde_json::json!({"channel": channel, "data": data}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["ids"][channel]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// `POST /publish` on a replica's client address.
pub async fn publish_to(client: SocketAddr, token: &str, body: &serde_json::Value) -> Reply {
    let auth = format!("Bearer {token}");
    http(
        client,
        "POST",
        "/publish",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
