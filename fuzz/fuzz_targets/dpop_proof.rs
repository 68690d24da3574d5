//! RFC 9449 DPoP proof checks (`keygate::token::verify_proof`) and URL normalization.
//!
//! Each input is used twice:
//! 1. as a proof (lossy UTF-8), checked against a fixed request context. A fuzzer cannot
//!    make a valid signature, so this reaches the parser and the header and JWK checks;
//! 2. as the claims of a proof that this target signs with a fixed key named in the `jwk`
//!    header, so the claim checks (`jti`, `htm`, `htu`, `iat`, `ath`) are reached too.
#![no_main]

use std::sync::OnceLock;

use keygate::token::dpop::normalize_url;
use keygate::token::{Jwk, ProofContext, TYP_DPOP, b64, verify_proof};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

const URL: &str = "https://keygate.example/v1/tokens/redeem";
const SECRET: [u8; 32] = [0x33; 32];

const CTX: ProofContext<'static> = ProofContext {
    method: "POST",
    url: URL,
    access_token: Some("abc"),
    now: 1_800_000_000,
    max_age: 60,
    max_skew: 5,
};

struct Fixture {
    signer: SigningKey,
    /// base64url of the protected header, with the public key as `jwk`.
    header_b64: String,
}

fn build() -> Result<Fixture, String> {
    let secret = p256::SecretKey::from_slice(&SECRET).map_err(|e| e.to_string())?;
    let jwk = serde_json::to_string(&Jwk::from_public_key(&secret.public_key()))
        .map_err(|e| e.to_string())?;
    let header = format!(r#"{{"typ":"{TYP_DPOP}","alg":"ES256","jwk":{jwk}}}"#);
    Ok(Fixture {
        signer: SigningKey::from(&secret),
        header_b64: b64::encode(header),
    })
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            build()
                .map_err(|e| eprintln!("dpop_proof: fixture failed, only unsigned proofs are fuzzed: {e}"))
                .ok()
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);

    // 1. the input as a proof, and as a URL
    let _ = verify_proof(&s, &CTX);
    let _ = normalize_url(&s);

    // 2. the input as the claims of a validly signed proof
    if let Some(f) = fixture() {
        let input = format!("{}.{}", f.header_b64, b64::encode(data));
        let sig: Signature = f.signer.sign(input.as_bytes());
        let proof = format!("{input}.{}", b64::encode(sig.to_bytes()));
        let _ = verify_proof(&proof, &CTX);
    }
});
