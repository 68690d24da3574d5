//! The careful path's writes to issued tokens that decide something: revocation and
//! one-time redemption (`writer.rs` applies them, each under its own savepoint).

use super::db::{Arg, Exec};
use super::{Change, Refusal, StoreError};

/// [`super::WriteOp::Revoke`]: marks the token revoked and appends it to the revocation list.
pub(super) async fn revoke(
    ex: &mut Exec<'_>,
    jti: &str,
    at: i64,
    reason: Option<&str>,
) -> Result<(u64, Option<Change>), StoreError> {
    let n = ex
        .execute(
            "UPDATE issued_tokens SET revoked_at = $1, revoke_reason = $2 WHERE jti = $3 AND revoked_at IS NULL",
            &[Arg::Int(at), Arg::OptText(reason), Arg::Text(jti)],
        )
        .await?;
    if n == 0 {
        let known: Option<(i32,)> = ex
            .fetch_optional("SELECT 1 FROM issued_tokens WHERE jti = $1", &[Arg::Text(jti)])
            .await?;
        if known.is_none() {
            return Err(StoreError::NotFound(format!("token {jti}")));
        }
        return Ok((0, None));
    }
    let n = ex
        .execute(
            "INSERT INTO revocations (jti, exp, revoked_at, reason)
             SELECT jti, exp, revoked_at, revoke_reason FROM issued_tokens WHERE jti = $1",
            &[Arg::Text(jti)],
        )
        .await?;
    Ok((n, Some(Change::Revoked)))
}

/// The conditional redemption of [`super::WriteOp::Redeem`]; 1 when redeemed.
pub(super) async fn redeem(
    ex: &mut Exec<'_>,
    jti: &str,
    at: i64,
    proof: Option<&(String, i64)>,
) -> Result<u64, StoreError> {
    if let Some((id, exp)) = proof {
        let n = ex
            .execute(
                "INSERT INTO dpop_proofs (id, exp) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[Arg::Text(id), Arg::Int(*exp)],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Refused(Refusal::DpopReplay));
        }
    }
    // One statement decides: concurrent redemptions serialize on the write lock, and only the
    // first finds `redeemed_at IS NULL`.
    let n = ex
        .execute(
            "UPDATE issued_tokens SET redeemed_at = coalesce(redeemed_at, $1)
             WHERE jti = $2 AND revoked_at IS NULL AND (NOT one_time OR redeemed_at IS NULL)",
            &[Arg::Int(at), Arg::Text(jti)],
        )
        .await?;
    if n == 1 {
        return Ok(1);
    }
    let state: Option<(Option<i64>, Option<i64>)> = ex
        .fetch_optional(
            "SELECT revoked_at, redeemed_at FROM issued_tokens WHERE jti = $1",
            &[Arg::Text(jti)],
        )
        .await?;
    Err(match state {
        None => StoreError::NotFound(format!("token {jti}")),
        Some((Some(_), _)) => StoreError::Refused(Refusal::Revoked),
        Some(_) => StoreError::Refused(Refusal::Redeemed),
    })
}
