//! A replica and PostgreSQL with a network between them that fails the way networks do:
//! packets dropped for a while (nothing refused, nothing closed), and connections that go
//! silent for good while new ones work (a failover behind a moved address).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::cut::Cuttable;
use crate::common::replicas::Replicas;
use crate::common::{Env, issue, jwks};
use crate::faults::post;
use crate::stream::SseClient;

/// A cuttable wire to the env's PostgreSQL server, and the env's store URL through it.
async fn wire_to(env: &Env) -> (Cuttable, String) {
    let url = env.pg_url.clone().unwrap();
    let port: u16 = url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let wire = Cuttable::start(port).await;
    let via = url.replace(&format!(":{port}/"), &format!(":{}/", wire.port));
    (wire, via)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_cut_to_postgresql_gives_503s_within_seconds_and_service_resumes() {
    let env = Env::on_postgres("").await;
    let (wire, via) = wire_to(&env).await;
    let r = Replicas::start(&env, 1, &[("KEYGATE_STORE_URL", via.as_str())]).await;
    let base = r[0].base.clone();
    let before = issue(&base, &env.admin, json!({"subject": "before", "audience": "a"})).await;
    let before = before["token"].as_str().unwrap().to_owned();

    wire.cut(true);
    let cut_at = Instant::now();
    // Requests that need the database (an issuance; introspection of a token of ours, whose
    // revocation status only the store knows), several at once: each is answered, 503 with
    // Retry-After, within a few seconds; the JWKS, which does not need it, at once.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (base, admin, before) = (base.clone(), env.admin.clone(), before.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let a = if i % 2 == 0 {
                    post(
                        &base,
                        "/v1/tokens",
                        Some(&admin),
                        json!({"subject": "s", "audience": "a"}),
                    )
                    .await
                } else {
                    post(
                        &base,
                        "/v1/tokens/introspect",
                        Some(&admin),
                        json!({"token": before}),
                    )
                    .await
                };
                (a.map(|(s, _, ra)| (s, ra)), started.elapsed())
            })
        })
        .collect();
    let started = Instant::now();
    jwks(&base).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the JWKS waited for the database"
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    // An issuance's bound is the store's (6 s), counted from when its signature was made
    // and the token handed to the writer (milliseconds here), not from when it was queued
    // for signing (which added the 2 s of the device wait); a read's is 3 s.
    for t in tasks {
        let (answer, took) = t.await.unwrap();
        assert_eq!(answer, Some((503, true)), "after {took:?}");
        assert!(took < Duration::from_millis(7000), "a request waited {took:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The network comes back: service resumes by itself.
    wire.cut(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = post(
            &base,
            "/v1/tokens",
            Some(&env.admin),
            json!({"subject": "after", "audience": "a"}),
        )
        .await
        .is_some_and(|(s, _, _)| s == 201);
        if ok && reqwest::get(format!("{base}/readyz")).await.unwrap().status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the cut ({:?})",
            cut_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(r);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_go_silent_for_good_are_replaced_and_the_listener_reconnects() {
    let env = Env::on_postgres("").await;
    let (wire, via) = wire_to(&env).await;
    // Replica 0 reaches PostgreSQL through the wire, with a read pool of two connections
    // (so two connections given up on would exhaust it, were they kept); replica 1 directly.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let small = env.dir.path().join("small-pool.toml");
    std::fs::write(
        &small,
        text.replace("[store]\n", "[store]\nmax_connections = 2\n"),
    )
    .unwrap();
    let small = small.display().to_string();
    let mut r = Replicas::start(
        &env,
        1,
        &[("KEYGATE_STORE_URL", via.as_str()), ("KEYGATE_CONFIG", &small)],
    )
    .await;
    r.add(&env, &[]).await;
    let (behind, direct) = (r[0].base.clone(), r[1].base.clone());
    // both pool connections open
    let warm: Vec<_> = (0..8)
        .map(|_| {
            let (b, a) = (behind.clone(), env.admin.clone());
            tokio::spawn(async move { issue(&b, &a, json!({"subject": "before", "audience": "a"})).await })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }

    // Every open connection of replica 0 (pool, writer, change listener) goes silent for
    // good, as after a failover; new connections work. It must replace them by itself.
    wire.sever();
    let severed = Instant::now();
    loop {
        let ok = post(
            &behind,
            "/v1/tokens",
            Some(&env.admin),
            json!({"subject": "s", "audience": "a"}),
        )
        .await
        .is_some_and(|(s, _, _)| s == 201);
        if ok {
            break;
        }
        assert!(
            severed.elapsed() < Duration::from_secs(30),
            "no recovery from silent connections"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The change listener noticed too: a revocation on the other replica reaches a stream
    // on this one (wait out the listener's check, then a little).
    let mut sse = SseClient::connect(&behind, None).await;
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(severed.elapsed())).await;
    crate::stream::revocation_arrives(&mut sse, &direct, &env.admin).await;
    drop(r);
}

/// The status of an issuance sent to `base` with the API token `secret`.
async fn issue_with(base: &str, secret: &str) -> u16 {
    post(
        base,
        "/v1/tokens",
        Some(secret),
        json!({"subject": "s", "audience": "a"}),
    )
    .await
    .map_or(0, |(s, _, _)| s)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_token_deleted_elsewhere_is_refused_by_a_replica_that_heard_no_announcement() {
    // A lease far longer than this test's steps, so that only the lease and the DELETE's
    // wait for it, not timing luck, can make replica 0 refuse the token.
    let env = Env::on_postgres("[api_tokens]\ncache_lease_ms = 4000\n").await;
    let (wire, via) = wire_to(&env).await;
    let mut r = Replicas::start(&env, 1, &[("KEYGATE_STORE_URL", via.as_str())]).await;
    r.add(&env, &[]).await;
    let (behind, direct) = (r[0].base.clone(), r[1].base.clone());
    let created = crate::common::create_api_token(&direct, &env.admin, &["tokens:issue"], None).await;
    let secret = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    // Replica 0 reads the token, and may keep it for its lease.
    assert_eq!(issue_with(&behind, &secret).await, 201);

    // Replica 0's connections go quiet: its listener hears no NOTIFY of the deletion.
    wire.cut(true);
    let started = Instant::now();
    let res = crate::common::delete_authed(&direct, &format!("/v1/api-tokens/{id}"), &env.admin).await;
    assert_eq!(res.status(), 204);
    assert!(
        started.elapsed() >= Duration::from_millis(4000),
        "the DELETE answered before replica 0's lease on the row had run out"
    );
    // Right after the DELETE answered, replica 0 is asked; its store answers once the wire
    // is back (before a notification could have cleared anything, the request was in).
    let asked = tokio::spawn({
        let (behind, secret) = (behind.clone(), secret.clone());
        async move { issue_with(&behind, &secret).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    wire.cut(false);
    assert_eq!(
        asked.await.unwrap(),
        401,
        "replica 0 accepted a deleted API token"
    );
    drop(r);
}
