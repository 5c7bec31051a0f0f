//! `GET /events`: from request to live stream.
//!
//! Order of checks (each refusal is final and counted once): draining -> replica capacity ->
//! token -> channels (syntax, count, grants) -> broker readiness -> subscribe (the hub first,
//! then the broker confirms) -> 200 with the prelude written at once.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use std::time::SystemTime;

use crate::http::conn::ConnInfo;
use crate::http::diagnostics::Rejection;

use crate::auth::now_secs;
use crate::backends::limits::{LimitError, Slot};
use crate::backends::presence::Entry;
use crate::core::channel::{self, MAX_CHANNELS_PER_STREAM};
use crate::core::frame;
use crate::core::hub::{StreamInfo, Subscriber};
use crate::http::body::GatewayBody;
use crate::http::error::{accepts_event_stream, ApiError};
use crate::http::request::{query_pairs, redacted_path};
use crate::http::state::AppState;
use crate::http::stream::resume;
use crate::http::stream::{Lifetime, SseStream, StreamGuard};
use crate::http::watchdog::Watch;
use crate::metrics as m;

/// Longest wait for the broker to confirm a subscription before the client gets 503.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handles `GET /events` on the connection `conn`.
pub async fn events<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    conn: ConnInfo,
) -> Response<GatewayBody> {
    let mut sub = None;
    let event_stream = accepts_event_stream(req.headers());
    match open(state, req, &conn, &mut sub).await {
        Ok(response) => {
            metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
            response
        }
        Err(e) => {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => e.code()).increment(1);
            state.rejections.record(
                &state.replica_id,
                Rejection {
                    at: SystemTime::now(),
                    reason: e.code(),
                    status: e.status().as_u16(),
                    sub,
                    remote: conn.remote,
                    message: e.message(),
                },
            );
            e.into_response_for(event_stream)
        }
    }
}

/// Opens the stream; `known_sub` is filled as soon as the token is verified, so that a refusal
/// after that point can say whose it was.
async fn open<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    conn: &ConnInfo,
    known_sub: &mut Option<String>,
) -> Result<Response<GatewayBody>, ApiError> {
    let protocol = if req.version() == http::Version::HTTP_2 {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    };
    let config = &state.config;
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    if state.hub.stream_count() as u64 >= config.max_connections {
        return Err(ApiError::Capacity);
    }
    let query = query_pairs(req.uri());
    let token = state.client_token(req.headers(), &query)?;
    let claims = state
        .verifier
        .subscriber(&token)
        .await
        .map_err(ApiError::Unauthorized)?;
    let sub = claims.sub.clone().unwrap_or_default();
    *known_sub = Some(sub.clone());

    let mut channels: Vec<String> = Vec::new();
    let mut asked = 0usize;
    for (k, v) in &query {
        if k != "channel" {
            continue;
        }
        asked += 1;
        if asked > MAX_CHANNELS_PER_STREAM {
            return Err(ApiError::BadRequest(format!(
                "too many channels: at most {MAX_CHANNELS_PER_STREAM} per stream"
            )));
        }
        channel::validate_name(v).map_err(ApiError::BadRequest)?;
        if !channels.contains(v) {
            channels.push(v.clone());
        }
    }
    let personal = channel::personal_channel(&sub);
    if channels.is_empty() {
        channel::validate_name(&personal).map_err(|why| {
            ApiError::BadRequest(format!(
                "no channel given and the personal channel of this sub is not a valid name ({why}); pass ?channel="
            ))
        })?;
        channels.push(personal.clone());
    }
    let grants = claims.channels.as_deref().unwrap_or(&[]);
    if let Some(refused) = channels
        .iter()
        .find(|c| **c != personal && !channel::granted(grants, c))
    {
        return Err(ApiError::Forbidden(format!(
            "the token does not grant channel {refused:?}"
        )));
    }
    let wants_presence = match query.iter().find(|(k, _)| k == "presence") {
        None => false,
        Some((_, v)) if v == "1" || v == "true" => true,
        Some((_, v)) if v == "0" || v == "false" => false,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "presence must be 1 (send gateway.join and gateway.leave) or 0".into(),
            ))
        }
    };
    if !state.broker.is_ready() {
        return Err(ApiError::Unavailable(
            "the broker (Redis) is unreachable, so this replica cannot deliver events; retry"
                .into(),
        ));
    }

    let stream_id = state.next_stream_id();
    let issued_at = claims.iat.unwrap_or(0);
    let slot = Slot::acquire(state.limiter.clone(), &sub, stream_id, issued_at)
        .await
        .map_err(|e| match e {
            LimitError::Revoked => ApiError::Unauthorized(
                "this token was issued before the user's tokens were revoked; get a new one"
                    .into(),
            ),
            LimitError::UserLimit { limit } => ApiError::UserLimit(format!(
                "this user already holds {limit} streams (SSE_GATEWAY_MAX_CONNECTIONS_PER_USER); close one or retry later"
            )),
            LimitError::Unavailable(why) => {
                ApiError::backend("the per-user limit could not be checked", why)
            }
        })?;
    let info = StreamInfo {
        conn_id: conn.id,
        remote: conn.remote,
        protocol,
        sub,
        channels,
        opened_at: SystemTime::now(),
        presence: wants_presence,
    };
    // Over HTTP/2 the stream runs under its own watch, so cutting a slow consumer resets only
    // that stream; over HTTP/1.1 the watch's cut is the connection's.
    let cut = Watch::current()
        .map(|w| w.kill_token())
        .unwrap_or_else(|| conn.kill.clone());
    let (subscriber, rx) = Subscriber::new(stream_id, config.client_queue, cut, info);
    let (mut guard, _first) =
        StreamGuard::subscribe(subscriber, slot, state.hub.clone(), state.broker.clone());
    // Ask for every channel of the stream, not only the new ones: a channel another stream
    // just added may not be confirmed yet, and the broker answers at once for confirmed ones.
    match tokio::time::timeout(
        SUBSCRIBE_TIMEOUT,
        state.broker.ensure_subscribed(guard.channels().to_vec()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ApiError::backend("the subscription failed", e)),
        Err(_) => {
            return Err(ApiError::Unavailable(
                "the broker did not confirm the subscription in time; retry".into(),
            ))
        }
    }

    // Presence after the subscription and before the history marks: a stream resuming from a
    // snapshot's id sees its own join; one starting fresh starts after it.
    if let Some(presence) = &state.presence {
        let tracked: Vec<String> = guard
            .channels()
            .iter()
            .filter(|c| config.is_presence_channel(c))
            .cloned()
            .collect();
        if !tracked.is_empty() {
            let entry = Entry::new(presence.clone(), tracked, &guard.sub.info.sub, stream_id);
            let joined = entry.join().await;
            guard.track_presence(entry);
            joined.map_err(|e| ApiError::backend("presence could not be recorded", e))?;
        }
    }

    let lifetime = {
        let now = tokio::time::Instant::now();
        let deadline = claims.exp.saturating_add(config.jwt_leeway.as_secs());
        let left = Duration::from_secs(deadline.saturating_sub(now_secs()).min(10 * 365 * 86_400));
        let expires_at = now + left;
        let warning = config.token_expiry_warning;
        Lifetime {
            heartbeat: config.heartbeat,
            expires_at,
            warn_at: (!warning.is_zero() && left > warning).then(|| expires_at - warning),
            // Jittered by up to a tenth, so streams opened together do not all close together.
            max_age_at: (!config.max_stream_age.is_zero()).then(|| {
                now + config
                    .max_stream_age
                    .mul_f64(0.9 + 0.1 * rand::random::<f64>())
            }),
            write_timeout: config.write_timeout,
        }
    };
    let mut prelude = bytes::BytesMut::from(&frame::prelude(config.retry_ms)[..]);
    let last_event_id = last_event_id(&req, &query);
    // Subscribed first (above), history read second: nothing published in between is lost,
    // and what arrives live twice is dropped by position.
    let resumed = match &state.history {
        Some(history) => {
            let r = resume::start(
                history.clone(),
                guard.channels(),
                last_event_id.as_deref(),
                config.max_event_bytes,
                wants_presence,
            )
            .await
            .map_err(|e| ApiError::backend("history could not be read", e))?;
            prelude.extend_from_slice(&r.first);
            Some((r.tracker, r.replayer))
        }
        None => {
            if last_event_id.is_some() {
                // History is off, so no position can be resumed from: say so honestly.
                prelude.extend_from_slice(&resume::gap_frame("history_off"));
            }
            None
        }
    };
    tracing::debug!(
        stream = guard.sub.id,
        channels = guard.channels().len(),
        path = %redacted_path(req.uri()),
        "stream opened"
    );
    let body = SseStream::new(
        guard,
        rx,
        prelude.freeze(),
        lifetime,
        config.retry_ms,
        resumed,
    );
    let mut response = Response::new(GatewayBody::Stream(Box::new(body)));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The resume cursor: the `Last-Event-ID` header (what browsers send), else `?last_event_id=`.
/// A header that is not text counts as an unreadable id, which resumes with a gap.
fn last_event_id<B>(req: &Request<B>, query: &[(String, String)]) -> Option<String> {
    if let Some(v) = req.headers().get("last-event-id") {
        return Some(v.to_str().unwrap_or("\u{0}").to_string());
    }
    query
        .iter()
        .find(|(k, _)| k == "last_event_id")
        .map(|(_, v)| v.clone())
}
