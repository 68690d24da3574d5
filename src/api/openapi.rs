//! The OpenAPI 3.1 document, generated from the handlers and body types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::*;
use super::enroll::{
    self, EnrollChallengeRequest, EnrollChallengeResponse, EnrollCompleteRequest, EnrollCompleteResponse,
    MachineView, RegisterMachineRequest,
};
use super::error::Problem;
use super::{lifecycle, operator, public};

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
    info(title = "keygate", description = "Hardware-backed issuer of provisioning tokens (see API.md)"),
    paths(
        public::jwks, public::configuration, public::healthz, public::readyz, public::metrics, public::openapi,
        operator::issue_token, operator::introspect, operator::list_keys,
        operator::create_api_token, operator::list_api_tokens, operator::delete_api_token,
        operator::audit, operator::revoke, operator::revocations,
        lifecycle::redeem, lifecycle::revocation_stream, lifecycle::rotate_key, lifecycle::destroy_key,
        enroll::challenge, enroll::complete, enroll::register_machine, enroll::list_machines,
        enroll::revoke_machine,
    ),
    components(schemas(
        Problem, IssueTokenRequest, IssueTokenResponse, IntrospectRequest, IntrospectResponse, KeyView,
        CreateApiTokenRequest, CreateApiTokenResponse, ApiTokenView, Configuration, Status,
        AuditPage, AuditEntryView, CheckpointView, RevokeRequest, RevokeResponse,
        RotateRequest, RedeemRequestBody, RedeemResponse,
        EnrollChallengeRequest, EnrollChallengeResponse, EnrollCompleteRequest, EnrollCompleteResponse,
        RegisterMachineRequest, MachineView,
    )),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

/// The document as JSON.
pub fn document() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into())
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
}
