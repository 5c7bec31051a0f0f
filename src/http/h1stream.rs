//! A lean HTTP/1.1 path for `GET /events`: the request head is parsed here and the stream is
//! written straight to the socket as chunks, so an open stream keeps no HTTP buffers at all
//! (hyper keeps an 8–16 KiB read buffer per connection for as long as it lives, which is most of
//! an idle stream's memory). Everything else — other paths and methods, HTTP/2 prior knowledge,
//! bodies, pipelined requests, anything unusual or malformed — goes to hyper unchanged, with
//! the bytes already read put back in front of the connection.
//!
//! Invariants: the head must arrive within `SSE_GATEWAY_HEADER_TIMEOUT_SECS` and fit in 64 KiB
//! (otherwise hyper gets it and answers the error); while a stream is written, the socket is
//! read only to notice the client leaving; the response goes through the same router as hyper's,
//! so every check, header and refusal is identical.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::http::body::GatewayBody;
use crate::http::conn::ConnInfo;
use crate::http::router;
use crate::http::state::AppState;
use tokio::time::Instant;

/// Largest request head the lean path reads before handing over to hyper.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection turned out to be.
pub enum Start {
    /// A plain `GET /events` over HTTP/1.1: handled here.
    Stream(Request<Empty<Bytes>>),
    /// Anything else: serve with hyper, replaying these bytes first.
    Hyper(Bytes),
    /// The client sent nothing usable in time, or went away.
    Closed,
}

/// Reads the request head and decides who serves the connection.
pub async fn classify<I: AsyncRead + Unpin>(io: &mut I, timeout: std::time::Duration) -> Start {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if buf.len() >= MAX_HEAD {
                return Start::Hyper(buf.split().freeze());
            }
            buf.reserve(1024);
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    return if buf.is_empty() {
                        Start::Closed
                    } else {
                        Start::Hyper(buf.split().freeze())
                    }
                }
                Ok(_) => {}
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Partial) => continue,
                Ok(httparse::Status::Complete(len)) => {
                    let request = (len == buf.len()).then(|| lean_request(&parsed)).flatten();
                    return match request {
                        Some(req) => Start::Stream(req),
                        None => Start::Hyper(buf.split().freeze()),
                    };
                }
                // Too many headers, bad syntax, …: hyper answers it properly.
                Err(_) => return Start::Hyper(buf.split().freeze()),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(start) => start,
        Err(_) => Start::Closed,
    }
}

/// The request, if it is one the lean path serves: `GET /events…` over HTTP/1.1, no body, no
/// `Upgrade`.
fn lean_request(parsed: &httparse::Request<'_, '_>) -> Option<Request<Empty<Bytes>>> {
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    if path != "/events" && !path.starts_with("/events?") {
        return None;
    }
    let mut builder = Request::get(path).version(http::Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "upgrade"
        ) {
            return None;
        }
        builder = builder.header(h.name, h.value);
    }
    builder.body(Empty::new()).ok()
}

/// Serves one lean stream: the router's answer, written by hand; returns when it ends.
pub async fn serve<I>(mut io: I, req: Request<Empty<Bytes>>, state: Arc<AppState>, conn: ConnInfo)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // Boxed: the handler's state is large and only needed until the answer exists.
    let response = Box::pin(router::client(state, req, conn)).await;
    let _ = write_response(&mut io, response).await;
    let _ = io.shutdown().await;
}

fn head(response: &Response<GatewayBody>, extra: &str) -> Vec<u8> {
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(extra.as_bytes());
    head.extend_from_slice(b"\r\n");
    head
}

async fn write_response<I>(io: &mut I, response: Response<GatewayBody>) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let is_stream = matches!(response.body(), GatewayBody::Stream(_));
    if !is_stream {
        // Refusals and other complete answers: sent whole, then the connection closes.
        let head = head(&response, "connection: close\r\n");
        let body = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(head.len() + body.len() + 32);
        out.extend_from_slice(&head[..head.len() - 2]);
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        return io.write_all(&out).await;
    }
    let head = Bytes::from(head(&response, "transfer-encoding: chunked\r\n"));
    let mut body = response.into_body();
    let mut pending: Option<Bytes> = Some(head);
    let mut probe = [0u8; 64];
    let written: io::Result<()> = async {
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(Ok(frame)) = frame else {
                        // The stream ended (expiry, drain, …): the last chunk, then close.
                        let mut end = pending.take().map(|b| b.to_vec()).unwrap_or_default();
                        end.extend_from_slice(b"0\r\n\r\n");
                        return io.write_all(&end).await;
                    };
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    let size = Bytes::from(format!("{:x}\r\n", data.len()));
                    let prefix = match pending.take() {
                        Some(head) => {
                            let mut both = BytesMut::with_capacity(head.len() + size.len());
                            both.extend_from_slice(&head);
                            both.extend_from_slice(&size);
                            both.freeze()
                        }
                        None => size,
                    };
                    // Size line, data and CRLF in one vectored write. A write the socket does
                    // not take at once is raced against the stream's deadlines (SPEC §6.2):
                    // no bytes for SSE_GATEWAY_WRITE_TIMEOUT_SECS, or its token's expiry (or
                    // maximum age) passing while it is blocked, cut it. The timer is only
                    // armed when the write has to wait.
                    let mut chunk = prefix.chain(data).chain(&b"\r\n"[..]);
                    while chunk.has_remaining() {
                        // Most writes are taken at once: no clock read, no timer.
                        let n = match io.write_buf(&mut chunk).now_or_never() {
                            Some(n) => n?,
                            None => {
                                let Some((at, reason)) = body.write_deadline(Instant::now())
                                else {
                                    return Err(io::ErrorKind::Other.into());
                                };
                                tokio::select! {
                                    n = io.write_buf(&mut chunk) => n?,
                                    _ = tokio::time::sleep_until(at) => {
                                        body.close_as(reason);
                                        return Err(io::Error::new(
                                            io::ErrorKind::TimedOut,
                                            "the client's socket took no bytes before the stream's deadline",
                                        ));
                                    }
                                }
                            }
                        };
                        if n == 0 {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                    }
                }
                read = io.read(&mut probe) => {
                    // A client sends nothing after its request: end of file (or an error) means it
                    // has gone; anything else is ignored.
                    match read {
                        Ok(0) => return Ok(()),
                        Err(e) => return Err(e),
                        Ok(_) => {}
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = &written {
        tracing::debug!("stream socket failed: {e}");
        // TCP_USER_TIMEOUT (= SSE_GATEWAY_WRITE_TIMEOUT_SECS): the socket took no bytes. Said
        // before the body (and with it the stream's guard) drops.
        if e.kind() == io::ErrorKind::TimedOut {
            body.close_as(crate::core::hub::CloseReason::SlowConsumer);
        }
    }
    drop(body);
    written
}

/// An I/O object that first yields bytes already read from it.
pub struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                // Give the memory back as soon as it has been replayed.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn start_of(bytes: &[u8]) -> Start {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        classify(&mut server, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn only_plain_event_stream_requests_take_the_lean_path() {
        let lean = start_of(
            b"GET /events?channel=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
        )
        .await;
        match lean {
            Start::Stream(req) => {
                assert_eq!(req.uri(), "/events?channel=a");
                assert_eq!(req.headers()["authorization"], "Bearer t");
            }
            _ => panic!("a plain GET /events must take the lean path"),
        }
        let to_hyper: &[&[u8]] = &[
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /events HTTP/1.0\r\n\r\n",
            b"GET /events HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /events HTTP/1.1\r\nHost: x\r\n\r\nGET /events HTTP/1.1\r\n\r\n",
            b"GET /eventsfoo HTTP/1.1\r\n\r\n",
            b"\x00\xff garbage\r\n\r\n",
        ];
        for bytes in to_hyper {
            match start_of(bytes).await {
                Start::Hyper(prefix) => {
                    assert_eq!(&prefix[..], *bytes, "every byte goes back to hyper")
                }
                _ => panic!("{:?} must go to hyper", String::from_utf8_lossy(bytes)),
            }
        }
        assert!(matches!(start_of(b"").await, Start::Closed));
    }

    #[tokio::test]
    async fn a_slow_head_times_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /events HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            classify(&mut server, Duration::from_millis(200)).await,
            Start::Closed
        ));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
