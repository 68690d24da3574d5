//! HTTP helpers of the tests: issue, revoke, introspect, authed requests, metrics, and
//! openssl in a folder.

use std::path::Path;

/// Issues a token over HTTP with `api_token`; returns the JSON answer.
pub async fn issue(base: &str, api_token: &str, body: serde_json::Value) -> serde_json::Value {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(api_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "issue failed: {}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// Fetches the JWKS over HTTP.
pub async fn jwks(base: &str) -> keygate::token::JwkSet {
    reqwest::get(format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET base+path` with a bearer API token.
pub async fn get_authed(base: &str, path: &str, api_token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(api_token)
        .send()
        .await
        .unwrap()
}

/// `DELETE base+path` with a bearer API token.
pub async fn delete_authed(base: &str, path: &str, api_token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .delete(format!("{base}{path}"))
        .bearer_auth(api_token)
        .send()
        .await
        .unwrap()
}

/// `POST /v1/tokens/{jti}/revoke` with `api_token`, and `body` as JSON when given.
pub async fn revoke(
    base: &str,
    api_token: &str,
    jti: &str,
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens/{jti}/revoke"))
        .bearer_auth(api_token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

/// RFC 7662 introspection of `token`, sent as a form (RFC 7662 §2.1).
pub async fn introspect(base: &str, api_token: &str, token: &str) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("{base}/v1/tokens/introspect"))
        .bearer_auth(api_token)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Creates an API token with `scopes` (and `ttl_seconds` if given) through the API, asserts
/// 201, and returns the answer (`id`, `token`, `expires_at`).
pub async fn create_api_token(
    base: &str,
    admin: &str,
    scopes: &[&str],
    ttl: Option<u64>,
) -> serde_json::Value {
    let mut body = serde_json::json!({"name": "test", "scopes": scopes});
    if let Some(t) = ttl {
        body["ttl_seconds"] = t.into();
    }
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/api-tokens"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// The first 1,000 audit entries (`GET /v1/audit`), read with `api_token`.
pub async fn audit_entries(base: &str, api_token: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value = get_authed(base, "/v1/audit?limit=1000", api_token)
        .await
        .json()
        .await
        .unwrap();
    page["entries"].as_array().unwrap().clone()
}

/// Runs openssl in `dir` with `args` and asserts it succeeded.
pub fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The value of one series (`name` or `name{labels}`) on `/metrics`.
pub async fn metric(base: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .parse()
        .unwrap()
}
