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
    let ek =
        TpmPublic::from_tpm2b(e.ek_public, "ek_public").map_err(|x| fail("ek-certificate", x.to_string()))?;
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
    let ek =
        TpmPublic::from_tpm2b(e.ek_public, "ek_public").map_err(|x| fail("ek-certificate", x.to_string()))?;
    let (ak, key) = check_binding(e, jwk_point)?;
    Ok(Checked {
        ek,
        ak,
        key,
        manufacturer_ca: String::new(),
    })
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
