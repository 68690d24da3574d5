//! Operator API tokens: none 401, unknown 401, wrong scope 403, expired 401, deleted 401 at
//! once; refusals are audited; secrets are stored only hashed.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Env, create_api_token, delete_authed, get_authed};

async fn post_issue(base: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .json(&json!({"subject": "s", "audience": "a"}));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

fn assert_problem(r: &reqwest::Response, status: u16) {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

async fn credentials_are_checked_and_refusals_audited(env: Env) {
    let (base, _svc) = env.serve().await;

    let r = post_issue(&base, None).await;
    assert_problem(&r, 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );

    let audit_before = env.counts().await.2;
    let unknown = format!("kg_{}", "A".repeat(43));
    for t in [unknown.as_str(), "kg_short", "not-even-close"] {
        let r = post_issue(&base, Some(t)).await;
        assert_problem(&r, 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
    }
    // three refusals of one kind (same outcome, same source): the first is an entry at
    // once, the repeats are summed into one entry when the window ends
    // (hostile::repeated_refusals_without_a_credential_become_one_summary)
    assert_eq!(
        env.counts().await.2 - audit_before,
        1,
        "the first refused credential is audited at once"
    );

    // wrong scope
    let reader = create_api_token(&base, &env.admin, &["keys:read"], None).await;
    let reader_secret = reader["token"].as_str().unwrap();
    assert!(reader_secret.starts_with("kg_") && reader_secret.len() >= 3 + 43);
    let r = post_issue(&base, Some(reader_secret)).await;
    assert_problem(&r, 403);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope")
    );
    let r = get_authed(&base, "/v1/keys", reader_secret).await;
    assert_eq!(r.status(), 200);
    // admin-only endpoints refuse a non-admin
    let r = get_authed(&base, "/v1/api-tokens", reader_secret).await;
    assert_problem(&r, 403);

    // an issuer token works
    let issuer = create_api_token(&base, &env.admin, &["tokens:issue"], None).await;
    assert_eq!(post_issue(&base, issuer["token"].as_str()).await.status(), 201);

    // expired
    let short = create_api_token(&base, &env.admin, &["tokens:issue"], Some(1)).await;
    assert_eq!(post_issue(&base, short["token"].as_str()).await.status(), 201);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = post_issue(&base, short["token"].as_str()).await;
    assert_problem(&r, 401);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["detail"], "token expired");

    // deleted: refused on the very next request
    let id = issuer["id"].as_str().unwrap();
    let r = delete_authed(&base, &format!("/v1/api-tokens/{id}"), &env.admin).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_problem(&post_issue(&base, issuer["token"].as_str()).await, 401);
    let audit_before = env.counts().await.2;
    let r = delete_authed(&base, &format!("/v1/api-tokens/{id}"), &env.admin).await;
    assert_problem(&r, 404);
    // deleting a token that is not there changes nothing, so nothing is audited
    assert_eq!(
        env.counts().await.2,
        audit_before,
        "a 404 delete must leave no audit entry"
    );

    // the list shows no secrets; the database holds only hashes
    let list: Value = get_authed(&base, "/v1/api-tokens", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    let text = list.to_string();
    assert!(!text.contains("kg_"), "{text}");
    assert!(list.as_array().unwrap().iter().all(|t| t.get("token").is_none()));
    let dump = env.dump().await;
    assert!(dump.len() > 1000, "the dump must hold the rows");
    for secret in [env.admin.as_str(), reader_secret] {
        for needle in [secret.as_bytes().to_vec(), hex::encode(secret).into_bytes()] {
            assert!(
                !dump.windows(needle.len()).any(|w| w == needle.as_slice()),
                "secret stored in the database"
            );
        }
    }
}

on_both_backends!(credentials_are_checked_and_refusals_audited);

async fn api_token_requests_are_validated(env: Env) {
    let (base, _svc) = env.serve().await;
    let c = reqwest::Client::new();
    for body in [
        json!({"name": "x", "scopes": []}),
        json!({"name": "x", "scopes": ["tokens:*"]}),
        json!({"name": "", "scopes": ["admin"]}),
        json!({"name": "x", "scopes": ["admin"], "ttl_seconds": 0}),
        json!({"name": "x", "scopes": ["admin"], "ttl_seconds": 10_000_000_000u64}),
    ] {
        let r = c
            .post(format!("{base}/v1/api-tokens"))
            .bearer_auth(&env.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(&r, 400);
    }
}

on_both_backends!(api_token_requests_are_validated);
