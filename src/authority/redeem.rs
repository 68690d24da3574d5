//! Redemption: the token is the credential. Exactly-once for one-time tokens (decided by
//! one conditional UPDATE in the store), RFC 9449 DPoP for key-bound tokens, and an
//! optional certificate for a CSR, signed inside the hardware.

use std::time::Duration;

use super::{Authority, AuthorityError, now};
use crate::audit::AuditRecord;
use crate::store::{CertOp, CertificateRow, Refusal, StoreError, WriteOp};
use crate::token::{self, Claims, ProofContext};
use crate::x509::San;

/// Longest token accepted.
const MAX_TOKEN: usize = 8 * 1024;
const REPLAYED: &str = "DPoP proof replayed: its jti was used before";

/// A refusal of the DPoP proof itself (RFC 9449 `invalid_dpop_proof`).
fn invalid_proof(detail: String) -> AuthorityError {
    AuthorityError::Dpop {
        key_binding: false,
        detail,
    }
}
/// How far in the future a proof's `iat` may be (clock skew).
const DPOP_MAX_SKEW: i64 = 5;

/// A redemption request as the API received it.
#[derive(Debug, Clone, Copy)]
pub struct RedeemRequest<'a> {
    pub token: &'a str,
    /// PEM PKCS#10.
    pub csr: Option<&'a str>,
    /// The `DPoP` header, when there was exactly one.
    pub dpop: Option<&'a str>,
    /// This endpoint's URL under the public base URL: what a proof's `htu` must name.
    pub url: &'a str,
}

/// What a redeemed token grants.
#[derive(Debug, Clone)]
pub struct Redeemed {
    pub jti: String,
    pub subject: String,
    pub audience: Vec<String>,
    pub scopes: Vec<String>,
    pub expires_at: i64,
    /// PEM chain (end entity, then CA) when a CSR was sent.
    pub certificate: Option<String>,
}

/// A refusal, and who it is audited against.
struct Refused {
    actor: String,
    target: String,
    error: AuthorityError,
}

fn refused(actor: &str, target: &str, error: AuthorityError) -> Refused {
    Refused {
        actor: actor.into(),
        target: target.into(),
        error,
    }
}

impl Authority {
    /// Redeems a provisioning token. Refusals of the credential (401: bad, expired, unknown,
    /// revoked, wrong DPoP; 409: redeemed already) are audited; an invalid CSR is a 400.
    /// Nothing is consumed unless the answer is a success: the certificate is signed before
    /// the redemption is committed, and the commit is the last step.
    #[tracing::instrument(skip_all, fields(jti))]
    pub async fn redeem(&self, req: RedeemRequest<'_>, remote: &str) -> Result<Redeemed, AuthorityError> {
        match self.try_redeem(req, remote).await {
            Ok(r) => {
                metrics::counter!("keygate_tokens_redeemed_total").increment(1);
                Ok(r)
            }
            Err(r) => {
                if matches!(
                    r.error,
                    AuthorityError::Unauthorized(_)
                        | AuthorityError::Dpop { .. }
                        | AuthorityError::Denied(_)
                        | AuthorityError::Conflict(_)
                ) {
                    let outcome = format!("denied: {}", r.error);
                    let rec = AuditRecord::new(&r.actor, "token.redeem", &r.target, &outcome, remote);
                    self.audit_refusal(rec).await;
                }
                Err(r.error)
            }
        }
    }

    async fn try_redeem(&self, req: RedeemRequest<'_>, remote: &str) -> Result<Redeemed, Refused> {
        let unauthorized = |m: String| AuthorityError::Unauthorized(m);
        if req.token.is_empty() || req.token.len() > MAX_TOKEN {
            return Err(refused(
                "anonymous",
                "token",
                unauthorized(format!("token refused: empty or longer than {MAX_TOKEN} bytes")),
            ));
        }
        let ring = self.key_ring();
        let claims: Claims = ring
            .verifier
            .verify_signed(req.token, token::TYP_PROVISIONING)
            .map_err(|e| refused("anonymous", "token", unauthorized(format!("token refused: {e}"))))?;
        let actor = format!("sub:{}", claims.sub);
        let jti = claims.jti.clone();
        tracing::Span::current().record("jti", jti.as_str());
        let deny = |e: AuthorityError| refused(&actor, &jti, e);
        if claims.iss != self.settings.issuer {
            return Err(deny(unauthorized(format!(
                "token refused: issuer {:?} is not this issuer",
                claims.iss
            ))));
        }
        let t = now();
        token::verify::check_times(&claims, t, 0)
            .map_err(|e| deny(unauthorized(format!("token refused: {e}"))))?;
        let (row, status) = self
            .store
            .issued_token(&jti)
            .await
            .map_err(|e| deny(e.into()))?
            .ok_or_else(|| {
                deny(unauthorized(
                    "token refused: this issuer has no record of it".into(),
                ))
            })?;
        if let Some(at) = status.revoked_at {
            return Err(deny(unauthorized(format!(
                "token refused: token revoked at {at}"
            ))));
        }
        let proof = match &claims.cnf {
            Some(cnf) => Some(self.check_dpop(&req, &cnf.jkt, t).map_err(deny)?),
            None => None,
        };
        // A replay is refused as such before anything else is looked at; the store checks
        // again, atomically, when it records the proof.
        if let Some((id, _)) = &proof
            && self.store.dpop_proof_seen(id).await.map_err(|e| deny(e.into()))?
        {
            return Err(deny(invalid_proof(REPLAYED.into())));
        }
        if row.one_time && status.redeemed_at.is_some() {
            return Err(deny(AuthorityError::Conflict(
                "this one-time token has been redeemed already".into(),
            )));
        }
        let certificate = match req.csr {
            Some(csr) => Some(self.certify(csr, &claims).await.map_err(deny)?),
            None => None,
        };
        let mut ops = vec![WriteOp::Redeem {
            jti: jti.clone(),
            at: t,
            proof,
        }];
        let certificate = certificate.map(|(chain, row)| {
            ops.push(WriteOp::Cert(CertOp::Insert(row)));
            chain
        });
        let rec = AuditRecord::new(&actor, "token.redeem", &jti, "success", remote);
        match self.store.write(ops, rec).await {
            Ok(_) => {}
            Err(StoreError::Refused(r)) => {
                return Err(deny(match r {
                    Refusal::Redeemed => {
                        AuthorityError::Conflict("this one-time token has been redeemed already".into())
                    }
                    Refusal::Revoked => unauthorized("token refused: token revoked".into()),
                    Refusal::DpopReplay => invalid_proof(REPLAYED.into()),
                    Refusal::KeyState | Refusal::EnrollmentUsed | Refusal::MachineRevoked => {
                        unauthorized(REPLAYED.into())
                    }
                }));
            }
            Err(e) => return Err(deny(e.into())),
        }
        Ok(Redeemed {
            scopes: claims.scopes(),
            audience: claims.aud.to_vec(),
            subject: claims.sub,
            expires_at: claims.exp,
            jti,
            certificate,
        })
    }

    /// RFC 9449 §4.3 for a token bound to `jkt`; returns the proof id to remember and until
    /// when. The replay check itself happens in the store, with the redemption.
    fn check_dpop(
        &self,
        req: &RedeemRequest<'_>,
        jkt: &str,
        t: i64,
    ) -> Result<(String, i64), AuthorityError> {
        let proof = req.dpop.ok_or_else(|| {
            invalid_proof(
                "DPoP proof missing: this token is bound to a key (cnf.jkt) and needs a DPoP header".into(),
            )
        })?;
        let ctx = ProofContext {
            method: "POST",
            url: req.url,
            access_token: Some(req.token),
            now: t,
            max_age: self.settings.dpop_max_age,
            max_skew: DPOP_MAX_SKEW,
        };
        let p = token::verify_proof(proof, &ctx).map_err(|e| invalid_proof(e.to_string()))?;
        if p.jkt != jkt {
            return Err(AuthorityError::Dpop {
                key_binding: true,
                detail: "DPoP proof is signed by another key: its jwk thumbprint is not the token's cnf.jkt"
                    .into(),
            });
        }
        Ok((
            format!("{}.{}", p.jkt, p.jti),
            p.iat + self.settings.dpop_max_age + DPOP_MAX_SKEW,
        ))
    }

    /// Checks the CSR, and the names it asks for against the token's `sans` (a CSR that asks
    /// for none gets all the token allows), and has the active key's CA sign a certificate
    /// for its key.
    async fn certify(&self, csr: &str, claims: &Claims) -> Result<(String, CertificateRow), AuthorityError> {
        let csr = crate::x509::check_csr(csr).map_err(|e| AuthorityError::BadRequest(e.to_string()))?;
        let allowed: Vec<San> = claims
            .sans
            .iter()
            .flatten()
            .filter_map(|s| San::parse(s).ok())
            .collect();
        let sans = if csr.sans.is_empty() {
            allowed
        } else {
            if let Some(bad) = csr.sans.iter().find(|s| !allowed.contains(s)) {
                let allows = if allowed.is_empty() {
                    "no subjectAltName".to_owned()
                } else {
                    allowed.iter().map(San::to_string).collect::<Vec<_>>().join(", ")
                };
                return Err(AuthorityError::Denied(format!(
                    "the CSR asks for {bad}, which this token does not allow (it allows {allows})"
                )));
            }
            csr.sans
        };
        self.certify_key(csr.key, &claims.sub, sans, Some(claims.jti.clone()))
            .await
    }

    /// Has the active key's CA sign an end-entity certificate for `key` with CN `subject`
    /// and `sans`; the PEM chain (certificate, then CA) and the row that records it.
    pub(super) async fn certify_key(
        &self,
        key: x509_cert::spki::SubjectPublicKeyInfoOwned,
        subject: &str,
        sans: Vec<San>,
        jti: Option<String>,
    ) -> Result<(String, CertificateRow), AuthorityError> {
        let ring = self.key_ring();
        let ca_pem = ring
            .published
            .iter()
            .find(|k| k.row.kid == ring.active.kid)
            .map(|k| k.row.certificate.clone())
            .ok_or_else(|| AuthorityError::Internal("the active key has no CA certificate".into()))?;
        let signer = ring.active.signer.clone();
        let cn = subject.to_owned();
        let lifetime = Duration::from_secs(self.settings.certificate_ttl);
        let built = self
            .sign_blocking(move || crate::x509::issue_end_entity(&signer, &ca_pem, key, &cn, &sans, lifetime))
            .await?;
        match built {
            Ok(c) => Ok((
                c.chain,
                CertificateRow {
                    serial: c.serial,
                    kid: ring.active.kid.clone(),
                    jti,
                    subject: subject.to_owned(),
                    issued_at: now(),
                    not_after: c.not_after,
                },
            )),
            Err(e) => Err(self.x509_failure(e).await),
        }
    }
}
