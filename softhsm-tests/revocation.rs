//! Revocation: the endpoint, introspection, the signed list, and offline verification.

use keygate::token::{Verifier, VerifierConfig, VerifyError, jws};
use serde_json::{Value, json};

use crate::common::{Env, create_api_token, introspect, issue, jwks, metric, revoke};

pub(crate) async fn revocations(base: &str, query: &str) -> reqwest::Response {
    reqwest::get(format!("{base}/v1/revocations{query}"))
        .await
        .unwrap()
}

async fn revoked_tokens_are_refused_by_introspection_the_list_and_offline_verifiers(env: Env) {
    let (base, _svc) = env.serve().await;
    let a = issue(&base, &env.admin, json!({"subject": "a", "audience": "fleet"})).await;
    let b = issue(&base, &env.admin, json!({"subject": "b", "audience": "fleet"})).await;
    let (ta, ja) = (a["token"].as_str().unwrap(), a["jti"].as_str().unwrap());
    let (tb, jb) = (b["token"].as_str().unwrap(), b["jti"].as_str().unwrap());

    let audit_before = env.counts().await.2;
    let r = revoke(&base, &env.admin, ja, Some(json!({"reason": "key compromised"}))).await;
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["jti"], ja);
    assert_eq!(
        env.counts().await.2,
        audit_before + 1,
        "the revocation is audited"
    );
    // idempotent: the same answer, whatever the body
    let again: Value = revoke(&base, &env.admin, ja, None).await.json().await.unwrap();
    assert_eq!(again["revoked_at"], first["revoked_at"]);
    // unknown token, missing scope, bad body
    assert_eq!(revoke(&base, &env.admin, "no-such-jti", None).await.status(), 404);
    let issuer = create_api_token(&base, &env.admin, &["tokens:issue"], None).await;
    assert_eq!(
        revoke(&base, issuer["token"].as_str().unwrap(), jb, None)
            .await
            .status(),
        403
    );
    assert_eq!(
        revoke(&base, &env.admin, jb, Some(json!({"reason": 7})))
            .await
            .status(),
        400
    );
    assert_eq!(
        revoke(&base, &env.admin, jb, Some(json!({"why": "x"})))
            .await
            .status(),
        400
    );

    // introspection says so at once
    let i = introspect(&base, &env.admin, ta).await;
    assert_eq!(
        (i["active"].as_bool(), i["revoked"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!(introspect(&base, &env.admin, tb).await["active"], true);

    // the signed list names it, and only it; ?after= gives only newer ones
    let r = revocations(&base, "").await;
    assert_eq!(r.headers()["content-type"], "application/jwt");
    let list_jws = r.text().await.unwrap();
    let parts = jws::parse(&list_jws).unwrap();
    assert_eq!(parts.header.typ.as_deref(), Some("revocations+jwt"));
    let set = jwks(&base).await;
    let v = Verifier::new(&set, VerifierConfig::new(env.config.issuer(), "fleet")).unwrap();
    let list = v.verify_revocations(&list_jws).unwrap();
    assert_eq!(list.revoked.len(), 1);
    assert_eq!(list.revoked[0].jti, ja);
    assert!(list.seq >= 1);
    let newer = v
        .verify_revocations(
            &revocations(&base, &format!("?after={}", list.seq))
                .await
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
    assert!(newer.revoked.is_empty());
    assert_eq!(revocations(&base, "?after=-1").await.status(), 400);
    assert_eq!(revocations(&base, "?bogus=1").await.status(), 400);
    // a list is not a token, and a token is not a list
    assert!(matches!(v.verify(&list_jws), Err(VerifyError::Type { .. })));
    assert!(matches!(v.verify_revocations(tb), Err(VerifyError::Type { .. })));

    // offline: the library and the CLI refuse the revoked token and accept the other
    assert!(matches!(
        v.verify_not_revoked(ta, &list),
        Err(VerifyError::Revoked(_))
    ));
    v.verify_not_revoked(tb, &list).unwrap();
    let file = env.dir.path().join("revocations.jwt");
    std::fs::write(&file, &list_jws).unwrap();
    let jwks_url = format!("{base}/.well-known/jwks.json");
    let iss = env.config.issuer();
    for (token, src, ok) in [
        (ta, format!("{base}/v1/revocations"), false),
        (ta, file.display().to_string(), false),
        (tb, file.display().to_string(), true),
    ] {
        let out = env
            .keygate()
            .args([
                "verify",
                "--jwks",
                &jwks_url,
                "--issuer",
                &iss,
                "--audience",
                "fleet",
                "--revocations",
                &src,
                token,
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            ok,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !ok {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.trim().lines().count() == 1 && err.contains("invalid token: token revoked at"),
                "{err}"
            );
        }
    }
    assert!(metric(&base, "keygate_tokens_revoked_total").await > 0.0);
    let audit = crate::common::audit_entries(&base, &env.admin).await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "token.revoke" && e["target"] == ja)
    );
}
on_both_stores!(revoked_tokens_are_refused_by_introspection_the_list_and_offline_verifiers);
