//! Attestation-gated enrollment (the HTTP contract): a machine proves with TPM credential activation
//! and a quote that it holds a genuine TPM (and, with a PCR policy, a known boot state),
//! then gets a provisioning token and a certificate for its AK from the hardware-held CA.
//!
//! The challenge is recorded (the secret only as its SHA-256) and can be completed once,
//! before it expires. Every attempt to complete it uses it up, success or not. Every
//! refusal is audited (`enroll.challenge` / `enroll.complete`, actor `tpm:ek:<ek hash>`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest;
use der::Decode;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::machines::check_machine;
use super::{Authority, AuthorityError, IssueRequest, now, random_bytes};
use crate::attest::{
    Attributes, Credential, EkCaBundle, PcrPolicy, QuoteError, TpmPublic, make_credential, verify_quote,
};
use crate::audit::AuditRecord;
use crate::config::{Config, EnrollMode};
use crate::store::{EnrollOp, EnrollmentRow, Refusal, StoreError, WriteOp};
use crate::token::b64;

/// The `sub` of a machine enrolled without a registered name.
pub const EK_URN_PREFIX: &str = "urn:keygate:tpm:ek:";
/// Longest TPM2B_PUBLIC, TPMS_ATTEST or TPMT_SIGNATURE accepted (real ones are < 1 KiB).
const MAX_TPM_STRUCTURE: usize = 4096;

/// Enrollment settings, from `[enroll]`.
#[derive(Debug)]
pub struct EnrollSettings {
    pub mode: EnrollMode,
    pub bundle: EkCaBundle,
    pub policy: PcrPolicy,
    pub challenge_ttl: i64,
    pub token: IssueRequest,
    pub token_ttl: u64,
}

impl EnrollSettings {
    /// Reads the configuration; in `ek-ca` mode loads the CA folder. A folder that is missing
    /// leaves the bundle empty (every EK certificate is then refused) with a warning; a file
    /// in it that does not parse is an error.
    pub fn from_config(cfg: &Config) -> Result<Arc<EnrollSettings>, AuthorityError> {
        let e = &cfg.enroll;
        let policy = PcrPolicy::parse(&e.pcr_selection, &e.pcr_policy)
            .map_err(|why| AuthorityError::Internal(format!("enroll: {why}")))?;
        let bundle = match e.mode {
            EnrollMode::EkCa => load_bundle(&e.ca_dir, cfg.enroll_configured)?,
            EnrollMode::Allowlist => EkCaBundle::default(),
        };
        Ok(Arc::new(EnrollSettings {
            mode: e.mode,
            bundle,
            policy,
            challenge_ttl: e.challenge_ttl_seconds as i64,
            token: IssueRequest {
                subject: String::new(),
                audience: e.audience.clone(),
                ttl_seconds: None,
                scopes: e.scopes.clone(),
                one_time: e.one_time,
                cnf_jkt: None,
                sans: Vec::new(),
            },
            token_ttl: e.token_ttl_seconds.unwrap_or(cfg.tokens.default_ttl_seconds),
        }))
    }
}

/// Loads the CA folder. An empty or missing folder refuses every EK certificate; that is
/// worth one warning per process, and only when the operator set enrollment up.
fn load_bundle(dir: &Path, configured: bool) -> Result<EkCaBundle, AuthorityError> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let warn = |why: &str| {
        if configured && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(dir = %dir.display(), "{why}: every EK certificate will be refused (enroll.ca_dir, KEYGATE_ENROLL_CA_DIR)");
        } else {
            tracing::debug!(dir = %dir.display(), "{why}");
        }
    };
    if !dir.is_dir() {
        warn("no TPM manufacturer CA folder");
        return Ok(EkCaBundle::default());
    }
    let b = EkCaBundle::load_dir(dir).map_err(|e| AuthorityError::Internal(e.to_string()))?;
    if b.is_empty() {
        warn("no certificates in the TPM manufacturer CA folder");
    } else {
        tracing::info!(dir = %dir.display(), certificates = b.len(), "loaded TPM manufacturer CAs");
    }
    Ok(b)
}

/// What a client sends to start.
#[derive(Debug, Clone, Copy)]
pub struct ChallengeRequest<'a> {
    pub ek_pub: &'a [u8],
    pub ek_certificate: Option<&'a [u8]>,
    pub ak_pub: &'a [u8],
}

/// A challenge: the credential only the TPM with this EK can activate for this AK.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub enrollment_id: String,
    pub credential: Credential,
    pub nonce: Vec<u8>,
    pub pcr_selection: String,
    pub expires_at: i64,
}

/// What a client sends to finish. `Debug` leaves the secret out.
#[derive(Clone, Copy)]
pub struct CompleteRequest<'a> {
    pub enrollment_id: &'a str,
    pub secret: &'a [u8],
    pub quote: &'a [u8],
    pub signature: &'a [u8],
    pub pcrs: &'a BTreeMap<String, BTreeMap<String, String>>,
}

impl std::fmt::Debug for CompleteRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompleteRequest")
            .field("enrollment_id", &self.enrollment_id)
            .finish_non_exhaustive()
    }
}

/// A successful enrollment. The token text is wiped on drop.
pub struct Enrolled {
    pub token: Zeroizing<String>,
    pub jti: String,
    pub subject: String,
    pub expires_at: i64,
    /// PEM chain: the AK certificate, then the CA certificate.
    pub certificate: String,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("jti", &self.jti)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A refusal and the actor it is audited against.
struct Refused(String, AuthorityError);

fn sha256(b: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, b).as_ref().to_vec()
}

fn parse_public(bytes: &[u8], what: &'static str) -> Result<TpmPublic, AuthorityError> {
    if bytes.len() > MAX_TPM_STRUCTURE {
        return Err(AuthorityError::BadRequest(format!(
            "{what} is longer than {MAX_TPM_STRUCTURE} bytes"
        )));
    }
    TpmPublic::from_tpm2b(bytes, what).map_err(|e| AuthorityError::BadRequest(e.to_string()))
}

/// The EK must be a restricted decryption key bound to its TPM (TCG EK profile).
fn check_ek_attributes(ek: &TpmPublic) -> Result<(), AuthorityError> {
    let need =
        Attributes::FIXED_TPM | Attributes::FIXED_PARENT | Attributes::RESTRICTED | Attributes::DECRYPT;
    if !ek.attributes.has(need) || ek.attributes.has(Attributes::SIGN) {
        return Err(AuthorityError::Denied(
            "ek_pub is not an endorsement key: it must be a restricted decryption key with fixedTPM and fixedParent".into(),
        ));
    }
    Ok(())
}

/// The AK must be a restricted signing key created in, and bound to, its TPM.
fn check_ak_attributes(ak: &TpmPublic) -> Result<(), AuthorityError> {
    let a = ak.attributes;
    let missing: Vec<&str> = [
        (Attributes::RESTRICTED, "restricted"),
        (Attributes::SIGN, "sign"),
        (Attributes::FIXED_TPM, "fixedTPM"),
        (Attributes::FIXED_PARENT, "fixedParent"),
        (Attributes::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    ]
    .iter()
    .filter(|(bit, _)| !a.has(*bit))
    .map(|(_, n)| *n)
    .collect();
    if !missing.is_empty() {
        return Err(AuthorityError::Denied(format!(
            "ak_pub is not an attestation key: it lacks {}",
            missing.join(", ")
        )));
    }
    if a.has(Attributes::DECRYPT) {
        return Err(AuthorityError::Denied(
            "ak_pub is not an attestation key: it is also a decryption key".into(),
        ));
    }
    Ok(())
}

impl Authority {
    fn enroll_settings(&self) -> &EnrollSettings {
        &self.settings.enroll
    }

    /// Counts a refusal and audits it on its own.
    async fn refused(&self, actor: &str, action: &str, target: &str, e: &AuthorityError, remote: &str) {
        Self::count("refused");
        let outcome = format!("denied: {e}");
        self.audit_refusal(AuditRecord::new(actor, action, target, &outcome, remote))
            .await;
    }

    fn count(outcome: &'static str) {
        metrics::counter!("keygate_enrollments_total", "outcome" => outcome).increment(1);
    }

    /// Step 1: checks the EK (certificate or allowlist, per mode) and the AK, runs
    /// MakeCredential for a fresh secret, and records the challenge. Refusals are audited.
    #[tracing::instrument(skip_all, fields(ek_hash))]
    pub async fn enroll_challenge(
        &self,
        req: ChallengeRequest<'_>,
        remote: &str,
    ) -> Result<Challenge, AuthorityError> {
        match self.try_challenge(req, remote).await {
            Ok(c) => Ok(c),
            Err(Refused(actor, e)) => {
                if !matches!(e, AuthorityError::Store(_) | AuthorityError::Internal(_)) {
                    self.refused(&actor, "enroll.challenge", "-", &e, remote).await;
                }
                Err(e)
            }
        }
    }

    async fn try_challenge(&self, req: ChallengeRequest<'_>, remote: &str) -> Result<Challenge, Refused> {
        let anon = |e| Refused("anonymous".into(), e);
        let ek = parse_public(req.ek_pub, "ek_pub").map_err(anon)?;
        let ek_hash = ek.ek_hash();
        tracing::Span::current().record("ek_hash", ek_hash.as_str());
        let actor = format!("tpm:ek:{ek_hash}");
        let deny = |e| Refused(actor.clone(), e);
        check_ek_attributes(&ek).map_err(deny)?;
        let ak = parse_public(req.ak_pub, "ak_pub").map_err(deny)?;
        check_ak_attributes(&ak).map_err(deny)?;
        let s = self.enroll_settings();
        let machine = self.store.machine(&ek_hash).await.map_err(|e| deny(e.into()))?;
        check_machine(machine.as_ref(), s.mode, &ek_hash).map_err(deny)?;
        let t = now();
        if s.mode == EnrollMode::EkCa {
            let cert = req.ek_certificate.ok_or_else(|| {
                deny(AuthorityError::Denied(
                    "ek_certificate is required: this server trusts EKs by their manufacturer certificate (mode ek-ca)".into(),
                ))
            })?;
            s.bundle.verify(cert, &ek, t).map_err(|e| {
                deny(match e {
                    crate::attest::EkCertError::Malformed(_) => AuthorityError::BadRequest(e.to_string()),
                    _ => AuthorityError::Denied(e.to_string()),
                })
            })?;
        }
        let secret = Zeroizing::new(random_bytes::<32>().map_err(deny)?);
        let credential = make_credential(&ek, &ak.name(), secret.as_slice()).map_err(|e| {
            deny(match e {
                crate::attest::AttestError::Crypto(_) => AuthorityError::Internal(e.to_string()),
                _ => AuthorityError::BadRequest(e.to_string()),
            })
        })?;
        let nonce = random_bytes::<32>().map_err(deny)?.to_vec();
        let id = b64::encode(random_bytes::<16>().map_err(deny)?);
        let row = EnrollmentRow {
            id: id.clone(),
            ek_hash: ek_hash.clone(),
            ak_pub: req.ak_pub.to_vec(),
            secret_hash: sha256(secret.as_slice()),
            nonce: nonce.clone(),
            pcr_selection: s.policy.selection(),
            created_at: t,
            expires_at: t + s.challenge_ttl,
            used_at: None,
        };
        let rec = AuditRecord::new(&actor, "enroll.challenge", &id, "success", remote);
        self.store
            .write(vec![WriteOp::Enroll(EnrollOp::Insert(row))], rec)
            .await
            .map_err(|e| deny(e.into()))?;
        Ok(Challenge {
            enrollment_id: id,
            credential,
            nonce,
            pcr_selection: s.policy.selection(),
            expires_at: t + s.challenge_ttl,
        })
    }

    /// Step 2: checks the activated secret and the quote, and issues the token and the AK
    /// certificate. The challenge is used up by any attempt; a refusal issues nothing and is
    /// audited.
    #[tracing::instrument(skip_all, fields(ek_hash))]
    pub async fn enroll_complete(
        &self,
        req: CompleteRequest<'_>,
        remote: &str,
    ) -> Result<Enrolled, AuthorityError> {
        let unknown = || AuthorityError::Attestation("enrollment_id is unknown".into());
        // Ids are base64url; anything else is unknown, and never reaches the audit log.
        let well_formed = (1..=64).contains(&req.enrollment_id.len())
            && req
                .enrollment_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            self.refused("anonymous", "enroll.complete", "-", &unknown(), remote)
                .await;
            return Err(unknown());
        }
        let id = req.enrollment_id;
        let Some(row) = self.store.enrollment(id).await? else {
            self.refused("anonymous", "enroll.complete", id, &unknown(), remote)
                .await;
            return Err(unknown());
        };
        tracing::Span::current().record("ek_hash", row.ek_hash.as_str());
        let actor = format!("tpm:ek:{}", row.ek_hash);
        let t = now();
        let stale = if row.used_at.is_some() {
            Some("enrollment_id was used already: request a new challenge".to_owned())
        } else if t > row.expires_at {
            Some(format!(
                "enrollment_id expired at {}: request a new challenge",
                super::rfc3339(row.expires_at)
            ))
        } else {
            None
        };
        if let Some(why) = stale {
            let e = AuthorityError::Attestation(why);
            self.refused(&actor, "enroll.complete", id, &e, remote).await;
            return Err(e);
        }
        match self.try_complete(&row, &req, t).await {
            Ok((enrolled, ops)) => {
                let rec = AuditRecord::new(&actor, "enroll.complete", id, "success", remote);
                match self.store.write(ops, rec).await {
                    Ok(_) => {
                        Self::count("success");
                        metrics::counter!("keygate_tokens_issued_total").increment(1);
                        Ok(enrolled)
                    }
                    Err(StoreError::Refused(r)) => {
                        let e = match r {
                            Refusal::MachineRevoked => {
                                AuthorityError::Denied(format!("machine {} is revoked", row.ek_hash))
                            }
                            _ => AuthorityError::Attestation(
                                "enrollment_id was used already: request a new challenge".into(),
                            ),
                        };
                        self.refused(&actor, "enroll.complete", id, &e, remote).await;
                        Err(e)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            // A fault of the server is not the client's: the challenge stays usable.
            Err(e)
                if matches!(
                    e,
                    AuthorityError::Store(_) | AuthorityError::Backend(_) | AuthorityError::Internal(_)
                ) =>
            {
                Err(e)
            }
            Err(e) => {
                // Used up, and audited, in one write; if a racing attempt used it first,
                // the refusal is still audited.
                let outcome = format!("denied: {e}");
                let rec = AuditRecord::new(&actor, "enroll.complete", id, &outcome, remote);
                let op = WriteOp::Enroll(EnrollOp::Use {
                    id: id.to_owned(),
                    at: t,
                    outcome,
                    jti: None,
                });
                match self.store.write(vec![op], rec).await {
                    Err(StoreError::Refused(_)) => {
                        self.refused(&actor, "enroll.complete", id, &e, remote).await
                    }
                    _ => Self::count("refused"),
                }
                Err(e)
            }
        }
    }

    /// The checks of step 2, then the token and certificate, signed but not yet recorded:
    /// returns them with the writes that record them.
    async fn try_complete(
        &self,
        row: &EnrollmentRow,
        req: &CompleteRequest<'_>,
        t: i64,
    ) -> Result<(Enrolled, Vec<WriteOp>), AuthorityError> {
        let s = self.enroll_settings();
        let attest = AuthorityError::Attestation;
        let given = sha256(req.secret);
        if !bool::from(given.as_slice().ct_eq(&row.secret_hash)) {
            return Err(attest(
                "secret does not match: the credential was not activated by the TPM holding this EK and AK"
                    .into(),
            ));
        }
        if row.pcr_selection != s.policy.selection() {
            return Err(attest(
                "the PCR policy changed since this challenge: request a new one".into(),
            ));
        }
        for (what, b) in [("quote", req.quote), ("signature", req.signature)] {
            if b.len() > MAX_TPM_STRUCTURE {
                return Err(AuthorityError::BadRequest(format!(
                    "{what} is longer than {MAX_TPM_STRUCTURE} bytes"
                )));
            }
        }
        let ak = parse_public(&row.ak_pub, "ak_pub")?;
        let values = s
            .policy
            .parse_values(req.pcrs)
            .map_err(AuthorityError::BadRequest)?;
        verify_quote(
            &ak,
            req.quote,
            req.signature,
            &row.nonce,
            (s.policy.bank, &s.policy.indices),
            &values,
        )
        .map_err(|e| match e {
            QuoteError::Structure(_) => AuthorityError::BadRequest(e.to_string()),
            _ => attest(e.to_string()),
        })?;
        s.policy.check(&values).map_err(AuthorityError::Denied)?;
        let machine = self.store.machine(&row.ek_hash).await?;
        check_machine(machine.as_ref(), s.mode, &row.ek_hash)?;
        let subject = machine
            .and_then(|m| m.name)
            .unwrap_or_else(|| format!("{EK_URN_PREFIX}{}", row.ek_hash));
        let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(&ak.spki_der())
            .map_err(|e| AuthorityError::Internal(format!("AK key: {e}")))?;
        let (certificate, mut cert_row) = self.certify_key(spki, &subject, Vec::new(), None).await?;
        let req = IssueRequest {
            subject: subject.clone(),
            ..s.token.clone()
        };
        let ttl = req.validate(s.token_ttl, self.settings.max_ttl)?;
        let (issued, token_row) = self.mint(&req, ttl, &format!("enroll:{}", row.id)).await?;
        let mut ops = vec![
            WriteOp::Enroll(EnrollOp::Use {
                id: row.id.clone(),
                at: t,
                outcome: "success".into(),
                jti: Some(issued.jti.clone()),
            }),
            WriteOp::Enroll(EnrollOp::Enrolled {
                ek_hash: row.ek_hash.clone(),
                at: t,
            }),
            WriteOp::InsertIssued(token_row),
        ];
        // the AK certificate goes with the token: revoking either, or the machine, lists it
        // in the CRL
        cert_row.jti = Some(issued.jti.clone());
        ops.push(WriteOp::Cert(crate::store::CertOp::Insert(cert_row)));
        Ok((
            Enrolled {
                token: issued.token,
                jti: issued.jti,
                subject,
                expires_at: issued.expires_at,
                certificate,
            },
            ops,
        ))
    }
}
