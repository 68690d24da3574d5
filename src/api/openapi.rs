//! The OpenAPI 3.1 document, generated from the handlers and body types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::*;
use super::enroll::{
    self, EnrollChallengeRequest, EnrollChallengeResponse, EnrollCompleteRequest, EnrollCompleteResponse,
    MachineView, RegisterMachineRequest,
};
use super::error::Problem;
use super::{certs, keyproof, lifecycle, operator, public};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("keygate API token (kg_...)"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "keygate", description = "Hardware-backed issuer of provisioning tokens (see docs/api-notes.md)"),
    paths(
        public::jwks, public::configuration, public::openid_configuration, public::healthz, public::readyz, public::metrics, public::openapi,
        operator::issue_token, operator::introspect, operator::list_keys,
        operator::create_api_token, operator::list_api_tokens, operator::delete_api_token,
        operator::audit, operator::revoke, operator::revocations,
        lifecycle::redeem, lifecycle::revocation_stream, lifecycle::rotate_key, lifecycle::destroy_key,
        enroll::challenge, enroll::complete, enroll::register_machine, enroll::list_machines,
        enroll::revoke_machine, certs::crl, certs::revoke_certificate,
        keyproof::key_proof_challenge, keyproof::key_proof,
    ),
    components(schemas(
        Problem, IssueTokenRequest, IssueTokenResponse, IntrospectRequest, IntrospectResponse, KeyView,
        CreateApiTokenRequest, CreateApiTokenResponse, ApiTokenView, Configuration, Status,
        AuditPage, AuditEntryView, CheckpointView, RevokeRequest, RevokeResponse,
        RotateRequest, RedeemRequestBody, RedeemResponse,
        EnrollChallengeRequest, EnrollChallengeResponse, EnrollCompleteRequest, EnrollCompleteResponse,
        RegisterMachineRequest, MachineView, ConfirmationView, OidcConfiguration,
        certs::CertificateRevokeResponse, keyproof::KeyProofChallengeResponse, keyproof::KeyProofRequest,
        keyproof::KeyProofResponse, keyproof::TpmEvidenceView, keyproof::Pkcs11EvidenceView,
    )),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

/// The endpoints anyone may call, rate-limited per source (429).
const OPEN: [&str; 5] = [
    "/v1/tokens/redeem",
    "/v1/enroll/challenge",
    "/v1/enroll/complete",
    "/v1/keys/{kid}/proof/challenge",
    "/v1/keys/{kid}/proof",
];

/// The document as JSON.
pub fn document() -> String {
    let Ok(mut doc) = serde_json::to_value(ApiDoc::openapi()) else {
        return "{}".into();
    };
    complete(&mut doc);
    serde_json::to_string(&doc).unwrap_or_else(|_| "{}".into())
}

/// Adds the answers any operation of its kind can give, which the handlers do not list
/// one by one (a client checking answers against the document must find every one), and
/// gives every problem its media type, `application/problem+json` (RFC 9457).
fn complete(doc: &mut serde_json::Value) {
    let problem =
        serde_json::json!({"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}});
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        let Some(ops) = ops.as_object_mut() else { continue };
        for op in ops.values_mut() {
            let body = op.get("requestBody").is_some();
            let secured = op.get("security").is_some();
            let mut common = vec![
                (
                    "400",
                    "Invalid request: a query, path or header the server cannot use",
                ),
                ("408", "The request was not completed within the request timeout"),
                ("500", "Internal error (logged; the detail says nothing more)"),
                (
                    "503",
                    "The key backend or the store is unavailable, or the device queue is full; see Retry-After",
                ),
            ];
            if body {
                common.push(("413", "The body exceeds 64 KiB"));
                common.push(("415", "The body's media type is not accepted"));
            }
            if secured {
                common.push(("401", "Missing, unknown or expired API token"));
                common.push(("403", "The API token lacks the scope"));
            }
            if path.contains('{') {
                common.push(("404", "No such object"));
            }
            if OPEN.contains(&path.as_str()) {
                common.push(("429", "Too many requests from this source; see Retry-After"));
            }
            let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) else {
                continue;
            };
            for (code, description) in common {
                responses
                    .entry(code)
                    .or_insert_with(|| serde_json::json!({"description": description}));
            }
            for (code, r) in responses.iter_mut() {
                if code.as_str() >= "400" {
                    r["content"] = problem.clone();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for p in [
            "/v1/tokens",
            "/v1/tokens/introspect",
            "/v1/keys",
            "/v1/api-tokens",
            "/v1/api-tokens/{id}",
            "/.well-known/jwks.json",
            "/readyz",
            "/v1/tokens/redeem",
            "/v1/revocations/stream",
            "/v1/keys/rotate",
            "/v1/keys/{kid}",
            "/v1/enroll/challenge",
            "/v1/enroll/complete",
            "/v1/enroll/machines",
            "/v1/enroll/machines/{ek_hash}",
        ] {
            assert!(doc["paths"].get(p).is_some(), "missing {p}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn queries_are_query_parameters_and_every_problem_is_problem_json() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        for (path, method) in [
            ("/v1/audit", "get"),
            ("/v1/revocations", "get"),
            ("/v1/revocations/stream", "get"),
        ] {
            for p in doc["paths"][path][method]["parameters"].as_array().unwrap() {
                if p["name"] == "after" || p["name"] == "limit" {
                    assert_eq!(p["in"], "query", "{path} {}", p["name"]);
                }
            }
        }
        let mut problems = 0;
        for ops in doc["paths"].as_object().unwrap().values() {
            for op in ops.as_object().unwrap().values() {
                for (code, r) in op["responses"].as_object().unwrap() {
                    if code.as_str() >= "400" {
                        assert!(r["content"]["application/problem+json"].is_object(), "{code}");
                        problems += 1;
                    }
                }
            }
        }
        assert!(problems > 100);
        let redeem = &doc["paths"]["/v1/tokens/redeem"]["post"]["responses"];
        assert!(redeem["429"].is_object() && redeem["413"].is_object() && redeem["415"].is_object());
        assert!(doc["paths"]["/v1/keys"]["get"]["responses"]["429"].is_null());
    }
}
