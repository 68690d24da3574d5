//! EK certificates: does the certificate a client sends chain to a TPM manufacturer CA the
//! operator trusts, is it within its validity, and does it certify the EK the client sent?
//!
//! The bundle is a folder of CA certificates (PEM, any number per file, or DER). Every
//! certificate in it is trusted as an issuer of EK certificates, intermediates included, as
//! keylime's `tpm_cert_store` does: TPMs do not hand out their intermediates, so the
//! operator installs them. A bundle certificate must be a CA (basicConstraints cA, and
//! keyCertSign when keyUsage is present) and itself within its validity.
//!
//! EK certificates are unusual X.509 (TCG EK Credential Profile): an empty subject, a
//! critical subjectAltName naming the TPM, `keyEncipherment` only. None of that is checked
//! here beyond the signature, the dates and the key: the key is what attestation relies on.

use std::path::Path;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1, ECDSA_P384_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384,
    RSA_PKCS1_2048_8192_SHA512, UnparsedPublicKey, VerificationAlgorithm,
};
use der::{Decode, Encode};
use spki::ObjectIdentifier;
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};

use super::TpmPublic;

const SHA1_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.5");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Longest EK certificate accepted (real ones are about 1 to 1.5 KiB).
pub const MAX_EK_CERT: usize = 8 * 1024;

/// Why an EK certificate was refused, or a bundle could not be loaded. Messages name the
/// check and are safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertError {
    #[error("ek_certificate is not a DER X.509 certificate: {0}")]
    Malformed(String),
    #[error("ek_certificate is not valid now: {0}")]
    Validity(String),
    #[error("ek_certificate is not issued by a configured TPM manufacturer CA (issuer {0})")]
    UnknownIssuer(String),
    #[error("ek_certificate signature does not verify with its issuer {0}")]
    BadSignature(String),
    #[error("ek_certificate issuer {issuer} is not usable: {why}")]
    Issuer { issuer: String, why: String },
    #[error("ek_certificate signature algorithm {0} is not supported")]
    Algorithm(String),
    #[error("ek_pub does not match the public key in ek_certificate")]
    KeyMismatch,
    #[error("TPM manufacturer CA bundle {path}: {why}")]
    Bundle { path: String, why: String },
}

struct Anchor {
    cert: Certificate,
    /// DER of the subject name, to match issuers byte for byte.
    subject: Vec<u8>,
}

/// The TPM manufacturer CA certificates trusted to issue EK certificates.
#[derive(Default)]
pub struct EkCaBundle {
    anchors: Vec<Anchor>,
}

impl std::fmt::Debug for EkCaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EkCaBundle")
            .field("certificates", &self.anchors.len())
            .finish()
    }
}

fn name_of(cert: &Certificate, subject: bool) -> String {
    let t = cert.tbs_certificate();
    let n = if subject { t.subject() } else { t.issuer() };
    let s = n.to_string();
    if s.is_empty() { "(empty name)".into() } else { s }
}

impl EkCaBundle {
    /// Loads every `*.pem`, `*.crt`, `*.cer` and `*.der` file of `dir` (other files, such as
    /// a README, are skipped). A file that does not parse is an error, not skipped: a
    /// half-loaded trust store is worse than none.
    pub fn load_dir(dir: &Path) -> Result<EkCaBundle, EkCertError> {
        let err = |path: &Path, why: String| EkCertError::Bundle {
            path: path.display().to_string(),
            why,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| err(dir, e.to_string()))?;
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        let mut certs = Vec::new();
        for path in files {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            if !["pem", "crt", "cer", "der"].contains(&ext.as_str()) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| err(&path, e.to_string()))?;
            if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                let chain = Certificate::load_pem_chain(&bytes).map_err(|e| err(&path, e.to_string()))?;
                certs.extend(chain);
            } else {
                certs.push(Certificate::from_der(&bytes).map_err(|e| err(&path, e.to_string()))?);
            }
        }
        Ok(Self::from_certificates(certs))
    }

    pub fn from_certificates(certs: Vec<Certificate>) -> EkCaBundle {
        let anchors = certs
            .into_iter()
            .filter_map(|cert| {
                let subject = cert.tbs_certificate().subject().to_der().ok()?;
                Some(Anchor { cert, subject })
            })
            .collect();
        EkCaBundle { anchors }
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Checks `der` (an EK certificate) at Unix time `now`: it is within its validity, it is
    /// signed by a bundle certificate that is a CA within its own validity, and it certifies
    /// exactly the key of `ek`. Returns the issuing CA's subject name.
    pub fn verify(&self, der: &[u8], ek: &TpmPublic, now: i64) -> Result<String, EkCertError> {
        if der.len() > MAX_EK_CERT {
            return Err(EkCertError::Malformed(format!("longer than {MAX_EK_CERT} bytes")));
        }
        let cert = Certificate::from_der(der).map_err(|e| EkCertError::Malformed(e.to_string()))?;
        if !spki_matches(&cert, ek) {
            return Err(EkCertError::KeyMismatch);
        }
        within_validity(&cert, now).map_err(EkCertError::Validity)?;
        let issuer = cert
            .tbs_certificate()
            .issuer()
            .to_der()
            .map_err(|e| EkCertError::Malformed(e.to_string()))?;
        let tbs = tbs_bytes(der).ok_or_else(|| EkCertError::Malformed("no tbsCertificate".into()))?;
        let candidates: Vec<&Anchor> = self.anchors.iter().filter(|a| a.subject == issuer).collect();
        if candidates.is_empty() {
            return Err(EkCertError::UnknownIssuer(name_of(&cert, false)));
        }
        // Several CA certificates may share a name (a re-keyed CA): the one whose key
        // verifies the signature is the issuer.
        let mut last = EkCertError::BadSignature(name_of(&cert, false));
        for a in candidates {
            match check_signature(&cert, tbs, &a.cert) {
                Ok(()) => return usable_ca(&a.cert, now).map(|()| name_of(&a.cert, true)),
                Err(e @ EkCertError::Algorithm(_)) => last = e,
                Err(_) => {}
            }
        }
        Err(last)
    }
}

/// The issuer must be a CA, allowed to sign certificates, and within its validity.
fn usable_ca(ca: &Certificate, now: i64) -> Result<(), EkCertError> {
    let issuer = name_of(ca, true);
    let fail = |why: String| EkCertError::Issuer {
        issuer: issuer.clone(),
        why,
    };
    within_validity(ca, now).map_err(fail)?;
    let tbs = ca.tbs_certificate();
    let bc = tbs
        .get_extension::<BasicConstraints>()
        .map_err(|e| fail(format!("basicConstraints: {e}")))?;
    // A v1 certificate has no extensions at all; only a self-signed v1 root passes.
    let is_ca = match bc {
        Some((_, bc)) => bc.ca,
        None => tbs.extensions().is_none() && tbs.subject() == tbs.issuer(),
    };
    if !is_ca {
        return Err(fail("it is not a CA certificate".into()));
    }
    if let Some((_, KeyUsage(ku))) = tbs
        .get_extension::<KeyUsage>()
        .map_err(|e| fail(format!("keyUsage: {e}")))?
        && !ku.contains(KeyUsages::KeyCertSign)
    {
        return Err(fail("its keyUsage lacks keyCertSign".into()));
    }
    Ok(())
}

fn within_validity(cert: &Certificate, now: i64) -> Result<(), String> {
    let v = cert.tbs_certificate().validity();
    let nb = v.not_before.to_unix_duration().as_secs() as i64;
    let na = v.not_after.to_unix_duration().as_secs() as i64;
    if now < nb {
        return Err(format!("{} is valid from {}", name_of(cert, true), v.not_before));
    }
    if now > na {
        return Err(format!("{} expired at {}", name_of(cert, true), v.not_after));
    }
    Ok(())
}

/// The tbsCertificate TLV inside a DER Certificate: the bytes its signature covers, exactly
/// as the issuer encoded them.
fn tbs_bytes(der: &[u8]) -> Option<&[u8]> {
    crate::x509::first_element(der)
}

fn curve_of(cert: &Certificate) -> Option<ObjectIdentifier> {
    cert.tbs_certificate()
        .subject_public_key_info()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
}

fn check_signature(cert: &Certificate, tbs: &[u8], issuer: &Certificate) -> Result<(), EkCertError> {
    let spki = issuer.tbs_certificate().subject_public_key_info();
    let key_alg = spki.algorithm.oid;
    let sig_alg = cert.signature_algorithm().oid;
    let alg: &dyn VerificationAlgorithm = match (sig_alg, key_alg, curve_of(issuer)) {
        // Older manufacturer CAs still sign with SHA-1; a collision would have to be forced
        // on the manufacturer's own signing, so EK certificates accept it.
        (SHA1_WITH_RSA, RSA_ENCRYPTION, _) => &RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        (SHA256_WITH_RSA, RSA_ENCRYPTION, _) => &RSA_PKCS1_2048_8192_SHA256,
        (SHA384_WITH_RSA, RSA_ENCRYPTION, _) => &RSA_PKCS1_2048_8192_SHA384,
        (SHA512_WITH_RSA, RSA_ENCRYPTION, _) => &RSA_PKCS1_2048_8192_SHA512,
        (ECDSA_WITH_SHA256, EC_PUBLIC_KEY, Some(P256)) => &ECDSA_P256_SHA256_ASN1,
        (ECDSA_WITH_SHA384, EC_PUBLIC_KEY, Some(P256)) => &ECDSA_P256_SHA384_ASN1,
        (ECDSA_WITH_SHA256, EC_PUBLIC_KEY, Some(P384)) => &ECDSA_P384_SHA256_ASN1,
        (ECDSA_WITH_SHA384, EC_PUBLIC_KEY, Some(P384)) => &ECDSA_P384_SHA384_ASN1,
        _ => {
            return Err(EkCertError::Algorithm(format!(
                "{sig_alg} with an issuer key {key_alg}"
            )));
        }
    };
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| EkCertError::BadSignature(name_of(cert, false)))?;
    let sig = cert
        .signature()
        .as_bytes()
        .ok_or_else(|| EkCertError::BadSignature(name_of(cert, false)))?;
    UnparsedPublicKey::new(alg, key)
        .verify(tbs, sig)
        .map_err(|_| EkCertError::BadSignature(name_of(cert, false)))
}

/// Does the certificate's key equal the EK's? Compared as key material (RSA modulus and
/// exponent, or the EC point and curve), so equivalent encodings of the same key agree.
fn spki_matches(cert: &Certificate, ek: &TpmPublic) -> bool {
    let Ok(ours) = spki::SubjectPublicKeyInfoOwned::from_der(&ek.spki_der()) else {
        return false;
    };
    let theirs = cert.tbs_certificate().subject_public_key_info();
    if theirs.algorithm.oid != ours.algorithm.oid {
        return false;
    }
    if theirs.algorithm.oid == EC_PUBLIC_KEY
        && curve_of(cert)
            != ours
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
    {
        return false;
    }
    if theirs.algorithm.oid == RSA_ENCRYPTION {
        return rsa_parts(theirs.subject_public_key.raw_bytes())
            == rsa_parts(ours.subject_public_key.raw_bytes())
            && rsa_parts(ours.subject_public_key.raw_bytes()).is_some();
    }
    theirs.subject_public_key == ours.subject_public_key
}

/// (modulus, exponent) of a DER RSAPublicKey, leading zeros stripped.
fn rsa_parts(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    #[derive(der::Sequence)]
    struct RsaPublicKey<'a> {
        n: der::asn1::UintRef<'a>,
        e: der::asn1::UintRef<'a>,
    }
    let k = RsaPublicKey::from_der(der).ok()?;
    Some((k.n.as_bytes().to_vec(), k.e.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::str::FromStr;
    use std::time::Duration;

    use der::Encode;
    use x509_cert::builder::profile::BuilderProfile;
    use x509_cert::builder::{Builder, CertificateBuilder};
    use x509_cert::certificate::TbsCertificate;
    use x509_cert::ext::{Extension, ToExtension};
    use x509_cert::name::Name;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
    use x509_cert::time::{Time, Validity};

    /// A bare profile: the given names, and basicConstraints cA when `ca`.
    struct Plain {
        issuer: Name,
        subject: Name,
        ca: bool,
    }

    impl BuilderProfile for Plain {
        fn get_issuer(&self, _subject: &Name) -> Name {
            self.issuer.clone()
        }
        fn get_subject(&self) -> Name {
            self.subject.clone()
        }
        fn build_extensions(
            &self,
            _spk: SubjectPublicKeyInfoRef<'_>,
            _issuer_spk: SubjectPublicKeyInfoRef<'_>,
            tbs: &TbsCertificate,
        ) -> x509_cert::builder::Result<Vec<Extension>> {
            let bc = BasicConstraints {
                ca: self.ca,
                path_len_constraint: None,
            };
            Ok(vec![bc.to_extension(tbs.subject(), &[])?])
        }
    }

    fn at(secs: u64) -> Time {
        Time::UtcTime(der::asn1::UtcTime::from_unix_duration(Duration::from_secs(secs)).unwrap())
    }

    /// A certificate for `spki` named `subject`, issued by `issuer` with `key`, valid from
    /// `from` to `to` (Unix seconds); DER.
    fn cert(
        issuer: &str,
        subject: &str,
        ca: bool,
        spki: SubjectPublicKeyInfoOwned,
        key: &p256::ecdsa::SigningKey,
        (from, to): (u64, u64),
    ) -> Vec<u8> {
        let profile = Plain {
            issuer: Name::from_str(issuer).unwrap(),
            subject: Name::from_str(subject).unwrap(),
            ca,
        };
        let b = CertificateBuilder::new(
            profile,
            SerialNumber::from(7u32),
            Validity::new(at(from), at(to)),
            spki,
        )
        .unwrap();
        b.build::<_, p256::ecdsa::DerSignature>(key)
            .unwrap()
            .to_der()
            .unwrap()
    }

    fn spki_of(key: &p256::ecdsa::SigningKey) -> SubjectPublicKeyInfoOwned {
        SubjectPublicKeyInfoOwned::from_key(key.verifying_key()).unwrap()
    }

    #[test]
    fn chains_dates_keys_and_ca_flags_are_checked() {
        let ca_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other_key = p256::ecdsa::SigningKey::from_slice(&[8u8; 32]).unwrap();
        let ek = super::super::public::tests::sample_ecc_ek();
        let ek_spki = SubjectPublicKeyInfoOwned::from_der(&ek.spki_der()).unwrap();
        let life = (1_700_000_000, 2_000_000_000);
        let now = 1_800_000_000;
        let ca = cert(
            "CN=Maker CA",
            "CN=Maker CA",
            true,
            spki_of(&ca_key),
            &ca_key,
            life,
        );
        let ek_cert = cert("CN=Maker CA", "CN=ek", false, ek_spki.clone(), &ca_key, life);
        let bundle = |ders: &[&Vec<u8>]| {
            EkCaBundle::from_certificates(ders.iter().map(|d| Certificate::from_der(d).unwrap()).collect())
        };
        let trusted = bundle(&[&ca]);
        assert_eq!(trusted.verify(&ek_cert, &ek, now).map(|_| ()), Ok(()));
        // Before and after its validity.
        assert!(matches!(
            trusted.verify(&ek_cert, &ek, 1_600_000_000),
            Err(EkCertError::Validity(_))
        ));
        assert!(matches!(
            trusted.verify(&ek_cert, &ek, 2_100_000_000),
            Err(EkCertError::Validity(_))
        ));
        // An expired CA.
        let old_ca = cert(
            "CN=Maker CA",
            "CN=Maker CA",
            true,
            spki_of(&ca_key),
            &ca_key,
            (1_600_000_000, 1_700_000_001),
        );
        assert!(matches!(
            bundle(&[&old_ca]).verify(&ek_cert, &ek, now),
            Err(EkCertError::Issuer { .. })
        ));
        // Unknown CA; same name but another key; an issuer that is not a CA.
        let stranger = cert(
            "CN=Other",
            "CN=Other",
            true,
            spki_of(&other_key),
            &other_key,
            life,
        );
        assert!(matches!(
            bundle(&[&stranger]).verify(&ek_cert, &ek, now),
            Err(EkCertError::UnknownIssuer(_))
        ));
        let impostor = cert(
            "CN=Maker CA",
            "CN=Maker CA",
            true,
            spki_of(&other_key),
            &other_key,
            life,
        );
        assert!(matches!(
            bundle(&[&impostor]).verify(&ek_cert, &ek, now),
            Err(EkCertError::BadSignature(_))
        ));
        // ... and with both, the real one is found.
        assert_eq!(
            bundle(&[&impostor, &ca]).verify(&ek_cert, &ek, now).map(|_| ()),
            Ok(())
        );
        let not_ca = cert(
            "CN=Maker CA",
            "CN=Maker CA",
            false,
            spki_of(&ca_key),
            &ca_key,
            life,
        );
        assert!(matches!(
            bundle(&[&not_ca]).verify(&ek_cert, &ek, now),
            Err(EkCertError::Issuer { .. })
        ));
        // A certificate for another key than ek_pub.
        let other_ek = cert("CN=Maker CA", "CN=ek", false, spki_of(&other_key), &ca_key, life);
        assert_eq!(trusted.verify(&other_ek, &ek, now), Err(EkCertError::KeyMismatch));
        // A changed byte in the signed part.
        let mut tampered = ek_cert.clone();
        let n = tampered.len();
        tampered[n / 2] ^= 1;
        assert!(trusted.verify(&tampered, &ek, now).is_err());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let bundle = EkCaBundle::default();
        let ek = super::super::public::tests::sample_ecc_ek();
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x82\xff\xff",
            &[0x30; 40],
            &vec![0u8; MAX_EK_CERT + 1],
        ] {
            assert!(matches!(
                bundle.verify(bad, &ek, 0),
                Err(EkCertError::Malformed(_))
            ));
        }
        assert!(rsa_parts(b"\x30\x03\x02\x01").is_none());
    }
}
