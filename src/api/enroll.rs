//! Attestation-gated enrollment endpoints (the HTTP contract): the challenge and its completion (no
//! auth: the TPM's proofs are the credential), and the machines an operator manages
//! (scope `enroll:admin`). Each converts the request and calls the authority.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{Remote, StrictJson};
use super::operator::authorize;
use super::{AppState, no_store};
use crate::authority::{ChallengeRequest, CompleteRequest, EK_URN_PREFIX, Scope, rfc3339};
use crate::store::MachineRow;

/// POST /v1/enroll/challenge
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollChallengeRequest {
    /// Base64 marshalled TPM2B_PUBLIC of the EK (`tpm2_createek -u ek.pub -f tss`).
    pub ek_pub: String,
    /// Base64 DER EK certificate (from the TPM's NV, e.g. index 0x01c00002).
    #[serde(default)]
    pub ek_certificate: Option<String>,
    /// Base64 marshalled TPM2B_PUBLIC of the AK (`tpm2_createak -u ak.pub`).
    pub ak_pub: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollChallengeResponse {
    pub enrollment_id: String,
    /// Base64 marshalled TPM2B_ID_OBJECT.
    pub id_object: String,
    /// Base64 marshalled TPM2B_ENCRYPTED_SECRET.
    pub encrypted_secret: String,
    /// Base64 of the same pair in the file format `tpm2_activatecredential -i` reads.
    pub tpm2_tools_credential: String,
    /// Base64; the quote's qualifying data.
    pub nonce: String,
    /// PCRs to quote, like `sha256:0,1,2,3,4,5,6,7`.
    pub pcr_selection: String,
    /// RFC 3339 UTC; the challenge can be completed once before then.
    pub expires_at: String,
}

/// POST /v1/enroll/complete (`Debug` leaves the secret out)
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollCompleteRequest {
    pub enrollment_id: String,
    /// Base64 of what ActivateCredential returned.
    pub secret: String,
    /// Base64 TPMS_ATTEST (`tpm2_quote -m`).
    pub quote: String,
    /// Base64 TPMT_SIGNATURE (`tpm2_quote -s`).
    pub signature: String,
    /// PCR values by bank and index: `{"sha256": {"0": "<hex>", ...}}`.
    pub pcrs: BTreeMap<String, BTreeMap<String, String>>,
}

impl std::fmt::Debug for EnrollCompleteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollCompleteRequest")
            .field("enrollment_id", &self.enrollment_id)
            .finish_non_exhaustive()
    }
}

/// The token is a credential: `Debug` leaves it out.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct EnrollCompleteResponse {
    /// The provisioning token (JWS compact serialization).
    pub token: String,
    /// PEM chain: the AK certificate, then the issuing CA certificate.
    pub certificate: String,
    /// The token's `sub`: the registered name or `urn:keygate:tpm:ek:<ek hash>`.
    pub subject: String,
    pub jti: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}

impl std::fmt::Debug for EnrollCompleteResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollCompleteResponse")
            .field("subject", &self.subject)
            .field("jti", &self.jti)
            .finish_non_exhaustive()
    }
}

/// POST /v1/enroll/machines
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterMachineRequest {
    /// Lowercase hex SHA-256 of the EK's DER SubjectPublicKeyInfo.
    pub ek_hash: String,
    /// The `sub` of this machine's tokens.
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineView {
    pub ek_hash: String,
    /// Registered name, or `urn:keygate:tpm:ek:<ek hash>` for a machine that enrolled
    /// without one.
    pub name: String,
    /// RFC 3339 UTC times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrolled_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl From<MachineRow> for MachineView {
    fn from(m: MachineRow) -> Self {
        MachineView {
            name: m.name.unwrap_or_else(|| format!("{EK_URN_PREFIX}{}", m.ek_hash)),
            ek_hash: m.ek_hash,
            registered_at: m.registered_at.map(rfc3339),
            enrolled_at: m.enrolled_at.map(rfc3339),
            revoked_at: m.revoked_at.map(rfc3339),
        }
    }
}

/// Decodes base64 in any common form (standard or URL-safe, padded or not).
pub(super) fn decode(field: &str, v: &str) -> Result<Vec<u8>, ApiError> {
    let v = v.trim();
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(v).ok())
        .ok_or_else(|| ApiError::BadRequest(format!("{field} is not base64")))
}

/// Checks the EK (certificate chain or allowlist) and AK, and answers a credential only
/// that TPM can activate, a nonce for the quote, and the PCRs to quote.
#[utoipa::path(post, path = "/v1/enroll/challenge", tag = "enroll", request_body = EnrollChallengeRequest,
    responses((status = 200, body = EnrollChallengeResponse), (status = 400, body = Problem),
        (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn challenge(
    State(st): State<AppState>,
    Remote(remote): Remote,
    body: Result<StrictJson<EnrollChallengeRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let StrictJson(body) = body?;
    let ek_pub = decode("ek_pub", &body.ek_pub)?;
    let ak_pub = decode("ak_pub", &body.ak_pub)?;
    let ek_cert = body
        .ek_certificate
        .as_deref()
        .map(|c| decode("ek_certificate", c))
        .transpose()?;
    let req = ChallengeRequest {
        ek_pub: &ek_pub,
        ek_certificate: ek_cert.as_deref(),
        ak_pub: &ak_pub,
    };
    let c = st.authority.enroll_challenge(req, &remote).await?;
    Ok(no_store(
        Json(EnrollChallengeResponse {
            enrollment_id: c.enrollment_id,
            tpm2_tools_credential: STANDARD.encode(c.credential.tpm2_tools_file()),
            id_object: STANDARD.encode(&c.credential.id_object),
            encrypted_secret: STANDARD.encode(&c.credential.encrypted_secret),
            nonce: STANDARD.encode(&c.nonce),
            pcr_selection: c.pcr_selection,
            expires_at: rfc3339(c.expires_at),
        })
        .into_response(),
    ))
}

/// Checks the activated secret and the quote against the challenge and the PCR policy;
/// answers a provisioning token and a certificate for the AK.
#[utoipa::path(post, path = "/v1/enroll/complete", tag = "enroll", request_body = EnrollCompleteRequest,
    responses((status = 200, body = EnrollCompleteResponse), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn complete(
    State(st): State<AppState>,
    Remote(remote): Remote,
    body: Result<StrictJson<EnrollCompleteRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let StrictJson(body) = body?;
    let secret = zeroize::Zeroizing::new(decode("secret", &body.secret)?);
    let quote = decode("quote", &body.quote)?;
    let signature = decode("signature", &body.signature)?;
    let req = CompleteRequest {
        enrollment_id: &body.enrollment_id,
        secret: &secret,
        quote: &quote,
        signature: &signature,
        pcrs: &body.pcrs,
    };
    let e = st.authority.enroll_complete(req, &remote).await?;
    Ok(no_store(
        Json(EnrollCompleteResponse {
            token: e.token.to_string(),
            expires_at: rfc3339(e.expires_at),
            certificate: e.certificate,
            subject: e.subject,
            jti: e.jti,
        })
        .into_response(),
    ))
}

/// Pre-registers a machine: needed in allowlist mode; gives its tokens' `sub` in either.
#[utoipa::path(post, path = "/v1/enroll/machines", tag = "enroll", request_body = RegisterMachineRequest,
    security(("bearer" = ["enroll:admin"])),
    responses((status = 201, body = MachineView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 409, body = Problem)))]
pub async fn register_machine(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<StrictJson<RegisterMachineRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::EnrollAdmin).await?;
    let StrictJson(body) = body?;
    let m = st
        .authority
        .register_machine(&who, &body.ek_hash, &body.name, &remote)
        .await?;
    Ok((StatusCode::CREATED, Json(MachineView::from(m))).into_response())
}

/// Every registered or enrolled machine.
#[utoipa::path(get, path = "/v1/enroll/machines", tag = "enroll", security(("bearer" = ["enroll:admin"])),
    responses((status = 200, body = [MachineView]), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_machines(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
) -> Result<Json<Vec<MachineView>>, ApiError> {
    authorize(&st, &headers, &remote, Scope::EnrollAdmin).await?;
    let ms = st.authority.machines().await?;
    Ok(Json(ms.into_iter().map(MachineView::from).collect()))
}

/// Revokes a machine: later enrollments of its EK are refused, and its unexpired tokens are
/// revoked.
#[utoipa::path(delete, path = "/v1/enroll/machines/{ek_hash}", tag = "enroll", security(("bearer" = ["enroll:admin"])),
    params(("ek_hash" = String, Path, description = "lowercase hex SHA-256 of the EK's DER SubjectPublicKeyInfo")),
    responses((status = 204), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn revoke_machine(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(ek_hash): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::EnrollAdmin).await?;
    st.authority.revoke_machine(&who, &ek_hash, &remote).await?;
    Ok(StatusCode::NO_CONTENT)
}
