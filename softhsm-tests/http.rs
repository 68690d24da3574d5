//! Tokens issued over HTTP verify offline from the published JWKS, with keygate's verifier
//! and with independent implementations (jsonwebtoken, openssl); tampering fails.

use std::collections::HashSet;
use std::process::Command;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keygate::token::{Claims, JwkSet, Verifier, VerifierConfig, VerifyError, b64};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::common::{Env, introspect, issue, jwks};

fn jsonwebtoken_verify(
    token: &str,
    set: &JwkSet,
    iss: &str,
    aud: &str,
) -> jsonwebtoken::errors::Result<Value> {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(serde_json::to_value(set).unwrap()).unwrap();
    let header = jsonwebtoken::decode_header(token)?;
    let jwk = set
        .find(header.kid.as_deref().unwrap_or(""))
        .expect("kid in JWKS");
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&[iss]);
    v.set_audience(&[aud]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    v.leeway = 5;
    Ok(jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk)?, &v)?.claims)
}

/// openssl checks the ES256 signature: JWK → PEM public key, r||s → DER, `openssl dgst`.
fn openssl_verify(token: &str, set: &JwkSet, dir: &std::path::Path) -> bool {
    use p256::pkcs8::EncodePublicKey;
    let parts = keygate::token::jws::parse(token).unwrap();
    let kid = parts.header.kid.clone().unwrap();
    let jwk = set.keys.iter().find(|k| k.kid.as_deref() == Some(&kid)).unwrap();
    let (point, _) = jwk.es256_point().unwrap();
    let pem = p256::PublicKey::from_sec1_bytes(&point)
        .unwrap()
        .to_public_key_pem(Default::default())
        .unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&parts.signature)
        .unwrap()
        .to_der();
    std::fs::write(dir.join("pub.pem"), pem).unwrap();
    std::fs::write(dir.join("sig.der"), sig.as_bytes()).unwrap();
    std::fs::write(dir.join("input"), parts.signing_input).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("pub.pem"))
        .arg("-signature")
        .arg(dir.join("sig.der"))
        .arg(dir.join("input"))
        .output()
        .expect("openssl is installed");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

async fn token_from_http_verifies_with_jwks_only_and_independent_implementations(env: Env) {
    let (base, _svc) = env.serve().await;
    let body = json!({"subject": "node-7", "audience": "fleet", "ttl_seconds": 600, "scopes": ["provision", "read:cfg"], "one_time": true});
    let out = issue(&base, &env.admin, body).await;
    let token = out["token"].as_str().unwrap();
    let set = jwks(&base).await;
    let iss = env.config.issuer();

    // header exactly as the HTTP contract says
    let parts = keygate::token::jws::parse(token).unwrap();
    assert_eq!(
        serde_json::to_value(&parts.header).unwrap(),
        json!({"alg": "ES256", "typ": "provisioning+jwt", "kid": env.kid})
    );
    assert_eq!(parts.signature.len(), 64);
    assert_eq!(out["kid"], env.kid);

    // keygate's verifier, given only the JWKS fetched over HTTP
    let v = Verifier::new(&set, VerifierConfig::new(&iss, "fleet")).unwrap();
    let c: Claims = v.verify(token).unwrap();
    assert_eq!(
        (c.sub.as_str(), c.scope.as_deref(), c.one_time),
        ("node-7", Some("provision read:cfg"), Some(true))
    );
    assert_eq!(c.exp - c.iat, 600);
    // The jti: a millisecond timestamp (6 bytes, at iat) and 128 random bits.
    let raw = b64::decode(&c.jti).unwrap();
    assert_eq!(
        raw.len(),
        22,
        "jti carries a 48-bit timestamp and 128 random bits"
    );
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&raw[..6]);
    // (read just after iat: the same second, or the next)
    let late = u64::from_be_bytes(ms) as i64 / 1000 - c.iat;
    assert!((0..=1).contains(&late), "jti time {late} s after iat");
    assert_eq!(out["jti"], c.jti.as_str());

    // an independent JOSE library
    let claims = jsonwebtoken_verify(token, &set, &iss, "fleet").unwrap();
    assert_eq!(claims["sub"], "node-7");
    // and openssl on the raw signature
    assert!(openssl_verify(token, &set, env.dir.path()));

    // one changed byte in header, payload or signature fails everywhere
    let segs: Vec<&str> = token.split('.').collect();
    for (part, seg) in segs.iter().enumerate() {
        for pos in [0, seg.len() / 2, seg.len() - 2] {
            let mut s: Vec<u8> = seg.as_bytes().to_vec();
            s[pos] = if s[pos] == b'Q' { b'R' } else { b'Q' };
            let mut all: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
            all[part] = String::from_utf8(s).unwrap();
            let bad = all.join(".");
            assert!(
                v.verify(&bad).is_err(),
                "part {part} byte {pos}: keygate verifier accepted"
            );
            assert!(
                jsonwebtoken_verify(&bad, &set, &iss, "fleet").is_err(),
                "part {part} byte {pos}: jsonwebtoken accepted"
            );
        }
    }
    let mut sig = parts.signature.clone();
    sig[63] ^= 1;
    let bad = format!("{}.{}", parts.signing_input, b64::encode(&sig));
    assert!(
        !openssl_verify(&bad, &set, env.dir.path()),
        "openssl accepted a changed signature"
    );

    // wrong audience / issuer, expired, not yet valid
    assert_eq!(
        Verifier::new(&set, VerifierConfig::new(&iss, "other"))
            .unwrap()
            .verify(token),
        Err(VerifyError::Audience("other".into()))
    );
    assert!(jsonwebtoken_verify(token, &set, &iss, "other").is_err());
    assert!(matches!(
        Verifier::new(&set, VerifierConfig::new("https://elsewhere", "fleet"))
            .unwrap()
            .verify(token),
        Err(VerifyError::Issuer { .. })
    ));
    assert!(jsonwebtoken_verify(token, &set, "https://elsewhere", "fleet").is_err());
    assert!(matches!(
        v.verify_at(token, c.exp + 5),
        Err(VerifyError::Expired(_))
    ));
    assert!(v.verify_at(token, c.exp + 4).is_ok(), "5 s leeway");
    assert!(matches!(
        v.verify_at(token, c.nbf - 6),
        Err(VerifyError::NotYetValid(_))
    ));

    // alg none and HS256 keyed with the public key
    let none = format!(
        "{}.{}.",
        b64::encode(br#"{"alg":"none","typ":"provisioning+jwt"}"#),
        segs[1]
    );
    assert!(matches!(v.verify(&none), Err(VerifyError::Algorithm(_))));
    assert!(jsonwebtoken_verify(&none, &set, &iss, "fleet").is_err());
    let hs_header = b64::encode(format!(
        r#"{{"alg":"HS256","typ":"provisioning+jwt","kid":"{}"}}"#,
        env.kid
    ));
    let input = format!("{hs_header}.{}", segs[1]);
    let jwk = &set.keys[0];
    let (point, _) = jwk.es256_point().unwrap();
    for secret in [point.clone(), serde_json::to_vec(jwk).unwrap()] {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let forged = format!(
            "{input}.{}",
            b64::encode(aws_lc_rs::hmac::sign(&key, input.as_bytes()))
        );
        assert!(matches!(v.verify(&forged), Err(VerifyError::Algorithm(_))));
        assert!(jsonwebtoken_verify(&forged, &set, &iss, "fleet").is_err());
    }
}

on_both_backends!(token_from_http_verifies_with_jwks_only_and_independent_implementations);

async fn kid_is_the_rfc7638_thumbprint_and_jwks_is_cacheable(env: Env) {
    let svc = env.service().await;
    let res = svc
        .router
        .clone()
        .oneshot(
            Request::get("/.well-known/jwks.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cc = res.headers()[header::CACHE_CONTROL].to_str().unwrap().to_owned();
    let max_age: u64 = cc.split("max-age=").nth(1).unwrap().parse().unwrap();
    assert!(max_age > 0 && max_age <= 300, "{cc}");
    let set: Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let key = &set["keys"][0];
    for (k, v) in [("kty", "EC"), ("crv", "P-256"), ("use", "sig"), ("alg", "ES256")] {
        assert_eq!(key[k], v);
    }
    // independent thumbprint: jsonwebtoken's RFC 7638 implementation
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
    assert_eq!(
        key["kid"].as_str().unwrap(),
        jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).unwrap()
    );
    assert_eq!(key["kid"].as_str().unwrap(), env.kid);
}

on_both_backends!(kid_is_the_rfc7638_thumbprint_and_jwks_is_cacheable);

async fn call(router: &axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let res = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn public_endpoints_and_conventions(env: Env) {
    let svc = env.service().await;
    let r = &svc.router;
    let (s, _, conf) = call(
        r,
        Request::get("/.well-known/keygate-configuration")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let base = env.base_url();
    assert_eq!(conf["issuer"], env.config.issuer());
    assert_eq!(conf["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    for k in [
        "revocations_uri",
        "revocations_stream_uri",
        "token_endpoint",
        "redeem_endpoint",
        "enroll_endpoint",
    ] {
        assert!(conf[k].as_str().unwrap().starts_with(&base), "{k}");
    }
    assert_eq!(
        call(r, Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .0,
        200
    );
    assert_eq!(
        call(r, Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .0,
        200
    );
    let (s, _, doc) = call(r, Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // unknown route and wrong method are problem documents too; every answer has a request id
    let (s, h, p) = call(r, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (s, h[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::NOT_FOUND, "application/problem+json")
    );
    assert_eq!(p["status"], 404);
    assert!(h.contains_key("x-request-id"));
    let (s, h, _) = call(r, Request::put("/v1/tokens").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (s, h[header::CONTENT_TYPE].to_str().unwrap()),
        (StatusCode::METHOD_NOT_ALLOWED, "application/problem+json")
    );

    // metrics after one issuance
    let req = Request::post("/v1/tokens")
        .header(header::AUTHORIZATION, format!("Bearer {}", env.admin))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"subject":"s","audience":"a"}"#))
        .unwrap();
    assert_eq!(call(r, req).await.0, 201);
    let res = r
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for name in [
        "keygate_tokens_issued_total",
        "keygate_tokens_redeemed_total",
        "keygate_tokens_revoked_total",
        "keygate_issue_duration_seconds_bucket",
        "keygate_backend_sign_duration_seconds_bucket",
        "keygate_enrollments_total{outcome=",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
}

on_both_backends!(public_endpoints_and_conventions);

async fn introspection_follows_rfc7662(env: Env) {
    let (base, _svc) = env.serve().await;
    let out = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "a", "scopes": ["x"]}),
    )
    .await;
    let token = out["token"].as_str().unwrap();
    // form, as RFC 7662 §2.1 says
    let r = introspect(&base, &env.admin, token).await;
    assert_eq!(r["active"], true);
    assert_eq!(
        (r["sub"].as_str(), r["scope"].as_str(), r["kid"].as_str()),
        (Some("n"), Some("x"), Some(env.kid.as_str()))
    );
    assert_eq!(
        (r["revoked"].as_bool(), r["redeemed"].as_bool()),
        (Some(false), Some(false))
    );
    // JSON also accepted
    let r: Value = reqwest::Client::new()
        .post(format!("{base}/v1/tokens/introspect"))
        .bearer_auth(&env.admin)
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["active"], true);
    // garbage and tampered tokens: only {"active": false}
    let mut bad = token.to_owned();
    bad.pop();
    bad.push(if token.ends_with('A') { 'B' } else { 'A' });
    for t in ["not-a-token", bad.as_str()] {
        assert_eq!(introspect(&base, &env.admin, t).await, json!({"active": false}));
    }
}

on_both_backends!(introspection_follows_rfc7662);

async fn concurrent_issuance_gives_unique_verifiable_recorded_tokens(env: Env) {
    let (base, _svc) = env.serve().await;
    let before = env.counts().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (b, a) = (base.clone(), env.admin.clone());
        tasks.push(tokio::spawn(async move {
            issue(&b, &a, json!({"subject": format!("n{i}"), "audience": "fleet"})).await
        }));
    }
    let set = jwks(&base).await;
    let v = Verifier::new(&set, VerifierConfig::new(env.config.issuer(), "fleet")).unwrap();
    let mut jtis = HashSet::new();
    for t in tasks {
        let out = t.await.unwrap();
        let c = v.verify(out["token"].as_str().unwrap()).unwrap();
        assert!(jtis.insert(c.jti));
    }
    let after = env.counts().await;
    assert_eq!(after.0 - before.0, 200, "every token recorded");
    assert_eq!(after.2 - before.2, 200, "every issuance audited");
    // the entries written by concurrent group commits form one unbroken hash chain
    let entries = _svc.authority.store().audit_entries(0, 10_000).await.unwrap();
    assert_eq!(entries.len() as i64, after.2);
    assert_eq!(keygate::audit::first_broken(&entries, None), None);
    assert!(
        entries
            .iter()
            .filter(|e| e.record.action == "token.issue")
            .all(|e| jtis.contains(&e.record.target))
    );
}

on_both_backends!(concurrent_issuance_gives_unique_verifiable_recorded_tokens);
