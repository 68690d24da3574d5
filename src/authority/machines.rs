//! The machines allowed to enroll: registration by EK hash (allowlist mode), the list, and
//! revocation (which also revokes the machine's unexpired tokens).

use super::{Authority, AuthorityError, Principal, now};
use crate::audit::AuditRecord;
use crate::config::EnrollMode;
use crate::store::{EnrollOp, MachineRow, StoreError, WriteOp};

impl Authority {
    /// Pre-registers a machine by EK hash under `name` (the `sub` of its tokens).
    pub async fn register_machine(
        &self,
        who: &Principal,
        ek_hash: &str,
        name: &str,
        remote: &str,
    ) -> Result<MachineRow, AuthorityError> {
        check_ek_hash(ek_hash)?;
        super::issue::check_name("name", name, 256)?;
        if name.starts_with("urn:keygate:") {
            return Err(AuthorityError::BadRequest(
                "name must not start with urn:keygate: (those subjects are keygate's own)".into(),
            ));
        }
        let at = now();
        let op = WriteOp::Enroll(EnrollOp::Register {
            ek_hash: ek_hash.to_owned(),
            name: name.to_owned(),
            at,
            by: who.id.clone(),
        });
        let rec = AuditRecord::new(&who.id, "enroll.machine.register", ek_hash, "success", remote);
        self.store.write(vec![op], rec).await.map_err(|e| match e {
            StoreError::Conflict(_) => AuthorityError::Conflict(format!(
                "machine {ek_hash} is registered or revoked already, or another machine is named {name:?}"
            )),
            e => e.into(),
        })?;
        self.store
            .machine(ek_hash)
            .await?
            .ok_or_else(|| AuthorityError::Internal("registered machine not found".into()))
    }

    /// Every registered or enrolled machine.
    pub async fn machines(&self) -> Result<Vec<MachineRow>, AuthorityError> {
        Ok(self.store.machines().await?)
    }

    /// Revokes a machine: later enrollments of its EK are refused and its unexpired tokens
    /// are revoked (they join the revocation list and stream). Returns how many tokens.
    pub async fn revoke_machine(
        &self,
        who: &Principal,
        ek_hash: &str,
        remote: &str,
    ) -> Result<u64, AuthorityError> {
        check_ek_hash(ek_hash)?;
        let at = now();
        let op = WriteOp::Enroll(EnrollOp::Revoke {
            ek_hash: ek_hash.to_owned(),
            at,
        });
        let rec = AuditRecord::new(&who.id, "enroll.machine.revoke", ek_hash, "success", remote);
        let n = self
            .store
            .write(vec![op], rec)
            .await?
            .first()
            .copied()
            .unwrap_or(0);
        if n > 0 {
            metrics::counter!("keygate_tokens_revoked_total").increment(n);
        }
        self.crl_cache.clear();
        Ok(n)
    }
}

/// 64 lowercase hex digits.
fn check_ek_hash(h: &str) -> Result<(), AuthorityError> {
    if h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(AuthorityError::BadRequest(
            "ek_hash must be 64 lowercase hex digits (SHA-256 of the EK's DER SubjectPublicKeyInfo)".into(),
        ))
    }
}

/// A revoked machine is refused in every mode; in allowlist mode it must be registered.
pub(super) fn check_machine(
    m: Option<&MachineRow>,
    mode: EnrollMode,
    ek_hash: &str,
) -> Result<(), AuthorityError> {
    if m.is_some_and(|m| m.revoked_at.is_some()) {
        return Err(AuthorityError::Denied(format!("machine {ek_hash} is revoked")));
    }
    if mode == EnrollMode::Allowlist && m.is_none_or(|m| m.name.is_none()) {
        return Err(AuthorityError::Denied(format!(
            "EK {ek_hash} is not registered (mode allowlist): an operator must register it first"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_checks() {
        let h = "ab".repeat(32);
        assert!(check_ek_hash(&h).is_ok());
        assert!(check_ek_hash(&h.to_uppercase()).is_err());
        assert!(check_ek_hash("ab").is_err());
        let mut m = MachineRow {
            ek_hash: h.clone(),
            name: None,
            registered_at: None,
            enrolled_at: Some(1),
            revoked_at: None,
        };
        assert!(check_machine(None, EnrollMode::EkCa, &h).is_ok());
        assert!(check_machine(None, EnrollMode::Allowlist, &h).is_err());
        assert!(check_machine(Some(&m), EnrollMode::Allowlist, &h).is_err());
        m.name = Some("node-1".into());
        assert!(check_machine(Some(&m), EnrollMode::Allowlist, &h).is_ok());
        m.revoked_at = Some(2);
        assert!(
            check_machine(Some(&m), EnrollMode::EkCa, &h)
                .unwrap_err()
                .to_string()
                .contains("revoked")
        );
    }
}
