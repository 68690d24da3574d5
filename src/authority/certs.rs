//! Certificate revocation: revoking one certificate, and the CRL each CA key signs in the
//! hardware (RFC 5280), which lists the certificates it issued that are revoked on their
//! own or through their token or machine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Authority, AuthorityError, Principal, now};
use crate::audit::AuditRecord;
use crate::store::{CertOp, WriteOp};
use crate::x509::RevokedEntry;

/// How long a signed CRL is reused: `/v1/crl` is public, and each new CRL is a signature
/// in the device. A revocation made through this process clears the cache at once; one made
/// on another replica reaches this replica's CRL within this time.
const CRL_REUSE: Duration = Duration::from_secs(5);

/// Signed CRLs by kid, with when they were made.
#[derive(Default)]
pub(crate) struct CrlCache(Mutex<HashMap<String, (Instant, Vec<u8>)>>);

impl CrlCache {
    fn get(&self, kid: &str) -> Option<Vec<u8>> {
        let map = self.0.lock().ok()?;
        map.get(kid)
            .filter(|(made, _)| made.elapsed() < CRL_REUSE)
            .map(|(_, der)| der.clone())
    }

    fn put(&self, kid: &str, der: &[u8]) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(kid.to_owned(), (Instant::now(), der.to_vec()));
        }
    }

    /// Forgets every CRL (a revocation happened).
    pub(crate) fn clear(&self) {
        if let Ok(mut map) = self.0.lock() {
            map.clear();
        }
    }
}

/// A serial as the API takes it: hex, at most 20 bytes (RFC 5280 §4.1.2.2); lowercased,
/// leading zeros dropped (as keygate records it).
fn normalize_serial(serial: &str) -> Result<String, AuthorityError> {
    let s = serial.trim_start_matches('0').to_ascii_lowercase();
    if serial.is_empty() || serial.len() > 42 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthorityError::NotFound(format!("certificate {serial}")));
    }
    Ok(if s.is_empty() { "0".into() } else { s })
}

impl Authority {
    /// Revokes the certificate `serial` (idempotent: revoking again answers the first time).
    /// Its CA's CRL lists it from now on. Returns the serial as keygate spells it, and when.
    pub async fn revoke_certificate(
        &self,
        who: &Principal,
        serial: &str,
        reason: Option<String>,
        remote: &str,
    ) -> Result<(String, i64), AuthorityError> {
        super::revocations::check_reason(reason.as_deref())?;
        let serial = normalize_serial(serial)?;
        let at = now();
        let op = WriteOp::Cert(CertOp::Revoke {
            serial: serial.clone(),
            at,
            reason,
        });
        let rec = AuditRecord::new(&who.id, "certificate.revoke", &serial, "success", remote);
        let affected = self.store.write(vec![op], rec).await?;
        self.crl_cache.clear();
        if affected.first().copied().unwrap_or(0) == 0 {
            let first = self
                .store
                .certificate_revoked_at(&serial)
                .await?
                .flatten()
                .ok_or_else(|| AuthorityError::NotFound(format!("certificate {serial}")))?;
            return Ok((serial, first));
        }
        Ok((serial, at))
    }

    /// The DER CRL of the CA of `kid` (default: the active key), signed in the hardware:
    /// its revoked, unexpired certificates, `nextUpdate` one revocation-list lifetime away.
    /// Only keys of this replica's device can sign: another device's key is a 404.
    pub async fn crl(&self, kid: Option<&str>) -> Result<Vec<u8>, AuthorityError> {
        let ring = self.key_ring();
        let kid = kid.unwrap_or(&ring.active.kid);
        let key =
            ring.published.iter().find(|k| k.row.kid == kid).ok_or_else(|| {
                AuthorityError::NotFound(format!("CRL of key {kid}: no such published key"))
            })?;
        if let Some(der) = self.crl_cache.get(kid) {
            return Ok(der);
        }
        let signer = key.signer.clone().ok_or_else(|| {
            AuthorityError::NotFound(format!(
                "CRL of key {kid}: its device is another replica's; ask that replica"
            ))
        })?;
        let t = now();
        let entries: Vec<RevokedEntry> = self
            .store
            .revoked_certificates(kid, t)
            .await?
            .into_iter()
            .map(|(serial, revoked_at, reason)| RevokedEntry {
                serial,
                revoked_at,
                reason,
            })
            .collect();
        let ca_pem = key.row.certificate.clone();
        let next = t + self.settings.revocation_list_ttl;
        // CRL numbers must grow from one CRL to the next, on every replica: milliseconds
        // since the epoch do, as long as replicas' clocks agree within the interval
        // between two fetches.
        let number = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let built = self
            .sign_blocking(move || crate::x509::build_crl(&signer, &ca_pem, &entries, t, next, number))
            .await?;
        match built {
            Ok(der) => {
                self.crl_cache.put(kid, &der);
                Ok(der)
            }
            Err(e) => Err(self.x509_failure(e).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_serial;

    #[test]
    fn serials_are_hex_in_one_spelling() {
        assert_eq!(normalize_serial("00AB12").unwrap(), "ab12");
        assert_eq!(normalize_serial("0").unwrap(), "0");
        for bad in ["", "xyz", "../x", &"a".repeat(43)] {
            assert!(normalize_serial(bad).is_err(), "{bad}");
        }
    }
}
