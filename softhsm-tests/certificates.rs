//! Certificates people can use: subjectAltNames under the token's policy, and revocation
//! through a CRL signed by the hardware-held CA key that `openssl verify -crl_check` honours.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Env, issue, openssl, revoke};
use crate::redeem::redeem;

/// A P-256 key and a CSR for it asking for `sans` (openssl's `-addext` form), in `dir`.
fn csr(dir: &Path, name: &str, sans: Option<&str>) -> String {
    let key = format!("{name}.key");
    let req = format!("{name}.csr");
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    let mut args = vec!["req", "-new", "-key", &key, "-subj", "/CN=ignored", "-out", &req];
    let ext;
    if let Some(s) = sans {
        ext = format!("subjectAltName={s}");
        args.extend(["-addext", &ext]);
    }
    openssl(dir, &args);
    std::fs::read_to_string(dir.join(req)).unwrap()
}

/// Writes the leaf of `chain` to `<name>.pem` and the CA to `ca.pem`.
fn save_chain(dir: &Path, name: &str, chain: &str) {
    let end = "-----END CERTIFICATE-----";
    let i = chain.find(end).unwrap() + end.len();
    std::fs::write(dir.join(format!("{name}.pem")), format!("{}\n", &chain[..i])).unwrap();
    std::fs::write(dir.join("ca.pem"), chain[i..].trim_start()).unwrap();
}

fn text_of(dir: &Path, cert: &str) -> String {
    String::from_utf8(openssl(dir, &["x509", "-in", cert, "-noout", "-text"]).stdout).unwrap()
}

/// Fetches the CRL (DER), checks what openssl says of it, and writes it as `crl.pem`.
async fn fetch_crl(base: &str, dir: &Path) -> String {
    let r = reqwest::get(format!("{base}/v1/crl")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pkix-crl");
    std::fs::write(dir.join("crl.der"), r.bytes().await.unwrap()).unwrap();
    openssl(
        dir,
        &["crl", "-inform", "DER", "-in", "crl.der", "-out", "crl.pem"],
    );
    // signed by the CA certificate's key, and well-formed
    openssl(dir, &["crl", "-in", "crl.pem", "-CAfile", "ca.pem", "-noout"]);
    String::from_utf8(openssl(dir, &["crl", "-in", "crl.pem", "-noout", "-text"]).stdout).unwrap()
}

/// `openssl verify -crl_check` of `<name>.pem`: Ok, or Err(what openssl said).
fn verify_with_crl(dir: &Path, name: &str) -> Result<(), String> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "verify",
            "-crl_check",
            "-CAfile",
            "ca.pem",
            "-CRLfile",
            "crl.pem",
            &format!("{name}.pem"),
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() { Ok(()) } else { Err(said) }
}

fn serial_of(dir: &Path, cert: &str) -> String {
    let out = String::from_utf8(openssl(dir, &["x509", "-in", cert, "-noout", "-serial"]).stdout).unwrap();
    out.trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_ascii_lowercase()
}

async fn sans_follow_the_token_and_revocation_reaches_the_crl(env: Env) {
    let (base, _svc) = env.serve().await;
    let dir = env.dir.path();
    let token = |sans: Value| {
        let (base, admin) = (base.clone(), env.admin.clone());
        async move {
            issue(
                &base,
                &admin,
                json!({"subject": "web-1", "audience": "fleet", "one_time": true, "sans": sans}),
            )
            .await
        }
    };
    // 1. The token allows web-1 and 10.0.0.5; the CSR asks for both: the certificate has them.
    let t1 = token(json!(["web-1.example.com", "IP:10.0.0.5"])).await;
    let body = json!({"token": t1["token"], "csr": csr(dir, "a", Some("DNS:web-1.example.com,IP:10.0.0.5"))});
    let (status, a) = redeem(&base, body, None).await;
    assert_eq!(status, 200, "{a}");
    save_chain(dir, "a", a["certificate"].as_str().unwrap());
    let text = text_of(dir, "a.pem");
    assert!(
        text.contains("DNS:web-1.example.com, IP Address:10.0.0.5"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    // a TLS client checking the name accepts it
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-verify_hostname",
            "web-1.example.com",
            "a.pem",
        ],
    );
    openssl(
        dir,
        &["verify", "-CAfile", "ca.pem", "-verify_ip", "10.0.0.5", "a.pem"],
    );

    // 2. A name the token does not allow: 403 naming it, and the one-time token is intact.
    let t2 = token(json!(["web-2.example.com"])).await;
    let evil = csr(dir, "b", Some("DNS:web-2.example.com,DNS:bank.example.com"));
    let (status, p) = redeem(&base, json!({"token": t2["token"], "csr": evil}), None).await;
    assert_eq!(status, 403, "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("DNS:bank.example.com") && detail.contains("DNS:web-2.example.com"),
        "{detail}"
    );
    // 3. A CSR without names gets the token's.
    let (status, b) = redeem(
        &base,
        json!({"token": t2["token"], "csr": csr(dir, "b2", None)}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{b}");
    save_chain(dir, "b", b["certificate"].as_str().unwrap());
    assert!(text_of(dir, "b.pem").contains("DNS:web-2.example.com"));
    // 4. A token without sans allows none.
    let t3 = token(json!([])).await;
    let (status, p) = redeem(
        &base,
        json!({"token": t3["token"], "csr": csr(dir, "c", Some("DNS:x.example.com"))}),
        None,
    )
    .await;
    assert_eq!(status, 403, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("allows no subjectAltName"));
    // a bad name at issuance is a 400
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&env.admin)
        .json(&json!({"subject": "s", "audience": "a", "sans": ["not a name!"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // an IP address given as a DNS name would read back as an IP address: refused
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&env.admin)
        .json(&json!({"subject": "s", "audience": "a", "sans": ["DNS:10.0.0.1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // 5. The CRL: signed by the hardware-held CA, nextUpdate set, empty yet; openssl
    //    verify with -crl_check accepts both certificates.
    let crl = fetch_crl(&base, dir).await;
    assert!(
        crl.contains("Next Update:") && crl.contains("No Revoked Certificates"),
        "{crl}"
    );
    verify_with_crl(dir, "a").unwrap();
    verify_with_crl(dir, "b").unwrap();

    // 6. Revoking a's token revokes a; revoking b's certificate revokes b.
    let r = revoke(
        &base,
        &env.admin,
        t1["jti"].as_str().unwrap(),
        Some(json!({"reason": "key compromised"})),
    );
    assert_eq!(r.await.status(), 200);
    let serial_b = serial_of(dir, "b.pem");
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/certificates/{serial_b}/revoke"))
        .bearer_auth(&env.admin)
        .json(&json!({"reason": "superseded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["serial"], serial_b);
    let crl = fetch_crl(&base, dir).await;
    let serial_a = serial_of(dir, "a.pem");
    assert!(crl.to_ascii_lowercase().contains(&serial_a), "{crl}");
    assert!(
        crl.contains("Key Compromise") && crl.contains("Superseded"),
        "{crl}"
    );
    for name in ["a", "b"] {
        let why = verify_with_crl(dir, name).unwrap_err();
        assert!(why.contains("certificate revoked"), "{name}: {why}");
    }
    // unknown serials and keys are 404s; the revocation was audited
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/certificates/abcdef/revoke"))
        .bearer_auth(&env.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!("{base}/v1/crl?kid=nope")).await.unwrap();
    assert_eq!(r.status(), 404);
    let audit = crate::common::audit_entries(&base, &env.admin).await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "certificate.revoke" && e["target"] == serial_b.as_str())
    );
}
on_both_stores!(sans_follow_the_token_and_revocation_reaches_the_crl);

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_issues_with_sans_revokes_a_certificate_and_fetches_the_crl() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let dir = env.dir.path();
    let kg = |args: &[&str]| {
        let out = env
            .keygate()
            .env("KEYGATE_TOKEN", &env.admin)
            .env("KEYGATE_ADDR", &base)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let token = kg(&[
        "token",
        "issue",
        "--subject",
        "web-3",
        "--audience",
        "fleet",
        "--san",
        "web-3.example.com",
    ]);
    csr(dir, "w", Some("DNS:web-3.example.com"));
    let chain = dir.join("w-chain.pem");
    kg(&[
        "token",
        "redeem",
        "--csr",
        dir.join("w.csr").to_str().unwrap(),
        "--cert-out",
        chain.to_str().unwrap(),
        token.trim(),
    ]);
    save_chain(dir, "w", &std::fs::read_to_string(&chain).unwrap());
    let serial = serial_of(dir, "w.pem");
    assert!(kg(&["cert", "revoke", &serial, "--reason", "keyCompromise"]).contains("revoked at"));
    kg(&["cert", "crl", "--out", dir.join("crl.der").to_str().unwrap()]);
    openssl(
        dir,
        &["crl", "-inform", "DER", "-in", "crl.der", "-out", "crl.pem"],
    );
    let why = verify_with_crl(dir, "w").unwrap_err();
    assert!(why.contains("certificate revoked"), "{why}");
}

/// A machine revoked after its enrollment token expired: its AK certificate (which outlives
/// the token) is still put on the CRL.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_machine_lists_its_certificate_after_its_token_expired() {
    use crate::common::swtpm::Swtpm;
    use crate::common::tpm2tools::Client;
    use crate::enroll::enroll;
    use keygate::attest::TpmPublic;
    let tpm = Swtpm::start();
    let env = Env::with_toml("[enroll]\nmode = \"allowlist\"\ntoken_ttl_seconds = 1\n").await;
    let (base, _svc) = env.serve().await;
    let dir = env.dir.path();
    let mut c = Client::new(&tpm.tcti());
    let ek = TpmPublic::from_tpm2b(&c.create_ek("ecc"), "ek").unwrap();
    c.create_ak("ak");
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/enroll/machines"))
        .bearer_auth(&env.admin)
        .json(&json!({"ek_hash": ek.ek_hash(), "name": "node-9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (status, p) = enroll(&base, &c).await;
    assert_eq!(status, 200, "{p}");
    save_chain(dir, "ak", p["certificate"].as_str().unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let path = format!("/v1/enroll/machines/{}", ek.ek_hash());
    let r = crate::common::delete_authed(&base, &path, &env.admin).await;
    assert_eq!(r.status(), 204);
    let crl = fetch_crl(&base, dir).await;
    assert!(crl.contains("Cessation Of Operation"), "{crl}");
    let why = verify_with_crl(dir, "ak").unwrap_err();
    assert!(why.contains("certificate revoked"), "{why}");
}
