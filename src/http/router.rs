//! Method + path -> handler, for the client port and the admin port.

use std::sync::Arc;

use crate::http::conn::ConnInfo;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Body;

use crate::http::body::GatewayBody;
use crate::http::cors;
use crate::http::diagnostics::{self, Filter, Rejection};
use crate::http::error::ApiError;
use crate::http::request::query_pairs;
use crate::http::state::AppState;
use crate::metrics::Exporter;

/// Routes a request on the client port.
pub async fn client<B>(
    state: Arc<AppState>,
    req: Request<B>,
    connection: ConnInfo,
) -> Response<GatewayBody>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cors_config = state.config.cors_origins.as_ref();
    let path_method = match req.uri().path() {
        "/events" | "/presence" => Some("GET"),
        "/publish" | "/disconnect" => Some("POST"),
        _ => None,
    };
    let Some(allowed) = path_method else {
        return ApiError::NotFound.into_response();
    };
    if req.method() == Method::OPTIONS {
        return cors::preflight(cors_config, req.headers(), allowed);
    }
    if req.method().as_str() != allowed {
        return ApiError::MethodNotAllowed(allowed).into_response();
    }
    let grant = cors::grant(cors_config, req.headers());
    let mut response = match allowed {
        "GET" => {
            // Authentication and admission are where a flood costs CPU and Redis round trips:
            // bound how many run at once. The permit is released when the handshake is
            // answered. (`POST /publish` takes its permit only once its body is in.)
            let Ok(_permit) = state.handshakes.try_acquire() else {
                let event_stream = crate::http::error::accepts_event_stream(req.headers());
                let mut refused = refuse_capacity(&state, &connection, event_stream);
                cors::apply(cors_config, grant, &mut refused);
                return refused;
            };
            if req.uri().path() == "/presence" {
                crate::http::presence::presence(&state, req).await
            } else {
                crate::http::events::events(&state, req, connection).await
            }
        }
        _ if req.uri().path() == "/disconnect" => {
            crate::http::disconnect::disconnect(&state, req).await
        }
        _ => crate::http::publish::publish(&state, req).await,
    };
    cors::apply(cors_config, grant, &mut response);
    response
}

/// 503 `capacity` for a handshake past `SSE_GATEWAY_MAX_PENDING_HANDSHAKES`, counted and
/// listed like every other refusal.
fn refuse_capacity(
    state: &AppState,
    connection: &ConnInfo,
    event_stream: bool,
) -> Response<GatewayBody> {
    let e = ApiError::Capacity;
    metrics::counter!(crate::metrics::CONNECTIONS_REJECTED, "reason" => e.code()).increment(1);
    state.rejections.record(
        &state.replica_id,
        Rejection {
            at: std::time::SystemTime::now(),
            reason: e.code(),
            status: e.status().as_u16(),
            sub: None,
            remote: connection.remote,
            message: e.message(),
        },
    );
    e.into_response_for(event_stream)
}

/// Routes a request on the admin port.
pub fn admin<B>(
    state: &AppState,
    exporter: Option<&Exporter>,
    req: &Request<B>,
) -> Response<GatewayBody> {
    let plain = |status: StatusCode, body: String, content_type: &'static str| {
        let mut r = Response::new(GatewayBody::text(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let listing = matches!(
        req.uri().path(),
        "/connections" | "/channels" | "/rejections"
    );
    if listing {
        if let Some(token) = &state.config.admin_token {
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !token.admits(auth) {
                return ApiError::Unauthorized(
                    "this listing names users, channels and addresses: send Authorization: Bearer <SSE_GATEWAY_ADMIN_TOKEN>".into(),
                )
                .into_response();
            }
        }
    }
    match (req.uri().path(), req.method()) {
        ("/healthz", &Method::GET) => plain(StatusCode::OK, "ok\n".into(), "text/plain"),
        ("/readyz", &Method::GET) => {
            if state.is_ready() {
                plain(StatusCode::OK, "ready\n".into(), "text/plain")
            } else if state.is_draining() {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "draining\n".into(),
                    "text/plain",
                )
            } else {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker not connected\n".into(),
                    "text/plain",
                )
            }
        }
        ("/metrics", &Method::GET) => plain(
            StatusCode::OK,
            exporter.map(Exporter::render).unwrap_or_default(),
            "text/plain; version=0.0.4",
        ),
        ("/connections", &Method::GET) => {
            let filter = Filter::from_query(&query_pairs(req.uri()));
            let body = diagnostics::connections(&state.hub, &state.replica_id, &filter);
            plain(StatusCode::OK, body.to_string(), "application/json")
        }
        ("/channels", &Method::GET) => {
            let filter = Filter::from_query(&query_pairs(req.uri()));
            let body = diagnostics::channels(&state.hub, &state.replica_id, &filter);
            plain(StatusCode::OK, body.to_string(), "application/json")
        }
        ("/rejections", &Method::GET) => plain(
            StatusCode::OK,
            state.rejections.json(&state.replica_id).to_string(),
            "application/json",
        ),
        ("/healthz" | "/readyz" | "/metrics" | "/connections" | "/channels" | "/rejections", _) => {
            ApiError::MethodNotAllowed("GET").into_response()
        }
        _ => ApiError::NotFound.into_response(),
    }
}
