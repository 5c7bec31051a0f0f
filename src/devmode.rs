//! Development mode: no key and no Redis. The gateway makes a random key and prints, on stdout
//! on purpose, commands that work as pasted: one that streams and one that publishes.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::{mint, Claims};
use crate::config::Config;

/// Channel the printed commands use.
pub const DEMO_CHANNEL: &str = "demo";

fn reachable(addr: SocketAddr, tls: bool) -> String {
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{ip}:{}", addr.port())
}

/// The text printed at start-up in development mode.
pub fn instructions(config: &Config, client: SocketAddr) -> Result<String, String> {
    let ttl = Duration::from_secs(24 * 3600);
    let subscriber = mint(
        config,
        Claims {
            sub: Some("dev".into()),
            channels: Some(vec![DEMO_CHANNEL.to_string()]),
            ..Claims::default()
        },
        ttl,
        None,
    )?;
    let publisher = mint(
        config,
        Claims {
            sub: Some("dev-publisher".into()),
            // The demo channel only: a token printed to a terminal must not open everything.
            publish: Some(vec![DEMO_CHANNEL.to_string()]),
            ..Claims::default()
        },
        ttl,
        None,
    )?;
    let base = reachable(client, config.tls.is_some());
    Ok(format!(
        "\n\
         sse-gateway is in DEVELOPMENT MODE: tokens are signed with a random key that dies with this process.\n\
         Set SSE_GATEWAY_JWT_SECRET (or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE) for anything else.\n\
         \n\
         Stream events (leave it running):\n\
         curl -N -H 'Authorization: Bearer {subscriber}' '{base}/events?channel={DEMO_CHANNEL}'\n\
         \n\
         Publish one (in another terminal):\n\
         curl -X POST -H 'Authorization: Bearer {publisher}' -H 'Content-Type: application/json' -d '{{\"channel\":\"{DEMO_CHANNEL}\",\"event\":\"greeting\",\"data\":\"hello\"}}' '{base}/publish'\n\
         \n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use clap::Parser;

    fn claims_of(token: &str) -> serde_json::Value {
        let payload = token.split('.').nth(1).expect("a JWT");
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url");
        serde_json::from_slice(&json).expect("claims")
    }

    #[test]
    fn printed_tokens_cover_the_demo_channel_only() {
        let config = crate::config::Cli::parse_from(["sse-gateway"])
            .settings
            .into_config()
            .expect("development mode");
        let text = instructions(&config, "127.0.0.1:8080".parse().unwrap()).unwrap();
        let tokens: Vec<&str> = text
            .split("Bearer ")
            .skip(1)
            .filter_map(|t| t.split('\'').next())
            .collect();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            claims_of(tokens[0])["channels"],
            serde_json::json!(["demo"])
        );
        assert_eq!(claims_of(tokens[1])["publish"], serde_json::json!(["demo"]));
    }
}
