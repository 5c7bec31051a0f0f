//! Who may open which stream: the token and channel matrix of `GET /events`, against a real
//! gateway process.

mod support;

use serde_json::json;
use support::*;

async fn refused(gw: &Gateway, path: &str, token: Option<&str>) -> Reply {
    match SseClient::open(gw.client, path, token).await {
        Ok(_) => panic!("{path} was accepted"),
        Err(reply) => reply,
    }
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["error"], code, "body: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn token_matrix() {
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_JWT_ISSUER", "https://issuer.test"),
        ("SSE_GATEWAY_JWT_AUDIENCE", "sse"),
    ]);
    let good_claims = |extra: serde_json::Value| -> serde_json::Value {
        let mut c = json!({"sub": "alice", "exp": now() + 600, "iss": "https://issuer.test",
                               "aud": ["other", "sse"], "channels": ["orders", "team:*"]});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };

    // The good token opens the stream, by header and by query.
    let good = token(good_claims(json!({})));
    assert!(
        SseClient::open(gw.client, "/events?channel=orders", Some(&good))
            .await
            .is_ok()
    );
    let by_query = format!("/events?channel=team:7&access_token={good}");
    assert!(SseClient::open(gw.client, &by_query, None).await.is_ok());
    // The personal channel needs no grant.
    assert!(SseClient::open(gw.client, "/events", Some(&good))
        .await
        .is_ok());
    assert!(
        SseClient::open(gw.client, "/events?channel=user:alice", Some(&good))
            .await
            .is_ok()
    );

    // No token.
    let r = refused(&gw, "/events?channel=orders", None).await;
    assert_error(&r, 401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));

    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature",
            token_with(good_claims(json!({})), "another-secret-0123456789"),
        ),
        ("expired", token(good_claims(json!({"exp": now() - 60})))),
        ("no exp", token(good_claims(json!({"exp": null})))),
        ("no sub", token(good_claims(json!({"sub": null})))),
        (
            "wrong iss",
            token(good_claims(json!({"iss": "https://evil.test"}))),
        ),
        ("wrong aud", token(good_claims(json!({"aud": "other"})))),
        ("garbage", "not.a.token".to_string()),
        ("alg none", {
            use base64::Engine;
            let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                b.encode(br#"{"alg":"none","typ":"JWT"}"#),
                b.encode(good_claims(json!({})).to_string().as_bytes())
            )
        }),
        (
            "channels not an array",
            token(good_claims(json!({"channels": "orders"}))),
        ),
    ];
    for (name, t) in &cases {
        let r = refused(&gw, "/events?channel=orders", Some(t)).await;
        assert_eq!(r.status, 401, "{name}: {}", r.text());
        assert_error(&r, 401, "unauthorized");
        assert!(
            !r.text().contains(t.as_str()),
            "{name}: the token was echoed"
        );
    }

    // Channel checks.
    let r = refused(&gw, "/events?channel=secret", Some(&good)).await;
    assert_error(&r, 403, "forbidden");
    let r = refused(&gw, "/events?channel=orders&channel=user:bob", Some(&good)).await;
    assert_error(&r, 403, "forbidden");
    for bad in ["", "a%20b", "a*", "a,b", "%7Bx%7D", "%C3%A9"] {
        let r = refused(&gw, &format!("/events?channel={bad}"), Some(&good)).await;
        assert_error(&r, 400, "bad_request");
    }
    let long = "a".repeat(201);
    let r = refused(&gw, &format!("/events?channel={long}"), Some(&good)).await;
    assert_error(&r, 400, "bad_request");
    let wide = token(good_claims(json!({"channels": ["*"]})));
    let many: String = (0..33).map(|i| format!("channel=c{i}&")).collect();
    let r = refused(&gw, &format!("/events?{many}"), Some(&wide)).await;
    assert_error(&r, 400, "bad_request");
    let many: String = (0..32).map(|i| format!("channel=c{i}&")).collect();
    assert!(
        SseClient::open(gw.client, &format!("/events?{many}"), Some(&wide))
            .await
            .is_ok()
    );

    // Tokens never reach the logs.
    let logs = gw.logs.lock().unwrap().clone();
    assert!(!logs.contains(&good));
    for (_, t) in &cases {
        assert!(!logs.contains(t.as_str()));
    }

    let rejected = gw
        .metric("sse_gateway_connections_rejected_total{reason=\"unauthorized\"}")
        .await;
    assert!(rejected >= cases.len() as f64 + 1.0, "{rejected}");
}

#[tokio::test]
async fn a_public_key_pins_rs256() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let public = format!("{dir}/tests/fixtures/rsa_public.pem");
    let gw = Gateway::start_raw(&[("SSE_GATEWAY_JWT_PUBLIC_KEY_FILE", &public)]);
    let private = std::fs::read(format!("{dir}/tests/fixtures/rsa_private.pem")).unwrap();
    let claims = json!({"sub": "alice", "exp": now() + 600, "channels": ["orders"]});
    let rs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    assert!(
        SseClient::open(gw.client, "/events?channel=orders", Some(&rs))
            .await
            .is_ok()
    );

    // An HS256 token "signed" with the public key text must not pass (key confusion).
    let public_text = std::fs::read_to_string(&public).unwrap();
    let confused = token_with(claims.clone(), &public_text);
    let r = refused(&gw, "/events?channel=orders", Some(&confused)).await;
    assert_error(&r, 401, "unauthorized");
    // A plain HS256 token too.
    let r = refused(&gw, "/events?channel=orders", Some(&token(claims))).await;
    assert_error(&r, 401, "unauthorized");

    // The token helper signs with the matching private key and the gateway accepts it.
    let minted = stdout_of(
        std::process::Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .env("SSE_GATEWAY_JWT_PUBLIC_KEY_FILE", &public)
            .args([
                "token",
                "--sub",
                "bob",
                "--channel",
                "orders",
                "--ttl",
                "10m",
            ])
            .args([
                "--private-key-file",
                &format!("{dir}/tests/fixtures/rsa_private.pem"),
            ]),
    );
    assert!(
        SseClient::open(gw.client, "/events?channel=orders", Some(minted.trim()))
            .await
            .is_ok()
    );
}
