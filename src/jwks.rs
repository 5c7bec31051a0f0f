//! Keys from a JWKS document (`SSE_GATEWAY_JWT_JWKS_URL`), chosen by each token's `kid`.
//!
//! Invariants (SPEC §6.3):
//! - The document is fetched at start; the replica is not ready until one fetch succeeded.
//! - It is fetched again every [`REFRESH_EVERY`], and on a `kid` it does not know, but never more
//!   than once per [`UNKNOWN_KID_EVERY`]: a flood of made-up `kid`s costs one fetch, not a flood.
//! - A failed refresh keeps the keys already known; only RSA, EC and Ed25519 keys are taken
//!   (a symmetric key in a public document would let anyone who reads it mint tokens).
//! - The document is bounded ([`MAX_DOCUMENT_BYTES`]) and fetched with a deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often the document is fetched again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The shortest interval between two fetches caused by unknown `kid`s.
pub const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(10);
/// The largest document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A verification key and the one algorithm it is used with.
#[derive(Clone)]
pub struct Key {
    /// The key.
    pub key: DecodingKey,
    /// Its algorithm (a token announcing another is refused).
    pub algorithm: Algorithm,
}

/// The keys of one JWKS document, kept fresh.
pub struct Jwks {
    url: http::Uri,
    client: Client<Https, Empty<Bytes>>,
    keys: RwLock<HashMap<String, Key>>,
    ready: AtomicBool,
    /// When a fetch last started (successful or not): the unknown-`kid` rate limit.
    last_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    /// Keys from `url`, fetched in the background from now on (not ready until the first
    /// fetch succeeds).
    pub fn start(url: &str) -> Result<Arc<Self>, String> {
        let url: http::Uri = url
            .parse()
            .map_err(|e| format!("SSE_GATEWAY_JWT_JWKS_URL: {e}"))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("SSE_GATEWAY_JWT_JWKS_URL: no trusted root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let jwks = Arc::new(Self {
            url,
            client: Client::builder(TokioExecutor::new()).build(https),
            keys: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(refresh(Arc::downgrade(&jwks)));
        Ok(jwks)
    }

    /// Whether one fetch has succeeded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The key a token names (`kid`; a token without one is accepted when the document holds
    /// exactly one key). An unknown `kid` fetches the document again, at most once per
    /// [`UNKNOWN_KID_EVERY`].
    pub async fn key(&self, kid: Option<&str>) -> Result<Key, String> {
        if let Some(key) = self.lookup(kid) {
            return Ok(key);
        }
        {
            // Decided under the fetch lock: requests that arrive together wait for one fetch
            // and then find it recent, instead of each fetching in turn.
            let _one = self.fetching.lock().await;
            if lock(&self.last_fetch).is_none_or(|t| t.elapsed() >= UNKNOWN_KID_EVERY) {
                if let Err(why) = self.fetch_locked().await {
                    tracing::warn!(
                        "SSE_GATEWAY_JWT_JWKS_URL: fetching the key set for an unknown key id failed: {why}"
                    );
                }
            }
        }
        if let Some(key) = self.lookup(kid) {
            return Ok(key);
        }
        Err(match kid {
            Some(_) => "token key id (kid) is not in the key set".into(),
            None => "token has no key id (kid) and the key set holds several keys".into(),
        })
    }

    /// Whether the key set still holds the key a verified token named (a cached verification
    /// stands only as long as its key does).
    pub fn holds(&self, kid: Option<&str>) -> bool {
        self.lookup(kid).is_some()
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Key> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        match kid {
            Some(kid) => keys.get(kid).cloned(),
            None if keys.len() == 1 => keys.values().next().cloned(),
            None => None,
        }
    }

    /// Fetches the document and replaces the keys; how many keys it holds.
    async fn fetch(&self) -> Result<usize, String> {
        let _one = self.fetching.lock().await;
        self.fetch_locked().await
    }

    /// [`Self::fetch`], for a caller that holds the fetch lock.
    async fn fetch_locked(&self) -> Result<usize, String> {
        *lock(&self.last_fetch) = Some(Instant::now());
        let work = async {
            let response = self
                .client
                .get(self.url.clone())
                .await
                .map_err(|e| format!("GET failed: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET answered {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the document failed: {e}"))?
                .to_bytes();
            let set: JwkSet = serde_json::from_slice(&body)
                .map_err(|e| format!("the document is not a JWK set: {e}"))?;
            Ok(set)
        };
        let set = tokio::time::timeout(FETCH_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let Some(algorithm) = algorithm_of(jwk) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let kid = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
            keys.insert(kid, Key { key, algorithm });
        }
        if keys.is_empty() {
            return Err("the document holds no RSA, EC P-256 or Ed25519 key".into());
        }
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        self.ready.store(true, Ordering::Release);
        Ok(n)
    }
}

/// The algorithm a key is used with: the one it names, else the one its type implies. `None`
/// for keys the gateway does not take (symmetric ones, other curves).
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let named = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    };
    // A named algorithm must fit the key's type.
    match (named, implied) {
        (Some(n), Some(i)) if family(n) == family(i) => Some(n),
        (None, i) => i,
        _ => None,
    }
}

fn family(a: Algorithm) -> u8 {
    match a {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => 1,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        Algorithm::EdDSA => 3,
        _ => 0,
    }
}

/// Fetches at start (retrying with backoff until it works), then every [`REFRESH_EVERY`].
async fn refresh(jwks: std::sync::Weak<Jwks>) {
    let mut backoff =
        crate::core::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
            .jittered();
    loop {
        let Some(j) = jwks.upgrade() else { return };
        let wait = match j.fetch().await {
            Ok(n) => {
                tracing::debug!(keys = n, "JWKS fetched");
                backoff.reset();
                REFRESH_EVERY
            }
            Err(why) => {
                let wait = if j.is_ready() {
                    REFRESH_EVERY.min(Duration::from_secs(30))
                } else {
                    backoff.next_delay()
                };
                tracing::warn!(
                    retry_in_ms = wait.as_millis() as u64,
                    "SSE_GATEWAY_JWT_JWKS_URL: fetching the key set failed: {why}{}",
                    if j.is_ready() {
                        "; the keys already known stay in use"
                    } else {
                        "; this replica stays not ready until it works"
                    }
                );
                wait
            }
        };
        drop(j);
        tokio::time::sleep(wait).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
