//! The deploy files stay true: the alert rules pass Prometheus' own checks and unit tests,
//! every metric they and the dashboard read is one keygate exports, the container's build
//! stage has what tss-esapi needs, and its runtime stage installs every library the binary
//! links (`ldd`); and the gauges alerts rely on are on `/metrics` of a running server.

use std::path::Path;
use std::process::Command;

use crate::common::{Env, Server};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = root().join("deploy/prometheus");
    run(Command::new("promtool")
        .current_dir(&dir)
        .args(["check", "rules", "alerts.yml"]));
    run(Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "alerts_test.yml"]));
}

/// Every `keygate_*` name in `text`, with histogram suffixes taken off.
fn metric_names(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, _) in text.match_indices("keygate_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[test]
fn alerts_and_dashboard_read_only_metrics_keygate_exports() {
    let mut source = String::new();
    let mut todo = vec![root().join("src")];
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") {
            source.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/keygate-dashboard.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 8, "{file}: only {names:?}");
        for n in names {
            assert!(
                source.contains(&format!("\"{n}\"")),
                "{file} reads {n}, which keygate does not export"
            );
        }
    }
}

#[test]
fn the_container_builds_with_tss_and_runs_with_every_library_it_links() {
    let file = std::fs::read_to_string(root().join("deploy/container/Containerfile")).unwrap();
    let build = &file[..file.rfind("\nFROM ").expect("two stages")];
    for pkg in ["pkg-config", "libtss2-dev"] {
        assert!(build.contains(pkg), "the build stage does not install {pkg}");
    }
    run(
        Command::new(root().join("deploy/container/check-runtime-libs.sh"))
            .arg(env!("CARGO_BIN_EXE_keygate"))
            .arg(root().join("deploy/container/Containerfile")),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_server_exports_the_gauges_the_alerts_read() {
    let env = Env::with_toml("[rotation]\nrotate_every_seconds = 86400\n").await;
    let log = env.dir.path().join("serve.log");
    let server = Server::start(&env, &log, &[]).await;
    let base = env.base_url();
    // the first refresh runs at start
    let mut text = String::new();
    for _ in 0..100 {
        text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("keygate_key_retire_timestamp_seconds{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("keygate_backend_ready"), 1.0);
    assert_eq!(value("keygate_store_ready"), 1.0);
    let now = keygate::authority::now() as f64;
    assert!((now - 3600.0..=now).contains(&value("keygate_audit_last_entry_timestamp_seconds")));
    let retire = value(&format!(
        "keygate_key_retire_timestamp_seconds{{kid=\"{}\"}}",
        env.kid
    ));
    assert!(retire > now && retire <= now + 86400.0, "{retire}");
    server.stop();
}
