//! `keygate token issue`, `keygate keys list` and `keygate verify` against a live server.

use std::process::Output;

use crate::common::Env;

fn line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_issues_lists_and_verifies() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let iss = env.config.issuer();
    let jwks_url = format!("{base}/.well-known/jwks.json");
    let kg = |args: &[&str]| {
        env.keygate()
            .env("KEYGATE_TOKEN", &env.admin)
            .args(args)
            .output()
            .unwrap()
    };

    let out = kg(&[
        "token",
        "issue",
        "--server",
        &base,
        "--subject",
        "node-9",
        "--audience",
        "fleet",
        "--scope",
        "provision",
        "--ttl",
        "120",
    ]);
    assert!(out.status.success(), "{}", line(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3);

    let out = kg(&["keys", "list", "--server", &base]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&env.kid) && text.contains("active") && text.contains("pkcs11:"),
        "{text}"
    );

    // verify: by URL, by file, from stdin
    let out = kg(&[
        "verify",
        "--jwks",
        &jwks_url,
        "--issuer",
        &iss,
        "--audience",
        "fleet",
        &token,
    ]);
    assert!(out.status.success(), "{}", line(&out));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["sub"], "node-9");
    let file = env.dir.path().join("jwks.json");
    std::fs::write(
        &file,
        reqwest::get(&jwks_url).await.unwrap().text().await.unwrap(),
    )
    .unwrap();
    let out = kg(&[
        "verify",
        "--jwks",
        file.to_str().unwrap(),
        "--issuer",
        &iss,
        "--audience",
        "fleet",
        &token,
    ]);
    assert!(out.status.success());
    let mut child = env
        .keygate()
        .args([
            "verify",
            "--jwks",
            file.to_str().unwrap(),
            "--issuer",
            &iss,
            "--audience",
            "fleet",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // failures: exit 1 and one line naming the reason
    let mut tampered = token.clone();
    tampered.insert(tampered.find('.').unwrap() + 3, 'x');
    // (jwks, issuer, audience, token) -> the reason the one line must name
    let cases = [
        (
            jwks_url.as_str(),
            iss.as_str(),
            "other",
            token.as_str(),
            "audience does not include \"other\"",
        ),
        (&jwks_url, &iss, "fleet", &tampered, "invalid token"),
        (&jwks_url, &iss, "fleet", "garbage", "malformed token"),
        (&jwks_url, "https://other", "fleet", &token, "issuer \"http"),
        (
            "/nonexistent.json",
            &iss,
            "fleet",
            &token,
            "cannot read JWKS file",
        ),
    ];
    for (jwks, issuer, audience, t, reason) in cases {
        let out = kg(&[
            "verify",
            "--jwks",
            jwks,
            "--issuer",
            issuer,
            "--audience",
            audience,
            t,
        ]);
        assert_eq!(out.status.code(), Some(1), "{reason}");
        let l = line(&out);
        assert_eq!(l.lines().count(), 1, "{l}");
        assert!(l.contains(reason), "{l}");
    }

    // the server's refusal reaches the CLI user as one line
    let out = kg(&[
        "token",
        "issue",
        "--server",
        &base,
        "--subject",
        "n",
        "--audience",
        "a",
        "--ttl",
        "999999999",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        line(&out).contains("400 Invalid request: ttl_seconds 999999999 exceeds the maximum"),
        "{}",
        line(&out)
    );
    let out = env
        .keygate()
        .env_remove("KEYGATE_TOKEN")
        .args([
            "token",
            "issue",
            "--server",
            &base,
            "--subject",
            "n",
            "--audience",
            "a",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(line(&out).contains("KEYGATE_TOKEN"));
}
