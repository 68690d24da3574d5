//! Three `keygate serve` replicas on one PostgreSQL database and one SoftHSM2 token: every
//! promise of the API holds across them, each checked with a request sent to another replica
//! right after the change (ADR 0011).

use std::time::{Duration, Instant};

use keygate::token::{Verifier, VerifierConfig};
use serde_json::{Value, json};

use crate::common::replicas::{PUBLIC_URL, Replicas};
use crate::common::swtpm::{Swtpm, TestCa};
use crate::common::tpm2tools::Client as TpmClient;
use crate::common::{Env, create_api_token, delete_authed, introspect, issue, jwks, revoke};
use crate::enroll::{challenge_body, complete_body, enroll_toml, post};
use crate::redeem::{Client as DpopClient, redeem};
use crate::stream::SseClient;

async fn issue_status(base: &str, api: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(api)
        .json(&json!({"subject": "s", "audience": "fleet"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_identity_api_tokens_and_keys_are_the_same_on_every_replica() {
    let env = Env::on_postgres("").await;
    let r = Replicas::start(&env, 3, &[]).await;
    let [a, b, c] = [&r[0].base, &r[1].base, &r[2].base];
    // init and three replicas on a PostgreSQL URL made no SQLite file
    let files: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!files.iter().any(|f| f.contains(".db")), "{files:?}");

    // One issuer and one JWKS everywhere.
    let first = jwks(a).await;
    for base in [a, b, c] {
        let conf: Value = reqwest::get(format!("{base}/.well-known/keygate-configuration"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(conf["issuer"], PUBLIC_URL);
        assert_eq!(conf["jwks_uri"], format!("{PUBLIC_URL}/.well-known/jwks.json"));
        assert_eq!(jwks(base).await, first);
    }

    // A token from one replica is the others' own: it verifies against any replica's JWKS
    // with the one issuer, and introspection anywhere knows it.
    let t = issue(a, &env.admin, json!({"subject": "node-1", "audience": "fleet"})).await;
    let token = t["token"].as_str().unwrap();
    let v = Verifier::new(&jwks(c).await, VerifierConfig::new(PUBLIC_URL, "fleet")).unwrap();
    assert_eq!(v.verify(token).unwrap().sub, "node-1");
    for base in [b, c] {
        let i = introspect(base, &env.admin, token).await;
        assert_eq!(i["active"], true, "{i}");
    }

    // An API token deleted on one replica is refused by every other as soon as the DELETE
    // has answered, even right after it was used (and so could be cached) there.
    for round in 0..5 {
        let created = create_api_token(a, &env.admin, &["tokens:issue"], None).await;
        let secret = created["token"].as_str().unwrap();
        for base in [b, c] {
            assert_eq!(issue_status(base, secret).await, 201, "round {round}");
        }
        let deleter = [a, b, c][round % 3];
        let id = created["id"].as_str().unwrap();
        let res = delete_authed(deleter, &format!("/v1/api-tokens/{id}"), &env.admin).await;
        assert_eq!(res.status(), 204);
        for base in [a, b, c] {
            assert_eq!(issue_status(base, secret).await, 401, "round {round} on {base}");
        }
    }

    // An emergency rotation on one replica is in force on the others within one
    // check_every_ms (1 s): they publish the new key and sign with it.
    let res = reqwest::Client::new()
        .post(format!("{a}/v1/keys/rotate"))
        .bearer_auth(&env.admin)
        .json(&json!({"activate_now": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let rotated_at = Instant::now();
    let new_kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_kid, env.kid);
    for base in [b, c] {
        loop {
            let t = issue(base, &env.admin, json!({"subject": "s", "audience": "fleet"})).await;
            if t["kid"] == new_kid.as_str() {
                break;
            }
            assert!(
                rotated_at.elapsed() < Duration::from_millis(1500),
                "{base} still signs with the old key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            jwks(base)
                .await
                .keys
                .iter()
                .any(|k| k.kid.as_deref() == Some(&new_kid))
        );
    }
    // and tokens of the old key still verify everywhere (it is retiring, still published)
    let v = Verifier::new(&jwks(b).await, VerifierConfig::new(PUBLIC_URL, "fleet")).unwrap();
    v.verify(token).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revocations_redemption_dpop_and_enrollment_across_replicas() {
    let ca = TestCa::new();
    // made before the replicas start: they read the manufacturer CA folder at startup
    let tpm = Swtpm::manufactured(&ca);
    let env = Env::on_postgres(&enroll_toml(&ca, "")).await;
    let r = Replicas::start(&env, 3, &[]).await;
    let bases = r.bases();
    let [a, b, c] = [&bases[0], &bases[1], &bases[2]];

    // Revocations made on every replica reach the event streams of every replica, in one
    // seq order.
    let mut streams = Vec::new();
    for base in [a, b, c] {
        streams.push(SseClient::connect(base, None).await);
    }
    let mut jtis = Vec::new();
    for i in 0..6 {
        let base = &bases[i % 3];
        let t = issue(
            base,
            &env.admin,
            json!({"subject": format!("n{i}"), "audience": "fleet"}),
        )
        .await;
        let jti = t["jti"].as_str().unwrap().to_owned();
        assert_eq!(
            revoke(&bases[(i + 1) % 3], &env.admin, &jti, None).await.status(),
            200
        );
        jtis.push(jti);
    }
    let mut seen: Vec<Vec<(String, String)>> = Vec::new();
    for s in &mut streams {
        let mut got = Vec::new();
        while got.len() < jtis.len() {
            let ev = s.next(Duration::from_secs(5)).await.expect("a revocation event");
            got.push((ev.id.clone(), ev.data["jti"].as_str().unwrap().to_owned()));
        }
        seen.push(got);
    }
    let order: Vec<String> = seen[0].iter().map(|(_, j)| j.clone()).collect();
    assert_eq!(order, jtis, "events in the order the revocations were made");
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "every replica streams the same events"
    );
    let ids: Vec<i64> = seen[0].iter().map(|(id, _)| id.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "seq grows: {ids:?}");
    // Resume on another replica from an event id another replica sent: no gap, no repeat.
    let mut resumed = SseClient::connect(c, Some(&seen[0][1].0)).await;
    for (id, jti) in &seen[0][2..] {
        let ev = resumed.next(Duration::from_secs(5)).await.unwrap();
        assert_eq!((&ev.id, ev.data["jti"].as_str().unwrap()), (id, jti.as_str()));
    }
    assert!(resumed.next(Duration::from_millis(300)).await.is_none());

    // Exactly one of 30 redemptions spread over the replicas succeeds.
    let t = issue(
        a,
        &env.admin,
        json!({"subject": "once", "audience": "fleet", "one_time": true}),
    )
    .await;
    let token = t["token"].as_str().unwrap().to_owned();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (base, token) = (bases[i % 3].clone(), token.clone());
            tokio::spawn(async move { redeem(&base, json!({"token": token}), None).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 409), "{statuses:?}");

    // A DPoP proof accepted by one replica is a replay on every other.
    let key = DpopClient::new(9);
    let t = issue(
        a,
        &env.admin,
        json!({"subject": "bound", "audience": "fleet", "cnf_jkt": key.jkt()}),
    )
    .await;
    let token = t["token"].as_str().unwrap();
    let htu = format!("{PUBLIC_URL}/v1/tokens/redeem");
    let proof = key.proof("POST", &htu, 0, token, "proof-1");
    assert_eq!(redeem(a, json!({"token": token}), Some(&proof)).await.0, 200);
    for base in [b, c] {
        let (s, p) = redeem(base, json!({"token": token}), Some(&proof)).await;
        assert_eq!(s, 401, "{p}");
        assert!(p["detail"].as_str().unwrap().contains("replay"), "{p}");
    }
    let fresh = key.proof("POST", &htu, 0, token, "proof-2");
    assert_eq!(redeem(c, json!({"token": token}), Some(&fresh)).await.0, 200);

    // Enrollment: the challenge from one replica is completed on another, once.
    let mut client = TpmClient::new(&tpm.tcti());
    client.create_ek("rsa");
    client.create_ak("ak");
    let (s, ch) = post(a, "/v1/enroll/challenge", &challenge_body(&client, "ak")).await;
    assert_eq!(s, 200, "{ch}");
    let body = complete_body(&client, &ch);
    let (s, done) = post(b, "/v1/enroll/complete", &body).await;
    assert_eq!(s, 200, "{done}");
    let (s, again) = post(c, "/v1/enroll/complete", &body).await;
    assert_eq!(s, 401, "{again}");
    let i = introspect(c, &env.admin, done["token"].as_str().unwrap()).await;
    assert_eq!(i["active"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_audit_chain_from_every_replica_and_tampering_is_found() {
    let env = Env::on_postgres("").await;
    let mut r = Replicas::start(&env, 3, &[]).await;
    let bases = r.bases();
    // Concurrent writes on all replicas at once.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (base, admin) = (bases[i % 3].clone(), env.admin.clone());
            tokio::spawn(async move {
                issue(
                    &base,
                    &admin,
                    json!({"subject": format!("n{i}"), "audience": "fleet"}),
                )
                .await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..3 {
        r[i].stop(); // each signs a checkpoint as it stops
    }
    let out = env.keygate().args(["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("signed checkpoints"), "{text}");
    let entries = env.counts().await.2;
    assert!(entries >= 62, "{entries} entries");

    // An entry edited in the shared database is named.
    let db = env.db().await;
    assert_eq!(
        db.exec("UPDATE audit_log SET outcome = 'denied' WHERE seq = 7", &[])
            .await,
        1
    );
    db.close().await;
    let out = env.keygate().args(["audit", "verify"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("entry 7"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inits_started_together_on_a_fresh_database_make_one_key_and_one_admin_token() {
    let env = Env::on_postgres("").await;
    // A second, empty database on the same token: three replicas' start scripts run
    // `keygate init` at once (each also migrates the empty schema).
    let fresh = crate::common::pg::create_database().await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            env.keygate()
                .env("KEYGATE_STORE_URL", &fresh)
                .arg("init")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let minted = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stdout).contains("KEYGATE_ADMIN_TOKEN=kg_"))
        .count();
    assert_eq!(minted, 1, "one admin token, printed once");
    let db = crate::common::db::TestDb::connect(&fresh).await;
    assert_eq!(db.int("SELECT count(*) FROM signing_keys", &[]).await, 1);
    assert_eq!(db.int("SELECT count(*) FROM api_tokens", &[]).await, 1);
    db.close().await;
    crate::common::pg::drop_database(&fresh);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_speaks_tls_to_postgresql_and_refuses_a_server_it_cannot_verify() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    // a throwaway CA, a server certificate for 127.0.0.1 signed by it, and a stranger CA
    use crate::common::certs;
    certs::ca(d, "ca");
    certs::ca(d, "other-ca");
    certs::issue(d, "ca", "server", "127.0.0.1", certs::SERVER_EXT);
    let cluster = crate::common::pg::PgCluster::start_tls(&d.join("server.crt"), &d.join("server.key"));
    let plain = crate::common::pg::create_database_on(&cluster.admin_url()).await;
    let url = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        d.join("ca.pem").display()
    );
    let env = Env::build("", Some(url.clone())).await;
    let r = Replicas::start(&env, 1, &[]).await;
    issue(&r[0].base, &env.admin, json!({"subject": "s", "audience": "a"})).await;
    // every keygate session on the server is encrypted
    let db = crate::common::db::TestDb::connect(&plain).await;
    let (sessions, encrypted) = db
        .two_opt_ints(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'keygate'",
            &[],
        )
        .await;
    let (sessions, encrypted) = (sessions.unwrap(), encrypted.unwrap());
    db.close().await;
    assert!(
        sessions > 0 && encrypted == sessions,
        "{encrypted} of {sessions} sessions use TLS"
    );
    // a server whose certificate does not chain to the configured CA is refused, in one line
    let wrong = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        d.join("other-ca.pem").display()
    );
    let out = env
        .keygate()
        .env("KEYGATE_STORE_URL", &wrong)
        .arg("init")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("keygate: error: cannot open store postgres://"),
        "{err}"
    );
    drop(r);
    drop(env);
}
