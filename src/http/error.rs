//! The one place that turns a refusal into an HTTP answer.
//!
//! Invariants: every refusal is `{"error": CODE, "message": TEXT}` with the status the contract
//! names for CODE; 401 carries `WWW-Authenticate: Bearer`, 429 and 503 carry `Retry-After`. The
//! message speaks to the caller and never echoes a token. A passing refusal (429, 503) of a
//! request that accepts `text/event-stream` is answered in-band instead (SPEC §6.3): `200`,
//! `retry:` and `event: gateway.refused`, because `EventSource` gives up for good on any other
//! status but retries a stream that ends.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::core::frame;
use crate::http::body::GatewayBody;

/// Whether the request accepts an event stream (what `EventSource` always sends).
pub fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// A request the gateway refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request is malformed.
    BadRequest(String),
    /// 401: no token, or a token that does not verify.
    Unauthorized(String),
    /// 403: the token does not grant the channel.
    Forbidden(String),
    /// 404: no such path.
    NotFound,
    /// 405: the path exists, the method does not.
    MethodNotAllowed(&'static str),
    /// 408: the request body did not arrive within `SSE_GATEWAY_HEADER_TIMEOUT_SECS`.
    RequestTimeout,
    /// 413: the body is larger than allowed.
    PayloadTooLarge(String),
    /// 429: the user already holds the most streams allowed.
    UserLimit(String),
    /// 503: this replica holds the most streams allowed.
    Capacity,
    /// 503: this replica is shutting down.
    Draining,
    /// 503: the broker is unreachable.
    Unavailable(String),
}

impl ApiError {
    /// 503 for a backend failure (SPEC §6.6): the caller is told `what` and to retry; the
    /// detail, which may hold Redis's own words or a script hash, goes to the log only.
    pub fn backend(what: &str, detail: impl std::fmt::Display) -> Self {
        tracing::debug!(detail = %detail, "{what}");
        ApiError::Unavailable(format!("{what}; retry"))
    }

    /// The error code of the JSON body, also the `reason` label of rejection metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UserLimit(_) => "user_limit",
            ApiError::Capacity => "capacity",
            ApiError::Draining => "draining",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UserLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Capacity | ApiError::Draining | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What the caller is told (never a token).
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::UserLimit(m)
            | ApiError::Unavailable(m) => m.clone(),
            ApiError::NotFound => "no such path".into(),
            ApiError::RequestTimeout => {
                "the body did not arrive within SSE_GATEWAY_HEADER_TIMEOUT_SECS".into()
            }
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::Capacity => "this replica is at its connection limit; retry later".into(),
            ApiError::Draining => "this replica is shutting down; reconnect".into(),
        }
    }

    /// `Retry-After`, in seconds, of a passing refusal.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::UserLimit(_) => Some(10),
            ApiError::Capacity | ApiError::Unavailable(_) => Some(5),
            ApiError::Draining => Some(1),
            _ => None,
        }
    }

    /// Whether a later retry may succeed (a full user, replica or broker outage), as opposed to
    /// a request that is wrong in itself.
    pub fn is_passing(&self) -> bool {
        matches!(
            self,
            ApiError::UserLimit(_)
                | ApiError::Capacity
                | ApiError::Draining
                | ApiError::Unavailable(_)
        )
    }

    /// The `result` label of a handled request: `accepted`, `error` (the gateway could not do
    /// it: Redis) or `rejected` (the request was refused).
    pub fn outcome<T>(result: &Result<T, ApiError>) -> &'static str {
        match result {
            Ok(_) => "accepted",
            Err(ApiError::Unavailable(_)) => "error",
            Err(_) => "rejected",
        }
    }

    /// The answer for a request that does (`event_stream`) or does not accept
    /// `text/event-stream`.
    pub fn into_response_for(self, event_stream: bool) -> Response<GatewayBody> {
        if event_stream && self.is_passing() {
            self.into_in_band()
        } else {
            self.into_response()
        }
    }

    /// `200` with `retry:` (the `Retry-After` in milliseconds, jittered by ±20 % so refused
    /// browsers do not come back in step) and one `gateway.refused`, then the end.
    fn into_in_band(self) -> Response<GatewayBody> {
        let secs = self.retry_after().unwrap_or(5);
        let retry_ms = (secs as f64 * 1000.0 * (0.8 + 0.4 * rand::random::<f64>())) as u64;
        let data = serde_json::json!({"error": self.code(), "message": self.message()});
        let mut body = format!("retry: {retry_ms}\n").into_bytes();
        body.extend_from_slice(&frame::control("gateway.refused", &data.to_string()));
        let mut response = Response::new(GatewayBody::Full(Full::new(Bytes::from(body))));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// The HTTP answer.
    pub fn into_response(self) -> Response<GatewayBody> {
        let body = serde_json::json!({"error": self.code(), "message": self.message()});
        let mut response =
            Response::new(GatewayBody::Full(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let ApiError::Unauthorized(_) = self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::MethodNotAllowed(allow) = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
