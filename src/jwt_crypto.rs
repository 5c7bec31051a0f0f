//! RSA token signatures checked with `ring` instead of RustCrypto's `rsa`: the same answer in a
//! fraction of the time (`benches/tokens.rs`), which is what an RS256 deployment pays on every
//! connect with a token it has not seen.
//!
//! Invariants: only the verification of RSA signatures (RS256/384/512, PS256/384/512) changes;
//! signing, HMAC, ECDSA and EdDSA stay with jsonwebtoken's RustCrypto provider. ring takes keys
//! of 2048 to 8192 bits; a signature it does not accept is checked again by the RustCrypto
//! provider, so no token that verified before is refused now.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::signature::{Error, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature::{self as ring_sig, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};

/// Makes ring check RSA token signatures for the whole process (once; later calls do nothing).
pub fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| CryptoProvider {
        signer_factory: rust_crypto::DEFAULT_PROVIDER.signer_factory,
        verifier_factory: verifier,
        key_utils: rust_crypto::DEFAULT_PROVIDER.key_utils.clone(),
    });
    let _ = provider.install_default();
}

fn verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    let fallback = (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key)?;
    let params: &'static RsaParameters = match alg {
        Algorithm::RS256 => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring_sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring_sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &ring_sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &ring_sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &ring_sig::RSA_PSS_2048_8192_SHA512,
        _ => return Ok(fallback),
    };
    let public = match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => Public::Der(der.clone()),
        DecodingKeyKind::RsaModulusExponent { n, e } => Public::Components(n.clone(), e.clone()),
    };
    Ok(Box::new(RingRsa {
        alg: *alg,
        params,
        public,
        fallback,
    }))
}

enum Public {
    /// PKCS#1 `RSAPublicKey` DER (a PEM key).
    Der(Vec<u8>),
    /// Modulus and exponent, big-endian (a JWK).
    Components(Vec<u8>, Vec<u8>),
}

struct RingRsa {
    alg: Algorithm,
    params: &'static RsaParameters,
    public: Public,
    fallback: Box<dyn JwtVerifier>,
}

impl RingRsa {
    /// Whether ring accepts the signature (the fast path).
    fn ring_accepts(&self, msg: &[u8], sig: &[u8]) -> bool {
        match &self.public {
            Public::Der(der) => UnparsedPublicKey::new(self.params, der)
                .verify(msg, sig)
                .is_ok(),
            Public::Components(n, e) => RsaPublicKeyComponents { n, e }
                .verify(self.params, msg, sig)
                .is_ok(),
        }
    }
}

impl Verifier<Vec<u8>> for RingRsa {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), Error> {
        if self.ring_accepts(msg, sig) {
            return Ok(());
        }
        // A key ring does not take (under 2048 bits), or a bad signature: the slow path decides.
        self.fallback.verify(msg, sig)
    }
}

impl JwtVerifier for RingRsa {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};

    /// ring itself accepts the fixture key's RS256 signatures, given as a PEM key and as a JWK
    /// (so the fast path is the one taken), and refuses a tampered message.
    #[test]
    fn ring_takes_pem_and_jwk_rsa_keys() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let private = std::fs::read(format!("{dir}/tests/fixtures/rsa_private.pem")).unwrap();
        let public = std::fs::read(format!("{dir}/tests/fixtures/rsa_public.pem")).unwrap();
        let jwk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/tests/fixtures/rsa_public.jwk.json")).unwrap(),
        )
        .unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &serde_json::json!({"sub": "a", "exp": 4_000_000_000u64}),
            &EncodingKey::from_rsa_pem(&private).unwrap(),
        )
        .unwrap();
        let (message, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let keys = [
            DecodingKey::from_rsa_pem(&public).unwrap(),
            DecodingKey::from_rsa_components(
                jwk["n"].as_str().unwrap(),
                jwk["e"].as_str().unwrap(),
            )
            .unwrap(),
        ];
        for key in &keys {
            let Ok(v) = verifier(&Algorithm::RS256, key) else {
                panic!("no verifier");
            };
            let ring = RingRsa {
                alg: Algorithm::RS256,
                params: &ring_sig::RSA_PKCS1_2048_8192_SHA256,
                public: match key.kind() {
                    DecodingKeyKind::SecretOrDer(d) => Public::Der(d.clone()),
                    DecodingKeyKind::RsaModulusExponent { n, e } => {
                        Public::Components(n.clone(), e.clone())
                    }
                },
                fallback: v,
            };
            assert!(ring.ring_accepts(message.as_bytes(), &sig));
            assert!(!ring.ring_accepts(b"tampered", &sig));
            assert!(ring.verify(b"tampered", &sig.to_vec()).is_err());
        }
    }
}
