//! HS256 tokens as publishers' and clients' back ends mint them.

/// The HS256 secret test gateways share.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Now, in Unix seconds (what `exp` counts in).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs `claims` with HS256 under `secret`.
pub fn token_with(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of JSON claims cannot fail")
}

/// Signs `claims` with the test secret.
pub fn token(claims: serde_json::Value) -> String {
    token_with(claims, SECRET)
}

/// A subscriber token for `sub` granting `channels`, valid for an hour.
pub fn client_token(sub: &str, channels: &[&str]) -> String {
    token(serde_json::json!({"sub": sub, "exp": now() + 3600, "channels": channels}))
}

/// A publisher token for every channel, valid for an hour.
pub fn publisher_token() -> String {
    token(serde_json::json!({"exp": now() + 3600, "publish": ["*"]}))
}
