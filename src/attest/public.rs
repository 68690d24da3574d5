//! `TPM2B_PUBLIC` (TPM 2.0 Library, Part 2, 12.2) for RSA and ECC keys: a bounds-checked
//! parser (truncated, oversized or wrongly typed input is an error, never a panic), the
//! object name, and the DER SubjectPublicKeyInfo of the key.

use aws_lc_rs::digest;

use super::reader::Reader;
use super::{AttestError, alg, malformed};

/// TPMA_OBJECT bits (Part 2, 8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes(pub u32);

impl Attributes {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;

    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

/// The key material of a public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Rsa {
        bits: u16,
        exponent: u32,
        modulus: Vec<u8>,
    },
    Ecc {
        curve: u16,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC`, with the exact bytes it came from (the name hashes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    pub name_alg: u16,
    pub attributes: Attributes,
    pub auth_policy: Vec<u8>,
    /// Symmetric algorithm of a storage key (EK): (algorithm, key bits, mode); `None` when NULL.
    pub symmetric: Option<(u16, u16, u16)>,
    /// Signing scheme and its hash; `None` when NULL.
    pub scheme: Option<(u16, u16)>,
    pub key: KeyKind,
    /// The marshalled TPMT_PUBLIC.
    pub raw: Vec<u8>,
}

/// Digest size of a TCG hash algorithm.
pub(crate) fn digest_alg(hash: u16) -> Result<&'static digest::Algorithm, AttestError> {
    match hash {
        alg::SHA256 => Ok(&digest::SHA256),
        alg::SHA384 => Ok(&digest::SHA384),
        other => Err(AttestError::Unsupported(format!("hash algorithm 0x{other:04x}"))),
    }
}

impl TpmPublic {
    /// Parses a marshalled `TPM2B_PUBLIC` (what `tpm2_createek -u`/`tpm2_createak -u` write
    /// in `tss` format). The whole input must be used.
    pub fn from_tpm2b(bytes: &[u8], what: &'static str) -> Result<TpmPublic, AttestError> {
        let mut outer = Reader::new(bytes, what);
        let inner = outer.tpm2b(2048)?;
        if !outer.is_empty() {
            return Err(malformed(what, "bytes after the TPM2B_PUBLIC"));
        }
        if inner.is_empty() {
            return Err(malformed(what, "empty public area"));
        }
        Self::from_tpmt(inner, what)
    }

    /// Parses a marshalled `TPMT_PUBLIC` (no size prefix). The whole input must be used.
    pub fn from_tpmt(bytes: &[u8], what: &'static str) -> Result<TpmPublic, AttestError> {
        let mut r = Reader::new(bytes, what);
        let kind = r.u16()?;
        let name_alg = r.u16()?;
        digest_alg(name_alg)?;
        let attributes = Attributes(r.u32()?);
        let auth_policy = r.tpm2b(64)?.to_vec();
        let sym_alg = r.u16()?;
        let symmetric = if sym_alg == alg::NULL {
            None
        } else {
            Some((sym_alg, r.u16()?, r.u16()?))
        };
        let scheme_alg = r.u16()?;
        let scheme = if scheme_alg == alg::NULL {
            None
        } else {
            let hash = r.u16()?;
            if scheme_alg == alg::ECDAA {
                r.u16()?; // count
            }
            Some((scheme_alg, hash))
        };
        let key = match kind {
            alg::RSA => {
                let bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65_537,
                    e => e,
                };
                let modulus = r.tpm2b(512)?.to_vec();
                if bits != 2048 || modulus.len() != 256 {
                    return Err(AttestError::Unsupported(format!(
                        "RSA key of {bits} bits ({} byte modulus); only RSA-2048",
                        modulus.len()
                    )));
                }
                KeyKind::Rsa {
                    bits,
                    exponent,
                    modulus,
                }
            }
            alg::ECC => {
                let curve = r.u16()?;
                let kdf = r.u16()?;
                if kdf != alg::NULL {
                    r.u16()?;
                }
                let size = curve_size(curve)?;
                let x = r.tpm2b(66)?.to_vec();
                let y = r.tpm2b(66)?.to_vec();
                if x.len() != size || y.len() != size {
                    return Err(malformed(what, "ECC point coordinates do not fit the curve"));
                }
                KeyKind::Ecc { curve, x, y }
            }
            other => {
                return Err(malformed(
                    what,
                    format!("object type 0x{other:04x} is not RSA or ECC"),
                ));
            }
        };
        if !r.is_empty() {
            return Err(malformed(what, "bytes after the public area"));
        }
        Ok(TpmPublic {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key,
            raw: bytes.to_vec(),
        })
    }

    /// The object's name: nameAlg (2 bytes) || H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut out = self.name_alg.to_be_bytes().to_vec();
        if let Ok(d) = digest_alg(self.name_alg) {
            out.extend_from_slice(digest::digest(d, &self.raw).as_ref());
        }
        out
    }

    /// The key as DER SubjectPublicKeyInfo (RFC 5280; RSA per RFC 8017, EC per RFC 5480).
    pub fn spki_der(&self) -> Vec<u8> {
        match &self.key {
            KeyKind::Rsa {
                exponent, modulus, ..
            } => {
                let rsa_key = tlv(
                    0x30,
                    &[der_uint(modulus), der_uint(&exponent.to_be_bytes())].concat(),
                );
                let alg_id = tlv(0x30, &[RSA_ENCRYPTION_OID, &[0x05, 0x00]].concat());
                tlv(0x30, &[alg_id, bit_string(&rsa_key)].concat())
            }
            KeyKind::Ecc { curve, x, y } => {
                let curve_oid: &[u8] = if *curve == CURVE_P384 { P384_OID } else { P256_OID };
                let alg_id = tlv(0x30, &[EC_PUBLIC_KEY_OID, curve_oid].concat());
                let point = [&[0x04][..], x, y].concat();
                tlv(0x30, &[alg_id, bit_string(&point)].concat())
            }
        }
    }

    /// An RSA key as DER RSAPublicKey (RFC 8017), what RSA signature checks take.
    pub(crate) fn rsa_public_key_der(&self) -> Option<Vec<u8>> {
        match &self.key {
            KeyKind::Rsa {
                exponent, modulus, ..
            } => Some(tlv(
                0x30,
                &[der_uint(modulus), der_uint(&exponent.to_be_bytes())].concat(),
            )),
            KeyKind::Ecc { .. } => None,
        }
    }

    /// the HTTP contract's EK hash: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub fn ek_hash(&self) -> String {
        hex::encode(digest::digest(&digest::SHA256, &self.spki_der()))
    }
}

pub(crate) const CURVE_P256: u16 = 0x0003;
pub(crate) const CURVE_P384: u16 = 0x0004;

/// Coordinate size of a supported curve.
pub(crate) fn curve_size(curve: u16) -> Result<usize, AttestError> {
    match curve {
        CURVE_P256 => Ok(32),
        CURVE_P384 => Ok(48),
        other => Err(AttestError::Unsupported(format!("ECC curve 0x{other:04x}"))),
    }
}

// DER encodings of the OIDs (tag and length included).
const RSA_ENCRYPTION_OID: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// One DER TLV with a definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = (n as u32).to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER of an unsigned big-endian number.
fn der_uint(v: &[u8]) -> Vec<u8> {
    let v = &v[v
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(v.len().saturating_sub(1))..];
    let mut content = Vec::with_capacity(v.len() + 1);
    if v.first().is_some_and(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(v);
    tlv(0x02, &content)
}

fn bit_string(v: &[u8]) -> Vec<u8> {
    tlv(0x03, &[&[0x00][..], v].concat())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ECC P-256 EK public area as the TCG EK template (low range, L-2) makes it.
    pub(crate) fn ecc_ek_tpmt(x: &[u8; 32], y: &[u8; 32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&alg::ECC.to_be_bytes());
        v.extend_from_slice(&alg::SHA256.to_be_bytes());
        v.extend_from_slice(&0x000300b2u32.to_be_bytes());
        v.extend_from_slice(&32u16.to_be_bytes());
        v.extend_from_slice(&[0x11; 32]);
        v.extend_from_slice(&alg::AES.to_be_bytes());
        v.extend_from_slice(&128u16.to_be_bytes());
        v.extend_from_slice(&alg::CFB.to_be_bytes());
        v.extend_from_slice(&alg::NULL.to_be_bytes()); // scheme
        v.extend_from_slice(&CURVE_P256.to_be_bytes());
        v.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
        v.extend_from_slice(&32u16.to_be_bytes());
        v.extend_from_slice(x);
        v.extend_from_slice(&32u16.to_be_bytes());
        v.extend_from_slice(y);
        v
    }

    /// A parsed P-256 EK (L-2 template) for a fixed test key.
    pub(crate) fn sample_ecc_ek() -> TpmPublic {
        let sk = p256::SecretKey::from_slice(&[5u8; 32]).unwrap();
        let point = sk.public_key().to_sec1_bytes();
        let t = ecc_ek_tpmt(
            point[1..33].try_into().unwrap(),
            point[33..65].try_into().unwrap(),
        );
        TpmPublic::from_tpmt(&t, "ek_pub").unwrap()
    }

    #[test]
    fn parses_and_refuses_truncated_oversized_and_wrong_types() {
        let t = ecc_ek_tpmt(&[1; 32], &[2; 32]);
        let mut b = (t.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&t);
        let p = TpmPublic::from_tpm2b(&b, "ek_pub").unwrap();
        assert!(
            p.attributes
                .has(Attributes::FIXED_TPM | Attributes::DECRYPT | Attributes::RESTRICTED)
        );
        assert_eq!(p.symmetric, Some((alg::AES, 128, alg::CFB)));
        assert_eq!(p.name().len(), 34);
        assert_eq!(&p.name()[..2], &[0x00, 0x0b]);
        // every truncation fails cleanly
        for n in 0..b.len() {
            assert!(
                TpmPublic::from_tpm2b(&b[..n], "ek_pub").is_err(),
                "truncated at {n}"
            );
        }
        // trailing bytes, a wrong size prefix, a wrong type
        let mut long = b.clone();
        long.push(0);
        assert!(TpmPublic::from_tpm2b(&long, "ek_pub").is_err());
        let mut wrong = b.clone();
        wrong[1] = wrong[1].wrapping_add(1);
        assert!(TpmPublic::from_tpm2b(&wrong, "ek_pub").is_err());
        let mut keyedhash = b.clone();
        keyedhash[3] = 0x08;
        assert!(matches!(
            TpmPublic::from_tpm2b(&keyedhash, "ek_pub"),
            Err(AttestError::Malformed { .. })
        ));
        assert!(TpmPublic::from_tpm2b(&[0xff, 0xff], "ek_pub").is_err());
    }

    #[test]
    fn spki_of_an_ec_key_is_what_p256_reads() {
        let sk = p256::SecretKey::from_slice(&[5u8; 32]).unwrap();
        let point = sk.public_key().to_sec1_bytes();
        let t = ecc_ek_tpmt(
            point[1..33].try_into().unwrap(),
            point[33..65].try_into().unwrap(),
        );
        let p = TpmPublic::from_tpmt(&t, "ek_pub").unwrap();
        use p256::pkcs8::DecodePublicKey;
        let parsed = p256::PublicKey::from_public_key_der(&p.spki_der()).unwrap();
        assert_eq!(parsed, sk.public_key());
        assert_eq!(p.ek_hash().len(), 64);
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(der_uint(&[0x00, 0x01]), vec![0x02, 0x01, 0x01]);
        assert_eq!(der_uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_uint(&[0x00]), vec![0x02, 0x01, 0x00]);
        assert_eq!(tlv(0x04, &[0u8; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }
}
