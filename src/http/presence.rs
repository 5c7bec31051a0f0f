//! `GET /presence?channel=X`: who is on a presence channel, with the history position a stream
//! resumes from so that snapshot + stream miss no join or leave (SPEC §6.5).
//!
//! Order: the channel (syntax, and that it is a presence channel) -> token (header, the auth
//! cookie, the query, as for streams) -> a grant to subscribe to or publish on the channel ->
//! the snapshot, from the store every replica shares.

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::core::channel;
use crate::core::position::Cursor;
use crate::http::body::GatewayBody;
use crate::http::error::ApiError;
use crate::http::request::query_pairs;
use crate::http::state::AppState;

/// Handles `GET /presence`.
pub async fn presence<B>(state: &Arc<AppState>, req: Request<B>) -> Response<GatewayBody> {
    snapshot(state, req)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn snapshot<B>(
    state: &Arc<AppState>,
    req: Request<B>,
) -> Result<Response<GatewayBody>, ApiError> {
    let query = query_pairs(req.uri());
    let mut named = query.iter().filter(|(k, _)| k == "channel").map(|(_, v)| v);
    let (Some(name), None) = (named.next(), named.next()) else {
        return Err(ApiError::BadRequest(
            "give exactly one ?channel= to list its members".into(),
        ));
    };
    channel::validate_name(name).map_err(ApiError::BadRequest)?;
    let presence = match &state.presence {
        Some(p) if state.config.is_presence_channel(name) => p.clone(),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "channel {name:?} is not a presence channel (SSE_GATEWAY_PRESENCE_CHANNELS)"
            )))
        }
    };
    let token = state.client_token(req.headers(), &query)?;
    let claims = state
        .verifier
        .publisher(&token)
        .await
        .map_err(ApiError::Unauthorized)?;
    let personal = claims
        .sub
        .as_deref()
        .is_some_and(|s| channel::personal_channel(s) == *name);
    let may = personal
        || channel::granted(claims.channels.as_deref().unwrap_or(&[]), name)
        || channel::granted(claims.publish.as_deref().unwrap_or(&[]), name);
    if !may {
        return Err(ApiError::Forbidden(format!(
            "the token may neither subscribe to nor publish on channel {name:?}"
        )));
    }
    let snap = presence
        .snapshot(name)
        .await
        .map_err(|e| ApiError::backend("the presence snapshot could not be read", e))?;
    let id = Cursor {
        marks: vec![(Arc::from(name.as_str()), snap.mark.clone())],
    }
    .encode();
    let members: Vec<serde_json::Value> = snap
        .members
        .iter()
        .map(|(sub, n)| serde_json::json!({ "sub": sub, "connections": n }))
        .collect();
    let body = serde_json::json!({
        "channel": name,
        "users": snap.users,
        "connections": snap.connections,
        "members": members,
        "truncated": snap.truncated,
        "id": id,
    });
    let mut response = Response::new(GatewayBody::text(body.to_string()));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
