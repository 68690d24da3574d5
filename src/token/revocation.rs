//! The signed revocation list (the HTTP contract): a JWS signed like tokens, `typ` `revocations+jwt`,
//! payload `{iss, iat, next_update, exp, seq, revoked: [{jti, exp, revoked_at, reason?}]}`
//! listing every revoked token that has not expired (or, with `?after=SEQ`, only newer
//! revocations). `next_update` (and `exp`, the same instant, for JWT libraries) is when a
//! newer list is due: a verifier refuses a list past it, as a stale list could miss a
//! revocation.

use serde::{Deserialize, Serialize};

use super::verify::{Verifier, VerifyError};

/// `typ` of the revocation list.
pub const TYP_REVOCATIONS: &str = "revocations+jwt";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub jti: String,
    pub exp: i64,
    pub revoked_at: i64,
    /// Why, as the operator said it (or `machine revoked`); absent when no reason was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub iss: String,
    /// When the list was made.
    pub iat: i64,
    /// When a newer list is due; past it (and the leeway) the list is stale.
    pub next_update: i64,
    /// The same instant as `next_update`, so that any JWT library refuses a stale list.
    pub exp: i64,
    /// The newest revocation's sequence number when the list was made.
    pub seq: i64,
    pub revoked: Vec<Revoked>,
}

impl RevocationList {
    /// When `jti` is on the list, the time it was revoked.
    pub fn revoked_at(&self, jti: &str) -> Option<i64> {
        self.revoked.iter().find(|r| r.jti == jti).map(|r| r.revoked_at)
    }
}

impl Verifier {
    /// Verifies a signed revocation list with the same keys, `typ` and issuer as tokens,
    /// and refuses it when it is stale (its `next_update`, plus the leeway, has passed).
    pub fn verify_revocations(&self, jws: &str) -> Result<RevocationList, VerifyError> {
        self.verify_revocations_at(jws, super::verify::now())
    }

    /// [`Verifier::verify_revocations`] at time `now` (Unix seconds).
    pub fn verify_revocations_at(&self, jws: &str, now: i64) -> Result<RevocationList, VerifyError> {
        let list: RevocationList = self.verify_signed(jws, TYP_REVOCATIONS)?;
        if list.iss != self.config().issuer {
            return Err(VerifyError::Issuer {
                found: list.iss,
                expected: self.config().issuer.clone(),
            });
        }
        if now
            > list
                .next_update
                .saturating_add(self.config().leeway_seconds as i64)
        {
            return Err(VerifyError::StaleRevocations(list.next_update));
        }
        Ok(list)
    }

    /// Verifies a token as [`Verifier::verify`] does and refuses it when `list` names it.
    pub fn verify_not_revoked(
        &self,
        token: &str,
        list: &RevocationList,
    ) -> Result<super::Claims, VerifyError> {
        let claims = self.verify(token)?;
        match list.revoked_at(&claims.jti) {
            Some(at) => Err(VerifyError::Revoked(at)),
            None => Ok(claims),
        }
    }
}
