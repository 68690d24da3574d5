//! docs/api.md, the HTTP reference, says what `/openapi.json` (generated from the code)
//! says: the same operations, credentials and success codes, and every request and answer
//! member of each operation.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::common::Env;

/// (METHOD, path, credential, success status) of every row of the endpoint table.
fn documented(doc: &str) -> BTreeSet<(String, String, String, String)> {
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix("| `")?.split(" | ").collect();
            let [method, path, cred, ok] = cells[..] else {
                return None;
            };
            Some((
                method.trim_end_matches('`').to_owned(),
                path.trim_matches('`').to_owned(),
                cred.trim_matches('`').to_owned(),
                ok.trim_end_matches(" |").to_owned(),
            ))
        })
        .collect()
}

/// Property names of the schema `s` points at (through `$ref`, or an array's items).
fn members(doc: &Value, s: &Value) -> Vec<String> {
    let s = if s["type"] == "array" { &s["items"] } else { s };
    let Some(r) = s["$ref"].as_str() else {
        return Vec::new();
    };
    let name = r.rsplit('/').next().unwrap();
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_reference_matches_the_openapi_document() {
    let env = Env::new().await;
    let (base, _svc) = env.serve().await;
    let api: Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let mut generated = BTreeSet::new();
    for (path, ops) in api["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if !["get", "post", "delete", "put", "patch"].contains(&method.as_str()) {
                continue;
            }
            let cred = op["security"]
                .as_array()
                .and_then(|s| s.first())
                .and_then(|s| s.as_object()?.values().next()?.as_array()?.first()?.as_str())
                .unwrap_or("none")
                .to_owned();
            let ok = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .find(|c| c.starts_with('2'))
                .unwrap()
                .clone();
            let m = method.to_uppercase();
            // the operation's section names every member it takes and answers
            let heading = format!("### `{m} {path}`");
            let section = doc
                .split_once(&heading)
                .map(|(_, rest)| rest.split("\n### ").next().unwrap())
                .unwrap_or_else(|| panic!("docs/api.md has no section {heading}"));
            let mut names = Vec::new();
            for c in op["requestBody"]["content"].as_object().into_iter().flatten() {
                names.extend(members(&api, &c.1["schema"]));
            }
            for c in op["responses"][&ok]["content"].as_object().into_iter().flatten() {
                names.extend(members(&api, &c.1["schema"]));
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                names.push(p["name"].as_str().unwrap().to_owned());
            }
            for n in names {
                assert!(
                    section.contains(&format!("`{n}`")),
                    "{heading} does not mention `{n}`"
                );
            }
            generated.insert((m, path.clone(), cred, ok));
        }
    }
    let documented = documented(&doc);
    let missing: Vec<_> = generated.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&generated).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/api.md lacks {missing:?} and has {extra:?} that /openapi.json does not"
    );
    assert!(generated.len() >= 27, "{} operations", generated.len());
}
