//! sse-gateway: a horizontally scaled Server-Sent Events gateway over Redis pub/sub.
//!
//! # The message flow is the architecture
//!
//! ```text
//! Redis  ->  broker/redis.rs  ->  broker::dispatch -> hub.rs  ->  sse/stream.rs  ->  hyper  ->  socket
//! client ->  server.rs -> router.rs -> sse/mod.rs (auth, limits, subscribe) -> sse/stream.rs
//! POST /publish -> publish.rs -> history (FCALL: store + PUBLISH in one step) -> the first line
//! resume  -> sse/resume.rs: subscribe first, replay history after the cursor, then live (dedup)
//! ```
//!
//! An event is parsed once (`event.rs`, the envelope rule), encoded once (`sse/frame.rs`) into
//! `Bytes`, and every local subscriber gets a clone of those bytes through its bounded queue.
//!
//! # Module map
//! - `config`: every setting (flag + env), validated once.
//! - `auth`: JWT verification and minting; `channel`: names and grants.
//! - `server`: accept loops; `conn`: the connection a request arrived on (a leaf, so the
//!   handlers need not know the accept loops); `h1stream`: the lean HTTP/1.1 path of `GET /events`;
//!   `router`: method + path; `request`: query and token extraction.
//! - `sse`: `GET /events` (`mod`), the body state machine (`stream`), the encoder (`frame`).
//! - `publish`: `POST /publish`; `event`: payload -> event.
//! - `hub`: local fan-out; `broker`: cross-replica transport (memory, Redis).
//! - `history`: durable events, positions and resume cursors (memory, Redis streams).
//! - `limits`: per-user slots across replicas (memory, Redis with per-replica leases).
//! - `shutdown`: the drain; `metrics`: names and exporter; `error`: refusals -> HTTP.
//! - `watchdog`: the deadlines of streams served by hyper while their writer is blocked, and
//!   the per-stream task (and cut) of every HTTP/2 stream.
//! - `devmode`: what a plain start prints.
//!
//! `run` (with `backends`) is the one place that picks concrete backends (memory or Redis
//! broker, history and limiter); files import each other without cycles (`tests/layers.rs`).

pub mod auth;
pub mod backend;
pub mod backoff;
pub mod body;
pub mod broker;
pub mod channel;
pub mod config;
pub mod conn;
pub mod cors;
pub mod devmode;
pub mod diagnostics;
pub mod error;
pub mod event;
pub mod h1stream;
pub mod history;
pub mod hub;
pub mod inspect;
pub mod limits;
pub mod metrics;
pub mod publish;
pub mod request;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod tls;
pub mod watchdog;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, JwtKey};
use crate::history::{memory::MemoryHistory, redis::RedisHistory, History};
use crate::hub::Hub;
use crate::limits::{memory::MemoryLimiter, redis::RedisLimiter, Limiter};
use crate::state::AppState;

/// The shared state a replica keeps outside itself: in memory, or in Redis.
struct Backends {
    /// Cross-replica event transport.
    broker: Arc<dyn Broker>,
    /// Per-user slots.
    limiter: Arc<dyn Limiter>,
    /// Durable events; `None` when `SSE_GATEWAY_HISTORY_SIZE` is 0.
    history: Option<Arc<dyn History>>,
}

/// Builds the broker and the per-user limiter the configuration asks for.
fn backends(
    config: &Config,
    hub: Arc<Hub>,
    admin_addr: String,
    replica_id: &str,
) -> Result<Backends, String> {
    let keep_history = config.history_size > 0;
    match &config.redis_url {
        None => Ok(Backends {
            broker: Arc::new(broker::memory::MemoryBroker::new(
                hub.clone(),
                config.max_event_bytes,
            )),
            limiter: Arc::new(MemoryLimiter::new(config.max_connections_per_user)),
            history: keep_history.then(|| {
                MemoryHistory::new(
                    config.history_size as usize,
                    config.history_ttl,
                    config.max_event_bytes,
                    hub,
                ) as Arc<dyn History>
            }),
        }),
        Some(url) => {
            let pool = crate::backend::Commands::new(
                crate::backend::Topology::parse(url)
                    .map_err(|e| format!("SSE_GATEWAY_REDIS_URL: {e}"))?,
            );
            let history = keep_history.then(|| RedisHistory::new(pool.clone(), config));
            let broker = broker::redis::RedisBroker::start(
                config,
                hub.clone(),
                pool.clone(),
                history.clone(),
            )?;
            let limiter =
                RedisLimiter::start(pool, config, hub, admin_addr, replica_id.to_string());
            Ok(Backends {
                broker: Arc::new(broker),
                limiter: Arc::new(limiter),
                history: history.map(|h| Arc::new(h) as Arc<dyn History>),
            })
        }
    }
}

/// Listens with a deep accept queue (the kernel caps it at `net.core.somaxconn`): a burst of
/// clients, such as a replica's streams moving after a deploy, waits in the queue instead of
/// losing SYNs and retrying a second later.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Runs a replica until `shutdown` completes, then drains and returns.
pub async fn run(
    config: Config,
    exporter: Option<metrics::Exporter>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let client = listen(config.listen).map_err(|e| {
        format!(
            "SSE_GATEWAY_LISTEN: cannot listen on {}: {e}",
            config.listen
        )
    })?;
    let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
        format!(
            "SSE_GATEWAY_ADMIN_LISTEN: cannot listen on {}: {e}",
            config.admin_listen
        )
    })?;
    let client_addr = client.local_addr().map_err(|e| e.to_string())?;
    let tls = match &config.tls {
        Some((cert, key)) => {
            let tls = tls::Tls::new(cert.clone(), key.clone())
                .map_err(|e| format!("SSE_GATEWAY_TLS_CERT_FILE: {e}"))?;
            tls.spawn_reloader();
            Some(tls)
        }
        None => None,
    };
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;

    let hub = Arc::new(hub::Hub::new());
    let verifier = auth::Verifier::new(&config)?;
    let replica_id = format!("{:016x}", rand::random::<u64>());
    let advertised = config::admin_advertise(config.admin_advertise.as_deref(), admin_addr);
    let backends = backends(&config, hub.clone(), advertised.clone(), &replica_id)?;
    if config.single_replica() {
        tracing::warn!("SSE_GATEWAY_REDIS_URL is unset: single-replica mode with an in-process broker; do not run more than one replica like this");
    }
    if let JwtKey::Development(_) = config.jwt_key {
        tracing::warn!("DEVELOPMENT MODE: no SSE_GATEWAY_JWT_SECRET or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE; tokens are signed with a random key");
        print!("{}", devmode::instructions(&config, client_addr)?);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let state = Arc::new(AppState::new(
        config,
        hub,
        backends.broker,
        verifier,
        backends.limiter,
        backends.history,
        replica_id.clone(),
    ));
    let stop = CancellationToken::new();
    // The client port stops accepting once the drain has asked every stream to leave; the
    // admin port (probes, metrics) serves until the end.
    let stop_client = CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    tokio::spawn(server::serve_client(
        client,
        state.clone(),
        tls,
        stop_client.clone(),
        connections.clone(),
    ));
    tokio::spawn(server::serve_admin(
        admin,
        state.clone(),
        exporter,
        stop.clone(),
    ));
    tracing::info!(client = %client_addr, admin = %admin_addr, advertised = %advertised, replica = %replica_id, "listening");

    shutdown.await;
    shutdown::drain(&state, &connections, &stop_client).await;
    state.limiter.flush().await;
    stop.cancel();
    Ok(())
}
