//! Native TLS of `keygate serve`: TLS 1.2 and 1.3 only, certificates replaced without a
//! restart (SIGHUP, or the files changing), client certificates when a client CA is set,
//! and a clear refusal of files that do not fit.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::certs::{self, CLIENT_EXT, SERVER_EXT};
use crate::common::{Env, Server};

/// A client that trusts only the CA at `ca` (and presents `identity`, if given).
fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(5))
        // a new connection (and handshake) per request: a kept connection keeps its certificate
        .pool_max_idle_per_host(0);
    if let Some((crt, key)) = identity {
        let mut pem = std::fs::read(crt).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

async fn issue_status(c: &reqwest::Client, base: &str, admin: &str) -> u16 {
    c.post(format!("{base}/v1/tokens"))
        .bearer_auth(admin)
        .json(&json!({"subject": "n", "audience": "a"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `openssl s_client` to `connect` with `args`, run in `dir`: true if the handshake worked.
fn s_client(dir: &Path, connect: &str, args: &[&str]) -> bool {
    Command::new("openssl")
        .current_dir(dir)
        .args(["s_client", "-connect", connect])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
        .status
        .success()
}

async fn healthy(c: &reqwest::Client, base: &str) -> bool {
    matches!(c.get(format!("{base}/healthz")).send().await, Ok(r) if r.status() == 200)
}

/// Puts `crt` and `key` in place of the served files the way certificate managers do: new
/// files renamed over the old ones.
fn install(dir: &Path, crt: &Path, key: &Path) {
    std::fs::copy(crt, dir.join("tls.crt.new")).unwrap();
    std::fs::copy(key, dir.join("tls.key.new")).unwrap();
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

async fn until(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tls_toml(dir: &Path, client_ca: Option<&Path>) -> String {
    let mut t = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    );
    if let Some(ca) = client_ca {
        t.push_str(&format!("client_ca_file = \"{}\"\n", ca.display()));
    }
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_and_takes_a_new_certificate_without_a_restart() {
    let certs_dir = tempfile::tempdir().unwrap();
    let d = certs_dir.path();
    let (ca1, ca2) = (certs::ca(d, "ca1"), certs::ca(d, "ca2"));
    let (crt1, key1) = certs::issue(d, "ca1", "server1", "127.0.0.1", SERVER_EXT);
    let (crt2, key2) = certs::issue(d, "ca2", "server2", "127.0.0.1", SERVER_EXT);
    install(d, &crt1, &key1);
    let env = Env::with_toml(&tls_toml(d, None)).await;
    let base = format!("https://{}", env.config.listen);
    let log = env.dir.path().join("serve.log");
    let (c1, c2) = (client(&ca1, None), client(&ca2, None));
    let server = Server::spawn_with(env.keygate(), &log, &[], &base, &c1).await;
    // the public URL and the issuer default to https
    let conf: Value = c1
        .get(format!("{base}/.well-known/keygate-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conf["issuer"], base.as_str(), "{conf}");
    assert_eq!(issue_status(&c1, &base, &env.admin).await, 201);
    // plain HTTP on the TLS port gets nothing
    assert!(
        reqwest::get(format!("http://{}/healthz", env.config.listen))
            .await
            .is_err()
    );
    // TLS 1.3 and 1.2 are spoken, 1.1 is not
    let port = env.config.listen.port().to_string();
    let connect = format!("127.0.0.1:{port}");
    for v in ["-tls1_3", "-tls1_2"] {
        assert!(
            s_client(d, &connect, &[v, "-CAfile", "ca1.pem", "-verify_return_error"]),
            "{v} refused"
        );
    }
    assert!(
        !s_client(d, &connect, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        "TLS 1.1 was accepted"
    );

    // a new certificate from another CA, then SIGHUP: new connections get it at once
    assert!(!healthy(&c2, &base).await);
    install(d, &crt2, &key2);
    crate::common::signal(&server.child, libc::SIGHUP);
    until("the certificate was reloaded on SIGHUP", 5, async || {
        healthy(&c2, &base).await
    })
    .await;
    assert!(!healthy(&c1, &base).await, "the old certificate is still served");
    // and back, without a signal: the changed files are noticed
    install(d, &crt1, &key1);
    until(
        "the certificate was reloaded when its files changed",
        15,
        async || healthy(&c1, &base).await,
    )
    .await;
    // a broken file is refused and the certificate in force stays
    std::fs::write(d.join("tls.key"), "not a key").unwrap();
    crate::common::signal(&server.child, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        healthy(&c1, &base).await,
        "a broken key file took the service down"
    );
    server.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TLS reload failed"), "{text}");
    assert!(
        !text.contains("not a key"),
        "the key file's content reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_ca_makes_every_connection_present_a_certificate_from_it() {
    let certs_dir = tempfile::tempdir().unwrap();
    let d = certs_dir.path();
    let ca = certs::ca(d, "ca");
    let clients_ca = certs::ca(d, "clients");
    certs::ca(d, "stranger");
    let (crt, key) = certs::issue(d, "ca", "server", "127.0.0.1", SERVER_EXT);
    install(d, &crt, &key);
    let good = certs::issue(d, "clients", "client", "node-1", CLIENT_EXT);
    let bad = certs::issue(d, "stranger", "intruder", "node-1", CLIENT_EXT);
    let env = Env::with_toml(&tls_toml(d, Some(&clients_ca))).await;
    let base = format!("https://{}", env.config.listen);
    let log = env.dir.path().join("serve.log");
    let with_cert = client(&ca, Some((&good.0, &good.1)));
    let server = Server::spawn_with(env.keygate(), &log, &[], &base, &with_cert).await;
    assert!(
        !healthy(&client(&ca, None), &base).await,
        "a connection without a certificate"
    );
    assert!(
        !healthy(&client(&ca, Some((&bad.0, &bad.1))), &base).await,
        "a certificate from another CA"
    );
    assert_eq!(issue_status(&with_cert, &base, &env.admin).await, 201);
    let metrics = with_cert
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_tls_handshakes_failed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed >= 2.0, "{failed} failed handshakes counted");
    server.stop();
}

/// Files that do not fit stop the start with one line naming the file.
#[tokio::test(flavor = "multi_thread")]
async fn tls_files_that_do_not_fit_stop_the_start_with_one_line() {
    let certs_dir = tempfile::tempdir().unwrap();
    let d = certs_dir.path();
    certs::ca(d, "ca");
    let (crt, _) = certs::issue(d, "ca", "server", "127.0.0.1", SERVER_EXT);
    let (_, other_key) = certs::issue(d, "ca", "other", "127.0.0.1", SERVER_EXT);
    install(d, &crt, &other_key);
    let env = Env::with_toml(&tls_toml(d, None)).await;
    let out = env.keygate().arg("serve").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("keygate: error: [tls] cert_file"), "{err}");
    // without the key, the environment's half of a pair is refused too
    let out = env
        .keygate()
        .arg("serve")
        .env("KEYGATE_TLS_CERT", &crt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYGATE_TLS_KEY go together"));
}

/// Serving a non-loopback address without TLS starts, with a loud warning; on loopback
/// there is none.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_a_non_loopback_address_is_warned_about() {
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let port = env.config.listen.port();
    let server = Server::start(&env, &log, &[]).await;
    server.stop();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("WITHOUT TLS"));
    let everywhere = format!("0.0.0.0:{port}");
    let server = Server::start(&env, &log, &[("KEYGATE_LISTEN", everywhere.as_str())]).await;
    server.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let warning = text
        .lines()
        .find(|l| l.contains("LISTENING WITHOUT TLS"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warning.contains(" WARN "), "{warning}");
}
