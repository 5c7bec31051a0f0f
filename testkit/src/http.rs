//! HTTP/1.1 by hand, on purpose: a test must see exactly the bytes a browser or `curl -N`
//! receives (heads, chunk boundaries, what arrives before a close), and the load tool must open
//! tens of thousands of streams cheaply; a high-level client would hide the first and cost the
//! second. One request writer and one head reader serve both.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sse::{Block, Dechunker, Decoder, SseEvent};

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header names and values as received.
    pub headers: Vec<(String, String)>,
    /// The body as received (not de-chunked).
    pub body: Vec<u8>,
}

/// The first header called `name` (any case) among `headers`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Reply {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A request's bytes; `Host: localhost` unless `headers` names a host, and `Content-Length`
/// whenever there is a body (and on every POST).
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: localhost\r\n");
    }
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

/// A response head: status and headers.
#[derive(Debug, Clone)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Whether the body uses chunked transfer coding.
    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    /// The declared body length.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }
}

/// Reads a response head off `tcp`; `buf` is cleared first and holds, afterwards, the bytes
/// read past the head (the start of the body).
pub async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, String> {
    buf.clear();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let status_line = lines.next().unwrap_or("");
            let status = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line {status_line:?}"))?;
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            return Ok(Head { status, headers });
        }
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request on a keep-alive connection and reads the whole answer (its body by
/// `Content-Length`); `buf` is the caller's, reused across requests.
pub async fn exchange(
    tcp: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Reply, String> {
    tcp.write_all(request).await.map_err(|e| e.to_string())?;
    let head = read_head(tcp, buf).await?;
    let len = head.content_length().unwrap_or(0);
    let mut chunk = [0u8; 2048];
    while buf.len() < len {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed inside the response body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Reply {
        status: head.status,
        headers: head.headers,
        body: buf.drain(..len).collect(),
    })
}

/// One request on a fresh connection (`Connection: close`); the body by `Content-Length`, or
/// whatever arrives until the close (5 s at most).
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply, String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut all = headers.to_vec();
    all.push(("Connection", "close"));
    tcp.write_all(&request_bytes(method, path, &all, body))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let head = read_head(&mut tcp, &mut buf).await?;
    match head.content_length() {
        Some(n) => {
            if buf.len() < n {
                let mut rest = vec![0; n - buf.len()];
                tcp.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
                buf.extend_from_slice(&rest);
            }
            buf.truncate(n);
        }
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        }
    }
    Ok(Reply {
        status: head.status,
        headers: head.headers,
        body: buf,
    })
}

/// [`try_http`] for tests: panics (failing the test) when the exchange fails.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    match try_http(addr, method, path, headers, body).await {
        Ok(reply) => reply,
        Err(e) => panic!("{method} {path} on {addr}: {e}"),
    }
}

/// A raw HTTP/1.1 SSE stream: undoes chunked transfer coding, keeps every body byte, and
/// decodes events as `EventSource` does.
pub struct SseClient {
    tcp: TcpStream,
    /// The status code (always 200: other answers come back as `Err(Reply)`).
    pub status: u16,
    /// The response headers.
    pub headers: Vec<(String, String)>,
    /// Every body byte received so far (de-chunked).
    pub raw: Vec<u8>,
    /// The server ended the stream (last chunk, or the connection closed).
    pub closed: bool,
    /// The last `id:` seen, as a browser keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
    /// `None` when the body is not chunked (read as it comes, until the close).
    dechunker: Option<Dechunker>,
    decoder: Decoder,
    /// Decoded blocks not yet handed out.
    blocks: std::collections::VecDeque<Block>,
    /// Bytes read past the head before the first read.
    pending: Vec<u8>,
}

impl SseClient {
    /// Opens `path` with a bearer token as a plain HTTP client does (`curl -N`, a mobile SDK):
    /// a refusal keeps its status and comes back as `Err(Reply)`.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> Result<SseClient, Reply> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        Self::open_with(addr, path, &headers).await
    }

    /// Opens `path` as a browser's `EventSource` does (`Accept: text/event-stream`): a passing
    /// refusal arrives in-band, as a `200` stream with `gateway.refused`.
    pub async fn open_event_source(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> Result<SseClient, Reply> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Accept", "text/event-stream")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        Self::open_with(addr, path, &headers).await
    }

    /// Opens `path` with exactly these headers.
    pub async fn open_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, Reply> {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&request_bytes("GET", path, headers, b""))
            .await
            .expect("write the request");
        let mut buf = Vec::new();
        let head = read_head(&mut tcp, &mut buf)
            .await
            .expect("a response head");
        if head.status != 200 {
            let len = head.content_length().unwrap_or(0);
            while buf.len() < len {
                let mut chunk = [0u8; 1024];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.truncate(len);
            return Err(Reply {
                status: head.status,
                headers: head.headers,
                body: buf,
            });
        }
        let chunked = head.chunked();
        Ok(SseClient {
            tcp,
            status: head.status,
            headers: head.headers,
            raw: Vec::new(),
            closed: false,
            last_id: None,
            dechunker: chunked.then(Dechunker::default),
            decoder: Decoder::new(false),
            blocks: std::collections::VecDeque::new(),
            pending: buf,
        })
    }

    /// The first response header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Reads once from the socket into `raw` (and the decoder); false at the end of the stream.
    async fn read_chunk(&mut self) -> bool {
        if self.closed {
            return false;
        }
        let bytes = if self.pending.is_empty() {
            let mut chunk = [0u8; 8192];
            match self.tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    self.closed = true;
                    return false;
                }
                Ok(n) => chunk[..n].to_vec(),
            }
        } else {
            std::mem::take(&mut self.pending)
        };
        let before = self.raw.len();
        match &mut self.dechunker {
            Some(d) => d.feed(&bytes, &mut self.raw),
            None => self.raw.extend_from_slice(&bytes),
        }
        let blocks = &mut self.blocks;
        self.decoder
            .feed(&self.raw[before..], |b| blocks.push_back(b));
        if self.dechunker.as_ref().is_some_and(|d| d.ended) {
            self.closed = true;
        }
        true
    }

    /// Reads until `raw` holds `needle`, or the deadline; whether it does.
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

    /// The next event a browser would fire (comments, `retry:`-only and id-only blocks
    /// skipped, though an `id:` still moves `last_id`), or `None` on timeout or end of stream.
    pub async fn next_event(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(block) = self.blocks.pop_front() {
                if block.id.is_some() {
                    self.last_id.clone_from(&block.id);
                }
                if let Some(event) = block.into_event() {
                    return Some(event);
                }
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Ok(true) => {}
                _ => return None,
            }
        }
    }

    /// Fails the test unless the next event (within 10 s) carries `data`.
    pub async fn expect_data(&mut self, data: &str) {
        match self.next_event(Duration::from_secs(10)).await {
            Some(event) => assert_eq!(event.data, data, "{event:?}"),
            None => panic!(
                "no event with data {data:?} within 10 s; got {:?}",
                self.text()
            ),
        }
    }

    /// Fails the test if an event arrives within `within` (`why` says what it would mean).
    pub async fn expect_nothing(&mut self, within: Duration, why: &str) {
        if let Some(event) = self.next_event(within).await {
            panic!("{why}: {event:?}");
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
