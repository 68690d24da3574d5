//! Key proofs on the wire and in use: a byte changed anywhere between the verifier and the
//! TPM fails the proof; an instance that requires a proof refuses a key without one.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::common::Env;
use crate::common::swtpm::{Swtpm, TestCa};
use crate::keyproof::{impostor_ca, prove};

/// Where the proxy flips a byte: a base64 member of an answer (in `tpm` or at the top) or
/// of a request, at the first, middle or last byte of what it decodes to.
#[derive(Clone, Copy)]
struct Flip {
    member: &'static str,
    request: bool,
    at: usize,
}

fn flip_member(v: &mut Value, f: Flip) -> bool {
    let target = if v.get("tpm").is_some_and(|t| t.get(f.member).is_some()) {
        &mut v["tpm"][f.member]
    } else {
        &mut v[f.member]
    };
    let Some(text) = target.as_str() else { return false };
    let mut bytes = STANDARD.decode(text).unwrap();
    let i = match f.at {
        0 => 0,
        1 => bytes.len() / 2,
        _ => bytes.len() - 1,
    };
    bytes[i] ^= 0x01;
    *target = Value::String(STANDARD.encode(bytes));
    true
}

/// A proxy in front of `upstream` that flips one byte of `flip` on the way.
async fn flipping_proxy(upstream: String, flip: Flip) -> String {
    use axum::body::Bytes;
    use axum::http::{Method, StatusCode, Uri};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let upstream = upstream.clone();
        async move {
            let mut body = body.to_vec();
            if flip.request
                && let Ok(mut v) = serde_json::from_slice::<Value>(&body)
                && flip_member(&mut v, flip)
            {
                body = serde_json::to_vec(&v).unwrap();
            }
            let r = reqwest::Client::new()
                .request(method, format!("{upstream}{uri}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
            let mut out = r.bytes().await.unwrap().to_vec();
            if !flip.request
                && let Ok(mut v) = serde_json::from_slice::<Value>(&out)
                && flip_member(&mut v, flip)
            {
                out = serde_json::to_vec(&v).unwrap();
            }
            (status, [("content-type", "application/json")], out)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_byte_of_the_evidence_changed_on_the_way_fails_the_proof() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::on_tpm_section(&tpm.tcti(), "ek = \"p384\"").await;
    let (base, _svc) = env.serve().await;
    let bundle = ca.bundle.path().to_str().unwrap();
    // Through a proxy that changes nothing, the proof passes.
    let clean = flipping_proxy(
        base.clone(),
        Flip {
            member: "none",
            request: false,
            at: 0,
        },
    )
    .await;
    let (ok, out, err) = prove(&env, &clean, &["--tpm-ca", bundle]);
    assert!(ok, "{out}{err}");
    // Each member, and the steps a change of it may fail at (a change of a public area
    // fails where it is parsed, or where the TPM or the certification sees another name).
    let members: [(&str, bool, &[&str]); 10] = [
        ("ek_certificate", false, &["ek-certificate"]),
        ("ek_public", false, &["ek-certificate"]),
        ("ak_public", false, &["ak", "credential"]),
        ("key_public", false, &["key", "certify"]),
        ("secret", false, &["credential"]),
        ("attest", false, &["certify"]),
        ("signature", false, &["certify"]),
        ("id_object", true, &["credential"]),
        ("encrypted_secret", true, &["credential"]),
        ("nonce", true, &["certify"]),
    ];
    for (member, request, steps) in members {
        for at in 0..3 {
            let proxy = flipping_proxy(base.clone(), Flip { member, request, at }).await;
            let (ok, out, _) = prove(&env, &proxy, &["--tpm-ca", bundle]);
            let failed_at = out
                .split_once(&format!("{}: FAILED at step ", env.kid))
                .and_then(|(_, rest)| rest.split(':').next())
                .unwrap_or("none");
            assert!(
                !ok && steps.contains(&failed_at),
                "{member} byte {at}: expected a failure at {steps:?}: {out}"
            );
        }
    }
}

/// `keygate verify` with this env's JWKS, issuer and audience `fleet`: (exit 0, stderr).
fn verify(env: &Env, base: &str, token: &str, args: &[&str]) -> (bool, String) {
    let out = env
        .keygate()
        .args(["verify", "--jwks", &format!("{base}/.well-known/jwks.json")])
        .args(["--issuer", &env.config.issuer(), "--audience", "fleet"])
        .args(args)
        .arg(token)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_requires_proof_refuses_a_key_without_one() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::on_tpm(&tpm.tcti()).await;
    let (base, _svc) = env.serve().await;
    let bundle = ca.bundle.path().to_str().unwrap();
    let token = crate::common::issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let token = token["token"].as_str().unwrap();
    // A live proof of the token's key, against the manufacturer CA: accepted.
    let live = ["--require-proof", bundle, "--proof-server", &base];
    let (ok, err) = verify(&env, &base, token, &live);
    assert!(ok, "{err}");
    // Against another manufacturer: refused, naming the step.
    let impostor = impostor_ca(env.dir.path());
    let (ok, err) = verify(
        &env,
        &base,
        token,
        &["--require-proof", &impostor, "--proof-server", &base],
    );
    assert!(
        !ok && err.contains("is not proven to live in hardware: step ek-certificate failed"),
        "{err}"
    );

    // A pinned proof file from `keys prove --out`.
    let out = env.dir.path().join("proofs");
    let (ok, o, e) = prove(&env, &base, &["--tpm-ca", bundle, "--out", out.to_str().unwrap()]);
    assert!(ok, "{o}{e}");
    let pinned = out.join("proven.json");
    let file: Value = serde_json::from_slice(&std::fs::read(&pinned).unwrap()).unwrap();
    assert_eq!(file["keys"][0]["kid"], env.kid.as_str(), "{file}");
    let (ok, err) = verify(&env, &base, token, &["--require-proof", pinned.to_str().unwrap()]);
    assert!(ok, "{err}");
    // A key that appears later (an emergency rotation: it signs at once) is in the JWKS but
    // not in the pinned file: its tokens are refused until it is proven and pinned.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/keys/rotate"))
        .bearer_auth(&env.admin)
        .json(&json!({"activate_now": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let fresh = crate::common::issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let fresh = fresh["token"].as_str().unwrap();
    let (ok, err) = verify(&env, &base, fresh, &[]);
    assert!(ok, "{err}");
    let (ok, err) = verify(&env, &base, fresh, &["--require-proof", pinned.to_str().unwrap()]);
    assert!(!ok && err.contains("is not proven to live in hardware"), "{err}");
    let (ok, err) = verify(&env, &base, fresh, &live);
    assert!(ok, "{err}");
}

/// A server that lends its TPM key's proof to a software key: its JWKS names the TPM key's
/// point with the software key's kid (and lists the software key too), and it answers
/// proofs for that kid with the TPM key's evidence.
async fn lending_proxy(upstream: String, tpm_kid: String, soft: keygate::token::Jwk) -> String {
    use axum::body::Bytes;
    use axum::http::{Method, StatusCode, Uri};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let soft_kid = soft.kid.clone().unwrap();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let (upstream, tpm_kid, soft, soft_kid) =
            (upstream.clone(), tpm_kid.clone(), soft.clone(), soft_kid.clone());
        async move {
            let path = uri.to_string().replace(&soft_kid, &tpm_kid);
            let r = reqwest::Client::new()
                .request(method, format!("{upstream}{path}"))
                .header("content-type", "application/json")
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
            let mut v: Value = r.json().await.unwrap();
            if path == "/.well-known/jwks.json" {
                let keys = v["keys"].as_array_mut().unwrap();
                let mut lent = keys[0].clone();
                lent["kid"] = json!(soft_kid);
                keys.insert(0, lent);
                keys.push(serde_json::to_value(&soft).unwrap());
            }
            (
                status,
                [("content-type", "application/json")],
                serde_json::to_vec(&v).unwrap(),
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kid_that_is_not_the_proven_point_s_thumbprint_is_not_proven() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::on_tpm(&tpm.tcti()).await;
    let (base, _svc) = env.serve().await;
    let bundle = ca.bundle.path().to_str().unwrap();
    let soft = p256::SecretKey::from_slice(&[0x42; 32]).unwrap().public_key();
    let soft = keygate::token::Jwk::from_public_key(&soft);
    let soft_kid = soft.kid.clone().unwrap();
    let proxy = lending_proxy(base.clone(), env.kid.clone(), soft).await;
    // Asked for the software key's kid, the prover takes the point a verifier would: the
    // software key's; the TPM's evidence is for another key.
    let (ok, out, _) = prove(&env, &proxy, &["--tpm-ca", bundle, "--kid", &soft_kid]);
    assert!(
        !ok && out.contains(&format!(
            "{soft_kid}: FAILED at step key: the certified key is not the JWKS key"
        )),
        "{out}"
    );
    // Without --kid: the lent entry is ignored (its kid is not its thumbprint), the TPM key
    // is proven, the software key is not.
    let (ok, out, _) = prove(&env, &proxy, &["--tpm-ca", bundle]);
    assert!(!ok, "{out}");
    assert!(out.contains("ignored: not a key any verifier takes"), "{out}");
    assert!(out.contains(&format!("{}: proven", env.kid)), "{out}");
    assert!(out.contains(&format!("{soft_kid}: FAILED at step key")), "{out}");
}
