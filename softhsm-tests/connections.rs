//! Connection hygiene of `keygate serve`: idle, trickling (slowloris) and forgotten
//! keep-alive connections are closed by the header-read timeout, and running out of file
//! descriptors is survived: the service keeps answering while it is attacked.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Env, Server, issue, metric};

const HEADER_TIMEOUT: &str = "[http]\nheader_read_timeout_seconds = 2\n";

/// Waits until the server closes `conn` (EOF or reset), or `deadline`; true if it closed.
async fn closed_by_server(conn: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // an answer (a 408 for a trickled request) may come before the close
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_trickling_and_kept_alive_connections_are_closed_and_the_service_answers() {
    let env = Env::with_toml(HEADER_TIMEOUT).await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    let addr = env.config.listen;
    let started = Instant::now();
    // 300 connections that never send a byte
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // 50 that trickle a request line and headers one byte every 300 ms, for 20 s
    let mut trickling = Vec::new();
    for i in 0..50 {
        trickling.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: {}",
                "a".repeat(80)
            );
            for b in head.bytes() {
                if c.write_all(&[b]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            false
        }));
    }
    // one that is answered once and then kept alive, silent
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // under the attack, health checks and issuance answer
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let r = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let t = issue(&base, &env.admin, json!({"subject": "n", "audience": "a"})).await;
        assert!(t["token"].is_string());
    }
    // every attacking connection is closed by the server within the timeout (2 s) and a
    // margin for a loaded machine; without the timeout they stay open for good
    let deadline = started + Duration::from_secs(12);
    for c in idle.iter_mut() {
        assert!(
            closed_by_server(c, deadline).await,
            "an idle connection was left open"
        );
    }
    assert!(
        closed_by_server(&mut kept, deadline).await,
        "an idle kept-alive connection was left open"
    );
    for t in trickling {
        assert!(t.await.unwrap(), "a trickling connection was left open");
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(
        metric(&base, "keygate_http_connections").await < 10.0,
        "attack connections still counted"
    );
    server.stop();
}

/// Started with 192 file descriptors, attacked with 400 idle connections: no accept error
/// loop, the connections past the limit are closed at once and counted, and as soon as the
/// header timeout frees slots, /healthz and issuance answer again.
#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_survived() {
    let env = Env::with_toml(HEADER_TIMEOUT).await;
    let log = env.dir.path().join("serve.log");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=192:192", "--", env!("CARGO_BIN_EXE_keygate")]);
    for (k, v) in env.keygate().get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let base = env.base_url();
    let server = Server::spawn(cmd, &log, &[], &base).await;
    let addr = env.config.listen;
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(c) = TcpStream::connect(addr).await {
            idle.push(c);
        }
    }
    // the attackers stay connected; the server frees its slots after the header timeout
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never answered while attacked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = issue(&base, &env.admin, json!({"subject": "n", "audience": "a"})).await;
    assert!(t["token"].is_string());
    assert!(metric(&base, "keygate_http_connections_refused_total").await > 0.0);
    drop(idle);
    server.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Too many open files"), "{text}");
    assert!(
        text.contains("max_connections=96"),
        "the limit was not derived from 192: {text}"
    );
}
