//! Key rotation: by hand and in an emergency (in-process, both backends), on a schedule
//! under continuous issue-and-verify load (the real binary), and destroying retired keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::keys::KeyError;
use keygate::token::{Verifier, VerifierConfig};
use serde_json::{Value, json};

use crate::common::{Env, Server, delete_authed, get_authed, issue, jwks};

async fn rotate(base: &str, api: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/keys/rotate"))
        .bearer_auth(api)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn keys(base: &str, api: &str) -> Vec<Value> {
    get_authed(base, "/v1/keys", api).await.json().await.unwrap()
}

fn state_of<'a>(keys: &'a [Value], kid: &str) -> &'a str {
    keys.iter()
        .find(|k| k["kid"] == kid)
        .and_then(|k| k["state"].as_str())
        .unwrap_or("absent")
}

fn jwks_kids(set: &keygate::token::JwkSet) -> Vec<String> {
    let mut v: Vec<String> = set.keys.iter().map(|k| k.kid.clone().unwrap()).collect();
    v.sort();
    v
}

async fn rotation_by_hand_emergency_retirement_and_destroy(env: Env) {
    let (base, svc) = env.serve().await;
    let old = env.kid.clone();
    let t1 = issue(&base, &env.admin, json!({"subject": "a", "audience": "fleet"})).await;
    // A planned rotation: the new key is published now and does not sign yet.
    let (s, next) = rotate(&base, &env.admin, json!({})).await;
    assert_eq!(s, 201, "{next}");
    assert_eq!(next["state"], "next");
    assert!(next["activate_at"].is_string());
    let new = next["kid"].as_str().unwrap().to_owned();
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    assert_eq!(jwks_kids(&jwks(&base).await), both, "published before it signs");
    let t2 = issue(&base, &env.admin, json!({"subject": "b", "audience": "fleet"})).await;
    assert_eq!(t2["kid"], old.as_str());
    let (s, p) = rotate(&base, &env.admin, json!({})).await;
    assert_eq!(s, 409, "one key waits at a time: {p}");
    assert_eq!(
        rotate(&base, &env.admin, json!({"activate_now": "yes"})).await.0,
        400
    );
    // Emergency: the waiting key takes over at once; the old one retires later.
    let (s, now) = rotate(&base, &env.admin, json!({"activate_now": true})).await;
    assert_eq!(
        (s, now["kid"].as_str(), now["state"].as_str()),
        (201, Some(new.as_str()), Some("active"))
    );
    let t3 = issue(&base, &env.admin, json!({"subject": "c", "audience": "fleet"})).await;
    assert_eq!(t3["kid"], new.as_str());
    let ks = keys(&base, &env.admin).await;
    assert_eq!(state_of(&ks, &old), "retiring");
    assert_eq!(
        jwks_kids(&jwks(&base).await),
        both,
        "a retiring key stays published"
    );
    let v = Verifier::new(
        &jwks(&base).await,
        VerifierConfig::new(env.config.issuer(), "fleet"),
    )
    .unwrap();
    for t in [&t1, &t2, &t3] {
        v.verify(t["token"].as_str().unwrap()).unwrap();
    }
    // Destroy is refused for the active key, for a key with unexpired tokens, for unknown keys.
    let r = delete_authed(&base, &format!("/v1/keys/{new}"), &env.admin).await;
    assert_eq!(r.status(), 409);
    let r = delete_authed(&base, &format!("/v1/keys/{old}"), &env.admin).await;
    assert_eq!(r.status(), 409);
    let p: Value = r.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("unexpired"), "{p}");
    assert_eq!(
        delete_authed(&base, "/v1/keys/nope", &env.admin).await.status(),
        404
    );
    // Once its tokens have expired (TTL 2 s, leeway 0, grace 5 s), the schedule retires it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&keys(&base, &env.admin).await, &old) != "retired" {
        assert!(Instant::now() < deadline, "the old key never retired");
        svc.authority.schedule_tick().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        jwks_kids(&jwks(&base).await),
        vec![new.clone()],
        "a retired key is unpublished"
    );
    let uri = keys(&base, &env.admin)
        .await
        .into_iter()
        .find(|k| k["kid"] == old.as_str())
        .unwrap()["uri"]
        .as_str()
        .unwrap()
        .to_owned();
    svc.backend.find_key(&uri).unwrap();
    let r = delete_authed(&base, &format!("/v1/keys/{old}"), &env.admin).await;
    assert_eq!(r.status(), 204);
    assert!(matches!(
        svc.backend.find_key(&uri),
        Err(KeyError::KeyNotFound(_))
    ));
    let r = delete_authed(&base, &format!("/v1/keys/{old}"), &env.admin).await;
    assert_eq!(r.status(), 409, "destroyed already");
    let ks = keys(&base, &env.admin).await;
    assert!(
        ks.iter()
            .any(|k| k["kid"] == old.as_str() && k["destroyed_at"].is_string())
    );
    // Every step is in the audit log.
    let page = crate::common::audit_entries(&base, &env.admin).await;
    let actions: Vec<&str> = page.iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in ["key.rotate", "key.activate", "key.retire", "key.destroy"] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
}
on_both_backends!(
    rotation_by_hand_emergency_retirement_and_destroy,
    "[tokens]\ndefault_ttl_seconds = 2\nmax_ttl_seconds = 2\nleeway_seconds = 0\n"
);

/// A verifier that caches the JWKS as its `Cache-Control: max-age` allows, like a standard
/// JOSE client library.
struct CachingVerifier {
    base: String,
    issuer: String,
    cached: Mutex<Option<(Arc<Verifier>, Instant, Duration)>>,
}

impl CachingVerifier {
    async fn verifier(&self) -> Arc<Verifier> {
        if let Some((v, at, max_age)) = self.cached.lock().unwrap().as_ref()
            && at.elapsed() < *max_age
        {
            return v.clone();
        }
        let res = reqwest::get(format!("{}/.well-known/jwks.json", self.base))
            .await
            .unwrap();
        let cc = res.headers()["cache-control"].to_str().unwrap().to_owned();
        let max_age: u64 = cc
            .split(',')
            .find_map(|p| p.trim().strip_prefix("max-age="))
            .unwrap()
            .parse()
            .unwrap();
        let set = res.json().await.unwrap();
        let v = Arc::new(Verifier::new(&set, VerifierConfig::new(self.issuer.clone(), "fleet")).unwrap());
        *self.cached.lock().unwrap() = Some((v.clone(), Instant::now(), Duration::from_secs(max_age)));
        v
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_scheduled_rotations_under_load_fail_no_verification() {
    let env = Env::with_toml(
        "[tokens]\ndefault_ttl_seconds = 2\nmax_ttl_seconds = 2\n[rotation]\nrotate_every_seconds = 5\npublish_lead_seconds = 2\njwks_max_age_seconds = 1\ncheck_every_ms = 100\n[audit]\ncheckpoint_every_seconds = 1\n",
    )
    .await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    let verifier = Arc::new(CachingVerifier {
        base: base.clone(),
        issuer: env.config.issuer(),
        cached: Mutex::new(None),
    });
    let (verified, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let kids_seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (base, admin, verifier) = (base.clone(), env.admin.clone(), verifier.clone());
        let (verified, failed, kids, stop) =
            (verified.clone(), failed.clone(), kids_seen.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{base}/v1/tokens"))
                    .bearer_auth(&admin)
                    .json(&json!({"subject": "n", "audience": "fleet"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                let t: Value = r.json().await.unwrap();
                match verifier.verifier().await.verify(t["token"].as_str().unwrap()) {
                    Ok(_) => {
                        verified.fetch_add(1, Ordering::Relaxed);
                        kids.lock().unwrap().insert(t["kid"].as_str().unwrap().to_owned());
                    }
                    Err(e) => {
                        eprintln!("verification failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Two full rotations: the first two keys have each been replaced and then retired.
    let first = env.kid.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut retired = Vec::new();
    while retired.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no two full rotations in 90 s: {retired:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        retired = keys(&base, &env.admin)
            .await
            .into_iter()
            .filter(|k| k["state"] == "retired")
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (ok, bad) = (verified.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation under load: {ok} verified, {bad} failed");
    assert_eq!(bad, 0, "a verification failed during rotation");
    assert!(ok > 100, "too little load: {ok}");
    assert!(retired.contains(&first));
    assert!(
        kids_seen.lock().unwrap().len() >= 3,
        "tokens from at least three keys"
    );

    // By hand through the CLI: destroy a retired key; the active one is refused in one line.
    let destroyed = env
        .keygate()
        .args(["keys", "destroy", &first, "--server", &base])
        .env("KEYGATE_TOKEN", &env.admin)
        .output()
        .unwrap();
    assert!(
        destroyed.status.success(),
        "{}",
        String::from_utf8_lossy(&destroyed.stderr)
    );
    let active = keys(&base, &env.admin)
        .await
        .into_iter()
        .find(|k| k["state"] == "active")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = env
        .keygate()
        .args(["keys", "destroy", &active, "--server", &base])
        .env("KEYGATE_TOKEN", &env.admin)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("409") && err.contains("active"), "{err}");
    let rotated = env
        .keygate()
        .args(["keys", "rotate", "--server", &base])
        .env("KEYGATE_TOKEN", &env.admin)
        .output()
        .unwrap();
    // The schedule may have a next key waiting already; either way the answer is one line.
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&rotated.stdout),
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    // The audit chain, with checkpoints signed by every key in turn, verifies against the
    // JWKS published now: older checkpoints by rotated-out keys are covered by the newest.
    let jwks_file = env.dir.path().join("jwks-now.json");
    let now = reqwest::get(format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    std::fs::write(&jwks_file, now).unwrap();
    server.stop();
    let out = env
        .keygate()
        .args(["audit", "verify", "--jwks", jwks_file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("rotated out"),
        "checkpoints by retired keys were expected: {err}"
    );
}
