//! Cross-origin access for browsers: which pages may open streams and publish.
//!
//! Invariants: with no `SSE_GATEWAY_CORS_ORIGINS`, no CORS header is ever sent (browsers then
//! allow same-origin pages only). `*` allows any origin without credentials; a list allows
//! exactly those origins, with credentials. Answers that depend on `Origin` say `Vary: Origin`.

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use crate::config::CorsOrigins;
use crate::http::body::GatewayBody;
use crate::http::error::ApiError;

/// The CORS headers one answer gets, decided from the request's `Origin`.
pub struct Grant {
    allow_origin: HeaderValue,
    credentials: bool,
}

/// Decides whether the request's origin is allowed.
pub fn grant(config: Option<&CorsOrigins>, headers: &HeaderMap) -> Option<Grant> {
    let origin = headers.get(header::ORIGIN)?;
    match config? {
        CorsOrigins::Any => Some(Grant {
            allow_origin: HeaderValue::from_static("*"),
            credentials: false,
        }),
        CorsOrigins::List(list) => {
            let o = origin.to_str().ok()?;
            list.iter().any(|allowed| allowed == o).then(|| Grant {
                allow_origin: origin.clone(),
                credentials: true,
            })
        }
    }
}

/// Adds the grant's headers (and `Vary: Origin`) to an answer.
pub fn apply(
    config: Option<&CorsOrigins>,
    grant: Option<Grant>,
    response: &mut Response<GatewayBody>,
) {
    if config.is_none() {
        return;
    }
    let h = response.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(g) = grant {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, g.allow_origin);
        if g.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

/// Answers a preflight `OPTIONS` for a path served with `method`.
pub fn preflight(
    config: Option<&CorsOrigins>,
    headers: &HeaderMap,
    method: &'static str,
) -> Response<GatewayBody> {
    if config.is_none() {
        return ApiError::MethodNotAllowed(method).into_response();
    }
    let asked_ok = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| m.to_str().ok())
        .and_then(|m| m.parse::<Method>().ok())
        .is_some_and(|m| m.as_str() == method);
    let Some(g) = grant(config, headers).filter(|_| asked_ok) else {
        let mut r =
            ApiError::Forbidden("origin or method not allowed by SSE_GATEWAY_CORS_ORIGINS".into())
                .into_response();
        apply(config, None, &mut r);
        return r;
    };
    let mut r = Response::new(GatewayBody::text(""));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(method),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, last-event-id, cache-control"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    apply(config, Some(g), &mut r);
    r
}
