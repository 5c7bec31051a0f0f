//! Tokens: verifying clients' and publishers' JWTs, and minting them for development.
//!
//! Invariants: this is the only user of `jsonwebtoken`. The algorithm is pinned by the
//! configured key (HS256 for a secret; RS256, ES256 or EdDSA by the public key's type), so a
//! token naming any other algorithm, `none` included, is refused. `exp` is required, `sub` for
//! subscribers; `iss`/`aud` are checked when configured. Errors never contain the token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtKey};
use crate::jwks::Jwks;

/// The claims the gateway reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// When the token was issued, seconds since the epoch (what a revocation compares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Channels (or `prefix*`) the token may subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Channels (or `prefix*`) the token may publish to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Issuer, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when configured (minted tokens carry a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Where verification keys come from.
enum Keys {
    /// One configured key (secret or PEM) and its algorithm.
    Fixed(DecodingKey),
    /// A JWKS document: the key (and algorithm) by the token's `kid`.
    Jwks(Arc<Jwks>),
}

/// Verifies tokens with the configured key and rules.
pub struct Verifier {
    keys: Keys,
    subscriber: Validation,
    publisher: Validation,
    /// Tokens already verified, for asymmetric keys only (an HS256 check costs less than the
    /// lookup saves).
    cache: Option<VerifiedTokens>,
    leeway: u64,
}

/// Tokens that passed verification, so that a client reconnecting with the same token (a
/// storm after a replica dies, a browser's EventSource retrying) does not pay an RSA, ECDSA or
/// EdDSA signature check again.
///
/// Invariants: keyed by SHA-256 of the token (and which rules it passed), so no token is kept
/// and no other token can match; an entry is good only while the token itself is (`exp` +
/// leeway, on every hit) and, with a JWKS, while the key set still holds its `kid`; at most
/// [`VerifiedTokens::MAX`] entries, the expired ones dropped first and everything when it is
/// full of live ones (a flood of new tokens costs a check each, as without the cache).
struct VerifiedTokens {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verified>>,
}

struct Verified {
    claims: Claims,
    /// Unix seconds after which the token is no longer valid (`exp` + leeway).
    until: u64,
    kid: Option<String>,
}

impl VerifiedTokens {
    const MAX: usize = 65_536;

    fn new() -> Self {
        Self {
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn key(token: &str, publisher: bool) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update([u8::from(publisher)]);
        h.update(token.as_bytes());
        h.finalize().into()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], Verified>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &[u8; 32], now: u64) -> Option<(Claims, Option<String>)> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some(v) if now < v.until => Some((v.claims.clone(), v.kid.clone())),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: [u8; 32], verified: Verified, now: u64) {
        let mut entries = self.lock();
        if entries.len() >= Self::MAX {
            entries.retain(|_, v| now < v.until);
            if entries.len() >= Self::MAX {
                entries.clear();
            }
        }
        entries.insert(key, verified);
    }
}

impl Verifier {
    /// Builds the verifier from validated configuration.
    pub fn new(config: &Config) -> Result<Self, String> {
        crate::jwt_crypto::install();
        let (keys, alg) = match &config.jwt_key {
            JwtKey::Secret(s) | JwtKey::Development(s) => {
                (Keys::Fixed(DecodingKey::from_secret(s)), Algorithm::HS256)
            }
            JwtKey::PublicKeyPem(pem) => {
                let (key, alg) = crate::config::decoding_key_for_pem(pem)?;
                (Keys::Fixed(key), alg)
            }
            // The algorithm is each key's own; RS256 is only the starting point.
            JwtKey::Jwks(url) => (Keys::Jwks(Jwks::start(url)?), Algorithm::RS256),
        };
        let base = |required: &[&str]| {
            let mut v = Validation::new(alg);
            v.leeway = config.jwt_leeway.as_secs();
            v.validate_nbf = true;
            // A configured issuer or audience is required, not only checked when present
            // (SPEC §6.3): a token without the claim is refused.
            let mut required = required.to_vec();
            if config.jwt_issuer.is_some() {
                required.push("iss");
            }
            if config.jwt_audience.is_some() {
                required.push("aud");
            }
            v.set_required_spec_claims(&required);
            match &config.jwt_issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &config.jwt_audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            v
        };
        let asymmetric = !matches!(config.jwt_key, JwtKey::Secret(_) | JwtKey::Development(_));
        Ok(Self {
            keys,
            subscriber: base(&["exp", "sub"]),
            publisher: base(&["exp"]),
            cache: asymmetric.then(VerifiedTokens::new),
            leeway: config.jwt_leeway.as_secs(),
        })
    }

    /// Whether tokens can be verified now (a JWKS not fetched yet cannot).
    pub fn is_ready(&self) -> bool {
        match &self.keys {
            Keys::Fixed(_) => true,
            Keys::Jwks(jwks) => jwks.is_ready(),
        }
    }

    /// Verifies a subscriber's token.
    pub async fn subscriber(&self, token: &str) -> Result<Claims, String> {
        let claims = self.cached(token, false).await?;
        match claims.sub.as_deref() {
            Some(s) if !s.is_empty() => Ok(claims),
            _ => Err("token has an empty sub claim".into()),
        }
    }

    /// Verifies a publisher's token.
    pub async fn publisher(&self, token: &str) -> Result<Claims, String> {
        self.cached(token, true).await
    }

    /// [`Self::verify`] with the rules of a publisher or a subscriber, through the cache of
    /// verified tokens when there is one.
    async fn cached(&self, token: &str, publisher: bool) -> Result<Claims, String> {
        let validation = if publisher {
            &self.publisher
        } else {
            &self.subscriber
        };
        let Some(cache) = &self.cache else {
            return self.verify(token, validation).await;
        };
        let key = VerifiedTokens::key(token, publisher);
        let now = now_secs();
        if let Some((claims, kid)) = cache.get(&key, now) {
            // A key taken out of the JWKS takes its tokens with it.
            let still_keyed = match &self.keys {
                Keys::Fixed(_) => true,
                Keys::Jwks(jwks) => jwks.holds(kid.as_deref()),
            };
            if still_keyed {
                return Ok(claims);
            }
        }
        let claims = self.verify(token, validation).await?;
        let kid = match &self.keys {
            Keys::Fixed(_) => None,
            Keys::Jwks(_) => jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid),
        };
        cache.put(
            key,
            Verified {
                claims: claims.clone(),
                until: claims.exp.saturating_add(self.leeway),
                kid,
            },
            now,
        );
        Ok(claims)
    }

    async fn verify(&self, token: &str, validation: &Validation) -> Result<Claims, String> {
        use jsonwebtoken::errors::ErrorKind;
        let found;
        let (key, validation) = match &self.keys {
            Keys::Fixed(key) => (key, std::borrow::Cow::Borrowed(validation)),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|_| "token is malformed".to_string())?;
                found = jwks.key(header.kid.as_deref()).await?;
                let mut v = validation.clone();
                v.algorithms = vec![found.algorithm];
                (&found.key, std::borrow::Cow::Owned(v))
            }
        };
        decode::<Claims>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token has expired",
                    ErrorKind::ImmatureSignature => "token is not valid yet (nbf)",
                    ErrorKind::InvalidSignature => "token signature does not verify",
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        "token algorithm is not the one this gateway accepts"
                    }
                    ErrorKind::InvalidIssuer => "token issuer (iss) is not accepted",
                    ErrorKind::InvalidAudience => "token audience (aud) is not accepted",
                    ErrorKind::MissingRequiredClaim(c) if c == "exp" => "token has no exp claim",
                    ErrorKind::MissingRequiredClaim(c) if c == "sub" => "token has no sub claim",
                    ErrorKind::MissingRequiredClaim(c) if c == "iss" => {
                        "token has no iss claim (SSE_GATEWAY_JWT_ISSUER is set)"
                    }
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                        "token has no aud claim (SSE_GATEWAY_JWT_AUDIENCE is set)"
                    }
                    ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                        "token claims have the wrong types"
                    }
                    _ => "token is malformed",
                }
                .to_string()
            })
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs a token with the configured key, for `sse-gateway token` and development mode.
pub fn mint(
    config: &Config,
    mut claims: Claims,
    ttl: Duration,
    private_key_pem: Option<&[u8]>,
) -> Result<String, String> {
    let now = now_secs();
    claims.exp = now + ttl.as_secs();
    claims.iat.get_or_insert(now);
    if claims.iss.is_none() {
        claims.iss = config.jwt_issuer.clone();
    }
    if claims.aud.is_none() {
        claims.aud = config.jwt_audience.clone().map(serde_json::Value::String);
    }
    let (key, alg) = match (&config.jwt_key, private_key_pem) {
        (JwtKey::Secret(s) | JwtKey::Development(s), _) => {
            (EncodingKey::from_secret(s), Algorithm::HS256)
        }
        (JwtKey::PublicKeyPem(public), Some(private)) => {
            let (_, alg) = crate::config::decoding_key_for_pem(public)?;
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(private),
                Algorithm::ES256 => EncodingKey::from_ec_pem(private),
                _ => EncodingKey::from_ed_pem(private),
            }
            .map_err(|e| format!("--private-key-file: {e}"))?;
            (key, alg)
        }
        (JwtKey::PublicKeyPem(_), None) => return Err(
            "the gateway verifies with a public key; pass the matching --private-key-file to sign"
                .into(),
        ),
        (JwtKey::Jwks(_), _) => return Err(
            "the gateway verifies with keys from SSE_GATEWAY_JWT_JWKS_URL; tokens are minted by their issuer"
                .into(),
        ),
    };
    encode(&Header::new(alg), &claims, &key).map_err(|e| format!("cannot sign the token: {e}"))
}
