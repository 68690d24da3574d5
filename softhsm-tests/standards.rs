//! Standards details a stock client depends on: RFC 9449 `DPoP` challenges, RFC 9110
//! `WWW-Authenticate` syntax whatever a client sends, `cnf` in RFC 7662 introspection, and a
//! Prometheus exposition that `promtool check metrics` accepts.

use keygate::token::b64;
use serde_json::{Value, json};

use crate::common::{Env, introspect, issue};
use crate::redeem::Client;

/// One RFC 9110 §11.6.1 challenge, parsed strictly: `scheme [1*SP #auth-param]` with
/// `auth-param = token BWS "=" BWS ( token / quoted-string )`. Returns the scheme and the
/// parameters (quoted-pairs resolved), or why the header is not valid syntax.
fn parse_challenge(h: &str) -> Result<(String, Vec<(String, String)>), String> {
    fn tchar(c: char) -> bool {
        c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
    }
    let b: Vec<char> = h.chars().collect();
    let mut i = 0;
    let token = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && tchar(b[*i]) {
            *i += 1;
        }
        (s < *i).then(|| b[s..*i].iter().collect::<String>())
    };
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == ' ' || b[*i] == '\t') {
            *i += 1;
        }
    };
    let scheme = token(&mut i).ok_or("no auth-scheme")?;
    let mut params = Vec::new();
    if i == b.len() {
        return Ok((scheme, params));
    }
    if b[i] != ' ' {
        return Err(format!("byte {i}: no SP after the scheme"));
    }
    loop {
        ows(&mut i);
        let name = token(&mut i).ok_or(format!("byte {i}: no parameter name"))?;
        ows(&mut i);
        if b.get(i) != Some(&'=') {
            return Err(format!("byte {i}: no '=' after {name}"));
        }
        i += 1;
        ows(&mut i);
        let value = if b.get(i) == Some(&'"') {
            i += 1;
            let mut v = String::new();
            loop {
                match b.get(i) {
                    None => return Err(format!("{name}: unterminated quoted-string")),
                    Some('"') => break,
                    Some('\\') => {
                        let c = *b.get(i + 1).ok_or("quoted-pair at the end")?;
                        v.push(c);
                        i += 2;
                    }
                    Some(&c) if c == '\t' || (' '..='~').contains(&c) => {
                        v.push(c);
                        i += 1;
                    }
                    Some(c) => return Err(format!("{name}: {c:?} in a quoted-string")),
                }
            }
            i += 1;
            v
        } else {
            token(&mut i).ok_or(format!("byte {i}: {name} has no value"))?
        };
        params.push((name, value));
        ows(&mut i);
        match b.get(i) {
            None => return Ok((scheme, params)),
            Some(',') => i += 1,
            Some(c) => return Err(format!("byte {i}: {c:?} after a parameter")),
        }
    }
}

/// RFC 6750 §3: `error_description` is limited to %x20-21 / %x23-5B / %x5D-7E.
fn rfc6750_text(v: &str) -> bool {
    v.chars()
        .all(|c| (' '..='~').contains(&c) && c != '"' && c != '\\')
}

#[test]
fn the_challenge_parser_refuses_what_the_old_server_sent() {
    // What keygate answered before: a kid with quotes, reflected unescaped.
    let old = r#"Bearer realm="keygate", error="invalid_token", error_description="token refused: unknown kid "x"""#;
    assert!(parse_challenge(old).is_err());
    let (s, p) = parse_challenge(r#"DPoP algs="ES256", error="invalid_dpop_proof", x="a\"b""#).unwrap();
    assert_eq!(s, "DPoP");
    assert_eq!(p[2], ("x".into(), "a\"b".into()));
}

/// The one challenge of a response, parsed, as (scheme, name → value).
fn challenge_of(r: &reqwest::Response) -> (String, std::collections::HashMap<String, String>) {
    let all: Vec<_> = r.headers().get_all("www-authenticate").iter().collect();
    assert_eq!(all.len(), 1, "one WWW-Authenticate, got {all:?}");
    let h = all[0].to_str().expect("WWW-Authenticate is ASCII");
    let (scheme, params) = parse_challenge(h).unwrap_or_else(|e| panic!("{h:?} is not RFC 9110: {e}"));
    if let Some((_, d)) = params.iter().find(|(n, _)| n == "error_description") {
        assert!(rfc6750_text(d), "error_description {d:?} is not RFC 6750 text");
    }
    (scheme, params.into_iter().collect())
}

async fn redeem_raw(base: &str, token: &str, dpop: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/tokens/redeem"))
        .json(&json!({ "token": token }));
    if let Some(p) = dpop {
        r = r.header("DPoP", p);
    }
    r.send().await.unwrap()
}

async fn dpop_refusals_carry_an_rfc_9449_challenge_and_introspection_shows_cnf(env: Env) {
    let (base, _svc) = env.serve().await;
    let url = format!("{base}/v1/tokens/redeem");
    let (alice, mallory) = (Client::new(5), Client::new(6));
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "fleet", "cnf_jkt": alice.jkt()}),
    )
    .await;
    let token = t["token"].as_str().unwrap();
    // RFC 9449 §6.2: introspection of a bound token says what it is bound to.
    let i = introspect(&base, &env.admin, token).await;
    assert_eq!(i["cnf"], json!({"jkt": alice.jkt()}), "{i}");
    let plain = issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let i = introspect(&base, &env.admin, plain["token"].as_str().unwrap()).await;
    assert!(i.get("cnf").is_none(), "{i}");

    let good = alice.proof("POST", &url, 0, token, "ok-1");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing proof", None, "invalid_dpop_proof"),
        ("garbage", Some("not.a.proof".into()), "invalid_dpop_proof"),
        (
            "another URL",
            Some(alice.proof("POST", &format!("{base}/x\"y"), 0, token, "a1")),
            "invalid_dpop_proof",
        ),
        (
            "another key",
            Some(mallory.proof("POST", &url, 0, token, "m1")),
            "invalid_token",
        ),
    ];
    for (what, proof, error) in cases {
        let r = redeem_raw(&base, token, proof.as_deref()).await;
        assert_eq!(r.status(), 401, "{what}");
        let (scheme, p) = challenge_of(&r);
        assert_eq!(scheme, "DPoP", "{what}");
        assert_eq!(p["algs"], "ES256", "{what}");
        assert_eq!(p["error"], error, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            p["error_description"],
            body["detail"].as_str().unwrap().replace(['"', '\\'], "'")
        );
    }
    assert_eq!(redeem_raw(&base, token, Some(&good)).await.status(), 200);
    let r = redeem_raw(&base, token, Some(&good)).await;
    assert_eq!(r.status(), 401, "a replayed proof");
    assert_eq!(challenge_of(&r).1["error"], "invalid_dpop_proof");
}
on_both_stores!(dpop_refusals_carry_an_rfc_9449_challenge_and_introspection_shows_cnf);

/// A token whose header names a kid full of quotes, backslashes and non-ASCII, as a hostile
/// client would send it.
fn token_with_kid(kid: &str) -> String {
    let header = json!({"alg": "ES256", "typ": "provisioning+jwt", "kid": kid});
    let claims = json!({"sub": "x", "iss": "x", "aud": "x", "exp": 4_000_000_000i64});
    format!(
        "{}.{}.{}",
        b64::encode(header.to_string()),
        b64::encode(claims.to_string()),
        b64::encode([7u8; 64])
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reflected_values_keep_www_authenticate_valid() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    for kid in ["x\"", "a\\\"b", "\"", "k\u{e9}y \u{1f511}", "tab\there"] {
        let r = redeem_raw(&base, &token_with_kid(kid), None).await;
        assert_eq!(r.status(), 401, "kid {kid:?}");
        let (scheme, p) = challenge_of(&r);
        assert_eq!(scheme, "Bearer");
        assert_eq!(p["error"], "invalid_token");
        assert!(p["error_description"].contains("kid"), "{p:?}");
    }
    // An API token that is not one: the Bearer challenge of the operator endpoints.
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/keys"))
        .header("Authorization", "Bearer kg_\"quoted\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (scheme, p) = challenge_of(&r);
    assert_eq!((scheme.as_str(), p["realm"].as_str()), ("Bearer", "keygate"));
}

/// `promtool check metrics` (Prometheus' own linter) accepts `/metrics` once every kind of
/// series has a value: issued, redeemed, revoked, refused.
#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_metrics() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let t = issue(&base, &env.admin, json!({"subject": "n", "audience": "fleet"})).await;
    let token = t["token"].as_str().unwrap();
    assert_eq!(redeem_raw(&base, token, None).await.status(), 200);
    let jti = t["jti"].as_str().unwrap();
    let r = crate::common::revoke(&base, &env.admin, jti, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(redeem_raw(&base, "nonsense", None).await.status(), 401);
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "keygate_tokens_issued_total",
        "keygate_tokens_redeemed_total",
        "keygate_tokens_revoked_total",
        "keygate_requests_failed_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (softhsm-tests/install-deps.sh installs it)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
