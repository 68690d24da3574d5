//! RFC 9449 DPoP proofs: the checks of §4.3 that need no server state.
//!
//! The caller adds the two that do: the proof's `jti` has not been seen before (replay), and
//! the proof key's thumbprint equals the token's `cnf.jkt` (§6.1).

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde::Deserialize;

use super::b64;
use super::jwk::Jwk;

/// `typ` header of DPoP proofs (RFC 9449 §4.2).
pub const TYP_DPOP: &str = "dpop+jwt";

/// Longest proof accepted, and longest `jti`.
const MAX_PROOF: usize = 4096;
const MAX_JTI: usize = 256;

/// What the request a proof came with looks like.
#[derive(Debug, Clone)]
pub struct ProofContext<'a> {
    /// HTTP method of the request, e.g. `POST`.
    pub method: &'a str,
    /// The URL the request was sent to (query and fragment are ignored).
    pub url: &'a str,
    /// The access token presented with the proof: `ath` must be its base64url SHA-256.
    pub access_token: Option<&'a str>,
    /// Server time, Unix seconds.
    pub now: i64,
    /// A proof's `iat` may be at most this many seconds in the past...
    pub max_age: i64,
    /// ...and at most this many in the future (clock skew).
    pub max_skew: i64,
}

/// A proof that passed every stateless check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// RFC 7638 thumbprint of the proof's public key.
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

/// Why a proof was refused. Each message names the check and holds no token material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("DPoP proof is malformed: {0}")]
    Malformed(String),
    #[error("DPoP proof typ must be \"dpop+jwt\"")]
    Type,
    #[error("DPoP proof alg {0:?} is not supported (ES256 only)")]
    Algorithm(String),
    #[error("DPoP proof jwk header is missing or not a public EC P-256 key: {0}")]
    Jwk(String),
    #[error("DPoP proof signature does not verify with its jwk")]
    BadSignature,
    #[error("DPoP proof is for method {found:?}, not {expected}")]
    Method { found: String, expected: String },
    #[error("DPoP proof is for URL {found:?}, not {expected}")]
    Url { found: String, expected: String },
    #[error("DPoP proof is stale or from the future: iat {iat} is outside [{earliest}, {latest}]")]
    Stale { iat: i64, earliest: i64, latest: i64 },
    #[error("DPoP proof ath is missing or is not the hash of the presented token")]
    Ath,
}

#[derive(Deserialize)]
struct ProofHeader {
    typ: Option<String>,
    alg: String,
    jwk: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: String,
    htm: String,
    htu: String,
    iat: i64,
    ath: Option<String>,
}

/// Checks a DPoP proof (RFC 9449 §4.3 steps 1 to 11, without the nonce and the replay check)
/// and returns its key thumbprint, `jti` and `iat`.
pub fn verify_proof(proof: &str, ctx: &ProofContext<'_>) -> Result<Proof, DpopError> {
    if proof.len() > MAX_PROOF {
        return Err(DpopError::Malformed(format!("longer than {MAX_PROOF} bytes")));
    }
    let mut it = proof.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(DpopError::Malformed("not a compact JWS".into()));
    };
    let decode = |part: &str, what: &str| {
        b64::decode(part).ok_or_else(|| DpopError::Malformed(format!("{what} is not base64url")))
    };
    let header: ProofHeader = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|e| DpopError::Malformed(format!("header: {e}")))?;
    if header.typ.as_deref() != Some(TYP_DPOP) {
        return Err(DpopError::Type);
    }
    if header.alg != super::ALG_ES256 {
        return Err(DpopError::Algorithm(header.alg));
    }
    if header.crit.is_some() {
        return Err(DpopError::Malformed(
            "critical header parameters are not supported".into(),
        ));
    }
    let jwk_value = header.jwk.ok_or_else(|| DpopError::Jwk("no jwk header".into()))?;
    // §4.3 step 7: the jwk must not hold a private key.
    if jwk_value.get("d").is_some() {
        return Err(DpopError::Jwk("it contains a private key".into()));
    }
    let jwk: Jwk = serde_json::from_value(jwk_value).map_err(|e| DpopError::Jwk(e.to_string()))?;
    let (point, jkt) = jwk.es256_point().map_err(|e| DpopError::Jwk(e.to_string()))?;
    let signature = decode(s, "signature")?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(&proof.as_bytes()[..h.len() + 1 + p.len()], &signature)
        .map_err(|_| DpopError::BadSignature)?;
    let claims: ProofClaims = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|e| DpopError::Malformed(format!("claims: {e}")))?;
    if claims.jti.is_empty() || claims.jti.len() > MAX_JTI {
        return Err(DpopError::Malformed(format!("jti must be 1 to {MAX_JTI} bytes")));
    }
    if claims.htm != ctx.method {
        return Err(DpopError::Method {
            found: claims.htm,
            expected: ctx.method.into(),
        });
    }
    if normalize_url(&claims.htu) != normalize_url(ctx.url) || normalize_url(ctx.url).is_none() {
        return Err(DpopError::Url {
            found: claims.htu,
            expected: ctx.url.into(),
        });
    }
    let (earliest, latest) = (ctx.now - ctx.max_age, ctx.now + ctx.max_skew);
    if !(earliest..=latest).contains(&claims.iat) {
        return Err(DpopError::Stale {
            iat: claims.iat,
            earliest,
            latest,
        });
    }
    if let Some(token) = ctx.access_token {
        let want = b64::encode(digest::digest(&digest::SHA256, token.as_bytes()));
        if claims.ath.as_deref() != Some(want.as_str()) {
            return Err(DpopError::Ath);
        }
    }
    Ok(Proof {
        jkt,
        jti: claims.jti,
        iat: claims.iat,
    })
}

/// RFC 9449 §4.3 step 9 with RFC 3986 §6.2.2/§6.2.3 normalization: query and fragment
/// dropped, scheme and host lowercased, the scheme's default port dropped, empty path `/`.
/// `None` when `url` is not an absolute http(s) URL.
pub fn normalize_url(url: &str) -> Option<String> {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let mut authority = authority.to_ascii_lowercase();
    if authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    }
    Some(format!("{scheme}://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::{Signature, SigningKey, signature::Signer};

    const URL: &str = "https://kg.example/v1/tokens/redeem";

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn jwk_of(k: &SigningKey) -> serde_json::Value {
        serde_json::to_value(Jwk::from_public_key(&p256::PublicKey::from(k.verifying_key()))).unwrap()
    }

    fn sign(k: &SigningKey, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            b64::encode(header.to_string()),
            b64::encode(claims.to_string())
        );
        let sig: Signature = k.sign(input.as_bytes());
        format!("{input}.{}", b64::encode(sig.to_bytes()))
    }

    fn proof_with(claims: serde_json::Value) -> String {
        let k = key();
        sign(
            &k,
            serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk_of(&k)}),
            claims,
        )
    }

    fn ath(t: &str) -> String {
        b64::encode(digest::digest(&digest::SHA256, t.as_bytes()))
    }

    fn ctx(token: &str) -> ProofContext<'_> {
        ProofContext {
            method: "POST",
            url: URL,
            access_token: Some(token),
            now: 1_000_000,
            max_age: 60,
            max_skew: 5,
        }
    }

    fn good() -> serde_json::Value {
        serde_json::json!({"jti": "p1", "htm": "POST", "htu": URL, "iat": 1_000_000, "ath": ath("tok")})
    }

    #[test]
    fn a_good_proof_passes_and_names_its_key() {
        let p = verify_proof(&proof_with(good()), &ctx("tok")).unwrap();
        assert_eq!(
            p.jkt,
            Jwk::from_public_key(&key().verifying_key().into()).kid.unwrap()
        );
        assert_eq!(p.jti, "p1");
    }

    #[test]
    fn each_check_refuses_with_its_own_error() {
        let mut c = good();
        c["htm"] = "GET".into();
        assert!(matches!(
            verify_proof(&proof_with(c), &ctx("tok")),
            Err(DpopError::Method { .. })
        ));
        let mut c = good();
        c["htu"] = "https://kg.example/v1/tokens".into();
        assert!(matches!(
            verify_proof(&proof_with(c), &ctx("tok")),
            Err(DpopError::Url { .. })
        ));
        let mut c = good();
        c["iat"] = (1_000_000 - 61).into();
        assert!(matches!(
            verify_proof(&proof_with(c), &ctx("tok")),
            Err(DpopError::Stale { .. })
        ));
        let mut c = good();
        c["iat"] = (1_000_000 + 6).into();
        assert!(matches!(
            verify_proof(&proof_with(c), &ctx("tok")),
            Err(DpopError::Stale { .. })
        ));
        assert_eq!(
            verify_proof(&proof_with(good()), &ctx("other")),
            Err(DpopError::Ath)
        );
        let k = key();
        let p = sign(
            &k,
            serde_json::json!({"typ": "JWT", "alg": "ES256", "jwk": jwk_of(&k)}),
            good(),
        );
        assert_eq!(verify_proof(&p, &ctx("tok")), Err(DpopError::Type));
        let p = sign(&k, serde_json::json!({"typ": "dpop+jwt", "alg": "ES256"}), good());
        assert!(matches!(verify_proof(&p, &ctx("tok")), Err(DpopError::Jwk(_))));
        let mut with_d = jwk_of(&k);
        with_d["d"] = "AAAA".into();
        let p = sign(
            &k,
            serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": with_d}),
            good(),
        );
        assert!(matches!(verify_proof(&p, &ctx("tok")), Err(DpopError::Jwk(_))));
        let p = sign(
            &k,
            serde_json::json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk_of(&k)}),
            good(),
        );
        assert!(matches!(
            verify_proof(&p, &ctx("tok")),
            Err(DpopError::Algorithm(_))
        ));
        // Signed by another key than the one in the header.
        let other = SigningKey::from_slice(&[9u8; 32]).unwrap();
        let p = sign(
            &other,
            serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk_of(&k)}),
            good(),
        );
        assert_eq!(verify_proof(&p, &ctx("tok")), Err(DpopError::BadSignature));
        // A changed byte anywhere fails.
        let good_proof = proof_with(good());
        let mut bytes = good_proof.into_bytes();
        let i = bytes.len() - 5;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        assert!(verify_proof(&String::from_utf8(bytes).unwrap(), &ctx("tok")).is_err());
    }

    #[test]
    fn urls_compare_after_normalization() {
        assert_eq!(
            normalize_url("HTTPS://KG.example:443/v1/tokens/redeem?x=1#f").as_deref(),
            Some(URL)
        );
        assert_eq!(normalize_url("http://h:80").as_deref(), Some("http://h/"));
        assert_eq!(
            normalize_url("http://h:8080/a").as_deref(),
            Some("http://h:8080/a")
        );
        assert!(normalize_url("ftp://h/a").is_none());
        assert!(normalize_url("/v1/tokens/redeem").is_none());
        assert_ne!(
            normalize_url("https://kg.example/V1/tokens/redeem").as_deref(),
            Some(URL)
        );
    }
}
