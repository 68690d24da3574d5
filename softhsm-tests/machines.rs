//! The enrollment allowlist end to end: in allowlist mode only a registered EK enrolls, the
//! machines API lists and revokes machines, and revoking one revokes its unexpired tokens.

use serde_json::{Value, json};

use keygate::attest::TpmPublic;

use crate::common::swtpm::Swtpm;
use crate::common::tpm2tools::Client;
use crate::common::{Env, TestStore, create_api_token, delete_authed, get_authed, introspect, openssl};
use crate::enroll::{challenge_body, enroll, issued, post, refused};

async fn allowlist_mode_needs_a_registered_ek_and_revoking_a_machine_revokes_its_tokens(store: TestStore) {
    let tpm = Swtpm::start();
    let env = Env::with_store("[enroll]\nmode = \"allowlist\"\n", store).await;
    let (base, _svc) = env.serve().await;
    let mut c = Client::new(&tpm.tcti());
    // A P-256 EK (no certificate needed in this mode).
    let ek = TpmPublic::from_tpm2b(&c.create_ek("ecc"), "ek").unwrap();
    c.create_ak("ak");
    let before = issued(&env);
    refused(
        post(&base, "/v1/enroll/challenge", &challenge_body(&c, "ak")).await,
        403,
        "not registered",
    );
    // Registering needs enroll:admin.
    let reader = create_api_token(&base, &env.admin, &["tokens:read"], None).await;
    let reg = json!({"ek_hash": ek.ek_hash(), "name": "node-7"});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/enroll/machines"))
        .bearer_auth(reader["token"].as_str().unwrap())
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let admin = create_api_token(&base, &env.admin, &["enroll:admin"], None).await;
    let admin = admin["token"].as_str().unwrap();
    let url = format!("{base}/v1/enroll/machines");
    let post_authed = |body: Value| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(admin)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        post_authed(json!({"ek_hash": "ABC", "name": "x"})).await.status(),
        400
    );
    let r = post_authed(reg.clone()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(post_authed(reg.clone()).await.status(), 409);
    let (s, p) = enroll(&base, &c).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["subject"], "node-7");
    let token = p["token"].as_str().unwrap().to_owned();
    assert_eq!(introspect(&base, &env.admin, &token).await["active"], true);
    let machines: Vec<Value> = get_authed(&base, "/v1/enroll/machines", admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0]["name"], "node-7");
    assert!(machines[0]["enrolled_at"].is_string() && machines[0]["registered_at"].is_string());

    // Revoking the machine revokes its token and refuses its EK from then on.
    let path = format!("/v1/enroll/machines/{}", ek.ek_hash());
    assert_eq!(delete_authed(&base, &path, admin).await.status(), 204);
    let i = introspect(&base, &env.admin, &token).await;
    assert_eq!(
        (i["active"].clone(), i["revoked"].clone()),
        (json!(false), json!(true)),
        "{i}"
    );
    // the signed revocation list says why (the machine was revoked)
    let list_jws = reqwest::get(format!("{base}/v1/revocations"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let set = crate::common::jwks(&base).await;
    let v = keygate::token::Verifier::new(
        &set,
        keygate::token::VerifierConfig::new(env.config.issuer(), "x"),
    )
    .unwrap();
    let list = v.verify_revocations(&list_jws).unwrap();
    assert_eq!(list.revoked.len(), 1);
    assert_eq!(list.revoked[0].reason.as_deref(), Some("machine revoked"));
    // and its AK certificate is on the CA's CRL
    let dir = env.dir.path();
    std::fs::write(dir.join("ak.pem"), p["certificate"].as_str().unwrap()).unwrap();
    let crl = reqwest::get(format!("{base}/v1/crl"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.join("crl.der"), &crl).unwrap();
    let serial =
        String::from_utf8(openssl(dir, &["x509", "-in", "ak.pem", "-noout", "-serial"]).stdout).unwrap();
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_owned();
    let text = String::from_utf8(
        openssl(
            dir,
            &["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"],
        )
        .stdout,
    )
    .unwrap();
    assert!(
        text.contains(&serial) && text.contains("Cessation Of Operation"),
        "{serial}: {text}"
    );
    refused(
        post(&base, "/v1/enroll/challenge", &challenge_body(&c, "ak")).await,
        403,
        "revoked",
    );
    assert_eq!(
        delete_authed(&base, &format!("/v1/enroll/machines/{}", "0".repeat(64)), admin)
            .await
            .status(),
        404
    );
    assert_eq!(issued(&env), before + 1);
}
for_both_stores!(allowlist_mode_needs_a_registered_ek_and_revoking_a_machine_revokes_its_tokens);
