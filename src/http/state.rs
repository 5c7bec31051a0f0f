//! What every request handler shares: configuration, hub, broker, verifier, drain flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::Claims;
use crate::auth::Verifier;
use crate::backends::broker::Broker;
use crate::backends::history::History;
use crate::backends::limits::Limiter;
use crate::backends::presence::Presence;
use crate::config::Config;
use crate::core::hub::Hub;
use crate::http::diagnostics::Rejections;
use crate::http::error::ApiError;
use crate::http::request::{request_token, TokenSources};

/// The state a replica keeps outside itself, in memory or in Redis, as the composition root
/// picked it.
pub struct Backends {
    /// Cross-replica event transport.
    pub broker: Arc<dyn Broker>,
    /// Per-user slots.
    pub limiter: Arc<dyn Limiter>,
    /// Durable events; `None` when `SSE_GATEWAY_HISTORY_SIZE` is 0.
    pub history: Option<Arc<dyn History>>,
    /// Members of presence channels; `None` without `SSE_GATEWAY_PRESENCE_CHANNELS`.
    pub presence: Option<Arc<dyn Presence>>,
}

/// The replica's shared state.
pub struct AppState {
    /// Validated settings.
    pub config: Config,
    /// Local fan-out.
    pub hub: Arc<Hub>,
    /// Cross-replica transport.
    pub broker: Arc<dyn Broker>,
    /// Token checks.
    pub verifier: Verifier,
    /// Per-user slots.
    pub limiter: Arc<dyn Limiter>,
    /// Durable events, when history is on.
    pub history: Option<Arc<dyn History>>,
    /// Members of presence channels, when `SSE_GATEWAY_PRESENCE_CHANNELS` names any.
    pub presence: Option<Arc<dyn Presence>>,
    /// This replica's id (in the Redis registry, slot names and diagnostics).
    pub replica_id: String,
    /// Recent refusals.
    pub rejections: Rejections,
    /// Permits for requests being authenticated and admitted (bounds the work a flood of
    /// handshakes can cause).
    pub handshakes: tokio::sync::Semaphore,
    draining: AtomicBool,
    /// Cancelled when the drain starts: hyper connections send GOAWAY (HTTP/2) or close after
    /// their current response (HTTP/1.1).
    drain_started: tokio_util::sync::CancellationToken,
    next_stream: AtomicU64,
}

impl AppState {
    /// Bundles the parts.
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        backends: Backends,
        verifier: Verifier,
        replica_id: String,
    ) -> Self {
        let Backends {
            broker,
            limiter,
            history,
            presence,
        } = backends;
        Self {
            handshakes: tokio::sync::Semaphore::new(config.max_pending_handshakes),
            config,
            hub,
            broker,
            verifier,
            limiter,
            history,
            presence,
            replica_id,
            rejections: Rejections::default(),
            draining: AtomicBool::new(false),
            drain_started: tokio_util::sync::CancellationToken::new(),
            next_stream: AtomicU64::new(1),
        }
    }

    /// Whether the replica is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts the drain: readiness off, new streams refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain_started.cancel();
    }

    /// Completes when the drain starts.
    pub async fn draining_started(&self) {
        self.drain_started.cancelled().await
    }

    /// Whether the load balancer should send new clients here.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.broker.is_ready()
            && self.limiter.is_ready()
            && self.verifier.is_ready()
    }

    /// A fresh stream id.
    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The verified claims of a publishing request (`POST /publish`, `POST /disconnect`): the
    /// token from the header or the query (never a cookie), checked as a publisher's.
    pub async fn publisher(
        &self,
        headers: &http::HeaderMap,
        query: &[(String, String)],
    ) -> Result<Claims, ApiError> {
        let token =
            request_token(headers, query, self.publisher_token_sources())?.ok_or_else(|| {
                ApiError::Unauthorized("no token: send Authorization: Bearer <JWT>".into())
            })?;
        self.verifier
            .publisher(&token)
            .await
            .map_err(ApiError::Unauthorized)
    }

    /// The token of a request that reads as a client (`GET /events`, `GET /presence`): from the
    /// header, the auth cookie or the query, or 401 saying where to put one.
    pub fn client_token(
        &self,
        headers: &http::HeaderMap,
        query: &[(String, String)],
    ) -> Result<String, ApiError> {
        request_token(headers, query, self.stream_token_sources())?.ok_or_else(|| {
            ApiError::Unauthorized(
                "no token: send Authorization: Bearer <JWT>, the auth cookie, or ?access_token=<JWT>"
                    .into(),
            )
        })
    }

    /// Where `GET /events` looks for its token: header, the auth cookie, the query.
    pub fn stream_token_sources(&self) -> TokenSources<'_> {
        TokenSources {
            cookie: self.config.auth_cookie.as_deref(),
            query: self.config.query_token,
        }
    }

    /// Where `POST /publish` and `POST /disconnect` look: never a cookie, which a browser
    /// would attach to a forged cross-site request.
    pub fn publisher_token_sources(&self) -> TokenSources<'_> {
        TokenSources {
            cookie: None,
            query: self.config.query_token,
        }
    }
}
