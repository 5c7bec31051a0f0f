//! Reading what a request carries: query parameters and the bearer token.
//!
//! Invariants: tokens are taken from `Authorization: Bearer` first, then (for streams) the
//! `SSE_GATEWAY_AUTH_COOKIE` cookie, then `access_token` unless `SSE_GATEWAY_QUERY_TOKEN` is
//! false; the query string is never logged as is — [`redacted_path`] is the only form that may
//! be logged — and no token value is ever part of an error message.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use crate::http::error::ApiError;

/// Where a handler may look for its token.
#[derive(Debug, Clone, Copy)]
pub struct TokenSources<'a> {
    /// The cookie that may carry it (streams only: a cookie rides along on cross-site
    /// requests, so publishing and disconnecting never accept one).
    pub cookie: Option<&'a str>,
    /// Whether `?access_token=` is accepted.
    pub query: bool,
}

/// The request's token, by the order of SPEC §6.3; `Err` (400) for a query token when those
/// are switched off, even beside another token: the URL has already leaked it.
pub fn request_token(
    headers: &HeaderMap,
    query: &[(String, String)],
    sources: TokenSources<'_>,
) -> Result<Option<String>, ApiError> {
    let in_query = query.iter().any(|(k, _)| k == "access_token");
    if in_query && !sources.query {
        return Err(ApiError::BadRequest(
            "?access_token= is switched off here (SSE_GATEWAY_QUERY_TOKEN=false): send the token in the Authorization header or the cookie, and revoke the one that was in the URL".into(),
        ));
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return Ok(bearer_token(headers, &[]).map(str::to_string));
    }
    if let Some(name) = sources.cookie {
        if let Some(value) = cookie_value(headers, name) {
            return Ok(Some(value));
        }
    }
    Ok(bearer_token(headers, query).map(str::to_string))
}

/// Reads a request body of at most `max` bytes (`limit` names the setting in the 413), which
/// must arrive within `within` (SPEC §6.2: a body that trickles in holds nothing for long).
pub async fn read_body<B>(
    req: Request<B>,
    max: usize,
    within: Duration,
    limit: &str,
) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || ApiError::PayloadTooLarge(format!("body is over {max} bytes ({limit})"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let read = Limited::new(req.into_body(), max).collect();
    Ok(tokio::time::timeout(within, read)
        .await
        .map_err(|_| ApiError::RequestTimeout)?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::BadRequest(format!("could not read the body: {e}"))
            }
        })?
        .to_bytes())
}

/// The value of cookie `name` across every `Cookie` header (HTTP/2 sends one per cookie).
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
        .filter(|v| !v.is_empty())
}

/// Query parameters, decoded, in order.
pub fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The bearer token, from the header or the `access_token` query parameter.
pub fn bearer_token<'a>(headers: &'a HeaderMap, query: &'a [(String, String)]) -> Option<&'a str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
            .filter(|t| !t.is_empty());
    }
    query
        .iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.as_str())
        .filter(|t| !t.is_empty())
}

/// The request path with the query string's values hidden, safe to log.
pub fn redacted_path(uri: &Uri) -> String {
    match uri.query() {
        None => uri.path().to_string(),
        Some(q) => {
            let keys: Vec<&str> = q
                .split('&')
                .map(|kv| kv.split('=').next().unwrap_or(""))
                .collect();
            format!("{}?{}", uri.path(), keys.join("=…&") + "=…")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources() {
        let uri: Uri = "/events?channel=a&access_token=QUERY".parse().unwrap();
        let q = query_pairs(&uri);
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h, &q), Some("QUERY"));
        h.insert(header::AUTHORIZATION, "bearer HEADER".parse().unwrap());
        assert_eq!(bearer_token(&h, &q), Some("HEADER"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h, &q), None);
    }

    proptest::proptest! {
        // Any query string: extraction never panics, and redaction never shows a token.
        #[test]
        fn query_handling_never_panics_or_leaks(q in "[ -~]{0,200}", token in "[A-Za-z0-9._-]{8,40}") {
            let text = format!("/events?{q}&access_token={token}");
            if let Ok(uri) = text.parse::<Uri>() {
                let pairs = query_pairs(&uri);
                let _ = bearer_token(&HeaderMap::new(), &pairs);
                let redacted = redacted_path(&uri);
                proptest::prop_assert!(!redacted.contains(&token), "{}", redacted);
            }
        }
    }

    #[test]
    fn header_then_cookie_then_query_and_query_tokens_can_be_switched_off() {
        let uri: Uri = "/events?channel=a&access_token=qtok-7f3a".parse().unwrap();
        let q = query_pairs(&uri);
        let both = TokenSources {
            cookie: Some("sse_token"),
            query: true,
        };
        let mut h = HeaderMap::new();
        assert_eq!(
            request_token(&h, &q, both).unwrap().as_deref(),
            Some("qtok-7f3a")
        );
        h.append(header::COOKIE, "theme=dark".parse().unwrap());
        h.append(header::COOKIE, "sse_token=COOKIE; other=1".parse().unwrap());
        assert_eq!(
            request_token(&h, &q, both).unwrap().as_deref(),
            Some("COOKIE")
        );
        h.insert(header::AUTHORIZATION, "Bearer HEADER".parse().unwrap());
        assert_eq!(
            request_token(&h, &q, both).unwrap().as_deref(),
            Some("HEADER")
        );
        // No cookie source configured: the cookie is not a token.
        let mut only_cookie = HeaderMap::new();
        only_cookie.insert(header::COOKIE, "sse_token=COOKIE".parse().unwrap());
        let no_cookie = TokenSources {
            cookie: None,
            query: true,
        };
        assert_eq!(request_token(&only_cookie, &[], no_cookie).unwrap(), None);
        let off = TokenSources {
            cookie: Some("sse_token"),
            query: false,
        };
        let refused = request_token(&h, &q, off).unwrap_err();
        assert_eq!(refused.code(), "bad_request");
        assert!(!refused.message().contains("qtok-7f3a"));
    }

    #[test]
    fn redaction_hides_values() {
        let uri: Uri = "/events?channel=a&access_token=SECRET".parse().unwrap();
        let r = redacted_path(&uri);
        assert!(!r.contains("SECRET"), "{r}");
        assert!(r.contains("access_token"));
    }
}
