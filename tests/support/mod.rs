//! Test fixtures: a real `redis-server` on a free port, real gateway processes, and a raw
//! HTTP/1.1 SSE client that sees the bytes on the wire.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

pub mod topology;

/// The HS256 secret test gateways share.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

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
        let binary = env!("CARGO_BIN_EXE_sse-gateway");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, binary]);
                c
            }
            None => Command::new(binary),
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

    /// The value of one metric line (name with labels, exactly as rendered).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub async fn publish(&self, token: &str, body: &serde_json::Value) -> Reply {
        publish_to(self.client, token, body).await
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

/// Mints an HS256 token with the test secret.
pub fn token(claims: serde_json::Value) -> String {
    token_with(claims, SECRET)
}

pub fn token_with(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A subscriber token for `sub` granting `channels`, valid for an hour.
pub fn client_token(sub: &str, channels: &[&str]) -> String {
    token(serde_json::json!({"sub": sub, "exp": now() + 3600, "channels": channels}))
}

/// A publisher token for every channel.
pub fn publisher_token() -> String {
    token(serde_json::json!({"exp": now() + 3600, "publish": ["*"]}))
}

/// A complete HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn read_head(
    reader: &mut TokioBufReader<TcpStream>,
) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut all_headers = headers.to_vec();
    all_headers.push(("Connection", "close"));
    stream
        .write_all(&request_bytes(method, path, &all_headers, body))
        .await
        .expect("write");
    let mut reader = TokioBufReader::new(stream);
    let (status, headers) = read_head(&mut reader).await.expect("head");
    let mut body = Vec::new();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match len {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body).await.expect("body");
        }
        None => {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut body)).await;
        }
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A raw HTTP/1.1 SSE stream: decodes chunked transfer coding and keeps every byte.
pub struct SseClient {
    reader: TokioBufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Every body byte received so far.
    pub raw: Vec<u8>,
    parsed_upto: usize,
    pub closed: bool,
    /// The last `id:` seen, as a browser keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
}

impl SseClient {
    /// Opens `/events…`; a non-200 answer comes back as `Err(Reply)`.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> Result<SseClient, Reply> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Accept", "text/event-stream")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        Self::open_with(addr, path, &headers).await
    }

    pub async fn open_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, Reply> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(&request_bytes("GET", path, headers, b""))
            .await
            .expect("write");
        let mut reader = TokioBufReader::new(stream);
        let (status, headers) = read_head(&mut reader).await.expect("head");
        if status != 200 {
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).await.expect("error body");
            return Err(Reply {
                status,
                headers,
                body,
            });
        }
        Ok(SseClient {
            reader,
            status,
            headers,
            raw: Vec::new(),
            parsed_upto: 0,
            closed: false,
            last_id: None,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Reads one chunk into `raw`; false at the end of the stream.
    async fn read_chunk(&mut self) -> bool {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                self.closed = true;
                return false;
            }
            Ok(_) => {}
        }
        let Ok(size) = usize::from_str_radix(line.trim(), 16) else {
            self.closed = true;
            return false;
        };
        if size == 0 {
            self.closed = true;
            return false;
        }
        let mut chunk = vec![0; size + 2];
        if self.reader.read_exact(&mut chunk).await.is_err() {
            self.closed = true;
            return false;
        }
        chunk.truncate(size);
        self.raw.extend_from_slice(&chunk);
        true
    }

    /// Reads until `raw` holds `needle` (after `from`), or the deadline.
    pub async fn read_until_contains(&mut self, needle: &[u8], within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.raw.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Ok(true) => {}
                _ => return false,
            }
        }
    }

    /// The next complete event (comments and `retry:`-only blocks skipped), or `None` on
    /// timeout or end of stream.
    pub async fn next_event(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = find(&self.raw[self.parsed_upto..], b"\n\n") {
                let block = self.raw[self.parsed_upto..self.parsed_upto + end].to_vec();
                self.parsed_upto += end + 2;
                let (id, ev) = parse_block(&block);
                if id.is_some() {
                    self.last_id = id;
                }
                if let Some(ev) = ev {
                    return Some(ev);
                }
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Ok(true) => {}
                _ => return None,
            }
        }
    }

    /// Reads until an `id:` has been seen (the cursor a new stream starts with).
    pub async fn wait_id(&mut self, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        while self.last_id.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no id: line arrived; got {:?}",
                self.text()
            );
            let _ = self.next_event(left.min(Duration::from_millis(100))).await;
        }
        self.last_id.clone().unwrap_or_default()
    }

    /// Whether the server ends the stream within `within` (events on the way are kept).
    pub async fn wait_closed(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.closed {
            if tokio::time::timeout_at(deadline, self.read_chunk())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// The body received so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_block(block: &[u8]) -> (Option<String>, Option<SseEvent>) {
    let text = String::from_utf8_lossy(block);
    let mut ev = SseEvent::default();
    let mut data: Option<Vec<String>> = None;
    for line in text.split('\n') {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => ev.id = Some(value.to_string()),
            "event" => ev.event = Some(value.to_string()),
            "data" => data.get_or_insert_with(Vec::new).push(value.to_string()),
            _ => {}
        }
    }
    // Data lines join with LF, as the WHATWG parser does.
    let id = ev.id.clone();
    match data {
        Some(lines) => {
            ev.data = lines.join("\n");
            (id, Some(ev))
        }
        None => (id, None),
    }
}
