//! The revocation event stream (Server-Sent Events): live delivery, resume without a gap,
//! and a revoked token refused everywhere.

use std::time::Duration;

use keygate::token::{Verifier, VerifierConfig, VerifyError};
use serde_json::{Value, json};

use crate::common::{Env, introspect, issue, jwks};
use crate::redeem::redeem;

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// A connected SSE client that parses events as they arrive.
pub struct SseClient {
    res: reqwest::Response,
    buf: String,
}

impl SseClient {
    pub async fn connect(base: &str, last_event_id: Option<&str>) -> SseClient {
        let mut r = reqwest::Client::new().get(format!("{base}/v1/revocations/stream"));
        if let Some(id) = last_event_id {
            r = r.header("Last-Event-ID", id);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        SseClient {
            res,
            buf: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped); None after `wait` without one.
    pub async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk()).await.ok()?;
            let bytes = chunk.unwrap()?;
            self.buf.push_str(std::str::from_utf8(&bytes).unwrap());
        }
    }
}

/// Issues a token on `base`, revokes it there, and waits (5 s per event at most) until
/// `sse`, connected beforehand, delivers its event.
pub async fn revocation_arrives(sse: &mut SseClient, base: &str, admin: &str) {
    let t = issue(base, admin, json!({"subject": "revoked-later", "audience": "a"})).await;
    let jti = t["jti"].as_str().unwrap();
    assert_eq!(crate::common::revoke(base, admin, jti, None).await.status(), 200);
    loop {
        let ev = sse
            .next(Duration::from_secs(5))
            .await
            .expect("the revocation event");
        if ev.data["jti"] == jti {
            return;
        }
    }
}

async fn revoke(base: &str, api: &str, jti: &str) {
    assert_eq!(crate::common::revoke(base, api, jti, None).await.status(), 200);
}

async fn revocations_stream_live_and_resume_from_last_event_id_without_a_gap(env: Env) {
    let (base, _svc) = env.serve().await;
    let mut tokens = Vec::new();
    for i in 0..6 {
        let t = issue(
            &base,
            &env.admin,
            json!({"subject": format!("n{i}"), "audience": "fleet"}),
        )
        .await;
        tokens.push(t);
    }
    let jti = |i: usize| tokens[i]["jti"].as_str().unwrap().to_owned();
    let mut live = SseClient::connect(&base, None).await;
    assert_eq!(
        live.next(Duration::from_millis(300)).await,
        None,
        "nothing revoked yet"
    );
    for i in 0..3 {
        revoke(&base, &env.admin, &jti(i)).await;
        let ev = live.next(Duration::from_secs(5)).await.expect("a live event");
        assert_eq!(ev.event, "revoked");
        assert_eq!(ev.id, (i + 1).to_string());
        assert_eq!(ev.data["jti"], jti(i));
        assert_eq!(ev.data["seq"], (i + 1) as i64);
        assert!(ev.data["exp"].as_i64().unwrap() > keygate::authority::now());
    }
    drop(live);
    // While disconnected, two more are revoked; a third comes after the reconnect.
    revoke(&base, &env.admin, &jti(3)).await;
    revoke(&base, &env.admin, &jti(4)).await;
    let mut resumed = SseClient::connect(&base, Some("3")).await;
    let a = resumed.next(Duration::from_secs(5)).await.unwrap();
    let b = resumed.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!((a.id.as_str(), b.id.as_str()), ("4", "5"));
    assert_eq!(
        (a.data["jti"].clone(), b.data["jti"].clone()),
        (json!(jti(3)), json!(jti(4)))
    );
    revoke(&base, &env.admin, &jti(5)).await;
    let c = resumed.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(c.id, "6");
    assert_eq!(
        resumed.next(Duration::from_millis(300)).await,
        None,
        "no duplicates"
    );
    // A fresh client gets the whole unexpired backlog, in order.
    let mut fresh = SseClient::connect(&base, None).await;
    for want in 1..=6 {
        assert_eq!(
            fresh.next(Duration::from_secs(5)).await.unwrap().id,
            want.to_string()
        );
    }
    // A Last-Event-ID that is not a seq is a 400 problem.
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/revocations/stream"))
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
on_both_stores!(revocations_stream_live_and_resume_from_last_event_id_without_a_gap);

async fn a_revoked_token_is_refused_by_redeem_introspection_and_the_offline_verifier(env: Env) {
    let (base, _svc) = env.serve().await;
    let t = issue(
        &base,
        &env.admin,
        json!({"subject": "n", "audience": "fleet", "one_time": true}),
    )
    .await;
    let (token, jti) = (t["token"].as_str().unwrap(), t["jti"].as_str().unwrap());
    let mut live = SseClient::connect(&base, None).await;
    revoke(&base, &env.admin, jti).await;
    assert_eq!(live.next(Duration::from_secs(5)).await.unwrap().data["jti"], jti);
    let (s, p) = redeem(&base, json!({ "token": token }), None).await;
    assert_eq!(s, 401);
    assert!(p["detail"].as_str().unwrap().contains("revoked"));
    let i = introspect(&base, &env.admin, token).await;
    assert_eq!(
        (i["active"].as_bool(), i["revoked"].as_bool()),
        (Some(false), Some(true))
    );
    let v = Verifier::new(
        &jwks(&base).await,
        VerifierConfig::new(env.config.issuer(), "fleet"),
    )
    .unwrap();
    let list = reqwest::get(format!("{base}/v1/revocations"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list = v.verify_revocations(&list).unwrap();
    assert!(v.verify(token).is_ok(), "the signature alone is fine");
    assert!(matches!(
        v.verify_not_revoked(token, &list),
        Err(VerifyError::Revoked(_))
    ));
}
on_both_stores!(a_revoked_token_is_refused_by_redeem_introspection_and_the_offline_verifier);

async fn sigterm_ends_open_streams_and_the_server_exits(env: Env) {
    let log = env.dir.path().join("serve.log");
    let mut server = crate::common::Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(SseClient::connect(&base, None).await);
    }
    crate::common::signal(&server.child, libc::SIGTERM);
    // Without closing the streams, the graceful shutdown would wait for them forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "keygate serve did not exit with event streams open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
    for c in &mut clients {
        assert_eq!(c.next(Duration::from_secs(2)).await, None, "the stream ended");
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("signed audit checkpoint"),
        "the shutdown checkpoint was made"
    );
}
on_both_stores!(sigterm_ends_open_streams_and_the_server_exits);
