//! X.509 certificates signed inside the hardware (`x509-cert` builder driven by a
//! [`crate::keys::HardwareSigner`]).

mod crl;
mod leaf;

pub use crl::{RevokedEntry, build_crl};
pub(crate) use leaf::first_element;
pub use leaf::{CheckedCsr, CsrError, IssuedCert, San, check_csr, issue_end_entity};

use std::str::FromStr;
use std::time::Duration;

use der::EncodePem;
use der::pem::LineEnding;
use x509_cert::builder::profile::cabf::Root;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

use crate::keys::HardwareSigner;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("certificate subject: {0}")]
    Subject(String),
    #[error("certificate building failed: {0}")]
    Build(String),
    #[error("random serial number: {0}")]
    Random(String),
}

/// Subject attributes of CA certificates. The CA/B Forum root profile wants C, O and CN.
#[derive(Debug, Clone)]
pub struct CaSubject {
    pub country: String,
    pub organization: String,
    pub common_name: String,
}

fn escape_rdn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A 159-bit random positive serial number (RFC 5280 §4.1.2.2: at most 20 octets).
fn random_serial() -> Result<SerialNumber, X509Error> {
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| X509Error::Random(e.to_string()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).map_err(|e| X509Error::Build(e.to_string()))
}

/// A serial number as lowercase hex without leading zeros (how openssl and keygate's API
/// show it).
pub fn serial_hex(serial: &SerialNumber) -> String {
    let hex = hex::encode(serial.as_bytes());
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Builds the self-signed CA certificate of a hardware key: CA:TRUE, keyCertSign and cRLSign,
/// subject key identifier, valid `lifetime` from now; the signature is made in the device.
/// Returns PEM.
pub fn self_signed_ca(
    signer: &HardwareSigner,
    subject: &CaSubject,
    lifetime: Duration,
) -> Result<String, X509Error> {
    let name = format!(
        "CN={},O={},C={}",
        escape_rdn(&subject.common_name),
        escape_rdn(&subject.organization),
        escape_rdn(&subject.country)
    );
    let name = Name::from_str(&name).map_err(|e| X509Error::Subject(e.to_string()))?;
    let profile = Root::new(false, name).map_err(|e| X509Error::Subject(e.to_string()))?;
    let spki = SubjectPublicKeyInfoOwned::from_key(&signature::Keypair::verifying_key(signer))
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let validity = Validity::from_now(lifetime).map_err(|e| X509Error::Build(e.to_string()))?;
    let builder = CertificateBuilder::new(profile, random_serial()?, validity, spki)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let cert = builder
        .build::<_, p256::ecdsa::DerSignature>(signer)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    cert.to_pem(LineEnding::LF)
        .map_err(|e| X509Error::Build(e.to_string()))
}
