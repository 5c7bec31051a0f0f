//! `POST /publish`: a publisher's event, checked here and delivered through the broker.
//!
//! Invariants: the body is read with a hard size limit (413 past `SSE_GATEWAY_MAX_EVENT_BYTES`)
//! before it is parsed; every channel must be granted by the token's `publish` claim; the event
//! goes out as an envelope that every replica decodes with the same rule as Redis messages.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Body;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::core::channel::{self, MAX_CHANNELS_PER_STREAM};
use crate::core::event::validate_event_name;
use crate::core::position::{Cursor, Mark};
use crate::http::body::GatewayBody;
use crate::http::error::ApiError;
use crate::http::request::{query_pairs, read_body};
use crate::http::state::AppState;
use crate::metrics as m;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest<'a> {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    event: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    /// Ids belong to the gateway: accepted and ignored, as in the envelope rule.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<serde::de::IgnoredAny>,
}

/// Handles `POST /publish`.
pub async fn publish<B>(state: &Arc<AppState>, req: Request<B>) -> Response<GatewayBody>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = accept(state, req).await;
    metrics::counter!(m::PUBLISH, "result" => ApiError::outcome(&result)).increment(1);
    result.unwrap_or_else(ApiError::into_response)
}

async fn accept<B>(
    state: &Arc<AppState>,
    req: Request<B>,
) -> Result<Response<GatewayBody>, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = state.config.max_event_bytes;
    let query = query_pairs(req.uri());
    let claims = state.publisher(req.headers(), &query).await?;
    let grants = claims.publish.unwrap_or_default();
    if grants.is_empty() {
        return Err(ApiError::Forbidden(
            "the token has no publish claim, so it cannot publish".into(),
        ));
    }
    // No handshake permit is held while the body trickles in: slow publishers never keep new
    // streams out.
    let body = read_body(
        req,
        max,
        state.config.header_timeout,
        "SSE_GATEWAY_MAX_EVENT_BYTES",
    )
    .await?;
    let _permit = state
        .handshakes
        .try_acquire()
        .map_err(|_| ApiError::Capacity)?;
    let Envelope { channels, payload } = envelope(&body, max, &grants)?;
    let mut ids = serde_json::Map::new();
    for c in &channels {
        match &state.history {
            // Durable: stored and published in one step; the answer is the event's position.
            Some(history) => {
                let mark = history
                    .append(c.clone(), payload.clone())
                    .await
                    .map_err(|e| ApiError::backend("the durable publish failed", e))?;
                let cursor = Cursor {
                    marks: vec![(Arc::from(c.as_str()), mark)],
                };
                ids.insert(c.clone(), serde_json::Value::String(cursor.encode()));
            }
            None => {
                state
                    .broker
                    .publish(c.clone(), payload.clone())
                    .await
                    .map_err(|e| ApiError::backend("the publish failed", e))?;
                // History is off: no position exists. The stand-in (epoch `off`) is still one
                // id per channel, as SPEC §3 promises, and resumes as an honest gap.
                let cursor = Cursor {
                    marks: vec![(Arc::from(c.as_str()), Mark::history_off())],
                };
                ids.insert(c.clone(), serde_json::Value::String(cursor.encode()));
            }
        }
    }
    let body = serde_json::json!({ "ids": ids }).to_string();
    let mut response = Response::new(GatewayBody::text(body));
    *response.status_mut() = StatusCode::ACCEPTED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// What a `POST /publish` body asks for: the channels, and the payload every replica decodes.
#[derive(Debug)]
pub struct Envelope {
    /// Where the event goes (checked names, each granted).
    pub channels: Vec<String>,
    /// `{"event"?, "data"}` with `data` exactly as the publisher wrote it.
    pub payload: Bytes,
}

/// Reads a `POST /publish` body against the publisher's `grants`: every refusal is the 400,
/// 403 or 413 the caller gets. Pure, so that it can be fuzzed.
pub fn envelope(body: &[u8], max: usize, grants: &[String]) -> Result<Envelope, ApiError> {
    let parsed: PublishRequest<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be JSON {{\"channel\"|\"channels\", \"event\"?, \"data\"}}: {e}"
        ))
    })?;
    let data = parsed
        .data
        .ok_or_else(|| ApiError::BadRequest("body has no \"data\" member".into()))?;
    let channels: Vec<String> = match (parsed.channel, parsed.channels) {
        (Some(c), None) => vec![c],
        (None, Some(list)) if !list.is_empty() => list,
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give \"channel\" or \"channels\", not both".into(),
            ))
        }
        _ => {
            return Err(ApiError::BadRequest(
                "body needs \"channel\" or a non-empty \"channels\" array".into(),
            ))
        }
    };
    if channels.len() > MAX_CHANNELS_PER_STREAM {
        return Err(ApiError::BadRequest(format!(
            "too many channels: at most {MAX_CHANNELS_PER_STREAM} per publish"
        )));
    }
    for c in &channels {
        channel::validate_name(c).map_err(ApiError::BadRequest)?;
        if !channel::granted(grants, c) {
            return Err(ApiError::Forbidden(format!(
                "the token does not grant publishing to {c:?}"
            )));
        }
    }
    let event = parsed.event.filter(|e| !e.is_empty());
    if let Some(name) = &event {
        validate_event_name(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    // The envelope every replica decodes: data exactly as the publisher wrote it.
    let mut payload = String::with_capacity(data.get().len() + 64);
    payload.push('{');
    if let Some(name) = &event {
        payload.push_str("\"event\":");
        payload.push_str(&serde_json::Value::String(name.clone()).to_string());
        payload.push(',');
    }
    payload.push_str("\"data\":");
    payload.push_str(data.get());
    payload.push('}');
    if payload.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "the event is over {max} bytes (SSE_GATEWAY_MAX_EVENT_BYTES)"
        )));
    }
    Ok(Envelope {
        channels,
        payload: Bytes::from(payload),
    })
}
