//! Reading what a request carries: query parameters and the bearer token.
//!
//! Invariants: tokens are taken from `Authorization: Bearer` first, then `access_token`; the
//! query string is never logged as is — [`redacted_path`] is the only form that may be logged.

use http::{header, HeaderMap, Uri};

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
    fn redaction_hides_values() {
        let uri: Uri = "/events?channel=a&access_token=SECRET".parse().unwrap();
        let r = redacted_path(&uri);
        assert!(!r.contains("SECRET"), "{r}");
        assert!(r.contains("access_token"));
    }
}
