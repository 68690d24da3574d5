//! The audit log: GET /v1/audit, and `keygate audit verify` naming the first bad entry after
//! rows are edited, deleted or reordered directly in the SQLite file.

use serde_json::{Value, json};

use crate::common::{Env, create_api_token, get_authed, issue};

async fn audit_endpoint_pages_links_and_needs_its_scope(env: Env) {
    let (base, _svc) = env.serve().await;
    for i in 0..4 {
        issue(
            &base,
            &env.admin,
            json!({"subject": format!("n{i}"), "audience": "a"}),
        )
        .await;
    }
    assert_eq!(get_authed(&base, "/v1/keys", "kg_nope").await.status(), 401); // audited refusal
    let first: Value = get_authed(&base, "/v1/audit?limit=3", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    let rest: Value = get_authed(&base, "/v1/audit?after=3&limit=1000", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["entries"].as_array().unwrap().len(), 3);
    assert_eq!(first["checkpoints"], json!([]));
    let all: Vec<&Value> = first["entries"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["entries"].as_array().unwrap())
        .collect();
    assert!(all.len() >= 7, "{} entries", all.len());
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1);
        let prev = if i == 0 {
            keygate::audit::GENESIS
        } else {
            all[i - 1]["hash"].as_str().unwrap()
        };
        assert_eq!(e["prev_hash"], prev);
        assert!(e["at"].as_str().unwrap().ends_with('Z'));
    }
    assert!(
        all.iter()
            .any(|e| e["action"] == "token.issue" && e["actor"].as_str().unwrap().starts_with("at_"))
    );
    assert!(
        all.iter()
            .any(|e| e["action"] == "auth" && e["outcome"] == "denied: invalid token")
    );
    assert!(
        !serde_json::to_string(&all).unwrap().contains("kg_"),
        "no secret in the audit log"
    );
    for bad in [
        "/v1/audit?limit=0",
        "/v1/audit?limit=1001",
        "/v1/audit?after=-1",
        "/v1/audit?bogus=1",
        "/v1/audit?limit=x",
    ] {
        assert_eq!(get_authed(&base, bad, &env.admin).await.status(), 400, "{bad}");
    }
    let reader = create_api_token(&base, &env.admin, &["keys:read"], None).await;
    assert_eq!(
        get_authed(&base, "/v1/audit", reader["token"].as_str().unwrap())
            .await
            .status(),
        403
    );
}
on_both_stores!(audit_endpoint_pages_links_and_needs_its_scope);

/// Copies the database (and its WAL) to a fresh folder, applies `sql`, runs
/// `keygate audit verify` there; returns (success, stdout + stderr).
async fn verify_after(env: &Env, name: &str, sql: &str) -> (bool, String) {
    verify_after_with(env, name, sql, &[]).await
}

async fn verify_after_with(env: &Env, name: &str, sql: &str, args: &[&str]) -> (bool, String) {
    let dir = env.dir.path().join(format!("case-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["keygate.db", "keygate.db-wal"] {
        let from = env.dir.path().join(f);
        if from.exists() {
            std::fs::copy(&from, dir.join(f)).unwrap();
        }
    }
    if !sql.is_empty() {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("keygate.db").display()))
            .await
            .unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let conf = dir.join("keygate.toml");
    std::fs::write(&conf, format!("data_dir = \"{}\"\n", dir.display())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["audit", "verify"])
        .args(args)
        .env("KEYGATE_CONFIG", &conf)
        .env_remove("KEYGATE_DATA_DIR")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_names_the_first_bad_entry() {
    let env = Env::new().await;
    {
        let (base, _svc) = env.serve().await;
        for i in 0..6 {
            issue(
                &base,
                &env.admin,
                json!({"subject": format!("n{i}"), "audience": "a"}),
            )
            .await;
        }
    }
    let (ok, out) = verify_after(&env, "clean", "").await;
    assert!(
        ok && out.contains("audit log verified: 8 entries, no signed checkpoint"),
        "{out}"
    );

    // A row rewritten with a consistent hash of its own still breaks the next link.
    let e3 = {
        let pool = sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            env.dir.path().join("keygate.db").display()
        ))
        .await
        .unwrap();
        let row: (i64, i64, String, String, String, String, String, String) = sqlx::query_as(
            "SELECT seq, at, actor, action, target, outcome, remote_addr, prev_hash FROM audit_log WHERE seq = 3",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        let rec = keygate::audit::AuditRecord::new(&row.2, &row.3, &row.4, "denied", &row.6);
        keygate::audit::chain_hash(&row.7, row.0, row.1, &rec)
    };
    let cases = [
        ("edit", "UPDATE audit_log SET outcome = 'denied' WHERE seq = 3".to_owned(), "entry 3: hash does not match"),
        (
            "rehash",
            format!("UPDATE audit_log SET outcome = 'denied', hash = '{e3}' WHERE seq = 3"),
            "entry 4: prev_hash is not the previous entry's hash",
        ),
        ("delete", "DELETE FROM audit_log WHERE seq = 4".to_owned(), "entry 5: sequence number does not follow"),
        (
            "reorder",
            "UPDATE audit_log SET seq = -6 WHERE seq = 6; UPDATE audit_log SET seq = 6 WHERE seq = 5; UPDATE audit_log SET seq = 5 WHERE seq = -6;"
                .to_owned(),
            "entry 5: prev_hash is not the previous entry's hash",
        ),
        ("first", "UPDATE audit_log SET actor = 'someone' WHERE seq = 1".to_owned(), "entry 1: hash does not match"),
    ];
    for (name, sql, expect) in cases {
        let (ok, out) = verify_after(&env, name, &sql).await;
        assert!(!ok, "{name}: tampering not detected: {out}");
        assert_eq!(out.trim().lines().count(), 1, "{name}: {out}");
        assert!(
            out.contains(&format!("keygate: error: audit log broken at {expect}")),
            "{name}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_checkpoints_catch_truncation_rewrites_and_forgeries() {
    use crate::common::Server;
    let env = Env::new().await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    for i in 0..5 {
        issue(
            &base,
            &env.admin,
            json!({"subject": format!("n{i}"), "audience": "a"}),
        )
        .await;
    }
    let jwks_file = env.dir.path().join("jwks.json");
    std::fs::write(
        &jwks_file,
        reqwest::get(format!("{base}/.well-known/jwks.json"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    server.stop(); // SIGTERM: graceful shutdown signs a checkpoint of the head (entry 7)

    let server = Server::start(&env, &log, &[]).await;
    let page: Value = get_authed(&base, "/v1/audit?limit=1000", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    server.stop();
    // one at start (entry 2 of init, or a little later if an issuance came first), one at
    // the graceful stop (entry 7)
    let cps = page["checkpoints"].as_array().unwrap();
    let seqs: Vec<_> = cps.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert!(seqs.len() == 2 && seqs[0] < 7 && seqs[1] == 7, "{page}");
    for c in cps {
        let entry = c["seq"].as_u64().unwrap() as usize - 1;
        assert_eq!(c["kid"].as_str(), Some(env.kid.as_str()));
        assert_eq!(c["hash"], page["entries"][entry]["hash"]);
    }

    let jwks = jwks_file.to_str().unwrap();
    let (ok, out) = verify_after_with(&env, "cp-clean", "", &["--jwks", jwks]).await;
    assert!(
        ok && out.contains("7 entries, 2 signed checkpoints, the newest at entry 7"),
        "{out}"
    );
    // a JWKS without the signing key: the checkpoint cannot be trusted
    let other =
        keygate::token::Jwk::from_public_key(&p256::SecretKey::from_slice(&[9u8; 32]).unwrap().public_key());
    let other_file = env.dir.path().join("other.json");
    std::fs::write(
        &other_file,
        serde_json::to_string(&keygate::token::JwkSet { keys: vec![other] }).unwrap(),
    )
    .unwrap();
    let (ok, out) = verify_after_with(&env, "cp-other", "", &["--jwks", other_file.to_str().unwrap()]).await;
    assert!(
        !ok && out.contains("checkpoint at entry 7 does not verify: unknown kid"),
        "{out}"
    );

    // the newest entries removed: the chain alone cannot see it, the checkpoint can
    let (ok, out) = verify_after(&env, "cp-truncate", "DELETE FROM audit_log WHERE seq >= 6").await;
    assert!(
        !ok && out.contains("ends at entry 5 but a signed checkpoint covers entry 7"),
        "{out}"
    );

    // entry 3 edited and every later hash recomputed: a consistent chain, but not the signed one
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        env.dir.path().join("keygate.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(i64, i64, String, String, String, String, String)> = sqlx::query_as(
        "SELECT seq, at, actor, action, target, outcome, remote_addr FROM audit_log ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let prev2: (String,) = sqlx::query_as("SELECT hash FROM audit_log WHERE seq = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut prev = prev2.0;
    let mut sql = String::new();
    for (seq, at, actor, action, target, outcome, remote) in rows.into_iter().filter(|r| r.0 >= 3) {
        let outcome = if seq == 3 { "denied".to_owned() } else { outcome };
        let rec = keygate::audit::AuditRecord::new(&actor, &action, &target, &outcome, &remote);
        let hash = keygate::audit::chain_hash(&prev, seq, at, &rec);
        sql.push_str(&format!(
            "UPDATE audit_log SET outcome = '{outcome}', prev_hash = '{prev}', hash = '{hash}' WHERE seq = {seq};"
        ));
        prev = hash;
    }
    let (ok, out) = verify_after(&env, "cp-rewrite", &sql).await;
    assert!(
        !ok && out.contains("entry 7: it does not match the signed checkpoint"),
        "{out}"
    );

    // a forged checkpoint signature
    let zero = keygate::token::b64::encode([0u8; 64]);
    let (ok, out) = verify_after(
        &env,
        "cp-forge",
        &format!("UPDATE audit_checkpoints SET signature = '{zero}' WHERE seq = 7"),
    )
    .await;
    assert!(
        !ok && out.contains("checkpoint at entry 7 does not verify: bad signature"),
        "{out}"
    );
}
