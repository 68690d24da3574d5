//! End-entity certificates for redeemed tokens: a PKCS#10 request is checked (its signature
//! by the key it names), and the hardware-held CA key signs a certificate for that key.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use der::pem::LineEnding;
use der::{Decode, DecodePem, EncodePem};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, SubjectPublicKeyInfo};

use super::{X509Error, escape_rdn, random_serial};
use crate::keys::HardwareSigner;

const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const ED25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const KP_SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
const KP_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// Certificates start this long before they are made, for clocks slightly behind (as
/// step-ca does).
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CSR was refused; the message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not a PEM \"CERTIFICATE REQUEST\"")]
    NotPem,
    #[error("csr is not a DER PKCS#10 request: {0}")]
    Der(String),
    #[error(
        "csr key and signature algorithm are not supported (ECDSA P-256/SHA-256, P-384/SHA-384, RSA/SHA-256, Ed25519)"
    )]
    Algorithm,
    #[error("csr signature does not verify with the key it contains")]
    BadSignature,
}

/// Parses a PEM PKCS#10 request and checks that the key it names signed it. Returns the key.
pub fn check_csr(pem: &str) -> Result<SubjectPublicKeyInfo, CsrError> {
    let (label, der) = der::pem::decode_vec(pem.trim().as_bytes()).map_err(|_| CsrError::NotPem)?;
    if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError::NotPem);
    }
    let req = CertReq::from_der(&der).map_err(|e| CsrError::Der(e.to_string()))?;
    let info = first_element(&der).ok_or_else(|| CsrError::Der("no certificationRequestInfo".into()))?;
    let spki = &req.info.public_key;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    let alg: &dyn VerificationAlgorithm = match (req.algorithm.oid, spki.algorithm.oid, curve) {
        (ECDSA_WITH_SHA256, EC_PUBLIC_KEY, Some(P256)) => &ECDSA_P256_SHA256_ASN1,
        (ECDSA_WITH_SHA384, EC_PUBLIC_KEY, Some(P384)) => &ECDSA_P384_SHA384_ASN1,
        (SHA256_WITH_RSA, RSA_ENCRYPTION, _) => &RSA_PKCS1_2048_8192_SHA256,
        (ED25519_OID, ED25519_OID, _) => &ED25519,
        _ => return Err(CsrError::Algorithm),
    };
    let signature = req.signature.as_bytes().ok_or(CsrError::BadSignature)?;
    let key = spki.subject_public_key.as_bytes().ok_or(CsrError::BadSignature)?;
    UnparsedPublicKey::new(alg, key)
        .verify(info, signature)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(req.info.public_key)
}

/// (header length, content length) of the DER TLV at the start of `b`.
fn tlv_header(b: &[u8]) -> Option<(usize, usize)> {
    let first = *b.get(1)?;
    if first < 0x80 {
        return Some((2, first as usize));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let len = b
        .get(2..2 + n)?
        .iter()
        .fold(0usize, |a, &x| (a << 8) | x as usize);
    Some((2 + n, len))
}

/// The DER TLV at the start of `b`, tag and length included (`None` when `b` is shorter
/// than its length says).
pub(crate) fn first_tlv(b: &[u8]) -> Option<&[u8]> {
    let (h, len) = tlv_header(b)?;
    b.get(..h.checked_add(len)?)
}

/// The first element inside a DER SEQUENCE, tag and length included: the bytes a PKCS#10
/// signature covers, exactly as the client encoded them.
pub(crate) fn first_element(der: &[u8]) -> Option<&[u8]> {
    if der.first() != Some(&0x30) {
        return None;
    }
    let (outer_header, _) = tlv_header(der)?;
    first_tlv(der.get(outer_header..)?)
}

/// An end-entity profile: CA:FALSE, digitalSignature, clientAuth and serverAuth, with the
/// key identifiers that chain it to the issuing CA certificate.
struct EndEntity {
    issuer: Name,
    subject: Name,
}

impl BuilderProfile for EndEntity {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    // Each extension is encoded knowing the ones before it, hence one push at a time.
    #[allow(clippy::vec_init_then_push)]
    fn build_extensions(
        &self,
        spk: SubjectPublicKeyInfoRef<'_>,
        issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let mut ext: Vec<Extension> = Vec::new();
        ext.push(AuthorityKeyIdentifier::try_from(issuer_spk)?.to_extension(tbs.subject(), &ext)?);
        ext.push(SubjectKeyIdentifier::try_from(spk)?.to_extension(tbs.subject(), &ext)?);
        ext.push(
            BasicConstraints {
                ca: false,
                path_len_constraint: None,
            }
            .to_extension(tbs.subject(), &ext)?,
        );
        ext.push(KeyUsage(KeyUsages::DigitalSignature.into()).to_extension(tbs.subject(), &ext)?);
        ext.push(ExtendedKeyUsage(vec![KP_CLIENT_AUTH, KP_SERVER_AUTH]).to_extension(tbs.subject(), &ext)?);
        Ok(ext)
    }
}

/// Has the CA key sign a certificate for `key` with subject `CN=<common_name>`, valid from a
/// minute ago for `lifetime`, but never past the CA certificate's own end. Returns the PEM
/// chain: the new certificate, then the CA certificate.
pub fn issue_end_entity(
    ca: &HardwareSigner,
    ca_cert_pem: &str,
    key: SubjectPublicKeyInfoOwned,
    common_name: &str,
    lifetime: Duration,
) -> Result<String, X509Error> {
    let ca_cert =
        Certificate::from_pem(ca_cert_pem.as_bytes()).map_err(|e| X509Error::Build(e.to_string()))?;
    let issuer = ca_cert.tbs_certificate().subject().clone();
    let subject = Name::from_str(&format!("CN={}", escape_rdn(common_name)))
        .map_err(|e| X509Error::Subject(e.to_string()))?;
    let now = SystemTime::now();
    let ca_end = ca_cert.tbs_certificate().validity().not_after.to_system_time();
    let end = (now + lifetime).min(ca_end);
    if end <= now {
        return Err(X509Error::Build("the CA certificate has expired".into()));
    }
    let time = |t: SystemTime| Time::try_from(t).map_err(|e| X509Error::Build(e.to_string()));
    let validity = Validity::new(time(now - BACKDATE)?, time(end)?);
    let builder = CertificateBuilder::new(EndEntity { issuer, subject }, random_serial()?, validity, key)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let cert = builder
        .build::<_, p256::ecdsa::DerSignature>(ca)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let pem = cert
        .to_pem(LineEnding::LF)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    Ok(format!("{pem}{}", ca_cert_pem.trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_element_reads_short_and_long_lengths() {
        assert_eq!(
            first_element(&[0x30, 0x04, 0x02, 0x01, 0x05, 0x00]),
            Some(&[0x02, 0x01, 0x05][..])
        );
        let mut long = vec![0x30, 0x81, 0x83, 0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0u8, 0x80));
        assert_eq!(first_element(&long).map(<[u8]>::len), Some(0x83));
        assert_eq!(first_element(&[0x31, 0x00]), None);
        assert_eq!(first_element(&[0x30, 0x05, 0x30, 0x09, 0x00]), None);
    }

    #[test]
    fn garbage_is_not_a_csr() {
        assert_eq!(check_csr("hello"), Err(CsrError::NotPem));
        let cert_label = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        assert_eq!(check_csr(cert_label), Err(CsrError::NotPem));
        let empty_seq = "-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(check_csr(empty_seq), Err(CsrError::Der(_))));
    }
}
