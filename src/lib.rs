//! sse-gateway: a horizontally scaled Server-Sent Events gateway over Redis pub/sub.
//!
//! # The message flow is the architecture
//!
//! ```text
//! Redis  -> backends/broker/redis.rs -> core/sink.rs (EventSink) -> core/hub.rs -> http/stream -> socket
//! client -> http/server.rs -> http/router.rs -> http/events.rs (auth, limits, subscribe) -> http/stream
//! POST /publish -> http/publish.rs -> backends/history (FCALL: store + PUBLISH in one step) -> the first line
//! resume -> http/stream/resume.rs: subscribe first, replay history after the cursor, then live (dedup)
//! ```
//!
//! An event is parsed once (`core/event.rs`, the envelope rule), encoded once (`core/frame.rs`)
//! into `Bytes`, and every local subscriber gets a clone of those bytes through its bounded queue.
//!
//! # Layers (each imports only those below it; `tests/layers.rs` enforces it)
//! 1. `metrics` (names, the exporter) and `tls` (certificate loading): leaves.
//! 2. `core`: the vocabulary every other part shares — `event` (payload -> event), `frame`
//!    (event -> bytes), `channel` (names, grants), `position` (marks, cursors, the signed
//!    durable form), `hub` (local fan-out), `sink` (the `EventSink` backends deliver into),
//!    `backoff`. It knows neither Redis nor HTTP nor the settings, so it is tested alone and
//!    benchmarked as the hot path.
//! 3. `backends`: `broker` (events between replicas), `history` (durable events), `limits`
//!    (per-user slots), each a trait with a memory and a Redis implementation and its own
//!    settings struct, and `redis` (connections, deadlines, topologies). A backend never reads
//!    the command line and never touches a stream: it receives settings and an `EventSink`, so
//!    the same contract tests run against both implementations.
//! 4. `config` (every setting, validated once) and `auth` (JWT): the edge where the outside
//!    world's strings become typed values.
//! 5. `http`: sockets, requests, routes, the stream body and its deadlines, the drain. It holds
//!    the backends only as trait objects in `AppState`.
//! 6. `devmode` and `inspect`: what a plain start prints, and the operator's query tool.
//!
//! This file is the composition root: `run` (with `backends`) is the one place that picks
//! concrete backends, builds their settings from the `Config`, and wires the hub to them.
//! Modules are private; what tests, benchmarks and the load tool drive directly is re-exported
//! by [`testing`].

mod auth;
mod backends;
mod core;
mod devmode;
mod http;
mod jwks;
mod jwt_crypto;
mod metrics;
mod tls;

pub mod config;
pub mod inspect;

pub use crate::auth::{mint, Claims, Verifier};
pub use crate::metrics::Exporter;

/// What the integration tests, benchmarks, fuzz targets and the load tool reach inside the
/// crate: the building blocks they drive directly (hub, backends, encoders, cursors, the
/// parsers of outside input). Not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::backends::{broker, history, limits, presence, redis};
    pub use crate::core::{channel, event, frame, hub, position, sink};
    pub use crate::http::{h1stream, publish, request};
}

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::broker::{memory::MemoryBroker, redis::RedisBroker, BrokerSettings};
use crate::backends::history::redis::{Library, RedisHistory};
use crate::backends::history::{memory::MemoryHistory, History, HistorySettings};
use crate::backends::limits::{memory::MemoryLimiter, redis::RedisLimiter, LimitSettings};
use crate::backends::presence::{
    memory::MemoryPresence, redis::RedisPresence, Presence, PresenceSettings,
};
use crate::backends::redis::{Commands, Topology};
use crate::config::{Config, JwtKey};
use crate::core::hub::Hub;
use crate::core::sink::{EventSink, Fanout};
use crate::http::state::{AppState, Backends};
use crate::http::{server, shutdown};

/// Builds the broker, history and per-user limiter the configuration asks for: the one place
/// that turns settings into backends, so no backend reads the command line.
fn backends(
    config: &Config,
    hub: Arc<Hub>,
    admin_addr: String,
    replica_id: &str,
) -> Result<Backends, String> {
    let sink: Arc<dyn EventSink> = Fanout::new(hub.clone(), config.max_event_bytes);
    let history_settings = HistorySettings {
        prefix: config.channel_prefix.clone(),
        size: config.history_size,
        ttl: config.history_ttl,
        max_event_bytes: config.max_event_bytes,
    };
    let keep_history = config.history_size > 0;
    let presence_settings = PresenceSettings {
        prefix: config.channel_prefix.clone(),
        grace: config.presence_leave_grace,
        history_size: config.history_size,
        history_ttl: config.history_ttl,
    };
    let track_presence = !config.presence_channels.is_empty();
    match &config.redis_url {
        None => {
            let history = keep_history
                .then(|| MemoryHistory::new(&history_settings, sink.clone()) as Arc<dyn History>);
            // Presence needs history (the configuration refuses it otherwise).
            let presence = history
                .clone()
                .filter(|_| track_presence)
                .map(|h| MemoryPresence::new(&presence_settings, h) as Arc<dyn Presence>);
            Ok(Backends {
                broker: Arc::new(MemoryBroker::new(sink)),
                limiter: Arc::new(MemoryLimiter::new(config.max_connections_per_user)),
                history,
                presence,
            })
        }
        Some(url) => {
            let pool = Commands::new(
                Topology::parse(url).map_err(|e| format!("SSE_GATEWAY_REDIS_URL: {e}"))?,
            );
            let history = keep_history.then(|| RedisHistory::new(pool.clone(), &history_settings));
            let broker = RedisBroker::start(
                &BrokerSettings {
                    prefix: config.channel_prefix.clone(),
                    probe_every: config.redis_probe,
                },
                sink,
                pool.clone(),
                history.clone(),
                Library::new(pool.clone(), &history_settings),
            )?;
            let limits = LimitSettings {
                prefix: config.channel_prefix.clone(),
                limit: config.max_connections_per_user,
                lease: config.connection_lease,
            };
            let limiter = Arc::new(RedisLimiter::start(
                pool.clone(),
                &limits,
                hub,
                admin_addr,
                replica_id.to_string(),
            ));
            let presence = (track_presence && keep_history).then(|| {
                Arc::new(RedisPresence::start(
                    pool.clone(),
                    Library::new(pool, &history_settings),
                    limiter.clone(),
                    &presence_settings,
                    config.connection_lease,
                )) as Arc<dyn Presence>
            });
            Ok(Backends {
                broker: Arc::new(broker),
                limiter,
                history: history.map(|h| Arc::new(h) as Arc<dyn History>),
                presence,
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

    ::metrics::gauge!(crate::metrics::MAX_CONNECTIONS).set(config.max_connections as f64);
    let hub = Arc::new(Hub::new());
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
        backends,
        verifier,
        replica_id.clone(),
    ));
    let stop = CancellationToken::new();
    // The client port stops accepting once the drain has asked every stream to leave; the
    // admin port (probes, metrics) serves until the end.
    let stop_client = CancellationToken::new();
    let connections = TaskTracker::new();
    // The accept loops; `run` returns only after both (and every connection) have ended.
    let servers = TaskTracker::new();
    servers.spawn(server::serve_client(
        client,
        state.clone(),
        tls,
        stop_client.clone(),
        connections.clone(),
    ));
    servers.spawn(server::serve_admin(
        admin,
        state.clone(),
        exporter,
        stop.clone(),
    ));
    tracing::info!(client = %client_addr, admin = %admin_addr, advertised = %advertised, replica = %replica_id, "listening");

    shutdown.await;
    shutdown::drain(&state, &connections, &stop_client).await;
    if let Some(presence) = &state.presence {
        presence.flush().await;
    }
    state.limiter.flush().await;
    stop.cancel();
    servers.close();
    servers.wait().await;
    Ok(())
}
