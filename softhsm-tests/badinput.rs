//! Bad input gets a 4xx problem document and writes nothing to the store.

use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::common::Env;

async fn bad_issue_requests_get_problems_and_write_nothing(env: Env) {
    let svc = env.service().await;
    let before = env.counts().await;
    let big = format!(r#"{{"subject":"{}","audience":"a"}}"#, "x".repeat(1024 * 1024));
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "malformed JSON",
            "application/json",
            br#"{"subject":"a","#.to_vec(),
            400,
        ),
        ("not an object", "application/json", b"[1,2]".to_vec(), 400),
        (
            "unknown field",
            "application/json",
            br#"{"subject":"a","audience":"b","admin":true}"#.to_vec(),
            400,
        ),
        (
            "duplicate field",
            "application/json",
            br#"{"subject":"a","subject":"b","audience":"b"}"#.to_vec(),
            400,
        ),
        (
            "missing audience",
            "application/json",
            br#"{"subject":"a"}"#.to_vec(),
            400,
        ),
        ("1 MiB body", "application/json", big.into_bytes(), 413),
        (
            "TTL over the maximum",
            "application/json",
            br#"{"subject":"a","audience":"b","ttl_seconds":3601}"#.to_vec(),
            400,
        ),
        (
            "negative TTL",
            "application/json",
            br#"{"subject":"a","audience":"b","ttl_seconds":-1}"#.to_vec(),
            400,
        ),
        (
            "empty subject",
            "application/json",
            br#"{"subject":"","audience":"b"}"#.to_vec(),
            400,
        ),
        (
            "control character",
            "application/json",
            br#"{"subject":"a\u0000b","audience":"b"}"#.to_vec(),
            400,
        ),
        (
            "invalid UTF-8",
            "application/json",
            b"{\"subject\":\"\xff\xfe\",\"audience\":\"b\"}".to_vec(),
            400,
        ),
        (
            "bad scope",
            "application/json",
            br#"{"subject":"a","audience":"b","scopes":["a b"]}"#.to_vec(),
            400,
        ),
        (
            "bad cnf_jkt",
            "application/json",
            br#"{"subject":"a","audience":"b","cnf_jkt":"nope"}"#.to_vec(),
            400,
        ),
        (
            "wrong content type",
            "text/plain",
            br#"{"subject":"a","audience":"b"}"#.to_vec(),
            415,
        ),
        (
            "form body",
            "application/x-www-form-urlencoded",
            b"subject=a&audience=b".to_vec(),
            415,
        ),
    ];
    for (name, ct, body, status) in cases {
        let req = Request::post("/v1/tokens")
            .header(header::AUTHORIZATION, format!("Bearer {}", env.admin))
            .header(header::CONTENT_TYPE, ct)
            .body(Body::from(body))
            .unwrap();
        let res = svc.router.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{name}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json",
            "{name}"
        );
        let p: Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(p["status"], status, "{name}");
        assert!(
            p["type"].as_str().unwrap().starts_with("urn:keygate:problem:"),
            "{name}"
        );
        assert!(!p["detail"].as_str().unwrap().is_empty(), "{name}");
        assert!(
            !p.to_string().contains(&env.admin),
            "{name}: problem echoes the API token"
        );
    }
    assert_eq!(env.counts().await, before, "bad input wrote to the store");
    // a good request still works afterwards, and is recorded
    let req = Request::post("/v1/tokens")
        .header(header::AUTHORIZATION, format!("Bearer {}", env.admin))
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(r#"{"subject":"a","audience":"b","ttl_seconds":3600}"#))
        .unwrap();
    assert_eq!(svc.router.clone().oneshot(req).await.unwrap().status(), 201);
    let after = env.counts().await;
    assert_eq!((after.0 - before.0, after.2 - before.2), (1, 1));
}

on_both_backends!(
    bad_issue_requests_get_problems_and_write_nothing,
    "[tokens]\nmax_ttl_seconds = 3600"
);
