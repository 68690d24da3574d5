//! Key proofs (docs/adr/0014-key-proofs.md): anyone may ask where a published signing key
//! lives. A TPM key answers a challenge only its TPM can: the evidence first (EK
//! certificate, EK, AK and key public areas, and a challenge id), then, for the verifier's
//! credential and nonce, ActivateCredential and TPM2_Certify. A PKCS#11 key reports its
//! attributes as the module states them, which is no hardware proof.
//!
//! Challenges live in the memory of the replica whose device holds the key (a TPM belongs to
//! one machine); they are single use and expire after [`CHALLENGE_TTL`] seconds. Every
//! answered proof is audited.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Authority, AuthorityError, now, random_bytes};
use crate::audit::AuditRecord;
use crate::keys::{Certified, KeyError, KeyEvidence};
use crate::token::b64;

/// Seconds a challenge can be answered in.
pub const CHALLENGE_TTL: i64 = 60;
/// Open challenges kept at most (a few hundred kB); the oldest goes first.
const MAX_OPEN: usize = 4096;
/// How long an answer waits for the proof before it (one at a time) to finish.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a proof's step may take at the device. It creates the EK and the AK in the TPM
/// (an RSA key generation for an RSA EK: seconds on some TPMs), so it does not get the wait
/// of a signature (`[tpm] timeout_ms`); with `ANSWER_WAIT` it stays under the 30 s request
/// timeout. Signatures queued behind a proof wait for it.
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// Nonce sizes accepted (TPM2B_DATA holds at most 64 bytes).
const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;
/// Largest credential part accepted (a TPM2B_ID_OBJECT or TPM2B_ENCRYPTED_SECRET of an
/// RSA-4096 EK is well under this).
const MAX_CREDENTIAL_PART: usize = 1024;

/// Open challenges: id → (kid, expiry); and the one proof the device answers at a time, so
/// that proofs from many sources never hold more than one place in front of the
/// signatures in the device queue.
pub(crate) struct Challenges {
    open: Mutex<HashMap<String, (String, i64)>>,
    one_at_a_time: tokio::sync::Semaphore,
}

impl Default for Challenges {
    fn default() -> Self {
        Challenges {
            open: Mutex::new(HashMap::new()),
            one_at_a_time: tokio::sync::Semaphore::new(1),
        }
    }
}

impl Challenges {
    fn open(&self, kid: &str) -> Result<(String, i64), AuthorityError> {
        let id = b64::encode(random_bytes::<16>()?);
        let t = now();
        let expires = t + CHALLENGE_TTL;
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, exp)| *exp > t);
        if m.len() >= MAX_OPEN
            && let Some(oldest) = m.iter().min_by_key(|(_, (_, exp))| *exp).map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        m.insert(id.clone(), (kid.to_owned(), expires));
        Ok((id, expires))
    }

    /// Takes the challenge `id` for `kid` (single use): false when it is unknown, used,
    /// expired or for another key.
    fn take(&self, id: &str, kid: &str) -> bool {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match m.remove(id) {
            Some((k, exp)) => k == kid && exp > now(),
            None => false,
        }
    }
}

/// The first half of a proof.
#[derive(Debug, Clone)]
pub struct ProofChallenge {
    pub kid: String,
    /// Challenge id and its expiry (Unix time), for a key with a hardware proof.
    pub challenge: Option<(String, i64)>,
    pub evidence: KeyEvidence,
}

/// The verifier's half: its credential for the AK and its nonce for the certification.
#[derive(Debug, Clone)]
pub struct ProofAnswer {
    pub challenge: String,
    /// TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET from MakeCredential.
    pub id_object: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
    pub nonce: Vec<u8>,
}

impl Authority {
    /// The device URI of published key `kid`, which must be held by this replica's device.
    fn proof_key(&self, kid: &str) -> Result<String, AuthorityError> {
        let ring = self.key_ring();
        let k = ring
            .published
            .iter()
            .find(|k| k.row.kid == kid)
            .ok_or_else(|| AuthorityError::NotFound(format!("published key {kid}")))?;
        if k.row.device != self.device {
            return Err(AuthorityError::Misdirected(format!(
                "key {kid} is held by device {}, not by this replica's ({}): ask the replica that signs with it",
                k.row.device, self.device
            )));
        }
        Ok(k.row.uri.clone())
    }

    /// Audits a proof. A refusal, or a PKCS#11 attribute report (anyone may ask for it, as
    /// often as the rate limit lets them), is aggregated like every refusal without a
    /// verified identity (the first of its kind at once, repeats summed per window, ADR
    /// 0012); a TPM's answer is written at once (one at a time, each costs the TPM work).
    async fn audit_proof(&self, kid: &str, outcome: &str, remote: &str, aggregate: bool) {
        let rec = AuditRecord::new("anonymous", "key.proof", kid, outcome, remote);
        if aggregate {
            self.audit_refusal(rec).await;
        } else if let Err(e) = self.store.audit(rec).await {
            tracing::error!(error = %e, "audit write failed for a key proof");
        }
    }

    /// The evidence for key `kid`, with a challenge when the device can answer one.
    pub async fn key_proof_challenge(
        &self,
        kid: &str,
        remote: &str,
    ) -> Result<ProofChallenge, AuthorityError> {
        let uri = self.proof_key(kid)?;
        let backend = self.backend.clone();
        let evidence = self
            .device_blocking(DEVICE_WAIT, move || backend.key_evidence(&uri))
            .await??;
        let challenge = match &evidence {
            KeyEvidence::Tpm(_) => Some(self.proof_challenges.open(kid)?),
            KeyEvidence::Pkcs11(_) => {
                // The attributes are all there is: this is the whole (non-)proof.
                self.audit_proof(kid, "attributes reported; no hardware proof", remote, true)
                    .await;
                None
            }
        };
        Ok(ProofChallenge {
            kid: kid.to_owned(),
            challenge,
            evidence,
        })
    }

    /// The TPM's answer to the verifier's credential and nonce for key `kid`.
    pub async fn key_proof_answer(
        &self,
        kid: &str,
        answer: ProofAnswer,
        remote: &str,
    ) -> Result<Certified, AuthorityError> {
        let uri = self.proof_key(kid)?;
        if !NONCE_LEN.contains(&answer.nonce.len()) {
            return Err(AuthorityError::BadRequest(format!(
                "nonce must be {} to {} bytes",
                NONCE_LEN.start(),
                NONCE_LEN.end()
            )));
        }
        if answer.id_object.len() > MAX_CREDENTIAL_PART || answer.encrypted_secret.len() > MAX_CREDENTIAL_PART
        {
            return Err(AuthorityError::BadRequest(format!(
                "id_object and encrypted_secret must be at most {MAX_CREDENTIAL_PART} bytes each"
            )));
        }
        if !self.proof_challenges.take(&answer.challenge, kid) {
            self.audit_proof(kid, "denied: unknown, used or expired challenge", remote, true)
                .await;
            return Err(AuthorityError::Attestation(
                "the challenge is unknown, used, expired or for another key; ask for a new one".into(),
            ));
        }
        let Ok(_turn) =
            tokio::time::timeout(ANSWER_WAIT, self.proof_challenges.one_at_a_time.acquire()).await
        else {
            return Err(AuthorityError::Backend(KeyError::Busy(
                ANSWER_WAIT.as_millis() as u64
            )));
        };
        let backend = self.backend.clone();
        let r = self
            .device_blocking(DEVICE_WAIT, move || {
                backend.certify_key(&uri, &answer.id_object, &answer.encrypted_secret, &answer.nonce)
            })
            .await?;
        match r {
            Ok(c) => {
                self.audit_proof(kid, "success", remote, false).await;
                Ok(c)
            }
            Err(KeyError::BadInput(why)) => {
                self.audit_proof(kid, &format!("denied: {why}"), remote, true)
                    .await;
                Err(AuthorityError::BadRequest(why))
            }
            Err(e) => Err(e.into()),
        }
    }
}
