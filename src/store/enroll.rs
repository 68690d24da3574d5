//! Enrollment state: challenges and machines. Reads here; the writes are [`super::WriteOp`]s
//! applied by [`apply`] inside the writer's transaction, each with its audit entry.

use sqlx::{Sqlite, Transaction};

use super::rows::{EnrollmentRow, MachineRow};
use super::{Refusal, Store, StoreError};

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

pub(super) async fn apply(tx: &mut Transaction<'_, Sqlite>, op: &EnrollOp) -> Result<u64, StoreError> {
    match op {
        EnrollOp::Insert(e) => Ok(sqlx::query(
            "INSERT INTO enrollments (id, ek_hash, ak_pub, secret_hash, nonce, pcr_selection, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.id)
        .bind(&e.ek_hash)
        .bind(&e.ak_pub)
        .bind(&e.secret_hash)
        .bind(&e.nonce)
        .bind(&e.pcr_selection)
        .bind(e.created_at)
        .bind(e.expires_at)
        .execute(&mut **tx)
        .await?
        .rows_affected()),
        EnrollOp::Use {
            id,
            at,
            outcome,
            jti,
        } => {
            let r = sqlx::query(
                "UPDATE enrollments SET used_at = ?, outcome = ?, jti = ?
                 WHERE id = ? AND used_at IS NULL AND expires_at >= ?",
            )
            .bind(at)
            .bind(outcome)
            .bind(jti)
            .bind(id)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::Refused(Refusal::EnrollmentUsed));
            }
            Ok(1)
        }
        EnrollOp::Enrolled { ek_hash, at } => {
            let r = sqlx::query(
                "INSERT INTO machines (ek_hash, enrolled_at) VALUES (?, ?)
                 ON CONFLICT (ek_hash) DO UPDATE SET enrolled_at = excluded.enrolled_at
                 WHERE machines.revoked_at IS NULL",
            )
            .bind(ek_hash)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::Refused(Refusal::MachineRevoked));
            }
            Ok(1)
        }
        EnrollOp::Register {
            ek_hash,
            name,
            at,
            by,
        } => {
            let r = sqlx::query(
                "INSERT INTO machines (ek_hash, name, registered_at, registered_by) VALUES (?, ?, ?, ?)
                 ON CONFLICT (ek_hash) DO UPDATE SET name = excluded.name,
                    registered_at = excluded.registered_at, registered_by = excluded.registered_by
                 WHERE machines.name IS NULL AND machines.revoked_at IS NULL",
            )
            .bind(ek_hash)
            .bind(name)
            .bind(at)
            .bind(by)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::Conflict(format!(
                    "machine {ek_hash} is registered or revoked already"
                )));
            }
            Ok(1)
        }
        EnrollOp::Revoke { ek_hash, at } => {
            let r = sqlx::query("UPDATE machines SET revoked_at = coalesce(revoked_at, ?) WHERE ek_hash = ?")
                .bind(at)
                .bind(ek_hash)
                .execute(&mut **tx)
                .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::NotFound(format!("machine {ek_hash}")));
            }
            // Its unexpired, unrevoked tokens join the revocation list, then are marked.
            let tokens = "SELECT jti FROM enrollments WHERE ek_hash = ?3 AND jti IS NOT NULL";
            sqlx::query(&format!(
                "INSERT OR IGNORE INTO revocations (jti, exp, revoked_at, reason)
                 SELECT jti, exp, ?1, 'machine revoked' FROM issued_tokens
                 WHERE revoked_at IS NULL AND exp > ?2 AND jti IN ({tokens})"
            ))
            .bind(at)
            .bind(at)
            .bind(ek_hash)
            .execute(&mut **tx)
            .await?;
            let r = sqlx::query(&format!(
                "UPDATE issued_tokens SET revoked_at = ?1, revoke_reason = 'machine revoked'
                 WHERE revoked_at IS NULL AND exp > ?2 AND jti IN ({tokens})"
            ))
            .bind(at)
            .bind(at)
            .bind(ek_hash)
            .execute(&mut **tx)
            .await?;
            Ok(r.rows_affected())
        }
    }
}

impl Store {
    pub async fn enrollment(&self, id: &str) -> Result<Option<EnrollmentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, ek_hash, ak_pub, secret_hash, nonce, pcr_selection, created_at, expires_at, used_at
             FROM enrollments WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| EnrollmentRow::from_row(&r)).transpose()
    }

    pub async fn machine(&self, ek_hash: &str) -> Result<Option<MachineRow>, StoreError> {
        let row = sqlx::query(
            "SELECT ek_hash, name, registered_at, enrolled_at, revoked_at FROM machines WHERE ek_hash = ?",
        )
        .bind(ek_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| MachineRow::from_row(&r)).transpose()
    }

    /// Every machine, registered or enrolled, oldest first.
    pub async fn machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT ek_hash, name, registered_at, enrolled_at, revoked_at FROM machines
             ORDER BY coalesce(registered_at, enrolled_at), ek_hash",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(MachineRow::from_row).collect()
    }

    /// Forgets challenges that expired before `before` and issued nothing.
    pub async fn prune_enrollments(&self, before: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM enrollments WHERE jti IS NULL AND expires_at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
