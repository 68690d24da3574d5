//! Certificates a CA key signed, and their revocation (for the CRL).

use super::db::{Arg, Exec};
use super::{Change, Store, StoreError};

/// One certificate, as recorded when it is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    pub serial: String,
    pub kid: String,
    pub jti: Option<String>,
    pub subject: String,
    pub issued_at: i64,
    pub not_after: i64,
}

/// Writes about certificates.
#[derive(Debug, Clone)]
pub enum CertOp {
    Insert(CertificateRow),
    /// Revokes one certificate (affected 0 when it was revoked already: idempotent);
    /// [`StoreError::NotFound`] when there is no such serial.
    Revoke {
        serial: String,
        at: i64,
        reason: Option<String>,
    },
}

pub(super) async fn apply(ex: &mut Exec<'_>, op: &CertOp) -> Result<(u64, Option<Change>), StoreError> {
    match op {
        CertOp::Insert(c) => Ok((
            ex.execute(
                "INSERT INTO certificates (serial, kid, jti, subject, issued_at, not_after)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    Arg::Text(&c.serial),
                    Arg::Text(&c.kid),
                    Arg::OptText(c.jti.as_deref()),
                    Arg::Text(&c.subject),
                    Arg::Int(c.issued_at),
                    Arg::Int(c.not_after),
                ],
            )
            .await?,
            None,
        )),
        CertOp::Revoke { serial, at, reason } => {
            let n = ex
                .execute(
                    "UPDATE certificates SET revoked_at = $1, revoke_reason = $2
                     WHERE serial = $3 AND revoked_at IS NULL",
                    &[Arg::Int(*at), Arg::OptText(reason.as_deref()), Arg::Text(serial)],
                )
                .await?;
            if n == 0 {
                let known: Vec<(String,)> = ex
                    .fetch_all(
                        "SELECT serial FROM certificates WHERE serial = $1",
                        &[Arg::Text(serial)],
                    )
                    .await?;
                if known.is_empty() {
                    return Err(StoreError::NotFound(format!("certificate {serial}")));
                }
            }
            Ok((n, None))
        }
    }
}

/// A certificate on a CRL: (serial, revoked at, reason).
pub type RevokedCertificate = (String, i64, Option<String>);

impl Store {
    /// The unexpired certificates `kid`'s CA issued that are revoked at `now`: on their own,
    /// or because the token they came with was revoked (directly or with its machine).
    pub async fn revoked_certificates(
        &self,
        kid: &str,
        now: i64,
    ) -> Result<Vec<RevokedCertificate>, StoreError> {
        // serial, and (time, reason) of the certificate's own revocation and of its token's
        type Row = (String, Option<i64>, Option<String>, Option<i64>, Option<String>);
        let rows: Vec<Row> = self
            .read()
            .fetch_all(
                "SELECT c.serial, c.revoked_at, c.revoke_reason, t.revoked_at, t.revoke_reason
                 FROM certificates c LEFT JOIN issued_tokens t ON t.jti = c.jti
                 WHERE c.kid = $1 AND c.not_after > $2
                   AND (c.revoked_at IS NOT NULL OR t.revoked_at IS NOT NULL)
                 ORDER BY c.serial",
                &[Arg::Text(kid), Arg::Int(now)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(serial, c_at, c_why, t_at, t_why)| match (c_at, t_at) {
                // the earlier of the two is when it stopped being good
                (Some(c), Some(t)) if t < c => Some((serial, t, t_why)),
                (Some(c), _) => Some((serial, c, c_why)),
                (None, Some(t)) => Some((serial, t, t_why)),
                (None, None) => None,
            })
            .collect())
    }
}

impl Store {
    /// When the certificate `serial` was revoked on its own: None when there is no such
    /// certificate, Some(None) when it is not revoked.
    pub async fn certificate_revoked_at(&self, serial: &str) -> Result<Option<Option<i64>>, StoreError> {
        let row: Option<(Option<i64>,)> = self
            .read()
            .fetch_optional(
                "SELECT revoked_at FROM certificates WHERE serial = $1",
                &[Arg::Text(serial)],
            )
            .await?;
        Ok(row.map(|(at,)| at))
    }
}
