//! Connections and tokens the scenarios share, on top of `sse-testkit` (the HTTP/1.1 request
//! writer and head reader, the SSE decoder, HS256 minting and metric scraping the gateway's
//! own tests use).
//!
//! The client speaks HTTP/1.1 by hand (one small request, then the body read straight off the
//! socket) so that tens of thousands of streams cost the generator little, and so that the same
//! client works against sse-gateway and the peers it is compared with (Nchan, the Python stack).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sse_testkit::http::{exchange, read_head, request_bytes};
use tokio::io::AsyncWriteExt;
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

/// How the tool signs its tokens: with the replicas' HS256 secret, or with a private key (PEM;
/// RS256, ES256 or EdDSA by the key's type) whose public half the replicas verify with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Signer {
    secret: String,
    /// The private key in PEM, when tokens are signed with one.
    pem: Option<String>,
}

impl Signer {
    /// Signs with `secret`, or with the private key in the file `pem_file` when given.
    pub(crate) fn new(secret: &str, pem_file: Option<&std::path::Path>) -> Result<Self, String> {
        let pem = match pem_file {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--private-key-file {}: {e}", path.display()))?,
            ),
        };
        let signer = Self {
            secret: secret.to_string(),
            pem,
        };
        // Fail at the start, not in every worker: the key must be one of the three kinds.
        signer.key()?;
        Ok(signer)
    }

    fn key(&self) -> Result<(EncodingKey, Algorithm), String> {
        let Some(pem) = &self.pem else {
            return Ok((
                EncodingKey::from_secret(self.secret.as_bytes()),
                Algorithm::HS256,
            ));
        };
        let pem = pem.as_bytes();
        EncodingKey::from_rsa_pem(pem)
            .map(|k| (k, Algorithm::RS256))
            .or_else(|_| EncodingKey::from_ec_pem(pem).map(|k| (k, Algorithm::ES256)))
            .or_else(|_| EncodingKey::from_ed_pem(pem).map(|k| (k, Algorithm::EdDSA)))
            .map_err(|_| {
                "--private-key-file: not an RSA, EC (P-256) or Ed25519 private key in PEM".into()
            })
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        match self.key() {
            Ok((key, alg)) => {
                jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap_or_default()
            }
            Err(_) => String::new(),
        }
    }
}

/// A subscriber token for one channel, valid for a day.
pub(crate) fn mint(signer: &Signer, sub: &str, channel: &str) -> String {
    let exp = unix_nanos() / 1_000_000_000 + 86_400;
    signer.sign(&serde_json::json!({ "sub": sub, "exp": exp, "channels": [channel] }))
}

/// A publisher token for every channel.
pub(crate) fn mint_publisher(signer: &Signer) -> String {
    let exp = unix_nanos() / 1_000_000_000 + 86_400;
    signer.sign(&serde_json::json!({ "sub": "loadtest-publisher", "exp": exp, "publish": ["*"] }))
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
    let auth = format!("Bearer {token}");
    let host = target.to_string();
    let mut headers = vec![
        ("Host", host.as_str()),
        ("Authorization", auth.as_str()),
        ("Accept", "text/event-stream"),
    ];
    if let Some(id) = last_event_id {
        headers.push(("Last-Event-ID", id));
    }
    let path = format!("/events?channel={channel}");
    tcp.write_all(&request_bytes("GET", &path, &headers, b""))
        .await
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::with_capacity(1024);
    let head = read_head(&mut tcp, &mut rest).await?;
    if head.status != 200 {
        return Err(format!("HTTP {}", head.status));
    }
    // A browser-style request (Accept: text/event-stream) refused for a passing reason gets a
    // 200 stream holding only `gateway.refused` (SPEC §6.3): a refusal, not a stream.
    if let Some(code) = refused_in_band(&rest) {
        return Err(format!("gateway.refused {code}"));
    }
    Ok(Stream {
        tcp,
        rest,
        chunked: head.chunked(),
    })
}

/// The error code of an in-band refusal (`event: gateway.refused`, `data: {"error": CODE, …}`)
/// among the first body bytes, if they hold one.
pub(crate) fn refused_in_band(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let at = text.find("event: gateway.refused")?;
    let after = &text[at..];
    let code = after
        .find("\"error\"")
        .and_then(|i| after[i + 7..].split('"').nth(1))
        .unwrap_or("unknown");
    Some(code.to_string())
}

/// The payload convention of every scenario: `<intended send time in ns>[ <sequence>]`.
pub(crate) fn stamp(data: &str) -> Option<(u64, Option<u64>)> {
    let mut words = data.split_ascii_whitespace();
    let sent = words.next()?.parse().ok()?;
    Some((sent, words.next().and_then(|s| s.parse().ok())))
}

/// Reads one Prometheus sample from a replica's `/metrics`.
pub(crate) async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    sse_testkit::metrics::sample(&sse_testkit::metrics::scrape(admin).await?, name)
}

/// Sends one HTTP/1.1 POST on a keep-alive connection and reads the answer; returns the status.
pub(crate) async fn post(
    tcp: &mut TcpStream,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    buf: &mut Vec<u8>,
) -> Result<u16, String> {
    let mut all = vec![("Host", host)];
    all.extend_from_slice(headers);
    exchange(
        tcp,
        &request_bytes("POST", path, &all, body.as_bytes()),
        buf,
    )
    .await
    .map(|reply| reply.status)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_in_band_refusal_is_read_as_one() {
        let body = b"retry: 4100\n\nevent: gateway.refused\ndata: {\"error\": \"capacity\", \"message\": \"x\"}\n\n";
        assert_eq!(super::refused_in_band(body).as_deref(), Some("capacity"));
        assert_eq!(super::refused_in_band(b"retry: 3000\n\n: ok\n\n"), None);
    }
}
