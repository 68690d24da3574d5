//! Key proofs (`/v1/keys/{kid}/proof`, `keygate keys prove`): a verifier that trusts only a
//! TPM manufacturer's CA checks that keygate's signing keys were made in the TPM and cannot
//! leave it. Every step refuses on its own; a SoftHSM2 key is never reported as proven.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keygate::attest::EkCaBundle;
use keygate::attest::keyproof::{self, Checked, Evidence};
use serde_json::{Value, json};

use crate::common::swtpm::{Swtpm, TestCa};
use crate::common::{Env, jwks};

/// keygate on `tpm` with `lines` in its `[tpm]` section.
async fn proof_env(tpm: &Swtpm, lines: &str) -> Env {
    Env::on_tpm_section(&tpm.tcti(), lines).await
}

/// `keygate keys prove --server server args…`: (exit 0, stdout, stderr).
pub(crate) fn prove(env: &Env, server: &str, args: &[&str]) -> (bool, String, String) {
    let out = env
        .keygate()
        .args(["keys", "prove", "--server", server])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

pub(crate) fn b64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap()).unwrap()
}

/// The JWKS point (x, y) of `kid`.
pub(crate) async fn point(base: &str, kid: &str) -> (Vec<u8>, Vec<u8>) {
    let set = jwks(base).await;
    let k = set.keys.iter().find(|k| k.kid.as_deref() == Some(kid)).unwrap();
    let d = |c: &Option<String>| URL_SAFE_NO_PAD.decode(c.as_deref().unwrap()).unwrap();
    (d(&k.x), d(&k.y))
}

/// A verifier's first half in this process: the challenge, and the evidence checked.
async fn checked_challenge(base: &str, kid: &str, bundle: &EkCaBundle) -> (Value, Checked) {
    let (s, c) = post(&format!("{base}/v1/keys/{kid}/proof/challenge"), json!({})).await;
    assert_eq!(s, 200, "{c}");
    let t = &c["tpm"];
    let (cert, ek, ak, key) = (
        b64(&t["ek_certificate"]),
        b64(&t["ek_public"]),
        b64(&t["ak_public"]),
        b64(&t["key_public"]),
    );
    let (x, y) = point(base, kid).await;
    let e = Evidence {
        ek_certificate: Some(&cert),
        ek_public: &ek,
        ak_public: &ak,
        key_public: &key,
    };
    let checked = keyproof::check_evidence(&e, bundle, (&x, &y), keygate::token::verify::now()).unwrap();
    (c, checked)
}

/// Answers the challenge `challenge` of `url` with `cred` and `nonce`.
async fn answer(
    url: &str,
    cred: &keygate::attest::Credential,
    challenge: &Value,
    nonce: &[u8],
) -> (u16, Value) {
    let body = json!({
        "challenge": challenge,
        "id_object": STANDARD.encode(&cred.id_object),
        "encrypted_secret": STANDARD.encode(&cred.encrypted_secret),
        "nonce": STANDARD.encode(nonce),
    });
    post(url, body).await
}

/// The verifier's last steps on the secret of answer `returned` and the certification of
/// answer `certified` (the same answer, or another one to replay).
fn check(
    checked: &Checked,
    secret: &[u8],
    nonce: &[u8],
    returned: &Value,
    certified: &Value,
) -> Result<(), keyproof::ProofError> {
    let r = b64(&returned["secret"]);
    keyproof::check_answer(
        checked,
        secret,
        nonce,
        &r,
        &b64(&certified["attest"]),
        &b64(&certified["signature"]),
    )
}

fn tool(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).current_dir(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_takes_the_time_the_tpm_needs_not_the_wait_of_a_signature() {
    // A signature gets 1 ms at the device here. A proof creates an RSA EK and an AK in the
    // TPM, which takes far longer: it must still be answered (under load it once came back
    // 503 after the default 2 s of a signature).
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = proof_env(&tpm, "timeout_ms = 1\nek = \"rsa2048\"").await;
    let (base, _svc) = env.serve().await;
    let (ok, out, err) = prove(&env, &base, &["--tpm-ca", ca.bundle.path().to_str().unwrap()]);
    assert!(ok && out.contains(&format!("{}: proven", env.kid)), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_keys_are_proven_with_rsa_and_p384_eks_and_a_rotated_key_before_it_signs() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let bundle = ca.bundle.path().to_str().unwrap();
    for ek in ["rsa2048", "p384"] {
        let env = proof_env(&tpm, &format!("ek = \"{ek}\"")).await;
        let (base, _svc) = env.serve().await;
        let (ok, out, err) = prove(&env, &base, &["--tpm-ca", bundle]);
        assert!(ok, "{ek}: {out}{err}");
        assert!(
            out.contains(&format!("{}: proven", env.kid))
                && out.contains(&format!("the TPM's {ek} EK is certified by CN=swtpm-localca")),
            "{out}"
        );
        // A planned rotation publishes the next key before it signs: it is provable then.
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/keys/rotate"))
            .bearer_auth(&env.admin)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let next: Value = r.json().await.unwrap();
        assert_eq!(next["state"], "next");
        let next = next["kid"].as_str().unwrap();
        let out_dir = env.dir.path().join("evidence");
        let (ok, out, err) = prove(
            &env,
            &base,
            &["--tpm-ca", bundle, "--out", out_dir.to_str().unwrap()],
        );
        assert!(ok, "{ek}: {out}{err}");
        for kid in [env.kid.as_str(), next] {
            assert!(out.contains(&format!("{kid}: proven")), "{out}");
        }
        // Every proof is audited.
        let audit = crate::common::audit_entries(&base, &env.admin).await;
        let proofs = audit
            .iter()
            .filter(|e| e["action"] == "key.proof" && e["outcome"] == "success")
            .count();
        assert_eq!(proofs, 3, "{ek}");

        // The evidence re-checked with stock tools, without keygate.
        let d = out_dir.join(next);
        let verified = tool(
            &d,
            "openssl",
            &[
                "dgst",
                "-sha256",
                "-verify",
                "ak.pem",
                "-signature",
                "certify.sig.der",
                "certify.attest",
            ],
        );
        assert!(verified.contains("Verified OK"), "{verified}");
        // tpm2-tools 5.4 prints the header, then refuses the certify body (exit 1).
        let printed = Command::new("tpm2_print")
            .current_dir(&d)
            .args(["-t", "TPMS_ATTEST", "certify.attest"])
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&printed.stdout);
        let nonce = hex::encode(std::fs::read(d.join("nonce.bin")).unwrap());
        assert!(
            printed.contains(&format!("extraData: {nonce}")) && printed.contains("type: 8017"),
            "{printed}"
        );
        // The certified name, computed by openssl from key.pub: nameAlg SHA-256 (000b) and
        // the digest of the TPMT_PUBLIC (key.pub without its 2-byte size).
        let public = std::fs::read(d.join("key.pub")).unwrap();
        std::fs::write(d.join("key.tpmt"), &public[2..]).unwrap();
        let digest = tool(&d, "openssl", &["dgst", "-sha256", "-r", "key.tpmt"]);
        let name = format!("000b{}", digest.split_whitespace().next().unwrap());
        assert_eq!(std::fs::read_to_string(d.join("key.name")).unwrap().trim(), name);
        assert!(hex::encode(std::fs::read(d.join("certify.attest")).unwrap()).contains(&name));
        let attrs = tool(&d, "tpm2_print", &["-t", "TPM2B_PUBLIC", "key.pub"]);
        assert!(
            attrs.contains("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"),
            "{attrs}"
        );
        // key.pem is the JWKS key of that kid.
        let der = Command::new("openssl")
            .current_dir(&d)
            .args(["pkey", "-pubin", "-in", "key.pem", "-outform", "DER"])
            .output()
            .unwrap()
            .stdout;
        let (x, y) = point(&base, next).await;
        assert!(der.ends_with(&[&[4u8][..], &x, &y].concat()));
        let chain = tool(
            &d,
            "openssl",
            &[
                "verify",
                "-CAfile",
                &format!("{bundle}/swtpm-localca-rootca-cert.pem"),
                "-untrusted",
                &format!("{bundle}/issuercert.pem"),
                "ek.crt",
            ],
        );
        assert!(chain.contains("ek.crt: OK"), "{chain}");
    }
}

/// A CA folder with one self-signed CA of the same name as the test manufacturer's, but
/// another key: an impostor.
pub(crate) fn impostor_ca(dir: &Path) -> String {
    let d = dir.join("impostor-ca");
    std::fs::create_dir_all(&d).unwrap();
    crate::common::openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=swtpm-localca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    std::fs::remove_file(d.join("ca.key")).unwrap();
    d.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_fails_at_the_step_that_is_wrong() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = proof_env(&tpm, "").await;
    let (base, _svc) = env.serve().await;
    let bundle = EkCaBundle::load_dir(ca.bundle.path()).unwrap();
    let kid = env.kid.clone();

    // Another manufacturer's CA (same name, another key): the EK certificate step refuses.
    let (ok, out, _) = prove(&env, &base, &["--tpm-ca", &impostor_ca(env.dir.path())]);
    assert!(
        !ok && out.contains(&format!("{kid}: FAILED at step ek-certificate")),
        "{out}"
    );
    // No CA folder at all: refused, not proven.
    let (ok, out, _) = prove(&env, &base, &[]);
    assert!(
        !ok && out.contains("FAILED at step ek-certificate") && out.contains("--tpm-ca"),
        "{out}"
    );

    // A credential made for another name than the AK's: the TPM does not activate it.
    let (c, checked) = checked_challenge(&base, &kid, &bundle).await;
    let secret = [7u8; 32];
    let wrong = keygate::attest::make_credential(&checked.ek, &checked.key.name(), &secret).unwrap();
    let url = format!("{base}/v1/keys/{kid}/proof");
    let (s, p) = answer(&url, &wrong, &c["challenge"], &[1; 32]).await;
    assert_eq!(s, 400, "{p}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("refused to activate the credential"),
        "{p}"
    );
    // The challenge was spent by that attempt.
    let right = keyproof::credential_for(&checked, &secret).unwrap();
    let (s, p) = answer(&url, &right, &c["challenge"], &[1; 32]).await;
    assert_eq!(s, 401, "{p}");

    // A good proof, kept; then a second proof answered with the first certification (a
    // replay): the nonce is not this verifier's.
    let (c1, checked1) = checked_challenge(&base, &kid, &bundle).await;
    let nonce1 = [0x11u8; 32];
    let (s, a1) = answer(
        &url,
        &keyproof::credential_for(&checked1, &secret).unwrap(),
        &c1["challenge"],
        &nonce1,
    )
    .await;
    assert_eq!(s, 200, "{a1}");
    check(&checked1, &secret, &nonce1, &a1, &a1).unwrap();
    let (c2, checked2) = checked_challenge(&base, &kid, &bundle).await;
    let (secret2, nonce2) = ([9u8; 32], [0x22u8; 32]);
    let (s, a2) = answer(
        &url,
        &keyproof::credential_for(&checked2, &secret2).unwrap(),
        &c2["challenge"],
        &nonce2,
    )
    .await;
    assert_eq!(s, 200, "{a2}");
    let replayed = check(&checked2, &secret2, &nonce2, &a2, &a1).unwrap_err();
    assert_eq!(replayed.step, "certify");
    assert!(replayed.why.contains("nonce"), "{replayed}");
    // A secret that is not the one sealed: the credential step.
    let e = keyproof::check_answer(
        &checked2,
        &secret2,
        &nonce2,
        &secret,
        &b64(&a2["attest"]),
        &b64(&a2["signature"]),
    )
    .unwrap_err();
    assert_eq!(e.step, "credential");
    check(&checked2, &secret2, &nonce2, &a2, &a2).unwrap();

    // Two keys (a rotation): evidence of one shown for the other's kid.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/keys/rotate"))
        .bearer_auth(&env.admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let other: Value = r.json().await.unwrap();
    let other = other["kid"].as_str().unwrap().to_owned();
    let (co, _) = checked_challenge(&base, &other, &bundle).await;
    let t = &c2["tpm"];
    let (cert, ek, ak, other_key) = (
        b64(&t["ek_certificate"]),
        b64(&t["ek_public"]),
        b64(&t["ak_public"]),
        b64(&co["tpm"]["key_public"]),
    );
    let (x, y) = point(&base, &kid).await;
    let shown = Evidence {
        ek_certificate: Some(&cert),
        ek_public: &ek,
        ak_public: &ak,
        key_public: &other_key,
    };
    let e = keyproof::check_evidence(&shown, &bundle, (&x, &y), keygate::token::verify::now()).unwrap_err();
    assert_eq!(e.step, "key");
    assert!(e.why.contains("not the JWKS key"), "{e}");
    // The other key's public area with its own JWKS point, but the TPM certifies the kid
    // the challenge was for: the certification names another key.
    let (ox, oy) = point(&base, &other).await;
    let swapped =
        keyproof::check_evidence(&shown, &bundle, (&ox, &oy), keygate::token::verify::now()).unwrap();
    let (c3, _) = checked_challenge(&base, &kid, &bundle).await;
    let (s, a3) = answer(
        &url,
        &keyproof::credential_for(&swapped, &secret).unwrap(),
        &c3["challenge"],
        &nonce1,
    )
    .await;
    assert_eq!(s, 200, "{a3}");
    let e = check(&swapped, &secret, &nonce1, &a3, &a3).unwrap_err();
    assert_eq!(e.step, "certify");
    assert!(e.why.contains("another key"), "{e}");

    // Unknown kid; bad nonce size.
    let (s, _) = post(&format!("{base}/v1/keys/nope/proof/challenge"), json!({})).await;
    assert_eq!(s, 404);
    let (c4, checked4) = checked_challenge(&base, &kid, &bundle).await;
    let (s, p) = answer(
        &url,
        &keyproof::credential_for(&checked4, &secret).unwrap(),
        &c4["challenge"],
        &[1; 8],
    )
    .await;
    assert_eq!(s, 400, "{p}");
    let audit = crate::common::audit_entries(&base, &env.admin).await;
    let denied = audit
        .iter()
        .filter(|e| e["action"] == "key.proof" && e["outcome"].as_str().unwrap().starts_with("denied"))
        .count();
    assert_eq!(denied, 2, "the refused activation and the spent challenge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ek_certificate_file_is_shown_instead_of_nv() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let bundle = ca.bundle.path().to_str().unwrap();
    let certs = tpm.state.path().join("ekcerts");
    // The P-384 EK's certificate named for the RSA EK: the file is what the server shows,
    // so the proof fails at the certificate (it names another key).
    let wrong = format!(
        "ek = \"rsa2048\"\nek_certificate = \"{}\"",
        certs.join("ek-secp384r1.crt").display()
    );
    let env = proof_env(&tpm, &wrong).await;
    let (base, served) = env.serve_stoppable().await;
    let (ok, out, _) = prove(&env, &base, &["--tpm-ca", bundle]);
    assert!(
        !ok && out.contains("FAILED at step ek-certificate: ek_pub does not match"),
        "{out}"
    );
    // One service on the swtpm at a time (see the endorsement-password test).
    served.stop().await;
    // The right file, as PEM: proven.
    let pem = env.dir.path().join("ek.pem");
    crate::common::openssl(
        env.dir.path(),
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            certs.join("ek-rsa2048.crt").to_str().unwrap(),
            "-out",
            pem.to_str().unwrap(),
        ],
    );
    let right = format!("ek = \"rsa2048\"\nek_certificate = \"{}\"", pem.display());
    let env = proof_env(&tpm, &right).await;
    let (base, _svc) = env.serve().await;
    let (ok, out, err) = prove(&env, &base, &["--tpm-ca", bundle]);
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endorsement_password_is_used_when_configured_and_never_stops_the_service() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let bundle = ca.bundle.path().to_str().unwrap();
    let set = Command::new("tpm2_changeauth")
        .args(["-c", "e", "endorse-me"])
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .output()
        .unwrap();
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    // Not configured: init and serving work (the key is published unproven, with a
    // warning); a proof cannot be made.
    let env = proof_env(&tpm, "").await;
    let (base, served) = env.serve_stoppable().await;
    crate::common::issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let (ok, out, _) = prove(&env, &base, &["--tpm-ca", bundle]);
    assert!(!ok && out.contains("FAILED at step evidence"), "{out}");
    // The first service lets go of the TPM before the second one starts. swtpm serves one
    // connection and drops it for a newer one, so a service left running would reconnect
    // at its next TPM command and cut the second service off in the middle of its proof
    // (seen once in a full run: "Connection reset by peer", then 503 at step credential).
    served.stop().await;
    // Configured: proven.
    let pw = tpm.state.path().join("endorsement.auth");
    std::fs::write(&pw, "endorse-me").unwrap();
    let lines = format!("endorsement_auth = {{ file = \"{}\" }}", pw.display());
    let env = proof_env(&tpm, &lines).await;
    let (base, _svc) = env.serve().await;
    let (ok, out, err) = prove(&env, &base, &["--tpm-ca", bundle]);
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_softhsm2_key_is_never_reported_as_proven() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let (s, c) = post(&format!("{base}/v1/keys/{}/proof/challenge", env.kid), json!({})).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["kind"], "pkcs11");
    assert_eq!(c["hardware_proof"], false);
    assert!(c["challenge"].is_null() && c["tpm"].is_null());
    let p = &c["pkcs11"];
    assert!(
        p["token_manufacturer"].as_str().unwrap().contains("SoftHSM"),
        "{p}"
    );
    for (attr, want) in [
        ("CKA_LOCAL", true),
        ("CKA_NEVER_EXTRACTABLE", true),
        ("CKA_ALWAYS_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_SENSITIVE", true),
    ] {
        assert_eq!(p["attributes"][attr], want, "{attr}");
    }
    assert!(
        p["statement"].as_str().unwrap().contains("No hardware proof"),
        "{p}"
    );
    let ca_dir = env.dir.path().join("any-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    for args in [vec![], vec!["--tpm-ca", ca_dir.to_str().unwrap()]] {
        let (ok, out, err) = prove(&env, &base, &args);
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("{}: NOT proven: a PKCS#11 key on SoftHSM", env.kid))
                && out.contains("not a hardware proof")
                && !out.contains(&format!("{}: proven", env.kid)),
            "{out}"
        );
        assert!(
            err.contains("keygate: error: 1 of 1 keys not proven to live in hardware"),
            "{err}"
        );
    }
    // Nothing can be answered for it.
    let (s, _) = post(
        &format!("{base}/v1/keys/{}/proof", env.kid),
        json!({"challenge": "x", "id_object": "AAA=", "encrypted_secret": "AAA=", "nonce": STANDARD.encode([1u8; 32])}),
    )
    .await;
    assert_eq!(s, 401);
    // An instance that requires a proof refuses its tokens.
    let token = crate::common::issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let out = env
        .keygate()
        .args([
            "verify",
            "--jwks",
            &format!("{base}/.well-known/jwks.json"),
            "--issuer",
            &env.config.issuer(),
        ])
        .args([
            "--audience",
            "fleet",
            "--require-proof",
            ca_dir.to_str().unwrap(),
            "--proof-server",
            &base,
        ])
        .arg(token["token"].as_str().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not proven to live in hardware: a PKCS#11 key"),
        "{err}"
    );
}
