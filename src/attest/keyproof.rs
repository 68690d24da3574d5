//! Key proofs, verifier side: that a signing key was made inside a genuine TPM and cannot
//! leave it (docs/adr/0014-key-proofs.md). No TPM is needed here.
//!
//! The steps, each of which refuses on its own:
//! 1. `ek-certificate`: the EK certificate chains to a trusted manufacturer CA and names
//!    exactly the EK public key shown.
//! 2. `ak`: the AK is a restricted signing key bound to its TPM (fixedTPM, fixedParent,
//!    sensitiveDataOrigin).
//! 3. `key`: the signing key is a sign-only key made in the TPM and bound to it (fixedTPM,
//!    fixedParent, sensitiveDataOrigin), and its public key is the JWKS entry.
//! 4. `credential`: the verifier's MakeCredential for the AK's name with the EK public is
//!    activated: the AK lives in the TPM that holds that EK.
//! 5. `certify`: TPM2_Certify by the AK, over the verifier's nonce, names the signing key.

use aws_lc_rs::constant_time::verify_slices_are_equal;

use super::quote::check_signature;
use super::reader::Reader;
use super::{Attributes, Credential, EkCaBundle, KeyKind, TpmPublic, make_credential};

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;

/// The attributes every proven key (and the AK) must have: made in the TPM, bound to it.
const BOUND: u32 = Attributes::FIXED_TPM | Attributes::FIXED_PARENT | Attributes::SENSITIVE_DATA_ORIGIN;

/// The step that failed, and why. The step names are stable (the CLI prints them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {why}")]
pub struct ProofError {
    pub step: &'static str,
    pub why: String,
}

fn fail(step: &'static str, why: impl Into<String>) -> ProofError {
    ProofError {
        step,
        why: why.into(),
    }
}

/// The public evidence a server shows for one key (all TCG wire formats).
#[derive(Debug, Clone)]
pub struct Evidence<'a> {
    /// DER; `None` when the server has none (the proof then fails at `ek-certificate`).
    pub ek_certificate: Option<&'a [u8]>,
    /// TPM2B_PUBLIC of the EK, the AK and the signing key.
    pub ek_public: &'a [u8],
    pub ak_public: &'a [u8],
    pub key_public: &'a [u8],
}

/// Evidence that passed steps 1 to 3.
#[derive(Debug, Clone)]
pub struct Checked {
    pub ek: TpmPublic,
    pub ak: TpmPublic,
    pub key: TpmPublic,
    /// Subject of the manufacturer CA that issued the EK certificate.
    pub manufacturer_ca: String,
}

fn bits(a: Attributes) -> String {
    let names = [
        (Attributes::FIXED_TPM, "fixedTPM"),
        (Attributes::FIXED_PARENT, "fixedParent"),
        (Attributes::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (Attributes::RESTRICTED, "restricted"),
        (Attributes::DECRYPT, "decrypt"),
        (Attributes::SIGN, "sign"),
    ];
    let set: Vec<&str> = names.iter().filter(|(b, _)| a.has(*b)).map(|(_, n)| *n).collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join("|")
    }
}

/// Steps 1 to 3: everything that needs no answer from the TPM. `jwk_point` is the JWKS
/// entry's (x, y).
pub fn check_evidence(
    e: &Evidence<'_>,
    bundle: &EkCaBundle,
    jwk_point: (&[u8], &[u8]),
    now: i64,
) -> Result<Checked, ProofError> {
    let ek = parse_ek(e)?;
    let cert = e
        .ek_certificate
        .ok_or_else(|| fail("ek-certificate", "the server shows no EK certificate"))?;
    let manufacturer_ca = bundle
        .verify(cert, &ek, now)
        .map_err(|x| fail("ek-certificate", x.to_string()))?;
    let (ak, key) = check_binding(e, jwk_point)?;
    Ok(Checked {
        ek,
        ak,
        key,
        manufacturer_ca,
    })
}

/// Steps 2 and 3 without the EK certificate: what a server checks of its own new key
/// before it publishes it (it need not hold the manufacturer CAs). Not a proof to anyone
/// else: the EK is whatever the server says.
pub fn check_own_key(e: &Evidence<'_>, jwk_point: (&[u8], &[u8])) -> Result<Checked, ProofError> {
    let ek = parse_ek(e)?;
    let (ak, key) = check_binding(e, jwk_point)?;
    Ok(Checked {
        ek,
        ak,
        key,
        manufacturer_ca: String::new(),
    })
}

fn parse_ek(e: &Evidence<'_>) -> Result<TpmPublic, ProofError> {
    TpmPublic::from_tpm2b(e.ek_public, "ek_public").map_err(|x| fail("ek-certificate", x.to_string()))
}

/// The AK and the key: attributes, and the key is the JWKS one.
fn check_binding(e: &Evidence<'_>, jwk_point: (&[u8], &[u8])) -> Result<(TpmPublic, TpmPublic), ProofError> {
    let ak = TpmPublic::from_tpm2b(e.ak_public, "ak_public").map_err(|x| fail("ak", x.to_string()))?;
    let want = BOUND | Attributes::RESTRICTED | Attributes::SIGN;
    if !ak.attributes.has(want) || ak.attributes.has(Attributes::DECRYPT) {
        return Err(fail(
            "ak",
            format!(
                "attributes {} are not those of a restricted, sign-only key bound to its TPM",
                bits(ak.attributes)
            ),
        ));
    }
    let key = TpmPublic::from_tpm2b(e.key_public, "key_public").map_err(|x| fail("key", x.to_string()))?;
    if !key.attributes.has(BOUND | Attributes::SIGN) || key.attributes.has(Attributes::DECRYPT) {
        return Err(fail(
            "key",
            format!(
                "attributes {} do not say the key was made in the TPM, cannot leave it and only signs",
                bits(key.attributes)
            ),
        ));
    }
    let same = match &key.key {
        KeyKind::Ecc { x, y, .. } => {
            verify_slices_are_equal(x, jwk_point.0).is_ok() && verify_slices_are_equal(y, jwk_point.1).is_ok()
        }
        KeyKind::Rsa { .. } => false,
    };
    if !same {
        return Err(fail("key", "the certified key is not the JWKS key of this kid"));
    }
    Ok((ak, key))
}

/// Step 4's question: a credential for the AK's name that only the TPM holding the EK can
/// activate, hiding `secret`.
pub fn credential_for(checked: &Checked, secret: &[u8]) -> Result<Credential, ProofError> {
    make_credential(&checked.ek, &checked.ak.name(), secret).map_err(|e| fail("credential", e.to_string()))
}

/// Steps 4 and 5: the secret came back, and `attest` (TPMS_ATTEST) signed by the AK
/// (`signature`, TPMT_SIGNATURE) certifies the signing key for `nonce`.
pub fn check_answer(
    checked: &Checked,
    secret: &[u8],
    nonce: &[u8],
    returned_secret: &[u8],
    attest: &[u8],
    signature: &[u8],
) -> Result<(), ProofError> {
    if verify_slices_are_equal(secret, returned_secret).is_err() {
        return Err(fail(
            "credential",
            "the secret returned is not the one sealed to the EK for this AK",
        ));
    }
    check_signature(&checked.ak, attest, signature).map_err(|e| fail("certify", e.to_string()))?;
    let mut r = Reader::new(attest, "certify attestation");
    let step = |e: super::AttestError| fail("certify", e.to_string());
    if r.u32().map_err(step)? != TPM_GENERATED_VALUE || r.u16().map_err(step)? != TPM_ST_ATTEST_CERTIFY {
        return Err(fail(
            "certify",
            "the attestation is not a TPM-generated TPM2_Certify",
        ));
    }
    r.tpm2b(68).map_err(step)?; // qualifiedSigner
    let extra = r.tpm2b(64).map_err(step)?;
    r.take(8 + 4 + 4 + 1 + 8).map_err(step)?; // clockInfo, firmwareVersion
    let name = r.tpm2b(68).map_err(step)?;
    r.tpm2b(68).map_err(step)?; // qualifiedName
    r.done().map_err(step)?;
    if verify_slices_are_equal(extra, nonce).is_err() {
        return Err(fail(
            "certify",
            "the certification is not over this verifier's nonce",
        ));
    }
    if verify_slices_are_equal(name, &checked.key.name()).is_err() {
        return Err(fail(
            "certify",
            "the certification names another key than the one shown",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};

    use super::*;
    use crate::attest::alg;
    use crate::attest::public::tests::{ecc_ek_tpmt, sample_ecc_ek};

    const KEY_ATTRS: u32 = BOUND | Attributes::USER_WITH_AUTH | Attributes::SIGN;
    const AK_ATTRS: u32 = KEY_ATTRS | Attributes::RESTRICTED;

    fn point(sk: &SigningKey) -> ([u8; 32], [u8; 32]) {
        let p = sk.verifying_key().to_sec1_bytes();
        (p[1..33].try_into().unwrap(), p[33..65].try_into().unwrap())
    }

    /// A TPM2B_PUBLIC of an ECC P-256 ECDSA-SHA256 signing key with `attrs`.
    fn signing_public(attrs: u32, sk: &SigningKey) -> Vec<u8> {
        let (x, y) = point(sk);
        let mut t = Vec::new();
        for v in [alg::ECC, alg::SHA256] {
            t.extend_from_slice(&v.to_be_bytes());
        }
        t.extend_from_slice(&attrs.to_be_bytes());
        t.extend_from_slice(&0u16.to_be_bytes()); // authPolicy
        for v in [alg::NULL, alg::ECDSA, alg::SHA256, 0x0003, alg::NULL] {
            t.extend_from_slice(&v.to_be_bytes());
        }
        for c in [x, y] {
            t.extend_from_slice(&32u16.to_be_bytes());
            t.extend_from_slice(&c);
        }
        crate::attest::tpm2b(&t)
    }

    fn tpm2b(v: &[u8]) -> Vec<u8> {
        crate::attest::tpm2b(v)
    }

    /// A TPMS_ATTEST of `kind` over `extra` naming `name`, and the AK's TPMT_SIGNATURE.
    fn attest(ak: &SigningKey, kind: u16, extra: &[u8], name: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut a = TPM_GENERATED_VALUE.to_be_bytes().to_vec();
        a.extend_from_slice(&kind.to_be_bytes());
        a.extend(tpm2b(&[0x00, 0x0b, 1, 2]));
        a.extend(tpm2b(extra));
        a.extend_from_slice(&[0; 8 + 4 + 4 + 1 + 8]);
        a.extend(tpm2b(name));
        a.extend(tpm2b(name));
        let t = sign_tpmt(ak, &a);
        (a, t)
    }

    /// The AK's TPMT_SIGNATURE (ECDSA, SHA-256) over `msg`.
    fn sign_tpmt(ak: &SigningKey, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = ak.sign(msg);
        let (r, s) = sig.split_bytes();
        let mut t = alg::ECDSA.to_be_bytes().to_vec();
        t.extend_from_slice(&alg::SHA256.to_be_bytes());
        t.extend(tpm2b(&r));
        t.extend(tpm2b(&s));
        t
    }

    struct Fixture {
        ak: SigningKey,
        key: SigningKey,
        ek_public: Vec<u8>,
        ak_public: Vec<u8>,
        key_public: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let ak = SigningKey::from_slice(&[7; 32]).unwrap();
        let key = SigningKey::from_slice(&[9; 32]).unwrap();
        let ek = sample_ecc_ek();
        let (x, y) = match &ek.key {
            KeyKind::Ecc { x, y, .. } => (x.clone(), y.clone()),
            KeyKind::Rsa { .. } => unreachable!(),
        };
        Fixture {
            ek_public: tpm2b(&ecc_ek_tpmt(&x.try_into().unwrap(), &y.try_into().unwrap())),
            ak_public: signing_public(AK_ATTRS, &ak),
            key_public: signing_public(KEY_ATTRS, &key),
            ak,
            key,
        }
    }

    fn binding(f: &Fixture, ak_public: &[u8], key_public: &[u8]) -> Result<Checked, ProofError> {
        let e = Evidence {
            ek_certificate: None,
            ek_public: &f.ek_public,
            ak_public,
            key_public,
        };
        let (x, y) = point(&f.key);
        check_own_key(&e, (&x, &y))
    }

    #[test]
    fn the_ak_and_the_key_must_be_bound_to_the_tpm() {
        let f = fixture();
        binding(&f, &f.ak_public, &f.key_public).unwrap();
        for (attrs, what) in [
            (AK_ATTRS & !Attributes::FIXED_TPM, "no fixedTPM"),
            (AK_ATTRS & !Attributes::RESTRICTED, "not restricted"),
            (AK_ATTRS | Attributes::DECRYPT, "decrypts"),
            (AK_ATTRS & !Attributes::SENSITIVE_DATA_ORIGIN, "imported"),
        ] {
            let e = binding(&f, &signing_public(attrs, &f.ak), &f.key_public).unwrap_err();
            assert_eq!(e.step, "ak", "{what}");
        }
        for (attrs, what) in [
            (KEY_ATTRS & !Attributes::FIXED_TPM, "duplicable"),
            (KEY_ATTRS & !Attributes::FIXED_PARENT, "movable"),
            (KEY_ATTRS & !Attributes::SENSITIVE_DATA_ORIGIN, "imported"),
            (KEY_ATTRS | Attributes::DECRYPT, "decrypts"),
            (KEY_ATTRS & !Attributes::SIGN, "does not sign"),
        ] {
            let e = binding(&f, &f.ak_public, &signing_public(attrs, &f.key)).unwrap_err();
            assert_eq!(e.step, "key", "{what}");
        }
        // Another key than the JWKS one, bound or not.
        let other = SigningKey::from_slice(&[3; 32]).unwrap();
        let e = binding(&f, &f.ak_public, &signing_public(KEY_ATTRS, &other)).unwrap_err();
        assert_eq!((e.step, e.why.contains("not the JWKS key")), ("key", true));
        // An RSA public area is not the JWKS key either (and the EK is no key to certify).
        let e = binding(&f, &f.ak_public, &f.ek_public).unwrap_err();
        assert_eq!(e.step, "key");
    }

    #[test]
    fn the_certification_must_be_the_ak_s_over_the_nonce_naming_the_key() {
        let f = fixture();
        let checked = binding(&f, &f.ak_public, &f.key_public).unwrap();
        let (secret, nonce) = ([1u8; 32], [2u8; 32]);
        let name = checked.key.name();
        let ok = |a: &[u8], s: &[u8]| check_answer(&checked, &secret, &nonce, &secret, a, s);
        let (a, s) = attest(&f.ak, TPM_ST_ATTEST_CERTIFY, &nonce, &name);
        ok(&a, &s).unwrap();
        let step = |r: Result<(), ProofError>| r.unwrap_err().step;
        // the secret
        assert_eq!(
            step(check_answer(&checked, &secret, &nonce, &[0; 32], &a, &s)),
            "credential"
        );
        // a quote, signed by the same AK, is not a certification
        let (q, qs) = attest(&f.ak, 0x8018, &nonce, &name);
        assert_eq!(step(ok(&q, &qs)), "certify");
        // another nonce, another name, another signer, trailing bytes
        let (a2, s2) = attest(&f.ak, TPM_ST_ATTEST_CERTIFY, &[3; 32], &name);
        assert!(ok(&a2, &s2).unwrap_err().why.contains("nonce"));
        let other = checked.ak.name();
        let (a3, s3) = attest(&f.ak, TPM_ST_ATTEST_CERTIFY, &nonce, &other);
        assert!(ok(&a3, &s3).unwrap_err().why.contains("another key"));
        let (a4, s4) = attest(&f.key, TPM_ST_ATTEST_CERTIFY, &nonce, &name);
        assert_eq!(step(ok(&a4, &s4)), "certify");
        let mut long = a.clone();
        long.push(0);
        let e = ok(&long, &sign_tpmt(&f.ak, &long)).unwrap_err();
        assert_eq!(e.step, "certify");
        assert!(e.why.contains("malformed"), "{e}");
        // every changed byte of the attestation or the signature fails
        for i in 0..a.len() {
            let mut b = a.clone();
            b[i] ^= 1;
            assert!(ok(&b, &s).is_err(), "attest byte {i}");
        }
        for i in 0..s.len() {
            let mut b = s.clone();
            b[i] ^= 1;
            assert!(ok(&a, &b).is_err(), "signature byte {i}");
        }
    }
}
