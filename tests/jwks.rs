//! Keys from a JWKS document (SPEC §6.3): fetched at start (not ready before), chosen by `kid`
//! among RSA, EC and Ed25519 keys, refetched on an unknown `kid` at most once per 10 s.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// A JWKS endpoint the test controls: the document (503 while `None`) and how often it was
/// fetched.
struct KeyServer {
    doc: Arc<Mutex<Option<Value>>>,
    hits: Arc<AtomicUsize>,
    /// How long each answer takes (a slow identity provider), in ms.
    delay_ms: Arc<AtomicUsize>,
    url: String,
}

impl KeyServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let doc: Arc<Mutex<Option<Value>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicUsize::new(0));
        let (d, h, w) = (doc.clone(), hits.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (d, h, w) = (d.clone(), h.clone(), w.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    h.fetch_add(1, Ordering::SeqCst);
                    let wait = w.load(Ordering::SeqCst) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let body = d.lock().unwrap().clone();
                    let resp = match body {
                        Some(v) => {
                            let b = v.to_string();
                            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len())
                        }
                        None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self {
            doc,
            hits,
            delay_ms,
            url,
        }
    }

    fn publish(&self, keys: &[&Value]) {
        *self.doc.lock().unwrap() = Some(json!({ "keys": keys }));
    }
}

/// A signing key of the test and its public JWK.
struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
    jwk: Value,
}

impl Signer {
    fn ec(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw();
        Self {
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            alg: Algorithm::ES256,
            kid: kid.into(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                        "y": URL_SAFE_NO_PAD.encode(&raw[33..65])}),
        }
    }

    fn ed25519(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Self {
            key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                        "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())}),
        }
    }

    fn rsa() -> Self {
        let dir = env!("CARGO_MANIFEST_DIR");
        let pem = std::fs::read(format!("{dir}/tests/fixtures/rsa_private.pem")).unwrap();
        let jwk =
            std::fs::read_to_string(format!("{dir}/tests/fixtures/rsa_public.jwk.json")).unwrap();
        Self {
            key: EncodingKey::from_rsa_pem(&pem).unwrap(),
            alg: Algorithm::RS256,
            kid: "rsa1".into(),
            jwk: serde_json::from_str(&jwk).unwrap(),
        }
    }

    fn token(&self, sub: &str, channel: &str) -> String {
        self.token_until(sub, channel, now() + 600)
    }

    /// A token of this key expiring at `exp` (unix seconds).
    fn token_until(&self, sub: &str, channel: &str, exp: u64) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        let claims = json!({"sub": sub, "exp": exp, "channels": [channel]});
        encode(&header, &claims, &self.key).unwrap()
    }
}

fn gateway(keys: &KeyServer) -> Gateway {
    Gateway::start_raw(&[("SSE_GATEWAY_JWT_JWKS_URL", &keys.url)])
}

#[tokio::test]
async fn a_replica_waits_for_its_key_set_then_takes_rsa_ec_and_ed25519_keys_by_kid() {
    let keys = KeyServer::start().await;
    let gw = gateway(&keys);
    // The document is not there yet: not ready, and tokens cannot be checked.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.readyz().await, 503);
    let (rsa, ec, ed) = (Signer::rsa(), Signer::ec("ec1"), Signer::ed25519("ed1"));
    keys.publish(&[
        &rsa.jwk,
        &ec.jwk,
        &ed.jwk,
        &json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}),
    ]);
    gw.wait_ready(true, T).await;
    for s in [&rsa, &ec, &ed] {
        let r = SseClient::open(gw.client, "/events?channel=k", Some(&s.token("kim", "k"))).await;
        assert!(
            r.is_ok(),
            "{:?} key refused: {:?}",
            s.alg,
            r.err().map(|r| r.text())
        );
    }
    // A token signed by one key but naming another's kid does not verify.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ed1".into());
    let forged = encode(
        &header,
        &json!({"sub": "kim", "exp": now() + 600, "channels": ["k"]}),
        &ec.key,
    )
    .unwrap();
    let r = SseClient::open(gw.client, "/events?channel=k", Some(&forged)).await;
    assert_eq!(r.err().map(|r| r.status), Some(401));
    // A symmetric key in the document is never used: an HS256 token under it is refused.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("sym".into());
    let sym = encode(
        &hs,
        &json!({"sub": "kim", "exp": now() + 600, "channels": ["k"]}),
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    let r = SseClient::open(gw.client, "/events?channel=k", Some(&sym)).await;
    assert_eq!(r.err().map(|r| r.status), Some(401));
    assert!(!gw.logs.lock().unwrap().contains(&forged));
}

#[tokio::test]
async fn rotated_keys_are_picked_up_and_a_flood_of_unknown_kids_costs_one_fetch() {
    let keys = KeyServer::start().await;
    let old = Signer::ec("old");
    keys.publish(&[&old.jwk]);
    let gw = gateway(&keys);
    gw.wait_ready(true, T).await;
    let started = Instant::now();
    assert!(
        SseClient::open(gw.client, "/events?channel=r", Some(&old.token("lou", "r")))
            .await
            .is_ok()
    );
    // The issuer rotates: the new key is published, then tokens naming it arrive, more than
    // 10 s after the start-up fetch (so an unknown kid may fetch again), all at once.
    let new = Signer::ec("new");
    keys.publish(&[&old.jwk, &new.jwk]);
    // A slow provider: the tokens pile up while the one fetch is on its way.
    keys.delay_ms.store(500, Ordering::SeqCst);
    tokio::time::sleep_until((started + Duration::from_millis(10_500)).into()).await;
    let before = keys.hits.load(Ordering::SeqCst);
    // Forty tokens at once: three in four name kids nobody published, every fourth the new
    // key. The first unknown kid fetches; the others wait for that fetch instead of being
    // refused while it is on its way, or fetching in turn.
    let flood: Vec<_> = (0..40)
        .map(|i| {
            let token = if i % 4 == 0 {
                new.token("lou", "r")
            } else {
                Signer::ec(&format!("bogus-{i}")).token("lou", "r")
            };
            let addr = gw.client;
            tokio::spawn(async move {
                let status = SseClient::open(addr, "/events?channel=r", Some(&token))
                    .await
                    .err()
                    .map(|r| r.status);
                (i, status)
            })
        })
        .collect();
    for f in flood {
        let (i, status) = f.await.unwrap();
        let want = if i % 4 == 0 { None } else { Some(401) };
        assert_eq!(status, want, "token {i}");
    }
    let fetched = keys.hits.load(Ordering::SeqCst) - before;
    assert_eq!(fetched, 1, "fetches for 40 unknown kids arriving together");
    // That fetch brought the new key: tokens naming it are accepted.
    let deadline = started + Duration::from_secs(25);
    loop {
        let r = SseClient::open(gw.client, "/events?channel=r", Some(&new.token("lou", "r"))).await;
        if r.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = keys.hits.load(Ordering::SeqCst) - before;
    assert!(total <= 3, "{total} fetches in the whole rotation");
    // The old key, still published, still works.
    assert!(
        SseClient::open(gw.client, "/events?channel=r", Some(&old.token("lou", "r")))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_jwks_url_beside_another_key_source_is_refused_at_start() {
    let (code, logs) = Gateway::try_start(&[
        (
            "SSE_GATEWAY_JWT_JWKS_URL",
            "https://auth.example.com/jwks.json",
        ),
        ("SSE_GATEWAY_JWT_SECRET", SECRET),
    ])
    .err()
    .expect("refused");
    assert_eq!(code, Some(2));
    assert!(logs.contains("SSE_GATEWAY_JWT_JWKS_URL"), "{logs}");
    let (code, _) = Gateway::try_start(&[("SSE_GATEWAY_JWT_JWKS_URL", "ftp://x/jwks")])
        .err()
        .expect("refused");
    assert_eq!(code, Some(2));
}

/// Verified tokens are remembered (a reconnect skips the signature check), but never past the
/// token's own `exp`, nor past the key that signed it leaving the key set.
#[tokio::test]
async fn a_remembered_token_is_refused_after_its_expiry_and_after_its_key_is_withdrawn() {
    let keys = KeyServer::start().await;
    let old = Signer::ec("old");
    keys.publish(&[&old.jwk]);
    let gw = gateway(&keys);
    gw.wait_ready(true, T).await;
    let started = Instant::now();
    let open = |token: String| {
        let addr = gw.client;
        async move {
            SseClient::open(addr, "/events?channel=c", Some(&token))
                .await
                .map(|_| 200)
                .unwrap_or_else(|r| r.status)
        }
    };
    let short = old.token_until("sam", "c", now() + 2);
    assert_eq!(open(short.clone()).await, 200);
    assert_eq!(open(short.clone()).await, 200, "the same token again");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(open(short).await, 401, "expired, remembered or not");

    let long = old.token("sam", "c");
    assert_eq!(open(long.clone()).await, 200);
    // The issuer withdraws the old key; a token naming the new one makes the replica fetch the
    // set again (more than 10 s after the start-up fetch).
    let new = Signer::ec("new");
    keys.publish(&[&new.jwk]);
    tokio::time::sleep_until((started + Duration::from_millis(10_500)).into()).await;
    assert_eq!(open(new.token("sam", "c")).await, 200);
    assert_eq!(
        open(long).await,
        401,
        "a token whose key left the key set is refused, though it was verified before"
    );
}
