//! End-entity certificates for redeemed tokens: a PKCS#10 request is checked (its signature
//! by the key it names), and the hardware-held CA key signs a certificate for that key.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use der::oid::AssociatedOid;
use der::pem::LineEnding;
use der::{Decode, DecodePem, EncodePem};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, ExtensionReq};
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
    #[error("csr subjectAltName: {0}")]
    San(String),
}

/// A subject alternative name keygate puts in certificates: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum San {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl San {
    /// Parses `DNS:name`, `IP:addr`, or a bare name or address (the token's `sans` form),
    /// checking the name (RFC 1123 labels, an optional leading `*.` wildcard) and lowering
    /// its case.
    pub fn parse(text: &str) -> Result<San, String> {
        let (kind, v) = match text.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("dns") => (Some("dns"), v),
            Some((k, v)) if k.eq_ignore_ascii_case("ip") => (Some("ip"), v),
            _ => (None, text),
        };
        if kind != Some("dns")
            && let Ok(ip) = v.parse::<std::net::IpAddr>()
        {
            return Ok(San::Ip(ip));
        }
        if kind == Some("ip") {
            return Err(format!("{v:?} is not an IP address"));
        }
        if v.parse::<std::net::IpAddr>().is_ok() {
            // kept as a plain string in the token, it would read back as an IP address
            return Err(format!("{v:?} is an IP address, not a DNS name: write IP:{v}"));
        }
        let name = v.to_ascii_lowercase();
        let labels = name.strip_prefix("*.").unwrap_or(&name);
        let ok_label = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !labels.split('.').all(ok_label) {
            return Err(format!("{v:?} is not a DNS name or an IP address"));
        }
        Ok(San::Dns(name))
    }

    fn general_name(&self) -> Result<GeneralName, X509Error> {
        Ok(match self {
            San::Dns(d) => GeneralName::DnsName(
                der::asn1::Ia5String::new(d).map_err(|e| X509Error::Build(e.to_string()))?,
            ),
            San::Ip(ip) => GeneralName::from(*ip),
        })
    }
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(d) => write!(f, "DNS:{d}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// A checked PKCS#10 request: the key it names and signed with, and the subject
/// alternative names it asks for (its extensionRequest).
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub key: SubjectPublicKeyInfo,
    pub sans: Vec<San>,
}

fn ip_from(b: &[u8]) -> Result<std::net::IpAddr, CsrError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(v4.into());
    }
    <[u8; 16]>::try_from(b)
        .map(Into::into)
        .map_err(|_| CsrError::San("an IP address of neither 4 nor 16 bytes".into()))
}

/// The DNS and IP names of the CSR's extensionRequest (RFC 2985 §5.4.2); other kinds of
/// name are refused, as keygate would not put them in a certificate.
fn requested_sans(req: &CertReq) -> Result<Vec<San>, CsrError> {
    let mut out = Vec::new();
    for attr in req.info.attributes.iter().filter(|a| a.oid == ExtensionReq::OID) {
        for value in attr.values.iter() {
            let exts: ExtensionReq = value
                .decode_as()
                .map_err(|e| CsrError::San(format!("extensionRequest: {e}")))?;
            for ext in exts.0.iter().filter(|e| e.extn_id == SubjectAltName::OID) {
                let names = SubjectAltName::from_der(ext.extn_value.as_bytes())
                    .map_err(|e| CsrError::San(e.to_string()))?;
                for n in names.0 {
                    out.push(match n {
                        GeneralName::DnsName(d) => {
                            San::parse(&format!("DNS:{}", d.as_str())).map_err(CsrError::San)?
                        }
                        GeneralName::IpAddress(o) => San::Ip(ip_from(o.as_bytes())?),
                        _ => {
                            return Err(CsrError::San(
                                "only DNS names and IP addresses are supported".into(),
                            ));
                        }
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses a PEM PKCS#10 request and checks that the key it names signed it. Returns the key
/// and the names it asks for.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, CsrError> {
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
    let sans = requested_sans(&req)?;
    Ok(CheckedCsr {
        key: req.info.public_key,
        sans,
    })
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
    sans: Vec<GeneralName>,
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
        if !self.sans.is_empty() {
            ext.push(SubjectAltName(self.sans.clone()).to_extension(tbs.subject(), &ext)?);
        }
        Ok(ext)
    }
}

/// A certificate made by [`issue_end_entity`].
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The new certificate, then the CA certificate (PEM).
    pub chain: String,
    /// The serial number, lowercase hex without leading zeros.
    pub serial: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// Has the CA key sign a certificate for `key` with subject `CN=<common_name>` and `sans`
/// as subjectAltName, valid from a minute ago for `lifetime`, but never past the CA
/// certificate's own end.
pub fn issue_end_entity(
    ca: &HardwareSigner,
    ca_cert_pem: &str,
    key: SubjectPublicKeyInfoOwned,
    common_name: &str,
    sans: &[San],
    lifetime: Duration,
) -> Result<IssuedCert, X509Error> {
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
    let sans = sans
        .iter()
        .map(San::general_name)
        .collect::<Result<Vec<_>, _>>()?;
    let serial = random_serial()?;
    let serial_hex = super::serial_hex(&serial);
    let builder = CertificateBuilder::new(
        EndEntity {
            issuer,
            subject,
            sans,
        },
        serial,
        validity,
        key,
    )
    .map_err(|e| X509Error::Build(e.to_string()))?;
    let cert = builder
        .build::<_, p256::ecdsa::DerSignature>(ca)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let pem = cert
        .to_pem(LineEnding::LF)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    let not_after = end
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(IssuedCert {
        chain: format!("{pem}{}", ca_cert_pem.trim_start()),
        serial: serial_hex,
        not_after,
    })
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
        assert_eq!(check_csr("hello").unwrap_err(), CsrError::NotPem);
        let cert_label = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        assert_eq!(check_csr(cert_label).unwrap_err(), CsrError::NotPem);
        let empty_seq = "-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(check_csr(empty_seq), Err(CsrError::Der(_))));
    }
}
