//! Replicas under faults: one killed with SIGKILL under mixed load, PostgreSQL crashed and
//! restarted under load, the key-rotation schedule with three replicas, and two TPM replicas
//! that each sign with their own TPM.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::token::{Verifier, VerifierConfig};
use serde_json::{Value, json};

use crate::common::pg::{PgCluster, create_database_on};
use crate::common::replicas::{PUBLIC_URL, Replicas, leads};
use crate::common::swtpm::Swtpm;
use crate::common::{Env, introspect, issue, jwks};
use crate::stream::SseClient;

/// What clients were told, and by whom.
#[derive(Default)]
struct Told {
    issued: Vec<String>,
    revoked: Vec<String>,
    redeemed: Vec<String>,
    /// (replica, status) of every 5xx answer.
    failures: Vec<(usize, u16)>,
    /// Every status seen, with its latency and whether a 503 carried Retry-After.
    statuses: Vec<(u16, Duration, bool)>,
}

pub(crate) async fn post(
    base: &str,
    path: &str,
    admin: Option<&str>,
    body: Value,
) -> Option<(u16, Value, bool)> {
    let mut r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .timeout(Duration::from_secs(20))
        .json(&body);
    if let Some(a) = admin {
        r = r.bearer_auth(a);
    }
    let res = r.send().await.ok()?;
    let status = res.status().as_u16();
    let retry_after = res.headers().contains_key("retry-after");
    Some((status, res.json().await.unwrap_or(Value::Null), retry_after))
}

/// Mixed load (issue one-time tokens, redeem some, revoke some) from `workers` clients over
/// the replicas not marked dead in `dead`, until `stop`.
fn load(
    bases: Vec<String>,
    admin: String,
    workers: usize,
    dead: Arc<Mutex<Vec<usize>>>,
    stop: Arc<AtomicBool>,
    told: Arc<Mutex<Told>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let n = Arc::new(AtomicUsize::new(0));
    (0..workers)
        .map(|w| {
            let (bases, admin, dead, stop, told, n) = (
                bases.clone(),
                admin.clone(),
                dead.clone(),
                stop.clone(),
                told.clone(),
                n.clone(),
            );
            tokio::spawn(async move {
                let mut mine: Vec<(String, String)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let k = n.fetch_add(1, Ordering::Relaxed);
                    let alive: Vec<usize> = (0..bases.len())
                        .filter(|i| !dead.lock().unwrap().contains(i))
                        .collect();
                    let i = alive[k % alive.len()];
                    let base = &bases[i];
                    let started = Instant::now();
                    let (kind, answer) = match (k + w) % 4 {
                        0 | 1 => (
                            "issue",
                            post(
                                base,
                                "/v1/tokens",
                                Some(&admin),
                                json!({"subject": "s", "audience": "fleet", "one_time": true}),
                            )
                            .await,
                        ),
                        2 if !mine.is_empty() => {
                            let (token, _) = mine.remove(0);
                            let a = post(base, "/v1/tokens/redeem", None, json!({"token": token})).await;
                            if let Some((200, _, _)) = &a {
                                told.lock().unwrap().redeemed.push(jti_of(&token));
                            }
                            ("redeem", a)
                        }
                        3 if !mine.is_empty() => {
                            let (_, jti) = mine.remove(0);
                            let a = post(base, &format!("/v1/tokens/{jti}/revoke"), Some(&admin), json!({}))
                                .await;
                            if let Some((200, _, _)) = &a {
                                told.lock().unwrap().revoked.push(jti);
                            }
                            ("revoke", a)
                        }
                        _ => continue,
                    };
                    // A request cut off by a kill has no answer: nothing was promised.
                    let Some((status, body, retry_after)) = answer else {
                        continue;
                    };
                    let mut t = told.lock().unwrap();
                    t.statuses.push((status, started.elapsed(), retry_after));
                    if status >= 500 {
                        t.failures.push((i, status));
                    }
                    if kind == "issue" && status == 201 {
                        let token = body["token"].as_str().unwrap().to_owned();
                        t.issued.push(body["jti"].as_str().unwrap().to_owned());
                        mine.push((token, body["jti"].as_str().unwrap().to_owned()));
                    }
                }
            })
        })
        .collect()
}

fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&keygate::token::b64::decode(payload).unwrap()).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

/// Every 2xx a client got is in the store.
async fn everything_told_is_stored(env: &Env, told: &Told) {
    let db = env.db().await;
    for jti in &told.issued {
        assert_eq!(
            db.int("SELECT count(*) FROM issued_tokens WHERE jti = $1", &[jti])
                .await,
            1,
            "{jti} lost"
        );
    }
    for jti in &told.revoked {
        let (_, revoked) = db
            .two_opt_ints(
                "SELECT redeemed_at, revoked_at FROM issued_tokens WHERE jti = $1",
                &[jti],
            )
            .await;
        assert!(revoked.is_some(), "revocation of {jti} lost");
        assert_eq!(
            db.int("SELECT count(*) FROM revocations WHERE jti = $1", &[jti])
                .await,
            1
        );
    }
    for jti in &told.redeemed {
        let (redeemed, _) = db
            .two_opt_ints(
                "SELECT redeemed_at, revoked_at FROM issued_tokens WHERE jti = $1",
                &[jti],
            )
            .await;
        assert!(redeemed.is_some(), "redemption of {jti} lost");
    }
    db.close().await;
}

/// The replica (of `bases`, skipping `dead`) that runs `task`, waiting up to `wait`.
async fn leader(bases: &[String], dead: &[usize], task: &str, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    loop {
        for (i, b) in bases.iter().enumerate() {
            if !dead.contains(&i) && leads(b, task).await == Some(true) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no replica took over {task}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_under_mixed_load_loses_nothing_and_its_work_moves() {
    let env = Env::on_postgres("").await;
    let mut r = Replicas::start(&env, 3, &[]).await;
    let bases = r.bases();
    // One replica runs each periodic task; kill the one that runs the audit checkpoints.
    let victim = leader(&bases, &[], "audit", Duration::from_secs(5)).await;
    let rotation_leader = leader(&bases, &[], "rotation", Duration::from_secs(5)).await;
    let (dead, stop, told) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Told::default())),
    );
    let workers = load(
        bases.clone(),
        env.admin.clone(),
        6,
        dead.clone(),
        stop.clone(),
        told.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    dead.lock().unwrap().push(victim);
    r[victim].kill();
    let killed_at = Instant::now();
    // The survivors take the periodic work over within a few seconds.
    let new_audit = leader(&bases, &[victim], "audit", Duration::from_secs(10)).await;
    let new_rotation = leader(&bases, &[victim], "rotation", Duration::from_secs(10)).await;
    let took_over = killed_at.elapsed();
    assert_ne!(new_audit, victim);
    if rotation_leader != victim {
        assert_eq!(new_rotation, rotation_leader, "a live leader keeps its task");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let told = std::mem::take(&mut *told.lock().unwrap());
    assert!(told.issued.len() > 50 && !told.revoked.is_empty() && !told.redeemed.is_empty());
    let survivors: Vec<_> = told.failures.iter().filter(|(i, _)| *i != victim).collect();
    assert!(survivors.is_empty(), "survivors answered 5xx: {survivors:?}");
    assert!(took_over < Duration::from_secs(10), "{took_over:?}");
    everything_told_is_stored(&env, &told).await;
    // Exactly one replica leads each task now.
    for task in ["audit", "rotation"] {
        let mut n = 0;
        for (i, b) in bases.iter().enumerate() {
            if i != victim && leads(b, task).await == Some(true) {
                n += 1;
            }
        }
        assert_eq!(n, 1, "{task}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crashed_and_restarted_under_load_gives_only_201_or_503_then_recovers() {
    let cluster = PgCluster::start();
    let env = Env::build("", Some(create_database_on(&cluster.admin_url()).await)).await;
    let r = Replicas::start(&env, 2, &[]).await;
    let bases = r.bases();
    let (stop, told) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Told::default())),
    );
    let workers = load(
        bases.clone(),
        env.admin.clone(),
        4,
        Arc::new(Mutex::new(Vec::new())),
        stop.clone(),
        told.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    cluster.stop(true); // a crash: no shutdown checkpoint, every connection cut
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for b in &bases {
        let res = reqwest::get(format!("{b}/readyz")).await.unwrap();
        assert_eq!(res.status(), 503);
        let p: Value = res.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains("store"), "{p}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outage_statuses = told.lock().unwrap().statuses.len();

    cluster.restart();
    // Service resumes by itself: ready again, and issuing on every replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    for b in &bases {
        loop {
            let ready = reqwest::get(format!("{b}/readyz")).await.unwrap().status() == 200;
            if ready
                && post(
                    b,
                    "/v1/tokens",
                    Some(&env.admin),
                    json!({"subject": "s", "audience": "a"}),
                )
                .await
                .is_some_and(|(s, _, _)| s == 201)
            {
                break;
            }
            assert!(Instant::now() < deadline, "{b} did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let recovered = down.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let told = std::mem::take(&mut *told.lock().unwrap());
    let mut counts = std::collections::BTreeMap::new();
    for (s, _, _) in &told.statuses {
        *counts.entry(*s).or_insert(0) += 1;
    }
    // issue 201, redeem 200 (or 409 for a revoked one), revoke 200; 503 while the store is
    // away; nothing else, and never a 500.
    assert!(
        counts.keys().all(|s| [200, 201, 409, 401, 503].contains(s)),
        "{counts:?}"
    );
    assert!(
        counts.get(&503).copied().unwrap_or(0) > 0,
        "the outage was seen: {counts:?}"
    );
    assert!(
        told.statuses
            .iter()
            .filter(|(s, _, _)| *s == 503)
            .all(|(_, _, ra)| *ra),
        "503 without Retry-After"
    );
    let slowest = told.statuses.iter().map(|(_, d, _)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_secs(10),
        "a request hung for {slowest:?}"
    );
    assert!(outage_statuses > 0);
    assert!(recovered < Duration::from_secs(40));
    everything_told_is_stored(&env, &told).await;
    // Every batch failed during the outage, the same few ways: the log says so once per
    // way (and how many more when it ends), not once per batch.
    for i in 0..2 {
        let lines = r[i]
            .log_text()
            .lines()
            .filter(|l| l.contains("store commit failed"))
            .count();
        assert!(
            lines <= 8,
            "replica {i} wrote {lines} 'store commit failed' lines for one outage"
        );
    }

    // The change listener reconnected too: a revocation on one replica reaches a stream on
    // the other.
    let mut sse = SseClient::connect(&bases[1], None).await;
    crate::stream::revocation_arrives(&mut sse, &bases[0], &env.admin).await;
    drop(r);
    drop(env);
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_rotation_with_three_replicas_creates_one_key_per_period() {
    let env = Env::on_postgres(
        "[rotation]\nrotate_every_seconds = 4\npublish_lead_seconds = 2\njwks_max_age_seconds = 1\ncheck_every_ms = 200\n",
    )
    .await;
    let mut r = Replicas::start(&env, 3, &[]).await;
    let bases = r.bases();
    // At every moment exactly one replica runs the schedule.
    let until = Instant::now() + Duration::from_secs(11);
    while Instant::now() < until {
        let mut leading = Vec::new();
        for (i, b) in bases.iter().enumerate() {
            if leads(b, "rotation").await == Some(true) {
                leading.push(i);
            }
        }
        assert_eq!(
            leading.len(),
            1,
            "replicas running the rotation schedule: {leading:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..3 {
        r[i].stop();
    }
    let db = env.db().await;
    let created = db
        .strings(
            "SELECT target FROM audit_log WHERE action = 'key.rotate' AND actor = 'scheduler' ORDER BY seq",
            &[],
        )
        .await;
    let rows = db.int("SELECT count(*) FROM signing_keys", &[]).await;
    db.close().await;
    // Init's key at T0; the schedule makes one key per 4 s period from T0 + 2 s on.
    assert!((2..=4).contains(&created.len()), "{created:?}");
    assert_eq!(rows as usize, created.len() + 1);
    // Only one replica made each key: no replica generated a key it could not record.
    let logs: Vec<String> = (0..3).map(|i| r[i].log_text()).collect();
    let generated: Vec<usize> = logs
        .iter()
        .map(|l| l.matches("generated P-256 signing key").count())
        .collect();
    assert_eq!(
        generated.iter().sum::<usize>(),
        created.len(),
        "keys generated in the HSM vs recorded"
    );
    assert_eq!(
        generated.iter().filter(|n| **n > 0).count(),
        1,
        "keys made by several replicas: {generated:?}"
    );
    let logs = logs.concat();
    assert!(
        !logs.contains("could not be recorded"),
        "a replica lost a race and threw a key away"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tpm_replicas_sign_with_their_own_tpm_and_verify_each_other() {
    let (tpm_a, tpm_b) = (Swtpm::start(), Swtpm::start());
    let env = Env::on_tpm_store(
        &tpm_a.tcti(),
        "",
        Some(crate::common::pg::create_database().await),
    )
    .await;
    let mut r = Replicas::start(&env, 1, &[]).await;
    let tcti_b = tpm_b.tcti();
    r.add(&env, &[("KEYGATE_TPM_TCTI", tcti_b.as_str())]).await;
    let (a, b) = (r[0].base.clone(), r[1].base.clone());

    // Both keys are in the one JWKS, on both replicas (A learns B's key when B makes it).
    let deadline = Instant::now() + Duration::from_secs(3);
    while jwks(&a).await.keys.len() < 2 {
        assert!(Instant::now() < deadline, "A never published B's key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(jwks(&a).await, jwks(&b).await);
    let ta = issue(&a, &env.admin, json!({"subject": "from-a", "audience": "fleet"})).await;
    let tb = issue(&b, &env.admin, json!({"subject": "from-b", "audience": "fleet"})).await;
    assert_eq!(ta["kid"], env.kid.as_str());
    assert_ne!(ta["kid"], tb["kid"], "each replica signs in its own TPM");
    for base in [&a, &b] {
        let v = Verifier::new(&jwks(base).await, VerifierConfig::new(PUBLIC_URL, "fleet")).unwrap();
        for t in [&ta, &tb] {
            v.verify(t["token"].as_str().unwrap()).unwrap();
            assert_eq!(
                introspect(base, &env.admin, t["token"].as_str().unwrap()).await["active"],
                true
            );
        }
    }
    let keys: Value = crate::common::get_authed(&a, "/v1/keys", &env.admin)
        .await
        .json()
        .await
        .unwrap();
    let devices: std::collections::BTreeSet<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices.len(), 2, "{keys}");
    assert!(devices.iter().all(|d| d.starts_with("tpm:")));
    // A key proof is answered by the replica whose TPM holds the key; the other one says
    // where to ask (421).
    let http = reqwest::Client::new();
    for (base, own, other) in [(&a, &ta, &tb), (&b, &tb, &ta)] {
        let ask = |kid: &Value| {
            http.post(format!(
                "{base}/v1/keys/{}/proof/challenge",
                kid.as_str().unwrap()
            ))
            .send()
        };
        let r = ask(&own["kid"]).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["kind"], "tpm");
        let r = ask(&other["kid"]).await.unwrap();
        assert_eq!(r.status(), 421);
        let p: Value = r.json().await.unwrap();
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("ask the replica that signs with it"),
            "{p}"
        );
    }
    drop(r);
    drop((tpm_a, tpm_b));
}
