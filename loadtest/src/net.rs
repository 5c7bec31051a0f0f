//! Connections, tokens and the SSE decoder the scenarios share.
//!
//! The client speaks HTTP/1.1 by hand (one small request, then the body read straight off the
//! socket) so that tens of thousands of streams cost the generator little, and so that the same
//! client works against sse-gateway and the peers it is compared with (Nchan, the Python stack).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Waits until `start + offset` precisely: the timer wheel ticks per millisecond, so it sleeps to
/// just before the slot and yields until it, and timer rounding does not count as latency.
pub(crate) async fn wait_until(start: tokio::time::Instant, offset: Duration) {
    let due = start + offset;
    tokio::time::sleep_until(due - Duration::from_millis(2).min(offset)).await;
    while tokio::time::Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

/// Wall-clock nanoseconds: payloads carry their intended send time in this unit, so any process
/// on the box can compute a delivery's latency.
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn sign(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// A subscriber token for one channel, valid for a day.
pub(crate) fn mint(secret: &str, sub: &str, channel: &str) -> String {
    let exp = unix_nanos() / 1_000_000_000 + 86_400;
    sign(
        &serde_json::json!({ "sub": sub, "exp": exp, "channels": [channel] }),
        secret,
    )
}

/// A publisher token for every channel.
pub(crate) fn mint_publisher(secret: &str) -> String {
    let exp = unix_nanos() / 1_000_000_000 + 86_400;
    sign(
        &serde_json::json!({ "sub": "loadtest-publisher", "exp": exp, "publish": ["*"] }),
        secret,
    )
}

/// Connects from `source` when given. The socket is bound with `IP_BIND_ADDRESS_NO_PORT`, so the
/// kernel picks the port at connect time, unique per destination rather than per source address:
/// each 127.0.0.x then has a full ephemeral range towards every target.
pub(crate) async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let tcp = match source {
        None => TcpStream::connect(target).await?,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            bind_address_no_port(&socket);
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(target).await?
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Asks Linux to choose the source port at connect time (best effort: without it, binding still
/// works, with one ephemeral range per source address).
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, a valid pointer to an int and its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// An open stream, past its response head.
pub(crate) struct Stream {
    pub(crate) tcp: TcpStream,
    /// Bytes read past the head (start of the body).
    pub(crate) rest: Vec<u8>,
    /// Whether the body uses chunked transfer coding (Nchan and uvicorn may differ).
    pub(crate) chunked: bool,
}

/// Opens `GET /events?channel=…` with a bearer token (and `Last-Event-ID` when resuming) and
/// reads up to the end of a `200` head.
pub(crate) async fn open(
    target: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
    channel: &str,
    last_event_id: Option<&str>,
) -> Result<Stream, String> {
    let mut tcp = connect(target, source)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /events?channel={channel} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(head.lines().next().unwrap_or("").to_string());
            }
            return Ok(Stream {
                tcp,
                rest: buf[end + 4..].to_vec(),
                chunked: head.contains("transfer-encoding: chunked"),
            });
        }
    }
}

/// One SSE event as the client sees it.
#[derive(Default, Debug)]
pub(crate) struct Event {
    pub(crate) id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) data: String,
}

impl Event {
    /// The payload convention of every scenario: `<intended send time in ns>[ <sequence>]`.
    pub(crate) fn stamp(&self) -> Option<(u64, Option<u64>)> {
        let mut words = self.data.split_ascii_whitespace();
        let sent = words.next()?.parse().ok()?;
        Some((sent, words.next().and_then(|s| s.parse().ok())))
    }
}

/// Decodes the body of a stream (chunked or not) into SSE events, following the SSE parsing
/// rules closely enough for the three systems under test: fields `id`, `event`, `data`; a blank
/// line dispatches; comments are skipped.
pub(crate) struct Decoder {
    chunked: bool,
    raw: Vec<u8>,
    body: Vec<u8>,
    event: Event,
    has_data: bool,
}

impl Decoder {
    pub(crate) fn new(chunked: bool) -> Self {
        Self {
            chunked,
            raw: Vec::new(),
            body: Vec::new(),
            event: Event::default(),
            has_data: false,
        }
    }

    /// Feeds bytes read from the socket; calls `on_event` for every complete event.
    pub(crate) fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(Event)) {
        if self.chunked {
            self.raw.extend_from_slice(bytes);
            let mut at = 0;
            while let Some(eol) = self.raw[at..].windows(2).position(|w| w == b"\r\n") {
                let size = std::str::from_utf8(&self.raw[at..at + eol])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                    .unwrap_or(0);
                let start = at + eol + 2;
                if self.raw.len() < start + size + 2 {
                    break;
                }
                self.body.extend_from_slice(&self.raw[start..start + size]);
                at = start + size + 2;
            }
            self.raw.drain(..at);
        } else {
            self.body.extend_from_slice(bytes);
        }
        let mut consumed = 0;
        while let Some(nl) = self.body[consumed..].iter().position(|&b| b == b'\n') {
            let mut line = &self.body[consumed..consumed + nl];
            consumed += nl + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.is_empty() {
                // An id-only block still moves the client's cursor (as in the SSE spec), so it is
                // passed on; its empty data carries no stamp.
                if self.has_data || self.event.id.is_some() {
                    on_event(std::mem::take(&mut self.event));
                }
                self.event = Event::default();
                self.has_data = false;
                continue;
            }
            let text = String::from_utf8_lossy(line);
            let (field, value) = match text.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (text.as_ref(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.event.data.push('\n');
                    }
                    self.event.data.push_str(value);
                    self.has_data = true;
                }
                "id" => self.event.id = Some(value.to_string()),
                "event" => self.event.name = Some(value.to_string()),
                _ => {}
            }
        }
        self.body.drain(..consumed);
    }
}

/// Reads one Prometheus sample from a replica's `/metrics`.
pub(crate) async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sends one HTTP/1.1 POST on a keep-alive connection and reads the answer; returns the status.
pub(crate) async fn post(
    tcp: &mut TcpStream,
    host: &str,
    path: &str,
    headers: &str,
    body: &str,
    buf: &mut Vec<u8>,
) -> Result<u16, String> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    buf.clear();
    let mut chunk = [0u8; 2048];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return Ok(head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunked_events_split_anywhere() {
        let body =
            b"retry: 1000\n: ok\n\nid: a1\nevent: gateway.gap\ndata: {}\n\nid: a2\ndata: 123 7\n\n";
        let mut wire = Vec::new();
        for part in body.chunks(7) {
            wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            wire.extend_from_slice(part);
            wire.extend_from_slice(b"\r\n");
        }
        for split in [1, 3, 5, 64] {
            let mut d = Decoder::new(true);
            let mut got = Vec::new();
            for piece in wire.chunks(split) {
                d.feed(piece, |e| got.push(e));
            }
            assert_eq!(got.len(), 2, "split {split}");
            assert_eq!(got[0].name.as_deref(), Some("gateway.gap"));
            assert_eq!(got[1].id.as_deref(), Some("a2"));
            assert_eq!(got[1].stamp(), Some((123, Some(7))));
        }
    }

    #[test]
    fn decodes_plain_bodies_with_crlf_lines() {
        let mut d = Decoder::new(false);
        let mut got = Vec::new();
        d.feed(b"data: 5\r\n\r\ndata: 6\r\n", |e| got.push(e));
        d.feed(b"\r\n", |e| got.push(e));
        assert_eq!(
            got.iter().map(|e| e.stamp()).collect::<Vec<_>>(),
            vec![Some((5, None)), Some((6, None))]
        );
    }
}
