//! Redemption: exactly once under concurrency, RFC 9449 DPoP refusals, certificates for CSRs
//! (checked with openssl), and refusals that consume nothing.

use std::process::Command;

use keygate::token::{Jwk, b64};
use p256::ecdsa::{Signature, SigningKey, signature::Signer};
use serde_json::{Value, json};

use crate::common::{Env, get_authed, issue, openssl};

pub async fn redeem(base: &str, body: Value, dpop: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens/redeem"))
        .json(&body);
    if let Some(p) = dpop {
        r = r.header("DPoP", p);
    }
    let res = r.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// (redeemed_at, revoked_at) straight from the store.
async fn token_row(env: &Env, jti: &str) -> (Option<i64>, Option<i64>) {
    let db = env.db().await;
    let r = db
        .two_opt_ints(
            "SELECT redeemed_at, revoked_at FROM issued_tokens WHERE jti = $1",
            &[jti],
        )
        .await;
    db.close().await;
    r
}

/// Audit outcomes of `token.redeem` entries for `jti`.
async fn redeem_audit(env: &Env, jti: &str) -> Vec<String> {
    let db = env.db().await;
    let r = db
        .strings(
            "SELECT outcome FROM audit_log WHERE action = 'token.redeem' AND target = $1 ORDER BY seq",
            &[jti],
        )
        .await;
    db.close().await;
    r
}

async fn one_time_token_is_redeemed_exactly_once_by_200_racing_requests(env: Env) {
    let (base, _svc) = env.serve().await;
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "node-7", "audience": "fleet", "one_time": true, "scopes": ["provision"]}),
    )
    .await;
    let (token, jti) = (
        t["token"].as_str().unwrap().to_owned(),
        t["jti"].as_str().unwrap().to_owned(),
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (base, token) = (base.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            redeem(&base, json!({"token": token}), None).await
        }));
    }
    let mut ok = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, body) => ok.push(body),
            (409, body) => {
                assert_eq!(body["status"], 409);
                assert!(body["detail"].as_str().unwrap().contains("redeemed already"));
                conflicts += 1;
            }
            (s, body) => panic!("unexpected {s}: {body}"),
        }
    }
    assert_eq!((ok.len(), conflicts), (1, 199));
    assert_eq!(ok[0]["subject"], "node-7");
    assert_eq!(ok[0]["audience"], json!(["fleet"]));
    assert_eq!(ok[0]["scopes"], json!(["provision"]));
    assert!(ok[0].get("certificate").is_none());
    // The store and the audit log agree: one redemption, 199 refusals.
    assert!(token_row(&env, &jti).await.0.is_some());
    let outcomes = redeem_audit(&env, &jti).await;
    assert_eq!(outcomes.iter().filter(|o| *o == "success").count(), 1);
    assert_eq!(
        outcomes.iter().filter(|o| o.contains("redeemed already")).count(),
        199
    );
    assert_eq!(outcomes.len(), 200);
    // Introspection now says redeemed and inactive; the audit chain is whole.
    let i = crate::common::introspect(&base, &env.admin, &token).await;
    assert_eq!(
        (i["active"].as_bool(), i["redeemed"].as_bool()),
        (Some(false), Some(true))
    );
    let out = env.keygate().args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
on_both_backends!(one_time_token_is_redeemed_exactly_once_by_200_racing_requests);

/// An RFC 9449 client key and its proofs.
pub(crate) struct Client {
    key: SigningKey,
}

impl Client {
    pub(crate) fn new(seed: u8) -> Client {
        Client {
            key: SigningKey::from_slice(&[seed; 32]).unwrap(),
        }
    }

    fn jwk(&self) -> Jwk {
        Jwk::from_public_key(&p256::PublicKey::from(self.key.verifying_key()))
    }

    pub(crate) fn jkt(&self) -> String {
        self.jwk().kid.unwrap()
    }

    /// A proof for `htm`/`htu`, `iat` seconds from now, with `ath` of `token`.
    pub(crate) fn proof(&self, htm: &str, htu: &str, iat_offset: i64, token: &str, jti: &str) -> String {
        let mut jwk = serde_json::to_value(self.jwk()).unwrap();
        jwk.as_object_mut().unwrap().remove("kid");
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
        let ath = b64::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            token.as_bytes(),
        ));
        let claims = json!({
            "jti": jti, "htm": htm, "htu": htu,
            "iat": keygate::authority::now() + iat_offset, "ath": ath,
        });
        let input = format!(
            "{}.{}",
            b64::encode(header.to_string()),
            b64::encode(claims.to_string())
        );
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", b64::encode(sig.to_bytes()))
    }
}

async fn dpop_bound_tokens_need_a_fresh_proof_by_the_bound_key_for_this_url(env: Env) {
    let (base, _svc) = env.serve().await;
    let url = format!("{base}/v1/tokens/redeem");
    let alice = Client::new(3);
    let mallory = Client::new(4);
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "fleet", "one_time": true, "cnf_jkt": alice.jkt()}),
    )
    .await;
    let (token, jti) = (t["token"].as_str().unwrap(), t["jti"].as_str().unwrap());
    let body = json!({ "token": token });
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing proof", None, "DPoP proof missing"),
        (
            "proof by another key",
            Some(mallory.proof("POST", &url, 0, token, "m1")),
            "signed by another key",
        ),
        (
            "proof for another URL",
            Some(alice.proof("POST", &format!("{base}/v1/tokens"), 0, token, "a1")),
            "is for URL",
        ),
        (
            "proof for another method",
            Some(alice.proof("GET", &url, 0, token, "a2")),
            "is for method",
        ),
        (
            "stale iat",
            Some(alice.proof("POST", &url, -600, token, "a3")),
            "stale",
        ),
        (
            "iat in the future",
            Some(alice.proof("POST", &url, 600, token, "a4")),
            "stale",
        ),
        (
            "ath of another token",
            Some(alice.proof("POST", &url, 0, "another-token", "a5")),
            "ath",
        ),
        ("garbage", Some("not.a.proof".into()), "DPoP proof is malformed"),
    ];
    for (what, proof, needle) in &cases {
        let (status, p) = redeem(&base, body.clone(), proof.as_deref()).await;
        assert_eq!(status, 401, "{what}: {p}");
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "{what}: detail {detail:?} lacks {needle:?}"
        );
        assert_eq!(p["type"], "urn:keygate:problem:unauthorized");
    }
    // None of that consumed the one-time token; a good proof redeems it.
    assert_eq!(token_row(&env, jti).await.0, None);
    let good = alice.proof("POST", &url, 0, token, "a6");
    let (status, p) = redeem(&base, body.clone(), Some(&good)).await;
    assert_eq!(status, 200, "{p}");
    // Replaying the accepted proof is refused as a replay, before anything else.
    let (status, p) = redeem(&base, body.clone(), Some(&good)).await;
    assert_eq!(status, 401);
    assert!(p["detail"].as_str().unwrap().contains("replayed"), "{p}");
    // A multi-use bound token: each redemption needs its own proof.
    let m = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "fleet", "cnf_jkt": alice.jkt()}),
    )
    .await;
    let mt = m["token"].as_str().unwrap();
    let p1 = alice.proof("POST", &url, 0, mt, "b1");
    assert_eq!(redeem(&base, json!({"token": mt}), Some(&p1)).await.0, 200);
    let (status, p) = redeem(&base, json!({"token": mt}), Some(&p1)).await;
    assert_eq!(status, 401);
    assert!(p["detail"].as_str().unwrap().contains("replayed"));
    let p2 = alice.proof("POST", &url, 0, mt, "b2");
    assert_eq!(redeem(&base, json!({"token": mt}), Some(&p2)).await.0, 200);
    // Each refusal of the credential is audited, without the token or the proof.
    let outcomes = redeem_audit(&env, jti).await;
    assert_eq!(outcomes.len(), cases.len() + 2, "{outcomes:?}");
    for o in &outcomes {
        assert!(!o.contains(token) && !o.contains(&good));
    }
}
on_both_stores!(dpop_bound_tokens_need_a_fresh_proof_by_the_bound_key_for_this_url);

async fn bad_expired_unknown_and_revoked_tokens_are_refused_with_a_reason(env: Env) {
    let (base, _svc) = env.serve().await;
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "fleet", "ttl_seconds": 1}),
    )
    .await;
    let token = t["token"].as_str().unwrap().to_owned();
    // a changed signature
    let mut bad = token.clone().into_bytes();
    let i = bad.len() - 3;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let (s, p) = redeem(&base, json!({"token": String::from_utf8(bad).unwrap()}), None).await;
    assert_eq!(s, 401);
    assert!(p["detail"].as_str().unwrap().contains("bad signature"), "{p}");
    // an unknown kid
    let parts: Vec<&str> = token.split('.').collect();
    let header = json!({"alg": "ES256", "typ": "provisioning+jwt", "kid": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"});
    let forged = format!("{}.{}.{}", b64::encode(header.to_string()), parts[1], parts[2]);
    let (s, p) = redeem(&base, json!({ "token": forged }), None).await;
    assert_eq!(s, 401);
    assert!(p["detail"].as_str().unwrap().contains("unknown kid"), "{p}");
    // not a token at all, and a body that is not the contract
    assert_eq!(redeem(&base, json!({"token": "x"}), None).await.0, 401);
    assert_eq!(
        redeem(&base, json!({"token": token, "extra": 1}), None).await.0,
        400
    );
    // revoked
    let r = issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let revoked = crate::common::revoke(&base, &env.admin, r["jti"].as_str().unwrap(), None).await;
    assert_eq!(revoked.status(), 200);
    let (s, p) = redeem(&base, json!({"token": r["token"]}), None).await;
    assert_eq!(s, 401);
    assert!(p["detail"].as_str().unwrap().contains("revoked"), "{p}");
    // expired (the issuer allows no leeway)
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (s, p) = redeem(&base, json!({ "token": token }), None).await;
    assert_eq!(s, 401);
    assert!(p["detail"].as_str().unwrap().contains("expired"), "{p}");
}
on_both_stores!(bad_expired_unknown_and_revoked_tokens_are_refused_with_a_reason);

async fn a_csr_gets_a_certificate_that_openssl_verifies_against_the_key_ca(env: Env) {
    let (base, _svc) = env.serve().await;
    let dir = env.dir.path();
    let keys: Vec<Value> = get_authed(&base, "/v1/keys", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    std::fs::write(dir.join("ca.pem"), keys[0]["certificate"].as_str().unwrap()).unwrap();
    for (name, newkey) in [("ec", "ec:ca-params.pem"), ("rsa", "rsa:2048")] {
        if name == "ec" {
            openssl(dir, &["ecparam", "-name", "prime256v1", "-out", "ca-params.pem"]);
        }
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                newkey,
                "-nodes",
                "-subj",
                "/CN=whatever-the-client-says",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        let csr_pem = std::fs::read_to_string(dir.join(&csr)).unwrap();
        // A CSR whose signature does not match its key: 400, and the token is not consumed.
        let t = issue(
            &base,
            &env.admin,
            json!({"subject": "node-42", "audience": "fleet", "one_time": true}),
        )
        .await;
        let tampered = tamper_csr(&csr_pem);
        let (s, p) = redeem(&base, json!({"token": t["token"], "csr": tampered}), None).await;
        assert_eq!(s, 400, "{p}");
        assert!(p["detail"].as_str().unwrap().contains("csr"), "{p}");
        let (s, p) = redeem(&base, json!({"token": t["token"], "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}), None).await;
        assert_eq!(s, 400, "{p}");
        let (s, p) = redeem(&base, json!({"token": t["token"], "csr": csr_pem}), None).await;
        assert_eq!(s, 200, "{p}");
        let chain = p["certificate"].as_str().unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let leaf = &chain[..chain.find("-----END CERTIFICATE-----").unwrap() + 26];
        let leaf_file = format!("{name}-leaf.pem");
        std::fs::write(dir.join(&leaf_file), leaf).unwrap();
        let out = openssl(dir, &["verify", "-CAfile", "ca.pem", &leaf_file]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
        // subject = the token's sub; the key is the CSR's; CA:FALSE; lifetime within the cap
        let text =
            String::from_utf8(openssl(dir, &["x509", "-in", &leaf_file, "-noout", "-text"]).stdout).unwrap();
        assert!(text.contains("Subject: CN = node-42"), "{text}");
        assert!(text.contains("CA:FALSE") && text.contains("TLS Web Client Authentication"));
        let cert_key = openssl(dir, &["x509", "-in", &leaf_file, "-noout", "-pubkey"]).stdout;
        let csr_key = openssl(dir, &["req", "-in", &csr, "-noout", "-pubkey"]).stdout;
        assert_eq!(cert_key, csr_key);
        let dates = String::from_utf8(
            openssl(
                dir,
                &["x509", "-in", &leaf_file, "-noout", "-startdate", "-enddate"],
            )
            .stdout,
        )
        .unwrap();
        let when = |prefix: &str| {
            let line = dates.lines().find(|l| l.starts_with(prefix)).unwrap();
            let v = &line[prefix.len()..];
            let out = Command::new("date")
                .args(["-u", "-d", v, "+%s"])
                .output()
                .unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse::<i64>()
                .unwrap()
        };
        let life = when("notAfter=") - when("notBefore=");
        assert!(
            life <= 3600 + 60,
            "certificate lives {life} s, over the 3600 s cap plus the 60 s backdate"
        );
    }
}
on_both_backends!(
    a_csr_gets_a_certificate_that_openssl_verifies_against_the_key_ca,
    "[ca]\ncertificate_ttl_seconds = 3600\n"
);

/// Flips one bit of the CSR's signature (the last bytes of the DER).
fn tamper_csr(pem: &str) -> String {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64_std_decode(&body);
    let n = der.len();
    der[n - 2] ^= 0x01;
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    let enc = base64_std_encode(&der);
    for chunk in enc.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

fn base64_std_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_std_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
