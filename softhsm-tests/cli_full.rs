//! The CLI covers the API: token revoke|introspect|redeem|inspect, api-token, machines,
//! audit list, keys list with its schedule, config check, verify through OIDC discovery,
//! `--server` without a scheme, completions and man pages. Each against a live server, with
//! the real binary.

use std::process::Output;

use serde_json::Value;

use crate::common::{Env, openssl};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// Exit 1 and one line on stderr that contains `needle`.
fn refused(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let l = stderr(o);
    assert_eq!(l.lines().count(), 1, "{l}");
    assert!(l.contains(needle), "{l:?} lacks {needle:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_covers_tokens_from_issue_to_revocation() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    // host:port alone: http on loopback
    let bare = base.trim_start_matches("http://").to_owned();
    let kg = |args: &[&str]| {
        env.keygate()
            .env("KEYGATE_TOKEN", &env.admin)
            .args(args)
            .output()
            .unwrap()
    };
    let dir = env.dir.path();
    // a client key for DPoP, and a CSR for a certificate, made by openssl
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "client.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "client.key",
            "-subj",
            "/CN=ignored",
            "-out",
            "client.csr",
        ],
    );
    let key = dir.join("client.key");
    let out = kg(&[
        "token",
        "issue",
        "--server",
        &bare,
        "--subject",
        "node-3",
        "--audience",
        "fleet",
        "--one-time",
        "--dpop-key",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_owned();

    // inspect: offline, unverified, says so
    let out = kg(&["token", "inspect", &token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(seen["header"]["alg"], "ES256");
    assert_eq!(seen["claims"]["sub"], "node-3");
    assert!(seen["claims"]["cnf"]["jkt"].is_string());
    assert!(seen["times"]["exp"].as_str().unwrap().ends_with('Z'));
    assert!(stderr(&out).contains("NOT verified"));
    refused(&kg(&["token", "inspect", "a.b"]), "not a compact JWS");

    // introspect: active, bound (exit 0)
    let out = kg(&["token", "introspect", "--server", &bare, &token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let i: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(i["active"], true);
    assert_eq!(i["cnf"]["jkt"], seen["claims"]["cnf"]["jkt"]);

    // redeem: without the key the server refuses (one line); with it, a certificate
    refused(
        &kg(&["token", "redeem", "--server", &bare, &token]),
        "401 Unauthorized: DPoP proof missing",
    );
    let chain = dir.join("chain.pem");
    let out = kg(&[
        "token",
        "redeem",
        "--server",
        &bare,
        "--dpop-key",
        key.to_str().unwrap(),
        "--csr",
        dir.join("client.csr").to_str().unwrap(),
        "--cert-out",
        chain.to_str().unwrap(),
        &token,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text =
        String::from_utf8(openssl(dir, &["x509", "-in", "chain.pem", "-noout", "-subject"]).stdout).unwrap();
    assert!(text.contains("node-3"), "{text}");
    // once only
    refused(
        &kg(&[
            "token",
            "redeem",
            "--server",
            &bare,
            "--dpop-key",
            key.to_str().unwrap(),
            &token,
        ]),
        "409 Conflict",
    );

    // revoke with a reason, then introspection says inactive (exit 1)
    let jti = seen["claims"]["jti"].as_str().unwrap();
    let out = kg(&[
        "token",
        "revoke",
        "--server",
        &bare,
        jti,
        "--reason",
        "host decommissioned",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked at"));
    let out = kg(&["token", "introspect", "--server", &bare, &token]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()["revoked"],
        true
    );

    // a server address that is not one: the reason, in one line
    refused(&kg(&["keys", "list", "--server", "ftp://x"]), "not http or https");
    refused(&kg(&["keys", "list", "--server", "a b:1"]), "is not a URL");
    // a jti cannot steer the request elsewhere (the URL parser reads \ as / and resolves ..)
    refused(
        &kg(&["token", "revoke", "--server", &bare, "..\\keys\\rotate#"]),
        "is not a jti",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_manages_api_tokens_machines_audit_and_keys() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let kg = |args: &[&str]| {
        env.keygate()
            .env("KEYGATE_TOKEN", &env.admin)
            .env("KEYGATE_ADDR", &base)
            .args(args)
            .output()
            .unwrap()
    };
    let out = kg(&["api-token", "create", "--name", "ci", "--scope", "tokens:issue"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out).trim().to_owned();
    assert!(secret.starts_with("kg_"));
    let out = kg(&["api-token", "list"]);
    let listed = stdout(&out);
    let row = listed
        .lines()
        .find(|l| l.contains(" ci "))
        .expect("the new token is listed");
    assert!(
        row.contains("tokens:issue") && !listed.contains(&secret),
        "{listed}"
    );
    let id = row.split_whitespace().next().unwrap();
    assert!(kg(&["api-token", "delete", id]).status.success());
    assert!(!stdout(&kg(&["api-token", "list"])).contains(" ci "));
    refused(&kg(&["api-token", "delete", "../keys"]), "is not an API token id");

    let ek = "ab".repeat(32);
    let out = kg(&["machines", "add", "--ek-hash", &ek, "--name", "rack-4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&kg(&["machines", "list"]));
    assert!(listed.contains(&ek) && listed.contains("rack-4"), "{listed}");
    assert!(kg(&["machines", "revoke", &ek]).status.success());
    let list: Vec<Value> = serde_json::from_str(&stdout(&kg(&["machines", "list", "--json"]))).unwrap();
    assert!(list[0]["revoked_at"].is_string());
    refused(&kg(&["machines", "revoke", "XYZ"]), "is not an EK hash");

    let out = kg(&["audit", "list", "--limit", "1000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stdout(&out);
    for action in [
        "api_token.create",
        "api_token.delete",
        "enroll.machine.register",
        "enroll.machine.revoke",
    ] {
        assert!(log.contains(action), "{action} not in {log}");
    }
    // a usage error is clap's: exit 2 and the reason
    let out = kg(&["audit", "list", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("0 is not in 1..=1000"), "{}", stderr(&out));

    let out = kg(&["keys", "list"]);
    let text = stdout(&out);
    assert!(text.starts_with("KID") && text.contains("ACTIVATE_AT") && text.contains("RETIRE_AT"));
    assert!(text.contains(&env.kid) && text.contains("active"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_the_jwks_through_discovery_and_config_check_reports() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let iss = env.config.issuer();
    let out = env
        .keygate()
        .env("KEYGATE_TOKEN", &env.admin)
        .args([
            "token",
            "issue",
            "--server",
            &base,
            "--subject",
            "s",
            "--audience",
            "fleet",
        ])
        .output()
        .unwrap();
    let token = stdout(&out).trim().to_owned();
    // no --jwks: discovery from the issuer URL
    let out = env
        .keygate()
        .args(["verify", "--issuer", &iss, "--audience", "fleet", &token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env
        .keygate()
        .args(["verify", "--issuer", "urn:x", "--audience", "fleet", &token])
        .output()
        .unwrap();
    refused(&out, "pass --jwks");

    // config check: what serve would use, no secret; a bad file is one line
    let out = env.keygate().args(["config", "check"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("PKCS#11 module") && text.contains("configuration is valid"),
        "{text}"
    );
    assert!(!text.contains(&env.user_pin), "{text}");
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "[tokens]\ndefault_ttl_seconds = 0\n").unwrap();
    let out = env
        .keygate()
        .args(["config", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    refused(&out, "TTLs must be positive");
    let odd = env.dir.path().join("odd.toml");
    std::fs::write(
        &odd,
        "issuer = \"https://keygate.example.com\"\nlisten = \"0.0.0.0:9\"\n",
    )
    .unwrap();
    let out = env
        .keygate()
        .args(["config", "check", odd.to_str().unwrap()])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("warning: plain HTTP on 0.0.0.0:9"), "{text}");
    assert!(
        text.contains("will not find /.well-known/openid-configuration"),
        "{text}"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let kg = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .env_remove("KEYGATE_CONFIG")
            .args(args)
            .output()
            .unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let out = kg(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = stdout(&out);
        assert!(
            text.contains("api-token") && text.contains("introspect"),
            "{shell}"
        );
    }
    // bash accepts the script
    let script = stdout(&kg(&["completions", "bash"]));
    let check = std::process::Command::new("bash")
        .args(["-n", "-c", &script])
        .status()
        .unwrap();
    assert!(check.success());
    let dir = tempfile::tempdir().unwrap();
    let out = kg(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = std::fs::read_to_string(dir.path().join("keygate.1")).unwrap();
    assert!(
        page.contains(".TH keygate") && page.contains("api\\-token"),
        "{page}"
    );
    assert!(dir.path().join("keygate-token-redeem.1").exists());
}
