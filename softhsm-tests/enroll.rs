//! Attestation-gated enrollment end to end, against swtpm made by `swtpm_setup` with EK
//! certificates from a test CA: the stock tpm2-tools + curl script, every refusal the issue
//! lists (each with its status, a detail naming the check, and nothing issued), PCR policy
//! and `keygate enroll`. Allowlist mode and the machines API: `machines.rs`.

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use keygate::attest::TpmPublic;
use keygate::token::{Claims, Verifier, VerifierConfig};

use crate::common::swtpm::{Swtpm, TestCa};
use crate::common::tpm2tools::Client;
use crate::common::{Env, TestStore, get_authed, introspect, jwks, metric, openssl};

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn unb64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap()).unwrap()
}

pub(crate) async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status != 200 {
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(ct, "application/problem+json", "status {status}");
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Asserts a refusal: the status, a detail that names the check, no 500.
pub(crate) fn refused(got: (u16, Value), status: u16, detail: &str) {
    let (s, p) = got;
    assert_eq!(s, status, "{p}");
    let d = p["detail"].as_str().unwrap_or_default();
    assert!(d.contains(detail), "detail {d:?} lacks {detail:?}");
}

/// The `[enroll]` table for a test CA, plus `extra` lines.
pub(crate) fn enroll_toml(ca: &TestCa, extra: &str) -> String {
    format!("[enroll]\nca_dir = \"{}\"\n{extra}\n", ca.bundle.path().display())
}

/// A challenge body for the client's EK (with its NV certificate) and AK `ak`.
pub(crate) fn challenge_body(c: &Client, ak: &str) -> Value {
    let mut body = json!({
        "ek_pub": b64(&c.read("ek.pub")),
        "ak_pub": b64(&c.read(&format!("{ak}.pub"))),
    });
    if let Some(cert) = c.ek_certificate() {
        body["ek_certificate"] = b64(&cert).into();
    }
    body
}

/// Activates the challenge's credential and quotes with AK `ak.ctx`: the completion body.
pub(crate) fn complete_body(c: &Client, ch: &Value) -> Value {
    let secret = c.activate(&unb64(&ch["tpm2_tools_credential"])).unwrap();
    let (quote, sig, pcrs) = c.quote("ak", &unb64(&ch["nonce"]), ch["pcr_selection"].as_str().unwrap());
    json!({
        "enrollment_id": ch["enrollment_id"],
        "secret": b64(&secret),
        "quote": b64(&quote),
        "signature": b64(&sig),
        "pcrs": {"sha256": pcrs},
    })
}

/// A whole enrollment through the API with tpm2-tools; the (status, answer) of completion.
pub(crate) async fn enroll(base: &str, c: &Client) -> (u16, Value) {
    let (s, ch) = post(base, "/v1/enroll/challenge", &challenge_body(c, "ak")).await;
    assert_eq!(s, 200, "{ch}");
    post(base, "/v1/enroll/complete", &complete_body(c, &ch)).await
}

pub(crate) fn issued(env: &Env) -> i64 {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(async { env.counts().await.0 }))
}

/// Writes the first certificate of the PEM chain in `out/certificate.pem` to
/// `out/leaf.pem` and asserts that openssl verifies it against `dir/ca.pem`; the leaf's path.
fn leaf_verifies(dir: &std::path::Path, out: &std::path::Path) -> String {
    let chain = std::fs::read_to_string(out.join("certificate.pem")).unwrap();
    let leaf = &chain[..chain.find("-----END CERTIFICATE-----").unwrap() + 26];
    let path = out.join("leaf.pem");
    std::fs::write(&path, leaf).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let v = openssl(dir, &["verify", "-CAfile", "ca.pem", &path]);
    assert!(String::from_utf8_lossy(&v.stdout).contains(": OK"));
    path
}

/// Writes the active key's CA certificate to `dir/ca.pem`; a verifier for enrollment tokens
/// with only the JWKS.
async fn ca_and_verifier(env: &Env, base: &str) -> Verifier {
    let keys: Vec<Value> = get_authed(base, "/v1/keys", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    std::fs::write(
        env.dir.path().join("ca.pem"),
        keys[0]["certificate"].as_str().unwrap(),
    )
    .unwrap();
    let set = jwks(base).await;
    Verifier::new(&set, VerifierConfig::new(env.config.issuer(), "keygate-enroll")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm2_tools_script_enrolls_rsa_and_ecc_eks_and_the_results_verify() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::with_toml(&enroll_toml(&ca, "")).await;
    let (base, _svc) = env.serve().await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/enroll/tpm2-tools-enroll.sh");
    let dir = env.dir.path();
    let verifier = ca_and_verifier(&env, &base).await;
    // the EK names of `keygate enroll --ek`; the second server address without a scheme, as
    // `--server` takes it
    let bare = base.trim_start_matches("http://").to_owned();
    for (kind, nv_cert, server) in [
        ("rsa2048", "ek-rsa2048.crt", &base),
        ("p384", "ek-secp384r1.crt", &bare),
    ] {
        let out = dir.join(kind);
        // A relative output folder, as a person would type it.
        let run = Command::new("bash")
            .current_dir(dir)
            .arg(&script)
            .args(["-e", kind, "-o", kind])
            .arg(server)
            .env("TPM2TOOLS_TCTI", tpm.tcti())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        // The secrets are the owner's only, as `keygate enroll` writes them.
        for f in ["token", "ak.priv"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{kind}: {f}");
        }
        // The token verifies offline; its sub is the URN of the EK hash, which is the SHA-256
        // of the EK certificate's public key as openssl encodes it.
        let token = std::fs::read_to_string(out.join("token")).unwrap();
        let claims: Claims = verifier.verify(token.trim()).unwrap();
        let ek_cert = tpm.state.path().join("ekcerts").join(nv_cert);
        let spki = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -inform der -in {} -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
                ek_cert.display()
            ))
            .output()
            .unwrap();
        let ek_hash = String::from_utf8_lossy(&spki.stdout)[..64].to_owned();
        assert_eq!(claims.sub, format!("urn:keygate:tpm:ek:{ek_hash}"));
        assert_eq!(claims.one_time, Some(true));
        // The AK certificate: openssl verifies it against the key's CA certificate, its
        // subject is the token's sub, and its key is the AK's.
        let leaf = leaf_verifies(dir, &out);
        let text =
            String::from_utf8(openssl(dir, &["x509", "-in", &leaf, "-noout", "-subject"]).stdout).unwrap();
        assert!(text.contains(&ek_hash), "{text}");
        let ak = TpmPublic::from_tpm2b(&std::fs::read(out.join("ak.pub")).unwrap(), "ak").unwrap();
        let der =
            String::from_utf8(openssl(dir, &["x509", "-in", &leaf, "-noout", "-pubkey"]).stdout).unwrap();
        let body: String = der.lines().filter(|l| !l.starts_with("-----")).collect();
        let key = STANDARD.decode(body).unwrap();
        assert_eq!(key, ak.spki_der());
        // Introspection agrees.
        assert_eq!(introspect(&base, &env.admin, token.trim()).await["active"], true);
    }
    // Both machines are listed as enrolled, and the audit log has both enrollments.
    let machines: Vec<Value> = get_authed(&base, "/v1/enroll/machines", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(machines.len(), 2);
    assert!(
        machines
            .iter()
            .all(|m| m["enrolled_at"].is_string() && m["revoked_at"].is_null())
    );
    let audit = crate::common::audit_entries(&base, &env.admin).await;
    let done = audit
        .iter()
        .filter(|e| e["action"] == "enroll.complete" && e["outcome"] == "success")
        .count();
    assert_eq!(done, 2);
    // The recorder is process-wide (other tests add to it): at least these two.
    assert!(metric(&base, "keygate_enrollments_total{outcome=\"success\"}").await >= 2.0);
}

async fn every_refusal_names_its_check_issues_nothing_and_never_500s(store: TestStore) {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::with_store(&enroll_toml(&ca, ""), store).await;
    let (base, _svc) = env.serve().await;
    let mut c = Client::new(&tpm.tcti());
    let ecc_pub = c.create_ek("ecc384");
    let ecc_cert = c.ek_certificate().unwrap();
    c.create_ek("rsa");
    c.create_ak("ak");
    c.create_ak("ak2");
    let good = challenge_body(&c, "ak");
    let before = issued(&env);

    // EK checks. A certificate from another manufacturer CA (same names, other keys).
    let other_ca = TestCa::new();
    let other_tpm = Swtpm::manufactured(&other_ca);
    let mut o = Client::new(&other_tpm.tcti());
    o.create_ek("rsa");
    o.create_ak("ak");
    refused(
        post(&base, "/v1/enroll/challenge", &challenge_body(&o, "ak")).await,
        403,
        "ek_certificate",
    );
    // An EK public key that is not the one its certificate names.
    let mut b = good.clone();
    b["ek_certificate"] = b64(&ecc_cert).into();
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        403,
        "does not match",
    );
    let mut b = good.clone();
    b["ek_pub"] = b64(&ecc_pub).into();
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        403,
        "does not match",
    );
    // No certificate in ek-ca mode.
    let mut b = good.clone();
    b.as_object_mut().unwrap().remove("ek_certificate");
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        403,
        "ek_certificate is required",
    );
    // A certificate that is not DER at all.
    let mut b = good.clone();
    b["ek_certificate"] = b64(b"not a certificate").into();
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        400,
        "ek_certificate",
    );

    // AK checks: not restricted (the attributes word of the TPM2B_PUBLIC, bit 16), or the
    // EK offered as the AK.
    let mut ak = c.read("ak.pub");
    ak[6 + 1] &= !0x01;
    let mut b = good.clone();
    b["ak_pub"] = b64(&ak).into();
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        403,
        "lacks restricted",
    );
    let mut b = good.clone();
    b["ak_pub"] = good["ek_pub"].clone();
    refused(
        post(&base, "/v1/enroll/challenge", &b).await,
        403,
        "not an attestation key",
    );

    // Malformed TPM structures: truncated, oversized, wrong type, trailing junk, not base64.
    let ek = c.read("ek.pub");
    let mut wrong_type = ek.clone();
    wrong_type[2..4].copy_from_slice(&0x0008u16.to_be_bytes());
    let mut trailing = ek.clone();
    trailing.push(0);
    for bad in [
        ek[..ek.len() / 2].to_vec(),
        vec![0x41; 5000],
        wrong_type,
        trailing,
        vec![],
        vec![0xff, 0xff],
    ] {
        for field in ["ek_pub", "ak_pub"] {
            let mut b = good.clone();
            b[field] = b64(&bad).into();
            let (s, p) = post(&base, "/v1/enroll/challenge", &b).await;
            assert!(s == 400 || s == 403, "{field}: {s} {p}");
        }
    }
    let mut b = good.clone();
    b["ek_pub"] = "%%%".into();
    refused(post(&base, "/v1/enroll/challenge", &b).await, 400, "base64");

    // Completion checks, each on a fresh challenge.
    let fresh = || async {
        let (s, ch) = post(&base, "/v1/enroll/challenge", &good).await;
        assert_eq!(s, 200, "{ch}");
        let body = complete_body(&c, &ch);
        (ch, body)
    };
    // A wrong activated secret; then the same enrollment id, even with the right secret.
    let (_, right) = fresh().await;
    let mut b = right.clone();
    b["secret"] = b64(&[7u8; 32]).into();
    refused(
        post(&base, "/v1/enroll/complete", &b).await,
        401,
        "secret does not match",
    );
    refused(
        post(&base, "/v1/enroll/complete", &right).await,
        401,
        "used already",
    );
    refused(
        post(
            &base,
            "/v1/enroll/complete",
            &json!({"enrollment_id": "nope", "secret": "", "quote": "", "signature": "", "pcrs": {}}),
        )
        .await,
        401,
        "unknown",
    );
    // A quote with another nonce.
    let (ch, mut b) = fresh().await;
    let (quote, sig, _) = c.quote("ak", b"another nonce", ch["pcr_selection"].as_str().unwrap());
    b["quote"] = b64(&quote).into();
    b["signature"] = b64(&sig).into();
    refused(post(&base, "/v1/enroll/complete", &b).await, 401, "nonce");
    // A quote signed by another AK (of the same TPM).
    let (ch, mut b) = fresh().await;
    let (quote, sig, _) = c.quote("ak2", &unb64(&ch["nonce"]), ch["pcr_selection"].as_str().unwrap());
    b["quote"] = b64(&quote).into();
    b["signature"] = b64(&sig).into();
    refused(
        post(&base, "/v1/enroll/complete", &b).await,
        401,
        "signature does not verify",
    );
    // PCR values that do not match the quote's digest.
    let (_, mut b) = fresh().await;
    b["pcrs"]["sha256"]["3"] = "11".repeat(32).into();
    refused(post(&base, "/v1/enroll/complete", &b).await, 401, "PCR digest");
    // A quote over other PCRs than asked for.
    let (ch, mut b) = fresh().await;
    let (quote, sig, pcrs) = c.quote("ak", &unb64(&ch["nonce"]), "sha256:0,1");
    b["quote"] = b64(&quote).into();
    b["signature"] = b64(&sig).into();
    b["pcrs"]["sha256"] = json!(pcrs);
    refused(
        post(&base, "/v1/enroll/complete", &b).await,
        400,
        "pcrs must give every PCR",
    );
    // Malformed quote and signature: truncated, oversized, junk.
    for field in ["quote", "signature"] {
        for bad in [vec![0u8; 3], vec![0x41; 5000], vec![0xff; 100]] {
            let (_, mut b) = fresh().await;
            let mut good_bytes = unb64(&b[field]);
            if bad.len() == 3 {
                good_bytes.truncate(good_bytes.len() / 2);
            } else {
                good_bytes = bad.clone();
            }
            b[field] = b64(&good_bytes).into();
            let (s, p) = post(&base, "/v1/enroll/complete", &b).await;
            assert!(s == 400 || s == 401, "{field}: {s} {p}");
        }
    }
    assert_eq!(issued(&env), before, "a refusal issued a token");

    // The same TPM, done right, enrolls (so the refusals above were the checks, not the setup).
    let (s, p) = enroll(&base, &c).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(issued(&env), before + 1);
    // Every refusal is in the audit log, and the chain still verifies.
    let audit = crate::common::audit_entries(&base, &env.admin).await;
    let denied = audit
        .iter()
        .filter(|e| {
            e["action"].as_str().unwrap().starts_with("enroll.")
                && e["outcome"].as_str().unwrap().starts_with("denied")
        })
        .count();
    assert!(denied >= 30, "{denied} refusals audited");
    let out = env.keygate().args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
for_both_stores!(every_refusal_names_its_check_issues_nothing_and_never_500s);

async fn an_expired_challenge_and_a_changed_boot_state_are_refused(store: TestStore) {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    // PCR 7 must hold its reset value; the challenge lives 1 s.
    let golden = format!(
        "challenge_ttl_seconds = 1\npcr_policy = {{ \"7\" = [\"{}\"] }}",
        "00".repeat(32)
    );
    let env = Env::with_store(&enroll_toml(&ca, &golden), store).await;
    let (base, _svc) = env.serve().await;
    let mut c = Client::new(&tpm.tcti());
    c.create_ek("ecc384");
    c.create_ak("ak");
    let (s, p) = enroll(&base, &c).await;
    assert_eq!(s, 200, "the golden value matches: {p}");
    let before = issued(&env);
    let (s, ch) = post(&base, "/v1/enroll/challenge", &challenge_body(&c, "ak")).await;
    assert_eq!(s, 200);
    let body = complete_body(&c, &ch);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    refused(post(&base, "/v1/enroll/complete", &body).await, 401, "expired");
    // A changed boot state: PCR 7 extended. The quote is genuine, the policy refuses it.
    c.extend(7);
    refused(enroll(&base, &c).await, 403, "PCR 7");
    assert_eq!(issued(&env), before);
}
for_both_stores!(an_expired_challenge_and_a_changed_boot_state_are_refused);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_enroll_with_tss_esapi_for_rsa_and_p384_eks() {
    let ca = TestCa::new();
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::with_toml(&enroll_toml(&ca, "")).await;
    let (base, _svc) = env.serve().await;
    let dir = env.dir.path();
    let verifier = ca_and_verifier(&env, &base).await;
    let mut subjects = Vec::new();
    for ek in ["rsa2048", "p384"] {
        let out = dir.join(ek);
        let run = env
            .keygate()
            .args([
                "enroll",
                "--server",
                &base,
                "--tcti",
                &tpm.tcti(),
                "--ek",
                ek,
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{ek}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let subject = String::from_utf8(run.stdout).unwrap().trim().to_owned();
        let token = std::fs::read_to_string(out.join("token")).unwrap();
        let claims: Claims = verifier.verify(token.trim()).unwrap();
        assert_eq!(claims.sub, subject);
        assert!(subject.starts_with("urn:keygate:tpm:ek:"));
        leaf_verifies(dir, &out);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(out.join("token")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        subjects.push(subject);
    }
    assert_ne!(subjects[0], subjects[1], "two EKs, two machines");

    // Clear one-line errors, non-zero exit: no TPM there, no server there, a refusal.
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "swtpm:host=127.0.0.1,port=1",
            &base,
            "rsa2048",
            "cannot open the TPM",
        ),
        (&tpm.tcti(), "http://127.0.0.1:1", "rsa2048", "cannot reach"),
        // swtpm holds no certificate for a P-256 EK: refused in ek-ca mode.
        (
            &tpm.tcti(),
            &base,
            "p256",
            "answered 403: ek_certificate is required",
        ),
    ];
    for (tcti, server, ek, expect) in cases {
        let run = env
            .keygate()
            .args(["enroll", "--server", server, "--tcti", tcti, "--ek", ek, "--out"])
            .arg(dir.join("refused"))
            .output()
            .unwrap();
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(expect), "{err}");
        assert!(!dir.join("refused/token").exists());
    }
}
