//! Compact JWS parsing and token verification.
//!
//! Each input is used twice:
//! 1. as a token (lossy UTF-8): `jws::parse`, `Verifier::verify_at`, `verify_signed` and
//!    `verify_revocations` with a fixed one-key verifier. A fuzzer cannot forge the
//!    signature, so this reaches the parser and the header checks;
//! 2. as a payload that this target signs with the verifier's own key, once as a
//!    provisioning token and once as a revocation list, so the claims deserialization and
//!    the `iss`/`aud`/time checks are reached too.
#![no_main]

use std::sync::OnceLock;

use keygate::token::{
    Header, Jwk, JwkSet, RevocationList, TYP_PROVISIONING, TYP_REVOCATIONS, Verifier, VerifierConfig, jws,
};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

const ISSUER: &str = "https://keygate.example";
const AUDIENCE: &str = "fleet";
const NOW: i64 = 1_800_000_000;
const SECRET: [u8; 32] = [0x11; 32];

struct Fixture {
    verifier: Verifier,
    signer: SigningKey,
    kid: String,
}

fn build() -> Result<Fixture, String> {
    let secret = p256::SecretKey::from_slice(&SECRET).map_err(|e| e.to_string())?;
    let jwk = Jwk::from_public_key(&secret.public_key());
    let kid = jwk.kid.clone().ok_or("the JWK has no kid")?;
    let verifier = Verifier::new(
        &JwkSet { keys: vec![jwk] },
        VerifierConfig::new(ISSUER, AUDIENCE),
    )
    .map_err(|e| e.to_string())?;
    Ok(Fixture {
        verifier,
        signer: SigningKey::from(&secret),
        kid,
    })
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            build()
                .map_err(|e| eprintln!("jws_verify: fixture failed, only parsing is fuzzed: {e}"))
                .ok()
        })
        .as_ref()
}

/// A compact JWS of `payload` under `header`, signed (low-S, as keygate signs) by `signer`.
fn sign(signer: &SigningKey, header: &Header, payload: &[u8]) -> Option<String> {
    let input = jws::signing_input(header, payload).ok()?;
    let sig: Signature = signer.sign(input.as_bytes());
    Some(jws::assemble(&input, &sig.normalize_s().to_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = jws::parse(&s);

    let Some(f) = fixture() else {
        return;
    };
    let v = &f.verifier;

    // 1. the input as a token
    let _ = v.verify_at(&s, NOW);
    let _ = v.verify_signed::<serde_json::Value>(&s, TYP_PROVISIONING);
    let _ = v.verify_revocations(&s);

    // 2. the input as the payload of validly signed tokens
    let list: Option<RevocationList> = sign(&f.signer, &Header::es256(TYP_REVOCATIONS, &f.kid), data)
        .and_then(|t| v.verify_revocations(&t).ok());
    if let Some(token) = sign(&f.signer, &Header::es256(TYP_PROVISIONING, &f.kid), data)
        && let Ok(claims) = v.verify_at(&token, NOW)
    {
        let _ = claims.scopes();
        let _ = claims.is_one_time();
        if let Some(list) = &list {
            let _ = list.revoked_at(&claims.jti);
        }
    }
});
