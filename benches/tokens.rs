//! What verifying a client's token costs, by algorithm, and what the verified-token cache
//! saves a client that reconnects with the same token. The load tool cannot show RS256 with a
//! new token per connect: signing RS256 is a thousand times dearer than checking it, so the
//! generator, not the gateway, would be measured. Run: `cargo bench --bench tokens`.

use std::path::PathBuf;

use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use sse_gateway::config::Cli;
use sse_gateway::Verifier;

fn verifier(args: &[&str]) -> Verifier {
    let mut argv = vec!["sse-gateway"];
    argv.extend_from_slice(args);
    let config = Cli::parse_from(argv)
        .settings
        .into_config()
        .expect("a valid configuration");
    Verifier::new(&config).expect("a verifier")
}

fn claims(i: u64) -> serde_json::Value {
    serde_json::json!({"sub": format!("user-{i}"), "exp": 4_000_000_000u64, "channels": ["bench"]})
}

fn tokens(c: &mut Criterion) {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public = fixtures.join("rsa_public.pem");
    let private = std::fs::read(fixtures.join("rsa_private.pem")).expect("the fixture key");
    let secret = "bench-secret-0123456789abcdef";
    let hs = verifier(&["--jwt-secret", secret]);
    let rs = verifier(&[
        "--jwt-public-key-file",
        public.to_str().expect("a UTF-8 path"),
    ]);
    let hs_key = EncodingKey::from_secret(secret.as_bytes());
    let rs_key = EncodingKey::from_rsa_pem(&private).expect("an RSA key");
    // Distinct HS256 tokens (HS256 is never cached; distinct all the same).
    let n = 2_000u64;
    let hs_tokens: Vec<String> = (0..n)
        .map(|i| encode(&Header::new(Algorithm::HS256), &claims(i), &hs_key).expect("signed"))
        .collect();
    // RS256 signing is slow (and slower still in a test build): only what the runs use.
    let rs_tokens: Vec<String> = (0..64u64)
        .map(|i| encode(&Header::new(Algorithm::RS256), &claims(i), &rs_key).expect("signed"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut g = c.benchmark_group("verify");
    let mut i = 0usize;
    g.bench_function("hs256-new-token", |b| {
        b.iter(|| {
            i = (i + 1) % hs_tokens.len();
            rt.block_on(hs.subscriber(&hs_tokens[i])).expect("valid")
        })
    });
    // RS256, a token the cache has not seen: a fresh verifier per batch keeps it cold.
    g.bench_function("rs256-new-token", |b| {
        b.iter_batched(
            || {
                verifier(&[
                    "--jwt-public-key-file",
                    public.to_str().expect("a UTF-8 path"),
                ])
            },
            |fresh| rt.block_on(fresh.subscriber(&rs_tokens[0])).expect("valid"),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut j = 0usize;
    g.bench_function("rs256-same-token-again", |b| {
        b.iter(|| {
            j = (j + 1) % 64;
            rt.block_on(rs.subscriber(&rs_tokens[j])).expect("valid")
        })
    });
    g.finish();
}

criterion_group!(benches, tokens);
criterion_main!(benches);
