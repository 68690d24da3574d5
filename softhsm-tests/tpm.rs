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
        tcti: tpm.tcti(),
        handle_base: 0x8101_0100,
        handle_count: 16,
        auth,
        timeout_ms: 2000,
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
