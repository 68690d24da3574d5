//! The TPM 2.0 backend on swtpm, and one backend conformance suite run over both backends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::keys::tpm::{TpmBackend, TpmConfig};
use keygate::keys::{KeyBackend, KeyError, SecretSource};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};

use crate::common::Env;
use crate::common::swtpm::Swtpm;

fn digest(msg: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
        .as_ref()
        .try_into()
        .unwrap()
}

fn verify(pk: &p256::PublicKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    VerifyingKey::from(pk)
        .verify(msg, &Signature::from_slice(sig).unwrap())
        .is_ok()
}

/// What every backend must do: create a key inside the device, find and list it, sign
/// digests that an independent verifier (p256) accepts, refuse a wrong signature, sign
/// correctly under concurrency, and say "not found" for a key that is not there.
fn conformance(backend: Arc<dyn KeyBackend>, absent_uri: &str) -> String {
    let key = backend.create_key("conformance").unwrap();
    assert_eq!(backend.find_key(&key.uri).unwrap().public_key, key.public_key);
    assert!(
        backend
            .list_keys()
            .unwrap()
            .iter()
            .any(|k| k.uri == key.uri && k.public_key == key.public_key)
    );
    for i in 0..5 {
        let msg = format!("message {i}");
        let sig = backend.sign_digest(&key.uri, &digest(msg.as_bytes())).unwrap();
        assert!(
            verify(&key.public_key, msg.as_bytes(), &sig),
            "{} signature {i} does not verify",
            backend.kind()
        );
        assert!(!verify(&key.public_key, b"another message", &sig));
    }
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (b, uri, pk) = (backend.clone(), key.uri.clone(), key.public_key);
            std::thread::spawn(move || {
                for i in 0..10 {
                    let msg = format!("thread {t} message {i}");
                    let sig = b.sign_digest(&uri, &digest(msg.as_bytes())).unwrap();
                    assert!(verify(&pk, msg.as_bytes(), &sig));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(matches!(
        backend.find_key(absent_uri),
        Err(KeyError::KeyNotFound(_))
    ));
    key.uri
}

fn tpm_config(tpm: &Swtpm, auth: Option<SecretSource>) -> TpmConfig {
    TpmConfig {
        handle_base: 0x8101_0100,
        handle_count: 16,
        auth,
        ..TpmConfig::with_tcti(tpm.tcti())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_pkcs11_on_softhsm2() {
    let env = Env::new().await;
    let svc = env.service().await;
    let backend: Arc<dyn KeyBackend> = svc.backend.clone();
    let absent = "pkcs11:token=x;object=gone;id=%ff%ff;type=private";
    tokio::task::spawn_blocking(move || conformance(backend, absent))
        .await
        .unwrap();
}

#[test]
fn conformance_tpm_on_swtpm() {
    let tpm = Swtpm::start();
    let backend = Arc::new(TpmBackend::open(&tpm_config(&tpm, None)).unwrap());
    assert!(backend.is_simulator());
    let uri = conformance(backend.clone(), "tpm:handle=0x8101010f");
    assert_eq!(uri, "tpm:handle=0x81010100");
    // The key cannot leave the TPM: the TPM itself reports how it was made.
    let a = backend.key_attributes(&uri).unwrap();
    assert!(
        a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin(),
        "{a:?}"
    );
    assert!(a.sign_encrypt() && !a.decrypt() && !a.restricted(), "{a:?}");
    // a second key takes the next handle; destroying it frees it
    let second = backend.create_key("second").unwrap();
    assert_eq!(second.uri, "tpm:handle=0x81010101");
    backend.destroy(&second.uri).unwrap();
    assert!(matches!(
        backend.find_key(&second.uri),
        Err(KeyError::KeyNotFound(_))
    ));
}

#[test]
fn tpm_key_persists_across_a_tpm_restart_and_the_backend_reconnects() {
    let mut tpm = Swtpm::start();
    let backend = TpmBackend::open(&tpm_config(&tpm, None)).unwrap();
    let key = backend.create_key("persist").unwrap();

    // The TPM goes away: calls fail fast with a TPM error, they do not hang.
    tpm.stop();
    let started = Instant::now();
    let err = backend.sign_digest(&key.uri, &digest(b"while down")).unwrap_err();
    assert!(matches!(err, KeyError::Tpm { .. }), "{err}");
    assert!(err.is_unavailable());
    assert!(started.elapsed() < Duration::from_secs(5));

    // It comes back on the same state: the same backend signs again by itself.
    tpm.restart();
    let sig = backend.sign_digest(&key.uri, &digest(b"after restart")).unwrap();
    assert!(verify(&key.public_key, b"after restart", &sig));

    // A new process (a new backend) finds the same key.
    let again = TpmBackend::open(&tpm_config(&tpm, None)).unwrap();
    assert_eq!(again.find_key(&key.uri).unwrap().public_key, key.public_key);
}

#[test]
fn tpm_key_auth_is_required_and_missing_tpm_is_one_line() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("auth");
    std::fs::write(&good, "key-auth-4f1c").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "not-the-auth").unwrap();
    let owner = TpmBackend::open(&tpm_config(&tpm, Some(SecretSource::File(good)))).unwrap();
    let key = owner.create_key("authed").unwrap();
    let sig = owner.sign_digest(&key.uri, &digest(b"m")).unwrap();
    assert!(verify(&key.public_key, b"m", &sig));
    for auth in [Some(SecretSource::File(bad)), None] {
        let other = TpmBackend::open(&tpm_config(&tpm, auth)).unwrap();
        let err = other
            .sign_digest(&key.uri, &digest(b"m"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Sign(0x81010100)") && !err.contains("key-auth-4f1c"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    // nothing listens there: one line that names the connection
    let nowhere = TpmConfig {
        tcti: "swtpm:host=127.0.0.1,port=1".into(),
        ..tpm_config(&tpm, None)
    };
    let err = TpmBackend::open(&nowhere).unwrap_err().to_string();
    assert!(
        err.contains("connect to swtpm:host=127.0.0.1,port=1") && err.lines().count() == 1,
        "{err}"
    );
}

/// A TPM that stalls in the middle of a signature: the request is answered 503 at the
/// device wait (`[tpm] timeout_ms`), and the signature the TPM makes once it goes on is
/// thrown away: no token is recorded or audited for a request answered 503. (The signing
/// thread hands tokens to the store's writer itself: it drops a token whose caller gave up,
/// and the writer drops a write whose caller stopped waiting; the test fails only when both
/// checks are gone.)
#[tokio::test(flavor = "multi_thread")]
async fn a_signature_made_after_its_wait_is_thrown_away() {
    use serde_json::json;

    let tpm = Swtpm::start();
    let env = Env::on_tpm(&tpm.tcti()).await; // timeout_ms = 2000
    let (base, _svc) = env.serve().await;
    let request = json!({"subject": "n", "audience": "fleet"});
    crate::common::issue(&base, &env.admin, request.clone()).await;
    let count = |sql: &'static str| {
        let env = &env;
        async move {
            let db = env.db().await;
            let n = db.int(sql, &[]).await;
            db.close().await;
            n
        }
    };
    let recorded = "SELECT COUNT(*) FROM issued_tokens";
    let audited = "SELECT COUNT(*) FROM audit_log WHERE action = 'token.issue'";
    let before = (count(recorded).await, count(audited).await);

    tpm.pause();
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&env.admin)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the request outwaited the device wait"
    );
    tpm.resume();
    // the TPM finishes the stalled signature now; the next request queues behind it
    let out = crate::common::issue(&base, &env.admin, request).await;
    assert!(out["token"].is_string());
    assert_eq!(
        (count(recorded).await, count(audited).await),
        (before.0 + 1, before.1 + 1),
        "only the token answered 201 after the stall is recorded and audited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_api_on_the_tpm_backend_and_a_tpm_outage() {
    use crate::common::{get_authed, issue, jwks};
    use keygate::token::{Verifier, VerifierConfig};
    use serde_json::json;

    let mut tpm = Swtpm::start();
    let env = Env::on_tpm(&tpm.tcti()).await;
    let (base, _svc) = env.serve().await;

    // /v1/keys shows the TPM key; its CA certificate was signed inside the TPM
    let keys: Vec<serde_json::Value> = get_authed(&base, "/v1/keys", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (keys[0]["backend"].as_str(), keys[0]["uri"].as_str()),
        (Some("tpm"), Some("tpm:handle=0x81010100"))
    );
    let ca = env.dir.path().join("ca.pem");
    std::fs::write(&ca, keys[0]["certificate"].as_str().unwrap()).unwrap();
    let ok = std::process::Command::new("openssl")
        .args(["verify", "-check_ss_sig", "-CAfile"])
        .arg(&ca)
        .arg(&ca)
        .status()
        .unwrap();
    assert!(ok.success());

    // a token issued on the TPM verifies with the JWKS, and with jsonwebtoken
    let out = issue(
        &base,
        &env.admin,
        json!({"subject": "tpm-node", "audience": "fleet"}),
    )
    .await;
    let token = out["token"].as_str().unwrap();
    assert_eq!(out["kid"], env.kid.as_str());
    let set = jwks(&base).await;
    Verifier::new(&set, VerifierConfig::new(env.config.issuer(), "fleet"))
        .unwrap()
        .verify(token)
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(serde_json::to_value(&set.keys[0]).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["fleet"]);
    v.set_issuer(&[env.config.issuer()]);
    jsonwebtoken::decode::<serde_json::Value>(token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v)
        .unwrap();

    // The TPM goes away: every request answers 503 quickly (none 500, none a token),
    // /readyz is 503; when it is back, issuance resumes with the same key by itself.
    tpm.stop();
    let c = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    for _ in 0..5 {
        let started = Instant::now();
        let r = c
            .post(format!("{base}/v1/tokens"))
            .bearer_auth(&env.admin)
            .json(&json!({"subject": "during-outage", "audience": "fleet"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a request hung while the TPM was down"
        );
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the readiness probe's reuse
    assert_eq!(
        reqwest::get(format!("{base}/readyz")).await.unwrap().status(),
        503
    );
    tpm.restart();
    let out = issue(
        &base,
        &env.admin,
        json!({"subject": "after-outage", "audience": "fleet"}),
    )
    .await;
    assert_eq!(out["kid"], env.kid.as_str());
    assert_eq!(
        reqwest::get(format!("{base}/readyz")).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_init_and_serve_on_the_tpm_from_environment_variables() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let kg = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
        c.env_remove("KEYGATE_CONFIG")
            .env("KEYGATE_DATA_DIR", dir.path())
            .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEYGATE_BACKEND", "tpm")
            .env("KEYGATE_TPM_TCTI", tpm.tcti());
        c
    };
    let out = kg().arg("init").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let admin = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("KEYGATE_ADMIN_TOKEN=")
        .to_owned();
    assert!(admin.starts_with("kg_"));
    assert!(
        !dir.path().join("softhsm2.conf").exists(),
        "no SoftHSM2 token on the TPM backend"
    );
    let log = dir.path().join("serve.log");
    let mut child = kg()
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut keys = serde_json::Value::Null;
    for _ in 0..200 {
        if let Ok(r) = reqwest::Client::new()
            .get(format!("{base}/v1/keys"))
            .bearer_auth(&admin)
            .send()
            .await
            && r.status() == 200
        {
            keys = r.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        keys[0]["backend"],
        "tpm",
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(keys[0]["uri"], "tpm:handle=0x81010100");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("swtpm, a software simulator")
    );
    // an unknown backend name is one line
    let out = kg().env("KEYGATE_BACKEND", "hsm").arg("serve").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.trim().lines().count() == 1 && err.contains("KEYGATE_BACKEND"),
        "{err}"
    );
}

/// swtpm is killed while clients keep issuing, then started again on the same state: every
/// answer is 201 or 503 (never 500, never a hang), no 503 carries a token, /readyz follows,
/// and issuance resumes by itself with the same key.
#[tokio::test(flavor = "multi_thread")]
async fn issue_requests_during_a_tpm_outage() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut tpm = Swtpm::start();
    let env = Env::on_tpm(&tpm.tcti()).await;
    let (base, _svc) = env.serve().await;
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (base, admin, running) = (base.clone(), env.admin.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut seen = Vec::new();
            let mut i = 0;
            while running.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = http
                    .post(format!("{base}/v1/tokens"))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({"subject": format!("c{c}-{i}"), "audience": "fleet"}))
                    .send()
                    .await
                    .expect("a request hung or the connection broke");
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                seen.push((Instant::now(), status, started.elapsed(), body));
                i += 1;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tpm.stop();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let readyz_down = reqwest::get(format!("{base}/readyz")).await.unwrap().status();
    tpm.restart();
    let up_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.store(false, Ordering::SeqCst);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    assert_eq!(readyz_down, 503);
    assert_eq!(
        reqwest::get(format!("{base}/readyz")).await.unwrap().status(),
        200
    );
    let mut unavailable = 0;
    for (_, status, took, body) in &all {
        assert!(*status == 201 || *status == 503, "status {status}: {body}");
        assert!(*took < Duration::from_secs(3), "a request took {took:?}");
        if *status == 503 {
            unavailable += 1;
            assert!(
                body.get("token").is_none() && body["type"] == "urn:keygate:problem:unavailable",
                "{body}"
            );
        } else {
            assert_eq!(body["kid"], env.kid.as_str());
        }
    }
    assert!(unavailable > 0, "no request met the outage");
    let before = all
        .iter()
        .filter(|(at, s, _, _)| *at < down_at && *s == 201)
        .count();
    let after = all
        .iter()
        .filter(|(at, s, _, _)| *at > up_at && *s == 201)
        .count();
    assert!(
        before > 0 && after > 0,
        "issued before the outage: {before}, after: {after}"
    );
}
