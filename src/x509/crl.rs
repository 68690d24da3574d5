//! RFC 5280 certificate revocation lists signed inside the hardware by a CA key: what
//! `openssl verify -crl_check` and TLS stacks read to refuse revoked certificates.

use std::time::{Duration, SystemTime};

use der::Encode;
use der::asn1::Uint;
use x509_cert::builder::{Builder, CrlBuilder};
use x509_cert::crl::RevokedCert;
use x509_cert::ext::pkix::{CrlNumber, CrlReason};
use x509_cert::ext::{Extensions, ToExtension};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;
use x509_cert::{Certificate, der::DecodePem};

use super::X509Error;
use crate::keys::HardwareSigner;

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Serial number, hex (as [`super::serial_hex`] writes it).
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// The operator's reason, mapped to an RFC 5280 reason code where it names one.
    pub reason: Option<String>,
}

/// RFC 5280 §5.3.1 reason code for a reason given as text: the code's own name
/// (`keyCompromise`, `superseded`, ...) or keygate's `machine revoked`
/// (cessationOfOperation); anything else carries no code.
fn reason_code(reason: &str) -> Option<CrlReason> {
    let r: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    Some(match r.as_str() {
        "keycompromise" | "keycompromised" => CrlReason::KeyCompromise,
        "cacompromise" => CrlReason::CaCompromise,
        "affiliationchanged" => CrlReason::AffiliationChanged,
        "superseded" => CrlReason::Superseded,
        "cessationofoperation" | "machinerevoked" => CrlReason::CessationOfOperation,
        "privilegewithdrawn" => CrlReason::PrivilegeWithdrawn,
        _ => return None,
    })
}

fn unix(t: i64) -> Result<Time, X509Error> {
    let st = SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Time::try_from(st).map_err(|e| X509Error::Build(e.to_string()))
}

/// Has the CA key sign a CRL (DER) for the certificates its CA certificate issued:
/// `thisUpdate` = `now`, `nextUpdate` = `next_update`, CRL number `number` (it must grow
/// from one CRL to the next), the authority key identifier of the CA, and the entries.
pub fn build_crl(
    ca: &HardwareSigner,
    ca_cert_pem: &str,
    entries: &[RevokedEntry],
    now: i64,
    next_update: i64,
    number: u64,
) -> Result<Vec<u8>, X509Error> {
    let build = |e: &dyn std::fmt::Display| X509Error::Build(e.to_string());
    let ca_cert = Certificate::from_pem(ca_cert_pem.as_bytes()).map_err(|e| build(&e))?;
    let number = Uint::new(&number.to_be_bytes()).map_err(|e| build(&e))?;
    let mut revoked = Vec::with_capacity(entries.len());
    for e in entries {
        let bytes = hex::decode(if e.serial.len() % 2 == 1 {
            format!("0{}", e.serial)
        } else {
            e.serial.clone()
        })
        .map_err(|_| X509Error::Build(format!("serial {:?} is not hex", e.serial)))?;
        let serial: SerialNumber = SerialNumber::new(&bytes).map_err(|e| build(&e))?;
        let issuer = ca_cert.tbs_certificate().subject();
        let crl_entry_extensions = match e.reason.as_deref().and_then(reason_code) {
            Some(code) => {
                let ext = code
                    .to_extension(issuer, &Extensions::new())
                    .map_err(|e| build(&e))?;
                Some(vec![ext])
            }
            None => None,
        };
        revoked.push(RevokedCert {
            serial_number: serial,
            revocation_date: unix(e.revoked_at)?,
            crl_entry_extensions,
        });
    }
    let builder = CrlBuilder::new_with_this_update(&ca_cert, CrlNumber(number), unix(now)?)
        .map_err(|e| build(&e))?
        .with_next_update(Some(unix(next_update)?));
    let builder = if revoked.is_empty() {
        builder
    } else {
        builder.with_certificates(revoked.into_iter())
    };
    let crl = builder
        .build::<_, p256::ecdsa::DerSignature>(ca)
        .map_err(|e| build(&e))?;
    crl.to_der().map_err(|e| build(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_rfc_5280_codes() {
        assert_eq!(reason_code("key compromised"), Some(CrlReason::KeyCompromise));
        assert_eq!(reason_code("keyCompromise"), Some(CrlReason::KeyCompromise));
        assert_eq!(
            reason_code("machine revoked"),
            Some(CrlReason::CessationOfOperation)
        );
        assert_eq!(reason_code("host retired"), None);
    }
}
