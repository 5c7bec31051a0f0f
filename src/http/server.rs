//! Accept loops for the client and admin ports.
//!
//! Invariants: an accept error (EMFILE, ENOBUFS, …) never ends the loop or spins it: the loop
//! backs off and retries while open streams keep being served. Every connection runs in its own
//! task under a span carrying its id, and can be cancelled as a whole (the slow-consumer cut).
//! HTTP/1.1 buffers are bounded, and header reads time out, so no client grows memory at will.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::core::backoff::Backoff;
use crate::http::conn::ConnInfo;
use crate::http::h1stream::{self, Rewind, Start};
use crate::http::router;
use crate::http::state::AppState;
use crate::http::watchdog::{StreamExecutor, Watch};
use crate::metrics::Exporter;
use crate::tls::Tls;

/// Largest HTTP/1.1 read or write buffer per connection (also bounds request headers).
const MAX_BUF: usize = 64 * 1024;
fn builder<E: Clone>(exec: E, heartbeat: Duration, header_timeout: Duration) -> auto::Builder<E> {
    let mut b = auto::Builder::new(exec);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(heartbeat))
        .keep_alive_timeout(heartbeat.max(Duration::from_secs(5)));
    b
}

/// Accepts with backoff on errors; `None` once `stop` is cancelled.
async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    port: &'static str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_log: Option<Instant> = None;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => r,
        };
        match result {
            Ok(pair) => return Some(pair),
            Err(e) => {
                let delay = backoff.next_delay();
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    tracing::warn!(
                        port,
                        retry_in_ms = delay.as_millis() as u64,
                        "accept failed: {e}; open streams are unaffected (if this is 'Too many open files', raise the fd limit or lower SSE_GATEWAY_MAX_CONNECTIONS)"
                    );
                    last_log = Some(Instant::now());
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Serves `/events` and `/publish` (over TLS when `tls` is set) until `stop` is cancelled.
///
/// At most `MAX_CONNECTIONS + MAX_PENDING_HANDSHAKES` client sockets are open at once (SPEC
/// §6.2): past that, new connections wait in the kernel's accept queue until one closes, so a
/// flood of idle sockets cannot exhaust file descriptors.
pub async fn serve_client(
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Option<Tls>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let sockets = Arc::new(Semaphore::new(socket_cap(&state)));
    let ids = AtomicU64::new(1);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = sockets.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let Some((stream, remote)) = accept(&listener, &stop, "client").await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        // A client that vanished without FIN or RST is noticed once written bytes stay
        // unacknowledged this long.
        let _ =
            socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(state.config.write_timeout));
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let conn_info = ConnInfo {
            id,
            remote,
            kill: CancellationToken::new(),
        };
        let state = state.clone();
        let span = tracing::info_span!("conn", id, remote = %remote);
        let acceptor = tls.as_ref().map(Tls::acceptor);
        connections.spawn(
            async move {
                let _permit = permit;
                match acceptor {
                    None => serve(stream, state, conn_info).await,
                    // Boxed: a TLS connection's state is large, and plain connections
                    // should not pay for it in every task.
                    Some(acceptor) => {
                        Box::pin(async move {
                            // The handshake gets the same time budget as request headers.
                            let limit = state.config.header_timeout;
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => serve(tls_stream, state, conn_info).await,
                                Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                                Err(_) => tracing::debug!("TLS handshake timed out"),
                            }
                        })
                        .await
                    }
                }
            }
            .instrument(span),
        );
    }
}

fn socket_cap(state: &AppState) -> usize {
    let cap = state
        .config
        .max_connections
        .saturating_add(state.config.max_pending_handshakes as u64);
    usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// Serves one client connection until it ends or the gateway cuts it: a plain HTTP/1.1
/// `GET /events` on the lean path, everything else with hyper.
async fn serve<I>(mut io: I, state: Arc<AppState>, conn_info: ConnInfo)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The big futures (hyper's connection, the request handler) are boxed, so that the task of
    // a long-lived stream is only as large as the stream's own state: per-stream memory.
    match Box::pin(h1stream::classify(&mut io, state.config.header_timeout)).await {
        Start::Closed => {}
        Start::Stream(req) => {
            // The lean path enforces its deadlines in its own write loop (no watch needed).
            let cut = conn_info.kill.clone();
            tokio::select! {
                _ = h1stream::serve(io, req, state, conn_info) => {}
                _ = cut.cancelled() => tracing::debug!("connection cut by the gateway"),
            }
        }
        Start::Hyper(prefix) => {
            let h2 = prefix.starts_with(H2_PREFACE);
            let watch = Watch::new(conn_info.kill.clone());
            let served = watch.guard(Box::pin(serve_hyper(
                Rewind::new(prefix, io),
                h2,
                state,
                conn_info,
            )));
            if Box::pin(served).await.is_none() {
                tracing::debug!("connection cut by the gateway");
            }
        }
    }
}

/// How an HTTP/2 connection with prior knowledge (or after ALPN) starts.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Serves a connection with hyper (HTTP/1.1 keep-alive, HTTP/2, errors). An HTTP/2
/// connection with no open stream for `SSE_GATEWAY_HEADER_TIMEOUT_SECS` is told GOAWAY and
/// closed (SPEC §6.2): otherwise a client with no token could hold sockets with pings alone.
async fn serve_hyper<I>(io: I, h2: bool, state: Arc<AppState>, conn_info: ConnInfo)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let exec = StreamExecutor::default();
    let streams = exec.streams();
    let header_timeout = state.config.header_timeout;
    let builder = builder(exec, state.config.heartbeat, header_timeout);
    let drain = state.clone();
    let service = service_fn(move |req| {
        let state = state.clone();
        let conn_info = conn_info.clone();
        async move { Ok::<_, Infallible>(router::client(state, req, conn_info).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = async {
        if h2 {
            streams.idle_for(header_timeout).await
        } else {
            std::future::pending().await
        }
    };
    tokio::pin!(idle);
    // GOAWAY sent (or, for HTTP/1.1, no further request taken); `idle_close` also bounds how
    // long a stream-less connection may take to finish.
    let mut goaway = false;
    let mut idle_close = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = idle.as_mut(), if !goaway => {
                tracing::debug!("HTTP/2 connection without a stream past SSE_GATEWAY_HEADER_TIMEOUT_SECS: closing");
                goaway = true;
                idle_close = true;
                conn.as_mut().graceful_shutdown();
            }
            // The drain: clients learn at once that this connection takes no new streams, and
            // the streams it carries end as the drain closes them.
            _ = drain.draining_started(), if !goaway => {
                goaway = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(header_timeout), if idle_close => return,
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop` is cancelled, then closes its
/// connections gracefully (an answer in progress is finished) and returns once they are gone.
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AppState>,
    exporter: Option<Exporter>,
    stop: CancellationToken,
) {
    let builder = builder(
        TokioExecutor::new(),
        Duration::from_secs(30),
        state.config.header_timeout,
    );
    let connections = TaskTracker::new();
    while let Some((stream, _)) = accept(&listener, &stop, "admin").await {
        let state = state.clone();
        let exporter = exporter.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let response = router::admin(&state, exporter.as_ref(), &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(ADMIN_CLOSE_GRACE, connection).await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// How long an admin answer in progress may take to finish once the replica stops.
const ADMIN_CLOSE_GRACE: Duration = Duration::from_secs(2);
