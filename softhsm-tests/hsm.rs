//! The signing key lives in the token and cannot leave it; sessions recover.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use keygate::keys::KeyBackend;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};

use crate::common::{Env, get_authed, softhsm_conf};

fn bool_attr(attrs: &[Attribute], t: AttributeType) -> Option<bool> {
    attrs.iter().find_map(|a| match (a, t) {
        (Attribute::Sensitive(b), AttributeType::Sensitive)
        | (Attribute::Extractable(b), AttributeType::Extractable)
        | (Attribute::NeverExtractable(b), AttributeType::NeverExtractable)
        | (Attribute::AlwaysSensitive(b), AttributeType::AlwaysSensitive)
        | (Attribute::Token(b), AttributeType::Token)
        | (Attribute::Private(b), AttributeType::Private)
        | (Attribute::Sign(b), AttributeType::Sign)
        | (Attribute::Decrypt(b), AttributeType::Decrypt)
        | (Attribute::Derive(b), AttributeType::Derive)
        | (Attribute::Unwrap(b), AttributeType::Unwrap) => Some(*b),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_key_is_sensitive_unextractable_and_sign_only() {
    let env = Env::new().await;
    let svc = env.service().await;
    let uri = svc.authority.key_ring().active.uri.clone();
    let backend = svc.pkcs11.clone().unwrap();
    let key = backend.private_handle(&uri).unwrap();
    let types = [
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::NeverExtractable,
        AttributeType::AlwaysSensitive,
        AttributeType::Sign,
        AttributeType::Decrypt,
        AttributeType::Derive,
        AttributeType::Unwrap,
    ];
    let attrs = backend.with_session(|s| s.get_attributes(key, &types)).unwrap();
    let expect = [
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::AlwaysSensitive, true),
        (AttributeType::Sign, true),
        (AttributeType::Decrypt, false),
        (AttributeType::Derive, false),
        (AttributeType::Unwrap, false),
    ];
    for (t, want) in expect {
        assert_eq!(bool_attr(&attrs, t), Some(want), "{t:?}");
    }

    // CKA_VALUE is refused as sensitive (get_attributes would silently drop it).
    let info = backend
        .with_session(|s| s.get_attribute_info_map(key, &[AttributeType::Value]))
        .unwrap();
    assert!(
        matches!(info[&AttributeType::Value], AttributeInfo::Sensitive),
        "{info:?}"
    );

    // C_WrapKey with a fresh AES wrapping key answers CKR_KEY_UNEXTRACTABLE.
    let wrapped = backend.with_session(|s| {
        let wrapping = s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Encrypt(true),
            ],
        )?;
        Ok(s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key))
    });
    match wrapped.unwrap() {
        Err(CkError::Pkcs11(RvError::KeyUnextractable, _)) => {}
        other => panic!("C_WrapKey should fail with CKR_KEY_UNEXTRACTABLE, got {other:?}"),
    }

    // The flags cannot be turned back.
    for attr in [Attribute::Extractable(true), Attribute::Sensitive(false)] {
        let r = backend
            .with_session(|s| Ok(s.update_attributes(key, std::slice::from_ref(&attr))))
            .unwrap();
        assert!(
            matches!(r, Err(CkError::Pkcs11(RvError::AttributeReadOnly, _))),
            "setting {attr:?} should be read-only, got {r:?}"
        );
    }

    // The key is a P-256 EC key whose public half matches the published JWK.
    let pubs = backend
        .with_session(|s| s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)]))
        .unwrap();
    assert_eq!(pubs.len(), 1);
    let info = backend.find_key(&uri).unwrap();
    let jwk = keygate::token::Jwk::from_public_key(&info.public_key);
    assert_eq!(jwk.kid.as_deref(), Some(env.kid.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_is_rfc7512_without_pin() {
    let env = Env::new().await;
    let svc = env.service().await;
    let uri = svc.authority.key_ring().active.uri.clone();
    let parsed: keygate::keys::pkcs11::Pkcs11Uri = uri.parse().unwrap();
    assert_eq!(
        parsed.token.as_deref(),
        env.config.pkcs11.as_ref().unwrap().token_label.as_deref()
    );
    assert_eq!(parsed.kind.as_deref(), Some("private"));
    assert_eq!(parsed.id.as_ref().map(Vec::len), Some(16));
    assert!(!uri.contains(&env.user_pin) && !uri.contains("pin"), "{uri}");
}

fn digest(msg: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
    d.as_ref().try_into().unwrap()
}

fn check_sig(backend: &keygate::keys::pkcs11::Pkcs11Backend, uri: &str, msg: &[u8]) {
    let pk = backend.find_key(uri).unwrap().public_key;
    let sig = backend.sign_digest(uri, &digest(msg)).unwrap();
    VerifyingKey::from(&pk)
        .verify(msg, &Signature::from_slice(&sig).unwrap())
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_recover_when_the_hsm_closes_them_or_logs_out() {
    let env = Env::new().await;
    let svc = env.service().await;
    let uri = svc.authority.key_ring().active.uri.clone();
    let backend = svc.pkcs11.clone().unwrap();
    check_sig(&backend, &uri, b"before");

    // The HSM drops every session of the application (as after a restart or failover).
    softhsm_conf();
    let lib = unsafe { cryptoki_sys::Pkcs11::new(keygate::config::SOFTHSM2_MODULE) }.unwrap();
    let rv = unsafe { lib.C_CloseAllSessions(backend.slot_id() as cryptoki_sys::CK_SLOT_ID) };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
    check_sig(&backend, &uri, b"after close-all");

    // The application is logged out behind the pool's back.
    backend.with_session(|s| s.logout()).unwrap();
    check_sig(&backend, &uri, b"after logout");

    // Cached handles that went stale are looked up again.
    backend.forget_handles();
    check_sig(&backend, &uri, b"after forgetting handles");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_signatures_are_all_correct() {
    let env = Env::new().await;
    let svc = env.service().await;
    let uri = svc.authority.key_ring().active.uri.clone();
    let backend = svc.pkcs11.clone().unwrap();
    let vk = VerifyingKey::from(&backend.find_key(&uri).unwrap().public_key);
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let (b, u) = (backend.clone(), uri.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            let msg = format!("message {i}");
            (msg.clone(), b.sign_digest(&u, &digest(msg.as_bytes())).unwrap())
        }));
    }
    for t in tasks {
        let (msg, sig) = t.await.unwrap();
        vk.verify(msg.as_bytes(), &Signature::from_slice(&sig).unwrap())
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_certificate_is_signed_in_the_hsm_and_openssl_accepts_it() {
    use p256::pkcs8::EncodePublicKey;
    let env = Env::new().await;
    let (base, svc) = env.serve().await;
    let keys: Vec<serde_json::Value> = get_authed(&base, "/v1/keys", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(
        (k["kid"].as_str(), k["state"].as_str(), k["backend"].as_str()),
        (Some(env.kid.as_str()), Some("active"), Some("pkcs11"))
    );
    let pem = k["certificate"].as_str().unwrap();
    let path = env.dir.path().join("ca.pem");
    std::fs::write(&path, pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-check_ss_sig", "-CAfile"])
        .arg(&path)
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // a CA, and its public key is the HSM key's (so the HSM made the self-signature)
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CA:TRUE") && text.contains("Certificate Sign"),
        "{text}"
    );
    let spki = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    let uri = svc.authority.key_ring().active.uri.clone();
    let hsm_pub = svc
        .pkcs11
        .as_ref()
        .unwrap()
        .find_key(&uri)
        .unwrap()
        .public_key
        .to_public_key_pem(Default::default())
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&spki.stdout).trim(), hsm_pub.trim());
    // a certificate with one changed signature byte is refused
    let der_path = env.dir.path().join("ca.der");
    let conv = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&path)
        .arg("-out")
        .arg(&der_path)
        .status()
        .unwrap();
    assert!(conv.success());
    let mut der = std::fs::read(&der_path).unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let bad = env.dir.path().join("bad.der");
    std::fs::write(&bad, der).unwrap();
    let bad_pem = env.dir.path().join("bad.pem");
    assert!(
        std::process::Command::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(&bad)
            .arg("-out")
            .arg(&bad_pem)
            .status()
            .unwrap()
            .success()
    );
    let out = std::process::Command::new("openssl")
        .args(["verify", "-check_ss_sig", "-CAfile"])
        .arg(&bad_pem)
        .arg(&bad_pem)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "openssl accepted a certificate with a changed signature"
    );
}
