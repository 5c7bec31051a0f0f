//! `POST /disconnect`: takes a user off every replica (SPEC §6.4).
//!
//! Order: token (never a cookie: a browser would attach it to a forged cross-site request) ->
//! a `publish` grant covering the user's personal channel `user:<sub>` -> body within the
//! header timeout -> the revocation, if asked, stored first (so no older token gets back in
//! between) -> every replica told -> `202 {"streams": N}`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Body;
use serde::Deserialize;

use crate::auth::now_secs;
use crate::backends::limits::REVOCATION_TTL;
use crate::core::channel;
use crate::http::body::GatewayBody;
use crate::http::error::ApiError;
use crate::http::request::{query_pairs, read_body};
use crate::http::state::AppState;

/// Largest body accepted: a `sub` and a number.
const MAX_BODY_BYTES: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    sub: String,
    #[serde(default)]
    revoke_before: Option<u64>,
}

/// Handles `POST /disconnect`.
pub async fn disconnect<B>(state: &Arc<AppState>, req: Request<B>) -> Response<GatewayBody>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = take_off(state, req).await;
    metrics::counter!(crate::metrics::DISCONNECTS, "result" => ApiError::outcome(&result))
        .increment(1);
    result.unwrap_or_else(ApiError::into_response)
}

async fn take_off<B>(
    state: &Arc<AppState>,
    req: Request<B>,
) -> Result<Response<GatewayBody>, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let query = query_pairs(req.uri());
    let claims = state.publisher(req.headers(), &query).await?;
    let body = read_body(
        req,
        MAX_BODY_BYTES,
        state.config.header_timeout,
        "POST /disconnect",
    )
    .await?;
    let asked: DisconnectRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be JSON {{\"sub\": \"<user>\", \"revoke_before\"?: <unix seconds>}}: {e}"
        ))
    })?;
    let personal = channel::personal_channel(&asked.sub);
    if asked.sub.is_empty() {
        return Err(ApiError::BadRequest("\"sub\" is empty".into()));
    }
    channel::validate_name(&personal).map_err(|why| {
        ApiError::BadRequest(format!("\"sub\" cannot be a user of this gateway: {why}"))
    })?;
    let grants = claims.publish.as_deref().unwrap_or(&[]);
    if !channel::granted(grants, &personal) {
        return Err(ApiError::Forbidden(format!(
            "taking a user off needs a publish grant for their personal channel {personal:?}"
        )));
    }
    if let Some(before) = asked.revoke_before {
        let latest = now_secs() + REVOCATION_TTL.as_secs();
        if before > latest {
            return Err(ApiError::BadRequest(format!(
                "\"revoke_before\" is more than {} days ahead",
                REVOCATION_TTL.as_secs() / 86_400
            )));
        }
        state
            .limiter
            .revoke(&asked.sub, before)
            .await
            .map_err(|e| {
                ApiError::backend("the revocation could not be stored", format!("{e:?}"))
            })?;
    }
    // How many streams the user holds everywhere, before they go (best effort: the count is
    // informative, the disconnect is what matters).
    let streams = state.limiter.streams_of(&asked.sub).await.ok();
    state
        .broker
        .disconnect(asked.sub.clone())
        .await
        .map_err(|e| ApiError::backend("the other replicas could not be told", e))?;
    tracing::info!(
        revoke = asked.revoke_before.is_some(),
        "a user was taken off on every replica"
    );
    let body = serde_json::json!({ "streams": streams });
    let mut response = Response::new(GatewayBody::text(body.to_string()));
    *response.status_mut() = StatusCode::ACCEPTED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
