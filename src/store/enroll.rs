//! Enrollment state: challenges and machines. Reads here; the writes are [`super::WriteOp`]s
//! applied by [`apply`] inside the writer's transaction, each with its audit entry.

use super::db::{Arg, Exec};
use super::rows::{EnrollmentRow, MachineRow};
use super::{Change, Refusal, Store, StoreError};

/// The enrollment writes of [`super::WriteOp`].
#[derive(Debug, Clone)]
pub enum EnrollOp {
    /// A new challenge.
    Insert(EnrollmentRow),
    /// Marks a challenge used (with the outcome, and the token a success issued); refused
    /// ([`Refusal::EnrollmentUsed`]) when it was used already or has expired at `at`.
    Use {
        id: String,
        at: i64,
        outcome: String,
        jti: Option<String>,
    },
    /// Records a successful enrollment of the machine; refused ([`Refusal::MachineRevoked`])
    /// when the machine is revoked, so a revocation racing an enrollment wins.
    Enrolled { ek_hash: String, at: i64 },
    /// Registers a machine's name; [`StoreError::Conflict`] when it has one already or is
    /// revoked, or when another machine has the name.
    Register {
        ek_hash: String,
        name: String,
        at: i64,
        by: String,
    },
    /// Revokes a machine and every unexpired token its enrollments issued (affected: the
    /// number of tokens revoked); [`StoreError::NotFound`] when the machine is unknown.
    Revoke { ek_hash: String, at: i64 },
}

pub(super) async fn apply(ex: &mut Exec<'_>, op: &EnrollOp) -> Result<(u64, Option<Change>), StoreError> {
    match op {
        EnrollOp::Insert(e) => Ok((
            ex.execute(
                "INSERT INTO enrollments (id, ek_hash, ak_pub, secret_hash, nonce, pcr_selection, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    Arg::Text(&e.id),
                    Arg::Text(&e.ek_hash),
                    Arg::Bytes(&e.ak_pub),
                    Arg::Bytes(&e.secret_hash),
                    Arg::Bytes(&e.nonce),
                    Arg::Text(&e.pcr_selection),
                    Arg::Int(e.created_at),
                    Arg::Int(e.expires_at),
                ],
            )
            .await?,
            None,
        )),
        EnrollOp::Use {
            id,
            at,
            outcome,
            jti,
        } => {
            let n = ex
                .execute(
                    "UPDATE enrollments SET used_at = $1, outcome = $2, jti = $3
                     WHERE id = $4 AND used_at IS NULL AND expires_at >= $1",
                    &[Arg::Int(*at), Arg::Text(outcome), Arg::OptText(jti.as_deref()), Arg::Text(id)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Refused(Refusal::EnrollmentUsed));
            }
            Ok((1, None))
        }
        EnrollOp::Enrolled { ek_hash, at } => {
            let n = ex
                .execute(
                    "INSERT INTO machines (ek_hash, enrolled_at) VALUES ($1, $2)
                     ON CONFLICT (ek_hash) DO UPDATE SET enrolled_at = excluded.enrolled_at
                     WHERE machines.revoked_at IS NULL",
                    &[Arg::Text(ek_hash), Arg::Int(*at)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Refused(Refusal::MachineRevoked));
            }
            Ok((1, None))
        }
        EnrollOp::Register {
            ek_hash,
            name,
            at,
            by,
        } => {
            let n = ex
                .execute(
                    "INSERT INTO machines (ek_hash, name, registered_at, registered_by) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (ek_hash) DO UPDATE SET name = excluded.name,
                        registered_at = excluded.registered_at, registered_by = excluded.registered_by
                     WHERE machines.name IS NULL AND machines.revoked_at IS NULL",
                    &[Arg::Text(ek_hash), Arg::Text(name), Arg::Int(*at), Arg::Text(by)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "machine {ek_hash} is registered or revoked already"
                )));
            }
            Ok((1, None))
        }
        EnrollOp::Revoke { ek_hash, at } => {
            let n = ex
                .execute(
                    "UPDATE machines SET revoked_at = coalesce(revoked_at, $1) WHERE ek_hash = $2",
                    &[Arg::Int(*at), Arg::Text(ek_hash)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("machine {ek_hash}")));
            }
            // Its unexpired, unrevoked tokens join the revocation list, then are marked.
            let tokens = "SELECT jti FROM enrollments WHERE ek_hash = $2 AND jti IS NOT NULL";
            let args = [Arg::Int(*at), Arg::Text(ek_hash)];
            ex.execute(
                &format!(
                    "INSERT INTO revocations (jti, exp, revoked_at, reason)
                     SELECT jti, exp, $1, 'machine revoked' FROM issued_tokens
                     WHERE revoked_at IS NULL AND exp > $1 AND jti IN ({tokens})
                     ON CONFLICT DO NOTHING"
                ),
                &args,
            )
            .await?;
            let n = ex
                .execute(
                    &format!(
                        "UPDATE issued_tokens SET revoked_at = $1, revoke_reason = 'machine revoked'
                         WHERE revoked_at IS NULL AND exp > $1 AND jti IN ({tokens})"
                    ),
                    &args,
                )
                .await?;
            // and its certificates (AK certificates outlive the enrollment token), so the CRL
            // lists them whether or not their token has expired
            ex.execute(
                &format!(
                    "UPDATE certificates SET revoked_at = $1, revoke_reason = 'machine revoked'
                     WHERE revoked_at IS NULL AND not_after > $1 AND jti IN ({tokens})"
                ),
                &args,
            )
            .await?;
            Ok((n, (n > 0).then_some(Change::Revoked)))
        }
    }
}

impl Store {
    pub async fn enrollment(&self, id: &str) -> Result<Option<EnrollmentRow>, StoreError> {
        Ok(self
            .read()
            .fetch_optional(
                "SELECT id, ek_hash, ak_pub, secret_hash, nonce, pcr_selection, created_at, expires_at, used_at
                 FROM enrollments WHERE id = $1",
                &[Arg::Text(id)],
            )
            .await?)
    }

    pub async fn machine(&self, ek_hash: &str) -> Result<Option<MachineRow>, StoreError> {
        Ok(self
            .read()
            .fetch_optional(
                "SELECT ek_hash, name, registered_at, enrolled_at, revoked_at FROM machines WHERE ek_hash = $1",
                &[Arg::Text(ek_hash)],
            )
            .await?)
    }

    /// Every machine, registered or enrolled, oldest first.
    pub async fn machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        Ok(self
            .read()
            .fetch_all(
                "SELECT ek_hash, name, registered_at, enrolled_at, revoked_at FROM machines
                 ORDER BY coalesce(registered_at, enrolled_at), ek_hash",
                &[],
            )
            .await?)
    }

    /// Forgets challenges that expired before `before` and issued nothing.
    pub async fn prune_enrollments(&self, before: i64) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .execute(
                "DELETE FROM enrollments WHERE jti IS NULL AND expires_at < $1",
                &[Arg::Int(before)],
            )
            .await?)
    }
}
