//! Fitting the ecosystem: OpenID Connect discovery checked by an independent relying party
//! (openid-client and jose, pinned in softhsm-tests/oidc) that starts from the issuer URL.

use serde_json::{Value, json};

use crate::common::{Env, issue};

/// Installs the pinned OIDC client (once) and returns its folder.
fn oidc_client() -> std::path::PathBuf {
    let dest = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("oidc-client");
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/softhsm-tests/oidc/setup.sh");
    let out = std::process::Command::new(setup).arg(&dest).output().unwrap();
    assert!(
        out.status.success(),
        "oidc/setup.sh (needs node and npm: softhsm-tests/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dest
}

/// `node verify.mjs ISSUER AUDIENCE TOKEN`: Ok(claims) or Err(why it refused).
fn relying_party(dir: &std::path::Path, issuer: &str, audience: &str, token: &str) -> Result<Value, String> {
    let out = std::process::Command::new("node")
        .current_dir(dir)
        .args(["verify.mjs", issuer, audience, token])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oidc_relying_party_verifies_tokens_from_the_issuer_url_alone() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let doc: Value = reqwest::get(format!("{base}/.well-known/openid-configuration"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // OpenID Connect Discovery 1.0 §3: the members a relying party may rely on
    assert_eq!(doc["issuer"], base.as_str());
    assert_eq!(doc["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    assert_eq!(doc["id_token_signing_alg_values_supported"], json!(["ES256"]));
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    assert!(doc["response_types_supported"].is_array());

    let dir = oidc_client();
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "node-7", "audience": "fleet"}),
    )
    .await;
    let token = t["token"].as_str().unwrap();
    let ok = relying_party(&dir, &base, "fleet", token).unwrap();
    assert_eq!(ok["alg"], "ES256");
    assert_eq!(ok["claims"]["sub"], "node-7");
    assert_eq!(ok["claims"]["jti"], t["jti"]);
    // the same client refuses what it must: another audience, a changed signature, an
    // issuer URL that is not keygate's
    let why = relying_party(&dir, &base, "other", token).unwrap_err();
    assert!(why.contains("aud"), "{why}");
    let mut forged = token.as_bytes().to_vec();
    let i = forged.len() - 10; // inside the signature, away from the padding bits
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let why = relying_party(&dir, &base, "fleet", std::str::from_utf8(&forged).unwrap()).unwrap_err();
    assert!(why.contains("signature"), "{why}");
    let elsewhere = format!("{base}/v1");
    assert!(relying_party(&dir, &elsewhere, "fleet", token).is_err());
}
