//! MakeCredential in software (TPM 2.0 Library, Part 1, 24 "Credential Protection"; KDFa
//! and KDFe in 11.4.10): protect a secret so that only the TPM holding `ek` can recover it,
//! and only for the object named `ak_name` (TPM2_ActivateCredential).
//!
//! - seed: RSA EK: random, encrypted with RSA-OAEP (EK nameAlg) and the label "IDENTITY";
//!   ECC EK: KDFe over the x-coordinate of an ephemeral ECDH with the EK, the encrypted
//!   seed being the ephemeral public point.
//! - symKey = KDFa(nameAlg, seed, "STORAGE", name, -, EK symmetric key bits);
//!   encIdentity = AES-CFB(symKey, IV 0, TPM2B(secret)).
//! - HMACkey = KDFa(nameAlg, seed, "INTEGRITY", -, -, digest bits);
//!   outerHMAC = HMAC(HMACkey, encIdentity || name).

use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{
    OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384, OaepPublicEncryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::{digest, hmac};

use super::public::{CURVE_P384, digest_alg};
use super::{AttestError, KeyKind, TpmPublic, alg};

/// The two halves of a credential, each a marshalled TPM2B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// TPM2B_ID_OBJECT.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET.
    pub encrypted_secret: Vec<u8>,
}

impl Credential {
    /// The file `tpm2_makecredential -o` writes and `tpm2_activatecredential -i` reads:
    /// magic 0xBADCC0DE, version 1 (both big-endian u32), then the two TPM2Bs.
    pub fn tpm2_tools_file(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.id_object.len() + self.encrypted_secret.len());
        out.extend_from_slice(&0xBADC_C0DEu32.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&self.id_object);
        out.extend_from_slice(&self.encrypted_secret);
        out
    }
}

/// A marshalled TPM2B: big-endian u16 size, then `v`.
pub(crate) fn tpm2b(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

fn hmac_alg(hash: u16) -> Result<hmac::Algorithm, AttestError> {
    match hash {
        alg::SHA256 => Ok(hmac::HMAC_SHA256),
        alg::SHA384 => Ok(hmac::HMAC_SHA384),
        other => Err(AttestError::Unsupported(format!("hash algorithm 0x{other:04x}"))),
    }
}

/// KDFa (SP 800-108 counter mode with HMAC): `bits` of key from `key`, `label` (a zero
/// octet is appended), `context_u` and `context_v`.
pub fn kdfa(
    hash: u16,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, AttestError> {
    let k = hmac::Key::new(hmac_alg(hash)?, key);
    let want = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(want + 64);
    let mut counter: u32 = 1;
    while out.len() < want {
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}

/// KDFe (SP 800-56A concatenation KDF): `bits` of key from the shared secret `z`.
pub fn kdfe(
    hash: u16,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, AttestError> {
    let d = digest_alg(hash)?;
    let want = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(want + 64);
    let mut counter: u32 = 1;
    while out.len() < want {
        let mut ctx = digest::Context::new(d);
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}

/// Protects `secret` (at most the EK nameAlg's digest size) for the TPM holding `ek` and
/// the object named `ak_name`.
pub fn make_credential(ek: &TpmPublic, ak_name: &[u8], secret: &[u8]) -> Result<Credential, AttestError> {
    let hash = ek.name_alg;
    let dsize = digest_alg(hash)?.output_len();
    if secret.is_empty() || secret.len() > dsize {
        return Err(AttestError::Unsupported(format!(
            "a credential of {} bytes",
            secret.len()
        )));
    }
    let sym_bits = match ek.symmetric {
        Some((alg::AES, bits @ (128 | 256), alg::CFB)) => bits,
        _ => return Err(AttestError::Unsupported("an EK without AES-128/256-CFB".into())),
    };
    let rng = SystemRandom::new();
    let (seed, encrypted) = match &ek.key {
        KeyKind::Rsa { .. } => {
            let mut seed = vec![0u8; dsize];
            aws_lc_rs::rand::fill(&mut seed).map_err(|_| AttestError::Crypto("random"))?;
            let key =
                PublicEncryptingKey::from_der(&ek.spki_der()).map_err(|_| AttestError::Crypto("RSA key"))?;
            let key = OaepPublicEncryptingKey::new(key).map_err(|_| AttestError::Crypto("RSA key"))?;
            let oaep = if hash == alg::SHA384 {
                &OAEP_SHA384_MGF1SHA384
            } else {
                &OAEP_SHA256_MGF1SHA256
            };
            let mut out = vec![0u8; key.ciphertext_size()];
            let n = key
                .encrypt(oaep, &seed, &mut out, Some(b"IDENTITY\0"))
                .map_err(|_| AttestError::Crypto("RSA-OAEP"))?
                .len();
            out.truncate(n);
            (seed, out)
        }
        KeyKind::Ecc { curve, x, y } => {
            let ecdh = if *curve == CURVE_P384 {
                &agreement::ECDH_P384
            } else {
                &agreement::ECDH_P256
            };
            let eph =
                EphemeralPrivateKey::generate(ecdh, &rng).map_err(|_| AttestError::Crypto("ECDH key"))?;
            let eph_pub = eph
                .compute_public_key()
                .map_err(|_| AttestError::Crypto("ECDH key"))?;
            let eph_pub = eph_pub.as_ref();
            let size = x.len();
            let (ex, ey) = (&eph_pub[1..1 + size], &eph_pub[1 + size..]);
            let peer = [&[0x04][..], x, y].concat();
            let z = agreement::agree_ephemeral(
                eph,
                UnparsedPublicKey::new(ecdh, &peer),
                AttestError::Malformed {
                    what: "ek_pub",
                    why: "the EC point is not on its curve".into(),
                },
                |z| Ok(z.to_vec()),
            )?;
            let seed = kdfe(hash, &z, "IDENTITY", ex, x, (dsize * 8) as u32)?;
            let point = [tpm2b(ex), tpm2b(ey)].concat();
            (seed, point)
        }
    };
    let sym_key = kdfa(hash, &seed, "STORAGE", ak_name, &[], sym_bits as u32)?;
    let mut enc_identity = tpm2b(secret);
    let cipher = if sym_bits == 256 { &AES_256 } else { &AES_128 };
    let key = UnboundCipherKey::new(cipher, &sym_key).map_err(|_| AttestError::Crypto("AES key"))?;
    EncryptingKey::cfb128(key)
        .and_then(|k| {
            k.less_safe_encrypt(
                &mut enc_identity,
                EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
            )
        })
        .map_err(|_| AttestError::Crypto("AES-CFB"))?;
    let hmac_key = kdfa(hash, &seed, "INTEGRITY", &[], &[], (dsize * 8) as u32)?;
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac_alg(hash)?, &hmac_key));
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer = mac.sign();
    let id_object = [tpm2b(outer.as_ref()), enc_identity].concat();
    Ok(Credential {
        id_object: tpm2b(&id_object),
        encrypted_secret: tpm2b(&encrypted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_counts_and_truncates() {
        let a = kdfa(alg::SHA256, b"key", "STORAGE", b"u", b"", 128).unwrap();
        let b = kdfa(alg::SHA256, b"key", "STORAGE", b"u", b"", 512).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(b.len(), 64);
        // The bit count is part of the input, so a shorter output is not a prefix.
        assert_ne!(a[..], b[..16]);
        assert_ne!(kdfa(alg::SHA256, b"key", "INTEGRITY", b"u", b"", 128).unwrap(), a);
        assert_eq!(
            kdfe(alg::SHA384, b"z", "IDENTITY", b"u", b"v", 384)
                .unwrap()
                .len(),
            48
        );
    }

    #[test]
    fn credential_shape() {
        let ek = super::super::public::tests::sample_ecc_ek();
        let name = [0x00, 0x0b].iter().copied().chain([7u8; 32]).collect::<Vec<_>>();
        let c = make_credential(&ek, &name, &[9u8; 32]).unwrap();
        // TPM2B(TPM2B(hmac 32) || 2 + 32 encrypted) and TPM2B(x 32, y 32)
        assert_eq!(c.id_object.len(), 2 + 2 + 32 + 2 + 32);
        assert_eq!(c.encrypted_secret.len(), 2 + 2 + 32 + 2 + 32);
        let f = c.tpm2_tools_file();
        assert_eq!(&f[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
        assert!(make_credential(&ek, &name, &[0u8; 33]).is_err());
    }
}
