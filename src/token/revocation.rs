//! The signed revocation list (the HTTP contract): a JWS signed like tokens, `typ` `revocations+jwt`,
//! payload `{iss, iat, seq, revoked: [{jti, exp, revoked_at}]}` listing every revoked token
//! that has not expired (or, with `?after=SEQ`, only newer revocations).

use serde::{Deserialize, Serialize};

use super::verify::{Verifier, VerifyError};

/// `typ` of the revocation list.
pub const TYP_REVOCATIONS: &str = "revocations+jwt";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub jti: String,
    pub exp: i64,
    pub revoked_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub iss: String,
    pub iat: i64,
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
    /// Verifies a signed revocation list with the same keys, `typ` and issuer as tokens.
    pub fn verify_revocations(&self, jws: &str) -> Result<RevocationList, VerifyError> {
        let list: RevocationList = self.verify_signed(jws, TYP_REVOCATIONS)?;
        if list.iss != self.config().issuer {
            return Err(VerifyError::Issuer {
                found: list.iss,
                expected: self.config().issuer.clone(),
            });
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
