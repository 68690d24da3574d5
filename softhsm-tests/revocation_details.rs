//! What a revocation says: the reason given, in the signed list and the event stream; the
//! list's issue and next-update times; a stale list refused by the verifier and the CLI.

use std::time::Duration;

use keygate::token::{Verifier, VerifierConfig, VerifyError};
use serde_json::json;

use crate::common::{Env, issue, jwks, revoke};
use crate::stream::SseClient;

async fn list(base: &str) -> String {
    crate::revocation::revocations(base, "")
        .await
        .text()
        .await
        .unwrap()
}

async fn reasons_reach_the_list_and_the_stream_and_the_list_says_when_it_goes_stale(env: Env) {
    let (base, _svc) = env.serve().await;
    let a = issue(&base, &env.admin, json!({"subject": "a", "audience": "fleet"})).await;
    let b = issue(&base, &env.admin, json!({"subject": "b", "audience": "fleet"})).await;
    let mut live = SseClient::connect(&base, None).await;
    let r = revoke(
        &base,
        &env.admin,
        a["jti"].as_str().unwrap(),
        Some(json!({"reason": "key compromised"})),
    );
    assert_eq!(r.await.status(), 200);
    assert_eq!(
        revoke(&base, &env.admin, b["jti"].as_str().unwrap(), None)
            .await
            .status(),
        200
    );
    let first = live.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(first.data["jti"], a["jti"]);
    assert_eq!(first.data["reason"], "key compromised");
    assert!(first.data["revoked_at"].as_i64().unwrap() > 0);
    let second = live.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(second.data["jti"], b["jti"]);
    assert!(second.data.get("reason").is_none(), "{:?}", second.data);

    let set = jwks(&base).await;
    let v = Verifier::new(&set, VerifierConfig::new(env.config.issuer(), "fleet")).unwrap();
    let jws = list(&base).await;
    let l = v.verify_revocations(&jws).unwrap();
    assert_eq!(l.revoked[0].reason.as_deref(), Some("key compromised"));
    assert_eq!(l.revoked[1].reason, None);
    let now = keygate::authority::now();
    assert!((now - 5..=now).contains(&l.iat), "iat {}", l.iat);
    assert_eq!(
        l.next_update,
        l.iat + 300,
        "the default revocation_list_ttl_seconds"
    );
    assert_eq!(l.exp, l.next_update);
    // past its next update (and the 5 s leeway) the list is refused as stale
    v.verify_revocations_at(&jws, l.next_update + 5).unwrap();
    assert!(matches!(
        v.verify_revocations_at(&jws, l.next_update + 6),
        Err(VerifyError::StaleRevocations(t)) if t == l.next_update
    ));
}
on_both_stores!(reasons_reach_the_list_and_the_stream_and_the_list_says_when_it_goes_stale);

#[tokio::test(flavor = "multi_thread")]
async fn keygate_verify_refuses_a_stale_revocation_list() {
    let env = Env::with_toml("[tokens]\nrevocation_list_ttl_seconds = 1\n").await;
    let (base, _svc) = env.serve().await;
    let t = issue(&base, &env.admin, json!({"subject": "a", "audience": "fleet"})).await;
    let file = env.dir.path().join("revocations.jwt");
    std::fs::write(&file, list(&base).await).unwrap();
    let jwks_url = format!("{base}/.well-known/jwks.json");
    let iss = env.config.issuer();
    let verify = |leeway: &str| {
        env.keygate()
            .args([
                "verify",
                "--jwks",
                &jwks_url,
                "--issuer",
                &iss,
                "--audience",
                "fleet",
                "--leeway",
                leeway,
                "--revocations",
                file.to_str().unwrap(),
                t["token"].as_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    assert!(verify("0").status.success(), "a fresh list is used");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = verify("0");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().lines().count() == 1 && err.contains("revocation list is stale"),
        "{err}"
    );
    // a larger leeway still takes it (the clocks of issuer and instance differ)
    assert!(verify("60").status.success());
}
