//! Key proofs: where a published signing key lives, for anyone to check
//! (docs/adr/0014-key-proofs.md). Public and rate-limited per source.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{Remote, StrictJson};
use super::{AppState, no_store};
use crate::authority::{ProofAnswer, rfc3339};
use crate::keys::KeyEvidence;

/// What a PKCS#11 module says, and that it is only that.
pub const PKCS11_STATEMENT: &str = "These are the PKCS#11 module's own statements about the key; \
    keygate cannot prove them. A software token (SoftHSM2) reports the same as a hardware one. \
    No hardware proof is available for this key.";

/// A TPM key's evidence (every binary field standard base64 of the TCG wire format).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TpmEvidenceView {
    /// The EK template: `rsa2048`, `p256` or `p384`.
    pub ek_kind: String,
    /// DER EK certificate, issued by the TPM's manufacturer (absent: the TPM has none).
    pub ek_certificate: Option<String>,
    /// TPM2B_PUBLIC of the EK.
    pub ek_public: String,
    /// TPM2B_PUBLIC of the attestation key (restricted signing, endorsement hierarchy).
    pub ak_public: String,
    /// TPM2B_PUBLIC of the signing key.
    pub key_public: String,
}

/// A PKCS#11 key's attributes as the module reports them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pkcs11EvidenceView {
    /// `CKA_LOCAL`, `CKA_NEVER_EXTRACTABLE`, `CKA_ALWAYS_SENSITIVE`, `CKA_EXTRACTABLE`,
    /// `CKA_SENSITIVE`; null when the module would not say.
    pub attributes: BTreeMap<String, Option<bool>>,
    pub token_manufacturer: String,
    pub token_model: String,
    /// Says plainly that this is no hardware proof.
    pub statement: String,
}

/// POST /v1/keys/{kid}/proof/challenge
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyProofChallengeResponse {
    pub kid: String,
    /// `tpm` (a hardware proof follows) or `pkcs11` (attributes only).
    pub kind: String,
    /// True when the key can be proven to live in hardware (answer the challenge).
    pub hardware_proof: bool,
    /// Challenge id for POST /v1/keys/{kid}/proof (single use); null without a hardware proof.
    pub challenge: Option<String>,
    /// RFC 3339 UTC: the challenge can be answered once before then.
    pub expires_at: Option<String>,
    pub tpm: Option<TpmEvidenceView>,
    pub pkcs11: Option<Pkcs11EvidenceView>,
}

/// POST /v1/keys/{kid}/proof
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyProofRequest {
    /// The challenge id.
    #[schema(max_length = 64)]
    pub challenge: String,
    /// Base64 TPM2B_ID_OBJECT of MakeCredential(EK public, AK name, the verifier's secret).
    #[schema(max_length = 2048)]
    pub id_object: String,
    /// Base64 TPM2B_ENCRYPTED_SECRET of the same MakeCredential.
    #[schema(max_length = 2048)]
    pub encrypted_secret: String,
    /// Base64, 16 to 64 bytes of the verifier's choosing: TPM2_Certify's qualifying data.
    #[schema(max_length = 128)]
    pub nonce: String,
}

/// The TPM's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyProofResponse {
    /// Base64 of what ActivateCredential recovered: the verifier's secret, if the AK lives
    /// with the EK.
    pub secret: String,
    /// Base64 TPMS_ATTEST of TPM2_Certify of the signing key by the AK (`tpm2_certify -o`).
    pub attest: String,
    /// Base64 TPMT_SIGNATURE by the AK over `attest` (`tpm2_certify -s`).
    pub signature: String,
}

/// The evidence for a published key and, for a TPM key, a challenge: a verifier checks the
/// EK certificate, the AK and the key, then answers with a credential for the AK and a nonce.
/// A PKCS#11 key reports its attributes, which the module states and nobody can prove.
#[utoipa::path(post, path = "/v1/keys/{kid}/proof/challenge", tag = "public",
    params(("kid" = String, Path, description = "a kid of the JWKS")),
    responses((status = 200, body = KeyProofChallengeResponse), (status = 404, body = Problem),
        (status = 421, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn key_proof_challenge(
    State(st): State<AppState>,
    Remote(remote): Remote,
    Path(kid): Path<String>,
) -> Result<Response, ApiError> {
    let c = st.authority.key_proof_challenge(&kid, &remote).await?;
    let (challenge, expires_at) = match c.challenge {
        Some((id, exp)) => (Some(id), Some(rfc3339(exp))),
        None => (None, None),
    };
    let body = match c.evidence {
        KeyEvidence::Tpm(t) => KeyProofChallengeResponse {
            kid: c.kid,
            kind: "tpm".into(),
            hardware_proof: true,
            challenge,
            expires_at,
            tpm: Some(TpmEvidenceView {
                ek_kind: t.ek_kind.into(),
                ek_certificate: t.ek_certificate.map(|c| STANDARD.encode(c)),
                ek_public: STANDARD.encode(t.ek_public),
                ak_public: STANDARD.encode(t.ak_public),
                key_public: STANDARD.encode(t.key_public),
            }),
            pkcs11: None,
        },
        KeyEvidence::Pkcs11(p) => KeyProofChallengeResponse {
            kid: c.kid,
            kind: "pkcs11".into(),
            hardware_proof: false,
            challenge,
            expires_at,
            tpm: None,
            pkcs11: Some(Pkcs11EvidenceView {
                attributes: p.attributes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                token_manufacturer: p.token_manufacturer,
                token_model: p.token_model,
                statement: PKCS11_STATEMENT.into(),
            }),
        },
    };
    Ok(no_store(Json(body).into_response()))
}

/// The TPM's answer to a challenge: ActivateCredential of the verifier's credential (the AK
/// lives with the EK) and TPM2_Certify of the key by the AK over the verifier's nonce.
#[utoipa::path(post, path = "/v1/keys/{kid}/proof", tag = "public", request_body = KeyProofRequest,
    params(("kid" = String, Path, description = "a kid of the JWKS")),
    responses((status = 200, body = KeyProofResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 421, body = Problem), (status = 429, body = Problem),
        (status = 503, body = Problem)))]
pub async fn key_proof(
    State(st): State<AppState>,
    Remote(remote): Remote,
    Path(kid): Path<String>,
    body: Result<StrictJson<KeyProofRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let StrictJson(body) = body?;
    let answer = ProofAnswer {
        challenge: body.challenge,
        id_object: super::enroll::decode("id_object", &body.id_object)?,
        encrypted_secret: super::enroll::decode("encrypted_secret", &body.encrypted_secret)?,
        nonce: super::enroll::decode("nonce", &body.nonce)?,
    };
    let c = st.authority.key_proof_answer(&kid, answer, &remote).await?;
    Ok(no_store(
        Json(KeyProofResponse {
            secret: STANDARD.encode(&c.secret),
            attest: STANDARD.encode(&c.attest),
            signature: STANDARD.encode(&c.signature),
        })
        .into_response(),
    ))
}
