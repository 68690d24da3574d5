//! The real binary: clear startup failures, restarts that keep the key, repeated init, the
//! embedded defaults, and no secret in any log.

use std::process::{Command, Stdio};

use keygate::token::{Verifier, VerifierConfig};
use serde_json::json;

use crate::common::{
    Env, SO_PIN, Server, create_api_token, free_port, get_authed, introspect, issue, jwks, softhsm_conf,
};

/// Runs `keygate serve` with `toml` and returns (exit success, stderr).
fn serve_with(env: &Env, toml: &str) -> (bool, String) {
    let path = env.dir.path().join("broken.toml");
    std::fs::write(&path, toml).unwrap();
    let out = env
        .keygate()
        .env("KEYGATE_CONFIG", &path)
        .arg("serve")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pkcs11_toml(env: &Env, module: &str, label: &str, pin_file: &std::path::Path) -> String {
    format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\n[pkcs11]\nmodule = \"{module}\"\ntoken_label = \"{label}\"\npin = {{ file = \"{}\" }}\n",
        env.dir.path().display(),
        free_port(),
        pin_file.display()
    )
}

fn assert_one_line(ok: bool, stderr: &str, needle: &str) {
    assert!(!ok, "serve should fail");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].starts_with("keygate: error:") && lines[0].contains(needle),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_fails_with_one_clear_line() {
    let env = Env::new().await;
    let label = env.config.pkcs11.as_ref().unwrap().token_label.clone().unwrap();
    let module = keygate::config::SOFTHSM2_MODULE;
    let good_pin = env.dir.path().join("user.pin");
    let wrong_pin = env.dir.path().join("wrong.pin");
    std::fs::write(&wrong_pin, "not-the-pin").unwrap();

    let (ok, err) = serve_with(&env, &pkcs11_toml(&env, module, &label, &wrong_pin));
    assert_one_line(ok, &err, "CKR_PIN_INCORRECT");
    let (ok, err) = serve_with(
        &env,
        &pkcs11_toml(&env, "/nonexistent/libpkcs11.so", &label, &good_pin),
    );
    assert_one_line(ok, &err, "cannot load PKCS#11 module /nonexistent/libpkcs11.so");
    let (ok, err) = serve_with(&env, &pkcs11_toml(&env, module, "no-such-token", &good_pin));
    assert_one_line(ok, &err, "no PKCS#11 token with label \"no-such-token\"");
    let (ok, err) = serve_with(
        &env,
        &pkcs11_toml(&env, module, &label, &env.dir.path().join("missing.pin")),
    );
    assert_one_line(ok, &err, "cannot read PIN file");
    let (ok, err) = serve_with(&env, "listen = \"127.0.0.1:1\"\nbogus = 1\n");
    assert_one_line(ok, &err, "bogus");
    // the PIN itself is never in the message
    assert!(!err.contains(&env.user_pin));
    // a PIN typed into the file by mistake is not repeated in the error
    let typed = pkcs11_toml(&env, module, &label, &good_pin).replace(
        &format!("pin = {{ file = \"{}\" }}", good_pin.display()),
        &format!("pin = \"{}\"", env.user_pin),
    );
    let (ok, err) = serve_with(&env, &typed);
    assert_one_line(ok, &err, "line 6: unknown variant (value not shown)");
    assert!(!err.contains(&env.user_pin), "{err}");
    // a configured device on a data folder that was never initialised: say what to do
    let fresh = env.dir.path().join("fresh");
    let toml = pkcs11_toml(&env, module, &label, &good_pin).replace(
        &format!("data_dir = \"{}\"", env.dir.path().display()),
        &format!("data_dir = \"{}\"", fresh.display()),
    );
    let (ok, err) = serve_with(&env, &toml);
    assert_one_line(ok, &err, "run `keygate init` first");
    assert!(!fresh.join("keygate.db").exists(), "serve created a database");
    // the same for a TPM backend (it said "unable to open database file")
    let tpm = format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\nbackend = \"tpm\"\n[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
        fresh.display(),
        free_port()
    );
    let (ok, err) = serve_with(&env, &tpm);
    assert_one_line(ok, &err, "run `keygate init` first");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_key_jwks_and_earlier_tokens() {
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    let jwks1 = jwks(&base).await;
    let tokens: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let out = issue(
                &base,
                &env.admin,
                json!({"subject": format!("n{i}"), "audience": "fleet"}),
            )
            .await;
            v.push(out["token"].as_str().unwrap().to_owned());
        }
        v
    };
    server.stop();
    let _server = Server::start(&env, &log, &[]).await;
    let jwks2 = jwks(&base).await;
    assert_eq!(jwks1, jwks2, "same key, same JWKS after restart");
    let v = Verifier::new(&jwks2, VerifierConfig::new(env.config.issuer(), "fleet")).unwrap();
    for t in &tokens {
        v.verify(t).unwrap();
        assert_eq!(introspect(&base, &env.admin, t).await["active"], true);
    }
    let out = issue(
        &base,
        &env.admin,
        json!({"subject": "after", "audience": "fleet"}),
    )
    .await;
    assert_eq!(out["kid"], env.kid.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn second_init_keeps_the_key_and_mints_an_admin_token_only_when_asked() {
    let env = Env::new().await;
    let out = env.keygate().arg("init").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!stdout.contains("KEYGATE_ADMIN_TOKEN"), "{stdout}");
    assert!(
        stderr.contains(&format!("kept signing key {}", env.kid)),
        "{stderr}"
    );
    assert!(stderr.contains("--new-admin-token"), "{stderr}");

    let out = env
        .keygate()
        .args(["init", "--new-admin-token"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1);
    let token = lines[0].strip_prefix("KEYGATE_ADMIN_TOKEN=").unwrap().to_owned();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&token),
        "token printed to stderr too"
    );
    let log = env.dir.path().join("serve.log");
    let _server = Server::start(&env, &log, &[]).await;
    let out = issue(&env.base_url(), &token, json!({"subject": "s", "audience": "a"})).await;
    assert_eq!(out["kid"], env.kid.as_str(), "the key was kept");

    // Another process appends to the audit log while the server runs; the server's next
    // writes must still succeed and the chain stay whole.
    let out = env
        .keygate()
        .args(["init", "--new-admin-token"])
        .output()
        .unwrap();
    assert!(out.status.success());
    for t in [token.as_str(), env.admin.as_str()] {
        issue(
            &env.base_url(),
            t,
            json!({"subject": "after-other-writer", "audience": "a"}),
        )
        .await;
    }
    let url = format!("sqlite://{}", env.dir.path().join("keygate.db").display());
    let store = keygate::store::Store::open_url(&url).await.unwrap();
    let entries = store.audit_entries(0, 100_000).await.unwrap();
    assert!(entries.len() >= 6, "{} entries", entries.len());
    assert_eq!(
        keygate::audit::first_broken(&entries, None),
        None,
        "audit chain broken"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_defaults_initialise_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let log = dir.path().join("serve.log");
    // umask 0: keygate's files must be private whatever the umask it is started with
    let child = Command::new("sh")
        .args([
            "-c",
            "umask 0 && exec \"$0\" serve",
            env!("CARGO_BIN_EXE_keygate"),
        ])
        .current_dir(dir.path())
        .env_remove("KEYGATE_CONFIG")
        .env("KEYGATE_DATA_DIR", &data)
        .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
        // enrollment set up with a CA folder that is missing: one warning, though the
        // first start loads the settings twice (init, then serve)
        .env("KEYGATE_ENROLL_CA_DIR", dir.path().join("no-such-ca"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut child = child;
    crate::common::signal(&child, libc::SIGTERM);
    crate::common::wait_deadline(&mut child, 30);
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(ready, "embedded serve never became ready: {logs}");
    assert!(stdout.starts_with("KEYGATE_ADMIN_TOKEN=kg_"), "{stdout}");
    for f in ["softhsm2.conf", "user.pin", "keygate.db"] {
        assert!(data.join(f).exists(), "{f} missing");
    }
    // the SO PIN served its purpose (initialising the token) and is not kept
    assert!(!data.join("so.pin").exists(), "the SO PIN was left on disk");
    // every file 0600 and every folder 0700, the database's WAL and the token's files too
    let mut seen = 0;
    let mut todo = vec![data.clone()];
    while let Some(p) = todo.pop() {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} entries in the data folder");
    assert!(
        logs.contains("SoftHSM2, a software simulator"),
        "startup warns about the simulator"
    );
    assert_eq!(logs.matches("no TPM manufacturer CA folder").count(), 1, "{logs}");
    // the token folder of the embedded SoftHSM2 is under the data folder
    assert!(std::fs::read_dir(data.join("softhsm-tokens")).unwrap().count() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_appears_in_the_logs() {
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[("KEYGATE_LOG", "debug")]).await;
    let base = env.base_url();
    let mut secrets = vec![env.admin.clone(), env.user_pin.clone(), SO_PIN.to_owned()];
    let created = create_api_token(&base, &env.admin, &["tokens:issue", "tokens:read"], None).await;
    let ops = created["token"].as_str().unwrap().to_owned();
    secrets.push(ops.clone());
    for i in 0..5 {
        let out = issue(
            &base,
            &ops,
            json!({"subject": format!("n{i}"), "audience": "fleet", "one_time": true}),
        )
        .await;
        let t = out["token"].as_str().unwrap().to_owned();
        introspect(&base, &ops, &t).await;
        secrets.push(t.rsplit('.').next().unwrap().to_owned());
        secrets.push(t);
    }
    let wrong = format!("kg_{}", "Z".repeat(43));
    assert_eq!(get_authed(&base, "/v1/keys", &wrong).await.status(), 401);
    secrets.push(wrong);
    // the CLI as a client, and a second init printing a new admin token
    let out = env
        .keygate()
        .env("KEYGATE_TOKEN", &ops)
        .env("KEYGATE_LOG", "debug")
        .args([
            "token",
            "issue",
            "--server",
            &base,
            "--subject",
            "cli",
            "--audience",
            "fleet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    secrets.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let cli_log = String::from_utf8_lossy(&out.stderr).into_owned();
    let init = env
        .keygate()
        .env("KEYGATE_LOG", "debug")
        .args(["init", "--new-admin-token"])
        .output()
        .unwrap();
    let new_admin = String::from_utf8_lossy(&init.stdout)
        .trim()
        .trim_start_matches("KEYGATE_ADMIN_TOKEN=")
        .to_owned();
    assert!(new_admin.starts_with("kg_"));
    secrets.push(new_admin);
    let init_log = String::from_utf8_lossy(&init.stderr).into_owned();
    server.stop();

    let logs = format!(
        "{}\n{cli_log}\n{init_log}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        logs.contains("answered"),
        "the test must actually see request logs"
    );
    // enrollment is not set up here: not a word about TPM manufacturer CAs, even at debug
    assert!(!logs.contains("WARN keygate::authority::enroll"), "{logs}");
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret appears in the logs: {}...",
            &s[..6.min(s.len())]
        );
    }
    let _ = softhsm_conf();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_serve_on_one_sqlite_file_refuses_and_writes_nothing() {
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let _server = Server::start(&env, &log, &[]).await;
    let before = env.counts().await;
    let out = env
        .keygate()
        .env("KEYGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .arg("serve")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_line(
        out.status.success(),
        &err,
        "another keygate serve uses this SQLite database",
    );
    assert_eq!(env.counts().await, before, "the refused serve wrote to the store");
}

/// The access log at the default level: one INFO line per answered request, naming the
/// method, the path as sent, the matched route (or `unmatched`), the request id the client
/// sent (or the one keygate gave it, as answered in `x-request-id`), the status and latency.
#[tokio::test(flavor = "multi_thread")]
async fn each_answered_request_is_one_line_with_its_request_id_route_and_status() {
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    let http = reqwest::Client::new();
    let sent = http
        .get(format!("{base}/v1/keys"))
        .header("x-request-id", "probe-7f3a")
        .bearer_auth(format!("kg_{}", "Q".repeat(43)))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 401);
    assert_eq!(sent.headers()["x-request-id"], "probe-7f3a");
    let given = http.get(format!("{base}/no/such/page")).send().await.unwrap();
    assert_eq!(given.status(), 404);
    let given_id = given.headers()["x-request-id"].to_str().unwrap().to_owned();
    server.stop();

    let text = std::fs::read_to_string(&log).unwrap();
    let line_of = |id: &str| -> String {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("answered") && l.contains(&format!("request_id={id}")))
            .collect();
        assert_eq!(lines.len(), 1, "one access line for {id}: {text}");
        lines[0].to_owned()
    };
    let line = line_of("probe-7f3a");
    for part in [
        " INFO ",
        "method=GET",
        "path=/v1/keys",
        "route=\"/v1/keys\"",
        "status=401",
        "latency_ms=",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
    assert!(!line.contains("kg_Q"), "the credential is not logged: {line}");
    let line = line_of(&given_id);
    for part in ["path=/no/such/page", "route=\"unmatched\"", "status=404"] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}
